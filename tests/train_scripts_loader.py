"""Import train_scripts/train_ant.py's `main` (train_scripts is not a package)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_train_main():
    spec = importlib.util.spec_from_file_location("train_ant", os.path.join(REPO, "train_scripts", "train_ant.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
