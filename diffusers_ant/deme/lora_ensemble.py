"""DeMe's ensemble of LoRA fine-tunes without N model copies: one base denoiser carrying every interval's
LoRA as a named peft adapter, the active one switched by timestep at each denoiser call (issue 16).

The ensemble of full fine-tunes (``ensemble.py``) holds N denoisers behind a ``TimestepRouter``; for
LoRA fine-tunes of a large base (Flux, Qwen-Image) N copies do not fit, and they are not needed: the
fine-tunes differ from the base only in their adapters. Here the base denoiser gets each fine-tune's
LoRA under the adapter name ``interval-<i>`` (diffusers' ``load_lora_weights(adapter_name=...)`` for
diffusers-format LoRAs, peft's ``inject_adapter_in_model`` / ``add_adapter`` for peft's format), and a
forward pre-hook on the denoiser, called at every sampling step before the denoiser runs, makes the
adapter of that step's interval the active one (peft's ``set_adapter`` on every LoRA layer, what
diffusers' ``pipeline.set_adapters`` does) or disables every adapter for intervals no fine-tune
covers (the base). A forward pre-hook rather than ``callback_on_step_end``: it acts before the
step's own call (the callback runs after it) and works with pipelines that have no callbacks
(``DDPMPipeline``, ``DiTPipeline``). DeMe's channel projections of the fine-tunes (C x C matrices)
are switched the same way: the denoiser carries one set, into which the step's member's weights are
copied (identity for members without projections and for the base).

The folder ``write_lora_ensemble`` makes is the ensemble folder of ``ensemble.py`` (the base
pipeline and ``deme_ensemble.json``, ``"kind": "lora"``) whose ``members/interval-<i>/`` are the
fine-tunes' LoRA files (and projections), not denoisers; ``load_pipeline`` re-attaches them through
``attach_lora_ensemble``. Memory at sampling: one base and N LoRAs.

A text-encoder LoRA cannot be switched per step (the prompt is encoded once, before the loop): such
fine-tunes are refused in one line (merge them instead).
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch

from ..models.base import LORA_INFO_NAME
from ..models.lora import LORA_WEIGHTS_NAME
from .projection import PROJECTION_CONFIG_NAME, PROJECTION_WEIGHTS_NAME

__all__ = ["LoraTimestepSwitch", "attach_lora_ensemble", "member_adapter_name", "write_lora_members"]

PEFT_CONFIG_NAME = "adapter_config.json"
_MEMBER_FILES = (LORA_WEIGHTS_NAME, PEFT_CONFIG_NAME, LORA_INFO_NAME, PROJECTION_WEIGHTS_NAME, PROJECTION_CONFIG_NAME)


def member_adapter_name(index: int) -> str:
    return f"interval-{index}"


def write_lora_members(finetunes, output_dir: str, members_dir: str) -> list:
    """Copy each LoRA fine-tune's files into ``output_dir/<members_dir>/interval-<i>/``; return the
    member names (relative folders). Refuses text-encoder LoRAs (module docstring)."""
    from .lora_merge import read_lora_file

    names = []
    for index, finetune in enumerate(finetunes):
        lora = read_lora_file(finetune.path)
        component_prefixes = {stem.partition(".")[0] for stem in lora.modules} if lora.format == "diffusers" else set()
        text = sorted(p for p in component_prefixes if p.startswith("text_encoder"))
        if text:
            raise ValueError(f"fine-tune {finetune.path!r} has a {text[0]} LoRA, which a per-step ensemble cannot switch "
                             "(the prompt is encoded once): merge these fine-tunes instead")
        name = f"{members_dir}/{member_adapter_name(index)}"
        folder = os.path.join(output_dir, *name.split("/"))
        os.makedirs(folder, exist_ok=True)
        for file_name in _MEMBER_FILES:
            if os.path.isfile(os.path.join(finetune.path, file_name)):
                shutil.copyfile(os.path.join(finetune.path, file_name), os.path.join(folder, file_name))
        names.append(name)
    return names


class LoraTimestepSwitch:
    """The forward pre-hook that activates, for each denoiser call, the adapter of its timestep's interval.

    Args:
        model: the base denoiser carrying the members' adapters.
        intervals: ``TimestepIntervals`` covering 0 .. T-1.
        adapters: per interval, the adapter name, or None for the base (every adapter disabled).
        projections: per interval, ``{state key: weight}`` of its channel projections, or None (identity);
            empty when no member has projections.
        timestep_map: None (round and clamp: DDPM-family pipelines pass training indices), a diffusers
            training scheduler (flow-matching pipelines pass ``sigma * 1000``), as ``TimestepRouter``, or a
            callable ``Tensor -> LongTensor`` (``routing.denoiser_timestep_map``: Flux and Qwen-Image take the sigma).
    """

    def __init__(self, model, intervals, adapters, projections=None, timestep_map=None):
        from peft.tuners.tuners_utils import BaseTunerLayer

        from ..routing import _scheduler_timestep_map

        self.model = model
        self.intervals = intervals
        self.adapters = list(adapters)
        self.projections = projections or []
        self.num_timesteps = int(intervals.num_timesteps)
        if timestep_map is not None and not callable(timestep_map):  # a scheduler: its model timesteps
            timestep_map = _scheduler_timestep_map(timestep_map, self.num_timesteps)
        self.timestep_map = timestep_map
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.active = object()  # nothing chosen yet
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def interval_of(self, timestep) -> int:
        """The interval of a call's timestep(s); one interval per call (pipelines pass one timestep)."""
        t = timestep if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep)
        if self.timestep_map is not None:
            indices = self.timestep_map(t.flatten())
        else:
            indices = t.flatten().round().long().clamp(0, self.num_timesteps - 1)
        clusters = torch.as_tensor(self.intervals.assign(indices.cpu())).long().unique()
        if clusters.numel() != 1:
            raise ValueError("a LoRA ensemble switches its adapter per denoiser call: give the samples of one call "
                             "timesteps of one interval (as sampling pipelines do)")
        return int(clusters[0])

    @torch.no_grad()
    def activate(self, interval: int) -> None:
        """Make interval ``interval``'s member the model: its adapter on (or all off) and its projections."""
        if interval == self.active:
            return
        name = self.adapters[interval]
        for layer in self.layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name)
            for param in layer.parameters():
                param.requires_grad_(False)  # peft's set_adapter marks the active adapter trainable
        if self.projections:
            from .projection import channel_projections

            current = {f"{block}.channel_projection.weight": p.weight
                       for block, p in channel_projections(self.model).items()}
            for key, param in current.items():
                state = self.projections[interval]
                param.copy_(state[key].to(param.device, param.dtype) if state is not None
                            else torch.eye(param.shape[0], device=param.device, dtype=param.dtype))
        self.active = interval

    def __call__(self, module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is None:
            raise ValueError("the LoRA ensemble's denoiser was called without a timestep")
        self.activate(self.interval_of(timestep))
        return None


def attach_lora_ensemble(pipeline, folder: str, info: dict):
    """Load the members' LoRAs of the ensemble ``folder`` (``deme_ensemble.json`` read as ``info``) onto
    ``pipeline``'s denoiser as named adapters and install the ``LoraTimestepSwitch``; returns ``pipeline``
    (its denoiser keeps its class: no router, no copy). ``pipeline.lora_ensemble`` is the switch."""
    from safetensors.torch import load_file

    from ..clustering import TimestepIntervals
    from ..models.lora import load_peft_lora
    from .projection import add_channel_projection, read_projection_config, set_skip_mode

    component = info["component"]
    model = getattr(pipeline, component)
    adapters, projection_states, any_projection, versions = [], [], False, set()
    for index, name in enumerate(info["members"]):
        if name == "base":
            adapters.append(None)
            projection_states.append(None)
            continue
        member = os.path.join(folder, *name.split("/"))
        adapter = os.path.basename(name)
        with warnings.catch_warnings():  # several adapters on one model is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if os.path.isfile(os.path.join(member, PEFT_CONFIG_NAME)):
                load_peft_lora(model, member, adapter_name=adapter)
            else:
                pipeline.load_lora_weights(member, adapter_name=adapter)  # diffusers' format
        adapters.append(adapter)
        config = read_projection_config(member)
        if config is not None:
            any_projection = True
            versions.add(int(config.get("version", 1)))
            projection_states.append(load_file(os.path.join(member, config.get("weights", PROJECTION_WEIGHTS_NAME))))
        else:
            projection_states.append(None)
    if len(versions) > 1:
        raise ValueError(f"the members of the ensemble {folder!r} mix legacy skip-projecting channel projections "
                         "(channel_projection.json version 1) with main-path ones: retrain the old fine-tunes")
    if any_projection:
        add_channel_projection(model)  # identity; the switch copies each member's weights in
        # version 1 members were trained with the skip connections projected too: run them as trained
        set_skip_mode(model, versions == {1})
    model.requires_grad_(False)
    intervals = TimestepIntervals(info["intervals"]["bounds"], info["intervals"]["num_timesteps"])
    from ..routing import denoiser_timestep_map

    # flow-matching pipelines pass sigma * 1000 (Flux, Qwen-Image: sigma): map by what this denoiser receives
    from .ensemble import routing_scheduler

    timestep_map = denoiser_timestep_map(pipeline.scheduler, intervals.num_timesteps, model,
                                         training_scheduler=routing_scheduler(pipeline, info))
    pipeline.lora_ensemble = LoraTimestepSwitch(model, intervals, adapters, projection_states if any_projection else None,
                                                timestep_map=timestep_map)
    return pipeline
