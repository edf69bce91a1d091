"""Shared pieces of the command-line scripts in train_scripts/."""

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad invocation prints one line naming the problem (exit status 2).

    argparse prints the whole usage block before an error; with a diffusers-sized flag list that
    is dozens of lines. One line is what the user needs; `--help` has the rest.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
