"""Writing a file, or a whole output folder, so that an interrupted write never leaves half of it.

The bytes go to a temporary file beside the target, flushed to disk, which `os.replace` then renames over
it (atomic within one file system, on POSIX and Windows): a reader finds the old file or the new one, never a
truncated one, which a later step (a resumed benchmark or knowledge-bank build, `train_ant.py
--affinity_file`, a DeMe merge reading the weight search's table) would fail on or take for complete. A
folder is written as a sibling `<folder>.partial` and renamed into place the same way
(`folder_written_atomically`). JSON is serialised before any file is opened, so a value JSON cannot hold
leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import BinaryIO, Callable


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> str:
    """Write `path` (its folder made if missing) by `write(file)` into a temporary file beside it, flushed to
    disk (fsync: after a power cut a renamed but unflushed file could be empty, and a resumed bank build counts
    every image file present as drawn), then renamed; returns the path. Nothing is left beside it when the write
    fails. The temporary's name ends in ``.tmp``, which a folder's own clean-up of leftovers (the knowledge
    bank's, after a kill) finds."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write or the rename failed: no half-written temporary beside the target
            os.remove(tmp)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> str:
    """`text` (UTF-8) written to `path` atomically (`write_atomically`)."""
    data = text.encode("utf-8")
    return write_atomically(path, lambda f: f.write(data))


def write_json_atomically(path: str | os.PathLike, data, default=None) -> str:
    """`data` as indented JSON, written atomically (`write_atomically`). `default`: as `json.dump`'s
    (e.g. `str` for values JSON has no type for)."""
    return write_text_atomically(path, json.dumps(data, indent=2, default=default) + "\n")


@contextlib.contextmanager
def folder_written_atomically(folder: str | os.PathLike, replace: bool = False):
    """Yield a sibling folder, `<folder>.partial`, to write a whole output folder into; renamed to `folder` when
    the block ends without an error. A kill or an error mid-write leaves `<folder>.partial` (removed by the
    next write), never a folder that loads as another model (merged weights without their channel
    projections, an ensemble without its members) or passes for a finished one. A sibling, so that every path
    written relative to the folder holds for the final one. `folder` must be absent or empty, unless
    `replace`: then a folder already there is removed just before the rename."""
    folder = os.path.normpath(os.fspath(folder))
    partial = folder + ".partial"
    if os.path.isdir(partial):
        shutil.rmtree(partial)  # an earlier write that was killed
    os.makedirs(partial)
    yield partial
    if replace:
        shutil.rmtree(folder, ignore_errors=True)
    elif os.path.isdir(folder):
        os.rmdir(folder)  # empty (the caller checked): the rename needs its place
    os.replace(partial, folder)
