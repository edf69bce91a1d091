"""`train_scripts/train_ant.py` whose process 0 spends `SLOW_FINISH_SECONDS` more on its outputs (saving,
sampling, the card, the push), and where every process writes the time its `train` returned to
`<output_dir>/returned_<rank>`. Launched by tests/test_train.py: the other processes must not wait for
process 0's outputs (a barrier after them let a large model's upload outlast NCCL's 10-minute timeout on
the waiting processes, which then aborted the whole launch, process 0's upload included)."""

import os
import runpy
import sys
import time

import diffusers_ant.training
from diffusers_ant.training import loop

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "train_scripts", "train_ant.py")
finish, train = loop.finish, diffusers_ant.training.train


def slow_finish(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_FINISH_SECONDS"]))
    return finish(*args, **kwargs)


def timed_train(args):
    output_dir = train(args)
    with open(os.path.join(args.output_dir, f"returned_{os.environ.get('RANK', '0')}"), "w") as f:
        f.write(repr(time.time()))
    return output_dir


loop.finish = slow_finish  # (looked up in the module when `train` calls it)
diffusers_ant.training.train = timed_train  # (train_ant.py imports it from the package when it runs)
sys.argv = [TRAIN_SCRIPT, *sys.argv[1:]]
runpy.run_path(TRAIN_SCRIPT, run_name="__main__")
