"""The test suite's launcher for commands that may hang (`trainer_utils.run_command`): a two-process
launch that stops mid-run must fail the test with every process's stacks, and leave no process behind
(torchrun starts its workers in sessions of their own; left running, they would slow every later test)."""

import sys
import textwrap

import psutil
import pytest

from trainer_utils import offline_env, run_command

# A launcher that starts a worker in a session of its own, as torchrun does, prints the worker's pid and
# waits for it; the worker waits forever inside a named function.
HANGING_LAUNCH = textwrap.dedent("""
    import subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", "import time\\ndef wait_for_the_other_rank():\\n    time.sleep(3600)\\nwait_for_the_other_rank()"],
                              start_new_session=True)
    print(worker.pid, flush=True)
    def wait_for_the_workers():  # outlives the worker: the launcher's stack is printed whichever is signalled first
        worker.wait()
        time.sleep(3600)
    wait_for_the_workers()
""")


def test_a_hung_launch_fails_with_every_process_stack_and_leaves_nothing_running():
    with pytest.raises(AssertionError, match="timed out after 15 s") as info:
        run_command([sys.executable, "-c", HANGING_LAUNCH], env=offline_env(), timeout=15)
    message = str(info.value)
    stacks = message.split("--- stderr ---\n")[1]
    assert "line 3 in wait_for_the_other_rank" in stacks  # the worker's stack, printed by its fault handler
    assert " in wait_for_the_workers" in stacks  # the launcher's
    worker_pid = int(message.split("--- stdout ---\n")[1].split()[0])
    try:
        worker = psutil.Process(worker_pid)
        # killed (a zombie until init reaps it), unless its pid went to another process meanwhile
        assert worker.status() == psutil.STATUS_ZOMBIE or "wait_for_the_other_rank" not in " ".join(worker.cmdline())
    except psutil.NoSuchProcess:
        pass


def test_a_command_that_finishes_returns_its_output():
    result = run_command([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_failure_output_keeps_a_workers_fatal_error_ahead_of_the_launchers_tail():
    """A worker that aborts prints "Fatal Python error" and its stacks, then its extension modules and the
    launcher's traceback: a plain 3,000-character tail kept only the module list and the launcher's lines (a
    two-process test failed so once, and why could not be read)."""
    from trainer_utils import failure_output

    stderr = ("start\n" + "Fatal Python error: Aborted\n\nThread 0x1 (most recent call first):\n  File \"loop.py\", "
              "line 9 in finish\n" + "Extension modules: " + "m, " * 3000 + "\nChildFailedError: rank 1 failed\n")
    summary = failure_output(stderr)
    assert summary.startswith("Fatal Python error: Aborted") and 'line 9 in finish' in summary
    assert summary.endswith("ChildFailedError: rank 1 failed\n")
    assert failure_output("short and plain\n") == "short and plain\n"  # nothing to pull ahead
