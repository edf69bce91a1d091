"""DeMe in the authors' settings (issue 17 items 7-9; MqLeet/DeMe): projection on by default, their
optimiser as defaults, no decay on projections and norms, the global-range coin per micro-batch and
the antithetic draw, the merge-weight search's defaults, no silent merge, parallel workers, the card."""

import argparse
import subprocess
import sys

import pytest
import torch

from trainer_utils import TRAIN_SCRIPT, offline_env

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _parse(*extra, pretrained=None):
    from diffusers_ant.training.args import parse_args

    return parse_args(["--dataset_name", "mnist5k", *(["--pretrained_model_name_or_path", pretrained] if pretrained else []),
                       *extra])


# ------------------------------------------------------------------------------ item 7: defaults


def test_deme_run_takes_the_authors_optimiser_and_projection_unless_flags_are_given(tmp_path):
    deme = ("--deme_interval", "1", "--num_clusters", "4")
    args = _parse(*deme, pretrained=str(tmp_path))
    assert (args.learning_rate, args.adam_beta1, args.adam_weight_decay) == (5e-5, 0.95, 1e-6)
    assert args.use_ema and args.channel_projection and args.deme_antithetic
    # what the user gives wins, abbreviated or with '=' too
    args = _parse(*deme, "--learn", "1e-3", "--adam_beta1=0.9", "--no-use_ema", "--no_channel_projection",
                  "--no-deme_antithetic", pretrained=str(tmp_path))
    assert (args.learning_rate, args.adam_beta1, args.adam_weight_decay) == (1e-3, 0.9, 1e-6)
    assert not args.use_ema and not args.channel_projection and args.deme_antithetic is False
    # a coin per sample has no pairs to mirror: no antithetic draw by default there, and asking for one is refused
    assert _parse(*deme, "--deme_sampling", "per_sample", pretrained=str(tmp_path)).deme_antithetic is False
    with pytest.raises(ValueError, match="--deme_sampling per_batch"):
        _parse(*deme, "--deme_sampling", "per_sample", "--deme_antithetic", pretrained=str(tmp_path))
    # without --deme_interval nothing changes
    args = _parse()
    assert (args.learning_rate, args.adam_beta1, args.adam_weight_decay, args.use_ema, args.channel_projection,
            args.deme_antithetic) == (1e-4, 0.9, 1e-2, False, False, False)


def test_help_states_the_authors_settings():
    from diffusers_ant.training.args import build_parser

    text = " ".join(build_parser().format_help().split())
    for needle in ("--learning_rate 5e-05", "--adam_beta1 0.95", "--adam_weight_decay 1e-06", "--no-use_ema",
                   "--no_channel_projection", "--no-deme_antithetic", "no weight decay", "once per micro-batch", "lo + hi - t",
                   "skip connections unprojected"):
        assert needle in text, needle


def test_no_channel_projection_without_deme_interval_is_one_line():
    result = subprocess.run([sys.executable, TRAIN_SCRIPT, "--dataset_name", "mnist5k", "--no_channel_projection"],
                            env=offline_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "--no_channel_projection" in lines[0] and "--deme_interval" in lines[0]


def test_projections_and_norms_get_no_weight_decay():
    """A step of AdamW with zero gradients is pure decay: the projection stays the identity and the
    norms' scales stay one, while a convolution's weights shrink by lr x decay."""
    from diffusers_ant.deme import add_channel_projection, channel_projections
    from diffusers_ant.deme.optim import weight_decay_groups
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    model = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1).model
    add_channel_projection(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = weight_decay_groups(model, params)
    assert sum(len(g["params"]) for g in groups) == len(params)
    optimizer = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.5)
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    conv = model.conv_in
    before = conv.weight.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for projection in channel_projections(model).values():
        assert torch.equal(projection.weight, torch.eye(projection.channels))
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    torch.testing.assert_close(conv.weight, before * (1 - 0.1 * 0.5), rtol=0, atol=0)


# ------------------------------------------------------------------------------ item 7: the coin


def test_global_coin_is_flipped_per_micro_batch_of_a_window():
    """A window of 4 micro-batches of 8 rows is drawn in one call: each micro-batch is wholly inside
    the interval or wholly from the whole range, and micro-batches of one window differ."""
    from diffusers_ant.timesteps import IntervalTimestepSampler

    sampler = IntervalTimestepSampler(0, 0, 1000, p_full=0.5, per_batch=True, group_size=8)
    g = torch.Generator().manual_seed(0)
    mixed = 0
    for _ in range(200):
        window = sampler.sample(32, generator=g).view(4, 8)
        inside = (window == 0).all(dim=1)
        assert all(inside[i] or (window[i] > 0).sum() >= 6 for i in range(4))  # never half and half
        mixed += bool(inside.any() and not inside.all())
    assert mixed > 100  # one coin per window would give 0; per micro-batch 1 - 2 / 16 of windows


def test_build_sources_flips_per_micro_batch_and_draws_antithetic_pairs():
    from diffusers_ant import TimestepIntervals
    from diffusers_ant.training.sources import build_sources

    args = argparse.Namespace(diff_tuning=False, deme_interval=1, deme_global_prob=0.3, deme_sampling="per_batch",
                              train_batch_size=6, deme_antithetic=True, consistency_weight=1.0)
    intervals = TimestepIntervals([(0, 249), (250, 499), (500, 749), (750, 999)], 1000)
    (source,) = build_sources(args, intervals, 1000, None)
    assert source.sampler.group_size == 6 and source.sampler.antithetic
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        for mb in source.sampler.sample(24, generator=g).view(4, 6):
            lo, hi = (250, 499) if ((mb >= 250) & (mb <= 499)).all() else (0, 999)
            assert torch.equal(mb[:3] + mb[3:], torch.full((3,), lo + hi))  # t and lo + hi - t


# ------------------------------------------------------------------------------ item 8: no silent merge


def _script(name):
    import importlib.util
    import os

    from trainer_utils import REPO

    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(REPO, "train_scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ties_and_dare_ties_leave_zero_weight_finetunes_out():
    """peft's TIES lets every task vector vote on the signs and count in the disjoint mean whatever its
    weight: with the zero-weight fine-tune left in, [1, 0] is not the merge of the first one alone."""
    from peft.utils import merge_utils

    from diffusers_ant import merge_task_vectors

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=g)}
    a = {"w": base["w"] + torch.randn(64, generator=g)}
    b = {"w": base["w"] + torch.randn(64, generator=g)}
    for method in ("ties", "dare_ties", "dare_linear"):
        alone = merge_task_vectors(base, [a], [1.0], method=method, density=0.5)
        torch.testing.assert_close(merge_task_vectors(base, [a, b], [1.0, 0.0], method=method, density=0.5)["w"],
                                   alone["w"], rtol=0, atol=0)
        assert torch.equal(merge_task_vectors(base, [a, b], [0.0, 0.0], method=method)["w"], base["w"])
    # what the merge gave before: the zero-weight vector in peft's TIES changes the result
    diluted = base["w"] + merge_utils.ties([a["w"] - base["w"], b["w"] - base["w"]], torch.tensor([1.0, 0.0]), 0.5)
    assert not torch.allclose(diluted, merge_task_vectors(base, [a], [1.0], method="ties", density=0.5)["w"])


def test_search_defaults_are_the_authors_values_on_1000_samples_and_sums_above_one():
    from diffusers_ant.deme.search import DEFAULT_SEARCH_SAMPLES, DEFAULT_SEARCH_VALUES, search_merge_weights

    assert tuple(DEFAULT_SEARCH_VALUES) == (0.0, 0.1, 0.2, 0.5, 1.0) and DEFAULT_SEARCH_SAMPLES >= 1000
    target = (1.0, 0.5, 1.0, 0.2)  # sums to 2.7
    result = search_merge_weights(lambda w: sum((x - y) ** 2 for x, y in zip(w, target)), 4, strategy="coordinate")
    assert tuple(result.best_weights) == target and sum(result.best_weights) > 1
    train_deme, merge_deme = _script("train_deme"), _script("merge_deme")
    assert train_deme.build_parser().parse_args(["--pretrained_model_name_or_path", "someone/base", "--output_dir", "o"]
                                                ).search_num_samples >= 1000
    assert merge_deme.build_parser().parse_args(["--base", "b", "--finetuned", "f", "--output_dir", "o"]).num_samples >= 1000


def test_train_deme_refuses_to_merge_with_weights_nobody_chose(capsys):
    train_deme = _script("train_deme")
    parser = train_deme.build_parser()
    args = parser.parse_args(["--pretrained_model_name_or_path", "someone/base", "--output_dir", "o"])
    with pytest.raises(SystemExit):
        train_deme.check(parser, args, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--search_dataset_name" in err[0] and "--weights" in err[0] and "--no_merge" in err[0]


def test_train_deme_reads_trainer_flags_given_with_an_equals_sign(tmp_path, capsys):
    """`-- --clustering=snr` is the user's clustering: train_deme once appended `--clustering timestep` after it
    (argparse keeps the last), and a reserved flag written `--output_dir=...` slipped past the check."""
    train_deme = _script("train_deme")
    parser = train_deme.build_parser()
    args = parser.parse_args(["--pretrained_model_name_or_path", "someone/base", "--output_dir", str(tmp_path), "--no_merge"])
    command = train_deme.interval_command(args, ["--clustering=snr"], 0)
    assert "--clustering=snr" in command and "timestep" not in command
    assert "timestep" in train_deme.interval_command(args, [], 0)  # the paper's equal intervals by default
    with pytest.raises(SystemExit):
        train_deme.check(parser, args, ["--output_dir=elsewhere"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output_dir is set by" in err[0]


def test_train_deme_refuses_a_search_grid_over_the_limit_before_training(capsys):
    """5 values for 4 intervals are 625 grid points, over the default 256: refused when the command starts,
    not after every interval has trained (where merge_finetunes refused it)."""
    train_deme = _script("train_deme")
    parser = train_deme.build_parser()
    flags = ["--pretrained_model_name_or_path", "someone/base", "--output_dir", "o", "--search", "grid",
             "--search_dataset_name", "mnist5k"]
    with pytest.raises(SystemExit):
        train_deme.check(parser, parser.parse_args(flags), [])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "625 evaluations, over --max_evaluations 256" in err[0]
    train_deme.check(parser, parser.parse_args([*flags, "--max_evaluations", "625"]), [])


def _finished_run(train_deme, tmp_path, *flags):
    """train_deme's arguments for a run whose intervals are recorded as trained (only the merge is left)."""
    import json

    parser = train_deme.build_parser()
    (tmp_path / "base").mkdir()
    args = parser.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "base"), "--output_dir",
                              str(tmp_path / "out"), "--num_intervals", "2", *flags])
    train_deme.check(parser, args, [])
    (tmp_path / "out").mkdir()
    settings = {"pretrained_model_name_or_path": args.pretrained_model_name_or_path, "num_intervals": 2, "trainer_args": []}
    (tmp_path / "out" / train_deme.PROGRESS_NAME).write_text(json.dumps({"settings": settings, "done": [0, 1]}))
    return parser, args


def test_train_deme_searches_by_default(tmp_path, monkeypatch):
    import diffusers_ant.deme.merging as merging

    train_deme = _script("train_deme")
    calls = []
    monkeypatch.setattr(merging, "merge_finetunes", lambda *a, **k: calls.append(k))
    parser, args = _finished_run(train_deme, tmp_path, "--search_dataset_name", "mnist5k")
    train_deme.run(parser, args, [])
    (kwargs,) = calls
    assert kwargs["weights"] is None and kwargs["search"] == "coordinate"
    assert list(kwargs["search_values"]) == [0.0, 0.1, 0.2, 0.5, 1.0]
    assert kwargs["evaluation"]["num_samples"] >= 1000 and kwargs["evaluation"]["dataset_name"] == "mnist5k"
    assert kwargs["evaluation"]["feature_extractor"] == "domain"


@pytest.mark.parametrize("flags, message", [
    (["--search_dataset_name", "my/held-out"], "no domain feature extractor for my/held-out"),
    (["--search_train_data_dir", "held-out"], "no domain feature extractor for --search_train_data_dir held-out"),
    (["--search_train_data_dir", "held-out", "--search_feature_extractor", "inception"], "--search_inception_weights"),
])
def test_train_deme_refuses_a_search_it_cannot_score_before_training(flags, message, capsys, tmp_path, monkeypatch):
    """The search's domain FID has classifiers for the built-in sets only: a user's own held-out set failed in
    the merge, after every interval had trained. Refused at the start; inception features pass through."""
    train_deme = _script("train_deme")
    parser = train_deme.build_parser()
    with pytest.raises(SystemExit):
        train_deme.check(parser, parser.parse_args(["--pretrained_model_name_or_path", "someone/base", "--output_dir", "o", *flags]), [])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    monkeypatch.chdir(tmp_path)  # where the held-out folder and the weights file exist (checked as well)
    (tmp_path / "held-out").mkdir()
    (tmp_path / "w").write_text("")
    args = parser.parse_args(["--pretrained_model_name_or_path", "someone/base", "--output_dir", "o",
                              "--search_train_data_dir", "held-out", "--search_feature_extractor", "inception",
                              "--search_inception_weights", "w"])
    train_deme.check(parser, args, [])
    train_deme.check(parser, parser.parse_args(["--pretrained_model_name_or_path", "someone/base", "--output_dir", "o",
                                                "--search_dataset_name", "my/held-out", "--no_merge"]), [])


def test_a_hub_base_trains_every_interval_by_its_id_and_merges_from_its_snapshot(tmp_path, monkeypatch):
    """A Hub id as the base: each interval trains from the Hub id (so the fine-tunes, and the merged folder,
    name it), and the merge reads the base's weights from its snapshot, fetched at the fine-tunes' recorded
    revision into the trainer's --cache_dir (here a Hugging Face cache in huggingface_hub's own layout, read
    offline). The merge failed on a Hub id ('no such folder') after every interval had trained. The interval
    runs are recorded, not run: tiny fine-tunes recording the Hub id stand in for them; the merge is real."""
    import json

    from hub_server import cache_snapshot
    from test_deme import make_finetune

    from diffusers_ant.deme.merging import merge_finetunes
    from diffusers_ant.models import get_model_adapter, load_pipeline

    train_deme = _script("train_deme")
    torch.manual_seed(0)
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(
        str(tmp_path / "base"))
    cache_snapshot(tmp_path / "cache", "someone/tiny-unet", tmp_path / "base")
    assert train_deme.flag_value("--cache_dir", ["--cache_dir", "a", "--cache_dir=b"]) == "b"
    commands = []
    monkeypatch.setattr(train_deme, "run_logged", lambda command, *_: commands.append(command) or 0)
    parser = train_deme.build_parser()
    out = tmp_path / "out"
    args = parser.parse_args(["--pretrained_model_name_or_path", "someone/tiny-unet", "--output_dir", str(out),
                              "--num_intervals", "4", "--no_merge"])
    trainer = ["--cache_dir", str(tmp_path / "cache"), "--dataset_name", "mnist5k"]
    train_deme.check(parser, args, trainer)
    train_deme.run(parser, args, trainer)
    assert len(commands) == 4
    assert all(c[c.index("--pretrained_model_name_or_path") + 1] == "someone/tiny-unet" for c in commands)
    # the fine-tunes as the trainer leaves them: trained from the base, recording the Hub id
    folders = [make_finetune(tmp_path / f"interval-{i}", str(tmp_path / "base"), i, seed=i) for i in range(4)]
    for folder in folders:
        config = json.loads((tmp_path / folder / "training_config.json").read_text())
        (tmp_path / folder / "training_config.json").write_text(
            json.dumps({**config, "pretrained_model_name_or_path": "someone/tiny-unet"}))
    record = merge_finetunes("someone/tiny-unet", folders, str(tmp_path / "merged"), weights=[0.25] * 4,
                             cache_dir=str(tmp_path / "cache"), log=lambda *_: None)
    assert record["base_model"] == "someone/tiny-unet"
    assert load_pipeline(str(tmp_path / "merged")).unet is not None
    with pytest.raises(ValueError, match="neither a folder nor a reachable Hub pipeline"):
        merge_finetunes("someone/tiny-unet", folders, str(tmp_path / "other"), weights=[0.25] * 4,
                        log=lambda *_: None)  # not in the default cache, and offline


def test_a_search_that_returns_the_base_says_no_finetune_helped(tmp_path):
    import json

    from test_deme import make_finetune

    from diffusers_ant.deme.merging import merge_finetunes
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    base = str(tmp_path / "base")
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(base)
    folders = [make_finetune(tmp_path / f"interval-{i}", base, i, seed=i) for i in range(4)]
    said = []
    record = merge_finetunes(base, folders, str(tmp_path / "merged"), search="coordinate",
                             score_fn=lambda w: sum(w), log=said.append)  # every fine-tune makes it worse
    assert record["weights"] == [0.0] * 4 and record["search"]["no_finetune_helped"]
    assert any("no fine-tune helped" in line for line in said)
    assert "no fine-tune helped" in (tmp_path / "merged" / "deme_search.md").read_text().lower()
    assert "no fine-tune helped" in (tmp_path / "merged" / "README.md").read_text()
    assert json.loads((tmp_path / "merged" / "deme_merge.json").read_text())["search"]["no_finetune_helped"]


# ------------------------------------------------------------------------------ item 9: parallel, card


def test_parallel_workers_get_their_own_gpus_and_ports(tmp_path, monkeypatch):
    import threading
    import time

    train_deme = _script("train_deme")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    active, seen, lock = {}, [], threading.Lock()

    def fake_run(command, env, *_):
        port = command[command.index("--main_process_port") + 1]
        devices = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert devices not in active.values() and port not in active  # nothing shared while running
            active[port] = devices
            seen.append((port, devices))
        time.sleep(0.2)
        with lock:
            del active[port]
        return 0

    monkeypatch.setattr(train_deme, "run_logged", fake_run)
    parser = train_deme.build_parser()
    (tmp_path / "base").mkdir()
    args = parser.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "base"), "--output_dir", str(tmp_path / "out"),
                              "--num_intervals", "4", "--parallel", "2", "--no_merge",
                              "--launcher", "accelerate launch --num_processes 2", "--main_process_port", "29600"])
    train_deme.check(parser, args, [])
    train_deme.run(parser, args, [])
    assert len(seen) == 4 and set(seen) <= {("29600", "0,1"), ("29601", "2,3")}
    command = train_deme.interval_command(args, [], 0, worker=1)
    assert command[:4] == ["accelerate", "launch", "--main_process_port", "29601"]
    # more workers than GPUs: refused
    args.parallel = 8
    with pytest.raises(ValueError, match="lower --parallel to at most 4"):
        train_deme.run(parser, args, [])
    # more processes per interval than a worker's share of the GPUs (process 2 of 4 would find none): refused
    args.parallel = 2
    for launcher in ("accelerate launch --num_processes 4", "accelerate launch --num_processes=4",
                     "torchrun --nproc_per_node 3"):
        args.launcher = launcher
        with pytest.raises(ValueError, match=r"starts [34] processes per interval and --parallel 2 gives each worker 2 "
                                             r"of the 4 visible GPUs: launch at most 2"):
            train_deme.run(parser, args, [])
    assert train_deme.launcher_processes("accelerate launch --multi_gpu") is None
    assert train_deme.launcher_processes("accelerate launch --num-processes 4") == 4
    assert train_deme.launcher_processes("accelerate launch --num_processes 8 --num_machines 4") == 2  # per machine
    assert train_deme.launcher_processes("accelerate launch --cpu --num_processes 4") is None  # no GPU wanted


def test_card_of_a_projected_merge_warns_first_and_follows_the_training_config(tmp_path):
    import json

    from test_deme import make_finetune

    from diffusers_ant.deme.merging import merge_finetunes
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    base = str(tmp_path / "base")
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(base)
    folders = []
    for i in range(2):
        folder = make_finetune(tmp_path / f"interval-{i}", base, i, seed=i, projection=True)
        path = tmp_path / f"interval-{i}" / "training_config.json"
        config = json.loads(path.read_text())
        config.update(consistency_weight=0.0, deme_global_prob=0.3, deme_sampling="per_batch", learning_rate=5e-5,
                      adam_beta1=0.95, adam_weight_decay=1e-6, use_ema=True, max_train_steps=100)
        path.write_text(json.dumps(config))
        folders.append(folder)
    from test_deme import INTERVALS  # noqa: F401  (the records say 4 intervals; two fine-tunes suffice)

    merge_finetunes(base, folders, str(tmp_path / "merged"), weights=[0.5, 0.5], log=lambda *_: None)
    card = (tmp_path / "merged" / "README.md").read_text()
    body = card.split("---", 2)[2].strip().splitlines()
    first = "\n".join(line for line in body if line.strip() and not line.startswith("<!--") and "Proofread" not in line)
    head = first.splitlines()[:2]
    assert head[0].startswith("# ") and "diffusers_ant.models.load_pipeline" in head[1] and "drops" in head[1]
    assert "no consistency loss" in card and "consistency loss ||" not in card
    assert "with probability 0.3 (one coin per micro-batch)" in card and "learning rate 5e-05" in card
    assert "main path" in card and "CVPR" in card and "Ning, Xuefei" in card


@pytest.mark.slow
def test_a_checkpoint_written_under_an_old_default_resumes_with_it(tmp_path, caplog):
    """DeMe fine-tunes now draw antithetic pairs by default; a checkpoint written before (off) resumed under
    the new default was refused ('--deme_antithetic: False -> True'), and under train_deme.py adding the flag
    changed its recorded trainer flags too. A flag left at its default now takes the checkpoint's value (and
    says so); one given explicitly is still compared and refused."""
    import json
    import logging

    from trainer_utils import TINY_RUN, save_lora_base, train_in_process

    base = save_lora_base(tmp_path / "base")
    run = ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN[2:], "--pretrained_model_name_or_path",
           str(base), "--deme_interval", "0", "--num_clusters", "2", "--checkpointing_steps", "1",
           "--output_dir", str(tmp_path / "out"), "--num_validation_images", "1"]
    train_in_process([*run, "--max_train_steps", "1", "--no-deme_antithetic"])  # as the old default trained
    with caplog.at_level(logging.INFO):
        train_in_process([*run, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert "--deme_antithetic: False (the checkpoint's" in caplog.text
    config = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state_0.json").read_text())["config"]
    assert config["deme_antithetic"] is False
    # the card describes the DeMe fine-tune it is (it described ANT's "plain diffusion training, one loss over
    # all timesteps"), with the settings the run used, and warns that plain diffusers drops the projections
    card = (tmp_path / "out" / "README.md").read_text()
    assert "DeMe fine-tune of interval 0" in card and "probability 0.3 (one coin per micro-batch)" in card
    assert "antithetic pairs" not in card and "consistency loss against the frozen pretrained model, weight 1" in card
    assert "plain diffusion training" not in card and "Load it with `diffusers_ant.models.load_pipeline`" in card
    with pytest.raises(ValueError, match="deme_antithetic"):
        train_in_process([*run, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--deme_antithetic"])


def test_the_merge_card_claims_deme_settings_only_for_deme_runs_and_the_familys_licence(tmp_path):
    """--timestep_range fine-tunes record the consistency and sampling flags' defaults without using them: the
    card claimed 'consistency loss, weight 1' and 'probability 0.3' for them. And merges were always licensed
    apache-2.0, a FLUX.1-dev merge too."""
    import json
    from types import SimpleNamespace

    from diffusers_ant.deme.card import training_lines, write_deme_model_card

    def finetune(name, **config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "training_config.json").write_text(json.dumps({"consistency_weight": 1.0, "deme_global_prob": 0.3,
                                                                  "learning_rate": 5e-5, **config}))
        return SimpleNamespace(path=str(folder), name=name, bounds=(0, 499), lora=False)

    plain = [finetune("a", timestep_range=[0, 499], deme_interval=None), finetune("b", deme_interval=None)]
    lines = " ".join(training_lines(plain, projection=False))
    assert "--timestep_range" in lines and "consistency loss ||" not in lines and "probability 0.3" not in lines
    assert "learning rate 5e-05" in lines
    deme = [finetune("c", deme_interval=0), finetune("d", deme_interval=1)]
    lines = " ".join(training_lines(deme, projection=True))
    assert "consistency loss ||" in lines and "probability 0.3" in lines and "--timestep_range" not in lines
    card = write_deme_model_card(tmp_path / "merged", base_model="black-forest-labs/FLUX.1-dev", model_type="flux",
                                 denoiser_class="FluxTransformer2DModel", finetunes=deme, num_timesteps=1000,
                                 weights=[0.5, 0.5]).read_text()
    assert "license: other" in card and "apache-2.0" not in card
