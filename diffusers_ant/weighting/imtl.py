"""IMTL-G: impartial multi-task learning, gradient part.

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021,
Sec. 3.2, Eq. 8-11: find the update g = sum_i alpha_i g_i, sum_i alpha_i = 1, whose projections
onto every unit task gradient u_i = g_i / ||g_i|| are equal: g . u_1 = g . u_i for all i. With
D = [g_1 - g_i]_{i>1} and U = [u_1 - u_i]_{i>1} (rows), the closed form is

    alpha_{2:K} = g_1 U^T (D U^T)^{-1},      alpha_1 = 1 - sum_{i>1} alpha_i      (Eq. 11).

Every product is an entry of the Gram matrix (g_i . u_j = (G G^T)_{ij} / ||g_j||), so we solve it
on the K x K Gram matrix. The weights sum to 1 (the scale of a mean). When D U^T is singular
(linearly dependent gradients) we take the least-squares solution. A task whose gradient is
exactly zero has no direction to be impartial to: it gets weight 0 and the others are solved.
"""

from __future__ import annotations

import torch

from .base import GradientWeighting, WeightingConfig
from .registry import register_weighting


def imtl_g_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G weights (K,) from the Gram matrix (K, K) of non-zero task gradients."""
    gram = gram.double()
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = torch.sqrt(torch.diagonal(gram))
    gu = gram / norms[None, :]  # gu[i, j] = g_i . u_j
    # (D U^T)[a, b] = (g_1 - g_a) . (u_1 - u_b) for a, b in 2..K (0-based 1..K-1)
    du = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]
    g1u = gu[0, 0] - gu[0, 1:]  # g_1 U^T
    # alpha_rest (row) = g1u (D U^T)^{-1}  <=>  (D U^T)^T alpha_rest^T = g1u^T
    # gelsd (SVD based): exact for a regular matrix, least squares otherwise, and deterministic
    # (the default CPU driver, gelsy, differs in the last bit between identical calls).
    rest = torch.linalg.lstsq(du.T, g1u[:, None], driver="gelsd").solution.flatten()
    return torch.cat([1.0 - rest.sum()[None], rest])


@register_weighting("imtl")
class IMTLG(GradientWeighting):
    """Update with equal projections onto every unit task gradient."""

    config_class = WeightingConfig

    def task_weights(self, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        gram = gram.detach().double().cpu()
        weights = torch.zeros(gram.shape[0], dtype=torch.float64)
        nonzero = torch.diagonal(gram) > 0
        if nonzero.any():
            weights[nonzero] = imtl_g_weights(gram[nonzero][:, nonzero])
        return weights
