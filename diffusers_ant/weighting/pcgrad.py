"""PCGrad: projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
Algorithm 1 / Eq. 1: for each task i, visit the other tasks j in a random order; whenever the
(already projected) g_i^PC conflicts with g_j (g_i^PC . g_j < 0), project it onto the normal plane
of g_j: g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j. The update is sum_i g_i^PC.

Every projection subtracts a multiple of an original gradient, so g_i^PC = sum_j C[i, j] g_j for a
K x K coefficient matrix C built on the Gram matrix alone (g_i^PC . g_j = (C G G^T)[i, j]); the
update is then w @ G with w = column sums of C. This is exact, and costs O(K^3) instead of O(K^2 P).

Scale: the paper sums the projected gradients (`reduction="sum"`; LibMTL's `PCGrad` too). ANT's
reference code divides every cluster loss by K before PCGrad; the projections do not change when
all gradients are scaled by one factor, so that is the paper's sum divided by K, i.e. the mean of
the projected gradients: `reduction="mean"` (the default), here over the K' present tasks. On
non-conflicting gradients it then equals LS's mean and vanilla training's scale.

The orders come from the method's own CPU generator, seeded from `config.seed` (the trainer
derives it from `--seed`; two seeds give two sequences of orders): identical on every process,
restored by `load_state_dict`, and advanced only by `weights_from_grads` / `weights_from_gram`
(once per optimizer step). One permutation of the present tasks is drawn per task i, with i
left out.

Subset mode (the engine's `subset=`: task gradients of a parameter subset, the weights then
applied as loss weights to every parameter) is exact PCGrad on the subset and a heuristic for the
parameters outside it: their update is sum_i w_i g_i with the subset's w, not the projection of
their own gradients. LibMTL refuses PCGrad with its subset mode (`rep_grad`) for that reason; here
it is allowed because it keeps the cost of a Stable-Diffusion-size model manageable.
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
        metadata={"help": "'mean' of the projected gradients (vanilla's scale; ANT's reference code, which "
                  "divides each cluster loss by K) or 'sum' (the paper's and LibMTL's)."},
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
