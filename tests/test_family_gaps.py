"""Issue 16, the families' gaps in caching and DeMe: ``--cache_text_embeddings`` for ``flux``, ``--cache_latents``
on ``qwenimage`` with its VAE encoder really freed (validation still decodes), and DeMe's channel projection on
the two-stream transformers (``sd3``, ``flux``, ``qwenimage``).

Tiny presets at 16 px, in-process runs of 2 steps: a cached flux full fine-tune, and two DeMe LoRA interval
fine-tunes on qwenimage (the first one cached) merged by `merge_deme.py`; several assertions per run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tolerances import output_tolerance
from trainer_utils import train_in_process

RES = 16
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two threads contend on a shared 2-core machine


def _tiny(model_type):
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    return get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=RES)


# --------------------------------------------------------------------------- flux: --cache_text_embeddings


def test_flux_cached_text_gives_the_uncached_conditioning_and_samples_with_both_encoders_freed():
    """What `--cache_text_embeddings` stores for flux (one caption at a time, `training.caching.cache_text`)
    batches into the conditioning CLIP + T5 give, with both encoders freed; the validation prompts are
    `FluxPipeline.encode_prompt`'s, and sampling from them after the encoders are gone gives the images the
    prompts gave before."""
    from types import SimpleNamespace

    from torch.utils.data import default_collate

    from diffusers_ant.training.caching import TrainingCache, cache_text

    adapter = _tiny("flux")
    assert adapter.supports_text_caching and adapter.guidance_embeds
    captions = ["a handwritten digit 3", "seven", ""]
    pixels = torch.zeros(3, 3, RES, RES)
    uncached = adapter.conditioning({"captions": captions, "pixel_values": pixels})
    assert sorted(uncached) == ["encoder_hidden_states", "guidance", "pooled_projections"]
    assert uncached["encoder_hidden_states"].shape[:2] == (3, adapter.max_sequence_length)

    dataset = SimpleNamespace(caption_variants=lambda: sorted(captions), text_fields=lambda c: {"captions": c})
    cache = TrainingCache(**cache_text(adapter, dataset, batch_size=2, disable_progress=True))
    rows = [{"latent_moments": torch.zeros(4, 2, 2), **cache.text_fields(c)} for c in captions]
    cached_batch = default_collate(rows)

    pipeline = adapter.make_pipeline()
    prompts = ["a handwritten digit 3", "seven"]
    encoded = adapter.validation_prompt_kwargs(pipeline, prompts, guidance_scale=3.5)
    embeds, pooled, _ = pipeline.encode_prompt(prompt=prompts, prompt_2=None,
                                               max_sequence_length=adapter.max_sequence_length)
    assert sorted(encoded) == ["pooled_prompt_embeds", "prompt_embeds"]
    assert torch.equal(encoded["prompt_embeds"], embeds) and torch.equal(encoded["pooled_prompt_embeds"], pooled)
    # the pipeline's encoding is the training encoding (the same T5 sequence, from a batch of two captions
    # against three: rounding alone, tests/tolerances.py's output_tolerance of T5)
    t5_tolerance = output_tolerance(adapter.text_encoder_2, uncached["encoder_hidden_states"])
    torch.testing.assert_close(encoded["prompt_embeds"], uncached["encoder_hidden_states"][:2], rtol=0,
                               atol=t5_tolerance)
    before = adapter.sample(pipeline, 2, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                            prompts=prompts, guidance_scale=3.5)

    # cached two captions at a time against three at once: each embedding is the same function of its caption,
    # through CLIP (pooled) or T5 (sequence) in another batch, so rounding alone (tests/tolerances.py: 1.5e-4
    # here, the guidance a constant; measured 0); another caption's embedding is 2 or more away
    encoder_of = {"pooled_projections": adapter.text_encoder, "encoder_hidden_states": adapter.text_encoder_2}
    tolerance = {key: output_tolerance(encoder, uncached[key]) for key, encoder in encoder_of.items()}
    freed = adapter.free_text_encoders()
    assert sorted(freed) == ["text_encoder", "text_encoder_2"]
    assert adapter.text_encoder is None and adapter.text_encoder_2 is None
    from_cache = adapter.conditioning(cached_batch)
    assert sorted(from_cache) == sorted(uncached)
    for key in uncached:
        torch.testing.assert_close(from_cache[key], uncached[key], rtol=0, atol=tolerance.get(key, 0.0), msg=key)
    after = adapter.sample(adapter.make_pipeline(), 2, generator=torch.Generator().manual_seed(0),
                           num_inference_steps=2, prompts=encoded, guidance_scale=3.5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after))


def test_flux_trains_and_validates_with_cached_latents_and_text_and_writes_its_encoders_back(tmp_path, monkeypatch):
    """A full fine-tune of the tiny preset with both caches: the encoders are freed (stashed, since the run
    writes a whole pipeline), validation samples from the encoded prompts, and the saved FluxPipeline has
    CLIP and T5 back, with the weights they had."""
    from diffusers import FluxPipeline

    from diffusers_ant.models.flux import FluxAdapter

    freed, original = {}, FluxAdapter.free_text_encoders

    def spy(self):
        parts = original(self)
        for name, module in parts.items():
            freed[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return parts

    monkeypatch.setattr(FluxAdapter, "free_text_encoders", spy)
    out = tmp_path / "flux-cached"
    train_in_process([
        "--model_type", "flux", "--model_config_name_or_path", "tiny", "--dataset_name", "mnist5k_captions",
        "--resolution", str(RES), "--train_batch_size", "2", "--max_train_samples", "4", "--report_to", "none",
        "--seed", "0", "--num_inference_steps", "2", "--num_validation_images", "1", "--validation_steps", "1",
        "--validation_prompt", "a handwritten digit 3", "--output_dir", str(out), "--learning_rate", "1e-3",
        "--max_train_steps", "2", "--num_clusters", "2", "--cache_latents", "--cache_text_embeddings", "--center_crop"])
    assert sorted(freed) == ["text_encoder", "text_encoder_2"]
    assert (out / "samples" / "step-1.png").is_file() and (out / "samples" / "step-2.png").is_file()
    assert not (out / ".freed_encoders").exists()
    saved = FluxPipeline.from_pretrained(str(out))
    for name, state in freed.items():
        reloaded = getattr(saved, name).state_dict()
        assert all(torch.equal(reloaded[k].float(), v.float()) for k, v in state.items() if k in reloaded), name


def test_qwenimage_vae_encoder_comes_back_while_saving_then_its_placeholder():
    """`FreedEncoders.restored` puts the stashed encoder back for the save and the placeholder (not None)
    afterwards, so that validation after the save still decodes."""
    import tempfile

    from diffusers_ant.training.caching import FreedEncoders

    adapter = _tiny("qwenimage")
    real = {k: v.clone() for k, v in adapter.vae.encoder.state_dict().items()}
    latents = torch.randn(1, adapter.vae.config.z_dim, 4, 4, generator=torch.Generator().manual_seed(0))
    decoded = adapter.decode_latents(latents)
    vae = adapter.free_vae_encoder()
    placeholder = adapter.vae.encoder
    assert adapter.vae.quant_conv is None and not list(placeholder.parameters())
    with tempfile.TemporaryDirectory() as stash:
        freed = FreedEncoders(adapter, {}, vae, stash)
        freed.stash()
        torch.testing.assert_close(adapter.decode_latents(latents), decoded, rtol=0, atol=0)
        with freed.restored():
            state = adapter.vae.encoder.state_dict()
            assert sorted(state) == sorted(real) and all(torch.equal(state[k], real[k]) for k in real)
        assert adapter.vae.encoder is placeholder and adapter.vae.quant_conv is None
    torch.testing.assert_close(adapter.decode_latents(latents), decoded, rtol=0, atol=0)


# --------------------------------------------------------------------------- DeMe's projection on transformers


@pytest.mark.parametrize("model_type,blocks", [
    ("sd3", ["transformer_blocks.0", "transformer_blocks.1"]),
    ("flux", ["transformer_blocks.0", "single_transformer_blocks.0"]),
    ("qwenimage", ["transformer_blocks.0", "transformer_blocks.1"]),
])
def test_channel_projection_on_two_stream_transformers_is_identity_then_mixes_the_image_tokens(model_type, blocks):
    """Under LoRA, one D x D projection after every block (Flux: double- and single-stream), the identity at
    first (the prediction is bitwise the base's), then acting on the image tokens; the DeMe / kd teacher
    (the student with adapters and projections off) still predicts the base exactly."""
    from diffusers_ant.deme import add_channel_projection, channel_projections
    from diffusers_ant.teacher import make_teacher

    adapter = _tiny(model_type)
    pixels = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"captions": ["a", "seven"], "pixel_values": pixels}
    x0, cond = adapter.encode_batch(batch, generator=torch.Generator().manual_seed(2), training=True)
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        reference = adapter.predict(adapter.model, x_t, t, cond)
        adapter.add_lora(2)
        projections = add_channel_projection(adapter.model)
        assert list(channel_projections(adapter.model)) == blocks
        inner = adapter.model.config.num_attention_heads * adapter.model.config.attention_head_dim
        assert all(p.channels == inner and p.output_index == 1 and p.weight.requires_grad for p in projections)
        assert torch.equal(adapter.predict(adapter.model, x_t, t, cond), reference)
        projections[0].weight.mul_(1.5)
        assert (adapter.predict(adapter.model, x_t, t, cond) - reference).abs().max() > 1e-3
    teacher = make_teacher(adapter, lora=True)
    assert teacher.model is adapter.model
    assert torch.equal(teacher.predict(x_t, t, cond), reference)


# --------------------------------------------------------------------------- qwenimage: one cached DeMe run


@pytest.fixture(scope="module")
def qwen_deme_cached(tmp_path_factory):
    """A tiny Qwen-Image base, then one DeMe LoRA fine-tune of interval 0 (its default channel projection on)
    with --cache_latents --cache_text_embeddings --center_crop, validated at steps 1 and 2; records what
    `free_vae_encoder` dropped."""
    from diffusers_ant.models.qwenimage import QwenImageAdapter

    base = tmp_path_factory.mktemp("qwen-gaps") / "base"
    _tiny("qwenimage").save(str(base))
    out = base.parent / "deme0"
    freed, original = {}, QwenImageAdapter.free_vae_encoder

    def spy(self):
        parts = original(self)
        freed.update(parts=sorted(parts), encoder=self.vae.encoder)
        return parts

    QwenImageAdapter.free_vae_encoder = spy
    try:
        train_in_process([
            "--model_type", "qwenimage", "--pretrained_model_name_or_path", str(base), "--dataset_name",
            "mnist5k_captions", "--resolution", str(RES), "--train_batch_size", "2", "--max_train_samples", "4",
            "--report_to", "none", "--seed", "0", "--num_inference_steps", "2", "--num_validation_images", "1",
            "--validation_steps", "1", "--validation_prompt", "a handwritten digit 3", "--output_dir", str(out),
            "--rank", "4", "--learning_rate", "1e-2", "--max_train_steps", "2", "--no-use_ema",
            "--deme_interval", "0", "--num_clusters", "2",
            "--cache_latents", "--cache_text_embeddings", "--center_crop"])
    finally:
        QwenImageAdapter.free_vae_encoder = original
    return base, out, freed


@pytest.fixture(scope="module")
def qwen_deme_interval_1(qwen_deme_cached):
    """The second DeMe interval's LoRA fine-tune (uncached), beside the first."""
    base, first, _ = qwen_deme_cached
    out = base.parent / "deme1"
    train_in_process([
        "--model_type", "qwenimage", "--pretrained_model_name_or_path", str(base), "--dataset_name",
        "mnist5k_captions", "--resolution", str(RES), "--train_batch_size", "2", "--max_train_samples", "4",
        "--report_to", "none", "--seed", "1", "--num_inference_steps", "2", "--num_validation_images", "1",
        "--output_dir", str(out), "--rank", "4", "--learning_rate", "1e-2", "--max_train_steps", "2",
        "--no-use_ema", "--deme_interval", "1", "--num_clusters", "2"])
    return base, first, out


def test_qwenimage_frees_its_vae_encoder_and_still_samples_its_validation_images(qwen_deme_cached):
    _, out, freed = qwen_deme_cached
    assert freed["parts"] == ["encoder", "quant_conv"]
    # the placeholder `AutoencoderKLQwenImage.clear_cache` counts (no parameters, no causal convolutions)
    assert isinstance(freed["encoder"], torch.nn.Module) and not list(freed["encoder"].parameters())
    for step in (1, 2):  # decoded after the encoder went
        assert (out / "samples" / f"step-{step}.png").is_file()


def test_deme_lora_with_channel_projection_on_qwenimage_trains_saves_and_reloads(qwen_deme_cached):
    """The interval fine-tune trains its LoRA and its projections (off the identity), saves them beside
    diffusers' LoRA file, and `load_pipeline` re-attaches them to the QwenImage transformer."""
    from safetensors.torch import load_file

    from diffusers_ant.deme import channel_projections
    from diffusers_ant.models import load_pipeline

    _, out, _ = qwen_deme_cached
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k) > 0
    saved = load_file(os.path.join(out, "channel_projection.safetensors"))
    assert sorted(saved) == [f"transformer_blocks.{i}.channel_projection.weight" for i in (0, 1)]
    eye = torch.eye(saved["transformer_blocks.0.channel_projection.weight"].shape[0])
    assert all((w - eye).abs().max() > 0 for w in saved.values())  # trained
    pipeline = load_pipeline(str(out))
    attached = channel_projections(pipeline.transformer)
    assert sorted(attached) == ["transformer_blocks.0", "transformer_blocks.1"]
    for name, projection in attached.items():
        assert projection.output_index == 1
        assert torch.equal(projection.weight.detach().cpu(), saved[f"{name}.channel_projection.weight"])
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a handwritten digit 3", height=RES, width=RES, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, RES, RES) and torch.isfinite(image).all()


def test_deme_lora_merge_on_qwenimage_merges_the_projections_by_task_arithmetic(qwen_deme_interval_1, tmp_path):
    """`merge_deme.py` on the two interval LoRAs: one LoRA, and projections I + sum_i w_i (P_i - I) beside
    it, which `load_pipeline` attaches to the Qwen-Image transformer."""
    import importlib.util

    from safetensors.torch import load_file

    from diffusers_ant.deme import channel_projections
    from diffusers_ant.models import load_pipeline

    base, first, second = qwen_deme_interval_1
    spec = importlib.util.spec_from_file_location(
        "merge_deme", os.path.join(os.path.dirname(os.path.dirname(__file__)), "train_scripts", "merge_deme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    merged = tmp_path / "merged"
    module.main(["--base", str(base), "--finetuned", str(first), str(second), "--output_dir", str(merged),
                 "--weights", "0.5", "0.25"])
    parts = [load_file(os.path.join(folder, "channel_projection.safetensors")) for folder in (first, second)]
    result = load_file(os.path.join(merged, "channel_projection.safetensors"))
    assert sorted(result) == sorted(parts[0]) == sorted(parts[1])
    for key, value in result.items():
        eye = torch.eye(value.shape[0])
        torch.testing.assert_close(value, eye + 0.5 * (parts[0][key] - eye) + 0.25 * (parts[1][key] - eye))
    pipeline = load_pipeline(str(merged))
    attached = channel_projections(pipeline.transformer)
    assert all(torch.equal(p.weight.detach().cpu(), result[f"{name}.channel_projection.weight"])
               for name, p in attached.items()) and len(attached) == 2
