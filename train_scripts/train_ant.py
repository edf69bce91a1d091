#!/usr/bin/env python
"""Train a diffusers model with ANT (timestep clustering + multi-task weighting).

    accelerate launch train_scripts/train_ant.py            # the MNIST-5k demo, into ./ant-demo
    accelerate launch train_scripts/train_ant.py --help     # every flag

The logic lives in `diffusers_ant.training`; this script only parses and reports errors.
"""

import sys

from diffusers_ant.cli import report_bad_input
from diffusers_ant.training import parse_args, train


def main(argv=None):
    # Bad input (a flag, a dataset, a checkpoint, a model): one line naming the problem, exit 1.
    status = report_bad_input("train_ant.py", _run, argv, errors=(ValueError, FileNotFoundError))
    if status:
        sys.exit(status)


def _run(argv):
    args = parse_args(argv)
    if args.demo:
        print("No arguments: training the ANT demo (MNIST-5k, 16x16 attention UNet, SNR clusters k=5, UW) into ./ant-demo")
    train(args)


if __name__ == "__main__":
    main()
