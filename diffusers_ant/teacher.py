"""The frozen pretrained denoiser ("teacher") that fine-tuning objectives compare the student with.

Two methods of this project read the pretrained model's prediction on the student's own noisy input:

* Diff-Tuning's knowledge-distillation variant (Zhong et al., NeurIPS 2024, Sec. 4.2): retention samples
  take `teacher(x_t, t, c)` as their regression target instead of a knowledge bank's images;
* DeMe's consistency loss (Decouple-Then-Merge, Sec. 3.2): `||eps_pre(x_t, t) - eps_i(x_t, t)||^2`
  keeps each interval's fine-tune close to the pretrained model.

Both read one component, `make_teacher`, which takes one of two forms:

* Under LoRA (`--rank`), `AdapterDisabledTeacher`: the student itself, run with its LoRA layers
  switched off (peft's `disable_adapter()` semantics, `models.lora.lora_disabled`), the text
  encoder's LoRA too, and DeMe's channel projections (`deme.projection`) taken off for the call. The
  base weights under a LoRA are frozen and are the pretrained ones, so this *is* the pretrained model,
  exactly, at no memory cost: no second copy of the denoiser (for Flux or Qwen-Image a second copy
  does not fit; DESIGN.md, "Model families"). Its parameters are the student's own storage.
* Otherwise (full fine-tuning, BitFit, DiffFit: the weights themselves move), `FrozenTeacher`: a copy
  of the denoiser taken before the student is modified, with every parameter frozen, in the run's
  weight dtype (normalisation layers kept in float32, see `training.precision`), in eval mode.

Either way the teacher shares the adapter's frozen parts (VAE, text encoder, ControlNet's UNet), is
never trained, never handed to the optimizer, Accelerate or EMA, and never saved: checkpoints and
outputs hold the student only.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch


def make_teacher(adapter, dtype: torch.dtype = torch.float32, autocast=None, lora: bool = False,
                 cast_inputs: bool = False):
    """The teacher of a run: `AdapterDisabledTeacher(adapter)` when the run trains a LoRA (`lora=True`;
    build it any time, it reads the student when it predicts), else `FrozenTeacher(adapter, dtype)`
    (build it before anything changes the student). See the module docstring."""
    if lora:
        return AdapterDisabledTeacher(adapter, autocast=autocast)
    return FrozenTeacher(adapter, dtype, autocast=autocast, cast_inputs=cast_inputs)


def _predict_in_chunks(adapter, model, x_t, model_t, conditioning, chunk_size):
    from .training.step import _index

    n = x_t.shape[0]
    step = n if chunk_size is None else chunk_size
    out = []
    for start in range(0, n, step):
        idx = torch.arange(start, min(start + step, n), device=x_t.device)
        out.append(adapter.predict(model, x_t[idx], model_t[idx], _index(conditioning, idx)).float())
    return torch.cat(out)


@contextlib.contextmanager
def _eval_mode(*modules):
    """Every submodule of `modules` in eval mode for the block (dropout off), each flag restored after."""
    flags = [(m, m.training) for module in modules if module is not None for m in module.modules()]
    try:
        for module, _ in flags:
            module.training = False
        yield
    finally:
        for module, flag in flags:
            module.training = flag


class AdapterDisabledTeacher:
    """The pretrained model as the LoRA student with its adapters disabled: no copy (module docstring).

    `predict` runs `adapter.predict(adapter.model, ...)` under no_grad, in eval mode, with every LoRA
    layer of the denoiser and of the modules trained beside it (`adapter.extra_trainable_modules()`,
    e.g. a text encoder's LoRA) switched off, and DeMe's channel projections (trainable matrices added
    after the LoRA, identity at the start) taken off the blocks, so the output is the pretrained
    model's. Everything is switched back on after the call; `requires_grad` flags stay as they were.
    The base weights are in the weight dtype already (the trainer casts a LoRA run's frozen base).

    Args:
        adapter: the model-type adapter whose `model` carries the LoRA (read at each call).
        autocast: a context-manager factory the predictions run under (e.g. `accelerator.autocast`).
    """

    shares_student = True

    def __init__(self, adapter, autocast=None):
        self.adapter = adapter
        self.autocast = autocast or contextlib.nullcontext

    @property
    def model(self) -> torch.nn.Module:
        """The student's denoiser itself (the same module, the same parameter storage)."""
        return self.adapter.model

    def to(self, device) -> "AdapterDisabledTeacher":
        """Nothing to move: the teacher lives where the student lives."""
        return self

    @contextlib.contextmanager
    def pretrained(self):
        """The block sees `adapter.model` (and its text encoder) as the pretrained model."""
        from .deme.projection import channel_projection_detached
        from .models.lora import lora_disabled

        extra = list(self.adapter.extra_trainable_modules().values())
        with lora_disabled(self.model, *extra), channel_projection_detached(self.model), _eval_mode(self.model, *extra):
            yield self.model

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, model_t: torch.Tensor, conditioning: dict,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        """The pretrained model's prediction for a batch, in float32, at most `chunk_size` samples at a time."""
        with self.pretrained() as model, self.autocast():
            return _predict_in_chunks(self.adapter, model, x_t, model_t, conditioning, chunk_size)


class FrozenTeacher:
    """A frozen copy of `adapter.model` taken now, that predicts through `adapter.predict` (full
    fine-tuning, BitFit, DiffFit: the runs whose base weights move).

    Args:
        adapter: the model-type adapter (`diffusers_ant.models`), before any change to its model.
        dtype: the weight dtype (float32, or the low precision of `--mixed_precision`).
        autocast: a context-manager factory the predictions run under (e.g. `accelerator.autocast`),
            needed when the teacher's weights are in low precision and its inputs are float32.
        cast_inputs: cast the inputs to the weights' dtype instead, for a run with low-precision weights
            and no autocast (DeepSpeed: its engine casts the student and Accelerate's autocast is off;
            the student gets the same forward pre-hook, `deepspeed_support.cast_inputs_to_parameter_dtype`).
    """

    shares_student = False

    def __init__(self, adapter, dtype: torch.dtype = torch.float32, autocast=None, cast_inputs: bool = False):
        from .training.precision import cast_frozen_parameters

        self.adapter = adapter
        self.model = copy.deepcopy(adapter.model)  # (a copy keeps no forward hook of the student's: none is set yet)
        self.model.requires_grad_(False)
        self.model.eval()
        cast_frozen_parameters(self.model, dtype)
        self.autocast = autocast or contextlib.nullcontext
        if cast_inputs:
            from .training.deepspeed_support import cast_inputs_to_parameter_dtype

            cast_inputs_to_parameter_dtype(self.model)

    def to(self, device) -> "FrozenTeacher":
        """Move the teacher to `device` (its dtype stays)."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, model_t: torch.Tensor, conditioning: dict,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        """The teacher's prediction for a batch, in float32, at most `chunk_size` samples at a time."""
        with self.autocast():
            return _predict_in_chunks(self.adapter, self.model, x_t, model_t, conditioning, chunk_size)
