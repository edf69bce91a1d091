"""Import train_scripts/*.py (train_scripts is not a package): train_ant.py's `main`, or any script as a module."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_train_main():
    spec = importlib.util.spec_from_file_location("train_ant", os.path.join(REPO, "train_scripts", "train_ant.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def load_script(name):
    """Import ``train_scripts/<name>.py`` as a module (the scripts import their neighbours, so the folder
    goes on ``sys.path`` too)."""
    import sys

    folder = os.path.join(REPO, "train_scripts")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
