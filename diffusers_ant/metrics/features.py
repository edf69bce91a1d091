"""Feature extractors for the distribution metrics, all offline and without torchvision.

- `DomainFeatureExtractor(dataset_name)`: features of a small CNN classifier trained on one built-in
  dataset (mnist5k, animal_mnist, digits), deterministically on first use, cached as safetensors.
  They give a **domain FID**: a Fréchet distance in a feature space made for that dataset, in the
  spirit of the "LeNet FID" used for MNIST-like data. It is NOT Inception FID: its values are not
  comparable with any published FID, only with each other (same dataset, same extractor version
  and weights hash, same number of samples). Report it as "domain FID (mnist5k)".
- `InceptionFeatureExtractor(weights_path)`: the FID Inception-v3 (2048-d pool features), for which
  the user supplies the weights as safetensors (see `diffusers_ant.metrics.inception`). FIDs are
  comparable with published ones only with pytorch-fid's port of the TensorFlow weights
  (`pt_inception-2015-12-05`) and only with numbers computed the way pytorch-fid computes them:
  clean-fid (which ANT used) resizes differently, and ADM's evaluator (used for DiT) is another
  TensorFlow graph, so even then expect differences of a few percent.
- `ModuleFeatureExtractor(module)`: any `nn.Module` the user passes, its output flattened.

Every extractor has `weights_sha256()`, a hash of its weights (and buffers) that the evaluation
records beside every result, so two numbers are only compared when they came from the same weights.

All take images in [0, 1]: a list of PIL images, a (N, H, W, C) / (N, H, W) numpy array (the
`output_type="np"` of diffusers pipelines), a (N, C, H, W) tensor, uint8 arrays in [0, 255], or
anything with an `.images` attribute (a pipeline output) or an `image` column (a `datasets.Dataset`).
"""

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DOMAIN_DATASETS",
    "DOMAIN_RESOLUTIONS",
    "FeatureExtractor",
    "DomainClassifier",
    "DomainFeatureExtractor",
    "InceptionFeatureExtractor",
    "ModuleFeatureExtractor",
    "default_cache_dir",
    "get_feature_extractor",
    "images_to_tensor",
    "train_domain_classifier",
]

DOMAIN_DATASETS = ("mnist5k", "animal_mnist", "digits")
INCEPTION_NAMES = ("inception_v3",)
CACHE_ENV = "DIFFUSERS_ANT_CACHE"
# Bump when the classifier, its training or its preprocessing changes: old cache files are then retrained.
# 1: penultimate ReLU features (half of them dead, blind to noise); 2: multi-scale, smooth, normalised.
DOMAIN_CLASSIFIER_VERSION = "2"
DOMAIN_RESOLUTION = 16
# Each domain at its native scale or below: resizing 8x8 digits up to 16x16 would smooth away part
# of the pixel noise the features must see.
DOMAIN_RESOLUTIONS = {"mnist5k": 16, "animal_mnist": 16, "digits": 8}


def default_cache_dir():
    """`$DIFFUSERS_ANT_CACHE/feature_extractors`, else `~/.cache/diffusers_ant/feature_extractors`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "diffusers_ant")
    return Path(root) / "feature_extractors"


# --------------------------------------------------------------------------- image conversion


def images_to_tensor(images):
    """Convert a batch of images (see module docstring) to a float32 (N, C, H, W) tensor in [0, 1]."""
    if hasattr(images, "images") and not isinstance(images, (torch.Tensor, np.ndarray)):
        images = images.images  # diffusers' ImagePipelineOutput
    if hasattr(images, "column_names"):  # a datasets.Dataset
        if "image" not in images.column_names:
            raise ValueError(f"the dataset has no 'image' column (columns: {images.column_names})")
        images = images["image"]
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.ndim == 3:  # (N, H, W) greyscale
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"image tensors must be (N, C, H, W), got shape {tuple(x.shape)}")
    else:
        if isinstance(images, (list, tuple)) and len(images) and hasattr(images[0], "convert"):  # PIL
            # (a palette image may hold colours: it is read as RGB, and a grey palette gives three equal channels)
            images = [np.asarray(im.convert("L") if im.mode in ("L", "1", "I", "F") else im.convert("RGB")) for im in images]
            if len({im.shape for im in images}) > 1:
                raise ValueError("PIL images must all have the same size and mode; resize them first")
        arr = np.asarray(images)
        if arr.ndim == 3:  # (N, H, W) greyscale
            arr = arr[..., None]
        if arr.ndim != 4:
            raise ValueError(f"image arrays must be (N, H, W, C) or (N, H, W), got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3, 4):
        # (an array in the other layout would otherwise be read as images of H or W channels and averaged to grey)
        layout = "tensors are read as (N, C, H, W)" if isinstance(images, torch.Tensor) else "arrays are read as (N, H, W, C)"
        raise ValueError(f"images must have 1, 3 or 4 channels, got {x.shape[1]} (as (N, C, H, W): {tuple(x.shape)}): "
                         f"{layout}; move the channels there (`.permute(0, 2, 3, 1)` / `.transpose(0, 2, 3, 1)` or back)")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(
            f"float images must be in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
            "for [-1, 1] tensors pass (x + 1) / 2"
        )
    return x.clamp(0, 1)


def _to_channels(x, channels):
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x[:, :3].mean(dim=1, keepdim=True)  # RGB(A) -> grey
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)  # grey -> RGB
    if x.shape[1] == 4 and channels == 3:
        return x[:, :3]
    raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels")


def _resize(x, resolution):
    if resolution is None or tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    # antialias so that downsampling 28x28 digits to 16x16 averages instead of skipping pixels
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


def _num_images(images):
    if hasattr(images, "images") and not isinstance(images, (torch.Tensor, np.ndarray)):
        return len(images.images)
    return len(images)


def _slice(images, start, stop):
    if hasattr(images, "images") and not isinstance(images, (torch.Tensor, np.ndarray)):
        images = images.images
    if hasattr(images, "column_names"):
        return images.select(range(start, min(stop, len(images))))
    return images[start:stop]


# --------------------------------------------------------------------------- base class


class FeatureExtractor(nn.Module):
    """Base class: `forward` maps (N, C, H, W) images in [0, 1] to (N, feature_dim) features."""

    name = "features"
    feature_dim = None

    @property
    def device(self):
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def weights_sha256(self):
        """SHA-256 (hex) of every parameter and buffer: name, dtype, shape and bytes, in name order.

        Two extractors with the same hash compute the same features; results record it so that
        numbers from different weights (another version, another training) are never compared."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            # bytes through a uint8 view: numpy has no bfloat16
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    @torch.no_grad()
    def extract(self, images, batch_size=64):
        """Features of a whole image set, `batch_size` images at a time, as a float64 numpy array."""
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, _num_images(images), batch_size):
                x = images_to_tensor(_slice(images, start, start + batch_size)).to(self.device)
                out.append(self(x).double().cpu())
        finally:
            self.train(was_training)
        if not out:
            raise ValueError("no images to extract features from")
        return torch.cat(out).numpy()


# --------------------------------------------------------------------------- domain classifier


class DomainClassifier(nn.Module):
    """Small CNN classifier of one built-in dataset whose features see both content and fine detail.

    Two 3x3 conv blocks (SiLU, 2x2 average pooling) and a fully connected layer, then a linear head
    for training. Its feature vector (`features`) concatenates three blocks:

    - `classifier`: the fully connected layer before its nonlinearity (`hidden_dim` values): what
      the class is;
    - `conv1`, `conv2`: for every channel of each conv layer, the spatial mean of the absolute
      value of its response without the bias (one value per channel): how strongly each learned
      filter (edges, strokes, blobs) responds over the image, at the pixel scale and at twice it.

    Why not the penultimate ReLU features alone (version 1): a classifier is trained to be invariant
    to pixel noise and blur, so its last features barely move under them, and ReLU units that never
    fire on the data are constant zero (64 of 128 were): FID saw neither noise of sigma 0.05 nor
    anything in the dead directions. Filter energies respond to noise and blur directly (noise on a
    flat background raises every edge filter's response, blur lowers it); SiLU and pre-activation
    outputs leave no unit constant. Each block is centred and divided by one scale (the root mean
    square of its features' standard deviations on the training images), kept as buffers, so the
    blocks weigh by their size and no near-constant feature is blown up by its own tiny spread.
    (Measured alternatives, on the three datasets: channel means and standard deviations instead of
    mean absolute responses moved 18-40% fewer standard deviations under noise; log energies less too.)
    """

    def __init__(self, num_classes=10, resolution=DOMAIN_RESOLUTION, conv_channels=(16, 32), hidden_dim=64):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"the domain classifier needs a resolution divisible by 4, got {resolution}")
        c1, c2 = conv_channels
        self.resolution = int(resolution)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (resolution // 4) ** 2, hidden_dim)
        self.head = nn.Linear(hidden_dim, num_classes)
        self.blocks = (("classifier", hidden_dim), ("conv1", c1), ("conv2", c2))
        total = sum(size for _, size in self.blocks)
        # set from the training images by `set_normalisation`; identity until then
        self.register_buffer("feature_mean", torch.zeros(total))
        self.register_buffer("feature_scale", torch.ones(total))

    @property
    def feature_dim(self):
        return int(self.feature_mean.numel())

    def _layers(self, x):
        z1 = self.conv1(x)
        z2 = self.conv2(F.avg_pool2d(F.silu(z1), 2))
        z3 = self.fc(F.avg_pool2d(F.silu(z2), 2).flatten(1))
        return z1, z2, z3

    def forward(self, x):
        """Class logits (what training optimises)."""
        return self.head(F.silu(self._layers(x)[2]))

    def raw_features(self, x):
        z1, z2, z3 = self._layers(x)
        energy1 = (z1 - self.conv1.bias[:, None, None]).abs().mean(dim=(2, 3))
        energy2 = (z2 - self.conv2.bias[:, None, None]).abs().mean(dim=(2, 3))
        return torch.cat([z3, energy1, energy2], dim=1)

    def features(self, x):
        """The normalised feature vector (N, feature_dim) of preprocessed images (N, 1, r, r) in [-1, 1]."""
        return (self.raw_features(x) - self.feature_mean) / self.feature_scale

    @torch.no_grad()
    def set_normalisation(self, x, batch_size=1000):
        """Centre every feature and give each block unit mean variance, on the images `x`."""
        raw = torch.cat([self.raw_features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double()
        mean, std = raw.mean(dim=0), raw.std(dim=0)
        scale = torch.empty_like(mean)
        start = 0
        for _, size in self.blocks:
            scale[start : start + size] = std[start : start + size].pow(2).mean().sqrt().clamp_min(1e-12)
            start += size
        self.feature_mean.copy_(mean.float())
        self.feature_scale.copy_(scale.float())


def _domain_preprocess(x, resolution=DOMAIN_RESOLUTION):
    """(N, C, H, W) in [0, 1] -> (N, 1, r, r) in [-1, 1]: the classifier's input, in training and use."""
    return _resize(_to_channels(x, 1), resolution) * 2 - 1


def _domain_training_tensors(dataset_name, resolution=None):
    from diffusers_ant.data import load_training_dataset

    dataset = load_training_dataset(dataset_name=dataset_name)
    if "label" not in dataset.column_names:
        raise ValueError(f"dataset {dataset_name!r} has no 'label' column to train a domain classifier on")
    resolution = resolution or DOMAIN_RESOLUTIONS.get(dataset_name, DOMAIN_RESOLUTION)
    x = _domain_preprocess(images_to_tensor(dataset), resolution)
    y = torch.as_tensor(np.asarray(dataset["label"]), dtype=torch.long)
    return x, y


# Epochs per dataset: about 400 or more optimiser steps at batch 64 (digits has 1,797 images only).
DOMAIN_EPOCHS = {"mnist5k": 6, "animal_mnist": 6, "digits": 20}


def train_domain_classifier(dataset_name, epochs=None, batch_size=64, lr=2e-3, seed=0, val_fraction=0.1):
    """Train the domain classifier of a built-in dataset, deterministically; returns (model, metadata).

    Fixed seed, a seeded shuffle, `torch.use_deterministic_algorithms` and one CPU thread: two runs
    give bit-identical weights (one thread also fixes the order of floating-point reductions, which
    otherwise depends on the thread count; and this tiny CNN is faster on one thread than on two
    contended ones). `epochs` None: `DOMAIN_EPOCHS` of the dataset. A held-out `val_fraction` of
    the data measures the accuracy stored in the metadata; the feature normalisation is then fitted on all the dataset's images. The caller's RNG
    state, thread count and determinism setting are restored afterwards.
    """
    if dataset_name not in DOMAIN_DATASETS:
        raise ValueError(f"unknown domain dataset {dataset_name!r}; valid: {', '.join(DOMAIN_DATASETS)}")
    resolution = DOMAIN_RESOLUTIONS[dataset_name]
    epochs = DOMAIN_EPOCHS[dataset_name] if epochs is None else int(epochs)
    x, y = _domain_training_tensors(dataset_name, resolution)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(y), generator=generator)
            num_val = max(1, int(len(y) * val_fraction))
            val_idx, train_idx = order[:num_val], order[num_val:]
            model = DomainClassifier(num_classes=int(y.max()) + 1, resolution=resolution)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            model.train()
            for _ in range(epochs):
                perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
                for start in range(0, len(perm), batch_size):
                    idx = perm[start : start + batch_size]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            model.eval()
            with torch.no_grad():
                accuracy = (model(x[val_idx]).argmax(1) == y[val_idx]).float().mean().item()
            model.set_normalisation(x)
        finally:
            torch.use_deterministic_algorithms(previous_deterministic)
            torch.set_num_threads(previous_threads)
    metadata = {
        "dataset_name": dataset_name,
        "version": DOMAIN_CLASSIFIER_VERSION,
        "resolution": str(resolution),
        "num_classes": str(model.head.out_features),
        "feature_dim": str(model.feature_dim),
        "feature_blocks": ",".join(f"{name}:{size}" for name, size in model.blocks),
        "epochs": str(epochs),
        "seed": str(seed),
        "val_accuracy": f"{accuracy:.4f}",
    }
    return model, metadata


class DomainFeatureExtractor(FeatureExtractor):
    """Features of a small classifier of a built-in dataset (`DomainClassifier`): a DOMAIN FID.

    This is not Inception FID and must never be reported as such: it measures distances in a
    feature space made for `dataset_name` (mnist5k, animal_mnist or digits), which suits these small
    greyscale sets far better than ImageNet features, but its numbers are only comparable with other
    numbers from the same extractor (dataset, version, `weights_sha256()`) and sample count.

    The 112 features are the classifier's last hidden layer before its nonlinearity (content, 64)
    and the mean absolute filter responses of both conv layers (fine detail, 16 + 32), normalised
    on the dataset (see `DomainClassifier`). Measured on the datasets' real images (1,000 against
    1,000 over 10 random splits; digits 898 against 898): no feature is constant (the smallest
    standard deviation is 0.19), and domain FID rises by 10 (animal_mnist), 14 (digits) and 28
    (mnist5k) real-against-real standard deviations under Gaussian pixel noise of sigma 0.05 (images
    in [0, 1], clipped), and by over 140 under a Gaussian blur of sigma 1 pixel. Version 1 (ReLU
    features only) moved by 1.9 standard deviations under that noise. `tests/test_domain_features.py`
    checks both on every built-in domain.

    On first use the classifier is trained (`train_domain_classifier`: fixed seed, deterministic
    ops, one thread, 3-14 s on this project's busy CPU) and saved as
    `domain_<dataset>_r<resolution>_v<version>.safetensors` under `cache_dir` (default:
    `$DIFFUSERS_ANT_CACHE/feature_extractors`, else `~/.cache/diffusers_ant/feature_extractors`);
    later uses load that file. Inputs of any size and channel count are converted to greyscale at the
    domain's resolution (16x16; 8x8 for digits). Held-out accuracy is in `.val_accuracy`.
    """

    def __init__(self, dataset_name="mnist5k", cache_dir=None, device=None, retrain=False):
        super().__init__()
        if dataset_name not in DOMAIN_DATASETS:
            raise ValueError(f"unknown domain dataset {dataset_name!r}; valid: {', '.join(DOMAIN_DATASETS)}")
        self.dataset_name = dataset_name
        self.name = f"domain_{dataset_name}"
        self.resolution = DOMAIN_RESOLUTIONS[dataset_name]
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.weights_path = cache_dir / f"domain_{dataset_name}_r{self.resolution}_v{DOMAIN_CLASSIFIER_VERSION}.safetensors"

        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        if self.weights_path.exists() and not retrain:
            with safe_open(str(self.weights_path), framework="pt") as f:
                self.metadata = dict(f.metadata() or {})
            state = load_file(str(self.weights_path))
            self.classifier = DomainClassifier(num_classes=state["head.weight"].shape[0], resolution=self.resolution)
            self.classifier.load_state_dict(state)
        else:
            self.classifier, self.metadata = train_domain_classifier(dataset_name)
            cache_dir.mkdir(parents=True, exist_ok=True)
            # Write to a temporary file and rename, so a concurrent reader never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".safetensors.tmp")
            os.close(fd)
            try:
                save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, tmp, metadata=self.metadata)
                os.replace(tmp, self.weights_path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self.feature_dim = self.classifier.feature_dim
        self.val_accuracy = float(self.metadata.get("val_accuracy", "nan"))
        self.classifier.eval().requires_grad_(False)
        if device is not None:
            self.to(device)

    def forward(self, x):
        return self.classifier.features(_domain_preprocess(x, self.resolution))


# --------------------------------------------------------------------------- Inception and any module


class InceptionFeatureExtractor(FeatureExtractor):
    """2048-d pool features of the FID Inception-v3, from a user-supplied safetensors weights file.

    The weights are not shipped and never downloaded: convert pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth` once as `diffusers_ant.metrics.inception` shows. Only with
    those weights, and only against numbers computed as pytorch-fid computes them, are the FIDs
    comparable with published ones: clean-fid (ANT's FIDs) resizes images differently and ADM's
    TensorFlow evaluator (the DiT numbers) is another implementation, so a gap of a few percent
    remains even then. Any other weights give a FID of their own. Greyscale inputs are repeated to RGB.
    """

    name = "inception_v3"

    def __init__(self, weights_path, device=None):
        super().__init__()
        from safetensors.torch import load_file

        from .inception import FIDInceptionV3

        if weights_path is None or not os.path.isfile(weights_path):
            raise ValueError(
                f"Inception weights file not found: {weights_path!r}; give a safetensors file (--inception_weights, or "
                "weights_path= from Python; diffusers_ant.metrics.inception converts pytorch-fid's weights)"
            )
        if not str(weights_path).endswith(".safetensors"):
            raise ValueError("Inception weights must be a .safetensors file (nothing is unpickled from user paths)")
        try:
            state = load_file(str(weights_path))
        except Exception as error:  # (safetensors' own error type is no ValueError: say what the file is not)
            raise ValueError(f"{weights_path}: not a readable safetensors file ({error}); convert pytorch-fid's .pth as "
                             "diffusers_ant.metrics.inception shows (renaming it is not enough)") from error
        self.network = FIDInceptionV3().load_fid_state_dict(state)
        self.network.eval().requires_grad_(False)
        self.feature_dim = FIDInceptionV3.feature_dim
        if device is not None:
            self.to(device)

    def forward(self, x):
        return self.network(_to_channels(x, 3))


class ModuleFeatureExtractor(FeatureExtractor):
    """Wrap any `nn.Module` as a feature extractor; its output (first element of a tuple) is flattened.

    `num_channels` / `resolution` convert the images first (grey <-> RGB, bilinear resize);
    `value_range` is the input range the module expects ((0, 1) by default, (-1, 1) for diffusers-style).
    """

    def __init__(self, module, resolution=None, num_channels=None, value_range=(0.0, 1.0), name=None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.resolution = resolution
        self.num_channels = num_channels
        self.value_range = tuple(value_range)
        self.name = name or f"module_{type(module).__name__}"

    def forward(self, x):
        if self.num_channels is not None:
            x = _to_channels(x, self.num_channels)
        x = _resize(x, self.resolution)
        low, high = self.value_range
        out = self.module(x * (high - low) + low)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, dict):
            out = next(iter(out.values()))
        return out.flatten(1)


def get_feature_extractor(name_or_module, cache_dir=None, device=None, weights_path=None, **kwargs):
    """A feature extractor by name (`mnist5k`, `animal_mnist`, `digits`: domain classifiers;
    `inception_v3`: needs `weights_path`), or wrapping an `nn.Module` (extra kwargs go to
    `ModuleFeatureExtractor`). A `FeatureExtractor` is returned as is."""
    if isinstance(name_or_module, FeatureExtractor):
        return name_or_module.to(device) if device is not None else name_or_module
    if isinstance(name_or_module, nn.Module):
        extractor = ModuleFeatureExtractor(name_or_module, **kwargs)
        return extractor.to(device) if device is not None else extractor
    if name_or_module in DOMAIN_DATASETS:
        return DomainFeatureExtractor(name_or_module, cache_dir=cache_dir, device=device, **kwargs)
    if name_or_module in INCEPTION_NAMES:
        return InceptionFeatureExtractor(weights_path, device=device)
    raise ValueError(
        f"unknown feature extractor {name_or_module!r}; valid: {', '.join(DOMAIN_DATASETS + INCEPTION_NAMES)}, "
        "or an nn.Module"
    )
