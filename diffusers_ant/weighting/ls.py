"""LS: linear scalarisation, equal weights on every task loss.

The baseline of ANT (Go et al., "Addressing Negative Transfer in Diffusion Models", NeurIPS 2023,
Tables 1-2, "LS"): L = sum_i w_i L_i with equal w_i.

Scale: ANT's reference code (LibMTL's `EW`) sums the task losses (w_i = 1). We take the mean
over the present tasks by default (w_i = 1 / K'), so that with stratified clusters of equal size
the scalar equals vanilla training's mean loss and learning rates carry over unchanged;
`reduction="sum"` gives the reference scale (K times larger).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .base import LossWeighting, WeightingConfig, _check_choice
from .registry import register_weighting


@dataclass
class LSConfig(WeightingConfig):
    reduction: str = dataclasses.field(
        default="mean",
        metadata={"help": "'mean' over the present tasks (the scale of vanilla training's loss) or "
                  "'sum' (the scale of ANT's reference code)."},
    )

    def validate(self) -> None:
        super().validate()
        _check_choice("reduction", self.reduction, ("mean", "sum"))


@register_weighting("ls")
class LinearScalarization(LossWeighting):
    """Equal weights: the mean (or sum) of the present task losses."""

    config_class = LSConfig

    def combine(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        losses = task_losses[present]
        k = losses.numel()
        if k == 0:
            self._record_weights(present, losses)
            return task_losses.new_zeros(())
        weight = 1.0 / k if self.config.reduction == "mean" else 1.0
        self._record_weights(present, torch.full((k,), weight))
        return losses.sum() * weight
