"""RLW: random loss weighting.

Lin, Ye, Xu, Shi, Zhang, Kwok, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022, Sec. 3 (Eq. 3 with the normal distribution): at every step draw
lambda ~ N(0, I_K) and use w = softmax(lambda); L = sum_i w_i L_i. A baseline of ANT (Go et al.,
NeurIPS 2023).

The weights sum to 1, so the scalar has the scale of the mean loss. Draws come from the
method's own seeded CPU generator: the same sequence on every process, and restored with
`load_state_dict`. All K normals are drawn every step, present or not, so that which tasks are
present never shifts the random stream; the softmax runs over the present tasks only.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import LossWeighting, WeightingConfig
from .registry import register_weighting


@register_weighting("rlw")
class RandomLossWeighting(LossWeighting):
    """Weights softmax(N(0, I)) drawn afresh every step."""

    config_class = WeightingConfig

    def draw_weights(self, present: torch.Tensor) -> torch.Tensor:
        """Weights for the present tasks (sum 1); advances the generator by one step."""
        logits = torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
        return torch.softmax(logits[present.cpu()], dim=0)

    def combine(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        weights = self.draw_weights(present)
        self._record_weights(present, weights)
        losses = task_losses[present]
        return (weights.to(losses) * losses).sum()
