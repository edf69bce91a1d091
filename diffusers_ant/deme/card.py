"""The model card of a merged (or ensemble) DeMe folder, from ``model_cards/deme_template.md``.

Made as ``diffusers_ant.hub.write_model_card`` makes the ANT card: huggingface_hub's
``ModelCard.from_template`` (jinja2) for the body and metadata, diffusers' ``populate_model_card`` for
the library name and tags. It records the base, each fine-tune's interval and weight, how the
fine-tunes were trained (read from their own ``training_config.json``: a loss or setting is named
only if the runs used it), the merge method, the weight search's table and the scores. A folder
that plain diffusers would load wrongly (channel projections, an ensemble) says so in its first
lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..hub import is_hub_id
from .finetunes import training_configs

__all__ = ["DEME_TEMPLATE_NAME", "write_deme_model_card"]

DEME_TEMPLATE_NAME = "deme_template.md"
CARD_NAME = "README.md"

_METHOD_TEXT = {
    "task_arithmetic": "task arithmetic (Ilharco et al., 2023), DeMe's merge",
    "ties": "TIES merging (Yadav et al., 2023) of the task vectors, through peft",
    "dare_linear": "DARE (Yu et al., 2024) random drop and rescale of the task vectors, then task arithmetic, through peft",
    "dare_ties": "DARE (Yu et al., 2024) random drop and rescale, then TIES sign election, through peft",
}


def _template_path(name: str = DEME_TEMPLATE_NAME) -> Path:
    """The template in the installed package (``diffusers_ant/model_cards``, see setup.py) or the checkout's ``model_cards/``."""
    package_dir = Path(__file__).resolve().parent.parent
    candidates = [package_dir / "model_cards" / name, package_dir.parent / "model_cards" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model card template {name} not found in {[str(c.parent) for c in candidates]}: "
                            "reinstall diffusers_ant (pip install -e .)")




def _shown(path: str | None) -> str:
    """A model reference fit for a published card: a Hub id as a link, a local folder by its name only."""
    if not path:
        return "not recorded"
    if is_hub_id(path):
        return f"[{path}](https://huggingface.co/{path})"
    return f"`{Path(path).name}`"


def _common(configs, key):
    """The value all fine-tunes recorded for ``key``; ``None`` when some did not record it, ``"varies"``
    when they disagree."""
    values = [c.get(key) for c in configs]
    if not values or any(v is None for v in values):
        return None
    return values[0] if all(v == values[0] for v in values) else "varies"


def training_lines(finetunes, projection: bool) -> list:
    """What the card says about how the fine-tunes were trained, from their own records (never a
    loss or setting the runs did not use): consistency loss, probabilistic sampling, projection,
    optimiser, EMA, steps."""
    configs = training_configs(finetunes)
    if not any(configs):
        return ["The fine-tunes' training settings were not recorded (no `training_config.json`)."]
    # DeMe's consistency loss and interval sampling were used only by --deme_interval runs; a --timestep_range
    # fine-tune records the flags' defaults without having used them (the optimiser lines below read every one)
    deme = [c for c in configs if c and c.get("deme_interval") is not None]
    lines = []
    if len(deme) < len([c for c in configs if c]):
        lines.append(("some fine-tunes were" if deme else "the fine-tunes were") + " trained with `--timestep_range` "
                     "(plain training on their interval: no consistency loss, no probabilistic sampling)")
    consistency = _common(deme, "consistency_weight")
    if consistency == "varies":
        lines.append("consistency loss: its weight differs between the fine-tunes (see their `training_config.json`)")
    elif consistency is not None:
        lines.append(f"consistency loss ||eps_pre(x_t, t) - eps_i(x_t, t)||^2 against the frozen pretrained model, weight {_fmt(float(consistency))}"
                     if float(consistency) > 0 else "no consistency loss (weight 0)")
    p, sampling = _common(deme, "deme_global_prob"), _common(deme, "deme_sampling")
    if p not in (None, "varies"):
        where = {"per_batch": "per micro-batch", "per_sample": "per sample"}.get(sampling, "")
        antithetic = _common(deme, "deme_antithetic") is True
        lines.append((f"probabilistic sampling: timesteps from the whole range with probability {_fmt(float(p))}"
                      + (f" (one coin {where})" if where else "") + (", antithetic pairs t, lo + hi - t" if antithetic else ""))
                     if float(p) > 0 else "timesteps from the fine-tune's interval only (no probabilistic sampling)")
    lines.append("channel-wise projection after each block, on the main path (skip connections unprojected)" if projection
                 else "no channel-wise projection")
    optimiser = [f"{label} {_fmt(value)}" for key, label in (("learning_rate", "learning rate"), ("adam_beta1", "AdamW beta1"),
                                                             ("adam_weight_decay", "weight decay"))
                 if (value := _common(configs, key)) not in (None, "varies")]
    ema = _common(configs, "use_ema")
    if ema in (True, False):
        optimiser.append("EMA" if ema else "no EMA")
    steps = _common(configs, "max_train_steps")
    if steps not in (None, "varies"):
        optimiser.append(f"{steps} steps per fine-tune")
    if optimiser:
        lines.append(", ".join(optimiser))
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_deme_model_card(output_dir: str | os.PathLike, *, base_model: str, model_type: str | None, denoiser_class: str,
                          finetunes: Sequence, num_timesteps: int | None, weights: Sequence[float] | None = None,
                          merge_method: str = "task_arithmetic", merge_options: Mapping | None = None,
                          search: Any = None, scores: Mapping | None = None, ensemble: bool = False,
                          projection: bool = False, repo_id: str | None = None, license: str | None = None,
                          lora_rank: int | None = None, lora_ensemble: bool = False, name: str | None = None) -> Path:
    """Write ``output_dir/README.md`` for a merged (``ensemble=False``) or ensemble DeMe folder; return its path.

    Args:
        base_model: the ``--base`` pipeline (named by folder name only unless a Hub id).
        model_type: ``unet``, ``dit``, ``sd``, ``controlnet`` (None: not recorded).
        denoiser_class: the denoiser's class name (e.g. ``UNet2DModel``).
        finetunes: the ``FineTune`` records, low to high t.
        num_timesteps: T of the intervals.
        weights: the merge weights, one per fine-tune (merged folders).
        merge_method, merge_options: the merge method and its options (density, seed ...).
        search: a ``search.SearchResult`` when the weights were searched.
        scores: the result's metrics (``fid``, ``kid_mean``, ``precision``, ``recall``, ...), with
            ``dataset_name`` / ``num_fake`` / ``feature_extractor`` describing them.
        ensemble: an ensemble folder (``TimestepRouter`` over the fine-tunes) instead of a merge.
        projection: whether the model carries channel projections.
        lora_rank: the rank of the merged LoRA when LoRA fine-tunes were merged as one LoRA
            (``lora_merge.py``); None for a merged pipeline.
        lora_ensemble: an ensemble of LoRA fine-tunes, switched by timestep on one base denoiser
            (``lora_ensemble.py``) rather than routed between denoisers.
        name: the model's name in the card (default: the repo's, else the folder's; a folder written under
            a temporary name gives its final one).
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    from ..hub import MODEL_TYPES
    from .search import _weights_text

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    info = MODEL_TYPES.get(model_type or "", {})
    name = name or (repo_id.split("/")[-1] if repo_id else output_dir.name)
    kind = "ensemble" if ensemble else "merged model"
    title = f"{name}: a DeMe {kind}"
    n = len(finetunes)
    if ensemble:
        summary = (f"A 🧨 diffusers pipeline whose denoiser routes each sampling step to one of {n} per-interval "
                   "fine-tunes of the base (DeMe's ensemble before merging, through diffusers_ant's TimestepRouter).")
        method_line = "no merge: each timestep's interval decides which fine-tune denoises it (intervals no fine-tune covers go to the base)"
        weight_header = "denoises"
        if lora_ensemble:
            summary = (f"A 🧨 diffusers pipeline whose one denoiser carries {n} per-interval LoRA fine-tunes of the base "
                       "as named adapters; each sampling step activates the LoRA of its timestep's interval "
                       "(DeMe's ensemble before merging, without model copies).")
    else:
        summary = (f"A 🧨 diffusers model merged from {n} per-interval fine-tunes of one base with diffusers_ant "
                   "(DeMe, Decouple-Then-Merge): one model, the cost of one model at inference.")
        options = {k: v for k, v in (merge_options or {}).items() if v is not None}
        method_line = _METHOD_TEXT.get(merge_method, merge_method)
        if lora_rank is not None:
            summary = (f"A LoRA of rank {lora_rank} merged from {n} per-interval LoRA fine-tunes of one base with "
                       "diffusers_ant (DeMe, Decouple-Then-Merge): B = [w_1 s_1 B_1 ... w_N s_N B_N], A = [A_1; ...; A_N], "
                       "exactly the task-arithmetic merge of the LoRAs, loaded on the base like any LoRA.")
        if options:
            method_line += " (" + ", ".join(f"{k} {_fmt(v)}" for k, v in options.items()) + ")"
        if search is not None:
            method_line += f"; weights chosen by a {search.strategy} search on {search.metric}"
        weight_header = "merge weight"
    model_line = info.get("description", f"a {denoiser_class}")
    if model_line.startswith("a ") and denoiser_class not in model_line:
        model_line += f" ({denoiser_class})"

    interval_rows = []
    for index, finetune in enumerate(finetunes):
        interval_rows.append({
            "index": index, "start": finetune.bounds[0], "end": finetune.bounds[1],
            "source": f"`{finetune.name}`" + ((" (LoRA)" if lora_rank is not None or lora_ensemble
                                               else " (LoRA, folded in)") if finetune.lora else ""),
            "weight": "its interval's steps" if ensemble else (_fmt(float(weights[index])) if weights is not None else ""),
        })

    search_block = None
    if search is not None:
        search_block = {
            "description": (f"{search.strategy.capitalize()} search over {len(search.rows)} weight vectors; best "
                            f"{_weights_text(search.best_weights)} with {search.metric} {search.best_score:.4f} "
                            "(lower is better). The full table is in `deme_search.json` / `deme_search.md`."),
            "metric": search.metric,
            "rows": [{"weights": ("**" + _weights_text(r["weights"]) + "**") if r["weights"] == search.best_weights
                      else _weights_text(r["weights"]), "score": f"{r['score']:.4f}"} for r in search.rows],
        }

    score_rows, score_description = [], ""
    if scores:
        for key, label in (("fid", "FID"), ("kid_mean", "KID"), ("precision", "precision"), ("recall", "recall")):
            if scores.get(key) is not None:
                score_rows.append((label, f"{float(scores[key]):.4f}"))
        extractor = str(scores.get("feature_extractor", ""))
        features = (f"domain features of `{extractor[len('domain_'):]}` (a domain FID, comparable only with other domain "
                    "FIDs of the same data and sample count)") if extractor.startswith("domain_") else f"`{extractor}` features"
        score_description = (f"{scores.get('num_fake', '?')} samples ({scores.get('scheduler', '?')}, "
                             f"{scores.get('num_inference_steps', '?')} steps) against {scores.get('num_real', '?')} images of "
                             f"`{scores.get('dataset_name', '?')}`, in {features}.")

    no_help = search is not None and not ensemble and all(float(w) == 0.0 for w in (weights or []))
    if no_help:
        method_line += ": **no fine-tune helped**, the search returned the base (all weights 0): this is the pretrained model"
    load_warning = None
    if ensemble:
        load_warning = ("Load this folder with `diffusers_ant.models.load_pipeline`: its denoiser is a TimestepRouter over "
                        "the fine-tunes, which plain `DiffusionPipeline.from_pretrained` does not know (it loads the base).")
        if lora_ensemble:
            load_warning = ("Load this folder with `diffusers_ant.models.load_pipeline`: it loads the fine-tunes' LoRAs "
                            "as adapters and switches them by timestep; plain `DiffusionPipeline.from_pretrained` loads "
                            "the base only.")
    elif projection:
        load_warning = ("Load this model with `diffusers_ant.models.load_pipeline`: it carries DeMe's channel projections "
                        "(`channel_projection.safetensors`), which plain `DiffusionPipeline.from_pretrained` drops "
                        "without an error, loading a different model.")
    ref = repo_id or "path/to/this/folder"
    usage = ("from diffusers_ant.models import load_pipeline\n\n"
             f"pipe = load_pipeline({ref!r})"
             + (("  # the base pipeline, its interval LoRAs switched by timestep" if lora_ensemble
                 else "  # the base pipeline with a TimestepRouter as its denoiser") if ensemble else "")
             + ("  # re-attaches the channel projections" if projection and not ensemble else ""))
    diffusers_lora = model_type in ("sd", "sdxl", "sd3", "flux", "qwenimage")  # pipelines with load_lora_weights
    if lora_rank is not None and not projection:
        usage += "  # the base named in ant_lora.json, with this LoRA"
        if diffusers_lora:
            usage += "\n# or plain diffusers: pipe = DiffusionPipeline.from_pretrained(BASE); pipe.load_lora_weights(...)"
    elif not ensemble and not projection:
        usage += ("\n# plain diffusers works too: controlnet = ControlNetModel.from_pretrained(...); "
                  "StableDiffusionControlNetPipeline.from_pretrained(BASE, controlnet=controlnet)"
                  if model_type == "controlnet" else "\n# plain diffusers works too: DiffusionPipeline.from_pretrained(...)")

    hub_base = base_model if is_hub_id(base_model) else None
    # the base family's licence, as the ANT cards (a FLUX.1-dev or SDXL merge is no apache-2.0 model)
    license = license or info.get("license", "apache-2.0")
    card_data = ModelCardData(license=license, base_model=hub_base, pipeline_tag=info.get("pipeline_tag"), inference=not ensemble)
    card = ModelCard.from_template(
        card_data,
        template_path=_template_path(),
        title=title,
        summary=summary,
        base_line=_shown(base_model),
        model_line=model_line,
        method_line=method_line,
        projection=projection,
        num_timesteps=num_timesteps if num_timesteps is not None else "T",
        weight_header=weight_header,
        interval_rows=interval_rows,
        search=search_block,
        score_rows=score_rows,
        score_description=score_description,
        usage_snippet=usage,
        load_warning=load_warning,
        training_lines=training_lines(finetunes, projection),
    )
    tags = ["diffusers", "diffusers-training", *info.get("tags", ()), "deme", "ensemble" if ensemble else "model-merging"]
    card = populate_model_card(card, tags=list(dict.fromkeys(tags)))
    path = output_dir / CARD_NAME
    card.save(path)
    return path
