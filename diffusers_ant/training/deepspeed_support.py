"""DeepSpeed ZeRO-2 / ZeRO-3 through Accelerate: what the trainer does differently under it.

`accelerate launch --use_deepspeed --zero_stage 2|3` (or `--config_file examples/accelerate/deepspeed_zero*.yaml`)
hands the model, its optimizer and the data loader to a `DeepSpeedEngine`. What differs from plain data
parallelism lives here:

* **Start-up without CUDA.** Accelerate forms a process group on CPU only with `Accelerator(cpu=True)`,
  and `cpu=True` switches DeepSpeed off (MULTI_CPU). Without it, `deepspeed.init_distributed` picks gloo
  itself but Accelerate records no backend and every process believes it is process 0 of 1. Naming the
  backend (`InitProcessGroupKwargs(backend="gloo")`) gives both: DeepSpeed's CPU accelerator and a real
  rank / world size (`accelerator_options`).
* **The update.** The engine steps inside `backward` at a gradient-accumulation boundary. The trainer
  still draws a whole window of micro-batches and backpropagates it chunk by chunk (the weighting
  chooses once per window, `training.step`); `EngineBackward` tells the engine which chunk closes the
  window, so DeepSpeed owns the accumulation (its `gradient_accumulation_steps` is
  `--gradient_accumulation_steps`) and steps once per window. Each chunk's loss already carries its share
  of the window's objective, so the engine's division by the accumulation steps is turned off.
* **Parameters outside the engine.** UW's log-variances are not part of the model DeepSpeed wraps; they
  get their own torch optimizer, stepped once per update after the engine's step, checkpointed with the
  trainer's state (the trainer does the same arithmetic under DDP in one optimizer: AdamW treats every
  parameter alone, so the update is the same).
* **Checkpoints.** `accelerator.save_state` writes DeepSpeed's sharded checkpoint (`pytorch_model/`) on every
  process; a ZeRO checkpoint can only be resumed under DeepSpeed with the same number of processes and
  the same side of ZeRO-3 (`check_checkpoint_engine`). The final diffusers folder is written from the
  full weights, gathered from the shards under ZeRO-3 into a copy of the model kept on the meta device
  (`sharding.whole_model`).
* **Loading and precision.** Under ZeRO-3 models are loaded whole (`zero_init_disabled`); in bf16 / fp16
  the engine runs the module in the low precision without autocast, so its inputs are cast to the
  weights' dtype (`cast_inputs_to_parameter_dtype`).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from .args import UsageError
from .sharding import engine_kind, zero_stage

# The folder `accelerator.save_state` gives DeepSpeed's `save_checkpoint` (Accelerate's MODEL_NAME).
DEEPSPEED_CHECKPOINT_FOLDER = "pytorch_model"


def deepspeed_launched() -> bool:
    """Whether `accelerate launch --use_deepspeed` (or a DeepSpeed config file) started this process."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def is_deepspeed(accelerator) -> bool:
    return engine_kind(accelerator) == "DEEPSPEED"


def accelerator_options(gradient_accumulation_steps: int) -> dict:
    """`Accelerator(...)` keywords of a DeepSpeed launch: the accumulation steps DeepSpeed's config takes
    (Accelerate fills a config's `"auto"` with them), and under `"process_group"` the `InitProcessGroupKwargs`
    fields the caller adds to its own (on a machine without CUDA, gloo named as the backend instead of
    `cpu=True`: module docstring)."""
    options = {"cpu": False, "gradient_accumulation_steps": gradient_accumulation_steps, "process_group": {}}
    if not torch.cuda.is_available():
        options["process_group"]["backend"] = "gloo"
    return options


@contextlib.contextmanager
def zero_init_disabled(accelerator):
    """Load models whole under ZeRO-3, as diffusers' scripts load their frozen encoders
    (`deepspeed_zero_init_disabled_context_manager`). Accelerate's ZeRO-3 plugin registers its config with
    transformers, whose `from_pretrained` / `from_config` then shard a model as they build it (`zero.Init`);
    a frozen text encoder sharded outside the engine is never gathered (its position table reads as size
    0). The trained model is sharded by the engine in `accelerator.prepare`. Accelerate 1.16's
    `zero3_init_context_manager(enable=False)` re-registers the config with transformers, so the
    registration is also removed here, and put back after. A no-op below ZeRO-3."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or zero_stage(accelerator) != 3:
        yield
        return
    try:
        from transformers.integrations import unset_hf_deepspeed_config
    except ImportError:  # no transformers: nothing can be sharded at load
        yield
        return
    with plugin.zero3_init_context_manager(enable=False):
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()


def configure_plugin(accelerator, args) -> None:
    """Fill the DeepSpeed config's `"auto"` entries the trainer owns, before `accelerator.prepare`.

    * `gradient_clipping`: `--max_grad_norm` (Accelerate would put 1.0; 0 turns clipping off), because
      `accelerator.clip_grad_norm_` is a no-op under DeepSpeed: the engine clips inside its step.
    * `gradient_accumulation_steps`: `--gradient_accumulation_steps`.
    * ZeRO-3's `stage3_gather_16bit_weights_on_model_save`: true, so `accelerator.get_state_dict` can
      gather the full weights for the final diffusers folder (Accelerate defaults it to false).
    A value a config file sets itself is kept (check_distributed_support refuses a conflicting one)."""
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = float(args.max_grad_norm or 0.0)
    if config.get("gradient_accumulation_steps", "auto") == "auto":
        config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    zero = config.setdefault("zero_optimization", {})
    if int(plugin.zero_stage) == 3 and zero.get("stage3_gather_16bit_weights_on_model_save", "auto") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def check_deepspeed_config(accelerator, args) -> None:
    """Refuse a DeepSpeed config whose accumulation or clipping disagrees with the trainer's flags (one line):
    DeepSpeed accumulates and clips inside its own step, with the config's values."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    steps = config.get("gradient_accumulation_steps", "auto")
    if steps != "auto" and int(steps) != args.gradient_accumulation_steps:
        raise UsageError(f"the DeepSpeed config says gradient_accumulation_steps {steps} and the trainer "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: set the config's to \"auto\"")
    clipping = config.get("gradient_clipping", "auto")
    if clipping != "auto" and float(clipping) != float(args.max_grad_norm or 0.0):
        # (Accelerate compares the two with must_match=False: a config file's or `--gradient_clipping`'s value won)
        raise UsageError(f"the DeepSpeed config says gradient_clipping {clipping} and the trainer --max_grad_norm "
                         f"{args.max_grad_norm}: set the config's to \"auto\" (or the same value)")
    zero = config.get("zero_optimization", {})
    if int(accelerator.state.deepspeed_plugin.zero_stage) == 3 and zero.get(
            "stage3_gather_16bit_weights_on_model_save", "auto") is False:
        raise UsageError("ZeRO-3: set stage3_gather_16bit_weights_on_model_save to true (or \"auto\") in the "
                         "DeepSpeed config, so the trained weights can be gathered into the output folder")
    if int(accelerator.state.deepspeed_plugin.zero_stage) == 3:
        # Both would touch the sharded parameters from one process (EMA's copy, the tracker's sampling).
        for flag in ("use_ema", "track_convergence"):
            if getattr(args, flag, False):
                how = " (--no-use_ema: DeMe fine-tunes turn it on by default)" if flag == "use_ema" else ""
                raise UsageError(f"--{flag} is not supported under ZeRO-3 (it reads the sharded weights on one "
                                 f"process): use --zero_stage 2, or drop the flag{how}")
    if "optimizer" in config or "scheduler" in config:
        raise UsageError("DeepSpeed: remove `optimizer` / `scheduler` from the DeepSpeed config (the trainer builds "
                         "AdamW and diffusers' LR schedule from its flags)")


class EngineBackward:
    """`backward_fn` of `weighting.engine.weighted_backward` for one window under DeepSpeed.

    The window is backpropagated in `num_chunks` chunks; DeepSpeed is told before each chunk's forward
    whether it closes the window (`set_gradient_accumulation_boundary`, as DeepSpeed asks, so ZeRO-3
    can plan its gathers), reduces the gradients there and steps once (`engine.step()`, which clips too).
    `scale_wrt_gas=False`: the trainer scaled each chunk's loss to its share of the window already; the
    engine's division by the accumulation steps would shrink the update, and a shorter last window would
    be divided by the wrong count."""

    def __init__(self, engine, num_chunks: int):
        self.engine = engine
        self.remaining = int(num_chunks)
        engine.set_gradient_accumulation_boundary(self.remaining == 1)

    def __call__(self, loss: torch.Tensor) -> None:
        if self.remaining <= 0:
            raise RuntimeError("EngineBackward: more backward calls than the window has chunks")
        self.engine.backward(loss, scale_wrt_gas=False)
        self.remaining -= 1
        if self.remaining == 0:
            self.engine.step()
        else:
            self.engine.set_gradient_accumulation_boundary(self.remaining == 1)


def cast_inputs_to_parameter_dtype(module: torch.nn.Module):
    """Under DeepSpeed with bf16 / fp16 the engine casts the module's weights to the low precision and runs no
    autocast (Accelerate's autocast is for DDP), so float32 inputs meet bfloat16 weights; diffusers' scripts
    cast their inputs to the weight dtype by hand. This forward pre-hook does it for every model type: floating
    tensors of two or more dimensions (images, latents, text embeddings, pooled projections, SDXL's time ids,
    nested in dicts too) take the dtype of the module's parameters; 1-D tensors (timesteps, sigmas) keep their
    precision, as in diffusers' scripts. Nothing changes when the parameters are float32."""

    def cast(value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 2:
            return value.to(dtype)
        if isinstance(value, dict):
            return {key: cast(item, dtype) for key, item in value.items()}
        return value

    def hook(mod, args, kwargs):
        dtype = next((p.dtype for p in mod.parameters()), torch.float32)
        if dtype == torch.float32:
            return None
        return tuple(cast(a, dtype) for a in args), {key: cast(v, dtype) for key, v in kwargs.items()}

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def num_chunks(num_samples: int, chunk_size) -> int:
    """How many chunks `weighted_backward` cuts a window of `num_samples` into (`engine._chunks`)."""
    return 1 if chunk_size is None or num_samples <= chunk_size else math.ceil(num_samples / chunk_size)


def checkpoint_uses_deepspeed(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, DEEPSPEED_CHECKPOINT_FOLDER))


def check_checkpoint_engine(accelerator, folder: str) -> None:
    """Refuse, in one line and before anything is loaded or written, a checkpoint the engine cannot
    resume: a ZeRO checkpoint without DeepSpeed (its optimizer state is sharded per process), a plain
    checkpoint under DeepSpeed, a ZeRO checkpoint written by another number of processes, or one written
    under ZeRO-3 resumed under ZeRO-1/2 and the reverse (ZeRO-3 writes one model-state file per process,
    `zero_pp_rank_<r>_mp_rank_00_model_states.pt`; ZeRO-1/2 one `mp_rank_00_model_states.pt`)."""
    zero = checkpoint_uses_deepspeed(folder)
    if zero and not is_deepspeed(accelerator):
        raise UsageError(f"{folder} is a DeepSpeed ZeRO checkpoint: resume it with `accelerate launch --use_deepspeed` "
                         "(the same --zero_stage and --num_processes)")
    if not zero and is_deepspeed(accelerator):
        raise UsageError(f"{folder} was not written under DeepSpeed: resume it without --use_deepspeed, or start "
                         "a new run in another --output_dir")
    if zero:
        written = len([name for name in os.listdir(folder)
                       if name.startswith("trainer_state_") and name.endswith(".json")])
        if written != accelerator.num_processes:
            raise UsageError(f"{folder} was written by {written} DeepSpeed processes and this run has "
                             f"{accelerator.num_processes}: resume with --num_processes {written}")
        shards = os.listdir(os.path.join(folder, DEEPSPEED_CHECKPOINT_FOLDER))
        saved_zero3 = any(name.startswith("zero_pp_rank_") and name.endswith("_model_states.pt") for name in shards)
        stage = zero_stage(accelerator)
        if stage and saved_zero3 != (stage == 3):
            raise UsageError(f"{folder} was written under ZeRO-{3 if saved_zero3 else '1/2'} and this run uses "
                             f"ZeRO-{stage}: resume with --zero_stage {3 if saved_zero3 else 2}")
