"""Schedules: SNR, noising and targets against diffusers and against hand-computed values."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    PNDMScheduler,
    ScoreSdeVeScheduler,
)
from diffusers.training_utils import compute_snr

from diffusers_ant.schedule import (
    PREDICTION_TYPES,
    add_noise,
    is_flow_matching,
    model_timesteps,
    num_train_timesteps,
    resolve_prediction_type,
    schedule_log_snr,
    schedule_snr,
    snr_at,
    training_target,
)
from tolerances import unit_roundoff

U32 = unit_roundoff(torch.float32)
# diffusers' compute_snr in float32: sqrt(alpha_bar), 1 - alpha_bar (exact above 1/2, else <= u relative), its
# sqrt, the quotient and its square each round once (u relative), and squaring doubles the quotient's error:
# SNR within 2 (u + (u / 2 + u) + u) + u = 8u of the float64 SNR of the same float32 alpha_bar (measured: 6.3u).
# The SNR of the neighbouring index differs by 13,000 x more or above, on each of the three beta schedules.
COMPUTE_SNR_RTOL = 8 * U32

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
BETAS = [0.1, 0.2, 0.3, 0.4]  # a 4-step schedule whose alpha_bar is easy to compute by hand


def hand_alpha_bar(betas):
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out  # [0.9, 0.72, 0.504, 0.3024]


def hand_flow_sigma(t, T, shift):
    """FlowMatchEulerDiscreteScheduler's training sigma of training index t (0 = cleanest)."""
    u = (t + 1) / T
    return shift * u / (1 + (shift - 1) * u)


# ---------------------------------------------------------------- SNR


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler])
def test_schedule_snr_equals_compute_snr(scheduler_cls, beta_schedule):
    scheduler = scheduler_cls(beta_schedule=beta_schedule)
    T = scheduler.config.num_train_timesteps
    snr = schedule_snr(scheduler)
    assert snr.dtype == torch.float64 and snr.shape == (T,)
    reference = compute_snr(scheduler, torch.arange(T)).double()
    torch.testing.assert_close(snr, reference, rtol=COMPUTE_SNR_RTOL, atol=0)
    assert num_train_timesteps(scheduler) == T
    assert not is_flow_matching(scheduler)


def test_schedule_snr_hand_computed():
    scheduler = DDPMScheduler(num_train_timesteps=4, trained_betas=BETAS)
    alpha_bar = torch.tensor(hand_alpha_bar(BETAS), dtype=torch.float64)
    expected = alpha_bar / (1 - alpha_bar)
    # diffusers keeps alphas_cumprod in float32: index i's stores i betas (u beta / (1 - beta) <= u relative
    # in 1 - beta), forms i differences and i - 1 products (u each): within 3 i u relative; the SNR
    # a / (1 - a) multiplies a relative error of a by 1 / (1 - a) (10 at a = 0.9), its log turns it into an
    # absolute one. Measured: a third of it or less; a beta off by 1 % (0.1 -> 0.101) moves the first SNR by
    # 1.1 %, 6000 x its bound 30u.
    i = torch.arange(1, len(BETAS) + 1)
    relative = 3 * i * U32 / (1 - alpha_bar)
    assert ((schedule_snr(scheduler) - expected).abs() <= relative * expected).all()
    assert ((schedule_log_snr(scheduler) - expected.log()).abs() <= relative).all()


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("T", [10, 1000])
def test_flow_snr_is_one_minus_sigma_over_sigma_squared(shift, T):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    assert is_flow_matching(scheduler) and num_train_timesteps(scheduler) == T
    snr = schedule_snr(scheduler)
    assert snr.shape == (T,) and snr.dtype == torch.float64
    # exactly ((1 - s) / s)^2 of the scheduler's own (float32) training sigmas, index 0 the cleanest: the same
    # float64 operations on the same values, so bit for bit
    s = scheduler.sigmas.double().flip(0)
    assert torch.equal(snr, ((1 - s) / s) ** 2)
    # and the sigmas are the shifted ones, computed by hand. diffusers' are float32: (t + 1) / T rounds once,
    # shift s / (1 + (shift - 1) s) four more times, so s is within 5u relative of the hand value, and
    # d ln SNR / d ln s = -2 / (1 - s) amplifies that near s = 1 (to 2e-3 at T = 1000; s = 1 exactly at the
    # end, SNR 0 on both sides). Measured: half of it or less; the SNR of the neighbouring index is 800 x
    # further or more.
    hand = torch.tensor([hand_flow_sigma(t, T, shift) for t in range(T)], dtype=torch.float64)
    expected = ((1 - hand) / hand) ** 2
    assert snr[-1] == expected[-1] == 0  # sigma = 1: pure noise
    relative = 2 * 5 * U32 / (1 - hand[:-1])
    assert ((snr[:-1] - expected[:-1]).abs() <= relative * expected[:-1]).all()
    assert schedule_log_snr(scheduler)[-1] == -math.inf


def test_flow_snr_ignores_inference_set_timesteps():
    # set_timesteps overwrites scheduler.sigmas with the inference schedule; the training one must not change
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    before = schedule_snr(scheduler)
    scheduler.set_timesteps(7)
    torch.testing.assert_close(schedule_snr(scheduler), before)
    assert is_flow_matching(FlowMatchHeunDiscreteScheduler())


@pytest.mark.parametrize(
    "scheduler",
    [DDPMScheduler(beta_schedule=b) for b in BETA_SCHEDULES]
    + [FlowMatchEulerDiscreteScheduler(shift=s) for s in (1.0, 3.0)]
    + [DDPMScheduler(rescale_betas_zero_snr=True)],
    ids=BETA_SCHEDULES + ["flow_shift1", "flow_shift3", "zero_terminal_snr"],
)
def test_snr_strictly_decreasing_in_t(scheduler):
    snr = schedule_snr(scheduler)
    assert (snr[1:] < snr[:-1]).all()
    assert (snr >= 0).all() and torch.isfinite(snr).all()


@pytest.mark.parametrize("scheduler", [EDMEulerScheduler(), ScoreSdeVeScheduler(), object()])
def test_scheduler_without_noise_schedule_raises(scheduler):
    with pytest.raises(ValueError, match="alphas_cumprod.*FlowMatchEulerDiscreteScheduler"):
        schedule_snr(scheduler)
    with pytest.raises(ValueError, match="supported"):
        add_noise(scheduler, torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="supported"):
        training_target(scheduler, torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 1]))


def test_snr_at_matches_compute_snr_on_t_device_and_dtype():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear")
    t = torch.tensor([0, 17, 500, 999])
    out = snr_at(scheduler, t)
    assert out.dtype == torch.float32 and out.device == t.device and out.shape == (4,)
    # compute_snr's 8u, plus the float64 SNR's rounding to float32
    torch.testing.assert_close(out, compute_snr(scheduler, t), rtol=COMPUTE_SNR_RTOL + U32, atol=0)


# ---------------------------------------------------------------- noising and targets


def _inputs(B=4, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)


def test_ddpm_add_noise_and_targets_hand_computed():
    x0, noise = _inputs()
    t = torch.tensor([0, 1, 2, 3])
    sa = torch.tensor([math.sqrt(a) for a in hand_alpha_bar(BETAS)]).view(4, 1, 1, 1)
    s1a = torch.tensor([math.sqrt(1 - a) for a in hand_alpha_bar(BETAS)]).view(4, 1, 1, 1)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(num_train_timesteps=4, trained_betas=BETAS, prediction_type=prediction_type)
        torch.testing.assert_close(add_noise(scheduler, x0, noise, t), sa * x0 + s1a * noise)
        expected = {"epsilon": noise, "v_prediction": sa * noise - s1a * x0, "sample": x0}
        # default: the scheduler's own prediction_type
        torch.testing.assert_close(training_target(scheduler, x0, noise, t), expected[prediction_type])
        for other, value in expected.items():
            torch.testing.assert_close(training_target(scheduler, x0, noise, t, prediction_type=other), value)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_every_ddpm_family_scheduler_noises_like_ddpm(scheduler_cls):
    # Euler's / DPM-Solver's own add_noise index inference sigmas and (Euler) skip the sqrt(alpha_bar)
    # scaling; training must use the variance-preserving forward process for all of them.
    x0, noise = _inputs()
    t = torch.tensor([3, 250, 600, 999])
    scheduler = scheduler_cls(beta_schedule="scaled_linear")
    ddpm = DDPMScheduler(beta_schedule="scaled_linear")
    torch.testing.assert_close(add_noise(scheduler, x0, noise, t), ddpm.add_noise(x0, noise, t))
    torch.testing.assert_close(
        training_target(scheduler, x0, noise, t, "v_prediction"), ddpm.get_velocity(x0, noise, t)
    )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_noising_targets_and_model_timesteps(shift):
    T = 10
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    x0, noise = _inputs()
    t = torch.tensor([0, 3, 8, 9])
    s = torch.tensor([hand_flow_sigma(int(i), T, shift) for i in t]).view(4, 1, 1, 1)
    torch.testing.assert_close(add_noise(scheduler, x0, noise, t), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(training_target(scheduler, x0, noise, t), noise - x0)
    torch.testing.assert_close(training_target(scheduler, x0, noise, t, "flow"), noise - x0)
    torch.testing.assert_close(training_target(scheduler, x0, noise, t, "epsilon"), noise)
    torch.testing.assert_close(training_target(scheduler, x0, noise, t, "sample"), x0)
    # the model is called with sigma * T, i.e. what the SD3 script reads from scheduler.timesteps
    # (whose index 0 is the noisiest)
    mt = model_timesteps(scheduler, t)
    torch.testing.assert_close(mt, s.flatten() * T)
    torch.testing.assert_close(mt, scheduler.timesteps[T - 1 - t])
    # and diffusers' own flow noising agrees when called with those timesteps
    torch.testing.assert_close(add_noise(scheduler, x0, noise, t), scheduler.scale_noise(x0, mt, noise))


def test_ddpm_model_timesteps_are_t():
    t = torch.tensor([0, 5, 999])
    assert torch.equal(model_timesteps(DDPMScheduler(), t), t)


def test_unknown_prediction_type_lists_valid_ones():
    x0, noise = _inputs()
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        training_target(DDPMScheduler(), x0, noise, t, prediction_type="eps")
    with pytest.raises(ValueError, match="flow"):
        training_target(DDPMScheduler(), x0, noise, t, prediction_type="flow")
    with pytest.raises(ValueError, match="flow, epsilon, sample"):
        training_target(FlowMatchEulerDiscreteScheduler(), x0, noise, t, prediction_type="v_prediction")
    assert set(PREDICTION_TYPES) == {"epsilon", "v_prediction", "sample", "flow"}


def test_bad_timesteps_raise():
    x0, noise = _inputs()
    with pytest.raises(ValueError, match="integer"):
        add_noise(DDPMScheduler(), x0, noise, torch.tensor([0.5, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        add_noise(DDPMScheduler(), x0, noise, torch.tensor([0, 1, 2, 1000]))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        model_timesteps(FlowMatchEulerDiscreteScheduler(num_train_timesteps=10), torch.tensor([-1]))


def test_resolve_prediction_type():
    assert resolve_prediction_type(DDPMScheduler(prediction_type="v_prediction")) == "v_prediction"
    assert resolve_prediction_type(DDPMScheduler(), "sample") == "sample"
    # flow-matching configs have no prediction_type: the default is the velocity, not epsilon
    assert resolve_prediction_type(FlowMatchEulerDiscreteScheduler()) == "flow"
    with pytest.raises(ValueError, match="use one of epsilon, v_prediction, sample"):
        resolve_prediction_type(DDPMScheduler(), "x0")


def test_per_index_tables_reach_a_device_without_float64_as_float32(monkeypatch):
    """MPS (Apple Silicon) has no float64: moving the float64 SNR / sigma tables there raised at the first
    training step. `_table_on` moves them as float32 there, and leaves every other device as it was. (No MPS
    here: the move is checked on the dtype it asks for, through a stand-in for Tensor.to on an "mps" device.)"""
    from diffusers_ant import schedule

    table = torch.linspace(0, 1, 5, dtype=torch.float64)
    assert schedule._table_on(table, torch.device("cpu")).dtype == torch.float64
    asked = []
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "mps":
            asked.append(args[1] if len(args) > 1 else kwargs.get("dtype"))
            return original(self, "cpu", *args[1:], **kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    moved = schedule._table_on(table, torch.device("mps"))
    assert asked == [torch.float32] and moved.dtype == torch.float32
