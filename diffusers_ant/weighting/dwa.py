"""DWA: dynamic weight averaging.

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, Eq. 1:

    w_i(t) = K exp(r_i(t-1) / T) / sum_k exp(r_k(t-1) / T),   r_i(t-1) = L_i(t-1) / L_i(t-2),

temperature T = 2, and w_i = 1 for the first two epochs. t counts EPOCHS and L_i(t) is the
average loss of task i over epoch t: the authors' MTAN code and LibMTL (`DWA`, its
`train_loss_buffer`) both average the losses of every batch of an epoch. Per-step ratios would be
mostly sampling noise for per-cluster diffusion losses (a cluster's loss on one batch varies
far more from step to step than it descends), so the window matters.

Here an "epoch" is a window of `window` optimizer steps: the losses of the steps of a window are
averaged per task (over the steps where the task is present), and when the window is complete the
average becomes L_i(t-1) (the previous one L_i(t-2)). The weights used during a window come from
the last two complete windows. `window=1` is the per-step variant. train_ant.py sets `window` to
the number of optimizer steps per epoch unless the option is given, which is the authors' rule.

The state (the last two window averages, how many each task has, and the running sum, count and
step of the current window) lives in buffers, saved and restored with the checkpoint. With a
presence mask, the softmax runs over the K' present tasks (weights summing to K'), a task with
fewer than two complete windows gets r_i = 1, and absent tasks add nothing to the window; a task
absent for a whole window keeps its history.

Scale: the scalar is sum_i w_i L_i / K', a weighted mean; equal weights reproduce LS's mean (and
ANT's division of each cluster loss by K). The paper's scalar is K times this (a constant factor
on the learning rate). `last_weights` logs w_i / K', the coefficient of each loss in the scalar.

Split step (see `base.py`): the coefficients w_i / K' depend only on complete windows, so they are
known before the step; `finish_step` adds the step's losses to the window (and closes it).
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
    window: int = dataclasses.field(
        default=1,
        metadata={"help": "Optimizer steps whose task losses are averaged into one DWA loss L_i(t) (Liu et al. "
                  "and LibMTL: one epoch). 1 = every step. train_ant.py sets it to the optimizer steps per "
                  "epoch unless given."},
    )

    def validate(self) -> None:
        super().validate()
        _check_positive("temperature", self.temperature)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1 (optimizer steps per DWA epoch), got {self.window!r}")


@register_weighting("dwa")
class DynamicWeightAverage(LossWeighting):
    """Weights from the rate of descent of each task's window-average loss over the last two windows."""

    config_class = DWAConfig

    def __init__(self, num_tasks: int, config: Optional[DWAConfig] = None):
        super().__init__(num_tasks, config)
        # loss_history[0] = L_i(t-2), loss_history[1] = L_i(t-1) (window averages);
        # history_count = complete windows recorded per task (capped at 2).
        self.register_buffer("loss_history", torch.zeros(2, self.num_tasks, dtype=torch.float64))
        self.register_buffer("history_count", torch.zeros(self.num_tasks, dtype=torch.long))
        # The current window: per-task sum of losses and number of steps present, and its length so far.
        self.register_buffer("window_loss_sum", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("window_loss_count", torch.zeros(self.num_tasks, dtype=torch.long))
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))

    def current_weights(self, present: torch.Tensor) -> torch.Tensor:
        """w_i for the present tasks (summing to K'), from the last two complete windows."""
        present = present.to(self.loss_history.device)
        ready = self.history_count[present] >= 2
        # A zero loss two windows ago would give an infinite ratio: floor the denominator.
        ratio = self.loss_history[1, present] / self.loss_history[0, present].clamp_min(1e-12)
        ratio = torch.where(ready, ratio, torch.ones_like(ratio))
        return present.sum() * torch.softmax(ratio / self.config.temperature, dim=0)

    def loss_coefficients(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        present = self._present(present, self.loss_history.device)
        k = int(present.sum())
        return self._coefficients(present, self.current_weights(present) / max(k, 1))

    def _commit(self, task_losses: torch.Tensor, present: torch.Tensor) -> None:
        mask = present.to(self.loss_history.device)
        self.window_loss_sum[mask] += task_losses[present].to(self.window_loss_sum)
        self.window_loss_count[mask] += 1
        self.window_steps += 1
        if int(self.window_steps) < self.config.window:
            return
        # The window is complete: its averages become L(t-1), for the tasks seen in it.
        seen = self.window_loss_count > 0
        average = self.window_loss_sum[seen] / self.window_loss_count[seen]
        self.loss_history[0, seen] = self.loss_history[1, seen]
        self.loss_history[1, seen] = average
        self.history_count[seen] = torch.clamp(self.history_count[seen] + 1, max=2)
        self.window_loss_sum.zero_()
        self.window_loss_count.zero_()
        self.window_steps.zero_()
