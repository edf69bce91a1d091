"""Shared helpers of the analyses: reading saved model folders and checkpoints.

A *model folder* is what `train_ant.py` writes (or `ModelAdapter.save`): a diffusers pipeline
folder (`model_index.json`, `unet/` or `transformer/`, `scheduler/`), usually with the run's
`training_config.json` beside it. A *checkpoint folder* is a `checkpoint-N` folder of that run:
Accelerate's `model.safetensors` holds the trained module's state dict (the raw weights, not EMA).
"""

from __future__ import annotations

import glob
import json
import os

from ..models.base import LORA_INFO_NAME

TRAINING_CONFIG = "training_config.json"
CHECKPOINT_WEIGHTS = "model.safetensors"


def check_model_folder(folder: str, flag: str = "--model") -> str:
    """`folder` if it is a saved pipeline folder, else a short `ValueError` naming the flag."""
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder!r}: no such folder (give a folder written by train_ant.py)")
    from ..models.base import CONTROLNET_INFO_NAME

    if os.path.isfile(os.path.join(folder, CONTROLNET_INFO_NAME)):
        # the analyses measure and route a pipeline's own denoiser; a ControlNet is a second network beside a
        # frozen UNet, which they would route instead (a gap of exactly 0), so they refuse it rather than mislead
        raise ValueError(f"{flag} {folder!r} is a ControlNet output: the analyses (affinity, NTG, forgetting, "
                         "evaluation) take a pipeline's own denoiser (unet, dit, sd, sdxl, sd3, flux, qwenimage), "
                         "not a ControlNet")
    if not (os.path.isfile(os.path.join(folder, "model_index.json")) or os.path.isfile(os.path.join(folder, LORA_INFO_NAME))):
        raise ValueError(f"{flag} {folder!r} holds no saved pipeline (no model_index.json); give a folder written by train_ant.py")
    return folder


def training_config(folder: str) -> dict:
    """The run's `training_config.json` (an empty dict when the folder has none)."""
    path = os.path.join(folder, TRAINING_CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def infer_model_type(folder: str) -> str:
    """The model type (any of ``diffusers_ant.models.MODEL_TYPES``) of a saved folder: from its training
    config when there is one, else from its pipeline class / components
    (``diffusers_ant.models.families.model_type_of_folder``, the rule the knowledge bank uses too)."""
    model_type = training_config(folder).get("model_type")
    if model_type:
        return model_type
    from ..models.families import model_type_of_folder

    return model_type_of_folder(folder)


def denoiser_name(pipeline) -> str:
    """The attribute of the pipeline's denoiser: `transformer` (DiT pipelines) or `unet`."""
    return "transformer" if hasattr(pipeline, "transformer") else "unet"


def load_denoiser(folder: str, flag: str = "--model"):
    """`(pipeline, denoiser)` of a saved model folder, in eval mode."""
    from ..models import load_pipeline

    pipeline = load_pipeline(check_model_folder(folder, flag))
    denoiser = getattr(pipeline, denoiser_name(pipeline))
    denoiser.eval()
    return pipeline, denoiser


def training_routing_scheduler(pipeline, folders):
    """What `routing.denoiser_timestep_map` needs beside ``pipeline``'s scheduler: the training table of the runs
    in ``folders`` as their ``training_config.json`` records it (`deme.ensemble.training_routing_settings`): for
    a FLUX.1 pipeline, the table of the run's resolution or ``--flow_shift``; for another flow-matching
    pipeline, the table of the run's ``--flow_shift`` (a LoRA output loads its base's unshifted scheduler);
    None where the pipeline's own scheduler's table is the trained one. Runs trained on different tables are
    refused in one line."""
    from ..deme.ensemble import routing_scheduler, training_routing_settings

    settings = training_routing_settings([training_config(folder) for folder in folders], list(folders), pipeline)
    return routing_scheduler(pipeline, {"training_routing": settings})


def expand_checkpoints(paths) -> list:
    """Checkpoint / model folders from the command line, globs expanded (`run/checkpoint-*`),
    checkpoint-N folders sorted by step, duplicates dropped."""
    import re

    found = []
    for path in paths:
        matches = glob.glob(path) if any(ch in path for ch in "*?[") else [path]
        # a glob leaves out what a killed checkpoint save leaves behind (checkpoint-N.tmp, checkpoint-N.old)
        matches = [m for m in matches if m == path or not m.endswith((".tmp", ".old"))]
        if not matches:
            raise ValueError(f"--checkpoints {path!r} matches no folder")

        def step(p):
            m = re.search(r"checkpoint-(\d+)$", os.path.normpath(p))
            return (0, int(m.group(1)), p) if m else (1, 0, p)

        found.extend(sorted(matches, key=step))
    return list(dict.fromkeys(os.path.normpath(p) for p in found))


def load_state_dict(path: str):
    """Weights of the denoiser from a checkpoint-N folder (Accelerate's `model.safetensors`) or a
    saved pipeline folder (`unet/` or `transformer/` safetensors). Never unpickles."""
    from safetensors.torch import load_file

    if os.path.isfile(path) and path.endswith(".safetensors"):
        return load_file(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r}: no such folder")
    direct = os.path.join(path, CHECKPOINT_WEIGHTS)
    if os.path.isfile(direct):
        return load_file(direct)
    for sub in ("unet", "transformer"):
        files = sorted(glob.glob(os.path.join(path, sub, "*.safetensors")))
        if files:
            state = {}
            for file in files:  # sharded weights: one dict
                state.update(load_file(file))
            return state
    raise ValueError(
        f"checkpoint {path!r} holds no safetensors weights: give a checkpoint-N folder (with {CHECKPOINT_WEIGHTS}) "
        "or a saved pipeline folder"
    )


def checkpoint_ema_state_dict(folder: str, model):
    """The EMA weights saved in a checkpoint-N folder, as a state dict for `model`, or None when the
    run kept no EMA (then `load_state_dict(folder)` has the raw weights).

    The trainer saves diffusers' `EMAModel` state in `trainer_state_0` (safetensors plus a JSON
    skeleton, never a pickle): its `shadow_params` list follows the order of the trained parameters,
    `[p for p in model.parameters() if p.requires_grad]` of a full (non-LoRA) training. Buffers and
    frozen parameters come from `model` itself. A count or shape that does not fit is a ValueError.
    """
    from ..training.checkpoint import load_trainer_state

    state = load_trainer_state(folder, 0)
    ema = state.get("ema")
    if not ema:
        return None
    shadow = ema["shadow_params"]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(shadow) != len(named):
        raise ValueError(f"{folder}: the EMA holds {len(shadow)} tensors for {len(named)} trained parameters "
                         "(a LoRA run, or another model?)")
    weights = dict(model.state_dict())
    for (name, param), value in zip(named, shadow):
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{folder}: EMA tensor for {name} has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
        weights[name] = value.to(param.dtype)
    return weights


def resolve_device(device=None) -> str:
    """`device` (a --device flag), default CUDA when it is available, else the CPU."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def set_torch_threads(num_threads=None) -> int:
    """Set torch's CPU threads for an analysis run and return the number used.

    `None` (auto): one thread on machines with at most 4 CPUs, torch's default otherwise. Measured on
    a shared 2-core machine under load: the affinity of the 1.1M-parameter demo UNet took 7.8 s with
    one thread and 77 s with two, which spent their time waiting on each other (OpenMP contention).
    """
    import torch

    if num_threads is None:
        num_threads = 1 if (os.cpu_count() or 1) <= 4 else torch.get_num_threads()
    if num_threads < 1:
        raise ValueError(f"--num_threads must be positive, got {num_threads}")
    torch.set_num_threads(int(num_threads))
    return int(num_threads)
