"""`train_scripts/train_ant.py` with a record of the gradient each optimizer step applies, for the rounding
tolerances of the sharded engines' tests (tests/test_fsdp.py, tests/test_deepspeed.py).

    accelerate launch [engine flags] tests/scripts/record_applied_gradients.py <train_ant.py's flags>

A two-process run's weights may differ from another engine's by the rounding of the gradients its steps
applied, so a tolerance scales with those gradients (tests/tolerances.py). A test in the same process
records them with an optimizer step pre-hook (`trainer_utils.largest_gradients`); a launched run cannot, so
this script installs the same hook in each process and then runs the trainer unchanged. The hook is
torch's global one: it runs before the step of every torch optimizer of the process (DeepSpeed's inner
optimizer included, after DeepSpeed has reduced and clipped the gradients; the trainer's own clipping runs
before `optimizer.step()`), and records, per optimizer in the order they first step, the largest |entry|
of the gradients it is handed on this process (its local shard where the engine shards them: FSDP2's
DTensors, ZeRO's partitions).

Each process writes `<output_dir>/applied_gradients_<rank>.json` when the trainer returns:
`{"optimizers": [[largest at step 1, largest at step 2, ...], ...]}`. A run that fails writes nothing.
"""

import json
import os
import runpy
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "train_scripts", "train_ant.py")


def _local(gradient: torch.Tensor) -> torch.Tensor:
    """This process's part of a gradient: a DTensor's local shard, any other tensor itself."""
    return gradient.to_local() if hasattr(gradient, "to_local") else gradient


def main() -> None:
    argv = sys.argv[1:]
    output_dir = argv[argv.index("--output_dir") + 1]
    records = {}  # id(optimizer) -> that optimizer's per-step largest entries, in the order optimizers first step

    def record(optimizer, args, kwargs):
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        largest = max((float(g.detach().abs().max()) for g in grads if g.numel()), default=0.0)
        records.setdefault(id(optimizer), []).append(largest)

    handle = register_optimizer_step_pre_hook(record)
    sys.argv = [TRAIN_SCRIPT, *argv]
    try:
        runpy.run_path(TRAIN_SCRIPT, run_name="__main__")
    finally:
        handle.remove()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(output_dir, f"applied_gradients_{rank}.json"), "w") as f:
        json.dump({"optimizers": list(records.values())}, f)


if __name__ == "__main__":
    main()
