"""`--mtl_method uw+pcgrad` (ANT's combined configuration): a loss-based method's coefficients scale the
task losses, a gradient-based method combines the scaled task gradients (diffusers_ant/weighting/combined.py).

Tolerances: the combined weighting forms the Gram matrix of the scaled gradients as D (G G^T) D, the method
alone as (D G)(D G)^T; the two differ by float64 rounding, which each method carries into its weights in
its own way (`weights_rtol`). An update's error is then at most the weights' error (relative to the largest
weight) times max_j sum_i |c_i g_ij| (`update_scale`)."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_ant.weighting import get_weighting
from diffusers_ant.weighting.combined import CombinedWeighting
from diffusers_ant.weighting.engine import TaskGradientEngine

from test_engine import K, flat_grad, loss_fn_for, make_batch, reference_task_grads, tiny_unet
from test_weighting_methods import nash_alpha_rtol
from tolerances import gamma, gradient_tolerance, unit_roundoff

U32, U64 = unit_roundoff(torch.float32), unit_roundoff(torch.float64)
SLSQP_FTOL = 1e-12  # cagrad_weights' stopping tolerance on its dual objective (diffusers_ant/weighting/cagrad.py)


def weights_rtol(method, grads):
    """How far, relative to the largest weight, `method`'s weights on two Gram matrices of `grads` that differ
    only in float64 rounding may lie apart:
    * PCGrad, IMTL-G, MGDA (an active-set NNLS that terminates at its exact solution) are closed forms: the
      Gram's P-term sums, a K x K solve's K^3 operations and the update's K, each side, amplified at most by
      the Gram's condition number (at most 550 here);
    * Nash-MTL stops at residual `tol` on each side (`nash_alpha_rtol`);
    * CAGrad's SLSQP stops at SLSQP_FTOL on its dual objective, whose curvature is of order one on the Gram
      scaled to unit mean diagonal: each solution within sqrt(ftol) of the optimum."""
    k, p = grads.shape
    rounding = 2 * (p + k**3 + k) * U64 * float(torch.linalg.cond(grads @ grads.T))
    if method == "nash_mtl":
        tol = get_weighting("nash_mtl", k).config.tol
        return nash_alpha_rtol(k, tol, tol) + rounding
    if method == "cagrad":
        return 2 * math.sqrt(SLSQP_FTOL) + rounding
    return rounding


def update_scale(weights, scaled_grads):
    """max |w| x max_j sum_i |c_i g_ij|: what an error of the weights relative to the largest one multiplies."""
    return float(weights.abs().max()) * float(scaled_grads.abs().sum(0).max())


def _random_grads(seed, k=K, p=40):
    g = torch.Generator().manual_seed(seed)
    # rows of very different norms and some conflicts: PCGrad projects, UW's scales matter
    return torch.randn(k, p, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2, 1.5][:k], dtype=torch.float64)[:, None]


@pytest.mark.parametrize("gradient", ["pcgrad", "nash_mtl", "imtl", "mgda", "cagrad"])
@pytest.mark.parametrize("loss", ["uw", "ls", "rlw"])
def test_combined_update_is_the_gradient_method_on_the_scaled_gradients(loss, gradient):
    """update = gradient_method(c_i g_i), with c the loss method's coefficients, and w_i = c_i w'_i."""
    grads = _random_grads(0)
    combined = get_weighting(f"{loss}+{gradient}", K, seed=3)
    assert isinstance(combined, CombinedWeighting) and combined.name == f"{loss}+{gradient}"
    alone_loss = get_weighting(loss, K, seed=3)
    # inside a combined weighting PCGrad sums (ANT's /K is carried by the loss coefficients)
    alone_gradient = get_weighting(gradient, K, seed=3, **({"reduction": "sum"} if gradient == "pcgrad" else {}))
    if loss == "uw":  # log-variances as after some training: unequal coefficients
        for w in (combined.loss_weighting, alone_loss):
            w.log_vars.data = torch.tensor([0.0, 1.0, -0.5, 0.3])
    c = alone_loss.loss_coefficients()
    assert not torch.allclose(c, torch.full_like(c, c[0])) or loss == "ls"  # RLW / UW: unequal coefficients

    update = combined.aggregate(grads)
    expected = alone_gradient.aggregate(c[:, None] * grads)
    # float64 throughout, to the method's rounding or its solver's tolerance (module docstring; measured 3e-14
    # of the scale or less; the method on the unscaled gradients is 0.08 to 2 x the scale away, Nash-MTL aside,
    # which the coefficients do not change: the weights below are what shows them there)
    rtol = weights_rtol(gradient, c[:, None] * grads)
    assert (update - expected).abs().max() <= rtol * update_scale(alone_gradient.last_weights, c[:, None] * grads)
    # last_weights are float32: c times the float32 w' rounds again on one side, c w' once on the other, so 3u
    # relative (measured 1.7u); without c they would be off by the factors c_i (0.18 to 0.82 for UW)
    expected_weights = (c * alone_gradient.last_weights.double()).to(combined.last_weights.dtype).double()
    torch.testing.assert_close(combined.last_weights.double(), expected_weights, rtol=3 * U32,
                               atol=rtol * float(expected_weights.abs().max()))


@pytest.mark.parametrize("gradient, options, same_update", [
    ("nash_mtl", {}, True), ("mgda", {"mgda.normalize": "l2"}, True), ("imtl", {}, False), ("pcgrad", {}, None),
    ("mgda", {}, None), ("cagrad", {}, None)])
def test_a_gradient_method_blind_to_task_scales_is_named_when_combined(gradient, options, same_update, caplog):
    """With Nash-MTL or unit-norm MGDA, UW's coefficients cancel (the same update as the method alone); with
    IMTL-G only the update's length changes. The run says so at the start; other pairs say nothing."""
    import logging

    grads = _random_grads(1)
    with caplog.at_level(logging.WARNING, logger="diffusers_ant.weighting.combined"):
        combined = get_weighting(f"uw+{gradient}", K, seed=3, **options)
    combined.loss_weighting.log_vars.data = torch.tensor([0.0, 1.0, -0.5, 0.3])
    alone = get_weighting(gradient, K, seed=3, **{k.split(".", 1)[1]: v for k, v in options.items()},
                          **({"reduction": "sum"} if gradient == "pcgrad" else {}))
    update, update_alone = combined.aggregate(grads), alone.aggregate(grads)
    cosine = float(update @ update_alone / (update.norm() * update_alone.norm()))
    if same_update is None:
        assert not caplog.text
        assert cosine < 0.999  # UW's coefficients turn the update
    else:
        assert f"uw+{gradient}" in caplog.text
        # the same direction, to the solvers' tolerance: each update within rel = sqrt(P) x its entries' bound
        # (module docstring) of its exact direction, so 1 - cos <= (2 rel)^2 / 2, plus the cosine's own float64
        # rounding (three P-term dot products)
        p = grads.shape[1]
        rel = math.sqrt(p) * weights_rtol(gradient, grads) * update_scale(alone.last_weights, grads)
        rel /= float(update_alone.norm())
        assert 1 - cosine <= 2 * rel**2 + 3 * 2 * gamma(p, torch.float64), (1 - cosine, rel)
        if same_update:  # the solver's tolerance or the closed form's rounding (module docstring; measured 2e-14)
            atol = weights_rtol(gradient, grads) * update_scale(alone.last_weights, grads)
            torch.testing.assert_close(update, update_alone, rtol=0, atol=atol)
        else:
            assert "length" in caplog.text and not torch.allclose(update.norm(), update_alone.norm())


def test_order_of_the_name_does_not_matter_and_bad_pairs_name_the_fix():
    assert get_weighting("pcgrad+uw", K).name == "uw+pcgrad"
    for bad, words in [("uw+dwa", "two loss-based"), ("pcgrad+mgda", "two gradient-based"),
                       ("uw+nope", "unknown weighting 'nope'"), ("uw+pcgrad+ls", "exactly one")]:
        with pytest.raises(ValueError, match=words):
            get_weighting(bad, K)
    with pytest.raises(ValueError, match="valid options: seed, uw.divide_losses_by_num_tasks"):
        get_weighting("uw+pcgrad", K, nope=1)


def test_options_reach_their_part_and_the_seed_reaches_both():
    w = get_weighting("uw+pcgrad", K, seed=9, lr="0.5", **{"pcgrad.reduction": "sum", "uw.init_log_var": 0.25})
    assert w.loss_weighting.config.lr == 0.5 and w.loss_weighting.config.init_log_var == 0.25
    assert w.gradient_weighting.config.reduction == "sum"
    assert w.loss_weighting.config.seed == 9 == w.gradient_weighting.config.seed
    # the UW group keeps ANT's constant learning rate (the trainer exempts it from the LR schedule)
    (group,) = w.param_groups()
    assert group["lr"] == 0.5 and group["constant_lr"] and group["params"][0] is w.loss_weighting.log_vars
    rebuilt = get_weighting(**w.spec())
    assert rebuilt.config == w.config


def test_engine_trains_uw_log_variances_with_uws_own_objective():
    """Through the engine: the model gets sum_i c_i w'_i g_i, UW's s_i get the gradient of
    sum_i 0.5 (exp(-s_i) L_i / K + s_i) on the step's detached task losses (ANT's form)."""
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch(batch_size=16, seed=5)
    weighting = get_weighting("uw+pcgrad", K, seed=1, init_log_var=0.3, divide_losses_by_num_tasks=True)
    engine = TaskGradientEngine(params)
    stats = engine.backward(weighting, loss_fn_for(model, batch), batch[-1], K)

    present = stats["counts"] > 0
    s = torch.full((K,), 0.3)
    c = 0.5 * torch.exp(-s) / K
    task_grads = reference_task_grads(model, batch, params)
    pcgrad = get_weighting("pcgrad", K, seed=1, reduction="sum")
    expected = pcgrad.aggregate(c[:, None] * task_grads, present)
    scale = expected.abs().max()
    assert scale > 1e-4
    # float32 task gradients by two routes, combined by the same weights: they differ by rounding alone, the
    # written update being itself the gradient of the weighted loss (tests/test_batched_engine.py): 1.7e-3 of
    # max |update| (measured: 1.3e-7 max |update|; UW's coefficients left out would move it by 26 %)
    x = batch[0]
    tolerance = gradient_tolerance(model, expected, summed_terms=x.shape[0] * x[0, 0].numel())
    assert (flat_grad(params) - expected).abs().max() <= tolerance

    losses = stats["task_losses"].double()
    expected_s_grad = torch.where(present, 0.5 * (1 - torch.exp(-s.double()) * losses / K), torch.zeros((), dtype=torch.float64))
    # autograd in float32 on the same float32 s and losses: exp(-s) within 2u, the product, the quotient and
    # 1 - x round once each, x = exp(-s) L / K: 0.5 (4 x + 1) u (measured: a quarter of it or less; without the
    # / K the gradient moves by 0.3)
    x = torch.exp(-s.double()) * losses / K
    atol = 0.5 * (4 * x + 1) * U32
    assert ((weighting.loss_weighting.log_vars.grad.double() - expected_s_grad).abs() <= atol).all()


def test_nash_mtl_reuse_steps_take_this_steps_uw_coefficients():
    model = tiny_unet()
    params = list(model.parameters())
    weighting = get_weighting("uw+nash_mtl", K, update_every=2, lr=0.5)
    engine = TaskGradientEngine(params)
    first, second = make_batch(seed=21), make_batch(seed=22)
    engine.backward(weighting, loss_fn_for(model, first), first[-1], K)  # solve
    alpha = weighting.gradient_weighting.alpha.clone()
    with torch.no_grad():  # UW's optimizer step
        weighting.loss_weighting.log_vars -= 0.5 * weighting.loss_weighting.log_vars.grad
    weighting.loss_weighting.log_vars.grad = None
    model.zero_grad(set_to_none=True)
    before = engine.num_task_backward_calls
    stats = engine.backward(weighting, loss_fn_for(model, second), second[-1], K)  # reuse alpha
    assert engine.num_task_backward_calls == before
    c = weighting.loss_weighting.loss_coefficients()
    present = torch.bincount(second[-1], minlength=K) > 0
    expected = torch.where(present, (c * alpha.double()), torch.zeros((), dtype=torch.float64)).float()
    assert not torch.allclose(c, torch.full_like(c, 0.5))  # the log-variances moved since the solve
    torch.testing.assert_close(stats["weights"], expected)
    assert weighting.loss_weighting.log_vars.grad is not None  # UW trained on the reuse step too


def test_state_round_trips_through_safetensors(tmp_path):
    w = get_weighting("uw+nash_mtl", K, seed=4, update_every=3)
    w.aggregate(_random_grads(1).float())
    with torch.no_grad():
        w.loss_weighting.log_vars += 0.5
    save_file(w.flat_state_dict(), tmp_path / "w.safetensors")
    fresh = get_weighting("uw+nash_mtl", K, seed=4, update_every=3)
    fresh.load_flat_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(fresh.loss_weighting.log_vars, w.loss_weighting.log_vars)
    assert torch.equal(fresh.gradient_weighting.alpha, w.gradient_weighting.alpha)
    assert fresh.gradient_weighting.step == w.gradient_weighting.step == 1



def test_at_uws_optimum_the_update_is_ant_references_scale():
    """ANT's reference: UW as 0.5 (exp(-s_i) L_i / K + s_i), then PCGrad's SUM of the projected
    gradients. At UW's optimum (exp(-s_i) = K / L_i there, 1 / L_i in Kendall's form) both forms weigh
    L_i by 0.5 / L_i, and the combined weighting's update is the reference's update."""
    grads = _random_grads(2)
    losses = torch.tensor([0.9, 0.4, 0.15, 0.05], dtype=torch.float64)
    combined = get_weighting("uw+pcgrad", K, seed=5)  # Kendall's UW (the default)
    combined.loss_weighting.log_vars.data = torch.log(losses).float()  # its optimum: exp(-s) = 1 / L
    update = combined.aggregate(grads)
    reference_weights = 0.5 * (K / losses) / K  # ANT's form at its optimum exp(-s) = K / L
    reference = get_weighting("pcgrad", K, seed=5, reduction="sum").aggregate(reference_weights[:, None] * grads)
    # s = log L stored in float32 (u |log L| off) and exp(-s) (2u): UW's coefficients are within u (|log L| + 2)
    # of 0.5 / L. PCGrad's update is linear in each coefficient c_i, through the projected gradient of task i,
    # whose norm is at most |g_i|: the update moves by max_i of that relative error times sum_i c_i |g_i|
    # at most, plus float64 rounding (measured: 1/380 of it; the mean is 34 away)
    coefficient_rtol = float((U32 * (losses.log().abs() + 2)).max()) + weights_rtol("pcgrad", grads)
    atol = coefficient_rtol * float((reference_weights * grads.norm(dim=1)).sum())
    assert (update - reference).abs().max() <= atol
    # not the mean: that would be K times smaller
    mean = get_weighting("pcgrad", K, seed=5).aggregate(reference_weights[:, None] * grads)
    assert (update - mean).abs().max() > 0.5 * update.abs().max()
