"""Per-sample losses, timestep loss weights (vs diffusers' example scripts) and task reduction."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3, compute_snr

from diffusers_ant.losses import (
    LOSS_WEIGHTINGS,
    epsilon_error_ratio,
    flow_matching_loss_weights,
    per_sample_loss,
    reduce_task_losses,
    timestep_loss_weights,
)
from diffusers_ant.schedule import add_noise, schedule_snr, snr_at, training_target
from tolerances import sum_reordering_tolerance, unit_roundoff

U32, U64 = unit_roundoff(torch.float32), unit_roundoff(torch.float64)
# snr_at against diffusers' compute_snr: float32 SNRs of one float32 alpha_bar, within 9u of each other
# (tests/test_schedule.py: compute_snr's 8u, the float32 cast's u). min(snr, gamma) / snr (or / (snr + 1))
# changes by at most that relative error of the SNR (|d ln w / d ln snr| <= 1) and rounds at most twice more
# on each side. The other prediction type's denominator (snr against snr + 1) is 1 / (snr + 1) >= 1e-4 away.
MIN_SNR_RTOL = 9 * U32 + 4 * U32


def weighted_mse_rounding(weight, residual, magnitude, operations=8):
    """How far two float64 evaluations of one weighted loss w mean(r^2) may differ, per sample: each entry
    of the residual r is formed by at most `operations` roundings (u each) of terms up to `magnitude`, which
    moves w mean(r^2) by 2 w rms(r) operations u magnitude at most; the mean of n squares (2 gamma_n,
    tests/tolerances.py) and the weight's own operations add a relative error."""
    rms = residual.flatten(1).pow(2).mean(1).sqrt()
    loss = weight * rms**2
    relative = sum_reordering_tolerance(residual[0].numel(), 1.0, torch.float64) + operations * U64
    return 2 * weight * rms * operations * U64 * magnitude + relative * loss


def script_min_snr_weights(noise_scheduler, timesteps, snr_gamma, prediction_type):
    """Verbatim from diffusers/examples/text_to_image/train_text_to_image.py (Min-SNR branch)."""
    snr = compute_snr(noise_scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    return mse_loss_weights


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [1.0, 5.0])
def test_min_snr_equals_diffusers_example_script(beta_schedule, prediction_type, snr_gamma):
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    timesteps = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))
    expected = script_min_snr_weights(scheduler, timesteps, snr_gamma, prediction_type)
    # fed diffusers' own SNR, the weights are bit-identical
    same_snr = timestep_loss_weights("min_snr", compute_snr(scheduler, timesteps), prediction_type, snr_gamma)
    assert torch.equal(same_snr, expected)
    # through this package's SNR (float64 schedule, cast to float32): equal to float32 rounding (MIN_SNR_RTOL,
    # 13u = 8e-7; measured 4.8u)
    ours = timestep_loss_weights("min_snr", snr_at(scheduler, timesteps), prediction_type, snr_gamma)
    torch.testing.assert_close(ours, expected, rtol=MIN_SNR_RTOL, atol=0)
    # and the clipping really happened on both sides of gamma
    snr = compute_snr(scheduler, timesteps)
    assert (snr > snr_gamma).any() and (snr < snr_gamma).any()


def test_min_snr_weighted_loss_equals_script_loss():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(2)
    model_pred, target = torch.randn(8, 4, 5, 5, generator=g), torch.randn(8, 4, 5, 5, generator=g)
    timesteps = torch.randint(0, 1000, (8,), generator=g)
    # the script: per-sample mean over non-batch dims, times the weights, mean over the batch
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * script_min_snr_weights(scheduler, timesteps, 5.0, "epsilon")
    expected = loss.mean()
    ours = (per_sample_loss(model_pred, target) * timestep_loss_weights("min_snr", snr_at(scheduler, timesteps))).mean()
    # float32: the two per-sample means of 100 squares and the batch mean of 8 positive terms may be summed in
    # other orders (2 gamma_n each), the weights differ by MIN_SNR_RTOL, the products round once (measured: 0,
    # the same kernels; unclipped weights would move the loss by tens of percent)
    rtol = sum_reordering_tolerance(100, 1.0) + sum_reordering_tolerance(8, 1.0) + MIN_SNR_RTOL + U32
    torch.testing.assert_close(ours, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_min_snr_is_min_snr_gamma_on_the_x0_error(prediction_type):
    """Hang et al.: the weight makes the loss equal min(SNR, gamma) * ||x0_hat - x0||^2, whatever the prediction."""
    gamma = 5.0
    if prediction_type == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        scheduler = DDPMScheduler(beta_schedule="linear", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 998, (16,), generator=g)  # stay off the flow endpoint where SNR = 0
    x_t = add_noise(scheduler, x0, noise, t)
    target = training_target(scheduler, x0, noise, t)
    pred = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    snr = schedule_snr(scheduler)[t]
    # recover x0_hat from the prediction by inverting x_t's formula
    if prediction_type == "flow":
        s = (1 / (1 + snr.sqrt())).view(-1, 1, 1, 1)  # sigma from the SNR
        x0_hat = x_t - s * pred
    else:
        a = (snr / (1 + snr)).view(-1, 1, 1, 1)  # alpha_bar from the SNR
        x0_hat = {
            "epsilon": (x_t - (1 - a).sqrt() * pred) / a.sqrt(),
            "v_prediction": a.sqrt() * x_t - (1 - a).sqrt() * pred,
            "sample": pred,
        }[prediction_type]
    x0_loss = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=gamma)
    weighted = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * timestep_loss_weights("min_snr", snr, prediction_type, gamma)
    # float64 rounding: x0_hat's entries come from a handful of operations on terms up to `magnitude`; 1 - a,
    # recovered from the SNR, cancels to sqrt(1 + SNR) times its rounding in its square root. Measured: 1/18 of
    # the bound or less (the bound: 2e-11 relative or less); another prediction type's weight is off by
    # 1 / SNR >= 3e-3 here.
    magnitude = torch.stack([x_t, x0, pred, x0_hat]).abs().amax(dim=(0, 2, 3, 4)) * (1 + snr).sqrt()
    tolerance = weighted_mse_rounding(torch.clamp(snr, max=gamma), x0_hat - x0, magnitude)
    assert ((weighted - x0_loss).abs() <= tolerance).all()


# (scheduler, prediction type): both families, every prediction type each admits, zero-SNR endpoints included
EQUIVALENCE_CASES = {
    "ddpm-epsilon": (lambda: DDPMScheduler(beta_schedule="linear"), "epsilon"),
    "ddpm-v": (lambda: DDPMScheduler(beta_schedule="scaled_linear"), "v_prediction"),
    "ddpm-sample": (lambda: DDPMScheduler(beta_schedule="squaredcos_cap_v2"), "sample"),
    "zero-snr-v": (lambda: DDPMScheduler(rescale_betas_zero_snr=True), "v_prediction"),
    "zero-snr-sample": (lambda: DDPMScheduler(rescale_betas_zero_snr=True), "sample"),
    "flow": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "flow"),
    "flow-sample": (lambda: FlowMatchEulerDiscreteScheduler(), "sample"),
    "flow-epsilon": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "epsilon"),
}


@pytest.mark.parametrize("name", ["p2", "debiased", "min_snr"])
@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_weighted_loss_equals_epsilon_space_loss_of_the_equivalent_epsilon_prediction(case, name):
    """For random x0, noise and prediction: w(pred space) * ||pred - target||^2 == w(eps) * ||eps_hat - eps||^2,
    where eps_hat is the epsilon prediction implying the same x0_hat (inverted by hand from alpha_bar / sigma)."""
    make, prediction_type = EQUIVALENCE_CASES[case]
    scheduler = make()
    T = scheduler.config.num_train_timesteps
    g = torch.Generator().manual_seed(7)
    shape = (24, 3, 4, 4)
    x0, noise, pred = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.cat([torch.randint(0, T, (21,), generator=g), torch.tensor([0, T // 2, T - 1])])  # both ends
    view = (-1, 1, 1, 1)
    if prediction_type == "flow" or isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        s = torch.sort(scheduler.sigmas.double()).values[t].view(view)  # training sigma, index 0 cleanest
        alpha, sigma = 1 - s, s
    else:
        a = scheduler.alphas_cumprod.double()[t].view(view)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
    x_t = alpha * x0 + sigma * noise
    target = training_target(scheduler, x0, noise, t, prediction_type)
    eps_hat = {
        "epsilon": lambda: pred,
        "sample": lambda: (x_t - alpha * pred) / sigma,  # eps implied by x0_hat = pred
        "v_prediction": lambda: alpha * pred + sigma * x_t,  # eps = alpha v + sigma x_t (alpha^2 + sigma^2 = 1)
        "flow": lambda: x_t + alpha * pred,  # eps = x_t + (1 - s) u
    }[prediction_type]()
    snr = (alpha / sigma).flatten() ** 2
    assert (snr == 0).sum() >= (1 if case.startswith(("zero", "flow")) else 0)  # the SNR = 0 end is tested
    mse = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    in_prediction_space = timestep_loss_weights(name, snr, prediction_type) * mse(pred, target)
    epsilon_weight = timestep_loss_weights(name, snr, "epsilon")
    in_epsilon_space = epsilon_weight * mse(eps_hat, noise)
    # float64 rounding of eps_hat's few operations on terms up to `magnitude` (weighted_mse_rounding); exact 0 at
    # SNR = 0 on both sides. Measured: 1/30 of the bound or less; a weight converted for another prediction type
    # is off by 1 / SNR >= 1e-4 relative, 1e6 x the bound's 8e-11 or less.
    magnitude = torch.stack([x_t, x0, noise, pred, eps_hat]).abs().amax(dim=(0, 2, 3, 4))
    tolerance = weighted_mse_rounding(epsilon_weight, eps_hat - noise, magnitude)
    assert ((in_prediction_space - in_epsilon_space).abs() <= tolerance).all()
    assert torch.isfinite(in_prediction_space).all()


def test_epsilon_error_ratio_hand_computed():
    snr = torch.tensor([0.0, 0.25, 1.0, 4.0])
    torch.testing.assert_close(epsilon_error_ratio(snr, "epsilon"), torch.ones(4))
    torch.testing.assert_close(epsilon_error_ratio(snr, "sample"), snr)
    torch.testing.assert_close(epsilon_error_ratio(snr, "v_prediction"), torch.tensor([0.0, 0.2, 0.5, 0.8]))
    torch.testing.assert_close(epsilon_error_ratio(snr, "flow"), torch.tensor([0.0, 0.25 / 2.25, 0.25, 4 / 9]))
    # P2 with k = 1 on a v-prediction loss: snr / (snr + 1)^2, not the epsilon weight 1 / (snr + 1)
    torch.testing.assert_close(timestep_loss_weights("p2", snr, "v_prediction"), snr / (snr + 1) ** 2)
    # debiased for flow matching is s (1 - s): snr = 4 is s = 1/3
    assert timestep_loss_weights("debiased", torch.tensor([4.0]), "flow").item() == pytest.approx(2 / 9)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "logit_normal", "mode", "none"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_loss_weights_equal_diffusers(scheme, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    T = scheduler.config.num_train_timesteps
    t = torch.cat([torch.randint(0, T, (60,), generator=torch.Generator().manual_seed(8)), torch.tensor([0, T - 1])])
    # the SD3 script: sigmas of noise_scheduler_copy, indexed from the noisiest (this project's T - 1 - t)
    expected = compute_loss_weighting_for_sd3(scheme, sigmas=scheduler.sigmas[T - 1 - t])
    ours = flow_matching_loss_weights(scheduler, t, scheme)
    assert ours.shape == (62,) and ours.dtype == torch.float32
    assert torch.equal(ours, expected.float())
    s = (t.double() + 1) / T  # unshifted sigma of index t (0 cleanest): (t + 1) / T; check the formula independently
    s = shift * s / (1 + (shift - 1) * s)
    hand = {"sigma_sqrt": s**-2, "cosmap": 2 / (torch.pi * (1 - 2 * s + 2 * s**2))}.get(scheme, torch.ones_like(s))
    # diffusers' float32 sigma is within 5u of s (tests/test_schedule.py); sigma^-2 doubles that and rounds
    # twice; cosmap's 1 - 2s + 2s^2 (>= 1/2) rounds to 7u, its log-derivative in s is at most 2, pi, the
    # product and the quotient round once each. Measured: 4u or less; the neighbouring index's weight differs
    # by 30 x the bound or more.
    rtol = {"sigma_sqrt": 2 * 5 * U32 + 2 * U32, "cosmap": 7 * U32 + 2 * 5 * U32 + 3 * U32}.get(scheme, 0)
    torch.testing.assert_close(ours.double(), hand, rtol=rtol, atol=0)


def test_flow_matching_loss_weights_refuse_other_schedulers():
    t = torch.arange(4)
    with pytest.raises(ValueError, match="not a flow-matching scheduler.*--noise_scheduler flow_match"):
        flow_matching_loss_weights(DDPMScheduler(), t, "sigma_sqrt")
    with pytest.raises(ValueError, match="sigma_sqrt, logit_normal, mode, cosmap"):
        flow_matching_loss_weights(FlowMatchEulerDiscreteScheduler(), t, "logit")
    assert torch.equal(flow_matching_loss_weights(DDPMScheduler(), t, "none"), torch.ones(4))


def test_weights_hand_computed():
    snr = torch.tensor([0.25, 1.0, 4.0, 9.0])
    torch.testing.assert_close(timestep_loss_weights("none", snr), torch.ones(4))
    torch.testing.assert_close(timestep_loss_weights("min_snr", snr, "sample", snr_gamma=2.0), torch.tensor([0.25, 1.0, 2.0, 2.0]))
    torch.testing.assert_close(
        timestep_loss_weights("min_snr", snr, "flow", snr_gamma=2.0), torch.tensor([0.25 / 2.25, 1 / 4, 2 / 9, 2 / 16])
    )
    torch.testing.assert_close(timestep_loss_weights("p2", snr), torch.tensor([1 / 1.25, 1 / 2, 1 / 5, 1 / 10]))
    torch.testing.assert_close(
        timestep_loss_weights("p2", snr, p2_k=2.0, p2_gamma=0.5), torch.tensor([2.25, 3.0, 6.0, 11.0]).rsqrt()
    )
    torch.testing.assert_close(timestep_loss_weights("debiased", snr), torch.tensor([2.0, 1.0, 0.5, 1 / 3]))
    torch.testing.assert_close(timestep_loss_weights("debiased", snr, debiased_max=1.5), torch.tensor([1.5, 1.0, 0.5, 1 / 3]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_zero_snr_gives_finite_weights(prediction_type):
    # the flow-matching endpoint and zero-terminal-SNR DDPM schedules have SNR = 0
    snr = torch.tensor([0.0, 1e-3, 10.0])
    expected_at_zero = {
        "none": 1.0,
        "min_snr": 1.0 if prediction_type == "epsilon" else 0.0,  # epsilon: the limit of min(snr, g) / snr
        # epsilon-space weights converted to another space vanish where SNR = 0 (the ratio is 0)
        "p2": 1.0 if prediction_type == "epsilon" else 0.0,
        "debiased": 1000.0 if prediction_type == "epsilon" else 0.0,
    }
    for name in LOSS_WEIGHTINGS:
        w = timestep_loss_weights(name, snr, prediction_type)
        assert torch.isfinite(w).all(), name
        assert w[0].item() == pytest.approx(expected_at_zero[name]), name
    flow = FlowMatchEulerDiscreteScheduler()
    w = timestep_loss_weights("debiased", snr_at(flow, torch.arange(1000)))
    assert w[-1] == 1000.0 and w[-2].item() == pytest.approx(999.0, rel=1e-3)


def test_bad_weighting_arguments_raise():
    snr = torch.ones(3)
    with pytest.raises(ValueError, match="none, min_snr, p2, debiased"):
        timestep_loss_weights("minsnr", snr)
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample, flow"):
        timestep_loss_weights("min_snr", snr, prediction_type="eps")
    with pytest.raises(ValueError, match="snr_gamma"):
        timestep_loss_weights("min_snr", snr, snr_gamma=0)
    with pytest.raises(ValueError, match="p2_k"):
        timestep_loss_weights("p2", snr, p2_k=0)
    with pytest.raises(ValueError, match="debiased_max"):
        timestep_loss_weights("debiased", snr, debiased_max=-1)
    with pytest.raises(ValueError, match="snr_at"):
        timestep_loss_weights("p2", torch.tensor([1, 2]))


# ---------------------------------------------------------------- per-sample loss


def test_per_sample_loss_shapes_types_and_values():
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    diff = pred - target
    l2 = per_sample_loss(pred, target)
    assert l2.shape == (5,) and l2.dtype == torch.float32
    torch.testing.assert_close(l2, (diff**2).flatten(1).mean(1))
    torch.testing.assert_close(per_sample_loss(pred, target, "l1"), diff.abs().flatten(1).mean(1))
    huber = torch.where(diff.abs() < 0.5, 0.5 * diff**2, 0.5 * (diff.abs() - 0.25))
    torch.testing.assert_close(per_sample_loss(pred, target, "huber", huber_delta=0.5), huber.flatten(1).mean(1))
    # half-precision inputs are reduced in float32
    half = per_sample_loss(pred.bfloat16(), target.bfloat16())
    assert half.dtype == torch.float32
    # what storing the inputs in bf16 alone changes: each entry by e = u_bf16 (|pred| + |target|) at most, so
    # the difference d by e and its square by 2 |d| e + e^2 (float32's own rounding is 6e4 x smaller). A bf16
    # reduction is not separable by value (it errs by as much): the dtype above is what checks it.
    e = unit_roundoff(torch.bfloat16) * (pred.abs() + target.abs())
    assert ((half - l2).abs() <= (2 * diff.abs() * e + e**2).flatten(1).mean(1)).all()
    # a gradient reaches the prediction
    pred.requires_grad_(True)
    per_sample_loss(pred, target).sum().backward()
    torch.testing.assert_close(pred.grad, 2 * diff / 18)


def test_per_sample_loss_bad_input():
    with pytest.raises(ValueError, match="l2, l1, huber"):
        per_sample_loss(torch.zeros(2, 3), torch.zeros(2, 3), "mse2")
    with pytest.raises(ValueError, match="same shape"):
        per_sample_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- task reduction


def test_reduce_task_losses_with_empty_tasks_and_gradients():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], requires_grad=True)
    task_ids = torch.tensor([0, 2, 0, 2, 4])
    losses, counts = reduce_task_losses(per_sample, task_ids, num_tasks=5)
    torch.testing.assert_close(losses, torch.tensor([2.0, 0.0, 3.0, 0.0, 10.0]))
    assert counts.dtype == torch.long and counts.tolist() == [2, 0, 2, 0, 1]
    present = counts > 0
    assert present.tolist() == [True, False, True, False, True]
    # gradient of task i's loss reaches exactly its samples with weight 1 / count
    (losses * torch.tensor([1.0, 7.0, 10.0, 7.0, 100.0])).sum().backward()
    torch.testing.assert_close(per_sample.grad, torch.tensor([0.5, 5.0, 0.5, 5.0, 100.0]))


def test_reduce_task_losses_matches_a_loop():
    g = torch.Generator().manual_seed(5)
    per_sample = torch.rand(37, generator=g)
    task_ids = torch.randint(0, 6, (37,), generator=g)
    losses, counts = reduce_task_losses(per_sample, task_ids, 6)
    for k in range(6):
        mask = task_ids == k
        assert counts[k] == mask.sum()
        expected = per_sample[mask].mean() if mask.any() else torch.tensor(0.0)
        torch.testing.assert_close(losses[k], expected)


def test_reduce_task_losses_bad_input():
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 2\]"):
        reduce_task_losses(torch.ones(3), torch.tensor([0, 1, 3]), 3)
    with pytest.raises(ValueError, match="per_sample_loss"):
        reduce_task_losses(torch.ones(3, 2), torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="num_tasks"):
        reduce_task_losses(torch.ones(3), torch.tensor([0, 0, 0]), 0)
    with pytest.raises(ValueError, match="integer"):
        reduce_task_losses(torch.ones(3), torch.tensor([0.0, 1.0, 1.0]), 3)
