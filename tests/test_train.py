"""End-to-end tests of train_scripts/train_ant.py (issue 4)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from trainer_utils import (REPO, TINY_RUN, assert_same_tensors, failure_output, load_safetensors_dir,
                          offline_env, run_script, train_in_process)

DATASETS = {"unet": "mnist5k", "dit": "mnist5k", "sd": "mnist5k_captions", "controlnet": "mnist5k_captions"}


def _tiny_args(model_type, out, *extra):
    return ["--model_type", model_type, "--dataset_name", DATASETS[model_type], "--output_dir", str(out),
            *TINY_RUN, *extra]


def _sample(model_type, pipe):
    """Two DDPM steps through the pipeline's own __call__, as a diffusers user would call it."""
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np")
    if model_type in ("sd", "controlnet"):
        kwargs["prompt"] = "a handwritten digit 3"
    if model_type == "controlnet":
        kwargs["image"] = Image.new("RGB", (16, 16), "white")
    if model_type in ("unet", "dit"):
        kwargs["batch_size"] = 1
    return torch.as_tensor(pipe(**kwargs).images)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["unet", "dit", "sd", "controlnet"])
def test_each_model_type_full_and_lora_trains_saves_and_samples(model_type, tmp_path):
    """Full training from the tiny preset, then LoRA on top of it; both outputs load in diffusers and sample."""
    from diffusers_ant.models import load_pipeline

    full = tmp_path / "full"
    train_in_process(_tiny_args(model_type, full, "--max_train_steps", "2", "--mtl_method", "uw"))
    # a pipeline folder; a ControlNet is saved alone, as diffusers' train_controlnet.py saves it
    assert (full / ("config.json" if model_type == "controlnet" else "model_index.json")).is_file()
    assert (full / "README.md").is_file() and (full / "samples").is_dir()
    assert not list(full.rglob("*.bin")) and not list(full.rglob("*.pt")), "weights must be safetensors"
    config = json.loads((full / "training_config.json").read_text())
    assert config["mtl_method"] == "uw" and config["model_type"] == model_type
    before = _sample(model_type, load_pipeline(str(full)))

    lora = tmp_path / "lora"
    lora_args = _tiny_args(model_type, lora, "--max_train_steps", "2", "--rank", "4", "--learning_rate", "5e-2",
                           "--mtl_method", "pcgrad")
    lora_args[lora_args.index("--model_config_name_or_path"):lora_args.index("--model_config_name_or_path") + 2] = []
    lora_args += ["--pretrained_model_name_or_path", str(full)]
    train_in_process(lora_args)
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    base_files = {p.name for p in lora.rglob("*.safetensors")}
    assert base_files == {"pytorch_lora_weights.safetensors"}, f"a LoRA run saves adapters only, got {base_files}"
    after = _sample(model_type, load_pipeline(str(lora)))  # the base named in the LoRA folder + adapters
    assert before.shape == after.shape and torch.isfinite(after).all()
    assert (before - after).abs().max() > 0, "the LoRA weights must change the pipeline's output"


@pytest.mark.slow
def test_resume_after_a_crash_during_checkpointing_equals_an_uninterrupted_run(tmp_path, capsys, one_thread):
    """UW (stateful) + EMA: a run killed while writing checkpoint-4 resumes from checkpoint-2 and ends
    with exactly the weights of a run that was never interrupted. Only the crashing run needs a process
    of its own; the other two run in this one, on one thread as the subprocess (OMP_NUM_THREADS=1)."""
    common = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_steps", "6",
              "--checkpointing_steps", "2", "--mtl_method", "uw", "--use_ema", "--lr_scheduler", "cosine",
              "--lr_warmup_steps", "2", "--max_train_samples", "24"]  # 3 batches per epoch: resume crosses an epoch
    straight = tmp_path / "straight"
    train_in_process([*common, "--output_dir", str(straight)])

    crashed = tmp_path / "crashed"
    result = run_script([*common, "--output_dir", str(crashed)],
                        env=offline_env(DIFFUSERS_ANT_CRASH_DURING_CHECKPOINT="4"))
    assert result.returncode == 17, failure_output(result.stderr)
    assert (crashed / "checkpoint-2").is_dir() and not (crashed / "checkpoint-4").exists()
    assert (crashed / "checkpoint-4.tmp").is_dir(), "the crash happened mid-save"

    capsys.readouterr()
    train_in_process([*common, "--output_dir", str(crashed), "--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-2" in out
    assert not (crashed / "checkpoint-4.tmp").exists()
    assert_same_tensors(load_safetensors_dir(straight / "unet"), load_safetensors_dir(crashed / "unet"))
    # the UW log-variances too: they are part of the resumed state
    a = load_safetensors_dir(straight / "checkpoint-4")
    b = load_safetensors_dir(crashed / "checkpoint-4")
    assert any("weighting" in k for k in a)
    assert_same_tensors(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uw", "pcgrad"])
def test_two_process_training_completes(method, tmp_path):
    """72 rows at batch 8 are 9 batches, 4 per process (Accelerate drops the batch that would leave one
    process without a partner): 9 steps take three epochs and end at step 9. Counting 5 per process, the
    trainer once planned two epochs and stopped at step 8. Process 0's outputs are made 8 s slower
    (tests/scripts/instrumented_train.py): process 1 must not wait for them at a barrier, where a multi-GPU run's
    waiting processes met NCCL's timeout during a long upload and aborted the launch. `--ddp_timeout` reaches
    both processes' process group: 1234 s, and 600 s, the value Accelerate's handler drops as its own default
    (gloo then waited torch's 1800 s)."""
    out = tmp_path / method
    timeout = {"uw": 1234, "pcgrad": 600}[method]
    slow = 8.0
    result = run_script(
        ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_samples", "72",
         "--max_train_steps", "9", "--mtl_method", method, "--output_dir", str(out), "--checkpointing_steps", "3",
         "--ddp_timeout", str(timeout)],
        launcher=["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", "0"],  # a free port: others may hold 29500
        env=offline_env(SLOW_FINISH_SECONDS=slow), script=os.path.join(REPO, "tests", "scripts", "instrumented_train.py"))
    assert result.returncode == 0, failure_output(result.stderr)
    returned = [float((out / f"returned_{rank}").read_text()) for rank in (0, 1)]
    assert returned[0] - returned[1] > slow / 2, returned  # process 1 was done while process 0 still wrote
    assert [float((out / f"process_group_timeout_{rank}").read_text()) for rank in (0, 1)] == [timeout] * 2
    assert (out / "model_index.json").is_file()
    assert (out / "checkpoint-9").is_dir(), sorted(p.name for p in out.iterdir())
    # each process saved its own generator state
    assert (out / "checkpoint-3" / "trainer_state_0.json").is_file()
    assert (out / "checkpoint-3" / "trainer_state_1.json").is_file()


@pytest.mark.slow
def test_fewer_batches_than_processes_is_one_line(tmp_path):
    """8 rows at batch 8 on 2 processes: Accelerate's shards drop the one batch, so each process has none
    (the loop divided by zero updates per epoch, a traceback on both processes)."""
    result = run_script(
        ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_samples", "8",
         "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")],
        launcher=["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", "0"],
    )
    assert result.returncode != 0
    # one line from each process that got there (the launcher then reports the failed children, as for any failed
    # run; once one process has failed it stops the other, which a slow machine may not have let print yet)
    assert result.stderr.count("1 full batch of 8, fewer than the 2 processes: lower --train_batch_size") in (1, 2)
    assert "ZeroDivisionError" not in result.stderr


@pytest.mark.slow
def test_a_finished_run_continues_exactly_to_more_steps_and_a_rerun_trains_nothing(tmp_path, capsys):
    """The last step is checkpointed when it falls on the period: rerunning the finished command with
    `--resume_from_checkpoint latest` trains no extra step, and a larger --max_train_steps continues it
    to exactly the weights of one longer run (what pretrain_base.py relies on)."""
    common = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--checkpointing_steps", "2",
              "--mtl_method", "uw", "--use_ema", "--max_train_samples", "24", "--num_validation_images", "1",
              "--resume_from_checkpoint", "latest"]
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    train_in_process([*common, "--output_dir", str(straight), "--max_train_steps", "6"])
    train_in_process([*common, "--output_dir", str(extended), "--max_train_steps", "4"])
    assert (extended / "checkpoint-4").is_dir(), "the final step falls on the period: it is checkpointed"
    at_four = load_safetensors_dir(extended / "unet")
    capsys.readouterr()
    train_in_process([*common, "--output_dir", str(extended), "--max_train_steps", "4"])  # the same command again
    out = capsys.readouterr().out  # resumed (a fresh run would print "saved .../checkpoint-4" too)
    assert "resuming from" in out and "checkpoint-4" in out and "saved" not in out
    assert_same_tensors(at_four, load_safetensors_dir(extended / "unet"))  # no fifth step was taken
    train_in_process([*common, "--output_dir", str(extended), "--max_train_steps", "6"])
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-4" in out
    continued = load_safetensors_dir(extended / "unet")
    assert_same_tensors(load_safetensors_dir(straight / "unet"), continued)
    moved = max((continued[k] - at_four[k]).abs().max().item() for k in at_four)
    assert moved > 1e-6, "steps 5 and 6 changed the weights"


BAD_INVOCATIONS = [
    (["--mtl_method", "uw+dwa"], "two loss-based"),
    (["--mtl_method", "pcgrad+mgda"], "two gradient-based"),
    (["--num_clusters", "0"], "--num_clusters"),
    (["--num_clusters", "5000"], "exceeds"),
    (["--mtl_method", "magic"], "pcgrad"),
    (["--clustering", "kmeans"], "snr"),
    (["--loss_weighting", "focal"], "min_snr"),
    (["--model_type", "vae"], "unet"),
    (["--clustering", "gradient"], "--affinity_file"),
    (["--train_data_dir", "/no/such/folder"], "does not exist"),
    (["--resume_from_checkpoint", "checkpoint-99"], "not found"),
    (["--pretrained_model_name_or_path", "someone/missing-model"], "not found"),
    (["--image_column", "pixels"], "pixels"),
    (["--num_validation_images", "0"], "give 1 or more"),
    # class labels on a text-to-image type were read, collated and never used (sd3 / qwenimage refused them)
    (["--model_type", "sd", "--class_column", "label"], "conditioned on captions, not classes"),
    (["--model_type", "flux", "--num_classes", "10"], "conditioned on captions, not classes"),
]


@pytest.mark.parametrize("extra,needle", BAD_INVOCATIONS)
def test_bad_invocations_exit_with_one_line(extra, needle, tmp_path, capsys):
    from train_scripts_loader import load_train_main

    args = ["--output_dir", str(tmp_path / "out"), *TINY_RUN, "--max_train_steps", "1"]
    if "--pretrained_model_name_or_path" in extra:
        i = args.index("--model_config_name_or_path")
        del args[i:i + 2]
    if "--train_data_dir" not in extra:
        args += ["--dataset_name", "mnist5k"]
    main = load_train_main()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert needle in err, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_empty_image_folder_and_missing_column_errors(tmp_path, capsys):
    from train_scripts_loader import load_train_main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    main = load_train_main()
    with pytest.raises(SystemExit):
        main(["--train_data_dir", str(empty), "--output_dir", str(tmp_path / "o"), *TINY_RUN, "--max_train_steps", "1"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image" in err, err
    with pytest.raises(SystemExit):
        main(["--dataset_name", "mnist5k", "--class_column", "digit", "--num_classes", "10",
              "--output_dir", str(tmp_path / "o"), *TINY_RUN, "--max_train_steps", "1"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "digit" in err and "label" in err, err  # names the column, lists the real ones


def test_bad_invocation_as_a_real_process(tmp_path):
    result = run_script(["--mtl_method", "magic", "--dataset_name", "mnist5k", "--output_dir", str(tmp_path)])
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "magic" in result.stderr
    assert "Traceback" not in result.stderr


def test_lora_needs_a_pretrained_model(tmp_path, capsys):
    from train_scripts_loader import load_train_main

    with pytest.raises(SystemExit):
        load_train_main()(["--dataset_name", "mnist5k", "--rank", "4", "--output_dir", str(tmp_path)])
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err


def test_configuration_saved_without_token(tmp_path):
    out = tmp_path / "run"
    train_in_process(["--model_type", "unet", "--dataset_name", "digits", "--output_dir", str(out), *TINY_RUN,
                      "--max_train_steps", "2", "--mtl_method", "nash_mtl", "--hub_token", "hf_secret_abc123",
                      "--resolution", "8"])
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_secret_abc123" not in path.read_bytes(), f"token leaked into {path}"
    assert json.loads((out / "weighting_config.json").read_text())["name"] == "nash_mtl"
    intervals = json.loads((out / "timestep_intervals.json").read_text())
    assert len(intervals["bounds"]) == 4


def test_a_hub_repo_that_cannot_be_created_stops_the_run_in_one_line_before_training(tmp_path):
    """--push_to_hub creates the repo first: a refused connection (or a bad token, a taken name) is one line
    naming the fix, before anything trains (it was a traceback from the HTTP client)."""
    out = tmp_path / "run"
    env = offline_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
                      HF_HUB_DISABLE_TELEMETRY="1")
    result = run_script(["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_steps", "2",
                         "--output_dir", str(out), "--push_to_hub", "--hub_token", "hf_abcdefghijklmnop"], env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if "could not create the Hub repo" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "hf_abcdefghijklmnop" not in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "model_index.json").exists()


def test_a_failed_upload_says_the_run_is_saved_and_how_to_push_it_again(tmp_path):
    """The Hub refuses the commit at the end: one line (it was the client's traceback) that says the run is
    saved and gives the call that pushes the folder again, never the token; the outputs are all there."""
    from hub_server import FakeHub

    out = tmp_path / "run"
    with FakeHub(max_seconds=600) as hub:  # (as long as the run may take: the `with` stops it anyway)
        hub.state.refuse_commits = True
        env = offline_env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
                          HF_HUB_DISABLE_TELEMETRY="1")
        result = run_script(["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_steps", "1",
                             "--num_validation_images", "1", "--output_dir", str(out), "--push_to_hub",
                             "--hub_model_id", "me/run", "--hub_token", "hf_abcdefghijklmnop"], env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if "upload to 'me/run' failed" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "hf_abcdefghijklmnop" not in result.stderr
    assert f"push_to_hub({str(out)!r}, 'me/run')" in lines[0] and "403" in lines[0], lines[0]
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()


@pytest.mark.slow
def test_train_push_to_hub_reaches_the_loopback_hub_without_the_token(tmp_path):
    """`train_ant.py --push_to_hub` creates the repo and uploads the output folder (no checkpoints)
    through the real huggingface_hub client; the token travels only in the Authorization header.
    Without --hub_model_id the repo is the output folder's name, which the Hub creates under the token's
    user: the repo is created before training (as diffusers' scripts), and the card names the id it got
    (it named the bare folder name, which does not load)."""
    import secrets

    from hub_server import FakeHub

    token = "hf_testtoken" + secrets.token_hex(16)
    out = tmp_path / "ant-tiny"
    with FakeHub(max_seconds=600) as hub:  # (as long as the run may take: the `with` stops it anyway)
        env = offline_env(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
                          HF_HUB_DISABLE_TELEMETRY="1")
        result = run_script(["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--max_train_steps", "2",
                             "--checkpointing_steps", "1", "--mtl_method", "uw", "--output_dir", str(out),
                             "--push_to_hub", "--hub_token", token], env=env)
        assert result.returncode == 0, failure_output(result.stderr)
        state = hub.state
    routes = [(r.method, r.path.split("?")[0]) for r in state.requests]
    assert routes.index(("POST", "/api/repos/create")) < routes.index(("POST", "/api/models/user/ant-tiny/commit/main"))
    uploaded = state.files["user/ant-tiny"]
    card = uploaded["README.md"].decode()
    assert 'from_pretrained("user/ant-tiny")' in card and 'from_pretrained("ant-tiny")' not in card
    assert json.loads(uploaded["training_config.json"])["hub_model_id"] == "user/ant-tiny"
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md",
            "training_config.json", "timestep_intervals.json"} <= set(uploaded)
    assert (out / "checkpoint-1").is_dir() and not any(p.startswith("checkpoint-") for p in uploaded)
    # our requests (the repo's creation and everything under the repo) carry the token in the header;
    # third-party ones may reach the endpoint too (bitsandbytes, imported by peft, asks for
    # kernels-community's CPU kernels when the `kernels` package is installed) and must not carry it
    ours = [r for r in state.requests if "kernels-community" not in r.path]
    assert len(ours) >= 2
    for request in ours:
        assert request.headers.get("authorization") == f"Bearer {token}"
    for request in state.requests:
        assert token.encode() not in request.body and token not in request.path
        assert request in ours or not any(token in str(value) for value in request.headers.values())
    for name, content in uploaded.items():
        assert token.encode() not in content, name
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert token not in result.stdout and token not in result.stderr
