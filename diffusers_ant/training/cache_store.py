"""Named tensors kept on disk as safetensors shards and read back one at a time: the storage of the training
cache (`training/caching.py`: `--cache_latents`, `--cache_text_embeddings`).

Why on disk, when diffusers' DreamBooth scripts keep their cache in a list in memory: they cache a few dozen
instance images, while this cache covers a whole data set, on every process. FLUX.1's T5 embeddings alone are
512 x 4096 values a caption (4 MiB in bf16), so 5,000 captions were 20 GiB of CPU memory per process. On
disk, the operating system keeps in its page cache what fits and reads the rest back when a batch needs it
(clean file pages, which it can drop under memory pressure).

safetensors, not `torch.save`: nothing is unpickled. The format has no append, so the store holds at most
one shard's worth of tensors (`shard_bytes`) in memory while it is written, then writes that shard. Reading
maps a shard (`safe_open`) and returns a tensor over the mapping, with no copy (0.02 ms for a 4 MiB caption
measured on this machine; collating a batch copies it). The mapping is private: a write into a returned tensor
would change what this process reads next, never the file, so callers treat them as read-only, as they did the
in-memory cache's tensors. Handles are per process: a DataLoader worker (a forked or spawned copy of the
dataset) opens its own.
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from typing import Dict

import torch

SHARD_BYTES = 256 * 2**20
OWNER_FILE = "owner"  # the store's own token: a later store in the same folder writes another


def _remove_files(directory: str, owner_pid: int, token: str) -> None:
    """Delete a store's folder, in the process that made it only (a forked DataLoader worker holds a copy of the
    store, and that copy's end must not delete the files the training process still reads), and only while the
    folder is still this store's: a run started again in the same process (a notebook, a retry after an error)
    makes a new store in the same folder, and the old store, freed later by the garbage collector, must not
    delete it."""
    if os.getpid() != owner_pid:
        return
    try:
        with open(os.path.join(directory, OWNER_FILE), encoding="utf-8") as f:
            if f.read() != token:
                return
    except OSError:
        return  # already gone
    shutil.rmtree(directory, ignore_errors=True)


class TensorStore:
    """`add(name, tensor)` while caching, `get(name)` afterwards (a tensor added but not yet written is served
    from memory). `directory` is emptied first: what a crashed run left there is written again. The files live
    as long as the store: `remove()`, the store's garbage collection or the interpreter's exit (an exception
    or Ctrl-C ending a single-process run) deletes them; not a process that is killed, or ended by a signal
    (`accelerate launch` ends the other processes of a failed launch with SIGTERM)."""

    def __init__(self, directory: str, shard_bytes: int = SHARD_BYTES):
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        token = uuid.uuid4().hex
        with open(os.path.join(directory, OWNER_FILE), "w", encoding="utf-8") as f:
            f.write(token)
        self.directory, self.shard_bytes = directory, shard_bytes
        self.nbytes = 0
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shard_of: Dict[str, str] = {}  # name -> shard file
        self._handles: Dict[str, object] = {}
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _remove_files, directory, self._pid, token)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._shard_of or name in self._pending:
            raise KeyError(f"{name!r} is already in the store")
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.numel() * tensor.element_size()
        if tensor.untyped_storage().nbytes() != size:
            tensor = tensor.clone()  # a view: safetensors writes tensors that own their memory
        self._pending[name] = tensor
        self._pending_bytes += size
        self.nbytes += size
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the tensors held in memory as one more shard."""
        from safetensors.torch import save_file

        if not self._pending:
            return
        filename = f"shard-{len(set(self._shard_of.values())):05d}.safetensors"
        save_file(self._pending, os.path.join(self.directory, filename))
        self._shard_of.update(dict.fromkeys(self._pending, filename))
        self._pending, self._pending_bytes = {}, 0

    def get(self, name: str) -> torch.Tensor:
        if name in self._pending:
            return self._pending[name]
        from safetensors import safe_open

        if self._pid != os.getpid():  # a DataLoader worker: the parent's handles are not this process's
            self._handles, self._pid = {}, os.getpid()
        filename = self._shard_of[name]
        handle = self._handles.get(filename)
        if handle is None:
            handle = self._handles[filename] = safe_open(os.path.join(self.directory, filename), framework="pt")
        return handle.get_tensor(name)

    def remove(self) -> None:
        """Delete the files (the end of training); the store cannot be read afterwards."""
        self._handles, self._pending, self._shard_of = {}, {}, {}
        finalizer = getattr(self, "_finalizer", None)  # (a copy, e.g. a worker's, has none: the files are not its)
        if finalizer is not None:
            finalizer()

    def __getstate__(self):  # (a spawned DataLoader worker gets the store without the parent's open handles,
        state = dict(self.__dict__)  # and without its finalizer: the files are the training process's)
        state["_handles"] = {}
        state.pop("_finalizer", None)
        return state
