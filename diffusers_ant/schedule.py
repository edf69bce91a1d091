"""Noise schedules as the training loop sees them: SNR, noising and regression targets.

Everything here is indexed by the *training index* ``t = 0 .. T-1`` with ``t = 0`` the
cleanest timestep, the convention of PAPERS.md (and of DDPM-family schedulers). Two
scheduler families are supported:

* **DDPM family** (variance preserving): any diffusers scheduler with ``alphas_cumprod``
  (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, LCM, ...). With ``a = alpha_bar_t``,
  ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` and ``SNR(t) = a / (1 - a)`` (Ho et al. 2020,
  eq. 4; Kingma et al. 2021, eq. 2).
* **Flow matching** (rectified flow): ``FlowMatchEulerDiscreteScheduler`` and its Heun /
  LCM siblings. With ``s = sigma_t``, ``x_t = (1 - s) x0 + s eps`` and
  ``SNR(t) = ((1 - s) / s) ** 2`` (Esser et al. 2024, SD3, section 2). The sigmas are the
  scheduler's training sigmas including its ``shift``, exactly as diffusers' SD3 / Flux
  training scripts read them from ``noise_scheduler_copy.sigmas``.

Any other scheduler raises a ``ValueError`` naming the supported families.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
"""Every prediction type a target can be built for. ``flow`` (velocity ``noise - x0``) is
the default of flow-matching schedulers, which have no ``prediction_type`` in their config."""

NOISE_SCHEDULERS = ("ddpm", "flow_match")
"""The training scheduler families a model can be trained from scratch with (``--noise_scheduler``):
``DDPMScheduler`` and ``FlowMatchEulerDiscreteScheduler`` (see ``diffusers_ant.models.base.default_scheduler``)."""

FLOW_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
"""``--weighting_scheme`` of diffusers' SD3 / Flux training scripts (Esser et al. 2024, section 3.1),
for flow-matching schedulers only: ``logit_normal`` and ``mode`` choose the timestep density
(:class:`diffusers_ant.timesteps.FlowMatchingDensitySampler`), ``sigma_sqrt`` and ``cosmap`` the
loss weight (:func:`diffusers_ant.losses.flow_matching_loss_weights`), ``none`` neither."""

_DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_FLOW_PREDICTION_TYPES = ("flow", "epsilon", "sample")

_FLOW_SCHEDULER_NAMES = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
)
_SUPPORTED = (
    "supported: DDPM-family schedulers with `alphas_cumprod` (DDPMScheduler, DDIMScheduler, "
    "PNDMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...) and flow matching "
    "(" + ", ".join(_FLOW_SCHEDULER_NAMES) + ")"
)


def _flow_classes() -> tuple:
    import diffusers

    return tuple(getattr(diffusers, name) for name in _FLOW_SCHEDULER_NAMES if hasattr(diffusers, name))


def is_flow_matching(scheduler) -> bool:
    """True for diffusers' flow-matching training schedulers (``x_t = (1 - s) x0 + s eps``)."""
    return isinstance(scheduler, _flow_classes())


def _is_ddpm_family(scheduler) -> bool:
    return getattr(scheduler, "alphas_cumprod", None) is not None and not is_flow_matching(scheduler)


def _check_supported(scheduler) -> None:
    if not (_is_ddpm_family(scheduler) or is_flow_matching(scheduler)):
        raise ValueError(f"{type(scheduler).__name__} has no training noise schedule; {_SUPPORTED}.")


def num_train_timesteps(scheduler) -> int:
    """Number T of training timesteps of a supported scheduler."""
    _check_supported(scheduler)
    if _is_ddpm_family(scheduler):
        return int(len(scheduler.alphas_cumprod))
    return int(scheduler.config.num_train_timesteps)


def _flow_sigmas(scheduler) -> torch.Tensor:
    """Training sigmas of a flow-matching scheduler, float64 [T], ascending (index 0 cleanest).

    Read from a fresh scheduler built from the same config (about 0.3 ms): ``set_timesteps``
    overwrites ``scheduler.sigmas`` with the inference schedule (N + 1 values ending at 0),
    and the training sigmas, shift included, are the ones ``__init__`` computes.
    """
    fresh = type(scheduler).from_config(scheduler.config)
    sigmas = fresh.sigmas.detach().to("cpu", torch.float64)
    return torch.sort(sigmas).values


def schedule_snr(scheduler) -> torch.Tensor:
    """SNR per training index t = 0..T-1, float64 [T], decreasing in t.

    DDPM family: ``alpha_bar / (1 - alpha_bar)``, the quantity of
    ``diffusers.training_utils.compute_snr`` (which computes it in float32; the tests check
    the two agree). A zero-terminal-SNR schedule (``rescale_betas_zero_snr=True``) gives
    SNR = 0 at t = T-1. Flow matching: ``((1 - s) / s) ** 2``, which is 0 at s = 1.
    """
    _check_supported(scheduler)
    if is_flow_matching(scheduler):
        s = _flow_sigmas(scheduler)
        return ((1.0 - s) / s) ** 2
    alpha_bar = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    return alpha_bar / (1.0 - alpha_bar)


def schedule_log_snr(scheduler) -> torch.Tensor:
    """Natural log of :func:`schedule_snr`, float64 [T] (``-inf`` where SNR = 0)."""
    return torch.log(schedule_snr(scheduler))


def _check_t(scheduler, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError("t must be an integer tensor of training indices (e.g. torch.randint(0, T, (B,))).")
    T = num_train_timesteps(scheduler)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(f"training indices t must lie in [0, {T - 1}]; got {int(t.min())}..{int(t.max())}.")
    return t


def check_weighting_scheme(scheduler, weighting_scheme: str) -> None:
    """ValueError unless ``weighting_scheme`` is one of :data:`FLOW_WEIGHTING_SCHEMES` that ``scheduler`` admits."""
    if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
        raise ValueError(f"unknown weighting_scheme {weighting_scheme!r}; use one of {', '.join(FLOW_WEIGHTING_SCHEMES)}.")
    if weighting_scheme != "none" and not is_flow_matching(scheduler):
        raise ValueError(
            f"weighting_scheme {weighting_scheme!r} is SD3's flow-matching scheme and {type(scheduler).__name__} is not "
            "a flow-matching scheduler: train with one (--noise_scheduler flow_match) or use --loss_weighting instead."
        )


def flow_sigma_at(scheduler, t: torch.Tensor) -> torch.Tensor:
    """Training sigma ``s`` of a flow-matching scheduler at training indices ``t`` [B], float32 on ``t``'s device.

    The values of the scheduler's own float32 ``sigmas`` (shift included), as diffusers' SD3
    script reads them (``noise_scheduler_copy.sigmas``), in this project's index order.
    """
    _check_t(scheduler, t)
    if not is_flow_matching(scheduler):
        raise ValueError(f"{type(scheduler).__name__} has no flow-matching sigmas; {_SUPPORTED}.")
    return _flow_sigma_at(scheduler, t)


def _table_on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float64 per-index table on ``device``, in float32 where the device has no float64 (MPS, Apple
    Silicon: moving a float64 tensor there raises); its entries are then rounded once, as they would be after."""
    return table.to(device, torch.float32) if torch.device(device).type == "mps" else table.to(device)


def snr_at(scheduler, t: torch.Tensor) -> torch.Tensor:
    """SNR of training indices ``t`` [B], float32 on ``t``'s device (for loss weights)."""
    _check_t(scheduler, t)
    return _table_on(schedule_snr(scheduler), t.device)[t].float()


def _flow_sigma_at(scheduler, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    sigmas = _table_on(_flow_sigmas(scheduler), t.device)[t]
    if like is None:
        return sigmas.float()
    # broadcast one sigma per sample over the sample's remaining dims
    return sigmas.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def model_timesteps(scheduler, t: torch.Tensor) -> torch.Tensor:
    """The timestep the denoiser is called with for training index ``t``.

    DDPM family: ``t`` itself. Flow matching: ``sigma * num_train_timesteps`` (a float), the
    value diffusers' SD3 / Flux training scripts pass (``noise_scheduler_copy.timesteps[i]``).
    """
    _check_t(scheduler, t)
    if is_flow_matching(scheduler):
        return _flow_sigma_at(scheduler, t) * scheduler.config.num_train_timesteps
    return t


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noised sample ``x_t`` for clean ``x0``, ``noise`` and training indices ``t`` [B].

    DDPM family: ``sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise`` through
    ``DDPMScheduler.add_noise``. It is called on every DDPM-family scheduler, not only
    DDPMScheduler, on purpose: the add_noise of Euler / DPM-Solver / UniPC-style schedulers
    looks ``t`` up in their *inference* timesteps and (Euler) returns the unscaled
    ``x0 + sigma noise``, which is not the training forward process; DDIM, PNDM, LCM, ...
    carry an exact copy of DDPM's. Flow matching: ``(1 - s) x0 + s noise`` with one ``s``
    per sample (SD3 training script).
    """
    _check_t(scheduler, t)
    if is_flow_matching(scheduler):
        s = _flow_sigma_at(scheduler, t, like=x0)
        return (1.0 - s) * x0 + s * noise
    from diffusers import DDPMScheduler

    return DDPMScheduler.add_noise(scheduler, x0, noise, t)


def resolve_prediction_type(scheduler, prediction_type: str | None = None) -> str:
    """The prediction type a run trains with, validated for the scheduler's family.

    ``None`` means the scheduler's own: ``scheduler.config.prediction_type`` for the DDPM
    family (``epsilon`` where the config has none, diffusers' default) and ``"flow"`` for
    flow matching, whose configs have no prediction_type. Use it wherever the type matters
    besides the target, e.g. for :func:`diffusers_ant.losses.timestep_loss_weights`.
    """
    _check_supported(scheduler)
    flow = is_flow_matching(scheduler)
    if prediction_type is None:
        prediction_type = "flow" if flow else scheduler.config.get("prediction_type", "epsilon")
    valid = _FLOW_PREDICTION_TYPES if flow else _DDPM_PREDICTION_TYPES
    if prediction_type not in valid:
        family = "flow-matching" if flow else "DDPM-family"
        raise ValueError(
            f"unknown prediction_type {prediction_type!r} for a {family} scheduler; use one of {', '.join(valid)}."
        )
    return prediction_type


def training_target(
    scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str | None = None,
) -> torch.Tensor:
    """Regression target of the denoiser for ``prediction_type``.

    ``prediction_type`` defaults to ``scheduler.config.prediction_type`` (``"flow"`` for flow
    matching). ``epsilon`` -> ``noise``; ``v_prediction`` -> ``sqrt(alpha_bar) noise -
    sqrt(1 - alpha_bar) x0`` (Salimans & Ho 2022, eq. 9; through ``DDPMScheduler.get_velocity``,
    see :func:`add_noise` for why DDPM's method); ``sample`` -> ``x0``; ``flow`` ->
    ``noise - x0`` (the rectified-flow velocity d x_t / d s, SD3 eq. 6).
    """
    prediction_type = resolve_prediction_type(scheduler, prediction_type)
    _check_t(scheduler, t)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return noise - x0
    from diffusers import DDPMScheduler

    return DDPMScheduler.get_velocity(scheduler, x0, noise, t)
