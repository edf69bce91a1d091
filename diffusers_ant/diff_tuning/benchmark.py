"""The ControlNet part of Diff-Tuning's transfer benchmark (``train_scripts/benchmark_transfer.py``):
a tiny Stable Diffusion that can be sampled, the untrained ControlNet every run starts from, the
convergence threshold, and the reading of the runs' ``convergence.json``.

- ``make_sd_base``: the ``tiny`` SD preset with its VAE fitted to the images
  (``diffusers_ant.models.autoencoder``): the preset's random VAE decodes nothing recognisable, so a
  ControlNet's condition could never be re-extracted from its samples;
- ``make_controlnet_init``: a ControlNet copied from a pretrained SD UNet (zero convolutions at zero),
  saved once, so that every run of a seed starts from the same weights and differs only in its method;
- ``convergence_conditions`` / ``measure_start_distances`` / ``threshold_from``: the conditions the
  trainer's checks use (``training.loop.default_validation_inputs``: the first training rows), the
  distance of the untrained ControlNet's samples (they ignore the condition) and of the real images,
  and a threshold between the two, fixed before any run;
- ``converged_step`` / ``summarise_convergence``: sudden convergence per run and Diff-Tuning against
  plain training, paired by seed (``analysis.stats``).

Sudden convergence (Zhang et al. 2023; measured as Zhong et al. 2024, Sec. 5.2): the first check at
which the condition re-extracted from samples is within the threshold of the input condition.
"""

from __future__ import annotations

import time

from ..files import folder_written_atomically

__all__ = [
    "converged_step",
    "convergence_conditions",
    "make_controlnet_init",
    "make_sd_base",
    "measure_start_distances",
    "summarise_convergence",
    "threshold_from",
]


def _save_atomically(adapter, folder: str) -> None:
    """`adapter.save` into a sibling folder, then renamed (`files.folder_written_atomically`): an interrupted save
    leaves no folder that looks finished (paths the save records relative to the folder stay valid: same parent)."""
    with folder_written_atomically(folder, replace=True) as partial:
        adapter.save(partial)


def make_sd_base(folder: str, dataset_name: str = "mnist5k", resolution: int = 16, vae_steps: int = 500,
                 num_images: int = 5000, seed: int = 0) -> dict:
    """Save to ``folder`` the ``tiny`` Stable Diffusion pipeline (random UNet, random text encoder, the
    character tokenizer) for greyscale ``resolution`` images, its VAE fitted for ``vae_steps`` steps
    (batch 64) to ``num_images`` images of ``dataset_name`` and its latent scale set. Returns a record
    of the fit (final loss, scaling factor, reconstruction MSE on [-1, 1], seconds)."""
    import torch

    from ..analysis.evaluate import real_images
    from ..models import get_model_adapter
    from ..models.autoencoder import fit_autoencoder, reconstruction_error, set_latent_scaling

    start = time.time()
    torch.manual_seed(seed)
    adapter = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=resolution, num_channels=1)
    pixels = real_images(dataset_name, num_images, resolution=resolution, num_channels=1, seed=seed)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) * 2 - 1
    losses = fit_autoencoder(adapter.vae, images, vae_steps, batch_size=64, learning_rate=1e-3, seed=seed)
    scaling = set_latent_scaling(adapter.vae, images)
    error = reconstruction_error(adapter.vae, images[:1000])
    _save_atomically(adapter, folder)
    return {"dataset_name": dataset_name, "vae_steps": vae_steps, "final_loss": losses[-1], "scaling_factor": scaling,
            "reconstruction_mse": error, "seconds": round(time.time() - start, 1)}


def make_controlnet_init(sd_folder: str, folder: str, seed: int = 0) -> None:
    """Save to ``folder`` a ControlNet copied from the SD pipeline ``sd_folder``'s UNet
    (``ControlNetModel.from_unet``; its conditioning embedding initialised from ``seed``), as a ControlNet
    output folder naming ``sd_folder`` as its base."""
    import torch

    from ..models import get_model_adapter

    torch.manual_seed(seed)
    _save_atomically(get_model_adapter("controlnet").load(pretrained_model_name_or_path=sd_folder), folder)


def convergence_conditions(dataset_name: str, num_images: int, resolution: int, num_channels: int = 1) -> tuple:
    """``(conditions, prompts, real_images)`` of the first ``num_images`` rows of ``dataset_name``: the
    conditioning images (RGB) and captions the trainer's convergence checks use, and the rows' own
    images at the training ``resolution`` (through the training transforms), as PIL images."""
    from PIL import Image

    from ..data import TrainingDataset, load_training_dataset, resolve_columns

    dataset = load_training_dataset(dataset_name=dataset_name)
    columns = resolve_columns(dataset, need_captions=True, need_conditioning=True)
    rows = [dataset[i % len(dataset)] for i in range(num_images)]
    conditions = [row[columns["conditioning_image_column"]].convert("RGB") for row in rows]
    prompts = [row[columns["caption_column"]] for row in rows]
    data = TrainingDataset(dataset, {"image_column": columns["image_column"]}, resolution, num_channels=num_channels,
                           seed=0)
    real = []
    for i in range(num_images):
        pixels = ((data[i % len(dataset)]["pixel_values"] + 1) * 127.5).round().clamp(0, 255).byte()
        array = pixels.permute(1, 2, 0).numpy()
        real.append(Image.fromarray(array[..., 0] if num_channels == 1 else array))
    return conditions, prompts, real


def measure_start_distances(controlnet_folder: str, seeds, conditions, prompts, num_inference_steps: int,
                            guidance_scale=None, distance: str = "iou", extractor="outline") -> dict:
    """``{seed: distance}`` of the ControlNet in ``controlnet_folder`` sampled exactly as the trainer's
    checks sample (``adapter.sample``, DDIM, a generator seeded by the run's ``--seed``)."""
    import torch

    from ..models import get_model_adapter
    from .convergence import ConvergenceTracker

    tracker = ConvergenceTracker(1.0, extractor=extractor, distance=distance)
    adapter = get_model_adapter("controlnet").load(pretrained_model_name_or_path=controlnet_folder)
    adapter.model.eval()
    pipeline = adapter.make_pipeline(adapter.model)
    distances = {}
    with torch.no_grad():
        for seed in seeds:
            images = adapter.sample(pipeline, len(conditions), torch.Generator().manual_seed(int(seed)),
                                    num_inference_steps=num_inference_steps, prompts=prompts,
                                    conditioning_images=conditions, scheduler="ddim", guidance_scale=guidance_scale)
            distances[seed] = tracker.measure(images, conditions)
    return distances


def threshold_from(start_distances, real_distance: float, fraction: float = 0.5) -> float:
    """``fraction`` of the way from the mean distance of samples that ignore the condition down to the
    real images' distance (the best a sample can do with this extractor: e.g. an outline taken at
    28x28 against one re-extracted at 16x16). A RuntimeError when the former is not above the latter:
    convergence is then not measurable."""
    values = [float(v) for v in (start_distances.values() if isinstance(start_distances, dict) else start_distances)]
    start = sum(values) / len(values)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if not start > real_distance:
        raise RuntimeError(f"the untrained ControlNet's samples are as close to the conditions as the real images "
                           f"({start:.3f} <= {real_distance:.3f}): convergence cannot be measured with this extractor")
    return start - fraction * (start - real_distance)


def converged_step(history, threshold: float):
    """The first recorded step whose distance is below ``threshold`` (None: not within the run), as
    ``ConvergenceTracker.converged_step`` reads its history."""
    for entry in sorted(history, key=lambda e: e["step"]):
        if entry["distance"] < threshold:
            return int(entry["step"])
    return None


def summarise_convergence(convergence: dict, threshold: float, max_steps: int, plain: str = "controlnet",
                          tuned: str = "controlnet_diff_tuning", confidence: float = 0.95) -> dict:
    """Read the runs' ``convergence.json`` records (``{method: {seed: record}}``).

    Per method and seed: the step of sudden convergence (None: not reached within ``max_steps``), the
    last distance and the mean distance over the checks. Then ``tuned`` against ``plain`` paired by
    seed: the difference of steps and its relative change in percent, over the seeds where both runs
    converged (``converged_counts`` says how many), and the difference of mean distances, over every
    seed (defined even when a run never converges)."""
    from ..analysis.benchmark import relative_differences
    from ..analysis.stats import paired_differences

    per_method = {}
    for method, per_seed in convergence.items():
        per_method[method] = {}
        for seed, record in per_seed.items():
            history = record["history"]
            per_method[method][seed] = {
                "converged_step": converged_step(history, threshold),
                "final_distance": history[-1]["distance"] if history else None,
                "mean_distance": sum(e["distance"] for e in history) / len(history) if history else None,
            }
    result = {"threshold": threshold, "max_steps": max_steps, "per_method": per_method}
    a, b = per_method.get(tuned, {}), per_method.get(plain, {})
    if a and b:
        steps_a = {s: r["converged_step"] for s, r in a.items() if r["converged_step"] is not None}
        steps_b = {s: r["converged_step"] for s, r in b.items() if r["converged_step"] is not None}
        both = set(steps_a) & set(steps_b)
        result["paired_steps"] = paired_differences({s: steps_a[s] for s in both}, {s: steps_b[s] for s in both},
                                                    confidence)
        result["relative_steps"] = relative_differences({s: steps_a[s] for s in both}, {s: steps_b[s] for s in both},
                                                        confidence)
        result["paired_mean_distance"] = paired_differences(
            {s: r["mean_distance"] for s, r in a.items() if r["mean_distance"] is not None},
            {s: r["mean_distance"] for s, r in b.items() if r["mean_distance"] is not None}, confidence)
        result["converged_counts"] = {plain: f"{len(steps_b)}/{len(b)}", tuned: f"{len(steps_a)}/{len(a)}"}
    return result
