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

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..losses import flow_matching_loss_weights, per_sample_loss, timestep_loss_weights
from ..schedule import add_noise, check_weighting_scheme, model_timesteps, resolve_prediction_type, snr_at, training_target
from .deepspeed_support import EngineBackward, is_deepspeed, num_chunks


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


@dataclass
class Source:
    """One kind of sample in a training batch, with its own timestep density and role.

    Plain training has one source, the data. Diff-Tuning (Zhong et al., NeurIPS 2024) adds a
    retention source: knowledge-bank images (`bank`) or, in its distillation variant, downstream
    images whose target is the frozen pretrained model's prediction (`retention`); the data then
    plays "reconsolidation". A task is a (source, timestep cluster) pair, so every weighting and the
    gradient engine work unchanged on sources.

    Attributes:
        name: the key of the source's rows in a micro-batch (`data`, `bank`, `retention`).
        sampler: its timestep sampler (Diff-Tuning: psi(t) ~ (T - t)^a for retention, xi(t) ~ (t + 1)^b
            for reconsolidation).
        weight: factor on its samples' losses (Diff-Tuning's lambda on retention).
        target: `data` (the scheduler's target for the sample and its noise) or `teacher` (the frozen
            pretrained model's prediction on the same x_t).
        null_condition: train the unconditional branch (DiT's null class, the empty prompt), as the
            authors do for knowledge-bank samples.
        consistency: weight of DeMe's consistency loss ||teacher(x_t) - model(x_t)||^2 on its samples.
    """

    name: str
    sampler: object
    weight: float = 1.0
    target: str = "data"
    null_condition: bool = False
    consistency: float = 0.0


class DiffusionObjective:
    """Turns a window of micro-batches into noisy inputs and a per-sample loss closure.

    Args:
        adapter: the model-type adapter (`diffusers_ant.models`): encodes batches, runs the denoiser.
        noise_scheduler: a diffusers training scheduler (DDPM family or flow matching).
        sampler: the timestep sampler of the data (`diffusers_ant.timesteps`), when `sources` is not given.
        intervals: the timestep clusters (`TimestepIntervals`), used to group samples into tasks.
        prediction_type: what the model predicts (None: the scheduler's own).
        loss_weighting, snr_gamma, p2_k, p2_gamma: the timestep loss weight (`losses.timestep_loss_weights`).
        noise_offset: the offset-noise trick of diffusers' scripts (0 = off).
        sources: the `Source`s of a batch (default: the data alone, drawn by `sampler`).
        teacher: the `diffusers_ant.teacher.FrozenTeacher`, for sources with a teacher target or a
            consistency loss.

    Tasks: source i, cluster j is task i * K + j (K clusters); with one source, task j is cluster j.
        weighting_scheme: SD3's flow-matching loss weight (`losses.flow_matching_loss_weights`), times the above.
        precondition_outputs: diffusers' SD3 script's `--precondition_outputs` (flow matching only): the model's
            velocity v becomes x0_hat = x_t - sigma * v and the target is x0 (teacher outputs alike), so the
            loss is sigma^2 times the velocity loss.
    """

    def __init__(self, adapter, noise_scheduler, sampler, intervals, prediction_type=None,
                 loss_weighting="none", snr_gamma=None, p2_k=1.0, p2_gamma=1.0, noise_offset=0.0,
                 sources=None, teacher=None, weighting_scheme="none", precondition_outputs=False):
        self.adapter = adapter
        self.scheduler = noise_scheduler
        self.intervals = intervals
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.snr_gamma = 5.0 if snr_gamma is None else snr_gamma
        self.p2_k, self.p2_gamma = p2_k, p2_gamma
        self.noise_offset = noise_offset
        self.sources = list(sources) if sources else [Source("data", sampler)]
        self.teacher = teacher
        needs_teacher = [s.name for s in self.sources if s.target == "teacher" or s.consistency]
        if needs_teacher and teacher is None:
            raise ValueError(f"source(s) {', '.join(needs_teacher)} need the frozen pretrained model: pass teacher=")
        check_weighting_scheme(noise_scheduler, weighting_scheme)  # flow matching only: fail at set-up
        self.weighting_scheme = weighting_scheme
        if precondition_outputs and resolve_prediction_type(noise_scheduler, prediction_type) != "flow":
            raise ValueError(f"--precondition_outputs turns a flow-matching velocity into x0: {type(noise_scheduler).__name__} "
                             "with this prediction type has none (use --precondition_outputs 0)")
        self.precondition_outputs = bool(precondition_outputs)

    @property
    def sampler(self):
        """The data's timestep sampler."""
        return self.sources[0].sampler

    @property
    def num_tasks(self) -> int:
        return len(self.sources) * len(self.intervals)

    def task_names(self) -> List[str]:
        """`cluster j` with one source, `<source>/j` with several (for logs and cards)."""
        k = len(self.intervals)
        if len(self.sources) == 1:
            return [str(j) for j in range(k)]
        return [f"{source.name}/{j}" for source in self.sources for j in range(k)]

    def task_groups(self) -> torch.Tensor:
        """The source of every task (LongTensor[num_tasks]): vanilla training averages within a source."""
        return torch.arange(len(self.sources)).repeat_interleave(len(self.intervals))

    def prepare(self, batch, generator: torch.Generator, chunk_size: Optional[int] = None):
        """Draw everything random for a batch or window; returns what the closure needs.

        `batch` is a micro-batch, a list of them (a window), or (several sources) micro-batches that
        are dicts of source name -> rows. Order of draws from `generator`, source by source: the
        VAE's latent sample, the label dropout (DiT), the timesteps, the noise, the offset noise. A
        window of GA micro-batches of B samples draws exactly what one batch of GA * B samples draws."""
        window = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        parts = []
        for index, source in enumerate(self.sources):
            rows = [mb[source.name] if source.name in mb and isinstance(mb[source.name], dict) else mb for mb in window]
            if len(self.sources) > 1 and not all(source.name in mb for mb in window):
                raise ValueError(f"a micro-batch lacks the {source.name!r} rows of its source")
            parts.append(self._prepare_source(index, source, concatenate_batches(rows), generator, chunk_size))
        return parts[0] if len(parts) == 1 else _concatenate_prepared(parts)

    def _prepare_source(self, index: int, source: Source, batch: dict, generator, chunk_size):
        if source.null_condition:
            batch = self.adapter.null_condition_batch(batch)
        x0, conditioning = self.adapter.encode_batch(batch, generator=generator, chunk_size=chunk_size, training=True)
        bsz, device = x0.shape[0], x0.device
        # All randomness of the step comes from `generator`, which the checkpoint saves: a resumed
        # run draws exactly the timesteps and noise an uninterrupted run would have drawn.
        if hasattr(source.sampler, "sample_with_ids"):
            t, clusters = source.sampler.sample_with_ids(bsz, generator=generator, device=generator.device)
        else:
            t = source.sampler.sample(bsz, generator=generator, device=generator.device)
            clusters = self.intervals.assign(t)
        t, clusters = t.to(device), clusters.to(device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32).to(device, x0.dtype)
        if self.noise_offset:
            # https://www.crosslabs.org/blog/diffusion-with-offset-noise, as in diffusers' scripts
            offset = torch.randn((bsz, x0.shape[1], 1, 1), generator=generator, device=generator.device).to(device, x0.dtype)
            noise = noise + self.noise_offset * offset
        x_t = add_noise(self.scheduler, x0, noise, t)
        model_t = model_timesteps(self.scheduler, t)
        target = training_target(self.scheduler, x0, noise, t, self.prediction_type)
        prediction_type = resolve_prediction_type(self.scheduler, self.prediction_type)
        if self.precondition_outputs:  # diffusers' SD3 script: target = latents, compared with x_t - sigma * v
            target, prediction_type = x0, "sample"
        weights = timestep_loss_weights(self.loss_weighting, snr_at(self.scheduler, t), prediction_type=prediction_type,
                                        snr_gamma=self.snr_gamma, p2_k=self.p2_k, p2_gamma=self.p2_gamma).to(device)
        weights = weights * flow_matching_loss_weights(self.scheduler, t, self.weighting_scheme)
        prepared = dict(x_t=x_t, t=t, model_t=model_t, target=target, weights=weights * source.weight,
                        conditioning=conditioning, task_ids=clusters + index * len(self.intervals))
        if self.precondition_outputs:
            from ..schedule import flow_sigma_at

            prepared["sigma"] = flow_sigma_at(self.scheduler, t).to(device).view(-1, *([1] * (x0.ndim - 1)))
        if source.target == "teacher" or source.consistency:
            teacher = self.teacher.predict(x_t, model_t, conditioning, chunk_size=chunk_size)
            if self.precondition_outputs:
                teacher = x_t - prepared["sigma"] * teacher
            if source.target == "teacher":
                prepared["target"] = teacher
            if source.consistency:
                prepared["consistency_target"] = teacher
                prepared["consistency_weight"] = torch.full((bsz,), float(source.consistency), device=device)
        return prepared

    def loss_fn(self, model, prepared) -> Callable[[Optional[torch.Tensor]], torch.Tensor]:
        """`fn(indices) -> per-sample losses (len(indices),)`: the model forward on those samples (None = all).

        The per-sample loss is the regression loss against the target, plus DeMe's consistency term
        against the frozen model where a source asks for it, times the timestep loss weight and the
        source's weight."""

        def fn(idx: Optional[torch.Tensor] = None) -> torch.Tensor:
            sel = (lambda x: x) if idx is None else (lambda x: x[idx.to(x.device)])
            pred = self.adapter.predict(model, sel(prepared["x_t"]), sel(prepared["model_t"]),
                                        _index(prepared["conditioning"], idx)).float()
            if "sigma" in prepared:  # --precondition_outputs: model_pred * (-sigmas) + noisy_model_input
                pred = pred * (-sel(prepared["sigma"])) + sel(prepared["x_t"]).float()
            loss = per_sample_loss(pred, sel(prepared["target"]).float())
            if "consistency_target" in prepared:
                loss = loss + sel(prepared["consistency_weight"]) * per_sample_loss(pred, sel(prepared["consistency_target"]))
            return loss * sel(prepared["weights"])

        return fn


def _concatenate_prepared(parts: List[dict]) -> dict:
    """One prepared window from the prepared rows of each source (missing consistency terms are 0)."""
    if any("consistency_target" in part for part in parts):
        for part in parts:
            if "consistency_target" not in part:
                part["consistency_target"] = torch.zeros_like(part["target"])
                part["consistency_weight"] = torch.zeros_like(part["weights"])
    out = {}
    for key in parts[0]:
        if key == "conditioning":
            out[key] = {name: _cat_padded([part[key][name] for part in parts])
                        if isinstance(parts[0][key][name], torch.Tensor) else parts[0][key][name]
                        for name in parts[0][key]}
        else:
            out[key] = torch.cat([part[key] for part in parts])
    return out


def _cat_padded(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch; sequences of different lengths (text embeddings padded to the longest
    caption of their own source, with their attention mask: Qwen-Image) are zero-padded to the longest,
    i.e. more masked padding, which leaves the model's output unchanged."""
    if tensors[0].ndim >= 2 and len({t.shape[1] for t in tensors}) > 1:
        length = max(t.shape[1] for t in tensors)
        tensors = [torch.cat([t, t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))], dim=1) for t in tensors]
    return torch.cat(tensors)


def micro_batch_size(batch: dict) -> int:
    """Rows of a micro-batch (over all its sources)."""
    if "pixel_values" in batch or "latent_moments" in batch:  # pixels, or cached latents (--cache_latents)
        from ..models.base import batch_rows

        return batch_rows(batch)
    return sum(micro_batch_size(part) for part in batch.values() if isinstance(part, dict))


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
    chunk_size = micro_batch_size(batches[0])
    prepared = objective.prepare(batches, generator, chunk_size=chunk_size)
    gradient_based = weighting is not None and weighting.needs_task_gradients
    fn = objective.loss_fn(accelerator.unwrap_model(model) if gradient_based else model, prepared)
    no_sync = None if gradient_based or len(batches) == 1 else (lambda: accelerator.no_sync(model))
    backward_fn, weighting_backward_fn = accelerator.backward, None
    if is_deepspeed(accelerator):
        # The weighting's own loss (UW) reaches only its parameters, outside the engine.
        weighting_backward_fn, no_sync = (lambda loss: loss.backward()), None
        if not gradient_based:
            # DeepSpeed owns the accumulation: it reduces at the window's last chunk and steps there once
            # (`EngineBackward` marks each chunk's boundary).
            backward_fn = EngineBackward(model, num_chunks(prepared["task_ids"].numel(), chunk_size))
        # A gradient method never backpropagates through the engine chunk by chunk: its per-cluster passes
        # take `torch.autograd.grad` on the unwrapped module (no `.grad`, none of DeepSpeed's hooks), and the
        # update reaches the engine in one backward that closes the window, at the boundary
        # `sharding.DeepSpeedUpdate` sets itself. No `EngineBackward` here, so nothing marks a boundary the
        # gradient path does not use.
    return weighted_backward(weighting, fn, prepared["task_ids"], num_tasks, engine=engine,
                             backward_fn=backward_fn, chunk_size=chunk_size, no_sync=no_sync,
                             loss_scale=loss_scale, task_groups=objective.task_groups(),
                             weighting_backward_fn=weighting_backward_fn)
