"""DeMe, *Decouple-Then-Merge* (CVPR 2025): merging per-interval fine-tuned copies in parameter space.

DeMe fine-tunes one copy of a pretrained model per timestep interval, then merges the copies by
task arithmetic (Ilharco et al., ICLR 2023):

    theta* = theta_pre + sum_i w_i (theta_i - theta_pre)                                   (DeMe, Sec. 3.3)

with the w_i chosen by a search on a validation metric (the authors used w = [0.1, 0.1, 0.2, 0.5]
from low to high t on LSUN Church). This module holds the merge; the per-interval fine-tuning
objective and the weight search are not built yet.

Written by hand rather than with peft's merge utilities: those merge LoRA adapters of one model
(`add_weighted_adapter`), not full fine-tuned state dicts against their common base.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch


def merge_task_vectors(base_state_dict: Mapping[str, torch.Tensor],
                       finetuned_state_dicts: Sequence[Mapping[str, torch.Tensor]],
                       weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Task arithmetic: `base + sum_i weights[i] * (finetuned[i] - base)`, key by key.

    Floating-point tensors are merged in float32 (then cast back to the base's dtype); integer and
    boolean tensors (step counters, buffers) must agree across all models and are copied.

    Raises a ValueError naming the problem when the weights and models do not pair up, or when a
    state dict has other keys or shapes than the base (e.g. copies of different architectures).
    """
    finetuned_state_dicts = list(finetuned_state_dicts)
    weights = [float(w) for w in weights]
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
    merged = {}
    for key, base in base_state_dict.items():
        others = [state[key] for state in finetuned_state_dicts]
        for i, tensor in enumerate(others):
            if tensor.shape != base.shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} in fine-tuned state dict {i}, "
                                 f"{tuple(base.shape)} in the base (merge copies of the same model only)")
        if not base.is_floating_point():
            if any(not torch.equal(t, base) for t in others):
                raise ValueError(f"{key}: non-float tensor differs between the models; it cannot be merged")
            merged[key] = base.clone()
            continue
        acc = base.float().clone()
        for w, tensor in zip(weights, others):
            acc += w * (tensor.float() - base.float())
        merged[key] = acc.to(base.dtype)
    return merged
