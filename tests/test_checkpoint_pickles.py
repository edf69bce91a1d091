"""`training/checkpoint_pickles.py`: a sharded checkpoint whose pickles hold code is refused before FSDP's
torch.distributed.checkpoint or DeepSpeed unpickle it, and real checkpoints pass.

Each malicious file carries an object whose unpickling would create a marker file: a refusal that came
after the unpickling (or an unpickling by the check itself) would leave the marker behind. The real FSDP
and DeepSpeed checkpoints are checked where they are resumed (tests/test_fsdp.py, tests/test_deepspeed.py:
every resume there passes through the check)."""

import os
import pickle
import re

import pytest
import torch

from diffusers_ant.training.args import UsageError
from diffusers_ant.training.checkpoint_pickles import check_checkpoint_pickles

# torch.distributed.checkpoint warns that it writes and reads in one process: what these tests want
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Payload:
    """Unpickling this creates the file `marker`: the code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _dcp_folder(folder, extra):
    """A torch.distributed.checkpoint folder as FSDP writes it (tensors, and non-tensor values stored as
    torch.save blobs: an optimizer's param_groups), written by one process."""
    import torch.distributed.checkpoint as dcp

    state = {"weight": torch.arange(6.0).reshape(2, 3), "param_groups": {"lr": 1e-3, "betas": (0.9, 0.999)}, **extra}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_a_dcp_checkpoint_of_data_passes_and_one_with_code_in_a_value_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    check_checkpoint_pickles(str(_dcp_folder(tmp_path / "good" / "optimizer_0", {})))

    _dcp_folder(tmp_path / "bad" / "optimizer_0", {"hook": Payload(marker)})
    assert not marker.exists(), "writing the checkpoint ran nothing"
    with pytest.raises(UsageError, match=r"item hook\) refers to (io|builtins)\.open, which a checkpoint's data never "
                                         r"holds: resume only checkpoints this trainer wrote"):
        check_checkpoint_pickles(str(tmp_path / "bad"))
    assert not marker.exists()
    # the same checkpoint, loaded as torch.distributed.checkpoint loads it, runs the payload: the check is
    # what stands between a resume and that code
    import torch.distributed.checkpoint as dcp

    target = {"weight": torch.zeros(2, 3), "param_groups": {"lr": 0.0, "betas": (0.0, 0.0)}, "hook": None}
    dcp.load(target, checkpoint_id=str(tmp_path / "bad" / "optimizer_0"), no_dist=True)
    assert marker.exists()


@pytest.mark.parametrize("name", [".metadata", "__0.metadata"])
def test_a_dcp_metadata_file_with_code_is_refused_unread(tmp_path, name):
    """The metadata file, and the per-rank `__<rank>.metadata` torch.distributed.checkpoint reads when
    `.metadata` is unreadable or absent."""
    folder = _dcp_folder(tmp_path / "ckpt" / "pytorch_model_fsdp_0", {})
    marker = tmp_path / "ran"
    (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UsageError, match=re.escape(name) + r" refers to (io|builtins)\.open"):
        check_checkpoint_pickles(str(tmp_path / "ckpt"))
    assert not marker.exists()


def test_a_value_stored_outside_its_folder_or_a_linked_folder_is_refused(tmp_path):
    """A metadata file of admitted classes can still point a value at another file (the loader would read
    it with weights_only=False), and a linked folder would be loaded but not walked: both refused."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = _dcp_folder(tmp_path / "ckpt" / "optimizer_0", {})
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    index = next(i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    metadata.storage_data[index].relative_path = "../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UsageError, match="lies outside its folder"):
        check_checkpoint_pickles(str(tmp_path / "ckpt"))

    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(_dcp_folder(tmp_path / "outside", {}), linked / "pytorch_model_fsdp_0")
    with pytest.raises(UsageError, match="is a symbolic link to a folder elsewhere"):
        check_checkpoint_pickles(str(linked))


def test_a_torch_save_file_with_code_is_refused_and_deepspeed_data_classes_pass(tmp_path):
    """DeepSpeed reads every `.pt` of its checkpoint with weights_only=False; its optimizer state holds a
    few data classes of its own, which pass (written here as DeepSpeed's module paths, without DeepSpeed)."""
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoint-2" / "pytorch_model"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 2}, folder / "mp_rank_00_model_states.pt")
    check_checkpoint_pickles(str(tmp_path / "checkpoint-2"))

    torch.save({"optimizer_state_dict": Payload(marker)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UsageError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt refers to (io|builtins)\.open"):
        check_checkpoint_pickles(str(tmp_path / "checkpoint-2"))
    assert not marker.exists()

    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(pickle.dumps({"not": "a torch.save zip"}))
    with pytest.raises(UsageError, match="is not torch.save data"):
        check_checkpoint_pickles(str(tmp_path / "checkpoint-2"))


def test_deepspeed_data_classes_are_admitted_by_name_and_nothing_else_of_their_module(tmp_path, monkeypatch):
    """DeepSpeed's LossScaler (a record its ZeRO optimizer state holds) passes; another class of the same
    module does not. Written without DeepSpeed, from a stand-in module under DeepSpeed's module path."""
    import sys
    import types

    module = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")
    for name in ("LossScaler", "SomethingElse"):
        cls = type(name, (), {"__module__": module.__name__})
        setattr(module, name, cls)
    for parent in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    folder = tmp_path / "checkpoint-2" / "pytorch_model"
    folder.mkdir(parents=True)
    optimizer_state = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"loss_scaler": module.LossScaler(), "step": torch.tensor(2)}, optimizer_state)
    check_checkpoint_pickles(str(tmp_path / "checkpoint-2"))
    torch.save({"loss_scaler": module.SomethingElse()}, optimizer_state)
    with pytest.raises(UsageError, match=r"refers to deepspeed\.runtime\.fp16\.loss_scaler\.SomethingElse"):
        check_checkpoint_pickles(str(tmp_path / "checkpoint-2"))


@pytest.mark.slow
def test_the_trainer_refuses_to_resume_a_checkpoint_with_code_before_loading_it(tmp_path):
    """Through the trainer: a checkpoint holding a torch.distributed.checkpoint folder whose `.metadata`
    carries code is refused in one line at resume, and the payload never runs."""
    from trainer_utils import TINY_RUN, train_in_process

    common = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_steps", "2",
              "--checkpointing_steps", "2", "--max_train_samples", "16", "--num_validation_images", "1",
              "--output_dir", str(tmp_path / "run")]
    train_in_process(common)
    planted = tmp_path / "run" / "checkpoint-2" / "optimizer_0"
    planted.mkdir()
    marker = tmp_path / "ran"
    (planted / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UsageError, match=r"optimizer_0/\.metadata refers to (io|builtins)\.open"):
        train_in_process([*common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert not marker.exists()
    assert not os.path.isdir(tmp_path / "run" / "checkpoint-4"), "nothing trained"
