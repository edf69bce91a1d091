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


# --------------------------------------------------------------------------- in-process runs on the tiny bases

RES = 16


@pytest.fixture(scope="module")
def bases(one_thread, tmp_path_factory):
    """Each family's tiny preset saved as the pretrained pipeline folder the LoRA runs start from."""
    from diffusers_ant.models import get_model_adapter

    root = tmp_path_factory.mktemp("family-bases")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        torch.manual_seed(0)
        get_model_adapter(family).load(model_config_name_or_path="tiny", resolution=RES).save(str(folders[family]))
    return folders


def _args(family, base, out, *extra):
    from trainer_utils import TINY_RUN

    run = list(TINY_RUN)
    i = run.index("--model_config_name_or_path")
    del run[i:i + 2]
    return ["--model_type", family, "--pretrained_model_name_or_path", str(base), "--dataset_name", "mnist5k_captions",
            "--output_dir", str(out), *run, "--resolution", str(RES), "--train_batch_size", "2",
            "--max_train_samples", "4", "--rank", "4", "--num_clusters", "2", "--max_train_steps", "2",
            "--learning_rate", "1e-2", "--num_validation_images", "1", "--num_inference_steps", "1",
            "--checkpointing_steps", "100", *extra]


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _train_capturing_the_teacher(args):
    """Run the trainer; return the teacher it built and the inputs / output of the teacher's last call."""
    from diffusers_ant import teacher as teachers
    from trainer_utils import train_in_process

    made, calls = [], []
    make = teachers.make_teacher

    def capture(*a, **k):
        teacher = make(*a, **k)
        predict = teacher.predict

        def recording(x_t, model_t, conditioning, *rest, **kw):
            out = predict(x_t, model_t, conditioning, *rest, **kw)
            calls[:] = [(_clone(x_t), _clone(model_t), _clone(conditioning), out.detach().clone())]
            return out

        teacher.predict = recording
        made.append(teacher)
        return teacher

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teachers, "make_teacher", capture)
        train_in_process(args)
    assert len(made) == 1 and calls
    return made[0], calls[0]


def _base_adapter(family, base):
    from diffusers_ant.models import get_model_adapter

    return get_model_adapter(family).load(pretrained_model_name_or_path=str(base), resolution=RES)


def _storage(module):
    return {p.data_ptr() for p in module.parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_diff_tuning_kd_trains_and_its_teacher_is_the_student_with_adapters_off(family, bases, tmp_path):
    """2 LoRA steps of `--retention kd`: the teacher is the student with its adapters disabled (no second copy:
    the same parameter storage), and at the last step (the LoRA already moved) it predicted exactly what the
    base model predicts."""
    from diffusers_ant.teacher import AdapterDisabledTeacher

    out = tmp_path / "kd"
    teacher, (x_t, model_t, cond, taught) = _train_capturing_the_teacher(
        _args(family, bases[family], out, "--retention", "kd", "--bank_fraction", "0.5"))
    assert isinstance(teacher, AdapterDisabledTeacher) and teacher.shares_student
    assert teacher.model is teacher.adapter.model and _storage(teacher.model) == _storage(teacher.adapter.model)
    assert any("lora_" in n for n, _ in teacher.model.named_parameters())
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k or "lora.up" in k) > 0  # trained
    reference = _base_adapter(family, bases[family])
    with torch.no_grad():
        expected = reference.predict(reference.model.eval(), x_t, model_t, cond).float()
        student = teacher.adapter.predict(teacher.model.eval(), x_t, model_t, cond).float()
    torch.testing.assert_close(taught, expected, rtol=0, atol=1e-6)
    assert (student - expected).abs().max() > 1e-6  # the student differs: the comparison can fail
