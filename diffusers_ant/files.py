"""Writing a file so that an interrupted write never leaves half of it.

The text goes to a temporary file beside the target, which `os.replace` then renames over it (atomic
within one file system, on POSIX and Windows): a reader finds the old file or the new one, never a
truncated one, which a later step (a resumed benchmark, `train_ant.py --affinity_file`, a DeMe merge
reading the weight search's table) would fail on. The JSON is serialised before any file is opened,
so a value JSON cannot hold leaves the old file as it was.
"""

from __future__ import annotations

import json
import os


def write_text_atomically(path: str | os.PathLike, text: str) -> str:
    """Write `text` to `path` (its folder made if missing) through a temporary file and a rename; returns
    the path. Nothing is left beside it when the write fails."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write or the rename failed: no half-written temporary beside the target
            os.remove(tmp)
    return path


def write_json_atomically(path: str | os.PathLike, data, default=None) -> str:
    """`data` as indented JSON, written atomically (`write_text_atomically`). `default`: as `json.dump`'s
    (e.g. `str` for values JSON has no type for)."""
    return write_text_atomically(path, json.dumps(data, indent=2, default=default) + "\n")
