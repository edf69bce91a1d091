#!/usr/bin/env python
"""Train a diffusers model with ANT (timestep clustering + multi-task weighting).

    accelerate launch train_scripts/train_ant.py            # the MNIST-5k demo, into ./ant-demo
    accelerate launch train_scripts/train_ant.py --help     # every flag

The logic lives in `diffusers_ant.training`; this script only parses and reports errors.
"""

import os
import sys

from diffusers_ant.training import parse_args, train


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.demo:
            print("No arguments: training the ANT demo (MNIST-5k, 16x16 attention UNet, SNR clusters k=5, UW) into ./ant-demo")
        train(args)
    except (ValueError, FileNotFoundError) as err:
        # Bad input (a flag, a dataset, a checkpoint, a model): one line naming the problem.
        # Set DIFFUSERS_ANT_DEBUG=1 for the traceback.
        if os.environ.get("DIFFUSERS_ANT_DEBUG"):
            raise
        print(f"train_ant.py: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
