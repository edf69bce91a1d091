"""The machinery the benchmark scripts share (``benchmark_quality.py``, ``benchmark_ntg.py``,
``benchmark_transfer.py``, ``benchmark_deme.py``): what is not a benchmark's own rows or its reading.

- the bench UNet (``BENCH_UNET``, a 0.28M-parameter attention UNet for 16x16 greyscale images) and
  the planning figures of this project's 2-core CPU that turn a benchmark's settings into the time
  plan it prints before it starts;
- the quality benchmark's recipe that other benchmarks reuse: ``DATASET`` (MNIST-5k), ``RESOLUTION``
  (16), ``METHODS`` (its rows as ``train_ant.py`` flags) and their ``SECONDS_PER_STEP``;
  ``base_resolution`` (the side a benchmark from a ``--pretrained`` model trains and scores at: that
  model's own) and ``resolution_cost_factor`` (the planning figures at another side);
- ``run_logged``: one real subprocess (a ``train_ant.py`` run, a knowledge-bank build, an analysis),
  one torch thread, offline, its output in a log file, skipped when its output exists, its wall time
  recorded beside the log (``time_path``); ``run_parallel`` runs such jobs ``workers`` at a time;
- evaluation workers: ``evaluation_pool`` (spawned processes of one torch thread each, see
  ``worker_init``), ``evaluate_in_pool`` (a list of evaluations in it, with progress lines),
  ``cached_reference`` (a process builds each real-image reference once),
  ``evaluate_saved_model`` (sample a saved pipeline, score it, write the metrics JSON) and
  ``stored_metrics`` (a stored evaluation is reused only with the same settings and feature weights);
- real-image folders: ``split_rows`` / ``write_image_folder`` write disjoint seeded subsets of a
  built-in dataset as image folders (a fine-tuning set and a held-out reference, say) that
  ``train_ant.py --train_data_dir`` and ``analysis.evaluate.real_images(train_data_dir=...)`` read
  through the same transforms;
- statistics and formatting: ``relative_differences`` (per-seed percent change with its Student-t
  interval, ``analysis.stats``), ``verdict`` (what an interval says), ``plateau_step`` (where an
  FID curve stops changing: the converged base, DeMe's interval fine-tunes), ``format_mean_sd`` /
  ``format_difference`` (table cells), ``command_line`` and ``write_json``.

Why one thread per process and several processes: on a small CPU two processes with two torch
threads each fight over the cores and each becomes several times slower (measured here: about 10x);
one thread each, ``workers`` at a time, keeps every core busy.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

from ..files import write_json_atomically

__all__ = [
    "ANT_LOG_SNR",
    "BENCH_UNET",
    "DATASET",
    "METHODS",
    "RESOLUTION",
    "SECONDS_PER_IMAGE_STEP",
    "SECONDS_PER_RUN",
    "SECONDS_PER_STEP",
    "SECONDS_PER_STEP_BENCH_UNET",
    "base_resolution",
    "cached_reference",
    "changed_benchmark_settings",
    "check_benchmark_settings",
    "command_line",
    "cooldown_schedule",
    "evaluate_in_pool",
    "evaluate_saved_model",
    "evaluation_pool",
    "format_difference",
    "format_mean_sd",
    "invocation_recorded",
    "offline_env",
    "PLATEAU_MIN_POINTS",
    "plateau_judgeable",
    "plateau_step",
    "recorded_seconds",
    "relative_differences",
    "resolution_cost_factor",
    "schedule_flags",
    "run_logged",
    "RunFailed",
    "run_parallel",
    "split_rows",
    "stored_metrics",
    "time_path",
    "verdict",
    "worker_init",
    "write_image_folder",
    "write_json",
]

# A 0.28M-parameter UNet for 16x16 greyscale images (ENVIRONMENT.md: about 0.1 s per step at batch 64
# on 2 cores): channels 16/32/32, attention at the lowest resolution.
BENCH_UNET = {
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# Planning figures for the 2-core CPU with one torch thread per process, two processes at a time and
# nothing else running (ENVIRONMENT.md): seconds per training step of the bench UNet at batch 64 (a
# 1,000-step run in 2.3 min), seconds per run outside its steps (start-up, validation grid, saving),
# and seconds per DDIM step and image of the bench UNet (5,000 DDIM-50 samples in 170 s). A busy
# machine is slower.
SECONDS_PER_STEP_BENCH_UNET = 0.14
SECONDS_PER_RUN = 25.0
SECONDS_PER_IMAGE_STEP = 170.0 / (5000 * 50)

# The quality benchmark's recipe (benchmark_quality.py trains these rows from scratch; benchmark_deme.py
# continues some of them from a pretrained model): the dataset, its resolution, and the rows as
# train_ant.py flags (ANT's Tables 1-3 line-up plus its Table 7 control), with what the table says
# about each: which SNR its clusters are on and how its timesteps are drawn.
DATASET = "mnist5k"
RESOLUTION = 16
ANT_LOG_SNR = ["--clustering", "snr", "--num_clusters", "5", "--timestep_sampling", "stratified"]

METHODS = {
    "vanilla": {"flags": ["--mtl_method", "none"], "label": "vanilla", "clusters_on": "-", "sampling": "uniform"},
    "min_snr": {"flags": ["--mtl_method", "none", "--loss_weighting", "min_snr", "--snr_gamma", "5"],
                "label": "Min-SNR (gamma 5)", "clusters_on": "-", "sampling": "uniform"},
    "p2": {"flags": ["--mtl_method", "none", "--loss_weighting", "p2", "--p2_k", "1", "--p2_gamma", "1"],
           "label": "P2 (k 1, gamma 1)", "clusters_on": "-", "sampling": "uniform"},
    "ant_ls": {"flags": ["--mtl_method", "ls", *ANT_LOG_SNR], "label": "ANT + LS (control)",
               "clusters_on": "log-SNR", "sampling": "stratified"},
    "ant_uw": {"flags": ["--mtl_method", "uw", *ANT_LOG_SNR], "label": "ANT + UW",
               "clusters_on": "log-SNR", "sampling": "stratified"},
    "ant_pcgrad": {"flags": ["--mtl_method", "pcgrad", *ANT_LOG_SNR], "label": "ANT + PCGrad",
                   "clusters_on": "log-SNR", "sampling": "stratified"},
    "ant_nash": {"flags": ["--mtl_method", "nash_mtl", *ANT_LOG_SNR], "label": "ANT + Nash-MTL",
                 "clusters_on": "log-SNR", "sampling": "stratified"},
    "ant_uw_raw_snr": {"flags": ["--mtl_method", "uw", *ANT_LOG_SNR, "--raw_snr"], "label": "ANT + UW, raw SNR",
                       "clusters_on": "raw SNR", "sampling": "stratified"},
    # ANT's combined configuration (Sections 5.3 / 5.4, Appendix D.2 / D.3): UW and PCGrad together, P2
    # inside the cluster losses; and UW on top of the strongest loss weighting here (does ANT add anything
    # to Min-SNR?).
    "ant_uw_pcgrad_p2": {"flags": ["--mtl_method", "uw+pcgrad", *ANT_LOG_SNR, "--loss_weighting", "p2",
                                   "--p2_k", "1", "--p2_gamma", "1"],
                         "label": "ANT + UW + PCGrad, P2 (the paper's combined)", "clusters_on": "log-SNR",
                         "sampling": "stratified"},
    "ant_uw_min_snr": {"flags": ["--mtl_method", "uw", *ANT_LOG_SNR, "--loss_weighting", "min_snr", "--snr_gamma", "5"],
                       "label": "ANT + UW, Min-SNR (gamma 5)", "clusters_on": "log-SNR", "sampling": "stratified"},
}

# Per row: seconds per training step of the bench UNet at batch 64 with one thread (through
# train_ant.py: uw 1.02x, nash_mtl 0.97x, pcgrad 1.47x of vanilla); the benchmarks' `plan()` turns
# them into the estimate printed before a run; a busy machine is slower.
SECONDS_PER_STEP = {"vanilla": 0.14, "min_snr": 0.14, "p2": 0.14, "ant_ls": 0.14, "ant_uw": 0.14,
                    "ant_pcgrad": 0.21, "ant_nash": 0.14, "ant_uw_raw_snr": 0.14, "ant_uw_pcgrad_p2": 0.21,
                    "ant_uw_min_snr": 0.14}


def base_resolution(pretrained) -> int:
    """The image side every run and score of a benchmark uses when it starts from the model
    ``pretrained`` (a saved pipeline folder): that model's own UNet ``sample_size`` (a base from
    ``pretrain_base.py --resolution 8`` is 8x8), else (no folder, or no UNet config in it) the quality
    benchmark's ``RESOLUTION``. ``benchmark_deme.py`` and ``benchmark_transfer.py`` read it."""
    config = os.path.join(pretrained or "", "unet", "config.json")
    if pretrained is None or not os.path.isfile(config):
        return RESOLUTION
    with open(config, encoding="utf-8") as f:
        return int(json.load(f).get("sample_size") or RESOLUTION)


def resolution_cost_factor(resolution: int) -> float:
    """The planning figures above (measured at ``RESOLUTION``, 16x16) scaled to another image side: per
    pixel, but not below half (the bench UNet's step at 8x8 measured 0.07 s alone, half the 16x16 step,
    not a quarter: README, the converged-base section). An estimate outside 8 and 16."""
    return max(0.5, (resolution / RESOLUTION) ** 2)


# ------------------------------------------------------------------------------------ subprocess runs


def offline_env(**extra) -> dict:
    """The environment of a benchmark subprocess: one torch thread, no Hub, no tokenizer threads."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def time_path(log_path: str) -> str:
    """Where ``run_logged`` records the wall time of the run logged at ``log_path`` (``train.log`` ->
    ``train_time.json``)."""
    return os.path.splitext(log_path)[0] + "_time.json"


def recorded_seconds(log_path: str):
    """The wall time ``run_logged`` recorded for ``log_path`` (None if it never finished)."""
    path = time_path(log_path)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return float(json.load(f)["seconds"])


class RunFailed(RuntimeError):
    """A benchmark's subprocess run failed (``run_logged``): its log says why."""


def run_logged(cmd, log_path: str, done, what: str, threads: int = 1) -> str:
    """Run ``cmd`` unless the outputs ``done`` (a path or a list of paths) all exist: then "kept".

    Otherwise it runs with ``offline_env()`` and ``threads`` torch threads (one unless a run has the
    machine to itself, e.g. DeMe's pretraining), its output (after the command line) in ``log_path``;
    the wall time is written to ``time_path(log_path)`` and returned as "123s". A failure raises
    ``RunFailed`` (a RuntimeError) naming the log. ``done`` may be empty (always run) or the time file itself, which is
    written only after a successful exit (for commands whose outputs have no single marker file)."""
    done = [done] if isinstance(done, str) else list(done)
    if done and all(os.path.exists(path) for path in done):
        return "kept"
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(str(part) for part in cmd) + "\n")
        log.flush()
        result = subprocess.run([str(part) for part in cmd], stdout=log, stderr=subprocess.STDOUT,
                                env=offline_env(OMP_NUM_THREADS=threads))
    if result.returncode != 0:
        raise RunFailed(f"{what} failed (exit code {result.returncode}): see {log_path}")
    seconds = time.time() - start
    write_json(time_path(log_path), {"seconds": seconds})
    return f"{seconds:.0f}s"


def run_parallel(fn, items, workers: int) -> list:
    """``[fn(item) for item in items]``, ``workers`` at a time (threads: each item typically waits on a
    subprocess or a worker process). The first exception is raised after the others have finished."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        return list(pool.map(fn, items))


# ------------------------------------------------------------------------------------ evaluation workers

_REFERENCES = {}


def worker_init() -> None:
    """One torch thread per evaluation process, no progress bars, quiet diffusers."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(1)
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()


def evaluation_pool(workers: int):
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes initialised by ``worker_init`` (spawn:
    no fork of a process that holds torch's threads). Use it as a context manager."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max(1, int(workers)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=worker_init)


def evaluate_in_pool(evaluate, tasks, workers: int, what: str = "models") -> list:
    """``[evaluate(task) for label, task in tasks]``, computed in ``evaluation_pool(workers)``, in the
    order of ``tasks``; one progress line per finished evaluation (``[i/n] label: fid ...``).
    ``evaluate`` is a module-level function (it is sent to the spawned workers), e.g.
    ``evaluate_saved_model``."""
    if not tasks:
        return []
    print(f"evaluating {len(tasks)} {what} with {workers} worker(s)", flush=True)
    results = []
    with evaluation_pool(workers) as pool:
        futures = [(label, pool.submit(evaluate, task)) for label, task in tasks]
        for i, (label, future) in enumerate(futures, 1):
            metrics = future.result()
            print(f"[{i}/{len(futures)}] {label}: fid {metrics['fid']:.3f} ({metrics['sampling_seconds']:.0f}s sampling)",
                  flush=True)
            results.append(metrics)
    return results


def cached_reference(key, build):
    """``build()`` once per process and ``key`` (a real-image ``ReferenceSet`` is the slow part of a
    small evaluation: each worker computes the real features once and scores every sample set
    against them)."""
    if key not in _REFERENCES:
        _REFERENCES[key] = build()
    return _REFERENCES[key]


def reference_from_settings(settings: dict):
    """The ``ReferenceSet`` an evaluation's ``settings`` name (cached per process): ``num_real`` real
    images of ``reference_dir`` (an image folder) or of the built-in ``reference_dataset``, at
    ``resolution`` with ``num_channels``, in the domain features of ``features`` (a built-in dataset
    name, e.g. ``animal_mnist``)."""
    from .evaluate import ReferenceSet, real_images, resolve_feature_extractor

    folder, dataset = settings.get("reference_dir"), settings.get("reference_dataset")
    key = (folder and os.path.abspath(folder), dataset, settings["num_real"], settings["resolution"],
           settings.get("num_channels", 1), settings["features"], settings["eval_batch_size"])

    def build():
        real = real_images(dataset, settings["num_real"], resolution=settings["resolution"],
                           num_channels=settings.get("num_channels", 1), seed=0, train_data_dir=folder)
        if len(real) != settings["num_real"]:
            raise ValueError(f"the reference {folder or dataset!r} holds {len(real)} images, expected {settings['num_real']}")
        return ReferenceSet(real, resolve_feature_extractor(settings["features"]), batch_size=settings["eval_batch_size"])

    return cached_reference(key, build)


def evaluate_saved_model(task: dict) -> dict:
    """Sample the saved model ``task["model"]`` (any folder ``load_pipeline`` reads: a pipeline, a LoRA
    folder) and score it; write the metrics JSON at ``task["path"]`` and return it.

    task: ``model``, ``seed`` (the sampling noise), ``path``, ``settings``: ``num_samples``,
    ``num_inference_steps``, ``eval_batch_size`` and the reference's keys (see
    ``reference_from_settings``); the settings are stored with the result, so that
    ``stored_metrics`` can tell whether it is still valid."""
    from ..models import load_pipeline
    from .evaluate import sample_images

    settings = task["settings"]
    reference = reference_from_settings(settings)
    start = time.time()
    pipeline = load_pipeline(task["model"])
    images = sample_images(pipeline, settings["num_samples"], scheduler="ddim",
                           num_inference_steps=settings["num_inference_steps"], batch_size=settings["eval_batch_size"],
                           seed=task["seed"], progress=False)
    sampled = time.time()
    metrics = reference.score(images)
    metrics.update(settings=settings, seed=task["seed"], model=task["model"], sampling_seconds=round(sampled - start, 1),
                   scoring_seconds=round(time.time() - sampled, 1))
    write_json(task["path"], metrics)
    return metrics


def stored_metrics(path: str, settings: dict, extractor_sha: str):
    """The metrics stored at ``path`` if they were computed with these settings and feature weights,
    else None (evaluate again)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except json.JSONDecodeError:  # (a file an older version half-wrote when it was killed)
        return None
    if not isinstance(metrics, dict) or metrics.get("settings") != settings or metrics.get("feature_extractor_sha256") != extractor_sha:
        return None
    return metrics


# ------------------------------------------------------------------------------------ real-image folders


def split_rows(num_rows: int, sizes, seed: int = 0) -> list:
    """Disjoint subsets of ``range(num_rows)`` of the given ``sizes``: consecutive slices of one seeded
    permutation, each sorted. A size of None takes every remaining row."""
    import torch

    sizes = list(sizes)
    fixed = sum(s for s in sizes if s is not None)
    if any(s is not None and s < 1 for s in sizes) or fixed > num_rows or sizes.count(None) > 1:
        raise ValueError(f"cannot split {num_rows} rows into disjoint subsets of sizes {sizes}")
    order = torch.randperm(int(num_rows), generator=torch.Generator().manual_seed(int(seed))).tolist()
    subsets, start = [], 0
    for size in sizes:
        size = num_rows - fixed if size is None else size
        subsets.append(sorted(order[start:start + size]))
        start += size
    return subsets


def _row_images(folder: str) -> list:
    """The ``row-NNNNN.png`` files of an image folder written by ``write_image_folder``."""
    return [name for name in os.listdir(folder) if name.startswith("row-") and name.endswith(".png")]


def write_image_folder(dataset_name: str, rows, folder: str, record_path: str = None) -> str:
    """Write rows ``rows`` of the built-in dataset ``dataset_name`` as ``folder/row-NNNNN.png`` (the
    stored images, unresized, lossless) and a record of them at ``record_path``: by default
    ``folder.json`` beside the folder (not inside: an image folder holds images and its metadata only;
    a JSON file inside is ignored by the image-folder loader, which DeMe's references rely on). Kept as
    it is when the record lists these rows and the folder holds exactly their images."""
    from ..data import load_training_dataset, resolve_columns

    rows = [int(r) for r in rows]
    record_path = record_path or os.path.normpath(folder) + ".json"
    record = {"dataset_name": dataset_name, "rows": rows}
    if os.path.isfile(record_path) and os.path.isdir(folder):
        with open(record_path, encoding="utf-8") as f:
            if json.load(f) == record and sorted(_row_images(folder)) == sorted({f"row-{r:05d}.png" for r in rows}):
                return folder
    os.makedirs(folder, exist_ok=True)
    for name in _row_images(folder):  # another subset was here: start the folder again
        os.remove(os.path.join(folder, name))
    dataset = load_training_dataset(dataset_name=dataset_name)
    column = resolve_columns(dataset)["image_column"]
    for row in rows:
        dataset[row][column].save(os.path.join(folder, f"row-{row:05d}.png"))
    write_json(record_path, record)
    return folder


# ------------------------------------------------------------------------------------ statistics, formatting


def relative_differences(treatment: dict, control: dict, confidence: float = 0.95) -> dict:
    """Per-seed relative change ``100 (treatment - control) / control`` (percent) over the seeds both
    have, with its Student-t interval over seeds (``analysis.stats.t_interval``); adds ``seeds`` and
    ``differences`` (the per-seed changes, in seed order)."""
    from .stats import t_interval

    a = {str(k): float(v) for k, v in treatment.items() if v is not None}
    b = {str(k): float(v) for k, v in control.items() if v is not None}
    seeds = sorted(set(a) & set(b), key=lambda s: (len(s), s))
    if any(b[s] == 0 for s in seeds):
        raise ValueError("relative_differences: a control value is 0, the relative change is undefined")
    changes = [100.0 * (a[s] - b[s]) / b[s] for s in seeds]
    result = t_interval(changes, confidence)
    result.update(seeds=[int(s) if s.lstrip("-").isdigit() else s for s in seeds], differences=changes)
    return result


def verdict(interval: dict, lower: str = "lower", higher: str = "higher") -> str:
    """What a difference's interval says: ``lower`` / ``higher`` when it excludes 0, else that no
    difference is resolved (or that there is no interval: one seed, or no spread)."""
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


def format_mean_sd(cell: dict, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± sd`` of a ``t_interval`` dict (sd 0 when there is one value)."""
    if cell.get("mean") is None:
        return "-"
    sd = cell["sd"] if cell.get("sd") is not None else 0.0
    return f"{cell['mean'] * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def format_difference(cell: dict, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """``+mean [low, high]`` of a difference's ``t_interval`` dict, or ``+mean (no interval)``; "-" for
    no difference (None, or no data)."""
    if cell is None or cell.get("mean") is None:
        return "-"
    if cell.get("low") is None:
        return f"{cell['mean'] * scale:+.{digits}f}{unit} (no interval)"
    return (f"{cell['mean'] * scale:+.{digits}f}{unit} [{cell['low'] * scale:+.{digits}f}, "
            f"{cell['high'] * scale:+.{digits}f}]")


def command_line(argv=None, script: str = None) -> str:
    """The command that ran: ``python <script> <args>`` (``argv`` given: the script's name and those;
    ``script`` given, e.g. a script's ``__file__``: that name, also when ``main(argv)`` is called from
    another program)."""
    script = script or (sys.argv[0] if sys.argv and sys.argv[0] else None)
    script = os.path.relpath(os.path.abspath(script)) if script else "?"
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return " ".join(["python", script, *args])


def write_json(path: str, data, default=None) -> str:
    """Write ``data`` as indented JSON, atomically (``files.write_json_atomically``): an interrupted
    benchmark never leaves half a results file that a resumed one would trust. `default`: as
    `json.dump`'s (e.g. `str` for values JSON has no type for)."""
    return write_json_atomically(path, data, default=default)


def folder_weights_sha256(folder):
    """sha256 over the safetensors files under ``folder`` outside its hidden folders (their relative paths and
    bytes), None for no folder: a benchmark's ``--pretrained`` is compared by it too, since a folder replaced
    under the same path (another base trained into it) would have had its kept runs reused."""
    import hashlib

    if folder is None or not os.path.isdir(folder):
        return None
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        # (hidden folders hold no weights of the model: a crashed run's training cache or set-aside encoders)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, folder).encode() + b"\0")
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


def code_revision():
    """The git commit of this project's checkout, with ``+dirty`` when tracked files differ from it (None outside
    a git checkout, e.g. an installed package): recorded with each benchmark invocation, since a kept run's
    results depend on the code that ran it, which its settings do not say."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def record_invocation(args, command, seconds, status="finished") -> float:
    """Append this invocation to OUTPUT_DIR/invocations.json; return the wall seconds of all of them
    (a resumed benchmark's wall time is the sum of its invocations)."""
    path = os.path.join(args.output_dir, "invocations.json")
    history = []
    if os.path.isfile(path):
        with open(path) as f:
            history = json.load(f)
    history.append({"command": command, "phase": args.phase, "status": status, "wall_seconds": round(seconds, 1),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "revision": code_revision()})
    write_json(path, history)  # atomically: it also runs when a benchmark is interrupted
    return sum(entry["wall_seconds"] for entry in history)


class _Invocation:
    def __init__(self, args, command: str, started: float):
        self.args, self.command, self.started, self.recorded = args, command, started, False

    def finished(self, seconds: float) -> float:
        """Record the finished invocation (once); the wall seconds of all invocations."""
        self.recorded = True
        return record_invocation(self.args, self.command, seconds)

    def stopped(self, status: str) -> None:
        if not self.recorded:
            self.recorded = True
            record_invocation(self.args, self.command, time.time() - self.started, status=status)


@contextlib.contextmanager
def invocation_recorded(args, command: str, started: float, script: str):
    """Around a benchmark's body, which records its finished invocation by the yielded handle's
    ``finished(seconds)`` (the total goes into its results): an invocation that stops on a failed run,
    on an error exit or on Ctrl-C is appended to invocations.json too (status "stopped" /
    "interrupted"), once, so a resumed benchmark's wall time counts it; a failed run ends in one line
    that says how to resume."""
    invocation = _Invocation(args, command, started)
    try:
        yield invocation
    except RunFailed as err:
        invocation.stopped("stopped")
        raise SystemExit(f"{script}: error: {err}; fix it and run the same command again to resume")
    except SystemExit:
        invocation.stopped("stopped")
        raise
    except KeyboardInterrupt:
        invocation.stopped("interrupted")
        raise


# Points a curve needs before the plateau rule may declare a plateau (pretrain_base.py's default, and
# the quality benchmark's and DeMe probe's): with three in the last fifth, about ten evenly spaced.
PLATEAU_MIN_POINTS = 5


def cooldown_schedule(lr_scheduler: str, lr_warmup_steps: int, decay_from=None, decay_steps=None,
                      min_lr_ratio=0.0) -> dict:
    """A benchmark run's learning-rate schedule as train_ant.py's flags (without dashes): ``lr_scheduler``
    after warm-up, or, from step ``decay_from``, warmup_stable_decay's cool-down over ``decay_steps`` to
    ``min_lr_ratio`` of the rate (the converged base's recipe)."""
    if decay_from is None:
        return {"lr_scheduler": lr_scheduler, "lr_warmup_steps": lr_warmup_steps}
    return {"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": lr_warmup_steps,
            "lr_stable_steps": decay_from - lr_warmup_steps, "lr_decay_steps": decay_steps, "lr_min_ratio": min_lr_ratio}


def schedule_flags(schedule: dict) -> list:
    """``cooldown_schedule``'s dict as command-line flags."""
    return [item for key, value in schedule.items() for item in (f"--{key}", str(value))]


def plateau_step(curve: dict, tolerance: float, min_points: int):
    """The first step T of `curve` ({step: fid}) at which the FID changed by less than `tolerance` (a
    fraction) over the last fifth of training; None if there is none yet. Needs `min_points` points up
    to T and at least three in the fifth.

    The change is read off the least-squares line through the points of the fifth, from its start (the
    last point at or before 0.8 T) to T: |line(T) - line(start)| / line(start). A line, not the largest
    single deviation, because a FID of 1,000 samples scatters by a few percent from point to point even
    when the model no longer changes; a FID still falling, or rising again, moves the line all the same.
    """
    steps = sorted(curve)
    for n, step in enumerate(steps, 1):
        if n < min_points:
            continue
        before = [s for s in steps[:n] if s <= 0.8 * step]
        if not before:
            continue
        window = [s for s in steps[:n] if s >= before[-1]]
        if len(window) < 3:
            continue
        mean_x = sum(window) / len(window)
        mean_y = sum(curve[s] for s in window) / len(window)
        slope = (sum((s - mean_x) * (curve[s] - mean_y) for s in window)
                 / sum((s - mean_x) ** 2 for s in window))
        start = mean_y + slope * (window[0] - mean_x)
        if abs(slope * (step - window[0])) < tolerance * start:
            return step
    return None


def plateau_judgeable(steps, min_points: int) -> bool:
    """Whether ``plateau_step`` can find a plateau on a curve scored at ``steps`` at all: it needs
    ``min_points`` points and three in the last fifth, so a curve of four quarters can never pass and
    its "no plateau" says nothing about the model. Decided by the rule itself on a flat curve."""
    return plateau_step({int(step): 1.0 for step in steps}, 0.5, min_points) is not None


def _stored_benchmark_settings(output_dir: str):
    """``output_dir``'s ``benchmark_settings.json`` as a dict, None without one."""
    path = os.path.join(output_dir, "benchmark_settings.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def changed_benchmark_settings(output_dir: str, settings: dict) -> list:
    """`(key, stored value, given value)` for each of ``settings`` that ``output_dir``'s
    ``benchmark_settings.json`` records with another value (none without the file). A key the stored
    file lacks (written before the setting existed) is not compared."""
    stored = _stored_benchmark_settings(output_dir) or {}
    return [(k, stored[k], v) for k, v in settings.items() if k in stored and stored[k] != v]


def check_benchmark_settings(output_dir: str, settings: dict, script: str) -> None:
    """Benchmarks reuse kept runs by folder: refuse ``output_dir`` when its ``benchmark_settings.json``
    records other values of ``settings`` (its runs would be scored, and described, as this command's),
    in one line naming each changed setting; then record ``settings`` there.

    A folder whose file predates some of ``settings`` keeps its file as it was: its kept runs were trained
    before those settings existed, so writing this command's values would claim for them what no one
    checked. The settings it lacks are named in a warning instead (and stay unchecked by later commands)."""
    stored = _stored_benchmark_settings(output_dir)
    changed = changed_benchmark_settings(output_dir, settings)
    if changed:
        raise SystemExit(f"{script}: error: {output_dir} holds runs trained with other settings "
                         f"({', '.join(f'{k}: {old!r} -> {new!r}' for k, old, new in changed)}): rerun with "
                         "its settings to resume it, or give another --output_dir")
    if stored is not None:
        unrecorded = [k for k in settings if k not in stored]
        if unrecorded:
            print(f"{script}: warning: {output_dir}'s settings file predates {', '.join(unrecorded)}: its kept runs "
                  "are reused without checking them, and the file is left as it was", file=sys.stderr)
        return
    write_json(os.path.join(output_dir, "benchmark_settings.json"), settings)  # (write_json makes the folder)
