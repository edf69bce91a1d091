"""The four flow-matching / SDXL families under each sharded engine, against plain data parallelism
(issue 18, item 2: "the four new flow-matching families included").

    python train_scripts/check_engine_families.py --output_dir docs/engine_families   # about 15 min on 2 CPU cores
    python train_scripts/check_engine_families.py --families flux --engines ddp,fsdp2 --methods uw --output_dir q

For each family (tiny preset, saved once as a pretrained pipeline), each weighting (`--methods`: UW, and
UW + PCGrad on the LoRA subset) and each engine, one `accelerate launch --num_processes 2` run of
`train_ant.py`: LoRA rank 4, 2 steps of batch 2, a checkpoint after each step. Every engine but DDP is then
resumed from a copy of its step-1 checkpoint. Checked, per run:

- the LoRA weights against DDP's (same seed, same data shards): the largest difference must stay under
  1e-3 of the largest LoRA-B weight DDP trained (its update after two steps at lr 1e-3: a wrong
  gradient, a skipped or doubled step, moves it by a fraction of itself, float rounding by ~1e-7 of it);
- the resumed run's LoRA weights and trainer state (UW's log-variances, the generator) equal the
  straight run's bit for bit;
- FSDP2 really shards (the trainer's log line), ZeRO-3 keeps some parameters partitioned (the config of
  `examples/accelerate/deepspeed_zero3_every_parameter.json`, and for a gradient method the trainer's
  count of whole and partitioned parameter tensors).

The launcher flags are `benchmark_engines.py`'s (`launcher_flags`: the configs of `examples/accelerate/`,
FSDP2 wrapping each family's blocks). DeepSpeed engines are left out, and said so, where DeepSpeed is not
installed. Output: `engine_families.json` and `engine_families.md`; the exit status is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from benchmark_engines import (ENGINES, TRAIN_SCRIPT, available_engines, check_two_devices, launch_env,  # noqa: E402
                               launcher_flags)

FAMILIES = ("sdxl", "sd3", "flux", "qwenimage")
METHODS = {"uw": ["--mtl_method", "uw"],
           "uw+pcgrad": ["--mtl_method", "uw+pcgrad", "--task_gradient_subset", "lora"]}
STEPS = 2
RESOLUTION = 16  # the tiny presets' VAEs halve it: 8x8 latents
RELATIVE_TOLERANCE = 1e-3


def trainer_args(family, base, method, output_dir) -> list:
    return ["--model_type", family, "--pretrained_model_name_or_path", str(base), "--dataset_name", "mnist5k_captions",
            "--resolution", str(RESOLUTION), "--train_batch_size", "2", "--max_train_samples", "8", "--rank", "4",
            "--num_clusters", "4", *METHODS[method], "--max_train_steps", str(STEPS), "--checkpointing_steps", "1",
            "--learning_rate", "1e-3", "--adam_epsilon", "1e-3", "--max_grad_norm", "0", "--seed", "0",
            "--report_to", "none", "--num_validation_images", "1", "--num_inference_steps", "1",
            "--output_dir", str(output_dir)]


def launch(engine, family, base, method, output_dir, timeout, *extra):
    """One two-process run; returns (seconds, log) or raises with the run's last lines."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_flags(engine, family), TRAIN_SCRIPT,
               *trainer_args(family, base, method, output_dir), *extra]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=launch_env(engine), capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError("\n".join(log.splitlines()[-15:]))
    return round(time.perf_counter() - start, 1), log


def tensors(folder):
    """The LoRA weights of a finished run and the trainer state of its last checkpoint, by name."""
    from safetensors.torch import load_file

    found = {f"lora:{k}": v for k, v in load_file(folder / "pytorch_lora_weights.safetensors").items()}
    for rank in (0, 1):
        state = folder / f"checkpoint-{STEPS}" / f"trainer_state_{rank}.safetensors"
        found.update({f"state{rank}:{k}": v for k, v in load_file(state).items()})
    return found


def check(engine, family, base, method, root, timeout, reference):
    """Run `engine` (and, if not DDP, its resume); returns the row of the report."""
    import torch

    out = root / f"{family}_{method}_{engine}"
    shutil.rmtree(out, ignore_errors=True)
    seconds, log = launch(engine, family, base, method, out, timeout)
    row = {"seconds": seconds, "failures": []}
    trained = tensors(out)
    if engine == "ddp":
        return row, trained
    if engine == "fsdp2" and "FSDP2 (fully_shard) on 2 processes" not in log:
        row["failures"].append("FSDP2 did not shard")
    counts = re.search(r"ZeRO-3: (\d+) parameter tensors whole on every process .*?, (\d+) partitioned", log)
    if counts:
        row["zero3_whole"], row["zero3_partitioned"] = map(int, counts.groups())
        if row["zero3_partitioned"] == 0:
            row["failures"].append("ZeRO-3 partitioned nothing")
    if reference is not None:
        lora = [k for k in reference if k.startswith("lora:")]
        largest = max(float(reference[k].abs().max()) for k in lora if "lora_B" in k or "lora.up" in k)
        worst = max(float((trained[k] - reference[k]).abs().max()) for k in lora)
        row.update(max_difference_to_ddp=worst, largest_lora_b=largest)
        if worst > RELATIVE_TOLERANCE * largest:
            row["failures"].append(f"differs from DDP by {worst:.3g} (bound {RELATIVE_TOLERANCE * largest:.3g})")
    resumed = root / f"{family}_{method}_{engine}_resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    launch(engine, family, base, method, resumed, timeout, "--resume_from_checkpoint", "checkpoint-1")
    again = tensors(resumed)
    row["resume_bit_for_bit"] = again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
    if not row["resume_bit_for_bit"]:
        row["failures"].append("the resumed run differs from the straight one")
    return row, trained


def save_bases(families, folder):
    """Each family's tiny preset, saved once as the pretrained pipeline LoRA is trained on."""
    import torch

    from diffusers_ant.models import get_model_adapter

    bases = {}
    for family in families:
        bases[family] = folder / family
        if not (bases[family] / "model_index.json").is_file():
            torch.manual_seed(0)
            get_model_adapter(family).load(model_config_name_or_path="tiny", resolution=RESOLUTION).save(
                str(bases[family]))
    return bases


def markdown(report) -> str:
    lines = [f"`{report['command']}`", "",
             "| family | method | engine | max \\|w - w_DDP\\| | largest LoRA-B weight | resumed == straight | "
             "ZeRO-3 whole / partitioned | s | result |", "|---|---|---|---|---|---|---|---|---|"]
    for key, row in report["runs"].items():
        family, method, engine = key.split("/")
        if engine == "ddp":
            continue
        zero3 = f"{row['zero3_whole']} / {row['zero3_partitioned']}" if "zero3_whole" in row else "-"
        diff = f"{row['max_difference_to_ddp']:.3g}" if "max_difference_to_ddp" in row else "-"
        largest = f"{row['largest_lora_b']:.3g}" if "largest_lora_b" in row else "-"
        result = "ok" if not row["failures"] else "; ".join(row["failures"])
        lines.append(f"| {family} | {method} | {engine} | {diff} | {largest} | {row.get('resume_bit_for_bit', '-')} | "
                     f"{zero3} | {row['seconds']} | {result} |")
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="The four new families under DDP, FSDP2, ZeRO-2 and ZeRO-3.")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)} "
                        "(ddp, the reference, is always run)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--output_dir", default="engine-families")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    args = parser.parse_args(argv)
    for name, valid in (("families", FAMILIES), ("engines", ENGINES), ("methods", METHODS)):
        chosen = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = sorted(set(chosen) - set(valid))
        if bad or not chosen:
            parser.error(f"--{name}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(valid)}")
        setattr(args, name, chosen)
    args.engines = ["ddp"] + [e for e in args.engines if e != "ddp"]
    check_two_devices(parser)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "train_scripts/check_engine_families.py", *(sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "steps": STEPS, "relative_tolerance": RELATIVE_TOLERANCE, "runs": {}, "skipped": {}}
    engines = available_engines(args.engines, report["skipped"])
    bases = save_bases(args.families, root / "bases")
    for family in args.families:
        for method in args.methods:
            reference = None
            for engine in engines:
                key = f"{family}/{method}/{engine}"
                try:
                    row, trained = check(engine, family, bases[family], method, root / "runs", args.timeout, reference)
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    row, trained = {"seconds": None, "failures": [f"the run failed: {error}"]}, None
                if engine == "ddp":
                    reference = trained
                report["runs"][key] = row
                print(f"{key}: {'ok' if not row['failures'] else row['failures']} "
                      f"{row.get('max_difference_to_ddp', '')} ({row['seconds']} s)", flush=True)
                with open(root / "engine_families.json", "w") as f:  # kept after each run
                    json.dump(report, f, indent=2)
    with open(root / "engine_families.md", "w") as f:
        f.write(markdown(report))
    failed = [key for key, row in report["runs"].items() if row["failures"]]
    print(f"{len(report['runs']) - len(failed)} of {len(report['runs'])} runs passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
