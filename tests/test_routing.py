"""TimestepRouter: each timestep reaches its interval's model, inside a real diffusers pipeline and in mixed batches."""

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.torch_utils import randn_tensor

from diffusers_ant import TimestepIntervals, TimestepRouter
from diffusers_ant.schedule import model_timesteps
from tolerances import output_tolerance

BOUNDS = [(0, 299), (300, 699), (700, 999)]


def tiny_unet(seed):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def record_timesteps(model):
    """Attach a hook that records every timestep (and batch size) the model is called with."""
    seen = []

    def hook(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.extend(torch.as_tensor(timestep).reshape(-1).tolist())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def interval_of(t):
    return next(i for i, (start, end) in enumerate(BOUNDS) if start <= t <= end)


def test_router_inside_ddim_pipeline_matches_hand_routed_loop():
    models = [tiny_unet(seed) for seed in range(3)]
    seen = [record_timesteps(m) for m in models]
    router = TimestepRouter(TimestepIntervals(BOUNDS), models)
    pipe = DDIMPipeline(unet=router, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    with torch.no_grad():
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0, output_type="np").images

    steps = [int(t) for t in pipe.scheduler.timesteps]
    # every model saw only its own interval's timesteps, and together they saw every step once
    for i, (start, end) in enumerate(BOUNDS):
        assert seen[i], f"model {i} was never called"
        assert all(start <= t <= end for t in seen[i]), (i, seen[i])
    assert sorted(t for s in seen for t in s) == sorted(steps)

    # the same sampling loop, routed by hand
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x = randn_tensor((2, 1, 8, 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = models[interval_of(int(t))](x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0, generator=generator).prev_sample
    expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == expected.shape
    # bit for bit: every step's timestep lies in one interval, so the router hands its model the whole batch,
    # and the pipeline runs the loop's operations on the same values
    assert (images == expected).all()

    # and it differs from letting one model do everything, so the routing mattered
    with torch.no_grad():
        single = DDIMPipeline(unet=models[0], scheduler=DDIMScheduler(num_train_timesteps=1000))
        single.set_progress_bar_config(disable=True)
        alone = single(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0, output_type="np").images
    assert abs(alone - expected).max() > 1e-3


def test_mixed_per_sample_timesteps_split_the_batch():
    models = [tiny_unet(seed) for seed in range(3)]
    seen = [record_timesteps(m) for m in models]
    router = TimestepRouter(TimestepIntervals(BOUNDS), models)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 950, 400, 10, 650, 700])

    with torch.no_grad():
        out = router(x, t)
        as_tuple = router(x, t, return_dict=False)
        expected = torch.cat([models[interval_of(int(ti))](x[i : i + 1], t[i : i + 1]).sample for i, ti in enumerate(t)])

    assert isinstance(out, UNet2DOutput)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    # the same function of each sample, in sub-batches of 2 against batches of 1: rounding alone, through one
    # model's layers (tests/tolerances.py: 3.7e-4 here; measured 7e-7; another interval's model is 1.3 away)
    assert (out.sample - expected).abs().max() <= output_tolerance(models[0], expected)
    assert torch.equal(as_tuple[0], out.sample)
    # each model got exactly its samples' timesteps (twice: the dict call and the tuple call, then one by one)
    assert sorted(seen[0]) == sorted([5, 10] * 2 + [5, 10])
    assert sorted(seen[1]) == sorted([400, 650] * 3)
    assert sorted(seen[2]) == sorted([700, 950] * 3)


class ToyConditional(torch.nn.Module):
    """A denoiser with a per-sample conditioning tensor, a dict of extras and a Transformer2DModelOutput."""

    def __init__(self, scale):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
        self.batch_sizes = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        self.batch_sizes.append(sample.shape[0])
        timestep = timestep.expand(sample.shape[0]) if timestep.ndim == 0 else timestep
        assert encoder_hidden_states.shape[0] == sample.shape[0] == timestep.shape[0]
        extra = added_cond_kwargs["bias"]
        assert extra.shape[0] == sample.shape[0]
        out = sample * self.scale + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1) + timestep.view(-1, 1, 1, 1) + extra.view(-1, 1, 1, 1)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def test_per_sample_arguments_follow_their_rows():
    models = [ToyConditional(scale) for scale in (1.0, 2.0, 3.0)]
    router = TimestepRouter(TimestepIntervals(BOUNDS), models)
    x = torch.randn(4, 1, 2, 2)
    t = torch.tensor([999, 0, 500, 1])
    cond = torch.randn(4, 3, 5)
    bias = torch.randn(4)
    out = router(x, t, cond, added_cond_kwargs={"bias": bias})
    assert isinstance(out, Transformer2DModelOutput)
    scales = torch.tensor([3.0, 1.0, 2.0, 1.0]).view(-1, 1, 1, 1)
    expected = x * scales + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) + bias.view(-1, 1, 1, 1)
    assert torch.allclose(out.sample, expected)
    assert [m.batch_sizes for m in models] == [[2], [1], [1]]
    # a scalar timestep is one call to one model, with the whole batch
    out = router(x, torch.tensor(600), cond.clone(), added_cond_kwargs={"bias": bias}, return_dict=False)
    assert isinstance(out, tuple) and models[1].batch_sizes == [1, 4]


def test_attributes_and_methods_come_from_the_models():
    models = [tiny_unet(0), tiny_unet(1)]
    router = TimestepRouter(TimestepIntervals([(0, 499), (500, 999)]), models)
    assert router.config.sample_size == 8 and router.config.in_channels == 1
    assert router.dtype == torch.float32 and router.device.type == "cpu"
    assert not any(m.is_gradient_checkpointing for m in models)
    router.enable_gradient_checkpointing()  # a method: broadcast to every distinct model
    assert all(m.is_gradient_checkpointing for m in models)
    assert router.is_gradient_checkpointing is True  # a plain attribute: read from the first model
    # parameters are shared, not copied, and a model used twice counts once
    shared = TimestepRouter([(0, 299), (300, 999)], [models[0], models[0]])
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in models[0].parameters())


def test_flow_matching_timesteps_map_back_to_training_indices():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    router = TimestepRouter(TimestepIntervals(BOUNDS), [ToyConditional(1.0) for _ in BOUNDS], timestep_map=scheduler)
    indices = torch.tensor([0, 1, 299, 300, 699, 700, 998, 999])
    values = model_timesteps(scheduler, indices)  # what the model is called with: sigma * 1000, floats
    assert values.is_floating_point()
    assert torch.equal(router.training_indices(values), indices)
    assert router.route(values).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # without the map, sigma * 1000 would be read as a DDPM index: shift=3 puts index 299 far above 299
    assert TimestepRouter(TimestepIntervals(BOUNDS), [ToyConditional(1.0) for _ in BOUNDS]).route(values).tolist() != [0, 0, 0, 1, 1, 2, 2, 2]


def test_a_flux_router_maps_the_sigmas_its_pipeline_passes_and_schedulers_alone_map_too():
    """FLUX.1 / Qwen-Image pipelines call their transformer with the sigma itself (timestep / 1000): a scheduler
    given as `timestep_map` read each sigma as sigma * 1000 and sent every step to the first interval. And the
    models' flow-matching training schedulers given alone (`schedulers=`) now map the timesteps too: they were
    checked, then the values were rounded as DDPM indices."""
    from diffusers import FluxTransformer2DModel

    def flux():
        return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    intervals = TimestepIntervals(BOUNDS)
    indices = torch.tensor([0, 299, 300, 699, 700, 999])
    sigmas = model_timesteps(scheduler, indices) / 1000  # what FluxPipeline hands its transformer
    router = TimestepRouter(intervals, [flux() for _ in BOUNDS], timestep_map=scheduler)
    assert torch.equal(router.training_indices(sigmas), indices)
    assert router.route(sigmas).tolist() == [0, 0, 1, 1, 2, 2]
    toys = [ToyConditional(1.0) for _ in BOUNDS]
    by_schedulers = TimestepRouter(intervals, toys, schedulers=[scheduler] * len(BOUNDS))
    assert torch.equal(by_schedulers.training_indices(model_timesteps(scheduler, indices)), indices)


def test_default_map_rounds_and_clamps():
    router = TimestepRouter(TimestepIntervals(BOUNDS), [ToyConditional(1.0) for _ in BOUNDS])
    assert router.training_indices(torch.tensor([299.4, 299.6, -3.0, 1000.0])).tolist() == [299, 300, 0, 999]


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="one model per interval"):
        TimestepRouter(TimestepIntervals(BOUNDS), [tiny_unet(0)])
    other = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="sample_size"):
        TimestepRouter(TimestepIntervals([(0, 499), (500, 999)]), [tiny_unet(0), other])
    router = TimestepRouter(TimestepIntervals(BOUNDS), [ToyConditional(1.0) for _ in BOUNDS])
    with pytest.raises(ValueError, match="one entry per sample"):
        router(torch.randn(3, 1, 2, 2), torch.tensor([1, 2]), torch.randn(3, 1, 1), added_cond_kwargs={"bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="timestep_map"):
        TimestepRouter(TimestepIntervals(BOUNDS), [ToyConditional(1.0) for _ in BOUNDS], timestep_map=3)


def test_models_trained_with_other_noise_schedules_are_refused():
    from diffusers import DDPMScheduler

    from diffusers_ant.routing import check_same_schedule

    models = [tiny_unet(0), tiny_unet(1)]
    cosine = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    intervals = TimestepIntervals([(0, 499), (500, 999)])
    same = DDPMScheduler.from_config(cosine.config)
    TimestepRouter(intervals, models, schedulers=[cosine, same])  # the same schedule: accepted
    TimestepRouter(intervals, models, schedulers=[cosine, None])  # unknown: not compared
    cases = [
        (DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"), r"alphas_cumprod\[\d+\] is .* for a and .* for b"),
        (DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
         "a has prediction_type 'epsilon', b has 'v_prediction'"),
        (DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2"), "a has num_train_timesteps 1000, b has 500"),
        (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000), "a has family 'ddpm', b has 'flow'"),
    ]
    for other, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            TimestepRouter(intervals, models, schedulers=[cosine, other], names=["a", "b"])
        assert "\n" not in str(error.value)
    # flow matching: another shift is another sigma curve
    with pytest.raises(ValueError, match=r"sigmas\[\d+\]"):
        check_same_schedule([FlowMatchEulerDiscreteScheduler(shift=1.0), FlowMatchEulerDiscreteScheduler(shift=3.0)])
    check_same_schedule([FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)])
    # a training scheduler given as timestep_map is compared with the models' too
    with pytest.raises(ValueError, match="the timestep_map scheduler has beta|alphas_cumprod"):
        TimestepRouter(intervals, models, timestep_map=DDPMScheduler(beta_schedule="linear"), schedulers=[cosine, same])
    with pytest.raises(ValueError, match="2 models"):
        TimestepRouter(intervals, models, schedulers=[cosine])


class ToyTransformer(ToyConditional):
    """The keyword signature of SD3's, FLUX.1's and Qwen-Image's transformers: `hidden_states`, `timestep`."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None, return_dict=True):
        return super().forward(hidden_states, timestep, encoder_hidden_states, added_cond_kwargs, return_dict)


def test_keyword_calls_as_the_flow_matching_pipelines_make_them_are_routed():
    models = [ToyTransformer(scale) for scale in (1.0, 2.0, 3.0)]
    router = TimestepRouter(TimestepIntervals(BOUNDS), models)
    x, t, cond, bias = torch.randn(4, 1, 2, 2), torch.tensor([999, 0, 500, 1]), torch.randn(4, 3, 5), torch.randn(4)
    out = router(hidden_states=x, timestep=t, encoder_hidden_states=cond, added_cond_kwargs={"bias": bias})
    scales = torch.tensor([3.0, 1.0, 2.0, 1.0]).view(-1, 1, 1, 1)
    expected = x * scales + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) + bias.view(-1, 1, 1, 1)
    torch.testing.assert_close(out.sample, expected, rtol=0, atol=0)
    assert [m.batch_sizes for m in models] == [[2], [1], [1]]
    # DiT's pipeline: the sample positional, the timestep by keyword
    conditional = [ToyConditional(scale) for scale in (1.0, 2.0, 3.0)]
    routed = TimestepRouter(TimestepIntervals(BOUNDS), conditional)(x, timestep=t, encoder_hidden_states=cond,
                                                                     added_cond_kwargs={"bias": bias})
    torch.testing.assert_close(routed.sample, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="pass the timestep"):
        router(hidden_states=x, encoder_hidden_states=cond)


def test_router_runs_inside_the_sd3_pipeline():
    """StableDiffusion3Pipeline calls `transformer(hidden_states=..., timestep=...)`: a router over the same
    transformer twice samples what the transformer alone samples, and each call reaches a model."""
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.routing import denoiser_timestep_map

    adapter = get_model_adapter("sd3").load(model_config_name_or_path="tiny", resolution=16)
    pipeline = adapter.make_pipeline()
    transformer = pipeline.transformer.eval()
    seen = record_timesteps(transformer)
    kwargs = dict(prompt="a digit", num_inference_steps=3, guidance_scale=1.0, height=16, width=16, output_type="pt")
    alone = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    calls = len(seen)
    timestep_map = denoiser_timestep_map(pipeline.scheduler, 1000, transformer)
    pipeline.transformer = TimestepRouter(TimestepIntervals([(0, 499), (500, 999)]), [transformer, transformer],
                                          timestep_map=timestep_map)
    routed = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(routed, alone, rtol=0, atol=0)
    assert len(seen) == 2 * calls == 6


def test_models_that_cannot_share_a_sampling_loop_are_refused_and_an_ensemble_is_read_through():
    """`check_interchangeable` (NTG, forgetting): a DeMe ensemble loaded as a pipeline's denoiser is a
    TimestepRouter, which has no config of its own; its members' architecture is what a router stands in with."""
    from diffusers_ant.clustering import TimestepIntervals
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.routing import TimestepRouter, check_interchangeable

    def unet(**options):
        return get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1,
                                              **options).model

    plain = unet()
    ensemble = TimestepRouter(TimestepIntervals([(0, 499), (500, 999)], 1000), [unet(), unet()])
    check_interchangeable([ensemble, plain], ["--finetuned", "--pretrained"])
    with pytest.raises(ValueError, match="--finetuned and --pretrained cannot share a sampling loop: class-conditional"):
        check_interchangeable([ensemble, unet(num_classes=3)], ["--finetuned", "--pretrained"])
    with pytest.raises(ValueError, match="in_channels 1 against 3"):
        check_interchangeable([plain, get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8,
                                                                      num_channels=3).model], ["a", "b"])
