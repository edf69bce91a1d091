"""MGDA-UB: the multiple-gradient descent algorithm as a min-norm problem.

Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, Eq. 3 and
Algorithm 2: the update is the minimum-norm point of the convex hull of the task gradients,

    min_{a in simplex} || sum_i a_i g_i ||^2 = a^T (G G^T) a,

which is zero at a Pareto-stationary point and otherwise a common descent direction. For K = 2
the solution is closed form (Algorithm 1): a_1 = clip((g_2 - g_1) . g_2 / ||g_1 - g_2||^2, 0, 1).
For K > 2 the authors use Frank-Wolfe, which converges slowly; we solve it exactly instead, with
the least-distance-programming reduction of Lawson and Hanson ("Solving Least Squares
Problems", 1974, Ch. 23) to a non-negative least-squares problem on the K x K Gram matrix:
u = argmin_{u >= 0} u^T (G G^T + 1 1^T) u - 2 1^T u, then a = u / sum(u). scipy's `nnls` is the
Lawson-Hanson active-set method and terminates with the exact solution.

"UB" (the upper bound) is the authors' trick of taking gradients with respect to a shared
representation instead of the shared parameters, and applying the weights as loss weights to
every parameter. Here the per-task gradients come from the engine (all parameters, or a chosen
parameter subset, whose weights are then applied as loss weights), so the choice is the
engine's; subset mode is the authors' practice, not a heuristic.

Gradient normalisation (`normalize`), which the paper leaves out ("optional and not included in
the paper", in the authors' `train_multi_task.py`):
* `"none"` (default): the min-norm point of the raw gradients, the paper's algorithm.
* `"l2"` (LibMTL's `MGDA` with `mgda_gn="l2"`): solve on the unit gradients g_i / ||g_i|| and
  apply the solution a to them, i.e. weights a_i / ||g_i|| on the raw gradients; the update is
  the min-norm point of the unit gradients.
* `"l2_authors"` (Sener & Koltun's code with `normalization_type="l2"`): solve on the unit
  gradients the same way, but apply a to the RAW losses (weights a_i): the update is
  sum_i a_i g_i.
(Their loss-based normalisations, "loss" and "loss+", need the loss values and are not offered.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .base import GradientWeighting, WeightingConfig, _check_choice
from .registry import register_weighting


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """Weights a on the simplex minimising a^T gram a (gram K x K PSD)."""
    gram = gram.detach().double().cpu()
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    if k == 2:
        denom = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]  # ||g_1 - g_2||^2
        if denom <= 0:
            return torch.full((2,), 0.5, dtype=torch.float64)  # equal gradients: any convex combination
        a1 = torch.clamp((gram[1, 1] - gram[0, 1]) / denom, 0.0, 1.0)
        return torch.stack([a1, 1.0 - a1])
    scale = torch.diagonal(gram).mean()
    if scale <= 0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)  # every gradient is zero
    # NNLS needs A, b with A^T A = gram / scale + 1 1^T and A^T b = 1 (least-distance reduction).
    system = (gram / scale + 1.0).numpy()
    eigvals, eigvecs = np.linalg.eigh(system)
    eigvals = np.clip(eigvals, 0.0, None)
    a_matrix = np.sqrt(eigvals)[:, None] * eigvecs.T  # A^T A = V diag(l) V^T
    b_vector = np.linalg.pinv(a_matrix.T) @ np.ones(k)
    from scipy.optimize import nnls  # imported here: scipy.optimize takes a second to import

    u, _ = nnls(a_matrix, b_vector, maxiter=50 * k)
    if u.sum() <= 0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    return torch.as_tensor(u / u.sum(), dtype=torch.float64)


@dataclass
class MGDAConfig(WeightingConfig):
    normalize: str = dataclasses.field(
        default="none",
        metadata={"help": "'none' (the min-norm point of the raw gradients, the paper), 'l2' (of the unit "
                  "gradients, LibMTL) or 'l2_authors' (weights solved on the unit gradients, applied to the raw "
                  "losses, the authors' code)."},
    )

    def validate(self) -> None:
        super().validate()
        _check_choice("normalize", self.normalize, ("none", "l2", "l2_authors"))


@register_weighting("mgda")
class MGDA(GradientWeighting):
    """Minimum-norm point of the convex hull of the task gradients."""

    config_class = MGDAConfig

    def task_weights(self, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        gram = gram.detach().double().cpu()
        if self.config.normalize == "none":
            return min_norm_weights(gram)
        norms = torch.sqrt(torch.diagonal(gram))
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))  # a zero gradient stays zero
        unit_weights = min_norm_weights(gram * inv[:, None] * inv[None, :])
        if self.config.normalize == "l2_authors":
            return torch.where(norms > 0, unit_weights, torch.zeros_like(unit_weights))
        return unit_weights * inv
