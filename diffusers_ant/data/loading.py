"""Loading a training set by name or folder, and choosing its columns.

`load_training_dataset` mirrors what diffusers' example scripts do with `--dataset_name`,
`--dataset_config_name`, `--cache_dir` and `--train_data_dir`, with the built-in offline sets
(`builtin.py`) tried first. `resolve_columns` mirrors their `--image_column` / `--caption_column` /
`--conditioning_image_column` handling, plus `--class_column` for class-conditional models.
"""

from __future__ import annotations

import os
from pathlib import Path

from .builtin import BUILTIN_DATASETS, is_builtin_dataset, load_builtin_dataset


def _image_extensions() -> set[str]:
    """The file extensions `datasets`' imagefolder builder reads (everything PIL opens)."""
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return {ext.lower() for ext in ImageFolder.EXTENSIONS}
    except (ImportError, AttributeError):  # pragma: no cover - older/newer datasets layouts
        return {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _folder_has_images(folder: Path) -> bool:
    extensions = _image_extensions()
    for _root, _dirs, files in os.walk(folder):
        if any(os.path.splitext(name)[1].lower() in extensions for name in files):
            return True
    return False


def load_training_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
):
    """The training split as a `datasets.Dataset`.

    Resolution order:
    1. `dataset_name` is a built-in offline set (`mnist5k`, `animal_mnist`, `digits`,
       `mnist5k_captions`): built in memory.
    2. any other `dataset_name`: `datasets.load_dataset(dataset_name, dataset_config_name,
       cache_dir=cache_dir, split=split)` (a Hub id, or a local dataset folder / script).
    3. `train_data_dir`: `datasets.load_dataset("imagefolder", data_files={split: "<train_data_dir>/**"})`,
       every file of the folder in the one split, as diffusers' text-to-image scripts load it (with
       `data_dir` the builder guesses splits from file and folder names: files named `train_*` beside a
       `metadata.jsonl` lost their captions, and a `test/` subfolder became the only split); a
       `metadata.jsonl` in the folder adds caption/label columns, as in diffusers' examples.

    Raises a short `ValueError` naming the fix when neither or both are given, the folder is missing
    or holds no images, or the name cannot be found (offline, a Hub name fails at once).
    """
    if dataset_name is None and train_data_dir is None:
        raise ValueError(
            "no training data: pass --dataset_name (a built-in: "
            f"{', '.join(BUILTIN_DATASETS)}; or a datasets/Hub name) or --train_data_dir (an image folder)"
        )
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("pass either --dataset_name or --train_data_dir, not both")

    if dataset_name is not None:
        if is_builtin_dataset(dataset_name):
            if split != "train":
                raise ValueError(f"built-in dataset '{dataset_name}' has only the 'train' split, not '{split}'")
            return load_builtin_dataset(dataset_name)
        return _load_named(dataset_name, dataset_config_name, cache_dir, split)

    folder = Path(train_data_dir)
    if not folder.is_dir():
        raise ValueError(f"--train_data_dir '{folder}' does not exist or is not a folder")
    if not _folder_has_images(folder):
        raise ValueError(f"--train_data_dir '{folder}' contains no images (.png, .jpg, ...)")
    import datasets

    return datasets.load_dataset("imagefolder", data_files={split: str(folder / "**")}, cache_dir=cache_dir,
                                 split=split)


def _load_named(name: str, config: str | None, cache_dir: str | None, split: str):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(name, config, cache_dir=cache_dir, split=split)
    except (DatasetNotFoundError, FileNotFoundError, ConnectionError) as error:
        # Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) an uncached Hub name raises ConnectionError;
        # online an unknown one raises DatasetNotFoundError. Both mean the same to the user.
        offline = any(
            os.environ.get(var, "0").strip().lower() not in ("", "0", "false", "no", "off")
            for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        where = "locally or in the cache (offline mode is on)" if offline else "locally or on the Hub"
        raise ValueError(
            f"dataset '{name}' was not found {where}; built-in offline datasets: "
            f"{', '.join(BUILTIN_DATASETS)}; or pass --train_data_dir with an image folder"
        ) from error


# --------------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------------

# Conventional names, most likely first. The image default follows diffusers' unconditional script
# ("image"); captions follow the text-to-image scripts ("text" in their imagefolder examples).
IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values")
CAPTION_COLUMN_NAMES = ("text", "caption", "captions", "prompt", "sentence")
CONDITIONING_COLUMN_NAMES = ("conditioning_image", "control_image", "conditioning", "condition", "hint")
CLASS_COLUMN_NAMES = ("label", "labels", "class", "class_label", "fine_label", "coarse_label")


def _features(dataset) -> dict:
    return dict(dataset.features or {})


def _is_image(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def _is_string(feature) -> bool:
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    # a list of captions per image, as in some caption datasets
    inner = getattr(feature, "feature", None)
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def _is_class(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.ClassLabel)


def _pick(columns: list[str], features: dict, names, kind, exclude=()) -> str | None:
    """The first conventional name present, else the first column of the right kind."""
    for name in names:
        if name in columns and name not in exclude:
            return name
    for name in columns:
        if name not in exclude and kind(features.get(name)):
            return name
    return None


def _check(dataset, flag: str, column: str) -> str:
    if column not in dataset.column_names:
        raise ValueError(
            f"{flag} '{column}' is not a column of the dataset; available columns: {', '.join(dataset.column_names)}"
        )
    return column


def resolve_columns(
    dataset,
    image_column: str | None = None,
    caption_column: str | None = None,
    conditioning_image_column: str | None = None,
    class_column: str | None = None,
    need_captions: bool = False,
    need_conditioning: bool = False,
    need_classes: bool = False,
    classes_if_present: bool = False,
) -> dict:
    """Choose and validate the columns a run uses.

    Returns `{"image_column", "caption_column", "conditioning_image_column", "class_column"}`, each
    a column name or None. A column given explicitly must exist (the error lists the available ones);
    an unset one defaults to a conventional name ("image", "text"/"caption", "conditioning_image",
    "label"), else the first column of the right feature type (Image, string, ClassLabel), the way
    diffusers' scripts fall back to the dataset's first columns. Captions, conditioning images and
    classes are looked up only when `need_*` says the model uses them or the column is given; a
    needed one that cannot be found is an error naming the flag to pass.

    `classes_if_present` looks up a class column without requiring one: a model that can train
    either way (a DiT, whose label embedding has a null class) is class-conditional on a labelled
    dataset and unconditional on an unlabelled one (e.g. a flat image folder); the class column is
    then None.
    """
    columns = list(dataset.column_names)
    features = _features(dataset)
    missing = "the dataset has no {what} column; pass {flag} (available columns: " + ", ".join(columns) + ")"

    if image_column is not None:
        image = _check(dataset, "--image_column", image_column)
    else:
        # (never a conditioning image's conventional name: a ControlNet set's target would be swapped with it)
        image = _pick(columns, features, IMAGE_COLUMN_NAMES, _is_image, exclude=CONDITIONING_COLUMN_NAMES)
        if image is None:
            if not columns:
                raise ValueError("the dataset has no columns")
            image = columns[0]  # diffusers' fallback; the transform will say if it is not an image

    if caption_column is not None:
        caption = _check(dataset, "--caption_column", caption_column)
    elif need_captions:
        caption = _pick(columns, features, CAPTION_COLUMN_NAMES, _is_string, exclude=(image,))
        if caption is None:
            hint = ""
            if not any(_is_string(features.get(c)) for c in columns):  # (an image folder without its metadata)
                hint = ("; an image folder takes its captions from a metadata.jsonl beside the images "
                        '({"file_name": "0001.png", "text": "..."} per line), as in diffusers\' examples')
            raise ValueError(missing.format(what="caption", flag="--caption_column") + hint)
    else:
        caption = None

    if conditioning_image_column is not None:
        conditioning = _check(dataset, "--conditioning_image_column", conditioning_image_column)
    elif need_conditioning:
        conditioning = _pick(columns, features, CONDITIONING_COLUMN_NAMES, _is_image, exclude=(image,))
        if conditioning is None:
            raise ValueError(missing.format(what="conditioning image", flag="--conditioning_image_column"))
    else:
        conditioning = None

    if class_column is not None:
        label = _check(dataset, "--class_column", class_column)
    elif need_classes or classes_if_present:
        label = _pick(columns, features, CLASS_COLUMN_NAMES, _is_class, exclude=(image,))
        if label is None and need_classes:
            raise ValueError(missing.format(what="class label", flag="--class_column"))
    else:
        label = None

    if conditioning is not None and conditioning == image:
        raise ValueError("--conditioning_image_column must differ from --image_column")
    return {
        "image_column": image,
        "caption_column": caption,
        "conditioning_image_column": conditioning,
        "class_column": label,
    }


def first_caption(value) -> str:
    """A prompt from a caption cell: the caption, or the first of a list of captions (training draws one
    of them per sample; a list given to a pipeline would be read as a text pair, and `str` of it is the
    text "['a', 'b']")."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return str(value)


def class_names(dataset, class_column: str) -> list[str]:
    """The class names of `class_column`, in label-id order (the model's `num_class_embeds` is their count).

    A `ClassLabel` column gives its names; an integer column gives "0".."max"; a string column gives
    its sorted distinct values (the ids `TrainingDataset` uses for it).
    """
    _check(dataset, "--class_column", class_column)
    feature = _features(dataset).get(class_column)
    if _is_class(feature):
        return list(feature.names)
    values = dataset.unique(class_column)
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise ValueError(f"--class_column '{class_column}' has negative labels; class ids must be 0..K-1")
        return [str(i) for i in range(max(values) + 1)]
    raise ValueError(f"--class_column '{class_column}' must hold integers or strings")


# --------------------------------------------------------------------------------------------------
# Channels
# --------------------------------------------------------------------------------------------------

# PIL's one-band modes (and LA): "I;16B" / "I;16L" / "I;16N" are 16-bit greyscale in another byte order
_GREYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def dataset_image_channels(dataset, image_column: str, max_rows: int = 1000) -> int:
    """1 when the dataset's images are greyscale, 3 when any of them has colour.

    What a model trained from scratch is built for. Decided from the image modes of up to
    `max_rows` rows spread evenly over the dataset (every row of a small one), not from the first
    row alone: one colour image among greyscale ones makes the model RGB, and the transforms then
    convert every greyscale image to three channels."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: it has no image to train on")
    count = min(n, max_rows)
    indices = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})
    rows = dataset.select(indices).select_columns([image_column])
    for row in rows:
        if getattr(row[image_column], "mode", "RGB") not in _GREYSCALE_MODES:
            return 3
    return 1
