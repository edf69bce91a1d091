"""The Accelerate training loop behind `train_scripts/train_ant.py`.

Read it top to bottom like nanoGPT's train.py: set-up, the loop, the outputs. Model-type details
live in `diffusers_ant.models` (one adapter per type), data in `diffusers_ant.data`, the step's
objective and weighting in `training.step`, checkpoints in `training.checkpoint`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import secrets

import torch
from tqdm.auto import tqdm

from ..weighting.distributed import average_gradients_
from .args import UsageError
from .checkpoint import (
    check_resume_config,
    checkpoint_config,
    load_checkpoint,
    register_trainable_state_hooks,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_checkpoint,
)
from .precision import cast_frozen_parameters, current_loss_scale, lift_to_float32, sampling_precision
from .step import DiffusionObjective, training_step

logger = logging.getLogger("diffusers_ant")

def public_config(args) -> dict:
    """The run's configuration as it may be written into the output folder (which may be pushed): no
    secret (the Hub token is never written, logged or carded) and no absolute path of this machine
    (paths become relative to the output folder, see `hub.portable_config`)."""
    from ..hub import drop_secrets, portable_config

    return dict(sorted(portable_config(drop_secrets(vars(args)), args.output_dir).items()))


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

    if args.weighting_scheme in FLOW_DENSITY_SCHEMES:  # SD3's timestep density (args.py refuses stratified / range)
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


def build_sources(args, intervals, num_timesteps, sampler):
    """The sources of a batch (`training.step.Source`): the data alone, or Diff-Tuning's two, or DeMe's interval.

    * Diff-Tuning (Zhong et al., NeurIPS 2024, Sec. 4): the downstream data ("reconsolidation") draws
      t with probability proportional to (t + 1)^b, favouring high noise; the retention samples
      (knowledge-bank images, or downstream images with the frozen model's prediction as target in
      the distillation variant) draw t proportional to (T - t)^a, favouring low noise, and their loss
      is weighted by lambda (`--bank_weight`). Bank images train the unconditional branch (null class,
      empty prompt) as the authors do, unless `--bank_keep_prompts`.
    * DeMe (Sec. 3): the data draws t in interval i, or in the whole range with probability
      `--deme_global_prob`, and adds the consistency loss against the frozen pretrained model."""
    from ..diff_tuning import reconsolidation_sampler, retention_sampler
    from ..timesteps import IntervalTimestepSampler
    from .step import Source

    if args.diff_tuning:
        reconsolidation = reconsolidation_sampler(num_timesteps, args.reconsolidation_exponent)
        retention = retention_sampler(num_timesteps, args.retention_exponent)
        data = Source("data", reconsolidation)
        if args.retention == "kd":
            return [data, Source("retention", retention, weight=args.bank_weight, target="teacher")]
        return [data, Source("bank", retention, weight=args.bank_weight, null_condition=not args.bank_keep_prompts)]
    if args.deme_interval is not None:
        start, end = intervals.bounds[args.deme_interval]
        interval = IntervalTimestepSampler(start, end, num_timesteps, p_full=args.deme_global_prob,
                                           per_batch=args.deme_sampling == "per_batch")
        return [Source("data", interval, consistency=args.consistency_weight)]
    return [Source("data", sampler)]


def knowledge_bank_dataloader(args, adapter, needs: dict, rows: int):
    """The loader of Diff-Tuning's knowledge bank: `rows` bank images per micro-batch, read like the data
    (same resolution, transforms, `--max_train_samples`), after checking the bank fits the model."""
    from ..data import make_train_dataloader, resolve_columns
    from ..diff_tuning import check_bank_compatible, load_knowledge_bank

    bank, manifest = load_knowledge_bank(args.knowledge_bank)
    check_bank_compatible(manifest, model_type=args.model_type, resolution=pixel_resolution(adapter),
                          channels=adapter.num_channels)
    recorded = manifest.get("columns") or {}
    columns = resolve_columns(bank, image_column=recorded.get("image_column"),
                              caption_column=recorded.get("caption_column"),
                              conditioning_image_column=recorded.get("conditioning_image_column"),
                              class_column=recorded.get("class_column"),
                              need_captions=needs["need_captions"] and args.bank_keep_prompts,
                              need_conditioning=needs["need_conditioning"],
                              classes_if_present=args.model_type in ("unet", "dit"))
    return make_train_dataloader(
        bank, columns, resolution=pixel_resolution(adapter), batch_size=rows, num_channels=adapter.num_channels,
        tokenizer=adapter.tokenizer, seed=args.seed + 1, num_workers=args.dataloader_num_workers,
        center_crop=args.center_crop, random_flip=args.random_flip, max_samples=args.max_train_samples,
        interpolation=args.image_interpolation_mode)


def retention_rows(args) -> int:
    """Rows of each micro-batch given to Diff-Tuning's retention source (0 without Diff-Tuning)."""
    return round(args.train_batch_size * args.bank_fraction) if args.diff_tuning else 0


def compose_sources(args, batch: dict, bank_batches) -> dict:
    """A micro-batch as its sources' rows: `data` and `bank` (a bank batch), or `data` and `retention`
    (the micro-batch's last rows, for distillation), or the plain batch."""
    if not args.diff_tuning:
        return batch
    if args.retention == "bank":
        return {"data": batch, "bank": next(bank_batches)}
    keep = len(batch["pixel_values"]) - retention_rows(args)
    return {"data": {k: v[:keep] for k, v in batch.items()}, "retention": {k: v[keep:] for k, v in batch.items()}}


def cycle_batches(accelerator, loader, consumed: int):
    """Batches of `loader` forever, epoch after epoch, starting after the first `consumed` ones.

    The position is a pure function of the count, so a resumed run continues the bank exactly where
    the interrupted one was (with the same seeded per-epoch order)."""
    per_epoch = len(loader)
    epoch, skip = divmod(consumed, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for batch in (accelerator.skip_first_batches(loader, skip) if skip else loader):
            yield batch
        epoch, skip = epoch + 1, 0


def data_needs(args) -> dict:
    """Which dataset columns the model type needs (captions, conditioning images, classes)."""
    return {"need_captions": args.model_type in ("sd", "controlnet"),
            "need_conditioning": args.model_type == "controlnet",
            "need_classes": args.model_type in ("unet", "dit") and (args.num_classes is not None
                                                                    or args.class_column is not None),
            # a DiT has a null class: class-conditional on labelled data, unconditional otherwise
            "classes_if_present": args.model_type == "dit"}


def pixel_resolution(adapter) -> int:
    """Image side length the data must have: the model's sample size, times the VAE's factor when latent."""
    if adapter.latent:
        return adapter.sample_size * adapter.vae_scale_factor(adapter.vae)
    return adapter.sample_size


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
        chosen = [p for n, p in named if "lora_" in n]
    else:
        prefixes = tuple(x.strip() for x in spec.split(",") if x.strip())
        chosen = [p for n, p in named if n.startswith(prefixes)]
    if not chosen:
        raise UsageError(f"--task_gradient_subset {spec!r} matches no trainable parameter "
                         "(use `lora` with --rank, or module-name prefixes such as `down_blocks.0,mid_block`)")
    return chosen, spec == "lora"


def default_validation_inputs(args, dataset, columns) -> dict:
    """Prompts / conditioning images for validation: the flags, else the first training examples.

    `--validation_prompt` and `--validation_image` may each give several values, paired in order (one of
    either is repeated for all); the pairs are cycled over `--num_validation_images`."""
    from PIL import Image

    from ..models.base import repeat_to

    n = args.num_validation_images
    inputs = {}
    if args.model_type in ("sd", "controlnet"):
        prompts = args.validation_prompt or [dataset[i % len(dataset)][columns["caption_column"]] for i in range(n)]
        inputs["prompts"] = repeat_to(list(prompts), n)
    if args.model_type == "controlnet":
        if args.validation_image:
            images = [Image.open(path).convert("RGB") for path in args.validation_image]
        else:
            images = [dataset[i % len(dataset)][columns["conditioning_image_column"]].convert("RGB") for i in range(n)]
        inputs["conditioning_images"] = repeat_to(images, n)
    return inputs


def build_optimizer(args, param_groups, lr):
    """AdamW, or bitsandbytes' 8-bit AdamW with `--use_8bit_adam` (as diffusers' scripts)."""
    kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                  eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes as bnb  # checked in validate_args

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def windows(batches, size: int):
    """Group consecutive micro-batches into gradient-accumulation windows of `size` (the last may be shorter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


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

    options = dict(args.mtl_options_dict)
    fields = {f.name for f in dataclasses.fields(WEIGHTINGS[args.mtl_method].config_class)}
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

    * Gradient-based weightings write `.grad` through the unwrapped module: under DeepSpeed the
      parameters would never change, under FSDP the module is sharded. Only single-process and
      plain data-parallel runs are supported.
    * DeepSpeed steps inside `backward()`: a gradient-accumulation window of several chunks would
      step several times, and its optimizer would own UW's log-variances. Vanilla and parameter-free
      loss-based weightings with `--gradient_accumulation_steps 1` only."""
    kind = accelerator.distributed_type.name if hasattr(accelerator.distributed_type, "name") else str(accelerator.distributed_type)
    supported = ", ".join(t.lower() for t in _ENGINE_DISTRIBUTED_TYPES[:3])
    if weighting is not None and weighting.needs_task_gradients and kind not in _ENGINE_DISTRIBUTED_TYPES:
        raise UsageError(f"--mtl_method {args.mtl_method} (gradient-based) runs on one process or plain data "
                         f"parallelism ({supported}), not under {kind}: use a loss-based method (ls, rlw, uw, dwa) "
                         "or `accelerate launch --multi_gpu`")
    if kind == "DEEPSPEED":
        if args.gradient_accumulation_steps > 1:
            raise UsageError("under DeepSpeed use --gradient_accumulation_steps 1 (DeepSpeed steps inside backward, "
                             "and this trainer accumulates a window of micro-batches itself)")
        if weighting is not None and any(True for _ in weighting.parameters()):
            raise UsageError(f"--mtl_method {args.mtl_method} has learnable parameters that DeepSpeed's optimizer "
                             "cannot own: use ls, rlw or dwa, or plain data parallelism")


def build_lr_scheduler(args, optimizer, num_processes: int):
    """diffusers' `get_scheduler` as its scripts call it (Accelerate steps it once per process), with
    the groups marked `constant_lr` (UW's log-variances) kept at their own learning rate."""
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                              num_warmup_steps=args.lr_warmup_steps * num_processes,
                              num_training_steps=args.max_train_steps * num_processes,
                              num_cycles=args.lr_num_cycles, power=args.lr_power)
    constant_lr_groups(scheduler, optimizer)
    return scheduler


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


def train(args) -> str:
    """Train as `args` says; returns the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.training_utils import EMAModel

    from ..data import class_names, dataset_image_channels, load_training_dataset, make_train_dataloader, resolve_columns
    from ..models import get_model_adapter
    from ..schedule import num_train_timesteps
    from ..weighting import get_weighting

    # ---------------------------------------------------------------- set-up
    accelerator = Accelerator(
        # Without a GPU, `accelerate launch --multi_gpu` starts several processes but Accelerate only
        # forms the gloo process group (MULTI_CPU) when told to use the CPU; otherwise each process
        # would train alone.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        # Gradient accumulation is done by the training step itself, over a window of micro-batches
        # (`training.step`), so that weights are chosen once per optimizer update: Accelerate sees
        # one optimizer step per window.
        gradient_accumulation_steps=1,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    args.seed = resolve_seed(args, accelerator, checkpoint)
    if checkpoint is not None:
        # Before any model or data is loaded: a resumed run must continue the run it resumes.
        for change in check_resume_config(checkpoint_config(checkpoint), public_config(args), checkpoint):
            logger.info("resuming with a changed setting, %s", change)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_stale_temporaries(args.output_dir)

    # Data first: a model trained from scratch takes its channel and class counts from it.
    dataset = load_training_dataset(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
                                    dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir)
    needs = data_needs(args)
    columns = resolve_columns(dataset, image_column=args.image_column, caption_column=args.caption_column,
                              conditioning_image_column=args.conditioning_image_column,
                              class_column=args.class_column, **needs)
    num_classes = args.num_classes
    if num_classes is None and columns["class_column"] is not None:
        num_classes = len(class_names(dataset, columns["class_column"]))
    from_scratch = args.model_config_name_or_path is not None and args.model_type in ("unet", "dit")
    adapter = get_model_adapter(args.model_type).load(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        model_config_name_or_path=args.model_config_name_or_path,
        controlnet_model_name_or_path=args.controlnet_model_name_or_path,
        resolution=args.resolution, num_classes=num_classes, prediction_type=args.prediction_type,
        revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
        # From scratch the model is built for the data's channels; a pretrained model keeps its own and
        # the images are converted to them (greyscale -> RGB), as diffusers' scripts do.
        num_channels=dataset_image_channels(dataset, columns["image_column"]) if from_scratch else None,
        noise_scheduler=args.noise_scheduler, flow_shift=args.flow_shift,  # flow matching
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    teacher = None
    if args.retention == "kd" or args.deme_interval is not None:
        # The frozen pretrained denoiser, copied before LoRA or projections change the student.
        from ..teacher import FrozenTeacher

        teacher = FrozenTeacher(adapter, weight_dtype, autocast=accelerator.autocast).to(accelerator.device)
    if args.rank is not None:
        adapter.add_lora(args.rank, alpha=args.lora_alpha)
    if args.train_text_encoder:
        adapter.add_text_encoder_lora(args.rank, alpha=args.lora_alpha)
    from ..peft_modes import apply_finetune_mode

    finetune = apply_finetune_mode(adapter.model, args.finetune)  # BitFit / DiffFit choose what trains
    logger.info("%s", finetune.description)
    if args.channel_projection:
        from ..deme import add_channel_projection

        add_channel_projection(adapter.model)  # DeMe's channel mixing after each block, identity at first
    if args.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        adapter.model.enable_xformers_memory_efficient_attention()
    adapter.to(accelerator.device, weight_dtype)  # frozen parts (VAE, text encoder) in the low precision
    cast_frozen_parameters(adapter.model, weight_dtype)  # and a LoRA run's frozen base weights
    noise_scheduler = adapter.noise_scheduler
    num_timesteps = num_train_timesteps(noise_scheduler)

    intervals = build_intervals(args, noise_scheduler)
    sampler = build_sampler(args, intervals, num_timesteps)
    objective = DiffusionObjective(adapter, noise_scheduler, sampler, intervals, prediction_type=args.prediction_type,
                                   loss_weighting=args.loss_weighting, snr_gamma=args.snr_gamma,
                                   p2_k=args.p2_k, p2_gamma=args.p2_gamma, noise_offset=args.noise_offset,
                                   weighting_scheme=args.weighting_scheme,  # SD3's loss weight (flow matching)
                                   sources=build_sources(args, intervals, num_timesteps, sampler), teacher=teacher)
    num_tasks = objective.num_tasks  # (source, cluster) pairs

    bank_rows = retention_rows(args) if args.retention == "bank" else 0  # bank rows come from their own loader
    train_dataloader = make_train_dataloader(
        dataset, columns, resolution=pixel_resolution(adapter), batch_size=args.train_batch_size - bank_rows,
        num_channels=adapter.num_channels, tokenizer=adapter.tokenizer, seed=args.seed,
        num_workers=args.dataloader_num_workers, center_crop=args.center_crop, random_flip=args.random_flip,
        max_samples=args.max_train_samples, interpolation=args.image_interpolation_mode,
        proportion_empty_prompts=args.proportion_empty_prompts)
    validation_inputs = default_validation_inputs(args, dataset, columns)
    bank_dataloader = None
    if args.retention == "bank":
        bank_dataloader = knowledge_bank_dataloader(args, adapter, needs, bank_rows)

    # Optimizer updates per epoch: the loader yields this process's share of the batches, grouped
    # into windows of --gradient_accumulation_steps micro-batches (the last window may be shorter).
    updates_per_epoch = math.ceil(math.ceil(len(train_dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)

    weighting = None
    if args.mtl_method != "none":
        weighting = get_weighting(args.mtl_method, num_tasks, **method_options(args, updates_per_epoch)).to(accelerator.device)
    check_distributed_support(accelerator, args, weighting)

    params = adapter.trainable_parameters()
    extra_params = [p for module in adapter.extra_trainable_modules().values() for p in module.parameters()
                    if p.requires_grad]
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    param_groups = [{"params": params}]
    if weighting is not None and hasattr(weighting, "param_groups"):
        # UW's log-variances: their own learning rate and no weight decay (ANT's setting).
        param_groups += weighting.param_groups()
    optimizer = build_optimizer(args, param_groups, lr)
    lr_scheduler = build_lr_scheduler(args, optimizer, accelerator.num_processes)

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(adapter.model, optimizer, train_dataloader, lr_scheduler)
    if bank_dataloader is not None:
        bank_dataloader = accelerator.prepare(bank_dataloader)  # each process reads its own shard of the bank
    # LoRA and other partial fine-tuning: checkpoints hold the trainable parameters only, not the frozen base.
    register_trainable_state_hooks(accelerator, adapter.model)
    ema = None
    if args.use_ema:
        ema = EMAModel(params, decay=args.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=args.ema_inv_gamma, power=args.ema_power, foreach=args.foreach_ema)
    engine = None
    if weighting is not None and weighting.needs_task_gradients:
        from ..weighting.engine import TaskGradientEngine

        subset, restrict = parameter_subset(adapter, args.task_gradient_subset, args.task_gradients)
        engine = TaskGradientEngine(params, mode="split" if args.task_gradients == "split" else "retain_graph",
                                    subset=subset, restrict_task_backward=restrict)
    # One generator draws every random number of a step (latents, label dropout, timesteps, noise);
    # each process has its own stream.
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)

    if accelerator.is_main_process:
        published_config = public_config(args)
        tracker_config = {k: v for k, v in published_config.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
        intervals.save(os.path.join(args.output_dir, "timestep_intervals.json"))
        with open(os.path.join(args.output_dir, "training_config.json"), "w") as f:
            json.dump(published_config, f, indent=2)
        if weighting is not None:
            with open(os.path.join(args.output_dir, "weighting_config.json"), "w") as f:
                json.dump({"name": args.mtl_method, **weighting.config.to_dict()}, f, indent=2)
    logger.info("timestep clusters (%s): %s", args.clustering, intervals.bounds)

    tracker = None
    if args.track_convergence and accelerator.is_main_process:
        from ..diff_tuning import ConvergenceTracker

        tracker = ConvergenceTracker(args.convergence_threshold, every=args.convergence_steps,
                                     extractor=args.condition_extractor, distance=args.convergence_distance,
                                     output_dir=args.output_dir)

    def trainer_state(step):
        return {"global_step": step, "generator": generator.get_state(),
                "convergence": tracker.state_dict() if tracker is not None else None,
                "extra_trainable": adapter.extra_trainable_state(),
                "ema": ema.state_dict() if ema is not None else None,
                "weighting": weighting.state_dict() if weighting is not None else None,
                "config": public_config(args)}

    global_step = 0
    if args.resume_from_checkpoint is not None and checkpoint is None:
        accelerator.print(f"no checkpoint in {args.output_dir}: starting a new run")
    if checkpoint is not None:
        accelerator.print(f"resuming from {checkpoint}")
        state = load_checkpoint(accelerator, checkpoint)
        global_step = int(state["global_step"])
        generator.set_state(state["generator"])
        if ema is not None:
            if state["ema"] is None:
                raise ValueError(f"{checkpoint} was saved without --use_ema; resume without it or start a new run")
            restore_ema(ema, state["ema"], ema_home(args, accelerator))
        if weighting is not None:
            weighting.load_state_dict(state["weighting"])
        adapter.load_extra_trainable_state(state.get("extra_trainable") or {})
        if tracker is not None and state.get("convergence"):
            tracker.load_state_dict(state["convergence"])
    elif ema is not None:
        ema.to(ema_home(args, accelerator))

    # ---------------------------------------------------------------- the loop
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    # The bank is read as one endless stream beside the data, one bank batch per data micro-batch.
    bank_batches = None
    if bank_dataloader is not None:
        bank_batches = cycle_batches(accelerator, bank_dataloader, first_epoch * len(train_dataloader) + skip_batches)
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    model.train()
    for epoch in range(first_epoch, num_epochs):
        # Seeded per-epoch shuffle: the data order depends on (seed, epoch) only, so a resumed run
        # skips exactly the batches the interrupted one had used.
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for window in windows(batches, args.gradient_accumulation_steps):
            window = [compose_sources(args, batch, bank_batches) for batch in window]
            # fp16: the GradScaler may skip this update (overflow); the weighting's state is then
            # put back, so no method advances on a step that did not happen.
            scaler = accelerator.scaler
            snapshot = weighting_snapshot(weighting) if scaler is not None and weighting is not None else None
            logs = training_step(accelerator, objective, model, window, generator, num_tasks, weighting=weighting,
                                 engine=engine, loss_scale=current_loss_scale(scaler, accelerator.device))
            if extra_params and not (weighting is not None and weighting.needs_task_gradients):
                average_gradients_(extra_params)  # DDP averaged the model's gradients, not these
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            skipped = accelerator.optimizer_step_was_skipped
            if skipped and snapshot is not None:
                restore_weighting(weighting, snapshot)

            # ---- one optimizer update done
            if ema is not None and not skipped:
                step_ema(args, accelerator, ema, params)
            global_step += 1
            progress.update(1)
            record = {"loss": logs["loss"].item(), "lr": lr_scheduler.get_last_lr()[0]}
            if skipped:
                record["skipped_step"] = 1
            for i in range(num_tasks):
                if logs["counts"][i] > 0:
                    record[f"task_loss/{i}"] = logs["task_losses"][i].item()
                if logs["weights"] is not None:
                    record[f"task_weight/{i}"] = logs["weights"][i].item()
            progress.set_postfix(loss=f"{record['loss']:.4f}",
                                 w=None if logs["weights"] is None else " ".join(f"{w:.2f}" for w in logs["weights"].tolist()))
            accelerator.log(record, step=global_step)

            if tracker is not None and tracker.should_check(global_step):  # before the checkpoint, which records it
                check_convergence(args, accelerator, adapter, model, tracker, global_step, validation_inputs)
            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                path = save_checkpoint(accelerator, args.output_dir, global_step, trainer_state(global_step),
                                       args.checkpoints_total_limit)
                accelerator.print(f"saved {path}")
            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                validate(args, accelerator, adapter, model, ema, params, global_step, validation_inputs)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
        if args.validation_epochs and (epoch + 1) % args.validation_epochs == 0:
            validate(args, accelerator, adapter, model, ema, params, global_step, validation_inputs)
    progress.close()

    # ---------------------------------------------------------------- outputs
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(args, accelerator, adapter, model, ema, params, intervals, global_step, validation_inputs, objective,
               finetune)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return args.output_dir


def ema_home(args, accelerator):
    """Where the EMA weights live between updates: the training device, or the CPU with `--offload_ema`."""
    return torch.device("cpu") if args.offload_ema else accelerator.device


def step_ema(args, accelerator, ema, params) -> None:
    """One EMA update; with `--offload_ema` the weights visit the device for it, as in diffusers' scripts."""
    if args.offload_ema and accelerator.device.type != "cpu":
        ema.to(accelerator.device, non_blocking=True)
        ema.step(params)
        ema.to("cpu", non_blocking=True)
    else:
        ema.step(params)


def restore_ema(ema, state: dict, device) -> None:
    """Load EMA's state, THEN move it to `device`: the loaded shadow weights live where they were read
    (the CPU), so moving first would leave them there (diffusers' scripts load, then move)."""
    ema.load_state_dict(state)
    ema.to(device)


def weighting_snapshot(weighting) -> dict:
    """A copy of the weighting's whole state (buffers, parameters, extra state, `last_weights`)."""
    return {"state": copy.deepcopy(weighting.state_dict()), "last_weights": weighting.last_weights.detach().clone()}


def restore_weighting(weighting, snapshot: dict) -> None:
    weighting.load_state_dict(snapshot["state"])
    weighting.last_weights = snapshot["last_weights"]


@contextlib.contextmanager
def _ema_weights(ema, params):
    """The EMA weights in place of the trained ones inside the block (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def validate(args, accelerator, adapter, model, ema, params, step, inputs):
    """Sample a grid with the (EMA) weights, save it under samples/ and send it to the trackers."""
    if not accelerator.is_main_process:
        return None
    from .validation import log_and_save_samples

    with _ema_weights(ema, params), sampling_precision(accelerator, adapter):
        return log_and_save_samples(args, accelerator, adapter, accelerator.unwrap_model(model), step, inputs)


def check_convergence(args, accelerator, adapter, model, tracker, step, inputs) -> None:
    """ControlNet's sudden convergence (Zhang et al. 2023; measured as Diff-Tuning does): sample the
    validation conditions with the current weights, re-extract the condition, log the distance."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    with torch.no_grad(), sampling_precision(accelerator, adapter):
        records = tracker.evaluate(step, adapter, adapter.make_pipeline(unwrapped), inputs["conditioning_images"],
                                   prompts=inputs.get("prompts"), seed=args.seed,
                                   num_inference_steps=args.num_inference_steps, scheduler="ddim",
                                   guidance_scale=args.guidance_scale)
    unwrapped.train(was_training)
    accelerator.log(records, step=step)


def save_output(args, adapter, model) -> None:
    """Write the trained model: DiffFit's scales folded into the weights they scale (exact, so plain
    diffusers loads the result), DeMe's channel projections beside diffusers' files."""
    from ..deme import save_adapter_output
    from ..peft_modes import difffit_merged_copy, has_difffit_scales

    if has_difffit_scales(model):
        model = difffit_merged_copy(model)
    save_adapter_output(adapter, args.output_dir, model, lora=args.rank is not None)


def finish(args, accelerator, adapter, model, ema, params, intervals, global_step, validation_inputs, objective,
           finetune):
    """Save the pipeline (or LoRA weights), samples, model card; push to the Hub if asked."""
    from ..hub import push_to_hub, training_summary, write_model_card

    unwrapped = accelerator.unwrap_model(model)
    # The saved pipeline holds float32 frozen parts (and base weights), whatever precision training used.
    lift_to_float32([*adapter.frozen_modules().values(), unwrapped])
    with _ema_weights(ema, params):
        save_output(args, adapter, unwrapped)
        images, _ = validate(args, accelerator, adapter, model, None, params, global_step, validation_inputs)
    summary = training_summary(args, intervals, global_step, pixel_resolution(adapter))
    card = {}
    if args.diff_tuning:
        from ..diff_tuning.card import TEMPLATE, card_values

        manifest = None
        if args.knowledge_bank is not None:
            from ..diff_tuning import read_bank_manifest

            manifest = read_bank_manifest(args.knowledge_bank)
        card = dict(template=TEMPLATE, template_values=card_values(args, finetune, objective.task_names(),
                                                                   args.output_dir, manifest))
    write_model_card(args.output_dir, repo_id=args.hub_model_id, base_model=args.pretrained_model_name_or_path,
                     model_type=args.model_type, method_summary=summary, dataset_name=args.dataset_name,
                     images=images, lora=args.rank is not None, **card)
    if args.push_to_hub:
        url = push_to_hub(args.output_dir, args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                          token=args.hub_token, private=args.hub_private_repo)
        accelerator.print(f"pushed to {url}")
