"""DeMe's channel-wise projection: a learnable C x C channel mixing after each block, initialised to the identity.

DeMe (Decouple-Then-Merge, PAPERS.md section 2, item 4) inserts a bias-free 1x1 convolution after
every down, mid and up block of the UNet of each per-interval fine-tune: the activations of
different timestep intervals differ mostly along the channels, and a C x C mixing lets a fine-tune
re-weight its channels for its interval at about 1% more parameters. The projections stay in the
merged model (they cannot be folded exactly through the following GroupNorm).

    from diffusers_ant.deme import add_channel_projection, save_pipeline
    projections = add_channel_projection(unet)        # identity: the output is unchanged
    ... train (the projections are trainable full matrices, also beside LoRA) ...
    save_pipeline(pipeline, "out")                     # diffusers' files + channel_projection.{json,safetensors}
    pipeline = diffusers_ant.models.load_pipeline("out")   # re-attaches them

Where the projections go, per denoiser class:

- ``UNet2DModel`` and ``UNet2DConditionModel``: after every entry of ``down_blocks``, after ``mid_block``
  and after every entry of ``up_blocks``; C is the block's output channels. On the main path only:
  a down block returns its output feature map twice, as the input of the next block and as the
  last of its skip connections (``res_samples[-1] is hidden_states``); only the next block gets the
  projected map, the skip connections stay unprojected, as in the authors' UNet (MqLeet/DeMe,
  ``diffusers/models/unet_2d.py``: ``sample = self.adapter_list[i](sample)`` after
  ``down_block_res_samples += res_samples`` has taken the block's outputs). Folders saved before
  this (``channel_projection.json`` version 1) projected that skip connection too; they are loaded
  as they were trained (``ChannelProjection.projects_skip``), and the merge refuses to mix the two.
- ``ControlNetModel``: after every down block only. It has no up blocks, and its mid block's output
  goes straight into the trainable 1x1 zero convolution ``controlnet_mid_block``, itself a channel
  mixing, which a projection would only re-parametrise. The down blocks' projections do act: they
  shape what the next block sees, besides feeding the zero convolutions.
- ``DiTTransformer2DModel``: after every transformer block, a D x D linear mixing of the tokens'
  hidden states (D = heads x head dim), the transformer counterpart of the 1x1 convolution.
- The two-stream transformers of issue 16, ``SD3Transformer2DModel`` (``transformer_blocks``),
  ``FluxTransformer2DModel`` (``transformer_blocks`` and ``single_transformer_blocks``) and
  ``QwenImageTransformer2DModel`` (``transformer_blocks``): after every block, the same D x D mixing
  of the *image* tokens only. Their blocks return ``(encoder_hidden_states, hidden_states)``; the image
  stream (the second element) is the main path, which the next block and finally ``proj_out`` read and
  whose per-channel statistics differ between timestep intervals; the text stream is the conditioning
  (the same for every timestep; ``None`` after SD3's last, context-pre-only block) and stays as the
  block made it, as the UNet's skip connections do (``ChannelProjection.output_index``).

How: each projection is a submodule ``<block>.channel_projection`` (so it is in ``parameters()``, the
state dict, Accelerate checkpoints, EMA and ``deepcopy``), applied by a forward hook on its block
that looks the projection up on the block it is called for (a deep copy therefore uses its own
projection). The weight is the full matrix P, and the forward computes ``x + (P - I) x``: at the
identity ``P - I`` is exactly zero, so the output equals the unprojected model's bitwise whatever
the arithmetic. A direct ``P x`` is exact at the identity only where the product is computed at the
activations' own precision (true on the CPU, in fp32 and under bf16 autocast); on a GPU, cuDNN's and
cuBLAS's TF32 modes (cuDNN's is on by default) round fp32 activations to 10 mantissa bits inside the
product. Gradients and trained values are those of ``P x``.

On disk, diffusers' own files never hold the projections: ``save_pipeline`` (or
``save_adapter_output`` for a training run) writes the pipeline without them, then
``channel_projection.safetensors`` (the projection weights under their state-dict names) and
``channel_projection.json`` (which component, which blocks, how many channels) at the top of the
folder. Plain ``DiffusionPipeline.from_pretrained`` therefore loads the folder as the model without
projections, and ``diffusers_ant.models.load_pipeline`` re-attaches them.

LoRA: the projections are full, trainable matrices, not LoRA. Add them *after* ``add_lora`` (which
freezes every non-LoRA parameter); ``add_channel_projection`` makes them trainable. Their weights
are saved beside the LoRA weights (``channel_projection.*`` next to ``ant_lora.json``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "PROJECTION_CONFIG_NAME",
    "PROJECTION_WEIGHTS_NAME",
    "ChannelProjection",
    "add_channel_projection",
    "attach_saved_channel_projection",
    "channel_projection_detached",
    "channel_projections",
    "denoiser_component",
    "has_channel_projection",
    "load_channel_projection",
    "save_adapter_output",
    "save_channel_projection",
    "save_pipeline",
    "set_skip_mode",
    "skip_mode",
]

PROJECTION_WEIGHTS_NAME = "channel_projection.safetensors"
PROJECTION_CONFIG_NAME = "channel_projection.json"
ATTRIBUTE = "channel_projection"  # the submodule name on each projected block
_FORMAT = "diffusers_ant.channel_projection"


class ChannelProjection(nn.Module):
    """P, a bias-free C x C channel mixing initialised to the identity (DeMe's channel-wise projection).

    ``channel_dim=1``: feature maps (B, C, H, W), P applied as a 1x1 convolution;
    ``channel_dim=-1``: tokens (B, N, C), P applied as a linear layer. ``weight`` is the (C, C)
    matrix; the forward computes ``x + (P - I) x`` so that the identity is exact (module docstring).
    """

    def __init__(self, channels: int, channel_dim: int = 1, device=None, dtype=None):
        super().__init__()
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (feature maps) or -1 (tokens), got {channel_dim}")
        self.channels = int(channels)
        self.channel_dim = channel_dim
        self.weight = nn.Parameter(torch.eye(self.channels, device=device, dtype=dtype))
        # not persistent: never saved, rebuilt with the module (and moved / cast with it)
        self.register_buffer("identity", torch.eye(self.channels, device=device, dtype=dtype), persistent=False)
        # Legacy (channel_projection.json version 1): the projected map also replaced the down block's
        # last skip connection. False for everything made now: the authors' main-path-only projection.
        self.projects_skip = False
        # Which element of a tuple output is the main path: 0 (UNet blocks: (hidden_states, res_samples)),
        # 1 (two-stream transformer blocks: (encoder_hidden_states, hidden_states)); set by
        # add_channel_projection from the block's class, never saved (it follows from the model).
        self.output_index = 0

    def extra_repr(self) -> str:
        return f"channels={self.channels}, channel_dim={self.channel_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.weight - self.identity).to(x.dtype)
        if self.channel_dim == 1:
            return x + nn.functional.conv2d(x, delta[:, :, None, None])
        return x + nn.functional.linear(x, delta)


# ------------------------------------------------------------------------------------ attaching


def _project_block_output(block, args, output):
    """Forward hook: the block's output through ``block.channel_projection``, on the main path only.

    Tensor outputs (mid / up blocks, transformer blocks) are projected. Tuple outputs (down blocks:
    ``(hidden_states, res_samples[, skip_sample])``; skip up blocks: ``(hidden_states, skip_sample)``)
    get their first element projected; the skip connections (``res_samples``) are returned as the
    block made them, as in the authors' UNet (module docstring). Only a legacy projection
    (``projects_skip``) also replaces the skip connection that *is* the block's output.
    """
    projection = block._modules.get(ATTRIBUTE)
    if projection is None:  # detached (see channel_projection_detached)
        return output
    if isinstance(output, torch.Tensor):
        return projection(output)
    index = getattr(projection, "output_index", 0)
    if index:  # a two-stream transformer block: project its image tokens, keep its text tokens
        items = list(output)
        items[index] = projection(items[index])
        return type(output)(items)
    hidden = output[0]
    projected = projection(hidden)
    rest = list(output[1:])
    if projection.projects_skip and rest and isinstance(rest[0], tuple) and rest[0] and rest[0][-1] is hidden:
        rest[0] = rest[0][:-1] + (projected,)
    return type(output)([projected, *rest])


# The two-stream transformers (module docstring): their block lists, in forward order; each block returns
# (encoder_hidden_states, hidden_states), the image tokens at index 1.
TWO_STREAM_BLOCKS = {
    "SD3Transformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
}
TWO_STREAM_OUTPUT_INDEX = 1


def module_class_name(model) -> str:
    """The class name of ``model``, seen through FSDP2: ``fully_shard`` swaps the module's class for a
    subclass ``FSDP<name>`` of (FSDPModule, <name>) while the trainer runs the sharded module."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return cls.__name__
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls.__name__


def _main_path_index(model) -> int:
    """The element of a tuple block output that :func:`_project_block_output` projects (see ``output_index``)."""
    return TWO_STREAM_OUTPUT_INDEX if module_class_name(model) in TWO_STREAM_BLOCKS else 0


def _blocks(model) -> list:
    """``[(qualified name, block, channels, channel_dim)]`` where ``model`` gets projections."""
    name = module_class_name(model)  # a sharded model's own class (FSDP2 renames it FSDP<name>)
    found = []
    if hasattr(model, "transformer_blocks") and name == "DiTTransformer2DModel":
        inner = model.config.num_attention_heads * model.config.attention_head_dim
        for i, block in enumerate(model.transformer_blocks):
            found.append((f"transformer_blocks.{i}", block, inner, -1))
        return found
    if name in TWO_STREAM_BLOCKS:
        inner = model.config.num_attention_heads * model.config.attention_head_dim  # the image tokens' width
        for attribute in TWO_STREAM_BLOCKS[name]:
            for i, block in enumerate(getattr(model, attribute)):
                found.append((f"{attribute}.{i}", block, inner, -1))
        return found
    if not hasattr(model, "down_blocks") or name not in ("UNet2DModel", "UNet2DConditionModel", "ControlNetModel"):
        raise ValueError(
            f"channel projection supports UNet2DModel, UNet2DConditionModel, ControlNetModel, DiTTransformer2DModel, "
            f"{', '.join(TWO_STREAM_BLOCKS)}, not {name}: train with --no_channel_projection"
        )

    def channels(block, where):
        resnets = getattr(block, "resnets", None)
        if not resnets or not hasattr(resnets[-1], "out_channels"):
            raise ValueError(f"cannot tell the output channels of {where} ({type(block).__name__}) for its channel projection")
        return int(resnets[-1].out_channels)

    for i, block in enumerate(model.down_blocks):
        found.append((f"down_blocks.{i}", block, channels(block, f"down_blocks.{i}"), 1))
    if name == "ControlNetModel":
        return found  # the mid block feeds a 1x1 zero convolution directly (module docstring)
    if getattr(model, "mid_block", None) is not None:
        found.append(("mid_block", model.mid_block, channels(model.mid_block, "mid_block"), 1))
    for i, block in enumerate(model.up_blocks):
        found.append((f"up_blocks.{i}", block, channels(block, f"up_blocks.{i}"), 1))
    return found


def _hook_registered(block) -> bool:
    return any(fn is _project_block_output for fn in block._forward_hooks.values())


def channel_projections(model) -> dict:
    """``{block name: ChannelProjection}`` of the projections ``model`` carries (empty if none), in
    the order of the forward pass (down, mid, up blocks; transformer blocks)."""
    found = {}
    for name, module in model.named_modules():
        projection = module._modules.get(ATTRIBUTE)
        if isinstance(projection, ChannelProjection):
            found[name] = projection
    if found:
        order = {name: i for i, (name, *_) in enumerate(_blocks(model))}
        found = dict(sorted(found.items(), key=lambda item: order.get(item[0], len(order))))
    return found


def has_channel_projection(model) -> bool:
    """Whether ``model`` carries DeMe channel projections."""
    return bool(channel_projections(model))


def add_channel_projection(model) -> list:
    """Insert an identity channel projection after each block of ``model`` (module docstring); return them.

    The projections are trainable (``requires_grad=True``) and take the device and dtype of the
    model's first floating-point parameter. Idempotent: a model that already has them gets none added, and the
    existing ones are returned. Under LoRA call it after ``add_lora``.
    """
    existing = channel_projections(model)
    if existing:
        for name, block, _, _ in _blocks(model):
            if not _hook_registered(block):  # e.g. re-attached after channel_projection_detached
                block.register_forward_hook(_project_block_output)
        return list(existing.values())
    # the first floating-point parameter (a quantized base's first weights are packed uint8 / int8, which cannot
    # take a gradient; float32 where none is floating point)
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = reference.device if reference is not None else next(model.parameters()).device
    dtype = reference.dtype if reference is not None else torch.float32
    index = _main_path_index(model)
    added = []
    for _, block, channels, channel_dim in _blocks(model):
        projection = ChannelProjection(channels, channel_dim, device=device, dtype=dtype)
        projection.output_index = index
        block.add_module(ATTRIBUTE, projection)
        if not _hook_registered(block):
            block.register_forward_hook(_project_block_output)
        added.append(projection)
    return added


@contextmanager
def channel_projection_detached(model):
    """Temporarily take the projections off ``model`` (modules and their effect), e.g. around
    diffusers' ``save_pretrained`` or anything that rebuilds the model from its config; they are put
    back, the same objects, afterwards. Yields ``{block name: ChannelProjection}``."""
    projections = channel_projections(model)
    modules = dict(model.named_modules())
    for name in projections:
        del modules[name]._modules[ATTRIBUTE]
    try:
        yield projections
    finally:
        for name, projection in projections.items():
            modules[name].add_module(ATTRIBUTE, projection)


# ------------------------------------------------------------------------------------ saving


def denoiser_component(pipeline) -> str:
    """The pipeline attribute of the trained denoiser: ``controlnet`` (the ControlNet is what a
    ControlNet run trains), else ``transformer``, else ``unet``."""
    for name in ("controlnet", "transformer", "unet"):
        if getattr(pipeline, name, None) is not None:
            return name
    raise ValueError(f"{type(pipeline).__name__} has no controlnet, transformer or unet")


def save_channel_projection(model, folder: str, component: str | None = None) -> str | None:
    """Write ``model``'s projections to ``folder/channel_projection.{safetensors,json}``.

    ``component`` names the pipeline attribute the projections belong to (``unet``, ``transformer``,
    ``controlnet``; None for a bare model folder). Returns the weights path, or None (and writes
    nothing) when ``model`` has no projections.
    """
    from safetensors.torch import save_file

    projections = channel_projections(model)
    if not projections:
        return None
    os.makedirs(folder, exist_ok=True)
    state = {f"{name}.{ATTRIBUTE}.weight": p.weight.detach().to("cpu").contiguous() for name, p in projections.items()}
    weights = os.path.join(folder, PROJECTION_WEIGHTS_NAME)
    save_file(state, weights, metadata={"format": "pt"})
    info = {
        "format": _FORMAT,
        # version 2: the skip connections are not projected; version 1 (legacy) projected the down
        # blocks' last skip connection too (see ChannelProjection.projects_skip)
        "version": 1 if skip_mode(projections.values()) else 2,
        "component": component,
        "model_class": type(model).__name__,
        "weights": PROJECTION_WEIGHTS_NAME,
        "blocks": {name: p.channels for name, p in projections.items()},
    }
    with open(os.path.join(folder, PROJECTION_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return weights


def skip_mode(projections) -> bool:
    """Whether ``projections`` (``ChannelProjection``s) are legacy ones that also project the skip
    connection (True) or the authors' main-path ones (False); a ValueError when they disagree."""
    modes = {bool(p.projects_skip) for p in projections}
    if len(modes) > 1:
        raise ValueError("these channel projections mix the legacy skip-projecting kind (channel_projection.json "
                         "version 1) with main-path ones: retrain the old fine-tunes")
    return modes.pop() if modes else False


def set_skip_mode(model, projects_skip: bool) -> None:
    """Make every projection of ``model`` legacy (``projects_skip=True``) or main-path (False)."""
    for projection in channel_projections(model).values():
        projection.projects_skip = bool(projects_skip)


def read_format_json(path: str, expected_format: str, what: str) -> dict | None:
    """The JSON record at ``path`` (None when there is none), refused in one line unless its
    ``format`` field is ``expected_format`` (a file of another kind under the same name)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("format") != expected_format:
        raise ValueError(f"{path} is not a diffusers_ant {what} file")
    return info


def read_projection_config(folder: str) -> dict | None:
    """``folder/channel_projection.json`` as a dict, or None when the folder has none."""
    return read_format_json(os.path.join(folder, PROJECTION_CONFIG_NAME), _FORMAT, "channel-projection")


def load_channel_projection(model, folder: str):
    """Attach the projections saved in ``folder`` to ``model`` (in place) and return ``model``.

    Refuses (ValueError) projections saved for another model class or other blocks, and
    weights that are missing or of the wrong shape.
    """
    from safetensors.torch import load_file

    info = read_projection_config(folder)
    if info is None:
        raise ValueError(f"{folder!r} holds no {PROJECTION_CONFIG_NAME}")
    if info["model_class"] != type(model).__name__:
        raise ValueError(f"the channel projections in {folder!r} belong to a {info['model_class']}, not a {type(model).__name__}")
    if int(info.get("version", 1)) not in (1, 2):
        raise ValueError(f"{PROJECTION_CONFIG_NAME} in {folder!r} has version {info.get('version')}: update diffusers_ant")
    add_channel_projection(model)
    # version 1 folders were trained with the skip connection projected too: load them as trained
    set_skip_mode(model, int(info.get("version", 1)) == 1)
    projections = channel_projections(model)
    if {k: int(v) for k, v in info["blocks"].items()} != {k: p.channels for k, p in projections.items()}:
        raise ValueError(f"the channel projections in {folder!r} were saved for other blocks than this model's")
    state = load_file(os.path.join(folder, info.get("weights", PROJECTION_WEIGHTS_NAME)))
    expected = {f"{name}.{ATTRIBUTE}.weight": p for name, p in projections.items()}
    if set(state) != set(expected):
        raise ValueError(f"{PROJECTION_WEIGHTS_NAME} in {folder!r} does not match {PROJECTION_CONFIG_NAME}")
    with torch.no_grad():
        for key, projection in expected.items():
            if state[key].shape != projection.weight.shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} in {folder!r}, {tuple(projection.weight.shape)} expected")
            projection.weight.copy_(state[key])
    return model


def attach_saved_channel_projection(pipeline, folder: str):
    """If ``folder`` holds saved projections, attach them to the pipeline component they belong to.

    Called by ``diffusers_ant.models.load_pipeline`` on every folder it loads; returns ``pipeline``.
    """
    info = read_projection_config(folder)
    if info is None:
        return pipeline
    component = info.get("component") or denoiser_component(pipeline)
    model = getattr(pipeline, component, None)
    if model is None:
        raise ValueError(f"{folder!r} has channel projections for {component!r}, which {type(pipeline).__name__} lacks")
    load_channel_projection(model, folder)
    return pipeline


def save_pipeline(pipeline, folder: str, component: str | None = None, base: str | None = None,
                  revision: str | None = None) -> None:
    """``pipeline.save_pretrained(folder)`` (safetensors) with the denoiser's projections written
    beside diffusers' files instead of inside them (module docstring).

    A ControlNet with its ``base`` (the pretrained folder the fine-tunes started from: a ControlNet
    output, or a pipeline folder) is written as this project's ControlNet outputs are, the ControlNet
    at the root of the folder naming its Stable Diffusion base (``models.controlnet``)."""
    component = component or denoiser_component(pipeline)
    model = getattr(pipeline, component)
    with channel_projection_detached(model):
        if component == "controlnet" and base is not None:
            from ..models.controlnet import controlnet_output_base, recorded_revision, save_controlnet_output

            sd_base = controlnet_output_base(base) or base
            # the Hub revision of the SD base (the ControlNet output's record, else the fine-tunes')
            revision = (recorded_revision(base) if os.path.isdir(base) else None) or revision
            save_controlnet_output(model, folder, os.path.abspath(sd_base) if os.path.isdir(sd_base) else sd_base,
                                   revision=revision)
        else:
            pipeline.save_pretrained(folder, safe_serialization=True)
    save_channel_projection(model, folder, component)


def save_adapter_output(adapter, output_dir: str, model=None, lora: bool = False) -> None:
    """``adapter.save(output_dir, model, lora)`` for a model that may carry channel projections.

    The projections are taken off around ``ModelAdapter.save`` (whose LoRA paths rebuild the model
    from its config, and whose full save would otherwise write them into diffusers' weights), then
    written beside its output; ``load_pipeline(output_dir)`` re-attaches them. Without projections
    this is exactly ``adapter.save``.
    """
    model = model if model is not None else adapter.model
    with channel_projection_detached(model) as projections:
        adapter.save(output_dir, model, lora=lora)
    if projections:
        save_channel_projection(model, output_dir, denoiser_component(adapter.make_pipeline(model)))
