"""Image preprocessing for training: resize, crop, flip, channel conversion, tensor in [-1, 1].

diffusers' example scripts build this from torchvision (`Resize`, `CenterCrop`/`RandomCrop`,
`RandomHorizontalFlip`, `ToTensor`, `Normalize([0.5], [0.5])`). torchvision cannot be installed
beside the CPU torch this project pins (its compiled operators fail to load), so the same steps are
written here with PIL and torch; with PIL input torchvision's `Resize` is itself a PIL resize, so the
results match.

Randomness (crop offset, flip) comes from a `numpy.random.Generator` the caller passes in, not from
the global RNG: `TrainingDataset` seeds one per (seed, epoch, sample index), which keeps
augmentations identical across worker counts, processes and a resumed run.
"""

from __future__ import annotations

import numpy as np
import torch

# The filters diffusers' scripts accept (torchvision's InterpolationMode names, the trainer's
# --image_interpolation_mode choices), as PIL resamples a PIL image for them: torchvision maps nearest_exact to
# PIL's nearest too.
INTERPOLATIONS = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
_PIL_FILTERS = {"nearest_exact": "NEAREST"}


def pil_filter(interpolation: str):
    """PIL's resampling filter for an `INTERPOLATIONS` name."""
    from PIL import Image

    return getattr(Image.Resampling, _PIL_FILTERS.get(interpolation, interpolation.upper()))

# channel count -> PIL mode
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class ImageTransform:
    """PIL image -> float tensor (C, H, W); see `build_transforms`."""

    def __init__(
        self,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        num_channels: int | None = None,
        interpolation: str = "bilinear",
        normalize: bool = True,
    ):
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"--resolution must be a positive integer, got {resolution!r}")
        if num_channels is not None and num_channels not in CHANNEL_MODES:
            raise ValueError(f"num_channels must be 1 (greyscale), 3 (RGB) or 4 (RGBA), got {num_channels}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{interpolation}': choose one of {', '.join(INTERPOLATIONS)}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.num_channels = num_channels
        self.interpolation = interpolation
        self.normalize = normalize

    def __repr__(self):
        return (
            f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, num_channels={self.num_channels}, "
            f"interpolation={self.interpolation!r}, normalize={self.normalize})"
        )

    def _convert(self, image):
        """Greyscale or RGB to match the model; other modes (P, 1, LA, CMYK, 16-bit) are converted."""
        from PIL import Image

        if image.mode.startswith("I") or image.mode == "F":
            # PIL's convert clips 16-bit / float data instead of scaling it: scale to 0..255 first. A 16-bit
            # mode (I;16, what Pillow opens a 16-bit PNG as) is scaled by its full range, whatever the image
            # holds: by its brightest pixel, a dark 16-bit frame (peak <= 255) read as a bright 8-bit one.
            # The 32-bit "I" and float "F" containers say nothing of the range: their peak decides.
            array = np.asarray(image, dtype=np.float64)
            peak = array.max() if array.size else 1.0
            if image.mode.startswith("I;16"):
                scale = 65535.0
            else:
                scale = 1.0 if peak <= 1.0 and image.mode == "F" else (65535.0 if peak > 255 else 255.0)
            image = Image.fromarray(np.clip(array * (255.0 / scale), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode "L"
        if self.num_channels is not None:
            mode = CHANNEL_MODES[self.num_channels]
        elif image.mode in ("L", "RGB"):
            mode = image.mode
        elif image.mode in ("1", "LA"):
            mode = "L"
        else:
            mode = "RGB"
        return image if image.mode == mode else image.convert(mode)

    def __call__(self, image, rng: np.random.Generator | None = None, size: tuple | None = None) -> torch.Tensor:
        """Transform one PIL image. `rng` drives the random crop and flip (default: a fresh,
        unseeded generator, i.e. not reproducible). `size` = (width, height): an aspect-ratio bucket
        (`data.buckets`) instead of the square; the image is resized to cover it and centre-cropped."""
        return self.with_crop_coords(image, rng, size=size)[0]

    def with_crop_coords(self, image, rng: np.random.Generator | None = None, size: tuple | None = None):
        """`(tensor, original_size, crop_top_left)`: the transformed image, the image's (height, width)
        before any resize, and the (top, left) of the crop, for SDXL's micro-conditioning.

        As diffusers' `train_text_to_image_sdxl.py` / `train_dreambooth_lora_sdxl.py` record them: the
        original size of the image as read, and the crop's top-left in the resized image after the
        flip (those scripts flip, then crop; cropping then flipping, as here, gives the same pixels,
        and the flipped crop's left edge is `width - left - crop width`). In a bucket (`size`) the crop
        is the bucket's centre crop of the covering resize."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(
                f"expected a PIL image, got {type(image).__name__}: is --image_column an image column?"
            )
        if rng is None and (self.random_flip or (not self.center_crop and size is None)):
            rng = np.random.default_rng()
        image = self._convert(image)
        original_size = (image.height, image.width)
        if size is not None:
            crop_width = size[0]
            image, (top, left), width = self._cover_and_center_crop(image, size)
        else:
            crop_width = self.resolution
            # 1. Resize the shorter side to `resolution`, keeping the aspect ratio (torchvision's Resize(int)).
            width, height = image.size
            short, long = (width, height) if width <= height else (height, width)
            if short != self.resolution:
                new_long = int(self.resolution * long / short)
                new_size = (self.resolution, new_long) if width <= height else (new_long, self.resolution)
                image = image.resize(new_size, resample=pil_filter(self.interpolation))

            # 2. Crop to a square: centred, or at a random offset (torchvision's CenterCrop / RandomCrop).
            width, height = image.size
            left = top = 0
            if width != self.resolution or height != self.resolution:
                if self.center_crop:
                    # torchvision rounds the centred offset the same way
                    left = int(round((width - self.resolution) / 2.0))
                    top = int(round((height - self.resolution) / 2.0))
                else:
                    # Offsets are drawn as fractions of the slack so that two images of different
                    # sizes given equal generators (image and its conditioning) crop the same region.
                    u, v = rng.random(2)
                    left = int(u * (width - self.resolution + 1))
                    top = int(v * (height - self.resolution + 1))
                image = image.crop((left, top, left + self.resolution, top + self.resolution))
            elif not self.center_crop:
                rng.random(2)  # keep the draw sequence the same whatever the image size

        # 3. Horizontal flip with probability 1/2.
        image, flipped = self._flip(image, rng)
        if flipped:
            left = width - left - crop_width  # the crop's left edge in the flipped resized image
        return self._to_tensor(image), original_size, (top, left)

    def _flip(self, image, rng):
        """`(image, flipped)`: the image mirrored with probability 1/2 under `--random_flip`."""
        from PIL import Image

        if self.random_flip and rng.random() < 0.5:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), True
        return image, False

    def _cover_and_center_crop(self, image, size):
        """Resize (keeping the aspect ratio) to the smallest size covering `size` = (width, height),
        then crop its centre: the bucket transform of kohya's sd-scripts and SimpleTuner. Returns the
        crop, its (top, left) in the resized image and the resized width."""
        from PIL import Image

        target_w, target_h = size
        width, height = image.size
        scale = max(target_w / width, target_h / height)
        new = (max(target_w, int(round(width * scale))), max(target_h, int(round(height * scale))))
        if new != (width, height):
            image = image.resize(new, resample=pil_filter(self.interpolation))
        left = int(round((new[0] - target_w) / 2.0))
        top = int(round((new[1] - target_h) / 2.0))
        return image.crop((left, top, left + target_w, top + target_h)), (top, left), new[0]

    def _to_tensor(self, image) -> torch.Tensor:
        # 4. To a float tensor (C, H, W) in [0, 1], then [-1, 1] (ToTensor + Normalize([0.5], [0.5])).
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.normalize:
            tensor = tensor.mul_(2.0).sub_(1.0)
        return tensor


def build_transforms(
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    num_channels: int | None = None,
    interpolation: str = "bilinear",
    normalize: bool = True,
) -> ImageTransform:
    """The training image transform of diffusers' example scripts, without torchvision.

    Args:
        resolution: output height and width; the shorter side is resized to it, then a square is cropped.
        center_crop: crop the centre (`--center_crop`) instead of a random square.
        random_flip: flip horizontally with probability 1/2 (`--random_flip`).
        num_channels: 1 converts to greyscale, 3 to RGB (the model's `in_channels` for pixel-space
            models; 3 for a VAE); None keeps greyscale/RGB images as they are.
        interpolation: the resampling filter: "bilinear" (diffusers' unconditional and ControlNet scripts),
            "lanczos" (its text-to-image scripts' default), ... (`INTERPOLATIONS`)
        normalize: map to [-1, 1] (images); False keeps [0, 1] (ControlNet conditioning images, as in
            diffusers' ControlNet script).

    Returns a callable `transform(pil_image, rng=None) -> FloatTensor (C, resolution, resolution)`.
    """
    return ImageTransform(resolution, center_crop, random_flip, num_channels, interpolation, normalize)
