"""Shared pieces of the command-line scripts in train_scripts/."""

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad invocation prints one line naming the problem (exit status 2).

    argparse prints the whole usage block before an error; with a diffusers-sized flag list that
    is dozens of lines. One line is what the user needs; `--help` has the rest.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report_bad_input(prog, fn, *args, errors=(ValueError, OSError)) -> int:
    """Run `fn(*args)`; a bad-input error becomes one line on stderr and exit status 1.

    The libraries raise ValueError (or an OSError for a missing file) naming the fix; the user
    needs that line, not a traceback. Set DIFFUSERS_ANT_DEBUG=1 to get the traceback.
    """
    import os
    import sys

    try:
        fn(*args)
    except errors as err:
        if os.environ.get("DIFFUSERS_ANT_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1
    return 0


def output_path_problem(path, folder: bool = False):
    """Why ``path`` cannot take a result (None if it can), asked before the work that makes the result: a
    file's path must not be a folder, a folder's not a file, and the nearest existing folder above it must be
    writable (the scripts found out after the analysis or the sampling had run)."""
    import os

    if path is None:
        return None
    target = os.path.abspath(path)
    if folder and os.path.isfile(target):
        return f"{path!r} is a file, not a folder"
    if not folder and os.path.isdir(target):
        return f"{path!r} is a folder: give a file name"
    existing = target if folder else os.path.dirname(target)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{path!r} cannot be created: {existing!r} is a file"
    if not os.access(existing, os.W_OK):
        return f"{path!r} cannot be written: {existing!r} is not writable"
    return None


def check_output_paths(parser, *outputs) -> None:
    """``parser.error`` (one line) for the first ``(flag, path, is_folder)`` that cannot take its result."""
    for flag, path, folder in outputs:
        problem = output_path_problem(path, folder)
        if problem:
            parser.error(f"{flag} {problem}")
