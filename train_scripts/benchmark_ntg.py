#!/usr/bin/env python
"""ANT's observation O2 on MNIST-5k (16x16 by default): the negative transfer gap of each timestep interval.

For every seed it trains the all-timestep model (vanilla, the recipe of `benchmark_quality.py`) and
one model per interval trained only on that interval (`train_ant.py --timestep_range t1 t2`), then
runs `analyze.py ntg` (each interval model swapped in for the steps of its interval, the base model
for the rest, both sampled from the same noise). The gap of an interval is

    NTG([t1, t2]) = FID(mixed samples) - FID(base samples),   < 0: negative transfer (ANT, Sec. 3.2),

one value per seed, reported as the mean over seeds with a Student-t confidence interval and drawn
as bars with those intervals (`ntg_summary.png`). The intervals are the paper's: k equal intervals
of the T = 1000 training timesteps ([0, 199], ..., [800, 999] for k = 5; 0-based).

    python train_scripts/benchmark_ntg.py --output_dir bench-ntg --base_dir bench-quality/vanilla
    python train_scripts/benchmark_ntg.py --output_dir bench-ntg-smoke --quick
    python train_scripts/benchmark_ntg.py --output_dir bench-ntg-8 --base_dir bench-quality-8/vanilla \
        --resolution 8 --max_train_steps 4000 --decay_from 2000 --decay_steps 1000 --min_lr_ratio 0.05

The recipe flags (`--resolution`, the schedule) are those of `benchmark_quality.py`: the interval models
must be trained as the base models they are swapped into, and a `--base_dir` whose quality run recorded
another recipe (its `benchmark_settings.json`) is refused.

`--base_dir` reuses the vanilla runs of `benchmark_quality.py` (its `seed-N` folders, same recipe,
same seeds) instead of training them again.

`--pretrained FOLDER` measures the gap where the paper measures it, on a converged model (issue 17,
item 10: the converged base of `pretrain_base.py`, `docs/benchmark_base/r8/base`). Training a converged
specialist from scratch per interval costs the base's own 55,000 steps five times over, so every model
starts from the converged one instead: per seed, the base is it fine-tuned `--max_train_steps` on all
timesteps and each interval model it fine-tuned as many steps on its interval only. Both take the same
number of extra steps, but a specialist spends them on a fifth of the timesteps (five times the updates
per timestep), so part of a gap may be that extra training; the resolution is the pretrained model's:

    python train_scripts/benchmark_ntg.py --output_dir bench-ntg-converged \
        --pretrained docs/benchmark_base/r8/base --learning_rate 1e-4 --lr_warmup_steps 20

Runs and evaluations are kept and skipped when the command is run again; an evaluation is redone when its settings or the feature extractor change.
Outputs: `results.json` (every seed's gaps, the summary, settings, hashes, times), `results.md`,
`ntg_summary.png`, and per seed `seed-N/ntg.json` / `ntg.png` from `analyze.py ntg`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmark_quality as quality  # noqa: E402  (the training recipe and the planning figures)
from diffusers_ant.analysis.benchmark import (  # noqa: E402
    RunFailed,
    base_resolution,
    changed_benchmark_settings,
    check_benchmark_settings,
    command_line,
    folder_weights_sha256,
    resolution_cost_factor,
    write_json,
)

NUM_TRAIN_TIMESTEPS = 1000  # the bench UNet's scheduler (the pixel preset); analyze.py checks the bounds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="bench-ntg")
    p.add_argument("--base_dir", default=None,
                   help="folder with the base (all-timestep) models as seed-N subfolders, e.g. bench-quality/vanilla; "
                        "default: train them under OUTPUT_DIR/base")
    p.add_argument("--pretrained", default=None,
                   help="a saved pipeline folder (e.g. the converged base docs/benchmark_base/r8/base): every model, "
                        "the all-timestep base included, is fine-tuned from it for --max_train_steps, at its resolution "
                        "(default: trained from scratch)")
    p.add_argument("--num_intervals", type=int, default=5, help="k equal timestep intervals (default 5, as ANT)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_train_steps", type=int, default=1000, help="for the base and every interval model")
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--lr_scheduler", default="constant_with_warmup")
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    quality.add_recipe_arguments(p)  # --decay_from / --decay_steps / --min_lr_ratio / --resolution, as the base's
    p.add_argument("--num_samples", type=int, default=2000, help="generated images per sample set (default 2000)")
    p.add_argument("--num_real", type=int, default=5000, help="real images of the reference (default: all 5000)")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--eval_batch_size", type=int, default=256)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--phase", default="all", choices=["train", "eval", "all"])
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 seeds, 2 intervals, 40 steps, 128 samples with DDIM-10")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds if args.seeds != [0, 1, 2] else [0, 1]
        args.num_intervals = 2 if args.num_intervals == 5 else args.num_intervals
        args.max_train_steps, args.lr_warmup_steps = 40, 10
        args.num_samples, args.num_inference_steps, args.eval_batch_size = 128, 10, 128
    if len(set(args.seeds)) < 2:
        p.error("give at least 2 --seeds: the intervals are over seeds")
    if args.pretrained is not None:
        if args.base_dir:
            p.error("--pretrained trains the base models here, from it: leave out --base_dir")
        if not os.path.isfile(os.path.join(args.pretrained, "model_index.json")):
            p.error(f"--pretrained {args.pretrained}: no pipeline folder there (model_index.json); give a saved model")
        resolution = base_resolution(args.pretrained)
        if "--resolution" in (argv if argv is not None else sys.argv[1:]) and args.resolution != resolution:
            p.error(f"--resolution {args.resolution}: --pretrained {args.pretrained} is {resolution}x{resolution}; "
                    "leave --resolution out")
        args.resolution = resolution
    quality.check_recipe_arguments(p, args)
    if not 1 <= args.num_intervals <= NUM_TRAIN_TIMESTEPS:
        p.error(f"--num_intervals must be in 1..{NUM_TRAIN_TIMESTEPS}")
    for name in ("max_train_steps", "train_batch_size", "num_samples", "num_real", "num_inference_steps",
                 "eval_batch_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if not 0 < args.confidence < 1:
        p.error("--confidence must be in (0, 1)")
    args.methods = ["vanilla"]  # what benchmark_quality.train_command reads besides the recipe
    return args


def equal_intervals(k, num_timesteps=NUM_TRAIN_TIMESTEPS) -> list:
    """k contiguous inclusive intervals covering 0..T-1, sizes differing by at most one (ANT's Fig. 2)."""
    edges = [round(i * num_timesteps / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(k)]


def base_dir(args, seed) -> str:
    root = args.base_dir or os.path.join(args.output_dir, "base")
    return os.path.join(root, f"seed-{seed}")


def interval_dir(args, seed, interval) -> str:
    return os.path.join(args.output_dir, f"seed-{seed}", f"interval-{interval[0]}-{interval[1]}")


def plan(args) -> dict:
    runs = len(args.seeds) * (args.num_intervals + (0 if args.base_dir else 1))
    scale = resolution_cost_factor(args.resolution)  # the figures are 16x16's
    train = runs * (quality.SECONDS_PER_STEP["vanilla"] * scale * args.max_train_steps + quality.SECONDS_PER_RUN)
    images = len(args.seeds) * (args.num_intervals + 1) * args.num_samples
    evaluate = images * args.num_inference_steps * quality.SECONDS_PER_IMAGE_STEP * scale + 30 * len(args.seeds)
    return {"runs": runs, "generated_images": images, "train_seconds": train / args.workers,
            "eval_seconds": evaluate / args.workers}


def training_settings(args) -> dict:
    """The quality benchmark's recipe, and the model every run starts from (none: from scratch)."""
    pretrained = None if args.pretrained is None else os.path.abspath(args.pretrained)
    return {**quality.training_settings(args), "pretrained": pretrained,
            "pretrained_weights": folder_weights_sha256(pretrained)}


def train_command(args, seed, run_dir, config_path) -> list:
    """train_ant.py for one model: the quality benchmark's vanilla command, started from --pretrained
    instead of the bench UNet's config where one is given."""
    cmd = quality.train_command(args, "vanilla", seed, run_dir, config_path)
    if args.pretrained is not None:
        i = cmd.index("--model_config_name_or_path")
        cmd[i:i + 2] = ["--pretrained_model_name_or_path", args.pretrained]
    return cmd


def check_training_settings(args) -> None:
    """The interval models are swapped into the base model's sampling: they must be trained with its recipe.
    Refuses an OUTPUT_DIR whose kept runs had another recipe, and a --base_dir from a quality run
    (its parent's benchmark_settings.json) trained with another one, in one line each."""
    settings = training_settings(args)
    check_benchmark_settings(args.output_dir, settings, "benchmark_ntg.py")
    if args.base_dir:
        changed = changed_benchmark_settings(os.path.dirname(os.path.abspath(args.base_dir)), settings)
        if changed:
            raise SystemExit(f"benchmark_ntg.py: error: --base_dir {args.base_dir} was trained with another recipe "
                             f"({'; '.join(f'--{k} {old!r} there, {new!r} here' for k, old, new in changed)}): "
                             "give the flags of its run")


def ntg_command(args, seed, folders, output) -> list:
    return [sys.executable, os.path.join(HERE, "analyze.py"), "ntg", "--base", base_dir(args, seed),
            "--interval_models", *folders, "--dataset_name", quality.DATASET, "--num_samples", str(args.num_samples),
            "--num_real", str(args.num_real), "--num_inference_steps", str(args.num_inference_steps),
            "--batch_size", str(args.eval_batch_size), "--seed", str(seed), "--output", output,
            "--plot", output.replace(".json", ".png"), "--no_progress", "--num_threads", "1"]


def evaluate_seed(args, seed, intervals, extractor_sha) -> dict:
    """`analyze.py ntg` for one seed (kept when its settings and the extractor's hash match)."""
    out = os.path.join(args.output_dir, f"seed-{seed}", "ntg.json")
    settings = {"num_samples": args.num_samples, "num_real": args.num_real, "num_inference_steps": args.num_inference_steps,
                "eval_batch_size": args.eval_batch_size, "intervals": [list(i) for i in intervals],
                "base": os.path.abspath(base_dir(args, seed))}
    if os.path.isfile(out):
        with open(out) as f:
            stored = json.load(f)
        if stored.get("benchmark_settings") == settings and stored.get("feature_extractor_sha256") == extractor_sha:
            return stored
    folders = [interval_dir(args, seed, interval) for interval in intervals]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    log_path = os.path.join(args.output_dir, f"seed-{seed}", "ntg.log")
    with open(log_path, "w") as log:
        result = subprocess.run(ntg_command(args, seed, folders, out), stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RunFailed(f"analyze.py ntg failed for seed {seed}: see {log_path}")
    with open(out) as f:
        data = json.load(f)
    data.update(benchmark_settings=settings, seconds=round(time.time() - start, 1))
    write_json(out, data)
    return data


def summarise(per_seed, intervals, confidence) -> dict:
    """Per interval: the gap over seeds (mean, t interval, per-seed values); and the base FID over seeds."""
    from diffusers_ant.analysis.stats import t_interval

    rows = []
    for i, interval in enumerate(intervals):
        gaps = {seed: data["intervals"][i]["ntg"] for seed, data in per_seed.items()}
        gap = t_interval(list(gaps.values()), confidence)
        gap["differences"] = list(gaps.values())
        gap["seeds"] = list(gaps)
        rows.append({"interval": list(interval), "gap": gap,
                     "fid_mixed": t_interval([d["intervals"][i]["fid"] for d in per_seed.values()], confidence)})
    base = t_interval([d["base"]["fid"] for d in per_seed.values()], confidence)
    return {"intervals": rows, "base_fid": base, "confidence": confidence}


def markdown(summary, args, extractor_sha) -> str:
    level = f"{args.confidence:.0%}"
    lines = [f"| interval [t1, t2] | NTG = FID(mixed) - FID(base), mean [{level} CI] | per seed | reading |",
             "|---|---|---|---|"]
    for row in summary["intervals"]:
        gap = row["gap"]
        if gap["low"] is None:
            cell, reading = f"{gap['mean']:+.3f} (no interval)", "undetermined"
        else:
            cell = f"{gap['mean']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]"
            reading = ("negative transfer" if gap["high"] < 0 else "positive gap" if gap["low"] > 0
                       else "no gap resolved")
        seeds = ", ".join(f"{v:+.2f}" for v in gap["differences"])
        lines.append(f"| [{row['interval'][0]}, {row['interval'][1]}] | {cell} | {seeds} | {reading} |")
    base = summary["base_fid"]
    if args.pretrained is None:
        trained = f"Each interval model trained {args.max_train_steps} steps on its interval only, at "
    else:
        trained = (f"Every model fine-tuned {args.max_train_steps} steps from {args.pretrained} (the base on all "
                   f"timesteps, each interval model on its interval only) at learning rate {args.learning_rate:g}, at ")
    lines += ["", f"Base (all timesteps) domain FID {base['mean']:.3f} ± {base['sd'] or 0:.3f} over {base['n']} seeds. "
              f"{trained}"
              f"{args.resolution}x{args.resolution} ({quality.schedule_text(args)}); "
              f"{args.num_samples} DDIM-{args.num_inference_steps} samples per set, both sets from the same noise, "
              f"against {args.num_real} real images; domain features sha256 {extractor_sha[:12]}. "
              f"Intervals: Student-t over {len(args.seeds)} seeds."]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args, argv)
    except RunFailed as err:  # a training or evaluation run failed: its log says why, and the finished ones are kept
        raise SystemExit(f"benchmark_ntg.py: error: {err}; fix it and run the same command again to resume") from None


def run(args, argv=None):
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    check_training_settings(args)
    config_path = os.path.join(args.output_dir, "bench_unet.json")
    with open(config_path, "w") as f:
        json.dump(quality.BENCH_UNET, f, indent=2)
    intervals = equal_intervals(args.num_intervals)
    estimate = plan(args)
    print(f"{estimate['runs']} training runs, {estimate['generated_images']} generated images; estimated on an idle "
          f"2-core CPU: training {estimate['train_seconds'] / 60:.0f} min, evaluation "
          f"{estimate['eval_seconds'] / 60:.0f} min ({args.workers} workers); intervals {intervals}", flush=True)
    timing = {}
    if args.phase in ("train", "all"):
        jobs = []
        for seed in args.seeds:
            if args.base_dir and not os.path.isfile(os.path.join(base_dir(args, seed), "model_index.json")):
                raise SystemExit(f"--base_dir {args.base_dir}: no trained model in {base_dir(args, seed)}")
            if not args.base_dir:
                jobs.append((base_dir(args, seed), seed, [], f"base seed {seed}"))
            for interval in intervals:
                jobs.append((interval_dir(args, seed, interval), seed, ["--timestep_range", str(interval[0]), str(interval[1])],
                             f"interval {interval} seed {seed}"))

        def one(job):
            run_dir, seed, extra, what = job
            cmd = train_command(args, seed, run_dir, config_path) + extra
            print(f"trained {what}: {quality.train_run(cmd, run_dir, what)}", flush=True)

        start = time.time()
        quality.run_parallel(one, jobs, args.workers)
        timing["train_wall_seconds"] = round(time.time() - start, 1)
    if args.phase == "train":
        return
    from diffusers_ant.analysis.evaluate import resolve_feature_extractor

    extractor_sha = resolve_feature_extractor("domain", quality.DATASET).weights_sha256()
    start = time.time()
    results = quality.run_parallel(lambda seed: evaluate_seed(args, seed, intervals, extractor_sha), args.seeds,
                                   args.workers)
    per_seed = dict(zip(args.seeds, results))
    timing["eval_wall_seconds"] = round(time.time() - start, 1)
    timing["wall_seconds"] = round(time.time() - started, 1)
    summary = summarise(per_seed, intervals, args.confidence)
    summary["feature_extractor"] = f"domain_{quality.DATASET} features {extractor_sha[:8]}"
    text = markdown(summary, args, extractor_sha)
    print(text)
    from diffusers_ant.analysis.plots import plot_ntg_summary

    plot_ntg_summary(summary, os.path.join(args.output_dir, "ntg_summary.png"))
    command = command_line(argv, script=__file__)  # (a list was stored when main was given argv)
    record = {"command": command,
              "args": vars(args), "intervals": [list(i) for i in intervals], "feature_extractor": f"domain_{quality.DATASET}",
              "feature_extractor_sha256": extractor_sha, "per_seed": per_seed, "summary": summary, "timing": timing}
    write_json(os.path.join(args.output_dir, "results.json"), record)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(f"Command: `{command}`\n\n{text}\n")
    print(f"wrote {os.path.join(args.output_dir, 'results.json')}, results.md and ntg_summary.png "
          f"({timing['wall_seconds'] / 60:.1f} min this invocation)")


if __name__ == "__main__":
    main()
