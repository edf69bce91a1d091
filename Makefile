# Two entry points, each doing the whole set-up on a fresh machine with Python 3.11:
#   make demo   -> .venv, install, train the embedded ANT demo into ./ant-demo
#   make test   -> .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Never touch the Hub from tests or the demo: without these a hub call retries for minutes.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install demo test test-fast test-benchmarks test-deepspeed bench clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 is the CPU wheel on disk; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,datasets]"
	# animal-mnist declares tensorflow, which it never imports: --no-deps keeps it out.
	$(PY) -m pip install --quiet --no-deps animal-mnist
	touch $@

install: $(VENV)/.installed

# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: give the one process every core
# (measured here: 0.25 s/step with 2 threads against 0.38 s/step with 1).
NPROC := $(shell nproc 2>/dev/null || echo 1)

demo: install
	$(OFFLINE) $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no --num_cpu_threads_per_process $(NPROC) train_scripts/train_ant.py

# pytest-xdist: one worker per core (tests/conftest.py gives each worker its share of the torch
# threads); --dist loadfile keeps a module's tests, and its module-scoped fixtures, on one worker.
# The 15 slowest tests are printed at the end.
PYTEST := $(OFFLINE) $(PY) -m pytest -q -n auto --dist loadfile --durations=15

test: install
	$(PYTEST) -m "not benchmark and not deepspeed" tests

# The benchmark scripts' --quick end-to-end runs (about 4 min on 2 cores): run before changing a benchmark.
test-benchmarks: install
	$(PYTEST) -m benchmark tests

# DeepSpeed's two-process runs (tests/test_deepspeed.py, marked `deepspeed`, about 2.5 min): DeepSpeed is not
# part of the default set-up (its first launch also compiles a CPU communication op, 2.5 min here, cached in
# ~/.cache/torch_extensions), so `make test` leaves them out. This installs the version they were run with
# into .venv (DS_BUILD_OPS=0: no op is compiled at install; it needs the torch already there) and runs them.
DEEPSPEED_VERSION := 0.19.8

test-deepspeed: install
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet deepspeed==$(DEEPSPEED_VERSION)
	$(PYTEST) -m deepspeed tests

test-fast: install
	$(PYTEST) -m "not slow and not benchmark" tests

clean:
	rm -rf $(VENV) *.egg-info
