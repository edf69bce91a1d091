"""Peak memory and ANT's step-time cost of one LoRA training step per model family (issue 16, "Measured").

    python train_scripts/benchmark_families.py --output_dir bench-families            # the full run
    python train_scripts/benchmark_families.py --quick --families sd3 --output_dir q  # a smoke test

For each of `sdxl`, `sd3`, `flux`, `qwenimage` (and the old `sd` for reference), at the `tiny` preset
(`--model_config_name_or_path tiny`), through the trainer's own code path: the model is loaded, LoRA is
added and the frozen parts are cast exactly as `train_ant.py` does (`training.loop.prepare_model`), the
timestep sampler, clusters and objective come from the trainer's own argument parser and components
(`parse_args`, `build_intervals`, `build_sampler`, `DiffusionObjective`), the batches from its data
loader (`mnist5k_captions`, centre-cropped), and one step is `benchmark_weighting.Runner.step`
(`training.step.training_step`, gradient clipping, AdamW, zero_grad). Measured:

1. **Memory** of one vanilla LoRA step (after one warm-up step, so the optimizer state exists), in
   fp32 and under `--mixed_precision bf16` (frozen parts in bf16, as the trainer does), without and
   with caching (`--cache_latents`, plus `--cache_text_embeddings` where the family supports it; flux
   does not yet): the cache is built with `training.caching.build_training_cache` and the encoders are
   dropped with the adapter's `free_text_encoders` / `free_vae_encoder`, as `free_encoders` does.
   - On CUDA: `torch.cuda.max_memory_allocated` over the step (absolute: every live tensor counts).
   - On CPU, where torch keeps no allocator statistics: the bytes of the tensors resident before the
     step (every parameter and buffer of the denoiser and the frozen components, the optimizer state;
     storages counted once) plus the peak of the step's own allocations, read from `torch.profiler`'s
     memory events (`profile_memory=True`: every allocation and free of the step, in time order; their
     running sum's maximum). The `measure` field of the JSON says which.
   The cache itself lives on disk (as in the trainer) and is reported apart (`cache_mb`), not in the peak.
2. **Parameters** of each component (denoiser, LoRA, VAE, text encoders) at the tiny preset, and the
   measured bytes per denoiser parameter, scaled to the real checkpoints' denoiser sizes (the named
   constants below). This scaling is a rough estimate: at the tiny preset activations and encoders
   weigh far more per denoiser parameter than in a real checkpoint; the README puts it beside
   diffusers' documented figures.
3. **Time**: vanilla (`--mtl_method none`), ANT + UW and ANT + PCGrad on the LoRA subset
   (`--task_gradient_subset lora`), fp32 (bf16 on CUDA), interleaved on one shared model by
   `benchmark_weighting.time_runners` (the same harness as the weighting benchmark): median over
   `--steps` rounds after `--warmup`, as ratios to vanilla; one run.

4. **A quantized base** (`--quantize_base nf4|int8`, bitsandbytes, `models/quantization.py`): the tiny
   denoiser saved and loaded back through diffusers' `from_pretrained(..., quantization_config=...)` as the
   trainer loads it (on a CPU through `cpu_quantized_load`), its bytes counted (the packed 4-bit or int8
   weights, their block scales and double-quantization state, the unquantized rest in bf16); and, for the
   real checkpoint, its denoiser built on the meta device from its published config (`REAL_DENOISERS`,
   no weights), its Linear layers replaced as diffusers replaces them, and one real bitsandbytes layer of
   each distinct shape quantized on the CPU and counted: measured bytes per parameter at the real layer
   widths, scaled to the real layer list. The same per-shape sum applied to the tiny model must equal its
   measured load (`tiny_by_shapes_bytes`). Columns: the real checkpoint's weights with a bf16 LoRA run's
   denoiser in nf4 / int8, cached (`--cache_latents --cache_text_embeddings`).

Output: `benchmark_families.json` and `benchmark_families.md` in `--output_dir`, both with the command
line. `--quick`: fp32 only, one warm-up and one timed round, batch 2, no quantized base, for the tests.
`--no_timing`: skip part 3 (timings are only worth taking on an idle machine) and carry the step times
of the `benchmark_families.json` already in `--output_dir` over, with the command that measured them.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_weighting import Runner, sync, time_runners  # noqa: E402  (one timing harness, reused)

FAMILIES = ("sd", "sdxl", "sd3", "flux", "qwenimage")
METHODS = ("none", "uw", "pcgrad")  # vanilla, ANT loss-based, ANT gradient-based on the LoRA subset
PRECISIONS = {"fp32": "no", "bf16": "bf16"}

# Parameter counts of the checkpoints people fine-tune, by component (what the README scales to).
# Denoisers, as their authors state them:
SD15_UNET_PARAMS = 860_000_000  # SD 1.5 UNet: "860M UNet" (CompVis/stable-diffusion model card; Rombach et al. 2022)
SDXL_UNET_PARAMS = 2_600_000_000  # SDXL base UNet: 2.6B (Podell et al. 2023, the SDXL paper, Table 1)
SD35_LARGE_TRANSFORMER_PARAMS = 8_100_000_000  # SD3.5-Large MMDiT: "8.1 billion parameters" (stabilityai model card)
FLUX1_DEV_TRANSFORMER_PARAMS = 12_000_000_000  # "12 billion parameter rectified flow transformer" (FLUX.1-dev model card)
QWEN_IMAGE_TRANSFORMER_PARAMS = 20_000_000_000  # "20B MMDiT" (Qwen-Image model card / technical report, 2025)
# Frozen encoders, approximate (papers and the checkpoints' safetensors sizes on the Hub):
CLIP_L_TEXT_PARAMS = 123_000_000  # CLIP ViT-L/14 text tower: "123M text encoder" (SD 1.5 model card)
OPENCLIP_BIGG_TEXT_PARAMS = 695_000_000  # OpenCLIP ViT-bigG/14 text tower: SDXL's 817M text encoders minus CLIP-L
T5_XXL_ENCODER_PARAMS = 4_760_000_000  # T5 v1.1 XXL encoder half (SD3 paper: 4.7B; text_encoder_3 of SD3.5 / FLUX.1)
QWEN25_VL_7B_PARAMS = 8_290_000_000  # Qwen2.5-VL-7B-Instruct, Qwen-Image's text encoder (its Hub model card: 8.29B)
SD_VAE_PARAMS = 83_650_000  # AutoencoderKL of SD 1.x / SDXL / SD3 / FLUX.1 (4- or 16-channel latents, about 84M)
QWEN_IMAGE_VAE_PARAMS = 127_000_000  # AutoencoderKLQwenImage (the Wan-2.1 VAE, about 127M)
REAL_CHECKPOINTS = {  # family -> (checkpoint, denoiser, text encoders, VAE)
    "sd": ("stable-diffusion-v1-5", SD15_UNET_PARAMS, CLIP_L_TEXT_PARAMS, SD_VAE_PARAMS),
    "sdxl": ("stable-diffusion-xl-base-1.0", SDXL_UNET_PARAMS, CLIP_L_TEXT_PARAMS + OPENCLIP_BIGG_TEXT_PARAMS,
             SD_VAE_PARAMS),
    "sd3": ("stable-diffusion-3.5-large", SD35_LARGE_TRANSFORMER_PARAMS,
            CLIP_L_TEXT_PARAMS + OPENCLIP_BIGG_TEXT_PARAMS + T5_XXL_ENCODER_PARAMS, SD_VAE_PARAMS),
    "flux": ("FLUX.1-dev", FLUX1_DEV_TRANSFORMER_PARAMS, CLIP_L_TEXT_PARAMS + T5_XXL_ENCODER_PARAMS, SD_VAE_PARAMS),
    "qwenimage": ("Qwen-Image", QWEN_IMAGE_TRANSFORMER_PARAMS, QWEN25_VL_7B_PARAMS, QWEN_IMAGE_VAE_PARAMS),
}


# The real denoisers' configs (their checkpoints' config.json, diffusers' class defaults where those are
# the checkpoint's): built on the meta device, no weights, to list their Linear layers. The parameter
# counts they give match the constants above (SD 1.5 0.86B, SDXL 2.57B, SD3.5-Large 8.06B, FLUX.1-dev
# 11.9B, Qwen-Image 20.4B).
REAL_DENOISERS = {
    "sd": ("UNet2DConditionModel", {"sample_size": 64, "cross_attention_dim": 768}),
    "sdxl": ("UNet2DConditionModel", {
        "sample_size": 128, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20), "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816}),
    "sd3": ("SD3Transformer2DModel", {  # stable-diffusion-3.5-large
        "sample_size": 128, "num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38,
        "joint_attention_dim": 4096, "caption_projection_dim": 2432, "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192, "qk_norm": "rms_norm"}),
    "flux": ("FluxTransformer2DModel", {"guidance_embeds": True}),  # FLUX.1-dev
    "qwenimage": ("QwenImageTransformer2DModel", {}),
}
QUANTIZE_KINDS = ("nf4", "int8")


def reset_accelerate_state():
    """One process builds several Accelerators (fp32, bf16): Accelerate's state is a singleton."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def trainer_args(family, opts, precision="no", method="none", cached=False, text_cache=False):
    """The trainer's own parsed and validated arguments for one configuration (train_ant.py's parser)."""
    from diffusers_ant.training import parse_args

    argv = ["--model_type", family, "--model_config_name_or_path", "tiny", "--resolution", str(opts.resolution),
            "--dataset_name", "mnist5k_captions", "--train_batch_size", str(opts.batch_size),
            "--max_train_samples", str(opts.samples), "--center_crop",
            "--num_clusters", str(opts.num_clusters), "--mixed_precision", precision, "--seed", "0",
            "--report_to", "none", "--output_dir", os.path.join(opts.output_dir, "run")]
    if method != "none":
        argv += ["--mtl_method", method]
        if method == "pcgrad":
            # the split engine, as the committed results (docs/benchmark_families) were measured before the
            # trainer's default became `auto` (which takes the batched engine on these models' LoRA subset)
            argv += ["--task_gradient_subset", "lora", "--task_gradients", "split"]
    if cached:
        argv += ["--cache_latents"] + (["--cache_text_embeddings"] if text_cache else [])
    args = parse_args(argv)
    # LoRA on the tiny preset's random base: the trainer refuses --rank without a pretrained model (a LoRA
    # on an untrained base is useless), but a step's memory and time do not depend on the base's values,
    # and saving a tiny pipeline only to load it back would cost the smoke test seconds.
    args.rank, args.finetune = opts.rank, "lora"  # what validate_args sets for --rank
    return args


def module_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or shared weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class FamilyContext:
    """What `training.loop.train` sets up before its loop, for one family and precision, built from the
    trainer's own pieces: the adapter, `prepare_model` (LoRA, frozen parts cast), the data loader, the
    AdamW optimizer over the LoRA parameters, `accelerator.prepare`. Attribute names are those
    `benchmark_weighting.Runner.step` reads (accelerator, model, params, optimizer, generator)."""

    def __init__(self, family, precision, opts):
        from accelerate import Accelerator

        from diffusers_ant.data import make_train_dataloader, resolve_columns
        from diffusers_ant.data.toy import make_toy_caption_dataset
        from diffusers_ant.models import get_model_adapter
        from diffusers_ant.training.components import pixel_resolution
        from diffusers_ant.training.loop import data_needs, prepare_model

        reset_accelerate_state()
        self.family, self.precision, self.opts = family, precision, opts
        self.args = trainer_args(family, opts, precision)
        self.accelerator = Accelerator(mixed_precision=precision, cpu=opts.device == "cpu")
        self.device = self.accelerator.device
        torch.manual_seed(0)
        args = self.args
        adapter_class = get_model_adapter(family)
        # as training.loop.train loads it
        self.adapter = adapter_class.load(
            model_config_name_or_path="tiny", resolution=args.resolution, prediction_type=args.prediction_type,
            noise_scheduler=args.noise_scheduler, flow_shift=args.flow_shift,
            **(adapter_class.options_from_args(args) if hasattr(adapter_class, "options_from_args") else {}))
        self.text_cache = self.adapter.supports_text_caching
        prepare_model(args, self.accelerator, self.adapter)  # LoRA, frozen parts in the weight dtype
        self.parameters = {"denoiser": module_params(self.adapter.model),
                           "lora": sum(p.numel() for n, p in self.adapter.model.named_parameters() if "lora_" in n),
                           **{name: module_params(m) for name, m in self.adapter.frozen_modules().items()}}
        self.parameters["denoiser"] -= self.parameters["lora"]
        # the first rows of `mnist5k_captions` (its own builder: building all 5,000 rows costs seconds)
        dataset = make_toy_caption_dataset(num_samples=args.max_train_samples)
        columns = resolve_columns(dataset, **data_needs(args))
        self.loader = make_train_dataloader(
            dataset, columns, resolution=pixel_resolution(self.adapter), batch_size=args.train_batch_size,
            num_channels=self.adapter.num_channels, seed=args.seed, **self.adapter.data_options(),
            center_crop=True, max_samples=args.max_train_samples)
        self.params = self.adapter.trainable_parameters()
        optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.model, self.optimizer = self.accelerator.prepare(self.adapter.model, optimizer)
        self.generator = torch.Generator(device=self.device).manual_seed(0)
        self.cache_mb, self.cache = 0.0, None

    def batches(self, count):
        """`count` batches of the trainer's loader (after caching they carry the cached entries)."""
        out = []
        while len(out) < count:
            for batch in self.loader:
                out.append({k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
                if len(out) == count:
                    break
        return out

    def cache_and_free(self):
        """`--cache_latents` (+ `--cache_text_embeddings` where supported): encode the data once, drop
        the VAE encoder and the text encoders (as `training.caching.free_encoders`, without its stash:
        a benchmark writes no pipeline)."""
        from diffusers_ant.training.caching import build_training_cache

        args = trainer_args(self.family, self.opts, self.precision, cached=True, text_cache=self.text_cache)
        cache = self.cache = build_training_cache(args, self.accelerator, self.adapter, self.loader.dataset,
                                                  args.train_batch_size)
        self.cache_mb = cache.nbytes() / 2**20
        if self.text_cache:
            self.adapter.free_text_encoders()
        self.adapter.free_vae_encoder()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def resident_bytes(self, runner) -> dict:
        """Bytes of every tensor the step starts with, by part: the denoiser's frozen base parameters, its
        LoRA (parameters, the optimizer state, the weighting's own parameters), each frozen component's
        parameters (a freed VAE encoder no longer counts), and all buffers together (positional tables,
        which do not grow with the parameter count)."""
        model = self.adapter.model
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        lora_ids = {id(p) for p in lora}
        frozen = self.adapter.frozen_modules()
        parts = {"denoiser": tensor_bytes([p for p in model.parameters() if id(p) not in lora_ids]),
                 "lora_and_optimizer": tensor_bytes(
                     lora + [v for state in self.optimizer.state.values() for v in state.values()]
                     + (list(runner.weighting.parameters()) if runner.weighting is not None else [])),
                 **{name: tensor_bytes(module.parameters()) for name, module in frozen.items()},
                 "buffers": tensor_bytes([b for m in (model, *frozen.values()) for b in m.buffers()])}
        return parts


class FamilyRunner(Runner):
    """`benchmark_weighting.Runner` (its `step` is the trainer's step) with the family's objective: the
    intervals, sampler and `DiffusionObjective` built from the trainer's arguments as `training.loop.train`
    builds them (flow matching's density and loss weight, SD3's preconditioning), and the task-gradient
    engine on the LoRA subset for gradient-based methods."""

    def __init__(self, method, context: FamilyContext):  # not super().__init__: it builds the UNet benchmark's objective
        from diffusers_ant.schedule import num_train_timesteps
        from diffusers_ant.training.components import (build_intervals, build_sampler, build_task_gradient_engine,
                                                       method_options)
        from diffusers_ant.training.step import DiffusionObjective
        from diffusers_ant.weighting import get_weighting

        self.method, self.context = method, context
        args = trainer_args(context.family, context.opts, context.precision, method)
        scheduler = context.adapter.noise_scheduler
        num_timesteps = num_train_timesteps(scheduler)
        intervals = build_intervals(args, scheduler)
        self.objective = DiffusionObjective(
            context.adapter, scheduler, build_sampler(args, intervals, num_timesteps), intervals,
            prediction_type=args.prediction_type, loss_weighting=args.loss_weighting, snr_gamma=args.snr_gamma,
            p2_k=args.p2_k, p2_gamma=args.p2_gamma, noise_offset=args.noise_offset,
            weighting_scheme=args.weighting_scheme, precondition_outputs=bool(args.precondition_outputs))
        self.weighting = None
        self.engine = None
        if method != "none":
            self.weighting = get_weighting(method, self.objective.num_tasks,
                                           **method_options(args, len(context.loader))).to(context.device)
        if self.weighting is not None and self.weighting.needs_task_gradients:
            self.engine = build_task_gradient_engine(context.adapter, context.params, args.task_gradients,
                                                     args.task_gradient_subset)
        groups = self.weighting.param_groups() if hasattr(self.weighting, "param_groups") else []
        self.extra_optimizer = torch.optim.AdamW(groups) if groups else None


def step_memory(context: FamilyContext, runner: FamilyRunner, batch) -> dict:
    """Peak memory of one training step (see the module docstring for the two measures)."""
    gc.collect()
    device = context.device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step(batch)
        sync(device)
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "measure": "cuda_max_memory_allocated",
                "resident_bytes": context.resident_bytes(runner), "cache_mb": context.cache_mb}
    from torch.profiler import ProfilerActivity, profile

    parts = context.resident_bytes(runner)
    resident = sum(parts.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(batch)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"peak_mb": (resident + peak) / 2**20, "resident_mb": resident / 2**20, "step_peak_mb": peak / 2**20,
            "resident_bytes": parts, "measure": "cpu_resident_tensors_plus_profiler_peak", "cache_mb": context.cache_mb}


def checkpointed_step_memory(context: FamilyContext, runner: FamilyRunner, batch) -> dict:
    """`step_memory` with `--gradient_checkpointing` on (the adapter's `enable_gradient_checkpointing`, as
    `training.loop.train` turns it on), then off again. What it saves is the difference of the two steps'
    peaks: activations recomputed in the backward pass instead of kept from the forward pass."""
    context.adapter.enable_gradient_checkpointing()
    try:
        runner.step(batch)  # one step with checkpointing before measuring (its wrappers are built lazily)
        return step_memory(context, runner, batch)
    finally:
        context.adapter.model.disable_gradient_checkpointing()


def adam_state_bytes(params, eight_bit: bool) -> int:
    """Bytes of the optimizer state after one step over copies of `params` (the model is not touched):
    torch's AdamW (two fp32 moments per parameter), or bitsandbytes' AdamW8bit as `--use_8bit_adam` builds
    it (uint8 moments with one fp32 scale per block of 256; tensors under 4,096 elements stay in fp32, and
    each quantized tensor carries two 256-entry code tables)."""
    copies = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    for copy in copies:
        copy.grad = torch.ones_like(copy)
    if eight_bit:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(copies, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(copies, lr=1e-4)
    optimizer.step()
    # the per-parameter state only: a scalar step counter per tensor is not memory that scales
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)


def real_adam_state_per_parameter() -> dict:
    """The optimizer state per parameter of a weight the size of the real checkpoints' (a 3072 x 3072
    projection, FLUX.1's and SD3.5-Large's width), for each optimizer: what a full fine-tune pays."""
    weight = [torch.zeros(3072, 3072)]
    return {name: adam_state_bytes(weight, eight_bit) / weight[0].numel()
            for name, eight_bit in (("adamw", False), ("adamw_8bit", True))}


def measure_family(family, opts) -> dict:
    """Memory (per precision, uncached then cached) and step times (first precision) of one family."""
    result = {"memory": {}, "parameters": None, "seconds_per_step": None}
    for i, name in enumerate(opts.precisions):
        context = FamilyContext(family, PRECISIONS[name], opts)
        result["parameters"] = context.parameters
        result["text_caching"] = context.text_cache
        vanilla = FamilyRunner("none", context)
        timed = name == opts.time_precision and not opts.no_timing
        warm, uncached_batch, *timing_batches = context.batches(2 + (opts.warmup + opts.steps if timed else 0))
        vanilla.step(warm)  # optimizer state
        memory = {"uncached": step_memory(context, vanilla, uncached_batch)}
        if timed:
            runners = {"none": vanilla, **{m: FamilyRunner(m, context) for m in METHODS if m != "none"}}
            medians, raw = time_runners(runners, timing_batches, opts.warmup, context.device, label=f"{family} {name}")
            result["time_precision"] = name
            result["seconds_per_step"] = medians
            result["ratio_to_vanilla"] = {m: t / medians["none"] for m, t in medians.items()}
            result["all_step_seconds"] = raw
        context.cache_and_free()
        warm, cached_batch = context.batches(2)
        vanilla.step(warm)  # the first step after freeing (any lazily re-laid-out buffer settles)
        memory["cached"] = step_memory(context, vanilla, cached_batch)
        if not opts.quick:
            # what --gradient_checkpointing and --use_8bit_adam save; checkpointing beside the cached step,
            # whose peak is the denoiser's forward and backward (uncached, encoding the batch can set it)
            result.setdefault("memory_savers", {})[name] = {
                "gradient_checkpointing": checkpointed_step_memory(context, vanilla, cached_batch),
                "adam_state_bytes": {"adamw": adam_state_bytes(context.params, eight_bit=False),
                                     "adamw_8bit": adam_state_bytes(context.params, eight_bit=True)
                                     if importlib.util.find_spec("bitsandbytes") else None}}
        result["memory"][name] = memory
        print(f"[{family} {name}] peak {memory['uncached']['peak_mb']:.2f} MiB, cached {memory['cached']['peak_mb']:.2f} MiB",
              file=sys.stderr)
        context.cache.remove_files()  # (the trainer deletes its cache when training ends)
        del context, vanilla
        gc.collect()
    result["real_checkpoint"] = real_estimate(family, result)
    if opts.quantized:
        result["quantized_base"] = measure_quantized_base(family, opts, opts.layer_bytes)
        result["real_checkpoint"]["weights_gb_bf16_lora_cached"] = quantized_weights_gb(result)
    reset_accelerate_state()
    return result


def quantized_tensors(module):
    """Every parameter of a module, with bitsandbytes' quantization state (a 4-bit weight's block scales
    and their double-quantization state, an int8 weight's row scales); buffers (positional tables) are
    not weights and are left out, as in part 2's bytes per parameter."""
    out = list(module.parameters())
    stack = [getattr(p, "quant_state", None) for p in module.parameters()]
    out += [getattr(p, "SCB", None) for p in module.parameters()]
    while stack:
        state = stack.pop()
        if state is None:
            continue
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif type(value).__name__ == "QuantState":
                stack.append(value)
    return [t for t in out if isinstance(t, torch.Tensor)]


class QuantizedLayerBytes:
    """Bytes of one bitsandbytes layer of a given shape, quantized on the CPU (random bf16 weights: the
    storage does not depend on the values), measured once per (kind, shape)."""

    def __init__(self):
        self.cache = {}

    def __call__(self, kind, in_features, out_features) -> int:
        key = (kind, in_features, out_features)
        if key not in self.cache:
            import bitsandbytes as bnb

            from diffusers_ant.models.quantization import quantization_config

            config = quantization_config(kind, torch.bfloat16)
            if kind == "nf4":
                layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                          quant_type="nf4", compress_statistics=config.bnb_4bit_use_double_quant)
            else:
                layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
            layer.weight.data = torch.randn(out_features, in_features, dtype=torch.bfloat16)
            if kind == "int8":
                layer.weight.data = layer.weight.data.half()  # bitsandbytes' int8 quantizer reads fp16
            layer = layer.to("cpu")  # quantizes (bitsandbytes >= 0.46 on the CPU)
            self.cache[key] = tensor_bytes(quantized_tensors(layer))
            del layer
        return self.cache[key]


def bnb_linear_shapes(model, kind) -> list:
    """(in, out, bias) of each Linear that diffusers' `replace_with_bnb_linear` turns into a bitsandbytes
    layer (all but the class's `_keep_in_fp32_modules`), applied to `model` (meta or real) in place."""
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    from diffusers_ant.models.quantization import quantization_config

    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    model = replace_with_bnb_linear(model, modules_to_not_convert=keep,
                                    quantization_config=quantization_config(kind, torch.bfloat16))
    layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(m.in_features, m.out_features, m.bias is not None) for m in model.modules() if isinstance(m, layers)]


def shape_sum_bytes(shapes, total_params, kind, layer_bytes, rest_bytes_per_param=2) -> int:
    """A denoiser's weights with its converted Linear layers quantized: the measured bytes of each layer's
    quantized weight, plus every other parameter (biases, norms, convolutions, embeddings) in bf16."""
    quantized = sum(layer_bytes(kind, i, o) for i, o, _ in shapes)
    other = total_params - sum(i * o for i, o, _ in shapes)
    return quantized + rest_bytes_per_param * other


def measure_quantized_base(family, opts, layer_bytes) -> dict:
    """Part 4 of the module docstring for one family: the tiny denoiser through diffusers' quantized load,
    and the real checkpoint's denoiser by its layer shapes."""
    import tempfile

    import diffusers
    from accelerate import init_empty_weights

    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.models.quantization import cpu_quantized_load, quantization_config, quantized_load_kwargs

    adapter_class = get_model_adapter(family)
    torch.manual_seed(0)
    tiny = adapter_class.load(model_config_name_or_path="tiny", resolution=opts.resolution).model
    tiny_params = module_params(tiny)
    result = {"tiny_denoiser_parameters": tiny_params, "tiny": {}, "real": {}}
    with tempfile.TemporaryDirectory() as folder:
        tiny.save_pretrained(folder)
        for kind in QUANTIZE_KINDS:
            # as the trainer loads --quantize_base (models/base.py PretrainedSource.load)
            config = quantization_config(kind, torch.bfloat16)
            with cpu_quantized_load():
                loaded = type(tiny).from_pretrained(folder, **quantized_load_kwargs(config))
            measured = tensor_bytes(quantized_tensors(loaded))
            shapes = bnb_linear_shapes(type(tiny).from_config(tiny.config), kind)
            result["tiny"][kind] = {
                "bytes": measured, "bytes_per_parameter": measured / tiny_params, "quantized_layers": len(shapes),
                "tiny_by_shapes_bytes": shape_sum_bytes(shapes, tiny_params, kind, layer_bytes)}
            del loaded
    name, real_kwargs = REAL_DENOISERS[family]
    for kind in QUANTIZE_KINDS:
        with init_empty_weights():
            real = getattr(diffusers, name)(**real_kwargs)
        real_params = module_params(real)
        shapes = bnb_linear_shapes(real, kind)
        total = shape_sum_bytes(shapes, real_params, kind, layer_bytes)
        quantized_weights = sum(i * o for i, o, _ in shapes)
        result["real"][kind] = {
            "denoiser_parameters": real_params, "quantized_weight_parameters": quantized_weights,
            "quantized_layers": len(shapes), "bytes": total, "bytes_per_parameter": total / real_params,
            "bytes_per_quantized_weight": sum(layer_bytes(kind, i, o) for i, o, _ in shapes) / quantized_weights,
            "denoiser_gb": total / 2**30}
        del real
    gc.collect()
    return result


def quantized_weights_gb(result) -> dict:
    """The real checkpoint's weights on the device in a bf16 LoRA run, cached, with its denoiser in nf4 /
    int8: the bf16 cached estimate with the denoiser's bf16 bytes replaced by the quantized ones."""
    real, quantized = result["real_checkpoint"], result.get("quantized_base")
    if quantized is None or "bf16" not in real["weights_gb"]:
        return {}
    bf16_denoiser = real["denoiser_parameters"] * real["bytes_per_parameter"]["bf16"]["cached"]["denoiser"]
    out = {}
    for kind, q in quantized["real"].items():
        per_param = q["bytes_per_parameter"]  # measured on the real architecture's own layer list
        out[kind] = real["weights_gb"]["bf16"]["cached"] + (real["denoiser_parameters"] * per_param - bf16_denoiser) / 2**30
    out["bf16"] = real["weights_gb"]["bf16"]["cached"]
    return out


def real_estimate(family, result) -> dict:
    """The measured bytes per parameter of each part (denoiser base, text encoders, VAE; measured, so the
    weight dtype and a freed VAE encoder are in them) times the real checkpoint's parameter counts:
    the memory of the model's weights on the device. LoRA, optimizer state and activations are not
    scaled (they depend on the rank, the resolution and the batch; see the measured figures)."""
    name, denoiser, text, vae = REAL_CHECKPOINTS[family]
    params = result["parameters"]
    text_params = sum(v for k, v in params.items() if k.startswith("text_encoder"))
    estimate = {"name": name, "denoiser_parameters": denoiser, "text_encoder_parameters": text,
                "vae_parameters": vae, "bytes_per_parameter": {}, "weights_gb": {}}
    for precision, memory in result["memory"].items():
        for kind, m in memory.items():
            parts = m["resident_bytes"]
            text_bytes = sum(v for k, v in parts.items() if k.startswith("text_encoder"))
            bpp = {"denoiser": parts["denoiser"] / params["denoiser"],
                   "text_encoders": text_bytes / text_params if text_params else 0.0,
                   "vae": parts.get("vae", 0) / params["vae"] if params.get("vae") else 0.0}
            estimate["bytes_per_parameter"].setdefault(precision, {})[kind] = bpp
            estimate["weights_gb"].setdefault(precision, {})[kind] = (
                denoiser * bpp["denoiser"] + text * bpp["text_encoders"] + vae * bpp["vae"]) / 2**30
    return estimate


def markdown(report) -> str:
    lines = [f"Command: `{report['command']}`", "",
             f"Device {report['device']} ({report['threads']} threads), tiny presets at {report['resolution']} px, "
             f"batch {report['batch_size']}, LoRA rank {report['rank']}, K = {report['num_clusters']}; "
             f"memory measure: {report['memory_measure']}.", "",
             "Peak MiB: one vanilla LoRA training step at the tiny preset (model, optimizer state and the step's "
             "own allocations; the CPU-side cache not included). Cached: `--cache_latents` plus "
             "`--cache_text_embeddings` where the family supports it (latents only where marked). Real "
             "checkpoint, its weights on the device: its parameter counts times the bytes per parameter "
             "measured for each part (denoiser, text encoders, VAE) in that precision and caching state; "
             "LoRA, optimizer state and activations are not in it (they depend on rank, resolution and batch).", "",
             "| family | precision | denoiser params | LoRA params | encoder params | peak MiB | cached peak MiB | "
             "real checkpoint | its weights on the device, GiB | cached |"
             + (" bf16 LoRA with --quantize_base nf4 (cached) | with int8 (cached) |" if report.get("quantized") else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if report.get("quantized") else "")]
    for family, r in report["families"].items():
        p = r["parameters"]
        encoders = sum(v for k, v in p.items() if k not in ("denoiser", "lora"))
        real = r["real_checkpoint"]
        for name, mem in r["memory"].items():
            gb = real["weights_gb"][name]
            lines.append(f"| {family} | {name} | {p['denoiser']:,} | {p['lora']:,} | {encoders:,} | "
                         f"{mem['uncached']['peak_mb']:.2f} | {mem['cached']['peak_mb']:.2f} | {real['name']} "
                         f"({real['denoiser_parameters'] / 1e9:.1f}B + {real['text_encoder_parameters'] / 1e9:.2f}B text) "
                         f"| {gb['uncached']:.1f} | {gb['cached']:.1f}{'' if r['text_caching'] else ' (latents only)'} |"
                         + (quantized_cells(r, name) if report.get("quantized") else ""))
    if report.get("quantized"):
        lines += quantized_markdown(report)
    lines += savers_markdown(report)
    timing = report.get("timing_command")
    lines += ["", f"Step time relative to vanilla (median of {report['steps']} rounds after {report['warmup']} warm-up, "
              "one run" + (f"; measured by `{timing}`, carried over by `--no_timing`" if timing else "") + "):", "", "| family | precision | vanilla s / step | ANT + UW | ANT + PCGrad (LoRA subset) |",
              "|---|---|---|---|---|"]
    for family, r in report["families"].items():
        if r.get("ratio_to_vanilla") is None:
            lines.append(f"| {family} | - | not measured (--no_timing) | | |")
            continue
        ratio = r["ratio_to_vanilla"]
        lines.append(f"| {family} | {r['time_precision']} | {r['seconds_per_step']['none']:.3f} | "
                     f"{ratio['uw']:.2f}x | {ratio['pcgrad']:.2f}x |")
    return "\n".join(lines) + "\n"


def savers_markdown(report) -> list:
    """What `--gradient_checkpointing` and `--use_8bit_adam` save (empty for a --quick report)."""
    rows = [(family, name, saver) for family, r in report["families"].items()
            for name, saver in (r.get("memory_savers") or {}).items()]
    if not rows:
        return []
    lines = ["", "What `--gradient_checkpointing` and `--use_8bit_adam` save, measured the same way (cached, "
             "where the step's peak is the denoiser's forward and backward; checkpointing saves the activations kept for the "
             "backward pass, so its share grows with resolution and batch; 8-bit Adam: the optimizer state of "
             "this LoRA, whose small tensors bitsandbytes keeps in fp32):", "",
             "| family | precision | cached peak MiB | with --gradient_checkpointing | saved | LoRA AdamW state KiB "
             "| with --use_8bit_adam |", "|---|---|---|---|---|---|---|"]
    for family, name, saver in rows:
        plain = report["families"][family]["memory"][name]["cached"]["peak_mb"]
        checkpointed = saver["gradient_checkpointing"]["peak_mb"]
        adam = saver["adam_state_bytes"]
        eight = f"{adam['adamw_8bit'] / 1024:.1f}" if adam.get("adamw_8bit") is not None else "-"
        own = report["families"][family]["memory"][name]["cached"].get("step_peak_mb")  # CPU measure only
        of_step = f", {(plain - checkpointed) / own:.0%} of the step's own" if own else ""
        lines.append(f"| {family} | {name} | {plain:.2f} | {checkpointed:.2f} | {plain - checkpointed:.2f} MiB "
                     f"({(plain - checkpointed) / plain:.0%} of the peak{of_step}) | {adam['adamw'] / 1024:.1f} | {eight} |")
    per_param = report.get("real_adam_state_bytes_per_parameter")
    if per_param:
        lines += ["", f"A full fine-tune's optimizer state, per parameter of a 3072 x 3072 weight (measured): AdamW "
                  f"{per_param['adamw']:.2f} bytes, AdamW8bit {per_param['adamw_8bit']:.3f}; for each real denoiser "
                  "trained in full (its parameter count times these):", "",
                  "| real denoiser | AdamW state GiB | with --use_8bit_adam | saved |", "|---|---|---|---|"]
        for family, r in report["families"].items():
            real = r["real_checkpoint"]
            adamw, eight = (real["denoiser_parameters"] * per_param[k] / 2**30 for k in ("adamw", "adamw_8bit"))
            lines.append(f"| {real['name']} ({real['denoiser_parameters'] / 1e9:.2f}B) | {adamw:.1f} | {eight:.1f} "
                         f"| {adamw - eight:.1f} |")
    return lines


def quantized_cells(r, precision) -> str:
    gb = r["real_checkpoint"].get("weights_gb_bf16_lora_cached") or {}
    if precision != "bf16" or "nf4" not in gb:
        return " - | - |"
    return f" {gb['nf4']:.1f} | {gb['int8']:.1f} |"


def quantized_markdown(report) -> list:
    lines = ["", "A quantized base (`--quantize_base`), the denoiser's weights only: bytes per parameter measured "
             "through bitsandbytes' layers on this CPU (tiny: the tiny denoiser loaded by diffusers with the "
             "`quantization_config`; real: the real denoiser's Linear layers, built on the meta device from its "
             "config, one real quantized layer per distinct shape; the rest of the denoiser in bf16), and the "
             "real denoiser's GiB. Quantized share: the real denoiser's parameters in converted Linear weights "
             "(convolutions, norms, biases and embeddings stay bf16). Each 4-bit layer also carries about 1 KB "
             "of code tables, which outweighs the tiny layers' weights (the tiny SDXL UNet's 15k parameters).", "",
             "| family | tiny bf16 B/param | tiny nf4 | tiny int8 | real denoiser | quantized share | real nf4 B/param "
             "| real int8 B/param | real bf16 GiB | real nf4 GiB | real int8 GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, r in report["families"].items():
        q = r.get("quantized_base")
        if q is None:
            continue
        real = q["real"]
        share = real["nf4"]["quantized_weight_parameters"] / real["nf4"]["denoiser_parameters"]
        lines.append(f"| {family} | 2.00 | {q['tiny']['nf4']['bytes_per_parameter']:.3f} | "
                     f"{q['tiny']['int8']['bytes_per_parameter']:.3f} | {r['real_checkpoint']['name']} "
                     f"({real['nf4']['denoiser_parameters'] / 1e9:.2f}B) | {share:.1%} | "
                     f"{real['nf4']['bytes_per_parameter']:.3f} | {real['int8']['bytes_per_parameter']:.3f} | "
                     f"{2 * real['nf4']['denoiser_parameters'] / 2**30:.1f} | {real['nf4']['denoiser_gb']:.1f} | "
                     f"{real['int8']['denoiser_gb']:.1f} |")
    return lines


def carry_timing_over(report, old):
    """`--no_timing`: the step times of the earlier report `old` (same families), with its command."""
    report["timing_command"] = old.get("timing_command") or old["command"]
    report["steps"], report["warmup"] = old["steps"], old["warmup"]
    for family, r in report["families"].items():
        previous = old.get("families", {}).get(family, {})
        for key in ("time_precision", "seconds_per_step", "ratio_to_vanilla", "all_step_seconds"):
            if previous.get(key) is not None:
                r[key] = previous[key]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Peak memory and ANT's step-time cost per model family (tiny presets).")
    parser.add_argument("--families", default="sd,sdxl,sd3,flux,qwenimage", help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, from fp32, bf16")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--num_clusters", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every method each)")
    parser.add_argument("--warmup", type=int, default=3, help="discarded rounds before timing")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: fp32 only, 16 px, batch 2, one warm-up and one timed round")
    parser.add_argument("--no_timing", action="store_true",
                        help="skip the step-time part (worth taking only on an idle machine) and keep the step times "
                        "of the benchmark_families.json already in --output_dir, with the command that took them")
    parser.add_argument("--no_quantized", action="store_true",
                        help="skip the --quantize_base nf4 / int8 measurement (it needs bitsandbytes)")
    parser.add_argument("--output_dir", default="benchmark-families")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        parser.error(f"unknown family {', '.join(unknown) or '(none)'}; valid: {', '.join(FAMILIES)}")
    args.families = families
    args.quantized = not (args.no_quantized or args.quick)
    if args.quantized and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("the --quantize_base measurement needs bitsandbytes: pip install bitsandbytes, or add --no_quantized")
    if args.quick:
        args.precisions, args.resolution, args.batch_size, args.steps, args.warmup = "fp32", 16, 2, 1, 1
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = sorted(set(args.precisions) - set(PRECISIONS))
    if unknown or not args.precisions:
        parser.error(f"unknown precision {', '.join(unknown) or '(none)'}; valid: {', '.join(PRECISIONS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def write_report(output_dir, name, report, table) -> str:
    """`name`.json (the report) and `name`.md (its markdown `table`) in `output_dir`; returns the table."""
    with open(os.path.join(output_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, f"{name}.md"), "w") as f:
        f.write(table)
    return table


def main(argv=None):
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 is the precision these families train in on a GPU; on a CPU bf16 matmuls are emulated and slow
    opts.time_precision = "bf16" if opts.device == "cuda" and "bf16" in opts.precisions else opts.precisions[0]
    # enough rows for every batch drawn (warm-up, measured, timed) without a second epoch's shuffle mattering
    opts.samples = opts.batch_size * (opts.warmup + opts.steps + 4)
    os.makedirs(opts.output_dir, exist_ok=True)
    opts.layer_bytes = QuantizedLayerBytes() if opts.quantized else None
    command = " ".join(["python", "train_scripts/benchmark_families.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "device": opts.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "resolution": opts.resolution, "batch_size": opts.batch_size, "rank": opts.rank,
              "num_clusters": opts.num_clusters, "steps": opts.steps, "warmup": opts.warmup,
              "memory_measure": "cuda_max_memory_allocated" if opts.device == "cuda"
              else "cpu_resident_tensors_plus_profiler_peak", "quantized": opts.quantized, "families": {}}
    json_path = os.path.join(opts.output_dir, "benchmark_families.json")
    previous_timing = None
    if opts.no_timing and os.path.isfile(json_path):
        with open(json_path) as f:
            previous_timing = json.load(f)
    # Each family's numbers are kept as they come, in a file of their own: benchmark_families.json (whose step
    # times --no_timing carries over) is replaced only by a finished run, so a run stopped halfway loses nothing.
    partial_path = os.path.join(opts.output_dir, "benchmark_families.partial.json")
    start = time.perf_counter()
    for family in opts.families:
        report["families"][family] = measure_family(family, opts)
        report["wall_seconds"] = time.perf_counter() - start
        with open(partial_path, "w") as f:
            json.dump(report, f, indent=2)
    if not opts.quick and importlib.util.find_spec("bitsandbytes") is not None:
        report["real_adam_state_bytes_per_parameter"] = real_adam_state_per_parameter()
    if previous_timing is not None:
        carry_timing_over(report, previous_timing)
    table = write_report(opts.output_dir, "benchmark_families", report, markdown(report))
    os.remove(partial_path)
    print(table)
    print(f"wrote {opts.output_dir}/benchmark_families.json and .md ({report['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
