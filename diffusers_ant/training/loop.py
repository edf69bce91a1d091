"""The Accelerate training loop behind `train_scripts/train_ant.py`.

Read it top to bottom like nanoGPT's train.py: set-up, the loop, the outputs. Model-type details
live in `diffusers_ant.models` (one adapter per type), data in `diffusers_ant.data`, the step's
objective and weighting in `training.step`, checkpoints in `training.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os

import torch
from tqdm.auto import tqdm

from .args import UsageError
from .checkpoint import load_checkpoint, remove_stale_temporaries, resolve_checkpoint, save_checkpoint
from .step import DiffusionObjective, training_step

logger = logging.getLogger("diffusers_ant")

def public_config(args) -> dict:
    """The run's configuration without secrets (the Hub token is never written, logged or carded)."""
    from ..hub import drop_secrets

    return dict(sorted(drop_secrets(vars(args)).items()))


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


def data_needs(args) -> dict:
    """Which dataset columns the model type needs (captions, conditioning images, classes)."""
    return {"need_captions": args.model_type in ("sd", "controlnet"),
            "need_conditioning": args.model_type == "controlnet",
            "need_classes": args.model_type in ("unet", "dit") and (args.num_classes is not None or args.model_type == "dit"
                                                                    or args.class_column is not None)}


def image_channels(dataset, image_column) -> int:
    """1 for greyscale datasets, 3 otherwise (what a model trained from scratch is built for)."""
    return 1 if dataset[0][image_column].mode in ("L", "1", "I;16", "I", "F") else 3


def pixel_resolution(adapter) -> int:
    """Image side length the data must have: the model's sample size, times the VAE's factor when latent."""
    if adapter.latent:
        return adapter.sample_size * adapter.vae_scale_factor(adapter.vae)
    return adapter.sample_size


def parameter_subset(model, spec):
    """`--task_gradient_subset`: None (all trainable), `lora`, or comma-separated module-name prefixes."""
    if spec is None:
        return None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if spec == "lora":
        chosen = [p for n, p in named if "lora_" in n]
    else:
        prefixes = tuple(x.strip() for x in spec.split(",") if x.strip())
        chosen = [p for n, p in named if n.startswith(prefixes)]
    if not chosen:
        raise UsageError(f"--task_gradient_subset {spec!r} matches no trainable parameter "
                         "(use `lora` with --rank, or module-name prefixes such as `down_blocks.0,mid_block`)")
    return chosen


def default_validation_inputs(args, dataset, columns) -> dict:
    """Prompts / conditioning images for validation: the flags, else the first training examples."""
    from PIL import Image

    n = args.num_validation_images
    inputs = {}
    if args.model_type in ("sd", "controlnet"):
        inputs["prompts"] = ([args.validation_prompt] * n if args.validation_prompt
                             else [dataset[i % len(dataset)][columns["caption_column"]] for i in range(n)])
    if args.model_type == "controlnet":
        if args.validation_image:
            inputs["conditioning_images"] = [Image.open(args.validation_image).convert("RGB")] * n
        else:
            inputs["conditioning_images"] = [dataset[i % len(dataset)][columns["conditioning_image_column"]].convert("RGB")
                                             for i in range(n)]
    return inputs


def train(args) -> str:
    """Train as `args` says; returns the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ..data import class_names, load_training_dataset, make_train_dataloader, resolve_columns
    from ..models import get_model_adapter
    from ..schedule import num_train_timesteps
    from ..weighting import get_weighting

    # ---------------------------------------------------------------- set-up
    accelerator = Accelerator(
        # Without a GPU, `accelerate launch --multi_gpu` starts several processes but Accelerate only
        # forms the gloo process group (MULTI_CPU) when told to use the CPU; otherwise each process
        # would train alone.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.seed is not None:
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
    if num_classes is None and needs["need_classes"]:
        num_classes = len(class_names(dataset, columns["class_column"]))
    adapter = get_model_adapter(args.model_type).load(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        model_config_name_or_path=args.model_config_name_or_path,
        controlnet_model_name_or_path=args.controlnet_model_name_or_path,
        resolution=args.resolution, num_classes=num_classes, prediction_type=args.prediction_type,
        revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
        num_channels=image_channels(dataset, columns["image_column"]),
        noise_scheduler=args.noise_scheduler, flow_shift=args.flow_shift,  # flow matching (flow branch)
    )
    if args.rank is not None:
        adapter.add_lora(args.rank, alpha=args.lora_alpha)
    if args.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    adapter.to(accelerator.device, weight_dtype)  # frozen parts (VAE, text encoder) in the low precision
    noise_scheduler = adapter.noise_scheduler
    num_timesteps = num_train_timesteps(noise_scheduler)

    intervals = build_intervals(args, noise_scheduler)
    num_tasks = len(intervals)
    sampler = build_sampler(args, intervals, num_timesteps)
    objective = DiffusionObjective(adapter, noise_scheduler, sampler, intervals, prediction_type=args.prediction_type,
                                   loss_weighting=args.loss_weighting, snr_gamma=args.snr_gamma,
                                   p2_k=args.p2_k, p2_gamma=args.p2_gamma, noise_offset=args.noise_offset,
                                   weighting_scheme=args.weighting_scheme)  # SD3's loss weight (flow branch)

    train_dataloader = make_train_dataloader(
        dataset, columns, resolution=pixel_resolution(adapter), batch_size=args.train_batch_size,
        num_channels=adapter.num_channels, tokenizer=adapter.tokenizer, seed=args.seed or 0,
        num_workers=args.dataloader_num_workers, center_crop=args.center_crop, random_flip=args.random_flip,
        max_samples=args.max_train_samples)
    validation_inputs = default_validation_inputs(args, dataset, columns)

    weighting = None
    if args.mtl_method != "none":
        weighting = get_weighting(args.mtl_method, num_tasks, **args.mtl_options_dict).to(accelerator.device)

    params = adapter.trainable_parameters()
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    param_groups = [{"params": params}]
    if weighting is not None and hasattr(weighting, "param_groups"):
        # UW's log-variances: their own learning rate and no weight decay (ANT's setting).
        param_groups += weighting.param_groups()
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(adapter.model, optimizer, train_dataloader, lr_scheduler)
    ema = None
    if args.use_ema:
        ema = EMAModel(params, decay=args.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=args.ema_inv_gamma, power=args.ema_power)
        ema.to(accelerator.device)
    engine = None
    if weighting is not None and weighting.needs_task_gradients:
        from ..weighting.engine import TaskGradientEngine

        engine = TaskGradientEngine(params, mode=args.task_gradients,
                                    subset=parameter_subset(adapter.model, args.task_gradient_subset))
    # One generator draws every timestep and noise tensor; each process has its own stream.
    generator = torch.Generator(device=accelerator.device).manual_seed((args.seed or 0) * 1000 + accelerator.process_index)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in public_config(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
        intervals.save(os.path.join(args.output_dir, "timestep_intervals.json"))
        with open(os.path.join(args.output_dir, "training_config.json"), "w") as f:
            json.dump(public_config(args), f, indent=2)
        if weighting is not None:
            with open(os.path.join(args.output_dir, "weighting_config.json"), "w") as f:
                json.dump({"name": args.mtl_method, **weighting.config.to_dict()}, f, indent=2)
    logger.info("timestep clusters (%s): %s", args.clustering, intervals.bounds)

    def trainer_state(step):
        return {"global_step": step, "generator": generator.get_state(),
                "ema": ema.state_dict() if ema is not None else None,
                "weighting": weighting.state_dict() if weighting is not None else None,
                "config": public_config(args)}

    global_step = 0
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
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
            ema.load_state_dict(state["ema"])
        if weighting is not None:
            weighting.load_state_dict(state["weighting"])

    # ---------------------------------------------------------------- the loop
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
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
        for batch in batches:
            with accelerator.accumulate(model):
                logs = training_step(accelerator, objective, model, batch, generator, num_tasks,
                                         weighting=weighting, engine=engine)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            # ---- one optimizer update done
            if ema is not None:
                ema.step(params)
            global_step += 1
            progress.update(1)
            record = {"loss": logs["loss"].item(), "lr": lr_scheduler.get_last_lr()[0]}
            for i in range(num_tasks):
                if logs["counts"][i] > 0:
                    record[f"task_loss/{i}"] = logs["task_losses"][i].item()
                if logs["weights"] is not None:
                    record[f"task_weight/{i}"] = logs["weights"][i].item()
            progress.set_postfix(loss=f"{record['loss']:.4f}",
                                 w=None if logs["weights"] is None else " ".join(f"{w:.2f}" for w in logs["weights"].tolist()))
            accelerator.log(record, step=global_step)

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
    progress.close()

    # ---------------------------------------------------------------- outputs
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(args, accelerator, adapter, model, ema, params, intervals, global_step, validation_inputs)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return args.output_dir


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

    with _ema_weights(ema, params):
        return log_and_save_samples(args, accelerator, adapter, accelerator.unwrap_model(model), step, inputs)


def finish(args, accelerator, adapter, model, ema, params, intervals, global_step, validation_inputs):
    """Save the pipeline (or LoRA weights), samples, model card; push to the Hub if asked."""
    from ..hub import push_to_hub, write_model_card

    unwrapped = accelerator.unwrap_model(model)
    with _ema_weights(ema, params):
        adapter.save(args.output_dir, unwrapped, lora=args.rank is not None)
        images, _ = validate(args, accelerator, adapter, model, None, params, global_step, validation_inputs)
    summary = {
        "model_type": args.model_type, "mtl_method": args.mtl_method, "clustering": args.clustering,
        "num_clusters": len(intervals), "intervals": [list(b) for b in intervals.bounds],
        "timestep_sampling": args.timestep_sampling, "loss_weighting": args.loss_weighting,
        "max_train_steps": global_step, "train_batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate, "lora_rank": args.rank, "use_ema": args.use_ema,
        "resolution": pixel_resolution(adapter),
    }
    write_model_card(args.output_dir, repo_id=args.hub_model_id, base_model=args.pretrained_model_name_or_path,
                     model_type=args.model_type, method_summary=summary, dataset_name=args.dataset_name,
                     images=images, lora=args.rank is not None)
    if args.push_to_hub:
        url = push_to_hub(args.output_dir, args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                          token=args.hub_token, private=args.hub_private_repo)
        accelerator.print(f"pushed to {url}")
