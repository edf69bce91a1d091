"""DWA: dynamic weight averaging.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, Eq. 1:

    w_i(t) = K exp(r_i(t-1) / T) / sum_k exp(r_k(t-1) / T),   r_i(t-1) = L_i(t-1) / L_i(t-2),

temperature T = 2, and w_i = 1 for the first two steps. The paper averages losses over an
epoch; as in ANT's use (Go et al., NeurIPS 2023) and LibMTL we step it per training step.

The loss history is two buffers (saved with the checkpoint). With a presence mask, the softmax
runs over the K' present tasks (weights summing to K'), a task with fewer than two recorded
losses gets r_i = 1, and absent tasks keep their history unchanged.

Scale: the scalar is sum_i w_i L_i / K', a weighted mean; equal weights reproduce LS's mean.
The paper's scalar is K times this (a constant factor on the learning rate). `last_weights`
logs w_i / K', the coefficient of each loss in the scalar.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .base import LossWeighting, WeightingConfig, _check_positive
from .registry import register_weighting


@dataclass
class DWAConfig(WeightingConfig):
    temperature: float = dataclasses.field(
        default=2.0, metadata={"help": "Softmax temperature T (Liu et al.: 2). Larger is closer to equal weights."}
    )

    def validate(self) -> None:
        super().validate()
        _check_positive("temperature", self.temperature)


@register_weighting("dwa")
class DynamicWeightAverage(LossWeighting):
    """Weights from the rate of descent of each task loss over the last two steps."""

    config_class = DWAConfig

    def __init__(self, num_tasks: int, config: Optional[DWAConfig] = None):
        super().__init__(num_tasks, config)
        # loss_history[0] = L_i(t-2), loss_history[1] = L_i(t-1); history_count = losses recorded (capped at 2).
        self.register_buffer("loss_history", torch.zeros(2, self.num_tasks, dtype=torch.float64))
        self.register_buffer("history_count", torch.zeros(self.num_tasks, dtype=torch.long))

    def current_weights(self, present: torch.Tensor) -> torch.Tensor:
        """w_i for the present tasks (summing to K'), from the stored history."""
        present = present.to(self.loss_history.device)
        ready = self.history_count[present] >= 2
        # A zero loss two steps ago would give an infinite ratio: floor the denominator.
        ratio = self.loss_history[1, present] / self.loss_history[0, present].clamp_min(1e-12)
        ratio = torch.where(ready, ratio, torch.ones_like(ratio))
        return present.sum() * torch.softmax(ratio / self.config.temperature, dim=0)

    def combine(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        weights = self.current_weights(present)
        k = int(present.sum())
        losses = task_losses[present]
        self._record_weights(present, weights / max(k, 1))
        # Record this step's losses for the next steps (present tasks only).
        mask = present.to(self.loss_history.device)
        current = losses.detach().to(self.loss_history)
        self.loss_history[0, mask] = self.loss_history[1, mask]
        self.loss_history[1, mask] = current
        self.history_count[mask] = torch.clamp(self.history_count[mask] + 1, max=2)
        if k == 0:
            return task_losses.new_zeros(())
        return (weights.to(losses) * losses).sum() / k
