"""Several machines (issue 18, item 3): two `accelerate launch` commands on this one computer, each
standing in for one machine (`--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`, one
process each, gloo on CPU), train the same weights, bit for bit, as one machine running two processes.

What a multi-node launch changes is the rendezvous (torchrun's static one, over TCP to the main
process's address) and the local ranks (each machine's process is its machine's local main process:
two of them write progress bars, one, the global main process, writes the output folder). The same
global ranks draw the same data shards and all-reduce the same gradients, so nothing else may differ.
"""

import random
import socket
import subprocess
import sys

import pytest

from trainer_utils import REPO, TINY_RUN, TRAIN_SCRIPT, assert_same_tensors, load_safetensors_dir, offline_env

RUN = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_steps", "3",
       "--mtl_method", "uw", "--checkpointing_steps", "3"]


def unused_port() -> int:
    """A free TCP port below the kernel's ephemeral range (`ip_local_port_range`), for the two "machines" to
    meet on. Ports bound as port 0 (every other test's launches and servers, on the other xdist worker too)
    come from that range, so a port taken from it could be handed to one of them between this check and
    machine 0's own bind, seconds later; below it, only an explicit bind can take it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default
    draw = random.Random()  # (unseeded: two workers running this test must not draw alike)
    for _ in range(100):
        port = draw.randrange(max(1024, ephemeral - 12768), ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def launch(machine_flags, output_dir):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--mixed_precision", "no", "--dynamo_backend", "no", *machine_flags, str(TRAIN_SCRIPT),
               *RUN, "--output_dir", str(output_dir)]
    return subprocess.Popen(command, cwd=REPO, env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process, timeout=600):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_two_machines_train_the_weights_of_one_machine_with_two_processes(tmp_path):
    one_machine, two_machines = tmp_path / "one_machine", tmp_path / "two_machines"
    finish(launch(["--num_machines", "1", "--main_process_port", "0"], one_machine))  # (0: Accelerate's free port)

    port = str(unused_port())
    machines = [launch(["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                        "--main_process_port", port], two_machines) for rank in (0, 1)]
    try:
        outputs = [finish(m) for m in machines]
    finally:  # (machine 1 would wait for a failed machine 0 until the rendezvous timed out)
        for machine in machines:
            if machine.poll() is None:
                machine.terminate()  # (torchrun stops its workers on SIGTERM; SIGKILL would orphan them)
                try:
                    machine.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    machine.kill()
                    machine.wait()
    # each "machine" ran one process of the two-process job, as its machine's first process
    for rank, out in enumerate(outputs):
        assert f"process {rank} of 2 (rank 0 on its machine)" in out, out[-2000:]
    for rank in (0, 1):
        assert (two_machines / "checkpoint-3" / f"trainer_state_{rank}.json").is_file()

    trained = load_safetensors_dir(two_machines / "unet")
    assert_same_tensors(load_safetensors_dir(one_machine / "unet"), trained)
    # and the UW log-variances, synced across the machines, match too
    assert_same_tensors(load_safetensors_dir(one_machine / "checkpoint-3"),
                        load_safetensors_dir(two_machines / "checkpoint-3"))
