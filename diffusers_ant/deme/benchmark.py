"""What DeMe's benchmark (``train_scripts/benchmark_deme.py``, issue 12 item 5) adds to the shared
benchmark machinery (``diffusers_ant.analysis.benchmark``: logged runs, evaluation workers, relative
differences, image folders): the held-out references of the merge-weight search.

The DeMe paper chooses its merge weights by a search on a validation metric (PAPERS.md section 2,
item 5). Searching and reporting on the same real images would let the search fit the reported
number, so the dataset's rows are split, by a seeded permutation, into a *search* reference and a
disjoint *evaluation* reference (``split_reference_rows``), each written as an image folder
(``write_reference_folder``: the original images, lossless PNG, named by dataset row) that
``merge_deme.py --train_data_dir`` and ``analysis.evaluate.real_images(train_data_dir=...)`` read
through the same transforms as the dataset itself.

It also scores the points of the plateau probe (issue 17, item 11: each interval fine-tuned long
enough to plateau): ``evaluate_swap_in`` samples the pretrained model with one interval's fine-tune
swapped in for the timesteps of its interval (a DeMe ensemble folder with one member, the
configuration of ANT's negative transfer gap), so a point measures that fine-tune alone.
"""

from __future__ import annotations

import os

from ..analysis.benchmark import split_rows, write_image_folder

__all__ = ["REFERENCE_RECORD", "evaluate_swap_in", "split_reference_rows", "write_reference_folder"]

REFERENCE_RECORD = "reference_rows.json"  # in each reference folder: the dataset and its rows


def split_reference_rows(num_rows: int, num_search: int, seed: int = 0) -> tuple:
    """(search rows, evaluation rows): the first ``num_search`` rows of a seeded permutation of
    ``range(num_rows)`` and the rest (``analysis.benchmark.split_rows``); disjoint, together every
    row, each sorted."""
    if not 0 < num_search < num_rows:
        raise ValueError(f"the search reference takes {num_search} of {num_rows} images: give 0 < --search_real < {num_rows}, "
                         "so that both references have images")
    search, evaluation = split_rows(num_rows, [num_search, None], seed=seed)
    return search, evaluation


def write_reference_folder(dataset_name: str, rows, folder: str) -> str:
    """Write dataset rows ``rows`` as ``folder/row-NNNNN.png`` (``analysis.benchmark.write_image_folder``)
    with their record inside the folder, ``folder/reference_rows.json`` (the folder is the whole
    reference that ``merge_deme.py --train_data_dir`` is given); kept as they are when the record
    already lists these rows."""
    return write_image_folder(dataset_name, rows, folder, record_path=os.path.join(folder, REFERENCE_RECORD))


def evaluate_swap_in(task: dict) -> dict:
    """Score the pretrained model ``task["base"]`` with the fine-tune ``task["finetune"]`` routed on
    its own interval: writes the one-member ensemble folder ``task["ensemble"]`` (``merge_deme.py
    --ensemble``'s writer; redone when a crash left it half-written) and scores it with
    ``analysis.benchmark.evaluate_saved_model`` (``task["seed"]``, ``task["path"]``,
    ``task["settings"]``); ``task["finetune"]`` None scores the pretrained model alone. A module-level
    function: it runs in the spawned evaluation workers."""
    import shutil

    from ..analysis.benchmark import evaluate_saved_model
    from .merging import MERGE_RECORD_NAME, write_ensemble_folder

    if task["finetune"] is None:
        return evaluate_saved_model({key: task[key] for key in ("seed", "path", "settings")} | {"model": task["base"]})
    folder = task["ensemble"]
    if not os.path.isfile(os.path.join(folder, MERGE_RECORD_NAME)):
        shutil.rmtree(folder, ignore_errors=True)  # write_ensemble_folder wants a new or empty folder
        write_ensemble_folder(task["base"], [task["finetune"]], folder, log=lambda *a, **k: None)
    return evaluate_saved_model({"model": folder, "seed": task["seed"], "path": task["path"],
                                 "settings": task["settings"]})
