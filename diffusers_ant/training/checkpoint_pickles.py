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
files first, without running anything they name: a `.metadata` file (or the per-rank `__<r>.metadata`
that torch.distributed.checkpoint falls back to) through an unpickler that only admits the classes such
a file is made of (the "Restricting Globals" recipe of Python's `pickle` documentation), and the
`torch.save` files and blobs with `torch.load(weights_only=True)` (memory-mapped: the tensors are not
read), which admits torch's own data types and, for DeepSpeed's files, the few data records its
optimizer state holds (`DEEPSPEED_DATA_CLASSES`). `torch.serialization.get_unsafe_globals_in_checkpoint`
names, without unpickling, what a refused file refers to. A file that fails either check, or a folder
inside the checkpoint that is a symbolic link (the walk would not look inside it, the engines would),
is refused in one line before the engine opens anything. The later load then reads these same files (a
checkpoint replaced between the two reads is outside this check, as a model file replaced after its
hash was checked would be).
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import re

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


def _refuse(path: str, reason: str):
    from .args import UsageError

    return UsageError(f"{path} {reason}: {ADVICE}")


def _names(globals_) -> str:
    return f"refers to {globals_}, which a checkpoint's data never holds"


def _data_classes(names):
    """The classes of `names` whose module can be imported (a DeepSpeed record needs DeepSpeed installed; a
    file that holds one without it is refused, as DeepSpeed could not resume it either)."""
    classes = []
    for name in sorted(names):
        module, _, attribute = name.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):
            pass
    return classes


def check_torch_save(path: str, blob: bytes | None = None, allowed=DEEPSPEED_DATA_CLASSES) -> None:
    """Refuse a `torch.save` file (or a blob of one) that torch's weights_only loader, admitting the
    classes named in `allowed` besides its own, would not load; nothing in it is run."""
    source = (lambda: io.BytesIO(blob)) if blob is not None else (lambda: path)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(source())
    except Exception as error:  # not a torch.save zip file at all
        raise _refuse(path, f"is not torch.save data ({type(error).__name__})") from None
    unknown = sorted(set(found) - set(allowed))
    if unknown:
        raise _refuse(path, _names(", ".join(unknown)))
    # The names are all admitted; the weights_only loader also limits what may be called and how objects
    # are rebuilt, which a list of names does not show.
    try:
        with torch.serialization.safe_globals(_data_classes(set(found))):
            torch.load(source(), map_location="cpu", weights_only=True, mmap=blob is None)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _refuse(path, f"holds what torch's weights_only loader refuses ({first_line})") from None


# torch.distributed.checkpoint's metadata file, and the per-rank one it falls back to when that is unreadable
METADATA_FILE = re.compile(r"^(__\d+)?\.metadata$")


def check_dcp_metadata(path: str, allowed=()) -> None:
    """Check one torch.distributed.checkpoint metadata file through the restricted unpickler, then each
    non-tensor item's `torch.save` blob (the ones its loader reads with weights_only=False)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = os.path.dirname(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items()
                      if isinstance(item, BytesStorageMetadata)}
        storage = [(index.fqn, info) for index, info in metadata.storage_data.items() if index.fqn in byte_items]
    except pickle.UnpicklingError as error:
        raise _refuse(path, _names(error)) from None
    except Exception as error:  # unpickled, but not torch.distributed.checkpoint's Metadata
        raise _refuse(path, f"is not checkpoint metadata ({type(error).__name__}: {error})") from None
    for fqn, info in storage:
        data_file = os.path.join(folder, str(info.relative_path))
        where = f"{data_file} (item {fqn})"
        if getattr(info, "transform_descriptors", None):  # compressed or otherwise transformed: cannot be read here
            raise _refuse(where, f"is transformed ({', '.join(map(str, info.transform_descriptors))}), which this check cannot read")
        if os.path.dirname(os.path.realpath(data_file)) != os.path.realpath(folder):
            raise _refuse(where, "lies outside its folder")
        try:
            with open(data_file, "rb") as f:
                f.seek(int(info.offset))
                blob = f.read(int(info.length))
        except (OSError, ValueError, TypeError) as error:
            raise _refuse(where, f"cannot be read ({type(error).__name__})") from None
        check_torch_save(where, blob, allowed=allowed)


def check_checkpoint_pickles(checkpoint: str) -> None:
    """Before resuming `checkpoint`: refuse it, in one line, if a file FSDP or DeepSpeed would unpickle
    without restriction refers to anything but data (see the module docstring). A plain checkpoint has
    no such file and passes at once."""
    for root, folders, files in os.walk(checkpoint):
        for name in folders:
            if os.path.islink(os.path.join(root, name)):
                raise _refuse(os.path.join(root, name), "is a symbolic link to a folder elsewhere, which this check does not follow")
        for name in sorted(files):
            path = os.path.join(root, name)
            if METADATA_FILE.match(name):
                check_dcp_metadata(path)
            elif name.endswith(".pt"):
                check_torch_save(path)
