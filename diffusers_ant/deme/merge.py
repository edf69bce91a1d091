"""DeMe, *Decouple-Then-Merge* (CVPR 2025): merging per-interval fine-tuned copies in parameter space.

DeMe fine-tunes one copy of a pretrained model per timestep interval, then merges the copies by
task arithmetic (Ilharco et al., ICLR 2023):

    theta* = theta_pre + sum_i w_i (theta_i - theta_pre)                                   (DeMe, Sec. 3.3)

with the w_i chosen by a search on a validation metric (the authors used w = [0.1, 0.1, 0.2, 0.5]
from low to high t on LSUN Church; see `search.py`). Besides task arithmetic, the task vectors
``tau_i = theta_i - theta_pre`` can be merged by TIES (Yadav et al., NeurIPS 2023: keep each
vector's largest entries, elect a sign per entry, average the agreeing entries) or DARE (Yu et al.,
ICML 2024: drop entries at random and rescale the rest), through peft's merge utilities
(``peft.utils.merge_utils``), which operate on exactly such lists of task tensors.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Dict, Mapping, Sequence

import torch

__all__ = ["DEFAULT_DENSITY", "MERGE_METHODS", "merge_task_vectors", "merge_seed_for"]

MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
# Fraction of each task vector's entries kept when --density is not given: TIES' top-20% (Yadav et
# al. 2023, Sec. 5); DARE keeps half, a conservative drop rate (its paper drops up to 90% of the
# deltas of fine-tuned language models, which diffusion fine-tunes have not been shown to tolerate).
DEFAULT_DENSITY = {"ties": 0.2, "dare_linear": 0.5, "dare_ties": 0.5}


def merge_seed_for(key: str, seed: int) -> int:
    """The seed of DARE's random drop for the tensor ``key``: a function of the merge seed and the
    key only, so each tensor's mask is reproducible whatever the order or subset of keys merged."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63 - 1)


def _check(base_state_dict, finetuned_state_dicts, weights):
    if not finetuned_state_dicts:
        raise ValueError("merge_task_vectors needs at least one fine-tuned state dict")
    if len(weights) != len(finetuned_state_dicts):
        raise ValueError(f"got {len(weights)} weights for {len(finetuned_state_dicts)} fine-tuned state dicts: "
                         "give one weight per model")
    base_keys = set(base_state_dict)
    for i, state in enumerate(finetuned_state_dicts):
        if set(state) != base_keys:
            missing, extra = sorted(base_keys - set(state)), sorted(set(state) - base_keys)
            raise ValueError(f"fine-tuned state dict {i} does not match the base: missing {missing[:3]}, "
                             f"unexpected {extra[:3]} (merge copies of the same model only)")
    for key, base in base_state_dict.items():
        for i, state in enumerate(finetuned_state_dicts):
            if state[key].shape != base.shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} in fine-tuned state dict {i}, "
                                 f"{tuple(base.shape)} in the base (merge copies of the same model only)")


def _linear_combination(base: torch.Tensor, others: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``base + sum_i w_i (others_i - base)`` in float32, as ``(1 - sum w) base + sum_i w_i others_i``
    with the terms of exactly-zero coefficient left out.

    The same number as peft's ``task_arithmetic`` on the task vectors up to float rounding, but
    exact where it matters: all weights 0 return ``base`` and one-hot weights return that model,
    bitwise (``1.0 * x`` is exact, ``b + (t - b)`` in general is not, and ``0 * x`` would turn an
    infinite entry into NaN).
    """
    terms = [(1.0 - sum(weights), base)] + list(zip(weights, others))
    acc = None
    for coefficient, tensor in terms:
        if coefficient == 0.0:
            continue
        term = tensor.float() * coefficient if coefficient != 1.0 else tensor.float()
        acc = term.clone() if acc is None else acc.add_(term)
    return acc


def merge_task_vectors(base_state_dict: Mapping[str, torch.Tensor],
                       finetuned_state_dicts: Sequence[Mapping[str, torch.Tensor]],
                       weights: Sequence[float], *, method: str = "task_arithmetic", density: float | None = None,
                       majority_sign_method: str = "total", seed: int = 0) -> Dict[str, torch.Tensor]:
    """Merge fine-tuned copies of one model through their task vectors ``finetuned[i] - base``, key by key.

    ``method``:
      - ``task_arithmetic`` (default, DeMe's): ``base + sum_i weights[i] * (finetuned[i] - base)``;
        all weights 0 give the base and one-hot weights give that fine-tune, bitwise.
      - ``ties``: ``base + peft.utils.merge_utils.ties(task vectors, weights, density, majority_sign_method)``.
      - ``dare_linear`` / ``dare_ties``: the same with peft's ``dare_linear`` / ``dare_ties``. Their
        random drop draws from torch's global RNG; here it runs inside ``torch.random.fork_rng``
        seeded with ``merge_seed_for(key, seed)``, so a merge is reproducible and the caller's RNG
        state is left as it was.
    ``density`` (ties, dare): the fraction of each task vector's entries kept, in (0, 1]; default
    ``DEFAULT_DENSITY[method]``. Fine-tunes of weight 0 are left out before peft's merge (they
    would still vote on TIES' signs and dilute its mean); all weights 0 give the base, bitwise.

    Floating-point tensors are merged in float32 (then cast back to the base's dtype); integer and
    boolean tensors (step counters, buffers) must agree across all models and are copied.

    Raises a ValueError naming the problem when the weights and models do not pair up, or when a
    state dict has other keys or shapes than the base (e.g. copies of different architectures).
    """
    finetuned_state_dicts = list(finetuned_state_dicts)
    weights = [float(w) for w in weights]
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}: choose one of {', '.join(MERGE_METHODS)}")
    if method != "task_arithmetic":
        density = DEFAULT_DENSITY[method] if density is None else float(density)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must lie in (0, 1] (the fraction of each task vector kept), got {density}")
        if majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    _check(base_state_dict, finetuned_state_dicts, weights)

    merged = {}
    for key, base in base_state_dict.items():
        others = [state[key] for state in finetuned_state_dicts]
        if not base.is_floating_point():
            if any(not torch.equal(t, base) for t in others):
                raise ValueError(f"{key}: non-float tensor differs between the models; it cannot be merged")
            merged[key] = base.clone()
            continue
        if method == "task_arithmetic":
            merged[key] = _linear_combination(base, others, weights).to(base.dtype)
            continue
        # A fine-tune of weight 0 must contribute nothing, but peft's TIES / DARE-TIES still let it vote
        # in the sign election and count in the disjoint mean's denominator (merge_utils.disjoint_merge
        # divides by how many tensors agree with the elected sign, whatever their weight): drop it first.
        kept = [(w, t) for w, t in zip(weights, others) if w != 0.0]
        if not kept:
            merged[key] = base.clone()  # all weights 0: the base, bitwise
            continue
        merged[key] = (base.float() + _peft_merge(key, base, [t for _, t in kept], [w for w, _ in kept], method,
                                                  density, majority_sign_method, seed)).to(base.dtype)
    return merged


def _peft_merge(key, base, others, weights, method, density, majority_sign_method, seed) -> torch.Tensor:
    """The merged task vector of one tensor through peft's merge utilities (float32, on the CPU)."""
    from peft.utils import merge_utils

    base32 = base.detach().to("cpu", torch.float32)
    task_vectors = [t.detach().to("cpu", torch.float32) - base32 for t in others]
    w = torch.tensor(weights, dtype=torch.float32)
    with warnings.catch_warnings():
        # at density 1 peft prunes nothing (the merge is still well defined) but warns once per tensor
        warnings.filterwarnings("ignore", message="The density .* is greater than or equal to 1")
        if method == "ties":
            delta = merge_utils.ties(task_vectors, w, density, majority_sign_method)
        elif method == "dare_linear":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(merge_seed_for(key, seed))
                delta = merge_utils.dare_linear(task_vectors, w, density)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(merge_seed_for(key, seed))
                delta = merge_utils.dare_ties(task_vectors, w, density, majority_sign_method)
    return delta.to(base.device)
