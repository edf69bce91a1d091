"""diffusers_ant: diffusion training as multi-task learning over timesteps.

Three published methods for Hugging Face diffusers, sharing one training loop:
ANT (Go et al., NeurIPS 2023), DeMe (Decouple-Then-Merge, CVPR 2025) and
Diff-Tuning (Zhong et al., NeurIPS 2024).

The public names are imported lazily so that `import diffusers_ant` stays cheap and
optional dependencies are only needed by the features that use them.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "schedule_snr": "schedule",
    "schedule_log_snr": "schedule",
    "add_noise": "schedule",
    "training_target": "schedule",
    "interval_clustering": "clustering",
    "cluster_timesteps": "clustering",
    "TimestepIntervals": "clustering",
    "WEIGHTINGS": "weighting",
    "get_weighting": "weighting",
    "TimestepRouter": "routing",
    "merge_task_vectors": "deme",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'diffusers_ant' has no attribute {name!r}")


def __dir__():
    return __all__
