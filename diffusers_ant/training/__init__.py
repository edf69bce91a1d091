"""The pieces of the Accelerate training loop: arguments, the step, checkpoints, validation."""

from .args import DEMO_ARGS, UsageError, build_parser, parse_args, validate_args

__all__ = ["DEMO_ARGS", "UsageError", "build_parser", "parse_args", "validate_args", "train"]


def train(args):
    """Run training (imported lazily: the loop pulls in diffusers and accelerate)."""
    from .loop import train as _train

    return _train(args)
