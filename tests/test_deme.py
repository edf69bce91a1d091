"""DeMe's merge: task arithmetic (bitwise at its corners), TIES / DARE through peft, the weight search,
merge_deme.py on tiny fine-tune folders (full, LoRA, with channel projections), the ensemble, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffusers_ant import TimestepIntervals, TimestepRouter, merge_task_vectors
from diffusers_ant.deme import add_channel_projection, channel_projections, has_channel_projection, save_adapter_output
from diffusers_ant.deme.merge import merge_seed_for
from diffusers_ant.deme.merging import merge_finetunes, write_ensemble_folder
from diffusers_ant.deme.search import search_merge_weights, write_search_table
from diffusers_ant.models import get_model_adapter, load_pipeline
from diffusers_ant.models.lora import lora_disabled
from tolerances import output_tolerance, task_arithmetic_tolerance
from trainer_utils import REPO, offline_env, perturb_parameters

SCRIPT = os.path.join(REPO, "train_scripts", "merge_deme.py")
EVALUATE = os.path.join(REPO, "train_scripts", "evaluate_model.py")
NUM_INTERVALS = 4
INTERVALS = TimestepIntervals.equal(1000, NUM_INTERVALS)  # [0, 249], [250, 499], [500, 749], [750, 999]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------------------- merge_task_vectors


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).half(),
            "steps": torch.tensor(7)}


def test_task_arithmetic_against_its_formula():
    base, a, b = _state(0), _state(1), _state(2)
    a["steps"] = b["steps"] = base["steps"].clone()
    merged = merge_task_vectors(base, [a, b], [0.25, 0.5])
    expected = base["w"] + 0.25 * (a["w"] - base["w"]) + 0.5 * (b["w"] - base["w"])
    tolerance = task_arithmetic_tolerance(base["w"], [a["w"], b["w"]], [0.25, 0.5])  # 2.4e-6; swapped weights: 0.55
    torch.testing.assert_close(merged["w"], expected, rtol=0, atol=tolerance)
    assert merged["b"].dtype == torch.float16
    assert torch.equal(merged["steps"], base["steps"])


def test_zero_and_one_hot_weights_are_bitwise():
    # entries where base + (theta - base) != theta in float32: 1 + (1e-8 - 1) == 0, and an infinity
    base = {"w": torch.tensor([1.0, -0.0, 3.0, float("inf")]), "h": torch.tensor([1000.0, 0.1], dtype=torch.float16)}
    a = {"w": torch.tensor([1e-8, 2.0, -3.5, 1.0]), "h": torch.tensor([0.001, -7.0], dtype=torch.float16)}
    b = {"w": torch.tensor([5.0, 6.0, 7.0, 8.0]), "h": torch.tensor([2.0, 3.0], dtype=torch.float16)}
    assert not torch.equal(base["w"][:1] + (a["w"][:1] - base["w"][:1]), a["w"][:1])  # the naive formula is not exact
    for weights, expected in (([0.0, 0.0], base), ([1.0, 0.0], a), ([0.0, 1.0], b)):
        merged = merge_task_vectors(base, [a, b], weights)
        for key in base:
            assert merged[key].dtype == expected[key].dtype
            assert torch.equal(merged[key].view(torch.int16 if key == "h" else torch.int32),
                               expected[key].view(torch.int16 if key == "h" else torch.int32)), (weights, key)


def test_merge_refuses_what_cannot_be_merged():
    base, a = _state(0), _state(1)
    with pytest.raises(ValueError, match="one weight per model"):
        merge_task_vectors(base, [a], [0.5, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        merge_task_vectors(base, [], [])
    with pytest.raises(ValueError, match="does not match the base"):
        merge_task_vectors(base, [{"w": a["w"]}], [1.0])
    with pytest.raises(ValueError, match="shape"):
        merge_task_vectors(base, [dict(a, w=torch.zeros(4, 3))], [1.0])
    with pytest.raises(ValueError, match="non-float"):
        merge_task_vectors(base, [dict(a, steps=torch.tensor(8))], [1.0])
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_task_vectors(base, [a], [1.0], method="average")
    with pytest.raises(ValueError, match="density"):
        merge_task_vectors(base, [a], [1.0], method="ties", density=0.0)


def _float_states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)}
    others = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, others


def test_ties_and_dare_match_peft_merge_utils():
    from peft.utils import merge_utils

    base, others = _float_states(3)
    weights = [0.5, 1.0, 0.25]
    w = torch.tensor(weights)
    task_vectors = {k: [o[k] - base[k] for o in others] for k in base}

    merged = merge_task_vectors(base, others, weights, method="ties", density=0.4, majority_sign_method="frequency")
    for key in base:
        expected = base[key] + merge_utils.ties(task_vectors[key], w, 0.4, "frequency")
        assert torch.equal(merged[key], expected)
    # the default density is TIES' 20 %: most entries keep the base's value
    sparse = merge_task_vectors(base, others, weights, method="ties")
    assert (sparse["w"] == base["w"]).float().mean() > 0.3

    for method in ("dare_linear", "dare_ties"):
        rng_before = torch.random.get_rng_state()
        merged = merge_task_vectors(base, others, weights, method=method, density=0.5, seed=3)
        assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone
        for key in base:
            torch.manual_seed(merge_seed_for(key, 3))
            function = getattr(merge_utils, method)
            delta = function(task_vectors[key], w, 0.5) if method == "dare_linear" else function(task_vectors[key], w, 0.5, "total")
            assert torch.equal(merged[key], base[key] + delta), (method, key)
        again = merge_task_vectors(base, others, weights, method=method, density=0.5, seed=3)
        other_seed = merge_task_vectors(base, others, weights, method=method, density=0.5, seed=4)
        assert all(torch.equal(again[k], merged[k]) for k in base)
        assert not torch.equal(other_seed["w"], merged["w"])


# ---------------------------------------------------------------------------- search


TARGET = (0.25, 0.0, 0.5, 1.0)


def _constructed_metric(weights):
    """Lowest (1.0) exactly at TARGET; separable, so coordinate descent reaches it too."""
    return 1.0 + sum((w - t) ** 2 for w, t in zip(weights, TARGET))


def test_grid_search_finds_the_best_point_of_a_constructed_metric(tmp_path):
    calls = []

    def metric(weights):
        calls.append(weights)
        return {"fid": _constructed_metric(weights), "precision": 0.5}

    result = search_merge_weights(metric, 4, strategy="grid", values=(0.0, 0.25, 0.5, 1.0))
    assert len(calls) == len(result.rows) == 4 ** 4 and len(set(calls)) == len(calls)
    assert result.best_weights == list(TARGET) and result.best_score == 1.0
    assert min(row["score"] for row in result.rows) == result.best_score
    json_path, md_path = write_search_table(result, str(tmp_path))
    table = json.loads(open(json_path).read())
    assert table["best_weights"] == list(TARGET) and len(table["rows"]) == 256 and table["rows"][0]["precision"] == 0.5
    assert "**[0.25, 0, 0.5, 1]**" in open(md_path).read()


def test_coordinate_search_finds_it_with_fewer_evaluations():
    result = search_merge_weights(_constructed_metric, 4, strategy="coordinate", values=(0.0, 0.25, 0.5, 1.0))
    assert result.best_weights == list(TARGET)
    assert len(result.rows) < 4 ** 4
    assert len({tuple(r["weights"]) for r in result.rows}) == len(result.rows)  # each point evaluated once
    # a starting point, and the refusals
    started = search_merge_weights(_constructed_metric, 4, strategy="coordinate", values=(0.0, 0.25, 0.5, 1.0),
                                   initial=[0.1, 0.1, 0.2, 0.5])
    assert started.rows[0]["weights"] == [0.1, 0.1, 0.2, 0.5] and started.best_weights == list(TARGET)
    with pytest.raises(ValueError, match="over the limit of 100"):
        search_merge_weights(_constructed_metric, 4, strategy="grid", values=(0.0, 0.25, 0.5, 1.0), max_evaluations=100)
    with pytest.raises(ValueError, match="unknown search strategy"):
        search_merge_weights(_constructed_metric, 4, strategy="random")


# ---------------------------------------------------------------------------- fine-tune folders


def _write_records(folder, index, base, model_type="unet", intervals=INTERVALS, **extra):
    """What the trainer writes beside a DeMe interval output: its run's intervals and its config."""
    intervals.save(os.path.join(folder, "timestep_intervals.json"))
    config = {"deme_interval": index, "pretrained_model_name_or_path": base, "model_type": model_type, **extra}
    with open(os.path.join(folder, "training_config.json"), "w") as f:
        json.dump(config, f)


def make_finetune(folder, base, index, seed, lora=False, projection=False):
    """A tiny fine-tune without training: the base, perturbed (its LoRA or its projections too), saved."""
    adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=base)
    if lora:
        adapter.add_lora(rank=2)
        perturb_parameters(adapter.model, 0.05, seed, only="lora_")
    else:
        perturb_parameters(adapter.model, 0.01, seed)
    if projection:
        add_channel_projection(adapter.model)
        for p in channel_projections(adapter.model).values():
            perturb_parameters(p, 0.05, seed + 100)
    save_adapter_output(adapter, str(folder), lora=lora)
    _write_records(str(folder), index, base)
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny 8x8 greyscale base pipeline and four full fine-tunes of it, one per interval."""
    root = tmp_path_factory.mktemp("deme")
    torch.manual_seed(0)
    base = str(root / "base")
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(base)
    finetunes = [make_finetune(root / "out" / f"interval-{i}", base, i, seed=10 + i) for i in range(NUM_INTERVALS)]
    return {"root": root, "base": base, "finetunes": finetunes}


def _unet_state(folder):
    return load_pipeline(str(folder)).unet.state_dict()


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_merged_folder_is_base_at_zero_weights_and_a_finetune_at_one_hot(run, tmp_path):
    shuffled = [run["finetunes"][i] for i in (2, 0, 3, 1)]  # sorted by interval, not by argument order
    merge_finetunes(run["base"], shuffled, str(tmp_path / "zero"), weights=[0, 0, 0, 0], log=lambda *_: None)
    _assert_states_equal(_unet_state(tmp_path / "zero"), _unet_state(run["base"]))
    merge_finetunes(run["base"], shuffled, str(tmp_path / "hot"), weights=[0, 0, 1, 0], log=lambda *_: None)
    _assert_states_equal(_unet_state(tmp_path / "hot"), _unet_state(run["finetunes"][2]))

    record = json.loads((tmp_path / "hot" / "deme_merge.json").read_text())
    assert [f["interval"] for f in record["finetunes"]] == [list(b) for b in INTERVALS.bounds]
    assert record["weights"] == [0, 0, 1, 0] and record["merge_method"] == "task_arithmetic"
    card = (tmp_path / "hot" / "README.md").read_text()
    assert "| 2 | 500 | 749 | `interval-2` | 1 |" in card and "`base`" in card and "deme" in card
    # the merged folder is a plain diffusers pipeline
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(str(tmp_path / "hot")).unet).__name__ == "UNet2DModel"


def test_merges_and_ensembles_carry_the_finetunes_class_map(run, tmp_path):
    """DiT fine-tunes on another class count trained the label rows their class_map.json names; the merged and
    ensemble folders dropped it, so they (and the search's samples) cycled every row of the table. The map is
    now carried over (load_pipeline gives pipeline.class_rows again), and fine-tunes with different maps are
    refused. (The class map's rows, not a DiT's table, are what is checked: UNet fine-tunes carry it here.)"""
    import shutil

    record = {"class_names": ["cat", "dog"], "rows": [281, 207], "null_row": 1000, "num_model_classes": 1000}
    folders = []
    for i, folder in enumerate(run["finetunes"]):
        copy = tmp_path / f"interval-{i}"
        shutil.copytree(folder, copy)
        (copy / "class_map.json").write_text(json.dumps(record))
        folders.append(str(copy))
    merge_finetunes(run["base"], folders, str(tmp_path / "merged"), weights=[0.5] * 4, log=lambda *_: None)
    write_ensemble_folder(run["base"], folders, str(tmp_path / "ensemble"), log=lambda *_: None)
    for out in ("merged", "ensemble"):
        assert json.loads((tmp_path / out / "class_map.json").read_text()) == record
        assert load_pipeline(str(tmp_path / out)).class_rows == [281, 207]
    (tmp_path / "interval-2" / "class_map.json").write_text(json.dumps({**record, "rows": [1, 2]}))
    with pytest.raises(ValueError, match="maps the data set's classes to other label rows"):
        merge_finetunes(run["base"], folders, str(tmp_path / "other"), weights=[0.5] * 4, log=lambda *_: None)


def test_given_weights_merge_by_task_arithmetic(run, tmp_path):
    weights = [0.1, 0.1, 0.2, 0.5]
    merge_finetunes(run["base"], run["finetunes"], str(tmp_path / "m"), weights=weights, log=lambda *_: None)
    base = _unet_state(run["base"])
    finetuned = [_unet_state(f) for f in run["finetunes"]]
    merged = _unet_state(tmp_path / "m")
    for key in base:
        expected = base[key] + sum(w * (f[key] - base[key]) for w, f in zip(weights, finetuned))
        # at most 2.4e-6 (observed 1.2e-7); swapping two weights moves every tensor by 2e-3 at least, 850x its bound
        tolerance = task_arithmetic_tolerance(base[key], [f[key] for f in finetuned], weights)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("kind", ["merge", "ensemble"])
def test_a_merge_or_ensemble_killed_while_writing_leaves_no_output_folder(kind, run, tmp_path, monkeypatch):
    """A merge or an ensemble is written beside its output folder and renamed into place: a kill after the
    weights but before the rest left a folder that loaded as another model (a merge without its projections,
    an ensemble without its record) and that train_deme.py took for a finished merge, and a new ensemble
    refused the half-written folder as not empty. The next write replaces the leftover."""
    from diffusers_ant.deme import card

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    def write(out):
        if kind == "merge":
            merge_finetunes(run["base"], run["finetunes"], str(out), weights=[0.1, 0.1, 0.2, 0.5], log=lambda *_: None)
        else:
            write_ensemble_folder(run["base"], run["finetunes"], str(out), log=lambda *_: None)

    monkeypatch.setattr(card, "write_deme_model_card", killed)
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        write(out)
    assert not out.exists() and (tmp_path / "m.partial" / "model_index.json").is_file()
    monkeypatch.undo()
    write(out)
    assert (out / "deme_merge.json").is_file() and not (tmp_path / "m.partial").exists()
    text = (out / "README.md").read_text()
    assert f"m: a DeMe {'merged model' if kind == 'merge' else 'ensemble'}" in text and "m.partial" not in text


def test_injected_search_metric_chooses_the_weights_and_is_recorded(run, tmp_path):
    out = tmp_path / "searched"
    seen = []

    def score(weights):
        seen.append(weights)
        return {"fid": _constructed_metric(weights), "kid_mean": 0.01}

    merge_finetunes(run["base"], run["finetunes"], str(out), search="coordinate", search_values=(0.0, 0.25, 0.5, 1.0),
                    score_fn=score, log=lambda *_: None)
    record = json.loads((out / "deme_merge.json").read_text())
    assert record["weights"] == list(TARGET) and record["scores"]["fid"] == 1.0
    assert record["search"]["evaluations"] == len(seen)
    assert json.loads((out / "deme_search.json").read_text())["best_weights"] == list(TARGET)
    assert (out / "deme_search.md").is_file()
    card = (out / "README.md").read_text()
    assert "Merge-weight search" in card and "**[0.25, 0, 0.5, 1]**" in card and "| FID | 1.0000 |" in card
    # and the folder holds exactly that merge
    _assert_states_equal(_unet_state(out), merge_task_vectors(_unet_state(run["base"]),
                                                              [_unet_state(f) for f in run["finetunes"]], TARGET))


def test_a_search_stopped_part_way_continues_from_the_points_it_scored(run, tmp_path, monkeypatch):
    """Each point the search scores (1,000 samples each: hours in all) is kept beside the output folder as it
    is scored; the same merge run again after a kill scores only the rest and chooses what an unbroken search
    chooses. The scorer stands in for the FID (a deterministic function of the merged weights it samples)."""
    from diffusers_ant.deme import merging
    from diffusers_ant.deme.search import ScoredPoints

    class Scorer:
        calls, stop_after = 0, None

        def __init__(self, pipeline, evaluation):
            self.unet = pipeline.unet

        def __call__(self):
            Scorer.calls += 1
            if Scorer.stop_after is not None and Scorer.calls > Scorer.stop_after:
                raise KeyboardInterrupt
            total = float(self.unet.conv_in.weight.detach().double().sum())
            return {"fid": (total - 1.0) ** 2, "num_fake": 8}

    monkeypatch.setattr(merging, "_Scorer", Scorer)
    evaluation = {"dataset_name": "mnist5k", "num_samples": 8}

    def merge(out):
        return merge_finetunes(run["base"], run["finetunes"], str(out), search="coordinate", search_values=(0.0, 0.5, 1.0),
                               evaluation=evaluation, log=lambda *_: None)

    straight = merge(tmp_path / "straight")
    evaluations = Scorer.calls
    assert evaluations > 3 and not (tmp_path / "straight.search.json").exists()  # removed once the merge is written

    Scorer.calls, Scorer.stop_after = 0, 3
    with pytest.raises(KeyboardInterrupt):
        merge(tmp_path / "m")
    kept = json.loads((tmp_path / "m.search.json").read_text())
    assert len(kept["rows"]) == 3 and not (tmp_path / "m").exists()
    # kept for these settings only: another evaluation scores every point again
    assert ScoredPoints(str(tmp_path / "m.search.json"), {**kept["settings"], "evaluation": {"num_samples": 16}}).rows == []

    Scorer.calls, Scorer.stop_after = 0, None
    resumed = merge(tmp_path / "m")
    assert Scorer.calls == evaluations - 3
    assert resumed["weights"] == straight["weights"] and resumed["scores"] == straight["scores"]
    assert (json.loads((tmp_path / "m" / "deme_search.json").read_text())["rows"]
            == json.loads((tmp_path / "straight" / "deme_search.json").read_text())["rows"])
    assert not (tmp_path / "m.search.json").exists()


def test_ties_and_dare_options_run_on_folders(run, tmp_path):
    for method in ("ties", "dare_ties"):
        out = tmp_path / method
        merge_finetunes(run["base"], run["finetunes"], str(out), weights=[1, 1, 1, 1], method=method, density=0.5,
                        merge_seed=1, log=lambda *_: None)
        expected = merge_task_vectors(_unet_state(run["base"]), [_unet_state(f) for f in run["finetunes"]], [1, 1, 1, 1],
                                      method=method, density=0.5, seed=1)
        _assert_states_equal(_unet_state(out), expected)
        assert json.loads((out / "deme_merge.json").read_text())["merge_options"]["density"] == 0.5


def test_lora_and_projection_finetunes_fold_into_dense_task_vectors(run, tmp_path):
    base = run["base"]
    lora = make_finetune(tmp_path / "lora-0", base, 0, seed=20, lora=True, projection=True)
    full = make_finetune(tmp_path / "full-1", base, 1, seed=21, projection=True)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 600])

    def output(folder):
        unet = load_pipeline(str(folder)).unet.eval()
        with torch.no_grad():
            return unet(x, t).sample

    merge_finetunes(base, [lora, full], str(tmp_path / "hot0"), weights=[1, 0], log=lambda *_: None)
    merged = load_pipeline(str(tmp_path / "hot0")).unet
    assert has_channel_projection(merged) and (tmp_path / "hot0" / "channel_projection.json").is_file()
    # the LoRA fine-tune, folded: its LoRA update W + (alpha/r) BA as a dense weight. The fold changes only the
    # rounding: tests/tolerances.py's output_tolerance, L the LoRA UNet's layers (1.7e-3; observed 2e-6); a merge
    # that dropped the LoRA misses by 1.06, 600x the bound
    lora_unet = load_pipeline(str(lora)).unet.eval()
    with torch.no_grad():
        expected = lora_unet(x, t).sample
        tolerance = output_tolerance(lora_unet, expected)
        with lora_disabled(lora_unet):
            assert (lora_unet(x, t).sample - expected).abs().max() > 100 * tolerance
    torch.testing.assert_close(output(tmp_path / "hot0"), expected, rtol=0, atol=tolerance)
    merge_finetunes(base, [lora, full], str(tmp_path / "hot1"), weights=[0, 1], log=lambda *_: None)
    _assert_states_equal(_unet_state(tmp_path / "hot1"), _unet_state(full))
    # the base had no projections: at weights 0 the merged model has identity ones and is the base
    merge_finetunes(base, [lora, full], str(tmp_path / "zero"), weights=[0, 0], log=lambda *_: None)
    zero = load_pipeline(str(tmp_path / "zero")).unet
    assert all(torch.equal(p.weight, p.identity) for p in channel_projections(zero).values())
    assert torch.equal(output(tmp_path / "zero"), output(base))
    assert "(LoRA, folded in)" in (tmp_path / "zero" / "README.md").read_text()


# ---------------------------------------------------------------------------- bad input


def _other_architecture(folder, base):
    torch.manual_seed(1)
    adapter = get_model_adapter("unet").load(model_config_name_or_path="small", resolution=8, num_channels=1)
    adapter.save(str(folder))
    _write_records(str(folder), 3, base)
    return str(folder)


def test_a_base_recorded_by_its_folder_name_alone_is_the_local_base_of_that_name(run, tmp_path):
    """A base that shares only the file system root with the output (a base under /data, an output under
    /scratch) is recorded by its folder name alone (`hub.portable_path`), which reads as a Hub id: the run's
    own merge then refused its own base as another model. A local --base of that name is that base; another
    name is still refused."""
    import shutil

    def recorded_as(name, folder):
        copies = []
        for i, finetune in enumerate(run["finetunes"]):
            copy = folder / f"interval-{i}"
            shutil.copytree(finetune, copy)
            _write_records(str(copy), i, name)
            copies.append(str(copy))
        return copies

    quiet = {"log": lambda *_: None}
    merge_finetunes(run["base"], recorded_as("base", tmp_path / "bare"), str(tmp_path / "merged"),
                    weights=[0, 0, 0, 1], **quiet)
    assert _unet_state(tmp_path / "merged").keys() == _unet_state(run["base"]).keys()
    with pytest.raises(ValueError, match="not from --base"):
        merge_finetunes(run["base"], recorded_as("another-base", tmp_path / "other"), str(tmp_path / "refused"),
                        weights=[0, 0, 0, 1], **quiet)


def test_bad_inputs_are_refused_with_one_line(run, tmp_path):
    base, finetunes = run["base"], run["finetunes"]
    quiet = {"log": lambda *_: None}
    with pytest.raises(ValueError, match="got 3 --weights for 4 fine-tunes"):
        merge_finetunes(base, finetunes, str(tmp_path / "a"), weights=[1, 0, 0], **quiet)
    with pytest.raises(ValueError, match="same architecture"):
        merge_finetunes(base, finetunes[:3] + [_other_architecture(tmp_path / "small", base)], str(tmp_path / "b"),
                        weights=[0, 0, 0, 1], **quiet)
    other_base = str(tmp_path / "other-base")
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(other_base)
    stranger = make_finetune(tmp_path / "stranger", other_base, 3, seed=5)
    with pytest.raises(ValueError, match="not from --base"):
        merge_finetunes(base, finetunes[:3] + [stranger], str(tmp_path / "c"), weights=[0, 0, 0, 1], **quiet)
    with pytest.raises(ValueError, match="overlapping"):
        merge_finetunes(base, [finetunes[0], finetunes[0] + "/."], str(tmp_path / "d"), weights=[1, 1], **quiet)
    unrecorded = tmp_path / "unrecorded"
    get_model_adapter("unet").load(pretrained_model_name_or_path=base).save(str(unrecorded))
    with pytest.raises(ValueError, match="neither deme_interval nor timestep_range"):
        merge_finetunes(base, [str(unrecorded)], str(tmp_path / "e"), weights=[1], **quiet)
    # missing keys: a fine-tune whose weights file lacks a tensor of the base
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    make_finetune(broken, base, 0, seed=6)
    weights_file = next((broken / "unet").glob("*.safetensors"))
    state = load_file(str(weights_file))
    state.pop(sorted(state)[0])
    save_file(state, str(weights_file))
    with pytest.raises(ValueError, match=r"broken.* does not have the base.s weights: missing \[.conv_in.bias.\]"):
        merge_finetunes(base, [str(broken)], str(tmp_path / "f"), weights=[1], **quiet)
    with pytest.raises(ValueError, match="give --weights"):
        merge_finetunes(base, finetunes, str(tmp_path / "g"), **quiet)
    with pytest.raises(ValueError, match="not empty"):
        merge_finetunes(base, finetunes, run["root"] / "out", weights=[0, 0, 0, 0], **quiet)


def _cli(*args, env_extra=None):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], env=offline_env(**(env_extra or {})),
                          capture_output=True, text=True, timeout=300)


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_deme_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_merges_and_refuses_in_one_line(run, tmp_path, capsys):
    script = _script()  # in process: the subprocess run is in the slow test
    previous = torch.get_num_threads()
    assert script.main(["--base", run["base"], "--finetuned", os.path.join(run["root"], "out", "interval-*"),
                        "--output_dir", str(tmp_path / "merged"), "--weights", "0.1", "0.1", "0.2", "0.5"]) == 0
    torch.set_num_threads(previous)
    assert json.loads((tmp_path / "merged" / "deme_merge.json").read_text())["weights"] == [0.1, 0.1, 0.2, 0.5]

    common = ["--base", run["base"], "--finetuned", *run["finetunes"]]
    assert script.main([*common, "--output_dir", str(tmp_path / "x"), "--weights", "1", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "got 2 --weights for 4 fine-tunes" in err
    for argv, message in (
        ([], "give --weights"),
        (["--weights", "1", "1", "1", "1", "--ensemble"], "--ensemble writes the un-merged ensemble"),
        (["--search", "grid", "--weights", "1", "1", "1", "1"], "--weights only starts --search coordinate"),
        (["--search", "grid"], "pass --dataset_name or --train_data_dir"),
        (["--weights", "1", "1", "1", "1", "--density", "0.5"], "--density applies to"),
        # before the loading and the search (it was found at the final rename, leaving a .partial folder)
        (["--weights", "1", "1", "1", "1", "--output_dir", str(run["finetunes"][0] + "/training_config.json")],
         "is a file, not a folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            script.main([*common, "--output_dir", str(tmp_path / "y"), *argv])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.count("\n") == 0 and message in err, (argv, err)


# ---------------------------------------------------------------------------- ensemble


def test_ensemble_folder_routes_each_interval_to_its_finetune_and_samples(run, tmp_path):
    out = tmp_path / "ensemble"
    write_ensemble_folder(run["base"], run["finetunes"], str(out), log=lambda *_: None)
    pipeline = load_pipeline(str(out))
    router = pipeline.unet
    assert isinstance(router, TimestepRouter) and router.intervals == INTERVALS
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    finetuned = [load_pipeline(f).unet.eval() for f in run["finetunes"]]
    base_unet = load_pipeline(run["base"]).unet.eval()
    with torch.no_grad():
        for i, (start, end) in enumerate(INTERVALS.bounds):
            for t in (start, (start + end) // 2, end):
                out_router = router(x, torch.tensor(t)).sample
                assert torch.equal(out_router, finetuned[i](x, torch.tensor(t)).sample), (i, t)
                assert not torch.equal(out_router, base_unet(x, torch.tensor(t)).sample)
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    assert "ensemble" in (out / "README.md").read_text()

    # a partial ensemble: intervals without a fine-tune go to the base; a member keeps its projections
    projected = make_finetune(tmp_path / "projected-1", run["base"], 1, seed=30, projection=True)
    partial = tmp_path / "partial"
    write_ensemble_folder(run["base"], [projected], str(partial), log=lambda *_: None)
    router = load_pipeline(str(partial)).unet
    assert router.intervals.bounds == [(0, 249), (250, 499), (500, 999)]
    assert has_channel_projection(router.models[1]) and not has_channel_projection(router.models[0])
    member = load_pipeline(projected).unet.eval()
    with torch.no_grad():
        assert torch.equal(router(x, torch.tensor(100)).sample, base_unet(x, torch.tensor(100)).sample)
        assert torch.equal(router(x, torch.tensor(300)).sample, member(x, torch.tensor(300)).sample)
        assert torch.equal(router(x, torch.tensor(900)).sample, base_unet(x, torch.tensor(900)).sample)


@pytest.mark.slow
def test_cli_ensemble_scored_by_evaluate_model_and_cli_merge_and_search_on_domain_fid(run, tmp_path, monkeypatch):
    """merge_deme.py as a program (the ensemble, scored), evaluate_model.py on its output and the search,
    in process: a process start costs seconds of imports, and both scripts run as programs elsewhere
    (tests/test_evaluate_model.py; merge_deme.py with --weights / --ensemble / --search in the DeMe
    benchmark's quick run). The weighted merge is test_cli_merges_and_refuses_in_one_line's."""
    import importlib.util

    cache = {"DIFFUSERS_ANT_CACHE": str(run["root"] / "cache")}
    scoring = ["--dataset_name", "digits", "--num_samples", "8", "--num_inference_steps", "2", "--batch_size", "8",
               "--kid_subsets", "2", "--num_threads", "1"]
    ensemble = _cli("--base", run["base"], "--finetuned", *run["finetunes"], "--output_dir", tmp_path / "ens",
                    "--ensemble", *scoring, env_extra=cache)
    assert ensemble.returncode == 0, ensemble.stderr[-2000:]
    assert json.loads((tmp_path / "ens" / "deme_merge.json").read_text())["scores"]["num_fake"] == 8
    assert "| FID |" in (tmp_path / "ens" / "README.md").read_text()

    monkeypatch.setenv("DIFFUSERS_ANT_CACHE", cache["DIFFUSERS_ANT_CACHE"])
    spec = importlib.util.spec_from_file_location("evaluate_model_script", EVALUATE)
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    previous = torch.get_num_threads()  # --num_threads 1 sets this process's threads
    try:
        metrics = tmp_path / "metrics.json"
        assert evaluate.main(["--model", str(tmp_path / "ens"), *map(str, scoring), "--output", str(metrics)]) == 0
        assert json.loads(metrics.read_text())["fid"] > 0
        assert _script().main(["--base", run["base"], "--finetuned", *run["finetunes"][:2], "--output_dir",
                               str(tmp_path / "searched"), "--search", "grid", "--search_values", "0", "1",
                               *map(str, scoring)]) == 0
    finally:
        torch.set_num_threads(previous)
    table = json.loads((tmp_path / "searched" / "deme_search.json").read_text())
    assert len(table["rows"]) == 4 and all(row["feature_extractor"] == "domain_digits" for row in table["rows"])
    best = min(table["rows"], key=lambda row: row["score"])
    record = json.loads((tmp_path / "searched" / "deme_merge.json").read_text())
    assert record["weights"] == best["weights"] and record["scores"]["fid"] == best["score"]


# ---------------------------------------------------------------------------- other model types


@pytest.mark.parametrize("model_type", ["dit", "sd", "controlnet"])
def test_other_model_types_merge_lora_and_full_finetunes_and_ensemble(model_type, tmp_path):
    """DiT (pixel), Stable Diffusion (its LoRA in diffusers' format) and ControlNet fine-tunes: one-hot
    merges give each fine-tune back, and the ensemble samples (refused for ControlNet)."""
    options = {"num_channels": 1, "num_classes": 3} if model_type == "dit" else {}
    torch.manual_seed(0)
    base = str(tmp_path / "base")
    get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=16, **options).save(base)
    intervals = TimestepIntervals.equal(1000, 2)
    folders = []
    for index, lora in enumerate((model_type != "controlnet", False)):
        adapter = get_model_adapter(model_type).load(pretrained_model_name_or_path=base)
        if lora:
            adapter.add_lora(rank=2)
        perturb_parameters(adapter.model, 0.05 if lora else 0.01, seed=index, only="lora_" if lora else None)
        add_channel_projection(adapter.model)
        for p in channel_projections(adapter.model).values():
            perturb_parameters(p, 0.05, seed=index + 10)
        folder = str(tmp_path / f"interval-{index}")
        save_adapter_output(adapter, folder, lora=lora)
        _write_records(folder, index, base, model_type=model_type, intervals=intervals)
        folders.append(folder)
    component = {"dit": "transformer", "sd": "unet", "controlnet": "controlnet"}[model_type]

    def state(folder):
        return getattr(load_pipeline(str(folder)), component).state_dict()

    quiet = {"log": lambda *_: None}
    merge_finetunes(base, folders, str(tmp_path / "hot1"), weights=[0, 1], **quiet)
    _assert_states_equal(state(tmp_path / "hot1"), state(folders[1]))
    merge_finetunes(base, folders, str(tmp_path / "hot0"), weights=[1, 0], **quiet)
    merged, first = state(tmp_path / "hot0"), state(folders[0])
    if model_type == "controlnet":
        _assert_states_equal(merged, first)
    else:  # a LoRA fine-tune: its folded weights W + (alpha / r) B A
        from diffusers_ant.deme.finetunes import dense_denoiser

        dense = dense_denoiser(getattr(load_pipeline(folders[0]), component))
        assert not any("lora_" in key for key in merged)
        _assert_states_equal(merged, dense.state_dict())

    if model_type == "controlnet":
        with pytest.raises(ValueError, match="not available for ControlNet"):
            write_ensemble_folder(base, folders, str(tmp_path / "ensemble"), **quiet)
        return
    write_ensemble_folder(base, folders, str(tmp_path / "ensemble"), **quiet)
    pipeline = load_pipeline(str(tmp_path / "ensemble"))
    assert isinstance(getattr(pipeline, component), TimestepRouter)
    call = {"class_labels": [0, 1]} if model_type == "dit" else {"prompt": ["a cat", "a dog"]}
    images = pipeline(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **call).images
    assert images.shape[0] == 2 and images.shape[1:3] == (16, 16)


def test_a_controlnet_lora_is_checked_against_the_bases_controlnet_not_its_unet(tmp_path):
    """A ControlNet run's LoRA adapts the zero convolutions (`controlnet_down_blocks.*`), which a
    StableDiffusionControlNetPipeline base's UNet does not have: it was checked against the UNet and every merge
    of such fine-tunes was refused. It is checked against the base's ControlNet, where a layer it lacks is still
    refused."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from diffusers_ant.deme.lora_merge import LoraFile, LoraModule, check_lora_fits_base

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
    base = tmp_path / "sd-controlnet"
    unet.save_config(base / "unet")
    ControlNetModel.from_unet(unet).save_config(base / "controlnet")
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionControlNetPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "controlnet": ["diffusers", "ControlNetModel"]}))

    def controlnet_lora(stem):
        module = LoraModule(stem, 0, torch.zeros(2, 32, 1, 1), torch.zeros(32, 2, 1, 1), 1.0)
        return LoraFile(str(tmp_path / "interval-0"), "peft", {module.stem: module}, {"": {"r": 2}}, False,
                        {"model_type": "controlnet"})

    check_lora_fits_base([controlnet_lora("controlnet_down_blocks.0")], str(base))
    with pytest.raises(ValueError, match=r"adapts no_such_layer, which --base .*its controlnet a ControlNetModel"):
        check_lora_fits_base([controlnet_lora("no_such_layer")], str(base))
