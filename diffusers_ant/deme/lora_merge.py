"""DeMe's merge of LoRA fine-tunes *as a LoRA* (issue 16; DESIGN.md, "Model families").

Task arithmetic (DeMe, Sec. 3.3; Ilharco et al., ICLR 2023) on LoRA fine-tunes of one base adds, to
every adapted weight W, the update

    sum_i w_i s_i B_i A_i  =  [w_1 s_1 B_1, ..., w_N s_N B_N] @ [A_1; ...; A_N]

with s_i = alpha_i / r_i the i-th LoRA's scale (alpha_i / sqrt(r_i) under rsLoRA). The right-hand side
is one LoRA of rank R = r_1 + ... + r_N: B concatenated along the rank axis (each B_i with its weight
and its scale folded in), A stacked. Its own scale is written as 1 (``lora_alpha = r = R``, and per
layer in ``rank_pattern`` / ``alpha_pattern`` where a layer's rank differs), so it loads as exactly
this update. Nothing dense is formed: the merged file is about N times one LoRA file, whatever the
size of the base (a 12B Flux stays untouched on disk). The merged folder is again a LoRA folder of
the same format as its inputs, loadable by the pipeline's ``load_lora_weights`` (diffusers' format)
or ``diffusers_ant.models.load_pipeline`` (either format):

- peft's format (``unet``, ``dit``, ``controlnet``): ``pytorch_lora_weights.safetensors`` with keys
  ``<module>.lora_A.weight`` / ``.lora_B.weight`` and ``adapter_config.json``;
- diffusers' format (``sd`` and the families written with a pipeline's ``save_lora_weights``): keys
  ``<component>.<module>.lora.down.weight`` / ``.lora.up.weight`` (or ``lora_A`` / ``lora_B``,
  ``lora_linear_layer.down`` / ``.up``), the LoraConfig of each component in the file's
  ``lora_adapter_metadata`` (diffusers' ``write_lora_layers``). A file without that metadata is read
  as diffusers reads it: a module's ``.alpha`` entry when present, else alpha = rank (scale 1).

DeMe's channel projections (full C x C matrices, ``projection.py``) are merged by task arithmetic
around the identity (a fine-tune without them has identity ones) and written beside the LoRA.

Only task arithmetic is linear in the B_i A_i: TIES and DARE prune and elect signs entry by entry of
the dense task vectors, so ``merging.py`` keeps the dense path for them (and for DoRA or LoRA files
with other tensors). Written by hand: peft's ``add_weighted_adapter(combination_type="cat")`` does the
same concatenation but lives on ``PeftModel`` and needs every LoRA loaded into one model in memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..models.base import LORA_INFO_NAME
from ..models.lora import LORA_WEIGHTS_NAME
from .projection import PROJECTION_CONFIG_NAME, PROJECTION_WEIGHTS_NAME, read_projection_config

__all__ = ["LoraCandidates", "LoraFile", "check_lora_fits_base", "lora_merge_blocker", "merge_lora_files",
           "merged_projection_state", "read_lora_file", "write_merged_lora", "write_merged_projections"]

PEFT_CONFIG_NAME = "adapter_config.json"
# The (A, B) key suffixes of the LoRA formats diffusers reads (peft's, diffusers' old attention-processor
# and text-encoder names, kohya's).
LORA_PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora.down.weight", "lora.up.weight"),
              ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"), ("lora_down.weight", "lora_up.weight"))
ALPHA_SUFFIX = "alpha"


@dataclass
class LoraModule:
    """One adapted layer: its key stem (file key without the A / B suffix), A (r, in), B (out, r), scale."""

    stem: str
    pair: int
    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoraFile:
    """A LoRA folder read for merging: its format, its layers, the LoraConfig of each component."""

    folder: str
    format: str  # "peft" or "diffusers"
    modules: dict  # stem -> LoraModule
    configs: dict = field(default_factory=dict)  # component prefix ("" for peft's format) -> LoraConfig dict
    alpha_keys: bool = False  # kohya-style `<stem>.alpha` entries
    info: dict = field(default_factory=dict)  # ant_lora.json


def _pattern_value(pattern: dict, module_name: str, default):
    """peft's lookup of ``rank_pattern`` / ``alpha_pattern`` (``peft.utils.other.get_pattern_key``)."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(pattern), module_name)
    return pattern.get(key, default)


def _split_prefix(stem: str, fmt: str):
    """(component prefix, module name inside it) of a key stem: diffusers' keys start with the
    pipeline component (``unet.``, ``transformer.``, ``text_encoder.``), peft's have none."""
    if fmt == "peft":
        return "", stem
    prefix, _, rest = stem.partition(".")
    return prefix, rest


def read_lora_file(folder: str) -> LoraFile:
    """Read ``folder``'s LoRA weights and scales (module docstring); a one-line ValueError when they
    cannot be merged as a LoRA (the message says what is there)."""
    from safetensors import safe_open

    path = os.path.join(folder, LORA_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"LoRA folder {folder!r} has no {LORA_WEIGHTS_NAME}")
    info = {}
    if os.path.isfile(os.path.join(folder, LORA_INFO_NAME)):
        with open(os.path.join(folder, LORA_INFO_NAME), encoding="utf-8") as f:
            info = json.load(f)
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if os.path.isfile(os.path.join(folder, PEFT_CONFIG_NAME)):
        with open(os.path.join(folder, PEFT_CONFIG_NAME), encoding="utf-8") as f:
            configs, fmt = {"": json.load(f)}, "peft"
    else:
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        fmt, configs = "diffusers", {}
        flat = json.loads(metadata[LORA_ADAPTER_METADATA_KEY]) if metadata.get(LORA_ADAPTER_METADATA_KEY) else {}
        for key, value in flat.items():
            prefix, _, name = key.partition(".")
            configs.setdefault(prefix, {})[name] = value

    halves, alphas, other = {}, {}, []
    for key, tensor in tensors.items():
        for index, (a, b) in enumerate(LORA_PAIRS):
            if key.endswith("." + a) or key.endswith("." + b):
                is_a = key.endswith("." + a)
                stem = key[: -len(a if is_a else b) - 1]
                halves.setdefault((stem, index), {})["A" if is_a else "B"] = tensor
                break
        else:
            if key.endswith("." + ALPHA_SUFFIX):
                alphas[key[: -len(ALPHA_SUFFIX) - 1]] = float(tensor)
            else:
                other.append(key)
    if other:
        raise ValueError(f"{folder!r} holds {other[0]} besides LoRA A / B pairs (DoRA, LoRA biases or trained layers): "
                         "it cannot be merged as a LoRA")
    modules = {}
    for (stem, index), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{folder!r}: {stem} has a LoRA {'A' if 'A' in pair else 'B'} without its partner")
        A, B = pair["A"], pair["B"]
        # Linear: A (r, in), B (out, r). Convolution (peft's Conv2d LoRA): A (r, in, k, k), B (out, r, 1, 1);
        # either way the rank is A's dim 0 and B's dim 1, which is where the blocks are stacked.
        if A.dim() != B.dim() or B.dim() < 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{folder!r}: {stem} is no LoRA pair (A {tuple(A.shape)}, B {tuple(B.shape)})")
        rank = int(A.shape[0])
        prefix, name = _split_prefix(stem, fmt)
        config = configs.get(prefix)
        if config is not None:
            if config.get("use_dora"):
                raise ValueError(f"{folder!r} is a DoRA adapter: its magnitudes make the merge non-linear")
            declared = int(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", rank)))
            if declared != rank:
                raise ValueError(f"{folder!r}: {stem} has rank {rank}, its config says {declared}")
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank)))
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        elif stem in alphas:
            scale = alphas[stem] / rank  # kohya's `.alpha`, as diffusers converts it
        else:
            scale = 1.0  # diffusers' loader without metadata: lora_alpha = r
        modules[stem] = LoraModule(stem, index, A, B, scale)
    if not modules:
        raise ValueError(f"{folder!r} holds no LoRA weights")
    return LoraFile(folder, fmt, modules, configs, bool(alphas), info)


def lora_merge_blocker(files) -> str | None:
    """Why the ``LoraFile``s cannot be merged as one LoRA (a sentence), or None when they can."""
    try:
        _check_compatible(files)
    except ValueError as err:
        return str(err)
    return None


def _check_compatible(files) -> None:
    first = files[0]
    for other in files[1:]:
        if other.format != first.format:
            raise ValueError(f"{first.folder!r} is a LoRA in {first.format}'s format, {other.folder!r} in "
                             f"{other.format}'s: merge LoRAs saved by one trainer")
        if set(other.modules) != set(first.modules):
            missing = sorted(set(first.modules) ^ set(other.modules))
            raise ValueError(f"the LoRAs {first.folder!r} and {other.folder!r} adapt different layers (e.g. {missing[0]}): "
                             "merge LoRAs with the same --lora_layers / targets")
        for stem, module in first.modules.items():
            theirs = other.modules[stem]
            if theirs.A.shape[1:] != module.A.shape[1:] or theirs.B.shape[0] != module.B.shape[0] \
                    or theirs.B.shape[2:] != module.B.shape[2:]:
                raise ValueError(f"{stem}: LoRA A {tuple(theirs.A.shape)}, B {tuple(theirs.B.shape)} in {other.folder!r}, "
                                 f"A {tuple(module.A.shape)}, B {tuple(module.B.shape)} in {first.folder!r}: merge LoRAs of one base")


def merge_lora_files(files, weights) -> tuple:
    """``(tensors, configs, rank)`` of the merged LoRA of ``files`` (``LoraFile``s, low to high t) with
    ``weights``: per layer B = [w_1 s_1 B_1, ..., w_N s_N B_N] and A = [A_1; ...; A_N], scale 1;
    ``rank`` is the merged rank of most layers (N*r when the fine-tunes share r).

    B's entries are computed in float32 (``w_i * s_i`` first, one rounding) and stored in B's dtype;
    A is copied. Every fine-tune keeps its rank block, a weight of 0 included (its block is zero), so
    the merged rank is N*r whatever the weights and the search can rewrite B in place."""
    if len(weights) != len(files):
        raise ValueError(f"got {len(weights)} weights for {len(files)} LoRAs: give one weight per fine-tune")
    _check_compatible(files)
    first = files[0]
    tensors, ranks = {}, {}
    for stem, module in first.modules.items():
        parts = [f.modules[stem] for f in files]
        a_name, b_name = LORA_PAIRS[module.pair]
        tensors[f"{stem}.{a_name}"] = torch.cat([p.A for p in parts], dim=0).contiguous()
        tensors[f"{stem}.{b_name}"] = merged_b(parts, weights)
        ranks[stem] = sum(p.rank for p in parts)
        if first.alpha_keys:
            tensors[f"{stem}.{ALPHA_SUFFIX}"] = torch.tensor(float(ranks[stem]))
    configs = {}
    for prefix, config in first.configs.items():
        own = {}  # this component's layers: module name -> merged rank
        for stem, r in ranks.items():
            stem_prefix, name = _split_prefix(stem, first.format)
            if stem_prefix == prefix:
                own[name] = r
        if not own:
            continue
        common = max(set(own.values()), key=list(own.values()).count)
        pattern = {name: r for name, r in own.items() if r != common}
        configs[prefix] = {**config, "r": common, "lora_alpha": common, "rank_pattern": pattern,
                           "alpha_pattern": dict(pattern), "use_rslora": False}
    values = list(ranks.values())
    return tensors, configs, max(set(values), key=values.count)


def merged_b(parts, weights) -> torch.Tensor:
    """[w_1 s_1 B_1, ..., w_N s_N B_N] along the rank axis, in B's dtype."""
    return torch.cat([(p.B.float() * (float(w) * p.scale)).to(p.B.dtype) for p, w in zip(parts, weights)],
                     dim=1).contiguous()


def recorded_vae(files) -> str | None:
    """The VAE the fine-tunes were trained with (``--pretrained_vae_model_name_or_path``, recorded relative to
    their folder, as ``base_model``) as a path from here (or a Hub id); None when they recorded none."""
    from ..models.base import resolve_recorded_base

    recorded = files[0].info.get("vae")
    return resolve_recorded_base(files[0].folder, recorded) if recorded else None


def write_merged_lora(files, weights, output_dir: str, base_model: str, vae: str | None = None) -> dict:
    """Write the merged LoRA folder: weights (same format and keys as the inputs, rank N*r),
    its config(s), ``ant_lora.json`` naming ``base_model`` (a path relative to ``output_dir`` or a
    Hub id) with the merged rank (and ``vae``, spelled as ``base_model``: ``recorded_vae``), and the merged
    channel projections when any fine-tune has them.
    Returns the ``ant_lora.json`` it wrote."""
    from safetensors.torch import save_file

    tensors, configs, rank = merge_lora_files(files, weights)
    os.makedirs(output_dir, exist_ok=True)
    metadata = {"format": "pt"}
    if files[0].format == "peft":
        with open(os.path.join(output_dir, PEFT_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(configs[""], f, indent=2, sort_keys=True)
    elif configs:
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        flat = {f"{prefix}.{key}": value for prefix, config in configs.items() for key, value in config.items()}
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(flat, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(output_dir, LORA_WEIGHTS_NAME), metadata=metadata)
    # scale 1: every fine-tune's alpha / r is folded into its block of B
    info = {**files[0].info, "base_model": base_model, "rank": rank, "lora_alpha": rank,
            "deme_lora_merge": {"weights": [float(w) for w in weights], "num_loras": len(files)}}
    if vae is not None:  # (as `base_model`: the caller's spelling for where the folder lives, not the fine-tune's)
        info["vae"] = vae
    with open(os.path.join(output_dir, LORA_INFO_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    write_merged_projections([f.folder for f in files], weights, output_dir)
    return info


def write_merged_projections(folders, weights, output_dir: str) -> bool:
    """DeMe's channel projections of the fine-tunes merged by task arithmetic around the identity
    (``merge_task_vectors``; a fine-tune without projections counts as identity ones), written to
    ``output_dir``; False (nothing written) when no fine-tune has them."""
    from safetensors.torch import save_file

    merged = merged_projection_state(folders, weights)
    if merged is None:
        return False
    reference = next(c for c in (read_projection_config(folder) for folder in folders) if c is not None)
    save_file({k: v.contiguous() for k, v in merged.items()}, os.path.join(output_dir, PROJECTION_WEIGHTS_NAME),
              metadata={"format": "pt"})
    with open(os.path.join(output_dir, PROJECTION_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump({**reference, "weights": PROJECTION_WEIGHTS_NAME}, f, indent=2)
    return True


def merged_projection_state(folders, weights):
    """``{state-dict key: merged projection}`` of the fine-tunes' channel projections (task arithmetic
    around the identity, ``merge_task_vectors``), or None when no fine-tune has projections."""
    from safetensors.torch import load_file

    from .merge import merge_task_vectors

    configs = [read_projection_config(folder) for folder in folders]
    present = [(c, folder) for c, folder in zip(configs, folders) if c is not None]
    if not present:
        return None
    reference, where = present[0]
    versions = {int(c.get("version", 1)) for c, _ in present}
    if len(versions) > 1:
        raise ValueError("these fine-tunes mix the legacy skip-projecting channel projections (version 1) with "
                         "main-path ones: retrain the old fine-tunes")
    for config, folder in present[1:]:
        if config["blocks"] != reference["blocks"] or config.get("model_class") != reference.get("model_class"):
            raise ValueError(f"the channel projections of {folder!r} and {where!r} are of other blocks: merge fine-tunes of one model")
    states = []
    for config, folder in zip(configs, folders):
        states.append(None if config is None else load_file(os.path.join(folder, config.get("weights", PROJECTION_WEIGHTS_NAME))))
    template = next(s for s in states if s is not None)
    identity = {key: torch.eye(value.shape[0], dtype=value.dtype) for key, value in template.items()}
    return merge_task_vectors(identity, [s if s is not None else identity for s in states], weights)


def check_lora_fits_base(files, base: str) -> None:
    """Refuse, in one line naming both, a LoRA whose denoiser layers the ``base`` pipeline does not have
    (a LoRA of another model type or family). The base's denoiser is built on the meta device from its
    config (accelerate's ``init_empty_weights``): no weight is read. Bases without ``model_index.json``
    (a ControlNet output), and ControlNet LoRAs on a base without a ControlNet, are not checked here;
    ``check_same_base`` still compares the recorded base."""
    import importlib

    from accelerate import init_empty_weights

    index_path = os.path.join(base, "model_index.json")
    if not os.path.isfile(index_path):
        return
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    # A ControlNet run's LoRA adapts the ControlNet (its zero convolutions, which the UNet does not have): it is
    # checked against the pipeline's ControlNet where the base has one, and not here where it has none (the
    # ControlNet was then created from the UNet, and the folder carries it)
    controlnet = any(lora.info.get("model_type") == "controlnet" for lora in files)
    order = ("controlnet",) if controlnet else ("transformer", "unet")
    component = next((name for name in order if isinstance(index.get(name), list)), None)
    if component is None:
        return
    library, class_name = index[component]
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return  # a custom class: checked when the merged folder is loaded
    with init_empty_weights():
        model = cls.from_config(cls.load_config(os.path.join(base, component)))
    names = {name for name, _ in model.named_modules()}
    for lora in files:
        for stem in lora.modules:
            prefix, name = _split_prefix(stem, lora.format)
            if prefix not in ("", component):
                continue  # a text encoder's LoRA
            if name not in names:
                kind = lora.info.get("model_type") or "LoRA"
                raise ValueError(f"the {kind} LoRA {lora.folder!r} adapts {name}, which --base {base!r} "
                                 f"({index.get('_class_name')}, its {component} a {class_name}) does not have: merge LoRAs "
                                 "trained on this base")


class LoraCandidates:
    """The base pipeline with the merged LoRA of ``files`` attached once, for the merge-weight search:
    ``set(weights)`` rewrites each layer's B (and the channel projections) in place, so each search
    point costs no reload and no dense weight (``merging.merge_finetunes``)."""

    def __init__(self, base: str, files):
        import tempfile

        from peft.tuners.tuners_utils import BaseTunerLayer

        from ..models import load_pipeline
        from .projection import channel_projections, denoiser_component

        self.files = files
        self.folders = [f.folder for f in files]
        with tempfile.TemporaryDirectory() as work:
            # the base as an absolute path (a Hub id as is): relative to a temporary folder under /tmp it is
            # only its last name when the two share nothing but /, which `load_pipeline` then takes for a Hub id
            vae = recorded_vae(files)
            write_merged_lora(files, [1.0] * len(files), work, os.path.abspath(base) if os.path.isdir(base) else base,
                              vae=os.path.abspath(vae) if vae is not None and os.path.isdir(vae) else vae)
            self.pipeline = load_pipeline(work)  # the LoRA and projection tensors are read into memory
        denoiser = denoiser_component(self.pipeline)
        self.targets = {}
        for attr, component in self.pipeline.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            for name, layer in component.named_modules():
                if isinstance(layer, BaseTunerLayer) and getattr(layer, "lora_B", None):
                    adapter = next(iter(layer.lora_B.keys()))
                    stem = name if files[0].format == "peft" and attr == denoiser else f"{attr}.{name}"
                    self.targets[stem] = layer.lora_B[adapter].weight
        missing = sorted(set(files[0].modules) - set(self.targets))
        if missing:
            raise ValueError(f"the merged LoRA's layer {missing[0]} did not load into the base pipeline")
        self.projections = {f"{name}.channel_projection.weight": p.weight
                            for name, p in channel_projections(getattr(self.pipeline, denoiser)).items()}

    @torch.no_grad()
    def set(self, weights) -> None:
        """Make the attached LoRA (and projections) the merge with ``weights``."""
        for stem, param in self.targets.items():
            param.copy_(merged_b([f.modules[stem] for f in self.files], weights).to(param.device, param.dtype))
        if self.projections:
            for key, value in merged_projection_state(self.folders, weights).items():
                self.projections[key].copy_(value.to(self.projections[key].device, self.projections[key].dtype))
