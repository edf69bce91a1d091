"""From a `datasets.Dataset` to training batches, reproducibly and resumably.

Batches are dicts:
- `pixel_values`: FloatTensor (B, C, H, W) in [-1, 1];
- `class_labels`: LongTensor (B,), when a class column is used;
- `input_ids`: LongTensor (B, tokenizer.model_max_length), when a caption column and a tokenizer
  are used (padded to the maximum length and truncated, as in diffusers' text-to-image script);
  without a tokenizer the raw strings come as `captions` (a list); a dict of tokenizers gives one
  such tensor per key (SDXL's `input_ids` and `input_ids_2`);
- `original_sizes`, `crop_top_lefts`: LongTensor (B, 2), each image's (height, width) as read and
  the (top, left) of its crop, with `crop_coords=True` (SDXL's micro-conditioning);
- `conditioning_pixel_values`: FloatTensor (B, C', H, W) in [0, 1], when a conditioning-image
  column is used (ControlNet; [0, 1] like diffusers' ControlNet script).

Determinism. Two things are random: the order of the samples and the augmentations (random crop,
flip, which caption of several). Both are pure functions of (seed, epoch, sample index):
`EpochRandomSampler` draws epoch e's permutation from a generator seeded with (seed, e), and
`TrainingDataset` seeds each sample's augmentation generator with (seed, e, index). Nothing uses
the global RNG, so the batches do not depend on the number of workers, on what else consumed
random numbers, or on whether the run was resumed.

What the Accelerate training loop must do (diffusers' scripts do the same):
1. `train_dataloader = accelerator.prepare(make_train_dataloader(...))`. With several processes,
   Accelerate wraps the batch sampler in a `BatchSamplerShard`: every process computes the same
   permutation (same seed and epoch) and takes its own batches, i.e. each process reads its own
   shard; nothing else is needed here.
2. At the start of every epoch call `train_dataloader.set_epoch(epoch)` (Accelerate forwards it to
   the sampler, which forwards it to the dataset).
3. To resume at step `global_step` (counted in optimizer updates): `first_epoch = global_step //
   num_update_steps_per_epoch`, `resume_batches = (global_step % num_update_steps_per_epoch) *
   gradient_accumulation_steps`; in epoch `first_epoch` call `set_epoch(first_epoch)` and then iterate
   `accelerator.skip_first_batches(train_dataloader, resume_batches)`; later epochs iterate
   `train_dataloader` as usual (after their own `set_epoch`). `skip_first_batches` skips indices in
   the batch sampler without loading the skipped samples, and the data position is fully described
   by (seed, epoch, batches seen), so nothing about the data needs to go into the checkpoint
   beyond the step count.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .loading import class_names as _class_names
from .transforms import build_transforms


def _mix(*values: int) -> np.random.SeedSequence:
    """Distinct, well-mixed seeds for every tuple (unlike seed + epoch, where (0, 1) == (1, 0))."""
    return np.random.SeedSequence([int(v) for v in values])


def _is_caption(value) -> bool:
    """A string, or a non-empty list of strings (one is drawn per epoch, as diffusers' `tokenize_captions`)."""
    if isinstance(value, str):
        return True
    return (isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0
            and all(isinstance(v, str) for v in value))


def _arrow_captions_complete(dataset, column: str) -> bool:
    """True when Arrow's own counts show every cell of `column` to be a caption: a string column without
    nulls, or a list-of-strings column without null or empty lists or null strings. False when they do not,
    or for a column of another type, where `_check_captions` reads the rows one by one. (Reading a million
    captions into Python takes about 7 s on this machine's CPU; these counts take milliseconds.) The counts
    cover the whole table under a selection (`--max_train_samples`), so a bad row outside it sends the check to
    the row-by-row reading, which then passes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cells = dataset.data.column(column)
    strings = (pa.types.is_string, pa.types.is_large_string)
    if any(is_type(cells.type) for is_type in strings):
        return cells.null_count == 0
    if pa.types.is_list(cells.type) or pa.types.is_large_list(cells.type):
        if not any(is_type(cells.type.value_type) for is_type in strings) or cells.null_count:
            return False
        shortest = pc.min(pc.list_value_length(cells)).as_py()
        return (shortest is None or shortest > 0) and pc.list_flatten(cells).null_count == 0
    return False


def _check_captions(dataset, column: str) -> None:
    """A one-line ValueError naming the first row whose caption is not a string or a non-empty list of strings."""
    if _arrow_captions_complete(dataset, column):
        return
    for row, value in enumerate(dataset.select_columns([column])[column]):
        if not _is_caption(value):
            shown = "an empty list" if isinstance(value, (list, tuple)) and not value else repr(value)[:60]
            raise ValueError(f"row {row} of --caption_column '{column}' is {shown}: every image needs a caption, a "
                             "string or a list of strings (one is drawn per epoch); fill it (\"\" for none) or drop the row")


class TrainingDataset(Dataset):
    """A map-style torch dataset over a `datasets.Dataset`: decodes and transforms one row at a time.

    Like diffusers' `dataset.with_transform(preprocess_train)`, rows are decoded and transformed
    lazily when read. It is a thin wrapper rather than `with_transform` because the augmentation
    generator needs the row's index and the epoch, which a `with_transform` function never sees.

    Args:
        dataset: a `datasets.Dataset` (e.g. from `load_training_dataset`).
        columns: the dict `resolve_columns` returns (`image_column`, `caption_column`,
            `conditioning_image_column`, `class_column`; None for an unused one).
        resolution, num_channels, center_crop, random_flip, interpolation: see `build_transforms`;
            `num_channels` is the model's input channels (1 or 3; 3 for a VAE).
        tokenizer: a transformers tokenizer for the captions, or a dict `{batch key: tokenizer}` for a
            model with several text encoders (SDXL: `{"input_ids": ..., "input_ids_2": ...}`).
        crop_coords: also record each image's original size and crop top-left (see the module docstring).
        conditioning_channels: channels of the conditioning image (ControlNet's
            `conditioning_channels`, 3 by default).
        seed: seeds the augmentations (and, through `max_samples`, the subset).
        max_samples: keep this many rows, chosen as diffusers' `--max_train_samples` does
            (`dataset.shuffle(seed).select(range(max_samples))`).
        proportion_empty_prompts: share of captions replaced by "" (`--proportion_empty_prompts`).
        buckets: aspect-ratio buckets, `(width, height)` pairs (`data.buckets.bucket_sizes`): each row is
            trained at its nearest-ratio bucket (resized to cover it, centre-cropped) instead of the square.

    Attributes:
        row_buckets: the bucket index of every row (with `buckets`), else None.
        cache: a `training.caching.TrainingCache` once `--cache_latents` / `--cache_text_embeddings`
            encoded the data: rows then carry `latent_moments` instead of `pixel_values` and
            `cached_text/<key>` entries instead of `input_ids` (see `training.caching`).
    """

    def __init__(
        self,
        dataset,
        columns: dict,
        resolution: int,
        num_channels: int | None = None,
        tokenizer=None,
        center_crop: bool = False,
        random_flip: bool = False,
        conditioning_channels: int = 3,
        interpolation: str = "bilinear",
        seed: int = 0,
        max_samples: int | None = None,
        proportion_empty_prompts: float = 0.0,
        crop_coords: bool = False,
        buckets=None,
    ):
        self.crop_coords = bool(crop_coords)
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"--proportion_empty_prompts must lie in [0, 1], got {proportion_empty_prompts}")
        self.proportion_empty_prompts = float(proportion_empty_prompts)
        self.image_column = columns.get("image_column")
        self.caption_column = columns.get("caption_column")
        self.conditioning_column = columns.get("conditioning_image_column")
        self.class_column = columns.get("class_column")
        if self.image_column is None:
            raise ValueError("columns has no image_column: build it with resolve_columns(dataset, ...)")
        used = [c for c in (self.image_column, self.caption_column, self.conditioning_column, self.class_column) if c]
        missing = [c for c in used if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"column(s) {', '.join(missing)} not in the dataset; available columns: {', '.join(dataset.column_names)}"
            )

        # Class ids: ClassLabel / int columns are used as they are; string columns map to the index
        # of their sorted distinct values (see loading.class_names).
        self.class_to_id = None
        self._class_names = None
        self.num_classes = None
        if self.class_column is not None:
            names = _class_names(dataset, self.class_column)
            feature = dataset.features.get(self.class_column)
            if getattr(feature, "dtype", None) in ("string", "large_string"):
                self.class_to_id = {name: i for i, name in enumerate(names)}
            self._class_names = names
            self.num_classes = len(names)

        if max_samples is not None:
            if max_samples < 1:
                raise ValueError(f"--max_train_samples must be positive, got {max_samples}")
            if max_samples < len(dataset):
                dataset = dataset.shuffle(seed=seed).select(range(max_samples))
        # Decode only the columns in use (a dataset may carry other large image columns).
        self.dataset = dataset.select_columns(list(dict.fromkeys(used)))
        if self.caption_column is not None:
            # once, before training: a missing caption failed only when its row was drawn (hours in, and again at
            # the same step after every exact resume), or as a traceback in --cache_text_embeddings
            _check_captions(self.dataset, self.caption_column)
        self.buckets = [tuple(size) for size in buckets] if buckets else None
        self.row_buckets = None
        if self.buckets:
            from .buckets import assign_buckets

            self.row_buckets = assign_buckets(self.dataset, self.image_column, self.buckets)
        self.cache = None
        self._rows_without_image = None
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.epoch = 0
        self.image_transform = build_transforms(resolution, center_crop, random_flip, num_channels, interpolation)
        self.conditioning_transform = build_transforms(
            resolution, center_crop, random_flip, conditioning_channels, interpolation, normalize=False
        )

    def set_epoch(self, epoch: int):
        """New augmentations each epoch (called through the sampler and by Accelerate)."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.dataset)

    def _rng(self, index: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng(_mix(self.seed, self.epoch, index, stream))

    def bucket_size(self, index: int):
        """The `(width, height)` row `index` is trained at: its bucket, or None (the square)."""
        return None if self.row_buckets is None else self.buckets[self.row_buckets[int(index)]]

    def transformed_image(self, index: int, with_crop_coords: bool = False):
        """Row `index`'s image as the model sees it (what `--cache_latents` encodes); with
        `with_crop_coords`, `(image, original_sizes, crop_top_lefts)` as a row carries them (SDXL)."""
        if getattr(self, "_image_rows", None) is None:
            self._image_rows = self.dataset.select_columns([self.image_column])
        row = self._image_rows[int(index)]
        pixels, original_size, crop_top_left = self.image_transform.with_crop_coords(
            row[self.image_column], self._rng(index), size=self.bucket_size(index))
        if not with_crop_coords:
            return pixels
        return (pixels, torch.tensor(original_size, dtype=torch.long),
                torch.tensor(crop_top_left, dtype=torch.long))

    def _row(self, index: int) -> dict:
        if self.cache is None or self.cache.latents is None:
            return self.dataset[int(index)]
        # cached latents: the image is not decoded at all
        if self._rows_without_image is None:
            rest = [c for c in self.dataset.column_names if c != self.image_column]
            self._rows_without_image = self.dataset.select_columns(rest) if rest else None
        return {} if self._rows_without_image is None else self._rows_without_image[int(index)]

    def __getitem__(self, index: int) -> dict:
        row = self._row(index)
        size = self.bucket_size(index)
        # The image and its conditioning image get equal generators, hence the same crop and flip.
        if self.cache is not None and self.cache.latents is not None:
            example = {"latent_moments": self.cache.latents[int(index)]}
            if self.crop_coords:  # SDXL's micro-conditioning of the cached image (recorded when it was cached)
                example["original_sizes"], example["crop_top_lefts"] = self.cache.crop_coords[int(index)]
        else:
            pixels, original_size, crop_top_left = self.image_transform.with_crop_coords(
                row[self.image_column], self._rng(index), size=size)
            example = {"pixel_values": pixels}
            if self.crop_coords:
                example["original_sizes"] = torch.tensor(original_size, dtype=torch.long)
                example["crop_top_lefts"] = torch.tensor(crop_top_left, dtype=torch.long)
        if self.conditioning_column is not None:
            example["conditioning_pixel_values"] = self.conditioning_transform(
                row[self.conditioning_column], self._rng(index), size=size
            )
        if self.class_column is not None:
            label = row[self.class_column]
            if self.class_to_id is not None:
                label = self.class_to_id[label]
            example["class_labels"] = torch.tensor(int(label), dtype=torch.long)
        if self.caption_column is not None:
            caption = self._caption(row[self.caption_column], index)
            if self.cache is not None and self.cache.text is not None:
                example.update(self.cache.text_fields(caption))
            else:
                example.update(self.text_fields(caption))
        return example

    def text_fields(self, caption: str) -> dict:
        """A caption as a row carries it: `input_ids` with a tokenizer, else the string as `captions`."""
        if self.tokenizer is None:
            return {"captions": caption}
        # one tokenizer (`input_ids`), or several by batch key (sdxl: `input_ids` and `input_ids_2`)
        tokenizers = self.tokenizer if isinstance(self.tokenizer, dict) else {"input_ids": self.tokenizer}
        return {key: tokenizer(
            caption,
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0] for key, tokenizer in tokenizers.items()}

    def caption_variants(self) -> list[str]:
        """Every caption a row can carry in any epoch: each caption of each row (one of several is drawn
        per epoch) and the empty prompt (`--proportion_empty_prompts`, and the unconditional branch).
        What `--cache_text_embeddings` encodes."""
        variants = {""}
        if self.caption_column is not None:
            for value in self.dataset.select_columns([self.caption_column])[self.caption_column]:
                variants.update([value] if isinstance(value, str) else list(value))
        return sorted(variants)

    def _caption(self, value, index: int) -> str:
        # As diffusers' tokenize_captions: the empty prompt for a share of the captions (caption
        # dropout, so that the model learns the unconditional branch of classifier-free guidance),
        # else a string, or one of several captions chosen at random; from the (seed, epoch, index) rng.
        if self.proportion_empty_prompts and self._rng(index, stream=2).random() < self.proportion_empty_prompts:
            return ""
        if isinstance(value, str):
            return value
        if _is_caption(value):
            return value[int(self._rng(index, stream=1).integers(len(value)))]
        raise ValueError(
            f"--caption_column '{self.caption_column}' should contain strings or lists of strings, got {type(value).__name__}"
        )

    @property
    def class_names(self) -> list[str] | None:
        """Names of the class ids (`num_classes` of them), or None without a class column."""
        return self._class_names


class EpochRandomSampler(Sampler[int]):
    """Indices in an order that depends only on (seed, epoch): a shuffled permutation, or 0..n-1.

    Like accelerate's `SeedableRandomSampler` and torch's `DistributedSampler`, the epoch is set by
    `set_epoch` (Accelerate's prepared loader calls it) rather than advanced by iterating, so a
    resumed run that sets the epoch sees the same order as the run it continues. `set_epoch` also
    reaches the dataset, whose augmentations depend on the epoch.
    """

    def __init__(self, data_source, seed: int = 0, shuffle: bool = True):
        self.data_source = data_source
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        if hasattr(self.data_source, "set_epoch"):
            self.data_source.set_epoch(epoch)

    def __len__(self):
        return len(self.data_source)

    def __iter__(self):
        n = len(self.data_source)
        if not self.shuffle:
            return iter(range(n))
        generator = torch.Generator()
        generator.manual_seed(int(_mix(self.seed, self.epoch).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        return iter(torch.randperm(n, generator=generator).tolist())


def batches_per_process(loader: DataLoader, accelerator) -> int:
    """How many batches of `loader` each process iterates once `accelerator.prepare` has sharded it.

    Asked of Accelerate's own `BatchSamplerShard`, the sampler `prepare` wraps the loader's batch
    sampler in: with `drop_last` (the trainer's loaders) the batches that do not fill a round of
    processes are dropped, so 9 batches on 2 processes are 4 each, not 5; without it, `even_batches`
    wraps around to the first batches."""
    if accelerator.num_processes == 1:
        return len(loader)
    from accelerate.data_loader import BatchSamplerShard

    batch_sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    return len(BatchSamplerShard(batch_sampler, num_processes=accelerator.num_processes,
                                 process_index=accelerator.process_index, split_batches=accelerator.split_batches,
                                 even_batches=accelerator.even_batches))


def make_train_dataloader(
    dataset,
    columns: dict,
    resolution: int,
    batch_size: int,
    num_channels: int | None = None,
    tokenizer=None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    max_samples: int | None = None,
    center_crop: bool = False,
    random_flip: bool = False,
    conditioning_channels: int = 3,
    interpolation: str = "bilinear",
    pin_memory: bool = False,
    proportion_empty_prompts: float = 0.0,
    crop_coords: bool = False,
    buckets=None,
    bucket_group_size: int = 1,
) -> DataLoader:
    """A `torch.utils.data.DataLoader` of training batches (see the module docstring for the keys,
    the determinism guarantees and what the training loop must do to resume).

    `dataset` is a `datasets.Dataset` (wrapped in `TrainingDataset` with the keyword arguments
    above) or an existing `TrainingDataset`. The loader's `sampler` is an `EpochRandomSampler`;
    without Accelerate, call `loader.sampler.set_epoch(epoch)` each epoch.

    `buckets` (aspect-ratio buckets, `data.buckets.bucket_sizes`): the loader's `batch_sampler` is a
    `BucketBatchSampler` instead (single-bucket batches, seeded per epoch, resumable the same way), in
    runs of `bucket_group_size` batches of one bucket (gradient-accumulation steps x processes).
    """
    if batch_size < 1:
        raise ValueError(f"--train_batch_size must be positive, got {batch_size}")
    if not isinstance(dataset, TrainingDataset):
        dataset = TrainingDataset(
            dataset,
            columns,
            resolution,
            num_channels=num_channels,
            tokenizer=tokenizer,
            center_crop=center_crop,
            random_flip=random_flip,
            conditioning_channels=conditioning_channels,
            interpolation=interpolation,
            seed=seed,
            max_samples=max_samples,
            proportion_empty_prompts=proportion_empty_prompts,
            crop_coords=crop_coords,
            buckets=buckets,
        )
    if dataset.row_buckets is not None:
        from .buckets import BucketBatchSampler

        return DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset.row_buckets, batch_size, seed=seed,
                                                                    shuffle=shuffle, data_source=dataset,
                                                                    group_size=bucket_group_size),
                          num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} rows, fewer than one batch of {batch_size}: lower --train_batch_size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochRandomSampler(dataset, seed=seed, shuffle=shuffle),
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        # Workers are re-created each epoch so they receive the dataset's new epoch.
        persistent_workers=False,
    )
