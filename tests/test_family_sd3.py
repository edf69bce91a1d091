"""`--model_type sd3` (issue 16): Stable Diffusion 3 / 3.5 on its tiny preset.

One short in-process run per configuration, shared through module-scoped fixtures, several checks per
run: LoRA with ANT (uw on stratified draws composed with the logit-normal density; pcgrad on the LoRA
subset, without T5, in bf16) loading through `StableDiffusion3Pipeline.load_lora_weights` and
`load_pipeline` and sampling; full fine-tuning resumed exactly; SD3.5's options; the wrong family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tolerances import sum_reordering_tolerance, unit_roundoff
from trainer_utils import TINY_RUN, assert_same_tensors, load_safetensors_dir, straight_and_resumed, train_in_process

# tiny models: one torch thread (as under `make test`'s workers); two contend on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [*TINY_RUN, "--train_batch_size", "4", "--max_train_samples", "8", "--num_validation_images", "1"]


def _sd3_args(out, *extra, pretrained=None):
    args = ["--model_type", "sd3", "--dataset_name", "mnist5k_captions", "--output_dir", str(out), *RUN]
    if pretrained is not None:
        i = args.index("--model_config_name_or_path")
        del args[i:i + 2]
        args += ["--pretrained_model_name_or_path", str(pretrained)]
    return [*args, *extra]


@pytest.fixture(scope="module")
def sd3_folder(one_thread, tmp_path_factory):
    """A pretrained tiny SD3 pipeline folder (CLIP-L, CLIP-G and T5), as `save_pretrained` writes it."""
    from diffusers_ant.models import get_model_adapter

    folder = tmp_path_factory.mktemp("tiny-sd3")
    get_model_adapter("sd3").load(model_config_name_or_path="tiny", resolution=16).save(str(folder))
    return folder


@pytest.fixture(scope="module")
def sd3_folder_no_t5(sd3_folder, tmp_path_factory):
    """The same pipeline saved without T5, the way diffusers' docs drop it (`text_encoder_3=None`)."""
    from diffusers import StableDiffusion3Pipeline

    folder = tmp_path_factory.mktemp("tiny-sd3-no-t5")
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_uw(sd3_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-lora-uw") / "out"
    train_in_process(_sd3_args(out, "--rank", "4", "--mtl_method", "uw", "--timestep_sampling", "stratified",
                               "--max_train_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "5e-2",
                               "--validation_prompt", "a handwritten digit 3", "--gradient_checkpointing",
                               pretrained=sd3_folder))
    return out


def _run_card_snippet(out):
    """The card's `How to use` code, run as written (offline: the local folder for the repo id, 2 steps)."""
    card = (out / "README.md").read_text()
    code = card.split("## How to use", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "StableDiffusion3Pipeline.from_pretrained" in code and "pipe.load_lora_weights(folder)" in code
    code = code.replace(json.dumps(out.name), json.dumps(str(out)), 1)
    scope = {}
    exec(code.replace("num_inference_steps=30", "num_inference_steps=2"), scope)
    assert scope["image"].size == (16, 16)
    return code


def _sample(pipe, prompt="a handwritten digit 3"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_lora_with_uw_saves_a_diffusers_sd3_lora_that_the_pipeline_loads(lora_uw, sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    from diffusers_ant.models import load_pipeline

    from diffusers_ant.analysis.common import infer_model_type

    assert infer_model_type(str(sd3_folder)) == "sd3"  # a bare SD3 pipeline folder (analysis scripts)
    config = json.loads((lora_uw / "training_config.json").read_text())
    # SD3's defaults are diffusers' SD3 script's: flow matching, logit-normal density, preconditioned outputs
    assert (config["noise_scheduler"], config["weighting_scheme"], config["precondition_outputs"]) == \
        ("flow_match", "logit_normal", 1)
    assert config["timestep_sampling"] == "stratified"
    lora = load_file(lora_uw / "pytorch_lora_weights.safetensors")
    # diffusers' SD3 LoRA format: transformer.<module>.lora_A/B.weight on the script's eight projections
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    for target in ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                   "attn.to_out.0", "attn.to_q", "attn.to_v"):
        assert any(f".{target}.lora_B" in k for k in lora), target
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-4  # B left zero: untrained
    # a checkpoint holds the adapters only
    checkpoint = lora_uw / "checkpoint-2"
    assert not list(checkpoint.glob("model*.safetensors"))
    keys = list(load_file(checkpoint / "trainable_state.safetensors"))
    assert keys and all("lora_" in k for k in keys)

    base = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    before = _sample(base)
    base.load_lora_weights(lora_uw)  # the way SD3 users load a LoRA
    with_lora = _sample(base)
    ours = _sample(load_pipeline(str(lora_uw)))
    assert with_lora.shape == (1, 16, 16, 3) and abs(with_lora - before).max() > 1e-3
    # load_pipeline = base + load_lora_weights: the same weights and draws through the same kernels, bit for bit
    assert (ours == with_lora).all()
    assert (lora_uw / "samples" / "step-2.png").is_file()  # validation through StableDiffusion3Pipeline

    card = (lora_uw / "README.md").read_text()
    head = card.split("---")[1]
    assert "license: other" in head  # as diffusers' SD3 script (Stability AI's community license)
    for tag in ("sd3", "sd3-diffusers", "text-to-image", "template:sd-lora", "lora", "uw"):
        assert f"- {tag}\n" in head, tag
    assert "text_encoder_3=None" not in _run_card_snippet(lora_uw)  # the card's snippet runs as written


def test_pcgrad_on_the_lora_subset_in_bf16_without_t5(sd3_folder_no_t5, tmp_path):
    """ANT's gradient-based weighting on the LoRA parameters, a folder without T5 (zeros in its place, as
    the pipeline), bf16 with the frozen parts in bf16; the output still loads and samples without T5."""
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "pcgrad"
    train_in_process(_sd3_args(out, "--rank", "4", "--mtl_method", "pcgrad", "--task_gradient_subset", "lora",
                               "--mixed_precision", "bf16", "--max_train_steps", "2", "--learning_rate", "5e-2",
                               "--lora_layers", "attn.to_q,attn.to_v", pretrained=sd3_folder_no_t5))
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    # --lora_layers replaces the default targets, as in diffusers' script
    assert {k.split(".attn.")[1].split(".lora_")[0] for k in lora} == {"to_q", "to_v"}
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-4
    from diffusers_ant.models import load_pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder_no_t5, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(out)
    images = _sample(pipe)
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()
    ours = load_pipeline(str(out))  # passes the absent T5 as None itself
    # the same pipeline built the same way: bit for bit, as above
    assert ours.text_encoder_3 is None and (_sample(ours) == images).all()
    # the validation grid came from the pipeline without T5, and the card loads the base without it
    assert (out / "samples" / "step-2.png").is_file()
    assert "text_encoder_3=None, tokenizer_3=None" in _run_card_snippet(out)


def test_full_finetune_resumes_exactly(tmp_path):
    """20 == 10 + resume + 10 (mid-epoch: 12 samples at batch 4) for a full fine-tune from the tiny preset,
    with EMA and UW: the check every other model type passes (tests/test_trainer_matrix.py). The interrupted
    run is the straight one's first 10 steps (the same seeded run): its checkpoint-10, copied, is resumed."""

    common = ["--use_ema", "--mtl_method", "uw", "--checkpointing_steps", "10", "--num_inference_steps", "1",
              "--max_train_samples", "12", "--max_train_steps", "20"]
    straight, resumed = straight_and_resumed(tmp_path, _sd3_args, common)

    def transformer(folder):
        return {k: v for k, v in load_safetensors_dir(folder / "transformer").items()}

    a, b = transformer(straight), transformer(resumed)
    assert_same_tensors(a, b)
    assert_same_tensors(load_safetensors_dir(straight / "checkpoint-20"), load_safetensors_dir(resumed / "checkpoint-20"))
    # the second half moved the weights (so equal outputs are not the trivial kind)
    first_half = load_safetensors_dir(resumed / "checkpoint-10")
    second_half = load_safetensors_dir(resumed / "checkpoint-20")
    assert max((first_half[k].float() - second_half[k].float()).abs().max().item() for k in first_half
               if first_half[k].is_floating_point()) > 1e-4
    from diffusers_ant.models import get_model_adapter

    assert json.loads((straight / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    first = json.loads((straight / "training_config.json").read_text())
    assert first["model_type"] == "sd3" and first["precondition_outputs"] == 1
    assert get_model_adapter("sd3").load(pretrained_model_name_or_path=str(straight)).model_from_pretrained


def test_lora_with_uw_resumes_exactly(sd3_folder, tmp_path):
    """LoRA with ANT + UW and EMA: 20 == 10 + resume + 10 (mid-epoch: 12 samples at batch 4), the interrupted
    run being the straight one's checkpoint-10, copied; the checkpoint holds the adapters only."""

    common = ["--rank", "4", "--mtl_method", "uw", "--use_ema", "--checkpointing_steps", "10",
              "--num_inference_steps", "1", "--max_train_samples", "12", "--max_train_steps", "20"]
    straight, resumed = straight_and_resumed(
        tmp_path, lambda out, *flags: _sd3_args(out, *flags, pretrained=sd3_folder), common)
    assert_same_tensors(load_file(straight / "pytorch_lora_weights.safetensors"),
                        load_file(resumed / "pytorch_lora_weights.safetensors"))
    assert_same_tensors(load_safetensors_dir(straight / "checkpoint-20"), load_safetensors_dir(resumed / "checkpoint-20"))
    at_10, at_20 = (load_file(straight / f"checkpoint-{s}" / "trainable_state.safetensors") for s in (10, 20))
    assert at_10 and all("lora_" in k for k in at_10)
    assert max((at_10[k] - at_20[k]).abs().max().item() for k in at_10) > 1e-4  # steps 11-20 trained


def test_sd35_options_load_and_train_a_lora_step():
    """SD3.5's transformer (RMS-norm on queries / keys, MMDiT-X dual attention) is the same type."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.clustering import TimestepIntervals
    from diffusers_ant.timesteps import UniformTimestepSampler
    from diffusers_ant.training.step import DiffusionObjective

    adapter = get_model_adapter("sd3").load(model_config_name_or_path="tiny-3.5", resolution=16)
    config = adapter.model.config
    assert config.qk_norm == "rms_norm" and list(config.dual_attention_layers) == [0]
    assert adapter.model.transformer_blocks[0].attn2 is not None
    adapter.add_lora(4)
    objective = DiffusionObjective(adapter, adapter.noise_scheduler, UniformTimestepSampler(1000),
                                   TimestepIntervals([(0, 999)], 1000), precondition_outputs=True)
    batch = {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1, "captions": ["a digit 3", "seven"]}
    prepared = objective.prepare(batch, torch.Generator().manual_seed(0))
    objective.loss_fn(adapter.model, prepared)().mean().backward()
    # validation from encoded prompts (what --cache_text_embeddings keeps once the encoders are freed)
    # samples what the prompts themselves sample
    pipe = adapter.make_pipeline()
    encoded = adapter.validation_prompt_kwargs(pipe, ["a digit 3", "seven"], guidance_scale=2.0)
    from_text, from_embeddings = (
        adapter.sample(pipe, 2, generator=torch.Generator().manual_seed(0), num_inference_steps=2, prompts=prompts,
                       guidance_scale=2.0) for prompts in (["a digit 3", "seven"], encoded))
    assert all((torch.tensor(list(a.getdata())) == torch.tensor(list(b.getdata()))).all()
               for a, b in zip(from_text, from_embeddings))
    # B starts at zero, so the first gradients reach B (A's need B != 0); block 0's joint attention has them
    grads = [p.grad for n, p in adapter.model.named_parameters() if "lora_B" in n and "transformer_blocks.0.attn." in n]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_precondition_outputs_is_sigma_squared_times_the_velocity_loss():
    """diffusers' SD3 `--precondition_outputs`: x0_hat = x_t - sigma v against x0, i.e. sigma^2 ||v - (eps - x0)||^2."""
    from diffusers_ant.clustering import TimestepIntervals
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.schedule import flow_sigma_at
    from diffusers_ant.timesteps import UniformTimestepSampler
    from diffusers_ant.training.step import DiffusionObjective

    adapter = get_model_adapter("sd3").load(model_config_name_or_path="tiny", resolution=16)
    batch = {"pixel_values": torch.rand(3, 3, 16, 16) * 2 - 1, "captions": ["one", "two", "three"]}
    losses = {}
    for pre in (False, True):
        objective = DiffusionObjective(adapter, adapter.noise_scheduler, UniformTimestepSampler(1000),
                                       TimestepIntervals([(0, 999)], 1000), precondition_outputs=pre)
        prepared = objective.prepare(batch, torch.Generator().manual_seed(1))
        with torch.no_grad():
            losses[pre] = objective.loss_fn(adapter.model, prepared)()
    sigma = flow_sigma_at(adapter.noise_scheduler, prepared["t"])
    # Rounding only (the same draws, the same model output v): x_t - sigma v - x0 = -sigma (v - (eps - x0)).
    # Each side forms its residual r with a few float32 operations (x_t, sigma v, two differences: 8 roundings
    # in all) on terms up to M = max |x_t| + max |x0| + max |r| (<= sqrt(n) rms r), which moves a mean of
    # squares by 2 rms(r) 8u M at most; the two means of n squares add 2 gamma_n (tests/tolerances.py), sigma^2
    # and the product 3u: 5e-5 here. Measured: 1.4e-7; without the preconditioning the loss is 1 / sigma^2
    # >= 1.17 times as large.
    x_t, x0 = prepared["x_t"], prepared["target"]
    n, rms = x0[0].numel(), losses[True].sqrt()
    magnitude = x_t.abs().flatten(1).amax(1) + x0.abs().flatten(1).amax(1) + n**0.5 * rms
    rtol = 2 * 8 * unit_roundoff() * magnitude / rms + sum_reordering_tolerance(n, 1.0) + 3 * unit_roundoff()
    assert ((losses[True] - sigma ** 2 * losses[False]).abs() <= rtol * losses[True]).all()
    x0 = adapter.encode_batch(batch, generator=torch.Generator().manual_seed(1))[0]
    assert (prepared["target"] == x0).all()
    # SD3's latents: (z - shift_factor) * scaling_factor, z drawn from the VAE's posterior
    with torch.no_grad():
        posterior = adapter.vae.encode(batch["pixel_values"]).latent_dist
    z = posterior.mean + posterior.std * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    # bit for bit: the adapter runs these float32 operations, in this order, on the same VAE output and draw
    # (0.0609 and 1.5035 are the tiny VAE's config values, SD3's)
    assert torch.equal(x0, (z - 0.0609) * 1.5035)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode"])
def test_stratified_cluster_draws_compose_with_the_density_on_sd3_clusters(scheme):
    """ANT's clusters on SD3's shifted sigma table; equal cluster shares, the density (renormalised) inside
    each cluster (`StratifiedDensitySampler`, what `--timestep_sampling stratified` builds with a density)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_ant import cluster_timesteps, schedule_snr
    from diffusers_ant.timesteps import StratifiedDensitySampler, flow_density_masses

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    # on the shifted table: SNR = ((1 - s) / s)^2 with s = 3 s0 / (1 + 2 s0), i.e. the unshifted SNR / 3^2.
    # Both tables share the float32 s0 = t / T; the shifted s rounds four more times in float32 (4u relative),
    # which d ln SNR / d ln s = -2 / (1 - s) amplifies near s = 1 (to 1.5e-3); s = 1 exactly at the end, where
    # both SNRs are 0. Measured: 0.6 of the bound or less; a shift of 3.1 instead moves the SNR by 6.8 %.
    shifted, unshifted = schedule_snr(sd3), schedule_snr(FlowMatchEulerDiscreteScheduler())
    s = torch.sort(sd3.sigmas.double()).values  # the shifted sigmas in index order
    assert shifted[-1] == unshifted[-1] == 0
    rtol = 2 * 4 * unit_roundoff() / (1 - s[:-1])
    assert ((shifted[:-1] - unshifted[:-1] / 9).abs() <= rtol * unshifted[:-1] / 9).all()
    intervals = cluster_timesteps(sd3, 4, objective="snr")
    p = flow_density_masses(scheme, 1000, logit_mean=0.3, logit_std=1.2)
    sampler = StratifiedDensitySampler(intervals, scheme, logit_mean=0.3, logit_std=1.2)
    t, ids = sampler.sample_with_ids(100_000, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(ids, minlength=4).tolist() == [25_000] * 4
    for i, (start, end) in enumerate(intervals.bounds):
        inside = t[ids == i]
        assert inside.min() >= start and inside.max() <= end
        conditional = p[start:end + 1] / p[start:end + 1].sum()
        mean = (torch.arange(start, end + 1, dtype=torch.float64) * conditional).sum().item()
        # a sampled mean, not rounding: draws inside an interval of width w have a standard deviation of at
        # most w / 2, so the mean of 25,000 has a standard error of at most w / 316, and 0.02 w is 6.3 of them
        assert abs(inside.double().mean().item() - mean) < 0.02 * (end - start + 1), (i, mean)


def test_sd3_flags_and_a_pipeline_of_another_family(tmp_path, capsys, sd3_folder):
    from train_scripts_loader import load_train_main

    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training import UsageError, parse_args

    base = ["--model_type", "sd3", "--dataset_name", "mnist5k_captions", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UsageError, match="drop --noise_scheduler ddpm"):
        parse_args([*base, "--noise_scheduler", "ddpm"])
    with pytest.raises(UsageError, match="add --rank"):
        parse_args([*base, "--lora_layers", "attn.to_q"])
    args = parse_args([*base, "--weighting_scheme", "mode", "--precondition_outputs", "0"])
    assert (args.noise_scheduler, args.weighting_scheme, args.precondition_outputs) == ("flow_match", "mode", 0)
    # Diff-Tuning / DeMe draw their own timesteps: no logit-normal default, an explicit density is refused
    assert parse_args([*base, "--retention", "kd", "--pretrained_model_name_or_path", str(tmp_path)]).weighting_scheme == "none"
    with pytest.raises(UsageError, match="draw their own timesteps"):
        parse_args([*base, "--retention", "kd", "--pretrained_model_name_or_path", str(tmp_path),
                    "--weighting_scheme", "mode"])
    with pytest.raises(UsageError, match="--precondition_outputs"):  # not for DDPM models
        parse_args(["--dataset_name", "mnist5k", "--output_dir", "o", "--precondition_outputs", "1"])

    # a T5 tokenizer saved as spiece.model only needs sentencepiece, which is optional: named with its install
    import shutil

    spm = tmp_path / "spm-only"
    shutil.copytree(sd3_folder, spm)
    (spm / "tokenizer_3" / "tokenizer.json").unlink()
    (spm / "tokenizer_3" / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="pip install sentencepiece protobuf"):
        get_model_adapter("sd3").load(pretrained_model_name_or_path=str(spm))

    sd_folder = tmp_path / "tiny-sd"
    get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16).save(str(sd_folder))
    main = load_train_main()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(_sd3_args(tmp_path / "wrong", "--max_train_steps", "1", pretrained=sd_folder))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--model_type sd3" in err and "--model_type sd" in err and "StableDiffusionPipeline" in err, err


def test_mixed_precision_keeps_the_vae_in_float32_and_caching_frees_all_three_encoders():
    """As diffusers' train_dreambooth_lora_sd3.py, the VAE stays float32 under a low precision (the pipeline
    never upcasts it); and once the text embeddings are cached, freeing the encoders really frees them: the
    pipeline `encode_prompt` ran on kept all three (T5-XXL is about 9 GB), so they stayed in memory."""
    import gc
    import weakref

    from diffusers_ant.models import get_model_adapter

    adapter = get_model_adapter("sd3").load(model_config_name_or_path="tiny", resolution=16)
    adapter.to("cpu", torch.bfloat16)
    assert adapter.vae.dtype == torch.float32 and adapter.text_encoder_3.dtype == torch.bfloat16
    adapter.to("cpu", torch.float32)
    adapter.encode_prompt(["a digit 3"])
    encoders = [weakref.ref(getattr(adapter, name)) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    freed = adapter.free_text_encoders()
    assert set(freed) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    del freed
    gc.collect()
    assert [ref() for ref in encoders] == [None, None, None]


def test_an_ensemble_routes_by_the_sigma_table_its_flow_shift_fine_tunes_trained(tmp_path):
    """SD3 fine-tunes trained with --flow_shift 1 on a base whose scheduler shifts by 3 index the unshifted table:
    the ensemble's router mapped each sigma through the base's table, so sigma 0.75 (trained at index 749) went
    to index 499, another interval's model. The run's --flow_shift is recorded and routing follows it;
    fine-tunes that disagree are refused."""
    from types import SimpleNamespace

    from diffusers_ant.deme.ensemble import _training_routing, routing_scheduler
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.models.base import _copy_scheduler
    from diffusers_ant.routing import denoiser_timestep_map
    from diffusers_ant.schedule import model_timesteps

    pipeline = get_model_adapter("sd3").load(model_config_name_or_path="tiny", resolution=16).make_pipeline()
    assert pipeline.scheduler.config.shift == 3.0
    indices = torch.tensor([100, 300, 499, 500, 749, 900])
    trained = _copy_scheduler(pipeline.scheduler, shift=1.0, use_dynamic_shifting=False)

    def info_of(*shifts):
        folders = []
        for shift in shifts:
            folder = tmp_path / str(len(list(tmp_path.iterdir())))
            folder.mkdir()
            (folder / "training_config.json").write_text(json.dumps({"model_type": "sd3", "flow_shift": shift}))
            folders.append(SimpleNamespace(path=str(folder)))
        return _training_routing(folders)

    def routed(info):
        timestep_map = denoiser_timestep_map(pipeline.scheduler, 1000, pipeline.transformer,
                                             training_scheduler=routing_scheduler(pipeline, info))
        return timestep_map(model_timesteps(trained, indices))  # what StableDiffusion3Pipeline passes

    assert torch.equal(routed(info_of(1.0, 1.0)), indices)
    assert int(routed({})[4]) < 600  # the base's table: index 749 read in another interval
    assert info_of(None, None) == {}  # trained on the base's own table
    with pytest.raises(ValueError, match="--flow_shift 1.0 and .* with --flow_shift 2.0: their intervals index different"):
        info_of(1.0, 2.0)
    with pytest.raises(ValueError, match="no --flow_shift"):
        info_of(1.0, None)


def test_ntg_and_forgetting_route_a_flow_shift_runs_sigmas_by_its_training_table(tmp_path):
    """`analyze.py ntg` / `forgetting` map what the pipeline passes through `training_routing_scheduler`. A LoRA
    output trained with --flow_shift loads its base's scheduler (shift 3 here), so its intervals (indices of the
    shift-1 table) were read off the base's table: sigma 0.75, trained at index 749, went to about 499. The
    runs' recorded --flow_shift now gives the table; runs of different shifts are refused in one line."""
    from diffusers_ant.analysis.common import training_routing_scheduler
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.models.base import _copy_scheduler
    from diffusers_ant.routing import denoiser_timestep_map
    from diffusers_ant.schedule import model_timesteps

    pipeline = get_model_adapter("sd3").load(model_config_name_or_path="tiny", resolution=16).make_pipeline()
    indices = torch.tensor([100, 300, 499, 500, 749, 900])
    trained = _copy_scheduler(pipeline.scheduler, shift=1.0, use_dynamic_shifting=False)

    def run(name, **config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "training_config.json").write_text(json.dumps({"model_type": "sd3", **config}))
        return str(folder)

    def routed(folders):
        timestep_map = denoiser_timestep_map(pipeline.scheduler, 1000, pipeline.transformer,
                                             training_scheduler=training_routing_scheduler(pipeline, folders))
        return timestep_map(model_timesteps(trained, indices))

    shifted = [run("a", flow_shift=1.0), run("b", flow_shift=1.0)]
    assert torch.equal(routed(shifted), indices)
    assert torch.equal(routed([shifted[0], str(tmp_path / "no_config")]), indices)  # a folder without a record
    assert training_routing_scheduler(pipeline, [run("c")]) is None  # the pipeline's own table was trained
    assert int(routed([run("d")])[4]) < 600
    with pytest.raises(ValueError, match="with --flow_shift 1.0 and .*e with --flow_shift 2.0"):
        training_routing_scheduler(pipeline, [shifted[0], run("e", flow_shift=2.0)])
