"""Training data: the built-in offline datasets, `datasets` / Hub names and image folders, the
image transforms, and a reproducible, resumable data loader.

Typical use in a training script::

    dataset = load_training_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
    columns = resolve_columns(dataset, args.image_column, args.caption_column,
                              args.conditioning_image_column, args.class_column,
                              need_captions=..., need_conditioning=..., need_classes=...)
    train_dataloader = make_train_dataloader(dataset, columns, args.resolution, args.train_batch_size,
                                             num_channels=..., tokenizer=..., seed=args.seed)

See `dataloader.py` for the batch keys and what the loop must do to resume at an exact position.
"""

from .builtin import BUILTIN_DATASETS, NumpyArrayUnpickler, is_builtin_dataset, load_builtin_dataset, load_numpy_pickle
from .dataloader import EpochRandomSampler, TrainingDataset, batches_per_process, make_train_dataloader
from .loading import class_names, dataset_image_channels, first_caption, load_training_dataset, resolve_columns
from .toy import edge_map, make_toy_caption_dataset
from .transforms import ImageTransform, build_transforms

__all__ = [
    "BUILTIN_DATASETS",
    "EpochRandomSampler",
    "ImageTransform",
    "NumpyArrayUnpickler",
    "TrainingDataset",
    "build_transforms",
    "class_names",
    "dataset_image_channels",
    "edge_map",
    "is_builtin_dataset",
    "load_builtin_dataset",
    "load_numpy_pickle",
    "load_training_dataset",
    "make_toy_caption_dataset",
    "batches_per_process",
    "make_train_dataloader",
    "first_caption",
    "resolve_columns",
]
