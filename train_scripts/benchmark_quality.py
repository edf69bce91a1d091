#!/usr/bin/env python
"""ANT's quality benchmark on MNIST-5k at 16x16, or 8x8 (issues 5, 10 and 17).

Trains every method for the same number of steps from the same seeds, samples each model and scores
it against all 5,000 real MNIST-5k images with the domain features (`diffusers_ant.metrics`: a small
MNIST classifier's features, *not* Inception FID), then reports per method the mean over seeds and,
since the seeds are shared, the per-seed difference from vanilla with a Student-t confidence
interval over seeds. It also scores intermediate checkpoints of every row (their EMA weights,
`--curve_methods`): the FID-over-steps curves, and on vanilla's mean curve the plateau rule of
`pretrain_base.py` (under 2% change over the last fifth), which says whether the rows were compared
at convergence or early in training (issue 17, item 13).

    python train_scripts/benchmark_quality.py --output_dir bench-quality          # the full benchmark
    python train_scripts/benchmark_quality.py --output_dir bench-smoke --quick    # a smoke run, minutes
    # to convergence, the recipe of the converged base (docs/benchmark_base/r8): 8x8, a constant rate
    # then a cool-down (warmup_stable_decay), every row's curve
    python train_scripts/benchmark_quality.py --output_dir bench-quality-8 --resolution 8 --seeds 0 1 2 \
        --max_train_steps 10000 --decay_from 6000 --decay_steps 2000 --min_lr_ratio 0.05 --curve_every 1000

The rows (`METHODS`): vanilla, Min-SNR and P2 draw timesteps uniformly; every ANT row draws
stratified batches (each of the k = 5 clusters an equal share) and clusters on log-SNR, except
`ant_uw_raw_snr` which clusters raw SNR as the paper does. `ant_ls` (stratified sampling, equal
cluster weights: ANT's Table 7 control) separates what the weighting does from what the stratified
sampling alone does: on this schedule stratification reweights the clusters by about
1.50 / 0.84 / 0.71 / 0.88 / 1.68 against uniform draws.

Every training run is a real `train_ant.py` process (one torch thread each, `--workers` at a time);
evaluations run in `--workers` processes of one thread. Finished runs and evaluations are kept in
the output folder and skipped when the command is run again (an evaluation is redone when its
settings or the feature extractor's weights changed), so an interrupted benchmark resumes.
Outputs: `results.json` (every run's numbers, the summaries, the curve, settings, hashes, times),
`results.md` (the tables) and `vanilla_fid_curve.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The bench UNet, the planning figures, the recipe (dataset, resolution, the rows `METHODS` and their
# seconds per step) and the machinery live in diffusers_ant.analysis.benchmark, shared with the other
# benchmarks.
from diffusers_ant.analysis.benchmark import (  # noqa: F401  (re-exported: benchmark_ntg.py and the tests use them)
    BENCH_UNET,
    DATASET,
    METHODS,
    RESOLUTION,
    SECONDS_PER_IMAGE_STEP,
    SECONDS_PER_RUN,
    SECONDS_PER_STEP,
    check_benchmark_settings,
    command_line,
    format_difference as _difference,
    format_mean_sd as _mean_sd,
    invocation_recorded,
    PLATEAU_MIN_POINTS,
    cooldown_schedule,
    schedule_flags,
    plateau_judgeable,
    plateau_step,
    resolution_cost_factor,
    run_logged,
    run_parallel,
    stored_metrics,
    write_json,
)

HERE = os.path.dirname(os.path.abspath(__file__))

METRICS = ("fid", "kid_mean", "precision", "recall")


def add_recipe_arguments(p) -> None:
    """The recipe flags this benchmark shares with benchmark_ntg.py (whose interval models must be trained
    as the base models they are swapped into): the cool-down schedule and the resolution."""
    p.add_argument("--decay_from", type=int, default=None,
                   help="cool down from this step (train_ant.py --lr_scheduler warmup_stable_decay, as pretrain_base.py): "
                        "a constant rate to it, then --decay_steps of decay to --min_lr_ratio, then that rate; the "
                        "converged base needed one (default: none, constant after warm-up)")
    p.add_argument("--decay_steps", type=int, default=5000, help="length of the cool-down (default 5000)")
    p.add_argument("--min_lr_ratio", type=float, default=0.05, help="the rate after the cool-down, as a fraction (0.05)")
    p.add_argument("--resolution", type=int, default=RESOLUTION,
                   help=f"image side of training and scoring (default {RESOLUTION}; 8: the converged base's, "
                        "docs/benchmark_base/r8)")


def check_recipe_arguments(p, args) -> None:
    """One-line errors for the flags of `add_recipe_arguments`."""
    if args.resolution < 8 or args.resolution % 4:
        p.error("--resolution must be a multiple of 4 and at least 8 (the bench UNet halves it twice)")
    if args.decay_from is not None and not args.lr_warmup_steps <= args.decay_from < args.max_train_steps:
        p.error("--decay_from must lie in --lr_warmup_steps..--max_train_steps - 1")
    if args.decay_steps < 1 or not 0 <= args.min_lr_ratio < 1:
        p.error("--decay_steps must be positive and --min_lr_ratio in [0, 1)")
    if args.decay_from is not None and args.decay_from + args.decay_steps > args.max_train_steps:
        p.error("--decay_from + --decay_steps must be at most --max_train_steps: the cool-down has to finish in the run")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="bench-quality")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training and sampling seeds, shared by all methods (default 0 1 2)")
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--lr_scheduler", default="constant_with_warmup",
                   help="constant after warm-up (default), so that intermediate checkpoints are what a shorter run "
                        "would give and the vanilla curve shows convergence, not the end of a decay")
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    add_recipe_arguments(p)
    p.add_argument("--num_samples", type=int, default=5000, help="generated images per model (default 5000)")
    p.add_argument("--num_real", type=int, default=5000, help="real images of the reference (default: all 5000)")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps (default 50, as ANT)")
    p.add_argument("--eval_batch_size", type=int, default=256)
    p.add_argument("--curve_every", type=int, default=None,
                   help="score the checkpoints of --curve_methods every this many steps (default max_train_steps / 4; "
                        "0: no curve)")
    p.add_argument("--curve_methods", default="all",
                   help="comma-separated rows whose checkpoints are scored, or all (default: every row; vanilla's "
                        "curve decides the plateau)")
    p.add_argument("--plateau_tolerance", type=float, default=0.02,
                   help="vanilla has plateaued when its mean curve changed by less than this over the last fifth (0.02)")
    p.add_argument("--curve_samples", type=int, default=1024,
                   help="generated images per curve point, a multiple of --eval_batch_size (default 1024; the "
                        "final model's point reuses its first 1024 samples, so all points share one sample size)")
    p.add_argument("--confidence", type=float, default=0.95, help="of the t intervals over seeds (default 0.95)")
    p.add_argument("--phase", default="all", choices=["train", "eval", "all"])
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="processes in parallel (training runs and evaluations), one torch thread each")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 seeds, 40 steps, 256 samples with DDIM-10, a 2-point curve (minutes, not hours)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds if args.seeds != [0, 1, 2] else [0, 1]
        args.max_train_steps, args.lr_warmup_steps = 40, 10
        args.num_samples, args.num_inference_steps, args.eval_batch_size, args.curve_samples = 256, 10, 128, 128
    if args.curve_every is None:
        args.curve_every = max(1, args.max_train_steps // (2 if args.quick else 4))
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.methods = args.methods.split(",")
    args.curve_methods = list(args.methods) if args.curve_methods == "all" else args.curve_methods.split(",")
    stray = [m for m in args.curve_methods if m not in args.methods]
    if stray:
        p.error(f"--curve_methods {', '.join(stray)}: not among --methods; give rows of the run, or all")
    check_recipe_arguments(p, args)
    if not 0 < args.plateau_tolerance < 1:
        p.error("--plateau_tolerance must lie in (0, 1), e.g. 0.02 for 2%")
    if len(set(args.seeds)) < 2:
        p.error("give at least 2 --seeds: the intervals are over seeds")
    for name in ("max_train_steps", "train_batch_size", "num_samples", "num_real", "num_inference_steps",
                 "eval_batch_size", "curve_samples", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if args.curve_every and args.curve_samples % args.eval_batch_size:
        p.error("--curve_samples must be a multiple of --eval_batch_size (the final model's curve point reuses "
                "the first --curve_samples of its samples, drawn from the same noise)")
    if args.curve_every and args.curve_samples > args.num_samples:
        p.error("--curve_samples cannot exceed --num_samples")
    if not 0 < args.confidence < 1:
        p.error("--confidence must be in (0, 1)")
    return args


def curve_steps(args) -> list:
    """The checkpoints scored for the curves (the final model is the last point)."""
    if not args.curve_every or not getattr(args, "curve_methods", ["vanilla"]):
        return []
    return list(range(args.curve_every, args.max_train_steps, args.curve_every))


def has_curve(args, method) -> bool:
    return bool(curve_steps(args)) and method in getattr(args, "curve_methods", ["vanilla"])


def schedule(args) -> dict:
    """train_ant.py's learning-rate schedule: --lr_scheduler after warm-up, or a cool-down from --decay_from
    (benchmark_ntg.py's namespace has no cool-down flags)."""
    return cooldown_schedule(args.lr_scheduler, args.lr_warmup_steps, getattr(args, "decay_from", None),
                             getattr(args, "decay_steps", None), getattr(args, "min_lr_ratio", 0.0))


def plan(args) -> dict:
    """Estimated seconds of training and evaluation with `args.workers` processes (see the constants)."""
    runs = [(m, s) for m in args.methods for s in args.seeds]
    scale = resolution_cost_factor(args.resolution)  # the figures are 16x16's
    train = sum(SECONDS_PER_STEP.get(m, 0.15) * scale * args.max_train_steps + SECONDS_PER_RUN for m, _ in runs)
    curves = sum(has_curve(args, m) for m in args.methods)
    images = len(runs) * args.num_samples + curves * len(curve_steps(args)) * len(args.seeds) * args.curve_samples
    evaluate = images * args.num_inference_steps * SECONDS_PER_IMAGE_STEP * scale + 10 * len(runs)
    return {"train_seconds": train / args.workers, "eval_seconds": evaluate / args.workers,
            "runs": len(runs), "generated_images": images}


# ------------------------------------------------------------------------------------------- training


def train_command(args, method, seed, run_dir, config_path, checkpoint_every=None) -> list:
    return [sys.executable, os.path.join(HERE, "train_ant.py"), "--model_type", "unet",
            "--model_config_name_or_path", config_path, "--dataset_name", DATASET,
            "--resolution", str(getattr(args, "resolution", RESOLUTION)),
            "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
            "--learning_rate", str(args.learning_rate), *schedule_flags(schedule(args)), "--use_ema", "--ema_max_decay", "0.999",
            "--seed", str(seed), "--output_dir", run_dir,
            "--checkpointing_steps", str(checkpoint_every or args.max_train_steps + 1),
            "--num_validation_images", "16", "--report_to", "none", *METHODS[method]["flags"]]


TRAINING_SETTINGS = ("resolution", "max_train_steps", "train_batch_size", "learning_rate", "lr_scheduler",
                     "lr_warmup_steps", "decay_from", "decay_steps", "min_lr_ratio")


def training_settings(args) -> dict:
    """The recipe a kept run was trained with (also benchmark_ntg.py's, whose models must share it)."""
    return {key: getattr(args, key) for key in TRAINING_SETTINGS}


def check_settings(args) -> None:
    """Kept runs are reused by folder: a folder trained with other settings is refused."""
    check_benchmark_settings(args.output_dir, training_settings(args), "benchmark_quality.py")


def train_run(cmd, run_dir, what) -> str:
    """Run one train_ant.py command unless `run_dir` already holds its saved model (log: run_dir/train.log)."""
    return run_logged(cmd, os.path.join(run_dir, "train.log"), os.path.join(run_dir, "model_index.json"), what)


# ----------------------------------------------------------------------------------------- evaluation
# Evaluations run in worker processes (one torch thread each); each process builds the reference
# features once and keeps them (diffusers_ant.analysis.benchmark.cached_reference).


def reference_set(num_real, batch_size, resolution=RESOLUTION):
    """The ReferenceSet of `num_real` real MNIST-5k images (all 5,000 by default) at `resolution`,
    cached per process."""

    def build():
        from diffusers_ant.analysis.evaluate import ReferenceSet, real_images, resolve_feature_extractor

        real = real_images(DATASET, num_real, resolution=resolution, num_channels=1, seed=0)
        return ReferenceSet(real, resolve_feature_extractor("domain", DATASET), batch_size=batch_size)

    from diffusers_ant.analysis.benchmark import cached_reference

    return cached_reference(("quality", num_real, batch_size, resolution), build)


def eval_settings(args, num_samples) -> dict:
    """What an evaluation's numbers depend on besides the weights; a stored evaluation is reused only
    when these match (and the feature extractor's hash, checked by the caller)."""
    settings = {"num_samples": num_samples, "num_inference_steps": args.num_inference_steps, "num_real": args.num_real,
                "eval_batch_size": args.eval_batch_size, "scheduler": "ddim"}
    if args.resolution != RESOLUTION:  # recorded when it differs (evaluations stored before it was a flag stay valid)
        settings["resolution"] = args.resolution
    return settings


def evaluate_task(task) -> dict:
    """Sample one model (a run's saved model, or a vanilla checkpoint's EMA weights) and score it.

    task: {"run_dir", "seed", "settings", "path", "checkpoint" (None: the saved model), "curve_samples"}.
    Writes the metrics JSON at `path` and returns it."""
    from diffusers_ant.analysis.evaluate import sample_images
    from diffusers_ant.models import load_pipeline

    settings = task["settings"]
    reference = reference_set(settings["num_real"], settings["eval_batch_size"], settings.get("resolution", RESOLUTION))
    start = time.time()
    pipeline = load_pipeline(task["run_dir"])
    weights = "ema (saved model)"
    if task["checkpoint"]:
        from diffusers_ant.analysis.common import checkpoint_ema_state_dict, load_state_dict

        state = checkpoint_ema_state_dict(task["checkpoint"], pipeline.unet)
        weights = "ema (checkpoint)" if state is not None else "raw (checkpoint without EMA)"
        pipeline.unet.load_state_dict(state if state is not None else load_state_dict(task["checkpoint"]))
    images = sample_images(pipeline, settings["num_samples"], scheduler="ddim",
                           num_inference_steps=settings["num_inference_steps"], batch_size=settings["eval_batch_size"],
                           seed=task["seed"], progress=False)
    sampled = time.time()
    metrics = reference.score(images)
    if task.get("curve_samples"):
        # the final model's point of the vanilla curve: the first images, drawn from the same noise
        # as the checkpoints' (whole batches of the same seeded generator)
        metrics["curve_point"] = reference.score(images[: task["curve_samples"]])
    metrics.update(settings=settings, seed=task["seed"], weights=weights, sampling_seconds=round(sampled - start, 1),
                   scoring_seconds=round(time.time() - sampled, 1))
    write_json(task["path"], metrics)  # atomically: a kill mid-write leaves no file a rerun cannot read
    return metrics


def evaluate_all(args, runs, extractor_sha):
    """{method: {seed: metrics}} and {method: {step: {seed: metrics}}} (the curves of --curve_methods),
    evaluating what is missing."""
    from diffusers_ant.analysis.benchmark import evaluate_in_pool

    final_settings = eval_settings(args, args.num_samples)
    curve_settings = eval_settings(args, args.curve_samples)
    steps = curve_steps(args)
    tasks, results = [], {m: {} for m in args.methods}
    curves = {m: {step: {} for step in steps} for m in args.methods if has_curve(args, m)}
    for method, seed in runs:
        run_dir = os.path.join(args.output_dir, method, f"seed-{seed}")
        path = os.path.join(run_dir, "metrics.json")
        with_curve = has_curve(args, method)
        settings = dict(final_settings, curve_samples=args.curve_samples if with_curve else None)
        stored = stored_metrics(path, settings, extractor_sha)
        if stored is not None:
            results[method][seed] = stored
        else:
            tasks.append(("final", method, seed, {"run_dir": run_dir, "seed": seed, "settings": settings, "path": path,
                                                  "checkpoint": None, "curve_samples": settings["curve_samples"]}))
        if with_curve:
            for step in steps:
                path = os.path.join(run_dir, f"curve-{step}.json")
                stored = stored_metrics(path, curve_settings, extractor_sha)
                if stored is not None:
                    curves[method][step][seed] = stored
                elif not os.path.isdir(os.path.join(run_dir, f"checkpoint-{step}")):
                    raise SystemExit(f"benchmark_quality.py: error: {run_dir} has no checkpoint-{step} for {method}'s curve "
                                     f"(trained without it, e.g. before --curve_methods {method}): give --curve_methods "
                                     "without it, or delete that run to train it again")
                else:
                    tasks.append(("curve", (method, step), seed, {"run_dir": run_dir, "seed": seed, "settings": curve_settings,
                                                        "path": path, "checkpoint": os.path.join(run_dir, f"checkpoint-{step}")}))
    labelled = [(f"{key} seed {seed}" if kind == "final" else f"{key[0]} seed {seed} step {key[1]}", task)
                for kind, key, seed, task in tasks]
    evaluated = evaluate_in_pool(evaluate_task, labelled, args.workers, what="sample sets")
    for (kind, key, seed, _), metrics in zip(tasks, evaluated):
        if kind == "final":
            results[key][seed] = metrics
        else:
            curves[key[0]][key[1]][seed] = metrics
    for method, curve in curves.items():
        curve[args.max_train_steps] = {seed: m["curve_point"] for seed, m in results[method].items()}
    return results, curves


# ------------------------------------------------------------------------------------------ summaries


def summarise(results, confidence=0.95):
    """{method: {metric: t_interval over seeds}} and {method: {metric: paired difference from vanilla}}."""
    from diffusers_ant.analysis.stats import paired_differences, t_interval

    table, paired = {}, {}
    for method, per_seed in results.items():
        table[method] = {key: t_interval([m[key] for m in per_seed.values()], confidence) for key in METRICS}
        if method != "vanilla" and "vanilla" in results:
            paired[method] = {key: paired_differences({s: m[key] for s, m in per_seed.items()},
                                                      {s: m[key] for s, m in results["vanilla"].items()}, confidence)
                              for key in METRICS}
    return table, paired


# Pairs besides "row - vanilla" that the rows are there to answer: what the weighting adds to ANT's
# stratified sampling (against the LS control), ANT against the strongest fixed SNR weighting and on top
# of it, the paper's combined configuration against its parts, and raw- against log-SNR clusters.
PAIRS = (("ant_uw", "ant_ls"), ("ant_nash", "ant_ls"), ("ant_pcgrad", "ant_ls"), ("ant_uw", "min_snr"),
         ("ant_nash", "min_snr"), ("ant_uw_raw_snr", "min_snr"), ("ant_uw_min_snr", "min_snr"),
         ("ant_uw_pcgrad_p2", "p2"), ("ant_uw_pcgrad_p2", "ant_uw"), ("ant_uw_raw_snr", "ant_uw"))


def other_pairs(results, confidence=0.95) -> dict:
    """{(a, b): paired FID difference a - b over the seeds} for the `PAIRS` whose rows both ran."""
    from diffusers_ant.analysis.stats import paired_differences

    return {(a, b): paired_differences({s: m["fid"] for s, m in results[a].items()},
                                       {s: m["fid"] for s, m in results[b].items()}, confidence)
            for a, b in PAIRS if a in results and b in results}


def summarise_curve(curve, confidence=0.95):
    from diffusers_ant.analysis.stats import t_interval

    return {int(step): t_interval([m["fid"] for m in per_seed.values()], confidence)
            for step, per_seed in sorted(curve.items()) if per_seed}


def vanilla_plateau(curve_summaries, tolerance, min_points=PLATEAU_MIN_POINTS):
    """The step at which vanilla's mean curve plateaued (``plateau_step``, pretrain_base.py's rule), or None."""
    summary = curve_summaries.get("vanilla")
    if not summary:
        return None
    return plateau_step({step: cell["mean"] for step, cell in summary.items()}, tolerance, min_points)


def markdown(table, paired, curve_summaries, args, extractor_sha, pairs=None) -> str:
    """The tables; ``curve_summaries``: {method: summarise_curve(...)} (or one summary: vanilla's);
    ``pairs``: ``other_pairs(...)``."""
    if curve_summaries and all(isinstance(k, int) for k in curve_summaries):
        curve_summaries = {"vanilla": curve_summaries}
    level = f"{args.confidence:.0%}"
    lines = [f"| method | clusters on | timesteps | domain FID | FID - vanilla [{level} CI] | domain KID "
             f"| KID - vanilla | precision | recall |", "|---|---|---|---|---|---|---|---|---|"]
    for method, row in table.items():
        info = METHODS[method]
        diff = paired.get(method)
        lines.append(
            f"| {info['label']} | {info['clusters_on']} | {info['sampling']} | {_mean_sd(row['fid'])} "
            f"| {_difference(diff['fid']) if diff else '-'} | {_mean_sd(row['kid_mean'], digits=4)} "
            f"| {_difference(diff['kid_mean'], digits=4) if diff else '-'} "
            f"| {_mean_sd(row['precision'], digits=3)} | {_mean_sd(row['recall'], digits=3)} |")
    n = len(args.seeds)
    lines += ["", f"Mean ± standard deviation over {n} seeds ({', '.join(map(str, args.seeds))}); differences are "
              f"paired by seed (method - vanilla, same seed), with a {level} Student-t interval over the {n} seeds: "
              "an interval that excludes 0 is a difference the seeds support. "
              f"{args.max_train_steps} steps at batch {args.train_batch_size}, {args.resolution}x{args.resolution} "
              f"(AdamW {args.learning_rate:g}, {schedule_text(args)}, EMA 0.999); {args.num_samples} "
              f"DDIM-{args.num_inference_steps} samples per model "
              f"against {args.num_real} real images. Domain features: MNIST-5k classifier v2, weights sha256 "
              f"{extractor_sha[:12]} (not Inception: not comparable with published FIDs). 'clusters on': the SNR "
              "the ANT clustering uses (log-SNR by default; raw SNR with --raw_snr, as the paper). "
              "'timesteps': uniform draws, or stratified batches (each cluster an equal share)."]
    if pairs:
        lines += ["", f"Other pairs (FID, paired by seed, {level} t interval):", "",
                  f"| comparison | FID difference [{level} CI] |", "|---|---|"]
        lines += [f"| {METHODS[a]['label']} - {METHODS[b]['label']} | {_difference(diff)} |"
                  for (a, b), diff in pairs.items()]
    if curve_summaries:
        methods = list(curve_summaries)
        steps = sorted({step for summary in curve_summaries.values() for step in summary})
        label = "Vanilla FID" if methods == ["vanilla"] else "Domain FID of every row"
        lines += ["", f"{label} over training steps ({args.curve_samples} samples per point, EMA weights, {n} seeds):", "",
                  "| step | " + " | ".join(METHODS[m]["label"] for m in methods) + " |", "|---|" + "---|" * len(methods)]
        lines += [f"| {step} | " + " | ".join(_mean_sd(curve_summaries[m][step]) if step in curve_summaries[m] else "-"
                                          for m in methods) + " |" for step in steps]
        if "vanilla" in curve_summaries and not plateau_judgeable(curve_summaries["vanilla"], PLATEAU_MIN_POINTS):
            lines += ["", f"Vanilla's curve has {len(curve_summaries['vanilla'])} points: too few to judge a plateau "
                      f"(the rule needs {PLATEAU_MIN_POINTS}, three of them in the last fifth; a smaller --curve_every)."]
        elif "vanilla" in curve_summaries:
            found = vanilla_plateau(curve_summaries, args.plateau_tolerance)
            lines += ["", "Vanilla's mean curve: " + (f"**plateau at step {found}** (under {args.plateau_tolerance:.0%} "
                      "change over the last fifth, pretrain_base.py's rule): the rows are compared at convergence."
                      if found is not None else f"**no plateau by step {args.max_train_steps}** (the rule: under "
                      f"{args.plateau_tolerance:.0%} change over the last fifth): the rows are compared before vanilla "
                      "converged.")]
    return "\n".join(lines)


def schedule_text(args) -> str:
    if getattr(args, "decay_from", None) is None:
        return f"{args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps"
    return (f"{args.lr_warmup_steps} warm-up steps, constant to step {args.decay_from}, then warmup_stable_decay's cool-down "
            f"over {args.decay_steps} steps to {args.min_lr_ratio:g} of the rate")


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    check_settings(args)
    command = command_line(argv, script=__file__)
    with invocation_recorded(args, command, started, "benchmark_quality.py") as invocation:
        run(args, invocation)


def run(args, invocation) -> None:
    """Train every (row, seed), score the final models and the curves, write the results (main records
    the invocation when it stops early)."""
    command, started = invocation.command, invocation.started
    config_path = os.path.join(args.output_dir, "bench_unet.json")
    with open(config_path, "w") as f:
        json.dump(BENCH_UNET, f, indent=2)
    runs = [(m, s) for m in args.methods for s in args.seeds]
    estimate = plan(args)
    print(f"{estimate['runs']} training runs of {args.max_train_steps} steps, {estimate['generated_images']} generated "
          f"images; estimated on an idle 2-core CPU: training {estimate['train_seconds'] / 60:.0f} min, "
          f"evaluation {estimate['eval_seconds'] / 60:.0f} min ({args.workers} workers)", flush=True)
    timing = {}
    previous = os.path.join(args.output_dir, "results.json")
    if args.phase == "eval" and os.path.isfile(previous):  # a re-scoring keeps the training's measured time
        with open(previous, encoding="utf-8") as f:
            trained = json.load(f).get("timing", {}).get("train_wall_seconds")
        if trained is not None:
            timing["train_wall_seconds"] = trained
    if args.phase in ("train", "all"):

        def one(run):
            method, seed = run
            run_dir = os.path.join(args.output_dir, method, f"seed-{seed}")
            every = args.curve_every if has_curve(args, method) else None
            status = train_run(train_command(args, method, seed, run_dir, config_path, every), run_dir,
                               f"{method} seed {seed}")
            print(f"trained {method} seed {seed}: {status}", flush=True)

        start = time.time()
        run_parallel(one, runs, args.workers)
        timing["train_wall_seconds"] = round(time.time() - start, 1)
    if args.phase == "train":
        invocation.finished(time.time() - started)
        return
    from diffusers_ant.analysis.evaluate import resolve_feature_extractor

    extractor_sha = resolve_feature_extractor("domain", DATASET).weights_sha256()
    start = time.time()
    results, curves = evaluate_all(args, runs, extractor_sha)
    timing["eval_wall_seconds"] = round(time.time() - start, 1)
    timing["wall_seconds"] = round(time.time() - started, 1)
    # a resumed benchmark's wall time is the sum of its invocations (OUTPUT_DIR/invocations.json)
    timing["all_invocations_wall_seconds"] = round(invocation.finished(timing["wall_seconds"]), 1)
    timing["train_seconds_per_run"] = {}
    for method, seed in runs:
        path = os.path.join(args.output_dir, method, f"seed-{seed}", "train_time.json")
        if os.path.isfile(path):
            with open(path) as f:
                timing["train_seconds_per_run"][f"{method}/seed-{seed}"] = round(json.load(f)["seconds"], 1)

    table, paired = summarise(results, args.confidence)
    curve_summaries = {m: summarise_curve(curve, args.confidence) for m, curve in curves.items()}
    pairs = other_pairs(results, args.confidence)
    text = markdown(table, paired, curve_summaries, args, extractor_sha, pairs)
    print(text)
    if "vanilla" in curves:
        from diffusers_ant.analysis.plots import plot_fid_curve

        plot_fid_curve(curves["vanilla"], os.path.join(args.output_dir, "vanilla_fid_curve.png"),
                       title=f"vanilla: domain FID over training ({args.curve_samples} samples per point)")
    if len(curves) > 1:
        from diffusers_ant.analysis.plots import plot_fid_curves

        plot_fid_curves({METHODS[m]["label"]: summary for m, summary in curve_summaries.items()},
                        os.path.join(args.output_dir, "fid_curves.png"),
                        title=f"domain FID over training, mean over {len(args.seeds)} seeds ({args.curve_samples} samples "
                              "per point)")
    record = {
        "command": command,
        "args": vars(args),
        "methods": {m: METHODS[m] for m in args.methods},
        "feature_extractor": f"domain_{DATASET}",
        "feature_extractor_sha256": extractor_sha,
        "per_run": results,
        "summary": table,
        "paired_vs_vanilla": paired,
        "other_pairs": {f"{a} - {b}": diff for (a, b), diff in pairs.items()},
        "vanilla_curve": {"per_seed": {int(k): v for k, v in curves.get("vanilla", {}).items()},
                          "summary": curve_summaries.get("vanilla", {})},
        "curves": {m: {"per_seed": {int(k): v for k, v in curve.items()}, "summary": curve_summaries[m]}
                   for m, curve in curves.items()},
        "vanilla_plateau_step": vanilla_plateau(curve_summaries, args.plateau_tolerance),
        "vanilla_plateau_judgeable": plateau_judgeable(curve_summaries.get("vanilla", {}), PLATEAU_MIN_POINTS),
        "timing": timing,
    }
    write_json(os.path.join(args.output_dir, "results.json"), record)  # atomically: --phase eval reads it back
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(f"Command: `{command}`\n\n{text}\n")  # (the tables alone did not say what produced them)
    print(f"wrote {os.path.join(args.output_dir, 'results.json')} and results.md "
          f"({timing['wall_seconds'] / 60:.1f} min this invocation)")


if __name__ == "__main__":
    main()
