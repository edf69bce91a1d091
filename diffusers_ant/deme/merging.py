"""DeMe's merge step end to end (what ``train_scripts/merge_deme.py`` runs): read the fine-tunes, check
them against the base, choose the weights (given, or searched on a held-out metric), merge, write one
pipeline folder with its search table, records and model card. Also the ensemble before merging.

    from diffusers_ant.deme.merging import merge_finetunes
    merge_finetunes("pretrained", ["out/interval-0", ..., "out/interval-3"], "merged", weights=[0.1, 0.1, 0.2, 0.5])
    merge_finetunes("pretrained", folders, "merged", search="coordinate",
                    evaluation={"dataset_name": "mnist5k", "num_samples": 1000})

The output folder holds the base pipeline with the merged denoiser (diffusers layout, safetensors;
channel projections beside it, see ``projection.py``) or, when every fine-tune is a LoRA and the
method is task arithmetic, one LoRA of rank N*r equal to that merge (``lora_merge.py``: a LoRA folder
naming the base, loadable with ``load_lora_weights`` / ``load_pipeline``), ``deme_merge.json`` (base, fine-tunes,
intervals, weights, method, scores), ``deme_search.{json,md}`` when searched, and ``README.md``.

Weights are in the order of the fine-tunes' intervals, low to high t, whatever the order the folders
were given in. The search's metric is the domain FID of the merged model's samples against a
held-out set, through ``diffusers_ant.analysis.evaluate`` (the real images' features are computed
once); any ``score_fn(weights) -> float | dict`` can replace it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .finetunes import (
    align_channel_projections,
    base_files,
    check_same_base,
    common_class_map,
    load_base_pipeline,
    load_finetune_denoiser,
    read_finetunes,
    recorded_base_revision,
    write_class_map,
)
from .merge import DEFAULT_DENSITY, merge_task_vectors
from ..files import folder_written_atomically
from ..hub import portable_path
from .projection import denoiser_component, has_channel_projection, read_projection_config, save_pipeline
from .search import (
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_SEARCH_VALUES,
    NO_FINETUNE_HELPED,
    ScoredPoints,
    returns_base,
    search_merge_weights,
    write_search_table,
)

__all__ = ["MERGE_RECORD_NAME", "MergeInputs", "load_merge_inputs", "merge_finetunes", "write_ensemble_folder"]

MERGE_RECORD_NAME = "deme_merge.json"
# the keys of `evaluation` passed on to analysis.evaluate (reference_for / evaluate_pipeline)
_EVALUATION_KEYS = ("dataset_name", "train_data_dir", "num_samples", "num_real", "scheduler", "num_inference_steps",
                    "batch_size", "feature_extractor", "inception_weights", "kid_subsets", "seed")


@dataclass
class MergeInputs:
    """The base pipeline and the fine-tunes, loaded and checked: ``models[i]`` is fine-tune i's dense
    denoiser (low to high t), ``base_state`` / ``states`` their state dicts on the CPU."""

    base: str
    pipeline: object
    component: str
    finetunes: list
    models: list
    base_state: dict
    states: list
    num_timesteps: int
    projection: bool

    @property
    def denoiser(self):
        return getattr(self.pipeline, self.component)


def load_merge_inputs(base: str, finetuned, merge: bool = True, files: str | None = None) -> MergeInputs:
    """Read and check the fine-tunes (folders, or ``FineTune`` records from ``read_finetunes``):
    intervals, base, architecture, keys; load them and the base. ``merge=False`` (an ensemble) leaves
    the models as they are: no identity projections added, no state dicts taken.

    Refused with a one-line ValueError: a missing record, overlapping intervals, another base,
    another architecture or prediction type, state dicts with other keys than the base's.
    """
    from .finetunes import FineTune

    finetuned = list(finetuned)
    finetunes = finetuned if finetuned and all(isinstance(f, FineTune) for f in finetuned) else read_finetunes(finetuned)
    check_same_base(finetunes, base)
    pipeline = load_base_pipeline(files or base_files(base, finetunes))  # (a Hub id's base: its snapshot)
    component = denoiser_component(pipeline)
    base_model = getattr(pipeline, component)
    num_timesteps = int(pipeline.scheduler.config.num_train_timesteps)
    for finetune in finetunes:
        if finetune.num_timesteps is not None and finetune.num_timesteps != num_timesteps:
            raise ValueError(f"fine-tune {finetune.path!r} has intervals over {finetune.num_timesteps} timesteps, the base's "
                             f"scheduler {num_timesteps}: merge fine-tunes of this base")
        if finetune.bounds[1] >= num_timesteps:
            raise ValueError(f"fine-tune {finetune.path!r} ends at timestep {finetune.bounds[1]}, beyond the base's {num_timesteps}")
    models = [load_finetune_denoiser(finetune, pipeline) for finetune in finetunes]
    if not merge:
        projection = any(has_channel_projection(m) for m in [base_model, *models])
        return MergeInputs(base, pipeline, component, finetunes, models, {}, [], num_timesteps, projection)
    projection = align_channel_projections([base_model, *models])
    base_state = {k: v.detach().to("cpu").clone() for k, v in base_model.state_dict().items()}
    states = []
    for finetune, model in zip(finetunes, models):
        state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        missing, extra = sorted(set(base_state) - set(state)), sorted(set(state) - set(base_state))
        if missing or extra:
            raise ValueError(f"fine-tune {finetune.path!r} does not have the base's weights: missing {missing[:3]}, "
                             f"unexpected {extra[:3]} (merge fine-tunes of the same model)")
        for key, value in state.items():
            if value.shape != base_state[key].shape:
                raise ValueError(f"fine-tune {finetune.path!r}: {key} has shape {tuple(value.shape)}, the base "
                                 f"{tuple(base_state[key].shape)} (merge fine-tunes of the same model)")
        states.append(state)
    return MergeInputs(base, pipeline, component, finetunes, models, base_state, states, num_timesteps, projection)


def _evaluation_options(evaluation):
    unknown = set(evaluation) - set(_EVALUATION_KEYS) - {"progress"}
    if unknown:
        raise ValueError(f"unknown evaluation options {sorted(unknown)}: use {', '.join(_EVALUATION_KEYS)}")
    if not evaluation.get("dataset_name") and not evaluation.get("train_data_dir"):
        raise ValueError("the search scores samples against real images: pass --dataset_name or --train_data_dir (a held-out set)")
    return dict(evaluation)


class _Scorer:
    """Domain FID (and KID, precision, recall) of a pipeline's samples against one fixed held-out set."""

    def __init__(self, pipeline, evaluation: dict):
        from ..analysis.evaluate import reference_for

        self.pipeline = pipeline
        self.options = _evaluation_options(evaluation)
        o = self.options
        num_samples = int(o.get("num_samples", DEFAULT_SEARCH_SAMPLES))
        self.reference = reference_for(
            pipeline, o.get("dataset_name"), o.get("num_real") or num_samples, o.get("feature_extractor", "domain"),
            o.get("inception_weights"), seed=int(o.get("seed", 0)), train_data_dir=o.get("train_data_dir"),
            batch_size=int(o.get("batch_size", 256)), **({"kid_subsets": o["kid_subsets"]} if o.get("kid_subsets") else {}),
        )

    def __call__(self) -> dict:
        from ..analysis.evaluate import evaluate_pipeline

        o = self.options
        results = evaluate_pipeline(
            self.pipeline, o.get("dataset_name"), num_samples=int(o.get("num_samples", DEFAULT_SEARCH_SAMPLES)), scheduler=o.get("scheduler", "ddim"),
            num_inference_steps=int(o.get("num_inference_steps", 50)), batch_size=int(o.get("batch_size", 256)),
            seed=int(o.get("seed", 0)), progress=bool(o.get("progress", False)), train_data_dir=o.get("train_data_dir"),
            reference=self.reference,
        )
        return results


def _check_weights(weights, finetunes, what="--weights"):
    weights = [float(w) for w in weights]
    if len(weights) != len(finetunes):
        raise ValueError(f"got {len(weights)} {what} for {len(finetunes)} fine-tunes: give one weight per fine-tune, "
                         "in the order of their intervals (low to high t)")
    return weights


def merge_finetunes(base: str, finetuned, output_dir: str, *, weights=None, search: str | None = None,
                    search_values=DEFAULT_SEARCH_VALUES, search_rounds: int = 3, max_evaluations: int | None = 256,
                    method: str = "task_arithmetic", density: float | None = None, majority_sign_method: str = "total",
                    merge_seed: int = 0, evaluation: dict | None = None, score_fn=None, device=None,
                    log=print, cache_dir=None) -> dict:
    """Merge the fine-tunes ``finetuned`` of ``base`` into one pipeline folder ``output_dir``; return its record.
    ``base`` is a folder or a Hub id (read from its snapshot at the fine-tunes' recorded revision, in
    ``cache_dir``; the merged folder names the Hub id).

    Args:
        weights: one per fine-tune, low to high t (given weights), or the coordinate search's start.
        search: ``grid`` or ``coordinate`` (``search.py``); needs ``evaluation`` or ``score_fn``.
        search_values, search_rounds, max_evaluations: the search's candidate values, rounds
            (coordinate) and size limit (grid).
        method, density, majority_sign_method, merge_seed: ``merge_task_vectors``' options.
        evaluation: options of ``diffusers_ant.analysis.evaluate`` (``dataset_name`` or
            ``train_data_dir`` of a held-out set, ``num_samples``, ``num_real``, ``scheduler``,
            ``num_inference_steps``, ``batch_size``, ``feature_extractor``, ``inception_weights``,
            ``kid_subsets``, ``seed``): the search's metric (its FID), and the scores of the result.
        score_fn: ``weights -> float | dict`` replacing the sampled metric (a dict carries ``fid``).
        device: where sampling runs (default: cuda when available).
    """
    from .card import write_deme_model_card

    if search is None and weights is None:
        raise ValueError("give --weights (one per fine-tune, low to high t) or --search grid|coordinate")
    if search == "grid" and weights is not None:
        raise ValueError("--search grid tries every combination of --search_values: --weights only starts --search coordinate")
    if search is not None and score_fn is None and evaluation is None:
        raise ValueError("the search scores samples against real images: pass --dataset_name or --train_data_dir (a held-out set)")
    if method == "task_arithmetic" and density is not None:
        raise ValueError("--density applies to --merge_method ties, dare_linear and dare_ties, not task_arithmetic")
    if density is not None and not 0.0 < float(density) <= 1.0:
        raise ValueError(f"--density must lie in (0, 1] (the fraction of each task vector kept), got {density}")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is not empty: give a new folder")
    evaluation = _evaluation_options(evaluation) if evaluation is not None else None

    finetunes = read_finetunes(list(finetuned))
    if weights is not None:  # before loading any model: a wrong count is refused at once
        weights = _check_weights(weights, finetunes)
    class_map = common_class_map(finetunes)  # DiT fine-tunes on a subset of the label table: the rows they trained
    check_same_base(finetunes, base)
    files = base_files(base, finetunes, cache_dir)  # where the base's weights are on disk
    lora_files = _lora_merge_files(base, finetunes, method, log, files)
    log(f"{len(finetunes)} fine-tunes of {base}, low to high t: "
        + ", ".join(f"{f.name} {list(f.bounds)}" for f in finetunes))
    merge_options = {"method": method, "density": density, "majority_sign_method": majority_sign_method, "seed": merge_seed}
    from ..analysis.common import resolve_device

    device = resolve_device(device)
    needs_pipeline = evaluation is not None and score_fn is None
    if lora_files is not None:
        # all LoRA, task arithmetic: merged as one LoRA of rank N*r, no dense weight formed
        from .lora_merge import LoraCandidates

        candidates = LoraCandidates(files, lora_files) if needs_pipeline else None
        pipeline = candidates.pipeline if candidates is not None else None
        denoiser_class = _base_denoiser_class(files)
        num_timesteps = _lora_num_timesteps(files, finetunes)
        projection = any(read_projection_config(f.path) is not None for f in finetunes)
        set_weights = candidates.set if candidates is not None else None
    else:
        inputs = load_merge_inputs(base, finetunes, files=files)
        pipeline, denoiser_class = inputs.pipeline, type(inputs.denoiser).__name__
        num_timesteps, projection = inputs.num_timesteps, inputs.projection

        def set_weights(w):
            inputs.denoiser.load_state_dict(merge_task_vectors(inputs.base_state, inputs.states, w, **merge_options))

    scorer = None
    if needs_pipeline:
        pipeline.to(device)
        write_class_map(class_map, None, pipeline)  # the search samples the data set's classes, not every row
        scorer = _Scorer(pipeline, evaluation)

    result, scores, scored = None, None, None
    if search is not None:
        if score_fn is None:
            def score_fn(w):
                set_weights(w)
                return scorer()

            # each point is kept beside the output folder as it is scored: a search stopped part way continues
            # there when the same merge runs again (the scorer is seeded, so a kept score is the one it would give)
            scored = ScoredPoints(os.path.normpath(output_dir) + ".search.json",
                                  {"base": base, "finetunes": [os.path.abspath(f.path) for f in finetunes],
                                   "merge": merge_options, "evaluation": evaluation})
            if scored.rows:
                log(f"reusing {len(scored.rows)} scored weights from {scored.path}")
            score_fn = scored.remembering(score_fn)

        result = search_merge_weights(
            score_fn, len(finetunes), strategy=search, values=search_values, initial=weights,
            max_rounds=search_rounds, max_evaluations=max_evaluations,
            progress=lambda row: log(f"  weights {row['weights']}: {row['score']:.4f}"),
        )
        weights = result.best_weights
        best = next(row for row in result.rows if row["weights"] == weights)
        scores = {k: v for k, v in best.items() if k not in ("weights", "score")} or None
        log(f"best weights {weights}: {result.metric} {result.best_score:.4f}")
        if returns_base(weights):
            log(NO_FINETUNE_HELPED)  # said aloud: never to be read as a merge that worked

    if set_weights is not None:
        set_weights(weights)
    if scores is None and scorer is not None:
        scores = scorer()
    # Everything is written into a sibling folder, renamed into place at the end (files.folder_written_atomically):
    # a kill mid-write never leaves a folder that loads as another model or that train_deme.py would take
    # for a finished merge.
    final_dir = output_dir
    with folder_written_atomically(final_dir) as output_dir:
        if lora_files is not None:
            from .lora_merge import recorded_vae, write_merged_lora

            vae = recorded_vae(lora_files)
            lora_info = write_merged_lora(lora_files, weights, output_dir, portable_path(base, final_dir),
                                          vae=portable_path(vae, final_dir) if vae is not None else None)
        else:
            pipeline.to("cpu")
            save_pipeline(pipeline, output_dir, inputs.component, base=base, revision=recorded_base_revision(finetunes))
        write_class_map(class_map, output_dir)
        if result is not None:
            write_search_table(result, output_dir)
        shown_options = {k: v for k, v in (("density", density if density is not None else DEFAULT_DENSITY.get(method)),
                                           ("majority_sign_method", majority_sign_method if method in ("ties", "dare_ties") else None),
                                           ("seed", merge_seed if method.startswith("dare") else None)) if v is not None}
        record = {  # paths relative to the output folder: nothing of this machine in a file that may be pushed
            "base_model": portable_path(base, final_dir),
            "num_timesteps": num_timesteps,
            "finetunes": [{"path": portable_path(f.path, final_dir), "interval": list(f.bounds), "lora": f.lora}
                          for f in finetunes],
            "weights": list(weights),
            "merge_method": method,
            "merge_options": shown_options,
            # "lora": one LoRA of rank N*r (B = [w_i s_i B_i], A = [A_i]); "dense": the merged weights
            "merged_as": "lora" if lora_files is not None else "dense",
            **({"lora_rank": lora_info["rank"]} if lora_files is not None else {}),
            "channel_projection": projection,
            "search": None if result is None else {"strategy": result.strategy, "metric": result.metric,
                                                   "evaluations": len(result.rows), "table": "deme_search.json",
                                                   "no_finetune_helped": returns_base(weights)},
            "scores": scores,
        }
        with open(os.path.join(output_dir, MERGE_RECORD_NAME), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=str)
        write_deme_model_card(output_dir, base_model=base, model_type=finetunes[0].model_type,
                              denoiser_class=denoiser_class, finetunes=finetunes, num_timesteps=num_timesteps,
                              weights=weights, merge_method=method, merge_options=shown_options, search=result,
                              scores=scores, projection=projection,
                              lora_rank=lora_info["rank"] if lora_files is not None else None,
                              name=os.path.basename(os.path.normpath(final_dir)))
    if scored is not None:
        scored.remove()  # the search's table is in the folder now
    log(f"wrote the merged {'LoRA' if lora_files is not None else 'pipeline'} to {final_dir}")
    return record


def _lora_merge_files(base: str, finetunes, method: str, log, files: str | None = None):
    """The fine-tunes' ``LoraFile``s when they merge as one LoRA (all LoRA folders, task arithmetic,
    plain linear A / B pairs), checked against ``base``; else None (the dense path: TIES / DARE are
    not linear in B A, and a full fine-tune has no B A)."""
    if not finetunes or not all(f.lora for f in finetunes):
        return None
    from .lora_merge import check_lora_fits_base, lora_merge_blocker, read_lora_file

    check_same_base(finetunes, base)
    base = files or base  # the base's files on disk (a Hub id's snapshot)
    if not os.path.isdir(base):
        raise ValueError(f"--base {base!r}: no such folder (give the pretrained pipeline folder the fine-tunes started from)")
    try:
        files = [read_lora_file(f.path) for f in finetunes]
    except ValueError as err:  # DoRA, LoRA biases, trained layers beside the LoRA: folded in densely
        log(f"merging densely: {err}")
        return None
    check_lora_fits_base(files, base)  # a LoRA of another model type: one line, before anything is loaded
    if method != "task_arithmetic":
        log(f"{method} prunes and elects signs entry by entry of the dense task vectors: the LoRAs are folded into "
            "dense weights and the result is a full pipeline")
        return None
    blocker = lora_merge_blocker(files)
    if blocker is not None:
        log(f"merging densely: {blocker}")
        return None
    return files


def _base_denoiser_class(base: str) -> str:
    """The class name of the base pipeline's denoiser, from its ``model_index.json`` (no weight read)."""
    index = {}
    if os.path.isfile(os.path.join(base, "model_index.json")):
        with open(os.path.join(base, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    for name in ("controlnet", "transformer", "unet"):
        if isinstance(index.get(name), list):
            return index[name][1]
    return "denoiser"


def _lora_num_timesteps(base: str, finetunes) -> int | None:
    """T of the base's scheduler (its config file), checked against the fine-tunes' intervals."""
    path = os.path.join(base, "scheduler", "scheduler_config.json")
    num_timesteps = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            num_timesteps = json.load(f).get("num_train_timesteps")
    for finetune in finetunes:
        if num_timesteps is not None and finetune.num_timesteps not in (None, num_timesteps):
            raise ValueError(f"fine-tune {finetune.path!r} has intervals over {finetune.num_timesteps} timesteps, the base's "
                             f"scheduler {num_timesteps}: merge fine-tunes of this base")
        if num_timesteps is not None and finetune.bounds[1] >= num_timesteps:
            raise ValueError(f"fine-tune {finetune.path!r} ends at timestep {finetune.bounds[1]}, beyond the base's {num_timesteps}")
    return num_timesteps if num_timesteps is not None else finetunes[0].num_timesteps


def write_ensemble_folder(base: str, finetuned, output_dir: str, *, evaluation: dict | None = None, device=None,
                          log=print, cache_dir=None) -> dict:
    """Write the ensemble folder (``ensemble.py``) of the fine-tunes of ``base``; with ``evaluation``
    score it (loaded back through ``load_pipeline``, as ``evaluate_model.py`` does). Returns its record."""
    from ..models import load_pipeline
    from .card import write_deme_model_card
    from .ensemble import write_ensemble

    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is not empty: give a new folder")
    evaluation = _evaluation_options(evaluation) if evaluation is not None else None
    finetunes = read_finetunes(list(finetuned))
    class_map = common_class_map(finetunes)
    check_same_base(finetunes, base)
    files = base_files(base, finetunes, cache_dir)  # where the base's weights are on disk (a Hub id's snapshot)
    lora_files = _lora_merge_files(base, finetunes, "task_arithmetic", log, files)
    if lora_files is not None:
        # LoRA fine-tunes: one base denoiser, the interval LoRAs switched by timestep (lora_ensemble.py)
        from .ensemble import write_lora_ensemble

        pipeline = load_base_pipeline(files)
        num_timesteps = _lora_num_timesteps(files, finetunes) or int(pipeline.scheduler.config.num_train_timesteps)
        inputs = MergeInputs(base, pipeline, denoiser_component(pipeline), finetunes, [], {}, [], num_timesteps,
                             any(read_projection_config(f.path) is not None for f in finetunes))
    else:
        inputs = load_merge_inputs(base, finetunes, merge=False, files=files)
    final_dir = output_dir
    with folder_written_atomically(final_dir) as output_dir:  # (as a merge: a kill leaves <folder>.partial)
        if lora_files is not None:
            info = write_lora_ensemble(inputs.pipeline, finetunes, output_dir, inputs.num_timesteps)
        else:
            info = write_ensemble(inputs.pipeline, inputs.finetunes, inputs.models, output_dir, inputs.num_timesteps)
        write_class_map(class_map, output_dir)  # load_pipeline below (and users) then sample the data set's classes
        scores = None
        if evaluation is not None:
            pipeline = load_pipeline(output_dir)
            from ..analysis.common import resolve_device

            pipeline.to(resolve_device(device))
            scores = _Scorer(pipeline, evaluation)()
        record = {"base_model": portable_path(base, final_dir), "num_timesteps": inputs.num_timesteps,
                  "ensemble": info["members"],
                  "finetunes": [{"path": portable_path(f.path, final_dir), "interval": list(f.bounds), "lora": f.lora}
                                for f in inputs.finetunes],
                  "scores": scores}
        with open(os.path.join(output_dir, MERGE_RECORD_NAME), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=str)
        write_deme_model_card(output_dir, base_model=base, model_type=inputs.finetunes[0].model_type,
                              denoiser_class=type(inputs.denoiser).__name__, finetunes=inputs.finetunes,
                              num_timesteps=inputs.num_timesteps, scores=scores, ensemble=True, projection=inputs.projection,
                              lora_ensemble=lora_files is not None, name=os.path.basename(os.path.normpath(final_dir)))
    log(f"wrote the ensemble pipeline to {final_dir}")
    return record
