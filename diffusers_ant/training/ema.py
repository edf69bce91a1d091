"""EMA of the trained weights (diffusers' `EMAModel`): where it lives, its update, its restoration."""

from __future__ import annotations

import contextlib

import torch


def make_ema(args, params):
    """diffusers' `EMAModel` over `params`, with its shadow weights in float32.

    Under DeepSpeed with bf16 / fp16 the engine casts the trained parameters themselves to the low precision
    (its float32 master copy lives in the optimizer): an EMA cloned from them would be kept, and updated, in
    bf16, where an update of (1 - decay) times a small difference rounds away and the EMA lags far behind
    the weights. diffusers' scripts build their EMA from a float32 model; the shadow weights here are float32
    copies (`EMAModel.step` then subtracts in float32, `copy_to` casts back into the parameters)."""
    from diffusers.training_utils import EMAModel

    shadow = [p if p.dtype == torch.float32 or not p.is_floating_point() else p.detach().float() for p in params]
    return EMAModel(shadow, decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                    power=args.ema_power, foreach=args.foreach_ema)


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


def ema_state(ema, accelerator) -> dict:
    """EMA's state for a checkpoint, read on the host. With `--offload_ema` each update's copy back to the CPU
    is queued without waiting (`non_blocking`, as in diffusers' scripts), so on a GPU the host could read the
    pinned shadow weights before the copy lands: wait for the device first."""
    backend = getattr(torch, accelerator.device.type, None)  # torch.cuda, torch.xpu, ... (torch.accelerator: 2.6+)
    if accelerator.device.type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize(accelerator.device)
    return ema.state_dict()


def restore_ema(ema, state: dict, device) -> None:
    """Load EMA's state, THEN move it to `device`: the loaded shadow weights live where they were read
    (the CPU), so moving first would leave them there (diffusers' scripts load, then move)."""
    ema.load_state_dict(state)
    ema.to(device)


@contextlib.contextmanager
def ema_weights(ema, params):
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
