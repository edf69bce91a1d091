"""Parameter-efficient fine-tuning without adapters: BitFit and DiffFit, for every diffusers denoiser.

``--finetune`` chooses what a fine-tuning run trains (issue 11, item 3):

- ``full``: every parameter of the trained module;
- ``lora``: peft LoRA, set up by ``ModelAdapter.add_lora(rank)`` (not here; ``--rank`` is its rank);
- ``bitfit``: the bias terms only (Ben Zaken et al., ACL 2022, "BitFit");
- ``difffit``: DiffFit (Xie et al., ICCV 2023, "DiffFit: Unlocking Transferability of Large Diffusion
  Models via Simple Parameter-Efficient Fine-Tuning", Sec. 3.2): the bias terms, the affine
  parameters of the normalisation layers, the class and time embeddings, and a learnable scale
  gamma, initialised to 1, on every residual branch: ``x + gamma * branch(x)``.

The scales are inserted so that they fold exactly into the layer that produces the branch output:
gamma multiplies that layer's output channel-wise, gamma * (W x + b) = (diag(gamma) W) x + gamma b,
so :func:`merge_difffit_scales` rewrites W and b and removes gamma, and the merged model is a plain
diffusers model with the same outputs (to float rounding). The producing layers are found by module
type, which covers all four model types of this project and diffusers' other UNets and transformers:

- ``ResnetBlock2D`` / ``ResnetBlockCondNorm2D``: ``conv2`` (the residual branch ends there; the block
  returns ``(shortcut(x) + conv2(...)) / output_scale_factor``);
- attention layers (``Attention``, ``AttentionModuleMixin``): ``to_out.0``, the output projection
  (self- and cross-attention alike, e.g. ``attn1`` / ``attn2`` of a transformer block);
- ``FeedForward``: its last ``Linear`` (``ff.net.2``).

gamma is a vector over the layer's output channels (a per-block scalar is its special case; the
vector folds just as exactly). It is a parameter named ``difffit_scale`` on the producing layer and
is applied by a forward hook, so every other state-dict key keeps its diffusers name and Accelerate
checkpoints, EMA and optimizers see it like any other parameter.

ControlNet: its zero convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``,
``controlnet_cond_embedding.conv_out``) start with zero weights, so every gradient into the rest of
the ControlNet passes through zeros; with only biases and scales trainable nothing but constant
residuals could ever be learned. BitFit and DiffFit therefore also train the zero convolutions
(the same reason the LoRA targets include them, see ``models/controlnet.py``); the summary counts
them as their own group.

Written by hand: peft's IA3 scales activations too, but a peft-wrapped layer renames the state-dict
keys and peft has no BitFit / DiffFit selection or merge for these layers.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

FINETUNE_MODES = ("full", "lora", "bitfit", "difffit")
DIFFFIT_SCALE_NAME = "difffit_scale"

# Module-name prefixes of a ControlNetModel's zero-initialised output convolutions (see the module docstring).
CONTROLNET_ZERO_CONVS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")

# Parameter groups, in the order a parameter is assigned to the first one it belongs to.
GROUP_NAMES = {
    "scale": "residual-branch scales (gamma)",
    "zero_conv": "ControlNet zero convolutions",
    "class_embedding": "class embeddings",
    "time_embedding": "time embeddings",
    "norm": "normalisation layers",
    "bias": "bias terms",
    "lora": "LoRA weights",
    "all": "all parameters",
}
# DiffFit trains these groups; BitFit trains every parameter named ``bias`` (norm and embedding
# biases included) plus a ControlNet's zero convolutions.
DIFFFIT_GROUPS = ("scale", "zero_conv", "class_embedding", "time_embedding", "norm", "bias")
MODE_TITLES = {
    "full": "full fine-tuning",
    "lora": "LoRA (Hu et al., 2022)",
    "bitfit": "BitFit (Ben Zaken et al., 2022)",
    "difffit": "DiffFit (Xie et al., 2023)",
}


def validate_finetune_mode(mode: str, rank=None) -> str:
    """``mode`` if it is a known ``--finetune`` value that fits ``--rank``; else a one-line ``ValueError``."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown --finetune {mode!r}: choose one of {', '.join(FINETUNE_MODES)}")
    if rank is not None and mode in ("bitfit", "difffit", "full"):
        raise ValueError(f"--rank is the LoRA rank and does not apply to --finetune {mode}: drop --rank or use --finetune lora")
    return mode


# ------------------------------------------------------------------------------ what is where


def _norm_types() -> tuple:
    types = [nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    try:
        from diffusers.models import normalization

        types += [getattr(normalization, name) for name in ("LayerNorm", "RMSNorm", "FP32LayerNorm") if hasattr(normalization, name)]
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    return tuple(types)


def _embedding_types() -> tuple:
    """(class embedding types, time embedding types)."""
    class_types, time_types = [nn.Embedding], []
    try:
        from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding

        class_types.append(LabelEmbedding)
        time_types.append(TimestepEmbedding)
    except ImportError:  # pragma: no cover
        pass
    return tuple(class_types), tuple(time_types)


def _is_bias(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf == "bias" or leaf.endswith("_bias")


def _trained_by(mode: str, name: str, group, time_embedding: bool = True) -> bool:
    if mode == "bitfit":
        return group == "zero_conv" or _is_bias(name)
    if group == "time_embedding" and not time_embedding:
        return _is_bias(name)
    return group in DIFFFIT_GROUPS


def _is_zero_conv(name: str, model: nn.Module) -> bool:
    if type(model).__name__ != "ControlNetModel":
        return False
    return any(name == prefix or name.startswith(prefix + ".") for prefix in CONTROLNET_ZERO_CONVS)


def _under(module_name: str, prefixes: list) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes if p)


def parameter_groups(model: nn.Module) -> dict:
    """``{parameter name: group}`` for every parameter of ``model``, groups as in :data:`GROUP_NAMES`.

    A parameter belongs to the first group that holds it, in the order scale, zero_conv (ControlNet),
    class_embedding (``LabelEmbedding``, ``nn.Embedding`` and everything under a ``class_embedding`` /
    ``add_embedding`` module), time_embedding (``TimestepEmbedding``, the time MLP), norm (the affine parameters owned by a
    normalisation layer; not the modulation ``Linear`` inside an adaptive norm), bias (any other
    parameter named ``bias``), lora (peft's ``lora_*``); the rest is ``None`` (frozen by BitFit and DiffFit).
    """
    norm_types = _norm_types()
    class_types, time_types = _embedding_types()
    owner = {}  # parameter name -> group of the module owning it directly
    class_prefixes, time_prefixes = [], []
    for module_name, module in model.named_modules():
        last = module_name.rsplit(".", 1)[-1]
        if isinstance(module, class_types) or last in ("class_embedding", "add_embedding"):
            class_prefixes.append(module_name)
        elif isinstance(module, time_types):
            time_prefixes.append(module_name)
        if isinstance(module, norm_types):
            for param_name, _ in module.named_parameters(recurse=False):
                owner[f"{module_name}.{param_name}" if module_name else param_name] = "norm"
    groups = {}
    for name, _ in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        if leaf == DIFFFIT_SCALE_NAME:
            group = "scale"
        elif _is_zero_conv(module_name, model):
            group = "zero_conv"
        elif _under(module_name, class_prefixes):
            group = "class_embedding"
        elif _under(module_name, time_prefixes):
            group = "time_embedding"
        elif owner.get(name) == "norm":
            group = "norm"
        elif _is_bias(name):
            group = "bias"
        elif "lora_" in name:
            group = "lora"
        else:
            group = None
        groups[name] = group
    return groups


def difffit_targets(model: nn.Module) -> list:
    """``[(name, layer)]``: the layers whose output ends a residual branch (see the module docstring)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # pragma: no cover - older diffusers
        AttentionModuleMixin = ()
    from diffusers.models.attention_processor import Attention

    attention_types = (Attention,) + ((AttentionModuleMixin,) if AttentionModuleMixin else ())
    targets = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (ResnetBlock2D, ResnetBlockCondNorm2D)):
            targets.append((prefix + "conv2", module.conv2))
        elif isinstance(module, attention_types) and isinstance(getattr(module, "to_out", None), nn.ModuleList):
            if len(module.to_out) and isinstance(module.to_out[0], nn.Linear):
                targets.append((prefix + "to_out.0", module.to_out[0]))
        elif isinstance(module, FeedForward):
            linear = [i for i, layer in enumerate(module.net) if isinstance(layer, nn.Linear)]
            if linear:
                targets.append((prefix + f"net.{linear[-1]}", module.net[linear[-1]]))
    return targets


# ------------------------------------------------------------------------------ DiffFit scales


def _scale_branch_output(layer, args, output):
    """Forward hook: the layer's output times its ``difffit_scale``, channel-wise (dim 1 of a conv's
    output, the last dim of a Linear's)."""
    gamma = getattr(layer, DIFFFIT_SCALE_NAME).to(output.dtype)
    if isinstance(layer, nn.Conv2d):
        gamma = gamma.view(1, -1, *([1] * (output.ndim - 2)))
    return output * gamma


def _hook_keys(layer: nn.Module) -> list:
    # found by identity rather than kept as handles: a deep copy (EMA, merged copies) copies the hook
    # dict, and a copied handle would point at the original module's hooks
    return [key for key, hook in layer._forward_hooks.items() if hook is _scale_branch_output]


def add_difffit_scales(model: nn.Module) -> list:
    """Insert a trainable gamma = 1 on every residual-branch output layer of ``model``; return their names.

    gamma = 1 leaves the output unchanged (multiplication by 1 is exact). Layers that already have
    one are left as they are, so calling this twice adds nothing.
    """
    names = []
    for name, layer in difffit_targets(model):
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        if not hasattr(layer, DIFFFIT_SCALE_NAME):
            weight = layer.weight
            channels = weight.shape[0]
            layer.register_parameter(DIFFFIT_SCALE_NAME, nn.Parameter(torch.ones(channels, dtype=weight.dtype, device=weight.device)))
            layer.register_forward_hook(_scale_branch_output)
        names.append(f"{name}.{DIFFFIT_SCALE_NAME}")
    return names


def has_difffit_scales(model: nn.Module) -> bool:
    return any(hasattr(m, DIFFFIT_SCALE_NAME) for m in model.modules())


@torch.no_grad()
def merge_difffit_scales(model: nn.Module) -> nn.Module:
    """Fold every gamma into its layer (W <- diag(gamma) W, b <- gamma b) and remove it, in place.

    The result has exactly the parameters of the model before :func:`add_difffit_scales` (plain
    diffusers loads it) and the same outputs up to float rounding. The products are taken in float32.
    Returns ``model``.
    """
    for layer in model.modules():
        gamma = layer._parameters.get(DIFFFIT_SCALE_NAME) if hasattr(layer, "_parameters") else None
        if gamma is None:
            continue
        g = gamma.detach().float()
        weight = layer.weight
        weight.copy_((weight.float() * g.view(-1, *([1] * (weight.ndim - 1)))).to(weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_((layer.bias.float() * g).to(layer.bias.dtype))
        del layer._parameters[DIFFFIT_SCALE_NAME]
        for key in _hook_keys(layer):
            del layer._forward_hooks[key]
    return model


def difffit_merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with the scales merged (for saving mid-training; ``model`` keeps training)."""
    return merge_difffit_scales(copy.deepcopy(model))


# ------------------------------------------------------------------------------ modes


@dataclass
class FinetuneSummary:
    """What a fine-tuning mode trains, for logs and the model card.

    ``groups`` counts the trained parameters (scalars) per group of :data:`GROUP_NAMES`;
    ``num_scales`` is the number of DiffFit gamma vectors (residual branches).
    """

    mode: str
    trainable_parameters: int
    total_parameters: int
    groups: dict = field(default_factory=dict)
    num_scales: int = 0

    @property
    def fraction(self) -> float:
        return self.trainable_parameters / self.total_parameters if self.total_parameters else 0.0

    @property
    def description(self) -> str:
        """One line, e.g. ``DiffFit (Xie et al., 2023): 5,120 of 398,000 parameters trained (1.29%): ...``."""
        text = (
            f"{MODE_TITLES.get(self.mode, self.mode)}: {self.trainable_parameters:,} of {self.total_parameters:,} "
            f"parameters trained ({100 * self.fraction:.2f}%)"
        )
        parts = []
        for group, count in self.groups.items():
            part = f"{GROUP_NAMES.get(group, group)} {count:,}"
            if group == "scale":
                part += f" ({self.num_scales} branches)"
            parts.append(part)
        return text + (": " + "; ".join(parts) if parts and self.mode != "full" else "")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["description"] = self.description
        return data

    def __str__(self) -> str:
        return self.description


def _whole_module_trains(param_name: str, model: nn.Module) -> bool:
    """Whether every parameter of the module owning ``param_name`` trains (not just its bias)."""
    module_name = param_name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return all(p.requires_grad for p in module.parameters(recurse=False))


def count_parameters(model: nn.Module) -> tuple:
    """``(trainable, total)`` parameter counts (scalars) of ``model``; shared parameters counted once."""
    trainable = total = 0
    for _, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def summarize_finetune(model: nn.Module, mode: str) -> FinetuneSummary:
    """A :class:`FinetuneSummary` of what ``model`` trains now (its ``requires_grad`` flags) under ``mode``."""
    groups = parameter_groups(model)
    counts = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = groups[name] or "other"
            if mode == "full":
                group = "all"
            elif group not in ("zero_conv", "scale") and _is_bias(name) and not _whole_module_trains(name, model):
                group = "bias"  # e.g. a norm's bias under BitFit: one of the bias terms
            counts[group] = counts.get(group, 0) + param.numel()
    trainable, total = count_parameters(model)
    scales = sum(1 for m in model.modules() if hasattr(m, "_parameters") and DIFFFIT_SCALE_NAME in m._parameters)
    return FinetuneSummary(mode, trainable, total, counts, scales)


def apply_finetune_mode(model: nn.Module, mode: str, time_embedding: bool = True) -> FinetuneSummary:
    """Set which parameters of ``model`` train for ``--finetune mode``, in place; return the summary.

    ``full``: everything trains. ``bitfit``: bias terms (plus a ControlNet's zero convolutions).
    ``difffit``: inserts the gamma scales (:func:`add_difffit_scales`), then trains gamma, biases,
    normalisation layers, class and time embeddings (plus a ControlNet's zero convolutions).
    ``time_embedding=False`` keeps the weights of the time MLPs frozen (their biases still train):
    diffusers' ``DiTTransformer2DModel`` holds a copy of the timestep and label embedders in every
    block (the original DiT shares one), which makes that group about 2.8M parameters per block at
    DiT-XL/2 size, far from DiffFit's 0.12% of the model.
    ``lora``: the LoRA layers must already be there (``ModelAdapter.add_lora``); nothing changes.
    Call it before building the optimizer, EMA and ``accelerator.prepare`` (and before
    ``load_state`` on resume: the checkpoint holds the scales).
    """
    validate_finetune_mode(mode)
    if mode == "lora":
        from .models.lora import has_lora

        if not has_lora(model):
            raise ValueError("--finetune lora needs LoRA layers: call ModelAdapter.add_lora(rank) first")
        return summarize_finetune(model, mode)
    if mode == "full":
        model.requires_grad_(True)
        return summarize_finetune(model, mode)
    if mode == "difffit":
        add_difffit_scales(model)
    groups = parameter_groups(model)
    for name, param in model.named_parameters():
        param.requires_grad_(_trained_by(mode, name, groups[name], time_embedding))
    summary = summarize_finetune(model, mode)
    if summary.trainable_parameters == 0:
        raise ValueError(f"--finetune {mode} found nothing to train in {type(model).__name__}: use --finetune full or lora")
    return summary


__all__ = [
    "DIFFFIT_SCALE_NAME",
    "FINETUNE_MODES",
    "FinetuneSummary",
    "add_difffit_scales",
    "apply_finetune_mode",
    "count_parameters",
    "difffit_merged_copy",
    "difffit_targets",
    "has_difffit_scales",
    "merge_difffit_scales",
    "parameter_groups",
    "summarize_finetune",
    "validate_finetune_mode",
]
