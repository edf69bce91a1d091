"""UW: uncertainty weighting with learnable log-variances.

Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics", CVPR 2018, Eq. 7-8, in the form ANT uses (Go et al., NeurIPS 2023, Sec. 4.2 and
its reference code):

    L = sum_i 0.5 * (exp(-s_i) * L_i + s_i),      s_i = log sigma_i^2 learnable,

so that dL/ds_i = 0.5 * (1 - exp(-s_i) L_i) and at the optimum exp(-s_i) = 1 / L_i: tasks with
low loss get large weights. ANT initialises s_i = 0 and trains them in their own optimiser group
with lr 0.025 and no weight decay; `param_groups()` returns that group for the trainer to add to
its optimiser.

Absent tasks do not enter L, so their s_i receive an exactly-zero gradient. (An optimiser with
momentum may still move them by their past momentum; plain SGD leaves them unchanged.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .base import LossWeighting, WeightingConfig, _check_positive
from .registry import register_weighting


@dataclass
class UWConfig(WeightingConfig):
    init_log_var: float = dataclasses.field(
        default=0.0, metadata={"help": "Initial value of every log-variance s_i (ANT: 0)."}
    )
    lr: float = dataclasses.field(
        default=0.025, metadata={"help": "Learning rate of the log-variances' optimiser group (ANT: 0.025)."}
    )
    weight_decay: float = dataclasses.field(
        default=0.0, metadata={"help": "Weight decay of the log-variances (ANT: 0)."}
    )

    def validate(self) -> None:
        super().validate()
        if isinstance(self.init_log_var, bool) or not isinstance(self.init_log_var, (int, float)) \
                or not math.isfinite(self.init_log_var):
            raise ValueError(f"init_log_var must be a finite number, got {self.init_log_var!r}")
        _check_positive("lr", self.lr)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)


@register_weighting("uw")
class UncertaintyWeighting(LossWeighting):
    """L = sum_i 0.5 (exp(-s_i) L_i + s_i) with learnable s_i (`log_vars`)."""

    config_class = UWConfig

    def __init__(self, num_tasks: int, config: Optional[UWConfig] = None):
        super().__init__(num_tasks, config)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(self.config.init_log_var)))

    def param_groups(self) -> List[dict]:
        """Optimiser parameter groups for the log-variances: `optimizer.add_param_group(g)` for each."""
        return [{"params": [self.log_vars], "lr": self.config.lr, "weight_decay": self.config.weight_decay}]

    def weights(self) -> torch.Tensor:
        """Current coefficients 0.5 exp(-s_i) of the task losses (K,)."""
        return 0.5 * torch.exp(-self.log_vars.detach())

    def combine(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        s = self.log_vars[present.to(self.log_vars.device)].to(task_losses.device)
        losses = task_losses[present]
        self._record_weights(present, 0.5 * torch.exp(-s.detach()))
        return (0.5 * (torch.exp(-s) * losses + s)).sum()
