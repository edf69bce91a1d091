"""Negative transfer gap (ANT, Go et al., NeurIPS 2023, Sec. 3, observation O2).

For an interval [t1, t2] of training timesteps, with a model trained on all timesteps (the *base*)
and a model trained only on [t1, t2]:

    NTG([t1, t2]) = FID(samples where the interval model denoises the steps with t in [t1, t2]
                        and the base model the others) - FID(samples of the base model alone).

NTG < 0 means negative transfer: on that interval, the specialist denoises better than the model
that shares its capacity with every other timestep (PAPERS.md, section 1). The mixed sampler is a
`diffusers_ant.TimestepRouter`; both samplers start from the same seeded noise, so with DDIM
(eta = 0) the difference between the two sample sets comes from the routed steps only.

Here "FID" is whatever the `ReferenceSet` measures: by default the domain FID of the dataset
(see `diffusers_ant.analysis.evaluate`); precision and recall are reported beside it.
"""

from __future__ import annotations

import json
import os

from ..clustering import TimestepIntervals
from ..routing import TimestepRouter, check_same_schedule, denoiser_timestep_map

__all__ = ["interval_from_folder", "load_intervals", "negative_transfer_gap", "swap_in_router"]


def interval_from_folder(folder: str):
    """`(t1, t2)` from the `timestep_range` of a run's `training_config.json` (`--timestep_range`)."""
    from .common import training_config

    value = training_config(folder).get("timestep_range")
    if not value:
        raise ValueError(
            f"{folder!r} has no timestep_range in its training_config.json (was it trained with --timestep_range?); "
            "pass --intervals"
        )
    return int(value[0]), int(value[1])


def load_intervals(path: str, count: int) -> list:
    """`count` intervals `[(t1, t2), ...]` from a JSON file: a `TimestepIntervals` file (its bounds,
    e.g. from `cluster_timesteps.py`, one interval model per cluster) or a list of `[t1, t2]` pairs."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read --intervals {path!r}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--intervals {path!r} is not valid JSON ({err})") from None
    bounds = data.get("bounds") if isinstance(data, dict) else data
    if not isinstance(bounds, list) or not all(isinstance(b, (list, tuple)) and len(b) == 2 for b in bounds):
        raise ValueError(f'--intervals {path!r} must hold a list of [start, end] pairs or {{"bounds": [...]}}')
    if len(bounds) != count:
        raise ValueError(f"--intervals {path!r} lists {len(bounds)} intervals for {count} interval models")
    return [(int(a), int(b)) for a, b in bounds]


def _check_interval(interval, num_timesteps: int) -> None:
    t1, t2 = int(interval[0]), int(interval[1])
    if not 0 <= t1 <= t2 < num_timesteps:
        raise ValueError(f"interval [{t1}, {t2}] must satisfy 0 <= t1 <= t2 < {num_timesteps} "
                         f"(inclusive bounds: the last interval ends at {num_timesteps - 1})")


def swap_in_router(base, specialist, interval, num_timesteps, timestep_map=None, schedulers=None,
                   names=("the base model", "the interval model")) -> TimestepRouter:
    """A router calling `specialist` for training indices in `interval` (inclusive) and `base` elsewhere.
    `schedulers`: optionally `(base's, specialist's)` training schedulers, which must match."""
    t1, t2 = int(interval[0]), int(interval[1])
    _check_interval(interval, num_timesteps)
    bounds, models = [], []
    if t1 > 0:
        bounds.append((0, t1 - 1))
        models.append(base)
    bounds.append((t1, t2))
    models.append(specialist)
    if t2 < num_timesteps - 1:
        bounds.append((t2 + 1, num_timesteps - 1))
        models.append(base)
    router_schedulers = router_names = None
    if schedulers is not None:
        by_model = {id(base): (schedulers[0], names[0]), id(specialist): (schedulers[1], names[1])}
        router_schedulers = [by_model[id(m)][0] for m in models]
        router_names = [by_model[id(m)][1] for m in models]
    return TimestepRouter(TimestepIntervals(bounds, num_timesteps), models, timestep_map=timestep_map,
                          schedulers=router_schedulers, names=router_names)


def negative_transfer_gap(base_pipeline, interval_models, intervals, reference, num_samples=1000, scheduler="ddim",
                          num_inference_steps=50, batch_size=256, seed=0, names=None, progress=True,
                          interval_schedulers=None, training_scheduler=None, prompts=None) -> dict:
    """The negative transfer gap of each interval model.

    Args:
        base_pipeline: the all-timestep model's pipeline (its scheduler is the training one).
        interval_models: one denoiser per interval, each trained on its interval only.
        intervals: `[(t1, t2), ...]`, inclusive training indices, one per interval model.
        reference: a `diffusers_ant.analysis.evaluate.ReferenceSet` (the real images' features).
        names: labels of the interval models (e.g. their folders) for the report.
        interval_schedulers: the interval models' training schedulers (e.g. their pipelines'); each
            must match the base pipeline's (`diffusers_ant.routing.check_same_schedule`), checked
            before anything is sampled. None: not checked (the caller vouches for them).
        training_scheduler: the scheduler whose training table the intervals index, where the pipeline's
            is not it (a FLUX.1 pipeline's dynamic shift: `models.flux.routing_scheduler`). None: the pipeline's.

    Returns `{"base": metrics, "intervals": [{"interval", "name", "ntg", "fid", ...metrics}], ...}`.
    """
    from ..schedule import num_train_timesteps
    from .common import denoiser_name
    from .evaluate import sample_images

    interval_models = list(interval_models)
    if len(interval_models) != len(intervals):
        raise ValueError(f"got {len(interval_models)} interval models for {len(intervals)} intervals")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(interval_models))]
    if interval_schedulers is not None:
        interval_schedulers = list(interval_schedulers)
        if len(interval_schedulers) != len(interval_models):
            raise ValueError(f"got {len(interval_schedulers)} schedulers for {len(interval_models)} interval models")
        check_same_schedule([base_pipeline.scheduler, *interval_schedulers], ["the base model", *names])
    T = num_train_timesteps(base_pipeline.scheduler)
    for interval in intervals:  # before any sampling: a bad bound would otherwise end the run after the base's
        _check_interval(interval, T)
    base = getattr(base_pipeline, denoiser_name(base_pipeline))
    # what the pipeline passes -> training indices (a FLUX.1 run's table: `training_scheduler`, see routing)
    timestep_map = denoiser_timestep_map(base_pipeline.scheduler, T, base, training_scheduler=training_scheduler)
    # a text-to-image pipeline samples `prompts` (the captions of the real images, as evaluate_model), every
    # model the same ones; None: the empty prompt
    common = {"scheduler": scheduler, "num_inference_steps": num_inference_steps, "batch_size": batch_size,
              "seed": seed, "progress": progress, "prompts": prompts}

    base_metrics = reference.score(sample_images(base_pipeline, num_samples, desc="base", **common))
    rows = []
    for i, (model, interval, name) in enumerate(zip(interval_models, intervals, names)):
        schedulers = None if interval_schedulers is None else (base_pipeline.scheduler, interval_schedulers[i])
        router = swap_in_router(base, model, interval, T, timestep_map, schedulers=schedulers, names=("the base model", name))
        images = sample_images(base_pipeline, num_samples, denoiser=router, desc=f"[{interval[0]}, {interval[1]}]", **common)
        metrics = reference.score(images)
        rows.append({"interval": [int(interval[0]), int(interval[1])], "name": name,
                     "ntg": metrics["fid"] - base_metrics["fid"], **metrics})
    return {
        "base": base_metrics,
        "intervals": rows,
        "num_timesteps": T,
        "num_samples": num_samples,
        "scheduler": scheduler if isinstance(scheduler, str) or scheduler is None else type(scheduler).__name__,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "feature_extractor": base_metrics.get("feature_extractor"),
        "feature_extractor_sha256": base_metrics.get("feature_extractor_sha256"),
    }


def describe(result: dict) -> str:
    """A table of the gaps (what `analyze.py ntg` prints)."""
    lines = [f"base FID {result['base']['fid']:.4f} ({result['feature_extractor']}, {result['num_samples']} samples)",
             f"{'interval':>14} {'FID':>10} {'NTG':>10}  model"]
    for row in result["intervals"]:
        t1, t2 = row["interval"]
        lines.append(f"{f'[{t1}, {t2}]':>14} {row['fid']:>10.4f} {row['ntg']:>+10.4f}  {os.path.basename(os.path.normpath(row['name']))}")
    lines.append("NTG < 0: negative transfer (the interval model does better on its interval)")
    return "\n".join(lines)
