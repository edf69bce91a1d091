"""Four bugs of the families (issue 16) found after they landed, each checked here:
the evaluation sampler of text-to-image pipelines, the saved scheduler of a full fine-tune, the kd
teacher of a LoRA run that trains the text encoder, and the family named for a folder of another type."""

from __future__ import annotations

import json

import pytest
import torch
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
