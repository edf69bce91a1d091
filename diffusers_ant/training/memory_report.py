"""Per-process bytes of what the engines shard, for `train_scripts/benchmark_engines.py` (issue 18, item 4).

Off unless the environment variable `DIFFUSERS_ANT_MEMORY_REPORT=1` is set; then each process writes
`OUTPUT_DIR/memory_rank<r>.json` after the last optimizer step. It only reads tensors; training is unchanged.

Why a hook on the optimizer the trainer built: under every engine that torch optimizer is the one that
updates the weights, and each engine hands it exactly what it keeps on this process. DDP: the model's whole
parameters. FSDP2: Accelerate swaps its parameters for the sharded DTensors (their `to_local()` shard is
what this process holds). DeepSpeed ZeRO-2 / ZeRO-3: the ZeRO optimizer replaces its parameter groups with
this process's fp32 partition ("master weights"), sets their `.grad` to this process's gradient partition
just before calling its `step`, and frees it afterwards. So a step pre-hook sees the gradients each engine
holds locally at the moment of the update (under DeepSpeed they exist at no later point, which is why the
counts are not simply taken at the end), and `optimizer.state` is the local AdamW state.

Counted per process (bytes of memory, an address range shared by several tensors counted once):
* `model_parameters`: the trained parameters of the module as the engine holds them (DDP / ZeRO-2: whole;
  FSDP2: `to_local()`; ZeRO-3: the partition `ds_tensor`, the module's own `.data` being empty);
* `master_parameters`: the optimizer's parameters whose storage is not the module's (DeepSpeed's fp32
  partitions, a copy even in fp32 training; none under DDP and FSDP2, whose optimizer updates the module's);
* `gradients`: the `.grad` of the optimizer's parameters at its last step;
* `optimizer_state`: AdamW's `exp_avg`, `exp_avg_sq` (and `step`) tensors.
Not counted: activations, communication buckets (DDP's gradient buckets, ZeRO's reduce buckets), the frozen
components (VAE, text encoders), the libraries. Those are why the peak RSS, also recorded, is a poor
measure at a tiny size.
"""

from __future__ import annotations

import json
import os
import resource

import torch

ENV = "DIFFUSERS_ANT_MEMORY_REPORT"


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The part of parameter `p` this process stores: FSDP2's DTensor shard, ZeRO-3's partition, or `p`."""
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: p.data is an empty placeholder between gathers
        return p.ds_tensor
    if hasattr(p, "to_local"):  # torch DTensor (FSDP2)
        return p.to_local()
    return p


def union_bytes(tensors) -> int:
    """Bytes of memory covered by `tensors`, each address range counted once: views of one flat buffer
    (ZeRO's partitions, whose fp32 master copy may be the very buffer the parameters live in) are not
    counted twice."""
    ranges = sorted((str(t.device), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
                    if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() > 0)
    total, current = 0, None
    for device, start, end in ranges:
        if current is not None and device == current[0] and start <= current[2]:
            current = (device, current[1], max(current[2], end))
            continue
        if current is not None:
            total += current[2] - current[1]
        current = (device, start, end)
    if current is not None:
        total += current[2] - current[1]
    return total


class MemoryProbe:
    """Step hooks on the trainer's torch optimizer (see the module docstring); `write` at the end of training."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        # what the optimizer updated at its last step, by parameter: ZeRO-3 hands it one sub-group at a time and
        # empties its parameter groups afterwards, so they are recorded as the steps happen
        self.updated, self.gradients = {}, {}
        self.params_without_grad = 0
        self.steps = 0
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs):
        self.steps += 1
        self.params_without_grad = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                self.updated[id(p)] = local_tensor(p)
                if p.grad is None:
                    self.params_without_grad += 1
                else:
                    self.gradients[id(p)] = local_tensor(p.grad)

    def counts(self, trained_parameters) -> dict:
        model_tensors = [local_tensor(p) for p in trained_parameters]
        updated = list(self.updated.values())
        state = [local_tensor(v) for s in self.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor)]
        return {
            "model_parameters": union_bytes(model_tensors),
            "model_parameter_elements": sum(t.numel() for t in model_tensors),
            "full_parameter_elements": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                           for p in trained_parameters),
            # the optimizer's parameters beyond the module's own storage (DeepSpeed's fp32 partitions)
            "master_parameters": union_bytes(model_tensors + updated) - union_bytes(model_tensors),
            "optimizer_parameter_elements": sum(t.numel() for t in updated),
            "gradients": union_bytes(self.gradients.values()),
            "optimizer_state": union_bytes(state),
            "optimizer_steps_seen": self.steps,
            "optimizer_parameters_without_gradient": self.params_without_grad,
        }

    def write(self, output_dir: str, accelerator, engine: str, trained_parameters) -> str:
        record = {"engine": engine, "process_index": accelerator.process_index,
                  "num_processes": accelerator.num_processes, **self.counts(list(trained_parameters)),
                  # ru_maxrss is in KiB on Linux: the whole process, libraries included
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, f"memory_rank{accelerator.process_index}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        return path
