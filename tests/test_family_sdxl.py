"""`--model_type sdxl` (issue 16): Stable Diffusion XL with LoRA, ANT, resume, bf16, and its time ids.

Every run is in-process on the tiny preset (diffusers' SDXL pipeline-test sizes), saved once as a
pretrained folder that the LoRA runs start from, at 16 pixels, a few steps each; runs are shared
through module-scoped fixtures and each is checked several ways.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tolerances import unit_roundoff
from trainer_utils import TINY_RUN, assert_same_tensors, load_safetensors_dir, straight_and_resumed, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 16
PROMPT = "a handwritten digit 7"


def _run_args(base, out, *extra):
    args = ["--model_type", "sdxl", "--dataset_name", "mnist5k_captions", "--output_dir", str(out), *TINY_RUN,
            "--pretrained_model_name_or_path", str(base), "--rank", "4", "--train_batch_size", "4",
            "--max_train_samples", "12", "--num_clusters", "2", "--resolution", str(RES)]
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    return [*args, *extra]


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    """A pretrained tiny SDXL pipeline folder (what a user's SDXL checkpoint is to a LoRA run)."""
    from diffusers_ant.models import get_model_adapter

    folder = tmp_path_factory.mktemp("sdxl-base")
    torch.manual_seed(0)
    get_model_adapter("sdxl").load(model_config_name_or_path="tiny", resolution=RES, num_channels=3).save(str(folder))
    return folder


@pytest.fixture(scope="module")
def fixed_vae(tmp_path_factory):
    """A VAE folder of its own (other weights than the base's), as the fp16-fixed SDXL VAE is."""
    from diffusers import AutoencoderKL

    from diffusers_ant.models.presets import TINY_VAE

    folder = tmp_path_factory.mktemp("fixed-vae")
    torch.manual_seed(1)
    AutoencoderKL(in_channels=3, out_channels=3, sample_size=RES, **TINY_VAE).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vanilla_run(sdxl_base, fixed_vae, tmp_path_factory):
    """Vanilla LoRA training with validation prompts and a VAE of its own: the output folder."""
    out = tmp_path_factory.mktemp("vanilla")
    train_in_process(_run_args(sdxl_base, out, "--max_train_steps", "2", "--learning_rate", "5e-2",
                               "--validation_prompt", PROMPT, "--num_validation_images", "2",
                               "--pretrained_vae_model_name_or_path", str(fixed_vae)))
    return out


def _same_vae(vae, folder):
    from safetensors.torch import load_file

    saved = load_file(folder / "diffusion_pytorch_model.safetensors")
    state = vae.state_dict()
    return all(torch.equal(state[k].float(), v.float()) for k, v in saved.items())


# --------------------------------------------------------------------------- the tiny preset and time ids


def test_tiny_preset_is_an_sdxl_pipeline_with_two_text_encoders(sdxl_base):
    from diffusers import StableDiffusionXLPipeline

    index = json.loads((sdxl_base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = json.loads((sdxl_base / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    # diffusers' test sizing: 6 time ids x 8 + the pooled 32; both encoders' 32 features side by side
    assert unet["projection_class_embeddings_input_dim"] == 80 and unet["cross_attention_dim"] == 64
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_base))
    assert isinstance(pipe, StableDiffusionXLPipeline)


def test_a_variant_folder_loads_through_the_pretrained_source(sdxl_base, tmp_path):
    """--variant reaches every weight file (both text encoders included), as for the other types."""
    from diffusers import StableDiffusionXLPipeline

    from diffusers_ant.models import get_model_adapter

    StableDiffusionXLPipeline.from_pretrained(str(sdxl_base)).save_pretrained(str(tmp_path), variant="ema")
    assert (tmp_path / "text_encoder_2" / "model.ema.safetensors").is_file()
    adapter = get_model_adapter("sdxl").load(pretrained_model_name_or_path=str(tmp_path), variant="ema")
    reference = get_model_adapter("sdxl").load(pretrained_model_name_or_path=str(sdxl_base))
    for name in ("model", "text_encoder_2"):
        ours, theirs = getattr(adapter, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert len(adapter.tokenizer_2) == len(reference.tokenizer_2) > 2


def test_mixed_precision_keeps_sdxls_own_vae_in_float32(sdxl_base, fixed_vae):
    """SDXL's VAE overflows in fp16: frozen parts go to the weight dtype except that VAE, as diffusers'
    train_text_to_image_sdxl.py; a VAE given with --pretrained_vae_model_name_or_path is cast."""
    from diffusers_ant.models import get_model_adapter

    own = get_model_adapter("sdxl").load(pretrained_model_name_or_path=str(sdxl_base)).to("cpu", torch.float16)
    assert own.vae.dtype == torch.float32
    assert own.text_encoder_2.text_projection.weight.dtype == torch.float16
    fixed = get_model_adapter("sdxl").load(pretrained_model_name_or_path=str(sdxl_base),
                                           pretrained_vae_model_name_or_path=str(fixed_vae))
    assert _same_vae(fixed.vae, fixed_vae)
    assert fixed.to("cpu", torch.float16).vae.dtype == torch.float16


def test_time_ids_are_original_size_crop_and_target_of_each_image():
    """(original h, w, crop top, left, target h, w), as diffusers' SDXL scripts compute them, for an image
    of known size: 27 x 24 (w x h) at 16 px resizes to 18 x 16 (torchvision's Resize(int)); the centre
    crop's left edge is round(2 / 2) = 1, after a flip 18 - 1 - 16 = 1; a random crop's left is reported
    as the flipped image's."""
    import datasets
    from PIL import Image

    from diffusers_ant.data import make_train_dataloader
    from diffusers_ant.data.transforms import build_transforms
    from diffusers_ant.models import get_model_adapter

    adapter = get_model_adapter("sdxl").load(model_config_name_or_path="tiny", resolution=RES)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (24, 27, 3), dtype=np.uint8))
    rows = datasets.Dataset.from_dict({"image": [image, image.resize((20, 36))], "text": ["a", "b"]},
                                      features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    loader = make_train_dataloader(rows, {"image_column": "image", "caption_column": "text"}, resolution=RES,
                                   batch_size=2, shuffle=False, center_crop=True, **adapter.data_options())
    batch = next(iter(loader))
    assert set(batch) >= {"input_ids", "input_ids_2", "original_sizes", "crop_top_lefts"}
    # 20 x 36 -> 16 x 28: the centre crop's top is round(12 / 2) = 6
    expected = torch.tensor([[24, 27, 0, 1, 16, 16], [36, 20, 6, 0, 16, 16]], dtype=torch.float32)
    assert torch.equal(adapter.time_ids(batch), expected)
    _, conditioning = adapter.encode_batch(batch)
    assert torch.equal(conditioning["time_ids"], expected)
    # the text conditioning is what StableDiffusionXLPipeline.encode_prompt gives for the captions
    with torch.no_grad():
        hidden, _, pooled, _ = adapter.make_pipeline().encode_prompt(["a", "b"], do_classifier_free_guidance=False)
    assert hidden.shape == (2, 32, 64) and pooled.shape == (2, 32)
    # bit for bit: the same two encoders on the same token ids, the same batch, the outputs encode_prompt reads
    assert torch.equal(conditioning["encoder_hidden_states"], hidden)
    assert torch.equal(conditioning["text_embeds"], pooled)

    class Draws:  # a random crop at fraction (0.99, 0) of the slack, then a flip
        def __init__(self):
            self.values = [np.array([0.99, 0.0]), 0.0]

        def random(self, *shape):
            return self.values.pop(0)

    wide = Image.fromarray(rng.integers(0, 255, (16, 40, 3), dtype=np.uint8))  # 40 x 16: no resize
    pixels, original, (top, left) = build_transforms(RES, random_flip=True).with_crop_coords(wide, Draws())
    assert original == (16, 40) and top == 0
    cropped_left = int(0.99 * (40 - RES + 1))  # 24: the crop [24, 40) of the image ...
    assert left == 40 - cropped_left - RES == 0  # ... is [0, 16) of the flipped image, diffusers' convention
    flipped = np.asarray(wide.transpose(Image.Transpose.FLIP_LEFT_RIGHT), dtype=np.float32)[:, left:left + RES]
    assert torch.allclose(pixels, torch.from_numpy(flipped).permute(2, 0, 1) / 127.5 - 1)

    # an aspect-ratio bucket (32 x 8 for the 27 x 24 image is not its nearest, but any bucket shows the
    # rule): resized to cover it (27 x 24 -> 32 x 28), centre-cropped: top round(20 / 2) = 10, left 0
    _, original, crop = build_transforms(RES).with_crop_coords(image, None, size=(32, 8))
    assert original == (24, 27) and crop == (10, 0)
    # --cache_latents keeps each row's time ids: the cache records the coordinates of the image it encoded
    from diffusers_ant.training.caching import TrainingCache, cache_latents

    latents, coords = cache_latents(adapter, loader.dataset, 2, disable_progress=True)
    loader.dataset.cache = TrainingCache(latents=latents, crop_coords=coords)
    cached = next(iter(loader))
    assert "pixel_values" not in cached and torch.equal(adapter.time_ids(cached), expected)
    # --cache_text_embeddings: both encoders' outputs stored per caption give the conditioning the
    # encoders give, with the encoders gone; the validation prompts are encoded as the pipeline encodes them
    text = adapter.encode_text(batch)
    assert sorted(text) == ["encoder_hidden_states", "text_embeds"] and adapter.supports_text_caching
    prompts = adapter.validation_prompt_kwargs(adapter.make_pipeline(), ["a", "b"], guidance_scale=5.0)
    assert torch.equal(prompts["prompt_embeds"], hidden) and torch.equal(prompts["pooled_prompt_embeds"], pooled)
    text_only = {k: v for k, v in cached.items() if not k.startswith("input_ids")}
    text_only.update({f"cached_text/{k}": v for k, v in text.items()})
    freed = adapter.free_text_encoders()
    assert sorted(freed) == ["text_encoder", "text_encoder_2"] and adapter.text_encoder_2 is None
    from_cache = adapter.conditioning(text_only)
    for key in ("encoder_hidden_states", "text_embeds", "time_ids"):
        assert torch.equal(from_cache[key], conditioning[key]), key


# --------------------------------------------------------------------------- training, LoRA, loading


def test_lora_output_loads_with_the_sdxl_pipeline_and_samples(vanilla_run, sdxl_base, fixed_vae):
    """diffusers' LoRA file: `StableDiffusionXLPipeline.load_lora_weights` and `load_pipeline` load it, it
    changes the UNet, and the pipeline samples; the card carries SDXL's license and tags; the VAE given
    with --pretrained_vae_model_name_or_path is recorded and used by `load_pipeline` and the card's code."""
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    from diffusers_ant.models import load_pipeline

    keys = list(load_file(vanilla_run / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    assert {k.split(".")[-4] for k in keys if k.endswith("lora.down.weight")} == {"to_q", "to_k", "to_v", "0"}
    assert (vanilla_run / "samples" / "step-2.png").is_file()

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_base))
    base_out = pipe.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
    pipe.load_lora_weights(str(vanilla_run))
    pipe.fuse_lora()
    moved = (pipe.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight - base_out).abs().max()
    assert moved > 1e-5, moved
    images = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (RES, RES)

    ours = load_pipeline(str(vanilla_run))
    assert type(ours).__name__ == "StableDiffusionXLPipeline"
    assert json.loads((vanilla_run / "ant_lora.json").read_text())["vae"] == f"../{fixed_vae.name}"
    assert _same_vae(ours.vae, fixed_vae) and not _same_vae(pipe.vae, fixed_vae)
    # the sampling tools (knowledge bank, evaluation) recognise the family and sample through its adapter
    from diffusers_ant.analysis.common import infer_model_type
    from diffusers_ant.diff_tuning.bank import adapter_for_pipeline, model_type_of_pipeline

    assert model_type_of_pipeline(ours) == "sdxl" and infer_model_type(str(sdxl_base)) == "sdxl"
    sampled = adapter_for_pipeline(ours, "sdxl").sample(ours, 1, generator=torch.Generator().manual_seed(0),
                                                        num_inference_steps=2, prompts=[PROMPT], scheduler="ddim")
    assert sampled[0].size == (RES, RES)
    assert ours(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0].size == (RES, RES)

    card = ModelCard.load(vanilla_run / "README.md")
    assert card.data.license == "openrail++"
    assert {"stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image", "lora", "template:sd-lora"} \
        <= set(card.data.tags)
    code = card.text.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "StableDiffusionXLPipeline.from_pretrained" in code and "pipe.load_lora_weights" in code
    # the snippet as written (the repo name stands for the folder), two steps instead of 30, runs here
    code = code.replace(json.dumps(vanilla_run.name), json.dumps(str(vanilla_run)))
    code = code.replace("num_inference_steps=30", "num_inference_steps=2")
    namespace = {}
    exec(code, namespace)
    assert namespace["image"].size == (RES, RES) and _same_vae(namespace["pipe"].vae, fixed_vae)


def test_ant_uw_with_text_encoder_lora_resumes_exactly(sdxl_base, tmp_path):
    """ANT + UW, EMA and both text encoders' LoRA: 20 steps == 10 + resume (mid-epoch: 3 batches an epoch)
    + 10, and the checkpoint holds LoRA parameters only (diffusers' LoRA scripts). The interrupted run is
    the straight one's first 10 steps (the same seeded run): its checkpoint-10, copied, is resumed."""

    from safetensors.torch import load_file

    common = ["--mtl_method", "uw", "--use_ema", "--train_text_encoder", "--checkpointing_steps", "10",
              "--num_validation_images", "1", "--max_train_steps", "20"]
    straight, resumed = straight_and_resumed(tmp_path, lambda out, *flags: _run_args(sdxl_base, out, *flags), common)
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in a) and any(k.startswith("text_encoder_2.") for k in a)
    assert_same_tensors(a, b)
    assert_same_tensors(load_safetensors_dir(straight / "checkpoint-20"), load_safetensors_dir(resumed / "checkpoint-20"))
    at_10, at_20 = load_safetensors_dir(straight / "checkpoint-10"), load_safetensors_dir(straight / "checkpoint-20")
    assert max((at_10[k].float() - at_20[k].float()).abs().max().item() for k in at_10) > 1e-4  # the last 10 trained
    checkpoint = straight / "checkpoint-10"
    assert not list(checkpoint.glob("model*.safetensors"))
    state = load_file(checkpoint / "trainable_state.safetensors")
    assert state and all("lora_" in k for k in state), list(state)[:5]
    weights = json.loads((straight / "weighting_config.json").read_text())
    assert weights["name"] == "uw"


def test_pcgrad_on_the_lora_subset_in_bf16(sdxl_base, tmp_path):
    """PCGrad with per-task gradients of the LoRA parameters only, under bf16, on the --lora_layers given:
    trains, and the output is float32 and finite."""
    from safetensors.torch import load_file

    out = tmp_path / "pcgrad"
    train_in_process(_run_args(sdxl_base, out, "--mtl_method", "pcgrad", "--task_gradient_subset", "lora",
                               "--mixed_precision", "bf16", "--max_train_steps", "2", "--learning_rate", "5e-2",
                               "--num_validation_images", "1", "--lora_layers", "to_q,to_v"))
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[-4] for k in lora} == {"to_q", "to_v"}  # --lora_layers replaced the default targets
    assert lora and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())
    assert max(t.abs().max().item() for k, t in lora.items() if "lora.up" in k) > 0  # B (up) starts at zero: it trained
    assert (out / "samples" / "step-2.png").is_file()


def test_full_fine_tuning_saves_an_sdxl_pipeline(tmp_path):
    """Without --rank the whole UNet trains (from the tiny preset) and the output is a full SDXL pipeline."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "full"
    train_in_process(["--model_type", "sdxl", "--dataset_name", "mnist5k_captions", "--output_dir", str(out),
                      *TINY_RUN, "--train_batch_size", "2", "--max_train_steps", "1", "--resolution", str(RES),
                      "--num_validation_images", "1", "--prediction_type", "v_prediction"])
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.addition_embed_type == "text_time"


# --------------------------------------------------------------------------- bad input


def test_a_pipeline_of_the_other_family_is_one_line_naming_both_types(sdxl_base, tmp_path, capsys):
    from diffusers_ant.models import get_model_adapter
    from train_scripts_loader import load_train_main

    sd_folder = tmp_path / "sd"
    get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=RES).save(str(sd_folder))
    capsys.readouterr()  # the save's progress bars
    for model_type, folder in (("sdxl", sd_folder), ("sd", sdxl_base)):
        args = _run_args(folder, tmp_path / f"out-{model_type}", "--max_train_steps", "1")
        args[args.index("--model_type") + 1] = model_type
        with pytest.raises(SystemExit):
            load_train_main()(args)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert re.search(r"--model_type sd\b(?!xl)", err) and "--model_type sdxl" in err, err


def test_latents_are_normalised_by_the_vaes_latents_mean_and_std_where_it_has_them(sdxl_base):
    """An SDXL-class VAE whose config carries latents_mean / latents_std (Playground v2.5): the training
    latents are (z - mean) * scaling_factor / std, as train_dreambooth_lora_sdxl.py encodes them and
    StableDiffusionXLPipeline decodes them; without the two, z * scaling_factor as before."""
    from diffusers_ant.models import get_model_adapter

    adapter = get_model_adapter("sdxl").load(pretrained_model_name_or_path=str(sdxl_base))
    moments = adapter.encode_moments(torch.rand(2, 3, 16, 16) * 2 - 1)
    plain = adapter.latents_from_moments(moments, torch.Generator().manual_seed(0))
    mean, std = [0.5, -0.25, 0.1, 0.0], [2.0, 0.5, 1.0, 4.0]
    adapter.vae.register_to_config(latents_mean=mean, latents_std=std)
    normalised = adapter.latents_from_moments(moments, torch.Generator().manual_seed(0))
    sf = adapter.vae.config.scaling_factor
    z = plain / sf
    expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) * sf / torch.tensor(std).view(1, 4, 1, 1)
    # float32 rounding: the adapter's (z sf - mean sf) / std rounds 3 times, this z sf / sf, - mean, * sf, / std 4
    # times, each at most u sf M / min std with M = max |z| + max |mean| (measured: 1.1 of that; a std applied
    # the wrong way round is a factor of 4 off)
    M = float(z.abs().max()) + max(abs(m) for m in mean)
    torch.testing.assert_close(normalised, expected, rtol=0, atol=7 * unit_roundoff() * sf * M / min(std))
    # the pipeline's decode undoes it: latents * std / sf + mean is z again, to the adapter's 3 roundings (scaled
    # back by std / sf), the decode's 3 and z = plain / sf's one, each u M at most (measured: 0.8u M)
    torch.testing.assert_close(normalised * torch.tensor(std).view(1, 4, 1, 1) / sf + torch.tensor(mean).view(1, 4, 1, 1),
                               z, rtol=0, atol=7 * unit_roundoff() * M)


def test_a_deme_merge_of_lora_fine_tunes_keeps_their_vae(vanilla_run, sdxl_base, fixed_vae, tmp_path):
    """LoRA fine-tunes trained with --pretrained_vae_model_name_or_path record it relative to their folder; the
    merged LoRA copied that spelling unchanged, so a merge written at another depth (or the search's temporary
    folder) named a VAE that is not there. It is spelled for the merged folder, as its base is."""
    import shutil

    from diffusers_ant import TimestepIntervals
    from diffusers_ant.deme.merging import merge_finetunes
    from diffusers_ant.models import load_pipeline

    intervals = TimestepIntervals.equal(1000, 2)
    finetunes = []
    for i in range(2):  # beside the run, as train_deme.py writes its intervals: the recorded paths still resolve
        folder = vanilla_run.parent / f"{vanilla_run.name}-interval-{i}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(vanilla_run, folder, ignore=shutil.ignore_patterns("checkpoint-*", "samples"))
        config = json.loads((folder / "training_config.json").read_text())
        (folder / "training_config.json").write_text(json.dumps({**config, "deme_interval": i}))
        intervals.save(str(folder / "timestep_intervals.json"))
        finetunes.append(str(folder))
    merged = tmp_path / "at" / "another" / "depth"
    merge_finetunes(str(sdxl_base), finetunes, str(merged), weights=[0.5, 0.5], log=lambda *_: None)
    recorded = json.loads((merged / "ant_lora.json").read_text())["vae"]
    assert (merged / recorded).resolve() == fixed_vae.resolve()
    assert _same_vae(load_pipeline(str(merged)).vae, fixed_vae)
