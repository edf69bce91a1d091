"""Multi-task weightings over timestep clusters: the registry and the methods.

    >>> from diffusers_ant.weighting import get_weighting
    >>> weighting = get_weighting("uw", num_tasks=5, lr=0.025)

Loss-based methods (`ls`, `rlw`, `uw`, `dwa`) expose `combine(task_losses, present=None)`;
gradient-based ones (`pcgrad`, `nash_mtl`, `imtl`, `mgda`, `cagrad`) expose
`aggregate(grads, present=None)` and `weights_from_grads`. See `base.py` for the contract.
"""

import importlib

from .base import GradientWeighting, LossWeighting, Weighting, WeightingConfig
from .registry import WEIGHTINGS, get_weighting, register_weighting, weighting_names

# Importing a method's module registers it.
from . import ls, rlw, uw, dwa, pcgrad, nash_mtl, imtl, mgda, cagrad  # noqa: E402,F401  isort: skip

__all__ = [
    "WEIGHTINGS",
    "get_weighting",
    "weighting_names",
    "register_weighting",
    "Weighting",
    "WeightingConfig",
    "LossWeighting",
    "GradientWeighting",
    "TaskGradientEngine",
]

# Names defined in modules imported on first use (they pull in more of torch / the trainer).
_LAZY = {"TaskGradientEngine": "engine"}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
