"""One ANT training step, as data (DESIGN.md, "One training step"):

    window of micro-batches -> timesteps -> x_t and target -> model -> per-sample loss (N,)
          -> task losses (K,) -> weighting -> backward

A *window* is what one optimizer update sees: the `--gradient_accumulation_steps` micro-batches
of the update, concatenated. All of its randomness (VAE latent sampling, timesteps, noise, DiT's
class-label dropout) is drawn here, for the whole window, from the one generator the checkpoint
saves. The model then runs on at most one micro-batch at a time (`chunk_size`), so memory is that
of a micro-batch, while the task losses and the weights are those of the whole window: gradient
accumulation of GA micro-batches of B samples is the same update as one batch of GA * B samples,
for every weighting (`weighting.engine` explains how).

The objective (noising, target, per-sample loss, timestep loss weight) is the same for every
method; the weighting decides how the K cluster losses become a parameter update:

* `none`: vanilla training, the mean per-sample loss;
* a loss-based weighting (ANT's UW, ...): the gradient of `combine` of the K cluster losses;
* a gradient-based weighting (PCGrad, Nash-MTL, ...): the per-task gradient engine forms the K
  cluster gradients and writes the aggregated update into `.grad`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ..losses import per_sample_loss, timestep_loss_weights
from ..schedule import add_noise, model_timesteps, resolve_prediction_type, snr_at, training_target


def _index(conditioning: Dict[str, torch.Tensor], idx: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Select samples of every batched conditioning tensor (None = all)."""
    if idx is None:
        return conditioning
    return {k: (v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in conditioning.items()}


def concatenate_batches(batches: List[dict]) -> dict:
    """One batch from a window of micro-batches (tensors concatenated, lists joined)."""
    if len(batches) == 1:
        return batches[0]
    window = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        window[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]
    return window


class DiffusionObjective:
    """Turns a window of micro-batches into noisy inputs and a per-sample loss closure.

    Args:
        adapter: the model-type adapter (`diffusers_ant.models`): encodes batches, runs the denoiser.
        noise_scheduler: a diffusers training scheduler (DDPM family or flow matching).
        sampler: a timestep sampler (`diffusers_ant.timesteps`).
        intervals: the timestep clusters (`TimestepIntervals`), used to group samples into tasks.
        prediction_type: what the model predicts (None: the scheduler's own).
        loss_weighting, snr_gamma, p2_k, p2_gamma: the timestep loss weight (`losses.timestep_loss_weights`).
        noise_offset: the offset-noise trick of diffusers' scripts (0 = off).
    """

    def __init__(self, adapter, noise_scheduler, sampler, intervals, prediction_type=None,
                 loss_weighting="none", snr_gamma=None, p2_k=1.0, p2_gamma=1.0, noise_offset=0.0):
        self.adapter = adapter
        self.scheduler = noise_scheduler
        self.sampler = sampler
        self.intervals = intervals
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.snr_gamma = 5.0 if snr_gamma is None else snr_gamma
        self.p2_k, self.p2_gamma = p2_k, p2_gamma
        self.noise_offset = noise_offset

    def prepare(self, batch, generator: torch.Generator, chunk_size: Optional[int] = None):
        """Draw everything random for a batch or window (a list of micro-batches); returns what the closure needs.

        Order of draws from `generator`: the VAE's latent sample, the label dropout (DiT), the
        timesteps, the noise, the offset noise. A window of GA micro-batches of B samples draws
        exactly what one batch of GA * B samples draws."""
        if isinstance(batch, (list, tuple)):
            batch = concatenate_batches(list(batch))
        x0, conditioning = self.adapter.encode_batch(batch, generator=generator, chunk_size=chunk_size, training=True)
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
        return dict(x_t=x_t, t=t, model_t=model_timesteps(self.scheduler, t), target=target, weights=weights,
                    conditioning=conditioning, task_ids=task_ids)

    def loss_fn(self, model, prepared) -> Callable[[Optional[torch.Tensor]], torch.Tensor]:
        """`fn(indices) -> per-sample losses (len(indices),)`: the model forward on those samples (None = all)."""

        def fn(idx: Optional[torch.Tensor] = None) -> torch.Tensor:
            sel = (lambda x: x) if idx is None else (lambda x: x[idx.to(x.device)])
            pred = self.adapter.predict(model, sel(prepared["x_t"]), sel(prepared["model_t"]),
                                        _index(prepared["conditioning"], idx))
            return per_sample_loss(pred.float(), sel(prepared["target"]).float()) * sel(prepared["weights"])

        return fn


def training_step(accelerator, objective: DiffusionObjective, model, batches, generator, num_tasks: int,
                  weighting=None, engine=None, loss_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """One optimizer step's forward and backward over a window of micro-batches. Returns detached logs.

    The dispatch (vanilla / loss-based / gradient-based) is `weighting.engine.weighted_backward`.
    `model` is the module as prepared by Accelerate (DDP-wrapped on several processes). For a
    gradient-based weighting the closure runs the *unwrapped* module: the engine all-reduces the K
    task gradients itself, so the model's own DDP reducer never averages them a second time.
    `loss_scale` is the fp16 GradScaler's current scale (1 without one).
    """
    from ..weighting.engine import weighted_backward

    batches = batches if isinstance(batches, (list, tuple)) else [batches]
    chunk_size = len(next(iter(batches[0].values())))  # the micro-batch size
    prepared = objective.prepare(batches, generator, chunk_size=chunk_size)
    gradient_based = weighting is not None and weighting.needs_task_gradients
    fn = objective.loss_fn(accelerator.unwrap_model(model) if gradient_based else model, prepared)
    no_sync = None if gradient_based or len(batches) == 1 else (lambda: accelerator.no_sync(model))
    return weighted_backward(weighting, fn, prepared["task_ids"], num_tasks, engine=engine,
                             backward_fn=accelerator.backward, chunk_size=chunk_size, no_sync=no_sync,
                             loss_scale=loss_scale)
