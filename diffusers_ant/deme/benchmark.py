"""The machinery of DeMe's benchmark (``train_scripts/benchmark_deme.py``, issue 12 item 5) that is not
the benchmark's rows: disjoint real-image references for the merge search and the final evaluation,
resumable logged subprocess runs, evaluation workers, and the paired relative differences behind
the target check.

- ``split_reference_rows`` / ``write_reference_folder``: the DeMe paper chooses its merge weights by
  a search on a validation metric (PAPERS.md section 2, item 5). Searching and reporting on the same
  real images would let the search fit the reported number, so the dataset's rows are split, by a
  seeded permutation, into a *search* reference and a disjoint *evaluation* reference, each written
  as an image folder (the original images, lossless PNG, named by dataset row) that
  ``merge_deme.py --train_data_dir`` and ``analysis.evaluate.real_images(train_data_dir=...)`` read
  through the same transforms as the dataset itself.
- ``run_logged``: one real subprocess (one torch thread, offline), its output in a log file, skipped
  when its output already exists, its wall time recorded beside it.
- ``evaluate_model_task``: one evaluation worker task (sample a saved pipeline, score it against an
  evaluation reference folder); ``worker_init`` gives each worker process one torch thread.
- ``relative_differences`` / ``verdict``: per-seed relative change ``100 (a - b) / b`` with its
  Student-t interval over seeds (``analysis.stats``), and what an interval says.

Shared with no other benchmark on purpose (``benchmark_quality.py`` keeps its own copies); the
helpers are generic and could move into a common benchmark module.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

__all__ = [
    "REFERENCE_RECORD",
    "evaluate_model_task",
    "recorded_seconds",
    "relative_differences",
    "run_logged",
    "split_reference_rows",
    "stored_metrics",
    "time_path",
    "verdict",
    "worker_init",
    "write_reference_folder",
]

REFERENCE_RECORD = "reference_rows.json"  # in each reference folder: the dataset and its rows


# ------------------------------------------------------------------------------------ real references


def split_reference_rows(num_rows: int, num_search: int, seed: int = 0) -> tuple:
    """(search rows, evaluation rows): the first ``num_search`` rows of a seeded permutation of
    ``range(num_rows)`` and the rest; disjoint, together every row, each sorted."""
    import torch

    if not 0 < num_search < num_rows:
        raise ValueError(f"the search reference takes {num_search} of {num_rows} images: give 0 < --search_real < {num_rows}, "
                         "so that both references have images")
    order = torch.randperm(int(num_rows), generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[:num_search]), sorted(order[num_search:])


def write_reference_folder(dataset_name: str, rows, folder: str) -> str:
    """Write dataset rows ``rows`` as ``folder/row-NNNNN.png`` (the stored images, unresized, lossless)
    and ``folder/reference_rows.json``; kept as they are when the record already lists these rows."""
    from ..data import load_training_dataset, resolve_columns

    rows = [int(r) for r in rows]
    record_path = os.path.join(folder, REFERENCE_RECORD)
    record = {"dataset_name": dataset_name, "rows": rows}
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as f:
            if json.load(f) == record:
                return folder
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # another split was here: start the folder again
        if name.startswith("row-") and name.endswith(".png"):
            os.remove(os.path.join(folder, name))
    dataset = load_training_dataset(dataset_name=dataset_name)
    column = resolve_columns(dataset)["image_column"]
    for row in rows:
        dataset[row][column].save(os.path.join(folder, f"row-{row:05d}.png"))
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return folder


# ------------------------------------------------------------------------------------ subprocess runs


def run_logged(cmd, log_path: str, done, what: str, threads: int = 1) -> str:
    """Run ``cmd`` unless its outputs ``done`` (a path, or a list of paths) all exist ("kept"); else run
    it with ``threads`` torch threads (default one), offline, its output appended to ``log_path``, and return its wall time
    ("123s", also written as ``<log name>_time.json`` beside the log). A failure raises RuntimeError
    naming the log."""
    done = [done] if isinstance(done, str) else list(done)
    if done and all(os.path.exists(path) for path in done):
        return "kept"
    # One thread per process, several processes at once: on a small CPU two processes with two
    # threads each fight over the cores and each becomes several times slower.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {result.returncode}): see {log_path}")
    seconds = time.time() - start
    with open(time_path(log_path), "w", encoding="utf-8") as f:
        json.dump({"seconds": seconds}, f)
    return f"{seconds:.0f}s"


def time_path(log_path: str) -> str:
    """Where ``run_logged`` records the wall time of the run logged at ``log_path``."""
    return os.path.splitext(log_path)[0] + "_time.json"


def recorded_seconds(log_path: str):
    """The wall time ``run_logged`` recorded for ``log_path`` (None if it never finished)."""
    path = time_path(log_path)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return float(json.load(f)["seconds"])


# ------------------------------------------------------------------------------------ evaluation workers

_REFERENCES = {}


def worker_init() -> None:
    """One torch thread per evaluation process, no progress bars."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(1)
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()


def _reference(folder: str, num_real: int, resolution: int, batch_size: int, dataset_name: str):
    """The ReferenceSet of a reference folder (every image in it), built once per process."""
    key = (os.path.abspath(folder), num_real, resolution, batch_size)
    if key not in _REFERENCES:
        from ..analysis.evaluate import ReferenceSet, real_images, resolve_feature_extractor

        real = real_images(train_data_dir=folder, num_images=num_real, resolution=resolution, num_channels=1, seed=0)
        if len(real) != num_real:
            raise ValueError(f"reference folder {folder!r} holds {len(real)} images, expected {num_real}")
        _REFERENCES[key] = ReferenceSet(real, resolve_feature_extractor("domain", dataset_name), batch_size=batch_size)
    return _REFERENCES[key]


def evaluate_model_task(task: dict) -> dict:
    """Sample the saved pipeline ``task["model"]`` (through ``load_pipeline``: channel projections and
    an ensemble's router included) and score it against the reference folder; write the metrics JSON
    at ``task["path"]`` and return it.

    task: ``model``, ``seed`` (the sampling noise), ``path``, ``dataset_name`` (whose domain features),
    ``resolution``, ``settings`` (``num_samples``, ``num_inference_steps``, ``eval_batch_size``,
    ``reference`` (the folder), ``num_real``; stored with the result)."""
    from ..analysis.evaluate import sample_images
    from ..models import load_pipeline

    settings = task["settings"]
    reference = _reference(settings["reference"], settings["num_real"], task["resolution"], settings["eval_batch_size"],
                           task["dataset_name"])
    start = time.time()
    pipeline = load_pipeline(task["model"])
    images = sample_images(pipeline, settings["num_samples"], scheduler="ddim",
                           num_inference_steps=settings["num_inference_steps"], batch_size=settings["eval_batch_size"],
                           seed=task["seed"], progress=False)
    sampled = time.time()
    metrics = reference.score(images)
    metrics.update(settings=settings, seed=task["seed"], model=task["model"], sampling_seconds=round(sampled - start, 1),
                   scoring_seconds=round(time.time() - sampled, 1))
    os.makedirs(os.path.dirname(os.path.abspath(task["path"])), exist_ok=True)
    with open(task["path"], "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def stored_metrics(path: str, settings: dict, extractor_sha: str):
    """The metrics stored at ``path`` if they were computed with these settings and feature weights."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    if metrics.get("settings") != settings or metrics.get("feature_extractor_sha256") != extractor_sha:
        return None
    return metrics


# ------------------------------------------------------------------------------------ statistics


def relative_differences(treatment: dict, control: dict, confidence: float = 0.95) -> dict:
    """Per-seed relative change ``100 (treatment - control) / control`` (percent) over the seeds both
    have, with its Student-t interval over seeds (``analysis.stats.t_interval``)."""
    from ..analysis.stats import t_interval

    a = {str(k): float(v) for k, v in treatment.items()}
    b = {str(k): float(v) for k, v in control.items()}
    seeds = sorted(set(a) & set(b), key=lambda s: (len(s), s))
    changes = [100.0 * (a[s] - b[s]) / b[s] for s in seeds]
    result = t_interval(changes, confidence)
    result.update(seeds=[int(s) if s.lstrip("-").isdigit() else s for s in seeds], differences=changes)
    return result


def verdict(interval: dict, lower: str = "lower", higher: str = "higher") -> str:
    """What a difference's interval says: ``lower`` / ``higher`` when it excludes 0, else that no
    difference is resolved (or that there is no interval, from one seed or no spread)."""
    if interval.get("mean") is None:
        return "no data"
    if interval.get("low") is None:
        direction = lower if interval["mean"] < 0 else higher if interval["mean"] > 0 else "equal"
        return f"{direction} on average, no interval (n = {interval['n']})"
    if interval["high"] < 0:
        return f"{lower} (interval excludes 0)"
    if interval["low"] > 0:
        return f"{higher} (interval excludes 0)"
    return "no difference resolved (interval contains 0)"
