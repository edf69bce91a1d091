"""What the two sharded engines, FSDP2 (`fsdp.py`) and DeepSpeed ZeRO-3 (`deepspeed_support.py`), share:
process 0 needs the whole trained module to sample and save, but after `accelerator.prepare` each
process holds only shards of it.

* `engine_kind`: which engine the accelerator runs under, by Accelerate's name ("FSDP", "DEEPSPEED",
  "MULTI_CPU", ...), the one test every engine branch of the trainer asks.
* `meta_skeleton`: before sharding, a copy of the module (its classes, LoRA layers, DeMe projections,
  DiffFit scales) with every parameter on the meta device, so it costs no memory.
* `weighting_optimizer`: the weighting's own parameters (UW's log-variances) are no part of the sharded
  model: DeepSpeed's optimizer owns the model's parameters only, and Accelerate's FSDP2 `prepare` maps
  every optimizer parameter to a sharded one of the model and fails on any other. They get a torch
  optimizer of their own and stay replicated, identical on every process.
* `whole_model`: the shards gathered into one state dict on process 0 (`accelerator.get_state_dict`,
  a collective: every process calls it, as diffusers' scripts do under both engines) and loaded into a
  fresh copy of the skeleton. Process 0 can then run it alone: the sharded module on one process would
  wait for the others' shards forever.
"""

from __future__ import annotations

import copy

import torch


def engine_kind(accelerator) -> str:
    """The name of `accelerator.distributed_type` ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED", ...)."""
    kind = accelerator.distributed_type
    return getattr(kind, "name", str(kind))


def meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with every parameter on the meta device (requires_grad kept). Buffers are
    copied as they are: small, and a non-persistent one is in no state dict, so it could not be loaded."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def whole_model(accelerator, model, skeleton):
    """The trained module with all its weights on process 0 (None on the others); every process must call
    it. Without a skeleton (nothing is sharded), `model` itself.

    A fresh copy of the skeleton each time: the whole weights live only as long as the caller holds them
    (a validation in the middle of training does not keep a full copy beside the shards)."""
    if skeleton is None:
        return model
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    module = copy.deepcopy(skeleton)
    _, unexpected = module.load_state_dict(state, strict=False, assign=True)
    left = [name for name, p in module.named_parameters() if p.is_meta]
    if left or unexpected:
        raise RuntimeError(f"the gathered weights do not fit the model: {len(left)} parameters missing "
                           f"({left[:3]}), {len(unexpected)} unknown ({unexpected[:3]})")
    return module.to(accelerator.device)


def weighting_optimizer(args, weighting):
    """The torch optimizer of the weighting's own parameters (UW's log-variances) beside a sharded engine,
    or None when it has none.

    Built with the trainer's optimizer flags over `weighting.param_groups()` (their own lr and no weight
    decay, ANT's setting); no LR schedule: these groups keep a constant lr under DDP too
    (`components.constant_lr_groups`). The update equals DDP's, where the groups sit in the model's
    optimizer: AdamW treats every parameter alone."""
    if weighting is None or not hasattr(weighting, "param_groups"):
        return None
    groups = weighting.param_groups()
    if not groups:
        return None
    from .components import build_optimizer

    return build_optimizer(args, groups, args.learning_rate)
