"""UW: uncertainty weighting with learnable log-variances.

Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics", CVPR 2018, Eq. 7-8 (the regression form, as LibMTL's `UW`):

    L = sum_i 0.5 * (exp(-s_i) * L_i + s_i),      s_i = log sigma_i^2 learnable,

so that dL/ds_i = 0.5 * (1 - exp(-s_i) L_i) and at the optimum exp(-s_i) = 1 / L_i: tasks with
low loss get large weights.

ANT's form (Go et al., NeurIPS 2023, its reference code) divides every cluster loss by K first:

    L = sum_i 0.5 * (exp(-s_i) * L_i / K + s_i),

whose optimum is exp(-s_i) = K / L_i: the same coefficients of the losses at the optimum
(0.5 / L_i), reached from s_i = 0 along a different path (the s-terms weigh K times more against
the loss terms). `divide_losses_by_num_tasks=True` selects it (K = num_tasks); the default is
Kendall's form.

Learning rate. ANT initialises s_i = 0 and trains the s_i in their own optimiser group with a
constant lr 0.025 and no weight decay. `param_groups()` returns that group marked
`"constant_lr": True` (torch optimizers keep extra keys of a group): a trainer whose LR scheduler
scales every group (warm-up, cosine decay) must exempt the marked group to keep ANT's constant
rate.

Absent tasks do not enter L, so their s_i receive an exactly-zero gradient. (An optimiser with
momentum may still move them by their past momentum; plain SGD leaves them unchanged.)

Split step (see `base.py`): the coefficients of the losses are c_i = 0.5 exp(-s_i) (/ K), known
before the step; `weighting_loss` is the s-terms with the losses detached,
sum_i 0.5 (exp(-s_i) L_i.detach() (/ K) + s_i), whose gradient w.r.t. s equals that of `combine`.
UW has no other state, so `finish_step` only records `last_weights`.
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
        default=0.025,
        metadata={"help": "Learning rate of the log-variances' optimiser group, kept constant: the group is "
                  "marked constant_lr, exempt from the LR scheduler (ANT: 0.025)."},
    )
    weight_decay: float = dataclasses.field(
        default=0.0, metadata={"help": "Weight decay of the log-variances (ANT: 0)."}
    )
    divide_losses_by_num_tasks: bool = dataclasses.field(
        default=False,
        metadata={"help": "False: Kendall et al.'s 0.5 (exp(-s_i) L_i + s_i). True: ANT's reference form "
                  "0.5 (exp(-s_i) L_i / K + s_i), K = num_tasks."},
    )

    def validate(self) -> None:
        super().validate()
        if isinstance(self.init_log_var, bool) or not isinstance(self.init_log_var, (int, float)) \
                or not math.isfinite(self.init_log_var):
            raise ValueError(f"init_log_var must be a finite number, got {self.init_log_var!r}")
        _check_positive("lr", self.lr)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if not isinstance(self.divide_losses_by_num_tasks, bool):
            raise ValueError("divide_losses_by_num_tasks must be true or false, "
                             f"got {self.divide_losses_by_num_tasks!r}")


@register_weighting("uw")
class UncertaintyWeighting(LossWeighting):
    """L = sum_i 0.5 (exp(-s_i) L_i + s_i) with learnable s_i (`log_vars`); optionally ANT's L_i / K."""

    config_class = UWConfig

    def __init__(self, num_tasks: int, config: Optional[UWConfig] = None):
        super().__init__(num_tasks, config)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(self.config.init_log_var)))
        # 1 / K in ANT's form, 1 in Kendall's: the factor on every task loss inside the sum.
        self.loss_scale = 1.0 / self.num_tasks if self.config.divide_losses_by_num_tasks else 1.0

    def param_groups(self) -> List[dict]:
        """Optimiser parameter groups for the log-variances: `optimizer.add_param_group(g)` for each.

        The group carries `"constant_lr": True`: keep its lr out of the LR scheduler (ANT)."""
        return [{"params": [self.log_vars], "lr": self.config.lr, "weight_decay": self.config.weight_decay,
                 "constant_lr": True}]

    def weights(self) -> torch.Tensor:
        """Current coefficients 0.5 exp(-s_i) (/ K) of the task losses (K,)."""
        return 0.5 * self.loss_scale * torch.exp(-self.log_vars.detach())

    def loss_coefficients(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        present = self._present(present, self.log_vars.device)
        return self._coefficients(present, self.weights().double()[present])

    def _terms(self, task_losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """sum over present i of 0.5 (exp(-s_i) L_i (/ K) + s_i), differentiable in s and in L."""
        s = self.log_vars[present.to(self.log_vars.device)].to(task_losses.device)
        return (0.5 * (torch.exp(-s) * task_losses[present] * self.loss_scale + s)).sum()

    def weighting_loss(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        return self._terms(task_losses.detach(), present)

    def combine(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        task_losses, present = self._check_losses(task_losses, present)
        coefficients = self.loss_coefficients(present)
        total = self._terms(task_losses, present)
        self.finish_step(task_losses, present, coefficients)
        return total
