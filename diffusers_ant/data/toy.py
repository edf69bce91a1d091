"""A small captioned, conditioned dataset built from real MNIST-5k digits, for text-to-image and
ControlNet runs without the Hub (tests, the demo, smoke runs of `--model_type sd|controlnet`).

Registered as the built-in `--dataset_name mnist5k_captions`; `make_animal_caption_dataset` (the
captioned Animal-MNIST silhouettes, `--dataset_name animal_mnist_captions`) is its transfer target.
"""

from __future__ import annotations

import numpy as np

from .builtin import ANIMAL_NAMES, DIGIT_NAMES, _animal_mnist_arrays, _mnist5k_arrays, images_to_dataset

CAPTION_TEMPLATE = "a handwritten digit {}"
ANIMAL_CAPTION_TEMPLATE = "a silhouette of a {}"


def edge_map(image: np.ndarray, threshold: int = 128) -> np.ndarray:
    """The outline of a greyscale uint8 image: the ink pixels that touch background (0 or 255).

    Ink is `image >= threshold`; its outline is the ink minus its binary erosion (scipy.ndimage),
    the usual morphological boundary. It plays the part that Canny edges play in diffusers'
    ControlNet examples, and is exact and dependency-free for binary-looking digits.
    """
    from scipy.ndimage import binary_erosion

    ink = image >= threshold
    outline = ink & ~binary_erosion(ink)
    return outline.astype(np.uint8) * 255


def make_toy_caption_dataset(num_samples: int | None = None, resolution: int | None = None):
    """A `datasets.Dataset` with columns `image`, `text`, `conditioning_image` and `label`.

    Args:
        num_samples: rows to keep (default all 5,000). Rows are interleaved by class
            (0, 1, ..., 9, 0, 1, ...), so any prefix is class-balanced and the result is deterministic.
        resolution: resize the digits (bilinear) to `resolution` x `resolution` before the edge map is
            taken, so the conditioning image outlines what the model will see; default keeps 28x28.

    `text` is "a handwritten digit <d>"; `conditioning_image` is `edge_map` of the image (greyscale;
    the data loader converts it to the ControlNet's channel count).
    """
    from PIL import Image

    images, labels = _mnist5k_arrays()
    # mnist_5k.csv is sorted by label with 500 rows per class: read it column-wise to interleave.
    order = np.argsort(labels, kind="stable").reshape(10, -1).T.reshape(-1)
    if num_samples is not None:
        if not 1 <= num_samples <= len(order):
            raise ValueError(f"num_samples must be between 1 and {len(order)}, got {num_samples}")
        order = order[:num_samples]
    images, labels = images[order], labels[order]
    if resolution is not None and resolution != images.shape[-1]:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        images = np.stack([
            np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BILINEAR)) for im in images
        ])

    import datasets

    captions = [CAPTION_TEMPLATE.format(DIGIT_NAMES[y]) for y in labels]
    edges = [edge_map(im) for im in images]
    return images_to_dataset(
        images,
        labels,
        DIGIT_NAMES,
        extra={"text": (captions, datasets.Value("string")), "conditioning_image": (edges, datasets.Image())},
    )


def make_animal_caption_dataset():
    """Animal-MNIST (10,000 silhouettes, 28x28) with a `text` column "a silhouette of a <animal>", in the
    dataset's own row order (so row numbers are those of `--dataset_name animal_mnist`).

    The text-to-image counterpart of `mnist5k_captions`: pretrain on the digits' captions, fine-tune
    on these (`train_scripts/demo_families.py`). Every caption fits the tiny presets' character
    tokenizers (32 tokens)."""
    import datasets

    images, labels = _animal_mnist_arrays()
    captions = [ANIMAL_CAPTION_TEMPLATE.format(ANIMAL_NAMES[y]) for y in labels]
    return images_to_dataset(images, labels, ANIMAL_NAMES, extra={"text": (captions, datasets.Value("string"))})
