"""Flow matching end to end: training from scratch (--noise_scheduler flow_match), the scheduler a
flow-matching model samples with (validation, evaluation, saved pipelines), and SD3's --weighting_scheme."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UNet2DModel,
)
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from tolerances import unit_roundoff
from trainer_utils import TINY_RUN, train_in_process

from diffusers_ant.analysis.evaluate import sampling_pipeline
from diffusers_ant.models import (
    ClassConditionalUNetPipeline,
    PixelDiTPipeline,
    UnconditionalUNetPipeline,
    get_model_adapter,
    load_pipeline,
)
from diffusers_ant.models.base import scheduler_by_name
from diffusers_ant.schedule import model_timesteps
from diffusers_ant.training import UsageError, parse_args


# ---------------------------------------------------------------- which scheduler samples a flow model


def test_ddim_and_ddpm_mean_the_euler_sampler_for_flow_models():
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for name in ("ddim", "DDPM", "euler", "flow_match"):
        chosen = scheduler_by_name(name, flow)
        assert type(chosen) is FlowMatchEulerDiscreteScheduler and chosen.config.shift == 3.0, name
    assert type(scheduler_by_name("FlowMatchHeunDiscreteScheduler", flow)) is FlowMatchHeunDiscreteScheduler
    with pytest.raises(ValueError, match="DDIMScheduler cannot sample a model trained with a flow-matching"):
        scheduler_by_name("DDIMScheduler", flow)
    # and the other way round: DDPM-family models keep DDIM, refuse flow-matching samplers
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    assert type(scheduler_by_name("ddim", ddpm)) is DDIMScheduler
    with pytest.raises(ValueError, match="DDPM-family scheduler"):
        scheduler_by_name("FlowMatchEulerDiscreteScheduler", ddpm)


class OracleVelocity(torch.nn.Module):
    """The exact velocity field of data that is a single image ``x0``: on the straight path
    ``x_s = (1 - s) x0 + s eps`` the velocity ``eps - x0`` is ``(x_s - x0) / s``, with ``s`` read from the
    model timestep ``sigma * num_train_timesteps``. Euler steps of it land exactly on ``x0``, whatever the
    sigma schedule, if and only if the pipeline passes the timestep that matches the sigma it steps with."""

    def __init__(self, x0, kind, T=1000):
        super().__init__()
        self.register_buffer("x0", x0)
        self.T = T
        self.seen = []
        self.largest = 0.0  # max |x| the sampler passed: with max |x0|, the scale of every Euler step's terms
        config = {"sample_size": x0.shape[-1], "in_channels": x0.shape[1], "out_channels": x0.shape[1]}
        if kind == "class_unet":
            config["num_class_embeds"] = 3
        if kind == "dit":
            config["num_embeds_ada_norm"] = 3
        self.config = FrozenDict(config)

    @property
    def dtype(self):
        return self.x0.dtype

    @property
    def device(self):
        return self.x0.device

    def forward(self, x, timestep, class_labels=None, **unused):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        self.seen.append(float(t[0]))
        self.largest = max(self.largest, float(x.abs().max()))
        s = (t / self.T).view(-1, 1, 1, 1)
        return Transformer2DModelOutput(sample=(x - self.x0) / s)


@pytest.mark.parametrize("kind", ["unet", "class_unet", "dit"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_pipelines_integrate_the_velocity_to_the_data(kind, shift):
    x0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    oracle = OracleVelocity(x0, kind)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    if kind == "unet":
        pipe, call = UnconditionalUNetPipeline(unet=oracle, scheduler=scheduler), {"batch_size": 3}
    elif kind == "class_unet":
        pipe, call = ClassConditionalUNetPipeline(unet=oracle, scheduler=scheduler), {"class_labels": [0, 1, 2]}
    else:
        pipe, call = PixelDiTPipeline(transformer=oracle, scheduler=scheduler), {"class_labels": [0, 1, 2]}
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**call, num_inference_steps=7, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert out.shape == (3, 1, 8, 8)
    # float32 rounding only: a step forms v = (x - x0) / s (s read back from sigma * T: 2u relative) and
    # x + (s' - s) v, each term at most M = max |x| + max |x0| (x lies between the noise and x0), about 8
    # roundings of M a step; a later step scales an earlier error by s' / s < 1, so the 7 steps add up, and
    # the image (x + 1) / 2 halves them and rounds twice (7e-6 here). Measured: 0; a timestep one step behind
    # the sigma stepped with misses by 0.27, one whose scale is 0.1 % off by 1.4e-5.
    atol = 7 * 8 * unit_roundoff() * (oracle.largest + float(x0.abs().max())) / 2 + 2 * unit_roundoff()
    torch.testing.assert_close(out, ((x0 + 1) / 2).expand(3, -1, -1, -1), atol=atol, rtol=0)
    # the noise levels asked for lie within the training ones (shifted sigma * T, from 1000 down)
    trained = model_timesteps(scheduler, torch.arange(1000))
    assert len(oracle.seen) == 7 and oracle.seen[0] == pytest.approx(float(trained.max()))
    # (float32 timesteps sigma * T on both sides, the shifted sigma within 6u relative: 8u of T at most)
    assert min(oracle.seen) >= float(trained.min()) - 8 * unit_roundoff() * 1000
    # the old validation sampler, DDIM built from the flow config, does not sample this model
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    wrong = pipe(**call, num_inference_steps=7, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert not torch.allclose(wrong, ((x0 + 1) / 2).expand(3, -1, -1, -1), atol=1e-2)  # (NaN where DDIM asks for t = 0)


def test_sampling_pipeline_gives_a_flow_model_its_euler_sampler():
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    # a folder saved before this fix: DDPMPipeline around a flow-matching scheduler
    old = DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0))
    for pipeline in (old, UnconditionalUNetPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0))):
        new = sampling_pipeline(pipeline, scheduler="ddim")  # the evaluation commands' default
        assert type(new) is UnconditionalUNetPipeline
        assert type(new.scheduler) is FlowMatchEulerDiscreteScheduler and new.scheduler.config.shift == 2.0
    assert type(sampling_pipeline(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), scheduler="ddim").scheduler) is DDIMScheduler


# ---------------------------------------------------------------- training from scratch, saving, loading


@pytest.mark.parametrize("case", ["unet", "unet-class", "dit"])
def test_flow_models_save_with_a_pipeline_that_samples_them(case, tmp_path):
    model_type, options = {"unet": ("unet", {}), "unet-class": ("unet", {"num_classes": 3}),
                           "dit": ("dit", {"num_classes": 3})}[case]
    torch.manual_seed(0)
    adapter = get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=8, num_channels=1,
                                                 noise_scheduler="flow_match", flow_shift=2.0, **options)
    assert type(adapter.noise_scheduler) is FlowMatchEulerDiscreteScheduler and adapter.noise_scheduler.config.shift == 2.0
    adapter.save(str(tmp_path), adapter.model)
    index = json.loads((tmp_path / "model_index.json").read_text())
    expected = {"unet": UnconditionalUNetPipeline, "unet-class": ClassConditionalUNetPipeline, "dit": PixelDiTPipeline}[case]
    assert index["_class_name"][-1] == expected.__name__ and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    pipe = load_pipeline(str(tmp_path))
    assert type(pipe) is expected and pipe.scheduler.config.shift == 2.0
    # validation's scheduler="ddim" samples with the model's own flow-matching Euler sampler
    common = {"num_inference_steps": 3, "class_labels": [0, 1] if options else None}
    ddim = adapter.sample(pipe, 2, generator=torch.Generator().manual_seed(0), scheduler="ddim", **common)
    own = adapter.sample(pipe, 2, generator=torch.Generator().manual_seed(0), **common)
    assert [np.asarray(a).tolist() for a in ddim] == [np.asarray(b).tolist() for b in own]
    # a fresh adapter from the folder trains flow matching again
    again = get_model_adapter(model_type).load(pretrained_model_name_or_path=str(tmp_path))
    assert type(again.noise_scheduler) is FlowMatchEulerDiscreteScheduler


def test_noise_scheduler_choice_and_refusals(tmp_path):
    unet = get_model_adapter("unet")
    ddpm_model = unet.load(model_config_name_or_path="tiny", resolution=8, num_channels=1)
    assert type(ddpm_model.noise_scheduler) is DDPMScheduler  # the default stays DDPM
    ddpm_model.save(str(tmp_path / "ddpm"), ddpm_model.model)
    # a DDPM-pretrained UNet fine-tuned as flow matching gets a flow-matching scheduler, and back
    switched = unet.load(pretrained_model_name_or_path=str(tmp_path / "ddpm"), noise_scheduler="flow_match")
    assert type(switched.noise_scheduler) is FlowMatchEulerDiscreteScheduler and switched.noise_scheduler.config.shift == 1.0
    with pytest.raises(ValueError, match="pixel-space models only"):
        get_model_adapter("dit").load(model_config_name_or_path="tiny-latent", resolution=16, num_channels=3,
                                      noise_scheduler="flow_match")
    with pytest.raises(ValueError, match="drop prediction_type 'epsilon'"):
        unet.load(model_config_name_or_path="tiny", resolution=8, num_channels=1, noise_scheduler="flow_match",
                  prediction_type="epsilon")
    with pytest.raises(ValueError, match="flow_shift is the shift of a flow-matching scheduler"):
        unet.load(model_config_name_or_path="tiny", resolution=8, num_channels=1, flow_shift=3.0)


# ---------------------------------------------------------------- command line


def args_for(*extra, pretrained=False):
    base = ["--dataset_name", "digits", "--output_dir", "unused"]
    if pretrained:
        base += ["--pretrained_model_name_or_path", "."]
    return [*base, *extra]


def test_the_argument_lists_agree_with_the_library():
    from diffusers_ant import schedule
    from diffusers_ant.training import args

    assert args.NOISE_SCHEDULERS == schedule.NOISE_SCHEDULERS
    assert args.FLOW_WEIGHTING_SCHEMES == schedule.FLOW_WEIGHTING_SCHEMES


@pytest.mark.parametrize("extra,needle", [
    (["--weighting_scheme", "sigma_sqrt"], "add --noise_scheduler flow_match"),
    (["--noise_scheduler", "ddpm", "--weighting_scheme", "mode"], "add --noise_scheduler flow_match"),
    (["--noise_scheduler", "flow_match", "--weighting_scheme", "mode", "--timestep_range", "0", "9"], "--timestep_range"),
    (["--noise_scheduler", "flow_match", "--weighting_scheme", "cosmap", "--snr_gamma", "5"], "drop --loss_weighting min_snr"),
    (["--noise_scheduler", "flow_match", "--weighting_scheme", "mode", "--mode_scale", "3"], "--mode_scale must lie in"),
    (["--noise_scheduler", "flow_match", "--weighting_scheme", "logit_normal", "--logit_std", "0"], "--logit_std must be > 0"),
    (["--flow_shift", "3"], "needs a flow-matching scheduler"),
    (["--noise_scheduler", "flow_match", "--flow_shift", "0"], "--flow_shift must be > 0"),
    (["--noise_scheduler", "flow_match", "--prediction_type", "epsilon"], "drop --prediction_type"),
    (["--noise_scheduler", "flow_match", "--model_type", "sd"], "pixel-space"),
])
def test_flow_flags_are_validated(extra, needle):
    with pytest.raises(UsageError, match=needle):
        parse_args(args_for(*extra))


def test_flow_flags_accepted():
    args = parse_args(args_for("--noise_scheduler", "flow_match", "--weighting_scheme", "logit_normal",
                               "--mtl_method", "uw", "--loss_weighting", "p2"))
    assert args.timestep_sampling == "uniform"  # drawn from the density, grouped into clusters afterwards
    # with a pretrained folder the family is known only after loading: the objective checks it then
    assert parse_args(args_for("--weighting_scheme", "cosmap", pretrained=True)).weighting_scheme == "cosmap"


def test_objective_refuses_a_scheme_for_a_ddpm_model():
    from diffusers_ant.timesteps import UniformTimestepSampler
    from diffusers_ant.training.step import DiffusionObjective

    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        DiffusionObjective(None, DDPMScheduler(), UniformTimestepSampler(1000), None, weighting_scheme="sigma_sqrt")


def test_trainer_trains_flow_matching_with_a_density_and_saves_the_flow_pipeline(tmp_path):
    out = tmp_path / "run"
    train_in_process(["--model_type", "unet", "--dataset_name", "digits", "--output_dir", str(out), *TINY_RUN,
                      "--max_train_steps", "2", "--resolution", "8", "--noise_scheduler", "flow_match",
                      "--flow_shift", "2", "--weighting_scheme", "mode", "--mtl_method", "uw"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"][-1] == "UnconditionalUNetPipeline"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 2.0
    assert (out / "samples" / "step-2.png").is_file()


# ---------------------------------------------------------------- quality: a flow model learns digits


@pytest.mark.slow
def test_flow_matching_unet_learns_digits(tmp_path, one_thread):
    """A tiny UNet trained with flow matching for a few hundred steps on 8x8 digits samples images whose
    domain FID is far below that of noise, through the saved folder and the evaluation code (scheduler
    "ddim", which for this model is its Euler sampler). About 50 s; measured: FID 45 against 655 for
    uniform noise and 1372 for DDIM built from the flow config (the sampler validation used before)."""
    from diffusers_ant.analysis.evaluate import evaluate_pipeline, reference_for

    out = tmp_path / "run"
    train_in_process(["--model_type", "unet", "--model_config_name_or_path", "tiny", "--dataset_name", "digits",
                      "--resolution", "8", "--noise_scheduler", "flow_match", "--max_train_steps", "300",
                      "--train_batch_size", "64", "--learning_rate", "2e-3", "--lr_scheduler", "cosine",
                      "--lr_warmup_steps", "20", "--mtl_method", "none", "--report_to", "none", "--seed", "0",
                      "--num_validation_images", "4", "--num_inference_steps", "10", "--checkpointing_steps", "10000",
                      "--output_dir", str(out)])
    pipe = load_pipeline(str(out))
    assert type(pipe) is UnconditionalUNetPipeline
    n = 500
    reference = reference_for(np.zeros((1, 8, 8, 1), np.float32), "digits", num_real=n, cache_dir=str(tmp_path / "fe"))
    fid = evaluate_pipeline(pipe, "digits", num_samples=n, scheduler="ddim", num_inference_steps=20, progress=False,
                            reference=reference)["fid"]
    noise = np.random.default_rng(0).random((n, 8, 8, 1), dtype=np.float32)
    noise_fid = reference.score(noise)["fid"]
    # the old validation path, DDIM from the flow config, gives noise-like samples from the same model
    ddim_fid = evaluate_pipeline(pipe, "digits", num_samples=n, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                 num_inference_steps=20, progress=False, reference=reference)["fid"]
    print(f"domain FID: flow-matching Euler {fid:.2f}, DDIM on the flow config {ddim_fid:.2f}, uniform noise {noise_fid:.2f}")
    assert fid < 0.25 * noise_fid
    assert fid < 0.5 * ddim_fid
