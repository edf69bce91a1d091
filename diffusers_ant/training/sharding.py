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


def zero_stage(accelerator) -> int:
    """The ZeRO stage of the run (0 when it does not run under DeepSpeed)."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return int(plugin.zero_stage) if engine_kind(accelerator) == "DEEPSPEED" and plugin is not None else 0


def deepspeed_config(accelerator) -> dict:
    """The DeepSpeed config the accelerator carries ({} without a DeepSpeed plugin)."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return getattr(plugin, "deepspeed_config", None) or {}


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


# ---------------------------------------------------------------------------------------- Gradient-based methods
#
# A gradient-based weighting (PCGrad, IMTL-G, MGDA, CAGrad, Nash-MTL, `uw+pcgrad`) needs the K per-cluster
# gradients whole on every process, as global means over the processes (`weighting.distributed`). Under
# the sharded engines that is done on the LoRA subset only (`--task_gradient_subset lora`), whose
# gradients are small enough to hold K times on every process:
#
# * FSDP2: the LoRA matrices are kept out of the shards (`fully_shard(ignored_params=...)`, Accelerate's
#   `ignored_modules`): they stay whole and replicated like under DDP, while the frozen base is sharded and
#   gathered block by block in each forward and backward. The engine then runs exactly as under DDP
#   (per-cluster gradients of the local samples, one all-reduce of the K x |LoRA| matrix, weights from
#   process 0, the update written to `.grad` and stepped by the optimizer), except that every process runs
#   the same passes in the same order (`lockstep`: FSDP's all-gathers are collectives).
# * DeepSpeed ZeRO-1/2: every parameter is whole on every process, but DeepSpeed owns the gradients (its
#   hooks reduce each parameter's gradient into its partitions as it is accumulated). The per-cluster
#   gradients are taken with `torch.autograd.grad` (no accumulation, no hook), synced as under DDP, and the
#   update u = w @ G, identical on every process, is handed to the engine by one backward of
#   sum_p <p, u_p>, whose gradient is u exactly; DeepSpeed averages it over the processes (it divides each
#   copy by the process count, then sums: u again up to that rounding, exact when the count is a power of
#   two), clips and steps once per window (`DeepSpeedUpdate`): the weighting still chooses once per window.
# * ZeRO-3 partitions every parameter, and has no option to keep chosen ones out of its partitions (as
#   FSDP2's ignored parameters are), only a size threshold: a parameter of at most
#   `stage3_param_persistence_threshold` elements is "persistent", gathered once and kept whole on every
#   process (DeepSpeed re-gathers the persistent ones after each step). `keep_lora_whole_zero3` raises
#   the threshold to the largest LoRA matrix before `prepare` (the frozen tensors of the base no larger
#   than that persist too) and `gather_persistent_lora` checks after `prepare`
#   that DeepSpeed made every LoRA matrix persistent and gathers them, so the engine finds them whole. The
#   rest runs as under ZeRO-1/2, with every process running the same passes (`lockstep`: the gathers of
#   the partitioned base in each forward and backward are collectives, as FSDP's).


def task_gradient_engine_name(accelerator) -> str:
    kind = engine_kind(accelerator)
    return f"DeepSpeed ZeRO-{zero_stage(accelerator)}" if kind == "DEEPSPEED" else kind


def is_lora_name(name: str) -> bool:
    """Whether a parameter or module name belongs to a LoRA matrix (peft names them `lora_A` / `lora_B`):
    the `--task_gradient_subset lora` rule, one place for the subset, the refusal and FSDP's kept modules."""
    return "lora_" in name


def is_gradient_method(name) -> bool:
    """Whether `--mtl_method name` is a gradient-based weighting (PCGrad, ..., `uw+pcgrad`), from its class:
    known before the weighting is built (which needs the task count, i.e. the data)."""
    if name in (None, "none"):
        return False
    from ..weighting.registry import weighting_class

    return bool(getattr(weighting_class(name), "needs_task_gradients", False))


def check_task_gradient_launch(accelerator, args) -> None:
    """`check_task_gradient_engine` from the flags alone, right after the accelerator is built (`loop.py`,
    beside `check_fsdp_support`): a launch that cannot run is refused before any data or model is loaded."""
    if engine_kind(accelerator) in ("FSDP", "DEEPSPEED") and is_gradient_method(getattr(args, "mtl_method", None)):
        check_task_gradient_engine(accelerator, args)


def mixed_precision_of(accelerator, args) -> str:
    """The low precision the run computes in, "no" for float32: the flag, Accelerate's own setting (which
    `accelerate launch --mixed_precision` or an accelerate config gives), or a DeepSpeed config's enabled
    `fp16` / `bf16` block (a value of "auto" follows Accelerate's setting)."""
    for value in (getattr(args, "mixed_precision", None), getattr(accelerator, "mixed_precision", None)):
        if value not in (None, "no"):
            return str(value)
    config = deepspeed_config(accelerator)
    for key, name in (("fp16", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16")):
        block = config.get(key)
        if isinstance(block, dict) and block.get("enabled") is True:
            return name
    return "no"


def offloads_optimizer(accelerator) -> bool:
    """Whether the DeepSpeed config moves the optimizer out of the device (`zero_optimization.offload_optimizer`
    with a device other than "none")."""
    offload = (deepspeed_config(accelerator).get("zero_optimization") or {}).get("offload_optimizer")
    if isinstance(offload, dict):
        return str(offload.get("device", "none")).lower() not in ("none", "")
    return bool(offload) and offload != "none"


def check_task_gradient_engine(accelerator, args) -> None:
    """Refuse, in one line naming the engine and the flag, a gradient-based method under FSDP / DeepSpeed that
    cannot run correctly there. It reads only the flags and the accelerator: the trainer calls it (through
    `check_task_gradient_launch`) before anything is loaded; `components.check_distributed_support` asks it
    again for a built weighting."""
    from .args import UsageError
    engine = task_gradient_engine_name(accelerator)
    method = f"--mtl_method {args.mtl_method} (gradient-based)"
    if getattr(args, "task_gradient_subset", None) != "lora":
        raise UsageError(f"{method} under {engine} needs --task_gradient_subset lora (with --rank): the per-cluster "
                         "gradients of sharded parameters are never whole on one process; or use a loss-based "
                         "method (ls, rlw, uw, dwa) or `accelerate launch --multi_gpu`")
    if getattr(args, "task_gradients", "split") not in ("split", "auto"):  # (auto is split here)
        raise UsageError(f"{method} under {engine} runs with --task_gradients split only (not "
                         f"{args.task_gradients}): drop --task_gradients or use `accelerate launch --multi_gpu`")
    precision = mixed_precision_of(accelerator, args)
    # bf16 runs: under FSDP2 its mixed-precision policy casts the gathered base weights, while the LoRA matrices,
    # kept whole outside the shards, stay float32 (peft casts the activations to their dtype, as under DDP's
    # autocast), and so do their per-cluster gradients and update; under DeepSpeed the whole module is bf16
    # (its optimizer keeps float32 masters), the per-cluster gradients too. Both are tested against DDP's bf16
    # run (tests/test_fsdp.py, tests/test_deepspeed.py). fp16 would need a loss scale shared by the sharded
    # engine's backward and the per-cluster passes, which no run here has checked.
    if precision not in ("no", "bf16"):
        raise UsageError(f"{method} under {engine} runs in float32 or bf16 (this run computes in {precision}, from "
                         "--mixed_precision, the launcher or the DeepSpeed config): use --mixed_precision bf16 or no "
                         "(and no fp16 block in a DeepSpeed config), or `accelerate launch --multi_gpu`")
    if engine_kind(accelerator) == "DEEPSPEED" and offloads_optimizer(accelerator):
        # DeepSpeed's CPU optimizer offload keeps its own count of the window's micro-steps (its config's
        # gradient_accumulation_steps), and the gradient path hands it one backward per window
        raise UsageError(f"{method} under {engine} does not run with offload_optimizer in the DeepSpeed config "
                         "(the offloaded optimizer counts micro-steps, and the update reaches the engine in one "
                         "backward per window): remove zero_optimization.offload_optimizer")


def check_lora_only(accelerator, args, adapter) -> None:
    """Under FSDP / DeepSpeed a gradient-based method forms its update on the LoRA subset alone: every
    trainable parameter must lie in it (one line otherwise)."""
    from .args import UsageError

    others = [name for name, p in adapter.model.named_parameters() if p.requires_grad and not is_lora_name(name)]
    others += [f"{key}." for key, module in adapter.extra_trainable_modules().items()
               if any(p.requires_grad for p in module.parameters())]
    if others:
        raise UsageError(f"--mtl_method {args.mtl_method} under {task_gradient_engine_name(accelerator)} with "
                         f"--task_gradient_subset lora needs every trainable parameter to be LoRA's ({len(others)} "
                         f"others train here, e.g. {others[0]}): train LoRA alone, or use `accelerate launch --multi_gpu`")


def keep_lora_whole(accelerator, model) -> int:
    """FSDP2: keep the LoRA matrices out of the shards (Accelerate's `ignored_modules`, passed to
    `fully_shard(ignored_params=...)`), before `prepare`. Returns how many modules were left whole."""
    modules = [m for name, m in model.named_modules()
               if any(p.requires_grad for p in m.parameters(recurse=False)) and is_lora_name(name)]
    plugin = accelerator.state.fsdp_plugin
    if isinstance(plugin.ignored_modules, str):
        from .args import UsageError

        raise UsageError("under FSDP a gradient-based --mtl_method keeps the LoRA matrices whole (as ignored "
                         "modules): drop fsdp_ignored_modules from the FSDP config")
    plugin.ignored_modules = list(plugin.ignored_modules or []) + modules
    return len(modules)


# DeepSpeed's default `stage3_param_persistence_threshold` (deepspeed.runtime.zero.config), in elements
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000
# Each ZeRO-3 threshold under the two spellings DeepSpeed's config accepts (its alias, the documented one,
# first; then the field name)
PARAM_PERSISTENCE_KEYS = ("stage3_param_persistence_threshold", "param_persistence_threshold")
MODEL_PERSISTENCE_KEYS = ("stage3_model_persistence_threshold", "model_persistence_threshold")


def keep_lora_whole_zero3(accelerator, model) -> int:
    """ZeRO-3: make every LoRA matrix a persistent parameter (whole on every process), before `prepare`, by
    raising the DeepSpeed config's `stage3_param_persistence_threshold` to the largest LoRA matrix where it
    is lower (or "auto", which Accelerate would set from the model's hidden size). Returns the threshold.
    A `stage3_model_persistence_threshold` (a cap on all persistent elements together) is refused in one
    line: it could leave LoRA matrices partitioned."""
    from .args import UsageError

    sizes = [p.numel() for name, p in model.named_parameters() if p.requires_grad and is_lora_name(name)]
    zero = deepspeed_config(accelerator).setdefault("zero_optimization", {})
    for key in MODEL_PERSISTENCE_KEYS:
        cap = zero.get(key)
        if cap not in (None, "auto") and float(cap) < 2**62:  # DeepSpeed's default is sys.maxsize: no cap
            raise UsageError(f"a gradient-based --mtl_method under DeepSpeed ZeRO-3 keeps the LoRA matrices whole "
                             f"as persistent parameters: drop zero_optimization.{key} from the DeepSpeed config")
    given = [zero.pop(key) for key in PARAM_PERSISTENCE_KEYS if key in zero]
    threshold = given[0] if given else DEEPSPEED_PERSISTENCE_THRESHOLD
    largest = max(sizes, default=0)
    if not isinstance(threshold, (int, float)) or threshold < largest:
        threshold = largest
    zero[PARAM_PERSISTENCE_KEYS[0]] = threshold  # one spelling only, so DeepSpeed cannot read the other
    return int(threshold)


def gather_persistent_lora(params, model) -> tuple:
    """ZeRO-3, after `prepare`: check that DeepSpeed made every trained (LoRA) parameter persistent
    (`keep_lora_whole_zero3`) and gather them whole on every process (a collective; DeepSpeed keeps them
    whole from then on, re-gathering them after each step), so the engine can read their size and take
    their gradients outside any module's forward. Returns (persistent, partitioned): the model's
    parameter tensors DeepSpeed keeps whole and those it partitions, as the log reports them."""
    from .args import UsageError

    params = list(params)
    if not params:
        raise UsageError("a gradient-based --mtl_method under DeepSpeed ZeRO-3 found no trainable LoRA matrix: "
                         "train LoRA with --rank N and --task_gradient_subset lora")
    partitioned = [p for p in params if not getattr(p, "ds_persist", False)]
    if partitioned:
        raise UsageError(f"DeepSpeed ZeRO-3 left {len(partitioned)} LoRA matrices partitioned (the largest "
                         f"{max(p.ds_numel for p in partitioned)} elements): its config's "
                         "stage3_param_persistence_threshold must be at least that")
    params[0].all_gather(param_list=params)  # (DeepSpeed skips the ones already whole)
    persist = [bool(getattr(p, "ds_persist", False)) for p in model.parameters()]
    return sum(persist), len(persist) - sum(persist)


def whole_parameters(params):
    """A context in which ZeRO-3 parameters are whole on every process (DeepSpeed's `GatheredParameters`, a
    collective), or nothing to do (ZeRO-1/2, plain tensors). ZeRO-3 keeps its persistent parameters whole
    once trained, but the step that records its module trace releases them after each module's forward
    like any other (DeepSpeed 0.19's `release_sub_module` filters persistent ones only with a complete
    trace), so the update's backward gathers them itself."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


class DeepSpeedUpdate:
    """`write_update` of the per-cluster gradient engine under DeepSpeed ZeRO-1/2/3: the update u (identical
    on every process) becomes the engine's gradient by one backward of sum_p <p, u_p> (gradient u exactly),
    and the engine steps (one window, one step). DeepSpeed averages the identical copies by dividing each
    by the process count and summing: u up to that rounding, exact when the count is a power of two.

    The window's per-cluster passes ran on the unwrapped module by `torch.autograd.grad` (no `.grad`
    accumulated, none of DeepSpeed's hooks run), so this is the engine's only backward of the window and it
    is marked as the accumulation boundary, where DeepSpeed reduces and steps."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, params, update) -> None:
        # The window's one backward through the engine: its accumulation boundary, where DeepSpeed reduces the
        # gradient into its partitions and steps (without the engine's division by the accumulation steps:
        # u is the whole window's update already).
        self.engine.set_gradient_accumulation_boundary(True)
        with whole_parameters(params):
            surrogate = sum((p * u.detach().to(p.dtype)).sum() for p, u in zip(params, update))
            self.engine.backward(surrogate, scale_wrt_gas=False)
        self.engine.step()
