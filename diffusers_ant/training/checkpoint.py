"""Crash-safe checkpoints on top of `accelerator.save_state`.

Accelerate saves the model (safetensors), optimizer, LR scheduler and its RNG states, and reads
them back with `torch.load(weights_only=True)`. What it would pickle without restriction -- the
objects given to `register_for_checkpointing` are loaded with `weights_only=False` -- we save
ourselves: the trainer's own state (step, the noise / timestep generator), EMA and the
weighting's state go to `trainer_state_<rank>.safetensors` (tensors) plus a JSON skeleton (the
rest), so resuming from a folder a user points at never unpickles arbitrary objects. The sharded
engines' own files (torch.distributed.checkpoint under FSDP, DeepSpeed's `.pt` files), which those
libraries unpickle without restriction, are checked first by `checkpoint_pickles.check_checkpoint_pickles`.

A checkpoint is written under a temporary name and renamed when complete: a run killed in the
middle of a save leaves the previous checkpoint as the latest usable one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from .sharding import engine_kind

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"  # an existing checkpoint-N moved aside while a new checkpoint-N takes its place
# Test hook: crash (as a SIGKILL would) after the state is written but before the rename.
CRASH_ENV = "DIFFUSERS_ANT_CRASH_DURING_CHECKPOINT"


def flatten_state(obj: Any, tensors: Dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Split a nested state (dicts, lists, tensors, numbers, strings) into tensors and a JSON skeleton."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        if hasattr(obj, "to_local"):  # a DTensor (FSDP2: EMA's shadow weights): this process's shard, in its own file
            obj = obj.to_local()
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            return {"__intkeys__": {str(k): flatten_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}}
        return {k: flatten_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def unflatten_state(skeleton: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__intkeys__"}:
            return {int(k): unflatten_state(v, tensors) for k, v in skeleton["__intkeys__"].items()}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_trainer_state(folder: str, states: Dict[str, Any], rank: int) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    skeleton = flatten_state(states, tensors)
    save_file(tensors, os.path.join(folder, f"trainer_state_{rank}.safetensors"))
    with open(os.path.join(folder, f"trainer_state_{rank}.json"), "w") as f:
        json.dump(skeleton, f)


def load_trainer_state(folder: str, rank: int) -> Dict[str, Any]:
    path = os.path.join(folder, f"trainer_state_{rank}.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a complete diffusers_ant checkpoint ({os.path.basename(path)} is missing)")
    with open(path) as f:
        skeleton = json.load(f)
    return unflatten_state(skeleton, load_file(os.path.join(folder, f"trainer_state_{rank}.safetensors")))


def list_checkpoints(output_dir: str):
    """Complete checkpoints in `output_dir`, oldest first (temporary folders are never listed)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: str, spec: Optional[str]) -> Optional[str]:
    """`latest` -> the newest complete checkpoint (None if there is none); a name -> that folder."""
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    for candidate in (spec, os.path.join(output_dir, spec)):
        if os.path.isdir(candidate):
            return candidate
    raise ValueError(f"checkpoint {spec!r} not found; use \"latest\" or a checkpoint-N folder in {output_dir}")


def warn_of_later_checkpoints(output_dir: str, checkpoint: Optional[str], accelerator) -> None:
    """Warn when `output_dir` holds checkpoints of a later step than the run starts from (a run started
    over in a used folder, or resumed from an earlier checkpoint): until this run writes a later step,
    `--resume_from_checkpoint latest` would resume those instead, and they are left out of pruning."""
    start = 0 if checkpoint is None else checkpoint_step(checkpoint)
    later = [os.path.basename(path) for path in list_checkpoints(output_dir) if checkpoint_step(path) > start]
    if later and accelerator.is_main_process:
        logger.warning("%s holds %s, later than the step this run starts from (%d): until this run passes it, "
                       "--resume_from_checkpoint latest would resume that one; use another --output_dir, or remove it",
                       output_dir, ", ".join(later), start)


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: Dict[str, Any],
                    total_limit: Optional[int] = None) -> str:
    """Write checkpoint-<step> atomically (temporary folder, then rename) and prune old ones."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = final + _TMP_SUFFIX
    if accelerator.is_main_process:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # left over by an earlier crash
        os.makedirs(tmp)
    # Every process writes into the folder (its RNG and trainer state): it must exist first.
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    save_trainer_state(tmp, trainer_state, accelerator.process_index)  # every process: its own generator state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.environ.get(CRASH_ENV) == str(step):
            os._exit(17)  # simulate a kill at the worst moment: everything written, nothing renamed
        if os.path.isdir(final):
            # a checkpoint of this step already there (a run resumed from an earlier one, or started over in
            # this --output_dir): moved aside in one rename, so a kill never leaves a half-deleted checkpoint-N
            # for `latest` to pick; the old copy is deleted once the new one is in place
            aside = final + _OLD_SUFFIX
            if os.path.isdir(aside):
                shutil.rmtree(aside)
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, final)
        if total_limit is not None:
            # Prune only after the new checkpoint is complete, unlike diffusers' scripts which delete
            # first: a crash during the save must leave a usable checkpoint behind. Only older steps are
            # pruned: a folder with a higher step is another run's (started over in this --output_dir, or
            # resumed from an earlier checkpoint), and counting it would delete the one just written.
            earlier = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) < step]
            for old in earlier[:max(len(earlier) - (total_limit - 1), 0)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str) -> Dict[str, Any]:
    accelerator.load_state(folder)
    return load_trainer_state(folder, accelerator.process_index)


def checkpoint_config(folder: str, key: str = "config") -> Dict[str, Any]:
    """The run configuration saved in a checkpoint (`public_config` of the run that wrote it; with
    ``key="local_paths"``, its `local_paths`), read from process 0's JSON skeleton without loading any
    tensor; {} if it has none."""
    path = os.path.join(folder, "trainer_state_0.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        config = json.load(f).get(key)
    return config if isinstance(config, dict) else {}


def local_paths(config: Dict[str, Any], output_dir: str) -> Dict[str, str]:
    """The flags of `config` (the run's arguments) that name a local file or folder, each as a fingerprint of its
    absolute path(s): what a resumed run compares them by. The configuration written into the output folder
    names them relative to it (`hub.portable_path`), so the same data folder reads differently from another
    output folder (a checkpoint copied elsewhere and resumed there), and two folders that share only the
    file system root read alike (their base names). A fingerprint (SHA-256 of the absolute paths), not the
    paths: an output folder, checkpoints included, is copied and shared whole and names no path of this
    machine."""
    import hashlib

    from ..hub import portable_path

    paths = {}
    for key, value in config.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, (str, os.PathLike)) for v in values):
            continue
        if any(portable_path(v, output_dir) != os.fspath(v) for v in values):  # (a Hub id or a word stays as it is)
            absolute = "\n".join(os.path.abspath(os.path.expanduser(os.fspath(v))) for v in values)
            paths[key] = hashlib.sha256(absolute.encode()).hexdigest()[:16]
    return paths


# Flags that may change between a run and its resumption: they steer how long the run goes, what it
# writes and logs, and how fast it runs, not what the checkpointed state means. Any other flag that
# differs makes the state meaningless or silently ignored (a new --learning_rate would be overwritten
# by the saved LR schedule, a new --num_clusters would meet the old weighting's state, a new dataset
# or batch size would resume at another data position) and is refused.
RESUME_SAFE_FLAGS = frozenset({
    "max_train_steps", "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "validation_steps", "validation_epochs", "num_validation_images", "validation_prompt", "validation_image",
    "validation_guidance_scale", "guidance_scale", "num_inference_steps", "logging_dir", "report_to",
    "tracker_project_name", "push_to_hub", "hub_model_id", "hub_private_repo", "dataloader_num_workers", "allow_tf32",
    "mixed_precision", "gradient_checkpointing", "max_grad_norm", "cache_dir", "output_dir", "demo",
    "enable_xformers_memory_efficient_attention", "offload_ema", "foreach_ema", "track_convergence",
    "convergence_steps", "convergence_threshold", "training_cache_dir", "ddp_timeout",
})


# `--task_gradients` values that all give the exact per-cluster gradients (to float rounding): a run may
# resume under another of them (a checkpoint written when `split` was the default resumes under `auto`);
# `last_layers` chooses its weights from other gradients and is not among them.
EXACT_TASK_GRADIENTS = frozenset({"split", "batched", "auto", "retain_graph"})


def engine_record(accelerator) -> Dict[str, Any]:
    """How the state of a checkpoint is laid out: the distributed engine and the number of processes.

    Accelerate writes one RNG file per process, this trainer one trainer state per process, each process
    resumes at its own data position, and under FSDP and DeepSpeed the model and optimizer are sharded
    folders (`pytorch_model_fsdp_0` and `optimizer_0`; `pytorch_model`) that the other engines do not read.
    Single process and plain data parallelism share one layout ("DDP"). The device type too: each process's
    random-number generator is the device's own (a CPU generator's state is 5,056 bytes, a CUDA one's 16),
    and neither can take the other's."""
    kind = engine_kind(accelerator)
    return {"distributed_type": kind if kind in ("FSDP", "DEEPSPEED") else "DDP",
            "num_processes": int(accelerator.num_processes), "device_type": accelerator.device.type}


def check_resume_engine(checkpoint: str, current: Dict[str, Any]) -> None:
    """Refuse, in one line, to resume a checkpoint written by another engine, number of processes or device
    type (a checkpoint written before these were recorded is not checked)."""
    path = os.path.join(checkpoint, "trainer_state_0.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f).get("engine")
    if not isinstance(saved, dict):
        return
    if saved.get("distributed_type") != current["distributed_type"]:
        how = {"FSDP": "with an FSDP config (--use_fsdp)",
               "DEEPSPEED": "under DeepSpeed (--use_deepspeed)"}.get(saved.get("distributed_type"), "without FSDP")
        raise ValueError(f"{checkpoint} was written under {saved.get('distributed_type')} and this run is "
                         f"{current['distributed_type']}: resume {how}")
    if saved.get("device_type", current["device_type"]) != current["device_type"]:  # (not recorded before: not checked)
        raise ValueError(f"{checkpoint} was written on {saved['device_type']} and this run is on "
                         f"{current['device_type']}: resume it on {saved['device_type']} (each process's "
                         "random-number state is its device's own), or start a new run from its weights")
    if saved.get("num_processes") != current["num_processes"]:
        raise ValueError(f"{checkpoint} was written by {saved.get('num_processes')} processes and this run has "
                         f"{current['num_processes']}: resume with `accelerate launch --num_processes "
                         f"{saved.get('num_processes')}` (each process resumes its own data position and RNG state)")


# Flags that shape the learning-rate schedule. A change is safe when the new schedule gives every update
# up to the checkpoint the factor the old one gave (a cool-down branching off a constant-rate run, as
# warmup-stable-decay schedules are used); otherwise the resumed run would follow a schedule that no
# run from scratch follows, and it is refused.
LR_SCHEDULE_FLAGS = frozenset({"lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "lr_decay_steps",
                               "lr_stable_steps", "lr_min_ratio"})
# The run's length is resume-safe (train longer, or stop sooner) unless the schedule is drawn over it:
# a cosine or linear decay over more steps gives every step already trained another rate.
SCHEDULE_LENGTH_FLAGS = frozenset({"max_train_steps", "num_train_epochs"})


def check_resume_config(saved: Dict[str, Any], current: Dict[str, Any], checkpoint: str, num_processes: int = 1,
                        saved_paths: Optional[Dict[str, Any]] = None,
                        current_paths: Optional[Dict[str, Any]] = None) -> list:
    """Compare the configuration a checkpoint was written with against the resuming run's. A flag that names a
    local path on both sides (`saved_paths`, `current_paths`: their `local_paths`) is compared by its absolute
    path, not by the form relative to each run's output folder.

    Raises a one-line ValueError naming the first changed flag that makes the state meaningless, with
    both values; returns the changed safe flags (`RESUME_SAFE_FLAGS`, and `LR_SCHEDULE_FLAGS` whose new
    schedule agrees with the old one up to the checkpoint's step) as "flag: old -> new" strings to log.
    A flag the checkpoint does not know (added to the trainer since) is not compared."""
    current = json.loads(json.dumps(current, default=str))  # tuples -> lists, as the saved JSON has them
    both = set(saved_paths or {}) & set(current_paths or {}) & set(saved) & set(current)
    moved = {key for key in both if saved_paths[key] != current_paths[key]}
    changed = [key for key in sorted(set(saved) & set(current))
               if key in moved or (key not in both and saved[key] != current[key])]
    if any(saved[key] == current[key] for key in moved):  # the written forms alike: say that the paths are not
        current = {**current, **{key: f"{current[key]} (another path of that name)" for key in moved
                                 if saved[key] == current[key]}}
    safe = RESUME_SAFE_FLAGS - _trained_flags(current.get("model_type"))
    if any(key in LR_SCHEDULE_FLAGS | SCHEDULE_LENGTH_FLAGS for key in changed):
        step = checkpoint_step(checkpoint)
        # the checkpoint's optimizer already holds the rate of its next update, set by the old schedule
        differs = schedule_difference(saved, current, step + 1, num_processes)
        if differs is None:
            safe = safe | LR_SCHEDULE_FLAGS
        else:
            key = next(key for key in changed if key in LR_SCHEDULE_FLAGS | SCHEDULE_LENGTH_FLAGS)
            raise ValueError(f"--{key} was {saved[key]!r} when {checkpoint} was written and is {current[key]!r} now, "
                             f"which changes the learning rate from step {differs} (before the checkpoint's step "
                             f"{step}, --lr_scheduler {current.get('lr_scheduler')}): resume with the same schedule, "
                             f"or one that agrees up to step {step}")
    if "task_gradients" in changed and {saved["task_gradients"], current["task_gradients"]} <= EXACT_TASK_GRADIENTS:
        safe = safe | {"task_gradients"}
    if "mixed_precision" in changed and current["mixed_precision"] == "fp16":
        # (out of fp16 the saved loss scale is left unread; into fp16 Accelerate's load_state looks for the
        # GradScaler's state that a bf16 / fp32 run never wrote, and stops on a missing scaler.pt)
        raise ValueError(f"--mixed_precision was {saved['mixed_precision']!r} when {checkpoint} was written and is "
                         "'fp16' now: an fp16 run resumes its GradScaler's state, which only an fp16 checkpoint holds; "
                         "resume with --mixed_precision bf16 or no")
    refused = [key for key in changed if key not in safe]
    if refused:
        key = refused[0]
        more = f" (also changed: {', '.join('--' + k for k in refused[1:])})" if len(refused) > 1 else ""
        raise ValueError(f"--{key} was {saved[key]!r} when {checkpoint} was written and is {current[key]!r} now{more}: "
                         f"resume with the same value, or start a new run in another --output_dir")
    return [f"--{key}: {saved[key]!r} -> {current[key]!r}" for key in changed]


def checkpoint_step(folder: str) -> int:
    """The update count of a checkpoint folder: N of `checkpoint-N`, else (a folder copied under another
    name) the step its trainer state records."""
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(folder)))
    if m:
        return int(m.group(1))
    path = os.path.join(folder, "trainer_state_0.json")
    if os.path.isfile(path):
        with open(path) as f:
            step = json.load(f).get("global_step")
        if isinstance(step, int):
            return step
    raise ValueError(f"{folder} is not a complete diffusers_ant checkpoint (no trainer_state_0.json with its step)")


def schedule_difference(old: Dict[str, Any], new: Dict[str, Any], steps: int, num_processes: int = 1):
    """The first of the first `steps` updates whose learning-rate factor differs between two runs'
    configurations, or None when they agree on all of them (to float rounding)."""
    import math

    from .components import lr_factors

    before, after = lr_factors(old, steps, num_processes), lr_factors(new, steps, num_processes)
    return next((step for step, (a, b) in enumerate(zip(before, after)) if not math.isclose(a, b, rel_tol=1e-12)), None)


def _trained_flags(model_type) -> frozenset:
    """Flags of `RESUME_SAFE_FLAGS` that steer training for this model type (its adapter's
    `training_flags`: flux feeds --guidance_scale to a guidance-distilled transformer)."""
    from ..models import MODEL_TYPES

    return frozenset(getattr(MODEL_TYPES.get(model_type), "training_flags", ()))


TRAINABLE_STATE_NAME = "trainable_state.safetensors"


def register_trainable_state_hooks(accelerator, model) -> bool:
    """Checkpoint only the trainable parameters of `model` when part of it is frozen (LoRA, BitFit, ...).

    `accelerator.save_state` would write the whole module, frozen base included (about 3.4 GB for
    SD 1.5 next to a LoRA of a few MB). As diffusers' LoRA scripts do, a save pre-hook takes the
    model out of Accelerate's list of weights and writes its trainable parameters to
    `trainable_state.safetensors`; a load pre-hook reads them back into the module (the frozen base
    comes from where the run loaded it) and takes the model out of what Accelerate loads. A file
    that does not hold exactly the trainable parameters is refused. Returns whether the hooks were
    registered (not for a model trained whole)."""
    from safetensors.torch import load_file, save_file

    if all(p.requires_grad for p in model.parameters()):
        return False

    def trainable():
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def position(models):
        for i, candidate in enumerate(models):
            if accelerator.unwrap_model(candidate) is model:
                return i
        return None

    def save_hook(models, weights, output_dir):
        i = position(models)
        if i is None:
            return
        weights.pop(i)  # Accelerate's list of state dicts, aligned with its models
        if accelerator.is_main_process:
            state = {name: p.detach().cpu().contiguous() for name, p in trainable().items()}
            save_file(state, os.path.join(output_dir, TRAINABLE_STATE_NAME))

    def load_hook(models, input_dir):
        i = position(models)
        if i is None:
            return
        models.pop(i)
        path = os.path.join(input_dir, TRAINABLE_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{input_dir} holds no {TRAINABLE_STATE_NAME}: it was not written by a LoRA / partial "
                             "fine-tuning run of this model; resume with the flags of the run that wrote it")
        state = load_file(path)
        params = trainable()
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"{path} does not fit this model ({len(missing)} trainable tensors missing, "
                             f"{len(extra)} unknown): resume with the flags (--rank, --model_type) of the run that wrote it")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.device, param.dtype))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return True


def remove_stale_temporaries(output_dir: str) -> None:
    """Delete half-written checkpoint folders left by a crash (they are never resumed from). A complete
    checkpoint moved aside for a new one of its step (`save_checkpoint`) goes back to its name if the crash
    came before the new one took it, and is deleted otherwise."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(CHECKPOINT_PREFIX) and name.endswith(_TMP_SUFFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(CHECKPOINT_PREFIX) and name.endswith(_OLD_SUFFIX):
            final = path[:-len(_OLD_SUFFIX)]
            if os.path.isdir(final):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)
