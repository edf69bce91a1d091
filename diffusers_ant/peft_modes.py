"""Parameter-efficient fine-tuning without adapters: BitFit and DiffFit, for every diffusers denoiser.

``--finetune`` chooses what a fine-tuning run trains (issue 11, item 3; issue 17, item 5):

- ``full``: every parameter of the trained module;
- ``lora``: peft LoRA, set up by ``ModelAdapter.add_lora(rank)`` (not here; ``--rank`` is its rank);
- ``bitfit``: the bias terms only (Ben Zaken et al., ACL 2022, "BitFit");
- ``difffit``: DiffFit (Xie et al., ICCV 2023, "DiffFit: Unlocking Transferability of Large Diffusion
  Models via Simple Parameter-Efficient Fine-Tuning", Sec. 3.2) as the Diff-Tuning authors' code
  (thuml/Diffusion-Tuning, ``train.py`` ``diff_fit`` and ``models.py`` ``use_gamma``) runs it on DiT.

What DiffFit trains. The authors' code unfreezes every parameter whose name holds ``bias``, ``norm``,
``gamma`` or ``y_embed``. On their DiT that is: every bias (the time-embedding MLP's biases included),
no norm parameter (DiT's LayerNorms have none), the label table (``y_embedder``, all 1000 classes plus
the null row) and the scale factors gamma, initialised to 1, that ``use_gamma`` inserts in blocks
0..13 only (``DiTBlock(..., use_gamma=(i < 14))``): on the attention's qkv output (3 x hidden), on its
output projection (``Attention.gamma2``), on the attention residual branch (``DiTBlock.gamma1``, the
same channels again) and on the MLP residual branch (``DiTBlock.gamma2``). The time-embedding MLP's
weights stay frozen. On DiT-XL/2 that is 1,739,552 of 675,129,632 parameters (0.26%; the label table
is 1,153,152 of them; DiffFit's paper quotes 0.12% for its own, smaller label table). Here, for any
diffusers denoiser:

- biases, the affine parameters of normalisation layers, label tables (``nn.Embedding`` /
  ``LabelEmbedding``) train; the weights of embedding MLPs (the time MLP, a UNet's projection class
  embedding, SDXL's ``add_embedding``) stay frozen (their biases train, as the authors' ``bias`` match);
- the scales sit in the *first half of the blocks*: a transformer's first ceil(n/2) of
  ``transformer_blocks`` (then ``single_transformer_blocks``, one sequence; DiT-XL/2: blocks 0..13,
  the authors' hard-coded 14, which is half of DiT-XL's 28 only); a UNet's (and a ControlNet's)
  ``down_blocks``, the encoder half from the input to the bottleneck (the mid and up blocks get
  none); a model with neither: every block. In that half: ``to_q``, ``to_k``, ``to_v`` of every
  attention (the authors' qkv gamma; diffusers keeps q, k, v as three layers), two scales on every
  attention's ``to_out.0`` (the attention's own and its residual branch's, as the authors' gamma2
  and the block's gamma1), the last ``Linear`` of every ``FeedForward`` (the MLP branch's gamma), and
  ``conv2`` of every ResNet block (its residual branch; a UNet's analogue, from DiffFit's paper);
- diffusers' ``DiTTransformer2DModel`` holds a copy of DiT's one time and label embedder in every
  block (``transformer_blocks.i.norm1.emb``; the conversion script copies the same weights into each).
  When those copies are equal (a converted DiT), DiffFit makes them one module again, so one label
  table and one set of time biases train, with the gradient of every block, exactly as in the
  original DiT (:func:`share_equal_embedding_copies`); copies that differ (a DiT trained in
  diffusers from scratch) are separate tables and each trains.

The scales fold exactly into the layer that produces the scaled output: gamma multiplies that layer's
output channel-wise, gamma * (W x + b) = (diag(gamma) W) x + gamma b, so :func:`merge_difffit_scales`
rewrites W and b, removes gamma and gives the shared embedding copies back to their blocks; the
merged model is a plain diffusers model with the same outputs (to float rounding). gamma is a vector
over the layer's output channels, a parameter named ``difffit_scale`` (and ``difffit_scale_residual``,
the second one of an attention output) on the producing layer, applied by a forward hook, so every
other state-dict key keeps its diffusers name and Accelerate checkpoints, EMA and optimizers see it
like any other parameter.

ControlNet: its zero convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``,
``controlnet_cond_embedding.conv_out``) start with zero weights, so every gradient into the rest of
the ControlNet passes through zeros; with only biases and scales trainable nothing but constant
residuals could ever be learned. BitFit and DiffFit therefore also train the zero convolutions
(the same reason the LoRA targets include them, see ``models/controlnet.py``); the summary counts
them as their own group. The authors released no ControlNet code.

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
# The second scale of an attention output: its residual branch's (the authors' DiTBlock.gamma1), on
# top of the attention's own (their Attention.gamma2).
DIFFFIT_RESIDUAL_SCALE_NAME = "difffit_scale_residual"
DIFFFIT_SCALE_NAMES = (DIFFFIT_SCALE_NAME, DIFFFIT_RESIDUAL_SCALE_NAME)

# Module-name prefixes of a ControlNetModel's zero-initialised output convolutions (see the module docstring).
CONTROLNET_ZERO_CONVS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")

# Parameter groups, in the order a parameter is assigned to the first one it belongs to.
GROUP_NAMES = {
    "scale": "scales (gamma)",
    "zero_conv": "ControlNet zero convolutions",
    "class_embedding": "label tables",
    "time_embedding": "embedding MLPs (time, added conditions)",
    "norm": "normalisation layers",
    "bias": "bias terms",
    "lora": "LoRA weights",
    "all": "all parameters",
}
# DiffFit trains these groups and every bias (the embedding MLPs' included, see the module docstring);
# BitFit trains every parameter named ``bias`` (norm and embedding biases included) plus a
# ControlNet's zero convolutions.
DIFFFIT_GROUPS = ("scale", "zero_conv", "class_embedding", "norm", "bias")
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
    """(label-table types, embedding-MLP types)."""
    class_types, time_types = [nn.Embedding], []
    try:
        from diffusers.models.embeddings import LabelEmbedding, TimestepEmbedding

        class_types.append(LabelEmbedding)
        time_types.append(TimestepEmbedding)
    except ImportError:  # pragma: no cover
        pass
    return tuple(class_types), tuple(time_types)


def _is_scale(leaf: str) -> bool:
    return leaf in DIFFFIT_SCALE_NAMES


def _is_bias(name: str) -> bool:
    leaf = name.rpartition(".")[2]
    return leaf == "bias" or leaf.endswith("_bias")


def _trained_by(mode: str, name: str, group) -> bool:
    if mode == "bitfit":
        return group == "zero_conv" or _is_bias(name)
    return group in DIFFFIT_GROUPS or _is_bias(name)  # the authors' `bias` match: embedding MLPs' biases too


def _is_zero_conv(name: str, model: nn.Module) -> bool:
    if type(model).__name__ != "ControlNetModel":
        return False
    return any(name == prefix or name.startswith(prefix + ".") for prefix in CONTROLNET_ZERO_CONVS)


def _under(module_name: str, prefixes: list) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes if p)


def parameter_groups(model: nn.Module) -> dict:
    """``{parameter name: group}`` for every parameter of ``model``, groups as in :data:`GROUP_NAMES`.

    A parameter belongs to the first group that holds it, in the order scale, zero_conv (ControlNet),
    class_embedding (the label tables: ``LabelEmbedding``, ``nn.Embedding``), time_embedding (the
    embedding MLPs: ``TimestepEmbedding``, and whatever else sits under a ``class_embedding`` /
    ``add_embedding`` module), norm (the affine parameters owned by a normalisation layer; not the
    modulation ``Linear`` inside an adaptive norm), bias (any other parameter named ``bias``), lora
    (peft's ``lora_*``); the rest is ``None`` (frozen by BitFit and DiffFit).
    """
    norm_types = _norm_types()
    class_types, time_types = _embedding_types()
    owner = {}  # parameter name -> group of the module owning it directly
    class_prefixes, time_prefixes = [], []
    for module_name, module in model.named_modules():
        last = module_name.rsplit(".", 1)[-1]
        if isinstance(module, class_types):
            class_prefixes.append(module_name)
        elif isinstance(module, time_types) or last in ("class_embedding", "add_embedding"):
            time_prefixes.append(module_name)
        if isinstance(module, norm_types):
            for param_name, _ in module.named_parameters(recurse=False):
                owner[f"{module_name}.{param_name}" if module_name else param_name] = "norm"
    groups = {}
    for name, _ in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        if _is_scale(leaf):
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


def _first_half_prefixes(model: nn.Module) -> list:
    """Module-name prefixes of the blocks that get DiffFit's scales (see the module docstring)."""
    blocks = [f"{attr}.{i}" for attr in ("transformer_blocks", "single_transformer_blocks")
              for i in range(len(getattr(model, attr, None) or ()))
              if isinstance(getattr(model, attr, None), nn.ModuleList)]
    if blocks:
        return blocks[: (len(blocks) + 1) // 2]  # DiT-XL/2: 14 of 28, as the authors' `i < 14`
    if isinstance(getattr(model, "down_blocks", None), nn.ModuleList):
        return ["down_blocks"]  # a UNet's encoder half (a ControlNet is that half and its mid block)
    return [""]


def difffit_targets(model: nn.Module) -> list:
    """``[(name, layer, scale names)]``: the layers whose output DiffFit scales, and the scale
    parameters each gets (see the module docstring): in the first half of the blocks, every
    attention's ``to_q`` / ``to_k`` / ``to_v`` (one scale) and ``to_out.0`` (two), every
    ``FeedForward``'s last ``Linear`` and every ResNet block's ``conv2`` (one). An attention without an output
    projection (FLUX.1's single-stream blocks, which have no feed-forward either) gets none: those blocks carry
    no scale (said in the README; adding them now would change the parameters a running DiffFit run resumes)."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # pragma: no cover - older diffusers
        AttentionModuleMixin = ()
    from diffusers.models.attention_processor import Attention

    attention_types = (Attention,) + ((AttentionModuleMixin,) if AttentionModuleMixin else ())
    half = _first_half_prefixes(model)
    one, two = (DIFFFIT_SCALE_NAME,), DIFFFIT_SCALE_NAMES
    targets = []
    for name, module in model.named_modules():
        if not _under(name, half) and half != [""]:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, (ResnetBlock2D, ResnetBlockCondNorm2D)):
            targets.append((prefix + "conv2", module.conv2, one))
        elif isinstance(module, attention_types) and isinstance(getattr(module, "to_out", None), nn.ModuleList):
            for projection in ("to_q", "to_k", "to_v"):
                if isinstance(getattr(module, projection, None), nn.Linear):
                    targets.append((prefix + projection, getattr(module, projection), one))
            if len(module.to_out) and isinstance(module.to_out[0], nn.Linear):
                targets.append((prefix + "to_out.0", module.to_out[0], two))
        elif isinstance(module, FeedForward):
            linear = [i for i, layer in enumerate(module.net) if isinstance(layer, nn.Linear)]
            if linear:
                targets.append((prefix + f"net.{linear[-1]}", module.net[linear[-1]], one))
    return targets


# ------------------------------------------------------------------------------ DiT's embedding copies


def _embedding_copies(model: nn.Module) -> list:
    """``[(parent, attribute, module)]`` of every per-block copy of DiT's time + label embedder
    (diffusers' ``CombinedTimestepLabelEmbeddings``), in block order; shared ones listed under each name."""
    try:
        from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings
    except ImportError:  # pragma: no cover
        return []
    copies = []
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if isinstance(child, CombinedTimestepLabelEmbeddings):
                copies.append((parent, attribute, child))
    return copies


def share_equal_embedding_copies(model: nn.Module) -> int:
    """Make equal per-block copies of DiT's time + label embedder one module again; return how many
    blocks share it (0: none shared).

    diffusers' ``DiTTransformer2DModel`` gives every block its own ``CombinedTimestepLabelEmbeddings``;
    the original DiT (and a converted checkpoint, whose copies are equal) has one, so DiffFit trains
    one label table and one set of time biases with the sum of every block's gradient. Sharing the
    module is exact for equal copies (same values, same outputs). Copies that differ are left alone.
    :func:`unshare_embedding_copies` undoes it before saving (safetensors refuses shared tensors)."""
    copies = _embedding_copies(model)
    if len(copies) < 2:
        return 0
    first = copies[0][2]
    reference = dict(first.named_parameters())
    for _, _, module in copies[1:]:
        if module is first:
            continue
        params = dict(module.named_parameters())
        if params.keys() != reference.keys() or not all(torch.equal(params[k], reference[k]) for k in params):
            return 0
    first._difffit_shared = True  # for unshare_embedding_copies; deep copies keep it
    for parent, attribute, _ in copies[1:]:
        setattr(parent, attribute, first)
    return len(copies)


def unshare_embedding_copies(model: nn.Module) -> nn.Module:
    """Give every block its own copy of an embedder :func:`share_equal_embedding_copies` shared, in place."""
    seen = set()
    for parent, attribute, module in _embedding_copies(model):
        if not getattr(module, "_difffit_shared", False):
            continue
        if id(module) in seen:
            setattr(parent, attribute, copy.deepcopy(module))
        seen.add(id(module))
    for _, _, module in _embedding_copies(model):
        module.__dict__.pop("_difffit_shared", None)
    return model


def shared_embedding_blocks(model: nn.Module) -> int:
    """How many blocks share one embedder through DiffFit (0 when none do)."""
    copies = [m for _, _, m in _embedding_copies(model) if getattr(m, "_difffit_shared", False)]
    return len(copies) if copies else 0


# ------------------------------------------------------------------------------ DiffFit scales


def _scales(layer: nn.Module) -> list:
    return [layer._parameters[n] for n in DIFFFIT_SCALE_NAMES if layer._parameters.get(n) is not None]


def _scale_branch_output(layer, args, output):
    """Forward hook: the layer's output times its scales, channel-wise (dim 1 of a conv's output, the
    last dim of a Linear's); two scales (an attention output) multiply one after the other."""
    for gamma in _scales(layer):
        gamma = gamma.to(output.dtype)
        if isinstance(layer, nn.Conv2d):
            gamma = gamma.view(1, -1, *([1] * (output.ndim - 2)))
        output = output * gamma
    return output


def _hook_keys(layer: nn.Module) -> list:
    # found by identity rather than kept as handles: a deep copy (EMA, merged copies) copies the hook
    # dict, and a copied handle would point at the original module's hooks
    return [key for key, hook in layer._forward_hooks.items() if hook is _scale_branch_output]


def add_difffit_scales(model: nn.Module) -> list:
    """Insert trainable gammas = 1 on the layers :func:`difffit_targets` names; return their names.

    gamma = 1 leaves the output unchanged (multiplication by 1 is exact). Layers that already have
    their scales are left as they are, so calling this twice adds nothing.
    """
    names = []
    for name, layer, scale_names in difffit_targets(model):
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        if not _scales(layer):
            weight = layer.weight
            for scale_name in scale_names:
                layer.register_parameter(scale_name, nn.Parameter(torch.ones(weight.shape[0], dtype=weight.dtype,
                                                                             device=weight.device)))
            layer.register_forward_hook(_scale_branch_output)
        names += [f"{name}.{scale_name}" for scale_name in DIFFFIT_SCALE_NAMES if scale_name in layer._parameters]
    return names


def has_difffit_scales(model: nn.Module) -> bool:
    """Whether ``model`` carries what DiffFit added and a save must fold: scales, or shared embedder copies."""
    return any(_scales(m) for m in model.modules()) or shared_embedding_blocks(model) > 0


@torch.no_grad()
def merge_difffit_scales(model: nn.Module) -> nn.Module:
    """Fold every gamma into its layer (W <- diag(gamma) W, b <- gamma b) and remove it, and give every
    block its own embedder copy again (:func:`unshare_embedding_copies`), in place.

    The result has exactly the parameters of the model before :func:`apply_finetune_mode` (plain
    diffusers loads it) and the same outputs up to float rounding. The products are taken in float32.
    Returns ``model``.
    """
    unshare_embedding_copies(model)
    for layer in model.modules():
        scales = _scales(layer)
        if not scales:
            continue
        g = torch.ones_like(scales[0], dtype=torch.float32)
        for gamma in scales:
            g = g * gamma.detach().float()
        weight = layer.weight
        weight.copy_((weight.float() * g.view(-1, *([1] * (weight.ndim - 1)))).to(weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_((layer.bias.float() * g).to(layer.bias.dtype))
        for scale_name in DIFFFIT_SCALE_NAMES:
            layer._parameters.pop(scale_name, None)
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
    ``num_scales`` is the number of DiffFit gamma vectors; ``shared_embedding_blocks`` how many
    blocks share one time + label embedder (:func:`share_equal_embedding_copies`; 0: none). Shared
    parameters count once, in ``total_parameters`` too (the original DiT's count).
    """

    mode: str
    trainable_parameters: int
    total_parameters: int
    groups: dict = field(default_factory=dict)
    num_scales: int = 0
    shared_embedding_blocks: int = 0

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
                part += f" ({self.num_scales} vectors)"
            if group == "class_embedding" and self.shared_embedding_blocks:
                part += f" (one table, shared by {self.shared_embedding_blocks} blocks)"
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
    scales = sum(len(_scales(m)) for m in model.modules())
    return FinetuneSummary(mode, trainable, total, counts, scales, shared_embedding_blocks(model))


def apply_finetune_mode(model: nn.Module, mode: str) -> FinetuneSummary:
    """Set which parameters of ``model`` train for ``--finetune mode``, in place; return the summary.

    ``full``: everything trains. ``bitfit``: bias terms (plus a ControlNet's zero convolutions).
    ``difffit``: shares equal per-block embedder copies (:func:`share_equal_embedding_copies`),
    inserts the gamma scales (:func:`add_difffit_scales`), then trains gamma, biases, normalisation
    layers and label tables (plus a ControlNet's zero convolutions); embedding MLP weights stay
    frozen (see the module docstring for the authors' selection this follows).
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
        share_equal_embedding_copies(model)
        add_difffit_scales(model)
    groups = parameter_groups(model)
    for name, param in model.named_parameters():
        param.requires_grad_(_trained_by(mode, name, groups[name]))
    summary = summarize_finetune(model, mode)
    if summary.trainable_parameters == 0:
        raise ValueError(f"--finetune {mode} found nothing to train in {type(model).__name__}: use --finetune full or lora")
    return summary


__all__ = [
    "DIFFFIT_RESIDUAL_SCALE_NAME",
    "DIFFFIT_SCALE_NAME",
    "DIFFFIT_SCALE_NAMES",
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
    "share_equal_embedding_copies",
    "shared_embedding_blocks",
    "summarize_finetune",
    "unshare_embedding_copies",
    "validate_finetune_mode",
]
