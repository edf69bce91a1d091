"""`train_scripts/train_ant.py` with records of what each process did, for the two-process tests
(tests/test_train.py, tests/test_transfer_training.py).

* `<output_dir>/returned_<rank>`: the time `train` returned on that process. With `SLOW_FINISH_SECONDS`,
  process 0 spends that much longer on its outputs (saving, sampling, the card, the push): the other
  processes must not wait for them (a barrier after them let a large model's upload outlast NCCL's 10-minute
  timeout on the waiting processes, which then aborted the whole launch, process 0's upload included).
* `<output_dir>/process_group_timeout_<rank>`: the seconds that process's process group waits in a collective
  (`--ddp_timeout`), read while training.
* `<output_dir>/bank_source_loads_<rank>`: one line per time that process loaded a pipeline to check a
  knowledge bank's source (`diff_tuning.bank._load_source`): process 0 alone should, since each load holds a
  whole pipeline in memory.
"""

import os
import runpy
import sys
import time

import torch
import torch.distributed as dist

import diffusers_ant.training
from diffusers_ant.diff_tuning import bank
from diffusers_ant.training import loop

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "train_scripts", "train_ant.py")
RANK = os.environ.get("RANK", "0")
OUTPUT_DIR = sys.argv[sys.argv.index("--output_dir") + 1]
finish, train, load_source, train_with = loop.finish, diffusers_ant.training.train, bank._load_source, loop._train_with


def slow_finish(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_FINISH_SECONDS", "0")))
    return finish(*args, **kwargs)


def timed_train(args):
    output_dir = train(args)
    with open(os.path.join(args.output_dir, f"returned_{RANK}"), "w") as f:
        f.write(repr(time.time()))
    return output_dir


def recorded_train_with(args, accelerator):
    if dist.is_initialized():  # (the group is gone once `train` returns: Accelerate's end_training destroys it)
        timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, f"process_group_timeout_{RANK}"), "w") as f:
            f.write(repr(timeout.total_seconds()))
    return train_with(args, accelerator)


def counted_load_source(*args, **kwargs):
    os.makedirs(OUTPUT_DIR, exist_ok=True)
    with open(os.path.join(OUTPUT_DIR, f"bank_source_loads_{RANK}"), "a") as f:
        f.write(f"{args[0]}\n")
    return load_source(*args, **kwargs)


loop.finish = slow_finish  # (looked up in the module when `train` calls it)
loop._train_with = recorded_train_with  # (looked up in the module when `train` calls it)
diffusers_ant.training.train = timed_train  # (train_ant.py imports it from the package when it runs)
bank._load_source = counted_load_source
sys.argv = [TRAIN_SCRIPT, *sys.argv[1:]]
runpy.run_path(TRAIN_SCRIPT, run_name="__main__")
