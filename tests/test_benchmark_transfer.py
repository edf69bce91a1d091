"""Diff-Tuning's transfer benchmark (issue 11, item 5) and the machinery the benchmarks share: every
row's command line parses with the trainer's parser and differs from its base row only by
Diff-Tuning's flags, the plan fits the budget, the summaries, target checks and tables on constructed
results, the ControlNet convergence reading, the plots, the shared helpers (logged runs, disjoint
image folders, relative differences) and the VAE fit of the tiny SD. The benchmark itself runs only
in the slow test, a reduced --quick run."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from diffusers_ant.analysis.benchmark import RunFailed
from train_scripts_loader import load_script

transfer = load_script("benchmark_transfer")


@pytest.fixture
def layout_dirs(tmp_path):
    """A parsed default benchmark under tmp_path with the folders its commands name made (the trainer's
    parser checks that a pretrained folder and a knowledge bank exist)."""
    args = transfer.parse_args(["--output_dir", str(tmp_path / "bench")])
    layout = transfer.Layout(args)
    for folder in (layout.pretrained, layout.bank, layout.train_images, layout.heldout_images, layout.sd_init,
                   layout.sd, layout.controlnet_init, layout.controlnet_bank):
        os.makedirs(folder, exist_ok=True)
    return args, layout


# ------------------------------------------------------------------------------------ the rows


def _without(cmd, flags_with_values):
    """`cmd` without the given flags and their values (flags_with_values: {flag: number of values})."""
    out, i = [], 0
    while i < len(cmd):
        if cmd[i] in flags_with_values:
            i += 1 + flags_with_values[cmd[i]]
        else:
            out.append(cmd[i])
            i += 1
    return out


def test_every_row_parses_with_train_ant_and_means_what_the_table_says(layout_dirs):
    from diffusers_ant.training import parse_args

    args, layout = layout_dirs
    for method, row in transfer.METHODS.items():
        cmd = transfer.finetune_command(args, layout, method, 1)
        assert cmd[1].endswith("train_ant.py")
        parsed = parse_args(cmd[2:])
        assert parsed.finetune == row["finetune"] and parsed.seed == 1
        assert parsed.pretrained_model_name_or_path == layout.pretrained
        assert parsed.train_data_dir == layout.train_images and parsed.dataset_name is None
        assert parsed.max_train_steps == args.max_train_steps and parsed.use_ema
        assert parsed.learning_rate == (args.learning_rate if row["finetune"] == "full" else args.peft_learning_rate)
        assert parsed.retention == row["retention"] and parsed.diff_tuning == (row["retention"] is not None)
        assert (parsed.knowledge_bank == layout.bank) == (row["retention"] == "bank")
        assert parsed.rank == (args.rank if row["finetune"] == "lora" else None)
        if row["retention"]:
            assert (parsed.bank_fraction, parsed.bank_weight) == (0.2, 0.1)
            assert (parsed.retention_exponent, parsed.reconsolidation_exponent) == (1.0, 1.0)
            # paired rows: the same recipe as the base row but Diff-Tuning's flags (and the output folder)
            diff_tuning = {"--knowledge_bank": 1, "--retention": 1, "--bank_fraction": 1, "--bank_weight": 1,
                           "--retention_exponent": 1, "--reconsolidation_exponent": 1, "--output_dir": 1}
            base = transfer.finetune_command(args, layout, row["base"], 1)
            assert _without(cmd, diff_tuning) == _without(base, diff_tuning)
    for method, row in transfer.CONTROLNET_METHODS.items():
        cmd = transfer.controlnet_command(args, layout, method, 2, threshold=0.61)
        parsed = parse_args(cmd[2:])
        assert parsed.model_type == "controlnet" and parsed.track_convergence and parsed.seed == 2
        assert parsed.convergence_threshold == 0.61 and parsed.convergence_distance == "iou"
        assert parsed.convergence_steps == args.convergence_steps and parsed.num_validation_images == args.convergence_images
        assert parsed.pretrained_model_name_or_path == layout.controlnet_init and not parsed.use_ema
        assert (parsed.knowledge_bank == layout.controlnet_bank) == (row["retention"] == "bank")
    parsed = parse_args(transfer.pretrain_command(args, layout)[2:])
    assert parsed.dataset_name == "mnist5k" and parsed.model_config_name_or_path == layout.unet_config
    assert parsed.max_train_steps == args.pretrain_steps
    parsed = parse_args(transfer.sd_command(args, layout)[2:])
    assert parsed.model_type == "sd" and parsed.dataset_name == "mnist5k_captions" and parsed.proportion_empty_prompts == 0.1


def test_bank_and_forgetting_commands_parse_with_their_scripts(layout_dirs):
    args, layout = layout_dirs
    bank_script = load_script("build_knowledge_bank")
    analyze = load_script("analyze")
    bank = bank_script.build_parser().parse_args(transfer.bank_command(args, layout)[2:])
    assert bank.pretrained_model_name_or_path == layout.pretrained and bank.num_images == args.bank_images
    bank = bank_script.build_parser().parse_args(transfer.controlnet_bank_command(args, layout)[2:])
    assert bank.dataset_name == "mnist5k_captions" and bank.guidance_scale == args.guidance_scale
    cmd = transfer.forgetting_command(args, layout, "diff_tuning", 0)
    parsed = analyze.build_parser().parse_args(cmd[2:])
    assert parsed.command == "forgetting" and parsed.feature_extractor == "animal_mnist"
    assert parsed.train_data_dir == layout.heldout_images and parsed.num_real == args.num_real
    assert parsed.finetuned == layout.run("diff_tuning", 0) and parsed.pretrained == layout.pretrained


# ------------------------------------------------------------------------------------ flags and plan


def test_defaults_plan_and_quick_mode():
    args = transfer.parse_args([])
    assert args.seeds == [0, 1, 2] and args.methods == list(transfer.METHODS) and args.num_train_images == 500
    assert args.forgetting_seeds == [0] and args.forgetting_methods == ["full", "diff_tuning"]
    estimate = transfer.plan(args)
    assert estimate["runs"] == 3 * (len(transfer.METHODS) + len(transfer.CONTROLNET_METHODS))
    # the default benchmark is planned to take about 1.5 hours on the idle 2-core CPU
    assert 0.75 <= estimate["total_seconds"] / 3600 <= 1.6
    assert "fine-tuning and ControlNet runs" in transfer.describe_plan(estimate, args)
    lighter = transfer.plan(transfer.parse_args(["--skip_controlnet"]))
    assert lighter["runs"] == 3 * len(transfer.METHODS) and lighter["total_seconds"] < estimate["total_seconds"]
    one_worker = transfer.plan(transfer.parse_args(["--workers", "1"]))
    assert one_worker["total_seconds"] > 1.8 * estimate["total_seconds"]
    quick = transfer.parse_args(["--quick"])
    assert quick.seeds == [0, 1] and quick.max_train_steps == 4 and quick.fraction_values == [0.0, 0.5, 1.0]
    assert transfer.plan(quick)["total_seconds"] < 600


def test_pretrained_flag_skips_pretraining_and_is_checked(tmp_path):
    from diffusers_ant.models import get_model_adapter

    good, other = tmp_path / "good", tmp_path / "other"
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1).save(str(good))
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(str(other))
    args = transfer.parse_args(["--pretrained", str(good)])
    assert transfer.Layout(args).pretrained == str(good)
    reuse = transfer.plan(transfer.parse_args(["--pretrained", str(good), "--skip_controlnet"]))
    assert reuse["stages"]["pretraining"] == 0 < transfer.plan(transfer.parse_args(["--skip_controlnet"]))["stages"]["pretraining"]
    assert transfer.check_pretrained(str(other)) is None  # an 8x8 base: the benchmark runs at 8x8
    assert "model_index.json" in transfer.check_pretrained(str(tmp_path))


def test_a_folder_trained_with_other_settings_is_refused_before_any_stage(tmp_path, monkeypatch):
    """A stage counts as done when its time file exists, so a second command with other training settings in
    the same folder reported the first one's bank, fine-tunes and scores under its own flags. The folder
    records its settings (benchmark_settings.json) and refuses others in one line, before any stage runs."""

    class Planned(Exception):
        """run() got past the settings check to its plan: stop there (no stage runs in this test)."""

    def plan(args):
        raise Planned

    monkeypatch.setattr(transfer, "plan", plan)
    out = tmp_path / "bench"
    with pytest.raises(Planned):
        transfer.main(["--output_dir", str(out), "--quick"])
    recorded = json.loads((out / "benchmark_settings.json").read_text())
    assert recorded["learning_rate"] == 5e-4 and recorded["pretrained"] is None
    assert "pretrained_weights" in recorded and recorded["pretrained_weights"] is None  # (no --pretrained: no folder)
    with pytest.raises(Planned):  # the same settings: resumed
        transfer.main(["--output_dir", str(out), "--quick"])
    with pytest.raises(SystemExit) as stop:
        transfer.main(["--output_dir", str(out), "--quick", "--learning_rate", "1e-4", "--rank", "8"])
    message = str(stop.value)
    assert "holds runs trained with other settings" in message and "\n" not in message
    assert "learning_rate: 0.0005 -> 0.0001" in message and "rank: " in message
    # the ControlNet runs' convergence checks are settings of their commands too (--quick fixes them at 5, 4, 4)
    assert (recorded["convergence_steps"], recorded["convergence_images"], recorded["convergence_inference_steps"]) \
        == (5, 4, 4)


def test_a_folder_from_before_a_setting_existed_keeps_its_file_and_says_what_is_unchecked(tmp_path, capsys):
    """A settings file written before a setting existed (here the convergence checks') is not compared on that
    setting, and is not rewritten with this command's value either: its kept runs were never checked against
    it. The command says which settings it could not check."""
    from diffusers_ant.analysis.benchmark import check_benchmark_settings

    out = tmp_path / "bench"
    out.mkdir()
    old = {"learning_rate": 5e-4, "rank": 4}
    (out / "benchmark_settings.json").write_text(json.dumps(old))
    check_benchmark_settings(str(out), {**old, "convergence_steps": 5, "convergence_images": 4}, "x.py")
    assert json.loads((out / "benchmark_settings.json").read_text()) == old
    warning = capsys.readouterr().err
    assert "predates convergence_steps, convergence_images" in warning and warning.count("\n") == 1
    # a value the file does record is still compared
    with pytest.raises(SystemExit, match="rank: 4 -> 8"):
        check_benchmark_settings(str(out), {**old, "rank": 8}, "x.py")
    # a new folder records every setting
    check_benchmark_settings(str(tmp_path / "new"), {**old, "convergence_steps": 5}, "x.py")
    assert json.loads((tmp_path / "new" / "benchmark_settings.json").read_text())["convergence_steps"] == 5


def test_pretrained_fingerprint_covers_the_weights_and_not_a_crashed_runs_cache(tmp_path):
    """`--pretrained` is recorded with a sha256 of its safetensors: another weight changes it, the training cache a
    killed run left in the folder (`.training_cache_<process>`) does not."""
    from safetensors.torch import save_file

    from diffusers_ant.analysis.benchmark import folder_weights_sha256

    (tmp_path / "unet").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    before = folder_weights_sha256(str(tmp_path))
    (tmp_path / ".training_cache_0").mkdir()
    save_file({"latents/0": torch.zeros(2)}, str(tmp_path / ".training_cache_0" / "shard-00000.safetensors"))
    assert folder_weights_sha256(str(tmp_path)) == before
    save_file({"w": torch.full((2,), 2.0)}, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = folder_weights_sha256(str(tmp_path))
    assert changed != before
    # the same bytes under another name are another folder
    os.rename(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "unet" / "model.safetensors")
    assert folder_weights_sha256(str(tmp_path)) != changed


def _tiny_pipeline(folder, resolution=8, channels=1):
    """A saved unconditional UNet pipeline of the tiny preset (built from config, never downloaded)."""
    from diffusers_ant.models import get_model_adapter

    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=resolution,
                                   num_channels=channels).save(str(folder))
    return str(folder)


def test_the_unconditional_half_follows_the_pretrained_models_resolution(tmp_path):
    """An 8x8 base (`pretrain_base.py --resolution 8`): fine-tunes, evaluation reference and plan at 8x8;
    the ControlNet half stays at its own 16x16; without --pretrained everything is 16x16 as before."""
    from diffusers_ant.training import parse_args

    eight = _tiny_pipeline(tmp_path / "eight", 8)
    sixteen = _tiny_pipeline(tmp_path / "sixteen", 16)
    args = transfer.parse_args(["--pretrained", eight, "--output_dir", str(tmp_path / "bench")])
    layout = transfer.Layout(args)
    for folder in (layout.bank, layout.train_images, layout.controlnet_init, layout.controlnet_bank):
        os.makedirs(folder, exist_ok=True)
    assert args.resolution == 8
    for method in transfer.METHODS:
        assert parse_args(transfer.finetune_command(args, layout, method, 0)[2:]).resolution == 8
    assert transfer.eval_settings(args, layout)["resolution"] == 8
    cmd = transfer.controlnet_command(args, layout, "controlnet", 0, threshold=0.5)
    assert parse_args(cmd[2:]).resolution == transfer.CONTROLNET_RESOLUTION == 16
    assert "at 8x8" in transfer.describe_plan(transfer.plan(args), args)
    # the planning figures scale with the side: an 8x8 fine-tune is planned cheaper than a 16x16 one
    at_16 = transfer.parse_args(["--pretrained", sixteen, "--skip_controlnet"])
    at_8 = transfer.parse_args(["--pretrained", eight, "--skip_controlnet"])
    assert at_16.resolution == 16
    assert transfer.plan(at_8)["total_seconds"] < transfer.plan(at_16)["total_seconds"]
    default = transfer.parse_args(["--output_dir", str(tmp_path / "default")])
    assert default.resolution == 16 == transfer.RESOLUTION
    assert parse_args(transfer.pretrain_command(default, transfer.Layout(default))[2:]).resolution == 16


@pytest.mark.parametrize("resolution, channels, message", [
    (8, 3, "3 channel(s)"),       # RGB: the benchmark fine-tunes greyscale
    (32, 1, "a 32x32 model"),     # beyond Animal-MNIST's 28x28
    (6, 1, "a 6x6 model"),        # below 8
])
def test_a_pretrained_model_the_benchmark_cannot_use_is_refused_in_one_line(tmp_path, capsys, resolution, channels,
                                                                            message):
    folder = _tiny_pipeline(tmp_path / "model", resolution, channels)
    with pytest.raises(SystemExit):
        transfer.parse_args(["--pretrained", folder])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--pretrained {folder}: " in err and message in err


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "at least 2 --seeds"),
    (["--methods", "full,magic"], "unknown --methods"),
    (["--methods", "full,lora_diff_tuning"], "add lora"),
    (["--forgetting_seeds", "7"], "--forgetting_seeds must be among --seeds"),
    (["--num_train_images", "6000"], "must not exceed"),
    (["--convergence_threshold", "-1"], "--convergence_threshold must be > 0"),
    (["--fractions", "0,2"], "--fractions"),
    (["--train_batch_size", "2"], "at least 3"),
    (["--pretrained", "/nonexistent"], "no saved pipeline"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        transfer.parse_args(argv)
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------ summaries and tables


def _fake_results(shift_percent, seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    seed_effect = {s: rng.normal(60, 10) for s in seeds}
    return {m: {s: {"fid": seed_effect[s] * (1 + shift / 100) * (1 + rng.normal(0, 0.01)),
                    "kid_mean": rng.uniform(0.01, 0.03), "precision": rng.uniform(0.4, 0.6), "recall": rng.uniform(0.6, 0.8)}
                for s in seeds}
            for m, shift in shift_percent.items()}


def test_summary_targets_and_table_on_constructed_results():
    args = transfer.parse_args(["--methods", "full,diff_tuning,diff_tuning_kd,lora,lora_diff_tuning"])
    results = _fake_results({"full": 0, "diff_tuning": -30, "diff_tuning_kd": -5, "lora": 10, "lora_diff_tuning": 10})
    summary = transfer.summarise(results)
    relative = summary["relative_fid_vs_base"]
    assert set(relative) == {"diff_tuning", "diff_tuning_kd", "lora_diff_tuning"}
    assert relative["diff_tuning"]["mean"] == pytest.approx(-30, abs=2) and relative["diff_tuning"]["high"] < 0
    # LoRA + Diff-Tuning is compared with LoRA (its base), not with full fine-tuning
    assert abs(relative["lora_diff_tuning"]["mean"]) < 3
    assert summary["paired_vs_full"]["lora_diff_tuning"]["fid"]["mean"] > 0
    checks = transfer.target_checks(summary, None)
    assert checks["fid"]["met"] and "Diff-Tuning lower" in checks["fid"]["reading"]
    text = transfer.markdown(summary, {"fid": 150.0, "kid_mean": 0.2, "precision": 0.1, "recall": 0.2}, None, {}, checks,
                             args, "ab" * 32)
    assert "| Diff-Tuning | all weights | knowledge bank |" in text and "| Diff-Tuning KD | all weights | distillation |" in text
    assert "| LoRA + Diff-Tuning | LoRA r4 | knowledge bank |" in text
    assert "| pretrained on MNIST-5k, not fine-tuned |" in text and "abababababab" in text
    assert "at least 20% below" in text and ": met (" in text and "Diff-Tuning vs full fine-tuning |" in text
    worse = transfer.summarise(_fake_results({"full": 0, "diff_tuning": 5}))
    check = transfer.target_checks(worse, None)["fid"]
    assert not check["met"] and "Diff-Tuning higher" in check["reading"]
    assert ": not met (" in transfer.markdown(worse, None, None, {}, {"fid": check}, transfer.parse_args([]), "c" * 64)


def _history(steps, distances):
    return {"history": [{"step": s, "distance": d} for s, d in zip(steps, distances)]}


def test_convergence_summary_counts_censored_runs_and_pairs_by_seed():
    from diffusers_ant.diff_tuning.benchmark import converged_step, summarise_convergence, threshold_from

    steps = [100, 200, 300, 400]
    convergence = {
        "controlnet": {0: _history(steps, [0.9, 0.8, 0.5, 0.4]), 1: _history(steps, [0.9, 0.85, 0.8, 0.55]),
                       2: _history(steps, [0.9, 0.9, 0.9, 0.9])},
        "controlnet_diff_tuning": {0: _history(steps, [0.9, 0.5, 0.4, 0.4]), 1: _history(steps, [0.9, 0.55, 0.5, 0.5]),
                                   2: _history(steps, [0.9, 0.8, 0.5, 0.4])},
    }
    assert converged_step(convergence["controlnet"][0]["history"], 0.6) == 300
    assert converged_step(convergence["controlnet"][2]["history"], 0.6) is None
    result = summarise_convergence(convergence, 0.6, 400)
    assert result["per_method"]["controlnet"][1]["converged_step"] == 400
    assert result["converged_counts"] == {"controlnet": "2/3", "controlnet_diff_tuning": "3/3"}
    assert result["paired_steps"]["seeds"] == [0, 1] and result["paired_steps"]["differences"] == [-100, -200]
    assert result["relative_steps"]["differences"] == pytest.approx([-100 / 3, -50])
    assert result["paired_mean_distance"]["n"] == 3 and result["paired_mean_distance"]["mean"] < 0
    checks = transfer.target_checks({"relative_fid_vs_base": {}}, result)
    # sooner on both paired seeds, but two seeds' interval contains 0: not met, and the reading says why
    assert not checks["convergence"]["met"] and checks["convergence"]["converged"]["controlnet"] == "2/3"
    assert checks["convergence"]["reading"] == "no difference resolved (interval contains 0)"
    resolved = {**result, "relative_steps": {"mean": -30.0, "low": -40.0, "high": -20.0, "n": 3}}
    assert transfer.target_checks({"relative_fid_vs_base": {}}, resolved)["convergence"]["met"]
    args = transfer.parse_args([])
    text = transfer.markdown({"table": {}, "paired_vs_full": {}, "relative_fid_vs_base": {}}, None, result, {}, checks,
                             args, "d" * 64)
    assert "| ControlNet | 0: 300, 1: 400, 2: > 400 |" in text and "seeds where both converged: 2" in text
    # the threshold half-way between the untrained ControlNet (0.9) and the real images (0.5)
    assert threshold_from({0: 0.88, 1: 0.92}, 0.5) == pytest.approx(0.7)
    assert threshold_from([0.9], 0.5, fraction=0.25) == pytest.approx(0.8)
    with pytest.raises(RuntimeError, match="cannot be measured"):
        threshold_from([0.4], 0.5)


def test_transfer_plots(tmp_path):
    from diffusers_ant.analysis.plots import plot_convergence_curves, plot_forgetting_comparison, plot_method_summary

    rows = [{"label": "full", "mean": 50.0, "low": 45.0, "high": 55.0, "values": [48, 50, 52]},
            {"label": "Diff-Tuning", "mean": 40.0, "low": None, "high": None, "values": [40]}]
    plot_method_summary(rows, str(tmp_path / "bars.png"), reference=("pretrained", 90.0))
    curve = {"points": [{"fraction": f, "fid": 40 + 50 * f} for f in (0, 0.5, 1)], "feature_extractor": "domain_animal_mnist"}
    plot_forgetting_comparison({"full": [curve, curve], "Diff-Tuning": [curve]}, str(tmp_path / "forgetting.png"))
    plot_convergence_curves({"ControlNet": {0: [{"step": 50, "distance": 0.9}, {"step": 100, "distance": 0.5}]}},
                            str(tmp_path / "convergence.png"), threshold=0.7)
    for name in ("bars.png", "forgetting.png", "convergence.png"):
        assert (tmp_path / name).stat().st_size > 1000


# ------------------------------------------------------------------------------------ shared machinery


def test_split_rows_are_disjoint_seeded_and_checked():
    from diffusers_ant.analysis.benchmark import split_rows

    train, held = split_rows(100, [10, None], seed=3)
    assert len(train) == 10 and len(held) == 90 and not set(train) & set(held) and set(train) | set(held) == set(range(100))
    assert split_rows(100, [10, None], seed=3) == [train, held] and split_rows(100, [10, None], seed=4)[0] != train
    assert split_rows(100, [10, 20], seed=3)[0] == train  # the first subset does not depend on the others' sizes
    with pytest.raises(ValueError, match="disjoint"):
        split_rows(10, [6, 5])


def test_write_image_folder_writes_the_rows_once(tmp_path):
    from diffusers_ant.analysis.benchmark import write_image_folder
    from diffusers_ant.analysis.evaluate import real_images

    folder = str(tmp_path / "digits")
    write_image_folder("digits", [3, 1, 7], folder)
    assert sorted(os.listdir(folder)) == ["row-00001.png", "row-00003.png", "row-00007.png"]
    assert json.loads((tmp_path / "digits.json").read_text())["rows"] == [3, 1, 7]
    stamp = os.path.getmtime(os.path.join(folder, "row-00001.png"))
    write_image_folder("digits", [3, 1, 7], folder)  # kept
    assert os.path.getmtime(os.path.join(folder, "row-00001.png")) == stamp
    write_image_folder("digits", [2, 4], folder)  # another subset replaces the folder's images
    assert sorted(os.listdir(folder)) == ["row-00002.png", "row-00004.png"]
    images = real_images(train_data_dir=folder, num_images=10, resolution=8, num_channels=1)
    assert images.shape == (2, 8, 8, 1)


def test_run_logged_keeps_finished_runs_and_names_the_log_of_a_failure(tmp_path):
    from diffusers_ant.analysis.benchmark import recorded_seconds, run_logged, time_path

    log = str(tmp_path / "run" / "train.log")
    code = "import os; print('threads', os.environ['OMP_NUM_THREADS'], os.environ['HF_HUB_OFFLINE'])"
    status = run_logged([sys.executable, "-c", code], log, time_path(log), "a run")
    assert status.endswith("s") and "threads 1 1" in open(log).read() and recorded_seconds(log) is not None
    assert time_path(log).endswith("train_time.json")
    assert run_logged([sys.executable, "-c", "raise SystemExit(3)"], log, time_path(log), "a run") == "kept"
    bad = str(tmp_path / "bad.log")
    with pytest.raises(RunFailed, match="bad.log"):
        run_logged([sys.executable, "-c", "raise SystemExit(3)"], bad, time_path(bad), "a bad run")
    assert recorded_seconds(bad) is None


def test_evaluate_in_pool_returns_each_result_in_the_order_of_the_tasks_and_reports_it(capsys):
    from diffusers_ant.analysis.benchmark import evaluate_in_pool

    assert evaluate_in_pool(dict, [], workers=2) == [] and capsys.readouterr().out == ""
    tasks = [(f"model {i}", {"fid": float(i), "sampling_seconds": 3.0, "index": i}) for i in range(3)]
    # `dict` stands for an evaluation: a module-level callable the spawned workers can unpickle
    assert evaluate_in_pool(dict, tasks, workers=1, what="sample sets") == [task for _, task in tasks]
    out = capsys.readouterr().out
    assert "evaluating 3 sample sets with 1 worker(s)" in out and "[3/3] model 2: fid 2.000 (3s sampling)" in out


def test_relative_differences_and_verdict():
    from diffusers_ant.analysis.benchmark import relative_differences, verdict

    result = relative_differences({0: 40.0, "1": 45.0, 2: None, 3: 39.0}, {0: 50.0, 1: 60.0, 2: 70.0, 3: 50.0})
    assert result["seeds"] == [0, 1, 3] and result["differences"] == pytest.approx([-20.0, -25.0, -22.0])
    assert verdict(result) == "lower (interval excludes 0)"
    assert verdict(relative_differences({0: 1.0, 1: 3.0}, {0: 2.0, 1: 2.0})).startswith("no difference resolved")
    assert "no interval" in verdict(relative_differences({0: 1.0}, {0: 2.0}))
    with pytest.raises(ValueError, match="control value is 0"):
        relative_differences({0: 1.0}, {0: 0.0})


def test_fit_autoencoder_learns_to_reconstruct_and_scales_latents_to_unit_variance():
    from diffusers import AutoencoderKL

    from diffusers_ant.analysis.evaluate import real_images
    from diffusers_ant.models.autoencoder import fit_autoencoder, reconstruction_error, set_latent_scaling

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=[8, 8], latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=8, mid_block_add_attention=False)
    images = torch.from_numpy(real_images("digits", 64, resolution=8, num_channels=1)).permute(0, 3, 1, 2) * 2 - 1
    before = reconstruction_error(vae, images)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only waits (seconds instead of 0.4 s when busy)
    try:
        losses = fit_autoencoder(vae, images, steps=30, batch_size=16, learning_rate=5e-3)
    finally:
        torch.set_num_threads(previous)
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert reconstruction_error(vae, images) < 0.5 * before
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    factor = set_latent_scaling(vae, images)
    assert vae.config.scaling_factor == factor
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * factor
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="images must be"):
        fit_autoencoder(vae, images.repeat(1, 3, 1, 1), steps=1)  # 3 channels for a 1-channel VAE


# ------------------------------------------------------------------------------------ the quick run


@pytest.mark.slow
@pytest.mark.benchmark
def test_quick_transfer_benchmark_runs_and_resumes(tmp_path):
    """A reduced --quick run (two rows, no ControlNet part) end to end, then again: everything kept."""
    out = tmp_path / "bench"
    argv = ["--output_dir", str(out), "--quick", "--methods", "full,diff_tuning", "--skip_controlnet",
            "--workers", "2"]
    record = transfer.main(argv)
    assert set(record["per_run"]) == {"full", "diff_tuning"} and set(record["per_run"]["full"]) == {0, 1}
    assert record["summary"]["relative_fid_vs_base"]["diff_tuning"]["n"] == 2
    assert [p["fraction"] for p in record["forgetting"]["diff_tuning"][0]["points"]] == [0.0, 0.5, 1.0]
    # f = 1 is the pretrained model alone: the same curve point for every fine-tuned model
    assert record["forgetting"]["full"][0]["points"][-1]["fid"] == pytest.approx(
        record["forgetting"]["diff_tuning"][0]["points"][-1]["fid"])
    for name in ("results.json", "results.md", "fid_by_method.png", "forgetting.png"):
        assert (out / name).stat().st_size > 0
    assert "| Diff-Tuning | all weights | knowledge bank |" in (out / "results.md").read_text()
    bank = json.loads((out / "bank" / "bank.json").read_text())
    assert bank["num_images"] == transfer.parse_args(argv).bank_images == 16
    again = transfer.main(argv)
    assert again["timing"]["fine-tuning and ControlNet runs"] < 5
    assert again["per_run"]["full"][0]["fid"] == record["per_run"]["full"][0]["fid"]


@pytest.mark.slow
@pytest.mark.benchmark
def test_quick_transfer_benchmark_from_an_8x8_pretrained_model_runs_at_8x8(tmp_path):
    """--quick from an 8x8 --pretrained pipeline (the tiny preset, built here): the bank is sampled, every
    fine-tune trained and every model scored at 8x8 (a benchmark that ignored the resolution trains at
    16x16: train_ant.py then rewrites the UNet's sample_size to 16, and a bank row refuses the 8x8 bank)."""
    pretrained = _tiny_pipeline(tmp_path / "base-8", 8)
    out = tmp_path / "bench"
    # the smallest run (to keep the test within a minute): full fine-tuning only, no ControlNet, no chain of
    # forgetting; the bank is sampled all the same (its rows' commands at 8x8: the test above), and every
    # row trains through the same finetune_command
    record = transfer.main(["--output_dir", str(out), "--quick", "--pretrained", pretrained, "--methods", "full",
                            "--skip_controlnet", "--forgetting_methods", "", "--workers", "2"])
    assert record["resolution"] == 8 and record["plan"]["resolution"] == 8
    assert json.loads((out / "bank" / "bank.json").read_text())["resolution"] == 8
    for method in ("full",):
        for seed in (0, 1):
            run = out / "finetune" / method / f"seed-{seed}"
            assert json.loads((run / "unet" / "config.json").read_text())["sample_size"] == 8
            assert record["per_run"][method][seed]["settings"]["resolution"] == 8
    assert record["pretrained_on_target"]["settings"]["resolution"] == 8
    assert "at 8x8" in (out / "results.md").read_text()
