#!/usr/bin/env python
"""DeMe's benchmark on MNIST-5k at 16x16 (issue 12, item 5): decouple-then-merge against continued
fine-tuning of the same pretrained model at equal total steps.

From ONE pretrained model (`--pretrained FOLDER`, e.g. a vanilla model of the quality benchmark,
`bench-quality/vanilla/seed-0`; by default one is pretrained here with the quality benchmark's
recipe), for every seed:

- continued fine-tuning for N x S steps: vanilla, Min-SNR, ANT + UW, ANT + Nash-MTL (the quality
  benchmark's rows, `diffusers_ant.analysis.benchmark.METHODS`, started from the pretrained model);
- DeMe (PAPERS.md section 2): N = 4 copies, copy i fine-tuned S steps on the i-th of N equal
  timestep intervals (`train_deme.py`, i.e. `train_ant.py --deme_interval i`) with probabilistic
  sampling (p 0.3), the consistency loss (weight 1) and channel projection; then
  the ensemble (`merge_deme.py --ensemble`), the merge with equal weights 1/N, and the merge with
  weights searched by coordinate descent on domain FID (`merge_deme.py --search coordinate`);
- the pretrained model itself (0 steps);

and, on `--ablation_seeds` (default: the first seed), the paper's ablation ladder (its Table 3):
N = 1 (one model on all timesteps: exactly continued vanilla fine-tuning, so that row is reused),
N = 4 + probabilistic sampling, + consistency loss, + channel projection (= DeMe), each merged with
searched weights.

Every model is scored with the domain features (`diffusers_ant.metrics`, an MNIST classifier, not
Inception): FID, KID, precision, recall of `--num_samples` DDIM samples. The seeds are shared by all
rows (data order, timestep draws and sampling noise), so each row is compared with continued
vanilla fine-tuning by its per-seed difference, with a Student-t interval over seeds
(`diffusers_ant.analysis.stats`). The target (the paper: DeMe -21% FID on CIFAR-10) is checked and
reported either way.

Held-out search: MNIST-5k's 5,000 images are split by a seeded permutation into a SEARCH reference
(`--search_real` images, 1,000 by default) and a disjoint EVALUATION reference (the other 4,000),
written as image folders under `OUTPUT_DIR/references/`. The merge search scores against the search
reference only, and with other sampling noise (seed + 10000); every reported number is against the
evaluation reference. All models are trained on all 5,000 images (the pretrained one included): the
two references are held out from each other, not from training, as usual for a generative FID.

    python train_scripts/benchmark_deme.py --output_dir bench-deme                      # about 1.5 h, 2 cores
    python train_scripts/benchmark_deme.py --output_dir bench-deme --pretrained bench-quality/vanilla/seed-0
    python train_scripts/benchmark_deme.py --output_dir bench-deme-smoke --quick        # a smoke run, minutes

Every run is a real process (`train_ant.py`, `train_deme.py`, `merge_deme.py`; one torch thread
each, `--workers` at a time), its output logged beside its result; evaluations run in `--workers`
processes of one thread. Finished runs, merges and evaluations are kept and skipped when the command
is run again (an evaluation is redone when its settings or the feature weights changed; other
training settings in the same folder are refused). Outputs: `results.json` (every number, the
summaries, searched weights, settings, hashes, times), `results.md` (the tables, the command, the
wall time, the target check).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

# The quality benchmark's recipe (its model, dataset, rows and planning figures) and the machinery
# every benchmark shares.
from diffusers_ant.analysis.benchmark import (
    BENCH_UNET,
    DATASET,
    METHODS,
    PLATEAU_MIN_POINTS,
    RESOLUTION,
    SECONDS_PER_IMAGE_STEP,
    SECONDS_PER_RUN,
    SECONDS_PER_STEP,
    base_resolution,
    check_benchmark_settings,
    command_line,
    evaluate_in_pool,
    evaluate_saved_model,
    folder_weights_sha256,
    format_difference as _difference,
    format_mean_sd,
    invocation_recorded,
    plateau_judgeable,
    plateau_step,
    recorded_seconds,
    relative_differences,
    resolution_cost_factor,
    run_logged,
    run_parallel,
    stored_metrics,
    verdict,
    write_json,
)
from diffusers_ant.cli import OneLineErrorParser
from diffusers_ant.deme.search import DEFAULT_SEARCH_SAMPLES, DEFAULT_SEARCH_VALUES, returns_base
from diffusers_ant.files import folder_written_atomically
from diffusers_ant.training.args import DEME_AUTHORS_DEFAULTS

HERE = os.path.dirname(os.path.abspath(__file__))

NUM_DATASET_IMAGES = 5000  # MNIST-5k
CONTINUED = ("vanilla", "min_snr", "ant_uw", "ant_nash")
SEARCH_SEED_OFFSET = 10000  # the search samples other noise than the evaluation (seed + this)
GLOBAL_PROB = 0.3  # DeMe's probabilistic sampling (the authors' scripts)
CONSISTENCY_WEIGHT = 1.0  # DeMe's consistency loss (the paper)

# DeMe's trainings: the full method and the rungs of the ablation ladder below it. All use N equal
# intervals and probabilistic sampling; `deme_flags` turns an entry into train_ant.py flags.
DEME_CONFIGS = {
    "deme": {"consistency": True, "projection": True,
             "label": "probabilistic sampling, consistency loss, channel projection"},
    "deme_prob": {"consistency": False, "projection": False, "label": "probabilistic sampling only"},
    "deme_consistency": {"consistency": True, "projection": False, "label": "probabilistic sampling, consistency loss"},
}
ABLATION_CONFIGS = ("deme_prob", "deme_consistency")

# Continued vanilla fine-tuning for S steps, the steps of ONE DeMe copy: the comparison at equal steps
# per model (the continued_* rows get N x S, DeMe's total).
PER_MODEL_ROW = "per_model_vanilla"

# The rows of the main table, in order (labels: `row_label`).
MAIN_ROWS = ("pretrained", *(f"continued_{m}" for m in CONTINUED), PER_MODEL_ROW, "deme_ensemble", "deme_equal",
             "deme_merged")
CONTROL = "continued_vanilla"
METRICS = ("fid", "kid_mean", "precision", "recall")

# Planning figures (see diffusers_ant.analysis.benchmark for the shared ones): a consistency step
# adds the frozen model's forward pass, about a third of a forward + backward step; channel
# projection adds a few 1x1 mixings. Estimates, not measurements; a busy machine is slower.
TEACHER_FACTOR = 1.35
PROJECTION_FACTOR = 1.05
PRETRAIN_SECONDS_PER_STEP = 0.10  # alone, with two threads (ENVIRONMENT.md: 0.095)
MERGE_PROCESS_SECONDS = 20.0  # start-up, loading the base and the N fine-tunes, saving
SCORE_SECONDS = 2.0  # features and metrics of one sample set of the search
EVAL_OVERHEAD_SECONDS = 8.0  # loading a model and scoring its samples


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="bench-deme")
    p.add_argument("--pretrained", default=None,
                   help="the pretrained pipeline folder (e.g. bench-quality/vanilla/seed-0); default: pretrain one "
                        "here into OUTPUT_DIR/pretrained with the quality benchmark's recipe")
    p.add_argument("--pretrain_steps", type=int, default=2000, help="steps of the model pretrained here (default 2000)")
    p.add_argument("--pretrain_seed", type=int, default=1000, help="seed of the model pretrained here (default 1000)")
    p.add_argument("--num_intervals", type=int, default=4, help="N, DeMe's equal timestep intervals (default 4)")
    p.add_argument("--interval_steps", type=int, default=250,
                   help="S, fine-tuning steps per interval; continued fine-tuning gets N x S (default 250)")
    p.add_argument("--continued", default=",".join(CONTINUED),
                   help=f"comma-separated continued fine-tuning rows, vanilla included (default {','.join(CONTINUED)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="fine-tuning and sampling seeds, shared by all rows (default 0 1 2)")
    p.add_argument("--ablation_seeds", type=int, nargs="*", default=None,
                   help="seeds of the ablation ladder (default: the first seed; none: no ladder)")
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=DEME_AUTHORS_DEFAULTS["learning_rate"],
                   help=f"of every fine-tune (default {DEME_AUTHORS_DEFAULTS['learning_rate']:g}, the DeMe authors')")
    p.add_argument("--lr_scheduler", default="constant_with_warmup")
    p.add_argument("--lr_warmup_steps", type=int, default=20, help="of every fine-tune (default 20)")
    p.add_argument("--search_values", type=float, nargs="+", default=list(DEFAULT_SEARCH_VALUES),
                   help="candidate values of each merge weight (default the authors' 0 0.1 0.2 0.5 1)")
    p.add_argument("--search_rounds", type=int, default=1, help="rounds of the coordinate search (default 1)")
    p.add_argument("--search_samples", type=int, default=DEFAULT_SEARCH_SAMPLES,
                   help=f"generated images per search point (default {DEFAULT_SEARCH_SAMPLES})")
    p.add_argument("--search_real", type=int, default=1000,
                   help="real images of the search reference; the evaluation reference is the other "
                        f"{NUM_DATASET_IMAGES} - this (default 1000)")
    p.add_argument("--num_samples", type=int, default=2000, help="generated images per evaluated model (default 2000)")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps, search and evaluation (default 50)")
    p.add_argument("--eval_batch_size", type=int, default=250)
    p.add_argument("--confidence", type=float, default=0.95, help="of the t intervals over seeds (default 0.95)")
    p.add_argument("--phase", default="all", choices=["train", "merge", "eval", "all"],
                   help="train (pretraining and fine-tuning), merge (searches, merges, ensembles), eval, or all")
    p.add_argument("--probe_points", type=int, default=10,
                   help="the plateau probe: the first seed's DeMe interval fine-tunes retrained in this many equal "
                        "segments up to --interval_steps, each point scored with the fine-tune swapped in on its interval "
                        "(the pretrained model elsewhere; --search_samples samples against the search reference); 0: no "
                        "probe (default 10)")
    p.add_argument("--plateau_tolerance", type=float, default=0.02,
                   help="a probe curve has plateaued when it changed by less than this fraction over its last fifth "
                        "(pretrain_base.py's rule; default 0.02)")
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="processes in parallel, one torch thread each")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 seeds, batches of 16, N = 2 intervals of 2 steps, a 10-step pretrained model, "
                        "32 DDIM-2 samples, a 3-value search on 16 samples, continued vanilla and ANT + UW only "
                        "(a few minutes: most of it is starting the ~25 processes)")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        # A smoke test of the machinery (every process, folder, record and table), not of the numbers: few
        # steps and samples, enough that every stage runs (warm-up, EMA, the consistency loss, the search).
        p.set_defaults(seeds=[0, 1], pretrain_steps=10, num_intervals=2, interval_steps=2, lr_warmup_steps=1,
                       train_batch_size=16, num_samples=32, num_inference_steps=2, eval_batch_size=32,
                       search_samples=16, search_values=[0.0, 0.5, 1.0], probe_points=2,
                       continued="vanilla,ant_uw")  # every continued row runs the same machinery
        args = p.parse_args(argv)
    if args.ablation_seeds is None:
        args.ablation_seeds = args.seeds[:1]
    args.continued = args.continued.split(",")
    unknown = [m for m in args.continued if m not in CONTINUED]
    if unknown:
        p.error(f"unknown --continued row(s) {', '.join(unknown)}; choose from {', '.join(CONTINUED)}")
    if "vanilla" not in args.continued:
        p.error("--continued must include vanilla: it is the control of every comparison")
    if len(set(args.seeds)) < 2:
        p.error("give at least 2 --seeds (3 or more for useful intervals): the intervals are over seeds")
    if not set(args.ablation_seeds) <= set(args.seeds):
        p.error("--ablation_seeds must be among --seeds (the ladder's N = 1 rung is that seed's continued vanilla run)")
    for name in ("pretrain_steps", "num_intervals", "interval_steps", "train_batch_size", "search_rounds",
                 "search_samples", "num_samples", "num_inference_steps", "eval_batch_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if not 0 <= args.probe_points <= args.interval_steps:
        p.error("--probe_points must lie in 0..--interval_steps (0: no plateau probe)")
    if not 0 < args.plateau_tolerance < 1:
        p.error("--plateau_tolerance must lie in (0, 1), e.g. 0.02 for 2%")
    if args.probe_points and args.lr_scheduler not in ("constant", "constant_with_warmup"):
        p.error("--probe_points trains each interval in segments of one run, which needs a rate that does not depend on "
                "the run's length: give --lr_scheduler constant or constant_with_warmup, or --probe_points 0")
    if args.num_intervals < 2:
        p.error("--num_intervals must be at least 2 (N = 1 is continued fine-tuning, already a row)")
    if not 0 < args.search_real < NUM_DATASET_IMAGES:
        p.error(f"--search_real must be in 1..{NUM_DATASET_IMAGES - 1}: the evaluation reference is the rest")
    if len(set(args.search_values)) != len(args.search_values):
        p.error("--search_values must be distinct")
    if not 0 < args.confidence < 1:
        p.error("--confidence must be in (0, 1)")
    if args.pretrained is not None and not os.path.isfile(os.path.join(args.pretrained, "model_index.json")):
        p.error(f"--pretrained {args.pretrained}: no pipeline folder there (model_index.json); give a saved model, "
                "e.g. bench-quality/vanilla/seed-0, or leave it out to pretrain one here")
    args.resolution = base_resolution(args.pretrained)
    return args


# ------------------------------------------------------------------------------------------- layout


def pretrained_dir(args) -> str:
    return args.pretrained or os.path.join(args.output_dir, "pretrained")


def reference_dir(args, which) -> str:
    return os.path.join(args.output_dir, "references", which)


def continued_dir(args, method, seed) -> str:
    return os.path.join(args.output_dir, "continued", method, f"seed-{seed}")


def deme_dir(args, config, seed) -> str:
    return os.path.join(args.output_dir, "deme", config, f"seed-{seed}")


def interval_dirs(args, config, seed) -> list:
    return [os.path.join(deme_dir(args, config, seed), f"interval-{i}") for i in range(args.num_intervals)]


def merge_dir(args, config, seed, kind) -> str:
    """kind: merged_searched, merged_equal or ensemble."""
    return os.path.join(deme_dir(args, config, seed), kind)


def per_model_dir(args, seed) -> str:
    """Continued vanilla fine-tuning for the steps of one DeMe copy (``PER_MODEL_ROW``)."""
    return continued_dir(args, "vanilla-per-model", seed)


def probe_dir(args, index) -> str:
    return os.path.join(args.output_dir, "probe", f"interval-{index}")


def probe_points(args) -> list:
    """The steps the plateau probe scores: ``--probe_points`` equal segments of ``--interval_steps``."""
    n, s = args.probe_points, args.interval_steps
    return sorted({round(k * s / n) for k in range(1, n + 1)}) if n else []


def probe_metrics_path(args, index, step) -> str:
    """Step 0 is the pretrained model itself, shared by every interval's curve."""
    if step == 0:
        return os.path.join(args.output_dir, "metrics", "probe", "pretrained.json")
    return os.path.join(args.output_dir, "metrics", "probe", f"interval-{index}", f"step-{step}.json")


def metrics_path(args, row, seed) -> str:
    return os.path.join(args.output_dir, "metrics", row, f"seed-{seed}.json")


def deme_trainings(args) -> list:
    """(config, seed) of every DeMe training: the full method on every seed, the ladder on its seeds."""
    return [("deme", s) for s in args.seeds] + [(c, s) for c in ABLATION_CONFIGS for s in args.ablation_seeds]


def evaluated_rows(args) -> list:
    """(row, seed, model folder) of every evaluation."""
    rows = []
    for seed in args.seeds:
        rows.append(("pretrained", seed, pretrained_dir(args)))
        rows += [(f"continued_{m}", seed, continued_dir(args, m, seed)) for m in args.continued]
        rows.append((PER_MODEL_ROW, seed, per_model_dir(args, seed)))
        rows += [("deme_ensemble", seed, merge_dir(args, "deme", seed, "ensemble")),
                 ("deme_equal", seed, merge_dir(args, "deme", seed, "merged_equal")),
                 ("deme_merged", seed, merge_dir(args, "deme", seed, "merged_searched"))]
    for config in ABLATION_CONFIGS:
        rows += [(f"ablation_{config}", s, merge_dir(args, config, s, "merged_searched")) for s in args.ablation_seeds]
    return rows


def ladder(args) -> list:
    """The ablation ladder's rungs, bottom up: (label, row)."""
    n = args.num_intervals
    return [("N = 1 (one model, all timesteps: continued vanilla fine-tuning)", CONTROL),
            (f"N = {n}, + probabilistic sampling (p {GLOBAL_PROB})", "ablation_deme_prob"),
            (f"+ consistency loss (weight {CONSISTENCY_WEIGHT:g})", "ablation_deme_consistency"),
            ("+ channel projection (= DeMe)", "deme_merged")]


def row_label(args, row) -> str:
    n = args.num_intervals
    if row == "pretrained":
        return "pretrained (no fine-tuning)"
    if row.startswith("continued_"):
        return f"continued fine-tuning, {METHODS[row[len('continued_'):]]['label']}"
    if row == PER_MODEL_ROW:
        return f"continued fine-tuning, vanilla, the steps of one DeMe copy"
    return {"deme_ensemble": f"DeMe ensemble (N = {n} models, routed by timestep)",
            "deme_equal": f"DeMe merged, equal weights 1/{n}",
            "deme_merged": "DeMe merged, searched weights"}.get(row, row)


def row_steps(args, row) -> str:
    n, s = args.num_intervals, args.interval_steps
    if row == "pretrained":
        return "0"
    if row.startswith("continued_"):
        return str(n * s)
    if row == PER_MODEL_ROW:
        return str(s)
    return f"{n} x {s}"


# ------------------------------------------------------------------------------------------- commands


def _finetune_flags(args, seed, steps, checkpointing_steps=None) -> list:
    """The recipe every fine-tune shares (the quality benchmark's, at the fine-tuning learning rate), with
    the DeMe authors' AdamW (beta1 0.95, weight decay 1e-6) given explicitly to every arm: a DeMe
    interval run would take them by default and a continued run would not, and the comparison would
    then mix the method with the optimiser."""
    return ["--model_type", "unet", "--dataset_name", DATASET, "--resolution", str(args.resolution),
            "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(steps),
            "--learning_rate", str(args.learning_rate), "--adam_beta1", str(DEME_AUTHORS_DEFAULTS["adam_beta1"]),
            "--adam_weight_decay", str(DEME_AUTHORS_DEFAULTS["adam_weight_decay"]), "--lr_scheduler", args.lr_scheduler,
            "--lr_warmup_steps", str(args.lr_warmup_steps), "--use_ema", "--ema_max_decay", "0.999",
            "--seed", str(seed), "--checkpointing_steps", str(checkpointing_steps or steps + 1), "--num_validation_images", "4",
            "--num_inference_steps", str(args.num_inference_steps), "--report_to", "none"]


def pretrain_command(args, config_path) -> list:
    steps = args.pretrain_steps
    return [sys.executable, os.path.join(HERE, "train_ant.py"), "--model_type", "unet",
            "--model_config_name_or_path", config_path, "--dataset_name", DATASET, "--resolution", str(args.resolution),
            "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(steps),
            "--learning_rate", "2e-3", "--lr_scheduler", "constant_with_warmup",
            "--lr_warmup_steps", str(min(100, max(1, steps // 10))), "--use_ema", "--ema_max_decay", "0.999",
            "--seed", str(args.pretrain_seed), "--output_dir", pretrained_dir(args), "--checkpointing_steps",
            str(steps + 1), "--num_validation_images", "16", "--num_inference_steps", str(args.num_inference_steps),
            "--report_to", "none", "--mtl_method", "none"]


def continued_command(args, method, seed) -> list:
    return [sys.executable, os.path.join(HERE, "train_ant.py"), "--pretrained_model_name_or_path", pretrained_dir(args),
            *_finetune_flags(args, seed, args.num_intervals * args.interval_steps),
            "--output_dir", continued_dir(args, method, seed), *METHODS[method]["flags"]]


def per_model_command(args, seed) -> list:
    """Continued vanilla fine-tuning for S steps: as many as one DeMe copy gets."""
    return [sys.executable, os.path.join(HERE, "train_ant.py"), "--pretrained_model_name_or_path", pretrained_dir(args),
            *_finetune_flags(args, seed, args.interval_steps), "--output_dir", per_model_dir(args, seed),
            *METHODS["vanilla"]["flags"]]


def probe_command(args, index, step) -> list:
    """Interval ``index``'s DeMe fine-tune of the first seed (the flags ``train_deme.py`` gives it) up to
    ``step``, continuing its last checkpoint: one segment of the plateau probe. The learning-rate
    schedule does not depend on --max_train_steps (constant after warm-up), so the segments together
    are one run of S steps; train_ant.py refuses to resume a checkpoint under a schedule that differs."""
    segment = probe_points(args)[0]
    return [sys.executable, os.path.join(HERE, "train_ant.py"), "--pretrained_model_name_or_path", pretrained_dir(args),
            *_finetune_flags(args, args.seeds[0], step, checkpointing_steps=segment), "--clustering", "timestep",
            *deme_flags("deme"), "--deme_interval", str(index), "--num_clusters", str(args.num_intervals),
            "--output_dir", os.path.join(probe_dir(args, index), "run"), "--checkpoints_total_limit", "2",
            "--resume_from_checkpoint", "latest"]


def deme_command(args, config, seed) -> list:
    """train_deme.py: the N interval fine-tunes (no merge: the merges are separate runs)."""
    return [sys.executable, os.path.join(HERE, "train_deme.py"), "--pretrained_model_name_or_path", pretrained_dir(args),
            "--num_intervals", str(args.num_intervals), "--output_dir", deme_dir(args, config, seed), "--no_merge", "--",
            *_finetune_flags(args, seed, args.interval_steps), "--clustering", "timestep", *deme_flags(config)]


def deme_flags(config) -> list:
    """train_ant.py's DeMe flags of a configuration (the interval itself is set by train_deme.py)."""
    entry = DEME_CONFIGS[config]
    flags = ["--consistency_weight", str(CONSISTENCY_WEIGHT if entry["consistency"] else 0.0),
             "--deme_global_prob", str(GLOBAL_PROB), "--deme_sampling", "per_batch"]
    # projection is the trainer's default for a DeMe run (the authors always use it): off for the lower rungs
    return flags + ([] if entry["projection"] else ["--no_channel_projection"])


def merge_command(args, config, seed, kind) -> list:
    cmd = [sys.executable, os.path.join(HERE, "merge_deme.py"), "--base", pretrained_dir(args),
           "--finetuned", *interval_dirs(args, config, seed), "--output_dir", merge_dir(args, config, seed, kind),
           "--num_threads", "1", "--device", "cpu"]
    if kind == "ensemble":
        return cmd + ["--ensemble"]
    if kind == "merged_equal":
        return cmd + ["--weights", *[str(1.0 / args.num_intervals)] * args.num_intervals]
    return cmd + ["--search", "coordinate", "--search_values", *[f"{v:g}" for v in args.search_values],
                  "--search_rounds", str(args.search_rounds), "--train_data_dir", reference_dir(args, "search"),
                  "--feature_extractor", DATASET,  # a folder has no domain of its own: MNIST-5k's classifier
                  "--num_samples", str(args.search_samples), "--num_real", str(args.search_real),
                  "--num_inference_steps", str(args.num_inference_steps), "--batch_size", str(args.eval_batch_size),
                  "--seed", str(seed + SEARCH_SEED_OFFSET)]


def merge_jobs(args) -> list:
    """(config, seed, kind) of every merge: searched for each DeMe training, equal and ensemble for DeMe's."""
    jobs = [(config, seed, "merged_searched") for config, seed in deme_trainings(args)]
    return jobs + [("deme", s, kind) for s in args.seeds for kind in ("merged_equal", "ensemble")]


# ------------------------------------------------------------------------------------------- plan


def search_evaluations(num_models, values, rounds) -> int:
    """At most this many distinct points of a coordinate search from 1/N (``deme.search``)."""
    start_in_values = any(math.isclose(1.0 / num_models, v) for v in values)
    first = 1 + num_models * (len(values) - (1 if start_in_values else 0))
    return first + (rounds - 1) * num_models * (len(values) - 1)


def plan(args) -> dict:
    """Estimated seconds of each phase with `args.workers` processes (see the planning figures)."""
    n, s = args.num_intervals, args.interval_steps
    scale = resolution_cost_factor(args.resolution)  # the figures are 16x16's
    image_step = SECONDS_PER_IMAGE_STEP * args.num_inference_steps * scale
    pretrain = 0.0 if args.pretrained else (PRETRAIN_SECONDS_PER_STEP * args.pretrain_steps + SECONDS_PER_RUN)
    train = sum(SECONDS_PER_STEP.get(m, 0.15) * scale * n * s + SECONDS_PER_RUN for m in args.continued) * len(args.seeds)
    train += (SECONDS_PER_STEP["vanilla"] * scale * s + SECONDS_PER_RUN) * len(args.seeds)  # equal steps per model
    processes = (len(args.continued) + 1) * len(args.seeds) + (0 if args.pretrained else 1)
    deme_step = SECONDS_PER_STEP["vanilla"] * scale * TEACHER_FACTOR * PROJECTION_FACTOR
    for config, _ in deme_trainings(args):
        factor = TEACHER_FACTOR if DEME_CONFIGS[config]["consistency"] else 1.0
        factor *= PROJECTION_FACTOR if DEME_CONFIGS[config]["projection"] else 1.0
        train += n * (SECONDS_PER_STEP["vanilla"] * scale * factor * s + SECONDS_PER_RUN)
        processes += n
    segments = len(probe_points(args))  # the probe: N intervals of S steps in segments, each a process
    train += n * (deme_step * s + segments * SECONDS_PER_RUN)
    processes += n * segments
    probe_points_scored = n * segments + (1 if segments else 0)
    points = search_evaluations(n, args.search_values, args.search_rounds)
    jobs = merge_jobs(args)
    searches = sum(kind == "merged_searched" for _, _, kind in jobs)
    merge = len(jobs) * MERGE_PROCESS_SECONDS + searches * points * (args.search_samples * image_step + SCORE_SECONDS)
    evaluations = len(evaluated_rows(args))
    evaluate = evaluations * (args.num_samples * image_step + EVAL_OVERHEAD_SECONDS) + 30 * args.workers
    evaluate += probe_points_scored * (args.search_samples * image_step + EVAL_OVERHEAD_SECONDS)
    w = args.workers
    result = {"pretrain_seconds": pretrain, "train_seconds": train / w, "merge_seconds": merge / w,
              "eval_seconds": evaluate / w, "training_processes": processes, "searches": searches,
              "search_points_per_search": points, "merges": len(jobs), "evaluations": evaluations,
              "probe_points": probe_points_scored,
              "generated_images": evaluations * args.num_samples + searches * points * args.search_samples
              + probe_points_scored * args.search_samples}
    result["total_seconds"] = pretrain + (train + merge + evaluate) / w
    return result


def plan_text(estimate, args) -> str:
    m = lambda seconds: f"{seconds / 60:.0f} min"  # noqa: E731
    pretrain = ("pretrained model given" if args.pretrained else
                f"pretraining {args.pretrain_steps} steps {m(estimate['pretrain_seconds'])}")
    return (f"plan on an idle 2-core CPU, {args.workers} worker(s): {pretrain}; {estimate['training_processes']} training "
            f"processes (continued: {args.num_intervals * args.interval_steps} steps; DeMe: {args.num_intervals} x "
            f"{args.interval_steps}) {m(estimate['train_seconds'])}; {estimate['merges']} merges with {estimate['searches']} "
            f"searches of at most {estimate['search_points_per_search']} points x {args.search_samples} samples "
            f"{m(estimate['merge_seconds'])}; {estimate['evaluations']} evaluations x {args.num_samples} DDIM-"
            f"{args.num_inference_steps} samples {m(estimate['eval_seconds'])}; total about "
            f"{m(estimate['total_seconds'])} (a busy machine is slower)")


# ------------------------------------------------------------------------------------------- settings


def training_settings(args) -> dict:
    """What kept runs, merges and references depend on: another value in the same folder is refused."""
    keys = ("num_intervals", "interval_steps", "train_batch_size", "learning_rate", "lr_scheduler", "lr_warmup_steps",
            "search_values", "search_rounds", "search_samples", "search_real", "num_inference_steps", "eval_batch_size",
            "probe_points")
    settings = {k: getattr(args, k) for k in keys}
    settings["probe_seed"] = args.seeds[0] if args.probe_points else None  # the probe's folders hold this seed's runs
    settings["pretrained"] = (os.path.abspath(args.pretrained) if args.pretrained else
                              {"pretrain_steps": args.pretrain_steps, "pretrain_seed": args.pretrain_seed})
    settings["pretrained_weights"] = folder_weights_sha256(args.pretrained)  # (the same path, other weights: refused)
    return settings


def check_settings(args) -> None:
    check_benchmark_settings(args.output_dir, training_settings(args), "benchmark_deme.py")


# ------------------------------------------------------------------------------------------- phases


def write_references(args) -> dict:
    from diffusers_ant.deme.benchmark import split_reference_rows, write_reference_folder  # loads torch: when used

    search, evaluation = split_reference_rows(NUM_DATASET_IMAGES, args.search_real, seed=0)
    write_reference_folder(DATASET, search, reference_dir(args, "search"))
    write_reference_folder(DATASET, evaluation, reference_dir(args, "eval"))
    return {"search": {"folder": reference_dir(args, "search"), "num_images": len(search)},
            "eval": {"folder": reference_dir(args, "eval"), "num_images": len(evaluation)},
            "split": f"a permutation of MNIST-5k's {NUM_DATASET_IMAGES} rows (torch.randperm, seed 0): the first "
                     f"{len(search)} rows are the search reference, the other {len(evaluation)} the evaluation reference"}


def train_phase(args, config_path) -> None:
    if not args.pretrained:
        out = pretrained_dir(args)
        status = run_logged(pretrain_command(args, config_path), os.path.join(out, "train.log"),
                            os.path.join(out, "model_index.json"), "pretraining", threads=args.workers)
        print(f"pretrained model {out}: {status}", flush=True)
    jobs = [("probe", i, args.seeds[0]) for i in range(args.num_intervals) if args.probe_points]
    jobs += [("deme", c, s) for c, s in deme_trainings(args)] + [("continued", m, s) for m in args.continued for s in args.seeds]
    jobs += [("per_model", "vanilla", s) for s in args.seeds]

    def one(job):
        kind, name, seed = job
        if kind == "probe":
            status = probe_training(args, name)
        elif kind == "per_model":
            out = per_model_dir(args, seed)
            status = run_logged(per_model_command(args, seed), os.path.join(out, "train.log"),
                                os.path.join(out, "model_index.json"), f"vanilla for {args.interval_steps} steps seed {seed}")
        elif kind == "continued":
            out = continued_dir(args, name, seed)
            status = run_logged(continued_command(args, name, seed), os.path.join(out, "train.log"),
                                os.path.join(out, "model_index.json"), f"continued {name} seed {seed}")
        else:
            folders = interval_dirs(args, name, seed)
            status = run_logged(deme_command(args, name, seed), os.path.join(deme_dir(args, name, seed), "train_deme.log"),
                                [os.path.join(f, "model_index.json") for f in folders], f"{name} seed {seed}")
        print(f"trained {kind} {name} seed {seed}: {status}", flush=True)

    run_parallel(one, jobs, args.workers)


def probe_training(args, index) -> str:
    """Interval ``index``'s probe segments in order, each point's pipeline (EMA weights) kept as
    ``probe/interval-i/step-K`` (the next segment overwrites the run's own folder)."""
    statuses = []
    for step in probe_points(args):
        saved = os.path.join(probe_dir(args, index), f"step-{step}")
        if os.path.isfile(os.path.join(saved, "model_index.json")):
            continue
        run_dir = os.path.join(probe_dir(args, index), "run")
        statuses.append(run_logged(probe_command(args, index, step), os.path.join(probe_dir(args, index), "logs",
                                   f"train-{step}.log"), [], f"probe interval {index} to step {step}"))
        # copied whole or not at all: a half copy with its model_index.json would pass for the point
        with folder_written_atomically(saved) as partial:
            shutil.copytree(run_dir, partial, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("checkpoint-*", "logs", "samples*"))
    return ", ".join(statuses) or "kept"


def merge_phase(args) -> None:
    from diffusers_ant.deme.merging import MERGE_RECORD_NAME

    def one(job):
        config, seed, kind = job
        out = merge_dir(args, config, seed, kind)
        done = os.path.join(out, MERGE_RECORD_NAME)
        if os.path.isdir(out) and not os.path.isfile(done):
            shutil.rmtree(out)  # an interrupted merge of this benchmark: merge_deme.py wants an empty folder
        status = run_logged(merge_command(args, config, seed, kind), os.path.join(deme_dir(args, config, seed), f"{kind}.log"),
                            done, f"{kind} {config} seed {seed}")
        print(f"{kind} {config} seed {seed}: {status}", flush=True)

    run_parallel(one, merge_jobs(args), args.workers)


def eval_settings(args) -> dict:
    """What an evaluation depends on besides the model (``evaluate_saved_model``'s settings): the
    evaluation reference folder, scored in MNIST-5k's domain features."""
    return {"num_samples": args.num_samples, "num_inference_steps": args.num_inference_steps, "scheduler": "ddim",
            "eval_batch_size": args.eval_batch_size, "reference_dir": os.path.abspath(reference_dir(args, "eval")),
            "num_real": NUM_DATASET_IMAGES - args.search_real, "resolution": args.resolution, "num_channels": 1,
            "features": DATASET}


def eval_phase(args, extractor_sha) -> dict:
    """{row: {seed: metrics}}, evaluating what is missing."""
    settings = eval_settings(args)
    results, tasks = {}, []
    for row, seed, model in evaluated_rows(args):
        path = metrics_path(args, row, seed)
        stored = stored_metrics(path, settings, extractor_sha)
        if stored is not None:
            results.setdefault(row, {})[seed] = stored
            continue
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise SystemExit(f"benchmark_deme.py: error: {model} is missing: run the train and merge phases first")
        tasks.append((row, seed, {"model": model, "seed": seed, "path": path, "settings": settings}))
    evaluated = evaluate_in_pool(evaluate_saved_model, [(f"{row} seed {seed}", task) for row, seed, task in tasks],
                                 args.workers)
    for (row, seed, _), metrics in zip(tasks, evaluated):
        results.setdefault(row, {})[seed] = metrics
    return results


def probe_settings(args) -> dict:
    """A probe point is scored like a search point: --search_samples samples against the search
    reference (the curve chooses how long to train, so it stays off the evaluation reference)."""
    return {"num_samples": args.search_samples, "num_inference_steps": args.num_inference_steps, "scheduler": "ddim",
            "eval_batch_size": args.eval_batch_size, "reference_dir": os.path.abspath(reference_dir(args, "search")),
            "num_real": args.search_real, "resolution": args.resolution, "num_channels": 1, "features": DATASET}


def probe_phase(args, extractor_sha) -> dict:
    """{interval: {"points": {step: fid}, "plateau_step": step or None}}, scoring the missing points.
    Step 0 of every curve is the pretrained model; the sampling noise is the search's (first seed +
    SEARCH_SEED_OFFSET), the same at every point, so the curve moves only with the weights."""
    from diffusers_ant.deme.benchmark import evaluate_swap_in

    if not args.probe_points:
        return {}
    settings, seed = probe_settings(args), args.seeds[0] + SEARCH_SEED_OFFSET
    points, tasks = {}, []
    for index in range(args.num_intervals):
        for step in [0, *probe_points(args)]:
            path = probe_metrics_path(args, index, step)
            stored = stored_metrics(path, settings, extractor_sha)
            if stored is not None:
                points[(index, step)] = stored
            elif step == 0:
                if index == 0:  # the pretrained model alone (no fine-tune swapped in)
                    tasks.append(((index, step), {"base": pretrained_dir(args), "finetune": None, "seed": seed,
                                                  "path": path, "settings": settings}))
            else:
                model = os.path.join(probe_dir(args, index), f"step-{step}")
                if not os.path.isfile(os.path.join(model, "model_index.json")):
                    raise SystemExit(f"benchmark_deme.py: error: {model} is missing: run the train phase first")
                tasks.append(((index, step),
                              {"base": pretrained_dir(args), "finetune": model, "seed": seed, "path": path, "settings": settings,
                               "ensemble": os.path.join(probe_dir(args, index), f"swap-in-{step}")}))
    labels = [(f"probe interval {i} step {st}" if st else "probe: pretrained", task) for (i, st), task in tasks]
    for (key, _), metrics in zip(tasks, evaluate_in_pool(evaluate_swap_in, labels, args.workers, what="probe points")):
        points[key] = metrics
    curves = {}
    for index in range(args.num_intervals):
        curve = {step: (points.get((index, step)) or points[(0, 0)])["fid"] for step in [0, *probe_points(args)]}
        # the plateau rule of pretrain_base.py, with as many points as the base's curve needed
        curves[index] = {"points": curve, "plateau_step": plateau_step(curve, args.plateau_tolerance, PLATEAU_MIN_POINTS),
                         "judgeable": plateau_judgeable(curve, PLATEAU_MIN_POINTS)}
    return curves


def search_records(args) -> dict:
    """{config: {seed: {"weights", "search_fid", "equal_search_fid", "evaluations"}}} from the merges' records."""
    from diffusers_ant.deme.merging import MERGE_RECORD_NAME

    out = {}
    equal = [1.0 / args.num_intervals] * args.num_intervals
    for config, seed in deme_trainings(args):
        folder = merge_dir(args, config, seed, "merged_searched")
        record_path, table_path = os.path.join(folder, MERGE_RECORD_NAME), os.path.join(folder, "deme_search.json")
        if not (os.path.isfile(record_path) and os.path.isfile(table_path)):
            continue
        with open(record_path) as f:
            record = json.load(f)
        with open(table_path) as f:
            table = json.load(f)
        start = next((r["score"] for r in table["rows"] if all(math.isclose(a, b) for a, b in zip(r["weights"], equal))), None)
        out.setdefault(config, {})[seed] = {"weights": record["weights"], "search_fid": table["best_score"],
                                            "equal_search_fid": start, "evaluations": len(table["rows"]),
                                            "returned_base": returns_base(record["weights"])}
    return out


# ------------------------------------------------------------------------------------------- summaries


def summarise(results, confidence=0.95) -> tuple:
    """Per row: each metric's t interval over seeds; the paired difference from continued vanilla
    (same seed) of each metric; and the relative FID change from it in percent."""
    from diffusers_ant.analysis.stats import paired_differences, t_interval

    control = results.get(CONTROL, {})
    table, paired, relative = {}, {}, {}
    for row, per_seed in results.items():
        table[row] = {k: t_interval([m[k] for m in per_seed.values()], confidence) for k in METRICS}
        if row != CONTROL and control:
            paired[row] = {k: paired_differences({s: m[k] for s, m in per_seed.items()},
                                                 {s: m[k] for s, m in control.items()}, confidence) for k in METRICS}
            relative[row] = relative_differences({s: m["fid"] for s, m in per_seed.items()},
                                                 {s: m["fid"] for s, m in control.items()}, confidence)
    return table, paired, relative


def summarise_ladder(args, results, confidence=0.95) -> list:
    """The ablation ladder on its seeds: each rung's FID and its paired difference from the rung below
    and from N = 1."""
    from diffusers_ant.analysis.stats import paired_differences, t_interval

    seeds = {str(s) for s in args.ablation_seeds}
    rungs, previous = [], None
    base = None
    for label, row in ladder(args):
        per_seed = {s: m for s, m in results.get(row, {}).items() if str(s) in seeds}
        if not per_seed:
            continue
        fid = {s: m["fid"] for s, m in per_seed.items()}
        rung = {"label": label, "row": row, "fid": t_interval(list(fid.values()), confidence),
                **{k: t_interval([m[k] for m in per_seed.values()], confidence) for k in METRICS[1:]}}
        if previous is not None:
            rung["vs_previous"] = paired_differences(fid, previous, confidence)
        if base is not None:
            rung["vs_n1"] = paired_differences(fid, base, confidence)
        base = fid if base is None else base
        previous = fid
        rungs.append(rung)
    return rungs


def target_check(results, table, confidence=0.95, searches=None) -> dict:
    """The merged model (searched weights) against continued fine-tuning at equal total steps: against
    continued vanilla (the target), against the continued row of lowest mean FID, and against the
    pretrained model (what the paper's -21% compares).

    ``searches`` (``search_records``): where DeMe's search returned the base (all weights 0), the
    "merged" model is the pretrained one and no fine-tune helped: such seeds are named, and the target
    is never met with them, whatever the FIDs (the base beating continued fine-tuning is no DeMe win)."""
    from diffusers_ant.analysis.stats import paired_differences

    merged = {s: m["fid"] for s, m in results.get("deme_merged", {}).items()}
    if not merged or CONTROL not in results:
        return {}
    continued = [r for r in table if r.startswith("continued_")]
    best = min(continued, key=lambda r: table[r]["fid"]["mean"])
    check = {"paper": "DeMe -21% FID on CIFAR-10 (4.42 -> 3.51, from its pretrained model to the merged one), "
                      "ahead of Min-SNR, P2 and ANT fine-tuned for the same budget",
             "best_continued": best}
    for name, row in (("vs_continued_vanilla", CONTROL), ("vs_best_continued", best), ("vs_per_model", PER_MODEL_ROW),
                      ("vs_pretrained", "pretrained")):
        if row not in results:
            continue
        other = {s: m["fid"] for s, m in results[row].items()}
        difference = paired_differences(merged, other, confidence)
        check[name] = {"row": row, "fid_difference": difference,
                       "fid_relative_percent": relative_differences(merged, other, confidence),
                       "verdict": verdict(difference, "merged FID lower", "merged FID higher")}
    base_seeds = sorted(seed for seed, rec in ((searches or {}).get("deme") or {}).items() if rec.get("returned_base"))
    check["returned_base_seeds"] = base_seeds
    if base_seeds:
        for name in ("vs_continued_vanilla", "vs_best_continued", "vs_per_model", "vs_pretrained"):
            if name in check:
                check[name]["verdict"] += (f"; the search returned the base on seed(s) {', '.join(map(str, base_seeds))}: "
                                           "no fine-tune helped there")
    high = check["vs_continued_vanilla"]["fid_difference"]["high"]
    check["met"] = high is not None and high < 0 and not base_seeds
    return check


def _mean_sd(cell, digits=2):
    """``mean ± sd``; from one seed (the ablation ladder's) the mean alone: there is no spread to show."""
    if cell.get("n") == 1:
        return f"{cell['mean']:.{digits}f}"
    return format_mean_sd(cell, digits=digits)


def markdown(args, table, paired, relative, rungs, searches, check, extractor_sha, references, command, timing,
             probe=None) -> str:
    level = f"{args.confidence:.0%}"
    n, s, seeds = args.num_intervals, args.interval_steps, args.seeds
    lines = [f"| model | fine-tuning steps | domain FID | FID - continued vanilla [{level} CI] | change [{level} CI] "
             "| domain KID | precision | recall |", "|---|---|---|---|---|---|---|---|"]
    for row in MAIN_ROWS:
        if row not in table:
            continue
        cells = table[row]
        lines.append(f"| {row_label(args, row)} | {row_steps(args, row)} | {_mean_sd(cells['fid'])} "
                     f"| {_difference(paired.get(row, {}).get('fid')) if row != CONTROL else '(control)'} "
                     f"| {_difference(relative.get(row), digits=1, unit='%') if row != CONTROL else '-'} "
                     f"| {_mean_sd(cells['kid_mean'], 4)} | {_mean_sd(cells['precision'], 3)} | {_mean_sd(cells['recall'], 3)} |")
    pretrained = (f"`{args.pretrained}`" if args.pretrained else
                  f"pretrained here for {args.pretrain_steps} steps (seed {args.pretrain_seed}, AdamW 2e-3, EMA 0.999)")
    lines += ["", f"One pretrained 0.28M-parameter UNet ({pretrained}), fine-tuned on MNIST-5k at {args.resolution}x"
              f"{args.resolution} with batch "
              f"{args.train_batch_size}, AdamW {args.learning_rate:g} (beta1 {DEME_AUTHORS_DEFAULTS['adam_beta1']:g}, weight "
              f"decay {DEME_AUTHORS_DEFAULTS['adam_weight_decay']:g} for every row; {args.lr_scheduler}, {args.lr_warmup_steps} "
              f"warm-up steps), EMA 0.999. Continued fine-tuning: {n * s} steps. DeMe: {n} copies, copy i fine-tuned "
              f"{s} steps on the i-th of {n} equal timestep intervals, probabilistic sampling p {GLOBAL_PROB}, "
              f"consistency weight {CONSISTENCY_WEIGHT:g}, channel projection (main path); merged by task arithmetic. Mean ± "
              f"standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}); differences are paired by "
              f"seed (row - continued vanilla, same seed), with a {level} Student-t interval over the seeds; 'change' "
              f"is the per-seed relative FID change. {args.num_samples} DDIM-{args.num_inference_steps} samples per model "
              f"against the evaluation reference ({references['eval']['num_images']} real images). Domain features: "
              f"MNIST-5k classifier, weights sha256 {extractor_sha[:12]} (not Inception: not comparable with published FIDs)."]
    if check:
        lines += ["", f"**Target check** (the paper: {check['paper']}): the merged model with searched weights "
                  f"against continued fine-tuning at equal total steps ({n * s}), at equal steps per model ({s}), and "
                  "against the pretrained model:"]
        for name in ("vs_continued_vanilla", "vs_best_continued", "vs_per_model", "vs_pretrained"):
            if name not in check or (name == "vs_best_continued" and check[name]["row"] == CONTROL):
                continue
            c = check[name]
            lines.append(f"- against {row_label(args, c['row'])}: FID {_difference(c['fid_difference'])}, "
                         f"{_difference(c['fid_relative_percent'], digits=1, unit='%')}; per seed "
                         + ", ".join(f"{d:+.1f}%" for d in c["fid_relative_percent"]["differences"])
                         + f": {c['verdict']}.")
        if check.get("returned_base_seeds"):
            lines.append(f"- The search returned the base (all weights 0) on seed(s) "
                         f"{', '.join(map(str, check['returned_base_seeds']))}: no fine-tune helped there, and those seeds' "
                         "'merged' model is the pretrained one; the target cannot be met with them.")
        lines.append(f"- Target (merged beats continued vanilla fine-tuning, interval below 0"
                     + (", with a fine-tune in every merge" if check.get("returned_base_seeds") is not None else "")
                     + f"): **{'met' if check['met'] else 'not met'}** here.")
    if probe:
        lines += ["", probe_markdown(args, probe)]
    if rungs:
        lines += ["", f"Ablation ladder (the paper's Table 3) on seed(s) {', '.join(map(str, args.ablation_seeds))}, "
                  "each DeMe rung merged with searched weights:", "",
                  "| rung | domain FID | FID - rung below | FID - N = 1 | precision | recall |", "|---|---|---|---|---|---|"]
        for rung in rungs:
            lines.append(f"| {rung['label']} | {_mean_sd(rung['fid'])} | {_difference(rung.get('vs_previous'))} "
                         f"| {_difference(rung.get('vs_n1'))} | {_mean_sd(rung['precision'], 3)} | {_mean_sd(rung['recall'], 3)} |")
    if searches:
        lines += ["", f"Searched merge weights (coordinate search, values {', '.join(f'{v:g}' for v in args.search_values)}, "
                  f"{args.search_rounds} round(s), {args.search_samples} samples per point with sampling seed + "
                  f"{SEARCH_SEED_OFFSET}, FID against the search reference):", "",
                  "| training | seed | weights (low to high t) | search FID | search FID, equal weights | points |",
                  "|---|---|---|---|---|---|"]
        for config, per_seed in searches.items():
            for seed, rec in sorted(per_seed.items()):
                equal = f"{rec['equal_search_fid']:.3f}" if rec["equal_search_fid"] is not None else "-"
                shown = f"[{', '.join(f'{w:g}' for w in rec['weights'])}]"
                if returns_base(rec["weights"]):
                    shown += " (the base: no fine-tune helped)"
                lines.append(f"| {config} ({DEME_CONFIGS[config]['label']}) | {seed} | "
                             f"{shown} | {rec['search_fid']:.3f} | {equal} | {rec['evaluations']} |")
    lines += ["", f"References: {references['split']}. The search scores against the search reference "
              f"({references['search']['num_images']} images) only, and so does the plateau probe; every number of "
              f"the main table and the ablation ladder is against the evaluation reference "
              f"({references['eval']['num_images']} images). All models trained on all {NUM_DATASET_IMAGES} images.",
              "", f"Command: `{command}`", "",
              f"Wall time: {timing['wall_seconds'] / 60:.1f} min this invocation, "
              f"{timing.get('all_invocations_wall_seconds', timing['wall_seconds']) / 60:.1f} min over all invocations "
              f"of this benchmark folder (invocations.json); summed run times: training "
              f"{timing['train_run_seconds'] / 60:.1f} min, merges {timing['merge_run_seconds'] / 60:.1f} min "
              f"(process time, {args.workers} at a time)."]
    return "\n".join(lines)



def probe_markdown(args, probe) -> str:
    """The plateau probe's curves, one row per interval."""
    steps = [0, *probe_points(args)]
    bounds = [round(i * 1000 / args.num_intervals) for i in range(args.num_intervals + 1)]  # for the labels only
    lines = [f"Plateau probe (seed {args.seeds[0]}'s DeMe fine-tunes retrained in {args.probe_points} segments; each point: "
             f"the pretrained model with that fine-tune swapped in on its interval, {args.search_samples} DDIM-"
             f"{args.num_inference_steps} samples, FID against the search reference; step 0 is the pretrained model; "
             f"plateau: under {args.plateau_tolerance:.0%} change of the least-squares line over the last fifth, "
             "pretrain_base.py's rule):", "",
             "| interval | " + " | ".join(f"step {st}" for st in steps) + " | plateau |",
             "|---|" + "---|" * (len(steps) + 1)]
    for index in range(args.num_intervals):
        curve = probe[index] if index in probe else probe[str(index)]
        points = {int(k): v for k, v in curve["points"].items()}
        found = curve["plateau_step"]
        verdict_text = (f"step {found}" if found is not None else f"none by step {args.interval_steps}"
                        if curve.get("judgeable", True) else "too few points to judge")
        lines.append(f"| {index} (t ~ {bounds[index]}-{bounds[index + 1] - 1}) | "
                     + " | ".join(f"{points[st]:.3f}" if st in points else "-" for st in steps) + f" | {verdict_text} |")
    return "\n".join(lines)


def recorded_times(args) -> dict:
    """Summed wall times the runs recorded (over every invocation that ran them)."""
    train_logs = [os.path.join(continued_dir(args, m, s), "train.log") for m in args.continued for s in args.seeds]
    train_logs += [os.path.join(deme_dir(args, c, s), "train_deme.log") for c, s in deme_trainings(args)]
    train_logs += [os.path.join(per_model_dir(args, s), "train.log") for s in args.seeds]
    train_logs += [os.path.join(probe_dir(args, i), "logs", f"train-{st}.log")
                   for i in range(args.num_intervals) for st in probe_points(args)]
    if not args.pretrained:
        train_logs.append(os.path.join(pretrained_dir(args), "train.log"))
    merge_logs = [os.path.join(deme_dir(args, c, s), f"{kind}.log") for c, s, kind in merge_jobs(args)]
    per_run = {os.path.relpath(log, args.output_dir): recorded_seconds(log) for log in train_logs + merge_logs}
    return {"train_run_seconds": sum(per_run[os.path.relpath(log, args.output_dir)] or 0.0 for log in train_logs),
            "merge_run_seconds": sum(per_run[os.path.relpath(log, args.output_dir)] or 0.0 for log in merge_logs),
            "per_run_seconds": {k: None if v is None else round(v, 1) for k, v in per_run.items()}}


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    check_settings(args)
    command = command_line(argv, script=__file__)
    with invocation_recorded(args, command, started, "benchmark_deme.py") as invocation:
        run(args, invocation)


def run(args, invocation) -> None:
    """Train, merge and score per --phase, then write the results (main records the invocation when it
    stops early)."""
    command, started = invocation.command, invocation.started
    config_path = os.path.join(args.output_dir, "bench_unet.json")
    with open(config_path, "w") as f:
        json.dump(BENCH_UNET, f, indent=2)
    estimate = plan(args)
    print(plan_text(estimate, args), flush=True)
    references = write_references(args)
    timing = {}
    phases = {"train": ("train",), "merge": ("merge",), "eval": ("eval",), "all": ("train", "merge", "eval")}[args.phase]
    if "train" in phases:
        start = time.time()
        train_phase(args, config_path)
        timing["train_wall_seconds"] = round(time.time() - start, 1)
    if "merge" in phases:
        start = time.time()
        merge_phase(args)
        timing["merge_wall_seconds"] = round(time.time() - start, 1)
    if "eval" not in phases:
        invocation.finished(time.time() - started)
        return
    from diffusers_ant.analysis.evaluate import resolve_feature_extractor

    extractor_sha = resolve_feature_extractor("domain", DATASET).weights_sha256()
    start = time.time()
    results = eval_phase(args, extractor_sha)
    probe = probe_phase(args, extractor_sha)
    timing["eval_wall_seconds"] = round(time.time() - start, 1)
    timing["wall_seconds"] = round(time.time() - started, 1)
    timing["all_invocations_wall_seconds"] = round(invocation.finished(timing["wall_seconds"]), 1)
    timing.update(recorded_times(args))

    table, paired, relative = summarise(results, args.confidence)
    rungs = summarise_ladder(args, results, args.confidence) if args.ablation_seeds else []
    searches = search_records(args)
    check = target_check(results, table, args.confidence, searches)
    text = markdown(args, table, paired, relative, rungs, searches, check, extractor_sha, references, command, timing,
                    probe)
    print(text)
    record = {"command": command, "args": vars(args), "plan": estimate, "references": references,
              "feature_extractor": f"domain_{DATASET}", "feature_extractor_sha256": extractor_sha,
              "rows": {row: row_label(args, row) for row in results}, "per_run": results, "summary": table,
              "paired_vs_continued_vanilla": paired, "relative_fid_vs_continued_vanilla": relative,
              "ablation_ladder": rungs, "searches": searches, "target_check": check, "plateau_probe": probe,
              "timing": timing}
    write_json(os.path.join(args.output_dir, "results.json"), record, default=str)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.join(args.output_dir, 'results.json')} and results.md "
          f"({timing['wall_seconds'] / 60:.1f} min this invocation)")


if __name__ == "__main__":
    main()
