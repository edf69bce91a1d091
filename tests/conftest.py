import os

# Tests never reach the Hub: without these, a hub call retries for minutes before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Torch threads per test process: the cores shared out among pytest-xdist's workers (`make test` runs
# `-n auto`), so that two workers on a 2-core machine do not fight over the cores (measured here: two
# processes with two threads each run several times slower than with one each).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: on a shared 2-core machine two threads contend
    and run up to 10x slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# pytest-xdist (`make test`: `--dist loadfile`) hands out test files in collection order, one file at a
# time as workers free up. A file that starts training processes takes one to three minutes; collected
# late (alphabetically, most of them are), one of them runs alone at the end while the other worker has
# nothing left. So the longest files go first, longest first (the order of `--durations=0` totals per file
# of a `make test` run); every other file keeps its place. Only the schedule changes: the tests of a file
# still run in their own order, on one worker, and none depends on another file.
LONGEST_FILES_FIRST = (
    "test_fsdp.py", "test_transfer_training.py", "test_train.py", "test_trainer_matrix.py", "test_family_matrix.py",
    "test_model_cards.py", "test_domain_features.py", "test_multinode.py", "test_distributed.py",
    "test_flow_matching.py", "test_deme.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
