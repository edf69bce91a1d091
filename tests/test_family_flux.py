"""`--model_type flux` (issue 16): FLUX.1's transformer on its tiny presets, trained in-process.

The adapter's Flux mechanics are checked against diffusers' own `FluxPipeline` (packing, image ids,
the dynamic shift's `calculate_shift`, the prompt encoding); the trainer runs a few steps with LoRA
(vanilla in bf16, ANT with UW and resumed exactly, PCGrad on the LoRA subset) and a full fine-tune of
the schnell-like preset; outputs load with `FluxPipeline` + `load_lora_weights` and sample.
Runs share module-scoped fixtures: one run per configuration, several assertions per run."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import torch

from tolerances import unit_roundoff
from trainer_utils import TINY_RUN, assert_same_tensors, load_safetensors_dir, straight_and_resumed, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two threads contend on a shared 2-core machine

RESOLUTION = 16  # pixels; the tiny VAE's factor 2 makes 8x8 latents, packed into 4x4 = 16 tokens
FLUX_RUN = [*TINY_RUN, "--model_type", "flux", "--dataset_name", "mnist5k_captions", "--resolution", str(RESOLUTION),
            "--train_batch_size", "2", "--max_train_samples", "8", "--num_validation_images", "1"]


def _args(out, *extra, pretrained=None):
    args = [*FLUX_RUN, "--output_dir", str(out), *extra]
    if pretrained is not None:  # LoRA on a pretrained pipeline instead of the preset
        i = args.index("--model_config_name_or_path")
        del args[i:i + 2]
        args += ["--pretrained_model_name_or_path", str(pretrained)]
    return args


@pytest.fixture(scope="module")
def adapter():
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    return get_model_adapter("flux").load(model_config_name_or_path="tiny", resolution=RESOLUTION)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory, adapter):
    """A pretrained tiny FluxPipeline folder (guidance-distilled, dynamic shift) for the LoRA runs."""
    folder = tmp_path_factory.mktemp("tiny-flux")
    adapter.save(str(folder))
    return folder


# --------------------------------------------------------------------------- Flux mechanics, against diffusers


def test_packing_round_trips_and_image_ids_are_the_pipelines(adapter):
    from diffusers import FluxPipeline

    from diffusers_ant.models.flux import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 3, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 4 * 3, 12)
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    # the ids FluxPipeline.prepare_latents makes for a 16x16 image (latents 8x8, packed 4x4)
    pipe = adapter.make_pipeline()
    latents, ids = pipe.prepare_latents(1, 4 * adapter.vae.config.latent_channels, RESOLUTION, RESOLUTION,
                                        torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert latents.shape[1] == ids.shape[0] == 16
    assert torch.equal(latent_image_ids(8, 8), ids)
    assert ids[:, 1].max() == 3 and ids[:, 2].max() == 3 and not ids[:, 0].any()


def test_dynamic_shift_is_the_pipelines_calculate_shift_and_drives_the_clusters(adapter):
    """Training sigmas = the dev scheduler's time shift at mu = calculate_shift(16 tokens); the SNR that
    ANT clusters is ((1 - sigma) / sigma)^2 on those sigmas; the saved pipeline keeps the dynamic scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from diffusers_ant import cluster_timesteps, schedule_snr
    from diffusers_ant.models.presets import FLUX_DEV_SCHEDULER

    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    assert adapter.noise_scheduler.config.shift == pytest.approx(math.exp(mu))
    assert adapter.pipeline_scheduler.config.use_dynamic_shifting
    dev = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)  # its sigmas are unshifted (dynamic)
    expected = torch.sort(dev.time_shift(mu, 1.0, dev.sigmas.double())).values
    snr = schedule_snr(adapter.noise_scheduler)
    sigmas = 1.0 / (1.0 + snr.sqrt())  # invert SNR = ((1 - s) / s)^2
    # diffusers' shifted sigmas are float32 (the same float32 s0 = t / T as the reference's): the shift k and
    # k - 1 stored, k s0, (k - 1) s0, 1 + ., the quotient: 6u relative (float64 after that). Measured: 2.1u;
    # the shift of 64 tokens instead of 16 moves a sigma by up to 2e-3.
    torch.testing.assert_close(sigmas, expected, rtol=6 * unit_roundoff(), atol=0)
    assert (snr[:-1] > snr[1:]).all()
    # a larger image has a larger shift, which lowers log-SNR by the constant 2 log(shift ratio): the
    # clusters on log-SNR keep their index bounds and move in sigma (docs/families/flux.md)
    from diffusers_ant.models import get_model_adapter

    big = get_model_adapter("flux").load(model_config_name_or_path="tiny", resolution=64)  # 32x32 latents, 256 tokens
    k_big = math.exp(calculate_shift(256, 256, 4096, 0.5, 1.15))  # = e^0.5, the base shift
    assert big.noise_scheduler.config.shift == pytest.approx(k_big)
    small_snr, big_snr = schedule_snr(adapter.noise_scheduler)[:-1], schedule_snr(big.noise_scheduler)[:-1]
    gap = small_snr.log() - big_snr.log()
    # ln SNR = 2 ln((1 - s0) / s0) - 2 ln k exactly: the shared float32 s0 cancels, each float32 shifted s is
    # within 6u relative (above), which d ln SNR / d ln s = -2 / (1 - s) amplifies near s = 1, where
    # 1 / (1 - s) = 1 + 1 / sqrt(SNR): 1.4e-6 to 2.3e-3. Measured: 0.28 of it or less; the same shift on both
    # would be 0.08 off.
    tolerance = 2 * 6 * unit_roundoff() * ((1 + 1 / small_snr.sqrt()) + (1 + 1 / big_snr.sqrt()))
    assert ((gap - 2 * math.log(k_big / math.exp(mu))).abs() <= tolerance).all()
    assert cluster_timesteps(big.noise_scheduler, 4).bounds == cluster_timesteps(adapter.noise_scheduler, 4).bounds


def test_prompt_encoding_and_prediction_match_the_pipeline(adapter):
    """The adapter's embeddings are FluxPipeline.encode_prompt's; its prediction (unpacked) is the
    transformer's output on the pipeline's packed latents with guidance = --guidance_scale."""
    from diffusers_ant.models.flux import pack_latents

    pipe = adapter.make_pipeline()
    captions = ["a cat", "7 is odd"]
    embeds, pooled = adapter.encode_prompt(captions)
    ref_embeds, ref_pooled, text_ids = pipe.encode_prompt(captions, captions, max_sequence_length=adapter.max_sequence_length)
    assert torch.equal(embeds, ref_embeds) and torch.equal(pooled, ref_pooled)  # the same encoders on the same batch
    cond = adapter.conditioning({"captions": captions, "pixel_values": torch.zeros(2, 3, 16, 16)})
    assert cond["guidance"].tolist() == [1.0, 1.0]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 30.0])
    with torch.no_grad():
        pred = adapter.predict(adapter.model, x, t, cond)
        ids = pipe.prepare_latents(2, 4, RESOLUTION, RESOLUTION, torch.float32, "cpu", None, latents=pack_latents(x))[1]
        ref = adapter.model(hidden_states=pack_latents(x), timestep=t / 1000, guidance=torch.ones(2),
                            pooled_projections=ref_pooled, encoder_hidden_states=ref_embeds, txt_ids=text_ids,
                            img_ids=ids, return_dict=False)[0]
    assert pred.shape == x.shape
    # bit for bit: the same transformer on the same inputs (the adapter's embeddings are the pipeline's, above)
    assert torch.equal(pack_latents(pred), ref)
    # latents as the script makes them: (posterior sample - shift_factor) * scaling_factor
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    latents = adapter.encode_pixels(pixels, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        sample = adapter.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    config = adapter.vae.config
    assert config.shift_factor != 0 and config.scaling_factor != 1
    # bit for bit: the adapter runs these float32 operations, in this order, on the same VAE output and draw
    assert torch.equal(latents, (sample - config.shift_factor) * config.scaling_factor)


@pytest.mark.slow
def test_a_folder_of_another_family_is_one_line_naming_both_types(tmp_path, capsys):
    from train_scripts_loader import load_train_main

    folder = tmp_path / "sd-pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(SystemExit):
        load_train_main()(_args(tmp_path / "out", "--rank", "4", pretrained=folder))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--model_type sd" in err[0] and "--model_type flux" in err[0] and "StableDiffusionPipeline" in err[0]
    from diffusers_ant.training.args import UsageError, parse_args

    with pytest.raises(UsageError, match="flow matching"):
        parse_args(_args(tmp_path / "out", "--noise_scheduler", "ddpm"))


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def vanilla_bf16(tmp_path_factory, flux_folder):
    """Vanilla LoRA training in bf16, with validation from FluxPipeline at the end; rank 8 with --lora_alpha left
    to its FLUX.1 default (4, as diffusers' script: not the rank) and --lora_dropout."""
    out = tmp_path_factory.mktemp("flux-vanilla")
    train_in_process(_args(out, "--rank", "8", "--lora_dropout", "0.1", "--max_train_steps", "2", "--mixed_precision",
                           "bf16", "--validation_prompt", "a seven", pretrained=flux_folder))
    return out


@pytest.mark.slow
def test_lora_output_loads_with_flux_pipeline_and_samples(vanilla_bf16, flux_folder):
    from diffusers import FluxPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    from diffusers_ant.models import load_pipeline
    from diffusers_ant.models.flux import FLUX_LORA_TARGETS

    lora = load_file(vanilla_bf16 / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") and "lora_" in k for k in lora)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())
    # diffusers' Flux script targets, in the double-stream and single-stream blocks
    assert any(".ff_context.net.2." in k for k in lora) and any("single_transformer_blocks.0.attn.to_q" in k for k in lora)
    info = json.loads((vanilla_bf16 / "ant_lora.json").read_text())
    assert info["model_type"] == "flux" and sorted(info["target_modules"]) == sorted(FLUX_LORA_TARGETS)
    # diffusers' train_dreambooth_lora_flux.py defaults --lora_alpha to 4 whatever the rank: scale 4 / 8, recorded
    # in the adapter metadata that load_lora_weights reads, with the dropout the run trained with
    assert info["rank"] == 8 and info["lora_alpha"] == 4
    with safe_open(vanilla_bf16 / "pytorch_lora_weights.safetensors", "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.lora_alpha"] == 4
    # trained with dropout, written without it: diffusers' loader leaves the dropout modules it creates in training
    # mode in an eval-mode transformer, and the samples below would change from call to call
    assert metadata["transformer.lora_dropout"] == 0.0
    assert (vanilla_bf16 / "samples" / "step-2.png").is_file()

    base = FluxPipeline.from_pretrained(flux_folder)
    before = base(prompt="a seven", height=RESOLUTION, width=RESOLUTION, num_inference_steps=2, output_type="pt",
                  max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images
    base.load_lora_weights(vanilla_bf16)
    after = base(prompt="a seven", height=RESOLUTION, width=RESOLUTION, num_inference_steps=2, output_type="pt",
                 max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images
    assert after.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(after).all()
    assert (after - before).abs().max() > 0  # the trained LoRA changes the samples
    ours = load_pipeline(str(vanilla_bf16))
    assert type(ours).__name__ == "FluxPipeline"
    ours_images = ours(prompt="a seven", height=RESOLUTION, width=RESOLUTION, num_inference_steps=2, output_type="pt",
                       max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images
    # load_pipeline = FluxPipeline + load_lora_weights: the same weights and draws through the same kernels
    assert torch.equal(ours_images, after)


@pytest.mark.slow
def test_lora_alpha_defaults_to_the_flux_scripts_and_dropout_reaches_peft(tmp_path, flux_folder, monkeypatch):
    """diffusers' train_dreambooth_lora_flux.py takes --lora_alpha 4 by default whatever the rank (the trainer gave
    alpha = rank: a 2x larger update at rank 8); --lora_dropout reaches peft's layers. A checkpoint written under the
    old default (recorded as None) resumes with alpha = rank; an explicit alpha is the user's."""
    from diffusers_ant.models.base import ModelAdapter
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.loop import adopt_recorded_defaults

    seen = []
    original = ModelAdapter.add_lora

    def recording(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        seen.append((config.r, config.lora_alpha, {m.p for name, m in self.model.named_modules()
                                                   if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)}))
        return config

    monkeypatch.setattr(ModelAdapter, "add_lora", recording)
    train_in_process(_args(tmp_path, "--rank", "8", "--lora_dropout", "0.1", "--max_train_steps", "1",
                           pretrained=flux_folder))
    assert seen == [(8, 4, {0.1})]

    run = _args(tmp_path, "--rank", "8", pretrained=flux_folder)
    old = parse_args(run)
    assert old.lora_alpha == 4 and adopt_recorded_defaults(old, {"lora_alpha": None}) and old.lora_alpha is None
    explicit = parse_args([*run, "--lora_alpha", "8"])
    assert explicit.lora_alpha == 8 and not adopt_recorded_defaults(explicit, {"lora_alpha": None})
    sd_like = parse_args([*run, "--model_type", "sd3"])
    assert sd_like.lora_alpha is None  # SD, SDXL, SD3: alpha = rank, as their scripts


@pytest.mark.slow
def test_card_has_flux_tags_license_and_base_model(vanilla_bf16):
    from huggingface_hub import ModelCard

    from diffusers_ant.hub import write_model_card

    card = ModelCard.load(vanilla_bf16 / "README.md")
    for tag in ("flux", "flux-diffusers", "template:sd-lora", "text-to-image", "lora"):
        assert tag in card.data.tags
    assert card.data.license == "other"
    assert "FluxPipeline" in card.text and "load_lora_weights" in card.text
    assert f"height={RESOLUTION}, width={RESOLUTION}" in card.text  # the snippet samples at the training size
    # with a Hub base, as diffusers' script: base_model in the metadata
    path = write_model_card(vanilla_bf16, base_model="black-forest-labs/FLUX.1-dev", model_type="flux",
                            method_summary={"mtl_method": "none", "lora_rank": 4}, lora=True)
    assert ModelCard.load(path).data.base_model == "black-forest-labs/FLUX.1-dev"


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, flux_folder):
    """ANT with UW and EMA: 20 steps straight (checkpoints at 10 and 20), and its checkpoint-10 (the same
    seeded run interrupted there, mid-epoch: 4 batches an epoch) resumed to 20 in another folder."""

    root = tmp_path_factory.mktemp("flux-resume")
    common = ["--rank", "4", "--mtl_method", "uw", "--use_ema", "--checkpointing_steps", "10",
              "--num_validation_images", "1", "--guidance_scale", "3.5", "--max_train_steps", "20"]
    return straight_and_resumed(root, lambda out, *flags: _args(out, *flags, pretrained=flux_folder), common)


@pytest.mark.slow
def test_ant_uw_resumes_exactly_on_the_shifted_clusters(resume_runs, adapter):
    from safetensors.torch import load_file

    from diffusers_ant import cluster_timesteps

    straight, resumed = resume_runs
    final = {k: v for k, v in load_safetensors_dir(straight).items() if "checkpoint-" not in k}
    assert_same_tensors(final, {k: v for k, v in load_safetensors_dir(resumed).items() if "checkpoint-" not in k})
    assert_same_tensors(load_safetensors_dir(straight / "checkpoint-20"), load_safetensors_dir(resumed / "checkpoint-20"))
    at_10, at_20 = (load_file(straight / f"checkpoint-{s}" / "trainable_state.safetensors") for s in (10, 20))
    assert max((at_10[k] - at_20[k]).abs().max().item() for k in at_10) > 1e-4  # steps 11-20 trained
    keys = list(at_10)
    assert keys and all("lora_" in k for k in keys)  # checkpoints hold the LoRA only
    assert not list((straight / "checkpoint-10").glob("model*.safetensors"))
    # the clusters are those of the shifted training sigmas, at the training resolution
    from diffusers_ant.clustering import TimestepIntervals

    saved = TimestepIntervals.load(straight / "timestep_intervals.json")
    assert list(saved.bounds) == list(cluster_timesteps(adapter.noise_scheduler, 4).bounds)
    weighting = json.loads((straight / "weighting_config.json").read_text())
    assert weighting["name"] == "uw"
    assert json.loads((straight / "training_config.json").read_text())["noise_scheduler"] == "flow_match"


@pytest.mark.slow
def test_pcgrad_on_the_lora_subset_trains(tmp_path, flux_folder):
    """PCGrad's per-cluster gradients on the LoRA matrices only, with --lora_layers, on stratified draws
    composed with the logit-normal density (StratifiedDensitySampler)."""
    from safetensors.torch import load_file

    out = tmp_path / "pcgrad"
    train_in_process(_args(out, "--rank", "4", "--mtl_method", "pcgrad", "--task_gradient_subset", "lora",
                           "--max_train_steps", "2", "--lora_layers", "attn.to_q,attn.to_v",
                           "--weighting_scheme", "logit_normal", "--timestep_sampling", "stratified",
                           pretrained=flux_folder))
    config = json.loads((out / "training_config.json").read_text())
    assert config["timestep_sampling"] == "stratified" and config["weighting_scheme"] == "logit_normal"
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".attn.")[1].split(".")[0] for k in lora} == {"to_q", "to_v"}  # --lora_layers
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and any(v.abs().max() > 0 for v in b)  # B starts at zero: the update reached the LoRA


@pytest.mark.slow
def test_full_fine_tune_of_the_schnell_like_preset_saves_a_flux_pipeline(tmp_path):
    """No --rank: the whole transformer trains (from the schnell-like preset: no guidance input, static
    shift 1.0) and the output is a FluxPipeline folder."""
    from diffusers import FluxPipeline

    out = tmp_path / "full"
    args = _args(out, "--max_train_steps", "1")
    args[args.index("--model_config_name_or_path") + 1] = "tiny-schnell"
    train_in_process(args)
    pipe = FluxPipeline.from_pretrained(out)
    assert not pipe.transformer.config.guidance_embeds
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    images = pipe(prompt="a one", height=RESOLUTION, width=RESOLUTION, num_inference_steps=2, output_type="pt",
                  max_sequence_length=32).images
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(images).all()


def test_stratified_draws_compose_with_the_density():
    """--timestep_sampling stratified with a density: every cluster its equal share, and inside a cluster
    the density's own shape (exact masses of diffusers' draw), not uniform."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from diffusers_ant.timesteps import StratifiedDensitySampler, flow_density_masses

    T = 1000
    for scheme in ("logit_normal", "mode"):
        masses = flow_density_masses(scheme, T)
        assert masses.sum().item() == pytest.approx(1.0)
        # the exact masses are those of diffusers' own draw (index = floor(u T), t = T - 1 - index)
        u = compute_density_for_timestep_sampling(scheme, 200_000, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                  generator=torch.Generator().manual_seed(0))
        t = (T - 1) - (u * T).long().clamp(0, T - 1)
        drawn = torch.bincount(t // 100, minlength=10).double() / len(t)
        # a sampled frequency, not rounding: 4e-3 is 4.3 binomial standard deviations sqrt(p (1 - p) / n) of
        # the largest bin (p = 0.23, n = 200,000; measured 2.2 or less); uniform draws would be 0.09 off
        assert torch.allclose(drawn, masses.view(10, 100).sum(1), atol=4e-3), scheme
    bounds = [(0, 99), (100, 499), (500, 999)]
    sampler = StratifiedDensitySampler(bounds, "logit_normal")
    t, ids = sampler.sample_with_ids(30_000, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(ids).tolist() == [10_000] * 3
    for c, (a, b) in enumerate(bounds):
        inside = t[ids == c]
        assert inside.min() >= a and inside.max() <= b
    # inside the middle cluster: the logit-normal's shape (more mass near t = 499, the middle of the range)
    mid = t[ids == 1]
    masses_mid = flow_density_masses("logit_normal", T)[100:500]
    expected = (masses_mid.view(4, 100).sum(1) / masses_mid.sum()).float()
    got = torch.bincount((mid - 100) // 100, minlength=4).float() / len(mid)
    # sampled frequencies: 0.02 is 4.3 binomial standard deviations of the largest bin (p = 0.32, n = 10,000
    # draws in the cluster; measured 2.4 or less); uniform draws inside the cluster would be 0.11 off
    assert torch.allclose(got, expected, atol=0.02) and got[3] > 2 * got[0]


def test_a_checkpoint_folder_loads_with_its_variant(tmp_path, adapter):
    """A FluxPipeline folder saved with a weight variant (as the Hub's fp16 / bf16 branches) loads every
    component with --variant; the transformer keeps its weights and the training scheduler is resolved."""
    from diffusers_ant.models import get_model_adapter

    folder = tmp_path / "flux-variant"
    adapter.make_pipeline().save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert (folder / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = get_model_adapter("flux").load(pretrained_model_name_or_path=str(folder), variant="fp16",
                                            resolution=RESOLUTION)
    assert loaded.model_from_pretrained and loaded.guidance_embeds
    for name, param in adapter.model.state_dict().items():
        assert torch.equal(param, loaded.model.state_dict()[name]), name
    assert loaded.noise_scheduler.config.shift == pytest.approx(adapter.noise_scheduler.config.shift)
    with pytest.raises(ValueError, match="multiple of 4"):
        get_model_adapter("flux").load(pretrained_model_name_or_path=str(folder), variant="fp16", resolution=18)


def test_a_resume_may_not_change_the_trained_guidance():
    """--guidance_scale is a validation setting elsewhere, but Flux trains with it: changing it on resume is refused."""
    from diffusers_ant.training.checkpoint import check_resume_config

    with pytest.raises(ValueError, match="--guidance_scale was 3.5"):
        check_resume_config({"model_type": "flux", "guidance_scale": 3.5}, {"model_type": "flux", "guidance_scale": 1.0},
                            "checkpoint-2")
    assert check_resume_config({"model_type": "sd", "guidance_scale": 3.5}, {"model_type": "sd", "guidance_scale": 1.0},
                               "checkpoint-2") == ["--guidance_scale: 3.5 -> 1.0"]


def test_routing_maps_a_flux_sigma_to_the_training_index_of_the_shifted_table(tmp_path):
    """A FLUX.1 run at 256 pixels trains on the sigma table its dynamic shift gives there (shift e^mu, about
    3.2), while the pipeline's scheduler holds the unshifted one: a router must map each sigma the pipeline
    passes through the training table, or sigma 0.76 (trained at index 499) lands at index 759, in another
    interval's model. The table follows the run's records: its resolution (the default where none was given)
    or its --flow_shift. Without them the map is refused in one line."""
    from types import SimpleNamespace

    from diffusers_ant.deme.ensemble import _training_routing, routing_scheduler
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.models.flux import training_scheduler
    from diffusers_ant.routing import denoiser_timestep_map
    from diffusers_ant.schedule import model_timesteps

    adapter = get_model_adapter("flux").load(model_config_name_or_path="tiny", resolution=16)
    pipeline = adapter.make_pipeline()
    assert pipeline.scheduler.config.use_dynamic_shifting
    indices = torch.tensor([100, 300, 499, 500, 700, 900])

    def routed(trained, config):
        """The indices the ensemble's router gives the sigmas `trained` holds at `indices`, for runs recorded so."""
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "training_config.json").write_text(json.dumps({"model_type": "flux", **config}))
        info = _training_routing([SimpleNamespace(path=str(folder))] * 2)
        timestep_map = denoiser_timestep_map(pipeline.scheduler, 1000, pipeline.transformer,
                                             training_scheduler=routing_scheduler(pipeline, info))
        return timestep_map(model_timesteps(trained, indices).double() / 1000)  # what FluxPipeline passes

    scale = adapter.vae_scale_factor(pipeline.vae)
    at_256 = training_scheduler(pipeline.scheduler, 256 // scale)
    assert torch.equal(routed(at_256, {"resolution": 256}), indices)
    # no --resolution: the preset's default (16 px), which the run trained at
    at_16 = training_scheduler(pipeline.scheduler, 16 // scale)
    assert torch.equal(routed(at_16, {"resolution": None, "model_config_name_or_path": "tiny"}), indices)
    # --flow_shift 3: a static table, whatever the resolution
    static = training_scheduler(pipeline.scheduler, 0, 3.0)
    assert torch.equal(routed(static, {"resolution": 64, "flow_shift": 3.0}), indices)
    unshifted = denoiser_timestep_map(pipeline.scheduler, 1000, pipeline.transformer,
                                      training_scheduler=pipeline.scheduler)
    assert int(unshifted(model_timesteps(at_256, indices).double() / 1000)[2]) > 700  # the old map: index 499 read far off
    with pytest.raises(ValueError, match="trains on the sigmas its dynamic shift gives at its training resolution"):
        denoiser_timestep_map(pipeline.scheduler, 1000, pipeline.transformer)
    # fine-tunes trained at different resolutions index different tables: refused (it routed by the unshifted one)
    folders = []
    for resolution in (256, 512):
        folder = tmp_path / f"at_{resolution}"
        folder.mkdir()
        (folder / "training_config.json").write_text(json.dumps({"model_type": "flux", "resolution": resolution}))
        folders.append(SimpleNamespace(path=str(folder)))
    with pytest.raises(ValueError, match="--resolution 256.* and .*--resolution 512.*index different sigma tables"):
        _training_routing(folders)
    # ... but the same --flow_shift makes the same static table at any resolution, and so does a scheduler
    # without dynamic shifting (FLUX.1-schnell's): accepted
    for folder, resolution in zip(folders, (256, 512)):
        (Path(folder.path) / "training_config.json").write_text(
            json.dumps({"model_type": "flux", "resolution": resolution, "flow_shift": 3.0}))
    assert _training_routing(folders, pipeline)["training_routing"]["flow_shift"] == 3.0
    for folder, resolution in zip(folders, (256, 512)):
        (Path(folder.path) / "training_config.json").write_text(json.dumps({"model_type": "flux", "resolution": resolution}))
    from diffusers_ant.models.base import _copy_scheduler

    schnell = SimpleNamespace(scheduler=_copy_scheduler(pipeline.scheduler, use_dynamic_shifting=False))
    assert _training_routing(folders, schnell)
    with pytest.raises(ValueError, match="index different sigma tables"):
        _training_routing(folders, pipeline)
