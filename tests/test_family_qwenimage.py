"""``--model_type qwenimage`` (issue 16): Qwen-Image's transformer, Qwen2.5-VL text encoder and VAE on the
tiny preset (sized as diffusers' Qwen-Image pipeline tests), trained by flow matching with LoRA, vanilla and
ANT, loaded back with ``QwenImagePipeline.load_lora_weights``, resumed exactly, in bf16, and refused in one
line on another family's folder.

Runs are in-process, 16-pixel images (2x2 packed latent tokens), batch 4, 2-4 steps; module-scoped
fixtures share each run between the tests that read it.

Float tolerances (tests/tolerances.py): two evaluations of one function that differ only in rounding are
within 2 gamma_L max |output|, L the summed reduction lengths along the computation (each test says which)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from tolerances import path_reduction_length, sum_reordering_tolerance
from trainer_utils import assert_same_tensors, load_safetensors_dir, straight_and_resumed, train_in_process

RES = 16
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two threads contend on a shared 2-core machine


def _tiny_adapter():
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)  # the same tiny weights whatever ran before in this worker
    return get_model_adapter("qwenimage").load(model_config_name_or_path="tiny", resolution=RES)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretrained tiny Qwen-Image pipeline folder (QwenImagePipeline.save_pretrained)."""
    folder = tmp_path_factory.mktemp("qwen") / "base"
    torch.manual_seed(0)
    _tiny_adapter().save(str(folder))
    return folder


def _args(base, out, *extra):
    return ["--model_type", "qwenimage", "--pretrained_model_name_or_path", str(base), "--dataset_name",
            "mnist5k_captions", "--resolution", str(RES), "--train_batch_size", "4", "--learning_rate", "1e-2",
            "--num_clusters", "4", "--report_to", "none", "--seed", "0", "--num_validation_images", "1",
            "--num_inference_steps", "2", "--max_train_samples", "12", "--output_dir", str(out), *extra]


def _lora(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def vanilla(base):
    out = base.parent / "vanilla"
    train_in_process(_args(base, out, "--rank", "4", "--max_train_steps", "3", "--validation_steps", "1",
                           "--validation_prompt", "a handwritten digit 3"))
    return out


@pytest.fixture(scope="module")
def resumed(base):
    """ANT with UW on a statically shifted schedule: 20 straight steps (checkpoints at 10 and 20), and its
    checkpoint-10 (the same seeded run interrupted there, mid-epoch: 3 batches an epoch) resumed to 20."""

    common = ["--rank", "4", "--mtl_method", "uw", "--flow_shift", "3.0", "--checkpointing_steps", "10",
              "--num_validation_images", "1", "--max_train_steps", "20"]
    return straight_and_resumed(base.parent, lambda out, *flags: _args(base, out, *flags), common)


# --------------------------------------------------------------------------- text, latents, packing


def test_prompt_template_drops_its_34_tokens_and_keeps_the_mask():
    """The in-memory tokenizer splits the pipeline's template as Qwen's does (34-token prefix), and the
    embeddings are the text encoder's last hidden state of the caption's own tokens (computed here
    without the pipeline), zero-padded with mask 0 past a shorter caption."""
    from diffusers import QwenImagePipeline

    from diffusers_ant.models.presets import QWEN_PROMPT_TEMPLATE, QWEN_TEMPLATE_DROP

    adapter = _tiny_adapter()
    pipeline = adapter.make_pipeline()
    assert isinstance(pipeline, QwenImagePipeline)
    assert pipeline.prompt_template_encode == QWEN_PROMPT_TEMPLATE
    assert pipeline.prompt_template_encode_start_idx == QWEN_TEMPLATE_DROP == 34
    tokenizer = adapter.tokenizer
    assert len(tokenizer(QWEN_PROMPT_TEMPLATE.split("{}")[0]).input_ids) == 34
    captions = ["a handwritten digit 3", "seven"]
    embeds, mask = adapter.encode_prompt(captions)
    for row, caption in enumerate(captions):
        ids = tokenizer(QWEN_PROMPT_TEMPLATE.format(caption), return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = adapter.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 34:]
        n = hidden.shape[0]
        assert int(mask[row].sum()) == n and bool(mask[row, :n].all())
        torch.testing.assert_close(embeds[row, :n], hidden.float())
        assert not embeds[row, n:].any()
    assert mask.shape == embeds.shape[:2] and int(mask[1].sum()) < int(mask[0].sum())


def test_latents_are_normalised_by_the_vae_statistics_and_round_trip():
    """x0 = (z - latents_mean) / latents_std of the posterior sample (one frame of the 5-D VAE), and
    the pipeline's inverse recovers z: decode_latents(x0) == vae.decode(z)."""
    adapter = _tiny_adapter()
    mean, std = [0.5, -1.0, 0.25, 2.0], [2.0, 0.5, 1.5, 3.0]  # not the preset's 0 / 1: the test can fail
    adapter.vae.register_to_config(latents_mean=mean, latents_std=std)
    pixels = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = adapter.encode_pixels(pixels, generator=torch.Generator().manual_seed(2))
    assert x0.shape == (2, 4, RES // 4, RES // 4)
    with torch.no_grad():
        posterior = adapter.vae.encode(pixels.unsqueeze(2)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(2))
        z = posterior.mean + posterior.std * noise
        expected = (z - torch.tensor(mean).view(1, 4, 1, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1, 1)
        torch.testing.assert_close(x0, expected[:, :, 0])
        decoded = adapter.vae.decode(z).sample[:, :, 0]
    # the decoder on z and on its round trip (z - mean) / std * std + mean, 4 roundings away: rounding alone,
    # L = the decoder's path (34,012) + 4: 2.5e-3 (observed 8e-7); a missing inverse moves the pixels by 0.7
    vae = adapter.vae
    length = path_reduction_length([vae.post_quant_conv, vae.decoder]) + 4
    tolerance = sum_reordering_tolerance(length, float(decoded.abs().max()))
    torch.testing.assert_close(adapter.decode_latents(x0), decoded, rtol=0, atol=tolerance)


def test_prediction_is_unpacked_to_the_latent_shape_as_the_pipeline_packs_it():
    from diffusers import QwenImagePipeline

    adapter = _tiny_adapter()
    x = torch.randn(3, 4, 4, 6)
    packed = QwenImagePipeline._pack_latents(x, 3, 4, 4, 6)
    assert packed.shape == (3, 2 * 3, 16)
    torch.testing.assert_close(QwenImagePipeline._unpack_latents(packed, 16, 24, 4)[:, :, 0], x)
    cond = adapter.conditioning({"pixel_values": torch.zeros(3, 3, 16, 24), "captions": ["a", "b c", ""]})
    prediction = adapter.predict(adapter.model, x, torch.tensor([10.0, 500.0, 990.0]), cond)
    assert prediction.shape == x.shape and torch.isfinite(prediction).all()


def test_sources_with_captions_of_other_lengths_join_without_changing_the_prediction():
    """Two sources of a step (Diff-Tuning's) pad their captions each to its own longest: joined, the
    shorter ones get more masked padding, and the transformer's output for them does not change."""
    from diffusers_ant.training.step import _concatenate_prepared

    adapter = _tiny_adapter()
    short = adapter.conditioning({"pixel_values": torch.zeros(2, 3, RES, RES), "captions": ["a", "bb"]})
    long = adapter.conditioning({"pixel_values": torch.zeros(1, 3, RES, RES), "captions": ["a much longer caption"]})
    parts = [{"x": torch.zeros(len(c["prompt_embeds"])), "conditioning": c} for c in (short, long)]
    joined = _concatenate_prepared(parts)["conditioning"]
    assert joined["prompt_embeds"].shape[:2] == joined["prompt_embeds_mask"].shape == (3, long["prompt_embeds"].shape[1])
    assert not joined["prompt_embeds_mask"][:2, short["prompt_embeds"].shape[1]:].any()
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        alone = adapter.predict(adapter.model, x, t, short)
        padded = adapter.predict(adapter.model, x, t, {k: v[:2] for k, v in joined.items()})
    # the masked padding adds exact zeros to the attention's sums over the tokens, in other orders and kernel
    # blockings: rounding alone. L = the transformer's layers (4,000) + per block the attention's own sums (q.k over
    # a head's dims, p.v over the 4 image + 25 padded text tokens): 7.7e-4 (observed 1e-7); unmasked padding moves
    # the output by 0.08, 100x the bound
    config = adapter.model.config
    tokens = x[0, 0].numel() // 4 + joined["prompt_embeds"].shape[1]  # 2x2 packed latent patches + text
    attention = config.num_layers * (config.attention_head_dim + tokens)
    tolerance = sum_reordering_tolerance(path_reduction_length(adapter.model) + attention, float(alone.abs().max()))
    torch.testing.assert_close(alone, padded, rtol=0, atol=tolerance)


def test_caching_hooks_reproduce_the_uncached_encoding():
    """What --cache_latents / --cache_text_embeddings store: the VAE moments (the latent draw from them is the
    uncached one), text entries of one caption at a time that batch together and give the uncached
    conditioning, and encoded validation prompts that sample what the prompts sample."""
    adapter = _tiny_adapter()
    pixels = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(3)) * 2 - 1
    moments = adapter.encode_moments(pixels)
    assert moments.shape == (2, 8, 1, RES // 4, RES // 4)
    torch.testing.assert_close(adapter.latents_from_moments(moments, generator=torch.Generator().manual_seed(4)),
                               adapter.encode_pixels(pixels, generator=torch.Generator().manual_seed(4)))
    captions = ["a handwritten digit 3", "seven"]
    one_at_a_time = [adapter.encode_text({"captions": [c], "pixel_values": pixels[:1]}) for c in captions]
    stacked = {key: torch.cat([entry[key] for entry in one_at_a_time]) for key in one_at_a_time[0]}
    direct = adapter.conditioning({"captions": captions, "pixel_values": pixels})
    for key, value in adapter.trimmed(stacked).items():
        torch.testing.assert_close(value, direct[key])
    pipeline = adapter.make_pipeline()
    encoded = adapter.validation_prompt_kwargs(pipeline, ["a handwritten digit 3"] * 2, guidance_scale=2.0)
    assert set(encoded) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"}
    images = [adapter.sample(pipeline, 2, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                             prompts=prompts, guidance_scale=2.0) for prompts in (["a handwritten digit 3"], encoded)]
    import numpy as np

    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*images))


def test_the_text_cache_keeps_each_captions_own_tokens_and_reads_back_the_padded_encoding():
    """`encode_text` pads every caption to 512 tokens so that cached captions batch together; the cache kept the
    padding (3.5 MiB per caption in bf16 at 3,584 dims). It now keeps the caption's own tokens and pads them
    back when a row is read: the same bits as the padded encoding, a fraction of the memory."""
    from types import SimpleNamespace

    from diffusers_ant.models.qwenimage import MAX_SEQUENCE_LENGTH
    from diffusers_ant.training.caching import TrainingCache, cache_text

    adapter = _tiny_adapter()
    captions = ["", "seven", "a handwritten digit 3 on a dark background"]
    dataset = SimpleNamespace(caption_variants=lambda: list(captions), text_fields=lambda c: {"captions": c})
    cache = TrainingCache(**cache_text(adapter, dataset, batch_size=2, disable_progress=True))
    assert cache.text_lengths == {"prompt_embeds": MAX_SEQUENCE_LENGTH, "prompt_embeds_mask": MAX_SEQUENCE_LENGTH}
    padded_bytes = 0
    for caption in captions:
        alone = adapter.encode_text({"captions": [caption], "pixel_values": torch.zeros(1, 3, RES, RES)})
        tokens = int(alone["prompt_embeds_mask"].sum())
        assert 0 < tokens < 64
        assert {key: value.shape[0] for key, value in cache.text[caption].items()} == {"prompt_embeds": tokens,
                                                                                      "prompt_embeds_mask": tokens}
        fields = cache.text_fields(caption)
        for key, value in alone.items():
            read = fields[adapter.CACHED_TEXT_PREFIX + key]
            assert read.dtype == value.dtype and torch.equal(read, value[0])
        padded_bytes += sum(value[0].numel() * value.element_size() for value in alone.values())
    assert cache.nbytes() * 8 < padded_bytes


# --------------------------------------------------------------------------- training and loading


def test_vanilla_lora_loads_with_the_pipelines_own_loader_and_samples(base, vanilla):
    from diffusers import QwenImagePipeline

    from diffusers_ant.models import load_pipeline

    lora = _lora(vanilla)
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora), list(lora)[:4]
    assert all(t.dtype == torch.float32 for t in lora.values())
    assert max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k) > 0  # trained (B starts at 0)
    assert (vanilla / "samples" / "step-1.png").is_file() and (vanilla / "samples" / "step-3.png").is_file()
    plain = QwenImagePipeline.from_pretrained(str(base))
    plain.load_lora_weights(str(vanilla))
    ours = load_pipeline(str(vanilla))
    reference = QwenImagePipeline.from_pretrained(str(base))
    images = []
    for pipeline in (plain, ours, reference):
        pipeline.set_progress_bar_config(disable=True)
        images.append(pipeline("a handwritten digit 3", height=RES, width=RES, num_inference_steps=2,
                               generator=torch.Generator().manual_seed(0), output_type="pt").images)
    assert images[0].shape == (1, 3, RES, RES)
    torch.testing.assert_close(images[0], images[1])
    assert (images[0] - images[2]).abs().max() > 1e-4  # the LoRA changes the samples


def test_card_has_the_diffusers_scripts_fields_and_its_snippet_runs(vanilla, monkeypatch):
    from diffusers_ant.hub import write_model_card

    card = (vanilla / "README.md").read_text()
    meta = card.split("---")[1]
    assert "license: apache-2.0" in meta
    for tag in ("text-to-image", "diffusers-training", "lora", "qwen-image", "qwen-image-diffusers", "template:sd-lora"):
        assert f"- {tag}\n" in meta, tag
    code = card.split("```python")[1].split("```")[0]
    assert "QwenImagePipeline.from_pretrained" in code and "pipe.load_lora_weights(folder)" in code
    monkeypatch.chdir(vanilla.parent)
    scope = {}
    exec(re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", code), scope)  # noqa: S102 - our own card
    assert scope["image"].size == (RES, RES)
    # a Hub base model is named in the card's metadata, as diffusers' script writes base_model
    hub = write_model_card(vanilla.parent / "hub-card", base_model="Qwen/Qwen-Image", model_type="qwenimage",
                           method_summary={"lora_rank": 4, "mtl_method": "uw"}, lora=True).read_text()
    assert "base_model: Qwen/Qwen-Image" in hub and 'QwenImagePipeline.from_pretrained("Qwen/Qwen-Image")' in hub


def test_ant_uw_resumes_exactly_and_clusters_the_shifted_sigmas(resumed):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_ant import cluster_timesteps
    from diffusers_ant.clustering import TimestepIntervals

    straight, again = resumed
    assert_same_tensors(_lora(straight), _lora(again))
    assert_same_tensors(load_safetensors_dir(straight / "checkpoint-20"), load_safetensors_dir(again / "checkpoint-20"))
    from safetensors.torch import load_file

    at_10, at_20 = (load_file(straight / f"checkpoint-{s}" / "trainable_state.safetensors") for s in (10, 20))
    assert max((at_10[k] - at_20[k]).abs().max().item() for k in at_10) > 1e-4  # steps 11-20 trained
    keys = list(at_10)
    assert keys and all("lora_" in k for k in keys), keys[:4]  # the checkpoint holds the adapters only
    assert not list((straight / "checkpoint-10").glob("model*.safetensors"))
    with open(straight / "timestep_intervals.json", encoding="utf-8") as f:
        saved = TimestepIntervals.from_json(f.read()).bounds
    # ANT's clusters are those of the run's own (shifted) scheduler. A shift moves log-SNR by a constant
    # (-2 log shift), so SNR clusters keep their index bounds and cover other sigmas: the sigmas are
    # checked in the next test.
    assert saved == cluster_timesteps(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, objective="snr").bounds


def test_flow_shift_shifts_the_training_sigmas_even_of_a_dynamic_shifting_config(base, tmp_path):
    """Qwen-Image's own scheduler config shifts dynamically, which leaves the training sigmas unshifted (as
    in diffusers' script); --flow_shift S makes them S s / (1 + (S - 1) s), and SNR follows them."""
    import shutil

    from diffusers_ant import schedule_snr
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.schedule import flow_sigma_at

    dynamic = tmp_path / "dynamic"
    shutil.copytree(base, dynamic)
    config_path = dynamic / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192)
    config_path.write_text(json.dumps(config))
    load = get_model_adapter("qwenimage").load
    t = torch.tensor([0, 250, 500, 999])
    plain = flow_sigma_at(load(pretrained_model_name_or_path=str(dynamic), resolution=RES).noise_scheduler, t)
    torch.testing.assert_close(plain, (t + 1).float() / 1000)  # unshifted
    scheduler = load(pretrained_model_name_or_path=str(dynamic), resolution=RES, flow_shift=3.0).noise_scheduler
    shifted = flow_sigma_at(scheduler, t)
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    torch.testing.assert_close(schedule_snr(scheduler)[t].float(), ((1 - shifted) / shifted) ** 2)


def test_pcgrad_on_the_lora_subset_with_chosen_lora_layers(base):
    out = base.parent / "pcgrad"
    train_in_process(_args(base, out, "--rank", "2", "--mtl_method", "pcgrad", "--task_gradient_subset", "lora",
                           "--lora_layers", "to_q,add_q_proj", "--max_train_steps", "2"))
    lora = _lora(out)
    assert {k.split(".")[-3] for k in lora} == {"to_q", "add_q_proj"}
    assert all(torch.isfinite(t).all() for t in lora.values())
    assert max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k) > 0
    with open(out / "ant_lora.json", encoding="utf-8") as f:
        assert json.load(f)["target_modules"] == ["add_q_proj", "to_q"]


def test_bf16_lora_with_stratified_logit_normal_draws_trains_and_saves_float32(base):
    out = base.parent / "bf16"
    train_in_process(_args(base, out, "--rank", "4", "--mixed_precision", "bf16", "--max_train_steps", "2",
                           "--mtl_method", "uw", "--validation_steps", "1",
                           "--weighting_scheme", "logit_normal", "--timestep_sampling", "stratified"))
    lora = _lora(out)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())
    assert max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k) > 0
    assert (out / "samples" / "step-1.png").is_file()
    config = json.loads((out / "training_config.json").read_text())
    assert (config["timestep_sampling"], config["weighting_scheme"]) == ("stratified", "logit_normal")


def test_diff_tuning_kd_trains_a_lora(base):
    """Diff-Tuning's distillation variant: retention rows take the frozen pretrained prediction as target."""
    out = base.parent / "kd"
    train_in_process(_args(base, out, "--rank", "4", "--retention", "kd", "--bank_fraction", "0.5",
                           "--max_train_steps", "2"))
    lora = _lora(out)
    assert all(torch.isfinite(t).all() for t in lora.values())
    assert max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k) > 0


def test_full_fine_tuning_saves_a_qwen_image_pipeline(base):
    from diffusers import QwenImagePipeline

    out = base.parent / "full"
    train_in_process(_args(base, out, "--max_train_steps", "1", "--num_validation_images", "1"))
    trained = QwenImagePipeline.from_pretrained(str(out)).transformer.state_dict()
    before = QwenImagePipeline.from_pretrained(str(base)).transformer.state_dict()
    assert trained.keys() == before.keys()
    assert max((trained[k] - before[k]).abs().max().item() for k in trained) > 1e-4


# --------------------------------------------------------------------------- bad input


def test_another_familys_folder_is_one_line_naming_both_types(tmp_path):
    folder = tmp_path / "sd-pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}))
    with pytest.raises(ValueError) as err:
        train_in_process(_args(folder, tmp_path / "out", "--rank", "4", "--max_train_steps", "1"))
    message = str(err.value)
    assert "\n" not in message and "--model_type sd" in message and "qwenimage" in message, message



def test_a_qwen_image_folder_given_to_another_type_is_one_line(base):
    from diffusers_ant.models import get_model_adapter

    with pytest.raises(ValueError) as err:
        get_model_adapter("sd").load(pretrained_model_name_or_path=str(base), resolution=RES)
    message = str(err.value)
    assert "\n" not in message and "QwenImagePipeline" in message and "--model_type qwenimage" in message, message
    assert "not a sd model" in message


def test_flow_matching_is_the_default_and_ddpm_is_refused(tmp_path):
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.args import UsageError

    args = parse_args(["--model_type", "qwenimage", "--dataset_name", "mnist5k_captions", "--output_dir", str(tmp_path)])
    assert args.noise_scheduler == "flow_match" and args.model_config_name_or_path == "tiny"
    with pytest.raises(UsageError, match="flow matching"):
        parse_args(["--model_type", "qwenimage", "--dataset_name", "mnist5k_captions", "--noise_scheduler", "ddpm"])
    with pytest.raises(UsageError, match="--lora_layers"):
        parse_args(["--model_type", "qwenimage", "--dataset_name", "mnist5k_captions", "--lora_layers", "to_q"])
