"""`--quantize_base int8|nf4` and `--use_8bit_adam` for real, on this CPU (bitsandbytes >= 0.46 has CPU
kernels; `models/quantization.py` lifts diffusers' GPU-only start check when no accelerator is present).

The denoiser is loaded through diffusers' `from_pretrained(..., quantization_config=...)`: its Linear
layers become bitsandbytes 4-bit / 8-bit layers, peft's LoRA trains on top, the kd teacher is that
quantized model with its adapters off, and the saved LoRA loads into the unquantized pipeline."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from test_family_flux import adapter, flux_folder  # noqa: F401  (module-scoped fixtures, reused)
from test_family_sd3 import _sample, _sd3_args, sd3_folder  # noqa: F401
from test_family_sdxl import _run_args as _sdxl_args, sdxl_base  # noqa: F401
from trainer_utils import TINY_RUN, assert_same_tensors, load_safetensors_dir, train_in_process

bnb = pytest.importorskip("bitsandbytes")  # the `test` extra installs it (setup.py)

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_kinds(model):
    """Counts of the denoiser's Linear layers by kind (peft's LoRA wrappers are looked through)."""
    kinds = {"nf4": 0, "int8": 0, "float": 0}
    for name, module in model.named_modules():
        if ".lora_" in name or name.endswith(("lora_A", "lora_B")):
            continue  # the adapters' own layers are float32 by design
        if isinstance(module, bnb.nn.Linear4bit):
            kinds["nf4"] += 1
        elif isinstance(module, bnb.nn.Linear8bitLt):
            kinds["int8"] += 1
        elif type(module) is torch.nn.Linear:
            kinds["float"] += 1
    return kinds


def _load_transformer(folder, kind):
    from diffusers import SD3Transformer2DModel

    from diffusers_ant.models.base import PretrainedSource
    from diffusers_ant.models.quantization import quantization_config

    source = PretrainedSource(str(folder), quantization_config=quantization_config(kind, torch.float32))
    return source.load(SD3Transformer2DModel, subfolder="transformer")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_cpu_load_replaces_the_linear_layers_and_keeps_diffusers_gpu_check_elsewhere(kind, sd3_folder):
    """diffusers' own quantized load on the CPU: every Linear of the transformer is a bitsandbytes layer
    holding 1-byte storage, its output stays near the unquantized model's, and outside the load diffusers'
    start check is diffusers' own again (it still refuses a CPU)."""
    from diffusers import BitsAndBytesConfig, SD3Transformer2DModel
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    model = _load_transformer(sd3_folder, kind)
    kinds = _linear_kinds(model)
    assert kinds[kind] > 0 and kinds["float"] == 0, kinds
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == (torch.uint8 if kind == "nf4" else torch.int8)
    reference = SD3Transformer2DModel.from_pretrained(sd3_folder, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, reference.config.in_channels, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 5, reference.config.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(2, reference.config.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([100.0, 700.0]))
    with torch.no_grad():
        exact, quantized = reference(**inputs).sample, model(**inputs).sample
    error = ((quantized - exact).norm() / exact.norm()).item()
    assert torch.isfinite(quantized).all() and error < (0.3 if kind == "nf4" else 0.1), error
    with pytest.raises(RuntimeError, match="No GPU found"):
        BnB4BitDiffusersQuantizer(BitsAndBytesConfig(load_in_4bit=True)).validate_environment()


@pytest.mark.parametrize("model_type", ["dit", "unet"])
def test_a_bare_model_folder_is_quantized_as_a_pipelines_denoiser_is(model_type, tmp_path):
    """unet and dit take a bare model folder (config.json only): --quantize_base left it unquantized without a
    word, as only the `unet` / `transformer` subfolders of a pipeline were quantized."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.models.quantization import quantization_config

    preset = {"dit": dict(num_channels=3, num_classes=4), "unet": dict(num_channels=3)}[model_type]
    get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=16, **preset).model.save_pretrained(
        tmp_path / "bare")
    adapter = get_model_adapter(model_type).load(pretrained_model_name_or_path=str(tmp_path / "bare"),
                                                 quantization_config=quantization_config("nf4", torch.float32))
    kinds = _linear_kinds(adapter.model)
    assert kinds["nf4"] > 0 and kinds["float"] == 0, kinds
    if model_type == "unet":  # a new class table on the quantized UNet (its reload with the table was refused)
        classes = get_model_adapter("unet").load(pretrained_model_name_or_path=str(tmp_path / "bare"), num_classes=4,
                                                 quantization_config=quantization_config("nf4", torch.float32))
        assert classes.new_class_embedding == (None, 4) and _linear_kinds(classes.model)["nf4"] == kinds["nf4"]
        assert classes.model.class_embedding.weight.shape[0] == 4 and classes.model.config.num_class_embeds == 4


def test_a_bitsandbytes_without_cpu_kernels_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    import os

    from train_scripts_loader import load_train_main

    monkeypatch.setattr(bnb, "__version__", "0.45.5")  # before its CPU backend
    with pytest.raises(SystemExit):
        load_train_main()(["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--output_dir", str(tmp_path),
                           "--pretrained_model_name_or_path", os.getcwd(), "--quantize_base", "nf4", "--rank", "4"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bitsandbytes >= 0.46" in err and "0.45.5" in err, err


def test_a_quantized_base_under_a_controlnet_is_refused_in_one_line(tmp_path, capsys):
    """A ControlNet run trains the ControlNet, copied from its UNet's weights: with the UNet quantized the copy
    failed (bitsandbytes' absmax / quant_map keys), and a given ControlNet's frozen UNet refused the cast to
    the weight dtype, each as a traceback after loading."""
    import os

    from train_scripts_loader import load_train_main

    with pytest.raises(SystemExit):
        load_train_main()(["--model_type", "controlnet", "--dataset_name", "mnist5k_captions", "--output_dir",
                           str(tmp_path), "--pretrained_model_name_or_path", os.getcwd(), "--quantize_base", "nf4",
                           "--rank", "4"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a ControlNet run" in err and "drop --quantize_base" in err, err


@pytest.mark.slow  # the tiny Flux pipeline is built and saved first
def test_flux_own_load_takes_the_quantized_base(flux_folder):
    """Flux's adapter loads on its own (two schedulers): it passes --quantize_base on to the transformer
    too (it once raised a TypeError), and refuses it on a preset in one line."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.models.quantization import quantization_config

    config = quantization_config("nf4", torch.float32)
    flux = get_model_adapter("flux").load(pretrained_model_name_or_path=str(flux_folder), quantization_config=config)
    kinds = _linear_kinds(flux.model)
    assert kinds["nf4"] > 0 and kinds["float"] == 0, kinds
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in flux.text_encoder_2.modules())  # the denoiser only
    # DeMe's projections on it (on by default with --deme_interval): the first parameter is packed uint8, which
    # the projections took their dtype from ("Only Tensors of floating point ... can require gradients")
    from diffusers_ant.deme import add_channel_projection
    from diffusers_ant.models.quantization import prepare_quantized_for_lora

    assert not next(flux.model.parameters()).is_floating_point()
    prepare_quantized_for_lora(flux.model)
    flux.add_lora(2)
    projections = add_channel_projection(flux.model)
    assert projections and all(p.weight.dtype == torch.float32 and p.weight.requires_grad for p in projections)
    with pytest.raises(ValueError, match="--quantize_base quantizes a pretrained denoiser") as err:
        get_model_adapter("flux").load(model_config_name_or_path="tiny", quantization_config=config)
    assert "\n" not in str(err.value)


def _record_training(monkeypatch):
    """Wrap the loop's `training_step`: what the model, the teacher and the loss were at each step."""
    from diffusers_ant.training import loop

    seen = {"losses": [], "task_names": None}
    original = loop.training_step

    def recording_step(accelerator, objective, model, *args, **kwargs):
        if not seen["losses"]:
            unwrapped = accelerator.unwrap_model(model)
            seen["kinds"] = _linear_kinds(unwrapped)
            seen["trainable"] = {n: p.detach().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
            seen["teacher"], seen["model"] = objective.teacher, unwrapped
            seen["task_names"] = list(objective.task_names())
        logs = original(accelerator, objective, model, *args, **kwargs)
        seen["losses"].append(logs["loss"].item())
        return logs

    monkeypatch.setattr(loop, "training_step", recording_step)
    return seen


def _check_quantized_lora_run(seen, kind, out):
    assert seen["kinds"][kind] > 0 and seen["kinds"]["float"] == 0, seen["kinds"]
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"]), "only LoRA parameters train"
    assert all(torch.isfinite(torch.tensor(loss)) for loss in seen["losses"]) and len(seen["losses"]) == 2
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    # SDXL's file keeps diffusers' older names (lora.down / lora.up): peft's lora_A / lora_B
    lora = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in lora.items()}
    assert lora and all(".lora_" in k for k in lora)
    # the LoRA moved: B starts at zero, A from its random start
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-4
    start_a = {n.replace(".default", ""): v for n, v in seen["trainable"].items() if "lora_A" in n}
    moved = [(lora[k] - start_a[n]).abs().max().item() for k in lora for n in start_a if k.endswith(n)]
    assert moved and max(moved) > 1e-6
    return lora


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_sd3_lora_on_a_quantized_base_trains_and_loads_into_the_plain_pipeline(kind, sd3_folder, tmp_path,
                                                                               monkeypatch):
    """nf4 / int8 SD3 transformer under a LoRA with --retention kd: the teacher is the quantized student
    with its adapters off (no copy), only LoRA trains, the loss is finite, the LoRA moves, and the saved
    LoRA loads into the unquantized StableDiffusion3Pipeline and changes its samples."""
    from diffusers import StableDiffusion3Pipeline

    from diffusers_ant.teacher import AdapterDisabledTeacher

    seen = _record_training(monkeypatch)
    out = tmp_path / "out"
    train_in_process(_sd3_args(out, "--rank", "4", "--quantize_base", kind, "--max_train_steps", "2",
                               "--learning_rate", "5e-2", "--retention", "kd", "--bank_fraction", "0.5",
                               pretrained=sd3_folder))
    _check_quantized_lora_run(seen, kind, out)
    teacher = seen["teacher"]
    assert isinstance(teacher, AdapterDisabledTeacher) and teacher.model is seen["model"]
    assert any("retention" in name or "kd" in name for name in seen["task_names"]), seen["task_names"]

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)  # unquantized, as users sample
    before = _sample(pipe)
    pipe.load_lora_weights(out)
    after = _sample(pipe)
    assert after.shape == (1, 16, 16, 3) and abs(after - before).max() > 1e-3


@pytest.mark.slow
def test_sdxl_lora_on_an_nf4_unet_trains_and_loads_into_the_plain_pipeline(sdxl_base, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    seen = _record_training(monkeypatch)
    out = tmp_path / "out"
    train_in_process(_sdxl_args(sdxl_base, out, "--quantize_base", "nf4", "--max_train_steps", "2",
                                "--learning_rate", "5e-2"))
    _check_quantized_lora_run(seen, "nf4", out)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a handwritten digit 7", num_inference_steps=2, height=16, width=16, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = sample()
    pipe.load_lora_weights(out)
    assert abs(sample() - before).max() > 1e-3


def _adam8_args(out, steps):
    return ["--model_type", "unet", "--dataset_name", "mnist5k", *TINY_RUN, "--use_8bit_adam", "--output_dir",
            str(out), "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--max_train_samples", "24",
            "--num_validation_images", "1", "--resume_from_checkpoint", "latest"]


@pytest.mark.slow
def test_8bit_adam_keeps_8bit_states_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """--use_8bit_adam on the CPU: bitsandbytes' AdamW8bit steps a tiny UNet, its moments of the large
    tensors are uint8 (blockwise-quantized; bitsandbytes keeps tensors under 4,096 values in float32), and
    a run resumed from checkpoint-2 (Accelerate's save_state / load_state) ends with exactly the weights of
    an uninterrupted run."""
    from diffusers_ant.training import loop

    optimizers = []
    original = loop.build_optimizer

    def recording(*args, **kwargs):
        optimizers.append(original(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(loop, "build_optimizer", recording)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_in_process(_adam8_args(straight, 4))
    optimizer = optimizers[-1]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    states = [s for s in optimizer.state.values() if "state1" in s]
    big = [s for s in states if s["state1"].numel() >= 4096]
    assert big and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in big)
    assert all(torch.isfinite(s["absmax1"]).all() for s in big)
    train_in_process(_adam8_args(resumed, 2))
    # the checkpoint holds the 8-bit moments (bitsandbytes' state_dict nests them), loadable without pickle
    saved = torch.load(resumed / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"].values()
    assert any(s["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8 for s in saved)
    capsys.readouterr()
    train_in_process(_adam8_args(resumed, 4))  # continues from checkpoint-2
    out = capsys.readouterr().out  # (a run that ignored it would retrain from step 0 to the same seeded weights)
    assert "resuming from" in out and "checkpoint-2" in out
    assert_same_tensors(load_safetensors_dir(straight / "unet"), load_safetensors_dir(resumed / "unet"))


def test_offline_commands_do_not_start_with_bitsandbytes_kernel_warnings():
    """Offline, importing peft (every command does) made bitsandbytes and `kernels` warn "Failed to load CPU
    gemm_4bit_forward from kernels-community ... pip install kernels" at the start of every command, which reads as
    a broken install (bitsandbytes falls back to its own kernel). Those two loggers are quiet offline; not online."""
    import subprocess

    code = ("import logging, diffusers_ant, peft; print(logging.getLogger('bitsandbytes.backends.cpu.ops').level, "
            "logging.getLogger('kernels._internals.hf_hub').level)")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    offline = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0 and offline.stdout.split() == ["40", "40"], offline.stderr[-2000:]
    assert "gemm_4bit_forward" not in offline.stderr and "publisher trust" not in offline.stderr
    # online the loggers are untouched (a user who could fetch the kernel is told it failed); no peft import here,
    # which would try the network
    online = subprocess.run([sys.executable, "-c", code.replace(", peft", "")], capture_output=True, text=True, env=env)
    assert online.stdout.split() == ["0", "0"], online.stderr[-2000:]
