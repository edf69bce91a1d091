"""Mixed precision in the trainer: the weight dtype of frozen parameters, the fp16 loss scale, and sampling.

Under `--mixed_precision fp16|bf16` diffusers' scripts keep the parameters the optimizer updates in
float32 (master weights) and everything frozen (VAE, text encoder, a LoRA run's base weights) in
the low precision, to halve its memory; the forward passes run under autocast. Two details of the
CPU are handled here as well: its autocast runs GroupNorm / LayerNorm in float32 but cannot take
low-precision norm weights with a float32 input, so normalisation layers keep float32 weights; and
a pipeline's own sampling (latents in the trained model's float32) is run with the frozen parts
lifted to float32 there.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)


def cast_frozen_parameters(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen (`requires_grad=False`) floating-point parameters of `module` to `dtype`, in place.

    Trainable parameters (LoRA, the optimizer's float32 master weights) and the weights of
    normalisation layers are left as they are. What diffusers' LoRA scripts do with
    `unet.to(weight_dtype)` followed by `cast_training_params(unet, torch.float32)`, written out
    because those two calls would also cast the norms. Returns the number of tensors cast."""
    if dtype == torch.float32:
        return 0
    cast = 0
    for sub in module.modules():
        if isinstance(sub, _NORMS):
            continue
        for param in sub.parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast += 1
    return cast


def current_loss_scale(scaler, device=None) -> float:
    """An fp16 GradScaler's current scale (1.0 without a scaler), for the gradient engine.

    Read through `scaler.scale(...)`, which also initialises the scaler's state on first use, as
    `accelerator.backward` would: the engine back-propagates without it, and `scaler.unscale_` /
    `step` refuse a scaler that never scaled anything."""
    if scaler is None:
        return 1.0
    return float(scaler.scale(torch.ones((), device=device)))


@contextlib.contextmanager
def sampling_precision(accelerator, adapter):
    """Sample a pipeline whose frozen parts are in low precision while the trained model is float32.

    On a GPU sampling runs under autocast, as diffusers' scripts do. The CPU's autocast cannot run
    a convolution or GroupNorm with low-precision weights on the pipeline's float32 latents, so
    there every floating-point parameter of the frozen parts and of the trained model is lifted to
    float32 for the sampling and put back to its own dtype afterwards."""
    modules = list(adapter.frozen_modules().values()) + [adapter.model]
    params = [p for module in modules for p in module.parameters() if p.is_floating_point()]
    low = [p for p in params if p.dtype != torch.float32]
    if accelerator.device.type != "cpu" or not low:
        with accelerator.autocast():
            yield
        return
    dtypes = lift_to_float32(modules)
    try:
        yield
    finally:
        for p, dtype in zip(low, dtypes):
            p.data = p.data.to(dtype)


def lift_to_float32(modules) -> list:
    """Cast every low-precision floating-point parameter of `modules` to float32, in place; returns the
    dtypes they had (in `parameters()` order of the low-precision ones). Per parameter rather than
    `module.to(torch.float32)`, which diffusers' models answer with a warning about fp32 modules."""
    dtypes = []
    for module in modules:
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                dtypes.append(p.dtype)
                p.data = p.data.float()
    return dtypes
