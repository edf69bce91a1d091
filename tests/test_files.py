"""Atomic writes (`diffusers_ant/files.py`): a write that fails or is interrupted leaves the file that was
there, whole, and nothing beside it. The results files the command-line tools write go through them: the
timestep intervals (`cluster_timesteps.py`), the merge-weight search's table, the benchmarks' JSON."""

import json
import os

import pytest

from diffusers_ant import files
from diffusers_ant.clustering import TimestepIntervals
from diffusers_ant.deme.search import SearchResult, write_search_table


def test_a_value_json_cannot_hold_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    files.write_json_atomically(path, {"fid": 1.0})
    with pytest.raises(TypeError):  # json.dump would have written '{"fid": 2.0, "model": ' into the file first
        files.write_json_atomically(path, {"fid": 2.0, "model": object()})
    assert json.loads(path.read_text()) == {"fid": 1.0}
    assert os.listdir(tmp_path) == ["results.json"]
    files.write_json_atomically(tmp_path / "new" / "folder" / "results.json", {"model": object()}, default=str)
    assert json.loads((tmp_path / "new" / "folder" / "results.json").read_text())["model"].startswith("<object")


def _stopped_before_the_rename(source, target):
    """`os.replace` for a write stopped (as by Ctrl-C) once its temporary file is written, before the rename."""
    assert os.path.getsize(source) > 0  # the new text is all in the temporary file
    raise KeyboardInterrupt


def test_intervals_interrupted_while_saving_are_the_old_ones(tmp_path, monkeypatch):
    path = tmp_path / "intervals.json"
    old = TimestepIntervals([(0, 9), (10, 99)])
    old.save(path)
    monkeypatch.setattr(files.os, "replace", _stopped_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        TimestepIntervals([(0, 49), (50, 99)]).save(path)
    assert TimestepIntervals.load(path).to_dict() == old.to_dict()
    assert os.listdir(tmp_path) == ["intervals.json"]


def test_a_search_table_interrupted_while_writing_is_the_old_one(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "replace", _stopped_before_the_rename)
    (tmp_path / "merge_search.json").write_text('{"best_weights": [0.5, 0.5]}')
    result = SearchResult(strategy="grid", metric="fid", best_weights=[1.0, 0.0], best_score=3.0,
                          rows=[{"weights": [1.0, 0.0], "score": 3.0}])
    with pytest.raises(KeyboardInterrupt):
        write_search_table(result, str(tmp_path), name="merge_search")
    assert json.loads((tmp_path / "merge_search.json").read_text()) == {"best_weights": [0.5, 0.5]}
    assert os.listdir(tmp_path) == ["merge_search.json"]
