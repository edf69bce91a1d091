"""The frozen pretrained denoiser ("teacher") that fine-tuning objectives compare the student with.

Two methods of this project read the pretrained model's prediction on the student's own noisy input:

* Diff-Tuning's knowledge-distillation variant (Zhong et al., NeurIPS 2024, Sec. 4.2): retention samples
  take `teacher(x_t, t, c)` as their regression target instead of a knowledge bank's images;
* DeMe's consistency loss (Decouple-Then-Merge, Sec. 3.2): `||eps_pre(x_t, t) - eps_i(x_t, t)||^2`
  keeps each interval's fine-tune close to the pretrained model.

Both use this one component, built once from the model-type adapter before the student is modified
(LoRA, channel projections, DiffFit scales): a copy of the denoiser with every parameter frozen, in
the run's weight dtype (normalisation layers kept in float32, see `training.precision`), in eval
mode. It shares the adapter's frozen parts (VAE, text encoder, ControlNet's UNet): only the denoiser
is copied. It is never trained, never handed to the optimizer, Accelerate or EMA, and never saved:
checkpoints and outputs hold the student only.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch


class FrozenTeacher:
    """A frozen copy of `adapter.model` taken now, that predicts through `adapter.predict`.

    Args:
        adapter: the model-type adapter (`diffusers_ant.models`), before any change to its model.
        dtype: the weight dtype (float32, or the low precision of `--mixed_precision`).
        autocast: a context-manager factory the predictions run under (e.g. `accelerator.autocast`),
            needed when the teacher's weights are in low precision and its inputs are float32.
    """

    def __init__(self, adapter, dtype: torch.dtype = torch.float32, autocast=None):
        from .training.precision import cast_frozen_parameters

        self.adapter = adapter
        self.model = copy.deepcopy(adapter.model)
        self.model.requires_grad_(False)
        self.model.eval()
        cast_frozen_parameters(self.model, dtype)
        self.autocast = autocast or contextlib.nullcontext

    def to(self, device) -> "FrozenTeacher":
        """Move the teacher to `device` (its dtype stays)."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, model_t: torch.Tensor, conditioning: dict,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        """The teacher's prediction for a batch, in float32, at most `chunk_size` samples at a time."""
        from .training.step import _index

        n = x_t.shape[0]
        step = n if chunk_size is None else chunk_size
        out = []
        with self.autocast():
            for start in range(0, n, step):
                idx = torch.arange(start, min(start + step, n), device=x_t.device)
                out.append(self.adapter.predict(self.model, x_t[idx], model_t[idx], _index(conditioning, idx)).float())
        return torch.cat(out)
