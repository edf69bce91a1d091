"""DeMe's ensemble before merging: one pipeline whose denoiser routes each sampling step to the
fine-tune of its timestep interval (PAPERS.md section 2, item 5), through ``TimestepRouter``.

The folder ``write_ensemble`` makes is the base pipeline (diffusers layout, so plain diffusers loads
it, as the base model) plus:

    deme_ensemble.json            the intervals (covering 0 .. T-1) and, per interval, its member
    members/interval-<i>/         one denoiser folder per fine-tune (config.json + safetensors,
                                  and its channel projections if it has any)

Intervals no fine-tune covers are routed to the base denoiser (``"base"`` in the JSON), so a
partial set of fine-tunes gives ANT's negative-transfer-gap configuration. ``load_pipeline`` of the
folder (``diffusers_ant.models.load_pipeline``) returns the base pipeline with its denoiser replaced
by the router; ``train_scripts/evaluate_model.py`` scores it like any pipeline.

ControlNet is refused: diffusers' ControlNet pipeline type-checks its ``controlnet`` as a
``ControlNetModel``, which a router is not.

LoRA fine-tunes make another kind of ensemble folder (``write_lora_ensemble``, ``"kind": "lora"``):
the members are their LoRA files, loaded as named adapters on the one base denoiser and switched by
timestep (``lora_ensemble.py``), with no denoiser copy.
"""

from __future__ import annotations

import json
import os

from .projection import (
    channel_projection_detached,
    denoiser_component,
    load_channel_projection,
    read_format_json,
    read_projection_config,
    save_channel_projection,
    save_pipeline,
)

__all__ = ["ENSEMBLE_CONFIG_NAME", "attach_saved_ensemble", "ensemble_intervals", "write_ensemble", "write_lora_ensemble"]

ENSEMBLE_CONFIG_NAME = "deme_ensemble.json"
MEMBERS_DIR = "members"
BASE_MEMBER = "base"
_FORMAT = "diffusers_ant.deme_ensemble"


def ensemble_intervals(finetunes, num_timesteps: int):
    """``(TimestepIntervals covering 0 .. T-1, members)``: each fine-tune's interval, the gaps between
    them as intervals of the base (member None)."""
    from ..clustering import TimestepIntervals

    bounds, members, next_start = [], [], 0
    for index, finetune in enumerate(finetunes):  # sorted, non-overlapping (read_finetunes)
        start, end = finetune.bounds
        if end >= num_timesteps:
            raise ValueError(f"fine-tune {finetune.path!r} ends at timestep {end}, beyond the scheduler's {num_timesteps}")
        if start > next_start:
            bounds.append((next_start, start - 1))
            members.append(None)
        bounds.append((start, end))
        members.append(index)
        next_start = end + 1
    if next_start < num_timesteps:
        bounds.append((next_start, num_timesteps - 1))
        members.append(None)
    return TimestepIntervals(bounds, num_timesteps, metadata={"deme": "ensemble"}), members


def _training_routing(finetunes, pipeline=None) -> dict:
    """``{"training_routing": {...}}`` of the fine-tunes' training configs (`training_routing_settings`), {}
    where they record nothing that routing needs."""
    from .finetunes import training_configs

    settings = training_routing_settings(training_configs(finetunes), [finetune.path for finetune in finetunes],
                                         pipeline)
    return {"training_routing": settings} if settings else {}


def _table_settings(settings: dict, pipeline) -> dict:
    """The part of a FLUX.1 run's routing settings its sigma table depends on: with ``--flow_shift`` the shift
    alone, and on a scheduler without dynamic shifting (FLUX.1-schnell's) nothing (`models.flux.routing_scheduler`
    ignores the resolution then)."""
    if settings.get("flow_shift") is not None:
        return {"flow_shift": settings["flow_shift"]}
    if pipeline is not None and not pipeline.scheduler.config.get("use_dynamic_shifting", False):
        return {}
    return settings


def training_routing_settings(configs, names, pipeline=None) -> dict:
    """What runs' sigma table depends on besides the base pipeline's scheduler, which routing needs
    (`routing_scheduler`), from their ``training_config.json`` dicts (empty ones, e.g. a Hub model's, are
    skipped); ``names`` label them. FLUX.1 runs: their resolution and ``--flow_shift``
    (`models.flux.run_routing_settings`). Other flow-matching runs: the ``--flow_shift`` that replaced the
    scheduler's shift (their intervals index the shifted table; routing by the base's table sent a sigma to
    another interval's model). {} for the rest. Runs that disagree are refused in one line: their intervals
    index different tables, which no one router follows. ``pipeline``: the base pipeline, where known (a FLUX.1
    scheduler without dynamic shifting makes the resolution irrelevant)."""
    from ..models.flux import run_routing_settings

    recorded = [(name, config) for name, config in zip(names, configs) if config]
    if not recorded:
        return {}
    flux = all(config.get("model_type") == "flux" for _, config in recorded)
    if flux:
        settings = [(name, run_routing_settings(config)) for name, config in recorded]
    else:
        settings = [(name, {} if config.get("flow_shift") is None else {"flow_shift": float(config["flow_shift"])})
                    for name, config in recorded]
    first_name, first = settings[0]
    for name, other in settings[1:]:
        if (_table_settings(other, pipeline) != _table_settings(first, pipeline)) if flux else other != first:
            def describe(entry):
                return ", ".join(f"--{key} {value}" for key, value in entry.items() if value is not None) or "no --flow_shift"
            raise ValueError(f"{first_name} trained with {describe(first)} and {name} with {describe(other)}: their "
                             "intervals index different sigma tables; compare or ensemble runs trained alike")
    return first


def routing_scheduler(pipeline, info: dict):
    """The scheduler whose table a router over the saved ensemble maps timesteps into (None: the pipeline's)."""
    from ..models.flux import routing_scheduler as flux_routing_scheduler
    from ..schedule import is_flow_matching

    settings = info.get("training_routing") or {}
    if type(pipeline).__name__ == "FluxPipeline":
        return flux_routing_scheduler(pipeline, **settings)
    if settings.get("flow_shift") is not None and is_flow_matching(pipeline.scheduler):
        from ..models.base import _copy_scheduler

        # as `ModelAdapter.load` built the run's training scheduler from the pipeline's (a static shift)
        return _copy_scheduler(pipeline.scheduler, shift=settings["flow_shift"], use_dynamic_shifting=False)
    return None


def write_ensemble(base_pipeline, finetunes, models, output_dir: str, num_timesteps: int) -> dict:
    """Write the ensemble folder (module docstring) of ``models`` (one denoiser per fine-tune, in
    the order of ``finetunes``) over ``base_pipeline``; return the JSON it wrote."""
    component = denoiser_component(base_pipeline)
    if component == "controlnet":
        raise ValueError("--ensemble is not available for ControlNet (diffusers' ControlNet pipeline accepts only a "
                         "ControlNetModel, not a router): merge the fine-tunes instead")
    intervals, members = ensemble_intervals(finetunes, num_timesteps)
    save_pipeline(base_pipeline, output_dir, component)
    names = []
    for member in members:
        if member is None:
            names.append(BASE_MEMBER)
            continue
        name = f"{MEMBERS_DIR}/interval-{member}"
        folder = os.path.join(output_dir, MEMBERS_DIR, f"interval-{member}")
        model = models[member]
        with channel_projection_detached(model):
            model.save_pretrained(folder, safe_serialization=True)
        save_channel_projection(model, folder)
        names.append(name)
    info = {
        "format": _FORMAT,
        "version": 1,
        "component": component,
        "intervals": intervals.to_dict(),
        "members": names,
        "sources": [finetune.path for finetune in finetunes],
        **_training_routing(finetunes, base_pipeline),
    }
    with open(os.path.join(output_dir, ENSEMBLE_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return info


def write_lora_ensemble(base_pipeline, finetunes, output_dir: str, num_timesteps: int) -> dict:
    """Write the ensemble folder of LoRA fine-tunes (``lora_ensemble.py``): the base pipeline, each
    fine-tune's LoRA files as a member (no denoiser copies), ``deme_ensemble.json`` with ``"kind": "lora"``."""
    from .lora_ensemble import write_lora_members

    component = denoiser_component(base_pipeline)
    if component == "controlnet":
        raise ValueError("--ensemble is not available for ControlNet (diffusers' ControlNet pipeline accepts only a "
                         "ControlNetModel, not a router): merge the fine-tunes instead")
    intervals, members = ensemble_intervals(finetunes, num_timesteps)
    member_names = write_lora_members(finetunes, output_dir, MEMBERS_DIR)
    save_pipeline(base_pipeline, output_dir, component)
    info = {
        "format": _FORMAT,
        "version": 1,
        "kind": "lora",  # members are LoRA folders switched by timestep on the one base denoiser
        "component": component,
        "intervals": intervals.to_dict(),
        "members": [BASE_MEMBER if member is None else member_names[member] for member in members],
        "sources": [finetune.path for finetune in finetunes],
        **_training_routing(finetunes, base_pipeline),
    }
    with open(os.path.join(output_dir, ENSEMBLE_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return info


def read_ensemble_config(folder: str) -> dict | None:
    """``folder/deme_ensemble.json`` as a dict, or None when the folder is no ensemble."""
    return read_format_json(os.path.join(folder, ENSEMBLE_CONFIG_NAME), _FORMAT, "DeMe ensemble")


def attach_saved_ensemble(pipeline, folder: str):
    """If ``folder`` is an ensemble folder, replace ``pipeline``'s denoiser (the base's, loaded from
    the folder) by the ``TimestepRouter`` over its members; return ``pipeline``."""
    from ..clustering import TimestepIntervals
    from ..routing import TimestepRouter

    info = read_ensemble_config(folder)
    if info is None:
        return pipeline
    if info.get("kind") == "lora":
        from .lora_ensemble import attach_lora_ensemble

        return attach_lora_ensemble(pipeline, folder, info)
    component = info["component"]
    base_model = getattr(pipeline, component)
    models = []
    for name in info["members"]:
        if name == BASE_MEMBER:
            models.append(base_model)
            continue
        member_folder = os.path.join(folder, *name.split("/"))
        model = type(base_model).from_pretrained(member_folder, use_safetensors=True, torch_dtype=base_model.dtype)
        if read_projection_config(member_folder) is not None:
            load_channel_projection(model, member_folder)
        models.append(model.to(base_model.device).eval())
    intervals = TimestepIntervals(info["intervals"]["bounds"], info["intervals"]["num_timesteps"])
    # flow-matching pipelines pass sigma * 1000 (Flux, Qwen-Image: sigma), not training indices
    from ..routing import denoiser_timestep_map

    timestep_map = denoiser_timestep_map(pipeline.scheduler, intervals.num_timesteps, base_model,
                                         training_scheduler=routing_scheduler(pipeline, info))
    setattr(pipeline, component, TimestepRouter(intervals, models, timestep_map=timestep_map))
    return pipeline
