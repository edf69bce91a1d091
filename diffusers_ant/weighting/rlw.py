"""RLW: random loss weighting.

Lin, Ye, Xu, Shi, Zhang, Kwok, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022, Sec. 3 (Eq. 3 with the normal distribution): at every step draw
lambda ~ N(0, I_K) and use w = softmax(lambda); L = sum_i w_i L_i. A baseline of ANT (Go et al.,
NeurIPS 2023).

The weights sum to 1, so the scalar has the scale of the mean loss. Draws come from the
method's own seeded CPU generator: the same sequence on every process, and restored with
`load_state_dict`. All K normals are drawn every step, present or not, so that which tasks are
present never shifts the random stream; the softmax runs over the present tasks only. Every draw
goes through that generator, seeded from `config.seed` (the trainer derives it from `--seed`):
two seeds give two weight sequences.

One draw per optimizer step: `loss_coefficients` peeks at the next draw on a copy of the
generator (calling it twice gives the same weights), and `finish_step` (or `combine`) consumes it.
A step that is skipped (fp16 overflow) calls neither, so the next step uses the same draw.
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

    def _next_logits(self) -> torch.Tensor:
        """The next K normals, drawn on a copy of the generator: its state is left as it was."""
        peek = torch.Generator()
        peek.set_state(self.generator.get_state())
        return torch.randn(self.num_tasks, generator=peek, dtype=torch.float64)

    def loss_coefficients(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        present = self._present(present)
        return self._coefficients(present, torch.softmax(self._next_logits()[present.cpu()], dim=0))

    def _commit(self, task_losses: torch.Tensor, present: torch.Tensor) -> None:
        # Consume the draw that loss_coefficients peeked at.
        torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
