"""Multi-task weighting under data parallelism (several processes, each with its own shard of the batch).

The reference ANT code chooses task weights from each process's *local* task losses or task
gradients, so two processes choose different weights and, after DDP averages their gradients,
take an update that is no method's update at all; UW's log-variances even drift apart. Here every
process sees the *global* task statistics before a weight is chosen, so every process computes the
same weights and takes the same step:

* gradient-based weightings (`TaskGradientEngine`): each process's per-task gradients are the
  means over its local samples of task i, g_{i,p} with n_{i,p} samples. They are replaced by the
  count-weighted global mean  g_i = sum_p n_{i,p} g_{i,p} / sum_p n_{i,p}  (exactly the gradient
  of task i's mean loss over the global batch) with one all-reduce of the K x P matrix, and the
  counts are summed. The engine then writes the same update on every process; the model's DDP
  reducer must not average it again (the trainer runs the closure on the *unwrapped* model).
* loss-based weightings (`combine_task_losses`): the task losses are replaced by their global
  count-weighted means with `sync_task_losses`, which keeps the gradient flowing to the local
  loss, scaled so that DDP's ordinary gradient average gives the exact global gradient.

Every helper is a no-op on one process (or without torch.distributed initialised), so the same
code runs under `python`, `accelerate launch --num_processes 1` and multi-process launches.

Written by hand because neither Accelerate nor torch.distributed offers a count-weighted mean or
a coalesced in-place all-reduce of a list of tensors with a stable public API
(`all_reduce_coalesced` is deprecated); `accelerator.reduce` would work for single tensors but
needs an `Accelerator` object, which the library code does not otherwise depend on.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

import torch
import torch.distributed as dist

# Bucket size of `all_reduce_sum_tensors_`, like DDP's default bucket_cap_mb=25.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place, and return it. A no-op on one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` with process `src`'s copy, in place, and return it. A no-op on one process.

    Every process computes the same weights from the same synced statistics, but "the same" rests
    on bitwise-identical floating-point results of the solvers (Nash-MTL's Newton iterations,
    MGDA's Frank-Wolfe loop, ...) on every rank. Broadcasting the result from process 0 makes the
    processes agree by construction, whatever the hardware or library does."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_module_state_(module: torch.nn.Module, src: int = 0) -> None:
    """Broadcast every buffer and parameter of `module` from process `src` (a weighting's state:
    Nash-MTL's alpha, DWA's loss history, UW's log-variances). A no-op on one process."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.buffers()) + list(module.parameters()):
            dist.broadcast(tensor.data, src=src)


def all_reduce_sum_tensors_(tensors: Iterable[torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Sum a list of tensors over all processes, in place, with one all-reduce per bucket.

    Tensors are flattened into buckets of about `bucket_bytes` (grouped by dtype and device), so a
    model's hundreds of gradient tensors cost a handful of collective calls, not one each. The
    list must be the same (same shapes, same order) on every process. A no-op on one process.
    """
    if not is_distributed():
        return
    bucket: List[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket, size = [], 0

    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + t.numel() * t.element_size() > bucket_bytes):
            flush()
        bucket.append(t)
        size += t.numel() * t.element_size()
    flush()


def average_gradients_(params) -> None:
    """Average the `.grad` of `params` over processes, in place (a missing gradient counts as zero).

    For trainable parameters outside the DDP-wrapped model (a text encoder's LoRA trained beside the
    UNet): DDP averages only the gradients of the module it wraps. A no-op on one process."""
    if not is_distributed():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_sum_tensors_(grads)
    for g in grads:
        g.div_(world_size())


def sync_task_gradients_(
    task_grads: torch.Tensor, task_losses: torch.Tensor, counts: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace local per-task gradients by their global count-weighted means, in place.

    Args:
        task_grads: (K, P) local per-task gradients; row i is the gradient of the mean loss over this
            process's samples of task i (zeros where this process has none). Modified in place.
        task_losses: (K,) local per-task mean losses (detached; 0 where absent).
        counts: (K,) local sample counts per task.

    Returns:
        `(global_task_losses[K], global_counts[K])`; rows of `task_grads` become
        sum_p n_{i,p} g_{i,p} / sum_p n_{i,p}, the gradient of task i's mean over the global batch.
        Tasks with no sample on any process keep a zero row. On one process the inputs are returned
        unchanged.
    """
    if not is_distributed():
        return task_losses, counts
    num_tasks = task_grads.shape[0]
    local_counts = counts.to(device=task_grads.device, dtype=task_grads.dtype)
    # Sums of gradients and of losses, not means: a mean over processes would weigh a process with
    # one sample of task i as much as one with fifty.
    task_grads.mul_(local_counts[:, None])
    all_reduce_sum_(task_grads)
    stats = torch.cat([task_losses.detach().to(local_counts) * local_counts, local_counts])
    all_reduce_sum_(stats)
    global_counts = stats[num_tasks:]
    denominator = global_counts.clamp_min(1.0)  # absent tasks: 0 / 1 = 0, never 0 / 0
    task_grads.div_(denominator[:, None])
    global_losses = (stats[:num_tasks] / denominator).to(task_losses.dtype)
    return global_losses, global_counts.round().to(counts.dtype)


def sync_task_losses(task_losses: torch.Tensor, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Task losses whose value is the global count-weighted mean, with gradients to the local losses.

    For loss-based weightings under DDP. With W processes, n_{i,p} local and N_i = sum_p n_{i,p}
    global samples of task i, it returns

        synced_i = c_i * L_{i,p} + (L_i^global - c_i * L_{i,p}).detach(),   c_i = W * n_{i,p} / N_i,

    whose value is the global mean L_i^global = sum_p n_{i,p} L_{i,p} / N_i on every process, so the
    weighting sees identical losses everywhere (identical weights; identical gradients for learnable
    weighting parameters such as UW's log-variances, which must therefore not be wrapped in DDP).
    Its gradient is c_i * grad L_{i,p}, so DDP's ordinary average over processes of the model
    gradients gives sum_p n_{i,p} grad L_{i,p} / N_i, the exact gradient of the global task mean
    (with equal counts on all processes c_i = 1, i.e. `local + (global - local).detach()`).

    Returns `(synced_losses[K], global_counts[K])`; unchanged inputs on one process.
    """
    if not is_distributed():
        return task_losses, counts
    num_tasks = task_losses.shape[0]
    local_counts = counts.to(device=task_losses.device, dtype=torch.float32)
    stats = torch.cat([task_losses.detach().float() * local_counts, local_counts])
    all_reduce_sum_(stats)
    global_counts = stats[num_tasks:]
    denominator = global_counts.clamp_min(1.0)
    global_losses = (stats[:num_tasks] / denominator).to(task_losses.dtype)
    scale = (world_size() * local_counts / denominator).to(task_losses.dtype)
    scaled_local = task_losses * scale
    synced = scaled_local + (global_losses - scaled_local).detach()
    return synced, global_counts.round().to(counts.dtype)

