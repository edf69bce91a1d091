"""The trainer in the configurations users run (issue 8): gradient accumulation, fp16 through a real
GradScaler, bf16 for every model type, exact mid-epoch resume for every model type, greyscale data on
RGB models, seeds, and the engines it refuses.

Runs are tiny (the `tiny` presets, a handful of steps) and in-process (`train_in_process`)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from diffusers import UNet2DModel
from tolerances import adam_run_tolerance
from trainer_utils import (TINY_RUN, assert_same_tensors, failure_output, largest_difference, largest_gradients,
                           load_safetensors_dir, offline_env, train_in_process)

DATASETS = {"unet": "mnist5k", "dit": "mnist5k", "sd": "mnist5k_captions", "controlnet": "mnist5k_captions"}
ALL_METHODS = ["ls", "uw", "dwa", "rlw", "pcgrad", "nash_mtl", "imtl", "mgda", "cagrad", "uw+pcgrad"]


def _args(model_type, out, *extra, preset="tiny"):
    args = ["--model_type", model_type, "--dataset_name", DATASETS[model_type], "--output_dir", str(out), *TINY_RUN]
    args[args.index("--model_config_name_or_path") + 1] = preset
    return [*args, *extra]


def _model_weights(folder):
    """The trained module's weights of an output folder (the pipeline's denoiser or the LoRA file)."""
    tensors = load_safetensors_dir(folder)
    keep = {k: v for k, v in tensors.items()
            if not k.startswith(("checkpoint-", "vae/", "text_encoder/")) and "samples" not in k}
    assert keep, f"no weights in {folder}"
    return keep


# --------------------------------------------------------------------------- gradient accumulation


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL_METHODS)
def test_accumulating_two_micro_batches_equals_one_batch_of_twice_the_size(method, tmp_path):
    """GA = 2 x B = 4 takes the same updates as GA = 1 x B = 8 on the same samples, timesteps and noise:
    the task losses, task gradients and weights are those of the whole window, chosen once per update.

    Adam's epsilon is large so that the update is a smooth function of the gradient (the chunked
    window sums the same per-sample gradients in another order: float rounding, not a new step). The
    bound is tests/tolerances.py's `adam_run_tolerance`: each step's gradient rounding over the window's 8
    samples x positions and the UNet's layers, and its clipping coefficient's, scaled by the largest gradient
    entry that step applied (recorded), carried through Adam's averages at lr 1e-2, epsilon 1; about 2e-5
    here (observed: 1.5e-8 at most), where the updates move the weights by more than 1e-3."""
    options = {"nash_mtl": '{"update_every": 2}'}.get(method)
    common = ["--mtl_method", method, "--max_train_steps", "3", "--adam_epsilon", "1", "--learning_rate", "1e-2",
              "--max_train_samples", "48", "--num_validation_images", "1"]
    if options:
        common += ["--mtl_options", options]
    one_batch = tmp_path / "one"
    with largest_gradients() as applied:
        train_in_process(_args("unet", one_batch, *common, "--train_batch_size", "8"))
    window = tmp_path / "window"
    train_in_process(_args("unet", window, *common, "--train_batch_size", "4", "--gradient_accumulation_steps", "2"))

    a, b = _model_weights(one_batch / "unet"), _model_weights(window / "unet")
    unet = UNet2DModel.from_pretrained(one_batch / "unet")
    window_terms = 8 * unet.config.sample_size ** 2  # samples x positions a weight gradient sums
    assert len(applied) == 3
    tensors = [p.numel() for p in unet.parameters()]
    tolerance = adam_run_tolerance(unet, applied, window_terms, 1e-2, 1.0, max(float(v.abs().max()) for v in a.values()),
                                   clip_norm_terms=max(tensors) + len(tensors) + 1)
    print(f"window - one batch: {largest_difference(a, b):.3g} (tolerance {tolerance:.3g})")
    assert_same_tensors(a, b, atol=tolerance)
    # not a trivial comparison: the three updates moved the weights far more than the tolerance
    fresh = tmp_path / "fresh"
    train_in_process(_args("unet", fresh, *common, "--train_batch_size", "8", "--max_train_steps", "1",
                           "--learning_rate", "1e-12"))
    moved = max((a[k] - v).abs().max().item() for k, v in _model_weights(fresh / "unet").items())
    assert moved > 1e-3, moved


# --------------------------------------------------------------------------- fp16 through a real GradScaler


@pytest.fixture
def cpu_fp16(monkeypatch):
    """Accelerate refuses fp16 autocast on the CPU; give its Accelerator what it builds on a GPU: native
    autocast (torch's CPU autocast handles float16) and a real `torch.amp.GradScaler`."""
    import accelerate

    original = accelerate.Accelerator.__init__
    scalers = []

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.mixed_precision == "fp16" and self.device.type == "cpu":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            scalers.append(self.scaler)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", init)
    return scalers


def test_fp16_where_accelerate_has_no_fp16_autocast_is_one_line(tmp_path, capsys):
    """On the CPU Accelerate runs no fp16 autocast and no GradScaler: a LoRA run's fp16 base met float32 inputs and
    ended at its first step in "mat1 and mat2 must have the same dtype" (a README command did, on this CPU). One
    line before anything loads, run as a user runs it; bf16 trains."""
    from trainer_utils import run_script

    result = run_script(_args("unet", tmp_path / "fp16", "--max_train_steps", "1",
                              "--mixed_precision", "fp16"), env=offline_env())
    err = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, failure_output(result.stderr)
    assert err[-1] == ("train_ant.py: error: --mixed_precision fp16 on the CPU: Accelerate runs no fp16 autocast or "
                       "loss scaling there; use --mixed_precision bf16 (or no) on a CPU, fp16 on a GPU"), err[-3:]
    assert not (tmp_path / "fp16" / "checkpoint-1").exists()


def test_apples_mps_device_is_one_line_naming_the_cpu(tmp_path):
    """MPS has no float64, which every step's per-cluster loss sums use: the first step failed allocating one.
    Accelerate's own device override (ACCELERATE_TORCH_DEVICE, read by its state) puts this CPU run on "mps", as
    a Mac's default would; refused before anything loads."""
    from trainer_utils import run_script

    result = run_script(_args("unet", tmp_path / "mps", "--max_train_steps", "1"),
                        env=offline_env(ACCELERATE_TORCH_DEVICE="mps"))
    err = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, failure_output(result.stderr)
    assert err[-1] == ("train_ant.py: error: Apple's MPS device has no float64, which the per-cluster loss statistics "
                       "of every step use: train on the CPU (accelerate launch --cpu train_scripts/train_ant.py ...) "
                       "or a CUDA GPU"), err[-3:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pcgrad", "nash_mtl", "uw", "uw+pcgrad"])
def test_fp16_with_a_real_grad_scaler_trains_like_fp32(method, tmp_path, cpu_fp16):
    common = ["--mtl_method", method, "--max_train_steps", "3", "--adam_epsilon", "1", "--learning_rate", "1e-2",
              "--max_train_samples", "32", "--num_validation_images", "1"]
    train_in_process(_args("unet", tmp_path / "fp32", *common))
    train_in_process(_args("unet", tmp_path / "fp16", *common, "--mixed_precision", "fp16"))
    # the run used the GradScaler: its scale was set up by a scale() call (get_scale() alone answers the initial
    # scale of a scaler never used) and its growth tracker counted the steps it let through (3, no overflow)
    scaler = cpu_fp16[-1] if cpu_fp16 else None
    assert scaler is not None and scaler._scale is not None and int(scaler._growth_tracker) == 3, \
        "the run must have used the GradScaler"
    fp32, fp16 = _model_weights(tmp_path / "fp32" / "unet"), _model_weights(tmp_path / "fp16" / "unet")
    train_in_process(_args("unet", tmp_path / "start", *common, "--max_train_steps", "1", "--learning_rate", "1e-12"))
    start = _model_weights(tmp_path / "start" / "unet")
    moved = sum((fp32[k] - start[k]).float().norm() ** 2 for k in fp32) ** 0.5
    gap = sum((fp32[k] - fp16[k]).float().norm() ** 2 for k in fp32) ** 0.5
    # fp16 autocast rounds activations; the updates must still be those of fp32 training, not
    # divided by the loss scale (2**10) nor lost to underflow
    assert moved > 1e-2 and gap < 0.1 * moved, (moved, gap)


# --------------------------------------------------------------------------- bf16 for every model type


@pytest.mark.slow
@pytest.mark.parametrize("model_type,preset", [("unet", "tiny"), ("dit", "tiny"), ("dit", "tiny-latent"),
                                               ("sd", "tiny"), ("controlnet", "tiny")])
def test_bf16_end_to_end_with_validation(model_type, preset, tmp_path):
    out = tmp_path / "bf16"
    train_in_process(_args(model_type, out, "--mixed_precision", "bf16", "--max_train_steps", "2",
                           "--validation_steps", "1", "--mtl_method", "uw", preset=preset))
    assert (out / "samples" / "step-1.png").is_file() and (out / "samples" / "step-2.png").is_file()
    assert (out / "README.md").is_file()
    for name, tensor in load_safetensors_dir(out).items():
        if tensor.is_floating_point() and not name.startswith("checkpoint-"):
            assert tensor.dtype == torch.float32, f"{name} saved as {tensor.dtype}"
            assert torch.isfinite(tensor).all(), name


# --------------------------------------------------------------------------- exact mid-epoch resume


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    """A pretrained tiny Stable Diffusion pipeline folder (RGB) for LoRA runs."""
    from diffusers_ant.models import get_model_adapter

    folder = tmp_path_factory.mktemp("tiny-sd")
    adapter = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16, num_channels=3)
    adapter.save(str(folder))
    return folder


RESUME_CASES = {
    "unet": ("unet", "tiny", []),
    "dit-pixel": ("dit", "tiny", []),
    "dit-latent": ("dit", "tiny-latent", []),
    "sd-lora": ("sd", None, ["--rank", "4"]),
    "sd-lora-text-encoder": ("sd", None, ["--rank", "4", "--train_text_encoder"]),
    "controlnet": ("controlnet", "tiny", []),
    # ANT's combined configuration: UW and PCGrad together, P2 inside the task losses, on the cheap engine
    "unet-uw+pcgrad-p2-last_layers": ("unet", "tiny", ["--mtl_method", "uw+pcgrad", "--loss_weighting", "p2",
                                                       "--task_gradients", "last_layers"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_twenty_steps_equal_ten_then_resume_mid_epoch_then_ten(case, tmp_path, tiny_sd_folder, capsys):
    """With EMA and a stateful weighting (UW), for every model type: the resumed run ends with exactly
    the weights of the uninterrupted one. 24 samples at batch 8 make 3 batches an epoch, so step 10
    is in the middle of the fourth epoch."""
    model_type, preset, extra = RESUME_CASES[case]
    common = ["--mtl_method", "uw", "--use_ema", "--checkpointing_steps", "10", "--max_train_samples", "24",
              "--num_validation_images", "1", *extra]

    def args(out, steps, *more):
        a = _args(model_type, out, *common, "--max_train_steps", str(steps), *more, preset=preset or "tiny")
        if preset is None:  # LoRA on a pretrained pipeline
            i = a.index("--model_config_name_or_path")
            del a[i:i + 2]
            a += ["--pretrained_model_name_or_path", str(tiny_sd_folder)]
        return a

    straight = tmp_path / "straight"
    train_in_process(args(straight, 20))
    resumed = tmp_path / "resumed"
    train_in_process(args(resumed, 11))  # checkpoint-10 written, then one more step: interrupted there
    capsys.readouterr()
    train_in_process(args(resumed, 20, "--resume_from_checkpoint", "checkpoint-10"))
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-10" in out
    a, b = _model_weights(straight), _model_weights(resumed)
    assert_same_tensors(a, b)
    if "--rank" in extra:
        # a LoRA checkpoint holds the adapters only, not the frozen base (diffusers' LoRA scripts)
        checkpoint = straight / "checkpoint-10"
        assert not list(checkpoint.glob("model*.safetensors"))
        from safetensors.torch import load_file

        keys = list(load_file(checkpoint / "trainable_state.safetensors"))
        assert keys and all("lora_" in k for k in keys), keys[:5]
    # the weighting's, EMA's and the generator's state at the end are the same too (checkpoint-20, which the
    # resumed run wrote after resuming; checkpoint-10 of both folders came from runs that never resumed)
    assert_same_tensors(load_safetensors_dir(straight / "checkpoint-20"), load_safetensors_dir(resumed / "checkpoint-20"))


# --------------------------------------------------------------------------- channels


@pytest.mark.slow
def test_greyscale_data_on_a_pretrained_rgb_model_is_converted(tmp_path, tiny_sd_folder, monkeypatch):
    """An SD LoRA on mnist5k_captions (greyscale) trains on the RGB pipeline: images become RGB, three equal
    channels, before they reach the VAE."""
    from trainer_utils import record_batches

    seen = record_batches(monkeypatch, lambda objective, batch: batch["pixel_values"].clone())
    out = tmp_path / "lora"
    args = _args("sd", out, "--rank", "4", "--max_train_steps", "1")
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    train_in_process([*args, "--pretrained_model_name_or_path", str(tiny_sd_folder)])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert seen and all(p.shape[1] == 3 and torch.equal(p[:, 0], p[:, 1]) and torch.equal(p[:, 1], p[:, 2])
                        for p in seen)


@pytest.mark.slow
def test_bf16_lora_keeps_the_frozen_base_in_bf16_and_trains(tmp_path, tiny_sd_folder, monkeypatch):
    from trainer_utils import record_batches

    def dtypes(objective, batch):  # the UNet's frozen base and LoRA weights while the run trains
        named = dict(objective.adapter.model.named_parameters())
        return ({named[n].dtype for n in named if "lora_" not in n and n.endswith("conv_in.base_layer.weight")
                 or n.endswith("conv_in.weight")},
                {p.dtype for n, p in named.items() if "lora_" in n})

    seen = record_batches(monkeypatch, dtypes)
    out = tmp_path / "lora-bf16"
    args = _args("sd", out, "--rank", "4", "--max_train_steps", "2", "--mixed_precision", "bf16",
                 "--validation_steps", "1", "--checkpointing_steps", "1")
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    train_in_process([*args, "--pretrained_model_name_or_path", str(tiny_sd_folder)])
    from safetensors.torch import load_file

    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(t.dtype == torch.float32 for t in lora.values())
    assert (out / "samples" / "step-1.png").is_file()
    assert seen and all(base == {torch.bfloat16} and adapters == {torch.float32} for base, adapters in seen), seen[:1]
    # it trained: peft starts each B (diffusers' lora.up) at zero, and two steps moved them
    assert max(float(t.abs().max()) for k, t in lora.items() if "lora.up" in k or "lora_B" in k) > 0


@pytest.mark.slow
def test_text_encoder_lora_trains_and_loads_the_diffusers_way(tmp_path, tiny_sd_folder):
    """--train_text_encoder: the text encoder's LoRA is trained (pcgrad: through the engine), saved in
    diffusers' LoRA file beside the UNet's and loaded by `load_lora_weights`."""
    from diffusers_ant.models import load_pipeline

    out = tmp_path / "te"
    args = _args("sd", out, "--rank", "4", "--train_text_encoder", "--max_train_steps", "3", "--learning_rate", "5e-2",
                 "--mtl_method", "pcgrad")
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    train_in_process([*args, "--pretrained_model_name_or_path", str(tiny_sd_folder)])
    from safetensors.torch import load_file

    keys = list(load_file(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    trained, base = load_pipeline(str(out)), load_pipeline(str(tiny_sd_folder))
    ids = base.tokenizer(["a handwritten digit 3"], padding="max_length", max_length=base.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (trained.text_encoder(ids)[0] - base.text_encoder(ids)[0]).abs().max().item()
    assert difference > 1e-4, difference


def test_frozen_base_weights_are_cast_but_not_norms_or_trainable_ones():
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training.precision import cast_frozen_parameters

    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1)
    adapter.add_lora(4)
    assert cast_frozen_parameters(adapter.model, torch.bfloat16) > 0
    for name, p in adapter.model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and "lora_" in name, name
        elif "norm" in name:
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == torch.bfloat16, name


def test_channels_from_the_image_modes_not_the_first_row():
    import datasets
    from PIL import Image

    from diffusers_ant.data import dataset_image_channels

    grey = [Image.new("L", (4, 4), 3) for _ in range(9)]
    mixed = datasets.Dataset.from_dict({"image": grey + [Image.new("RGB", (4, 4), (1, 2, 3))]},
                                       features=datasets.Features({"image": datasets.Image()}))
    assert dataset_image_channels(mixed, "image") == 3
    only_grey = datasets.Dataset.from_dict({"image": grey}, features=datasets.Features({"image": datasets.Image()}))
    assert dataset_image_channels(only_grey, "image") == 1
    # 16-bit greyscale in big-endian byte order (a TIFF's) is greyscale too (it built an RGB model)
    big_endian = datasets.Dataset.from_dict({"image": [Image.new("I;16B", (4, 4), 3)]},
                                            features=datasets.Features({"image": datasets.Image()}))
    assert big_endian[0]["image"].mode == "I;16B" and dataset_image_channels(big_endian, "image") == 1


# --------------------------------------------------------------------------- seeds and EMA


def test_seeds_reach_the_method_and_a_missing_seed_is_drawn_and_recorded(tmp_path):
    base = [a for a in _args("unet", tmp_path / "x", "--max_train_steps", "1", "--mtl_method", "rlw",
                             "--num_validation_images", "1")]
    i = base.index("--seed")
    del base[i:i + 2]

    def run(name, *seed):
        out = tmp_path / name
        args = list(base)
        args[args.index("--output_dir") + 1] = str(out)
        train_in_process([*args, *seed])
        config = json.loads((out / "training_config.json").read_text())
        weighting = json.loads((out / "weighting_config.json").read_text())
        return config["seed"], weighting["seed"], _model_weights(out / "unet")

    seed_a, method_a, weights_a = run("a", "--seed", "3")
    seed_b, method_b, weights_b = run("b", "--seed", "4")
    assert (seed_a, method_a) == (3, 3) and (seed_b, method_b) == (4, 4)
    drawn_1, method_1, _ = run("c")
    drawn_2, _, _ = run("d")
    assert isinstance(drawn_1, int) and drawn_1 == method_1
    assert drawn_1 != drawn_2  # drawn afresh (a 1 in 2**31 chance of a false failure)


def test_ema_is_moved_to_the_device_after_its_state_is_loaded():
    """On a GPU, loading EMA's state puts the shadow weights on the CPU: the move must come after the
    load (a CPU machine cannot see the devices differ, so the order itself is checked)."""
    from diffusers.training_utils import EMAModel

    from diffusers_ant.training.ema import restore_ema

    calls = []

    class Recording(EMAModel):
        def load_state_dict(self, state):
            calls.append("load")
            return super().load_state_dict(state)

        def to(self, *args, **kwargs):
            calls.append("to")
            return super().to(*args, **kwargs)

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    ema = Recording(params, decay=0.9)
    state = ema.state_dict()
    state["shadow_params"] = [p + 1 for p in state["shadow_params"]]
    restore_ema(ema, state, torch.device("cpu"))
    assert calls == ["load", "to"]
    assert torch.equal(ema.shadow_params[0], params[0].detach() + 1)


def test_rlw_weights_differ_between_seeds():
    from diffusers_ant.weighting import get_weighting

    losses = torch.ones(5)
    a = get_weighting("rlw", 5, seed=0)
    b = get_weighting("rlw", 5, seed=1)
    a.combine(losses)
    b.combine(losses)
    assert not torch.allclose(a.last_weights, b.last_weights)


# --------------------------------------------------------------------------- engines refused


def _fake_accelerator(kind):
    from accelerate.utils import DistributedType

    return types.SimpleNamespace(distributed_type=getattr(DistributedType, kind))


def test_gradient_methods_are_refused_under_xla_and_outside_the_lora_subset_of_fsdp_and_zero():
    """Plain data parallelism runs a gradient method on any subset; FSDP and DeepSpeed ZeRO-1/2/3 only on the
    LoRA subset (`--task_gradient_subset lora`), an engine the trainer does not know (XLA) not at all. Loss-based methods and vanilla training run under every engine."""
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.components import check_distributed_support
    from diffusers_ant.weighting import get_weighting

    plain = types.SimpleNamespace(mtl_method="pcgrad", gradient_accumulation_steps=1)
    lora = types.SimpleNamespace(mtl_method="pcgrad", gradient_accumulation_steps=1, task_gradient_subset="lora",
                                 task_gradients="split", mixed_precision="no")
    for ok in ("NO", "MULTI_CPU", "MULTI_GPU"):
        check_distributed_support(_fake_accelerator(ok), plain, get_weighting("pcgrad", 4))
    with pytest.raises(UsageError, match="runs on one process, plain data parallelism .* FSDP or DeepSpeed, "
                                         "not under XLA"):
        check_distributed_support(_fake_accelerator("XLA"), plain, get_weighting("pcgrad", 4))
    for name, accelerator in (("FSDP", _fake_accelerator("FSDP")), ("DeepSpeed ZeRO-2", _fake_deepspeed(2)),
                              ("DeepSpeed ZeRO-3", _fake_deepspeed(3))):
        with pytest.raises(UsageError, match=f"under {name} needs --task_gradient_subset lora"):
            check_distributed_support(accelerator, plain, get_weighting("pcgrad", 4))
        check_distributed_support(accelerator, lora, get_weighting("pcgrad", 4))  # the LoRA subset: accepted
    for kind in ("DEEPSPEED", "FSDP", "XLA"):
        accelerator = _fake_deepspeed(3) if kind == "DEEPSPEED" else _fake_accelerator(kind)
        check_distributed_support(accelerator, _ds_args(), get_weighting("ls", 4))
        check_distributed_support(accelerator, _ds_args(), None)


def test_a_gradient_method_runs_under_zero2_and_zero3_on_the_lora_subset_only():
    """One line each, naming the engine and the flag (moved from tests/test_deepspeed.py: fakes only, so it
    runs without DeepSpeed installed)."""
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.components import check_distributed_support
    from diffusers_ant.weighting import get_weighting

    lora = dict(task_gradient_subset="lora", task_gradients="split", mixed_precision="no", gradient_accumulation_steps=2)
    for method in ("pcgrad", "uw+pcgrad"):
        for stage in (2, 3):
            check_distributed_support(_fake_deepspeed(stage), types.SimpleNamespace(mtl_method=method, **lora),
                                      get_weighting(method, 4))
    cases = [(2, {"task_gradient_subset": None}, "--mtl_method pcgrad (gradient-based) under DeepSpeed ZeRO-2 needs "
              "--task_gradient_subset lora"),
             (3, {"task_gradient_subset": None}, "--mtl_method pcgrad (gradient-based) under DeepSpeed ZeRO-3 needs "
              "--task_gradient_subset lora"),
             (3, {"task_gradients": "batched"}, "under DeepSpeed ZeRO-3 runs with --task_gradients split only"),
             (2, {"task_gradients": "batched"}, "under DeepSpeed ZeRO-2 runs with --task_gradients split only")]
    for stage, change, words in cases:
        with pytest.raises(UsageError) as error:
            check_distributed_support(_fake_deepspeed(stage), types.SimpleNamespace(mtl_method="pcgrad", **{**lora, **change}),
                                      get_weighting("pcgrad", 4))
        assert words in str(error.value) and "\n" not in str(error.value)


def test_a_gradient_method_under_a_sharded_engine_runs_in_bf16_and_is_refused_in_fp16_and_with_an_offloaded_optimizer():
    """float32 or bf16 (the two-process bf16 runs are tests/test_fsdp.py's and tests/test_deepspeed.py's), never
    fp16, whichever way the precision is set: the flag, `accelerate launch --mixed_precision` or an accelerate
    config (Accelerate's `mixed_precision`, the flag left at its default None), a DeepSpeed config's enabled
    fp16 / bf16 block. And no DeepSpeed optimizer offload (it counts micro-steps, the gradient path hands the
    engine one backward per window). One line each, naming the engine and the flag."""
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.sharding import check_task_gradient_engine

    lora = dict(mtl_method="pcgrad", task_gradient_subset="lora", task_gradients="split", mixed_precision=None)

    def fsdp(precision):
        accelerator = _fake_accelerator("FSDP")
        accelerator.mixed_precision = precision
        return accelerator

    def zero2(precision="no", **config):
        accelerator = _fake_deepspeed(2, **config)
        accelerator.mixed_precision = precision
        return accelerator

    check_task_gradient_engine(fsdp("no"), types.SimpleNamespace(**lora))
    check_task_gradient_engine(zero2(bf16={"enabled": "auto"}, zero_optimization={
        "stage": 2, "offload_optimizer": {"device": "none"}}), types.SimpleNamespace(**lora))
    for accelerator, change in ((fsdp("bf16"), {}), (fsdp("no"), {"mixed_precision": "bf16"}), (zero2("bf16"), {}),
                                (zero2(bf16={"enabled": True}), {})):
        check_task_gradient_engine(accelerator, types.SimpleNamespace(**{**lora, **change}))
    refused = [(fsdp("fp16"), {}, "under FSDP runs in float32 or bf16 (this run computes in fp16, from "),
               (fsdp("no"), {"mixed_precision": "fp16"}, "under FSDP runs in float32 or bf16 (this run computes in fp16"),
               (zero2("fp16"), {}, "under DeepSpeed ZeRO-2 runs in float32 or bf16 (this run computes in fp16"),
               (zero2(fp16={"enabled": True}), {}, "under DeepSpeed ZeRO-2 runs in float32 or bf16 (this run computes "
                "in fp16, from --mixed_precision, the launcher or the DeepSpeed config): use --mixed_precision bf16 or no"),
               (zero2(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}), {},
                "under DeepSpeed ZeRO-2 does not run with offload_optimizer in the DeepSpeed config")]
    for accelerator, change, words in refused:
        with pytest.raises(UsageError) as error:
            check_task_gradient_engine(accelerator, types.SimpleNamespace(**{**lora, **change}))
        assert words in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_gradient_method_under_a_sharded_engine_is_refused_before_any_data_or_model_is_loaded(monkeypatch, tmp_path):
    """The refusal comes right after the accelerator is built (beside `check_fsdp_support`), not after the data
    set and the models have been loaded: the engine is made to read as FSDP and loading the data fails the test."""
    import diffusers_ant.data as data
    import diffusers_ant.training.loop  # noqa: F401  (its modules bind the real engine_kind before the patch)
    import diffusers_ant.training.sharding as sharding
    from diffusers_ant.training.args import UsageError
    from trainer_utils import TINY_RUN, train_in_process

    monkeypatch.setattr(sharding, "engine_kind", lambda accelerator: "FSDP")

    def loaded(*args, **kwargs):
        raise AssertionError("the data set was loaded before the refusal")

    monkeypatch.setattr(data, "load_training_dataset", loaded)  # (the trainer imports it when it starts)
    with pytest.raises(UsageError, match="under FSDP needs --task_gradient_subset lora") as error:
        train_in_process(["--model_type", "unet", "--dataset_name", "mnist5k", "--output_dir", str(tmp_path),
                          *TINY_RUN, "--mtl_method", "pcgrad", "--max_train_steps", "1"])
    assert "\n" not in str(error.value)


class _FakeDeepSpeedEngine(torch.nn.Module):
    """What the trainer calls on a DeepSpeed engine, recorded: the accumulation boundary, backward, step."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, []

    def set_gradient_accumulation_boundary(self, value):
        self.calls.append(("boundary", bool(value)))

    def backward(self, loss, scale_wrt_gas=True):
        self.calls.append(("backward", scale_wrt_gas))
        loss.backward()

    def step(self):
        self.calls.append(("step",))


def _deepspeed_gradient_step(poison=None):
    """One window of two micro-batches of 2 samples (two chunks) through `training_step` under a fake DeepSpeed
    accelerator, PCGrad on a linear model whose update goes to the engine by `DeepSpeedUpdate`. `poison`: a
    sample whose loss is inf."""
    from accelerate.utils import DistributedType

    from diffusers_ant.training.sharding import DeepSpeedUpdate
    from diffusers_ant.training.step import training_step
    from diffusers_ant.weighting import TaskGradientEngine, get_weighting

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    ds_engine = _FakeDeepSpeedEngine(module)
    x, task_ids = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])

    class Objective:
        def prepare(self, batches, generator, chunk_size=None):
            return {"task_ids": task_ids}

        def loss_fn(self, model, prepared):
            def fn(idx=None):
                idx = torch.arange(4) if idx is None else idx
                losses = model(x[idx]).squeeze(1) ** 2
                if poison is not None:
                    losses = losses * torch.where(idx == poison, float("inf"), 1.0)  # an inf gradient too
                return losses
            return fn

        def task_groups(self):
            return torch.zeros(2, dtype=torch.long)

    accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, unwrap_model=lambda m: m.module,
                                        backward=ds_engine.backward, optimizer_step_was_skipped=False)
    engine = TaskGradientEngine(module.parameters(), write_update=DeepSpeedUpdate(ds_engine))
    batches = [{"pixel_values": torch.zeros(2, 1, 2, 2)}, {"pixel_values": torch.zeros(2, 1, 2, 2)}]
    logs = training_step(accelerator, Objective(), ds_engine, batches, None, 2, weighting=get_weighting("pcgrad", 2),
                         engine=engine)
    return accelerator, engine, ds_engine, logs


def test_a_gradient_method_under_deepspeed_marks_only_its_one_backward_as_the_accumulation_boundary():
    """The per-cluster passes do not go through the engine; the update does, in one backward that closes the
    window: boundary set, backward without the division by the accumulation steps, one step. No chunk-wise
    `EngineBackward` is built for the gradient path (it would mark a boundary nothing uses)."""
    _, _, ds_engine, logs = _deepspeed_gradient_step()
    assert not bool(logs["found_inf"])
    assert ds_engine.calls == [("boundary", True), ("backward", False), ("step",)]


def test_a_deepspeed_window_whose_task_gradients_overflow_is_a_skipped_update():
    """An inf loss: nothing is handed to DeepSpeed (no backward, no step, so neither the weights nor its LR
    schedule move), and the loop treats the window as a skipped update, as the GradScaler's under DDP (no EMA
    step, logged as skipped, the weighting's state put back)."""
    from diffusers_ant.training.loop import update_skipped

    accelerator, engine, ds_engine, logs = _deepspeed_gradient_step(poison=2)
    assert bool(logs["found_inf"])
    assert ds_engine.calls == []
    assert update_skipped(accelerator, logs, engine)
    # a finite window is not skipped; without write_update the GradScaler decides (optimizer_step_was_skipped)
    accelerator, engine, _, logs = _deepspeed_gradient_step()
    assert not update_skipped(accelerator, logs, engine)
    from diffusers_ant.weighting import TaskGradientEngine

    plain = TaskGradientEngine(torch.nn.Linear(2, 1).parameters())
    assert not update_skipped(accelerator, {"found_inf": torch.tensor(True)}, plain)
    assert update_skipped(types.SimpleNamespace(optimizer_step_was_skipped=True), {"found_inf": torch.tensor(False)}, plain)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_non_finite_task_gradients_without_a_loss_scaler_skip_the_update(precision, tmp_path, monkeypatch, caplog):
    """bf16 / fp32 have no GradScaler to skip a window whose per-cluster gradients are not finite: the loop
    skips it (no optimizer step, a warning) instead of handing AdamW the engine's overflow marker, which made
    every later weight NaN. The windows before and after still train."""
    from diffusers_ant.training import step as step_module

    original = step_module.DiffusionObjective.loss_fn
    windows = []

    def poisoned(self, model, prepared):
        fn = original(self, model, prepared)
        windows.append(None)
        if len(windows) != 2:
            return fn
        return lambda idx=None: fn(idx) * float("inf")  # the second window: every task's loss and gradient

    monkeypatch.setattr(step_module.DiffusionObjective, "loss_fn", poisoned)
    out = tmp_path / "run"
    with largest_gradients() as applied, caplog.at_level("WARNING", logger="diffusers_ant"):
        train_in_process(_args("unet", out, "--mtl_method", "pcgrad", "--max_train_steps", "3",
                               "--mixed_precision", precision, "--checkpointing_steps", "1"))
    assert len(windows) == 3
    assert len(applied) == 2, "the optimizer must not step on the non-finite window"
    assert "step 2: the per-cluster gradients are not finite" in caplog.text
    final = _model_weights(out / "unet")
    assert all(bool(torch.isfinite(v).all()) for v in final.values())
    # the skipped step left the weights as they were, and the steps around it moved them
    first, second, third = ({k: v for k, v in load_safetensors_dir(out / f"checkpoint-{n}").items()
                             if k.startswith("model.safetensors:")} for n in (1, 2, 3))
    assert first and largest_difference(first, second) == 0.0
    assert largest_difference(second, third) > 0.0
    assert all(bool(torch.isfinite(v).all()) for v in third.values())


def _fake_deepspeed(zero_stage=2, **config):
    """A DeepSpeed accelerator as `check_distributed_support` reads it: the plugin's stage and config."""
    plugin = types.SimpleNamespace(zero_stage=zero_stage, deepspeed_config={"zero_optimization": {"stage": zero_stage},
                                                                            **config})
    return types.SimpleNamespace(distributed_type=_fake_accelerator("DEEPSPEED").distributed_type,
                                 state=types.SimpleNamespace(deepspeed_plugin=plugin))


def _ds_args(**flags):
    return types.SimpleNamespace(**{"mtl_method": "ls", "gradient_accumulation_steps": 1, "use_ema": False,
                                    "track_convergence": False, "train_text_encoder": False, **flags})


def test_deepspeed_trains_accumulation_windows_and_uw_and_refuses_what_it_cannot(capsys):
    """DeepSpeed owns the accumulation and UW's log-variances have their own optimizer (tests/test_deepspeed.py
    trains both against DDP): accepted. Refused in one line naming the engine's setting and the flag: a
    config whose accumulation disagrees with the flag, an optimizer / scheduler in the config, ZeRO-3 with
    EMA or the convergence tracker, ZeRO-3 without gathering the weights, a text-encoder LoRA."""
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.components import check_distributed_support
    from diffusers_ant.weighting import get_weighting

    for stage in (2, 3):
        check_distributed_support(_fake_deepspeed(stage, gradient_accumulation_steps="auto"),
                                  _ds_args(mtl_method="uw", gradient_accumulation_steps=4), get_weighting("uw", 4))
    check_distributed_support(_fake_deepspeed(2, gradient_accumulation_steps=2), _ds_args(gradient_accumulation_steps=2),
                              None)
    check_distributed_support(_fake_deepspeed(2), _ds_args(use_ema=True, track_convergence=True), None)
    refused = [
        (_fake_deepspeed(2, gradient_accumulation_steps=2), _ds_args(gradient_accumulation_steps=4), "gradient_accumulation_steps"),
        (_fake_deepspeed(2, optimizer={"type": "Adam"}), _ds_args(), "optimizer"),
        (_fake_deepspeed(3), _ds_args(use_ema=True), "--use_ema"),
        (_fake_deepspeed(3), _ds_args(track_convergence=True), "--track_convergence"),
        (_fake_deepspeed(3, zero_optimization={"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}),
         _ds_args(), "stage3_gather_16bit_weights_on_model_save"),
        (_fake_deepspeed(2), _ds_args(train_text_encoder=True), "--train_text_encoder"),
    ]
    for accelerator, args, flag in refused:
        with pytest.raises(UsageError, match=flag) as error:
            check_distributed_support(accelerator, args, None)
        assert "\n" not in str(error.value)
    # a gradient method: on the LoRA subset only, under ZeRO-2 and ZeRO-3 (tests/test_deepspeed.py)
    for stage in (2, 3):
        with pytest.raises(UsageError, match=f"under DeepSpeed ZeRO-{stage} needs --task_gradient_subset lora"):
            check_distributed_support(_fake_deepspeed(stage), _ds_args(mtl_method="pcgrad"), get_weighting("pcgrad", 4))


def test_zero3_keeps_the_lora_matrices_whole_by_raising_the_persistence_threshold_to_the_largest():
    """Under ZeRO-3 a gradient method's LoRA matrices must be persistent parameters (whole on every process):
    the config's `stage3_param_persistence_threshold` is raised to the largest LoRA matrix where it is lower
    or "auto" (a higher one is kept), and a cap on all persistent elements is refused in one line."""
    from peft import LoraConfig, inject_adapter_in_model

    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.sharding import DEEPSPEED_PERSISTENCE_THRESHOLD, keep_lora_whole_zero3

    model = inject_adapter_in_model(LoraConfig(r=8, target_modules=["0"]),
                                    torch.nn.Sequential(torch.nn.Linear(300, 500), torch.nn.Linear(500, 2)))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A.default.weight",
                                                                           "0.lora_B.default.weight"}
    largest = 8 * 500  # lora_B: (500, 8); lora_A: (8, 300); the frozen base's 300 x 500 is not counted
    for given, kept in ((None, DEEPSPEED_PERSISTENCE_THRESHOLD), ("auto", largest), (10, largest), (10**6, 10**6)):
        config = {} if given is None else {"stage3_param_persistence_threshold": given}
        accelerator = _fake_deepspeed(3, **{"zero_optimization": {"stage": 3, **config}})
        assert keep_lora_whole_zero3(accelerator, model) == kept
        assert accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get(
            "stage3_param_persistence_threshold", DEEPSPEED_PERSISTENCE_THRESHOLD) == kept
    # the field name DeepSpeed also accepts is read, and replaced by the one spelling
    accelerator = _fake_deepspeed(3, zero_optimization={"stage": 3, "param_persistence_threshold": 10})
    assert keep_lora_whole_zero3(accelerator, model) == largest
    assert accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"] == {
        "stage": 3, "stage3_param_persistence_threshold": largest}
    for key in ("stage3_model_persistence_threshold", "model_persistence_threshold"):
        with pytest.raises(UsageError, match=f"drop zero_optimization.{key} from") as error:
            keep_lora_whole_zero3(_fake_deepspeed(3, zero_optimization={"stage": 3, key: 1000}), model)
        assert "\n" not in str(error.value)
        keep_lora_whole_zero3(_fake_deepspeed(3, zero_optimization={"stage": 3, key: sys.maxsize}), model)  # no cap


def test_zero3_refuses_lora_matrices_deepspeed_left_partitioned_in_one_line():
    """After `prepare`, every LoRA matrix must be persistent (whole on every process); one that is not, or no
    LoRA matrix at all, is refused in one line before any gather."""
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.sharding import gather_persistent_lora

    whole = types.SimpleNamespace(ds_persist=True, ds_numel=10)
    cut = types.SimpleNamespace(ds_persist=False, ds_numel=4096)
    with pytest.raises(UsageError, match="left 1 LoRA matrices partitioned \\(the largest 4096 elements\\): its config's "
                                         "stage3_param_persistence_threshold must be at least that"):
        gather_persistent_lora([whole, cut], model=None)
    with pytest.raises(UsageError, match="found no trainable LoRA matrix"):
        gather_persistent_lora([], model=None)


def test_a_zero_checkpoint_is_refused_without_deepspeed_in_one_line_and_nothing_is_written(tmp_path, capsys):
    from train_scripts_loader import load_train_main

    out = tmp_path / "run"
    checkpoint = out / "checkpoint-2"
    (checkpoint / "pytorch_model").mkdir(parents=True)  # what `accelerator.save_state` writes under DeepSpeed
    (checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    (checkpoint / "trainer_state_0.json").write_text("{}")
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        load_train_main()(_args("unet", out, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DeepSpeed ZeRO checkpoint" in err[0] and "--use_deepspeed" in err[0], err
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_a_deepspeed_config_whose_clipping_differs_from_max_grad_norm_is_refused():
    """DeepSpeed clips inside its step with the config's gradient_clipping, and Accelerate lets a config file's
    (or `--gradient_clipping`'s) value win over the trainer's without a word: a value other than
    --max_grad_norm is refused in one line, "auto" and the same value are taken."""
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.deepspeed_support import check_deepspeed_config, configure_plugin

    def accelerator(config):
        plugin = types.SimpleNamespace(deepspeed_config=config, zero_stage=2)
        return types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))

    args = types.SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=0.0, use_ema=False,
                                 track_convergence=False)
    with pytest.raises(UsageError, match="gradient_clipping 1.0 and the trainer --max_grad_norm 0.0"):
        check_deepspeed_config(accelerator({"gradient_clipping": 1.0}), args)
    check_deepspeed_config(accelerator({"gradient_clipping": 0}), args)
    auto = accelerator({"gradient_clipping": "auto"})
    check_deepspeed_config(auto, args)
    configure_plugin(auto, args)
    assert auto.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.0


def test_checkpoint_engine_checks(tmp_path):
    """A plain checkpoint under DeepSpeed, and a ZeRO checkpoint of another number of processes: refused."""
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.deepspeed_support import check_checkpoint_engine

    def accelerator(kind, processes=2, stage=2):
        state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=stage))
        return types.SimpleNamespace(distributed_type=_fake_accelerator(kind).distributed_type, num_processes=processes,
                                     state=state)

    plain, zero, zero3 = tmp_path / "plain", tmp_path / "zero", tmp_path / "zero3"
    for folder in (plain, zero, zero3):
        folder.mkdir()
        for rank in (0, 1):
            (folder / f"trainer_state_{rank}.json").write_text("{}")
    # the model-state files DeepSpeed writes: one under ZeRO-1/2, one per process under ZeRO-3
    (zero / "pytorch_model").mkdir()
    (zero / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (zero3 / "pytorch_model").mkdir()
    for rank in (0, 1):
        (zero3 / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"")
    check_checkpoint_engine(accelerator("MULTI_CPU"), str(plain))
    check_checkpoint_engine(accelerator("DEEPSPEED"), str(zero))
    check_checkpoint_engine(accelerator("DEEPSPEED", stage=3), str(zero3))
    with pytest.raises(UsageError, match="--zero_stage 3"):
        check_checkpoint_engine(accelerator("DEEPSPEED", stage=2), str(zero3))
    with pytest.raises(UsageError, match="--zero_stage 2"):
        check_checkpoint_engine(accelerator("DEEPSPEED", stage=3), str(zero))
    with pytest.raises(UsageError, match="not written under DeepSpeed"):
        check_checkpoint_engine(accelerator("DEEPSPEED"), str(plain))
    with pytest.raises(UsageError, match="--num_processes 2"):
        check_checkpoint_engine(accelerator("DEEPSPEED", 4), str(zero))
    with pytest.raises(UsageError, match="--use_deepspeed"):
        check_checkpoint_engine(accelerator("NO", 1), str(zero))


# --------------------------------------------------------------------------- resume configuration


@pytest.mark.slow
def test_resume_refuses_a_changed_state_flag_in_one_line_and_allows_safe_ones(tmp_path, capsys, caplog):
    import logging

    from train_scripts_loader import load_train_main

    out = tmp_path / "run"
    base = _args("unet", out, "--mtl_method", "uw", "--max_train_steps", "3", "--checkpointing_steps", "2",
                 "--num_validation_images", "1")
    train_in_process(base)
    capsys.readouterr()
    main = load_train_main()
    for flag, value in [("--num_clusters", "3"), ("--learning_rate", "0.5"), ("--mtl_method", "pcgrad")]:
        args = list(base)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
        with pytest.raises(SystemExit):
            main([*args, "--resume_from_checkpoint", "latest"])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err and value in err, err
    # a longer run and another checkpointing interval are fine, and are logged
    args = list(base)
    args[args.index("--max_train_steps") + 1] = "4"
    with caplog.at_level(logging.INFO, logger="diffusers_ant"):
        train_in_process([*args, "--resume_from_checkpoint", "latest"])
    assert "--max_train_steps: 3 -> 4" in caplog.text


def test_several_processes_train_on_the_cpu_only_where_no_device_backend_is(monkeypatch):
    """`Accelerator(cpu=True)` (gloo) is for machines without a device: an XPU / NPU / HPU machine's processes
    were told so too, and trained on the CPU without a word."""
    import accelerate.utils

    from diffusers_ant.training.loop import device_backend_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available", "is_hpu_available",
                 "is_sdaa_available"):
        monkeypatch.setattr(accelerate.utils, name, lambda: False)
    assert not device_backend_available()
    for name in ("is_xpu_available", "is_npu_available", "is_hpu_available"):
        with monkeypatch.context() as device:
            device.setattr(accelerate.utils, name, lambda: True)
            assert device_backend_available(), name
