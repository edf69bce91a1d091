"""LS: linear scalarisation, equal weights on every task loss.

The baseline of ANT (Go et al., "Addressing Negative Transfer in Diffusion Models", NeurIPS 2023,
Tables 1-2, "LS"): L = sum_i w_i L_i with equal w_i.

Scale: LibMTL's `EW` sums the task losses (w_i = 1): `reduction="sum"`. ANT's reference code
divides every cluster loss by K before weighting, so its LS is the mean of the K cluster losses:
`reduction="mean"` (the default), here over the K' present tasks, so that with stratified
clusters of equal size the scalar equals vanilla training's mean loss and learning rates carry
over unchanged.

Linear in the losses with constant coefficients (1/K' or 1): `loss_coefficients` gives them and
there is no state to commit (see `base.py`).
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
        metadata={"help": "'mean' over the present tasks (the scale of vanilla training's loss, and of ANT's "
                  "reference code, which divides each cluster loss by K) or 'sum' (LibMTL's EW)."},
    )

    def validate(self) -> None:
        super().validate()
        _check_choice("reduction", self.reduction, ("mean", "sum"))


@register_weighting("ls")
class LinearScalarization(LossWeighting):
    """Equal weights: the mean (or sum) of the present task losses."""

    config_class = LSConfig

    def loss_coefficients(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        present = self._present(present)
        k = int(present.sum())
        weight = 1.0 / k if self.config.reduction == "mean" and k > 0 else 1.0
        return self._coefficients(present, torch.full((k,), weight, dtype=torch.float64))
