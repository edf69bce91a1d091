"""Fully sharded data parallelism (torch FSDP2, `fully_shard`) through Accelerate.

What the training loop needs beyond `accelerator.prepare` under FSDP, each piece reusing Accelerate's
own helpers:

* `enable_fsdp_on_cpu`: Accelerate 1.16 selects FSDP only on accelerator devices
  (`AcceleratorState.__init__`: the FSDP branch sits under MULTI_GPU / XPU / NPU ...); on a machine
  without one, an FSDP launch would silently train under plain DDP (MULTI_CPU: this trainer's
  `Accelerator(cpu=True)`). torch's FSDP2 itself runs on CPU with gloo, so there the state is switched
  to FSDP with the plugin Accelerate builds from the launcher's environment (`FSDP_*` variables);
  `check_cpu_fsdp_launch` refuses, before, what cannot run there.
* `check_fsdp_support`: FSDP1 and the options that do not run under FSDP yet, one line each.
* `check_fsdp_wrapping`: a config whose auto-wrap policy wraps no module would shard the model as one
  unit (every forward gathers the whole model, no memory saved): one line, naming the model's classes.
* The final output is a plain diffusers module (`sharding.whole_model`: the full state dict gathered on
  process 0, as diffusers' scripts do with `accelerator.get_state_dict` under FSDP, loaded into a copy
  of the module taken before sharding with its parameters on the meta device).
* `sharded_like`: EMA's shadow weights are DTensors sharded like the parameters; each process
  checkpoints its shard (`checkpoint.flatten_state`) and puts it back in place on resume.
"""

from __future__ import annotations

import os

import torch

from .args import UsageError
from .sharding import engine_kind

FSDP_CONFIG_HINT = "examples/accelerate/fsdp.yaml"


def fsdp_requested() -> bool:
    """The launcher asked for FSDP (`accelerate launch --use_fsdp` or `distributed_type: FSDP`)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def is_fsdp(accelerator) -> bool:
    return engine_kind(accelerator) == "FSDP"


def check_cpu_fsdp_launch() -> None:
    """Before `Accelerator(...)` builds its FSDP plugin from the launcher's environment: without CUDA,
    `accelerate launch --use_fsdp` alone asks for FSDP1 with `fsdp_cpu_ram_efficient_loading`, whose
    `sync_module_states` the plugin refuses on a CPU with a traceback; this trainer runs FSDP2 only."""
    if not fsdp_requested() or torch.cuda.is_available():
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UsageError(f"FSDP without a GPU needs fsdp_version: 2 (torch's fully_shard): use {FSDP_CONFIG_HINT}, "
                         "or add `--fsdp_version 2 --fsdp_cpu_ram_efficient_loading false`")


def enable_fsdp_on_cpu(accelerator) -> None:
    """Run under FSDP2 on a CPU-only machine when the launcher asked for FSDP (see the module docstring).

    Both shared states are switched: `AcceleratorState()` re-reads `PartialState`'s fields whenever it
    is constructed again (by the data loaders, for instance)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set
    if plugin.fsdp_version != 2:
        raise UsageError(f"FSDP on CPU needs fsdp_version: 2 (torch's fully_shard; FSDP1 needs a GPU): see {FSDP_CONFIG_HINT}")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    for state in (PartialState(), AcceleratorState()):
        state.distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin


def check_fsdp_support(accelerator, args) -> None:
    """What this trainer runs under FSDP is FSDP2 (`fully_shard`); refuse the rest in one line each.

    FSDP1 flattens parameters (the trainer's parameter lists, LoRA hooks and per-task gradient engine
    address the module's own parameters). Of the options below, the text encoder's LoRA trains outside
    the sharded module and its optimizer, the convergence tracker runs the model on process 0 alone (a
    sharded forward is a collective of every process; validation samples a gathered copy instead), and
    8-bit AdamW and quantized bases on sharded (DTensor) parameters are untested."""
    if not is_fsdp(accelerator):
        return
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UsageError(f"under FSDP set fsdp_version: 2 (FSDP2, fully_shard); FSDP1 is not supported: see {FSDP_CONFIG_HINT}")
    refused = {
        "train_text_encoder": "--train_text_encoder (its LoRA lives outside the sharded module and its optimizer)",
        "track_convergence": "--track_convergence (sampling runs on process 0 alone; FSDP's forward needs every process)",
        "use_8bit_adam": "--use_8bit_adam (bitsandbytes' optimizer on sharded DTensor parameters is untested)",
        "quantize_base": "--quantize_base (a quantized frozen base under fully_shard is untested)",
    }
    for flag, why in refused.items():
        if getattr(args, flag, None):
            raise UsageError(f"under FSDP drop {why}, or use plain data parallelism (`accelerate launch --multi_gpu`)")
    if getattr(args, "use_ema", False) and getattr(args, "foreach_ema", False):
        # (EMA's steps pass; its weight swap for validation and the final save fails, after the whole run)
        raise UsageError("under FSDP drop --foreach_ema: torch's foreach copy has no sharding rule for FSDP2's sharded "
                         "parameters, so the EMA weights could not be swapped in for validation or the final save")


def check_fsdp_wrapping(accelerator, model) -> None:
    """Refuse an FSDP config whose auto-wrap policy wraps no submodule, before `prepare` shards anything.

    Uses Accelerate's own policy (`fsdp2_prepare_auto_wrap_policy`, the one `prepare` applies)."""
    if not is_fsdp(accelerator):
        return
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    classes = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))
                      or m is not model and len(list(m.children())) > 0} - {"ModuleList", "Sequential", "ModuleDict"})
    hint = (f"set fsdp_transformer_layer_cls_to_wrap to block classes of {type(model).__name__} "
            f"(e.g. {', '.join(c for c in classes if 'Block' in c) or ', '.join(classes[:4])})")
    try:
        plugin.set_auto_wrap_policy(model)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    except ValueError as error:  # a class named in the config that the model does not have
        raise UsageError(f"FSDP config: {error} ({hint})") from None
    wrapped = 0 if policy is None else sum(1 for m in model.modules() if m is not model and policy(m))
    if wrapped == 0:
        raise UsageError(f"the FSDP config's auto wrap policy wraps no module of {type(model).__name__}: {hint}")
    accelerator.print(f"FSDP2 (fully_shard) on {accelerator.num_processes} processes: {type(model).__name__} "
                      f"sharded in {wrapped} blocks and the rest")


def clip_grad_norm_(accelerator, params, max_norm: float):
    """Gradient clipping over `params` under FSDP2. `accelerator.clip_grad_norm_` clips under FSDP only when
    given exactly `model.parameters()` and silently returns None otherwise (a LoRA run passes its
    trainable subset); torch's `clip_grad_norm_` handles DTensor gradients (one device mesh) itself."""
    accelerator.unscale_gradients()
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def sharded_like(tensors, params):
    """Each process's local shards (as `flatten_state` checkpoints a DTensor) back as DTensors laid out
    like `params` (the sharded trainable parameters, in the same order: EMA's shadow weights)."""
    from torch.distributed.tensor import DTensor

    out = []
    for tensor, param in zip(tensors, params):
        if isinstance(param, DTensor) and not isinstance(tensor, DTensor):
            tensor = DTensor.from_local(tensor.to(param.device, param.dtype), param.device_mesh, param.placements,
                                        shape=param.shape, stride=param.stride())
        out.append(tensor)
    return out
