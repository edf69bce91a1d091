"""LoRA (Hu et al., 2022: W + (alpha / r) * B A, B initialised to zero) on any diffusers denoiser, through peft.

peft does the work; this module only papers over one difference between models:
``UNet2DConditionModel`` and ``ControlNetModel`` have diffusers' ``add_adapter`` (PeftAdapterMixin),
``UNet2DModel`` and ``DiTTransformer2DModel`` do not, and take ``peft.inject_adapter_in_model``.
Either way the module keeps its class (no PeftModel wrapper), so pipelines, EMA and
``save_pretrained`` see the same object.

On disk, LoRA weights use peft's key names without the adapter name (``...to_q.lora_A.weight``,
as ``get_peft_model_state_dict`` returns them) in ``pytorch_lora_weights.safetensors``, beside
peft's ``adapter_config.json``. Stable Diffusion LoRA is instead written by diffusers'
``save_lora_weights`` so that ``StableDiffusionPipeline.load_lora_weights`` reads it (see sd.py).
"""

import contextlib
import copy
import os

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def attach_lora(module: torch.nn.Module, lora_config, adapter_name: str = "default") -> torch.nn.Module:
    """Add a LoRA adapter to ``module`` in place; freeze the base weights, leave only LoRA trainable."""
    from peft import inject_adapter_in_model

    module.requires_grad_(False)
    if hasattr(module, "add_adapter"):
        module.add_adapter(lora_config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(lora_config, module, adapter_name=adapter_name)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def has_lora(module: torch.nn.Module) -> bool:
    """Whether peft LoRA layers are present anywhere in ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_state_dict(module: torch.nn.Module, adapter_name: str = "default") -> dict:
    """The LoRA weights of ``module``, keys without the adapter name (peft's saving format)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=adapter_name)


def base_copy(module: torch.nn.Module, merge: bool) -> torch.nn.Module:
    """A fresh module of the same class without LoRA layers.

    ``merge=True`` folds the LoRA update into the weights (W + scale * B A), for saving a LoRA
    run as a full model; ``merge=False`` returns the untouched base weights. Written by hand
    because peft's ``merge_and_unload`` lives on ``PeftModel``, which injected modules are not.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    work = copy.deepcopy(module)
    if merge:
        for layer in work.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
    state = {}
    for key, value in work.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    fresh = type(module).from_config(module.config)
    fresh.load_state_dict(state)
    return fresh.to(device=next(module.parameters()).device, dtype=next(module.parameters()).dtype)


def inference_lora_config(lora_config):
    """The LoRA config written beside the weights, for loading: the training config without its dropout.

    Dropout is a training choice. A loader (diffusers' ``load_lora_weights``, peft's injection) creates the
    dropout modules in training mode inside an eval-mode model, so a recorded ``lora_dropout`` would drop
    activations at every inference: FluxPipeline's samples then changed from one call to the next."""
    import copy

    config = copy.deepcopy(lora_config)
    config.lora_dropout = 0.0
    return config


def save_peft_lora(output_dir: str, module: torch.nn.Module, lora_config) -> None:
    """Write ``pytorch_lora_weights.safetensors`` and peft's ``adapter_config.json`` (without the dropout)."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(module).items()}
    save_file(state, os.path.join(output_dir, LORA_WEIGHTS_NAME))
    inference_lora_config(lora_config).save_pretrained(output_dir)


def load_peft_lora(module: torch.nn.Module, folder: str, adapter_name: str = "default") -> torch.nn.Module:
    """Attach the LoRA adapter saved by :func:`save_peft_lora` in ``folder`` to ``module`` (in place)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = os.path.join(folder, LORA_WEIGHTS_NAME)
    if not os.path.isfile(weights) or not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise ValueError(f"no LoRA weights in {folder!r}: expected {LORA_WEIGHTS_NAME} and adapter_config.json")
    config = LoraConfig.from_pretrained(folder)
    attach_lora(module, config, adapter_name=adapter_name)
    state = load_file(weights, device=str(next(module.parameters()).device))
    result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
    # this adapter's tensors only: a module may carry other adapters already (DeMe's LoRA ensemble)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{adapter_name}." in k]
    if missing:
        raise ValueError(f"LoRA weights in {folder!r} do not fit this model: {len(missing)} LoRA tensors missing")
    module.requires_grad_(False)
    return module


@contextlib.contextmanager
def lora_disabled(*modules):
    """Run the block with every LoRA layer of ``modules`` switched off: each layer returns its base
    layer's output, exactly (``None`` entries are skipped).

    The equivalent of peft's ``PeftModel.disable_adapter()`` context (and of diffusers'
    ``disable_adapters()`` / ``enable_adapters()`` on models with ``add_adapter``) for any module
    peft injected LoRA into: both end in ``BaseTunerLayer.enable_adapters``, which is what this calls.
    Written here because the injected models (``UNet2DModel``, ``DiTTransformer2DModel``, a text
    encoder) are no ``PeftModel`` and have no such context. ``enable_adapters`` also flips the LoRA
    weights' ``requires_grad``; the flags are put back as they were, so an optimizer, DDP and the
    per-task-gradient engine see the same trainable set after the block.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [layer for module in modules if module is not None for layer in module.modules()
              if isinstance(layer, BaseTunerLayer)]
    disabled = [layer.disable_adapters for layer in layers]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, was_disabled in zip(layers, disabled):
            layer.enable_adapters(not was_disabled)
        for param, flag in flags:
            param.requires_grad_(flag)
