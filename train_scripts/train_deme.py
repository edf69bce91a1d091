#!/usr/bin/env python
"""DeMe in one command: fine-tune a pretrained model once per timestep interval, then merge the fine-tunes.

    python train_scripts/train_deme.py --pretrained_model_name_or_path pretrained --num_intervals 4 \\
        --output_dir deme-out --weights 0.1 0.1 0.2 0.5 -- --dataset_name mnist5k --max_train_steps 2000 --use_ema
    # one LoRA adapter per interval on the one base instead of N full copies: pass --rank to the trainer
    python train_scripts/train_deme.py ... -- --rank 8 --dataset_name my/data
    # two intervals at a time, each with half the CPU threads (or a GPU each: see --launcher)
    python train_scripts/train_deme.py ... --parallel 2 -- ...

Decouple-Then-Merge (CVPR 2025, PAPERS.md section 2): interval i (0 = lowest noise) of N equal
intervals (`--clustering timestep`, unless the trainer flags choose another clustering) is trained
by `train_ant.py --deme_interval i` into `OUT/interval-i/` (consistency loss, probabilistic
sampling and channel projection are the trainer's `--consistency_weight`, `--deme_global_prob`,
`--channel_projection`); then `diffusers_ant.deme.merging.merge_finetunes` merges them into
`OUT/merged/` with the given `--weights` (from low to high t; default equal weights 1/N) or a
`--search` on domain FID of a held-out set. Everything after `--` goes to the trainer as it is.

Resumable: the finished intervals are recorded in `OUT/deme_progress.json`; the same command run
again skips them and resumes an interrupted interval from its latest checkpoint (so give the trainer
`--checkpointing_steps`). The same command with other settings is refused. Each interval's output
(stdout and stderr of its run) is in `OUT/interval-i/train.log`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from diffusers_ant.cli import OneLineErrorParser, report_bad_input

PROG = "train_deme.py"
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_ant.py")
PROGRESS_NAME = "deme_progress.json"
# Test hook: "i:step" makes interval i's run die (as a kill would) while it saves checkpoint `step`.
CRASH_ENV = "DIFFUSERS_ANT_DEME_CRASH"
# Flags train_deme.py sets for each interval run itself.
RESERVED = ("--output_dir", "--deme_interval", "--num_clusters", "--pretrained_model_name_or_path",
            "--resume_from_checkpoint")


def build_parser():
    parser = OneLineErrorParser(prog=PROG, description="Fine-tune a pretrained model once per timestep interval "
                                "(DeMe), then merge the fine-tunes. Flags after -- go to train_ant.py.")
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="The pretrained pipeline to decouple.")
    parser.add_argument("--num_intervals", type=int, default=4, help="N, the number of intervals (DeMe: 4).")
    parser.add_argument("--output_dir", required=True, help="OUT: interval-i/ for each fine-tune, merged/ for the result.")
    parser.add_argument("--parallel", type=int, default=1,
                        help="Train this many intervals at once (each gets an equal share of the CPU threads).")
    parser.add_argument("--launcher", default=None,
                        help='How to start each interval run instead of plain python, e.g. "accelerate launch '
                             '--multi_gpu --num_processes 2" (the script path and flags are appended).')
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="Merge weights, one per interval from low to high t (default: 1/N each).")
    parser.add_argument("--search", default=None, choices=["grid", "coordinate"],
                        help="Search the merge weights on domain FID against --search_dataset_name instead.")
    parser.add_argument("--search_dataset_name", default=None, help="The held-out set for --search (e.g. mnist5k).")
    parser.add_argument("--search_num_samples", type=int, default=500, help="Samples per --search evaluation.")
    parser.add_argument("--no_merge", action="store_true", help="Train the intervals only (merge later with merge_deme.py).")
    return parser


def split_argv(argv):
    """(train_deme's flags, the trainer's flags after `--`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check(parser, args, trainer_args) -> None:
    if args.num_intervals < 1:
        parser.error("--num_intervals must be at least 1")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    for flag in RESERVED:
        if flag in trainer_args:
            parser.error(f"{flag} is set by {PROG} for each interval: drop it from the trainer flags")
    if args.weights is not None and len(args.weights) != args.num_intervals:
        parser.error(f"--weights has {len(args.weights)} values for --num_intervals {args.num_intervals}: give one per interval")
    if args.search is not None and args.search_dataset_name is None:
        parser.error("--search scores samples against real images: give --search_dataset_name (a held-out set)")
    if args.weights is not None and args.search == "grid":
        parser.error("--search grid tries every combination: drop --weights (it only starts --search coordinate)")


def interval_command(args, trainer_args, index: int) -> list:
    command = (args.launcher.split() if args.launcher else [sys.executable]) + [TRAIN_SCRIPT, *trainer_args]
    if "--clustering" not in trainer_args:
        command += ["--clustering", "timestep"]  # the paper's equal intervals
    return command + ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                      "--deme_interval", str(index), "--num_clusters", str(args.num_intervals),
                      "--output_dir", interval_dir(args, index), "--resume_from_checkpoint", "latest"]


def interval_dir(args, index: int) -> str:
    return os.path.join(args.output_dir, f"interval-{index}")


def read_progress(args, trainer_args) -> dict:
    """The progress record, checked against this command's settings (another command is refused)."""
    settings = {"pretrained_model_name_or_path": os.path.abspath(args.pretrained_model_name_or_path)
                if os.path.isdir(args.pretrained_model_name_or_path) else args.pretrained_model_name_or_path,
                "num_intervals": args.num_intervals, "trainer_args": trainer_args}
    path = os.path.join(args.output_dir, PROGRESS_NAME)
    if not os.path.isfile(path):
        return {"settings": settings, "done": []}
    with open(path, encoding="utf-8") as f:
        progress = json.load(f)
    for key, value in settings.items():
        if progress["settings"].get(key) != value:
            raise ValueError(f"{args.output_dir!r} holds a DeMe run with another {key} ({progress['settings'].get(key)!r}, "
                             f"now {value!r}): re-run its own command to resume it, or use another --output_dir")
    return progress


def write_progress(args, progress: dict) -> None:
    path = os.path.join(args.output_dir, PROGRESS_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(progress, f, indent=2)
    os.replace(path + ".tmp", path)  # never half-written


def train_interval(args, trainer_args, index: int) -> None:
    folder = interval_dir(args, index)
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ)
    if args.parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
    crash = os.environ.get(CRASH_ENV, "")
    env.pop(CRASH_ENV, None)
    if crash.partition(":")[0] == str(index):
        env["DIFFUSERS_ANT_CRASH_DURING_CHECKPOINT"] = crash.partition(":")[2]
    print(f"interval {index}: training into {folder}", flush=True)
    with open(os.path.join(folder, "train.log"), "a", encoding="utf-8") as log:
        result = subprocess.run(interval_command(args, trainer_args, index), env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise ValueError(f"interval {index} stopped (exit code {result.returncode}; see {folder}/train.log): "
                         f"fix the cause and run the same command again to resume it")
    print(f"interval {index}: done", flush=True)


def run(parser, args, trainer_args) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    progress = read_progress(args, trainer_args)
    pending = [i for i in range(args.num_intervals) if i not in progress["done"]]
    if progress["done"]:
        print(f"intervals {sorted(progress['done'])} already trained; continuing with {pending}", flush=True)
    write_progress(args, progress)

    def one(index):
        train_interval(args, trainer_args, index)
        progress["done"] = sorted(set(progress["done"]) | {index})
        write_progress(args, progress)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(one, i) for i in pending]:
            future.result()  # the first failure stops the command (the others finish their interval)
    if args.no_merge:
        return
    from diffusers_ant.deme.merging import merge_finetunes

    folders = [interval_dir(args, i) for i in range(args.num_intervals)]
    evaluation = None
    if args.search is not None:
        evaluation = {"dataset_name": args.search_dataset_name, "num_samples": args.search_num_samples}
    weights = args.weights
    if weights is None and args.search is None:
        weights = [1.0 / args.num_intervals] * args.num_intervals
    merged = os.path.join(args.output_dir, "merged")
    if os.path.isdir(merged) and os.listdir(merged):
        print(f"{merged} exists: merge_deme.py merges again into another folder", flush=True)
        return
    merge_finetunes(args.pretrained_model_name_or_path, folders, merged, weights=weights, search=args.search,
                    evaluation=evaluation)


def main(argv=None) -> int:
    own, trainer_args = split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    check(parser, args, trainer_args)
    return report_bad_input(PROG, lambda a: run(parser, a, trainer_args), args)


if __name__ == "__main__":
    sys.exit(main())
