"""The pieces `training.loop.train` is assembled from: clusters, timestep sampler, seed, the weighting's
options, optimizer and LR schedule, the per-task gradient subset, and the engines it refuses.

Each is a plain function of the parsed arguments (and what the loop built before it), so the loop
reads top to bottom and each piece can be tested alone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets

import torch

from .args import UsageError
from .checkpoint import checkpoint_config
from .sharding import engine_kind

logger = logging.getLogger("diffusers_ant")


def pixel_resolution(adapter) -> int:
    """Image side length the data must have: the model's sample size, times the VAE's factor when latent."""
    if adapter.latent:
        return adapter.sample_size * adapter.vae_scale_factor(adapter.vae)
    return adapter.sample_size


def build_intervals(args, noise_scheduler):
    """ANT's interval clustering (Sec. 4.1) over the scheduler's own noise schedule."""
    from ..clustering import TimestepIntervals, cluster_timesteps
    from ..schedule import num_train_timesteps

    num_timesteps = num_train_timesteps(noise_scheduler)
    if args.num_clusters > num_timesteps:
        raise UsageError(f"--num_clusters {args.num_clusters} exceeds the scheduler's {num_timesteps} timesteps")
    if args.num_clusters == 1:
        return TimestepIntervals([(0, num_timesteps - 1)], num_timesteps)
    sizes = {}
    if args.cluster_min_size is not None:
        sizes["min_size"] = args.cluster_min_size
    if args.cluster_max_size is not None:
        sizes["max_size"] = args.cluster_max_size
    affinity = args.affinity_file if args.clustering == "gradient" else None
    return cluster_timesteps(noise_scheduler, args.num_clusters, objective=args.clustering, affinity=affinity,
                             log_snr=not args.raw_snr, **sizes)


def build_sampler(args, intervals, num_timesteps):
    from ..timesteps import IntervalTimestepSampler, StratifiedTimestepSampler, UniformTimestepSampler
    from ..timesteps import FLOW_DENSITY_SCHEMES, FlowMatchingDensitySampler  # flow branch

    if args.weighting_scheme in FLOW_DENSITY_SCHEMES and args.timestep_sampling == "stratified":
        from ..timesteps import StratifiedDensitySampler

        # ANT's equal cluster shares, the density inside each cluster (args.py refuses --timestep_range)
        return StratifiedDensitySampler(intervals, args.weighting_scheme, args.logit_mean, args.logit_std,
                                        args.mode_scale)
    if args.weighting_scheme in FLOW_DENSITY_SCHEMES:  # SD3's timestep density, i.i.d. (clusters assigned after)
        return FlowMatchingDensitySampler(args.weighting_scheme, num_timesteps, args.logit_mean, args.logit_std,
                                          args.mode_scale)
    if args.timestep_range is not None:
        start, end = args.timestep_range
        if not 0 <= start <= end < num_timesteps:
            raise UsageError(f"--timestep_range {start} {end} must satisfy 0 <= START <= END < {num_timesteps}")
        return IntervalTimestepSampler(start, end, num_timesteps)
    if args.timestep_sampling == "stratified":
        return StratifiedTimestepSampler(intervals)
    return UniformTimestepSampler(num_timesteps)


def engine_mode(task_gradients: str, gradient_checkpointing: bool = False) -> str:
    """`TaskGradientEngine`'s mode for `--task_gradients` (`last_layers` is retain_graph on the output layers;
    `auto` is split under gradient checkpointing, which recomputes the layers out of the batched mode's sight)."""
    if task_gradients == "auto":
        return "split" if gradient_checkpointing else "auto"
    return task_gradients if task_gradients in ("split", "batched") else "retain_graph"


def build_task_gradient_engine(adapter, params, task_gradients, task_gradient_subset, lockstep=False,
                               write_update=None, gradient_checkpointing=False):
    """The per-cluster gradient engine of a gradient-based run; a model the batched mode cannot cover is
    refused in one line (or, under `auto`, given the split mode). `lockstep` (FSDP) and `write_update`
    (DeepSpeed): see `sharding.py`."""
    from ..weighting.engine import TaskGradientEngine

    subset, restrict = parameter_subset(adapter, task_gradient_subset, task_gradients)
    try:
        engine = TaskGradientEngine(params, mode=engine_mode(task_gradients, gradient_checkpointing), subset=subset,
                                    restrict_task_backward=restrict, modules=[adapter.model], lockstep=lockstep,
                                    write_update=write_update)
    except ValueError as error:
        if task_gradients != "batched":
            raise
        raise UsageError(f"--task_gradients batched: {error}".replace("mode='split'", "--task_gradients split")) from None
    if task_gradients == "auto":
        reason = engine.auto_reason or ("gradient checkpointing" if engine.mode == "split" else None)
        logger.info("per-cluster gradients (--task_gradients auto): %s mode%s", engine.mode,
                    f" ({reason})" if reason else "")
    return engine


def subset_heuristic_warning(mtl_method: str, task_gradients: str, task_gradient_subset) -> str | None:
    """The start-up warning of PCGrad or CAGrad on a parameter subset's per-cluster gradients (`--task_gradients
    last_layers` or `--task_gradient_subset`), or None: exact on the subset, a heuristic outside it (its
    parameters get sum_i w_i g_i with the subset's weights, not their own projection). LibMTL refuses both
    methods there (`rep_grad`); this trainer runs them, since the subset is what keeps a large model's cost
    manageable, and says so once instead of silently."""
    methods = [m for m in ("pcgrad", "cagrad") if m in str(mtl_method).split("+")]
    if not methods or (task_gradient_subset is None and task_gradients != "last_layers"):
        return None
    where = ("--task_gradients last_layers" if task_gradient_subset is None
             else f"--task_gradient_subset {task_gradient_subset}")
    return (f"{' and '.join(methods)} on the per-cluster gradients of {where}: exact on those parameters, a heuristic "
            "for the rest (they are updated with the subset's weights, not their own projection; LibMTL refuses this "
            "combination). Drop the flag for the exact method on every parameter.")


def parameter_subset(adapter, spec, task_gradients):
    """The task-gradient subset: `--task_gradient_subset` (None = all trainable, `lora`, or comma-separated
    module-name prefixes), or the output-side layers for `--task_gradients last_layers`.

    Returns `(parameters or None, restrict)`: `restrict` lets the task backward passes stop at the
    subset, safe for output layers and LoRA matrices (see `TaskGradientEngine`)."""
    model = adapter.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if spec is None:
        if task_gradients != "last_layers":
            return None, False
        return adapter.output_parameters(), True
    if spec == "lora":
        from .sharding import is_lora_name

        chosen = [p for n, p in named if is_lora_name(n)]
    else:
        prefixes = tuple(x.strip() for x in spec.split(",") if x.strip())
        chosen = [p for n, p in named if n.startswith(prefixes)]
    if not chosen:
        raise UsageError(f"--task_gradient_subset {spec!r} matches no trainable parameter "
                         "(use `lora` with --rank, or module-name prefixes such as `down_blocks.0,mid_block`)")
    return chosen, spec == "lora"


def build_optimizer(args, param_groups, lr):
    """AdamW, or bitsandbytes' 8-bit AdamW with `--use_8bit_adam` (as diffusers' scripts)."""
    kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                  eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes as bnb  # checked in validate_args

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def resolve_seed(args, accelerator, checkpoint) -> int:
    """`--seed`, else the seed of the run being resumed, else a fresh one drawn on process 0.

    A drawn seed is logged and written to `training_config.json` (as `seed`), so any run can be
    repeated; it is the same on every process."""
    if args.seed is not None:
        return args.seed
    if checkpoint is not None:
        saved = checkpoint_config(checkpoint)
        if saved.get("seed") is not None:
            return int(saved["seed"])
    from accelerate.utils import broadcast_object_list

    drawn = [secrets.randbelow(2**31) if accelerator.is_main_process else None]
    broadcast_object_list(drawn)
    logger.info("no --seed given: drew seed %d (recorded in training_config.json)", drawn[0])
    return int(drawn[0])


def method_options(args, updates_per_epoch: int) -> dict:
    """The weighting's options: `--mtl_options`, with its seed derived from the run's seed.

    RLW's draws and PCGrad's task orders then differ between seeds of a sweep and repeat for one seed."""
    from ..weighting import WEIGHTINGS
    from ..weighting.combined import split_combined_name

    options = dict(args.mtl_options_dict)
    pair = split_combined_name(args.mtl_method)  # "uw+pcgrad": the fields of both parts
    names = pair if pair is not None else [args.mtl_method]
    fields = {f.name for name in names for f in dataclasses.fields(WEIGHTINGS[name].config_class)}
    if "seed" in fields:
        options.setdefault("seed", args.seed)
    if "window" in fields and "window" not in options:
        options["window"] = updates_per_epoch  # DWA averages the losses of an epoch (LibMTL, Liu et al.)
    return options


# Where the per-task gradient engine can run: one process, or plain data parallelism (it bypasses
# the model wrapper and all-reduces the task gradients itself).


_ENGINE_DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA",
                             "MULTI_HPU", "MULTI_SDAA")


def check_distributed_support(accelerator, args, weighting) -> None:
    """Refuse configurations that would train wrongly under DeepSpeed / FSDP / other engines.

    * Gradient-based weightings (the combined `uw+pcgrad` form included): on one process and under plain
      data parallelism on any subset; under FSDP2 and DeepSpeed ZeRO-1/2/3 on the LoRA subset only
      (`--task_gradient_subset lora`, every trainable parameter a LoRA matrix, `--task_gradients split`),
      whose gradients are small enough to hold whole on every process (`sharding.py`, "Gradient-based
      methods", `sharding.check_task_gradient_engine`).
    * DeepSpeed (ZeRO-2 / ZeRO-3): vanilla and loss-based weightings, UW included (its log-variances get
      their own optimizer) and gradient accumulation (owned by DeepSpeed); see `deepspeed_support`.
      Refused: a config that disagrees with the flags, and a text-encoder LoRA (outside the engine)."""
    kind = engine_kind(accelerator)
    supported = ", ".join(t.lower() for t in _ENGINE_DISTRIBUTED_TYPES[:3])
    if weighting is not None and weighting.needs_task_gradients and kind in ("FSDP", "DEEPSPEED"):
        from .sharding import check_task_gradient_engine

        check_task_gradient_engine(accelerator, args)
    elif weighting is not None and weighting.needs_task_gradients and kind not in _ENGINE_DISTRIBUTED_TYPES:
        raise UsageError(f"--mtl_method {args.mtl_method} (gradient-based) runs on one process, plain data "
                         f"parallelism ({supported}), FSDP or DeepSpeed, not under {kind}: use a loss-based "
                         "method (ls, rlw, uw, dwa) or `accelerate launch --multi_gpu`")
    if kind == "DEEPSPEED":
        if getattr(args, "train_text_encoder", False):
            raise UsageError("--train_text_encoder is not supported under DeepSpeed (the text encoder's LoRA lies "
                             "outside the engine's model): drop it, or use `accelerate launch --multi_gpu`")
        if getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) is not None:
            from .deepspeed_support import check_deepspeed_config

            check_deepspeed_config(accelerator, args)


def build_lr_scheduler(args, optimizer, num_processes: int):
    """diffusers' `get_scheduler` as its scripts call it (Accelerate steps it once per process), with
    the groups marked `constant_lr` (UW's log-variances) kept at their own learning rate."""
    from diffusers.optimization import get_scheduler

    if args.lr_scheduler == "warmup_stable_decay":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, wsd_factor_function(args, num_processes))
    else:
        scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                  num_warmup_steps=args.lr_warmup_steps * num_processes,
                                  num_training_steps=args.max_train_steps * num_processes,
                                  num_cycles=args.lr_num_cycles, power=args.lr_power)
    constant_lr_groups(scheduler, optimizer)
    return scheduler


def wsd_factor_function(args, num_processes: int):
    """The factor of `--lr_scheduler warmup_stable_decay` at each scheduler step (Hu et al. 2024, MiniCPM's
    warmup-stable-decay): linear warm-up, constant, then `--lr_decay_steps` of half-cosine decay to
    `--lr_min_ratio`, held there.

    transformers' `get_wsd_schedule` computes the stable and decay phases; its warm-up is not used
    because it starts at `min_lr_ratio` instead of 0, so a WSD run would differ from a constant_with_warmup
    run from its first step, and a cool-down could not branch off a constant-rate checkpoint exactly (the
    point of the schedule). The warm-up here is diffusers' (`step / warmup`), as constant_with_warmup's."""
    warmup = args.lr_warmup_steps
    stable = args.lr_stable_steps if args.lr_stable_steps is not None else args.max_train_steps - warmup - args.lr_decay_steps
    if stable < 0:
        raise ValueError(f"--lr_warmup_steps {warmup} + --lr_decay_steps {args.lr_decay_steps} exceed --max_train_steps "
                         f"{args.max_train_steps}: shorten the cool-down or give --lr_stable_steps")
    return functools.partial(_wsd_factor, num_warmup_steps=warmup * num_processes,
                             num_stable_steps=stable * num_processes, num_decay_steps=args.lr_decay_steps * num_processes,
                             min_lr_ratio=args.lr_min_ratio)


def _wsd_factor(step: int, *, num_warmup_steps: int, num_stable_steps: int, num_decay_steps: int, min_lr_ratio: float):
    from transformers.optimization import _get_wsd_scheduler_lambda

    if step < num_warmup_steps:
        return step / num_warmup_steps
    return _get_wsd_scheduler_lambda(step, num_warmup_steps=num_warmup_steps, num_stable_steps=num_stable_steps,
                                     num_decay_steps=num_decay_steps, warmup_type="linear", decay_type="cosine",
                                     min_lr_ratio=min_lr_ratio, num_cycles=0.5)


def lr_factors(config: dict, num_steps: int, num_processes: int = 1) -> list:
    """The learning-rate factor of the run configured by `config` (a run's saved flags) before each of its
    first `num_steps` updates, as `build_lr_scheduler` sets it; for comparing two schedules."""
    import argparse

    defaults = {"lr_scheduler": "constant", "lr_warmup_steps": 0, "lr_num_cycles": 1, "lr_power": 1.0,
                "lr_decay_steps": None, "lr_stable_steps": None, "lr_min_ratio": 0.0, "max_train_steps": num_steps}
    args = argparse.Namespace(**{key: default if config.get(key) is None else config[key]
                                 for key, default in defaults.items()})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = build_lr_scheduler(args, optimizer, num_processes).lr_lambdas[0]
    return [factor(step * num_processes) for step in range(num_steps)]


def constant_lr_groups(lr_scheduler, optimizer) -> None:
    """Keep the learning rate of parameter groups marked `constant_lr` (UW's log-variances) fixed.

    ANT trains UW's log-variances at a constant lr 0.025; diffusers' schedulers are `LambdaLR`s that
    apply one factor to every group, so the factor of the marked groups is replaced by 1."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    for index, group in enumerate(optimizer.param_groups):
        if group.get("constant_lr") and lambdas is not None:
            lambdas[index] = _constant_factor
            group["lr"] = group["initial_lr"]  # the scheduler already applied its step-0 factor (0 in warm-up)


def _constant_factor(_step):
    return 1.0
