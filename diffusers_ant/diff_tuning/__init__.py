"""Diff-Tuning (Zhong et al., "Diffusion Tuning: Transferring Diffusion Models via Chain of
Forgetting", NeurIPS 2024): the library side.

- ``densities``: the retention / reconsolidation timestep densities psi_a(t) ∝ (T - t)^a and
  xi_b(t) ∝ (t + 1)^b (``retention_sampler``, ``reconsolidation_sampler``);
- ``bank``: the knowledge bank, samples of the pretrained model written once as an image folder
  (``build_knowledge_bank``, ``load_knowledge_bank``, ``check_bank_compatible``);
- ``convergence``: ControlNet's sudden convergence, measured by re-extracting the condition from
  generated images (``ConvergenceTracker``, ``load_condition_extractor``);
- ``benchmark``: the ControlNet part of ``train_scripts/benchmark_transfer.py`` (a tiny SD that can be
  sampled, the shared untrained ControlNet, the convergence threshold and summaries).

Parameter-efficient modes (BitFit, DiffFit) live in ``diffusers_ant.peft_modes``: they serve any
fine-tuning, not only Diff-Tuning. The names below are imported on first use, so importing this
package costs nothing.
"""

import importlib

_EXPORTS = {
    "retention_weights": "densities",
    "reconsolidation_weights": "densities",
    "retention_sampler": "densities",
    "reconsolidation_sampler": "densities",
    "BANK_MANIFEST": "bank",
    "build_knowledge_bank": "bank",
    "load_knowledge_bank": "bank",
    "read_bank_manifest": "bank",
    "check_bank_compatible": "bank",
    "ConvergenceTracker": "convergence",
    "load_condition_extractor": "convergence",
    "condition_distance": "convergence",
}



def retention_share(batch_size: int, fraction: float) -> int:
    """Rows of a micro-batch of ``batch_size`` given to retention samples: the floor of
    ``batch_size * fraction``, as the authors' code takes ``int(0.2 * B)`` (thuml/Diffusion-Tuning).
    The 1e-9 only absorbs binary error in the product (0.29 * 100 is 28.999999999999996 in floats,
    which ``int`` floors to 28): an exact product is never rounded up."""
    return int(batch_size * fraction + 1e-9)


__all__ = sorted([*_EXPORTS, "retention_share"])


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
