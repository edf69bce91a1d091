"""The trainer's bookkeeping around checkpoints: how many updates an epoch holds on each process (the
resume position and the run's length follow from it), pruning with `--checkpoints_total_limit`, the
step of a checkpoint folder, and resuming a run given in epochs under a schedule drawn over its length."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch

from trainer_utils import TINY_RUN, assert_same_tensors, load_safetensors_dir, train_in_process


@pytest.mark.parametrize("rows", [64, 72, 88])
@pytest.mark.parametrize("num_processes", [2, 3])
def test_batches_per_process_is_what_the_prepared_loader_yields(rows, num_processes):
    """72 rows at batch 8 are 9 batches: Accelerate gives each of 2 processes 4 of them (the loader drops
    the last batch, so the round that would not fill both processes is dropped too), not ceil(9 / 2) = 5,
    which the loop used to count, ending runs early and resuming at the wrong data position."""
    from accelerate.data_loader import prepare_data_loader

    from diffusers_ant.data import batches_per_process, load_builtin_dataset, make_train_dataloader, resolve_columns

    dataset = load_builtin_dataset("mnist5k").select(range(rows))
    loader = make_train_dataloader(dataset, resolve_columns(dataset), resolution=8, batch_size=8, num_channels=1)
    for rank in range(num_processes):
        # the Accelerator's settings that `prepare` passes on (its defaults)
        accelerator = SimpleNamespace(num_processes=num_processes, process_index=rank, split_batches=False,
                                      even_batches=True)
        prepared = prepare_data_loader(loader, num_processes=num_processes, process_index=rank, put_on_device=False)
        assert batches_per_process(loader, accelerator) == len(prepared) == len(list(prepared.batch_sampler))
    assert len(loader) // num_processes == batches_per_process(loader, accelerator)


@pytest.fixture
def accelerator_and_model():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)  # leave no state to the next test in this worker
    GradientState._reset_state()


def _names(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


def test_pruning_keeps_the_checkpoint_just_written_and_leaves_a_later_run_alone(tmp_path, accelerator_and_model, caplog):
    """An --output_dir that still holds checkpoint-8 of an earlier run: the new run's checkpoint-2 with
    --checkpoints_total_limit 1 must survive (pruning used to keep the highest steps and deleted it), the
    next save prunes the new run's own older checkpoint, and the start warns that `latest` would pick 8."""
    from diffusers_ant.training.checkpoint import save_checkpoint, warn_of_later_checkpoints

    accelerator = accelerator_and_model
    save_checkpoint(accelerator, str(tmp_path), 8, {"global_step": 8})
    with caplog.at_level(logging.WARNING):
        warn_of_later_checkpoints(str(tmp_path), None, accelerator)
    assert "checkpoint-8" in caplog.text and "--resume_from_checkpoint latest would resume that one" in caplog.text
    save_checkpoint(accelerator, str(tmp_path), 2, {"global_step": 2}, total_limit=1)
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-8"]
    save_checkpoint(accelerator, str(tmp_path), 4, {"global_step": 4}, total_limit=1)
    assert _names(tmp_path) == ["checkpoint-4", "checkpoint-8"]
    save_checkpoint(accelerator, str(tmp_path), 6, {"global_step": 6}, total_limit=2)
    assert _names(tmp_path) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_of_later_checkpoints(str(tmp_path), str(tmp_path / "checkpoint-8"), accelerator)
    assert not caplog.text  # resuming the latest: nothing later


class _Killed(BaseException):
    """What a kill is to the code under test: nothing after it runs (not an Exception: nothing catches it)."""


@pytest.mark.parametrize("kill_at", ["deleting", "between_renames"])
def test_a_kill_while_replacing_a_checkpoint_of_the_same_step_leaves_a_complete_one(tmp_path, accelerator_and_model,
                                                                                    monkeypatch, kill_at):
    """Saving checkpoint-4 where a checkpoint-4 already is (a run resumed from checkpoint-2, or started over
    in the folder): the old one was deleted in place, so a kill part-way left a half-deleted checkpoint-4,
    the highest step, which `latest` picked and could not load. Now the old one is renamed aside first: a
    kill anywhere leaves a complete checkpoint-4 (the old or the new), once the next start has tidied up."""
    import os

    from diffusers_ant.training import checkpoint as ckpt

    accelerator = accelerator_and_model
    ckpt.save_checkpoint(accelerator, str(tmp_path), 4, {"global_step": 4, "marker": "old"})
    real_rmtree, real_replace = shutil.rmtree, os.replace

    def rmtree(path, *args, **kwargs):  # the kill comes once one file of the old checkpoint is gone
        if kill_at == "deleting" and "checkpoint-4" in str(path) and not str(path).endswith(".tmp"):
            first = sorted(os.listdir(path))[0]
            os.remove(os.path.join(path, first))
            raise _Killed
        return real_rmtree(path, *args, **kwargs)

    def replace(src, dst):
        real_replace(src, dst)
        if kill_at == "between_renames" and str(dst).endswith(".old"):
            raise _Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(_Killed):
        ckpt.save_checkpoint(accelerator, str(tmp_path), 4, {"global_step": 4, "marker": "new"})
    monkeypatch.undo()
    ckpt.remove_stale_temporaries(str(tmp_path))  # what the next start does first
    latest = ckpt.resolve_checkpoint(str(tmp_path), "latest")
    assert _names(tmp_path) == ["checkpoint-4"] and latest.endswith("checkpoint-4")
    state = ckpt.load_trainer_state(latest, 0)
    assert state["marker"] == ("new" if kill_at == "deleting" else "old") and state["global_step"] == 4


@pytest.mark.slow
def test_a_checkpoint_moved_aside_by_a_crash_is_back_before_latest_is_chosen(tmp_path, capsys):
    """A save killed between its two renames leaves checkpoint-4.old beside checkpoint-2: the start restores it
    before `latest` is resolved (it restored it after, so the run resumed from checkpoint-2)."""
    run = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_samples", "16",
           "--num_validation_images", "1", "--checkpointing_steps", "2", "--output_dir", str(tmp_path),
           "--resume_from_checkpoint", "latest"]
    train_in_process([*run, "--max_train_steps", "4"])
    (tmp_path / "checkpoint-4").rename(tmp_path / "checkpoint-4.old")
    capsys.readouterr()
    train_in_process([*run, "--max_train_steps", "4"])
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-4" in out and "saved" not in out, out[-2000:]
    assert (tmp_path / "checkpoint-4").is_dir() and not (tmp_path / "checkpoint-4.old").exists()


def test_a_checkpoint_copied_under_another_name_knows_its_step(tmp_path, accelerator_and_model):
    from diffusers_ant.training.checkpoint import checkpoint_step, save_checkpoint

    save_checkpoint(accelerator_and_model, str(tmp_path), 6, {"global_step": 6})
    shutil.copytree(tmp_path / "checkpoint-6", tmp_path / "best")
    assert checkpoint_step(str(tmp_path / "checkpoint-6")) == checkpoint_step(str(tmp_path / "best")) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a complete diffusers_ant checkpoint"):
        checkpoint_step(str(tmp_path / "empty"))


@pytest.mark.slow
def test_a_run_given_in_epochs_resumes_under_a_cosine_schedule_exactly(tmp_path, capsys):
    """--num_train_epochs with a cosine schedule: the checkpoint records the step count the epochs gave,
    and the same command resumed used to compare it with the not yet derived None and refuse. 48 rows at
    batch 8 are 6 updates an epoch, 12 in all; checkpoint-4 is in the first epoch."""
    common = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_samples", "48",
              "--num_train_epochs", "2", "--lr_scheduler", "cosine", "--checkpointing_steps", "4",
              "--mtl_method", "uw"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_in_process([*common, "--output_dir", str(straight)])
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    # another epoch count draws the cosine over another length: still refused, once the length is known
    longer = [*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]
    longer[longer.index("--num_train_epochs") + 1] = "3"
    with pytest.raises(ValueError, match=r"was 12 when .*checkpoint-4 was written and is 18 now, which changes the learning rate"):
        train_in_process(longer)
    capsys.readouterr()
    train_in_process([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-4" in out
    assert _names(straight) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert_same_tensors(load_safetensors_dir(straight / "unet"), load_safetensors_dir(resumed / "unet"))



def test_a_checkpoint_resumed_in_another_output_folder_compares_its_paths_as_paths(tmp_path, caplog):
    """The resume check compared the path flags in the form written into the output folder, relative to it:
    the same --pretrained_model_name_or_path read '../../base' from the first run's folder and '../../../base'
    from a deeper one holding a copy of its checkpoint, and the resume was refused ('resume with the same
    value', which it was). It now compares absolute paths, which the checkpoint keeps; another base is still
    refused, also when the two bases' written forms are alike (only the file system root in common: their
    base names)."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training.checkpoint import check_resume_config

    torch.manual_seed(0)
    base = tmp_path / "base"
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(str(base))
    run = ["--model_type", "unet", "--dataset_name", "mnist5k", "--pretrained_model_name_or_path", str(base),
           *[a for a in TINY_RUN if a not in ("--model_config_name_or_path", "tiny")], "--max_train_samples", "16",
           "--num_validation_images", "1", "--max_train_steps", "2", "--checkpointing_steps", "1"]
    first, moved = tmp_path / "runs" / "a", tmp_path / "runs2" / "x" / "b"
    train_in_process([*run, "--output_dir", str(first)])
    shutil.copytree(first / "checkpoint-1", moved / "checkpoint-1")
    with caplog.at_level(logging.INFO):
        train_in_process([*run, "--output_dir", str(moved), "--resume_from_checkpoint", "checkpoint-1"])
    assert (moved / "checkpoint-2").is_dir()
    assert not any("pretrained_model_name_or_path" in r.getMessage() for r in caplog.records if "changed" in r.getMessage())

    # the checkpoint names no path of this machine, only a fingerprint of each
    state = (moved / "checkpoint-2" / "trainer_state_0.json").read_text()
    assert str(tmp_path) not in state and len(json.loads(state)["local_paths"]["pretrained_model_name_or_path"]) == 16

    written = {"pretrained_model_name_or_path": "imgs"}  # two bases under /data/v1 and /mnt/v2: the same written form
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path was 'imgs' .* is 'imgs [(]another path of "
                                         "that name[)]' now"):
        check_resume_config(written, written, "out/checkpoint-1", saved_paths={"pretrained_model_name_or_path": "a1"},
                            current_paths={"pretrained_model_name_or_path": "b2"})
