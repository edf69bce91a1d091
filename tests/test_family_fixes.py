"""Four bugs of the families (issue 16) found after they landed, each checked here:
the evaluation sampler of text-to-image pipelines, the saved scheduler of a full fine-tune, the kd
teacher of a LoRA run that trains the text encoder, and the family named for a folder of another type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_family_sdxl import sdxl_base  # noqa: F401  (module-scoped fixture, reused)
from trainer_utils import TINY_RUN, train_in_process

RES = 16


def _model_index(folder, class_name, **components):
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, **components}))
    return folder


@pytest.fixture(scope="module")
def sd_euler_base(tmp_path_factory):
    """A tiny pretrained SD pipeline folder saved with EulerDiscreteScheduler (as SDXL's checkpoints are)."""
    from diffusers import EulerDiscreteScheduler

    from diffusers_ant.models import get_model_adapter

    folder = tmp_path_factory.mktemp("sd-euler")
    torch.manual_seed(0)
    adapter = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=RES)
    pipe = adapter.make_pipeline(scheduler=EulerDiscreteScheduler.from_config(adapter.noise_scheduler.config))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


# --------------------------------------------------------------------------- 4: the family of a folder


def test_a_folder_of_another_family_names_its_own_type(tmp_path):
    """sd given an SD3 folder named it "Stable Diffusion XL" (any text_encoder_2); flux given an SDXL
    folder: both now name the folder's pipeline class and its type through `check_pipeline_family`."""
    from diffusers_ant.models import get_model_adapter

    sd3 = _model_index(tmp_path / "sd3", "StableDiffusion3Pipeline",
                       transformer=["diffusers", "SD3Transformer2DModel"], vae=["diffusers", "AutoencoderKL"],
                       text_encoder=["transformers", "CLIPTextModelWithProjection"],
                       text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    sdxl = _model_index(tmp_path / "sdxl", "StableDiffusionXLPipeline", unet=["diffusers", "UNet2DConditionModel"],
                        vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
                        text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    for model_type, folder, pipeline_class, owner in (("sd", sd3, "StableDiffusion3Pipeline", "sd3"),
                                                      ("flux", sdxl, "StableDiffusionXLPipeline", "sdxl"),
                                                      ("sdxl", sd3, "StableDiffusion3Pipeline", "sd3")):
        with pytest.raises(ValueError) as err:
            get_model_adapter(model_type).load(pretrained_model_name_or_path=str(folder), resolution=RES)
        message = str(err.value)
        assert "\n" not in message and "XL pipeline" not in message, message
        assert pipeline_class in message and f"use --model_type {owner}" in message, message
        assert f"(--model_type {model_type})" in message, message


# --------------------------------------------------------------------------- 2: the saved scheduler


def test_a_full_fine_tune_keeps_the_pretrained_sampling_scheduler(sd_euler_base, tmp_path):
    """Training uses a DDPMScheduler with the folder's betas; the saved pipeline keeps the folder's own
    EulerDiscreteScheduler (diffusers' scripts save `from_pretrained(base, unet=...)`), with the trained
    prediction type. A model from a preset keeps its training scheduler."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    from diffusers_ant.models import get_model_adapter

    out = tmp_path / "full"
    args = ["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--output_dir", str(out), *TINY_RUN,
            "--pretrained_model_name_or_path", str(sd_euler_base), "--train_batch_size", "2", "--max_train_steps",
            "1", "--max_train_samples", "4", "--num_clusters", "2", "--resolution", str(RES),
            "--num_validation_images", "1", "--prediction_type", "v_prediction"]
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    train_in_process(args)
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EulerDiscreteScheduler" and saved["prediction_type"] == "v_prediction", saved
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"

    adapter = get_model_adapter("sd").load(pretrained_model_name_or_path=str(sd_euler_base), resolution=RES)
    assert isinstance(adapter.noise_scheduler, DDPMScheduler)  # training: the DDPM of the same betas
    preset = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=RES)
    assert preset.sampling_scheduler is None
    preset.save(str(tmp_path / "preset"))
    saved = json.loads((tmp_path / "preset" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == type(preset.noise_scheduler).__name__


def test_a_sampler_that_cannot_step_the_trained_target_is_not_saved(tmp_path):
    """SD 1.5's PNDMScheduler steps epsilon and v only: a full fine-tune with --prediction_type sample saved it
    with that target, and the saved pipeline failed at its first step. It is saved with the training scheduler
    (DDPM, which steps it) instead; a target PNDM steps keeps PNDM."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from diffusers_ant.models import get_model_adapter, load_pipeline

    torch.manual_seed(0)
    adapter = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=RES)
    pndm = PNDMScheduler.from_config(adapter.noise_scheduler.config, skip_prk_steps=True, steps_offset=1)
    adapter.make_pipeline(scheduler=pndm).save_pretrained(str(tmp_path / "sd15"), safe_serialization=True)
    for target, sampler in (("sample", "DDPMScheduler"), ("v_prediction", "PNDMScheduler")):
        trained = get_model_adapter("sd").load(pretrained_model_name_or_path=str(tmp_path / "sd15"), resolution=RES,
                                               prediction_type=target)
        trained.save(str(tmp_path / target))
        pipeline = load_pipeline(str(tmp_path / target))
        assert type(pipeline.scheduler).__name__ == sampler and pipeline.scheduler.config.prediction_type == target
        assert isinstance(pipeline, StableDiffusionPipeline)
        images = pipeline(prompt="a cat", num_inference_steps=4, height=RES, width=RES, output_type="np").images
        assert np.isfinite(images).all()


# --------------------------------------------------------------------------- 1: evaluating a text-to-image folder


def test_sample_images_samples_text_to_image_folders_through_their_adapter(sd_euler_base, sdxl_base, monkeypatch):
    """`sample_images` called `pipe(batch_size=n)`, which StableDiffusion(XL)Pipeline do not take (and
    `sampling_pipeline` refused them): they now sample through `ModelAdapter.sample`, seeded, prompts cycled."""
    from diffusers_ant.analysis import evaluate
    from diffusers_ant.analysis.evaluate import dataset_captions, real_image_indices, sample_images
    from diffusers_ant.data import load_training_dataset
    from diffusers_ant.models import load_pipeline

    prompts = ["a handwritten digit 7", "a handwritten digit 1"]
    for folder in (sd_euler_base, sdxl_base):
        pipe = load_pipeline(str(folder))
        options = {"num_inference_steps": 2, "batch_size": 2, "progress": False, "scheduler": "ddim"}
        images = sample_images(pipe, 3, prompts=prompts, seed=1, **options)
        assert images.shape == (3, RES, RES, 3) and images.dtype == np.float32
        assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
        assert np.array_equal(images, sample_images(pipe, 3, prompts=prompts, seed=1, **options))  # seeded
        assert not np.array_equal(images, sample_images(pipe, 3, prompts=prompts, seed=2, **options))
        # prompts cycle over the samples: 0 and 2 share a prompt, not a noise draw
        other = sample_images(pipe, 3, prompts=prompts[::-1], seed=1, **options)
        assert not np.array_equal(images[0], other[0])

    # the flow-matching families too; their transformers record no sample size: `resolution` names it
    from diffusers_ant.models import get_model_adapter

    for model_type in ("flux", "qwenimage"):
        pipe_fm = get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=RES).make_pipeline()
        images = sample_images(pipe_fm, 3, prompts=prompts, resolution=RES, **options)
        assert images.shape == (3, RES, RES, 3) and images.std() > 0
        # without `resolution`: the pipeline's own default size, as FluxPipeline / QwenImagePipeline sample
        from diffusers_ant.models import adapter_for_pipeline

        adapter = adapter_for_pipeline(pipe_fm)
        factor = adapter.vae_scale_factor(pipe_fm.vae)
        assert adapter.sample_size * factor == pipe_fm.default_sample_size * pipe_fm.vae_scale_factor

    # evaluate_pipeline prompts a text-to-image model with the captions of the real images' rows
    captions = dataset_captions("mnist5k_captions", 3, seed=5)
    rows = real_image_indices(len(load_training_dataset(dataset_name="mnist5k_captions")), 3, seed=5)
    dataset = load_training_dataset(dataset_name="mnist5k_captions")
    column = [c for c in dataset.column_names if dataset.features[c].dtype == "string"][0]
    assert captions == [dataset[i][column] for i in rows] and all(isinstance(c, str) and c for c in captions)
    seen = {}
    monkeypatch.setattr(evaluate, "sample_images", lambda pipeline, n, **kw: seen.update(kw) or np.zeros((n, RES, RES, 3)))
    monkeypatch.setattr(evaluate, "reference_for", lambda *a, **kw: type("R", (), {"score": lambda self, x: {}})())
    evaluate.evaluate_pipeline(pipe, "mnist5k_captions", num_samples=3, seed=5, progress=False)
    assert seen["prompts"] == captions


@pytest.mark.parametrize("model_type, subfolder, channels", [
    ("sd", "unet", 9), ("sdxl", "unet", 9), ("sd3", "transformer", 32), ("flux", "transformer", 384),
    ("qwenimage", "transformer", 128)])
def test_an_inpainting_or_fill_checkpoint_is_refused_in_one_line(model_type, subfolder, channels, tmp_path):
    """An SD / SDXL inpainting UNet (9 input channels: latents, mask, masked image) or FLUX.1 Fill's transformer
    (384) passed the family check and failed at the first step on a shape error; it is now one line at load.
    The tiny preset's own pipeline, with its denoiser rebuilt with that many input channels, stands in."""
    from diffusers_ant.models import get_model_adapter

    folder = tmp_path / model_type
    pipeline = get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=16).make_pipeline()
    pipeline.save_pretrained(folder, safe_serialization=True)
    get_model_adapter(model_type).load(pretrained_model_name_or_path=str(folder))  # the text-to-image one loads
    denoiser = getattr(pipeline, subfolder)
    variant = type(denoiser).from_config({**denoiser.config, "in_channels": channels})
    variant.save_pretrained(folder / subfolder, safe_serialization=True)
    with pytest.raises(ValueError) as refused:
        get_model_adapter(model_type).load(pretrained_model_name_or_path=str(folder))
    message = str(refused.value)
    assert f"takes {channels} input channels" in message and "text-to-image checkpoint" in message
    assert "\n" not in message
