"""Tests for diffusers_ant.models: the four model types, their tiny presets, LoRA, saving and loading.

Everything runs on the CPU with tiny random models at 16x16 pixels and 2 sampling steps.

Tolerance of a reloaded LoRA (`lora_tolerance`): the reloaded denoiser computes the trained one's
function with the LoRA re-attached (peft's re-computed scaling, diffusers' load_lora_weights) or folded
into the weights (a full save: (W + s B A) x against W x + s B (A x)), so the two outputs differ by
float32 rounding alone: tests/tolerances.py's `output_tolerance`, 2 gamma_L max |output|, L the summed
reduction lengths of every layer on the prediction's path (the denoiser with its LoRA layers, and a
ControlNet's frozen UNet): L = 3,104 for the tiny DiT to 29,728 for the ControlNet with its UNet, 4e-4 to
4e-3 max |output|. The observed differences are 0 to 2e-6; a lost LoRA moves the output by the LoRA's
effect (0.7 to 3.7 after test_lora_step_save_load's step), which each test checks is far above the bound.
"""

import json
import os

import pytest
import numpy as np
import torch

from diffusers_ant.models import (
    MODEL_TYPES,
    ClassConditionalUNetPipeline,
    get_model_adapter,
    load_pipeline,
    tiny_clip_tokenizer,
)
from diffusers_ant.models.lora import has_lora, lora_disabled
from tolerances import output_tolerance

RES = 16
BATCH = 2

# (model type, preset, load options): every model type, both UNet flavours, both DiT spaces
CASES = {
    "unet": ("unet", "tiny", {"num_channels": 1}),
    "unet-class": ("unet", "tiny", {"num_channels": 1, "num_classes": 3}),
    "dit": ("dit", "tiny", {"num_channels": 1, "num_classes": 3}),
    "dit-latent": ("dit", "tiny-latent", {"num_channels": 3}),
    "sd": ("sd", "tiny", {}),
    "controlnet": ("controlnet", "tiny", {}),
}


def build(case):
    model_type, preset, options = CASES[case]
    torch.manual_seed(0)
    return get_model_adapter(model_type).load(model_config_name_or_path=preset, resolution=RES, **options)


def fake_batch(adapter, with_labels=True):
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.rand(BATCH, adapter.num_channels, RES, RES, generator=g) * 2 - 1}
    if with_labels and getattr(adapter, "num_classes", None) not in (None, 1):
        batch["class_labels"] = torch.tensor([0, 2])
    if adapter.tokenizer is not None:
        batch["input_ids"] = adapter.tokenize(["a cat", "digit 7"])
        batch["conditioning_pixel_values"] = torch.rand(BATCH, 3, RES, RES, generator=g)
    return batch


def noisy(adapter, x0, seed=2):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, adapter.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
    return adapter.noise_scheduler.add_noise(x0, noise, t), noise, t


def train_step(adapter, lr=1e-2):
    """One SGD step on the epsilon loss; returns the loss."""
    x0, cond = adapter.encode_batch(fake_batch(adapter))
    x_t, noise, t = noisy(adapter, x0)
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=lr)
    loss = torch.nn.functional.mse_loss(adapter.predict(adapter.model, x_t, t, cond), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def lora_tolerance(adapter, output):
    """The module docstring's bound on |a - b| for two predictions that differ only in rounding."""
    return output_tolerance([m for m in (adapter.model, adapter.unet) if m is not None], output)


def denoiser_of(pipeline):
    for name in ("controlnet", "transformer", "unet"):
        if hasattr(pipeline, name):
            return getattr(pipeline, name)


def sample_kwargs(adapter):
    return {
        "num_inference_steps": 2,
        "prompts": ["a cat"],
        "conditioning_images": torch.rand(1, 3, RES, RES),
    }


# ---------------------------------------------------------------------------- registry and errors


def test_registry_and_unknown_type():
    assert {"unet", "dit", "sd", "controlnet", "sdxl", "flux", "sd3", "qwenimage"} <= set(MODEL_TYPES)
    assert get_model_adapter("dit") is MODEL_TYPES["dit"]
    with pytest.raises(ValueError, match="unknown model type 'vae'.*unet, dit, sd, controlnet"):
        get_model_adapter("vae")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown model config 'huge'.*small, tiny"):
        get_model_adapter("unet").load(model_config_name_or_path="huge")


def test_nothing_to_load():
    with pytest.raises(ValueError, match="nothing to load"):
        get_model_adapter("sd").load()


@pytest.mark.parametrize("path", ["/no/such/folder", "someone/not-a-cached-model"])
def test_missing_pretrained_model(path):
    # the Hub id case relies on HF_HUB_OFFLINE=1 (set in conftest.py): no retries, a short error
    with pytest.raises(ValueError, match="not found.*save_pretrained, or go online"):
        get_model_adapter("unet").load(pretrained_model_name_or_path=path)


def test_tiny_tokenizer_size_and_roundtrip(tmp_path):
    tokenizer = tiny_clip_tokenizer()
    assert len(tokenizer) == 86
    ids = tokenizer("a cat").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 2 + 4  # one token per character, spaces split words
    tokenizer.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    assert len(CLIPTokenizer.from_pretrained(tmp_path)) == len(tokenizer)


# ---------------------------------------------------------------------------- full training


@pytest.mark.parametrize("case", list(CASES))
def test_full_step_save_reload_sample(case, tmp_path):
    adapter = build(case)
    assert adapter.latent == (case in ("dit-latent", "sd", "controlnet"))
    expected = (BATCH, adapter.in_channels, adapter.sample_size, adapter.sample_size)
    assert adapter.sample_size == (RES // 2 if adapter.latent else RES)

    x0, cond = adapter.encode_batch(fake_batch(adapter))
    assert tuple(x0.shape) == expected
    adapter.model.train()  # DiT drops labels to the null class at random in train mode
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    frozen_before = [p.clone() for m in adapter.frozen_modules().values() for p in m.parameters()]
    loss = train_step(adapter)
    assert torch.isfinite(loss)
    changed = [k for k, v in adapter.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the optimizer step changed no weight"
    frozen_after = [p for m in adapter.frozen_modules().values() for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, frozen_after))

    adapter.save(str(tmp_path))
    assert any(f.endswith(".safetensors") for _, _, files in os.walk(tmp_path) for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for _, _, files in os.walk(tmp_path) for f in files)
    pipeline = load_pipeline(str(tmp_path))
    # the reloaded denoiser is the trained one (eval mode: no label dropout)
    adapter.model.eval()
    x_t, _, t = noisy(adapter, x0)
    with torch.no_grad():
        ours = adapter.predict(adapter.model, x_t, t, cond)
        theirs = adapter.predict(denoiser_of(pipeline), x_t, t, cond)
    torch.testing.assert_close(theirs, ours)
    images = adapter.sample(pipeline, 2, torch.Generator().manual_seed(0), **sample_kwargs(adapter))
    assert len(images) == 2 and images[0].size == (RES, RES)
    assert images[0].mode == ("L" if adapter.num_channels == 1 else "RGB")
    # the same seed gives the same images; the "ddim" override samples too and leaves the pipeline's scheduler
    again = adapter.sample(pipeline, 2, torch.Generator().manual_seed(0), **sample_kwargs(adapter))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    scheduler = pipeline.scheduler
    ddim = adapter.sample(pipeline, 1, torch.Generator().manual_seed(0), scheduler="ddim", **sample_kwargs(adapter))
    assert ddim[0].size == (RES, RES) and pipeline.scheduler is scheduler


def test_plain_diffusers_loads_class_conditional_pipeline(tmp_path):
    """The custom pipeline folder loads in diffusers without diffusers_ant (community-pipeline style)."""
    from diffusers import DiffusionPipeline

    adapter = build("unet-class")
    adapter.save(str(tmp_path))
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["ant_pipeline", "ClassConditionalUNetPipeline"]
    assert (tmp_path / "ant_pipeline.py").is_file()
    plain = DiffusionPipeline.from_pretrained(str(tmp_path), trust_remote_code=True)
    ours = ClassConditionalUNetPipeline.from_pretrained(str(tmp_path))
    assert type(ours) is ClassConditionalUNetPipeline
    outs = [
        p(class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        for p in (plain, ours)
    ]
    assert outs[0].shape == (2, RES, RES, 1)
    assert (outs[0] == outs[1]).all()


def test_dit_without_labels_trains_the_null_class():
    adapter = get_model_adapter("dit").load(model_config_name_or_path="tiny", resolution=RES, num_channels=1)
    _, cond = adapter.encode_batch(fake_batch(adapter, with_labels=False))
    assert (cond["class_labels"] == adapter.null_class).all() and adapter.null_class == 1
    with pytest.raises(ValueError, match="out of range"):
        adapter.encode_batch({"pixel_values": torch.zeros(1, 1, RES, RES), "class_labels": torch.tensor([3])})


def test_latent_encoding_draws_from_the_given_generator():
    """The VAE's latent sample comes from the step's generator (which checkpoints save), not the global RNG."""
    adapter = build("sd")
    batch = fake_batch(adapter)
    state = torch.get_rng_state()
    first, _ = adapter.encode_batch(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    again, _ = adapter.encode_batch(batch, generator=torch.Generator().manual_seed(3))
    other, _ = adapter.encode_batch(batch, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(other, first)


def test_class_conditional_unet_needs_labels():
    adapter = build("unet-class")
    with pytest.raises(ValueError, match="no class_labels"):
        adapter.encode_batch(fake_batch(adapter, with_labels=False))


def test_gradient_checkpointing_keeps_gradients():
    adapter = build("unet")
    adapter.enable_gradient_checkpointing()
    assert adapter.model.is_gradient_checkpointing
    adapter.model.train()
    assert torch.isfinite(train_step(adapter))


# ---------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("case", ["unet", "dit", "sd", "controlnet"])
def test_lora_step_save_load(case, tmp_path):
    adapter = build(case)
    adapter.model.eval()  # deterministic outputs to compare (DiT's label dropout is off in eval mode)
    x0, cond = adapter.encode_batch(fake_batch(adapter))
    x_t, _, t = noisy(adapter, x0)
    with torch.no_grad():
        base_out = adapter.predict(adapter.model, x_t, t, cond)

    adapter.add_lora(rank=4, alpha=8)
    assert has_lora(adapter.model)
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    # a new ControlNet also trains its (zero-initialised) conditioning embedding in full
    in_full = ("controlnet_cond_embedding.",) if case == "controlnet" else ()
    assert trainable and all("lora_" in n or n.startswith(in_full) for n in trainable)
    with torch.no_grad():  # B = 0: LoRA starts as the identity
        torch.testing.assert_close(adapter.predict(adapter.model, x_t, t, cond), base_out)

    params_before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    train_step(adapter, lr=20.0)  # a LoRA that moves the output far above the rounding bound (230x at least)
    params = dict(adapter.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in params_before.items() if n not in trainable)
    assert any(not torch.equal(params[n], params_before[n]) for n in trainable)
    with torch.no_grad():
        lora_out = adapter.predict(adapter.model, x_t, t, cond)
    # the LoRA moved the output by far more than the reload comparison below tolerates (module docstring),
    # so a reload that dropped the adapters cannot pass it
    reload_tolerance = lora_tolerance(adapter, lora_out)
    assert float((lora_out - base_out).abs().max()) > 100 * reload_tolerance

    adapter.save(str(tmp_path), lora=True)
    info = json.loads((tmp_path / "ant_lora.json").read_text())
    assert info["model_type"] == adapter.model_type and info["base_model"] == "base_model"
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    # the base pipeline alone reproduces the untrained model; with the LoRA loaded, the trained one
    from diffusers_ant.models import load_pipeline as load

    plain = load(str(tmp_path / "base_model"))
    assert not has_lora(denoiser_of(plain))
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(denoiser_of(plain), x_t, t, cond), base_out)
    loaded = load(str(tmp_path))  # base_model + load_lora (load_lora_weights for sd)
    assert has_lora(denoiser_of(loaded))
    with torch.no_grad():
        reloaded = adapter.predict(denoiser_of(loaded), x_t, t, cond)
    torch.testing.assert_close(reloaded, lora_out, rtol=0, atol=reload_tolerance)
    images = adapter.sample(loaded, 1, torch.Generator().manual_seed(0), **sample_kwargs(adapter))
    assert images[0].size == (RES, RES)


def test_full_save_of_lora_model_merges_it(tmp_path):
    adapter = build("unet")
    adapter.add_lora(rank=2)
    train_step(adapter, lr=0.5)
    x0, cond = adapter.encode_batch(fake_batch(adapter))
    x_t, _, t = noisy(adapter, x0)
    adapter.save(str(tmp_path), lora=False)
    pipeline = load_pipeline(str(tmp_path))
    assert not has_lora(pipeline.unet)
    with torch.no_grad():
        merged, trained = pipeline.unet(x_t, t).sample, adapter.predict(adapter.model, x_t, t, cond)
        with lora_disabled(adapter.model):  # what a save that dropped the LoRA would give
            base = adapter.predict(adapter.model, x_t, t, cond)
    tolerance = lora_tolerance(adapter, trained)  # the LoRA folded into its weights: rounding alone
    assert (base - trained).abs().max() > 100 * tolerance
    torch.testing.assert_close(merged, trained, rtol=0, atol=tolerance)


def test_lora_errors():
    adapter = build("unet")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        adapter.add_lora(rank=0)
    with pytest.raises(ValueError, match="call add_lora"):
        adapter.save("/tmp/unused-ant-lora", lora=True)


# ---------------------------------------------------------------------------- pretrained folders


@pytest.mark.parametrize("scheduler", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_a_pipeline_whose_scheduler_has_no_betas_is_refused_in_one_line(scheduler, tmp_path):
    """Playground v2.5's EDM sampler read as a DDPMScheduler gave DDPM's default linear betas (its config has
    none), and the run trained that other noise schedule, silently."""
    import diffusers
    from diffusers import DDPMPipeline

    source = build("unet")
    pipeline = DDPMPipeline(unet=source.model, scheduler=getattr(diffusers, scheduler)())
    pipeline.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as refused:
        get_model_adapter("unet").load(pretrained_model_name_or_path=str(tmp_path))
    assert str(refused.value).startswith(f"the pipeline's scheduler, {scheduler}, has no schedule of betas")
    assert "\n" not in str(refused.value)


def test_load_unet_from_pretrained_folder_takes_its_scheduler(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    source = build("unet")
    scheduler = DDPMScheduler(num_train_timesteps=500, beta_schedule="linear", prediction_type="v_prediction")
    DDPMPipeline(unet=source.model, scheduler=scheduler).save_pretrained(tmp_path)

    adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=str(tmp_path))
    assert adapter.noise_scheduler.config.num_train_timesteps == 500
    assert adapter.noise_scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(adapter.noise_scheduler.alphas_cumprod, scheduler.alphas_cumprod)
    assert adapter.model_from_pretrained and adapter.num_channels == 1
    for key, value in source.model.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[key], value)

    # overriding the prediction type; a new class count gives a fresh class embedding
    other = get_model_adapter("unet").load(
        pretrained_model_name_or_path=str(tmp_path), prediction_type="epsilon", num_classes=4
    )
    assert other.noise_scheduler.config.prediction_type == "epsilon"
    assert other.num_classes == 4 and not other.model_from_pretrained
    # ... initialised as a new UNet2DModel's (N(0, 1)): diffusers leaves the resized table uninitialised memory
    for classes in (4, 9):  # (the unconditional source gains a table; a 4-class one gets a larger table)
        if classes == 9:
            other.model.save_pretrained(tmp_path / "four")
            other = get_model_adapter("unet").load(pretrained_model_name_or_path=str(tmp_path / "four"), num_classes=9)
        table = other.model.class_embedding.weight.detach()
        assert table.shape[0] == classes and torch.isfinite(table).all()
        # the std of 4 x 32+ N(0, 1) draws: within [0.5, 2] but for odds far below 1e-9
        assert 0.5 < float(table.std()) < 2.0 and float(table.abs().max()) < 10
        out = other.predict(other.model, torch.randn(classes, 1, 16, 16), torch.full((classes,), 100),
                            {"class_labels": torch.arange(classes)})
        assert torch.isfinite(out).all()
    # a UNet that embeds its class input otherwise (class_embed_type) has no table to give the classes: one line
    from diffusers import UNet2DModel

    UNet2DModel(**{**dict(source.model.config), "class_embed_type": "timestep"}).save_pretrained(tmp_path / "timestep")
    with pytest.raises(ValueError, match="embeds its class input by class_embed_type 'timestep', not by a table"):
        get_model_adapter("unet").load(pretrained_model_name_or_path=str(tmp_path / "timestep"), num_classes=4)
    # a bare model folder (config.json only) works too, with a default scheduler
    source.model.save_pretrained(tmp_path / "bare")
    bare = get_model_adapter("unet").load(pretrained_model_name_or_path=str(tmp_path / "bare"))
    assert bare.noise_scheduler.config.beta_schedule == "squaredcos_cap_v2"


def test_load_sd_and_controlnet_from_pretrained_folder(tmp_path):
    source = build("sd")
    source.noise_scheduler.register_to_config(prediction_type="v_prediction")
    source.save(str(tmp_path))

    sd = get_model_adapter("sd").load(pretrained_model_name_or_path=str(tmp_path))
    assert len(sd.tokenizer) == len(source.tokenizer)
    assert sd.noise_scheduler.config.prediction_type == "v_prediction"
    for name in ("vae", "text_encoder"):
        mine, theirs = getattr(sd, name).state_dict(), getattr(source, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert all(not p.requires_grad for p in sd.text_encoder.parameters())

    cn = get_model_adapter("controlnet").load(pretrained_model_name_or_path=str(tmp_path))
    assert cn.noise_scheduler.config.prediction_type == "v_prediction"
    # the ControlNet starts as a copy of the frozen UNet's encoder
    torch.testing.assert_close(cn.model.conv_in.weight, sd.model.conv_in.weight)
    assert all(not p.requires_grad for p in cn.unet.parameters())
    assert torch.isfinite(train_step(cn))

    # LoRA on a pretrained UNet names that folder as its base instead of copying it
    sd.add_lora(rank=2)
    train_step(sd, lr=0.5)
    sd.save(str(tmp_path / "lora"), lora=True)
    info = json.loads((tmp_path / "lora" / "ant_lora.json").read_text())
    # named relative to the LoRA folder (the folder may be published), not copied
    assert info["base_model"] == ".." and not (tmp_path / "lora" / "base_model").exists()
    assert has_lora(load_pipeline(str(tmp_path / "lora")).unet)

    # a ControlNet from its own folder
    cn.model.save_pretrained(tmp_path / "cn")
    cn2 = get_model_adapter("controlnet").load(
        pretrained_model_name_or_path=str(tmp_path), controlnet_model_name_or_path=str(tmp_path / "cn")
    )
    assert all(torch.equal(cn2.model.state_dict()[k], v) for k, v in cn.model.state_dict().items())

    # a model type that does not fit the folder says so
    with pytest.raises(ValueError, match=r"is a StableDiffusionPipeline \(--model_type sd\), not a unet model"):
        get_model_adapter("unet").load(pretrained_model_name_or_path=str(tmp_path))


# ---------------------------------------------------------------------------- ControlNet


def _control_outputs(adapter, model, x_t, t, cond):
    """The denoiser output for the same noisy latents and prompt under a white and a black control image."""
    outputs = []
    for value in (1.0, 0.0):
        control = torch.full_like(cond["controlnet_cond"], value)
        with torch.no_grad():
            outputs.append(adapter.predict(model, x_t, t, {**cond, "controlnet_cond": control}))
    return outputs


def test_lora_layers_given_for_a_new_controlnet_keep_its_zero_convolutions():
    """`--lora_layers to_q,...` on a new ControlNet: its zero convolutions (zero output, frozen) would keep every
    gradient at exactly zero, so they take LoRA whatever the list names, as in the default targets."""
    adapter = build("controlnet")
    assert adapter.controlnet_is_new
    adapter.add_lora(rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    targets = set(adapter.lora_config.target_modules)
    assert {"to_q", "to_k", "to_v", "to_out.0", "controlnet_mid_block"} <= targets
    assert any(t.startswith("controlnet_down_blocks.") for t in targets)
    x0, cond = adapter.encode_batch(fake_batch(adapter))
    x_t, noise, t = noisy(adapter, x0)
    torch.nn.functional.mse_loss(adapter.predict(adapter.model, x_t, t, cond), noise).backward()
    assert max(float(p.grad.abs().max()) for p in adapter.trainable_parameters() if p.grad is not None) > 0


def test_lora_on_a_new_controlnet_learns_its_condition(tmp_path):
    """The conditioning embedding's zero-initialised conv_out is no LoRA target: frozen, it kept the control
    image out forever (white and black gave identical outputs). A new ControlNet trains the embedding in full."""
    adapter = build("controlnet")
    assert adapter.controlnet_is_new
    adapter.add_lora(rank=4)
    embedding = {n for n, p in adapter.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert embedding and all(n.startswith("controlnet_cond_embedding.") for n in embedding)
    assert {id(p) for p in adapter.model.controlnet_cond_embedding.parameters()} <= {
        id(p) for p in adapter.trainable_parameters()
    }  # what the optimizer (and so Accelerate's checkpoint) holds
    adapter.model.eval()
    x0, cond = adapter.encode_batch(fake_batch(adapter))
    x_t, noise, t = noisy(adapter, x0)
    white, black = _control_outputs(adapter, adapter.model, x_t, t, cond)
    torch.testing.assert_close(white, black, rtol=0, atol=0)  # untrained: the condition cannot matter yet
    # a short run (AdamW, as the trainer): LoRA's B leaves zero first, then gradients reach the embedding
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(adapter.predict(adapter.model, x_t, t, cond), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    white, black = _control_outputs(adapter, adapter.model, x_t, t, cond)
    # the reload below differs by rounding alone (module docstring); one that lost the embedding gives white ==
    # black, so it misses one of them by half this difference: 10x the bound at least (~0.4: 90x); one that lost
    # the LoRA misses by ~0.8
    tolerance = max(lora_tolerance(adapter, out) for out in (white, black))
    assert (white - black).abs().max() > 20 * tolerance, "the control image does not change the output"

    adapter.save(str(tmp_path), lora=True)
    assert (tmp_path / "controlnet_cond_embedding.safetensors").is_file()
    info = json.loads((tmp_path / "ant_lora.json").read_text())
    assert info["trained_in_full"] == ["controlnet_cond_embedding"]
    loaded = load_pipeline(str(tmp_path))
    for ours, theirs in zip((white, black), _control_outputs(adapter, loaded.controlnet, x_t, t, cond)):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=tolerance)
    # base_model/ holds the ControlNet as it was before training, embedding included
    base = load_pipeline(str(tmp_path / "base_model")).controlnet
    untrained = build("controlnet").model
    for key, value in untrained.controlnet_cond_embedding.state_dict().items():
        assert torch.equal(base.controlnet_cond_embedding.state_dict()[key], value), key


def test_lora_on_a_pretrained_controlnet_keeps_its_embedding_frozen(tmp_path):
    build("sd").save(str(tmp_path / "sd"))
    get_model_adapter("controlnet").load(pretrained_model_name_or_path=str(tmp_path / "sd")).model.save_pretrained(
        tmp_path / "cn"
    )
    pretrained = get_model_adapter("controlnet").load(
        pretrained_model_name_or_path=str(tmp_path / "sd"), controlnet_model_name_or_path=str(tmp_path / "cn")
    )
    assert not pretrained.controlnet_is_new
    pretrained.add_lora(rank=2)
    assert all("lora_" in n for n, p in pretrained.model.named_parameters() if p.requires_grad)


def test_controlnet_output_loads_the_diffusers_way(tmp_path):
    """Saved as diffusers' train_controlnet.py does: the ControlNetModel at the root of the folder."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    adapter = build("controlnet")
    train_step(adapter)
    out = tmp_path / "out"
    adapter.save(str(out))
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "model_index.json").exists()
    controlnet = ControlNetModel.from_pretrained(str(out))
    for key, value in adapter.model.state_dict().items():
        assert torch.equal(controlnet.state_dict()[key], value), key
    # built from a preset: the frozen parts are saved as base_model/, named in ant_controlnet.json
    assert json.loads((out / "ant_controlnet.json").read_text()) == {"model_type": "controlnet", "base_model": "base_model"}
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(str(out / "base_model"), controlnet=controlnet)
    ours = load_pipeline(str(out))
    assert type(ours) is StableDiffusionControlNetPipeline
    for name in ("unet", "vae", "text_encoder"):
        for key, value in getattr(pipeline, name).state_dict().items():
            assert torch.equal(getattr(ours, name).state_dict()[key], value), f"{name}.{key}"

    # a pretrained base is named (relative to the folder), not copied
    sd = build("sd")
    sd.save(str(tmp_path / "sd-base"))
    on_base = get_model_adapter("controlnet").load(pretrained_model_name_or_path=str(tmp_path / "sd-base"))
    assert on_base.controlnet_is_new
    on_base.save(str(tmp_path / "cn-out"))
    assert json.loads((tmp_path / "cn-out" / "ant_controlnet.json").read_text())["base_model"] == "../sd-base"
    assert not (tmp_path / "cn-out" / "base_model").exists()
    assert type(load_pipeline(str(tmp_path / "cn-out"))) is StableDiffusionControlNetPipeline

    # the output folder is a starting point: its ControlNet, and its base's frozen parts
    again = get_model_adapter("controlnet").load(pretrained_model_name_or_path=str(out))
    assert again.model_from_pretrained and not again.controlnet_is_new
    for key, value in adapter.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    again.add_lora(rank=2)
    train_step(again, lr=0.5)
    again.save(str(tmp_path / "lora"), lora=True)
    info = json.loads((tmp_path / "lora" / "ant_lora.json").read_text())
    assert info["base_model"] == "../out" and "trained_in_full" not in info
    assert has_lora(load_pipeline(str(tmp_path / "lora")).controlnet)


@pytest.mark.parametrize("name", ["PNDMScheduler", "UniPCMultistepScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("kind", ["unet-class", "dit"])
def test_the_projects_pipelines_sample_with_schedulers_whose_step_takes_no_generator(kind, name):
    """`sample(scheduler=<any diffusers class name>)` (the knowledge bank's and evaluation's --scheduler): PNDM,
    UniPC, DEIS, Heun, LMS take no `generator` in `step`, and the project's pipelines passed one to every
    scheduler (TypeError). Passed where the step takes it, as diffusers' pipelines do; DDPM's draws still follow it."""
    adapter = build(kind)
    pipeline = adapter.make_pipeline()

    def images(seed):
        return np.stack([np.asarray(image) for image in adapter.sample(
            pipeline, 2, generator=torch.Generator().manual_seed(seed), num_inference_steps=6, scheduler=name)])  # (PNDM: 4 or more)

    first = images(0)
    assert np.isfinite(first).all() and first.shape[0] == 2
    if name == "DDPMScheduler":  # its step draws noise from the generator: the same seed, the same images
        assert np.array_equal(images(0), first)


def test_a_latent_unet_pipeline_is_refused_by_the_pixel_unet_type(tmp_path):
    """An LDMPipeline (CompVis/ldm-celebahq-256: a UNet2DModel over a VQ autoencoder's latents) loaded as a
    pixel UNet: it trained on pixels and saved a DDPMPipeline without the VQ model. Refused in one line."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    vq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=3, num_vq_embeddings=16, norm_num_groups=32)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[32, 64],
                       down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2, norm_num_groups=32)
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ldm")
    with pytest.raises(ValueError) as refused:
        get_model_adapter("unet").load(pretrained_model_name_or_path=str(tmp_path / "ldm"))
    message = str(refused.value)
    assert "is a latent pipeline (LDMPipeline): its UNet2DModel denoises the latents of its vqvae" in message
    assert "\n" not in message
