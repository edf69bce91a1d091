"""The fine-tunes of a DeMe run: which interval each one learned, from which base, and their weights.

A fine-tune folder is what ``train_ant.py --deme_interval i`` writes (``train_deme.py`` writes one per
interval, ``OUT/interval-i/``): either a full pipeline folder (``model_index.json``, the denoiser's
safetensors) or a LoRA folder (``ant_lora.json`` naming the base pipeline, the LoRA weights), with
the run's records beside them:

- ``training_config.json``: ``deme_interval`` (the index i of the fine-tune's interval), or a
  hand-made ``timestep_range`` ``[start, end]`` (inclusive); ``pretrained_model_name_or_path``, the
  base (a LoRA folder's ``ant_lora.json`` names it too); ``model_type``.
- ``timestep_intervals.json``: the run's intervals (``TimestepIntervals.save``), whose
  ``bounds[deme_interval]`` is the fine-tune's interval and ``num_timesteps`` its T.
- optionally ``channel_projection.{json,safetensors}`` (``projection.py``).

Merging needs dense weights: a LoRA fine-tune is loaded onto its base and its LoRA update folded in
(``W + (alpha / r) B A``, by peft's own ``merge``) before its task vector is taken. A model without
channel projections is, exactly, the same model with identity projections, so when some of the
models carry projections the others get identity ones before merging.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..models.base import CONTROLNET_INFO_NAME, LORA_INFO_NAME, resolve_recorded_base
from .projection import (
    add_channel_projection,
    channel_projection_detached,
    channel_projections,
    denoiser_component,
    has_channel_projection,
    load_channel_projection,
    read_projection_config,
    set_skip_mode,
    skip_mode,
)

TRAINING_CONFIG_NAME = "training_config.json"
INTERVALS_NAME = "timestep_intervals.json"

__all__ = [
    "FineTune",
    "align_channel_projections",
    "check_same_architecture",
    "check_same_base",
    "dense_denoiser",
    "load_base_pipeline",
    "load_finetune_denoiser",
    "read_finetune",
    "read_finetunes",
]


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class FineTune:
    """One fine-tune folder and what its records say.

    ``bounds``: the inclusive training-index interval it was fine-tuned on; ``num_timesteps``: T
    (None when the folder has no ``timestep_intervals.json``); ``base_model``: the recorded base
    (None if not recorded); ``lora``: a LoRA folder (``ant_lora.json``).
    """

    path: str
    bounds: tuple
    num_timesteps: int | None
    base_model: str | None
    model_type: str | None
    lora: bool

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def read_finetune(folder: str) -> FineTune:
    """The records of one fine-tune folder (module docstring); a one-line ValueError when they are missing."""
    from ..clustering import TimestepIntervals

    if not os.path.isdir(folder):
        raise ValueError(f"--finetuned {folder!r}: no such folder")
    lora_info = _read_json(os.path.join(folder, LORA_INFO_NAME))
    if lora_info is None and not any(os.path.isfile(os.path.join(folder, name))
                                     for name in ("model_index.json", CONTROLNET_INFO_NAME)):
        raise ValueError(f"--finetuned {folder!r} holds no saved pipeline (no model_index.json, "
                         f"{CONTROLNET_INFO_NAME} or {LORA_INFO_NAME})")
    config = _read_json(os.path.join(folder, TRAINING_CONFIG_NAME)) or {}
    intervals_path = os.path.join(folder, INTERVALS_NAME)
    intervals = TimestepIntervals.load(intervals_path) if os.path.isfile(intervals_path) else None
    num_timesteps = intervals.num_timesteps if intervals is not None else None

    index = config.get("deme_interval")
    if index is not None:
        if intervals is None:
            raise ValueError(f"{folder!r}: {TRAINING_CONFIG_NAME} names deme_interval {index} but there is no {INTERVALS_NAME}")
        if not 0 <= int(index) < len(intervals):
            raise ValueError(f"{folder!r}: deme_interval {index} is out of range for its {len(intervals)} intervals")
        bounds = tuple(intervals.bounds[int(index)])
    elif config.get("timestep_range"):
        start, end = (int(v) for v in config["timestep_range"])
        bounds = (start, end)
    else:
        raise ValueError(
            f"cannot tell which timestep interval {folder!r} was fine-tuned on: its {TRAINING_CONFIG_NAME} has neither "
            "deme_interval nor timestep_range (fine-tune it with train_ant.py --deme_interval i)"
        )
    if bounds[0] < 0 or bounds[1] < bounds[0] or (num_timesteps is not None and bounds[1] >= num_timesteps):
        raise ValueError(f"{folder!r}: interval {list(bounds)} is not a valid inclusive timestep range")

    # Recorded bases are relative to the fine-tune's folder (or Hub ids): `hub.portable_path`.
    if lora_info is not None:
        base = lora_info.get("base_model")
        model_type = lora_info.get("model_type") or config.get("model_type")
    else:
        base = config.get("pretrained_model_name_or_path")
        model_type = config.get("model_type")
    if base is not None:
        base = resolve_recorded_base(folder, base)
    return FineTune(folder, bounds, num_timesteps, base, model_type, lora_info is not None)


def read_finetunes(folders) -> list:
    """The fine-tunes of ``folders``, sorted from low to high t (the order ``--weights`` is given in).

    Refuses duplicates, overlapping intervals, disagreeing T and disagreeing model types.
    """
    if not folders:
        raise ValueError("no fine-tunes given: pass --finetuned OUT/interval-*")
    finetunes = sorted((read_finetune(f) for f in folders), key=lambda f: f.bounds)
    for a, b in zip(finetunes, finetunes[1:]):
        if b.bounds[0] <= a.bounds[1]:
            raise ValueError(f"fine-tunes {a.path!r} {list(a.bounds)} and {b.path!r} {list(b.bounds)} cover overlapping "
                             "timestep intervals: give one fine-tune per interval")
    totals = {f.num_timesteps for f in finetunes if f.num_timesteps is not None}
    if len(totals) > 1:
        raise ValueError(f"the fine-tunes' intervals are over different numbers of timesteps ({sorted(totals)}): "
                         "merge the fine-tunes of one run")
    types = {f.model_type for f in finetunes if f.model_type}
    if len(types) > 1:
        raise ValueError(f"the fine-tunes are of different model types ({', '.join(sorted(types))}): merge fine-tunes of one model")
    return finetunes


def _resolved(path: str) -> str:
    """A local path made absolute and real (so two spellings of one folder compare equal); a Hub id as is."""
    if os.path.exists(path):
        return os.path.realpath(path)
    return path.rstrip("/")


def _same_base(recorded: str, base: str) -> bool:
    """Whether a fine-tune's recorded base names ``base``. A base that shared nothing but the file system root with
    the output folder is recorded by its folder name alone (``hub.portable_path``: its relative path would spell out
    the absolute one), which reads as a Hub id: a local ``base`` of that name is taken as that base."""
    if _resolved(recorded) == _resolved(base):
        return True
    bare = "/" not in recorded and os.sep not in recorded and not os.path.exists(recorded)
    return bare and os.path.isdir(base) and os.path.basename(os.path.realpath(base)) == recorded


def check_same_base(finetunes, base: str) -> None:
    """Refuse a fine-tune whose recorded base is another model than ``base`` (not recorded: accepted)."""
    for finetune in finetunes:
        if finetune.base_model is not None and not _same_base(finetune.base_model, base):
            raise ValueError(f"fine-tune {finetune.path!r} was trained from {finetune.base_model!r}, not from --base "
                             f"{base!r}: merge fine-tunes of the same base")


# ------------------------------------------------------------------------------------ weights


def dense_denoiser(model):
    """``model`` without LoRA layers, their update folded into the weights (``model`` itself if it has none).

    peft's ``merge`` of each LoRA layer, through ``diffusers_ant.models.lora.base_copy``; channel
    projections are carried over to the copy.
    """
    from ..models.lora import base_copy, has_lora

    if not has_lora(model):
        return model
    with channel_projection_detached(model) as projections:
        dense = base_copy(model, merge=True)
    if projections:
        add_channel_projection(dense)
        copied = channel_projections(dense)
        for name, projection in projections.items():
            copied[name].weight.data.copy_(projection.weight.data)
            copied[name].projects_skip = projection.projects_skip  # a legacy fine-tune stays as trained
    return dense.eval()


def recorded_base_revision(finetunes) -> str | None:
    """The Hub revision of the base the fine-tunes trained from, as they record it (a LoRA's or a ControlNet's
    record, ``models.controlnet.recorded_revision``, else the run's ``training_config.json``): the first one
    found, else None."""
    from ..models.controlnet import recorded_revision

    for finetune, config in zip(finetunes, training_configs(finetunes)):
        value = recorded_revision(finetune.path) or config.get("revision")
        if value:
            return value
    return None


def base_files(base: str, finetunes=(), cache_dir=None) -> str:
    """The local folder of the base's files: ``base`` itself, or a Hub id's snapshot at the revision the
    fine-tunes record (``DiffusionPipeline.download``: the files the pipeline loads, into ``cache_dir``, default
    the Hub's cache). The merge reads the base's weights and configs from disk; the fine-tunes' records and the
    merged folder keep naming the Hub id."""
    if os.path.isdir(base):
        return base
    from diffusers import DiffusionPipeline

    revision = recorded_base_revision(finetunes)
    try:
        return DiffusionPipeline.download(base, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"--base {base!r} is neither a folder nor a reachable Hub pipeline ({type(err).__name__}): "
                         "give the pretrained pipeline folder the fine-tunes started from, or its Hub id while online") from None


def common_class_map(finetunes) -> dict | None:
    """The ``class_map.json`` the fine-tunes share (DiT fine-tunes on another class count than the pretrained
    table: which label row each data-set class trained), or None when none has one. Fine-tunes with different
    maps (or some without) trained different rows for the same labels: one-line ``ValueError``."""
    from ..models.base import CLASS_MAP_NAME

    records = [_read_json(os.path.join(f.path, CLASS_MAP_NAME)) for f in finetunes]
    if all(r is None for r in records):
        return None
    if any(r != records[0] for r in records):
        odd = next(f for f, r in zip(finetunes, records) if r != records[0])
        raise ValueError(f"fine-tune {odd.path!r} maps the data set's classes to other label rows ({CLASS_MAP_NAME}) "
                         f"than {finetunes[0].path!r}: merge fine-tunes trained with one --class_map")
    return records[0]


def write_class_map(class_map: dict | None, output_dir: str, pipeline=None) -> None:
    """Carry the fine-tunes' shared class map into a merged or ensemble folder (``load_pipeline`` then samples
    the data set's rows) and onto ``pipeline`` for the search's samples; nothing without one."""
    if class_map is None:
        return
    from ..models.base import CLASS_MAP_NAME

    if pipeline is not None:
        pipeline.class_rows = [int(row) for row in class_map["rows"]]
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, CLASS_MAP_NAME), "w", encoding="utf-8") as f:
            json.dump(class_map, f, indent=2)


def load_base_pipeline(base: str, torch_dtype=None):
    """The base pipeline (``diffusers_ant.models.load_pipeline``), its denoiser dense and in eval mode."""
    from ..models import load_pipeline

    if not os.path.isdir(base):
        raise ValueError(f"--base {base!r}: no such folder (give the pretrained pipeline folder the fine-tunes started from)")
    pipeline = load_pipeline(base, torch_dtype=torch_dtype)
    component = denoiser_component(pipeline)
    setattr(pipeline, component, dense_denoiser(getattr(pipeline, component)).eval())
    return pipeline


def _scheduler_prediction_type(folder):
    config = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json")) or {}
    return config.get("prediction_type")


def _load_full_denoiser(cls, folder: str, subfolder, torch_dtype):
    """The denoiser of a full fine-tune (its safetensors, never a pickle), refusing missing or extra weights."""
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    try:
        model, loading = cls.from_pretrained(folder, use_safetensors=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the {subfolder or 'model'} of fine-tune {folder!r} "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    # diffusers only warns about missing weights (and leaves them uninitialised): refuse them
    missing, extra = sorted(loading.get("missing_keys", [])), sorted(loading.get("unexpected_keys", []))
    if missing or extra:
        raise ValueError(f"fine-tune {folder!r} does not have the base's weights: missing {missing[:3]}, "
                         f"unexpected {extra[:3]} (merge fine-tunes of the same model)")
    return model


def load_finetune_denoiser(finetune: FineTune, base_pipeline, torch_dtype=None):
    """The fine-tune's denoiser, dense (LoRA folded in), with its channel projections, in eval mode.

    Full folders: only the denoiser is read (its safetensors, never a pickle). LoRA folders:
    ``load_pipeline`` (base + LoRA + projections), then the LoRA folded in.
    """
    from ..models import load_pipeline

    component = denoiser_component(base_pipeline)
    base_model = getattr(base_pipeline, component)
    if finetune.lora:
        pipeline = load_pipeline(finetune.path, torch_dtype=torch_dtype)
        model = getattr(pipeline, component, None)
        if model is None:
            raise ValueError(f"fine-tune {finetune.path!r} has no {component}: not a fine-tune of this architecture")
        model = dense_denoiser(model)
    elif os.path.isfile(os.path.join(finetune.path, CONTROLNET_INFO_NAME)):
        # a ControlNet output: the ControlNet at the folder's root (its base names the rest)
        model = _load_full_denoiser(type(base_model), finetune.path, None, torch_dtype)
    else:
        index = _read_json(os.path.join(finetune.path, "model_index.json"))
        entry = index.get(component)
        if not entry or entry[-1] != type(base_model).__name__:
            found = entry[-1] if entry else "nothing"
            raise ValueError(f"fine-tune {finetune.path!r} has {found} as its {component}, the base a "
                             f"{type(base_model).__name__}: merge fine-tunes of the same architecture")
        base_prediction = base_pipeline.scheduler.config.get("prediction_type")
        prediction = _scheduler_prediction_type(finetune.path)
        if prediction is not None and base_prediction is not None and prediction != base_prediction:
            raise ValueError(f"fine-tune {finetune.path!r} predicts {prediction}, the base {base_prediction}: "
                             "merge fine-tunes trained for the base's prediction type")
        model = _load_full_denoiser(type(base_model), finetune.path, component, torch_dtype)
    if not finetune.lora:
        info = read_projection_config(finetune.path)
        if info is not None and (info.get("component") or component) == component:
            load_channel_projection(model, finetune.path)
    model.to(base_model.device)
    check_same_architecture(base_model, model, finetune.path)
    return model.eval()


def check_same_architecture(base_model, model, where: str) -> None:
    """Refuse a denoiser of another class or configuration than the base's (the first differing key named)."""
    if type(model) is not type(base_model):
        raise ValueError(f"fine-tune {where!r} is a {type(model).__name__}, the base a {type(base_model).__name__}: "
                         "merge fine-tunes of the same architecture")
    mine = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    theirs = {k: v for k, v in dict(base_model.config).items() if not k.startswith("_")}
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            raise ValueError(f"fine-tune {where!r} has {key}={a!r}, the base {key}={b!r}: merge fine-tunes of the same architecture")


def align_channel_projections(models) -> bool:
    """Give identity projections to the models without any when one of them has projections
    (exactly the same models: the identity changes nothing). Returns whether projections are present.

    The models' projections must be of one kind: main-path (today's) or legacy skip-projecting
    (``channel_projection.json`` version 1); the added identities take that kind, so the merged
    model (the base's projections, loaded with the merged weights) computes what its fine-tunes did.
    A mix is refused in one line."""
    if not any(has_channel_projection(m) for m in models):
        return False
    legacy = skip_mode([p for m in models for p in channel_projections(m).values()])
    for model in models:
        add_channel_projection(model)
        set_skip_mode(model, legacy)
    return True


def training_configs(finetunes) -> list:
    """Each fine-tune's ``training_config.json`` (an empty dict where there is none)."""
    return [_read_json(os.path.join(finetune.path, TRAINING_CONFIG_NAME)) or {} for finetune in finetunes]
