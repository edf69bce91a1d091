#!/usr/bin/env python
"""DeMe in one command: fine-tune a pretrained model once per timestep interval, then merge the fine-tunes.

    python train_scripts/train_deme.py --pretrained_model_name_or_path pretrained --num_intervals 4 \\
        --output_dir deme-out --search_dataset_name my/held-out --search_feature_extractor inception \\
        --search_inception_weights inception.safetensors -- --dataset_name my/data --max_train_steps 2000
    # given weights instead of the search (the authors' LSUN Church weights, low to high t)
    python train_scripts/train_deme.py ... --weights 0.1 0.1 0.2 0.5 -- ...
    # one LoRA adapter per interval on the one base instead of N full copies: pass --rank to the trainer
    python train_scripts/train_deme.py ... -- --rank 8 --dataset_name my/data
    # two intervals at a time, each on its own GPUs and its own accelerate port
    python train_scripts/train_deme.py ... --parallel 2 --launcher "accelerate launch --num_processes 2" -- ...

Decouple-Then-Merge (Ma et al., CVPR 2025; PAPERS.md section 2): interval i (0 = lowest noise) of N
equal intervals (`--clustering timestep`, unless the trainer flags choose another clustering) is
trained by `train_ant.py --deme_interval i` into `OUT/interval-i/`, with the authors' settings unless
the trainer flags say otherwise: consistency loss (`--consistency_weight 1`), the global-range coin
p = 0.3 per micro-batch (`--deme_global_prob`), channel projection on the main path
(`--no_channel_projection` turns it off), learning rate 5e-5, AdamW beta1 0.95, weight decay 1e-6 (none
on projections and norms), EMA. Then `diffusers_ant.deme.merging.merge_finetunes` merges them into
`OUT/merged/`: with `--weights` as given (low to high t), or else with weights searched by coordinate
descent over the authors' values 0, 0.1, 0.2, 0.5, 1 (sums above 1 included) on the domain FID of
1,000 samples per point against a held-out set (`--search_dataset_name` / `--search_train_data_dir`;
Inception features, `--search_feature_extractor inception`, for a set without a domain classifier).
Without either the command is refused: it never merges with weights nobody chose. A search that
returns the base (all weights 0) says "no fine-tune helped". Everything after `--` goes to the
trainer as it is.

`--parallel K` runs K intervals at once: worker k gets its own share of the GPUs (CUDA_VISIBLE_DEVICES:
the visible devices split into K equal groups) and, with an `accelerate launch` (or `torchrun`)
`--launcher`, its own `--main_process_port` (`--master_port`): `--main_process_port` + k. On a CPU
machine each worker gets an equal share of the threads.

Resumable: the finished intervals are recorded in `OUT/deme_progress.json`; the same command run
again skips them and resumes an interrupted interval from its latest checkpoint (so give the trainer
`--checkpointing_steps`). The same command with other settings is refused. Each interval's output
(stdout and stderr of its run) is in `OUT/interval-i/train.log`; the console says how far each interval is
(`interval i: step s/n`, at every tenth of its steps).
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from diffusers_ant.cli import OneLineErrorParser, check_output_paths, report_bad_input
from diffusers_ant.deme.search import DEFAULT_SEARCH_SAMPLES, DEFAULT_SEARCH_VALUES, grid_size
from diffusers_ant.files import write_json_atomically

PROG = "train_deme.py"
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_ant.py")
PROGRESS_NAME = "deme_progress.json"
# Test hook: "i:step" makes interval i's run die (as a kill would) while it saves checkpoint `step`.
CRASH_ENV = "DIFFUSERS_ANT_DEME_CRASH"
# The trainer's progress bar (tqdm, desc "steps") as it appears in the run's output: "steps:  40%|####  | 4/10 [...]"
PROGRESS_BAR = re.compile(r"steps:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")
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
                        help="Train this many intervals at once, each worker on its own GPUs (the visible ones split "
                             "evenly) and its own --main_process_port; on CPUs each gets an equal share of the threads.")
    parser.add_argument("--launcher", default=None,
                        help='How to start each interval run instead of plain python, e.g. "accelerate launch '
                             '--multi_gpu --num_processes 2" (the script path and flags are appended).')
    parser.add_argument("--main_process_port", type=int, default=29500,
                        help="With --parallel and an accelerate / torchrun --launcher: worker k uses this port + k "
                             "(default 29500, accelerate's).")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="Merge weights, one per interval from low to high t (the authors: 0.1 0.1 0.2 0.5 on LSUN "
                             "Church). Without them the weights are searched (--search_dataset_name).")
    parser.add_argument("--search", default=None, choices=["grid", "coordinate"],
                        help="How to search the merge weights (default: coordinate when --weights is not given; with "
                             "--weights, --search coordinate starts from them).")
    parser.add_argument("--search_dataset_name", default=None,
                        help="The held-out set the search scores against (domain FID), e.g. a split of your data.")
    parser.add_argument("--search_train_data_dir", default=None, help="The held-out set as an image folder instead.")
    parser.add_argument("--search_values", type=float, nargs="+", default=list(DEFAULT_SEARCH_VALUES),
                        help="Candidate values of each weight (default the authors' "
                             f"{' '.join(f'{v:g}' for v in DEFAULT_SEARCH_VALUES)}; the weights may sum above 1).")
    parser.add_argument("--search_num_samples", type=int, default=DEFAULT_SEARCH_SAMPLES,
                        help=f"Samples per search point (default {DEFAULT_SEARCH_SAMPLES}).")
    parser.add_argument("--max_evaluations", type=int, default=256,
                        help="Refuse a --search grid of more points than this (len(search_values) ** num_intervals; "
                             "default 256), before any interval is trained.")
    parser.add_argument("--search_feature_extractor", default="domain",
                        help="The search's FID features: `domain` (the classifier of a built-in held-out set: mnist5k, "
                             "animal_mnist, digits) or `inception` (with --search_inception_weights).")
    parser.add_argument("--search_inception_weights", default=None,
                        help="FID Inception-v3 weights (a .safetensors file) for --search_feature_extractor inception.")
    parser.add_argument("--no_merge", action="store_true", help="Train the intervals only (merge later with merge_deme.py).")
    return parser


def split_argv(argv):
    """(train_deme's flags, the trainer's flags after `--`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def given(flag: str, trainer_args) -> bool:
    """Whether the trainer flags set ``flag``, as ``--flag value`` or ``--flag=value``."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in trainer_args)


def flag_value(flag: str, trainer_args):
    """The value the trainer flags give ``flag`` (``--flag value`` or ``--flag=value``; the last wins), else None."""
    value = None
    for i, arg in enumerate(trainer_args):
        if arg == flag and i + 1 < len(trainer_args):
            value = trainer_args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def check(parser, args, trainer_args) -> None:
    if args.num_intervals < 1:
        parser.error("--num_intervals must be at least 1")
    check_output_paths(parser, ("--output_dir", args.output_dir, True))  # before the intervals train
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    for flag in RESERVED:
        if given(flag, trainer_args):
            parser.error(f"{flag} is set by {PROG} for each interval: drop it from the trainer flags")
    if args.weights is not None and len(args.weights) != args.num_intervals:
        parser.error(f"--weights has {len(args.weights)} values for --num_intervals {args.num_intervals}: give one per interval")
    held_out = args.search_dataset_name is not None or args.search_train_data_dir is not None
    if args.search is not None and not held_out:
        parser.error("--search scores samples against real images: give --search_dataset_name (a held-out set)")
    if args.weights is None and not held_out and not args.no_merge:
        parser.error("the merge needs weights: give --search_dataset_name (a held-out set to search them on), "
                     "--weights (one per interval), or --no_merge")
    searching = not args.no_merge and (args.search is not None or args.weights is None)
    if searching:
        # what the search scores with, checked now: merge_finetunes would find out after every interval trained
        from diffusers_ant.analysis.arguments import FEATURE_EXTRACTOR_CHOICES, feature_extractor_problem

        if args.search_feature_extractor not in FEATURE_EXTRACTOR_CHOICES:
            parser.error(f"unknown --search_feature_extractor {args.search_feature_extractor!r}: "
                         f"{' or '.join(FEATURE_EXTRACTOR_CHOICES)}")
        problem = feature_extractor_problem(args.search_feature_extractor, args.search_dataset_name,
                                            args.search_train_data_dir, args.search_inception_weights,
                                            prefix="search_", otherwise=", or --weights")
        if problem:
            parser.error(problem)
        # the search's files, checked before the intervals train for hours (the search would find out after)
        for flag, path, exists in (("--search_inception_weights", args.search_inception_weights, os.path.isfile),
                                   ("--search_train_data_dir", args.search_train_data_dir, os.path.isdir)):
            if path is not None and not exists(path):
                parser.error(f"{flag} {path!r} does not exist")
    base = args.pretrained_model_name_or_path
    if not os.path.isdir(base) and (os.path.exists(base) or base.count("/") != 1):
        parser.error(f"--pretrained_model_name_or_path {base!r} is neither a folder nor a Hub id (owner/name)")
    if args.weights is not None and args.search == "grid":
        parser.error("--search grid tries every combination: drop --weights (it only starts --search coordinate)")
    if args.search_num_samples < 1 or len(set(args.search_values)) != len(args.search_values) or args.max_evaluations < 1:
        parser.error("--search_num_samples and --max_evaluations must be positive and --search_values distinct")
    points = grid_size(args.num_intervals, args.search_values)
    if args.search == "grid" and not args.no_merge and points > args.max_evaluations:
        # checked here, not after every interval has trained (merge_finetunes refuses it then)
        parser.error(f"a --search grid of {len(args.search_values)} values for {args.num_intervals} intervals is {points} "
                     f"evaluations, over --max_evaluations {args.max_evaluations}: give fewer --search_values, use "
                     "--search coordinate, or raise --max_evaluations")
    if args.parallel > 1 and args.launcher and any(flag in args.launcher.split()
                                                   for flag in ("--main_process_port", "--master_port")):
        parser.error("--parallel gives each worker its own port: drop the port from --launcher (set --main_process_port)")


def interval_command(args, trainer_args, index: int, worker: int = 0) -> list:
    """The command of interval ``index``'s run; with ``--parallel``, worker ``worker``'s launcher port."""
    launcher = args.launcher.split() if args.launcher else [sys.executable]
    if args.parallel > 1:
        launcher = with_port(launcher, args.main_process_port + worker)
    command = launcher + [TRAIN_SCRIPT, *trainer_args]
    if not given("--clustering", trainer_args):
        command += ["--clustering", "timestep"]  # the paper's equal intervals
    return command + ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                      "--deme_interval", str(index), "--num_clusters", str(args.num_intervals),
                      "--output_dir", interval_dir(args, index), "--resume_from_checkpoint", "latest"]


def with_port(launcher: list, port: int) -> list:
    """``launcher`` with its own rendezvous port: two ``accelerate launch`` (or ``torchrun``) runs at
    once on one port would fail to start, or join each other's process group."""
    for i, token in enumerate(launcher):
        if token == "launch" and i > 0 and launcher[i - 1].endswith("accelerate"):
            return launcher[:i + 1] + ["--main_process_port", str(port)] + launcher[i + 1:]
        if os.path.basename(token) == "torchrun" or token == "torch.distributed.run":
            return launcher[:i + 1] + ["--master_port", str(port)] + launcher[i + 1:]
    return launcher  # plain python: no rendezvous


def visible_devices() -> list:
    """The GPUs this command may use: CUDA_VISIBLE_DEVICES as given, else every CUDA device (none on a CPU machine)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def _launcher_value(tokens: list, flags: tuple) -> str | None:
    """The value of the first of `flags` in a launcher's tokens, given as `flag N` or `flag=N`."""
    for i, token in enumerate(tokens):
        for flag in flags:
            if token.startswith(flag + "="):
                return token[len(flag) + 1:]
            if token == flag and i + 1 < len(tokens):
                return tokens[i + 1]
    return None


def launcher_processes(launcher: str | None) -> int | None:
    """The processes a --launcher starts on one machine, each wanting a GPU: `accelerate launch --num_processes N`
    (all machines together: divided by its `--num_machines`) or `torchrun --nproc_per_node N`, either spelling.
    None when it names none (a config file's count is not read here) or trains on the CPU (`--cpu`)."""
    tokens = (launcher or "").split()
    if "--cpu" in tokens:
        return None
    per_machine = _launcher_value(tokens, ("--nproc_per_node", "--nproc-per-node"))
    if per_machine is not None:
        return int(per_machine) if per_machine.isdigit() else None
    total = _launcher_value(tokens, ("--num_processes", "--num-processes"))
    machines = _launcher_value(tokens, ("--num_machines", "--num-machines")) or "1"
    if total is None or not total.isdigit() or not machines.isdigit() or int(machines) < 1:
        return None
    return -(-int(total) // int(machines))


def worker_devices(devices: list, parallel: int, worker: int) -> list:
    """Worker ``worker``'s own GPUs: the ``worker``-th of ``parallel`` equal, disjoint groups of ``devices``."""
    share = len(devices) // parallel
    return devices[worker * share:(worker + 1) * share]


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
    if not progress["done"]:
        # nothing finished under the recorded settings yet: a corrected command takes over (an interval's own
        # checkpoints are then compared by the trainer, which refuses a changed flag in one line)
        return {"settings": settings, "done": []}
    for key, value in settings.items():
        if progress["settings"].get(key) != value:
            raise ValueError(f"{args.output_dir!r} holds a DeMe run with another {key} ({progress['settings'].get(key)!r}, "
                             f"now {value!r}): re-run its own command to resume it, or use another --output_dir")
    return progress


def write_progress(args, progress: dict) -> None:
    write_json_atomically(os.path.join(args.output_dir, PROGRESS_NAME), progress)  # never half-written


def train_interval(args, trainer_args, index: int, worker: int = 0, devices=()) -> None:
    folder = interval_dir(args, index)
    os.makedirs(folder, exist_ok=True)
    env = dict(os.environ)
    if args.parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
        if devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(worker_devices(list(devices), args.parallel, worker))
    crash = os.environ.get(CRASH_ENV, "")
    env.pop(CRASH_ENV, None)
    if crash.partition(":")[0] == str(index):
        env["DIFFUSERS_ANT_CRASH_DURING_CHECKPOINT"] = crash.partition(":")[2]
    where = f" (worker {worker}, GPUs {env.get('CUDA_VISIBLE_DEVICES') or 'none'})" if args.parallel > 1 else ""
    print(f"interval {index}: training into {folder}{where}", flush=True)
    returncode = run_logged(interval_command(args, trainer_args, index, worker), env, os.path.join(folder, "train.log"),
                            index)
    if returncode != 0:
        raise ValueError(f"interval {index} stopped (exit code {returncode}; see {folder}/train.log): "
                         f"fix the cause and run the same command again to resume it")
    print(f"interval {index}: done", flush=True)


def run_logged(command: list, env: dict, log_path: str, index: int) -> int:
    """Run interval `index`'s `command`, its output appended to `log_path` and its progress said on the console
    (`copy_and_report`); returns its exit code."""
    with open(log_path, "ab") as log, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT) as process:
        try:
            copy_and_report(process, log, index)
        except BaseException:  # (Ctrl-C, a failed write): the run stops with this command, as under subprocess.run
            process.kill()
            raise
    return process.returncode


def copy_and_report(process, log, index: int) -> None:
    """Copy an interval run's output into its log as it comes, and say on the console how far the run is: a
    line each time the trainer's progress bar passes another tenth of its steps (the bar itself, redrawn in
    place many times a second, stays in the log)."""
    reported, tail = -1, ""
    while True:
        chunk = process.stdout.read1(1 << 16)  # what the run has written so far, up to 64 KiB; b"" at its end
        if not chunk:
            return
        log.write(chunk)
        log.flush()
        tail = (tail + chunk.decode("utf-8", errors="replace"))[-2048:]  # (a bar may arrive in two chunks)
        bars = PROGRESS_BAR.findall(tail)
        if bars:
            step, total = map(int, bars[-1])
            tenth = 10 * step // max(total, 1)
            if tenth > reported:
                reported = tenth
                print(f"interval {index}: step {step}/{total}", flush=True)


def run(parser, args, trainer_args) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    progress = read_progress(args, trainer_args)
    pending = [i for i in range(args.num_intervals) if i not in progress["done"]]
    if progress["done"]:
        print(f"intervals {sorted(progress['done'])} already trained; continuing with {pending}", flush=True)
    write_progress(args, progress)

    devices = visible_devices() if args.parallel > 1 else []
    if devices and len(devices) < args.parallel:
        raise ValueError(f"--parallel {args.parallel} gives each worker its own GPUs, and {len(devices)} are visible: "
                         f"lower --parallel to at most {len(devices)}")
    share, processes = len(worker_devices(devices, args.parallel, 0)), launcher_processes(args.launcher)
    if devices and processes is not None and processes > share:  # (a process past its worker's share finds no GPU)
        raise ValueError(f"--launcher starts {processes} processes per interval and --parallel {args.parallel} gives each "
                         f"worker {share} of the {len(devices)} visible GPUs: launch at most {share} processes per "
                         "interval, or lower --parallel")
    workers = queue.Queue()  # free worker slots: a slot is a GPU group and a port, never two runs at once
    for worker in range(args.parallel):
        workers.put(worker)
    # one writer of the progress file at a time: two workers finishing together would otherwise share its
    # temporary file, and the second rename would find it gone (or record a stale "done" list)
    progress_lock = threading.Lock()
    # set by the worker thread whose interval failed, before it takes the next queued one: leaving the pool
    # waits for every queued interval, and each would start (and fail in turn) after the first failure
    failed = threading.Event()

    def one(index):
        if failed.is_set():
            return
        worker = workers.get()
        try:
            train_interval(args, trainer_args, index, worker, devices)
        except BaseException:
            failed.set()
            raise
        finally:
            workers.put(worker)
        with progress_lock:
            progress["done"] = sorted(set(progress["done"]) | {index})
            write_progress(args, progress)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(one, i) for i in pending]:
            future.result()  # the first failure stops the command (`failed`: the queued intervals never start)
    if args.no_merge:
        return
    from diffusers_ant.deme.merging import merge_finetunes

    folders = [interval_dir(args, i) for i in range(args.num_intervals)]
    # Given weights, or a search (never equal weights nobody chose: `check` refused that already)
    search = args.search or (None if args.weights is not None else "coordinate")
    evaluation = None
    if search is not None:
        evaluation = {"dataset_name": args.search_dataset_name, "train_data_dir": args.search_train_data_dir,
                      "num_samples": args.search_num_samples, "feature_extractor": args.search_feature_extractor,
                      "inception_weights": args.search_inception_weights}
        print(f"searching the merge weights ({search}, values {' '.join(f'{v:g}' for v in args.search_values)}, "
              f"{args.search_num_samples} samples per point)", flush=True)
    merged = os.path.join(args.output_dir, "merged")
    if os.path.isdir(merged) and os.listdir(merged):
        print(f"{merged} exists: merge_deme.py merges again into another folder", flush=True)
        return
    # a Hub id as the base: the merge reads its snapshot (at the revision the intervals recorded, in the
    # trainer's --cache_dir), and the merged folder names the Hub id as the intervals do
    merge_finetunes(args.pretrained_model_name_or_path, folders, merged, weights=args.weights, search=search,
                    search_values=args.search_values, max_evaluations=args.max_evaluations, evaluation=evaluation,
                    cache_dir=flag_value("--cache_dir", trainer_args))


def main(argv=None) -> int:
    own, trainer_args = split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    check(parser, args, trainer_args)
    return report_bad_input(PROG, lambda a: run(parser, a, trainer_args), args)


if __name__ == "__main__":
    sys.exit(main())
