"""Helpers for the trainer tests: run train_ant.py in-process or as a real subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "train_scripts", "train_ant.py")
# train_ant.py with a record of each optimizer step's applied gradient, for launched runs' tolerances
RECORDING_SCRIPT = os.path.join(REPO, "tests", "scripts", "record_applied_gradients.py")

# A run small enough for a CPU test: the tiny preset of each model type, a few steps.
TINY_RUN = ["--model_config_name_or_path", "tiny", "--train_batch_size", "8", "--learning_rate", "1e-3",
            "--num_clusters", "4", "--report_to", "none", "--seed", "0", "--num_validation_images", "2",
            "--num_inference_steps", "2", "--max_train_samples", "64"]


# The sharded engines' gradient-method run, shared by tests/test_fsdp.py and tests/test_deepspeed.py so that
# both compare against the same DDP runs: uw+pcgrad (PCGrad on the LoRA subset's per-cluster gradients, UW's
# log-variances beside the sharded model) on a pretrained tiny UNet (`save_lora_base`), over windows of two
# micro-batches of 4 samples drawn uniformly, so that the two processes hold different numbers of samples of
# a cluster (FSDP's processes then run padding passes to stay in step; under DeepSpeed, which owns the
# accumulation, the weighting chooses once per window). lr = Adam's epsilon = 1: the update is about the
# gradient itself, not its sign.
LORA_STEPS = 2
LORA_RUN = ["--model_type", "unet", "--dataset_name", "mnist5k", "--train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--num_clusters", "4", "--timestep_sampling", "uniform",
            "--report_to", "none", "--seed", "0", "--num_validation_images", "1", "--num_inference_steps", "1",
            "--max_train_samples", "32", "--rank", "4", "--mtl_method", "uw+pcgrad", "--task_gradient_subset", "lora",
            "--max_train_steps", str(LORA_STEPS), "--checkpointing_steps", "1", "--learning_rate", "1",
            "--adam_epsilon", "1"]


def save_lora_base(folder):
    """The pretrained model of `LORA_RUN`: the tiny UNet preset, seeded, so that every run (and both files)
    starts from the same weights (unseeded, each drew its own, and their bf16 distances differed by 50%)."""
    import torch

    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1).save(str(folder))
    return folder


def lora_run_tolerances(pretrained, runs, largest_weight: float, largest_log_variance: float) -> tuple[float, float]:
    """How far two LORA_RUN runs under different engines (`runs`: their folders, launched through
    RECORDING_SCRIPT) may end apart: (the LoRA weights, UW's log-variances at the last step). tests/tolerances.py's
    `adam_run_tolerance` and `uw_log_variance_tolerance` over the UNet with its LoRA layers (their reductions are
    on the path), scaled by the largest gradient entry either run applied per step: each weight gradient sums
    the window's 2 processes x 2 micro-batches x 4 samples x positions, and the clipping norm (at 1) sums the
    LoRA matrices' entries (in any grouping: per tensor under DDP and FSDP2, flat partitions under ZeRO), the
    tensors and the two processes. lr = Adam's epsilon = 1; UW's own lr for its log-variances."""
    from tolerances import adam_run_tolerance, uw_log_variance_tolerance

    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.weighting.uw import UWConfig

    flag = flag_values(LORA_RUN)
    lr, eps, rank = float(flag["--learning_rate"]), float(flag["--adam_epsilon"]), int(flag["--rank"])
    adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=str(pretrained))
    adapter.add_lora(rank)
    model = adapter.model
    applied = applied_gradients(LORA_STEPS, *runs)
    terms = (2 * int(flag["--gradient_accumulation_steps"]) * int(flag["--train_batch_size"])
             * model.config.sample_size ** 2)
    lora = [p.numel() for p in model.parameters() if p.requires_grad]
    weights = adam_run_tolerance(model, applied, terms, lr, eps, largest_weight, clip_norm_terms=sum(lora) + len(lora) + 2)
    log_variances = uw_log_variance_tolerance(model, applied, terms, UWConfig().lr, eps, largest_log_variance)
    return weights, log_variances


def offline_env(**extra):
    """The environment of a test's subprocess: no Hub, one torch thread, unbuffered output (what a
    process printed is in the captured output even when it never exits) and Python's fault handler
    (`run_command` makes a hung process print its stacks with it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def failure_output(stderr: str, tail: int = 3000) -> str:
    """What a failed launch's stderr says: the first fatal error's report (a worker that aborted prints "Fatal
    Python error" and every thread's stack through PYTHONFAULTHANDLER, then a long list of extension modules and
    the launcher's traceback, which a plain tail keeps alone), then the last `tail` characters."""
    starts = [i for i in (stderr.find(marker) for marker in ("Fatal Python error", "terminate called")) if i >= 0]
    head = stderr[min(starts):min(starts) + 4000] + "\n...\n" if starts and min(starts) < len(stderr) - tail else ""
    return head + stderr[-tail:]


def run_command(cmd, env=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` for a command that may hang, such as a
    two-process `accelerate launch`. On the timeout, every process of the command gets SIGABRT, one at a
    time, the launcher's workers first (torchrun starts each in a session of its own, so they are found by their
    parent, not by a process group): with PYTHONFAULTHANDLER (`offline_env`) each prints every thread's
    Python stack; then whatever is left gets SIGKILL. The test fails with those stacks, and no worker of
    a hung launch keeps running beside the rest of the suite."""
    import signal

    import psutil  # an Accelerate dependency

    import resource

    # SIGABRT's default action also dumps core: no core files of hung training processes (in the repo, their
    # working directory). Set here and inherited, not in a preexec_fn, which is unsafe in a threaded parent.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or offline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        family = psutil.Process(proc.pid).children(recursive=True)[::-1] + [psutil.Process(proc.pid)]
        # One stack dump at a time: dumps written together interleave on the shared stderr pipe and garble
        # each other. Every process is stopped first, so a launcher cannot answer a worker's death by
        # terminating the others (SIGTERM prints no stack) before their turn; then each in turn is sent
        # SIGABRT, resumed, and waited for.
        _signal_all(family, signal.SIGSTOP)
        for member in family:
            _signal_all([member], signal.SIGABRT)
            _signal_all([member], signal.SIGCONT)
            _wait_until_gone(member, timeout=10)
        _signal_all(family, signal.SIGKILL)
        psutil.wait_procs(family, timeout=10)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process outside the tree still holds the pipes
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s, each process's stacks are at the end of its stderr: "
                             f"{' '.join(map(str, cmd))}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-15000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _signal_all(processes, sig) -> None:
    import psutil

    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _wait_until_gone(process, timeout) -> None:
    """Until `process` has exited (gone, or a zombie its stopped parent has not reaped yet: `wait_procs`
    would wait out the timeout on a zombie that is not this process's child)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)


def run_script(args, env=None, timeout=600, launcher=None, script=TRAIN_SCRIPT):
    """Run train_ant.py (or `script`, such as RECORDING_SCRIPT) as a subprocess (`launcher`: e.g. accelerate
    launch flags)."""
    cmd = [sys.executable, script, *args]
    if launcher is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, script, *args]
    return run_command(cmd, env=env, timeout=timeout)


def applied_gradients(steps: int, *folders) -> list[float]:
    """Per optimizer step of runs launched through RECORDING_SCRIPT (tests/scripts/record_applied_gradients.py):
    the largest |entry| of the gradients any optimizer of any process of any of the runs applied at that step."""
    largest = [0.0] * steps
    for folder in folders:
        records = sorted(Path(folder).glob("applied_gradients_*.json"))
        assert records, f"no applied_gradients_<rank>.json in {folder}: was the run launched through RECORDING_SCRIPT?"
        for record in records:
            for per_step in json.loads(record.read_text())["optimizers"]:
                assert len(per_step) == steps, (record, per_step)
                largest = [max(a, b) for a, b in zip(largest, per_step)]
    return largest


def flag_values(run: list) -> dict:
    """A run's flags (a list like LORA_RUN, every flag followed by its value) as {flag: value}."""
    values = dict(zip(run[::2], run[1::2]))
    assert all(name.startswith("--") for name in values), run  # (a flag without a value would shift the pairs)
    return values


def straight_and_resumed(root, make_args, common, resume_at=10):
    """The exact-resume check's two runs: ``make_args(folder, *flags)`` straight through in ``root/straight``
    (checkpointing at ``resume_at``), and in ``root/resumed`` its ``checkpoint-<resume_at>``, copied, resumed to
    the end. The copied checkpoint is the same seeded run interrupted there, so one run is saved."""
    import shutil

    from diffusers_ant.training import step as step_module

    straight, resumed = root / "straight", root / "resumed"
    original, prepared = step_module.DiffusionObjective.prepare, []

    def counting(self, *args, **kwargs):  # every micro-batch the trainer prepares, counted per run
        prepared[-1] += 1
        return original(self, *args, **kwargs)

    step_module.DiffusionObjective.prepare = counting
    try:
        prepared.append(0)
        train_in_process(make_args(straight, *common))
        shutil.copytree(straight / f"checkpoint-{resume_at}", resumed / f"checkpoint-{resume_at}")
        prepared.append(0)
        train_in_process(make_args(resumed, *common, "--resume_from_checkpoint", f"checkpoint-{resume_at}"))
    finally:
        step_module.DiffusionObjective.prepare = original
    # It resumed: the second run trained only the steps after the checkpoint. (A run that ignored the flag
    # would train from step 0 and, seeded alike, end with the straight run's weights: the equality checks
    # that follow would pass without any resume.)
    total = int(json.loads((straight / "training_config.json").read_text())["max_train_steps"])
    assert 0 < resume_at < total and prepared[1] * total == prepared[0] * (total - resume_at), (prepared, total)
    return straight, resumed


def train_in_process(args):
    """Run the trainer in this process (much faster than a subprocess for many small runs)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from diffusers_ant.training import parse_args, train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    try:
        return train(parse_args(args))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def record_prepared(monkeypatch, pick):
    """`pick(prepared)` of every batch `DiffusionObjective.prepare` makes from now on, in a list that grows as
    the trainer runs (e.g. `lambda p: (p["task_ids"].clone(), p["conditioning"]["class_labels"].clone())`)."""
    from diffusers_ant.training import step as step_module

    seen = []
    original = step_module.DiffusionObjective.prepare

    def recording(self, batch, generator, chunk_size=None):
        prepared = original(self, batch, generator, chunk_size)
        seen.append(pick(prepared))
        return prepared

    monkeypatch.setattr(step_module.DiffusionObjective, "prepare", recording)
    return seen


def record_batches(monkeypatch, pick):
    """`pick(objective, batch)` of every batch the trainer's objective prepares from now on (one per source of a
    window: its micro-batches' rows as the data loader made them, joined; and the objective with its adapter),
    in a list."""
    from diffusers_ant.training import step as step_module

    seen = []
    original = step_module.DiffusionObjective._prepare_source

    def recording(self, index, source, batch, *args, **kwargs):
        seen.append(pick(self, batch))
        return original(self, index, source, batch, *args, **kwargs)

    monkeypatch.setattr(step_module.DiffusionObjective, "_prepare_source", recording)
    return seen


@contextlib.contextmanager
def largest_gradients():
    """The largest |gradient entry| each optimizer step is handed (after clipping: what the step applies), in a
    list that grows as the trainer runs: a test's rounding tolerance on the weights scales with it."""
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(max((float(g.abs().max()) for g in grads), default=0.0))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def load_safetensors_dir(folder):
    """All tensors of every *.safetensors file under `folder` (sorted by file and key)."""
    from safetensors.torch import load_file

    tensors = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                for key, value in load_file(os.path.join(root, name)).items():
                    tensors[f"{os.path.relpath(os.path.join(root, name), folder)}:{key}"] = value
    return tensors


def _tensor_difference(a, b) -> float:
    """max |a - b| of two tensors of one shape (0 for empty ones), in float32."""
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def largest_difference(a, b) -> float:
    """The largest |a - b| over two state dicts with the same tensor names."""
    assert sorted(a) == sorted(b), "different tensor names"
    return max((_tensor_difference(a[key], b[key]) for key in a), default=0.0)


def assert_same_tensors(a, b, atol=0.0):
    assert sorted(a) == sorted(b), "different tensor names"
    for key in a:
        diff = _tensor_difference(a[key], b[key])
        assert diff <= atol, f"{key} differs by {diff}"


def torch_threads():
    return torch.get_num_threads()


def perturb_parameters(module, scale, seed, only=None):
    """Add seeded Gaussian noise of std ``scale`` to ``module``'s parameters (those whose name contains
    ``only``, if given): weights that differ from the base, so that an equality test can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is None or only in name:
                p.add_(scale * torch.randn(p.shape, generator=g))

