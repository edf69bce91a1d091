"""diffusers_ant: diffusion training as multi-task learning over timesteps.

Three published methods for Hugging Face diffusers, sharing one training loop:
ANT (Go et al., NeurIPS 2023), DeMe (Decouple-Then-Merge, CVPR 2025) and
Diff-Tuning (Zhong et al., NeurIPS 2024).

The public names are imported lazily so that `import diffusers_ant` stays cheap and
optional dependencies are only needed by the features that use them.
"""

import importlib
import logging
import os

__version__ = "0.1.0"

# Offline (HF_HUB_OFFLINE), bitsandbytes' CPU backend tries to fetch an optional gemm kernel from the Hub when peft
# or diffusers import it, and it and the `kernels` package log two warnings at the start of every command ("Failed
# to load CPU gemm_4bit_forward ... pip install kernels"), which read as a broken install: bitsandbytes falls back
# to its own kernel, and offline the fetch cannot succeed. Those two loggers alone are set to errors, offline only.
if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
    for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(_name).setLevel(logging.ERROR)

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
