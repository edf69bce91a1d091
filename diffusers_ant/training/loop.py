"""The Accelerate training loop behind `train_scripts/train_ant.py`.

Read it top to bottom like nanoGPT's train.py: set-up, the loop, the outputs. Model-type details
live in `diffusers_ant.models` (one adapter per type), data in `diffusers_ant.data`, the pieces of the
set-up in `training.components`, the sources of a batch (Diff-Tuning, DeMe) in `training.sources`,
one optimizer step's objective and weighting in `training.step`, mixed precision in
`training.precision`, EMA in `training.ema`, checkpoints in `training.checkpoint`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os

import torch
from tqdm.auto import tqdm

from ..weighting.distributed import average_gradients_
from . import memory_report
from .args import TEXT_TO_IMAGE_TYPES, UsageError
from .checkpoint import (
    LR_SCHEDULE_FLAGS,
    SCHEDULE_LENGTH_FLAGS,
    check_resume_config,
    check_resume_engine,
    checkpoint_config,
    engine_record,
    load_checkpoint,
    local_paths,
    register_trainable_state_hooks,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_checkpoint,
    warn_of_later_checkpoints,
)
from .checkpoint_pickles import check_checkpoint_pickles
from .components import (
    build_intervals,
    build_lr_scheduler,
    build_optimizer,
    build_sampler,
    build_task_gradient_engine,
    subset_heuristic_warning,
    check_distributed_support,
    method_options,
    pixel_resolution,
    resolve_seed,
)
from .deepspeed_support import (
    accelerator_options,
    cast_inputs_to_parameter_dtype,
    check_checkpoint_engine,
    configure_plugin,
    deepspeed_launched,
    is_deepspeed,
    zero_init_disabled,
)
from .ema import ema_home, ema_state, ema_weights, make_ema, restore_ema, step_ema
from .fsdp import (
    check_cpu_fsdp_launch,
    check_fsdp_support,
    check_fsdp_wrapping,
    enable_fsdp_on_cpu,
    is_fsdp,
    sharded_like,
)
from .fsdp import clip_grad_norm_ as fsdp_clip_grad_norm_
from .precision import cast_frozen_parameters, current_loss_scale, lift_to_float32, sampling_precision
from .sharding import (DeepSpeedUpdate, check_lora_only, check_task_gradient_launch, gather_persistent_lora,
                       keep_lora_whole, keep_lora_whole_zero3, meta_skeleton,
                       weighting_optimizer, whole_model, zero_stage)
from .sources import build_sources, compose_sources, cycle_batches, knowledge_bank_dataloader, retention_rows
from .step import DiffusionObjective, training_step

logger = logging.getLogger("diffusers_ant")

def public_config(args) -> dict:
    """The run's configuration as it may be written into the output folder (which may be pushed): no
    secret (the Hub token is never written, logged or carded) and no absolute path of this machine
    (paths become relative to the output folder, see `hub.portable_config`)."""
    from ..hub import drop_secrets, portable_config

    public = {k: v for k, v in vars(args).items() if not k.startswith("_")}  # (private bookkeeping stays out)
    return dict(sorted(portable_config(drop_secrets(public), args.output_dir).items()))


def run_local_paths(args) -> dict:
    """The run's flags that name local files or folders, as fingerprints of their absolute paths
    (`checkpoint.local_paths`): the checkpoint keeps them for the resume check."""
    from ..hub import drop_secrets

    return local_paths(drop_secrets({k: v for k, v in vars(args).items() if not k.startswith("_")}), args.output_dir)


def adopt_recorded_defaults(args, recorded: dict) -> list:
    """A resumed run keeps the checkpoint's value of each flag the user left at a default that has changed since
    (`args.DEFAULTS_CHANGED`): the run continues as it began, and the resume check does not refuse it. Returns
    the '--flag: value' lines adopted."""
    from .args import BUCKET_STEP_OF_ONE_PATCH

    adopted = []
    defaulted = getattr(args, "_defaulted", ())
    for name in sorted(defaulted):
        if name in recorded and recorded[name] != getattr(args, name):
            setattr(args, name, recorded[name])
            adopted.append(f"--{name}: {recorded[name]!r} (the checkpoint's; the default is now another)")
    if "bucket_step" in defaulted and recorded.get("aspect_ratio_buckets") and "bucket_step" not in recorded:
        # (written before the flag existed, when the buckets stepped by one latent patch)
        args.bucket_step = BUCKET_STEP_OF_ONE_PATCH
        adopted.append("--bucket_step: one latent patch (the checkpoint's buckets; the default is now 64 pixels)")
    return adopted


def data_needs(args) -> dict:
    """Which dataset columns the model type needs (captions, conditioning images, classes)."""
    return {"need_captions": args.model_type in TEXT_TO_IMAGE_TYPES,
            "need_conditioning": args.model_type == "controlnet",
            "need_classes": args.model_type in ("unet", "dit") and (args.num_classes is not None
                                                                    or args.class_column is not None),
            # a DiT has a null class: class-conditional on labelled data, unconditional otherwise
            "classes_if_present": args.model_type == "dit"}


def default_validation_inputs(args, dataset, columns) -> dict:
    """Prompts / conditioning images for validation: the flags, else the first training examples.

    `--validation_prompt` and `--validation_image` may each give several values, paired in order (one of
    either is repeated for all); the pairs are cycled over `--num_validation_images`."""
    from PIL import Image

    from ..data import first_caption
    from ..models.base import repeat_to

    n = args.num_validation_images
    inputs = {}
    if args.model_type in TEXT_TO_IMAGE_TYPES:
        prompts = args.validation_prompt or [first_caption(dataset[i % len(dataset)][columns["caption_column"]])
                                             for i in range(n)]
        inputs["prompts"] = repeat_to(list(prompts), n)
    if args.model_type == "controlnet":
        if args.validation_image:
            images = [Image.open(path).convert("RGB") for path in args.validation_image]
        else:
            images = [dataset[i % len(dataset)][columns["conditioning_image_column"]].convert("RGB") for i in range(n)]
        inputs["conditioning_images"] = repeat_to(images, n)
    return inputs


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


def train(args) -> str:
    """Train as `args` says; returns the output folder."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    # ---------------------------------------------------------------- set-up
    check_cpu_fsdp_launch()  # an FSDP launch Accelerate's plugin would refuse on a CPU: one line, not a traceback
    engine_options = {
        # Without a GPU, `accelerate launch --multi_gpu` starts several processes but Accelerate only
        # forms the gloo process group (MULTI_CPU) when told to use the CPU; otherwise each process
        # would train alone.
        "cpu": not device_backend_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        # Gradient accumulation is done by the training step itself, over a window of micro-batches
        # (`training.step`), so that weights are chosen once per optimizer update: Accelerate sees
        # one optimizer step per window.
        "gradient_accumulation_steps": 1,
    }
    if deepspeed_launched():  # gloo without cpu=True, DeepSpeed's accumulation (training/deepspeed_support.py)
        engine_options.update(accelerator_options(args.gradient_accumulation_steps))
    # --ddp_timeout (args.py says why). Accelerate passes on only the fields that differ from the handler's
    # defaults (`to_kwargs`), which would drop a timeout equal to the 600 s it fills in for NCCL and leave a gloo
    # group at torch's 1800 s: this handler passes all of its fields.
    group_options = {"timeout": timedelta(seconds=args.ddp_timeout), **engine_options.pop("process_group", {})}
    process_group = InitProcessGroupKwargs(**group_options)
    process_group.to_kwargs = lambda: dict(group_options)
    accelerator = Accelerator(
        **engine_options,
        kwargs_handlers=[process_group],
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    try:
        return _train_with(args, accelerator)
    finally:
        # On every way out, an error or Ctrl-C included: the trackers flush and close (TensorBoard's writer
        # holds up to two minutes of scalars; Accelerate leaves a wandb run open otherwise).
        accelerator.end_training()


def _train_with(args, accelerator) -> str:
    """`train`'s body, under its Accelerator."""
    from accelerate.utils import set_seed

    from ..data import (batches_per_process, class_names, dataset_image_channels, load_training_dataset,
                        make_train_dataloader, resolve_columns)
    from ..data.buckets import bucket_sizes
    from ..models import get_model_adapter
    from ..models.quantization import quantization_config
    from ..schedule import num_train_timesteps
    from ..weighting import get_weighting

    enable_fsdp_on_cpu(accelerator)  # `--use_fsdp` without a GPU: torch's FSDP2 with gloo (training/fsdp.py)
    check_fsdp_support(accelerator, args)
    check_task_gradient_launch(accelerator, args)  # a gradient method FSDP / DeepSpeed cannot run: before any loading
    check_cpu_fp16(accelerator)
    check_device_float64(accelerator)
    check_base_without_projections(args)
    fsdp = is_fsdp(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.is_main_process and os.path.isdir(args.output_dir):
        # before the checkpoint is chosen: a checkpoint moved aside by a crashed save goes back to its name
        remove_stale_temporaries(args.output_dir)
    accelerator.wait_for_everyone()  # every process then lists the same checkpoints
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    warn_of_later_checkpoints(args.output_dir, checkpoint, accelerator)
    if checkpoint is not None:
        check_checkpoint_engine(accelerator, checkpoint)  # a ZeRO checkpoint needs DeepSpeed, and vice versa
    args.seed = resolve_seed(args, accelerator, checkpoint)
    if checkpoint is not None:
        # Before any model or data is loaded: a resumed run must continue the run it resumes, under the
        # engine and with the number of processes that wrote its state.
        check_resume_engine(checkpoint, engine_record(accelerator))
        check_checkpoint_pickles(checkpoint)  # what FSDP / DeepSpeed would unpickle unrestricted holds only data
        # A run given in epochs has its length, and so its LR schedule, only once the data is loaded:
        # those flags are compared below, on the number of steps the checkpoint's run derived as well.
        deferred = SCHEDULE_LENGTH_FLAGS | LR_SCHEDULE_FLAGS if args.max_train_steps is None else frozenset()
        recorded = checkpoint_config(checkpoint)
        for line in adopt_recorded_defaults(args, recorded):
            logger.info("resuming with %s", line)
        current = {key: value for key, value in public_config(args).items() if key not in deferred}
        for change in check_resume_config(recorded, current, checkpoint, accelerator.num_processes,
                                          saved_paths=checkpoint_config(checkpoint, "local_paths"),
                                          current_paths=run_local_paths(args)):
            logger.info("resuming with a changed setting, %s", change)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:  # the repo first, as diffusers' scripts: its full id goes into the records and the card
            from ..hub import create_hub_repo

            args.hub_model_id = create_hub_repo(args.hub_model_id, args.output_dir, args.hub_token,
                                                args.hub_private_repo)

    # Data first: a model trained from scratch takes its channel and class counts from it.
    dataset = load_training_dataset(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
                                    dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir)
    needs = data_needs(args)
    columns = resolve_columns(dataset, image_column=args.image_column, caption_column=args.caption_column,
                              conditioning_image_column=args.conditioning_image_column,
                              class_column=args.class_column, **needs)
    num_classes = args.num_classes
    data_classes = class_names(dataset, columns["class_column"]) if columns["class_column"] is not None else None
    if num_classes is None and data_classes is not None:
        num_classes = len(data_classes)
    from_scratch = args.model_config_name_or_path is not None and args.model_type in ("unet", "dit")
    # --quantize_base: the frozen denoiser in 8 / 4 bits (models/quantization.py); passed only when asked
    # for, so adapters that override `load` without this keyword keep working
    quantized = quantization_config(getattr(args, "quantize_base", None), compute_dtype(accelerator))
    adapter_class = get_model_adapter(args.model_type)
    with zero_init_disabled(accelerator):  # ZeRO-3: load whole; the engine shards the trained model in prepare
        adapter = adapter_class.load(
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            model_config_name_or_path=args.model_config_name_or_path,
            controlnet_model_name_or_path=args.controlnet_model_name_or_path,
            # --class_map: the pretrained label table as it is, the map picks its rows (set_data_classes)
            resolution=args.resolution, num_classes=None if args.class_map else num_classes,
            prediction_type=args.prediction_type, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
            # From scratch the model is built for the data's channels; a pretrained model keeps its own and
            # the images are converted to them (greyscale -> RGB), as diffusers' scripts do.
            num_channels=dataset_image_channels(dataset, columns["image_column"]) if from_scratch else None,
            noise_scheduler=args.noise_scheduler, flow_shift=args.flow_shift,  # flow matching
            # passed only when given (like the quantization below): a family with a load of its own may not take it
            **({"pretrained_vae_model_name_or_path": args.pretrained_vae_model_name_or_path}
               if args.pretrained_vae_model_name_or_path else {}),
            # a family's own options (flux: --guidance_scale), read by its adapter
            **(adapter_class.options_from_args(args) if hasattr(adapter_class, "options_from_args") else {}),
            **({"quantization_config": quantized} if quantized is not None else {}),
        )
    adapter.set_data_classes(data_classes, class_map=args.class_map)  # a DiT's data-set class -> label row
    from .caching import build_training_cache, check_adapter_support, free_encoders, probe_cached_batch

    check_adapter_support(args, adapter)  # buckets / caching: a latent model with the caching hooks
    # The teacher (Diff-Tuning's distillation, DeMe: the student with its LoRA off, else a frozen copy), then what trains: LoRA,
    # BitFit / DiffFit, DeMe's channel projections; frozen parts in the low precision.
    teacher, finetune = prepare_model(args, accelerator, adapter)
    noise_scheduler = adapter.noise_scheduler
    num_timesteps = num_train_timesteps(noise_scheduler)

    intervals = build_intervals(args, noise_scheduler)
    sampler = build_sampler(args, intervals, num_timesteps)
    objective = DiffusionObjective(adapter, noise_scheduler, sampler, intervals, prediction_type=args.prediction_type,
                                   loss_weighting=args.loss_weighting, snr_gamma=args.snr_gamma,
                                   p2_k=args.p2_k, p2_gamma=args.p2_gamma, noise_offset=args.noise_offset,
                                   weighting_scheme=args.weighting_scheme,  # SD3's loss weight (flow matching)
                                   precondition_outputs=bool(args.precondition_outputs),  # SD3's x0 preconditioning
                                   sources=build_sources(args, intervals, num_timesteps, sampler), teacher=teacher)
    num_tasks = objective.num_tasks  # (source, cluster) pairs

    bank_rows = retention_rows(args) if args.retention == "bank" else 0  # bank rows come from their own loader
    train_dataloader = make_train_dataloader(
        dataset, columns, resolution=pixel_resolution(adapter), batch_size=args.train_batch_size - bank_rows,
        num_channels=adapter.num_channels, seed=args.seed, **adapter.data_options(),
        num_workers=args.dataloader_num_workers, center_crop=args.center_crop, random_flip=args.random_flip,
        max_samples=args.max_train_samples, interpolation=args.image_interpolation_mode,
        proportion_empty_prompts=args.proportion_empty_prompts,
        # --aspect_ratio_buckets: single-bucket batches at each image's own aspect ratio (data/buckets.py)
        buckets=bucket_sizes(pixel_resolution(adapter), bucket_step(args, adapter)) if args.aspect_ratio_buckets else None,
        bucket_group_size=args.gradient_accumulation_steps * accelerator.num_processes)  # one bucket per update
    validation_inputs = default_validation_inputs(args, dataset, columns)
    freed = training_cache = None
    if args.cache_latents or args.cache_text_embeddings:
        # encode once (training data, then the validation prompts), then free the encoders (training/caching.py)
        training_cache = build_training_cache(args, accelerator, adapter, train_dataloader.dataset, args.train_batch_size)
        if args.cache_text_embeddings and "prompts" in validation_inputs:
            validation_inputs["prompts"] = adapter.validation_prompt_kwargs(
                adapter.make_pipeline(), validation_inputs["prompts"], args.guidance_scale)
        freed = free_encoders(args, accelerator, adapter)
        probe_cached_batch(args, adapter, train_dataloader.dataset)  # a type without the cache hooks: one line now
    bank_dataloader = None
    if args.retention == "bank":
        bank_dataloader = knowledge_bank_dataloader(args, adapter, needs, bank_rows, accelerator.num_processes)

    # Optimizer updates per epoch: the loader yields this process's share of the batches, grouped
    # into windows of --gradient_accumulation_steps micro-batches (the last window may be shorter).
    batches_per_epoch = batches_per_process(train_dataloader, accelerator)
    if batches_per_epoch == 0:  # fewer full batches than processes: Accelerate's shards drop them all
        full = len(train_dataloader)
        raise ValueError(f"the dataset makes {full} full batch{'' if full == 1 else 'es'} of {args.train_batch_size}, "
                         f"fewer than the {accelerator.num_processes} processes: lower --train_batch_size (or use more "
                         "data)")
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
        if checkpoint is not None:  # the comparison left out before loading: the `deferred` flags alone
            current = {key: value for key, value in public_config(args).items() if key in deferred}
            for change in check_resume_config(recorded, current, checkpoint, accelerator.num_processes):
                logger.info("resuming with a changed setting, %s", change)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)

    weighting = None
    if args.mtl_method != "none":
        weighting = get_weighting(args.mtl_method, num_tasks, **method_options(args, updates_per_epoch)).to(accelerator.device)
    check_distributed_support(accelerator, args, weighting)
    deepspeed = is_deepspeed(accelerator)
    zero3 = zero_stage(accelerator) == 3  # ZeRO-3 partitions the parameters too, not only gradients and state
    if deepspeed:
        configure_plugin(accelerator, args)  # clipping and accumulation from the flags

    params = adapter.trainable_parameters()
    extra_params = [p for module in adapter.extra_trainable_modules().values() for p in module.parameters()
                    if p.requires_grad]
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    param_groups = [{"params": params}]
    if args.deme_interval is not None or args.channel_projection:
        from ..deme.optim import weight_decay_groups

        # DeMe: no decay on the projections (it would pull them toward zero, not the identity) and norms
        param_groups = weight_decay_groups(adapter.model, params)
    # UW's log-variances: their own learning rate and no weight decay (ANT's setting); beside a sharded
    # engine (DeepSpeed, FSDP) an optimizer of their own (`sharding.weighting_optimizer` says why).
    outside_optimizer = weighting_optimizer(args, weighting) if deepspeed or fsdp else None
    if outside_optimizer is not None and fsdp and accelerator.mixed_precision == "fp16":
        raise UsageError(f"under FSDP --mtl_method {args.mtl_method} trains its parameters beside the model, "
                         "outside fp16's gradient scaler: use --mixed_precision bf16 or no")
    if weighting is not None and hasattr(weighting, "param_groups") and outside_optimizer is None:
        param_groups += weighting.param_groups()
    optimizer = build_optimizer(args, param_groups, lr)
    lr_scheduler = build_lr_scheduler(args, optimizer, accelerator.num_processes)
    # DIFFUSERS_ANT_MEMORY_REPORT=1 (train_scripts/benchmark_engines.py): count, on each process, the bytes each
    # engine keeps of the trained weights, gradients and optimizer state; reads tensors only
    memory_probe = memory_report.MemoryProbe(optimizer) if memory_report.enabled() else None

    if deepspeed and accelerator.mixed_precision in ("fp16", "bf16"):
        cast_inputs_to_parameter_dtype(adapter.model)  # DeepSpeed runs the module in bf16 / fp16, without autocast
    gradient_based = weighting is not None and weighting.needs_task_gradients
    if gradient_based and (fsdp or deepspeed):  # the LoRA subset alone (sharding.py, "Gradient-based methods")
        check_lora_only(accelerator, args, adapter)
        if fsdp:
            keep_lora_whole(accelerator, adapter.model)  # LoRA whole on every process, the base sharded
        elif zero3:
            threshold = keep_lora_whole_zero3(accelerator, adapter.model)  # the same, as persistent parameters
            logger.info("ZeRO-3: stage3_param_persistence_threshold %d keeps the LoRA matrices whole on every "
                        "process", threshold)
    if fsdp:
        check_fsdp_wrapping(accelerator, adapter.model)  # a config that wraps no module: one line, before sharding
    # FSDP and ZeRO-3 shard the module in `prepare`: keep its architecture (no weights) to gather into
    skeleton = meta_skeleton(adapter.model) if fsdp or zero3 else None
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(adapter.model, optimizer, train_dataloader, lr_scheduler)
    if len(train_dataloader) != batches_per_epoch:  # the step count and the LR schedule were built on it
        raise RuntimeError(f"the prepared data loader yields {len(train_dataloader)} batches per process, not the "
                           f"{batches_per_epoch} the run was planned with: please report this with your Accelerate version")
    if fsdp:
        # fully_shard replaced the module's parameters with sharded ones (and Accelerate the optimizer's):
        # clipping must see the new ones
        params = adapter.trainable_parameters()
    if bank_dataloader is not None:
        bank_dataloader = accelerator.prepare(bank_dataloader)  # each process reads its own shard of the bank
    # LoRA and other partial fine-tuning: checkpoints hold the trainable parameters only, not the frozen base.
    # Under FSDP Accelerate writes the sharded module whole (`save_fsdp_model`, frozen shards included),
    # whatever the hooks do, and reads it back: each process keeps its own shard of the base. DeepSpeed's
    # checkpoint holds the engine's whole module, sharded; it hands the hooks no state dict.
    if not fsdp and not deepspeed:
        register_trainable_state_hooks(accelerator, adapter.model)
    ema = None
    if args.use_ema:
        ema = make_ema(args, params)  # float32 shadow weights, also over DeepSpeed's bf16 / fp16 parameters
    engine = None
    if gradient_based:
        if zero3:
            whole, sharded = gather_persistent_lora(params, model)
            logger.info("ZeRO-3: %d parameter tensors whole on every process (the LoRA matrices, and base tensors "
                        "no larger than the threshold), %d partitioned", whole, sharded)
        engine = build_task_gradient_engine(adapter, params, args.task_gradients, args.task_gradient_subset,
                                            lockstep=fsdp or zero3, write_update=DeepSpeedUpdate(model) if deepspeed else None,
                                            gradient_checkpointing=args.gradient_checkpointing)
        heuristic = subset_heuristic_warning(args.mtl_method, args.task_gradients, args.task_gradient_subset)
        if heuristic:
            logger.warning(heuristic)
    # One generator draws every random number of a step (latents, label dropout, timesteps, noise);
    # each process has its own stream.
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)

    if accelerator.is_main_process:
        write_run_records(args, accelerator, intervals, weighting)
    logger.info("timestep clusters (%s): %s", args.clustering, intervals.bounds)
    if accelerator.num_processes > 1:  # every process says where it runs (a multi-node launch is checked by it)
        logger.info("process %d of %d (rank %d on its machine)", accelerator.process_index,
                    accelerator.num_processes, accelerator.local_process_index)

    tracker = None
    if args.track_convergence and accelerator.is_main_process:
        from ..diff_tuning import ConvergenceTracker

        tracker = ConvergenceTracker(args.convergence_threshold, every=args.convergence_steps,
                                     extractor=args.condition_extractor, distance=args.convergence_distance,
                                     output_dir=args.output_dir)

    path_fingerprints = run_local_paths(args)  # (the path flags stay as they are for the whole run)

    def trainer_state(step):
        return {"global_step": step, "generator": generator.get_state(),
                "convergence": tracker.state_dict() if tracker is not None else None,
                "extra_trainable": adapter.extra_trainable_state(),
                "ema": ema_state(ema, accelerator) if ema is not None else None,
                "weighting": weighting.state_dict() if weighting is not None else None,
                "weighting_optimizer": outside_optimizer.state_dict() if outside_optimizer is not None else None,
                "engine": engine_record(accelerator),
                "config": public_config(args),
                "local_paths": path_fingerprints}

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
            if fsdp:
                # the checkpoint holds this process's shard of each EMA weight: put it back in place
                ema.shadow_params = sharded_like(ema.shadow_params, params)
        if weighting is not None:
            weighting.load_state_dict(state["weighting"])
        if outside_optimizer is not None:
            outside_optimizer.load_state_dict(state["weighting_optimizer"])
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
        if global_step >= args.max_train_steps:
            break  # resumed from the last step's checkpoint: nothing left to train
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
            # (DeepSpeed's fp16 has its own loss scaler, which skips overflowing steps the same way; a gradient
            # method under DeepSpeed skips a window whose task gradients overflow, `update_skipped`)
            # (a gradient method's window may also be skipped without any loss scaler: `task_gradients_overflowed`)
            may_skip = (scaler is not None or (deepspeed and accelerator.mixed_precision == "fp16")
                        or (weighting is not None and weighting.needs_task_gradients))
            snapshot = weighting_snapshot(weighting) if may_skip and weighting is not None else None
            logs = training_step(accelerator, objective, model, window, generator, num_tasks, weighting=weighting,
                                 engine=engine, loss_scale=current_loss_scale(scaler, accelerator.device))
            if extra_params and not (weighting is not None and weighting.needs_task_gradients):
                average_gradients_(extra_params)  # DDP averaged the model's gradients, not these
            overflowed = task_gradients_overflowed(accelerator, logs, engine)
            if overflowed:
                logger.warning("step %d: the per-cluster gradients are not finite (inf or NaN); the update is skipped",
                               global_step + 1)
            elif args.max_grad_norm and fsdp:
                fsdp_clip_grad_norm_(accelerator, params, args.max_grad_norm)
            elif args.max_grad_norm and not deepspeed:  # DeepSpeed clips inside its step (configure_plugin)
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            if not overflowed:
                optimizer.step()  # under DeepSpeed a no-op: the engine stepped at the window's last chunk
            skipped = overflowed or update_skipped(accelerator, logs, engine)
            if not skipped:
                # (Accelerate's scheduler also holds still after a GradScaler's skip; a window the engine handed
                # DeepSpeed nothing for is a skip it cannot see, so the schedule is not asked to step at all)
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if outside_optimizer is not None:
                if not skipped:
                    outside_optimizer.step()
                outside_optimizer.zero_grad(set_to_none=True)
            if skipped and snapshot is not None:
                restore_weighting(weighting, snapshot)

            # ---- one optimizer update done
            if ema is not None and not skipped:
                step_ema(args, accelerator, ema, params)
            global_step += 1
            progress.update(1)
            record = step_record(logs, lr_scheduler.get_last_lr()[0], skipped, objective.task_names())
            progress.set_postfix(loss=f"{record['loss']:.4f}", w=" ".join(f"{w:.2f}" for w in logs["weights"].tolist()))
            accelerator.log(record, step=global_step)

            if tracker is not None and tracker.should_check(global_step):  # before the checkpoint, which records it
                check_convergence(args, accelerator, adapter, model, tracker, global_step, validation_inputs)
            # The last step is checkpointed too when it falls on the period (as diffusers' scripts do): a
            # finished run can then be continued exactly with a larger --max_train_steps.
            if global_step % args.checkpointing_steps == 0:
                path = save_checkpoint(accelerator, args.output_dir, global_step, trainer_state(global_step),
                                       args.checkpoints_total_limit)
                accelerator.print(f"saved {path}")
            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                validate_whole(args, accelerator, adapter, model, skeleton, ema, params, global_step,
                               validation_inputs)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
        # after the first epoch and every N-th after it: diffusers' scripts' `epoch % validation_epochs == 0`
        # (an early grid shows a broken run at once)
        if args.validation_epochs and epoch % args.validation_epochs == 0:
            validate_whole(args, accelerator, adapter, model, skeleton, ema, params, global_step,
                           validation_inputs)
    progress.close()
    if training_cache is not None:  # each process its own files (training/caching.py)
        training_cache.remove_files()
    if memory_probe is not None:
        kind = f"zero{zero_stage(accelerator)}" if deepspeed else "fsdp2" if fsdp else "ddp"
        memory_probe.write(args.output_dir, accelerator, kind, params)

    # ---------------------------------------------------------------- outputs
    accelerator.wait_for_everyone()
    if skeleton is not None:
        # FSDP / ZeRO-3: every process takes part in gathering the full state dict (with the EMA weights in
        # place, as finish() saves them); process 0 writes the plain module, which then holds them
        with ema_weights(ema, params):
            model = whole_model(accelerator, model, skeleton)
        ema = None
    if accelerator.is_main_process:
        finish(args, accelerator, adapter, model, ema, params, intervals, global_step, validation_inputs, objective,
               finetune, freed)
    # No barrier after the outputs, as in diffusers' scripts: the other processes would wait there, with the
    # process group's timeout (10 minutes under NCCL), while process 0 saves, samples and pushes a model of
    # many GB, then abort the launch, killing the upload. They end now; the launcher waits for process 0.
    return args.output_dir


def _changed_target(args, adapter):
    """(what this run trains, the flags that changed it) when that differs from what the loaded pretrained
    model predicts (`--prediction_type`, `--noise_scheduler`); None otherwise."""
    from ..schedule import resolve_prediction_type

    trained = resolve_prediction_type(adapter.noise_scheduler, args.prediction_type)
    if adapter.pretrained_target is None or trained == adapter.pretrained_target:
        return None
    flags = " / ".join(f"--{name} {getattr(args, name)}" for name in ("prediction_type", "noise_scheduler")
                       if getattr(args, name, None) is not None)
    return trained, flags


def check_teacher_target(args, adapter) -> None:
    """The teacher's output is a regression target of the student (Diff-Tuning's --retention kd, DeMe's
    consistency loss), so both must predict the same thing: a run that trains another target than the
    pretrained model predicts (--prediction_type, --noise_scheduler) is refused in one line."""
    kd = args.retention == "kd"
    if not kd and not args.consistency_weight:
        return  # a DeMe fine-tune without the consistency loss reads no teacher output
    changed = _changed_target(args, adapter)
    if changed is not None:
        trained, flags = changed
        what, other = (("--retention kd", ", or use --retention bank, whose targets are images") if kd else
                       ("DeMe's consistency loss", ", or pass --consistency_weight 0"))
        raise ValueError(f"{what} regresses on the pretrained model's own prediction ({adapter.pretrained_target}), "
                         f"and this run trains {trained} ({flags}): drop {flags.split(' ')[0]}{other}")


def bucket_step(args, adapter) -> int:
    """`--bucket_step`, checked against the model's patch in pixels, or its default (data/buckets.py)."""
    from ..data.buckets import check_bucket_step, default_bucket_step
    from .args import BUCKET_STEP_OF_ONE_PATCH

    if args.bucket_step is None:
        return default_bucket_step(pixel_resolution(adapter), adapter.pixel_multiple)
    if args.bucket_step == BUCKET_STEP_OF_ONE_PATCH:  # a checkpoint's buckets from before the flag (adopt_recorded_defaults)
        return adapter.pixel_multiple
    check_bucket_step(args.bucket_step, adapter.pixel_multiple)
    return args.bucket_step


def device_backend_available() -> bool:
    """Whether a device Accelerate forms a process group on is here: CUDA, or one of the other backends its
    launcher takes (XPU, NPU, MLU, MUSA, HPU, SDAA). Without one, several processes train on the CPU over gloo
    (`Accelerator(cpu=True)`); telling a machine with an XPU so would train it on the CPU, without a word."""
    import accelerate.utils as accelerate_utils

    if torch.cuda.is_available():
        return True
    checks = ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available", "is_hpu_available",
              "is_sdaa_available")
    return any(getattr(accelerate_utils, name, lambda: False)() for name in checks)


def check_base_without_projections(args) -> None:
    """Refuse, in one line, a pretrained folder that carries DeMe's channel projections (a merged DeMe model):
    the denoiser is loaded without them, so the run would start from another function than the base's, its
    outputs would drop them, and a DeMe merge of its fine-tunes would add the base's projections to updates made
    from the identity. (Local folders: a Hub model's files are not listed before loading.)"""
    from ..deme.projection import PROJECTION_CONFIG_NAME

    for flag in ("pretrained_model_name_or_path", "controlnet_model_name_or_path"):
        folder = getattr(args, flag, None)
        if folder and os.path.isfile(os.path.join(os.path.expanduser(folder), PROJECTION_CONFIG_NAME)):
            raise UsageError(f"--{flag} {folder} holds DeMe channel projections ({PROJECTION_CONFIG_NAME}): training "
                             "from a merged DeMe model is not supported (its projections would be dropped); train from "
                             "the model its DeMe run started from")


def check_device_float64(accelerator) -> None:
    """Apple's MPS device has no float64, which every step's per-cluster loss sums and counts use (exact sums
    over a window, `weighting/engine.py`): the first step failed in a tensor allocation. Refused in one line that
    names the CPU, which trains the same run."""
    if accelerator.device.type == "mps":
        raise ValueError("Apple's MPS device has no float64, which the per-cluster loss statistics of every step use: "
                         "train on the CPU (accelerate launch --cpu train_scripts/train_ant.py ...) or a CUDA GPU")


def check_cpu_fp16(accelerator) -> None:
    """`--mixed_precision fp16` where Accelerate has no fp16 autocast or GradScaler (`native_amp` False: the CPU):
    a LoRA's base, cast to fp16 as diffusers' scripts cast it, then met float32 inputs (a dtype-mismatch traceback
    at the first step), and a full fine-tune trained in float32 beside fp16 frozen parts. Refused in one line
    (DeepSpeed runs its own fp16 and is left to its own checks)."""
    if (accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and not accelerator.native_amp
            and not deepspeed_launched()):
        raise ValueError("--mixed_precision fp16 on the CPU: Accelerate runs no fp16 autocast or loss scaling there; "
                         "use --mixed_precision bf16 (or no) on a CPU, fp16 on a GPU")


def check_pretrained_classes(args, adapter) -> None:
    """Diff-Tuning (a bank of the pretrained model's samples, or its predictions under --retention kd) and
    DeMe's consistency loss anchor the run to the pretrained model's behaviour for each input. A UNet2DModel
    whose class embedding is new in this run (another class count than the pretrained one, or classes for an
    unconditional one) has no pretrained behaviour for its labels, and no null class to fall back on (a
    DiT keeps its pretrained label table and trains retention on the null row): refused in one line."""
    new = getattr(adapter, "new_class_embedding", None)
    uses_pretrained = args.diff_tuning or (args.deme_interval is not None and args.consistency_weight)
    if new is None or not uses_pretrained:
        return
    pretrained, run = new
    had = "no class embedding" if pretrained is None else f"{pretrained} classes"
    what = "Diff-Tuning's retention" if args.diff_tuning else "DeMe's consistency loss"
    raise ValueError(f"{what} anchors the run to the pretrained UNet, which has {had}, and this run's class "
                     f"embedding ({run} classes) is new, with no pretrained behaviour to retain: fine-tune on the "
                     "pretrained classes, or train without --class_column")


def check_new_label_rows(args, adapter) -> None:
    """A DiT whose label table grew for this run's classes (`models.dit.grow_label_tables`: the new rows start at
    std 0.02) needs those rows trained: LoRA (on the attention) and BitFit (biases) leave them at their start, so
    the new classes, near-equal vectors, are barely told apart. Refused in one line, naming the modes that train it."""
    grown = getattr(adapter, "grown_label_table", None)
    if grown is None or args.finetune not in ("lora", "bitfit") and args.rank is None:
        return
    pretrained, run = grown
    how = "--finetune bitfit" if args.finetune == "bitfit" else "LoRA (--rank)"
    raise ValueError(f"the pretrained DiT has {pretrained} classes and this run's {run} grow its label table, whose new "
                     f"rows {how} does not train: fine-tune in full or with --finetune difffit (both train the "
                     "table)")


def check_controlnet_target(args, adapter) -> None:
    """A ControlNet adds residuals into the frozen UNet, whose output is the prediction: the pair keeps predicting
    what that UNet predicts (v for SD 2.1), so a run that trains another target (--prediction_type,
    --noise_scheduler) would push the ControlNet towards one it cannot reach, and the saved folder samples with
    the base's scheduler. Refused in one line."""
    changed = _changed_target(args, adapter) if args.model_type == "controlnet" else None
    if changed is not None:
        trained, flags = changed
        raise ValueError(f"a ControlNet steers the frozen UNet, which predicts {adapter.pretrained_target}, and this run "
                         f"trains {trained} ({flags}): drop {flags.split(' ')[0]}")


def check_lora_target(args, adapter) -> None:
    """A LoRA output is its adapters over the base pipeline, which `load_pipeline` (and the card's snippet)
    samples with the base's own scheduler: a LoRA trained on another target than the base predicts would be
    sampled as the base's, so it is refused in one line (a whole-model save carries its scheduler)."""
    changed = _changed_target(args, adapter) if args.rank is not None else None
    if changed is not None:
        trained, flags = changed
        raise ValueError(f"a LoRA output samples with its base's scheduler, which predicts {adapter.pretrained_target}, "
                         f"and this run trains {trained} ({flags}): drop {flags.split(' ')[0]}, or train the whole "
                         "model (without --rank)")


def prepare_model(args, accelerator, adapter):
    """The frozen teacher (when an objective needs it) and the trained model's final form; returns
    `(teacher or None, FinetuneSummary)`.

    Order matters: a full fine-tune's teacher is copied before anything changes the student (a LoRA
    run's is the student itself with its adapters disabled, `teacher.AdapterDisabledTeacher`); LoRA, then BitFit /
    DiffFit, then DeMe's channel projections decide what trains; then the frozen parts (and a LoRA
    run's frozen base) are cast to the weight dtype, as diffusers' scripts do."""
    from ..peft_modes import apply_finetune_mode

    from ..models.quantization import prepare_quantized_for_lora

    weight_dtype = compute_dtype(accelerator)
    teacher = None
    needs_teacher = args.retention == "kd" or args.deme_interval is not None
    if needs_teacher:
        check_teacher_target(args, adapter)
    check_pretrained_classes(args, adapter)
    check_new_label_rows(args, adapter)
    check_controlnet_target(args, adapter)
    check_lora_target(args, adapter)
    lora = args.rank is not None
    if needs_teacher and not lora:
        from .. import teacher as teachers

        # full fine-tuning, BitFit, DiffFit move the base weights: a frozen copy, taken now
        # (DeepSpeed runs no autocast: a low-precision copy casts its inputs, as the student does)
        low_precision_without_autocast = is_deepspeed(accelerator) and weight_dtype != torch.float32
        teacher = teachers.make_teacher(adapter, weight_dtype, autocast=accelerator.autocast,
                                        cast_inputs=low_precision_without_autocast).to(accelerator.device)
    if lora:
        prepare_quantized_for_lora(adapter.model)  # --quantize_base: peft's k-bit preparation, as diffusers' scripts
        adapter.add_lora(args.rank, alpha=args.lora_alpha, target_modules=_lora_layers(args), dropout=args.lora_dropout)
    if args.train_text_encoder:
        adapter.add_text_encoder_lora(args.rank, alpha=args.lora_alpha)
    finetune = apply_finetune_mode(adapter.model, args.finetune)  # BitFit / DiffFit choose what trains
    accelerator.print(finetune.description)  # the trainable share, printed at the start of every run
    if args.channel_projection:
        from ..deme import add_channel_projection

        add_channel_projection(adapter.model)  # DeMe's channel mixing after each block, identity at first
    if args.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        adapter.model.enable_xformers_memory_efficient_attention()
        if adapter.unet is not None:  # a ControlNet's frozen UNet, as diffusers' train_controlnet.py
            adapter.unet.enable_xformers_memory_efficient_attention()
    adapter.to(accelerator.device, weight_dtype)  # frozen parts (VAE, text encoder) in the low precision
    if lora:
        # and a LoRA run's frozen base weights, which its output (the adapters) never holds. Not those of a
        # BitFit / DiffFit run: its output is the whole model, and the weights it left alone would be saved
        # rounded to the low precision (the final lift to float32 cannot restore the lost bits).
        cast_frozen_parameters(adapter.model, weight_dtype)
    if needs_teacher and lora:
        from .. import teacher as teachers

        # under LoRA the teacher is the student with its adapters (and projections) off: no second copy
        teacher = teachers.make_teacher(adapter, weight_dtype, autocast=accelerator.autocast, lora=True)
    return teacher, finetune


def _lora_layers(args):
    """`--lora_layers` as a list of module names (None: the model type's default targets)."""
    layers = getattr(args, "lora_layers", None)
    return [name.strip() for name in layers.split(",") if name.strip()] if layers else None
def compute_dtype(accelerator) -> torch.dtype:
    """The weight dtype of the frozen parts: the low precision of `--mixed_precision`, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def write_run_records(args, accelerator, intervals, weighting) -> None:
    """The run's configuration for the trackers and the output folder (portable: no secret, no
    absolute path), its timestep intervals and its weighting's configuration."""
    published = public_config(args)
    accelerator.init_trackers(args.tracker_project_name,
                              config={k: v for k, v in published.items() if isinstance(v, (int, float, str, bool))})
    intervals.save(os.path.join(args.output_dir, "timestep_intervals.json"))
    with open(os.path.join(args.output_dir, "training_config.json"), "w") as f:
        json.dump(published, f, indent=2)
    path = os.path.join(args.output_dir, "weighting_config.json")
    if weighting is not None:
        with open(path, "w") as f:
            json.dump({"name": args.mtl_method, **weighting.config.to_dict()}, f, indent=2)
    elif os.path.isfile(path):
        os.remove(path)  # an earlier run's in this --output_dir: it would describe a weighting this run never had


def step_record(logs: dict, lr: float, skipped: bool, task_names) -> dict:
    """What the trackers get for an update: the loss, the learning rate, every present task's loss and
    every task's weight (`task_loss/<name>`, `task_weight/<name>`), and whether fp16 skipped it."""
    record = {"loss": logs["loss"].item(), "lr": lr}
    if skipped:
        record["skipped_step"] = 1
    for i, name in enumerate(task_names):
        if logs["counts"][i] > 0:
            record[f"task_loss/{name}"] = logs["task_losses"][i].item()
        record[f"task_weight/{name}"] = logs["weights"][i].item()
    return record


def update_skipped(accelerator, logs: dict, engine) -> bool:
    """Whether the window's update did not happen. Either an fp16 loss scaler skipped it (the GradScaler
    under DDP, DeepSpeed's own under DeepSpeed: `optimizer_step_was_skipped`), or the per-cluster gradient
    engine hands its update to DeepSpeed (`write_update`) and the task gradients overflowed (`found_inf`):
    it then handed nothing, so DeepSpeed neither stepped the weights nor its LR schedule (it steps the
    schedule inside its own step). The loop treats both alike, as a GradScaler-skipped step under DDP: the
    step is counted and logged as skipped, EMA and the weighting's own optimizer do not step, the weighting's
    state is put back, and the LR schedule does not advance (Accelerate's scheduler skips with the
    optimizer; DeepSpeed's was not stepped). Without `write_update` the engine marks the overflow in `.grad`
    for the GradScaler, which decides."""
    if accelerator.optimizer_step_was_skipped:
        return True
    return getattr(engine, "write_update", None) is not None and bool(logs.get("found_inf", False))


def task_gradients_overflowed(accelerator, logs: dict, engine) -> bool:
    """Whether a gradient method's per-cluster gradients were not finite (`found_inf`) with no loss scaler to
    skip the update (bf16, fp32). The engine then wrote no update; the loop skips the optimizer step as a
    GradScaler would. Stepping it would hand AdamW the engine's overflow marker (an inf gradient entry, made
    NaN by the clipping) and turn the model into NaNs for good. The task gradients are synced before the
    check, so every process decides alike. With a GradScaler (fp16) the scaler sees the marker and decides
    (`update_skipped`); DeepSpeed's engine was handed nothing (`write_update`)."""
    return accelerator.scaler is None and bool(logs.get("found_inf", False))


def weighting_snapshot(weighting) -> dict:
    """A copy of the weighting's whole state (buffers, parameters, extra state, `last_weights`)."""
    return {"state": copy.deepcopy(weighting.state_dict()), "last_weights": weighting.last_weights.detach().clone()}


def restore_weighting(weighting, snapshot: dict) -> None:
    weighting.load_state_dict(snapshot["state"])
    weighting.last_weights = snapshot["last_weights"]


def validate(args, accelerator, adapter, model, ema, params, step, inputs):
    """Sample a grid with the (EMA) weights, save it under samples/ and send it to the trackers."""
    if not accelerator.is_main_process:
        return None
    from .validation import log_and_save_samples

    with ema_weights(ema, params), sampling_precision(accelerator, adapter):
        return log_and_save_samples(args, accelerator, adapter, accelerator.unwrap_model(model), step, inputs)


def validate_whole(args, accelerator, adapter, model, skeleton, ema, params, step, inputs):
    """`validate`, also under a sharded engine (FSDP, ZeRO-3: `skeleton` given), where every process calls
    it: each swaps its own shards of the EMA weights in, all take part in gathering the whole weights
    (`sharding.whole_model`), and process 0 samples that copy alone (a sharded forward would wait for the
    other processes)."""
    if skeleton is None:
        return validate(args, accelerator, adapter, model, ema, params, step, inputs)
    with ema_weights(ema, params):
        whole = whole_model(accelerator, model, skeleton)
    if whole is not None and accelerator.device.type == "cpu":
        # `sampling_precision` lifts the trained module and the frozen parts for the CPU, not this copy, whose frozen
        # base a LoRA run keeps in the low precision (`finish` lifts its copy the same way)
        lift_to_float32([whole])
    return validate(args, accelerator, adapter, whole, None, params, step, inputs)


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
           finetune, freed=None):
    """Save the pipeline (or LoRA weights), samples, model card; push to the Hub if asked."""
    from ..hub import hub_error_reason, push_to_hub, training_summary, write_model_card

    unwrapped = accelerator.unwrap_model(model)
    # The saved pipeline holds float32 frozen parts (and base weights), whatever precision training used.
    lift_to_float32([*adapter.frozen_modules().values(), unwrapped])
    with ema_weights(ema, params):
        if freed is not None:  # encoders freed after caching come back while the pipeline is written
            with freed.restored():
                save_output(args, adapter, unwrapped)
            freed.remove_stash()
        else:
            save_output(args, adapter, unwrapped)
        images, _ = validate(args, accelerator, adapter, model, None, params, global_step, validation_inputs)
    summary = training_summary(args, intervals, global_step, pixel_resolution(adapter), accelerator.num_processes)
    card = {}
    if args.diff_tuning:
        from ..diff_tuning.card import TEMPLATE, card_values

        manifest = None
        if args.knowledge_bank is not None:
            from ..diff_tuning import read_bank_manifest

            manifest = read_bank_manifest(args.knowledge_bank)
        card = dict(template=TEMPLATE, template_values=card_values(args, finetune, objective.task_names(),
                                                                   args.output_dir, manifest, intervals))
    write_model_card(args.output_dir, repo_id=args.hub_model_id, base_model=args.pretrained_model_name_or_path,
                     model_type=args.model_type, method_summary=summary,
                     dataset_name=args.dataset_name or args.train_data_dir,  # (a folder: its name only, in the card)
                     images=images, lora=args.rank is not None, **card)
    if args.push_to_hub:
        repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        try:
            url = push_to_hub(args.output_dir, repo, token=args.hub_token, private=args.hub_private_repo)
        except Exception as err:  # noqa: BLE001 - the Hub's HTTP errors, the client's connection errors
            # the run is done and saved: one line with the call that pushes it again (the same ignore patterns:
            # no checkpoint), the first line of the Hub's answer, never the token
            raise ValueError(f"the run is saved in {args.output_dir}, but its upload to {repo!r} failed "
                             f"({hub_error_reason(err)}): "
                             f"push it again with python -c \"from diffusers_ant.hub import push_to_hub; "
                             f"push_to_hub({args.output_dir!r}, {repo!r})\"") from None
        accelerator.print(f"pushed to {url}")
