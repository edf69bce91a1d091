"""One ANT training step, as data (DESIGN.md, "One training step"):

    batch -> timesteps -> x_t and target -> model -> per-sample loss (B,) -> task losses (K,)
          -> weighting -> backward

The objective (noising, target, per-sample loss, timestep loss weight) is the same for every
method; the weighting decides how the K cluster losses become a parameter update:

* `none`: vanilla training, the mean per-sample loss;
* a loss-based weighting (ANT's UW, ...): `combine` of the K cluster losses, one backward;
* a gradient-based weighting (PCGrad, Nash-MTL, ...): the per-task gradient engine forms the K
  cluster gradients and writes the aggregated update into `.grad`.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..losses import flow_matching_loss_weights, per_sample_loss, timestep_loss_weights
from ..schedule import add_noise, check_weighting_scheme, model_timesteps, resolve_prediction_type, snr_at, training_target


def _index(conditioning: Dict[str, torch.Tensor], idx: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Select samples of every batched conditioning tensor (None = all)."""
    if idx is None:
        return conditioning
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in conditioning.items()}


class DiffusionObjective:
    """Turns a batch into noisy inputs and a per-sample loss closure.

    Args:
        adapter: the model-type adapter (`diffusers_ant.models`): encodes batches, runs the denoiser.
        noise_scheduler: a diffusers training scheduler (DDPM family or flow matching).
        sampler: a timestep sampler (`diffusers_ant.timesteps`).
        intervals: the timestep clusters (`TimestepIntervals`), used to group samples into tasks.
        prediction_type: what the model predicts (None: the scheduler's own).
        loss_weighting, snr_gamma, p2_k, p2_gamma: the timestep loss weight (`losses.timestep_loss_weights`).
        noise_offset: the offset-noise trick of diffusers' scripts (0 = off).
        weighting_scheme: SD3's flow-matching loss weight (`losses.flow_matching_loss_weights`), times the above.
    """

    def __init__(self, adapter, noise_scheduler, sampler, intervals, prediction_type=None,
                 loss_weighting="none", snr_gamma=None, p2_k=1.0, p2_gamma=1.0, noise_offset=0.0,
                 weighting_scheme="none"):
        self.adapter = adapter
        self.scheduler = noise_scheduler
        self.sampler = sampler
        self.intervals = intervals
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.snr_gamma = 5.0 if snr_gamma is None else snr_gamma
        self.p2_k, self.p2_gamma = p2_k, p2_gamma
        self.noise_offset = noise_offset
        check_weighting_scheme(noise_scheduler, weighting_scheme)  # flow matching only: fail at set-up
        self.weighting_scheme = weighting_scheme

    def prepare(self, batch, generator: torch.Generator):
        """Draw timesteps and noise for a batch; returns everything the loss closure needs."""
        x0, conditioning = self.adapter.encode_batch(batch)
        bsz, device = x0.shape[0], x0.device
        # All randomness of the step comes from `generator`, which the checkpoint saves: a resumed
        # run draws exactly the timesteps and noise an uninterrupted run would have drawn.
        if hasattr(self.sampler, "sample_with_ids"):
            t, task_ids = self.sampler.sample_with_ids(bsz, generator=generator, device=generator.device)
        else:
            t = self.sampler.sample(bsz, generator=generator, device=generator.device)
            task_ids = self.intervals.assign(t)
        t, task_ids = t.to(device), task_ids.to(device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(device, x0.dtype)
        if self.noise_offset:
            # https://www.crosslabs.org/blog/diffusion-with-offset-noise, as in diffusers' scripts
            offset = torch.randn((bsz, x0.shape[1], 1, 1), generator=generator, device=generator.device).to(device, x0.dtype)
            noise = noise + self.noise_offset * offset
        x_t = add_noise(self.scheduler, x0, noise, t)
        target = training_target(self.scheduler, x0, noise, t, self.prediction_type)
        prediction_type = resolve_prediction_type(self.scheduler, self.prediction_type)
        weights = timestep_loss_weights(self.loss_weighting, snr_at(self.scheduler, t), prediction_type=prediction_type,
                                        snr_gamma=self.snr_gamma, p2_k=self.p2_k, p2_gamma=self.p2_gamma).to(device)
        weights = weights * flow_matching_loss_weights(self.scheduler, t, self.weighting_scheme)
        return dict(x_t=x_t, t=t, model_t=model_timesteps(self.scheduler, t), target=target, weights=weights,
                    conditioning=conditioning, task_ids=task_ids)

    def loss_fn(self, model, prepared) -> Callable[[Optional[torch.Tensor]], torch.Tensor]:
        """`fn(indices) -> per-sample losses (len(indices),)`: the model forward on those samples (None = all)."""

        def fn(idx: Optional[torch.Tensor] = None) -> torch.Tensor:
            sel = (lambda x: x) if idx is None else (lambda x: x[idx])
            pred = self.adapter.predict(model, sel(prepared["x_t"]), sel(prepared["model_t"]),
                                        _index(prepared["conditioning"], idx))
            return per_sample_loss(pred.float(), sel(prepared["target"]).float()) * sel(prepared["weights"])

        return fn


def training_step(accelerator, objective: DiffusionObjective, model, batch, generator, num_tasks: int,
                  weighting=None, engine=None) -> Dict[str, torch.Tensor]:
    """One micro-batch: draw timesteps and noise, then the method's backward. Returns detached logs.

    The dispatch (vanilla / loss-based / gradient-based) is `weighting.engine.weighted_backward`.
    `model` is the module as prepared by Accelerate (DDP-wrapped on several processes). For a
    gradient-based weighting the closure runs the *unwrapped* module: the engine all-reduces the K
    task gradients itself, so the model's own DDP reducer never averages them a second time.
    """
    from ..weighting.engine import weighted_backward

    prepared = objective.prepare(batch, generator)
    gradient_based = weighting is not None and weighting.needs_task_gradients
    fn = objective.loss_fn(accelerator.unwrap_model(model) if gradient_based else model, prepared)
    return weighted_backward(weighting, fn, prepared["task_ids"], num_tasks, engine=engine,
                             backward_fn=accelerator.backward,
                             grad_scale=1.0 / accelerator.gradient_accumulation_steps)
