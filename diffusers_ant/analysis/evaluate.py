"""Sample from a saved pipeline and score the samples against a dataset (FID, KID, precision / recall).

    from diffusers_ant.models import load_pipeline
    from diffusers_ant.analysis.evaluate import evaluate_pipeline

    results = evaluate_pipeline(load_pipeline("ant-demo"), "mnist5k", num_samples=1000)
    results["fid"], results["precision"], results["recall"]

With the default `feature_extractor="domain"` the FID is a DOMAIN FID: the Frechet distance in the
features of a small classifier of the dataset (`diffusers_ant.metrics.DomainFeatureExtractor`). It is
comparable only with other domain FIDs of the same dataset, extractor weights (the recorded
`feature_extractor_sha256`) and sample count, never with published (Inception) FIDs.
`feature_extractor="inception"` with the user's `inception_weights` file gives Inception FID,
comparable with published numbers only with pytorch-fid's Inception weights (see
`diffusers_ant.metrics`). Precision / recall use the same features, not the VGG-16 of their paper.

The pieces are public because the analyses reuse them: `sample_images` (batched, seeded sampling,
optionally with another denoiser such as a `TimestepRouter`), `real_images` (a seeded random draw from
the dataset at the samples' resolution; the built-in sets are stored sorted by label, so the first N
rows would be a few classes only) and `ReferenceSet` (the real images' features, computed once and
compared with any number of sample sets).
"""

from __future__ import annotations

import os

import numpy as np
import torch

# the scripts' flags live in a light module of their own (their --help imports no diffusers); re-exported here
from .arguments import (  # noqa: F401
    DEFAULT_KID_SUBSETS,
    FEATURE_EXTRACTOR_CHOICES,
    FEATURE_EXTRACTOR_NAMES,
    add_sampling_arguments,
    check_sampling_arguments,
    feature_extractor_problem,
)
from .common import denoiser_name

__all__ = [
    "ReferenceSet",
    "evaluate_pipeline",
    "format_results",
    "dataset_captions",
    "feature_extractor_problem",
    "real_image_indices",
    "real_images",
    "resolve_feature_extractor",
    "sample_images",
    "sampling_pipeline",
    "save_images",
]


# --------------------------------------------------------------------------- sampling


def sampling_pipeline(pipeline, denoiser=None, scheduler=None):
    """A fresh pipeline of the same kind sharing `pipeline`'s components, with `denoiser` (e.g. a
    `TimestepRouter`) and / or `scheduler` (an instance, or a name for
    `diffusers_ant.models.base.scheduler_by_name`: "ddim", "ddpm", a scheduler class name) put in.
    The original pipeline is left untouched.

    Supported: unconditional `DDPMPipeline` / `DDIMPipeline` (the one matching the scheduler is
    chosen: `DDIMPipeline` passes `eta` to `step`, which DDPM's scheduler does not take) and this
    project's `UnconditionalUNetPipeline`, `ClassConditionalUNetPipeline` and `PixelDiTPipeline`.
    Flow-matching models sample with a flow-matching scheduler: "ddim" (the default of the
    evaluation commands) names their Euler sampler, and an unconditional UNet saved as a
    `DDPMPipeline` with a flow-matching scheduler gets an `UnconditionalUNetPipeline`.
    """
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    from ..models.base import _copy_scheduler, scheduler_by_name, scheduler_kind
    from ..models.pipelines import UnconditionalUNetPipeline, _ClassConditionalSampler

    name = denoiser_name(pipeline)
    denoiser = denoiser if denoiser is not None else getattr(pipeline, name)
    if isinstance(scheduler, str):
        scheduler = scheduler_by_name(scheduler, pipeline.scheduler)
    # a copy: set_timesteps mutates the scheduler, and pipelines built here may run interleaved
    scheduler = _copy_scheduler(scheduler if scheduler is not None else pipeline.scheduler)
    if isinstance(pipeline, (DDPMPipeline, DDIMPipeline)):
        if scheduler_kind(scheduler) == "flow_match":
            new = UnconditionalUNetPipeline(unet=denoiser, scheduler=scheduler)
        else:
            cls = DDIMPipeline if isinstance(scheduler, DDIMScheduler) else DDPMPipeline
            new = cls(unet=denoiser, scheduler=scheduler)
    elif isinstance(pipeline, _ClassConditionalSampler):
        new = type(pipeline)(**{name: denoiser, "scheduler": scheduler})
    else:
        raise ValueError(
            f"cannot sample a {type(pipeline).__name__} for evaluation: supported are unconditional "
            "(DDPMPipeline, DDIMPipeline, UnconditionalUNetPipeline), class-conditional "
            "(ClassConditionalUNetPipeline, PixelDiTPipeline) and the text-to-image pipelines of the model "
            "types (sd, sdxl, sd3, flux, qwenimage; see sample_images)"
        )
    new.set_progress_bar_config(disable=True)
    return new


@torch.no_grad()
def sample_images(
    pipeline,
    num_samples: int,
    denoiser=None,
    scheduler=None,
    num_inference_steps: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    desc: str = "sampling",
    prompts=None,
    resolution=None,
) -> np.ndarray:
    """`num_samples` images as a float32 (N, H, W, C) array in [0, 1], sampled `batch_size` at a time.

    One `torch.Generator` seeded with `seed` draws every batch in turn, so the same call gives the
    same images, and two calls that differ only in `denoiser` start from the same noise (DDIM with
    eta = 0 is then a deterministic function of the denoiser). Class-conditional pipelines get labels
    0, 1, ..., C-1, 0, 1, ... (balanced classes, like the datasets); a DiT fine-tuned on fewer classes
    than its table (`pipeline.class_rows`, from `class_map.json`) cycles through its data set's rows. `denoiser` / `scheduler`: see
    `sampling_pipeline`.

    A text-to-image pipeline of a model type (`StableDiffusionPipeline`, SDXL, SD3, Flux, Qwen-Image:
    the classes an adapter's `pipeline_classes` claim) samples through its adapter's own
    `ModelAdapter.sample`, as validation does (these pipelines take prompts, not `batch_size`):
    `prompts` (a list cycled over the samples; default the empty prompt) and `resolution` (pixels; default
    the denoiser's `sample_size`, needed for Flux / Qwen-Image, whose transformers record none).
    """
    from tqdm.auto import tqdm

    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if is_text_to_image(pipeline):
        return _sample_text_to_image(pipeline, num_samples, denoiser, scheduler, num_inference_steps, batch_size,
                                     seed, progress, desc, prompts, resolution)
    pipe = sampling_pipeline(pipeline, denoiser=denoiser, scheduler=scheduler)
    device = pipe.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    config = getattr(pipe, denoiser_name(pipe)).config
    num_classes = None
    if not type(pipe).__name__.startswith(("DDPM", "DDIM")):
        num_classes = config.get("num_class_embeds") or config.get("num_embeds_ada_norm")
        if config.get("num_embeds_ada_norm") == 1:
            num_classes = None  # a DiT trained without classes: its null class, the pipeline's default
    # A DiT fine-tuned on fewer classes than its label table: the data set's rows (`class_map.json`)
    rows = getattr(pipeline, "class_rows", None)
    labels = list(rows) if rows is not None and num_classes is not None else list(range(num_classes or 0))
    out = []
    with tqdm(total=num_samples, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            common = {"generator": generator, "num_inference_steps": num_inference_steps, "output_type": "np"}
            if num_classes is None:
                images = pipe(batch_size=n, **common).images
            else:
                images = pipe(class_labels=[labels[i % len(labels)] for i in range(start, start + n)], **common).images
            out.append(np.asarray(images, dtype=np.float32))
            bar.update(n)
    return np.concatenate(out)


def is_text_to_image(pipeline) -> bool:
    """Whether `pipeline` is the text-to-image pipeline of a model type (an adapter's `pipeline_classes`)."""
    from ..models import MODEL_TYPES

    return any(type(pipeline).__name__ in adapter.pipeline_classes for adapter in MODEL_TYPES.values())


def _sample_text_to_image(pipeline, num_samples, denoiser, scheduler, num_inference_steps, batch_size, seed,
                          progress, desc, prompts, resolution) -> np.ndarray:
    """`sample_images` for a text-to-image pipeline: its model type's `ModelAdapter.sample` (one seeded
    generator over the batches; prompts cycled), the pipeline itself untouched."""
    from tqdm.auto import tqdm

    from ..models import adapter_for_pipeline

    if denoiser is not None:  # e.g. a TimestepRouter: a pipeline of the same class sharing the other parts
        pipeline = type(pipeline)(**{**pipeline.components, denoiser_name(pipeline): denoiser})
    adapter = adapter_for_pipeline(pipeline, resolution=resolution)
    prompts = [""] if prompts is None else ([prompts] if isinstance(prompts, str) else list(prompts))
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt, or None for the empty prompt")
    generator = torch.Generator(device=pipeline.device).manual_seed(int(seed))
    out = []
    with tqdm(total=num_samples, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            batch = [prompts[i % len(prompts)] for i in range(start, start + n)]
            # `sample` swaps `scheduler` in for this call only (a name: `scheduler_by_name`)
            images = adapter.sample(pipeline, n, generator=generator, num_inference_steps=num_inference_steps,
                                    prompts=batch, scheduler=scheduler)
            out.append(np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]))
            bar.update(n)
    return np.concatenate(out)


def dataset_captions(dataset_name=None, num_captions=1000, seed=0, train_data_dir=None) -> list:
    """The captions of the rows `real_images` draws (`real_image_indices`), the prompts a text-to-image
    model is evaluated with, so its samples and the real images describe the same things."""
    from ..data import first_caption, load_training_dataset, resolve_columns

    dataset = load_training_dataset(dataset_name=dataset_name, train_data_dir=train_data_dir)
    column = resolve_columns(dataset, need_captions=True)["caption_column"]
    captions = dataset[column]
    return [first_caption(captions[i]) for i in real_image_indices(len(captions), num_captions, seed)]


def save_images(images: np.ndarray, folder: str, prefix: str = "sample") -> list:
    """Write (N, H, W, C) images in [0, 1] as PNG files `prefix_00000.png`, ...; returns the paths. Files of that
    pattern an earlier call left are removed first: a smaller set written over a larger one looked like one set."""
    import re

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(re.escape(prefix) + r"_\d{5,}\.png")
    for name in os.listdir(folder):
        if pattern.fullmatch(name):
            os.remove(os.path.join(folder, name))
    paths = []
    for i, image in enumerate(images):
        array = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        if array.shape[-1] == 1:
            array = array[..., 0]
        path = os.path.join(folder, f"{prefix}_{i:05d}.png")
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- real images


def real_image_indices(num_rows: int, num_images: int, seed: int = 0) -> list:
    """The dataset rows `real_images` draws: the first `num_images` of a seeded permutation."""
    order = torch.randperm(int(num_rows), generator=torch.Generator().manual_seed(int(seed)))
    return order[: int(num_images)].tolist()


def real_images(dataset_name=None, num_images=1000, resolution=16, num_channels=1, seed=0, train_data_dir=None) -> np.ndarray:
    """A seeded random draw of `num_images` dataset images (all of them if fewer), as float32
    (N, H, W, C) in [0, 1] at `resolution` with `num_channels`, through the training transforms
    (`diffusers_ant.data`), so real and generated images are resized the same way."""
    from ..data import TrainingDataset, load_training_dataset, resolve_columns

    dataset = load_training_dataset(dataset_name=dataset_name, train_data_dir=train_data_dir)
    columns = resolve_columns(dataset)
    # the image column only: decoding captions or labels here would be wasted work
    data = TrainingDataset(dataset, {"image_column": columns["image_column"]}, resolution, num_channels=num_channels, seed=seed)
    pixels = torch.stack([data[i]["pixel_values"] for i in real_image_indices(len(data), num_images, seed)])  # [-1, 1]
    return ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)


# --------------------------------------------------------------------------- metrics


def resolve_feature_extractor(spec="domain", dataset_name=None, inception_weights=None, cache_dir=None, device=None):
    """The feature extractor named by `spec`: "domain" (the classifier of the built-in `dataset_name`:
    a domain FID), "inception" (FID Inception-v3 from the `inception_weights` safetensors file), a
    built-in dataset name (that dataset's classifier), or an `nn.Module` / `FeatureExtractor`."""
    from ..metrics import DOMAIN_DATASETS, get_feature_extractor

    if not isinstance(spec, str):
        return get_feature_extractor(spec, device=device)
    if spec == "domain":
        if dataset_name not in DOMAIN_DATASETS:
            raise ValueError(
                f"no domain feature extractor for dataset {dataset_name!r} (there are: {', '.join(DOMAIN_DATASETS)}); "
                "use --feature_extractor inception --inception_weights FILE.safetensors"
            )
        spec = dataset_name
    elif spec == "inception":
        if inception_weights is None:
            raise ValueError("--feature_extractor inception needs --inception_weights FILE.safetensors")
        spec = "inception_v3"
    elif spec not in DOMAIN_DATASETS:
        raise ValueError(f"unknown feature extractor {spec!r}; valid: {', '.join(FEATURE_EXTRACTOR_NAMES)}")
    return get_feature_extractor(spec, cache_dir=cache_dir, device=device, weights_path=inception_weights)


class ReferenceSet:
    """Real images' features, computed once, against which sample sets are scored.

    `score(images)` returns the dict of `diffusers_ant.metrics.compute_metrics` (`fid`, `kid_mean`,
    `kid_std`, `precision`, `recall`, `num_real`, `num_fake`, `feature_extractor`,
    `feature_extractor_sha256`: the hash of the extractor's weights, recorded with every result).
    """

    def __init__(self, images, feature_extractor, batch_size=256, kid_subsets=DEFAULT_KID_SUBSETS,
                 kid_subset_size=None, k=3, seed=0):
        self.extractor = feature_extractor
        self.batch_size = batch_size
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.k = k
        self.seed = seed
        # (N, H, W, C) of the real images: samples of another size or channel count are refused in `score`, as
        # the extractor would resize them silently and the score would measure the resizing
        self.image_shape = tuple(np.shape(images)[1:]) if isinstance(images, np.ndarray) else None
        self.features = feature_extractor.extract(images, batch_size=batch_size)
        self.extractor_sha256 = feature_extractor.weights_sha256()

    def score(self, images) -> dict:
        from ..metrics import compute_metrics

        if self.image_shape is not None and isinstance(images, np.ndarray) and tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"the samples are {'x'.join(map(str, images.shape[1:]))} (H x W x C) and the reference "
                             f"images {'x'.join(map(str, self.image_shape))}: build the reference at the samples' size "
                             "(reference_for(samples))")
        fake = self.extractor.extract(images, batch_size=self.batch_size)
        metrics = ["fid"]
        # KID needs two disjoint subsets of at least 2 samples per set; improved precision / recall
        # more than k samples per set
        if min(len(fake), len(self.features)) >= 4:
            metrics.append("kid")
        if min(len(fake), len(self.features)) > self.k:
            metrics.append("precision_recall")
        results = compute_metrics(self.features, fake, metrics=metrics, k=self.k, kid_subsets=self.kid_subsets,
                                  kid_subset_size=self.kid_subset_size, seed=self.seed)
        results["feature_extractor"] = self.extractor.name
        results["feature_extractor_sha256"] = self.extractor_sha256
        return results


def reference_for(pipeline_or_images, dataset_name=None, num_real=1000, feature_extractor="domain",
                  inception_weights=None, cache_dir=None, seed=0, train_data_dir=None, resolution=None,
                  **options) -> ReferenceSet:
    """A `ReferenceSet` of `num_real` dataset images at the resolution and channels of `pipeline_or_images`
    (a pipeline, or sample images (N, H, W, C)): those of the images `sample_images` draws from the pipeline
    (at `resolution` when given, as `sample_images` takes it). A text-to-image pipeline samples RGB images
    through its adapter at `pixel_resolution` (its denoiser's `sample_size` and `in_channels` are the
    latents'; Flux's and Qwen-Image's record no size)."""
    if isinstance(pipeline_or_images, np.ndarray):
        resolution, channels = pipeline_or_images.shape[1], pipeline_or_images.shape[3]
    elif is_text_to_image(pipeline_or_images):
        from ..models import adapter_for_pipeline
        from ..training.components import pixel_resolution

        resolution, channels = resolution or pixel_resolution(adapter_for_pipeline(pipeline_or_images)), 3
    else:
        config = getattr(pipeline_or_images, denoiser_name(pipeline_or_images)).config
        size, channels = config.sample_size, config.in_channels
        resolution = resolution or size
    extractor = resolve_feature_extractor(feature_extractor, dataset_name, inception_weights, cache_dir)
    real = real_images(dataset_name, num_real, resolution, channels, seed=seed, train_data_dir=train_data_dir)
    return ReferenceSet(real, extractor, seed=seed, **options)


def evaluate_pipeline(
    pipeline,
    dataset_name=None,
    num_samples: int = 1000,
    scheduler="ddim",
    num_inference_steps: int = 50,
    batch_size: int = 256,
    feature_extractor="domain",
    inception_weights=None,
    seed: int = 0,
    num_real=None,
    kid_subsets: int = DEFAULT_KID_SUBSETS,
    k: int = 3,
    cache_dir=None,
    save_samples=None,
    progress: bool = True,
    train_data_dir=None,
    reference: ReferenceSet | None = None,
    prompts=None,
    resolution=None,
) -> dict:
    """Sample `num_samples` images from `pipeline` and score them against `dataset_name`.

    `scheduler`: "ddim" (default: DDIM-50 as the ANT paper; for a flow-matching model its Euler
    sampler, see `sampling_pipeline`), "ddpm", a scheduler class name or instance, or None for the
    pipeline's own (the training scheduler). Returns the metrics (`fid`, `kid_mean`, `kid_std`, `precision`, `recall`, `num_real`,
    `num_fake`, `feature_extractor`: "domain_<dataset>" marks a domain FID) plus the settings that
    produced them. `num_real` real images (default `num_samples`) are drawn at random with `seed`.
    Pass `reference` (a `ReferenceSet`) to score several pipelines against the same real features.
    `save_samples`: a folder for the samples as PNG files. A text-to-image pipeline (see `sample_images`)
    is prompted with `prompts`, default the captions of the dataset rows the real images are drawn from
    (`dataset_captions`), and samples at `resolution` (default its denoiser's).
    """
    import time

    if prompts is None and is_text_to_image(pipeline):
        prompts = dataset_captions(dataset_name, num_samples, seed=seed, train_data_dir=train_data_dir)
    if reference is None:
        # before sampling: a data set that cannot be read or an extractor without its weights fails in
        # seconds, not after every sample was drawn (and saved)
        reference = reference_for(pipeline, dataset_name, num_real or num_samples, feature_extractor,
                                  inception_weights, cache_dir, seed=seed, train_data_dir=train_data_dir,
                                  resolution=resolution, batch_size=batch_size, kid_subsets=kid_subsets, k=k)
    start = time.perf_counter()
    images = sample_images(pipeline, num_samples, scheduler=scheduler, num_inference_steps=num_inference_steps,
                           batch_size=batch_size, seed=seed, progress=progress, prompts=prompts,
                           resolution=resolution)
    sampling_seconds = time.perf_counter() - start
    if save_samples:
        save_images(images, save_samples)
    results = reference.score(images)
    scheduler_name = scheduler if isinstance(scheduler, str) or scheduler is None else type(scheduler).__name__
    results.update(
        dataset_name=dataset_name or train_data_dir,
        scheduler=scheduler_name or type(pipeline.scheduler).__name__,
        num_inference_steps=num_inference_steps,
        seed=seed,
        resolution=int(images.shape[1]),
        sampling_seconds=round(sampling_seconds, 2),
    )
    return results


def format_results(results: dict) -> str:
    """The metrics as a two-column table (what evaluate_model.py prints)."""
    extractor = results.get("feature_extractor", "")
    fid_label = f"FID ({'domain, ' + extractor[len('domain_'):] if extractor.startswith('domain_') else extractor})"
    rows = [(fid_label, f"{results['fid']:.4f}")]
    if "kid_mean" in results:  # kid_std: the spread of a KID on one subset's worth of samples
        rows.append(("KID", f"{results['kid_mean']:.5f} +- {results['kid_std']:.5f}"))
    for key in ("precision", "recall"):
        if key in results:
            rows.append((key, f"{results[key]:.4f}"))
    rows.append(("samples / real", f"{results['num_fake']} / {results['num_real']}"))
    if results.get("feature_extractor_sha256"):
        rows.append(("features sha256", results["feature_extractor_sha256"][:16]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)



