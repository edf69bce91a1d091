"""The chain of forgetting (Diff-Tuning, Zhong et al., NeurIPS 2024; PAPERS.md section 3).

Take a model fine-tuned on a new domain and the pretrained model it came from. For a fraction f in
[0, 1], sample with the fine-tuned model on the high-noise part of the reverse process and hand the
last, low-noise fraction f of it to the pretrained model: training indices t < round(f T) go to the
pretrained model, t >= round(f T) to the fine-tuned one. f = 0 is the fine-tuned model alone, f = 1
the pretrained model alone. Diff-Tuning's observation: quality on the new domain holds while f is
small (the pretrained model is a universal denoiser of lightly corrupted images) and degrades as f
reaches the high-noise, high-level end, which is what fine-tuning must change.

The curve plotted is a metric of the fine-tuned domain (by default its domain FID, see
`diffusers_ant.analysis.evaluate`) against f. Every point starts from the same seeded noise.
"""

from __future__ import annotations

from ..clustering import TimestepIntervals
from ..routing import TimestepRouter, check_same_schedule

__all__ = ["chain_of_forgetting", "forgetting_router", "parse_fractions"]


def parse_fractions(text) -> list:
    """`"0,0.1,0.5,1"` (or a list of numbers) -> sorted distinct fractions in [0, 1]."""
    if isinstance(text, str):
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--fractions must be comma-separated numbers in [0, 1], got {text!r}") from None
    else:
        values = [float(x) for x in text]
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--fractions must be numbers in [0, 1], got {text!r}")
    return sorted(set(values))


def forgetting_router(finetuned, pretrained, fraction: float, num_timesteps: int, timestep_map=None,
                      schedulers=None) -> TimestepRouter:
    """A router sending training indices t < round(fraction T) to `pretrained`, the rest to `finetuned`.
    `schedulers`: optionally `(finetuned's, pretrained's)` training schedulers, which must match."""
    if schedulers is not None:
        check_same_schedule(schedulers, ["the fine-tuned model", "the pretrained model"])
    split = int(round(float(fraction) * num_timesteps))
    if split <= 0:
        return TimestepRouter(TimestepIntervals([(0, num_timesteps - 1)], num_timesteps), [finetuned], timestep_map)
    if split >= num_timesteps:
        return TimestepRouter(TimestepIntervals([(0, num_timesteps - 1)], num_timesteps), [pretrained], timestep_map)
    intervals = TimestepIntervals([(0, split - 1), (split, num_timesteps - 1)], num_timesteps)
    return TimestepRouter(intervals, [pretrained, finetuned], timestep_map)


def chain_of_forgetting(finetuned_pipeline, pretrained, fractions, reference, num_samples=1000, scheduler="ddim",
                        num_inference_steps=50, batch_size=256, seed=0, progress=True, return_images=False,
                        pretrained_scheduler=None, training_scheduler=None, prompts=None) -> dict:
    """The chain-of-forgetting curve: metrics of the fine-tuned domain for each fraction f.

    Args:
        finetuned_pipeline: the fine-tuned model's pipeline (sampling loop, scheduler, its denoiser).
        pretrained: the pretrained denoiser (interchangeable with the fine-tuned one).
        fractions: fractions f of the reverse process (low-noise end) handed to `pretrained`.
        reference: a `ReferenceSet` of the fine-tuned domain's real images.
        return_images: also return the samples of each f (`"images"`, a list), e.g. for tests.
        pretrained_scheduler: the pretrained model's training scheduler; it must match the fine-tuned
            pipeline's (`diffusers_ant.routing.check_same_schedule`), checked before any sampling.
            None: not checked (the caller vouches for it).
        training_scheduler: the scheduler whose training table the split index refers to, where the
            pipeline's is not it (a FLUX.1 pipeline's dynamic shift: `models.flux.routing_scheduler`).

    Returns `{"points": [{"fraction", "split_timestep", "fid", ...metrics}], ...}`.
    """
    from ..routing import denoiser_timestep_map
    from ..schedule import num_train_timesteps
    from .common import denoiser_name
    from .evaluate import sample_images

    fractions = parse_fractions(fractions)
    if pretrained_scheduler is not None:
        check_same_schedule([finetuned_pipeline.scheduler, pretrained_scheduler], ["the fine-tuned model", "the pretrained model"])
    T = num_train_timesteps(finetuned_pipeline.scheduler)
    finetuned = getattr(finetuned_pipeline, denoiser_name(finetuned_pipeline))
    timestep_map = denoiser_timestep_map(finetuned_pipeline.scheduler, T, finetuned, training_scheduler=training_scheduler)
    points, images = [], []
    for f in fractions:
        router = forgetting_router(finetuned, pretrained, f, T, timestep_map)
        samples = sample_images(finetuned_pipeline, num_samples, denoiser=router, scheduler=scheduler,
                                num_inference_steps=num_inference_steps, batch_size=batch_size, seed=seed,
                                progress=progress, desc=f"f={f:g}", prompts=prompts)  # text-to-image: the captions
        points.append({"fraction": f, "split_timestep": int(round(f * T)), **reference.score(samples)})
        if return_images:
            images.append(samples)
    result = {
        "points": points,
        "num_timesteps": T,
        "num_samples": num_samples,
        "scheduler": scheduler if isinstance(scheduler, str) or scheduler is None else type(scheduler).__name__,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "feature_extractor": points[0].get("feature_extractor") if points else None,
        "feature_extractor_sha256": points[0].get("feature_extractor_sha256") if points else None,
    }
    if return_images:
        result["images"] = images
    return result


def describe(result: dict) -> str:
    """A table of the curve (what `analyze.py forgetting` prints)."""
    lines = [f"chain of forgetting ({result['feature_extractor']}, {result['num_samples']} samples): "
             "the last fraction f of the reverse process (low noise) by the pretrained model",
             f"{'f':>6} {'t < split':>10} {'FID':>10} {'precision':>10} {'recall':>8}"]
    for p in result["points"]:
        lines.append(f"{p['fraction']:>6.2f} {p['split_timestep']:>10} {p['fid']:>10.4f} "
                     f"{p.get('precision', float('nan')):>10.4f} {p.get('recall', float('nan')):>8.4f}")
    return "\n".join(lines)
