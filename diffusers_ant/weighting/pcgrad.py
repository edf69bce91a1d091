"""PCGrad: projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
Algorithm 1 / Eq. 1: for each task i, visit the other tasks j in a random order; whenever the
(already projected) g_i^PC conflicts with g_j (g_i^PC . g_j < 0), project it onto the normal plane
of g_j: g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j. The update is sum_i g_i^PC.

Every projection subtracts a multiple of an original gradient, so g_i^PC = sum_j C[i, j] g_j for a
K x K coefficient matrix C built on the Gram matrix alone (g_i^PC . g_j = (C G G^T)[i, j]); the
update is then w @ G with w = column sums of C. This is exact, and costs O(K^3) instead of O(K^2 P).

Scale: the paper sums the projected gradients. We average them by default (`reduction="mean"`)
so that on non-conflicting gradients PCGrad equals LS (mean of task losses) and vanilla's scale;
`reduction="sum"` gives the paper's (and ANT's reference code's) K-times larger update.

The orders come from the method's seeded CPU generator: identical on every process, restored by
`load_state_dict`. One permutation of the present tasks is drawn per task i, with i left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List

import torch

from .base import GradientWeighting, WeightingConfig, _check_choice
from .registry import register_weighting


@dataclass
class PCGradConfig(WeightingConfig):
    reduction: str = dataclasses.field(
        default="mean",
        metadata={"help": "'mean' of the projected gradients (vanilla's scale) or 'sum' (the paper's)."},
    )

    def validate(self) -> None:
        super().validate()
        _check_choice("reduction", self.reduction, ("mean", "sum"))


@register_weighting("pcgrad")
class PCGrad(GradientWeighting):
    """Gradient surgery, on the Gram matrix."""

    config_class = PCGradConfig

    def draw_orders(self, k: int) -> List[List[int]]:
        """For each of the k present tasks i, the order in which the others are visited."""
        orders = []
        for i in range(k):
            perm = torch.randperm(k, generator=self.generator).tolist()
            orders.append([j for j in perm if j != i])
        return orders

    def task_weights(self, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        gram = gram.detach().double().cpu()
        k = gram.shape[0]
        coeffs = torch.eye(k, dtype=torch.float64)  # row i: g_i^PC in the basis of the original g_j
        for i, order in enumerate(self.draw_orders(k)):
            for j in order:
                sq_norm = gram[j, j]
                if sq_norm <= 0:
                    continue  # a zero gradient conflicts with nothing
                dot = coeffs[i] @ gram[:, j]  # g_i^PC . g_j
                if dot < 0:
                    coeffs[i, j] -= dot / sq_norm
        weights = coeffs.sum(dim=0)
        if self.config.reduction == "mean":
            weights = weights / k
        return weights
