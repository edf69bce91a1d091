"""Diff-Tuning's two timestep densities, with exponents.

Zhong et al., "Diffusion Tuning: Transferring Diffusion Models via Chain of Forgetting" (NeurIPS
2024), Sec. 4: knowledge retention trains the knowledge-bank samples at timesteps drawn from
psi(t) ∝ T - t (low noise, where the pretrained model is a universal denoiser), knowledge
reconsolidation trains the downstream samples at t drawn from xi(t) ∝ t + 1 (high noise, where
the domain's shapes are decided). t is the 0-based training index, t = 0 the cleanest.

This module generalises both with an exponent, as issue 11 asks for ``--retention_exponent a`` and
``--reconsolidation_exponent b``:

    psi_a(t) ∝ (T - t)^a,        xi_b(t) ∝ (t + 1)^b,        a, b >= 0,

so a = b = 1 is the paper and 0 is the uniform sampler of plain fine-tuning. The samplers are
``diffusers_ant.timesteps.DensityTimestepSampler`` instances (draws through the caller's
``torch.Generator``, hence resumable), built from the weights below.
"""

from __future__ import annotations

import math

import torch

from ..timesteps import DensityTimestepSampler


def _check_exponent(exponent, flag: str) -> float:
    try:
        value = float(exponent)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be a number >= 0 (1 = the paper, 0 = uniform); got {exponent!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{flag} must be a finite number >= 0 (1 = the paper, 0 = uniform); got {exponent!r}")
    return value


def _check_num_timesteps(num_timesteps) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int (the scheduler's num_train_timesteps); got {num_timesteps!r}")
    return num_timesteps


def retention_weights(num_timesteps: int, exponent: float = 1.0) -> torch.Tensor:
    """Unnormalised psi_a(t) = ((T - t) / T)^a for t = 0..T-1, float64 (Diff-Tuning's retention density).

    Dividing by T changes nothing after normalisation and keeps (T - t)^a finite for large a.
    """
    T = _check_num_timesteps(num_timesteps)
    a = _check_exponent(exponent, "retention exponent")
    return ((T - torch.arange(T, dtype=torch.float64)) / T) ** a


def reconsolidation_weights(num_timesteps: int, exponent: float = 1.0) -> torch.Tensor:
    """Unnormalised xi_b(t) = ((t + 1) / T)^b for t = 0..T-1, float64 (Diff-Tuning's reconsolidation density)."""
    T = _check_num_timesteps(num_timesteps)
    b = _check_exponent(exponent, "reconsolidation exponent")
    return ((torch.arange(T, dtype=torch.float64) + 1) / T) ** b


def retention_sampler(num_timesteps: int, exponent: float = 1.0) -> DensityTimestepSampler:
    """Timesteps for knowledge-bank (retention) samples: P(t) ∝ (T - t)^a; a = 1 is ``DensityTimestepSampler.low_noise``."""
    return DensityTimestepSampler(retention_weights(num_timesteps, exponent))


def reconsolidation_sampler(num_timesteps: int, exponent: float = 1.0) -> DensityTimestepSampler:
    """Timesteps for downstream (reconsolidation) samples: P(t) ∝ (t + 1)^b; b = 1 is ``DensityTimestepSampler.high_noise``."""
    return DensityTimestepSampler(reconsolidation_weights(num_timesteps, exponent))


__all__ = ["reconsolidation_sampler", "reconsolidation_weights", "retention_sampler", "retention_weights"]
