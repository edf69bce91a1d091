"""Issue 16's test matrix for the four new families, and the cells no other module fills.

AUDIT_TABLE

Two processes: one `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) of
tests/scripts/ddp_families_check.py trains the four families in turn in the same two processes (one
import of torch / diffusers / transformers per process), each with LoRA and one method.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("sdxl", "sd3", "flux", "qwenimage")
DDP_STEPS = 2  # tests/scripts/ddp_families_check.py's STEPS


@pytest.fixture(scope="module")
def two_process_families(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-families")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "0",  # a free port: other test runs may hold the default 29500
        str(REPO / "tests" / "scripts" / "ddp_families_check.py"), "--output_dir", str(out),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for family in FAMILIES:
        for rank in (0, 1):
            assert f"{family}: rank {rank} trained {DDP_STEPS} micro-batches on 2 processes" in result.stdout, family
    return {family: [load_file(out / f"{family}_rank{rank}.safetensors") for rank in (0, 1)] for family in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_train_each_family_identically_on_their_own_shards(two_process_families, family):
    """sdxl: UW; sd3: PCGrad on the LoRA subset; flux: Diff-Tuning kd; qwenimage: DeMe (LoRA and channel
    projections). Both processes end with bit-identical trainable weights, which moved from the (shared)
    initial ones, after each trained on micro-batches of its own."""
    rank0, rank1 = two_process_families[family]
    assert rank0.keys() == rank1.keys()
    names = [k[len("final."):] for k in rank0 if k.startswith("final.")]
    assert names and all("lora" in n or "channel_projection" in n for n in names), names[:4]
    for name in names:
        assert torch.equal(rank0[f"final.{name}"], rank1[f"final.{name}"]), name
        assert torch.equal(rank0[f"init.{name}"], rank1[f"init.{name}"]), name
    moved = {n: (rank0[f"final.{n}"] - rank0[f"init.{n}"]).abs().max().item() for n in names}
    assert max(moved.values()) > 1e-3  # the steps trained (B starts at zero: a no-op run would leave it)
    assert max(v for n, v in moved.items() if "lora_B" in n or "lora.up" in n) > 1e-3
    if family == "qwenimage":  # DeMe's projections: averaged outside DDP, identical and trained
        assert max(v for n, v in moved.items() if "channel_projection" in n) > 1e-3
    # two shards: each process trained DDP_STEPS micro-batches of 2 rows, none of them the other's
    seen0, seen1 = rank0["batches"], rank1["batches"]
    assert seen0.shape == seen1.shape == (DDP_STEPS, 2)
    assert not set(seen0.flatten().tolist()) & set(seen1.flatten().tolist())
