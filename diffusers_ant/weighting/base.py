"""Base classes for multi-task weightings over timestep clusters (ANT, Go et al. 2023, Sec. 4.2).

Following torchjd's split, computing per-task gradients (see `engine.py`) is kept apart from
choosing how to combine them (the classes here):

* a `LossWeighting` turns the K task losses into one scalar to backpropagate:
  `combine(task_losses[K]) -> Tensor[]`; it never needs per-task gradients.
* a `GradientWeighting` turns K flattened per-task gradients into one update direction:
  `aggregate(grads[K, P]) -> Tensor[P]`. Every method here returns a direction in the span of
  the task gradients, so each is defined by `task_weights(gram[K, K]) -> w[K]` on the Gram matrix
  G G^T and `aggregate(G) = w @ G`. Working on the K x K Gram matrix keeps the methods cheap,
  and lets the engine apply the weights as loss weights when the gradients were formed on a
  parameter subset only.

Empty tasks: both entry points take an optional boolean `present[K]`. Absent tasks (a timestep
cluster with no sample in this batch) get weight 0 and do not enter the method's computation;
their state (UW's log-variance, DWA's history) is left untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class WeightingConfig:
    """Options shared by every weighting. Subclasses add their own fields, each with `help` metadata."""

    seed: int = dataclasses.field(
        default=0,
        metadata={"help": "Seed of the method's own random draws (RLW weights, PCGrad order). "
                  "Identical on every process, so every process takes the same step."},
    )

    def validate(self) -> None:
        """Raise a short ValueError naming the fix. Subclasses extend it."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Weighting(nn.Module):
    """A multi-task weighting of K tasks. Subclasses set `name`, `config_class` and `needs_task_gradients`."""

    name: str = ""
    config_class = WeightingConfig
    needs_task_gradients: bool = False

    def __init__(self, num_tasks: int, config: Optional[WeightingConfig] = None):
        super().__init__()
        if int(num_tasks) < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        self.num_tasks = int(num_tasks)
        self.config = config if config is not None else self.config_class()
        self.config.validate()
        self.generator = torch.Generator().manual_seed(self.config.seed)
        # Last weights used, for logging (K,), absent tasks at 0.
        self.register_buffer("last_weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks), persistent=False)

    def _present(self, present: Optional[torch.Tensor], device=None) -> torch.Tensor:
        if present is None:
            return torch.ones(self.num_tasks, dtype=torch.bool, device=device)
        present = torch.as_tensor(present, dtype=torch.bool, device=device)
        if present.shape != (self.num_tasks,):
            raise ValueError(f"present must have shape ({self.num_tasks},), got {tuple(present.shape)}")
        return present

    # Stateful methods store their state in parameters / buffers (saved by nn.Module.state_dict)
    # plus `extra_state` for Python-side state (step counters, RNG). nn.Module's
    # get_extra_state / set_extra_state hooks carry it through state_dict / load_state_dict.
    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        if state and "generator" in state:
            self.generator.set_state(state["generator"])


class LossWeighting(Weighting):
    """Combines task losses into one scalar. Loss-based methods never pay for per-task gradients."""

    needs_task_gradients = False

    def combine(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


class GradientWeighting(Weighting):
    """Combines K per-task gradients into one update direction in their span."""

    needs_task_gradients = True

    def task_weights(self, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Weights w[K'] for the K' present tasks, such that the update is w @ G[present].

        `gram` is the K' x K' Gram matrix G G^T of the present tasks' gradients (float64);
        `present` is the full boolean mask (K,), for methods that keep per-task state."""
        raise NotImplementedError

    def weights_from_grads(self, grads: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-length weights w[K] (0 for absent tasks) from per-task gradients grads[K, P]."""
        if grads.dim() != 2 or grads.shape[0] != self.num_tasks:
            raise ValueError(f"grads must have shape ({self.num_tasks}, P), got {tuple(grads.shape)}")
        present = self._present(present, grads.device)
        weights = torch.zeros(self.num_tasks, dtype=grads.dtype, device=grads.device)
        if present.any():
            g = grads[present].double()  # the small K x K algebra in float64 for stability
            w = self.task_weights(g @ g.T, present)
            weights[present] = w.to(grads.dtype)
        self.last_weights = weights.detach().clone()
        return weights

    def aggregate(self, grads: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The update direction (P,) from per-task gradients grads[K, P]."""
        return self.weights_from_grads(grads, present) @ grads
