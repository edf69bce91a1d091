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
