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
