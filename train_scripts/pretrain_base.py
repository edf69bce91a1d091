#!/usr/bin/env python
"""Train the benchmarks' base model until its domain FID plateaus (issue 17, item 10).

The three papers make their claims about converged models (ANT trains ADM for 1M iterations, DeMe and
Diff-Tuning fine-tune converged pretrained models). This script trains the bench UNet
(`diffusers_ant.analysis.benchmark.BENCH_UNET`, 0.28M parameters, 16x16 MNIST-5k, vanilla objective,
the quality benchmark's recipe: batch 64, AdamW 2e-3 constant after warm-up, EMA 0.999) in segments
of `--segment_steps` updates, scores the EMA model after each segment (domain FID of
`--eval_samples` DDIM samples against all 5,000 real images, the same sampling noise at every
point), and stops at the first step T where training has plateaued:

    the FID changed by under `--tolerance` (2%) over the last fifth of training, [0.8 T, T], read
    off the least-squares line through that fifth's points (one FID point scatters by a few percent),

after at least `--min_points` points. The base is then the EMA model at T, copied to
`OUTPUT_DIR/base` (a diffusers pipeline folder; `benchmark_deme.py --pretrained OUTPUT_DIR/base`
starts from it), with the curve in `curve.json` / `fid_curve.png`.

With `--decay_from S` the learning rate cools down from step S (train_ant.py's `--lr_scheduler
warmup_stable_decay`: half-cosine decay over `--decay_steps`, then held at `--min_lr_ratio` of it, where
the model keeps training). Under the constant rate alone the FID of this model falls like a power of
the step for tens of thousands of steps (docs/benchmark_base), so no 2% plateau comes within the
budget; the cool-down is how converged models are finished. The steps before S are exactly the
constant-rate run's, so a cool-down continues a finished constant-rate search in its own folder.

Resumable: each segment continues the run exactly from its last checkpoint (`--resume_from_checkpoint
latest` with a larger `--max_train_steps`), a scored point is never scored again, and a finished
search is reported, not repeated. While segment k+1 trains (one thread), segment k is scored in a
worker process (one thread): the two cores stay busy. The plateau may therefore be found one segment
before training stops; the base is the model at the plateau step, not the last one trained.

    python train_scripts/pretrain_base.py --output_dir bench-base
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from diffusers_ant.analysis.benchmark import (  # noqa: E402
    BENCH_UNET,
    DATASET,
    PLATEAU_MIN_POINTS,
    RESOLUTION,
    cooldown_schedule,
    evaluate_saved_model,
    evaluation_pool,
    plateau_step,
    run_logged,
    schedule_flags,
    write_json,
)
from diffusers_ant.cli import OneLineErrorParser, check_output_paths  # noqa: E402
from diffusers_ant.files import folder_written_atomically  # noqa: E402


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.splitlines()[1])
    p.add_argument("--output_dir", default="bench-base")
    p.add_argument("--resolution", type=int, default=RESOLUTION,
                   help=f"image side (default {RESOLUTION}, the quality benchmark's). At 16 the bench UNet's FID "
                        "still fell by a quarter over the last fifth of 20,000 steps (65 minutes here; "
                        "docs/benchmark_base/curve.json); at 8 a step costs half as much and the data is simpler")
    p.add_argument("--seed", type=int, default=1000, help="training seed of the base (default 1000, as benchmark_deme.py)")
    p.add_argument("--segment_steps", type=int, default=500, help="updates between two FID points (default 500)")
    p.add_argument("--max_train_steps", type=int, default=20000,
                   help="give up (and say so) if no plateau is found by then (default 20000)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="plateau: the least-squares line through the last fifth's FID points changes by less than "
                        "this fraction over that fifth (default 0.02)")
    p.add_argument("--min_points", type=int, default=PLATEAU_MIN_POINTS, help="FID points needed before a plateau can be declared")
    p.add_argument("--eval_samples", type=int, default=1000, help="generated images per FID point (default 1000)")
    p.add_argument("--num_real", type=int, default=5000, help="real MNIST-5k images of the reference (default all)")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps of the samples (default 50)")
    p.add_argument("--eval_batch_size", type=int, default=250)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    p.add_argument("--decay_from", type=int, default=None,
                   help="cool down from this step on (train_ant.py's --lr_scheduler warmup_stable_decay): a half-cosine "
                        "decay of the learning rate over --decay_steps, then held at --min_lr_ratio times it. Default: "
                        "none, a constant rate. The steps before it are those of the constant-rate run, so a cool-down "
                        "can be added to a finished constant-rate search in the same --output_dir")
    p.add_argument("--decay_steps", type=int, default=5000, help="length of the cool-down (default 5000)")
    p.add_argument("--min_lr_ratio", type=float, default=0.05,
                   help="learning rate after the cool-down, as a fraction of --learning_rate (default 0.05); the "
                        "model keeps training there, so a plateau is the model's, not a frozen one's")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: segments of 5 steps, 64 DDIM-5 samples, at most 30 steps (seconds, not hours)")
    args = p.parse_args(argv)
    if args.quick:
        args.segment_steps, args.max_train_steps, args.min_points = 5, 30, 3
        args.eval_samples, args.num_inference_steps, args.eval_batch_size, args.num_real = 64, 5, 64, 256
        args.lr_warmup_steps, args.tolerance = 2, 0.9  # a smoke run checks the machinery, not a plateau
    for name in ("segment_steps", "max_train_steps", "min_points", "eval_samples", "eval_batch_size", "train_batch_size",
                 "num_real"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if not args.learning_rate > 0:  # (train_ant.py refuses it too, but only as the first segment's failed run)
        p.error(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.num_real > 5000:  # the reference is drawn from MNIST-5k's rows: found by the first point's scoring before
        p.error(f"--num_real {args.num_real}: {DATASET} has 5,000 images, give at most 5000")
    check_output_paths(p, ("--output_dir", args.output_dir, True))
    if args.resolution < 8 or args.resolution % 4:
        p.error("--resolution must be a multiple of 4 and at least 8 (the bench UNet halves it twice)")
    if not 0 < args.tolerance < 1:
        p.error("--tolerance must lie in (0, 1), e.g. 0.02 for 2%")
    if args.decay_from is not None and (args.decay_from < args.lr_warmup_steps or args.decay_steps < 1):
        p.error("--decay_from must be at least --lr_warmup_steps and --decay_steps at least 1")
    if not 0 <= args.min_lr_ratio < 1:
        p.error("--min_lr_ratio must lie in [0, 1)")
    if args.eval_samples % args.eval_batch_size:
        p.error("--eval_samples must be a multiple of --eval_batch_size")
    return args


def train_command(args, run_dir: str, config_path: str, steps: int) -> list:
    """train_ant.py up to `steps` updates, continuing the run's last checkpoint (none: from scratch)."""
    return [sys.executable, os.path.join(HERE, "train_ant.py"), "--model_type", "unet",
            "--model_config_name_or_path", config_path, "--dataset_name", DATASET, "--resolution", str(args.resolution),
            "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(steps),
            "--learning_rate", str(args.learning_rate), *schedule_flags(schedule(args)), "--use_ema", "--ema_max_decay", "0.999",
            "--seed", str(args.seed), "--output_dir", run_dir, "--checkpointing_steps", str(args.segment_steps),
            "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest",
            "--num_validation_images", "16", "--num_inference_steps", str(args.num_inference_steps),
            "--report_to", "none", "--mtl_method", "none"]


def schedule(args) -> dict:
    """The learning-rate schedule of the run, as train_ant.py's flags (without dashes)."""
    return cooldown_schedule("constant_with_warmup", args.lr_warmup_steps, args.decay_from, args.decay_steps,
                             args.min_lr_ratio)


def eval_settings(args) -> dict:
    """What a point's FID depends on besides the weights (`evaluate_saved_model` reads these)."""
    return {"num_samples": args.eval_samples, "num_inference_steps": args.num_inference_steps,
            "eval_batch_size": args.eval_batch_size, "reference_dataset": DATASET, "num_real": args.num_real,
            "resolution": args.resolution, "num_channels": 1, "features": DATASET}


def training_settings(args) -> dict:
    """What the trained weights depend on besides the schedule (recorded in curve.json; a rerun with others is
    refused: it reported the base of the earlier settings as this command's)."""
    return {"seed": args.seed, "learning_rate": args.learning_rate, "train_batch_size": args.train_batch_size,
            "segment_steps": args.segment_steps, "resolution": args.resolution}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    config_path = os.path.join(args.output_dir, "bench_unet.json")
    with open(config_path, "w") as f:
        json.dump(BENCH_UNET, f, indent=2)
    run_dir = os.path.join(args.output_dir, "run")
    models_dir = os.path.join(args.output_dir, "models")
    curve_path = os.path.join(args.output_dir, "curve.json")
    settings, lr_schedule, training = eval_settings(args), schedule(args), training_settings(args)
    curve = {}
    if os.path.isfile(curve_path):
        with open(curve_path) as f:
            saved = json.load(f)
        recorded = saved.get("training", {})  # (a folder written before these were recorded: not checked)
        changed = [f"--{key} {recorded[key]} -> {value}" for key, value in training.items()
                   if key in recorded and recorded[key] != value]
        if changed:
            print(f"{args.output_dir} was trained with other settings ({', '.join(changed)}): give the same flags to "
                  "continue it, or another --output_dir", file=sys.stderr)
            return 2
        if saved.get("settings") == settings:  # the same evaluation: keep its points
            curve = {int(k): v for k, v in saved["points"].items()}
        # A folder written before the schedule was recorded trained at a constant rate after warm-up.
        before = saved.get("schedule", {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": args.lr_warmup_steps})
        trained = max([int(k) for k in saved.get("points", {})] + [0])
        from diffusers_ant.training.checkpoint import schedule_difference

        differs = schedule_difference(before, lr_schedule, trained + 1)
        if differs is not None:
            print(f"{args.output_dir} was trained to step {trained} with the schedule {before}, and this one changes the "
                  f"learning rate from step {differs}: give --decay_from at or after {trained}, or another --output_dir",
                  file=sys.stderr)
            return 2
    started = time.time()

    def record(step, metrics):
        curve[step] = metrics["fid"]
        found = plateau_step(curve, args.tolerance, args.min_points)
        write_json(curve_path, {"settings": settings, "schedule": lr_schedule, "training": training,
                                "tolerance": args.tolerance, "min_points": args.min_points,
                                "segment_steps": args.segment_steps, "points": {str(k): curve[k] for k in sorted(curve)},
                                "plateau_step": found, "command": " ".join(sys.argv)})
        print(f"step {step}: FID {metrics['fid']:.3f}" + (f" -> plateau at step {found}" if found else ""), flush=True)
        return found

    found = plateau_step(curve, args.tolerance, args.min_points)
    with evaluation_pool(1) as pool:
        pending = None  # (step, future) of the point being scored while the next segment trains
        step = 0
        while found is None and step < args.max_train_steps:
            step = min(step + args.segment_steps, args.max_train_steps)
            saved = os.path.join(models_dir, f"step-{step}")
            if step not in curve and not os.path.isfile(os.path.join(saved, "model_index.json")):
                status = run_logged(train_command(args, run_dir, config_path, step),
                                    os.path.join(args.output_dir, "logs", f"train-{step}.log"), [],
                                    f"training to step {step}")
                # the run's folder holds the EMA pipeline at `step`: keep a copy, the next segment overwrites it.
                # Copied beside and renamed: a kill mid-copy left a model_index.json without all the weights,
                # which the next start took for a finished step and failed to load every time
                with folder_written_atomically(saved, replace=True) as partial:
                    shutil.copytree(run_dir, partial, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("checkpoint-*", "logs", "samples*"))
                print(f"trained to step {step} ({status}, {time.time() - started:.0f}s so far)", flush=True)
            if pending is not None:
                found = record(pending[0], pending[1].result())
                pending = None
                if found is not None:
                    break
            if step not in curve:
                task = {"model": saved, "seed": 0, "settings": settings,
                        "path": os.path.join(args.output_dir, "points", f"step-{step}.json")}
                pending = (step, pool.submit(evaluate_saved_model, task))
        if pending is not None and found is None:
            found = record(pending[0], pending[1].result())

    if found is None:
        print(f"no plateau by step {args.max_train_steps} (tolerance {args.tolerance:.0%}): raise --max_train_steps "
              f"and run again; the points so far are in {curve_path}", flush=True)
    else:
        base = os.path.join(args.output_dir, "base")
        # beside and renamed, replacing an older base whole (a kill mid-copy left a model_index.json over partial
        # weights, and an older base's files stayed in it)
        with folder_written_atomically(base, replace=True) as partial:
            shutil.copytree(os.path.join(models_dir, f"step-{found}"), partial, dirs_exist_ok=True)
        print(f"base model: {base} (EMA weights at step {found}, FID {curve[found]:.3f})", flush=True)
    from diffusers_ant.analysis.plots import plot_fid_curve

    plot_fid_curve({step: {str(args.seed): {"fid": fid}} for step, fid in curve.items()},
                   os.path.join(args.output_dir, "fid_curve.png"),
                   title=f"bench UNet on {DATASET} {args.resolution}x{args.resolution}: domain FID of {args.eval_samples} "
                         f"samples (EMA)" + (f", plateau at step {found}" if found else ""))
    return 0 if found is not None else 1


if __name__ == "__main__":
    sys.exit(main())
