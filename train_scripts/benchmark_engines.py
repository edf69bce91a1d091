"""Per-process memory of the trained weights, gradients and optimizer state under DDP, FSDP2, ZeRO-2 and
ZeRO-3 (issue 18, item 4), measured through `train_ant.py` itself.

    python train_scripts/benchmark_engines.py --output_dir docs/benchmark_engines      # sd3, 4 engines
    python train_scripts/benchmark_engines.py --quick --engines ddp,fsdp2 --output_dir q  # a smoke test

For each model type (`--model_type sd3` by default, full fine-tuning of the tiny preset's denoiser: where
sharding matters) and each engine, one short `accelerate launch --num_processes 2` run of the trainer
(the configs of `examples/accelerate/`; ZeRO-3 from a JSON config that shards every parameter, since
DeepSpeed keeps parameters under 1e5 elements whole by default, which is all of a tiny model) with
`DIFFUSERS_ANT_MEMORY_REPORT=1`: the trainer's hook (`diffusers_ant/training/memory_report.py`, its
docstring says what it counts and why there) writes each process's bytes to `memory_rank<r>.json`. No
training loop here: the launches are the trainer's own.

Derived: bytes per trained parameter per process (each part divided by the denoiser's parameter count),
and, multiplied by the real denoiser's parameter count (`benchmark_families`' constants) and rescaled from
2 processes to `--scale_processes` (8) by the measured sharded fraction, an **estimate** of each GPU's
parameters + gradients + AdamW state for SD3.5-Large and FLUX.1-dev in fp32 training. Activations,
communication buckets, frozen encoders and the CUDA context are excluded. The peak RSS of each process
is recorded too; at the tiny size it is dominated by the libraries (torch, diffusers, DeepSpeed).

Output: `benchmark_engines.json` and `benchmark_engines.md` in `--output_dir`, with the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_families import (  # noqa: E402
    FLUX1_DEV_TRANSFORMER_PARAMS,
    SD35_LARGE_TRANSFORMER_PARAMS,
    write_report,
)

TRAIN_SCRIPT = str(REPO / "train_scripts" / "train_ant.py")
CONFIGS = REPO / "examples" / "accelerate"
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
DEEPSPEED_ENGINES = ("zero2", "zero3")
PARTS = ("model_parameters", "master_parameters", "gradients", "optimizer_state")
# FSDP2 wraps each block of the denoiser (examples/accelerate/fsdp.yaml names the UNets' ResnetBlock2D)
FSDP_BLOCKS = {"sd3": "JointTransformerBlock", "unet": "ResnetBlock2D", "sdxl": "ResnetBlock2D",
               "flux": "FluxTransformerBlock,FluxSingleTransformerBlock", "qwenimage": "QwenImageTransformerBlock"}
REAL = {"SD3.5-Large": SD35_LARGE_TRANSFORMER_PARAMS, "FLUX.1-dev": FLUX1_DEV_TRANSFORMER_PARAMS}
# ZeRO-3 with every parameter sharded (as tests/test_deepspeed.py runs it); the rest "auto", from the flags
ZERO3_CONFIG = CONFIGS / "deepspeed_zero3_every_parameter.json"


def available_engines(engines, skipped: dict) -> list:
    """`engines` without the DeepSpeed ones where DeepSpeed is not installed, each recorded in `skipped`."""
    if importlib.util.find_spec("deepspeed") is not None:
        return list(engines)
    for engine in engines:
        if engine in DEEPSPEED_ENGINES:
            skipped[engine] = "DeepSpeed is not installed (make test-deepspeed installs it)"
    return [engine for engine in engines if engine not in DEEPSPEED_ENGINES]


def launch_env(engine, **extra) -> dict:
    """The environment of a two-process launch: offline, one torch thread per process, the repository (and,
    for a DeepSpeed engine, DeepSpeed, which may live outside the environment: a --target folder) on the path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", **extra)
    paths = [str(REPO)]
    if engine in DEEPSPEED_ENGINES:
        paths.append(os.path.dirname(os.path.dirname(importlib.util.find_spec("deepspeed").origin)))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def launcher_flags(engine, model_type) -> list:
    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0"]  # a free port
    if engine == "ddp":
        return ["--config_file", str(CONFIGS / "ddp.yaml"), *common]
    if engine == "fsdp2":
        return ["--config_file", str(CONFIGS / "fsdp.yaml"), *common,
                "--fsdp_transformer_layer_cls_to_wrap", FSDP_BLOCKS[model_type]]
    if engine == "zero2":
        return ["--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), *common]
    return ["--use_deepspeed", "--deepspeed_config_file", str(ZERO3_CONFIG), *common]


def trainer_args(model_type, opts, output_dir) -> list:
    dataset = "mnist5k" if model_type == "unet" else "mnist5k_captions"  # the text-to-image families need captions
    return ["--model_type", model_type, "--model_config_name_or_path", "tiny", "--dataset_name", dataset,
            "--train_batch_size", str(opts.batch_size), "--max_train_samples", str(4 * opts.batch_size),
            "--max_train_steps", str(opts.steps), "--checkpointing_steps", "1000", "--num_clusters", "4",
            "--mtl_method", "none", "--learning_rate", "1e-4", "--seed", "0", "--report_to", "none",
            "--num_validation_images", "1", "--num_inference_steps", "1", "--output_dir", str(output_dir)]


def launch(engine, model_type, opts) -> dict:
    """One two-process run; returns the per-process records it wrote (rank order) and its wall time."""
    out = Path(opts.work_dir) / f"{model_type}_{engine}"
    out.mkdir(parents=True, exist_ok=True)
    env = launch_env(engine, DIFFUSERS_ANT_MEMORY_REPORT="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_flags(engine, model_type),
               TRAIN_SCRIPT, *trainer_args(model_type, opts, out)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=opts.timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{engine} ({model_type}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    records = []
    for rank in range(2):
        with open(out / f"memory_rank{rank}.json") as f:
            records.append(json.load(f))
    return {"processes": records, "wall_seconds": round(seconds, 1)}


def summarize(records) -> dict:
    """Per-engine figures from the per-process records: the largest process's bytes (the one that must fit)."""
    parameters = records[0]["full_parameter_elements"]
    worst = {part: max(r[part] for r in records) for part in PARTS}
    worst["total"] = sum(worst[part] for part in PARTS)
    per_param = {part: worst[part] / parameters for part in (*PARTS, "total")}
    return {"trained_parameters": parameters, "bytes_per_process": worst, "bytes_per_trained_parameter": per_param,
            "peak_rss_mb": [round(r["peak_rss_bytes"] / 2**20, 1) for r in records]}


def scaled_per_parameter(engine_summary, ddp_summary, processes: int) -> dict:
    """Bytes per trained parameter on each of `processes` processes. Each part's measured ratio to DDP's (which
    keeps everything whole) on 2 processes is split into a whole share and a sharded share (1 / 2 of the
    whole), and the sharded share divided by `processes` instead: ratio r = w + (1 - w) / 2, so
    w = 2 r - 1 and at N processes r_N = w + (1 - w) / N. The whole per-parameter size is DDP's, except for
    DeepSpeed's master weights, which DDP has not: they are sharded from the start (ratio to fp32: 1/2)."""
    out = {}
    for part in PARTS:
        measured = engine_summary["bytes_per_trained_parameter"][part]
        whole = ddp_summary["bytes_per_trained_parameter"][part] or (4.0 if measured else 0.0)  # fp32 master
        if not whole:
            out[part] = 0.0
            continue
        ratio = measured / whole
        kept_whole = min(max(2 * ratio - 1, 0.0), 1.0)
        out[part] = whole * (kept_whole + (1 - kept_whole) / processes)
    out["total"] = sum(out[part] for part in PARTS)
    return out


def markdown(report) -> str:
    lines = [f"Command: `{report['command']}`", "",
             f"{report['device']}, torch {report['torch']}, two processes "
             f"({'gloo' if report['device'] == 'cpu' else 'nccl'}), fp32, {report['steps']} steps of "
             f"batch {report['batch_size']} per process, full fine-tuning of the denoiser.", ""]
    for model_type, result in report["models"].items():
        engines = result["engines"]
        first = next(iter(engines.values()))
        lines += [f"**{model_type}** tiny preset, {first['trained_parameters']:,} trained parameters; MiB (2^20 bytes) "
                  "per process (the larger of the two), measured:", "",
                  "| engine | parameters | master weights | gradients | AdamW state | total | bytes / param | "
                  "peak RSS MiB (rank 0, 1) |", "|---|---|---|---|---|---|---|---|"]
        for engine, s in engines.items():
            b = s["bytes_per_process"]
            mb = [f"{b[p] / 2**20:.2f}" for p in (*PARTS, "total")]
            lines.append(f"| {engine} | {' | '.join(mb)} | {s['bytes_per_trained_parameter']['total']:.2f} | "
                         f"{', '.join(str(x) for x in s['peak_rss_mb'])} |")
        lines += ["", "Peak RSS: the whole process, dominated at this size by the libraries (torch, diffusers, "
                  "DeepSpeed) and the frozen components, not by what the engines shard."]
        if "estimate" in result:
            n = report["scale_processes"]
            lines += ["", f"Estimate, not measured: parameters + gradients + AdamW state per GPU on {n} GPUs, fp32 "
                      "training, from the bytes per parameter above (sharded shares divided by "
                      f"{n} instead of 2), activations, buckets and frozen encoders excluded, GB (10^9 bytes):", "",
                      "| engine | bytes / param | " + " | ".join(REAL) + " |", "|---|---|" + "---|" * len(REAL)]
            for engine, e in result["estimate"].items():
                cells = " | ".join(f"{e['gb'][name]:.1f}" for name in REAL)
                lines.append(f"| {engine} | {e['bytes_per_parameter']['total']:.2f} | {cells} |")
    skipped = report.get("skipped")
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Per-process memory of weights, gradients and AdamW state by engine.")
    parser.add_argument("--models", default="sd3", help=f"comma-separated model types: {', '.join(FSDP_BLOCKS)}")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--scale_processes", type=int, default=8, help="GPUs of the scaled estimate")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps of batch 1")
    parser.add_argument("--output_dir", default="benchmark-engines")
    parser.add_argument("--work_dir", default=None,
                        help="where the training runs write (default: a temporary folder, deleted at the end; the "
                        "per-process records are copied into the JSON)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = sorted(set(args.models) - set(FSDP_BLOCKS)) + sorted(set(args.engines) - set(ENGINES))
    if bad or not args.models or not args.engines:
        parser.error(f"unknown model type or engine: {', '.join(bad) or '(none)'}")
    if args.quick:
        args.steps, args.batch_size = 2, 1
    check_two_devices(parser)
    return args


def check_two_devices(parser) -> None:
    """The launches take two processes, one GPU each where there are GPUs: on a machine with one, process 1
    would fail on a device it does not have. One line instead (also used by check_engine_families.py)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        parser.error(f"the launches take two processes, one GPU each, and this machine has "
                     f"{torch.cuda.device_count()}: run on a machine with two, or on the CPU with CUDA_VISIBLE_DEVICES=")


def main(argv=None):
    opts = parse_args(argv)
    if opts.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="benchmark-engines-") as work_dir:
            opts.work_dir = work_dir
            return run(opts, argv)
    return run(opts, argv)


def run(opts, argv):
    os.makedirs(opts.output_dir, exist_ok=True)
    import torch

    command = " ".join(["python", "train_scripts/benchmark_engines.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "device": "cpu" if not torch.cuda.is_available() else "cuda",
              "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "steps": opts.steps, "batch_size": opts.batch_size, "num_processes": 2,
              "scale_processes": opts.scale_processes, "real_denoiser_parameters": REAL,
              "estimate_note": "parameters + gradients + AdamW state per GPU, fp32 training; activations, "
                               "communication buckets, frozen encoders excluded; an estimate, not a measurement",
              "models": {}, "skipped": {}}
    engines = available_engines(opts.engines, report["skipped"])
    json_path = os.path.join(opts.output_dir, "benchmark_engines.json")
    for model_type in opts.models:
        result = {"engines": {}, "runs": {}}
        report["models"][model_type] = result
        for engine in engines:
            run = launch(engine, model_type, opts)
            result["runs"][engine] = run
            result["engines"][engine] = summarize(run["processes"])
            print(f"{model_type} {engine}: {result['engines'][engine]['bytes_per_process']} ({run['wall_seconds']} s)",
                  flush=True)
            with open(json_path, "w") as f:  # kept after each launch
                json.dump(report, f, indent=2)
        if "ddp" in result["engines"]:
            ddp = result["engines"]["ddp"]
            result["estimate"] = {}
            for engine, s in result["engines"].items():
                per_param = scaled_per_parameter(s, ddp, opts.scale_processes)
                result["estimate"][engine] = {
                    "bytes_per_parameter": per_param,
                    "gb": {name: per_param["total"] * count / 1e9 for name, count in REAL.items()}}
    print(write_report(opts.output_dir, "benchmark_engines", report, markdown(report)))
    return report


if __name__ == "__main__":
    main()
