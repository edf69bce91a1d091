"""Task affinity, negative transfer gap and chain of forgetting (diffusers_ant.analysis, analyze.py).

Tiny 8x8 UNets (random or trained two steps on `digits`), a handful of samples, 4 sampling steps.
"""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from diffusers_ant.analysis.affinity import (
    CountSketch,
    _draw_batches,
    affinity_from_folders,
    gradient_cosines,
    o1_mantel,
    o1_spearman,
    task_affinity,
    timestep_grid,
)
from diffusers_ant.analysis.common import load_denoiser, load_state_dict
from diffusers_ant.analysis.evaluate import ReferenceSet, real_images, reference_for, sample_images
from diffusers_ant.analysis.forgetting import chain_of_forgetting, forgetting_router, parse_fractions
from diffusers_ant.analysis.ntg import interval_from_folder, load_intervals, negative_transfer_gap
from diffusers_ant.metrics import ModuleFeatureExtractor
from diffusers_ant.models import get_model_adapter
from tolerances import gradient_tolerance, unit_roundoff
from trainer_utils import REPO, train_in_process
from train_scripts_loader import load_script


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _random_unet_folder(folder, seed):
    torch.manual_seed(seed)
    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1)
    adapter.save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two random tiny UNets (8x8, greyscale) and a run trained 2 steps on [0, 499] with 1 checkpoint."""
    root = tmp_path_factory.mktemp("analysis")
    run = str(root / "run")
    train_in_process(["--model_config_name_or_path", "tiny", "--dataset_name", "digits", "--resolution", "8",
                      "--train_batch_size", "8", "--max_train_samples", "64", "--max_train_steps", "2",
                      "--checkpointing_steps", "1", "--timestep_range", "0", "499", "--learning_rate", "1e-2",
                      "--report_to", "none", "--num_validation_images", "1", "--num_inference_steps", "1",
                      "--output_dir", run, "--seed", "0"])
    return {"a": _random_unet_folder(root / "a", 1), "b": _random_unet_folder(root / "b", 2), "run": run,
            "cache": str(root / "cache")}


class _Features(nn.Module):
    """A fixed random conv net: a cheap stand-in feature extractor (no classifier to train)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def reference():
    return ReferenceSet(real_images("digits", 16, resolution=8, num_channels=1), ModuleFeatureExtractor(_Features()),
                        kid_subsets=3)


# ------------------------------------------------------------------------------------ affinity


def test_grid_and_o1_spearman():
    grid = timestep_grid(1000, 20)
    assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 20 and grid == sorted(set(grid))
    t = np.array(grid, dtype=float)
    falling = np.exp(-np.abs(t[:, None] - t[None, :]) / 300)
    assert o1_spearman(grid, falling)[0] == pytest.approx(-1.0)
    assert o1_spearman(grid, -falling)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        timestep_grid(1000, 1)


def test_mantel_test_holds_its_level_where_the_pairwise_test_does_not():
    # A null with per-row effects: TAS(i, j) = u_i + u_j + e_ij, no relation to |t_i - t_j|. The
    # G(G-1)/2 entries share rows, so the pairwise Spearman p-value (independent pairs) rejects too
    # often; permuting the grid labels together (Mantel) keeps the dependence and holds the level.
    grid = np.array(timestep_grid(1000, 20), dtype=float)
    rng = np.random.default_rng(0)
    trials, spearman_rejections, mantel_rejections = 1000, 0, 0
    for trial in range(trials):
        u = rng.normal(0.0, 3.0, len(grid))
        e = rng.normal(size=(len(grid), len(grid)))
        A = u[:, None] + u[None, :] + (e + e.T) / 2
        rho, p_pairs = o1_spearman(grid, A)
        rho_mantel, p_mantel = o1_mantel(grid, A, permutations=199, seed=trial)
        assert rho_mantel == pytest.approx(rho)  # the same effect size
        spearman_rejections += p_pairs < 0.05
        mantel_rejections += p_mantel < 0.05
    # binomial standard deviation at 1,000 trials: 0.007 around 0.05; measured: Mantel 0.040, pairwise 0.122
    assert 0.03 <= mantel_rejections / trials <= 0.07, mantel_rejections
    assert spearman_rejections / trials > 0.09, spearman_rejections


def test_mantel_p_value_of_a_real_trend_and_its_floor():
    grid = timestep_grid(1000, 20)
    t = np.array(grid, dtype=float)
    falling = np.exp(-np.abs(t[:, None] - t[None, :]) / 300)
    rho, p = o1_mantel(grid, falling, permutations=999)
    assert rho == pytest.approx(-1.0) and p == pytest.approx(1 / 1000)  # no relabelling does as well
    assert o1_mantel(grid[:3], falling[:3, :3]) == (None, None)
    with pytest.raises(ValueError, match="20x20"):
        o1_mantel(grid, falling[:5, :5])


def test_projected_cosines_approximate_exact_ones_on_real_gradients(folders):
    adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=folders["run"])
    batches = _draw_batches(adapter, "digits", num_batches=1, batch_size=8, seed=0)
    # 500 and 501 share x0 and noise, so their gradients are nearly parallel; 0 and 999 are far apart
    grid = [0, 250, 500, 501, 999]
    exact = task_affinity(adapter, [None], batches, grid, progress=False)
    sketched = task_affinity(adapter, [None], batches, grid, projection_dim=4096, seed=3, progress=False)
    again = task_affinity(adapter, [None], batches, grid, projection_dim=4096, seed=3, progress=False)
    A, P = exact["affinity"], sketched["affinity"]
    assert exact["dim"] == exact["num_parameters"] == sum(p.numel() for p in adapter.model.parameters())
    assert sketched["dim"] == 4096
    assert np.abs(A - P).max() < 0.08  # the count sketch's error is about 1 / sqrt(4096)
    assert np.array_equal(P, again["affinity"])  # the seeded projection is the same every time
    assert A[2, 3] > 0.97 and A[2, 3] > A[0, 4]
    # a parameter subset measures fewer coordinates and leaves the model's requires_grad as it was
    subset = task_affinity(adapter, [None], batches, grid, param_subset="conv_out", progress=False)
    assert subset["num_parameters"] == sum(p.numel() for p in adapter.model.conv_out.parameters())
    assert all(p.requires_grad for p in adapter.model.parameters())
    with pytest.raises(ValueError, match="matches no parameter"):
        task_affinity(adapter, [None], batches, grid, param_subset="nope", progress=False)


def test_count_sketch_is_unbiased_on_known_cosines():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300_000, generator=generator, dtype=torch.float64)
    b = torch.randn(300_000, generator=generator, dtype=torch.float64)
    rows = [a, 0.8 * a + 0.6 * b, b]  # exact cosines with a: 1, 0.8, ~0
    sketch = CountSketch(4096, seed=1)
    # split into uneven pieces, as a model's parameters are
    projected = torch.stack([sketch.project([r[:1000], r[1000:200_000].reshape(1000, -1), r[200_000:]]) for r in rows])
    cos = gradient_cosines(projected)
    exact = gradient_cosines(torch.stack(rows))
    assert np.abs(cos - exact).max() < 0.06
    assert np.allclose(cos, cos.T) and np.allclose(np.diag(cos), 1.0)


def test_affinity_averages_over_checkpoints(folders):
    adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=folders["run"])
    batches = _draw_batches(adapter, "digits", num_batches=1, batch_size=8, seed=0)
    states = [load_state_dict(os.path.join(folders["run"], "checkpoint-1")), load_state_dict(folders["run"])]
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    result = task_affinity(adapter, states, batches, [0, 300, 700, 999], progress=False)
    first, second = result["per_state"]
    assert not np.allclose(first, second)  # different weights, different gradients
    assert np.allclose(result["affinity"], (first + second) / 2)
    # the model's own weights are restored afterwards
    assert all(torch.equal(before[k], v) for k, v in adapter.model.state_dict().items())


def test_a_checkpoint_glob_leaves_out_what_a_killed_save_left(tmp_path):
    """`--checkpoints 'run/checkpoint-*'` (the README's form) also matched checkpoint-N.tmp / .old, the folders a
    killed checkpoint save leaves, and averaged them in; named explicitly, a folder is still taken."""
    from diffusers_ant.analysis.common import expand_checkpoints

    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-4.old"):
        (tmp_path / name).mkdir()
    found = expand_checkpoints([str(tmp_path / "checkpoint-*")])
    assert [os.path.basename(p) for p in found] == ["checkpoint-2", "checkpoint-10"]
    assert expand_checkpoints([str(tmp_path / "checkpoint-12.tmp")]) == [str(tmp_path / "checkpoint-12.tmp")]


def test_affinity_command_writes_what_gradient_clustering_reads(folders, tmp_path, capsys):
    from diffusers import DDPMScheduler

    from diffusers_ant import cluster_timesteps
    from diffusers_ant.clustering import load_affinity

    out, plot = tmp_path / "affinity.json", tmp_path / "affinity.png"
    run = folders["run"]
    code = load_script("analyze").main(["affinity", "--model", run, "--checkpoints", os.path.join(run, "checkpoint-*"), run,
                                         "--dataset_name", "digits", "--grid", "6", "--batches", "2", "--batch_size", "8",
                                         "--output", str(out), "--plot", str(plot), "--no_progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "O1: Spearman rank correlation" in printed and "Mantel permutation test (20000 permutations" in printed
    data = json.loads(out.read_text())
    A = np.array(data["affinity"])
    assert A.shape == (6, 6) and np.allclose(A, A.T) and np.allclose(np.diag(A), 1.0)
    assert data["timesteps"] == timestep_grid(1000, 6) and len(data["log_snr"]) == 6
    # checkpoint-1, checkpoint-2 (the last step is checkpointed too) and the saved model
    assert data["checkpoints"][0].endswith("checkpoint-1") and len(data["checkpoints"]) == 3
    assert -1 <= data["o1_spearman"] <= 1 and len(data["o1_spearman_per_checkpoint"]) == 3
    assert 1 / 20001 <= data["o1_mantel_pvalue"] <= 1 and data["estimator"] == "mean_gradient"
    assert data["projection_dim"] is None  # small enough for exact gradients
    assert plot.stat().st_size > 0
    matrix, grid = load_affinity(out)
    assert grid == data["timesteps"]
    scheduler = DDPMScheduler.from_pretrained(run, subfolder="scheduler")
    intervals = cluster_timesteps(scheduler, 3, objective="gradient", affinity=str(out))
    assert len(intervals) == 3 and intervals.bounds[-1][1] == 999


def test_paper_estimator_averages_per_batch_cosines(folders):
    adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=folders["a"])
    batches = _draw_batches(adapter, "digits", 2, 4, seed=0)
    grid = [0, 500, 999]
    paper = task_affinity(adapter, [None], batches, grid, estimator="mean_cosine", progress=False)
    per_batch = [task_affinity(adapter, [None], [b], grid, progress=False)["affinity"] for b in batches]
    mean_gradient = task_affinity(adapter, [None], batches, grid, progress=False)
    assert paper["estimator"] == "mean_cosine"
    # the same per-batch cosines (|c| <= 1, the same gradients bit for bit), averaged over the two batches and
    # symmetrised in the other order: one float64 rounding of each of the two steps on each side, 4u at most
    # (measured: 0)
    assert np.abs(paper["affinity"] - np.mean(per_batch, axis=0)).max() <= 4 * unit_roundoff(torch.float64)
    # and the cosine of the mean gradient is another number: further apart than float32 rounding of the
    # gradients could move a cosine (about twice a gradient's relative bound, tests/tolerances.py: 3e-3;
    # measured 0.08 apart)
    x0 = batches[0][0]
    rounding = 2 * gradient_tolerance(adapter.model, 1.0, summed_terms=x0.shape[0] * x0[0, 0].numel())
    assert np.abs(paper["affinity"] - mean_gradient["affinity"]).max() > rounding
    with pytest.raises(ValueError, match="mean_gradient, mean_cosine"):
        task_affinity(adapter, [None], batches, grid, estimator="median", progress=False)


def test_affinity_from_several_model_folders_with_projection(folders):
    result = affinity_from_folders([folders["a"], folders["b"]], dataset_name="digits", grid=3, batches=1,
                                   batch_size=4, projection_dim=512, progress=False)
    assert result["checkpoints"] == [folders["a"], folders["b"]] and result["projection_dim"] == 512
    A = np.array(result["affinity"])
    assert np.allclose(A, A.T) and np.allclose(np.diag(A), 1.0) and (np.abs(A) <= 1).all()


# ------------------------------------------------------------------------------------ ntg


def test_negative_transfer_gap_routes_the_interval_model(folders, reference):
    base_pipeline, base = load_denoiser(folders["a"])
    _, same = load_denoiser(folders["a"])  # the base's weights: swapping it in changes nothing
    _, other = load_denoiser(folders["b"])
    result = negative_transfer_gap(base_pipeline, [same, other], [(0, 499), (500, 999)], reference,
                                   num_samples=8, num_inference_steps=4, batch_size=8, progress=False,
                                   names=["same", "other"])
    rows = result["intervals"]
    assert [r["interval"] for r in rows] == [[0, 499], [500, 999]] and [r["name"] for r in rows] == ["same", "other"]
    assert rows[0]["ntg"] == 0.0 and rows[0]["fid"] == result["base"]["fid"]
    assert rows[1]["ntg"] == pytest.approx(rows[1]["fid"] - result["base"]["fid"]) and rows[1]["ntg"] != 0.0
    assert result["num_timesteps"] == 1000 and {"precision", "recall", "kid_mean"} <= set(rows[1])


def test_an_interval_out_of_range_is_refused_before_any_sampling(folders, reference, monkeypatch):
    """Half-open bounds ([500, 1000] for T = 1000) failed only at that interval, after the base's and the earlier
    intervals' samples were drawn and scored, and nothing was written."""
    from diffusers_ant.analysis import evaluate

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the intervals were checked")

    monkeypatch.setattr(evaluate, "sample_images", no_sampling)
    base_pipeline, base = load_denoiser(folders["a"])
    with pytest.raises(ValueError, match=r"interval \[500, 1000\] must satisfy .*ends at 999"):
        negative_transfer_gap(base_pipeline, [base, base], [(0, 499), (500, 1000)], reference, num_samples=8,
                              num_inference_steps=4, batch_size=8, progress=False)


def test_intervals_from_training_config_and_json(folders, tmp_path):
    from diffusers_ant.clustering import TimestepIntervals

    assert interval_from_folder(folders["run"]) == (0, 499)  # the trainer's --timestep_range
    with pytest.raises(ValueError, match="timestep_range"):
        interval_from_folder(folders["a"])
    path = tmp_path / "intervals.json"
    TimestepIntervals([(0, 299), (300, 999)], 1000).save(path)
    assert load_intervals(str(path), 2) == [(0, 299), (300, 999)]
    path.write_text("[[0, 10], [11, 20], [21, 30]]")
    assert load_intervals(str(path), 3)[1] == (11, 20)
    with pytest.raises(ValueError, match="3 intervals for 2"):
        load_intervals(str(path), 2)


# ------------------------------------------------------------------------------------ forgetting


def test_chain_of_forgetting_endpoints_are_the_two_models(folders, reference):
    finetuned_pipeline, finetuned = load_denoiser(folders["a"])
    pretrained_pipeline, pretrained = load_denoiser(folders["b"])
    options = {"num_inference_steps": 4, "batch_size": 6, "seed": 5, "progress": False}
    result = chain_of_forgetting(finetuned_pipeline, pretrained, [1, 0, 0.5], reference, num_samples=6,
                                 return_images=True, **options)
    assert [p["fraction"] for p in result["points"]] == [0.0, 0.5, 1.0]
    assert [p["split_timestep"] for p in result["points"]] == [0, 500, 1000]
    f0, half, f1 = result["images"]
    assert np.array_equal(f0, sample_images(finetuned_pipeline, 6, scheduler="ddim", **options))
    assert np.array_equal(f1, sample_images(pretrained_pipeline, 6, scheduler="ddim", **options))
    assert not np.allclose(half, f0) and not np.allclose(half, f1)
    router = forgetting_router(finetuned, pretrained, 0.5, 1000)
    assert router.route(torch.tensor([0, 499, 500, 999])).tolist() == [0, 0, 1, 1]
    assert router.models[0] is pretrained and router.models[1] is finetuned
    assert parse_fractions("0, 0.5,1,0.5") == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        parse_fractions("0,1.5")


# ------------------------------------------------------------------------------------ command line


def test_ntg_and_forgetting_commands(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ANT_CACHE", folders["cache"])  # the digits classifier, trained once
    analyze = load_script("analyze")
    common = ["--dataset_name", "digits", "--num_samples", "8", "--num_inference_steps", "3", "--kid_subsets", "2",
              "--no_progress"]
    assert analyze.main(["ntg", "--base", folders["a"], "--interval_models", folders["run"], "--output",
                         str(tmp_path / "ntg.json"), "--plot", str(tmp_path / "ntg.png"), *common]) == 0
    ntg = json.loads((tmp_path / "ntg.json").read_text())
    assert ntg["intervals"][0]["interval"] == [0, 499] and ntg["feature_extractor"] == "domain_digits"
    assert len(ntg["feature_extractor_sha256"]) == 64  # the hash of the extractor's weights
    assert "NTG" in capsys.readouterr().out and (tmp_path / "ntg.png").stat().st_size > 0

    assert analyze.main(["forgetting", "--finetuned", folders["run"], "--pretrained", folders["b"], "--fractions",
                         "0,0.3,1", "--output", str(tmp_path / "f.json"), "--plot", str(tmp_path / "f.png"), *common]) == 0
    curve = json.loads((tmp_path / "f.json").read_text())
    assert [p["fraction"] for p in curve["points"]] == [0.0, 0.3, 1.0]
    assert curve["feature_extractor_sha256"] == ntg["feature_extractor_sha256"]
    assert all(np.isfinite(p["fid"]) for p in curve["points"]) and (tmp_path / "f.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["nonsense"], 2, "invalid choice"),
        (["affinity", "--model", "/no/such/folder", "--dataset_name", "digits", "--output", "x.json"], 1, "no such folder"),
        (["ntg", "--base", "/no/such", "--interval_models", "/x", "--dataset_name", "digits", "--output", "x.json"], 1,
         "no such folder"),
        (["forgetting", "--finetuned", "a", "--pretrained", "b", "--dataset_name", "digits", "--fractions", "2",
          "--output", "x.json"], 1, "[0, 1]"),
        (["ntg", "--base", "a", "--interval_models", "b", "--dataset_name", "digits", "--feature_extractor", "clip",
          "--output", "x.json"], 2, "unknown --feature_extractor"),
        (["affinity", "--model", "a", "--output", "x.json"], 2, "--dataset_name"),
        # 0 read as no projection: exact gradients, hundreds of GB for SD
        (["affinity", "--model", "a", "--dataset_name", "digits", "--projection_dim", "0", "--output", "x.json"], 2,
         "a dimension >= 1"),
        # a negative count sliced the shuffled rows from the end, 0 fell back to --num_samples
        (["ntg", "--base", "a", "--interval_models", "b", "--dataset_name", "digits", "--num_real", "0",
          "--output", "x.json"], 2, "--num_real must be positive"),
        # where the result goes, checked before the analysis runs (it failed after it, with an OSError's text)
        (["affinity", "--model", "a", "--dataset_name", "digits", "--output", __file__ + "/x.json"], 2,
         "cannot be created"),
        (["ntg", "--base", "a", "--interval_models", "b", "--dataset_name", "digits", "--output", "x.json",
          "--plot", os.path.dirname(__file__)], 2, "--plot"),
    ],
)
def test_bad_input_is_one_short_line(argv, code, message, capsys):
    analyze = load_script("analyze")
    try:
        result = analyze.main(argv)
    except SystemExit as exit_:
        result = exit_.code
    err = capsys.readouterr().err.strip()
    assert result == code
    # (a subcommand's own parser names itself: "analyze.py affinity: error: ...")
    assert len(err.splitlines()) == 1 and err.startswith("analyze.py") and ": error:" in err.split("\n")[0][:40]
    if message:
        assert message in err


def test_checkpoint_of_another_architecture_is_a_short_error(folders, tmp_path):
    other = get_model_adapter("unet").load(model_config_name_or_path="small", resolution=8, num_channels=1)
    other.save(str(tmp_path / "small"))
    with pytest.raises(ValueError, match="does not fit the model"):
        affinity_from_folders(folders["a"], checkpoints=[str(tmp_path / "small")], dataset_name="digits", grid=2,
                              batches=1, batch_size=4, progress=False)


def _folder_with_other_schedule(source, folder, **changes):
    """A copy of a saved model folder whose scheduler config differs by `changes`."""
    import shutil

    shutil.copytree(source, folder)
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(folder)


def test_ntg_and_forgetting_refuse_models_with_another_schedule(folders, reference, tmp_path, capsys):
    linear = _folder_with_other_schedule(folders["b"], tmp_path / "linear", beta_schedule="linear")
    v_pred = _folder_with_other_schedule(folders["b"], tmp_path / "v", prediction_type="v_prediction")
    base_pipeline, _ = load_denoiser(folders["a"])
    other_pipeline, other = load_denoiser(linear)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        negative_transfer_gap(base_pipeline, [other], [(0, 499)], reference, num_samples=4, progress=False,
                              interval_schedulers=[other_pipeline.scheduler])
    with pytest.raises(ValueError, match="alphas_cumprod"):
        chain_of_forgetting(base_pipeline, other, [0.5], reference, num_samples=4, progress=False,
                            pretrained_scheduler=other_pipeline.scheduler)
    # the commands: one line on stderr naming both models and both values, exit status 1
    analyze = load_script("analyze")
    common = ["--dataset_name", "digits", "--num_samples", "4", "--output", str(tmp_path / "x.json"), "--no_progress"]
    (tmp_path / "intervals.json").write_text("[[0, 499], [500, 999]]")
    capsys.readouterr()
    assert analyze.main(["ntg", "--base", folders["a"], "--interval_models", folders["b"], v_pred,
                         "--intervals", str(tmp_path / "intervals.json"), *common]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--base {folders['a']} has prediction_type 'epsilon', {v_pred} has 'v_prediction'" in err
    assert analyze.main(["forgetting", "--finetuned", linear, "--pretrained", folders["a"], "--fractions", "0.5", *common]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "alphas_cumprod" in err and f"--finetuned {linear}" in err and f"--pretrained {folders['a']}" in err
    assert not (tmp_path / "x.json").exists()


def test_ntg_and_forgetting_refuse_models_that_cannot_stand_in_for_each_other(folders, tmp_path, capsys):
    """A class-conditional UNet against an unconditional one ended, after the reference was built, in diffusers'
    "class_labels should be provided"; one line now, before anything is sampled."""
    torch.manual_seed(3)
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1,
                                   num_classes=3).save(str(tmp_path / "classes"))
    analyze = load_script("analyze")
    common = ["--dataset_name", "digits", "--num_samples", "4", "--output", str(tmp_path / "x.json"), "--no_progress"]
    capsys.readouterr()
    assert analyze.main(["forgetting", "--finetuned", str(tmp_path / "classes"), "--pretrained", folders["a"],
                         "--fractions", "0.5", *common]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot share a sampling loop: class-conditional True against False" in err
    (tmp_path / "intervals.json").write_text("[[0, 499]]")
    assert analyze.main(["ntg", "--base", folders["a"], "--interval_models", str(tmp_path / "classes"),
                         "--intervals", str(tmp_path / "intervals.json"), *common]) == 1
    assert "class-conditional False against True" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("model_type", ["sd", "sd3", "flux", "qwenimage"])
def test_affinity_batches_of_a_text_to_image_family_carry_their_captions(model_type):
    """The per-timestep gradients behind `--clustering gradient` are taken on the data's captions: batches of
    different digits are encoded differently (SD3, FLUX.1 and Qwen-Image once got the empty prompt for all)."""
    from diffusers_ant.models import get_model_adapter

    adapter = get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=16)
    (_, conditioning, _), = _draw_batches(adapter, "mnist5k_captions", num_batches=1, batch_size=8, seed=0)
    values = conditioning.values() if isinstance(conditioning, dict) else (
        conditioning if isinstance(conditioning, (list, tuple)) else [conditioning])
    embeddings = [v for v in values if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == 8 and v.is_floating_point()]
    assert embeddings, type(conditioning)
    assert any(not torch.equal(e[0], e[i]) for e in embeddings for i in range(1, 8))


def test_the_reference_of_a_text_to_image_pipeline_has_the_size_and_channels_of_its_samples():
    """An SD pipeline's UNet records the latent size and 4 latent channels: the reference was drawn at 8x8 in
    4 channels while the samples are 16x16 RGB, and the extractor's silent resize made a perfect model score
    FID 147. The reference now takes the samples' size; a reference of another size refuses to score."""
    from diffusers_ant.models import get_model_adapter

    pipeline = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16, num_channels=3).make_pipeline()
    assert pipeline.unet.config.sample_size != 16  # the latent side
    reference = reference_for(pipeline, "mnist5k", num_real=8, batch_size=8)
    samples = sample_images(pipeline, 4, num_inference_steps=1, batch_size=4, progress=False)
    assert samples.shape[1:] == reference.image_shape == (16, 16, 3)
    assert np.isfinite(reference.score(samples)["fid"])
    with pytest.raises(ValueError, match="the samples are 8x8x3 .* and the reference images 16x16x3"):
        reference.score(samples[:, ::2, ::2])


def test_a_latent_models_affinity_batches_are_reproducible_under_one_seed():
    """The VAE's posterior sample took the global RNG, so an SD model's affinity changed from run to run under
    one --seed; it now takes the seeded generator of the batches' noise."""
    from diffusers_ant.models import get_model_adapter

    adapter = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16)
    first, second = (_draw_batches(adapter, "mnist5k_captions", num_batches=1, batch_size=4, seed=3)[0][0]
                     for _ in range(2))
    assert torch.equal(first, second)


def test_an_affinity_file_of_another_number_of_timesteps_is_refused(tmp_path):
    """A T = 1000 measurement given to a T = 2000 scheduler was stretched (constant beyond its grid)."""
    import json

    from diffusers_ant.clustering import resolve_affinity

    path = tmp_path / "affinity.json"
    path.write_text(json.dumps({"timesteps": [0, 500, 999], "affinity": [[1, .5, .2], [.5, 1, .5], [.2, .5, 1]],
                                "num_timesteps": 1000}))
    assert resolve_affinity(str(path), None, 1000).shape == (1000, 1000)
    with pytest.raises(ValueError, match="measured on a model of 1000 timesteps and this scheduler has 2000: re-run"):
        resolve_affinity(str(path), None, 2000)


def test_a_controlnet_output_is_refused_by_the_analyses_in_one_line(tmp_path):
    """A ControlNet beside a frozen UNet: the analyses would route the UNet (a gap of exactly 0); refused, not
    mislabelled 'holds no saved pipeline'."""
    from diffusers_ant.analysis.common import check_model_folder

    (tmp_path / "ant_controlnet.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a ControlNet output: the analyses .* not a ControlNet") as info:
        check_model_folder(str(tmp_path))
    assert "\n" not in str(info.value)


def test_an_ntg_bar_without_a_confidence_interval_is_gray():
    from diffusers_ant.analysis.plots import gap_colors

    rows = [{"gap": gap} for gap in ({"low": -3.0, "high": -1.0}, {"low": 1.0, "high": 2.0}, {"low": -1.0, "high": 1.0},
                                     {"low": None, "high": None}, {"low": -2.0, "high": -2.0})]
    assert gap_colors(rows) == ["tab:red", "tab:blue", "tab:gray", "tab:gray", "tab:gray"]


def test_ntg_and_forgetting_prompt_a_text_to_image_model_with_the_captions(monkeypatch):
    """They sampled an SD-family model with the empty prompt against a captioned reference, where
    evaluate_model prompts with the captions: the two tools' FIDs did not agree."""
    analyze = load_script("analyze")
    from diffusers_ant.analysis.evaluate import dataset_captions
    from diffusers_ant.models import get_model_adapter

    args = analyze.build_parser().parse_args(["ntg", "--base", "a", "--interval_models", "b", "--dataset_name",
                                              "mnist5k_captions", "--num_samples", "3", "--output", "x.json"])
    sd = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16).make_pipeline()
    unet = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).make_pipeline()
    assert analyze._prompts(args, sd) == dataset_captions("mnist5k_captions", 3, seed=0) and len(set(analyze._prompts(args, sd))) > 1
    assert analyze._prompts(args, unet) is None
    # and both analyses hand them to the sampler, for every model they sample (the sampler is recorded here)
    import diffusers_ant.analysis.evaluate as evaluate
    from diffusers_ant.analysis.forgetting import chain_of_forgetting
    from diffusers_ant.analysis.ntg import negative_transfer_gap

    asked = []
    monkeypatch.setattr(evaluate, "sample_images", lambda pipeline, n, **kw: asked.append(kw["prompts"]) or np.zeros((n, 16, 16, 3)))
    scores = type("Reference", (), {"score": lambda self, images: {"fid": 0.0}})()
    prompts = analyze._prompts(args, sd)
    negative_transfer_gap(sd, [sd.unet], [(0, 499)], scores, num_samples=3, prompts=prompts, progress=False)
    chain_of_forgetting(sd, sd.unet, [0.0, 0.5], scores, num_samples=3, prompts=prompts, progress=False)
    assert asked == [prompts] * 4


def test_affinity_loads_a_run_at_its_own_resolution_and_flow_shift(tmp_path):
    """FLUX.1 and Qwen-Image transformers have no sample size: the affinity's adapter took the 512 px default,
    and FLUX.1's shifted sigma table (which depends on the size, or on --flow_shift) put training index t at
    another noise level than the run trained there. It now reads both from the run's training_config.json."""
    from diffusers_ant.analysis.affinity import analysis_adapter
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training.components import pixel_resolution

    torch.manual_seed(0)
    get_model_adapter("flux").load(model_config_name_or_path="tiny", resolution=16).save(str(tmp_path / "run"))
    (tmp_path / "run" / "training_config.json").write_text(json.dumps({"model_type": "flux", "resolution": 32,
                                                                       "flow_shift": 2.0}))
    adapter = analysis_adapter(str(tmp_path / "run"), "flux")
    assert pixel_resolution(adapter) == 32
    assert adapter.noise_scheduler.config.shift == 2.0 and not adapter.noise_scheduler.config.use_dynamic_shifting
