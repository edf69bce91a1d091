#!/usr/bin/env python
"""ANT's quality benchmark on MNIST-5k at 16x16 (issue 5).

Trains vanilla, Min-SNR, P2 and ANT (UW, PCGrad, Nash-MTL; SNR clustering, k = 5) for the same
number of steps from the same seeds, then samples each model and scores it with the domain FID,
KID and precision / recall (`diffusers_ant.metrics`; a small MNIST classifier's features, *not*
Inception FID). Prints a table of mean and spread per method and writes it as JSON and Markdown.

    python train_scripts/benchmark_quality.py --output_dir bench-quality --seeds 0 1 2

Every run is a real `train_ant.py` process; finished runs and evaluations are kept in the output
folder and skipped when the command is run again, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# The methods compared, as train_ant.py flags (ANT's Table 1-3 line-up).
METHODS = {
    "vanilla": ["--mtl_method", "none"],
    "min_snr": ["--mtl_method", "none", "--loss_weighting", "min_snr", "--snr_gamma", "5"],
    "p2": ["--mtl_method", "none", "--loss_weighting", "p2", "--p2_k", "1", "--p2_gamma", "1"],
    "ant_uw": ["--mtl_method", "uw", "--clustering", "snr", "--num_clusters", "5"],
    "ant_pcgrad": ["--mtl_method", "pcgrad", "--clustering", "snr", "--num_clusters", "5"],
    "ant_nash": ["--mtl_method", "nash_mtl", "--clustering", "snr", "--num_clusters", "5"],
}

# A 0.27M-parameter UNet (ENVIRONMENT.md: about 0.1 s per step at batch 64 on 2 cores), so the
# 18 runs fit in about half an hour of CPU.
BENCH_UNET = {
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="bench-quality")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--num_samples", type=int, default=1000, help="generated (and real) images per evaluation")
    p.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--phase", default="all", choices=["train", "eval", "all"])
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="training runs in parallel, one torch thread each")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.methods = args.methods.split(",")
    return args


def train_run(args, method, seed, run_dir, config_path):
    if os.path.isfile(os.path.join(run_dir, "model_index.json")):
        return "kept"
    cmd = [sys.executable, os.path.join(HERE, "train_ant.py"), "--model_type", "unet",
           "--model_config_name_or_path", config_path, "--dataset_name", "mnist5k", "--resolution", "16",
           "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
           "--learning_rate", str(args.learning_rate), "--lr_scheduler", "cosine", "--lr_warmup_steps", "100",
           "--use_ema", "--ema_max_decay", "0.999", "--seed", str(seed), "--output_dir", run_dir,
           "--checkpointing_steps", str(args.max_train_steps + 1), "--num_validation_images", "16",
           "--report_to", "none", *METHODS[method]]
    # One thread per run, runs in parallel: on a small CPU, two runs with two threads each fight
    # over the cores and each becomes several times slower (measured here: ~10x).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        result = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed: see {os.path.join(run_dir, 'train.log')}")
    with open(os.path.join(run_dir, "train_time.json"), "w") as f:
        json.dump({"seconds": time.time() - start}, f)
    return f"{time.time() - start:.0f}s"


def eval_run(args, run_dir, seed):
    path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    from diffusers_ant.analysis.evaluate import evaluate_pipeline
    from diffusers_ant.models import load_pipeline

    metrics = evaluate_pipeline(load_pipeline(run_dir), "mnist5k", num_samples=args.num_samples, scheduler="ddim",
                                num_inference_steps=args.num_inference_steps, seed=seed, progress=False)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def summarise(results):
    """{method: {metric: (mean, std, n)}} over seeds."""
    table = {}
    for method, per_seed in results.items():
        table[method] = {}
        for key in ("fid", "kid_mean", "precision", "recall"):
            values = np.array([m[key] for m in per_seed.values()], dtype=float)
            table[method][key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                  len(values))
    return table


def markdown(table, args):
    # KID is on the domain classifier's unnormalised features, so its scale is not Inception's.
    lines = ["| method | domain FID (lower is better) | domain KID | precision | recall |",
             "|---|---|---|---|---|"]
    for method, row in table.items():
        fid, kid, prec, rec = (row[k] for k in ("fid", "kid_mean", "precision", "recall"))
        lines.append(f"| {method} | {fid[0]:.2f} ± {fid[1]:.2f} | {kid[0]:.1f} ± {kid[1]:.1f} "
                     f"| {prec[0]:.3f} ± {prec[1]:.3f} | {rec[0]:.3f} ± {rec[1]:.3f} |")
    n = next(iter(table.values()))["fid"][2]
    lines.append("")
    lines.append(f"Mean ± standard deviation over {n} seeds; {args.max_train_steps} steps at batch "
                 f"{args.train_batch_size}; {args.num_samples} samples per model (DDIM-{args.num_inference_steps}).")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    config_path = os.path.join(args.output_dir, "bench_unet.json")
    with open(config_path, "w") as f:
        json.dump(BENCH_UNET, f, indent=2)
    runs = [(m, s) for m in args.methods for s in args.seeds]
    if args.phase in ("train", "all"):
        from concurrent.futures import ThreadPoolExecutor

        def one(run):
            method, seed = run
            status = train_run(args, method, seed, os.path.join(args.output_dir, method, f"seed-{seed}"), config_path)
            print(f"trained {method} seed {seed}: {status}", flush=True)

        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(one, runs))
    if args.phase == "train":
        return
    results = {m: {} for m in args.methods}
    for i, (method, seed) in enumerate(runs, 1):
        results[method][seed] = eval_run(args, os.path.join(args.output_dir, method, f"seed-{seed}"), seed)
        print(f"[{i}/{len(runs)}] {method} seed {seed}: fid {results[method][seed]['fid']:.2f}", flush=True)
    table = summarise(results)
    text = markdown(table, args)
    print(text)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "per_run": results, "summary": table}, f, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
