"""`train_scripts/benchmark_engines.py` and the trainer's memory hook (`training/memory_report.py`, issue 18
item 4).

Fast: the hook's counts on a plain optimizer in this process, exact to the byte (parameters, gradients, AdamW's
two moments and step counters; a view of a buffer already counted adds nothing), and the scaling from 2 to N
processes. Slow (and `benchmark`: `make test-benchmarks`): `--quick` under each engine with two processes on
this CPU; the sharded engines must hold about half of what DDP holds where they shard (a hook that counted the
whole tensors, or an engine that did not shard, would give DDP's figure), and exactly DDP's where they do not.
"""

import importlib.util
import json

import pytest
import torch

from train_scripts_loader import load_script

bench = load_script("benchmark_engines")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = "DeepSpeed is not installed (pip install deepspeed)"


def test_the_hook_counts_parameters_gradients_and_adamw_state_exactly(tmp_path):
    from diffusers_ant.training.memory_report import MemoryProbe, union_bytes

    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)  # 32
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    probe = MemoryProbe(optimizer)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the gradients are gone now: the pre-step hook saw them
    counts = probe.counts(params)
    assert counts["model_parameters"] == 4 * n and counts["full_parameter_elements"] == n
    assert counts["master_parameters"] == 0  # the optimizer updates the module's own tensors
    assert counts["gradients"] == 4 * n
    # exp_avg and exp_avg_sq, plus one float32 step counter per parameter tensor
    assert counts["optimizer_state"] == 2 * 4 * n + 4 * len(params)
    assert counts["optimizer_steps_seen"] == 2
    flat = torch.zeros(10)
    assert union_bytes([flat, flat[2:5], flat[8:]]) == 40 and union_bytes([flat[:3], flat[5:]]) == 32


def test_scaling_splits_each_part_into_a_whole_and_a_sharded_share():
    ddp = {"bytes_per_trained_parameter": {"model_parameters": 4.0, "master_parameters": 0.0, "gradients": 4.0,
                                           "optimizer_state": 8.0}}
    zero2 = {"bytes_per_trained_parameter": {"model_parameters": 4.0, "master_parameters": 2.0, "gradients": 2.0,
                                             "optimizer_state": 4.0}}
    assert bench.scaled_per_parameter(ddp, ddp, 8) == pytest.approx(
        {"model_parameters": 4.0, "master_parameters": 0.0, "gradients": 4.0, "optimizer_state": 8.0, "total": 16.0})
    assert bench.scaled_per_parameter(zero2, ddp, 8) == pytest.approx(
        {"model_parameters": 4.0, "master_parameters": 0.5, "gradients": 0.5, "optimizer_state": 1.0, "total": 6.0})


@pytest.mark.parametrize("script", ["benchmark_engines", "check_engine_families"])
def test_a_machine_with_one_gpu_is_refused_in_one_line(script, monkeypatch, capsys):
    """Both scripts launch two processes, one GPU each where there are GPUs: on one GPU process 1 failed on a
    device ordinal it does not have, after the first launch had started. (The GPU count is what is patched.)"""
    module = load_script(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        module.parse_args([])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "two processes, one GPU each, and this machine has 1: run on a machine with two, or on the CPU" in err, err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert module.parse_args([]).output_dir


def test_the_families_check_wraps_each_familys_blocks_and_refuses_unknown_names(capsys):
    """`check_engine_families.py`: FSDP2 wraps the blocks each family's denoiser is made of (a class the model
    lacks would be refused by the trainer), every family trains on captions, DDP (the reference) always runs
    first, and an unknown family, engine or method is one line naming the valid ones."""
    families = load_script("check_engine_families")
    from diffusers_ant.models import get_model_adapter

    for family in families.FAMILIES:
        flags = bench.launcher_flags("fsdp2", family)
        blocks = flags[flags.index("--fsdp_transformer_layer_cls_to_wrap") + 1].split(",")
        config = get_model_adapter(family).load(model_config_name_or_path="tiny", resolution=16).model
        present = {type(m).__name__ for m in config.modules()}
        assert set(blocks) <= present, (family, blocks)
        args = families.trainer_args(family, "base", "uw+pcgrad", "out")
        assert args[args.index("--dataset_name") + 1] == "mnist5k_captions"
        assert "--task_gradient_subset" in args and "--rank" in args
    assert families.parse_args(["--engines", "zero3,fsdp2"]).engines == ["ddp", "zero3", "fsdp2"]
    for flag, value in (("--families", "sd4"), ("--engines", "zero9"), ("--methods", "uw+dwa")):
        with pytest.raises(SystemExit):
            families.parse_args([flag, value])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{flag}: unknown {value}; choose from" in err, err


# ------------------------------------------------------------------------------------ two processes


# four two-process launches (about 2 min): marked `benchmark` too, so `make test` leaves them out
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_engines")
    engines = "ddp,fsdp2,zero2,zero3" if HAS_DEEPSPEED else "ddp,fsdp2"
    bench.main(["--quick", "--engines", engines, "--output_dir", str(out)])
    with open(out / "benchmark_engines.json") as f:
        report = json.load(f)
    return out, report["models"]["sd3"]


def _per_process(result, engine, part):
    return [r[part] for r in result["runs"][engine]["processes"]]


def _about_half(values, whole):
    # the two shards of a flat partition differ by DeepSpeed's alignment padding or FSDP2's uneven dim-0 split
    return all(0.45 * whole <= v <= 0.6 * whole for v in values)


@pytest.mark.slow
@pytest.mark.benchmark
def test_ddp_keeps_everything_whole_on_each_process(quick):
    result = quick[1]
    n = result["engines"]["ddp"]["trained_parameters"]
    for part, size in (("model_parameters", 4 * n), ("gradients", 4 * n)):
        assert _per_process(result, "ddp", part) == [size, size], part
    assert all(8 * n <= v < 9 * n for v in _per_process(result, "ddp", "optimizer_state"))
    assert _per_process(result, "ddp", "master_parameters") == [0, 0]
    assert (quick[0] / "benchmark_engines.md").read_text().startswith(
        "Command: `python train_scripts/benchmark_engines.py --quick")


@pytest.mark.slow
@pytest.mark.benchmark
def test_fsdp2_shards_parameters_gradients_and_state_in_half(quick):
    result = quick[1]
    ddp = result["engines"]["ddp"]["bytes_per_process"]
    for part in ("model_parameters", "gradients", "optimizer_state"):
        assert _about_half(_per_process(result, "fsdp2", part), ddp[part]), part


@pytest.mark.slow
@pytest.mark.benchmark
@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
def test_zero2_shards_gradients_and_state_and_keeps_the_parameters_whole(quick):
    result = quick[1]
    ddp = result["engines"]["ddp"]["bytes_per_process"]
    assert _per_process(result, "zero2", "model_parameters") == [ddp["model_parameters"]] * 2
    for part in ("gradients", "optimizer_state"):
        assert _about_half(_per_process(result, "zero2", part), ddp[part]), part
    # its fp32 master partition: half of a float32 copy of the weights
    assert _about_half(_per_process(result, "zero2", "master_parameters"), ddp["model_parameters"])


@pytest.mark.slow
@pytest.mark.benchmark
@pytest.mark.skipif(not HAS_DEEPSPEED, reason=NO_DEEPSPEED)
def test_zero3_shards_the_parameters_too(quick):
    result = quick[1]
    ddp = result["engines"]["ddp"]["bytes_per_process"]
    for part in ("model_parameters", "gradients", "optimizer_state"):
        assert _about_half(_per_process(result, "zero3", part), ddp[part]), part
    assert result["estimate"]["zero3"]["gb"]["SD3.5-Large"] < result["estimate"]["zero2"]["gb"]["SD3.5-Large"] \
        < result["estimate"]["ddp"]["gb"]["SD3.5-Large"]
