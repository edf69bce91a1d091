"""Diff-Tuning and DeMe through train_ant.py (issues 11 and 12): the sources of a batch, the frozen
teacher, exact resume, two processes, and the one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from trainer_utils import (TINY_RUN, assert_same_tensors, failure_output, load_safetensors_dir, offline_env,
                          record_prepared, run_script, train_in_process)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretrained tiny class-conditional DiT (pixel space, 16x16, 10 classes) and a tiny UNet, as saved pipelines."""
    from diffusers_ant.models import get_model_adapter

    folders = {}
    for model_type, kwargs in (("dit", {"num_classes": 10}), ("unet", {})):
        torch.manual_seed(0)
        adapter = get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=16, num_channels=1,
                                                     **kwargs)
        folder = tmp_path_factory.mktemp(f"pretrained-{model_type}")
        adapter.save(str(folder))
        folders[model_type] = folder
    return folders


@pytest.fixture(scope="module")
def bank(pretrained, tmp_path_factory):
    from diffusers_ant.diff_tuning import build_knowledge_bank

    folder = tmp_path_factory.mktemp("bank") / "bank"
    build_knowledge_bank(str(pretrained["dit"]), str(folder), num_images=24, num_inference_steps=2, batch_size=12,
                         progress=False)
    return folder


def _run(pretrained, out, *extra, model_type="dit"):
    args = ["--model_type", model_type, "--dataset_name", "mnist5k", "--output_dir", str(out), *TINY_RUN,
            "--pretrained_model_name_or_path", str(pretrained[model_type]), *extra]
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    return args


def _weights(folder):
    return {k: v for k, v in load_safetensors_dir(folder).items() if not k.startswith("checkpoint-")}


# --------------------------------------------------------------------------- the sources of a batch


def test_each_micro_batch_carries_the_bank_share_exactly():
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.sources import compose_sources, retention_rows

    args = parse_args(["--dataset_name", "mnist5k", "--pretrained_model_name_or_path", os.getcwd(),
                       "--retention", "kd", "--train_batch_size", "10", "--bank_fraction", "0.3"])
    batch = {"pixel_values": torch.arange(10.0).view(10, 1, 1, 1), "class_labels": torch.arange(10)}
    parts = compose_sources(args, batch, None)
    assert retention_rows(args) == 3
    assert parts["data"]["pixel_values"].shape[0] == 7 and parts["retention"]["pixel_values"].shape[0] == 3
    assert torch.equal(torch.cat([parts["data"]["class_labels"], parts["retention"]["class_labels"]]), torch.arange(10))



def test_the_bank_share_floors_as_the_authors_int():
    """Retention rows = int(fraction * B), as thuml/Diffusion-Tuning (round() would give 2 of 8 at 0.2)."""
    from diffusers_ant.diff_tuning import retention_share
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.sources import retention_rows

    args = parse_args(["--dataset_name", "mnist5k", "--pretrained_model_name_or_path", os.getcwd(),
                       "--retention", "kd", "--train_batch_size", "8", "--bank_fraction", "0.2"])
    assert retention_rows(args) == 1
    assert [retention_share(b, 0.2) for b in (4, 5, 9, 10, 32)] == [0, 1, 1, 2, 6]
    assert retention_share(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats: not a floor artefact


def test_the_retention_exponent_can_be_tied_to_the_data_exponent():
    from diffusers_ant.training import parse_args

    common = ["--dataset_name", "mnist5k", "--pretrained_model_name_or_path", os.getcwd(), "--retention", "kd"]
    args = parse_args([*common, "--retention_exponent", "tied", "--reconsolidation_exponent", "2.5"])
    assert args.retention_exponent == 2.5 and args.reconsolidation_exponent == 2.5
    # tied by default, as the authors' code; a number sets it apart
    assert parse_args([*common, "--reconsolidation_exponent", "2.5"]).retention_exponent == 2.5
    assert parse_args([*common, "--reconsolidation_exponent", "2.5", "--retention_exponent", "1"]).retention_exponent == 1.0


def test_kd_teacher_encodes_with_the_pretrained_text_encoder(tmp_path):
    """`--retention kd --train_text_encoder` (a LoRA run): the teacher is the student with its adapters
    off, the text encoder's LoRA included, so its UNet sees the base encoder's output while the
    student's sees the LoRA-trained encoder's."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.teacher import make_teacher
    from diffusers_ant.training import parse_args

    args = parse_args(["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--output_dir", str(tmp_path),
                       "--pretrained_model_name_or_path", os.getcwd(), "--retention", "kd", "--rank", "4",
                       "--train_text_encoder"])
    assert args.retention == "kd" and args.train_text_encoder

    torch.manual_seed(0)
    adapter = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16)
    ids = adapter.tokenize(["a handwritten digit 7", "a handwritten digit 1"])
    base = adapter.encode_prompt(ids)
    adapter.add_lora(4)
    adapter.add_text_encoder_lora(4)
    with torch.no_grad():  # a trained text-encoder LoRA: B != 0
        for name, param in adapter.text_encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    seen = []
    hook = adapter.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()),
                                                   with_kwargs=True)
    conditioning = adapter.conditioning({"input_ids": ids}, training=True)
    assert set(conditioning) == {"input_ids"}  # encoded in predict, where the adapters are switched
    x_t, t = torch.randn(2, adapter.model.config.in_channels, 2, 2), torch.tensor([10, 500])
    teacher = make_teacher(adapter, lora=True)
    teacher.predict(x_t, t, conditioning)
    adapter.predict(adapter.model, x_t, t, conditioning)
    hook.remove()
    assert torch.equal(seen[0], base)  # the teacher: the pretrained encoder, exactly
    assert (seen[1] - base).abs().max() > 1e-3  # the student: its LoRA-trained encoder
    assert torch.equal(adapter.encode_prompt(ids), seen[1])  # the adapters are back on after the teacher's call


@pytest.mark.slow
def test_bank_run_trains_both_sources_with_their_densities(pretrained, bank, tmp_path, monkeypatch):
    """Every optimizer step sees round(B f) bank rows per micro-batch; retention timesteps lean to
    low noise, reconsolidation ones to high noise; bank rows train the null class."""
    seen = record_prepared(monkeypatch, lambda p: (p["task_ids"].clone(), p["t"].clone(),
                                                   p["conditioning"]["class_labels"].clone()))
    out = tmp_path / "dt"
    train_in_process(_run(pretrained, out, "--knowledge_bank", str(bank), "--max_train_steps", "12",
                          "--train_batch_size", "10", "--gradient_accumulation_steps", "2", "--num_clusters", "1"))
    assert len(seen) == 12
    null_class = 10
    data_t, bank_t, data_nulls = [], [], []
    for task_ids, t, labels in seen:
        assert int((task_ids == 1).sum()) == 2 * 2 and int((task_ids == 0).sum()) == 2 * 8  # GA 2 x (8 data + 2 bank)
        assert torch.all(labels[task_ids == 1] == null_class)
        data_nulls.append(labels[task_ids == 0] == null_class)  # DiT's own 10% label dropout only
        data_t.append(t[task_ids == 0])
        bank_t.append(t[task_ids == 1])
    assert torch.cat(data_nulls).float().mean() < 0.25
    # E[t] is 2T/3 under (t + 1) and T/3 under (T - t): far apart on 192 + 48 draws
    assert torch.cat(data_t).float().mean() > 550 and torch.cat(bank_t).float().mean() < 450
    config = json.loads((out / "training_config.json").read_text())
    assert config["knowledge_bank"] == os.path.relpath(bank, out)  # portable, never this machine's path
    card = (out / "README.md").read_text()
    assert "Knowledge retention" in card and "knowledge bank of 24 images" in card and "(T - t)^1" in card


@pytest.mark.slow
def test_kd_target_is_the_frozen_models_output_and_the_teacher_never_changes(pretrained, tmp_path, monkeypatch):
    from diffusers_ant import teacher as teacher_module
    from diffusers_ant.training import step as step_module

    teachers, checks = [], []
    original_init = teacher_module.FrozenTeacher.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        teachers.append((self, {k: v.clone() for k, v in self.model.state_dict().items()}))

    original = step_module.DiffusionObjective._prepare_source

    def recording(self, index, source, batch, generator, chunk_size):
        prepared = original(self, index, source, batch, generator, chunk_size)
        if source.target == "teacher":
            with torch.no_grad():
                expected = self.adapter.predict(self.teacher.model, prepared["x_t"], prepared["model_t"],
                                                prepared["conditioning"]).float()
            checks.append((prepared["target"] - expected).abs().max().item())
        return prepared

    monkeypatch.setattr(teacher_module.FrozenTeacher, "__init__", init)
    monkeypatch.setattr(step_module.DiffusionObjective, "_prepare_source", recording)
    out = tmp_path / "kd"
    train_in_process(_run(pretrained, out, "--retention", "kd", "--max_train_steps", "3", "--learning_rate", "1e-2",
                          "--checkpointing_steps", "2"))
    assert checks and max(checks) == 0.0
    (teacher, before), = teachers
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[key]), f"the teacher's {key} changed"
    assert not any(p.requires_grad for p in teacher.model.parameters())
    # the student moved away from the pretrained weights; the teacher is in no checkpoint nor output
    student = _weights(out / "transformer")
    assert any((student[k] - v).abs().max() > 0 for k, v in _weights(pretrained["dit"] / "transformer").items()
               if k in student)
    saved = load_safetensors_dir(out)
    assert len([k for k in saved if k.startswith("transformer/")]) == len(before)  # the student only
    checkpoint = load_safetensors_dir(out / "checkpoint-2")
    assert not any("teacher" in k for k in checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bank", "kd", "deme"])
def test_transfer_runs_resume_exactly(variant, pretrained, bank, tmp_path, capsys):
    """20 steps straight == 10 + resume mid-epoch + 10 (24 samples at batch 8: 3 batches an epoch),
    with EMA and UW, for a bank run, a distillation run and a DeMe interval run (with its channel projection)."""
    extra = {"bank": ["--knowledge_bank", str(bank)], "kd": ["--retention", "kd", "--finetune", "difffit"],
             "deme": ["--deme_interval", "2", "--num_clusters", "4", "--clustering", "timestep",
                      "--channel_projection"]}[variant]
    common = [*extra, "--mtl_method", "uw", "--use_ema", "--checkpointing_steps", "10", "--max_train_samples", "24",
              "--num_validation_images", "1"]
    straight = tmp_path / "straight"
    train_in_process(_run(pretrained, straight, *common, "--max_train_steps", "20"))
    resumed = tmp_path / "resumed"
    train_in_process(_run(pretrained, resumed, *common, "--max_train_steps", "11"))
    capsys.readouterr()
    train_in_process(_run(pretrained, resumed, *common, "--max_train_steps", "20", "--resume_from_checkpoint",
                          "checkpoint-10"))
    assert "resuming from" in capsys.readouterr().out
    a, b = _weights(straight), _weights(resumed)
    assert_same_tensors(a, b)
    if variant == "deme":
        assert (straight / "channel_projection.safetensors").is_file()
    if variant == "kd":  # DiffFit's scales are folded into the saved weights: plain diffusers loads them
        assert not any("difffit" in k for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bank", "deme"])
def test_two_process_transfer_runs_keep_the_processes_identical(variant, pretrained, bank, tmp_path):
    extra = {"bank": ["--knowledge_bank", str(bank), "--mtl_method", "pcgrad"],
             "deme": ["--deme_interval", "1", "--num_clusters", "4", "--clustering", "timestep", "--mtl_method", "uw"]}
    from trainer_utils import REPO

    out = tmp_path / variant
    result = run_script(_run(pretrained, out, *extra[variant], "--max_train_steps", "3", "--checkpointing_steps", "2"),
                        launcher=["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                                  "no", "--dynamo_backend", "no", "--main_process_port", "0"],
                        env=offline_env(), script=os.path.join(REPO, "tests", "scripts", "instrumented_train.py"))
    assert result.returncode == 0, failure_output(result.stderr)
    if variant == "bank":  # the bank's source was loaded (to fingerprint it) by process 0 alone, once
        assert (out / "bank_source_loads_0").read_text().splitlines() == [str(pretrained["dit"])]
        assert not (out / "bank_source_loads_1").exists()
    # Accelerate's checkpoint holds process 0's model; each process's own trainer state must agree on
    # everything that is shared (the step, the weighting's state, EMA)
    from safetensors.torch import load_file

    states = [load_file(out / "checkpoint-2" / f"trainer_state_{rank}.safetensors") for rank in (0, 1)]
    shared = [k for k in states[0] if not k.startswith(".generator")]
    assert shared
    for key in shared:
        assert torch.equal(states[0][key], states[1][key]), key


# --------------------------------------------------------------------------- DeMe pieces


def test_consistency_loss_is_zero_when_the_student_is_the_teacher():
    from diffusers_ant.clustering import TimestepIntervals
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.teacher import FrozenTeacher
    from diffusers_ant.timesteps import UniformTimestepSampler
    from diffusers_ant.training.step import DiffusionObjective, Source

    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1)
    teacher = FrozenTeacher(adapter)
    intervals = TimestepIntervals([(0, 999)], 1000)
    batch = {"pixel_values": torch.rand(6, 1, 8, 8) * 2 - 1}
    losses = {}
    for weight in (0.0, 1.0):
        objective = DiffusionObjective(adapter, adapter.noise_scheduler, None, intervals, teacher=teacher,
                                       sources=[Source("data", UniformTimestepSampler(1000), consistency=weight)])
        prepared = objective.prepare(batch, torch.Generator().manual_seed(0))
        losses[weight] = objective.loss_fn(adapter.model, prepared)(torch.arange(6))
    torch.testing.assert_close(losses[0.0], losses[1.0], rtol=0, atol=0)
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(0.01)  # the student moves away: the consistency term appears
    objective = DiffusionObjective(adapter, adapter.noise_scheduler, None, intervals, teacher=teacher,
                                   sources=[Source("data", UniformTimestepSampler(1000), consistency=1.0)])
    prepared = objective.prepare(batch, torch.Generator().manual_seed(0))
    plain = DiffusionObjective(adapter, adapter.noise_scheduler, UniformTimestepSampler(1000), intervals)
    plain_prepared = plain.prepare(batch, torch.Generator().manual_seed(0))  # the same draws, no teacher
    assert torch.equal(plain_prepared["x_t"], prepared["x_t"])
    assert (objective.loss_fn(adapter.model, prepared)(torch.arange(6))
            > plain.loss_fn(adapter.model, plain_prepared)(torch.arange(6))).all()


def test_global_draws_happen_at_rate_p_per_batch():
    """DeMe's probabilistic sampling: whole-range batches at rate p (binomial test), per batch or per sample."""
    from scipy.stats import binomtest

    from diffusers_ant.timesteps import IntervalTimestepSampler

    g = torch.Generator().manual_seed(0)
    per_batch = IntervalTimestepSampler(0, 99, 1000, p_full=0.3, per_batch=True)
    outside = [bool((per_batch.sample(64, generator=g) > 99).any()) for _ in range(2000)]
    assert binomtest(sum(outside), len(outside), 0.3).pvalue > 1e-3
    per_sample = IntervalTimestepSampler(0, 99, 1000, p_full=0.3)
    draws = per_sample.sample(50_000, generator=g)
    # a global draw lands outside [0, 99] with probability 0.9
    assert binomtest(int((draws > 99).sum()), len(draws), 0.3 * 0.9).pvalue > 1e-3


# --------------------------------------------------------------------------- one-line errors

BAD = [
    (["--knowledge_bank", "/no/such/bank"], "does not exist"),
    (["--retention", "kd", "--bank_fraction", "1.0"], "--bank_fraction"),
    (["--retention", "kd", "--bank_fraction", "0"], "--bank_fraction"),
    (["--retention", "kd", "--bank_weight", "-1"], "--bank_weight"),
    (["--retention", "kd", "--finetune", "difffit", "--rank", "4"], "--rank"),
    (["--deme_interval", "7", "--num_clusters", "4"], "--deme_interval"),
    # a DiT's bank rows train its null class: their labels would go through the data set's class map
    (["--knowledge_bank", "/no/such/bank", "--bank_keep_prompts"], "--bank_keep_prompts keeps a text-to-image bank's"),
    (["--retention", "kd", "--bank_keep_prompts"], "--bank_keep_prompts keeps a text-to-image bank's"),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_bad_transfer_flags_fail_in_one_line(extra, needle, pretrained, tmp_path, capsys):
    from train_scripts_loader import load_train_main

    with pytest.raises(SystemExit):
        load_train_main()(_run(pretrained, tmp_path / "o", *extra, "--max_train_steps", "1"))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("extra,needle", [(["--retention", "kd"], "--pretrained_model_name_or_path"),
                                          (["--deme_interval", "0"], "--pretrained_model_name_or_path")])
def test_transfer_needs_a_pretrained_model(extra, needle, tmp_path, capsys):
    from train_scripts_loader import load_train_main

    with pytest.raises(SystemExit):
        load_train_main()(["--dataset_name", "mnist5k", "--output_dir", str(tmp_path), *TINY_RUN, *extra])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.slow
def test_a_bank_of_another_resolution_or_model_type_is_refused(pretrained, bank, tmp_path, capsys):
    from train_scripts_loader import load_train_main

    main = load_train_main()
    for extra, needle in ((["--resolution", "8"], "--resolution"), ([], "dit")):
        model_type = "unet" if not extra else "dit"
        with pytest.raises(SystemExit):
            main(_run(pretrained, tmp_path / "o", "--knowledge_bank", str(bank), "--max_train_steps", "1", *extra,
                      model_type=model_type))
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert needle in err and "bank" in err, err


def test_the_bank_is_read_whole_whatever_max_train_samples(pretrained, bank, tmp_path):
    """--max_train_samples cuts the downstream data, not the knowledge bank (the authors retain the whole bank)."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.loop import data_needs
    from diffusers_ant.training.sources import knowledge_bank_dataloader

    args = parse_args(_run(pretrained, tmp_path / "o", "--knowledge_bank", str(bank), "--max_train_samples", "4"))
    adapter = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained["dit"]))
    loader = knowledge_bank_dataloader(args, adapter, data_needs(args), 4)
    assert len(loader) == 24 // 4  # all 24 bank images in batches of 4 (a cut bank would give 1 batch)
    assert len(knowledge_bank_dataloader(args, adapter, data_needs(args), 4, num_processes=6)) == 6  # one each


@pytest.mark.parametrize("rows, processes", [(25, 1), (4, 7)])
def test_a_bank_too_small_for_a_batch_per_process_is_refused_in_one_line(rows, processes, pretrained, bank, tmp_path):
    """24 bank images: fewer than a bank batch of 25 rows, or than 7 processes x 4 rows. Seven processes divided
    by zero in the bank's stream; one process was told to lower --train_batch_size, the data set's knob."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.loop import data_needs
    from diffusers_ant.training.sources import knowledge_bank_dataloader

    args = parse_args(_run(pretrained, tmp_path / "o", "--knowledge_bank", str(bank)))
    adapter = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained["dit"]))
    with pytest.raises(ValueError) as refused:
        knowledge_bank_dataloader(args, adapter, data_needs(args), rows, num_processes=processes)
    message = str(refused.value)
    assert message.startswith(f"the knowledge bank {bank} has 24 images, fewer than {rows} bank rows") and "\n" not in message
    assert "--num_images" in message and "--bank_fraction" in message


def test_a_bank_of_other_weights_is_refused_in_one_line(pretrained, bank, tmp_path, capsys):
    """The bank records its source model's fingerprint; a run from another DiT of the same type,
    resolution and channels is refused with one line naming the fix."""
    from train_scripts_loader import load_train_main

    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(1)
    other = tmp_path / "other-dit"
    get_model_adapter("dit").load(model_config_name_or_path="tiny", resolution=16, num_channels=1,
                                  num_classes=10).save(str(other))
    with pytest.raises(SystemExit):
        load_train_main()(_run({"dit": other}, tmp_path / "o", "--knowledge_bank", str(bank), "--max_train_steps", "1"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fingerprints differ" in err and "rebuild the bank" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- train_deme.py


def _interval_flags() -> list:
    """TINY_RUN's trainer flags for train_deme's intervals: it sets --num_clusters, the base is pretrained."""
    trainer = list(TINY_RUN)
    for flag in ("--num_clusters", "--model_config_name_or_path"):
        del trainer[trainer.index(flag):trainer.index(flag) + 2]
    return trainer


def _main_result(module, argv, capsys):
    """A script's `main(argv)`: (exit code, stdout, stderr)."""
    try:
        code = module.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_train_deme_interrupted_in_interval_two_continues_there_and_merges(pretrained, tmp_path, capsys, monkeypatch):
    """train_deme.py's own process is this one (its `main`; it runs as a program in the DeMe benchmark's
    quick run): the interval runs it starts are processes, as always, and one of them is killed."""
    import importlib.util

    from trainer_utils import REPO

    spec = importlib.util.spec_from_file_location("train_deme", os.path.join(REPO, "train_scripts", "train_deme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key, value in offline_env().items():  # what the interval processes inherit: offline, one thread
        monkeypatch.setenv(key, value)

    out = tmp_path / "deme"

    def deme_main(num_intervals, *weights):
        argv = ["--pretrained_model_name_or_path", str(pretrained["unet"]), "--num_intervals", str(num_intervals),
                "--output_dir", str(out), "--weights", *weights, "--",
                "--dataset_name", "mnist5k", *_interval_flags(), "--max_train_steps", "6", "--checkpointing_steps", "2"]
        return _main_result(module, argv, capsys)

    monkeypatch.setenv("DIFFUSERS_ANT_DEME_CRASH", "2:4")
    code, _, err = deme_main(3, "0.2", "0.3", "0.5")
    # the run dies while interval 2 writes checkpoint-4 (after checkpoint-2 was complete)
    assert code != 0 and "interval 2 stopped" in err, err[-2000:]
    progress = json.loads((out / "deme_progress.json").read_text())
    assert progress["done"] == [0, 1]
    assert (out / "interval-2" / "checkpoint-2").is_dir() and not (out / "merged").exists()
    finished = {i: (out / f"interval-{i}" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
                for i in (0, 1)}

    monkeypatch.delenv("DIFFUSERS_ANT_DEME_CRASH")
    code, stdout, err = deme_main(3, "0.2", "0.3", "0.5")
    assert code == 0, err[-2000:]
    assert "already trained; continuing with [2]" in stdout
    # the console follows the interval's progress bar (in its log): from the checkpoint it resumed at to the end
    assert "interval 2: step 2/6" in stdout and "interval 2: step 6/6" in stdout, stdout
    assert "resuming from" in (out / "interval-2" / "train.log").read_text()
    for i, mtime in finished.items():  # intervals 0 and 1 were not trained again
        assert (out / f"interval-{i}" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    record = json.loads((out / "merged" / "deme_merge.json").read_text())
    assert record["weights"] == [0.2, 0.3, 0.5] and [f["interval"] for f in record["finetunes"]] == [
        list(b) for b in json.loads((out / "interval-0" / "timestep_intervals.json").read_text())["bounds"]]

    # the same output folder with other settings is refused in one line
    code, _, err = deme_main(4, "0.25", "0.25", "0.25", "0.25")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "num_intervals" in err


@pytest.mark.slow
def test_train_deme_stops_at_the_first_failed_interval_and_a_corrected_command_takes_over(pretrained, tmp_path,
                                                                                          capsys, monkeypatch):
    """An interval that fails stops the command before the next starts (leaving the thread pool waited for
    every queued interval, each failing in turn); and re-running the corrected command in the same folder,
    the advice printed, is not refused as 'another DeMe run' while no interval has finished."""
    from train_scripts_loader import load_script

    module = load_script("train_deme")
    for key, value in offline_env().items():
        monkeypatch.setenv(key, value)

    def deme_main(dataset, num_intervals):
        argv = ["--pretrained_model_name_or_path", str(pretrained["unet"]), "--num_intervals", str(num_intervals),
                "--output_dir", str(tmp_path / "deme"), "--no_merge", "--", "--dataset_name", dataset,
                *_interval_flags(), "--max_train_steps", "1"]
        return _main_result(module, argv, capsys)

    code, stdout, err = deme_main("no-such-dataset", 3)
    assert code != 0 and "interval 0 stopped" in err and "interval 1: training" not in stdout, stdout
    code, stdout, err = deme_main("mnist5k", 1)
    assert code == 0 and "interval 0: done" in stdout, err[-2000:]


def test_train_deme_refuses_flags_it_sets_and_wrong_weights(tmp_path, capsys):
    import importlib.util

    from trainer_utils import REPO

    spec = importlib.util.spec_from_file_location("train_deme", os.path.join(REPO, "train_scripts", "train_deme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--num_intervals", "4"]
    (tmp_path / "a-file").write_text("")
    search = ["--search_dataset_name", "mnist5k", "--search_feature_extractor", "inception"]
    missing = base[:1] + [str(tmp_path / "nowhere")] + base[2:]
    for argv, needle in ((base + ["--", "--deme_interval", "1"], "--deme_interval"),
                         (base + ["--weights", "0.5", "0.5"], "--weights has 2 values"),
                         # files the search needs after hours of training, checked before the first interval
                         (base + search + ["--search_inception_weights", str(tmp_path / "no.safetensors")],
                          "--search_inception_weights"),
                         (missing + ["--weights", "0.25", "0.25", "0.25", "0.25"], "neither a folder nor a Hub id"),
                         (base + ["--output_dir", str(tmp_path / "a-file")], "is a file, not a folder")):
        with pytest.raises(SystemExit):
            module.main(argv)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.slow
def test_controlnet_sudden_convergence_is_tracked_and_resumed(tmp_path, capsys):
    """--track_convergence: every N steps the condition re-extracted from samples is compared with the
    input; the history survives a resume and the first step under the threshold is recorded."""
    out = tmp_path / "cn"
    args = ["--model_type", "controlnet", "--dataset_name", "mnist5k_captions", "--output_dir", str(out), *TINY_RUN,
            "--track_convergence", "--convergence_steps", "1", "--convergence_threshold", "1e9",
            "--checkpointing_steps", "2"]
    train_in_process([*args, "--max_train_steps", "3"])
    record = json.loads((out / "convergence.json").read_text())
    assert [entry["step"] for entry in record["history"]] == [1, 2, 3]
    assert record["converged_step"] == 1  # every distance is below a huge threshold
    train_in_process([*args, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-2"])
    record = json.loads((out / "convergence.json").read_text())
    assert [entry["step"] for entry in record["history"]] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("base", ["controlnet-output", "sd-base"])
def test_controlnet_diff_tuning_with_a_bank_of_its_own_samples(tmp_path, base):
    """A ControlNet bank (samples beside the outlines re-extracted from them) trains through
    --knowledge_bank, and the card records the bank. From a ControlNet output folder, or straight from the
    Stable Diffusion base the run starts from (`--model_type controlnet` on an SD pipeline: a new ControlNet
    copied from its UNet, which adds nothing, so the images are the base's; this was refused, and a bank
    needed a ControlNet folder made beforehand)."""
    from diffusers_ant.diff_tuning import build_knowledge_bank
    from diffusers_ant.diff_tuning.bank import ConditioningImages
    from diffusers_ant.models import get_model_adapter

    pretrained = tmp_path / base
    kind = "controlnet" if base == "controlnet-output" else "sd"
    adapter = get_model_adapter(kind).load(model_config_name_or_path="tiny", resolution=16, num_channels=1)
    adapter.save(str(pretrained))
    bank = tmp_path / "bank"
    conditions = ConditioningImages.from_dataset("mnist5k_captions", "conditioning_image", caption_column="text")
    manifest = build_knowledge_bank(str(pretrained), str(bank), num_images=8, num_inference_steps=2, batch_size=4,
                                    conditioning=conditions, progress=False, model_type="controlnet")
    assert manifest["model_type"] == "controlnet" and manifest["bank_condition"]
    out = tmp_path / "transferred"
    args = ["--model_type", "controlnet", "--dataset_name", "mnist5k_captions", "--output_dir", str(out), *TINY_RUN,
            "--pretrained_model_name_or_path", str(pretrained), "--knowledge_bank", str(bank), "--max_train_steps", "2"]
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    train_in_process(args)
    assert (out / "config.json").is_file() and "knowledge bank of 8 images" in (out / "README.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--retention", "kd", "--bank_fraction", "0.5", "--prediction_type", "sample"],
     r"--retention kd regresses on the pretrained model's own prediction \(epsilon\), and this run trains sample "
     r"\(--prediction_type sample\): drop --prediction_type, or use --retention bank"),
    (["--deme_interval", "0", "--num_clusters", "2", "--prediction_type", "v_prediction"],
     r"DeMe's consistency loss regresses on the pretrained model's own prediction \(epsilon\), and this run trains "
     r"v_prediction .*or pass --consistency_weight 0"),
    # not a teacher, the same mismatch: a LoRA output is sampled with its base's (epsilon) scheduler
    (["--rank", "4", "--prediction_type", "v_prediction"],
     r"a LoRA output samples with its base's scheduler, which predicts epsilon, and this run trains v_prediction "
     r"\(--prediction_type v_prediction\): drop --prediction_type, or train the whole model"),
])
def test_a_teacher_target_in_another_parameterisation_is_refused(tmp_path, extra, message):
    """Diff-Tuning's distillation and DeMe's consistency loss take the pretrained model's raw output as the
    target; an epsilon model's output is no target for a run that trains x0 or v."""
    from trainer_utils import save_lora_base

    base = save_lora_base(tmp_path / "base")
    assert TINY_RUN[:2] == ["--model_config_name_or_path", "tiny"]  # replaced by the pretrained folder
    run = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN[2:], "--max_train_steps", "1",
           "--pretrained_model_name_or_path", str(base), "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(ValueError, match=message):
        train_in_process(run)
    assert not (tmp_path / "out" / "checkpoint-1").exists()
    # without the consistency loss a DeMe fine-tune reads no teacher output: it may train v
    if "--deme_interval" in extra:
        train_in_process([*run, "--consistency_weight", "0"])
        assert (tmp_path / "out" / "model_index.json").is_file()


@pytest.mark.parametrize("extra, what", [
    (["--retention", "kd", "--bank_fraction", "0.5"], "Diff-Tuning's retention"),
    (["--deme_interval", "0", "--num_clusters", "2"], "DeMe's consistency loss"),
])
def test_retention_through_a_new_class_embedding_is_refused(tmp_path, extra, what):
    """A class-conditional run from an unconditional pretrained UNet (--class_column) gets a freshly
    initialised class embedding: the pretrained model has no behaviour for those labels to retain or to be
    consistent with, and a UNet2DModel has no null class to fall back on (the teacher would be the pretrained
    weights under a random class embedding). Refused before anything is written; the plain fine-tune runs."""
    from trainer_utils import save_lora_base

    base = save_lora_base(tmp_path / "base")  # unconditional
    run = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN[2:], "--max_train_steps", "1",
           "--pretrained_model_name_or_path", str(base), "--output_dir", str(tmp_path / "out"), "--class_column", "label"]
    with pytest.raises(ValueError, match=rf"{what} anchors the run to the pretrained UNet, which has no class "
                                         r"embedding, and this run's class embedding \(10 classes\) is new"):
        train_in_process([*run, *extra])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    train_in_process(run)  # fine-tuning alone may start the classes afresh
    assert (tmp_path / "out" / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("class_map", [None, "3,7,1,0,2,4,5,6,8,9"])
def test_distillation_rows_of_a_dit_take_the_null_class_unless_a_class_map_names_the_pretrained_ones(
        pretrained, tmp_path, monkeypatch, class_map):
    """The teacher reads a label row as the pretrained class it was trained on: without --class_map the
    data set's class k is not the pretrained class k, so the distillation rows ask it for its
    unconditional prediction (the null class, as bank rows); with a class map the labels mean the same."""
    seen = record_prepared(monkeypatch, lambda p: (p["task_ids"].clone(), p["conditioning"]["class_labels"].clone()))
    extra = ["--class_map", class_map] if class_map else []
    train_in_process(_run(pretrained, tmp_path / "kd", "--retention", "kd", "--bank_fraction", "0.5",
                          "--max_train_steps", "3", "--num_clusters", "1", *extra))
    retention = torch.cat([labels[task_ids == 1] for task_ids, labels in seen])
    assert retention.numel() == 3 * 4
    null_class = 10
    if class_map is None:
        assert torch.all(retention == null_class)
    else:
        assert (retention != null_class).float().mean() > 0.75  # the mapped rows (DiT's 10% label dropout aside)


def test_a_low_precision_teacher_without_autocast_casts_its_inputs():
    """Under DeepSpeed with bf16 Accelerate's autocast is off and the frozen copy is in bf16: float32 inputs
    met bf16 weights ("Input type (float) and bias type (c10::BFloat16) should be the same") at the first
    distillation step. The teacher casts them as the student's pre-hook does, and predicts what the bf16
    copy predicts on bf16 inputs."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.teacher import make_teacher

    torch.manual_seed(0)
    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1)
    x_t, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    with pytest.raises(RuntimeError, match="should be the same"):
        make_teacher(adapter, torch.bfloat16).predict(x_t, t, {})
    teacher = make_teacher(adapter, torch.bfloat16, cast_inputs=True)
    prediction = teacher.predict(x_t, t, {})
    assert prediction.dtype == torch.float32 and torch.isfinite(prediction).all()
    by_hand = teacher.model(x_t.to(torch.bfloat16), t).sample.float()
    torch.testing.assert_close(prediction, by_hand, rtol=0, atol=0)
