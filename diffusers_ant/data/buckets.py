"""Aspect-ratio buckets (`--aspect_ratio_buckets`): train every image at (about) its own aspect ratio.

Instead of cropping every image to a `resolution` x `resolution` square, each image goes to the bucket
of the fixed list whose aspect ratio is nearest its own, is resized to cover the bucket and is
centre-cropped to it; every batch holds images of one bucket only, so they stack. The list is the one
kohya's sd-scripts (`make_bucket_resolutions`) and diffusers' research scripts derive from the
resolution: for every width w that is a multiple of the step (`--bucket_step`, 64 pixels by default as
kohya's `--bucket_reso_steps`; a multiple of the pixels of one latent patch), the largest height h (a multiple too)
with w * h <= resolution^2, kept with its transpose (h, w) when the aspect ratio lies within
[1 / max_aspect, max_aspect]. So every bucket has about resolution^2 pixels, and its sides are multiples of the VAE factor times the
denoiser's patch size (what the model can take).

The batch sampler is seeded like `EpochRandomSampler`: the order of epoch e is a pure function of
(seed, e), so a resumed run skips exactly the batches the interrupted one used (`skip_first_batches`),
and Accelerate's `BatchSamplerShard` hands each process its own whole, single-bucket batches.

Written here rather than imported: diffusers has no bucketing utility, and kohya / SimpleTuner keep
theirs inside their trainers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Sampler

# kohya's and SDXL's bucket lists span aspect ratios 1:4 to 4:1
DEFAULT_MAX_ASPECT = 4.0


# kohya's `--bucket_reso_steps` default (SimpleTuner's too): a bucket per 64 pixels of side. A finer step (one
# latent patch, 8 or 16 pixels) makes 129 buckets at 512 and 257 at 1024, so a data set of varied aspect ratios
# spreads thin, and every bucket short of a full run of batches is never trained.
DEFAULT_BUCKET_STEP = 64


def default_bucket_step(resolution: int, multiple: int) -> int:
    """The buckets' side step in pixels for `--bucket_step` not given: 64 (kohya's default), rounded up to a
    multiple of `multiple`; at resolutions below 8 steps of that, resolution / 8 (at least `multiple`), so that
    small images keep several buckets."""
    step = math.lcm(DEFAULT_BUCKET_STEP, multiple)
    if resolution >= 8 * step:
        return step
    return max(multiple, resolution // 8 // multiple * multiple)


def check_bucket_step(step: int, multiple: int) -> None:
    """A one-line ValueError unless `step` is a positive multiple of `multiple` (the pixels of one latent patch)."""
    if step < 1 or step % multiple:
        raise ValueError(f"--bucket_step {step} must be a positive multiple of {multiple} pixels (this model's VAE "
                         f"factor x patch size), e.g. {math.lcm(DEFAULT_BUCKET_STEP, multiple)}")


def bucket_sizes(resolution: int, multiple: int, max_aspect: float = DEFAULT_MAX_ASPECT) -> list[tuple[int, int]]:
    """The buckets of `resolution`, as `(width, height)` pairs sorted by aspect ratio (w / h).

    Every side is a multiple of `multiple`, every area at most `resolution`^2 and more than
    `resolution`^2 - `multiple` x the longer side (one strip short at most), every aspect ratio within [1 / max_aspect, max_aspect]; the square
    (`resolution` rounded down to `multiple`) is always one of them."""
    if multiple < 1 or resolution < multiple:
        raise ValueError(f"--resolution {resolution} is smaller than one latent patch ({multiple} pixels): "
                         "raise --resolution")
    area = resolution * resolution
    sizes = set()
    for width in range(multiple, area // multiple + 1, multiple):
        height = (area // width) // multiple * multiple
        if height < multiple:
            break
        if max(width, height) / min(width, height) <= max_aspect:
            sizes.update([(width, height), (height, width)])  # both orientations, as kohya's list
    side = resolution // multiple * multiple
    sizes.add((side, side))
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) to `width` / `height`; ties go
    to the larger area, then the first."""
    target = math.log(width / height)
    return min(range(len(buckets)),
               key=lambda i: (round(abs(math.log(buckets[i][0] / buckets[i][1]) - target), 12),
                              -buckets[i][0] * buckets[i][1]))


def assign_buckets(dataset, image_column: str, buckets) -> list[int]:
    """The bucket of every row of a `datasets.Dataset`, from its image's size.

    An `Image` column is read undecoded and each size taken from the file's header (`datasets` decodes the
    whole image, pixels and all: the whole data set, in the main process, before training started), turned
    as `datasets`' decoding turns an image by its EXIF orientation; a column of decoded images is read as is."""
    import datasets

    rows = dataset.select_columns([image_column])
    feature = rows.features.get(image_column)
    undecoded = isinstance(feature, datasets.Image) and feature.decode
    if undecoded:
        rows = rows.cast_column(image_column, datasets.Image(decode=False))
    assigned = []
    for row in rows:
        image = row[image_column]
        if undecoded:
            size = _header_size(image, feature)
        elif hasattr(image, "size"):
            size = image.size
        else:
            raise ValueError(f"expected a PIL image in --image_column '{image_column}', got {type(image).__name__}")
        assigned.append(nearest_bucket(*size, buckets))
    return assigned


# EXIF orientations that `PIL.ImageOps.exif_transpose` (datasets' decoding) turns by 90 degrees
_QUARTER_TURNS = (5, 6, 7, 8)


def _header_size(value: dict, feature) -> tuple[int, int]:
    """(width, height) of an undecoded `datasets` image ({"bytes", "path"}) as its decoding would give it, read
    from the header alone; a remote file is decoded by the feature itself."""
    import io
    import os

    from PIL import Image

    if value.get("bytes") is not None:
        source = io.BytesIO(value["bytes"])
    elif value.get("path") and os.path.isfile(value["path"]):
        source = value["path"]
    else:
        return feature.decode_example(value).size
    with Image.open(source) as image:  # lazy: the header, not the pixels
        width, height = image.size
        if image.getexif().get(Image.ExifTags.Base.Orientation) in _QUARTER_TURNS:
            width, height = height, width
    return width, height


def _mix_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` row indices, each from one bucket, in an order set by (seed, epoch).

    Epoch e: the rows of each bucket in a permutation seeded with (seed, e, bucket), cut into runs of
    `group_size` full batches (a bucket's last, incomplete run is dropped, as `drop_last` does for the
    whole set), and the runs of all buckets in a permutation seeded with (seed, e). The number of batches
    is the same every epoch, as the training loop's step count needs.

    `group_size` = gradient-accumulation steps x processes keeps every optimizer update on one bucket:
    the training step concatenates a window's micro-batches (one shape), and Accelerate's
    `BatchSamplerShard` deals batch i to process i mod P, so each process's window of GA micro-batches
    falls inside one run of GA x P consecutive batches.

    Like `EpochRandomSampler`, `set_epoch` (Accelerate's prepared loader calls it, through the
    `sampler` attribute it looks for) also reaches the dataset, whose augmentations depend on the epoch.
    """

    drop_last = True

    def __init__(self, row_buckets, batch_size: int, seed: int = 0, shuffle: bool = True, data_source=None,
                 group_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"--train_batch_size must be positive, got {batch_size}")
        if group_size < 1:
            raise ValueError(f"group_size must be positive, got {group_size}")
        self.group_size = int(group_size)
        self.row_buckets = [int(b) for b in row_buckets]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.data_source = data_source
        self.epoch = 0
        self.members = {}
        for row, bucket in enumerate(self.row_buckets):
            self.members.setdefault(bucket, []).append(row)
        run = self.batch_size * self.group_size
        left_out = sum(len(rows) for rows in self.members.values() if len(rows) < run)
        if left_out and len(self):
            import logging

            logging.getLogger("diffusers_ant").warning(
                "%d images are in aspect-ratio buckets with fewer than %d images (--train_batch_size x "
                "--gradient_accumulation_steps x processes): they are never trained", left_out, run)
        if len(self) == 0:
            largest = max((len(rows) for rows in self.members.values()), default=0)
            raise ValueError(f"no aspect-ratio bucket holds {run} images (--train_batch_size x "
                             f"--gradient_accumulation_steps x processes; the fullest has {largest}): lower "
                             "--train_batch_size or drop --aspect_ratio_buckets")

    @property
    def sampler(self):
        """What Accelerate's `set_epoch` looks for (`batch_sampler.sampler.set_epoch`)."""
        return self

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        if self.data_source is not None and hasattr(self.data_source, "set_epoch"):
            self.data_source.set_epoch(epoch)

    def __len__(self):
        run = self.batch_size * self.group_size
        return sum(len(rows) // run for rows in self.members.values()) * self.group_size

    def __iter__(self):
        run = self.batch_size * self.group_size
        runs = []
        for bucket in sorted(self.members):
            rows = self.members[bucket]
            if self.shuffle:
                generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, bucket))
                rows = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            runs += [rows[i:i + run] for i in range(0, len(rows) - run + 1, run)]
        if self.shuffle:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
            runs = [runs[i] for i in torch.randperm(len(runs), generator=generator).tolist()]
        return iter([rows[i:i + self.batch_size] for rows in runs for i in range(0, run, self.batch_size)])
