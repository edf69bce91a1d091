"""Per-sample losses, timestep loss weights and the reduction to per-task losses.

The loss leaves this module as a ``(B,)`` tensor (one value per sample), is optionally
multiplied by a per-timestep weight (Min-SNR, P2, debiased, each converted to the space of the
prediction; SD3's flow-matching weights), and is then grouped into K
task losses (ANT's timestep clusters, Diff-Tuning's retention / reconsolidation, ...) that
a weighting method from :mod:`diffusers_ant.weighting` turns into one update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import PREDICTION_TYPES, check_weighting_scheme, flow_sigma_at

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

    Multiply :func:`per_sample_loss` (``l2``) by it. ``snr`` comes from
    :func:`diffusers_ant.schedule.snr_at`; ``prediction_type`` is what the model predicts
    (:func:`diffusers_ant.schedule.resolve_prediction_type`).

    Every weighting is defined by its paper in one space (Min-SNR on the x0 error, P2 and debiased
    on the epsilon error) and converted here to the space of the prediction, so that the weighted
    loss is the same function of the model for every prediction type. The conversion: write
    ``x_t = alpha x0 + sigma eps`` (DDPM family: ``alpha^2 = alpha_bar``, ``sigma^2 = 1 - alpha_bar``;
    flow matching: ``alpha = 1 - s``, ``sigma = s``), so ``SNR = alpha^2 / sigma^2``. A prediction
    of any type implies, with ``x_t`` fixed, one ``x0_hat`` and one ``eps_hat = (x_t - alpha x0_hat)
    / sigma``; its epsilon error relates to its own error by

    * ``sample``: ``eps_hat - eps = -(alpha / sigma) (x0_hat - x0)``, so ``||eps err||^2 = SNR ||x0 err||^2``;
    * ``v_prediction`` (``v = alpha eps - sigma x0``, so ``eps = alpha v + sigma x_t`` when
      ``alpha^2 + sigma^2 = 1``): ``eps_hat - eps = alpha (v_hat - v)``, so
      ``||eps err||^2 = alpha^2 ||v err||^2 = SNR / (SNR + 1) ||v err||^2``, i.e. the v-space MSE
      is the epsilon-space MSE times ``(SNR + 1) / SNR``;
    * ``flow`` (velocity ``u = eps - x0``, so ``eps = x_t + (1 - s) u``): ``eps_hat - eps = (1 - s)
      (u_hat - u)`` and, from ``sqrt(SNR) = (1 - s) / s``, ``(1 - s)^2 = SNR / (1 + sqrt(SNR))^2``;
    * ``epsilon``: 1.

    An epsilon-space weight ``w_eps`` therefore becomes ``w_eps * SNR``, ``w_eps * SNR / (SNR + 1)``
    or ``w_eps * SNR / (1 + sqrt(SNR))^2`` (:func:`epsilon_error_ratio`). The ratios hold for
    squared errors only: they convert the ``l2`` loss.

    * ``none``: ones, in whatever space the model predicts.
    * ``min_snr`` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
      Strategy", eq. 9-10): the weight ``min(SNR, gamma)`` of the x0-space loss, converted to
      the space of the prediction. Exactly as diffusers' train_text_to_image.py computes it:
      ``min(snr, gamma) / snr`` for ``epsilon``, ``min(snr, gamma) / (snr + 1)`` for
      ``v_prediction``, and ``min(snr, gamma)`` for ``sample``; for ``flow`` the same rule gives
      ``min(snr, gamma) / (1 + sqrt(snr)) ** 2``. At snr = 0 (zero-terminal-SNR or flow
      endpoint) the epsilon weight is its limit 1 instead of 0/0.
    * ``p2`` (Choi et al. 2022, "Perception Prioritized Training of Diffusion Models", eq. 8):
      ``1 / (p2_k + snr) ** p2_gamma`` on the epsilon loss, converted as above (for
      ``v_prediction`` with k = gamma = 1: ``snr / (snr + 1) ** 2``); the paper uses k = 1,
      gamma in {0.5, 1}.
    * ``debiased`` (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training"):
      ``1 / sqrt(snr)`` on the epsilon loss, capped at ``debiased_max``, converted as above
      (``sqrt(snr)`` for ``sample``, ``sqrt(alpha_bar (1 - alpha_bar))`` for ``v_prediction``,
      ``s (1 - s)`` for ``flow``). The cap exists for SNR = 0, where the epsilon weight is infinite
      (the last step of zero-terminal-SNR and flow-matching schedules); the converted weights
      are 0 there. The default 1000 is the natural continuation for flow matching with T = 1000
      (the step before the endpoint has epsilon weight T - 1 = 999) and leaves the linear (max
      about 157) and scaled-linear (about 37) DDPM schedules untouched; it clips only the last
      step of squaredcos_cap_v2, whose clipped beta of 0.999 gives about 20000.
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
        epsilon_weight = 1.0 / (p2_k + snr) ** p2_gamma
    else:  # debiased
        if debiased_max <= 0:
            raise ValueError(f"debiased_max must be > 0; got {debiased_max}.")
        epsilon_weight = torch.where(positive, safe_snr.rsqrt(), torch.full_like(snr, float(debiased_max)))
        epsilon_weight = torch.clamp(epsilon_weight, max=debiased_max)
    # finite times finite: the capped weight at SNR = 0 meets a ratio of exactly 0 (no inf * 0)
    return epsilon_weight * epsilon_error_ratio(snr, prediction_type)


def epsilon_error_ratio(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """``||eps_hat - eps||^2 / ||pred - target||^2`` for a prediction of ``prediction_type`` -> snr's shape.

    The factor that turns an epsilon-space loss weight into a weight on the loss of the
    prediction (derived in :func:`timestep_loss_weights`): 1 for ``epsilon``, ``snr`` for
    ``sample``, ``snr / (snr + 1)`` for ``v_prediction``, ``snr / (1 + sqrt(snr)) ** 2`` for
    ``flow``. Finite everywhere, 0 at snr = 0 for every type but ``epsilon``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}.")
    if prediction_type == "epsilon":
        return torch.ones_like(snr)
    if prediction_type == "sample":
        return snr
    if prediction_type == "v_prediction":
        return snr / (snr + 1)
    return snr / (1 + snr.sqrt()) ** 2  # flow


def flow_matching_loss_weights(scheduler, t: torch.Tensor, weighting_scheme: str = "none") -> torch.Tensor:
    """SD3's loss weight of each sample's training index ``t`` [B] -> float32 ``[B]`` on ``t``'s device.

    ``weighting_scheme`` as diffusers' SD3 / Flux training scripts take it (Esser et al. 2024,
    "Scaling Rectified Flow Transformers", section 3.1); the weight is diffusers'
    ``compute_loss_weighting_for_sd3`` of the scheduler's sigma: ``sigma_sqrt`` gives
    ``sigma ** -2``, ``cosmap`` gives ``2 / (pi (1 - 2 sigma + 2 sigma^2))``; ``none``,
    ``logit_normal`` and ``mode`` give ones (the latter two choose the timestep *density*
    instead: :class:`diffusers_ant.timesteps.FlowMatchingDensitySampler`).

    The weight multiplies the flow-matching (velocity) ``l2`` loss, as in diffusers' Flux scripts
    and the SD3 scripts with ``--precondition_outputs 0``. (With the SD3 scripts' default
    preconditioning the loss is taken on ``x0_hat = x_t - sigma * v_hat``, whose error is ``sigma``
    times the velocity error: the same weight there is ``sigma^2`` times this one.) Only for
    flow-matching schedulers; any other raises a ``ValueError`` (``none`` excepted).
    """
    check_weighting_scheme(scheduler, weighting_scheme)
    if weighting_scheme == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas=flow_sigma_at(scheduler, t)).float()


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
