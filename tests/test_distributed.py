"""Weightings under data parallelism with two real processes (gloo on CPU), and the sync helpers alone.

The slow test launches tests/scripts/ddp_weighting_check.py with
`accelerate launch --multi_gpu --num_processes 2`: each process trains a tiny UNet2DModel on its own
random shard with UW, PCGrad (also in subset mode) and Nash-MTL; process 0 also repeats the run on
one process over the concatenated global batch. Parameters must be identical on both processes,
must have moved, must equal the one-process run on the global batch, and DDP's reducer must not
have averaged the gradient-based updates a second time.

Tolerances against the one-process run (`one_process_tolerance`): both compute the same gradients of the
same samples, summed in another order (two halves all-reduced against one batch), so each step's gradient
differs by float32 rounding: test_engine's `engine_tolerance` (the script's UNet is test_engine's
`tiny_unet`; L = the global batch's 12 samples x 64 positions plus twice the UNet's layer reductions),
scaled by the largest gradient entry the step applied (the script records it). The weights chosen from
those gradients carry the same relative rounding (the methods' conditioning taken as one, as the
network's is), which doubles the bound. An SGD step moves a weight by lr times that, and rounds the
weight once on each side (2 u |w|); the steps add up. A wrong step (local instead of global task
gradients, an update averaged twice) moves weights by lr |g|, orders of magnitude more.

UW's log-variances s follow dL/ds_i = 0.5 (1 - exp(-s_i) L_i) (weighting/uw.py): a step moves s_i by
lr 0.5 exp(-s_i) times the task loss's rounding (test_engine's `loss_tolerance`, the global batch's mean
over one forward path), and an earlier difference is damped, not amplified, at this learning rate.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import engine_tolerance, loss_tolerance, make_batch, tiny_unet
from tolerances import unit_roundoff
from trainer_utils import failure_output, offline_env, run_command

from diffusers_ant.weighting import distributed

REPO = Path(__file__).resolve().parents[1]
METHODS = ("uw", "pcgrad", "nash_mtl", "pcgrad+subset", "uw+chunks", "pcgrad+chunks", "nash_mtl+subset+chunks",
           "rank_noise", "uw_and_pcgrad+chunks", "uw_and_nash_mtl+subset", "pcgrad+batched+chunks",
           "pcgrad+lockstep+chunks", "nash_mtl+lockstep+write_update+chunks", "uw_and_pcgrad+write_update")
STEPS = 4
MODEL_LR, UW_LR = 0.05, 0.5  # the script's SGD learning rates: the UNet's, UW's log-variances' (METHOD_OPTIONS)
GLOBAL_BATCH = make_batch(batch_size=12)  # two processes x 6 samples of 8 x 8: what each weight gradient sums


def one_process_tolerance(run) -> float:
    """How far `run`'s final UNet weights may lie from the one-process run's: the module docstring's bound,
    step by step."""
    steps = run["largest_grads"].tolist()
    assert len(steps) == STEPS
    rounding = sum(2 * MODEL_LR * engine_tolerance(tiny_unet(), largest, GLOBAL_BATCH) for largest in steps)
    return rounding + STEPS * 2 * unit_roundoff() * float(run["params"].abs().max())


def log_variance_tolerance(run) -> float:
    """The same for UW's log-variances (module docstring), with each step's recorded coefficient
    0.5 exp(-s_i) and task loss."""
    losses, coefficients = run["largest_losses"].tolist(), run["largest_coefficients"].tolist()
    assert len(losses) == len(coefficients) == STEPS
    rounding = sum(UW_LR * coefficient * loss_tolerance(tiny_unet(), torch.tensor(loss), GLOBAL_BATCH)
                   for loss, coefficient in zip(losses, coefficients))
    return rounding + STEPS * 2 * unit_roundoff() * float(run["log_vars"].abs().max())


def test_helpers_are_no_ops_on_one_process():
    assert not distributed.is_distributed() and distributed.world_size() == 1
    t = torch.arange(4.0)
    assert distributed.all_reduce_sum_(t) is t and t.tolist() == [0, 1, 2, 3]
    distributed.all_reduce_sum_tensors_([t])
    grads, losses, counts = torch.ones(3, 5), torch.tensor([1.0, 2.0, 0.0]), torch.tensor([2, 1, 0])
    out_losses, out_counts = distributed.sync_task_gradients_(grads, losses, counts)
    assert out_losses is losses and out_counts is counts and torch.all(grads == 1)
    synced, synced_counts = distributed.sync_task_losses(losses, counts)
    assert synced is losses and synced_counts is counts


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = offline_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0",  # a free port: other test runs may hold the default 29500
        str(REPO / "tests" / "scripts" / "ddp_weighting_check.py"),
        "--methods", ",".join(METHODS), "--steps", str(STEPS), "--output_dir", str(out),
    ]
    result = run_command(command, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + failure_output(result.stderr)
    assert "on 2 processes (DistributedType.MULTI_CPU)" in result.stdout + result.stderr
    return {
        method: [load_file(out / f"{method}_{who}.safetensors") for who in ("rank0", "rank1", "reference")]
        for method in METHODS
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_take_identical_steps(two_process_run, method):
    rank0, rank1, reference = two_process_run[method]
    # identical on both processes, bit for bit: the same synced statistics, the same weights
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(rank0["weights"], rank1["weights"])
    # and the steps did something
    assert (rank0["params"] - rank0["init_params"]).abs().max() > 1e-3
    # equal to one process training on the concatenated global batch (float rounding only)
    tolerance = one_process_tolerance(rank0)
    assert (rank0["params"] - reference["params"]).abs().max() <= tolerance
    # the weights of each step: its inputs carry the rounding of the steps before (conditioning one)
    relative = STEPS * engine_tolerance(tiny_unet(), 1.0, GLOBAL_BATCH)
    torch.testing.assert_close(rank0["weights"], reference["weights"], rtol=relative, atol=relative)


@pytest.mark.slow
def test_weights_are_process_zeros_even_when_a_solver_differs_between_processes(two_process_run):
    rank0, rank1, reference = two_process_run["rank_noise"]
    assert torch.equal(rank0["params"], rank1["params"])
    assert torch.equal(rank1["weights"], torch.ones_like(rank1["weights"]))  # process 0's weights (1, not 1.25)


@pytest.mark.slow
def test_uw_log_variances_identical_and_synced_through_ddp(two_process_run):
    rank0, rank1, reference = two_process_run["uw"]
    assert torch.equal(rank0["log_vars"], rank1["log_vars"])
    assert rank0["log_vars"].abs().max() > 1e-3  # they moved from their initial 0
    tolerance = log_variance_tolerance(rank0)
    torch.testing.assert_close(rank0["log_vars"], reference["log_vars"], rtol=0, atol=tolerance)
    # loss-based: the ordinary DDP backward averaged the model gradients (once per step)
    assert int(rank0["ddp_allreduce_calls"]) >= STEPS


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uw_and_pcgrad+chunks", "uw_and_nash_mtl+subset"])
def test_combined_weighting_trains_uw_log_variances_identically_on_both_processes(two_process_run, method):
    """UW+PCGrad / UW+Nash-MTL: UW's log-variances are trained by UW's own objective on the global task
    losses (identical on both processes, equal to one process on the global batch), and the model's
    update went through the engine, never through DDP's reducer."""
    rank0, rank1, reference = two_process_run[method]
    assert torch.equal(rank0["log_vars"], rank1["log_vars"])
    assert rank0["log_vars"].abs().max() > 1e-3
    tolerance = log_variance_tolerance(rank0)
    torch.testing.assert_close(rank0["log_vars"], reference["log_vars"], rtol=0, atol=tolerance)
    assert int(rank0["ddp_allreduce_calls"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pcgrad", "nash_mtl", "pcgrad+subset", "pcgrad+batched+chunks"])
def test_gradient_methods_sync_task_gradients_not_ddp(two_process_run, method):
    rank0, rank1, reference = two_process_run[method]
    # the DDP reducer never fired: the engine's own all-reduce was the only one
    assert int(rank0["ddp_allreduce_calls"]) == 0 and int(rank1["ddp_allreduce_calls"]) == 0
    # the all-reduced per-task gradients are the one-process per-task gradients of the global batch
    grads = rank0["task_grads_step0"]
    assert grads.shape[0] == 4 and grads.abs().max() > 1e-3
    assert torch.equal(grads, rank1["task_grads_step0"])
    tolerance = engine_tolerance(tiny_unet(), reference["task_grads_step0"], GLOBAL_BATCH)
    assert (grads - reference["task_grads_step0"]).abs().max() <= tolerance


@pytest.mark.slow
def test_lockstep_runs_the_same_passes_on_every_process(two_process_run):
    """FSDP's path (`lockstep`): both processes ran the same number of forward and backward passes (each
    gathers the sharded weights, a collective), although their shards hold different numbers of samples of a
    cluster, and the steps are still the one-process steps (test_two_processes_take_identical_steps); without
    lockstep the two processes' counts differ on these shards."""
    rank0, rank1, _ = two_process_run["pcgrad+lockstep+chunks"]
    assert torch.equal(rank0["engine_passes"], rank1["engine_passes"])
    free0, free1, _ = two_process_run["pcgrad+chunks"]
    assert not torch.equal(free0["engine_passes"], free1["engine_passes"])


def _broadcast_nash_state(rank, init_file, out_dir):
    """One of two gloo processes: its own Nash-MTL solved mask (process 0's left task 3 unsolved, process 1's
    solve 'converged' on all four), then the engine's broadcast of the weighting's state."""
    import json

    import torch.distributed as dist

    from diffusers_ant.weighting import get_weighting

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        nash = get_weighting("nash_mtl", 4)
        nash.solved = torch.tensor([True, True, True, rank == 1])
        nash.step = 1  # between two scheduled solves: the mask decides whether this step solves
        distributed.broadcast_module_state_(nash)
        present = torch.ones(4, dtype=torch.bool)
        result = {"solved": nash.solved.tolist(), "solves": nash.needs_gradients_this_step(present)}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_nash_mtls_solved_mask_is_broadcast_with_its_alpha(tmp_path):
    """The mask of tasks the last solve covered was Python state the engine's broadcast left out: a process whose
    solve ended otherwise than process 0's kept its own, and at the next step the processes disagreed on whether
    to solve, entering different collectives (a hang). After the broadcast both hold process 0's mask."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_broadcast_nash_state, args=(str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1] == {"solved": [True, True, True, False], "solves": True}
