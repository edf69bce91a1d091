"""Per-sample losses, timestep loss weights and the reduction to per-task losses.

The loss leaves this module as a ``(B,)`` tensor (one value per sample), is optionally
multiplied by a per-timestep weight (Min-SNR, P2, debiased), and is then grouped into K
task losses (ANT's timestep clusters, Diff-Tuning's retention / reconsolidation, ...) that
a weighting method from :mod:`diffusers_ant.weighting` turns into one update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import PREDICTION_TYPES

LOSS_TYPES = ("l2", "l1", "huber")
LOSS_WEIGHTINGS = ("none", "min_snr", "p2", "debiased")


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Loss of each sample, mean over all non-batch dims, computed in float32 -> ``[B]``.

    ``l2`` is the MSE of every diffusers training script (``F.mse_loss(..., reduction="none")
    .mean(dim=list(range(1, ndim)))``, as in train_text_to_image.py's Min-SNR branch); ``l1``
    the absolute error; ``huber`` torch's Huber loss with threshold ``huber_delta``. float32
    because a bf16/fp16 mean over a whole latent loses the digits that separate timesteps.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}.")
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must have the same shape; "
            "check the model's output channels and the prediction type."
        )
    if prediction.ndim < 1:
        raise ValueError("prediction must have a batch dimension.")
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        loss = F.mse_loss(prediction, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(prediction, target, reduction="none")
    else:
        loss = F.huber_loss(prediction, target, reduction="none", delta=huber_delta)
    if loss.ndim == 1:
        return loss
    return loss.mean(dim=list(range(1, loss.ndim)))


def timestep_loss_weights(
    name: str,
    snr: torch.Tensor,
    prediction_type: str = "epsilon",
    snr_gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
    debiased_max: float = 1000.0,
) -> torch.Tensor:
    """Per-sample loss weight from the SNR of each sample's timestep -> ``[B]`` (snr's dtype).

    Multiply :func:`per_sample_loss` by it. ``snr`` comes from :func:`diffusers_ant.schedule.snr_at`.

    * ``none``: ones.
    * ``min_snr`` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
      Strategy", eq. 9-10): the weight ``min(SNR, gamma)`` of the x0-space loss, converted to
      the space of the prediction. Exactly as diffusers' train_text_to_image.py computes it:
      ``min(snr, gamma) / snr`` for ``epsilon``, ``min(snr, gamma) / (snr + 1)`` for
      ``v_prediction``, and ``min(snr, gamma)`` for ``sample``. For ``flow`` (velocity
      ``noise - x0`` with ``x_t = (1 - s) x0 + s noise``) the x0 error is ``s`` times the
      velocity error, and ``s = 1 / (1 + sqrt(snr))``, so the same rule gives
      ``min(snr, gamma) / (1 + sqrt(snr)) ** 2``. At snr = 0 (zero-terminal-SNR or flow
      endpoint) the epsilon weight is its limit 1 instead of 0/0.
    * ``p2`` (Choi et al. 2022, "Perception Prioritized Training of Diffusion Models", eq. 8):
      ``1 / (p2_k + snr) ** p2_gamma``; the paper uses k = 1, gamma in {0.5, 1}.
    * ``debiased`` (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training"):
      ``1 / sqrt(snr)``, capped at ``debiased_max``. The cap exists for SNR = 0, where the
      weight is infinite (the last step of zero-terminal-SNR and flow-matching schedules).
      The default 1000 is the natural continuation for flow matching with T = 1000 (the
      step before the endpoint has weight T - 1 = 999) and leaves the linear (max about 157)
      and scaled-linear (about 37) DDPM schedules untouched; it clips
      only the last step of squaredcos_cap_v2, whose clipped beta of 0.999 gives about 20000.
    """
    if name not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; use one of {', '.join(LOSS_WEIGHTINGS)}.")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}.")
    if not torch.is_tensor(snr) or not snr.is_floating_point():
        raise ValueError("snr must be a floating-point tensor (see diffusers_ant.schedule.snr_at).")
    positive = snr > 0
    safe_snr = torch.where(positive, snr, torch.ones_like(snr))  # denominators without 0/0

    if name == "none":
        return torch.ones_like(snr)
    if name == "min_snr":
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (the paper uses 5); got {snr_gamma}.")
        # == torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] of the scripts
        clipped = torch.clamp(snr, max=snr_gamma)
        if prediction_type == "epsilon":
            return torch.where(positive, clipped / safe_snr, torch.ones_like(snr))
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if prediction_type == "sample":
            return clipped
        return clipped / (1 + snr.sqrt()) ** 2  # flow
    if name == "p2":
        if p2_k <= 0 or p2_gamma < 0:
            raise ValueError(f"p2 needs p2_k > 0 and p2_gamma >= 0 (the paper: k=1, gamma 0.5 or 1); got {p2_k}, {p2_gamma}.")
        return 1.0 / (p2_k + snr) ** p2_gamma
    # debiased
    if debiased_max <= 0:
        raise ValueError(f"debiased_max must be > 0; got {debiased_max}.")
    weight = torch.where(positive, safe_snr.rsqrt(), torch.full_like(snr, float(debiased_max)))
    return torch.clamp(weight, max=debiased_max)


def reduce_task_losses(
    per_sample: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the per-sample losses of each task -> ``(task_losses [K], counts [K])``.

    One differentiable ``index_add`` (no Python loop over tasks), so the gradient of
    ``task_losses[i]`` reaches exactly the samples of task i. A task with no sample in the
    batch (possible when timesteps are drawn uniformly and grouped by cluster afterwards) gets
    loss 0 and count 0 and no gradient: callers pass ``counts > 0`` as the ``present`` mask to
    the weightings, which must leave absent tasks out rather than read their 0 as a loss.
    ``counts`` is a LongTensor on the losses' device.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")
    if per_sample.ndim != 1 or task_ids.ndim != 1 or per_sample.shape != task_ids.shape:
        raise ValueError(
            f"per_sample {tuple(per_sample.shape)} and task_ids {tuple(task_ids.shape)} must both be [B]; "
            "reduce the loss with per_sample_loss first."
        )
    if task_ids.is_floating_point() or task_ids.dtype == torch.bool:
        raise ValueError("task_ids must be an integer tensor of task (cluster) ids.")
    task_ids = task_ids.to(per_sample.device)
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(f"task_ids must lie in [0, {num_tasks - 1}]; got {int(task_ids.min())}..{int(task_ids.max())}.")
    sums = per_sample.new_zeros(num_tasks).index_add(0, task_ids, per_sample)
    counts = torch.bincount(task_ids, minlength=num_tasks)
    task_losses = sums / counts.clamp(min=1).to(per_sample.dtype)
    return task_losses, counts
