"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021, Eq. 2-3 and Algorithm 1: with g_0 the mean gradient and c in [0, 1), the update
maximises the worst-case local improvement within a ball around g_0:

    max_d min_i g_i . d   s.t.  ||d - g_0|| <= c ||g_0||.

Its dual is a problem over the simplex, min_w g_w . g_0 + sqrt(phi) ||g_w|| with
g_w = sum_i w_i g_i and phi = c^2 ||g_0||^2, and the primal solution is

    d = g_0 + (sqrt(phi) / ||g_w||) g_w,

rescaled as in the authors' code: rescale = 0 none, 1 divide by 1 + c^2 (default), 2 divide by
1 + c. The dual only needs the Gram matrix (g_w . g_0 = w^T G G^T 1 / K), and we solve it as the
authors do, with scipy's SLSQP from uniform weights. Since the optimum does not change when the
Gram matrix is scaled, we scale it to unit mean diagonal first so the small constants that guard
the square roots are relative. With c = 0, d is exactly the mean gradient (no solve).

Scale: the paper's d is built around the MEAN gradient g_0, the scale of the mean loss
(`reduction="mean"`, the default). The official code multiplies d by K before writing it into
the parameters' gradients ("to match the sum loss", `overwrite_grad` in its training scripts):
`reduction="sum"` does that (K = the number of present tasks). The update is homogeneous in the
gradients, so ANT's division of every cluster loss by K gives back the mean.

Subset mode (the engine's `subset=`) is exact CAGrad on the subset and a heuristic for the
parameters outside it: they get sum_i w_i g_i with the subset's w, not the solution of their own
problem. LibMTL refuses CAGrad with its subset mode (`rep_grad`) for that reason.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .base import GradientWeighting, WeightingConfig, _check_choice, _check_positive
from .registry import register_weighting

logger = logging.getLogger(__name__)


@dataclass
class CAGradConfig(WeightingConfig):
    c: float = dataclasses.field(
        default=0.5,
        metadata={"help": "Radius of the ball around the mean gradient, as a fraction of its norm "
                  "(the paper's c, default 0.5; c = 0 is the mean gradient; convergence needs c < 1)."},
    )
    rescale: int = dataclasses.field(
        default=1, metadata={"help": "Rescaling of the update: 0 none, 1 divide by 1 + c^2, 2 divide by 1 + c."}
    )
    reduction: str = dataclasses.field(
        default="mean",
        metadata={"help": "'mean': the paper's update around the mean gradient (vanilla's scale); 'sum': K times "
                  "it, as the authors' code writes it (\"to match the sum loss\")."},
    )

    def validate(self) -> None:
        super().validate()
        _check_positive("c", self.c, allow_zero=True)
        if self.rescale not in (0, 1, 2) or isinstance(self.rescale, bool):
            raise ValueError(f"rescale must be 0, 1 or 2, got {self.rescale!r}")
        _check_choice("reduction", self.reduction, ("mean", "sum"))


def cagrad_weights(gram: torch.Tensor, c: float, rescale: int = 1) -> torch.Tensor:
    """Weights (K,) on the task gradients whose combination is the CAGrad update."""
    gram = gram.detach().double().cpu()
    k = gram.shape[0]
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = torch.diagonal(gram).mean()
    if c == 0 or scale <= 0:
        weights = mean
    else:
        from scipy.optimize import minimize  # imported here: scipy.optimize takes a second to import

        a = (gram / scale).numpy()
        a_mean = a @ mean.numpy()  # (G G^T) 1 / K: g_i . g_0
        g0_norm = float(np.sqrt(max(mean.numpy() @ a_mean, 0.0)))
        radius = c * g0_norm  # sqrt(phi)

        def objective(w):
            gw_sq = w @ a @ w
            return w @ a_mean + radius * np.sqrt(gw_sq + 1e-12)

        def gradient(w):
            gw_sq = w @ a @ w
            return a_mean + radius * (a @ w) / np.sqrt(gw_sq + 1e-12)

        result = minimize(objective, np.full(k, 1.0 / k), jac=gradient, method="SLSQP",
                          bounds=[(0.0, 1.0)] * k,
                          constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum(),
                                        "jac": lambda w: -np.ones_like(w)},),
                          options={"ftol": 1e-12, "maxiter": 200})
        if not result.success:
            message = f"cagrad: the dual solver did not converge ({result.message}); using its last iterate"
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)
        w = np.clip(result.x, 0.0, None)
        w = w / w.sum()
        gw_norm = float(np.sqrt(max(w @ a @ w, 0.0)))
        lam = radius / (gw_norm + 1e-12)  # sqrt(phi) / ||g_w||
        weights = mean + lam * torch.as_tensor(w, dtype=torch.float64)
    if rescale == 1:
        weights = weights / (1.0 + c**2)
    elif rescale == 2:
        weights = weights / (1.0 + c)
    return weights


@register_weighting("cagrad")
class CAGrad(GradientWeighting):
    """Mean gradient pushed towards the worst-off task, within a ball of radius c ||g_0||."""

    config_class = CAGradConfig

    def task_weights(self, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        weights = cagrad_weights(gram, float(self.config.c), int(self.config.rescale))
        if self.config.reduction == "sum":
            weights = weights * gram.shape[0]
        return weights
