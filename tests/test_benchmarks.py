"""The benchmarks' statistics and plumbing (issue 10): t intervals over seeds, paired differences,
the rows of the quality benchmark, its summaries and plan, the NTG benchmark's intervals and summary,
and the EMA weights of a checkpoint (the vanilla FID-over-steps curve). No benchmark is run here."""

import json
import os

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from diffusers_ant.analysis.stats import describe_interval, paired_differences, t_interval
from trainer_utils import REPO, train_in_process
from train_scripts_loader import load_script


quality = load_script("benchmark_quality")
ntg_bench = load_script("benchmark_ntg")


# ------------------------------------------------------------------------------------ statistics


def test_t_interval_is_scipys_and_covers_at_its_level():
    values = [1.0, 2.5, 0.5, 3.0, 1.5]
    result = t_interval(values)
    half = scipy_stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / np.sqrt(5)
    assert result["mean"] == pytest.approx(1.7) and result["n"] == 5
    assert (result["low"], result["high"]) == pytest.approx((1.7 - half, 1.7 + half))
    assert result["p_value"] == pytest.approx(scipy_stats.ttest_1samp(values, 0).pvalue)
    # coverage of the true mean over many simulated 5-seed experiments: close to 95%
    rng = np.random.default_rng(0)
    hits = sum(r["low"] <= 2.0 <= r["high"] for r in (t_interval(rng.normal(2.0, 3.0, 5)) for _ in range(2000)))
    assert 0.935 <= hits / 2000 <= 0.965
    assert t_interval([4.0])["low"] is None and t_interval([4.0, 4.0])["low"] is None
    with pytest.raises(ValueError, match="confidence"):
        t_interval(values, confidence=95)


def test_paired_differences_match_seeds_and_remove_the_shared_seed_effect():
    seed_effect = {0: 30.0, 1: 40.0, 2: 50.0, 3: 35.0}
    control = {s: v + 0.1 * s for s, v in seed_effect.items()}
    treatment = {str(s): v - 2.0 + 0.05 * ((-1) ** s) for s, v in seed_effect.items()}  # JSON keys; one seed less below
    del treatment["3"]
    result = paired_differences(treatment, control)
    assert result["seeds"] == [0, 1, 2] and result["n"] == 3
    assert result["differences"] == pytest.approx([-2.0 + 0.05 - 0.0, -2.0 - 0.05 - 0.1, -2.0 + 0.05 - 0.2])
    assert result["high"] < 0  # the paired interval resolves the -2 ...
    unpaired = t_interval([treatment[str(s)] for s in range(3)])
    assert unpaired["high"] - unpaired["low"] > 10 * (result["high"] - result["low"])  # ... the seed spread would not
    assert describe_interval(result).startswith("-2.")


# ------------------------------------------------------------------------------------ quality benchmark


def test_quality_rows_separate_weighting_from_sampling_and_say_which_snr():
    from diffusers_ant.training import parse_args

    rows = quality.METHODS
    assert {"ant_ls", "ant_uw_raw_snr"} <= set(rows)
    for name, row in rows.items():
        flags = row["flags"]
        if name.startswith("ant_"):
            assert flags[flags.index("--timestep_sampling") + 1] == "stratified" and row["sampling"] == "stratified"
            assert ("--raw_snr" in flags) == (row["clusters_on"] == "raw SNR")
        else:
            assert "--timestep_sampling" not in flags and row["sampling"] == "uniform" and row["clusters_on"] == "-"
    assert rows["ant_ls"]["flags"][:2] == ["--mtl_method", "ls"]
    # every row's command line is one train_ant.py accepts
    args = quality.parse_args(["--quick"])
    for name in rows:
        cmd = quality.train_command(args, name, 0, "/tmp/x", "cfg.json")
        parsed = parse_args(cmd[2:])
        assert parsed.mtl_method == rows[name]["flags"][1]
    assert parse_args(quality.train_command(args, "ant_uw_raw_snr", 0, "/tmp/x", "cfg.json")[2:]).raw_snr
    combined = parse_args(quality.train_command(args, "ant_uw_pcgrad_p2", 0, "/tmp/x", "cfg.json")[2:])
    assert combined.mtl_method == "uw+pcgrad" and combined.loss_weighting == "p2"
    on_min_snr = parse_args(quality.train_command(args, "ant_uw_min_snr", 0, "/tmp/x", "cfg.json")[2:])
    assert on_min_snr.mtl_method == "uw" and on_min_snr.loss_weighting == "min_snr" and on_min_snr.snr_gamma == 5
    # the converged recipe: 8x8 and a cool-down (train_ant.py's warmup_stable_decay), checkpoints for every row's curve
    converged = quality.parse_args(["--resolution", "8", "--max_train_steps", "10000", "--decay_from", "6000",
                                    "--decay_steps", "2000", "--curve_every", "1000"])
    assert quality.curve_steps(converged) == list(range(1000, 10000, 1000))
    for name in rows:
        assert quality.has_curve(converged, name)
        parsed = parse_args(quality.train_command(converged, name, 0, "/tmp/x", "cfg.json", 1000)[2:])
        assert parsed.resolution == 8 and parsed.lr_scheduler == "warmup_stable_decay" and parsed.checkpointing_steps == 1000
        assert (parsed.lr_warmup_steps + parsed.lr_stable_steps, parsed.lr_decay_steps) == (6000, 2000)
        assert parsed.lr_min_ratio == pytest.approx(0.05)
    only = quality.parse_args(["--curve_methods", "vanilla"])
    assert quality.has_curve(only, "vanilla") and not quality.has_curve(only, "ant_uw")


def test_quality_defaults_and_quick_mode():
    args = quality.parse_args([])
    assert args.seeds == [0, 1, 2] and args.num_samples == 5000 and args.num_real == 5000
    assert args.curve_methods == list(quality.METHODS)  # a curve for every row (issue 17, item 13)
    assert quality.curve_steps(args) == [250, 500, 750] and args.curve_samples % args.eval_batch_size == 0
    estimate = quality.plan(args)
    assert estimate["runs"] == 3 * len(quality.METHODS)
    # the default benchmark is planned to fit the budget of issue 17 item 14, "about 2.5 hours" on the
    # 2-core CPU (10 rows x 3 seeds, every row's curve: 1.9 h planned)
    assert (estimate["train_seconds"] + estimate["eval_seconds"]) / 3600 <= 2.5
    vanilla_curve_only = quality.plan(quality.parse_args(["--curve_methods", "vanilla"]))
    assert vanilla_curve_only["generated_images"] == estimate["generated_images"] - 9 * 3 * 3 * 1024
    quick = quality.parse_args(["--quick"])
    assert quick.seeds == [0, 1] and quick.max_train_steps == 40 and quality.curve_steps(quick) == [20]
    assert quality.plan(quick)["train_seconds"] < 600


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "at least 2 --seeds"),
    (["--methods", "vanilla,ant_magic"], "unknown method"),
    (["--curve_samples", "1000"], "multiple of --eval_batch_size"),
    (["--num_samples", "0"], "--num_samples must be positive"),
    (["--methods", "vanilla,ant_uw", "--curve_methods", "p2"], "--curve_methods p2: not among --methods"),
    (["--resolution", "6"], "--resolution must be a multiple of 4"),
    (["--decay_from", "1000"], "--decay_from must lie in"),
    (["--min_lr_ratio", "1"], "--min_lr_ratio in [0, 1)"),
    (["--decay_from", "900"], "the cool-down has to finish in the run"),
])
def test_quality_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        quality.parse_args(argv)
    assert message in capsys.readouterr().err


def _fake_results(methods, seeds, shift):
    rng = np.random.default_rng(0)
    seed_effect = {s: rng.normal(40, 8) for s in seeds}
    return {m: {s: {"fid": seed_effect[s] + shift[m] + rng.normal(0, 0.3), "kid_mean": 0.01, "precision": 0.6,
                    "recall": 0.9} for s in seeds} for m in methods}


def test_quality_refuses_a_folder_of_other_settings_and_a_curve_without_its_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "q")
    quality.check_settings(quality.parse_args(["--output_dir", out, "--quick"]))
    quality.check_settings(quality.parse_args(["--output_dir", out, "--quick", "--seeds", "0", "1", "2"]))  # seeds: fine
    with pytest.raises(SystemExit, match="resolution: 16 -> 8"):
        quality.check_settings(quality.parse_args(["--output_dir", out, "--quick", "--resolution", "8"]))
    # a kept run trained without checkpoints (e.g. before its row had a curve) is named, not crashed on
    args = quality.parse_args(["--output_dir", out, "--quick", "--methods", "vanilla,ant_uw"])
    for method in args.methods:
        os.makedirs(os.path.join(out, method, "seed-0"), exist_ok=True)
    with pytest.raises(SystemExit, match="has no checkpoint-20 for vanilla's curve"):
        quality.evaluate_all(args, [(m, 0) for m in args.methods], "ab" * 32)


def test_quality_summary_and_table():
    args = quality.parse_args(["--methods", "vanilla,ant_ls,ant_uw_raw_snr"])
    results = _fake_results(args.methods, args.seeds, {"vanilla": 0.0, "ant_ls": 0.0, "ant_uw_raw_snr": -5.0})
    table, paired = quality.summarise(results)
    assert set(paired) == {"ant_ls", "ant_uw_raw_snr"}
    assert paired["ant_uw_raw_snr"]["fid"]["high"] < 0 < paired["ant_ls"]["fid"]["high"]
    assert paired["ant_ls"]["fid"]["low"] < 0
    curve = {250: {s: {"fid": 60.0 + s} for s in args.seeds}, 1000: {s: {"fid": 40.0 + s} for s in args.seeds}}
    text = quality.markdown(table, paired, quality.summarise_curve(curve), args, "ab" * 32)
    assert "| ANT + UW, raw SNR | raw SNR | stratified |" in text and "| ANT + LS (control) | log-SNR | stratified |" in text
    assert "| vanilla | - | uniform |" in text and "95% CI" in text and "| 250 | 61.00 ± 1.00 |" in text
    assert "abababababab" in text and "too few to judge a plateau" in text  # two points: the rule cannot pass
    # every row's curve; vanilla's mean curve decides the plateau (pretrain_base.py's rule)
    flat = {step: {s: {"fid": (30.0 if step < 500 else 20.0) + s} for s in args.seeds} for step in range(100, 1001, 100)}
    falling = {step: {s: {"fid": 100.0 - step / 20 + s} for s in args.seeds} for step in range(100, 1001, 100)}
    summaries = {"vanilla": quality.summarise_curve(flat), "ant_uw_raw_snr": quality.summarise_curve(falling)}
    assert quality.vanilla_plateau(summaries, 0.02) == 700
    text = quality.markdown(table, paired, summaries, args, "ab" * 32)
    assert "| step | vanilla | ANT + UW, raw SNR |" in text and "| 1000 | 21.00 ± 1.00 | 51.00 ± 1.00 |" in text
    assert "**plateau at step 700**" in text
    text = quality.markdown(table, paired, {"vanilla": summaries["ant_uw_raw_snr"]}, args, "ab" * 32)
    assert "**no plateau by step 1000**" in text  # ten points, still falling
    # the other pairs: only those whose two rows ran, each paired by seed
    pairs = quality.other_pairs(results)
    assert pairs == {}  # vanilla, ant_ls and ant_uw_raw_snr ran: no pair has both its rows
    results = _fake_results(["vanilla", "min_snr", "ant_uw_min_snr", "ant_ls", "ant_uw"], args.seeds,
                            {"vanilla": 0.0, "min_snr": -3.0, "ant_uw_min_snr": -3.0, "ant_ls": 0.0, "ant_uw": -4.0})
    pairs = quality.other_pairs(results)
    assert list(pairs) == [("ant_uw", "ant_ls"), ("ant_uw", "min_snr"), ("ant_uw_min_snr", "min_snr")]
    assert pairs[("ant_uw", "ant_ls")]["high"] < 0 and pairs[("ant_uw", "min_snr")]["mean"] == pytest.approx(-1.0, abs=1.0)
    assert pairs[("ant_uw_min_snr", "min_snr")]["low"] < 0 < pairs[("ant_uw_min_snr", "min_snr")]["high"]
    assert pairs[("ant_uw", "ant_ls")]["mean"] == pytest.approx(-4.0, abs=1.0)
    text = quality.markdown(table, paired, {}, args, "ab" * 32, pairs)
    assert "| ANT + UW - ANT + LS (control) | -" in text and "| ANT + UW, Min-SNR (gamma 5) - Min-SNR (gamma 5) |" in text


# ------------------------------------------------------------------------------------ NTG benchmark


def test_ntg_benchmark_intervals_and_summary(tmp_path):
    assert ntg_bench.equal_intervals(5) == [(0, 199), (200, 399), (400, 599), (600, 799), (800, 999)]
    assert ntg_bench.equal_intervals(3) == [(0, 332), (333, 666), (667, 999)]
    intervals = ntg_bench.equal_intervals(2)
    per_seed = {s: {"base": {"fid": 10.0 + s}, "intervals": [{"ntg": -1.0 + 0.1 * s, "fid": 9.0}, {"ntg": 0.2 * (s - 1), "fid": 10.0}]}
                for s in range(3)}
    summary = ntg_bench.summarise(per_seed, intervals, 0.95)
    first, second = summary["intervals"]
    assert first["gap"]["high"] < 0 and first["gap"]["differences"] == pytest.approx([-1.0, -0.9, -0.8])
    assert second["gap"]["low"] < 0 < second["gap"]["high"]
    args = ntg_bench.parse_args(["--quick"])
    text = ntg_bench.markdown(summary, args, "c" * 64)
    assert "negative transfer" in text and "no gap resolved" in text
    from diffusers_ant.analysis.plots import plot_ntg_summary

    summary["feature_extractor"] = "domain_mnist5k"
    plot_ntg_summary(summary, str(tmp_path / "ntg.png"))
    assert (tmp_path / "ntg.png").stat().st_size > 0
    cmd = ntg_bench.ntg_command(args, 0, ["i0", "i1"], str(tmp_path / "ntg.json"))
    assert cmd[2] == "ntg" and cmd[cmd.index("--num_real") + 1] == "5000"


# ------------------------------------------------------------------------------------ checkpoint EMA


def test_checkpoint_ema_weights_are_the_ema_not_the_raw_weights(tmp_path):
    from diffusers_ant.analysis.common import checkpoint_ema_state_dict, load_state_dict
    from diffusers_ant.models import load_pipeline

    run = str(tmp_path / "run")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_in_process(["--model_config_name_or_path", "tiny", "--dataset_name", "digits", "--resolution", "8",
                          "--train_batch_size", "8", "--max_train_samples", "64", "--max_train_steps", "3",
                          "--checkpointing_steps", "2", "--use_ema", "--learning_rate", "1e-2", "--report_to", "none",
                          "--num_validation_images", "1", "--num_inference_steps", "1", "--output_dir", run, "--seed", "0"])
    finally:
        torch.set_num_threads(previous)
    unet = load_pipeline(run).unet
    checkpoint = os.path.join(run, "checkpoint-2")
    ema = checkpoint_ema_state_dict(checkpoint, unet)
    raw = load_state_dict(checkpoint)
    assert set(ema) == set(unet.state_dict())
    unet.load_state_dict(ema)  # loads
    # at step 2 the EMA (warm-up decay 0.41) lags the raw weights, and differs from the final EMA
    name = next(n for n, p in unet.named_parameters() if p.ndim == 4)
    assert not torch.equal(ema[name], raw[name])
    final = load_pipeline(run).unet.state_dict()[name]
    assert not torch.equal(ema[name], final)
    with open(os.path.join(checkpoint, "trainer_state_0.json")) as f:
        assert "shadow_params" in json.dumps(json.load(f))


# ------------------------------------------------------------------------------------ the converged base


def test_pretrain_base_plateau_rule_and_its_training_command():
    from diffusers_ant.training import parse_args

    base = load_script("pretrain_base")
    # still falling by more than 2% over the last fifth: no plateau; then flat within 2%: plateau
    falling = {500: 100.0, 1000: 60.0, 1500: 45.0, 2000: 40.0, 2500: 37.0}
    assert base.plateau_step(falling, 0.02, 5) is None
    flat = {**falling, 3000: 36.6, 3500: 36.5, 4000: 36.4}
    # at 3000 the fifth starts at 2000 (40.0 -> 36.6: 8.5%); at 3500 at 2500 (37.0 -> 36.6 / 36.5: < 2%)
    assert base.plateau_step(flat, 0.02, 5) == 3500
    assert base.plateau_step(flat, 0.02, 8) == 4000  # not before min_points points
    rising = {**falling, 3000: 39.0, 3500: 41.0}  # rising again by more than 2% is no plateau either
    assert base.plateau_step(rising, 0.02, 5) is None
    # flat but scattered by 3% from point to point (a 1,000-sample FID): every fifth holds a point 2.7%
    # or more from its start, yet the line through it is flat: a plateau at 3500 (37.0, 36.0, 37.1)
    scattered = {**falling, 3000: 36.0, 3500: 37.1, 4000: 36.0, 4500: 37.1, 5000: 36.0, 5500: 37.1}
    assert base.plateau_step(scattered, 0.02, 5) == 3500
    # the measured 16x16 curve of the bench UNet (docs/benchmark_base): still falling at 20,000 steps
    with open(os.path.join(REPO, "docs", "benchmark_base", "curve.json"), encoding="utf-8") as f:
        measured = {int(k): v for k, v in json.load(f)["points"].items()}
    assert max(measured) == 20000 and base.plateau_step(measured, 0.02, 5) is None

    args = base.parse_args(["--output_dir", "/tmp/x"])
    assert (args.tolerance, args.segment_steps, args.eval_samples) == (0.02, 500, 1000)
    cmd = base.train_command(args, "/tmp/x/run", "cfg.json", 1500)
    parsed = parse_args(cmd[2:])
    assert parsed.max_train_steps == 1500 and parsed.checkpointing_steps == 500
    assert parsed.resume_from_checkpoint == "latest" and parsed.use_ema and parsed.mtl_method == "none"
    assert parsed.resolution == 16 and base.eval_settings(args)["resolution"] == 16
    small = base.parse_args(["--output_dir", "/tmp/x", "--resolution", "8"])  # trained and scored at 8x8
    assert parse_args(base.train_command(small, "/tmp/x/run", "cfg.json", 500)[2:]).resolution == 8
    assert base.eval_settings(small)["resolution"] == 8
    with pytest.raises(SystemExit):
        base.parse_args(["--output_dir", "/tmp/x", "--resolution", "6"])
    assert parsed.lr_scheduler == "constant_with_warmup"


def test_pretrain_base_cool_down_branches_off_the_constant_rate_search(tmp_path, capsys):
    """--decay_from S: train_ant.py's warmup_stable_decay with the cool-down starting at S, so the steps
    before S are the constant-rate search's (its folder is continued); a cool-down that would change
    steps already trained and scored is refused in one line."""
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.checkpoint import schedule_difference

    base = load_script("pretrain_base")
    args = base.parse_args(["--output_dir", str(tmp_path), "--decay_from", "3000", "--decay_steps", "1000"])
    parsed = parse_args(base.train_command(args, "run", "cfg.json", 4000)[2:])
    assert (parsed.lr_scheduler, parsed.lr_warmup_steps, parsed.lr_stable_steps, parsed.lr_decay_steps,
            parsed.lr_min_ratio) == ("warmup_stable_decay", 100, 2900, 1000, 0.05)
    constant = base.schedule(base.parse_args(["--output_dir", str(tmp_path)]))
    assert schedule_difference(constant, base.schedule(args), 3001) is None
    assert schedule_difference(constant, base.schedule(args), 3002) == 3001

    # a search scored to step 3500 at a constant rate: a cool-down from 3000 would rewrite its past
    with open(tmp_path / "curve.json", "w") as f:
        json.dump({"settings": base.eval_settings(args), "points": {"3000": 5.0, "3500": 4.9}}, f)
    assert base.main(["--output_dir", str(tmp_path), "--decay_from", "3000", "--decay_steps", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changes the learning rate from step 3001" in err and "--decay_from" in err


def test_pretrain_base_refuses_to_continue_a_folder_trained_with_other_settings(tmp_path, capsys):
    """curve.json recorded the evaluation and the schedule only: a rerun with another --seed, --learning_rate or
    batch size into a finished folder printed that folder's base as its own (exit 0, in seconds)."""
    base = load_script("pretrain_base")
    args = base.parse_args(["--output_dir", str(tmp_path), "--quick"])
    with open(tmp_path / "curve.json", "w") as f:
        json.dump({"settings": base.eval_settings(args), "schedule": base.schedule(args),
                   "training": base.training_settings(args), "points": {"5": 9.0, "10": 8.0}}, f)
    assert base.main(["--output_dir", str(tmp_path), "--quick", "--seed", "7", "--learning_rate", "1e-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained with other settings" in err
    assert f"--seed {args.seed} -> 7" in err and f"--learning_rate {args.learning_rate} -> 1e-05" in err


@pytest.mark.parametrize("flags, message", [(["--train_batch_size", "0"], "--train_batch_size must be at least 1"),
                                            (["--learning_rate", "-1"], "--learning_rate must be positive"),
                                            (["--num_real", "6000"], "has 5,000 images, give at most 5000")])
def test_pretrain_base_refuses_flags_its_runs_would_fail_on_in_one_line(flags, message, tmp_path, capsys):
    """(a RunFailed traceback once the first segment's train_ant.py run failed; --num_real only at its scoring)"""
    base = load_script("pretrain_base")
    with pytest.raises(SystemExit) as exit_info:
        base.parse_args(["--output_dir", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0]


def test_pretrain_base_refuses_an_output_dir_that_is_a_file_in_one_line(tmp_path, capsys):
    """(a FileExistsError traceback from os.makedirs before)"""
    base = load_script("pretrain_base")
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        base.main(["--output_dir", str(tmp_path / "afile")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output_dir" in err and "is a file, not a folder" in err


def test_the_committed_converged_base_is_the_plateau_of_its_committed_curve():
    """docs/benchmark_base/r8: the plateau rule, re-applied to the committed curve, finds the step the
    run reported, and the committed base pipeline is the 8x8 greyscale bench UNet of that step."""
    base = load_script("pretrain_base")
    folder = os.path.join(REPO, "docs", "benchmark_base", "r8")
    with open(os.path.join(folder, "curve.json"), encoding="utf-8") as f:
        saved = json.load(f)
    curve = {int(k): v for k, v in saved["points"].items()}
    assert base.plateau_step(curve, saved["tolerance"], saved["min_points"]) == saved["plateau_step"] == 55000
    assert base.plateau_step({k: v for k, v in curve.items() if k < 55000}, 0.02, 5) is None
    assert saved["schedule"]["lr_scheduler"] == "warmup_stable_decay" and saved["schedule"]["lr_stable_steps"] == 29900
    with open(os.path.join(folder, "base", "unet", "config.json"), encoding="utf-8") as f:
        unet = json.load(f)
    assert (unet["sample_size"], unet["in_channels"]) == (8, 1)
    with open(os.path.join(folder, "base", "training_config.json"), encoding="utf-8") as f:
        assert json.load(f)["max_train_steps"] == 55000


@pytest.mark.parametrize("script", ["benchmark_quality", "benchmark_transfer", "benchmark_deme"])
@pytest.mark.parametrize("stop", ["failed run", "error exit", "interrupt", "interrupt after finishing"])
def test_an_invocation_that_stops_early_is_recorded_once(script, stop, tmp_path, monkeypatch):
    """A resumed benchmark's wall time sums invocations.json: an invocation that stopped on a failed run
    (one line that says how to resume), on an error exit or on Ctrl-C must be in it too, named by its
    own command, and one that recorded itself as finished is not recorded again."""
    from diffusers_ant.analysis.benchmark import RunFailed

    bench = load_script(script)
    out = str(tmp_path / "out")

    def stopping(args, invocation):
        if stop == "interrupt after finishing":
            invocation.finished(1.0)
        if stop.startswith("interrupt"):
            raise KeyboardInterrupt
        if stop == "error exit":
            raise SystemExit("benchmark: error: a checkpoint is missing")
        raise RunFailed("vanilla seed 0 failed (exit code 1): see x/train.log")

    monkeypatch.setattr(bench, "run", stopping)
    expected = {"failed run": SystemExit, "error exit": SystemExit}.get(stop, KeyboardInterrupt)
    with pytest.raises(expected) as info:
        bench.main(["--quick", "--output_dir", out])
    if stop == "failed run":
        assert str(info.value).startswith(f"{script}.py: error: vanilla seed 0 failed")
        assert str(info.value).endswith("see x/train.log; fix it and run the same command again to resume")
    with open(os.path.join(out, "invocations.json")) as f:
        history = json.load(f)
    status = {"interrupt": "interrupted", "interrupt after finishing": "finished"}.get(stop, "stopped")
    assert [entry["status"] for entry in history] == [status]
    # the command names this script, also when main() is called from another program
    assert history[0]["command"] == " ".join(["python", os.path.relpath(bench.__file__), "--quick", "--output_dir", out])
    # and the code that ran: this checkout's commit (a kept run's results depend on it; its settings do not say)
    import subprocess

    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert history[0]["revision"].split("+")[0] == head and len(head) == 40


def test_write_json_is_atomic_and_takes_a_default_for_other_types(tmp_path):
    """The benchmarks' results files (quality, DeMe, NTG) go through write_json: the file appears whole
    or not at all (a temporary, then a rename), and DeMe's `default=str` for values JSON has no type for."""
    import pathlib

    from diffusers_ant.analysis.benchmark import write_json

    path = tmp_path / "deep" / "results.json"
    write_json(str(path), {"folder": pathlib.PurePosixPath("a/b"), "n": 1}, default=str)
    assert json.loads(path.read_text()) == {"folder": "a/b", "n": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temporary left
    with pytest.raises(TypeError):
        write_json(str(path), {"folder": pathlib.PurePosixPath("a/b")})  # no default: refused...
    assert json.loads(path.read_text()) == {"folder": "a/b", "n": 1}  # ...and the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_ntg_benchmark_trains_with_the_recipe_of_its_base_and_refuses_another(tmp_path, capsys):
    """benchmark_ntg.py takes the quality benchmark's recipe flags (the 8x8 compressed schedule) into its
    training commands, and refuses a --base_dir whose quality run recorded another recipe."""
    args = ntg_bench.parse_args(["--output_dir", str(tmp_path / "ntg"), "--resolution", "8", "--max_train_steps", "4000",
                                 "--decay_from", "2000", "--decay_steps", "1000", "--min_lr_ratio", "0.05"])
    cmd = ntg_bench.quality.train_command(args, "vanilla", 0, str(tmp_path / "run"), "unet.json")
    assert cmd[cmd.index("--resolution") + 1] == "8"
    assert cmd[cmd.index("--lr_scheduler") + 1] == "warmup_stable_decay"
    text = ntg_bench.markdown({"intervals": [], "base_fid": {"mean": 1.0, "sd": 0.0, "n": 2}}, args, "c" * 64)
    assert "at 8x8" in text and "constant to step 2000" in text
    # a base from a quality run with another recipe
    quality_dir = tmp_path / "quality"
    (quality_dir / "vanilla").mkdir(parents=True)
    (quality_dir / "benchmark_settings.json").write_text(json.dumps({**ntg_bench.quality.training_settings(args), "resolution": 16}))
    args.base_dir = str(quality_dir / "vanilla")
    with pytest.raises(SystemExit, match="--resolution 16 there, 8 here"):
        ntg_bench.check_training_settings(args)
    (quality_dir / "benchmark_settings.json").write_text(json.dumps(ntg_bench.quality.training_settings(args)))
    ntg_bench.check_training_settings(args)  # the same recipe: accepted
    with pytest.raises(SystemExit):  # bad schedule flags: one line
        ntg_bench.parse_args(["--decay_from", "900", "--decay_steps", "500"])
    assert "--decay_from + --decay_steps" in capsys.readouterr().err


def test_ntg_benchmark_from_a_pretrained_model_fine_tunes_every_model_from_it(tmp_path, capsys):
    """--pretrained: the base and the interval models all start from the given model (issue 17, item 10:
    the converged base), at its resolution; kept runs from another pretrained model are refused."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.join(root, "docs", "benchmark_base", "r8", "base")
    out = str(tmp_path / "ntg")
    args = ntg_bench.parse_args(["--output_dir", out, "--pretrained", base, "--learning_rate", "1e-4"])
    assert args.resolution == 8  # the committed converged base is 8x8; the default recipe is 16x16
    cmd = ntg_bench.train_command(args, 0, str(tmp_path / "run"), "unet.json")
    assert cmd[cmd.index("--pretrained_model_name_or_path") + 1] == base
    assert "--model_config_name_or_path" not in cmd and cmd[cmd.index("--resolution") + 1] == "8"
    assert ntg_bench.plan(args)["runs"] == 3 * 6  # the all-timestep base is trained here too, per seed
    text = ntg_bench.markdown({"intervals": [], "base_fid": {"mean": 1.0, "sd": 0.0, "n": 3}}, args, "c" * 64)
    assert f"fine-tuned 1000 steps from {base}" in text and "learning rate 0.0001" in text
    ntg_bench.check_training_settings(args)  # records the settings, pretrained model included
    same = ntg_bench.parse_args(["--output_dir", out, "--pretrained", os.path.join(base, "..", "base"),
                                  "--learning_rate", "1e-4"])
    ntg_bench.check_training_settings(same)  # the same folder by another path: accepted
    no_pretrained = ntg_bench.parse_args(["--output_dir", out, "--resolution", "8", "--learning_rate", "1e-4"])
    with pytest.raises(SystemExit, match="pretrained"):  # the kept runs started from the pretrained model
        ntg_bench.check_training_settings(no_pretrained)
    for argv, message in ((["--pretrained", base, "--base_dir", "x"], "leave out --base_dir"),
                          (["--pretrained", base, "--resolution", "16"], "is 8x8; leave --resolution out"),
                          (["--pretrained", str(tmp_path)], "no pipeline folder there")):
        with pytest.raises(SystemExit):
            ntg_bench.parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_failed_run_of_the_ntg_benchmark_ends_in_one_line_that_says_how_to_resume(tmp_path, monkeypatch):
    """A training or evaluation run that fails (its log says why) ended the benchmark in a traceback; it is one
    line naming the log, as the quality benchmark's, and the same command resumes."""
    from diffusers_ant.analysis.benchmark import RunFailed

    def failed(cmd, run_dir, what):
        raise RunFailed(f"{what} failed: see {run_dir}/train.log")

    monkeypatch.setattr(ntg_bench.quality, "train_run", failed)
    with pytest.raises(SystemExit) as stop:
        ntg_bench.main(["--output_dir", str(tmp_path / "ntg"), "--quick", "--workers", "1"])
    message = str(stop.value.code)
    assert "\n" not in message and "train.log" in message and "run the same command again to resume" in message


def test_the_ntg_results_name_the_command_that_made_them(tmp_path, monkeypatch):
    """results.md held the tables alone, and results.json a list for `command` when main was given argv: both
    now carry the command line, as the other benchmarks' do."""
    monkeypatch.setattr(ntg_bench.quality, "train_run", lambda cmd, run_dir, what: "kept")
    monkeypatch.setattr(ntg_bench, "evaluate_seed", lambda args, seed, intervals, sha: {
        "base": {"fid": 1.0 + seed}, "intervals": [{"ntg": -0.1 * (i + 1), "fid": 0.9} for i in range(len(intervals))]})
    monkeypatch.setattr(ntg_bench.quality, "run_parallel", lambda fn, items, workers: [fn(item) for item in items])
    import diffusers_ant.analysis.plots as plots

    monkeypatch.setattr(plots, "plot_ntg_summary", lambda summary, path: None)
    out = str(tmp_path / "ntg")
    ntg_bench.main(["--output_dir", out, "--quick", "--workers", "1"])
    command = f"python {os.path.relpath(ntg_bench.__file__)} --output_dir {out} --quick --workers 1"
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["command"] == command
    with open(os.path.join(out, "results.md")) as f:
        assert f.readline().strip() == f"Command: `{command}`"


def test_benchmarks_refuse_kept_runs_of_other_weights_under_the_same_pretrained_path(tmp_path):
    """--pretrained was compared by path only: a base retrained into the same folder had the kept runs of the
    old one reused and described as the new one's. Its safetensors are now hashed into the settings."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = tmp_path / "base"
    shutil.copytree(os.path.join(root, "docs", "benchmark_base", "r8", "base"), base)
    out = str(tmp_path / "ntg")
    args = ntg_bench.parse_args(["--output_dir", out, "--pretrained", str(base), "--learning_rate", "1e-4"])
    ntg_bench.check_training_settings(args)
    ntg_bench.check_training_settings(args)  # the same weights: accepted
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.bias"] = tensors["conv_in.bias"] + 1
    save_file(tensors, weights)
    with pytest.raises(SystemExit, match="pretrained_weights"):
        ntg_bench.check_training_settings(args)
