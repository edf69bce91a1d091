"""A small captioned, conditioned dataset built from real MNIST-5k digits, for text-to-image and
ControlNet runs without the Hub (tests, the demo, smoke runs of `--model_type sd|controlnet`).

Registered as the built-in `--dataset_name mnist5k_captions`.
"""

from __future__ import annotations

import numpy as np

from .builtin import DIGIT_NAMES, _mnist5k_arrays, images_to_dataset

CAPTION_TEMPLATE = "a handwritten digit {}"


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
