"""`train_scripts/demo_families.py` (issue 16, "Measured": the end-to-end Diff-Tuning demonstration per
family) and the built-in `animal_mnist_captions` it fine-tunes on.

The `--quick` run is real processes end to end (VAE fit, `train_ant.py` pretraining, `build_knowledge_bank.py`,
two `train_ant.py` LoRAs, sampling and scoring): 181 s on the loaded 2-core machine, marked slow."""

import json
import math
import os

import numpy as np
import pytest

from train_scripts_loader import load_script

demo = load_script("demo_families")


def test_animal_mnist_captions_rows_and_captions():
    from diffusers_ant.data import load_training_dataset, resolve_columns
    from diffusers_ant.data.builtin import ANIMAL_NAMES
    from diffusers_ant.data.toy import ANIMAL_CAPTION_TEMPLATE

    dataset = load_training_dataset("animal_mnist_captions")
    plain = load_training_dataset("animal_mnist")
    assert len(dataset) == len(plain) == 10000
    assert resolve_columns(dataset, need_captions=True)["caption_column"] == "text"
    for row in (0, 4321, 9999):  # the same rows as animal_mnist, each captioned with its own class
        item = dataset[row]
        assert item["label"] == plain[row]["label"]
        assert np.array_equal(np.asarray(item["image"]), np.asarray(plain[row]["image"]))
        assert item["text"] == ANIMAL_CAPTION_TEMPLATE.format(ANIMAL_NAMES[item["label"]])
    # every caption fits the tiny presets' character tokenizers (32 tokens with the two specials)
    assert max(len(t) for t in dataset["text"]) <= 30


def test_heldout_rows_are_disjoint_from_the_lora_rows():
    args = demo.parse_args(["--num_train_images", "300", "--num_real", "200"])
    train = demo.lora_train_rows(demo.TARGET_ROWS, 300, args.seed)
    held = demo.heldout_rows(args)
    assert len(train) == 300 and len(held) == 200 and not set(train) & set(held)
    # the trainer's rule for --max_train_samples: dataset.shuffle(seed).select(range(n))
    from diffusers_ant.data import load_training_dataset

    labels = load_training_dataset("animal_mnist")["label"]
    chosen = load_training_dataset("animal_mnist").shuffle(seed=args.seed).select(range(300))["label"]
    assert sorted(chosen) == sorted(labels[r] for r in train)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--families", "sd"])
    assert "unknown sd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--finetune_batch_size", "4"])


def test_a_work_folder_of_other_settings_and_an_output_that_is_a_file_are_refused_in_one_line(tmp_path, capsys):
    """Each step counted as done when its output existed: a full run after a --quick one (same default
    --work_dir) reported the 4-step models under the full run's settings. The work folder records its settings,
    and another command's are refused before anything runs; --output_dir as a file is one line (a
    FileExistsError traceback before)."""
    work = tmp_path / "work"
    from diffusers_ant.analysis.benchmark import write_json

    write_json(work / "benchmark_settings.json", {name: getattr(demo.parse_args(["--quick"]), name)
                                                  for name in demo.WORK_SETTINGS})
    with pytest.raises(SystemExit) as refused:
        demo.main(["--families", "sd3", "--output_dir", str(tmp_path / "out"), "--work_dir", str(work)])
    message = str(refused.value)
    assert "holds runs trained with other settings" in message and "pretrain_steps: 4 -> 400" in message
    assert "\n" not in message and not (work / "sd3").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--output_dir", str(tmp_path / "a_file")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "is a file, not a folder" in err[0]


def test_cached_samples_are_written_atomically(tmp_path, monkeypatch):
    """A kill in `np.save` left a truncated .npy, which every later run loaded and failed on; the file now
    appears whole or not at all."""
    import diffusers_ant.analysis.evaluate as evaluate
    import diffusers_ant.models as models

    monkeypatch.setattr(models, "load_pipeline", lambda folder: type("P", (), {"set_progress_bar_config": lambda *a, **k: None})())
    monkeypatch.setattr(evaluate, "sample_images", lambda *a, **k: np.ones((2, 4, 4, 3), dtype=np.float32))

    def killed(file, array, *args, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    args = demo.parse_args(["--quick"])
    cache = tmp_path / "samples" / "base_mnist.npy"
    monkeypatch.setattr(np, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.samples_of("model", ["a"], args, 0, str(cache))
    assert not cache.exists()
    monkeypatch.undo()
    monkeypatch.setattr(models, "load_pipeline", lambda folder: type("P", (), {"set_progress_bar_config": lambda *a, **k: None})())
    monkeypatch.setattr(evaluate, "sample_images", lambda *a, **k: np.ones((2, 4, 4, 3), dtype=np.float32))
    assert np.array_equal(demo.samples_of("model", ["a"], args, 0, str(cache)), np.load(cache))


@pytest.mark.slow
@pytest.mark.benchmark
def test_quick_run_writes_results_with_finite_fids_and_a_bank_trained_diff_tuning_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    report = demo.main(["--quick", "--families", "sd3", "--output_dir", str(out), "--work_dir", str(work)])
    assert (out / "results.json").is_file() and (out / "sd3_grid.png").is_file()
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved["families"].keys() == {"sd3"} == report["families"].keys()
    r = saved["families"]["sd3"]
    scores = r["scores"]
    values = [scores["retention_fid_floor"]] + [scores[arm][key] for arm in demo.ARMS for key in scores[arm]]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert scores["base"]["retention_fid"] == 0.0  # the base is the reference of retention
    # the Diff-Tuning run trained on the bank sampled from the base; the plain one had none
    dt, plain = r["runs"]["lora_diff_tuning"], r["runs"]["lora"]
    assert dt["diff_tuning"] is True and dt["retention"] == "bank" and dt["knowledge_bank"]
    assert os.path.samefile(os.path.join(work, "sd3", "lora_diff_tuning", dt["knowledge_bank"]), work / "sd3" / "bank")
    assert plain["diff_tuning"] is False and plain["knowledge_bank"] is None
    assert {k: v for k, v in dt.items() if k not in ("diff_tuning", "knowledge_bank", "retention")} == \
        {k: v for k, v in plain.items() if k not in ("diff_tuning", "knowledge_bank", "retention")}
    assert r["bank"]["model_type"] == "sd3" and r["bank"]["num_images"] == 8
    with open(work / "sd3" / "bank" / "metadata.jsonl") as f:
        assert json.loads(f.readline())["text"] == "a handwritten digit 0"  # the bank carries the MNIST prompts
    # both LoRAs sampled from the same noise as the base: same shapes, same prompt order
    samples = {arm: np.load(work / "sd3" / "samples" / f"{arm}_mnist.npy") for arm in demo.ARMS}
    assert {s.shape for s in samples.values()} == {(20, 16, 16, 3)}
    text = (out / "results.md").read_text()
    assert "demo_families.py --quick --families sd3" in text and "| sd3 |" in text and "sd3_grid.png" in text


@pytest.mark.parametrize("family", demo.FAMILIES)
def test_pretraining_command_passes_the_trainers_checks(family, tmp_path):
    """The pretraining command of every family is one the trainer accepts (flux drops no captions: the
    quick run covers sd3 only). Its base is swapped for the preset: the trainer checks the folder exists."""
    from diffusers_ant.training import parse_args

    args = demo.parse_args(["--work_dir", str(tmp_path)])
    cmd = [str(c) for c in demo.pretrain_command(family, args, demo.family_layout(family, args))[2:]]
    i = cmd.index("--pretrained_model_name_or_path")
    cmd[i:i + 2] = ["--model_config_name_or_path", "tiny"]
    parsed = parse_args(cmd)
    assert parsed.model_type == family and parsed.dataset_name == demo.SOURCE and parsed.rank is None
    assert parsed.proportion_empty_prompts == (0.0 if family == "flux" else 0.1)
