"""DeMe's benchmark (issue 12, item 5): every row's command line is one the scripts accept, equal total
steps, disjoint search / evaluation references, the plan, the tables and the target check on
constructed results, resumable runs. The benchmark itself runs only in the slow test (`--quick`)."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusers_ant.analysis.benchmark import RunFailed
from trainer_utils import REPO
from train_scripts_loader import load_script


bench = load_script("benchmark_deme")
train_deme = load_script("train_deme")
merge_deme = load_script("merge_deme")


@pytest.fixture
def pretrained(tmp_path):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return str(folder)


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


# ------------------------------------------------------------------------------------ command lines


def test_every_training_row_parses_with_train_ant_at_equal_total_steps(pretrained, tmp_path):
    from diffusers_ant.training import parse_args

    args = bench.parse_args(["--pretrained", pretrained, "--output_dir", str(tmp_path / "out")])
    assert args.num_intervals == 4 and args.seeds == [0, 1, 2] and args.ablation_seeds == [0]
    total = args.num_intervals * args.interval_steps
    for method in args.continued:
        cmd = bench.continued_command(args, method, 1)
        parsed = parse_args(cmd[2:])
        assert parsed.pretrained_model_name_or_path == pretrained and parsed.max_train_steps == total
        assert parsed.mtl_method == bench.METHODS[method]["flags"][1] and parsed.seed == 1
        assert parsed.deme_interval is None and parsed.use_ema
        # the same optimiser as the DeMe arms (which would otherwise take the authors' AdamW by default)
        assert (parsed.adam_beta1, parsed.adam_weight_decay) == (0.95, 1e-6)
    assert parse_args(bench.continued_command(args, "min_snr", 0)[2:]).loss_weighting == "min_snr"
    assert parse_args(bench.continued_command(args, "ant_nash", 0)[2:]).timestep_sampling == "stratified"
    # DeMe: train_deme.py accepts the command, and each interval run it starts parses with train_ant.py
    seen = set()
    for config, seed in bench.deme_trainings(args):
        cmd = bench.deme_command(args, config, seed)
        own, trainer_args = train_deme.split_argv(cmd[2:])
        parser = train_deme.build_parser()
        deme_args = parser.parse_args(own)
        train_deme.check(parser, deme_args, trainer_args)  # no reserved flag among the trainer's
        assert deme_args.no_merge and deme_args.num_intervals == 4
        for i in range(args.num_intervals):
            parsed = parse_args(train_deme.interval_command(deme_args, trainer_args, i)[2:])
            assert parsed.deme_interval == i and parsed.num_clusters == 4 and parsed.clustering == "timestep"
            assert parsed.max_train_steps == args.interval_steps and parsed.seed == seed
            assert parsed.deme_global_prob == pytest.approx(0.3) and parsed.deme_sampling == "per_batch"
            assert parsed.consistency_weight == (0.0 if config == "deme_prob" else 1.0)
            assert parsed.channel_projection == (config == "deme")
            assert (parsed.adam_beta1, parsed.adam_weight_decay) == (0.95, 1e-6)
        seen.add(config)
    assert seen == {"deme", "deme_prob", "deme_consistency"}
    assert args.num_intervals * parse_args(train_deme.interval_command(deme_args, trainer_args, 0)[2:]).max_train_steps == total
    # equal steps per model: continued vanilla for the S steps of one DeMe copy
    parsed = parse_args(bench.per_model_command(args, 2)[2:])
    assert parsed.max_train_steps == args.interval_steps and parsed.mtl_method == "none" and parsed.seed == 2
    assert parsed.loss_weighting == parse_args(bench.continued_command(args, "vanilla", 2)[2:]).loss_weighting
    # the plateau probe trains exactly the first seed's DeMe interval runs (the flags train_deme.py gives
    # them), in segments that continue the last checkpoint: only the stopping step and checkpointing differ
    cmd = bench.deme_command(args, "deme", args.seeds[0])
    own, trainer_args = train_deme.split_argv(cmd[2:])
    deme_args = train_deme.build_parser().parse_args(own)
    assert bench.probe_points(args) == list(range(25, 251, 25))
    for i in range(args.num_intervals):
        straight = vars(parse_args(train_deme.interval_command(deme_args, trainer_args, i)[2:]))
        segment = vars(parse_args(bench.probe_command(args, i, 75)[2:]))
        assert segment["max_train_steps"] == 75 and segment["checkpointing_steps"] == 25
        assert segment["resume_from_checkpoint"] == "latest" and segment["checkpoints_total_limit"] == 2
        differing = {k for k in straight if straight[k] != segment[k]}
        assert differing == {"max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "output_dir"}
    # the model pretrained here when no --pretrained is given
    own = bench.parse_args(["--output_dir", str(tmp_path / "out2")])
    parsed = parse_args(bench.pretrain_command(own, "cfg.json")[2:])
    assert parsed.max_train_steps == 2000 and parsed.model_config_name_or_path == "cfg.json"
    assert parsed.output_dir == os.path.join(str(tmp_path / "out2"), "pretrained")


def test_merge_rows_parse_and_the_search_uses_its_own_reference_and_noise(pretrained, tmp_path):
    args = bench.parse_args(["--pretrained", pretrained, "--output_dir", str(tmp_path / "out")])
    jobs = bench.merge_jobs(args)
    assert sorted(k for c, s, k in jobs if c == "deme") == sorted(["merged_searched", "merged_equal", "ensemble"] * 3)
    assert {(c, s) for c, s, k in jobs if c != "deme"} == {("deme_prob", 0), ("deme_consistency", 0)}
    parser = merge_deme.build_parser()
    for config, seed, kind in jobs:
        parsed = parser.parse_args(bench.merge_command(args, config, seed, kind)[2:])
        assert parsed.base == pretrained and parsed.finetuned == bench.interval_dirs(args, config, seed)
        if kind == "ensemble":
            assert parsed.ensemble and parsed.weights is None and parsed.search is None
        elif kind == "merged_equal":
            assert parsed.weights == [0.25] * 4 and parsed.dataset_name is None and parsed.train_data_dir is None
        else:
            assert parsed.search == "coordinate" and parsed.search_values == [0, 0.1, 0.2, 0.5, 1]  # the authors'
            assert parsed.train_data_dir == bench.reference_dir(args, "search") != bench.reference_dir(args, "eval")
            assert parsed.num_real == 1000 and parsed.num_samples >= 1000 and parsed.feature_extractor == "mnist5k"
            assert parsed.seed == seed + bench.SEARCH_SEED_OFFSET  # other noise than the evaluation's (seed)
    settings = bench.eval_settings(args)
    assert settings["reference_dir"].endswith(os.path.join("references", "eval")) and settings["num_real"] == 4000
    rows = bench.evaluated_rows(args)
    assert len(rows) == 3 * 9 + 2 and ("pretrained", 2, pretrained) in rows


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "at least 2 --seeds"),
    (["--continued", "min_snr,ant_uw"], "must include vanilla"),
    (["--continued", "vanilla,p9"], "unknown --continued"),
    (["--ablation_seeds", "7"], "--ablation_seeds must be among --seeds"),
    (["--search_real", "5000"], "--search_real must be in"),
    (["--num_intervals", "1"], "at least 2"),
    (["--pretrained", "/nonexistent/model"], "no pipeline folder there"),
    (["--search_values", "0", "0"], "distinct"),
    (["--interval_steps", "5", "--probe_points", "6"], "--probe_points must lie in 0..--interval_steps"),
    (["--plateau_tolerance", "2"], "--plateau_tolerance must lie in (0, 1)"),
    (["--lr_scheduler", "cosine"], "--probe_points trains each interval in segments of one run"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ plan


def test_plan_fits_the_budget_and_counts_the_search():
    from diffusers_ant.deme.search import search_merge_weights

    args = bench.parse_args([])
    estimate = bench.plan(args)
    # the default benchmark is planned within 2.5 hours on the idle 2-core CPU (issue 17's budget)
    assert 45 * 60 <= estimate["total_seconds"] <= 150 * 60
    assert estimate["pretrain_seconds"] > 0 and estimate["searches"] == 5 and estimate["evaluations"] == 29
    # pretraining, continued rows and equal-steps-per-model rows, DeMe and its ladder, the probe's segments
    assert estimate["training_processes"] == 1 + 4 * 3 + 3 + 4 * (3 + 2) + 4 * 10
    assert estimate["probe_points"] == 4 * 10 + 1
    assert bench.plan(bench.parse_args(["--probe_points", "0"]))["total_seconds"] < estimate["total_seconds"]
    text = bench.plan_text(estimate, args)
    assert "pretraining 2000 steps" in text and "1000 steps" in text and "4 x 250" in text
    # the search bound is exact for one round of a coordinate search from 1/N (a flat metric: one round)
    for values in ([0, 0.25, 0.5, 0.75, 1], [0, 0.5, 1]):
        result = search_merge_weights(lambda w: 1.0, 4, strategy="coordinate", values=values, max_rounds=1)
        assert bench.search_evaluations(4, values, 1) == len(result.rows)
    # later rounds can only add points; the bound holds on a metric that moves every round
    result = search_merge_weights(lambda w: sum((a - 0.3) ** 2 * (i + 1) for i, a in enumerate(w)), 4,
                                  strategy="coordinate", values=[0, 0.25, 0.5, 0.75, 1], max_rounds=3)
    assert len(result.rows) <= bench.search_evaluations(4, [0, 0.25, 0.5, 0.75, 1], 3)
    quick = bench.parse_args(["--quick"])
    assert quick.seeds == [0, 1] and quick.num_intervals == 2 and quick.interval_steps == 2
    assert quick.train_batch_size == 16 and quick.num_samples == 32 and quick.search_samples == 16
    given = bench.parse_args(["--quick", "--interval_steps", "7", "--train_batch_size", "64", "--seeds", "3", "4", "5"])
    assert (given.interval_steps, given.train_batch_size, given.seeds) == (7, 64, [3, 4, 5])  # given flags win
    assert bench.plan(quick)["total_seconds"] < 15 * 60


def test_a_given_pretrained_model_skips_pretraining(pretrained):
    args = bench.parse_args(["--pretrained", pretrained])
    assert bench.plan(args)["pretrain_seconds"] == 0 and bench.pretrained_dir(args) == pretrained


# ------------------------------------------------------------------------------------ references


def test_reference_split_is_disjoint_and_the_folder_reads_like_the_dataset(tmp_path):
    from diffusers_ant.analysis.evaluate import real_images
    from diffusers_ant.data import TrainingDataset, load_training_dataset, resolve_columns
    from diffusers_ant.deme.benchmark import split_reference_rows, write_reference_folder

    search, evaluation = split_reference_rows(5000, 1000, seed=0)
    assert len(search) == 1000 and len(evaluation) == 4000
    assert not set(search) & set(evaluation) and set(search) | set(evaluation) == set(range(5000))
    assert split_reference_rows(5000, 1000, seed=0) == (search, evaluation)
    assert search != list(range(1000))  # a random draw, not the first (sorted-by-label) rows
    with pytest.raises(ValueError, match="--search_real"):
        split_reference_rows(5000, 5000)
    # the folder holds the stored images losslessly: read back through the same transforms, the
    # pixels are those of the dataset's rows
    rows = search[:6]
    folder = write_reference_folder("mnist5k", rows, str(tmp_path / "ref"))
    assert sorted(os.listdir(folder)) == sorted([f"row-{r:05d}.png" for r in rows] + ["reference_rows.json"])
    from_folder = real_images(train_data_dir=folder, num_images=6, resolution=16, num_channels=1, seed=0)
    dataset = load_training_dataset(dataset_name="mnist5k")
    data = TrainingDataset(dataset, {"image_column": resolve_columns(dataset)["image_column"]}, 16, num_channels=1, seed=0)
    expected = np.stack([((data[r]["pixel_values"] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() for r in rows])
    got = sorted(from_folder.reshape(6, -1).tolist())
    assert np.array_equal(np.asarray(got), np.asarray(sorted(expected.reshape(6, -1).tolist())))
    # kept when the record matches; rewritten for another split
    stamp = os.path.getmtime(os.path.join(folder, f"row-{rows[0]:05d}.png"))
    write_reference_folder("mnist5k", rows, folder)
    assert os.path.getmtime(os.path.join(folder, f"row-{rows[0]:05d}.png")) == stamp
    write_reference_folder("mnist5k", rows[:2], folder)
    assert len([n for n in os.listdir(folder) if n.endswith(".png")]) == 2


# ------------------------------------------------------------------------------------ runs and settings


def test_run_logged_keeps_finished_runs_and_names_the_log_of_a_failure(tmp_path):
    from diffusers_ant.analysis.benchmark import recorded_seconds, run_logged

    done = tmp_path / "out" / "done.txt"
    log = str(tmp_path / "out" / "run.log")
    cmd = [sys.executable, "-c", f"import os; print('threads', os.environ['OMP_NUM_THREADS']); open({str(done)!r}, 'w').close()"]
    assert run_logged(cmd, log, str(done), "toy").endswith("s")
    assert "threads 1" in open(log).read() and recorded_seconds(log) is not None
    assert run_logged([sys.executable, "-c", "raise SystemExit(3)"], log, str(done), "toy") == "kept"
    with pytest.raises(RunFailed, match="run.log"):
        run_logged([sys.executable, "-c", "raise SystemExit(3)"], log, [str(done), str(tmp_path / "missing")], "toy")
    # the pretraining, alone on the machine, runs with --workers threads
    alone = str(tmp_path / "out" / "alone.log")
    run_logged(cmd, alone, [], "toy", threads=2)
    assert "threads 2" in open(alone).read()


def test_an_evaluation_scores_against_the_evaluation_reference_in_mnist_features(tmp_path):
    """`eval_settings` are all the shared evaluator (`analysis.benchmark.evaluate_saved_model`) needs:
    the evaluation reference folder, its size, MNIST-5k's domain features; the result is stored with
    them and reused only with them."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffusers_ant.analysis.benchmark import evaluate_saved_model, stored_metrics
    from diffusers_ant.analysis.evaluate import resolve_feature_extractor
    from diffusers_ant.deme.benchmark import split_reference_rows, write_reference_folder

    args = bench.parse_args(["--output_dir", str(tmp_path / "out"), "--quick", "--search_real", "4984", "--num_samples", "8",
                             "--num_inference_steps", "2", "--eval_batch_size", "8"])
    _, evaluation = split_reference_rows(5000, args.search_real)
    write_reference_folder(bench.DATASET, evaluation, bench.reference_dir(args, "eval"))
    model = str(tmp_path / "model")
    unet = UNet2DModel(sample_size=bench.RESOLUTION, in_channels=1, out_channels=1, **bench.BENCH_UNET)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(model)
    settings, path = bench.eval_settings(args), bench.metrics_path(args, "pretrained", 0)
    metrics = evaluate_saved_model({"model": model, "seed": 0, "path": path, "settings": settings})
    sha = resolve_feature_extractor("domain", "mnist5k").weights_sha256()
    assert metrics["num_real"] == 16 and metrics["num_fake"] == 8 and metrics["feature_extractor_sha256"] == sha
    assert math.isfinite(metrics["fid"]) and stored_metrics(path, settings, sha) == metrics
    assert stored_metrics(path, dict(settings, num_samples=16), sha) is None
    # a file cut short (a kill mid-write by an older version) is evaluated again, not a traceback on every rerun
    with open(path, "r+", encoding="utf-8") as f:
        f.truncate(len(f.read()) // 2)
    assert stored_metrics(path, settings, sha) is None


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    out = str(tmp_path / "out")
    bench.check_settings(bench.parse_args(["--output_dir", out, "--quick"]))
    bench.check_settings(bench.parse_args(["--output_dir", out, "--quick", "--seeds", "0", "1", "2"]))  # more seeds: fine
    with pytest.raises(SystemExit, match="interval_steps"):
        bench.check_settings(bench.parse_args(["--output_dir", out, "--quick", "--interval_steps", "11"]))


# ------------------------------------------------------------------------------------ summaries


def _results(shift, seeds=(0, 1, 2), noise=0.2):
    rng = np.random.default_rng(0)
    seed_effect = {s: rng.normal(30, 5) for s in seeds}
    return {row: {s: {"fid": seed_effect[s] + d + rng.normal(0, noise), "kid_mean": 0.01, "precision": 0.6,
                      "recall": 0.9} for s in seeds} for row, d in shift.items()}


def test_relative_differences_and_verdict():
    from diffusers_ant.analysis.benchmark import relative_differences, verdict

    result = relative_differences({0: 9.0, 1: 18.0, "2": 27.5}, {"0": 10.0, 1: 20.0, 2: 25.0})
    assert result["differences"] == pytest.approx([-10.0, -10.0, 10.0]) and result["seeds"] == [0, 1, 2]
    assert verdict(result) == "no difference resolved (interval contains 0)"
    assert verdict(relative_differences({0: 9, 1: 18.1, 2: 26.9}, {0: 10, 1: 20, 2: 30})).startswith("lower")
    assert verdict({"mean": 2.0, "low": None, "n": 1}) == "higher on average, no interval (n = 1)"


def test_tables_and_target_check_on_constructed_results(pretrained):
    args = bench.parse_args(["--pretrained", pretrained])
    shift = {"pretrained": 10.0, "continued_vanilla": 0.0, "continued_min_snr": -1.0, "continued_ant_uw": 0.5,
             "continued_ant_nash": 0.2, "per_model_vanilla": 3.0, "deme_ensemble": -2.0, "deme_equal": 1.0,
             "deme_merged": -6.0}
    results = _results(shift)
    results["ablation_deme_prob"] = {0: {"fid": 29.0, "kid_mean": 0.01, "precision": 0.5, "recall": 0.9}}
    results["ablation_deme_consistency"] = {0: {"fid": 28.0, "kid_mean": 0.01, "precision": 0.5, "recall": 0.9}}
    table, paired, relative = bench.summarise(results)
    assert "continued_vanilla" not in paired and paired["deme_merged"]["fid"]["high"] < 0
    assert relative["deme_merged"]["mean"] < 0 and relative["pretrained"]["mean"] > 0
    check = bench.target_check(results, table)
    assert check["met"] and check["vs_continued_vanilla"]["verdict"].startswith("merged FID lower")
    assert check["best_continued"] == "continued_min_snr" and check["vs_best_continued"]["row"] == "continued_min_snr"
    assert check["vs_pretrained"]["fid_relative_percent"]["mean"] < 0
    assert check["vs_per_model"]["row"] == "per_model_vanilla" and check["vs_per_model"]["fid_difference"]["high"] < 0
    rungs = bench.summarise_ladder(args, results)
    assert [r["row"] for r in rungs] == ["continued_vanilla", "ablation_deme_prob", "ablation_deme_consistency", "deme_merged"]
    assert rungs[2]["vs_previous"]["differences"] == pytest.approx([-1.0]) and rungs[2]["vs_previous"]["low"] is None
    assert rungs[1]["fid"]["n"] == 1
    assert rungs[3]["vs_n1"]["differences"] == pytest.approx([results["deme_merged"][0]["fid"] - results["continued_vanilla"][0]["fid"]])
    searches = {"deme": {0: {"weights": [0.0, 0.25, 0.5, 1.0], "search_fid": 20.0, "equal_search_fid": 22.0, "evaluations": 17}}}
    references = {"search": {"num_images": 1000}, "eval": {"num_images": 4000}, "split": "a split"}
    timing = {"wall_seconds": 600.0, "all_invocations_wall_seconds": 900.0, "train_run_seconds": 1200.0,
              "merge_run_seconds": 300.0}
    falling = {0: 30.0, **{25 * k: 30.0 - k for k in range(1, 11)}}  # still falling at step 250
    flat = {0: 30.0, 25: 20.0, **{25 * k: 10.0 for k in range(2, 11)}}
    probe = {0: {"points": falling, "plateau_step": bench.plateau_step(falling, 0.02, 5)},
             1: {"points": flat, "plateau_step": bench.plateau_step(flat, 0.02, 5)},
             2: {"points": flat, "plateau_step": 150},
             3: {"points": {0: 30.0, 125: 20.0, 250: 20.0}, "plateau_step": None, "judgeable": False}}
    assert probe[0]["plateau_step"] is None and probe[1]["plateau_step"] == 150
    text = bench.markdown(args, table, paired, relative, rungs, searches, check, "ab" * 32, references,
                          "python train_scripts/benchmark_deme.py --pretrained x", timing, probe)
    assert "| DeMe merged, searched weights | 4 x 250 |" in text and "| continued fine-tuning, vanilla | 1000 |" in text
    assert "| continued fine-tuning, vanilla, the steps of one DeMe copy | 250 |" in text
    assert "| 0 (t ~ 0-249) | 30.000 | 29.000 |" in text and "| none by step 250 |" in text and "| step 150 |" in text
    assert "| too few points to judge |" in text
    assert "equal steps per model (250)" in text
    assert "(control)" in text and "**met**" in text and "abababababab" in text
    assert "| + channel projection (= DeMe) |" in text and "(no interval)" in text
    assert "| N = 4, + probabilistic sampling (p 0.3) | 29.00 | -" in text  # one seed: no spread shown
    assert "[0, 0.25, 0.5, 1]" in text and "22.000" in text
    assert "Command: `python train_scripts/benchmark_deme.py --pretrained x`" in text and "10.0 min this invocation, 15.0 min over all" in text
    # the other way round: the merged model worse than continued fine-tuning is reported as such
    worse = _results(dict(shift, deme_merged=+4.0))
    table, paired, relative = bench.summarise(worse)
    check = bench.target_check(worse, table)
    assert not check["met"] and check["vs_continued_vanilla"]["verdict"].startswith("merged FID higher")
    text = bench.markdown(args, table, paired, relative, [], {}, check, "ab" * 32, references, "cmd", timing)
    assert "**not met**" in text
    # a search that returned the base is never a win, even when that "merged" model has the lower FID
    returned = {"deme": {0: dict(searches["deme"][0], weights=[0.0] * 4, returned_base=True)}}
    table, paired, relative = bench.summarise(results)
    check = bench.target_check(results, table, searches=returned)
    assert not check["met"] and check["returned_base_seeds"] == [0]
    assert "no fine-tune helped" in check["vs_continued_vanilla"]["verdict"]
    text = bench.markdown(args, table, paired, relative, [], returned, check, "ab" * 32, references, "cmd", timing)
    assert "**not met**" in text and "(the base: no fine-tune helped)" in text


# ------------------------------------------------------------------------------------ the quick run


def check_quick_outputs(out):
    """What a finished `--quick` run must have written (also applied by hand to the smoke run)."""
    with open(os.path.join(out, "results.json")) as f:
        record = json.load(f)
    args = record["args"]
    rows = record["per_run"]
    expected = [r for r in bench.MAIN_ROWS if not r.startswith("continued_") or r[len("continued_"):] in args["continued"]]
    assert "continued_vanilla" in expected and set(rows) >= set(expected)
    for row in expected:
        assert sorted(rows[row]) == sorted(str(s) for s in args["seeds"]), row
        for metrics in rows[row].values():
            assert math.isfinite(metrics["fid"]) and metrics["num_real"] == 5000 - args["search_real"]
    for config in bench.ABLATION_CONFIGS:
        assert sorted(rows[f"ablation_{config}"]) == sorted(str(s) for s in args["ablation_seeds"])
    assert len(record["ablation_ladder"]) == 4
    # the searched weights are the merged folders' weights, searched against the search reference
    for seed, search in record["searches"]["deme"].items():
        folder = bench.merge_dir(argparse_namespace(args), "deme", int(seed), "merged_searched")
        with open(os.path.join(folder, "deme_merge.json")) as f:
            assert json.load(f)["weights"] == search["weights"]
        assert all(w in args["search_values"] for w in search["weights"])
    search_rows = json.load(open(os.path.join(out, "references", "search", "reference_rows.json")))["rows"]
    eval_rows = json.load(open(os.path.join(out, "references", "eval", "reference_rows.json")))["rows"]
    assert not set(search_rows) & set(eval_rows) and len(search_rows) == args["search_real"]
    # the ensemble and the merged model with channel projections were loaded and sampled
    assert os.path.isfile(os.path.join(bench.merge_dir(argparse_namespace(args), "deme", 0, "merged_searched"),
                                       "channel_projection.json"))
    assert "verdict" in record["target_check"]["vs_continued_vanilla"]
    assert "verdict" in record["target_check"]["vs_per_model"]
    # the plateau probe: a curve per interval from the pretrained model (step 0) to S, whose last point is
    # the first seed's DeMe interval fine-tune itself (the segments continue one run exactly)
    namespace = argparse_namespace(args)
    probe = record["plateau_probe"]
    assert sorted(probe) == [str(i) for i in range(args["num_intervals"])]
    for index, curve in probe.items():
        assert sorted(int(k) for k in curve["points"]) == [0, *bench.probe_points(namespace)]
        assert len({v for v in curve["points"].values()}) > 1  # a fine-tune swapped in changes the samples
        probe_model = os.path.join(bench.probe_dir(namespace, int(index)), f"step-{args['interval_steps']}", "unet")
        straight = os.path.join(bench.interval_dirs(namespace, "deme", args["seeds"][0])[int(index)], "unet")
        assert _weights(probe_model) == _weights(straight), index
    text = open(os.path.join(out, "results.md")).read()
    assert "**Target check**" in text and "Command: `" in text and "Wall time" in text
    return record


def _weights(folder):
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return {k: v.tolist() for k, v in tensors.items()}


def argparse_namespace(args_dict):
    import argparse

    return argparse.Namespace(**args_dict)


@pytest.mark.slow
@pytest.mark.benchmark
def test_quick_run_end_to_end(tmp_path):
    out = str(tmp_path / "bench")
    # continued vanilla only: every continued row runs the same machinery (continued_command with the
    # row's flags: test_every_training_row_parses_with_train_ant_at_equal_total_steps), and the suite
    # has to stay within 10 minutes
    bench.main(["--quick", "--output_dir", out, "--continued", "vanilla"])
    check_quick_outputs(out)


def test_the_benchmark_trains_and_scores_at_the_pretrained_models_resolution(pretrained, tmp_path):
    """A converged base from `pretrain_base.py --resolution 8` is 8x8: every run and score of the
    benchmark follows its UNet's sample_size (a folder without a UNet config, the quality benchmark's 16)."""
    from diffusers_ant.training import parse_args

    assert bench.parse_args(["--pretrained", pretrained, "--output_dir", str(tmp_path / "a")]).resolution == 16
    (Path(pretrained) / "unet").mkdir()
    (Path(pretrained) / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    args = bench.parse_args(["--pretrained", pretrained, "--output_dir", str(tmp_path / "b")])
    assert args.resolution == 8
    assert parse_args(bench.continued_command(args, "vanilla", 0)[2:]).resolution == 8
    config, seed = next(iter(bench.deme_trainings(args)))
    assert _flag(bench.deme_command(args, config, seed), "--resolution") == "8"
    assert bench.eval_settings(args)["resolution"] == 8
