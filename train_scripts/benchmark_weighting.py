"""Step time and peak memory of every multi-task weighting against vanilla training.

    python train_scripts/benchmark_weighting.py --sizes tiny,larger --steps 10 --warmup 3 \\
        --batch_size 64 --output bench.json

What is measured, per model size (`tiny`: the demo's attention UNet2DModel, the `small` preset,
channels (32, 64, 64), attention in the lowest block, at 16x16; `larger`: the same at 32x32), with
K = 5 SNR clusters (the trainer's default clustering) and batches of `--batch_size` real MNIST-5k
images from the trainer's data loader:

* one training step through the trainer's own code path: `diffusers_ant.training.step.training_step`
  (the objective draws timesteps and noise, the method's dispatch in `weighted_backward`, the
  per-task gradient engine), gradient clipping, the AdamW step and zero_grad; data loaded outside
  the timed region. Methods: `none` (vanilla: mean loss, one backward, uniform timesteps), the
  loss-based ones (ls, rlw, uw, dwa: one forward, one backward) and the gradient-based ones (pcgrad,
  nash_mtl, imtl, mgda, cagrad) with each engine of `--task_gradients`: `split` (the plain row: one
  forward + backward per cluster sub-batch, exact), `batched` (`method@batched`: the same gradients
  from one forward and one backward over the whole batch, each layer's weight gradient summed per
  cluster; what the trainer's default `auto` runs on this model), `last_layers` (`method@last_layers`: one
  forward, the K gradients of the output layer only, one weighted backward; its cost does not
  depend on the sub-batch sizes) and the reference code's `retain_graph` (`method@retain_graph`:
  one forward, K backward passes). Every method runs with its default options (Nash-MTL re-solves
  every 25 steps and takes cheap reused-weight steps in between, so its figure mixes both kinds).
* time: all methods run in one process on one shared model, interleaved: each round runs one step
  of every method, in an order rotated every round to spread drift; the first `--warmup` rounds
  are discarded; the median over the remaining `--steps` rounds is reported as a ratio to vanilla,
  and so is the fastest measured step (on a shared machine, other jobs only ever add time, so the
  fastest step is the least disturbed figure). Under CPU contention `--threads 1` avoids the
  thread-synchronisation stalls that hit the many small kernels of split sub-batches hardest.
* memory: each method runs alone in a fresh subprocess (one warm-up step, then two measured
  steps). On CUDA: `torch.cuda.max_memory_allocated` (the absolute peak, model and optimizer state
  included). On CPU, where torch has no allocator statistics: the peak resident set size of the
  process (Linux's VmHWM, reset through /proc/self/clear_refs after the model is built) minus the
  resident size just before the first step,
  i.e. the peak memory the training steps add on top of the built model (activations, gradients,
  optimizer state, engine buffers); glibc is told to return every block over 64 KiB to the system
  (`MALLOC_MMAP_THRESHOLD_`) so that resident size follows live tensors. Both as MB and as a ratio to
  vanilla. `--no_memory` skips this part.

`--tap_breakdown` also times where the batched engine's extra time goes: its per-cluster weight gradients
(the work of its hooks inside the backward pass) per layer kind, against the whole-batch weight gradients
of the same Linear and convolution layers from the same tensors (what an ordinary backward computes).

The script prints a markdown table per size and writes everything to `--output` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffusers_ant.weighting import get_weighting  # noqa: E402
from diffusers_ant.weighting.engine import TaskGradientEngine  # noqa: E402

LOSS_METHODS = ["ls", "rlw", "uw", "dwa"]
GRADIENT_METHODS = ["pcgrad", "nash_mtl", "imtl", "mgda", "cagrad"]
ALL_METHODS = ["none"] + LOSS_METHODS + GRADIENT_METHODS
# `method@engine` rows: the per-task gradient engines of `--task_gradients` besides split (the plain row)
ENGINES = ("split", "batched", "last_layers", "retain_graph")
SIZES = {"tiny": 16, "larger": 32}  # resolution of the demo's attention UNet ("small" preset)
GOALS = {"loss": 1.05, "gradient": 1.3}  # issues 3 and 8: within these ratios of vanilla at K = 5


def kind_of(method: str) -> str:
    name = method.split("@")[0]
    return "vanilla" if name == "none" else ("gradient" if name in GRADIENT_METHODS else "loss")


class Context:
    """What every method's runner shares, built as `train_ant.py` builds it: the Accelerator, the demo's
    UNet (`small` preset) through its model adapter, SNR clusters, one AdamW optimizer, the engines."""

    def __init__(self, size, num_clusters, device):
        from accelerate import Accelerator

        from diffusers_ant.clustering import cluster_timesteps
        from diffusers_ant.models import get_model_adapter

        self.accelerator = Accelerator(cpu=device.type == "cpu")
        torch.manual_seed(0)
        self.adapter = get_model_adapter("unet").load(model_config_name_or_path="small", resolution=SIZES[size],
                                                      num_channels=1)
        self.intervals = cluster_timesteps(self.adapter.noise_scheduler, num_clusters, objective="snr")
        self.params = self.adapter.trainable_parameters()
        optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.model, self.optimizer = self.accelerator.prepare(self.adapter.model, optimizer)
        self.engines = {
            "split": TaskGradientEngine(self.params, mode="split"),
            "batched": TaskGradientEngine(self.params, mode="batched", modules=[self.adapter.model]),
            "retain_graph": TaskGradientEngine(self.params, mode="retain_graph"),
            "last_layers": TaskGradientEngine(self.params, mode="retain_graph", subset=self.adapter.output_parameters(),
                                              restrict_task_backward=True),
        }
        self.generator = torch.Generator(device=self.accelerator.device).manual_seed(0)
        self.device = self.accelerator.device


class Runner:
    """One method's training step through the trainer's own code path (`training.step.training_step`:
    the objective, the weighting's dispatch, the engine), then gradient clipping, the AdamW step and
    zero_grad as the training loop does them. Learnable weighting parameters (UW) get their own
    optimizer, stepped with the model's."""

    def __init__(self, method, context: Context):
        from diffusers_ant.schedule import num_train_timesteps
        from diffusers_ant.timesteps import StratifiedTimestepSampler, UniformTimestepSampler
        from diffusers_ant.training.step import DiffusionObjective

        self.method, self.context = method, context
        name, _, engine = method.partition("@")
        k = len(context.intervals)
        self.weighting = None if name == "none" else get_weighting(name, k).to(context.device)
        # as train_ant.py: stratified batches with a method, uniform draws for vanilla training
        sampler = (UniformTimestepSampler(num_train_timesteps(context.adapter.noise_scheduler)) if name == "none"
                   else StratifiedTimestepSampler(context.intervals))
        self.objective = DiffusionObjective(context.adapter, context.adapter.noise_scheduler, sampler, context.intervals)
        self.engine = context.engines[engine or "split"] if kind_of(method) == "gradient" else None
        groups = self.weighting.param_groups() if hasattr(self.weighting, "param_groups") else []
        self.extra_optimizer = torch.optim.AdamW(groups) if groups else None

    def step(self, batch):
        from diffusers_ant.training.step import training_step

        c = self.context
        training_step(c.accelerator, self.objective, c.model, [batch], c.generator, self.objective.num_tasks,
                      weighting=self.weighting, engine=self.engine)
        c.accelerator.clip_grad_norm_(c.params, 1.0)
        c.optimizer.step()
        c.optimizer.zero_grad(set_to_none=True)
        if self.extra_optimizer is not None:
            self.extra_optimizer.step()
            self.extra_optimizer.zero_grad(set_to_none=True)


def make_batches(size, batch_size, device, count, seed=0):
    """`count` real MNIST-5k batches from the trainer's data loader (loaded before any timing)."""
    from diffusers_ant.data import load_builtin_dataset, make_train_dataloader, resolve_columns

    dataset = load_builtin_dataset("mnist5k")
    loader = make_train_dataloader(dataset, resolve_columns(dataset), resolution=SIZES[size], batch_size=batch_size,
                                   num_channels=1, seed=seed)
    batches = []
    while len(batches) < count:
        for batch in loader:
            batches.append({k: v.to(device) for k, v in batch.items()})
            if len(batches) == count:
                break
    return batches


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(size, methods, args, device):
    context = Context(size, args.num_clusters, device)
    runners = {m: Runner(m, context) for m in methods}
    return context.adapter.model, runners


def time_methods(size, methods, args, device):
    """Median seconds per step of every method, interleaved in rounds."""
    model, runners = setup(size, methods, args, device)
    batches = make_batches(size, args.batch_size, device, args.warmup + args.steps)
    return time_runners(runners, batches, args.warmup, device, label=size)


def time_runners(runners: dict, batches: list, warmup: int, device, label: str = ""):
    """Median seconds per step of every runner (method name -> object with `.step(batch)`), interleaved:
    round r runs one step of every runner on `batches[r]`, in an order rotated every round; the first
    `warmup` rounds are discarded. Returns `(medians, all step times)`; also used by benchmark_families.py."""
    methods = list(runners)
    rounds = len(batches)
    times = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]  # rotate to spread drift
        for method in order:
            sync(device)
            start = time.perf_counter()
            runners[method].step(batches[r])
            sync(device)
            times[method].append(time.perf_counter() - start)
        print(f"[{label}] round {r + 1}/{rounds} done" + (" (warm-up)" if r < warmup else ""), file=sys.stderr)
    return {m: statistics.median(t[warmup:]) for m, t in times.items()}, times


# layer kinds whose whole-batch weight gradient the breakdown does not time (their own backward forms it from
# statistics it saved, which the hooks do not see)
_NO_REFERENCE = ("normalisation", "embedding")


def _tap_category(module, conv_plan) -> str:
    """The layer kind of a tapped module; `conv_plan`: the engine's `_conv_plan` of a convolution, else None."""
    from torch import nn

    if conv_plan is not None:
        return "convolution 1x1" if conv_plan[-1] else "convolution kxk"  # (the engine's route for it)
    if isinstance(module, nn.Linear):
        return "linear"
    return "embedding" if isinstance(module, nn.Embedding) else "normalisation"


def _whole_batch_weight_gradient(module, x, dy, conv_plan) -> None:
    """The weight (and bias) gradient of a Linear or convolution layer over the whole batch, as an ordinary
    backward pass forms it: the reference for the per-cluster sums (a convolution's arguments as the engine
    worked them out, `conv_plan`)."""
    bias = module.bias is not None and module.bias.requires_grad
    if conv_plan is None:  # a Linear layer
        x2, dy2 = x.reshape(-1, x.shape[-1]).to(dy.dtype), dy.reshape(-1, dy.shape[-1])
        dy2.T.mm(x2)
        if bias:
            dy2.sum(0)
        return
    pad, padding, stride, dilation, zeros, groups, _ = conv_plan
    if pad is not None:
        x = torch.nn.functional.pad(x, pad, mode=module.padding_mode)
    torch.ops.aten.convolution_backward(dy, x.to(dy.dtype), module.weight.to(dy.dtype),
                                        [module.out_channels] if bias else None, stride, padding, dilation, False,
                                        zeros, groups, [False, True, bias])


def tap_breakdown(size, args, device, steps: int = 4) -> dict:
    """Where the batched engine's extra time goes: its per-cluster weight gradients (the hooks' work inside
    the backward pass), timed per layer kind over `steps` PCGrad steps after two warm-up steps, against the
    whole-batch weight gradient of the same Linear and convolution layers from the same tensors (what an
    ordinary backward pass computes instead; timed just before them, outside the step). Milliseconds per step."""
    context = Context(size, args.num_clusters, device)
    runner = Runner("pcgrad@batched", context)
    recorder = context.engines["batched"]._recorder
    measured = {}
    accumulate = recorder.accumulate

    def timed(module, x, dy):
        conv_plan = recorder._conv_plans.get(id(module))  # worked out once by the engine, outside the timing
        kind = _tap_category(module, conv_plan)
        entry = measured.setdefault(kind, {"calls": 0, "per_cluster": 0.0, "whole_batch": 0.0})
        # The reference first: whichever runs second finds x and dy in cache, and an ordinary backward pass
        # meets them as cold as the hooks do, so the per-cluster figure is, if anything, favoured here.
        # (a GPU runs the kernels queued before the hook asynchronously: wait for them, or they count here)
        sync(device)
        if kind not in _NO_REFERENCE:
            start = time.perf_counter()
            _whole_batch_weight_gradient(module, x, dy, conv_plan)
            sync(device)
            entry["whole_batch"] += time.perf_counter() - start
        start = time.perf_counter()
        accumulate(module, x, dy)
        sync(device)
        entry["per_cluster"] += time.perf_counter() - start
        entry["calls"] += 1

    batches = make_batches(size, args.batch_size, device, steps + 2)
    recorder.accumulate = timed  # an instance attribute: the taps call it in place of the method
    for r, batch in enumerate(batches):
        if r == 2:
            measured.clear()
        runner.step(batch)
    return {kind: {"calls_per_step": entry["calls"] // steps,
                   "per_cluster_ms": 1000 * entry["per_cluster"] / steps,
                   "whole_batch_ms": None if kind in _NO_REFERENCE else 1000 * entry["whole_batch"] / steps}
            for kind, entry in sorted(measured.items())}


def tap_table(size, breakdown: dict) -> str:
    lines = [f"[{size}] batched engine, per-cluster weight gradients per step (PCGrad) against the whole-batch weight "
             "gradient of the same layers:", "",
             "| layers | calls / step | per-cluster ms | whole-batch ms |", "|---|---|---|---|"]
    for kind, entry in breakdown.items():
        whole = "-" if entry["whole_batch_ms"] is None else f"{entry['whole_batch_ms']:.1f}"
        lines.append(f"| {kind} | {entry['calls_per_step']} | {entry['per_cluster_ms']:.1f} | {whole} |")
    return "\n".join(lines)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(size, method, args, device) -> dict:
    """Runs in a fresh process: peak memory of `method`'s training steps."""
    _, runners = setup(size, [method], args, device)
    batches = make_batches(size, args.batch_size, device, 3, seed=1)
    if device.type == "cuda":
        runners[method].step(batches[0])  # allocates optimizer state and engine buffers
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        for batch in batches[1:]:
            runners[method].step(batch)
        sync(device)
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "measure": "cuda_max_memory_allocated"}
    # Imports and model construction have their own, earlier peak: reset the peak counter so
    # that only the training steps count (ru_maxrss cannot be reset).
    before = _status_mb("VmRSS")
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); run with --no_memory")
    for batch in batches:
        runners[method].step(batch)
    return {"peak_mb": _status_mb("VmHWM") - before, "measure": "peak_rss_increase"}


def measure_memory(size, methods, args):
    results = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    for method in methods:
        command = [sys.executable, __file__, "--_memory_probe", f"{size}:{method}", "--batch_size", str(args.batch_size),
                   "--num_clusters", str(args.num_clusters), "--device", args.device]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"memory probe of {method} failed:\n{out.stderr[-2000:]}")
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[{size}] memory of {method}: {results[method]['peak_mb']:.1f} MB", file=sys.stderr)
    return results


def markdown_table(size, medians, fastest, memory, args):
    base_time, base_fastest = medians["none"], fastest["none"]
    base_mem = memory["none"]["peak_mb"] if memory else None
    lines = [f"**{size}** ({SIZES[size]}x{SIZES[size]}, batch {args.batch_size}, K = {args.num_clusters}, "
             f"{torch.get_num_threads()} threads, median of {args.steps} rounds after {args.warmup} warm-up)", "",
             "| method | kind | engine | s / step (median) | x vanilla | fastest step x vanilla | peak MB | x vanilla |",
             "|---|---|---|---|---|---|---|---|"]
    for method, seconds in medians.items():
        name, _, engine = method.partition("@")
        kind = kind_of(method)
        engine = engine or ("split" if kind == "gradient" else "-")
        mem = f"{memory[method]['peak_mb']:.0f} | {memory[method]['peak_mb'] / base_mem:.2f}" if memory else "- | -"
        lines.append(f"| {name} | {kind} | {engine} | {seconds:.3f} | {seconds / base_time:.2f} | "
                     f"{fastest[method] / base_fastest:.2f} | {mem} |")
    return "\n".join(lines)


def goal_lines(size, medians):
    """The goals per kind; for gradient-based methods once per exact engine measured (split, batched)."""
    base = medians["none"]
    lines = []
    for kind, goal in GOALS.items():
        for engine in (("", "@batched") if kind == "gradient" else ("",)):
            ratios = {m: t / base for m, t in medians.items()
                      if kind_of(m) == kind and m[len(m.split("@")[0]):] == engine}
            if ratios:
                worst = max(ratios, key=ratios.get)
                verdict = "met" if ratios[worst] <= goal else "NOT met"
                label = f"{kind}-based ({engine[1:]} engine)" if engine else kind + "-based"
                lines.append(f"[{size}] {label} within {goal}x of vanilla: {verdict} (worst: {worst} {ratios[worst]:.2f}x)")
    return lines


def model_parameters(size):
    from diffusers_ant.models import get_model_adapter

    return list(get_model_adapter("unet").load(model_config_name_or_path="small", resolution=SIZES[size],
                                               num_channels=1).model.parameters())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Step time and peak memory of every weighting vs vanilla training.")
    parser.add_argument("--sizes", default="tiny", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help="comma-separated weighting names; `none` (vanilla) is always included")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"per-task gradient engines of the gradient-based methods, from {', '.join(ENGINES)} "
                             "(the trainer's default, auto, is batched where it runs and split elsewhere; retain_graph the reference code's way)")
    parser.add_argument("--steps", type=int, default=10, help="measured rounds (one step of every method each)")
    parser.add_argument("--warmup", type=int, default=3, help="discarded rounds before measuring")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_clusters", type=int, default=5)
    parser.add_argument("--no_memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tap_breakdown", action="store_true",
                        help="also time the batched engine's per-cluster weight gradients per layer kind against "
                             "the whole-batch weight gradients of the same layers (where its extra time goes)")
    parser.add_argument("--output", default="benchmark_weighting.json")
    parser.add_argument("--_memory_probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sizes.split(",")) - set(SIZES))
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}; valid sizes: {', '.join(SIZES)}")
    unknown = sorted(set(args.methods.split(",")) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(ALL_METHODS)}")
    unknown = sorted(set(args.engines.split(",")) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; valid: {', '.join(ENGINES)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args._memory_probe:
        size, method = args._memory_probe.split(":", 1)
        print(json.dumps(memory_probe(size, method, args, device)))
        return

    names = ["none"] + [m for m in args.methods.split(",") if m != "none"]
    engines = args.engines.split(",")
    methods = [m for m in names if m not in GRADIENT_METHODS or "split" in engines]
    for engine in (e for e in ENGINES if e != "split" and e in engines):
        methods += [f"{m}@{engine}" for m in names if m in GRADIENT_METHODS]
    report = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if argv is None else argv,
              "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "batch_size": args.batch_size, "num_clusters": args.num_clusters,
              "steps": args.steps, "warmup": args.warmup, "sizes": {}}
    tables = []
    for size in args.sizes.split(","):
        medians, raw = time_methods(size, methods, args, device)
        # The fastest measured step is the figure least disturbed by other jobs on a shared machine
        # (interference only ever adds time); the median is the headline figure.
        fastest = {m: min(t[args.warmup:]) for m, t in raw.items()}
        memory = None if args.no_memory else measure_memory(size, methods, args)
        report["sizes"][size] = {
            "resolution": SIZES[size],
            "parameters": sum(p.numel() for p in model_parameters(size)),
            "seconds_per_step": medians, "ratio_to_vanilla": {m: t / medians["none"] for m, t in medians.items()},
            "fastest_step_ratio_to_vanilla": {m: t / fastest["none"] for m, t in fastest.items()},
            "all_step_seconds": raw, "memory": memory,
            "goals": goal_lines(size, medians),
        }
        tables.append(markdown_table(size, medians, fastest, memory, args) + "\n\n" + "\n".join(goal_lines(size, medians)))
        if args.tap_breakdown:
            report["sizes"][size]["tap_breakdown_ms_per_step"] = breakdown = tap_breakdown(size, args, device)
            tables.append(tap_table(size, breakdown))
        with open(args.output, "w") as f:  # written after every size, so a long run keeps its results
            json.dump(report, f, indent=2)
    print("\n\n".join(tables))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
