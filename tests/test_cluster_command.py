"""train_scripts/cluster_timesteps.py: end to end in a subprocess, and its branches in-process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_ant.clustering import TimestepIntervals

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_scripts" / "cluster_timesteps.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("cluster_timesteps_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_end_to_end_from_a_pipeline_folder(tmp_path):
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "pipeline" / "scheduler")
    output, plot = tmp_path / "out" / "intervals.json", tmp_path / "intervals.png"
    result = run_script("--scheduler", tmp_path / "pipeline", "--num_clusters", 5, "--objective", "snr",
                        "--output", output, "--plot", plot)
    assert result.returncode == 0, result.stderr
    intervals = TimestepIntervals.load(output)
    assert len(intervals) == 5 and intervals.num_timesteps == 1000
    assert intervals.metadata["objective"] == "snr" and intervals.metadata["scheduler"] == "DDPMScheduler"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    # the printed table has one row per interval with its bounds
    for i, (start, end) in enumerate(intervals):
        assert any(line.split()[:4] == [str(i), str(start), str(end), str(end - start + 1)]
                   for line in result.stdout.splitlines())


def test_bad_invocation_exits_with_one_line(tmp_path):
    result = run_script("--scheduler", "DDPMScheduler", "--num_clusters", 0, "--output", tmp_path / "x.json")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "num_clusters" in lines[0]
    assert not (tmp_path / "x.json").exists()


def test_class_name_with_options(script, tmp_path, capsys):
    output = tmp_path / "intervals.json"
    assert script.main(["--scheduler", "DDPMScheduler", "--num_train_timesteps", "100", "--beta_schedule",
                        "scaled_linear", "--num_clusters", "4", "--objective", "timestep", "--output", str(output)]) == 0
    assert TimestepIntervals.load(output) == TimestepIntervals.equal(100, 4)
    assert "objective timestep" in capsys.readouterr().out


def test_scheduler_config_folder_raw_snr_and_bounds(script, tmp_path):
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "sched")  # scheduler_config.json at top
    output = tmp_path / "intervals.json"
    assert script.main(["--scheduler", str(tmp_path / "sched"), "--raw_snr", "--min_size", "150", "--max_size",
                        "none", "--output", str(output)]) == 0
    intervals = TimestepIntervals.load(output)
    assert intervals.metadata["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert intervals.metadata["log_snr"] is False and intervals.metadata["max_size"] is None
    assert min(intervals.sizes) >= 150


def test_gradient_objective_with_affinity_file(script, tmp_path):
    grid = np.arange(0, 100, 10)
    labels = (grid >= 40).astype(int)
    affinity = np.where(labels[:, None] == labels[None, :], 1.0, -1.0)
    path = tmp_path / "affinity.json"
    path.write_text(json.dumps({"timesteps": grid.tolist(), "affinity": affinity.tolist()}))
    output, plot = tmp_path / "intervals.json", tmp_path / "intervals.png"
    assert script.main(["--scheduler", "DDPMScheduler", "--num_train_timesteps", "100", "--num_clusters", "2",
                        "--objective", "gradient", "--affinity", str(path), "--output", str(output),
                        "--plot", str(plot)]) == 0
    (_, end), _ = TimestepIntervals.load(output).bounds
    assert 30 <= end <= 40  # the affinity switches between grid points 30 and 40
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scheduler", "NoSuchScheduler"], "neither a folder"),
        (["--scheduler", "FlowMatchEulerDiscreteScheduler", "--beta_schedule", "linear"], "drop --beta_schedule"),
        (["--scheduler", "DDPMScheduler", "--objective", "gradient"], "needs --affinity FILE"),
        (["--scheduler", "DDPMScheduler", "--objective", "loss"], "invalid choice"),
        (["--scheduler", "DDPMScheduler", "--affinity", "a.json"], "only used by --objective gradient"),
        (["--scheduler", "DDPMScheduler", "--raw_snr", "--objective", "timestep"], "only used by --objective snr"),
        (["--scheduler", "DDPMScheduler", "--min_size", "big"], "integer, 'default' or 'none'"),
        (["--scheduler", "DDPMScheduler", "--min_size", "300"], "lower min_size"),
        (["--scheduler", "DDPMScheduler", "--num_train_timesteps", "10", "--num_clusters", "11"],
         "num_clusters must be between 1 and the number of timesteps 10"),
        (["--num_clusters", "5"], "--scheduler"),
        # a traceback before: diffusers' NotImplementedError, torch's RuntimeError, a misleading log-SNR message
        (["--scheduler", "DDPMScheduler", "--beta_schedule", "foo"], "--beta_schedule foo is not a schedule DDPMScheduler implements"),
        (["--scheduler", "DDPMScheduler", "--num_train_timesteps", "-5"], "--num_train_timesteps must be at least 1"),
        (["--scheduler", "DDPMScheduler", "--num_train_timesteps", "0"], "--num_train_timesteps must be at least 1"),
    ],
)
def test_errors_are_one_line(script, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv + ["--output", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_folder_without_scheduler_config(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--scheduler", str(tmp_path)])
    assert "no scheduler_config.json" in capsys.readouterr().err


def test_output_paths_are_checked_before_the_clustering_and_the_plot_is_written_where_asked(script, tmp_path, capsys):
    """--output a folder was found after the clustering, named by its temporary file; --plot without an extension
    wrote path + ".png" while printing the path."""
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--scheduler", "DDPMScheduler", "--output", str(tmp_path / "folder")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--output" in err[0] and "is a folder: give a file" in err[0]
    plot = tmp_path / "plot_without_extension"
    assert script.main(["--scheduler", "DDPMScheduler", "--num_train_timesteps", "100", "--output",
                        str(tmp_path / "i.json"), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == PNG_MAGIC and f"wrote {plot}" in capsys.readouterr().out
    assert not (tmp_path / "plot_without_extension.png").exists()
