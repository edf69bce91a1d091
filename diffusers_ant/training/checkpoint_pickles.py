"""Refuse a sharded checkpoint whose pickles hold anything but data, before FSDP or DeepSpeed unpickle them.

The trainer's own state is safetensors plus JSON, and Accelerate reads the rest of a plain checkpoint
with `torch.load(weights_only=True)` (`training/checkpoint.py`). The sharded engines read three kinds of
file without that restriction, so a checkpoint folder from someone else could run code on resume:

* torch.distributed.checkpoint (FSDP's `pytorch_model_fsdp_0/`, `optimizer_0/`): its `.metadata` file
  with a bare `pickle.load` (`FileSystemReader.read_metadata`), and every non-tensor value of the state
  (an optimizer's learning rate, betas, ...), stored as a `torch.save` blob inside the `.distcp` files,
  with `torch.load(weights_only=False)` (`DefaultLoadPlanner.load_bytes`);
* DeepSpeed (`pytorch_model/*.pt`): every file with `torch.load(weights_only=False)`
  (`TorchCheckpointEngine.load`).

Neither library has an option to restrict these loads, so `check_checkpoint_pickles` reads the same
files first, without running them: the `.metadata` file through an unpickler that only admits the
classes such a file is made of (the "Restricting Globals" recipe of Python's `pickle` documentation),
and the `torch.save` files and blobs through `torch.serialization.get_unsafe_globals_in_checkpoint`,
which lists, without unpickling, every global outside torch's `weights_only` set; only the few DeepSpeed
data classes its optimizer state holds (`DEEPSPEED_DATA_CLASSES`) may be among them. A file that refers
to anything else is refused in one line before the engine opens it. The later load then reads these same
files (a checkpoint replaced between the two reads is outside this check, as a model file replaced
after its hash was checked would be).
"""

from __future__ import annotations

import io
import os
import pickle

import torch

# What a torch.distributed.checkpoint `.metadata` file is made of (torch 2.13, FSDP2 through Accelerate):
# the Metadata dataclass and its parts, the storage index of the file-system writer, torch.Size and the
# dtypes, the layout decoder of TensorProperties, and StorageMeta's checkpoint path.
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},  # and the dtypes, below
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}

# The data classes of DeepSpeed's optimizer state (DeepSpeed 0.19: ZeRO-1/2/3, fp32 / bf16 / fp16), which
# torch's weights_only set does not know: plain records, with no behaviour when unpickled.
DEEPSPEED_DATA_CLASSES = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})

ADVICE = "resume only checkpoints this trainer wrote (nothing was loaded from it)"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a `.metadata` file, admitting only `DCP_METADATA_GLOBALS` (and torch's dtypes)."""

    def find_class(self, module, name):
        if name in DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _refuse(path: str, what: str):
    from .args import UsageError

    return UsageError(f"{path} refers to {what}, which a checkpoint's data never holds: {ADVICE}")


def check_torch_save(path: str, blob: bytes | None = None, allowed=DEEPSPEED_DATA_CLASSES) -> None:
    """Refuse a `torch.save` file (or a blob of one) that refers to a global outside torch's weights_only
    set and `allowed`; nothing in it is run."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(blob) if blob is not None else path)
    except Exception as error:  # not a torch.save zip file at all
        raise _refuse(path, f"no torch.save data ({type(error).__name__})") from None
    unknown = sorted(set(found) - set(allowed))
    if unknown:
        raise _refuse(path, ", ".join(unknown))


def check_dcp_folder(folder: str) -> None:
    """Check a torch.distributed.checkpoint folder: its `.metadata` through the restricted unpickler, then
    each non-tensor item's `torch.save` blob (they are the ones its loader reads with weights_only=False)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as error:
        raise _refuse(path, str(error)) from None
    byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, storage in metadata.storage_data.items():
        if index.fqn not in byte_items:
            continue
        where = f"{os.path.join(folder, storage.relative_path)} (item {index.fqn})"
        if getattr(storage, "transform_descriptors", None):  # compressed or otherwise transformed: cannot be read here
            raise _refuse(where, f"transformed data ({', '.join(storage.transform_descriptors)})")
        data_file = os.path.join(folder, storage.relative_path)
        if os.path.dirname(os.path.abspath(data_file)) != os.path.abspath(folder):
            raise _refuse(where, "a file outside its folder")
        with open(data_file, "rb") as f:
            f.seek(storage.offset)
            check_torch_save(where, f.read(storage.length))


def check_checkpoint_pickles(checkpoint: str) -> None:
    """Before resuming `checkpoint`: refuse it, in one line, if a file FSDP or DeepSpeed would unpickle
    without restriction refers to anything but data (see the module docstring). A plain checkpoint has
    no such file and passes at once."""
    for root, _, files in os.walk(checkpoint):
        if ".metadata" in files:
            check_dcp_folder(root)
        for name in sorted(files):
            if name.endswith(".pt"):
                check_torch_save(os.path.join(root, name))
