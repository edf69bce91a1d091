"""The nine weighting methods against their closed forms or defining properties, plus the
registry, config validation, presence masks and state round trips."""

import copy
import dataclasses
import importlib.util
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusers_ant
from diffusers_ant.weighting import (
    WEIGHTINGS,
    GradientWeighting,
    LossWeighting,
    get_weighting,
    weighting_names,
)
from tolerances import gamma, sum_reordering_tolerance, unit_roundoff

NAMES = ["ls", "rlw", "uw", "dwa", "pcgrad", "nash_mtl", "imtl", "mgda", "cagrad"]
LOSS_BASED = ["ls", "rlw", "uw", "dwa"]
GRADIENT_BASED = ["pcgrad", "nash_mtl", "imtl", "mgda", "cagrad"]


def random_grads(k, p=16, seed=0, dtype=torch.float64):
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def nash_alpha_rtol(num_tasks, *residuals):
    """How far, relative to each entry, Nash-MTL solutions may differ whose residuals max_i |a_i (M a)_i - 1|
    are at most `residuals` (the solvers' own stopping tolerances): moving log a by r moves the residual by
    (I + A M A) r, A = diag(a), whose eigenvalues are >= 1 (M is PSD), so |r_i| <= |r|_2 <= sqrt(K) x the
    residual, for each solution against the exact one."""
    return math.sqrt(num_tasks) * sum(residuals)


def step(weighting, inputs, present=None):
    """One call of the method's entry point; returns the output (scalar or direction)."""
    if isinstance(weighting, LossWeighting):
        return weighting.combine(inputs, present).detach()
    return weighting.aggregate(inputs, present)


def inputs_for(name, k, seed):
    if name in LOSS_BASED:
        return torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    return random_grads(k, seed=seed)


# ----------------------------------------------------------------------------- registry


def test_registry_has_every_method_with_the_right_base():
    assert set(NAMES) <= set(WEIGHTINGS)
    assert weighting_names() == sorted(WEIGHTINGS)
    assert diffusers_ant.WEIGHTINGS is WEIGHTINGS
    assert diffusers_ant.get_weighting is get_weighting
    for name in NAMES:
        cls = WEIGHTINGS[name]
        assert cls.name == name
        base = LossWeighting if name in LOSS_BASED else GradientWeighting
        assert issubclass(cls, base)
        assert cls.needs_task_gradients == (name in GRADIENT_BASED)
        for field in dataclasses.fields(cls.config_class):
            assert field.metadata.get("help"), f"{name}.{field.name} has no help text"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        get_weighting("gradnorm_typo", 3)
    for name in NAMES:
        assert name in str(error.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError) as error:
        get_weighting("cagrad", 3, alpha=0.4)
    message = str(error.value)
    assert "alpha" in message and "c" in message and "rescale" in message and "seed" in message


def test_get_weighting_builds_config_coerces_strings_and_accepts_aliases():
    weighting = get_weighting("Nash-MTL", 4, update_every="7", tol="1e-10")
    assert weighting.name == "nash_mtl" and weighting.num_tasks == 4
    assert weighting.config.update_every == 7 and weighting.config.tol == 1e-10
    spec = weighting.spec()
    rebuilt = get_weighting(**spec)
    assert rebuilt.config == weighting.config and rebuilt.num_tasks == 4


BAD_OPTIONS = [
    ("uw", {"lr": -0.1}),
    ("uw", {"lr": 0.0}),
    ("uw", {"weight_decay": -1.0}),
    ("uw", {"init_log_var": float("nan")}),
    ("dwa", {"temperature": 0.0}),
    ("cagrad", {"c": -0.5}),
    ("cagrad", {"rescale": 3}),
    ("nash_mtl", {"update_every": 0}),
    ("nash_mtl", {"max_iter": 0}),
    ("nash_mtl", {"solver": "ecos"}),
    ("nash_mtl", {"tol": 0.0}),
    ("nash_mtl", {"on_failure": "ignore"}),
    ("ls", {"reduction": "max"}),
    ("pcgrad", {"reduction": "median"}),
    ("mgda", {"normalize": "loss"}),
    ("dwa", {"window": 0}),
    ("dwa", {"window": 2.5}),
    ("cagrad", {"reduction": "max"}),
    ("uw", {"divide_losses_by_num_tasks": "yes please"}),
    ("nash_mtl", {"divide_losses_by_num_tasks": 2}),
] + [(name, {"seed": -1}) for name in NAMES]


@pytest.mark.parametrize("name,options", BAD_OPTIONS)
def test_configs_reject_bad_values(name, options):
    with pytest.raises(ValueError):
        get_weighting(name, 3, **options)


def test_bad_num_tasks_and_shapes():
    with pytest.raises(ValueError):
        get_weighting("ls", 0)
    with pytest.raises(ValueError):
        get_weighting("ls", 3).combine(torch.ones(4))
    with pytest.raises(ValueError):
        get_weighting("mgda", 3).aggregate(torch.ones(4, 5))
    with pytest.raises(ValueError):
        get_weighting("ls", 3).combine(torch.ones(3), present=torch.tensor([1, 0, 1]))


def test_nash_cvxpy_solver_says_what_to_install():
    if importlib.util.find_spec("cvxpy") is None:
        with pytest.raises(ImportError, match="pip install cvxpy"):
            get_weighting("nash_mtl", 3, solver="cvxpy")
    else:  # with cvxpy installed, its path must agree with the built-in Newton solver
        grads = random_grads(3)
        w_cvx = get_weighting("nash_mtl", 3, solver="cvxpy").weights_from_grads(grads)
        w_newton = get_weighting("nash_mtl", 3, solver="newton").weights_from_grads(grads)
        # cvxpy's solution is accepted at residual 1e-6 (NashMTL._solve_cvxpy), Newton's at its config's tol
        # (1e-9): 1.7e-6 relative at most, where a wrong solution (another task's scale) is off by O(1)
        rtol = nash_alpha_rtol(3, 1e-6, get_weighting("nash_mtl", 3).config.tol)
        torch.testing.assert_close(w_cvx, w_newton, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- loss-based


def test_ls_is_the_mean_or_the_sum_of_present_losses():
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0], requires_grad=True)
    ls = get_weighting("ls", 4)
    assert ls.combine(losses).item() == pytest.approx(3.75)
    torch.testing.assert_close(ls.last_weights, torch.full((4,), 0.25))
    present = torch.tensor([True, False, True, True])
    assert ls.combine(losses, present).item() == pytest.approx(13.0 / 3)
    assert get_weighting("ls", 4, reduction="sum").combine(losses).item() == pytest.approx(15.0)


def test_rlw_weights_are_a_seeded_softmax_of_normal_draws():
    losses = torch.tensor([1.0, 2.0, 3.0])
    a, b, c = get_weighting("rlw", 3, seed=5), get_weighting("rlw", 3, seed=5), get_weighting("rlw", 3, seed=6)
    reference = torch.Generator().manual_seed(5)
    for _ in range(4):
        out_a, out_b = a.combine(losses), b.combine(losses)
        assert torch.equal(out_a, out_b) and torch.equal(a.last_weights, b.last_weights)
        assert a.last_weights.sum().item() == pytest.approx(1.0) and (a.last_weights > 0).all()
        expected = torch.softmax(torch.randn(3, generator=reference, dtype=torch.float64), 0)
        torch.testing.assert_close(a.last_weights, expected.float())
        assert out_a.item() == pytest.approx(float(expected.float() @ losses), rel=1e-6)
        c.combine(losses)
        assert not torch.equal(a.last_weights, c.last_weights)


def test_uw_gradient_of_log_variances_matches_closed_form():
    uw = get_weighting("uw", 3, init_log_var=0.3)
    losses = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float32)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.5, 1.2]))
    total = uw.combine(losses)
    total.backward()
    s = uw.log_vars.detach()
    expected_total = (0.5 * (torch.exp(-s) * losses + s)).sum()
    assert total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    torch.testing.assert_close(uw.log_vars.grad, 0.5 * (1 - torch.exp(-s) * losses))
    torch.testing.assert_close(uw.last_weights, 0.5 * torch.exp(-s))
    (group,) = uw.param_groups()
    assert group["params"] == [uw.log_vars] and group["lr"] == 0.025 and group["weight_decay"] == 0.0
    assert group["constant_lr"] is True  # the trainer keeps it out of the LR scheduler (ANT)
    optimizer = torch.optim.AdamW([{"params": [torch.zeros(2, requires_grad=True)]}] + uw.param_groups(), lr=1e-4)
    assert optimizer.param_groups[1]["constant_lr"] is True  # torch optimizers keep the key


def test_uw_ant_form_divides_the_losses_by_k():
    k = 3
    uw = get_weighting("uw", k, divide_losses_by_num_tasks=True)
    losses = torch.tensor([0.2, 1.0, 3.0])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.5, 1.2]))
    total = uw.combine(losses)
    total.backward()
    s = uw.log_vars.detach()
    assert total.item() == pytest.approx((0.5 * (torch.exp(-s) * losses / k + s)).sum().item(), rel=1e-6)
    torch.testing.assert_close(uw.log_vars.grad, 0.5 * (1 - torch.exp(-s) * losses / k))
    torch.testing.assert_close(uw.last_weights, 0.5 * torch.exp(-s) / k)


def test_uw_weights_move_towards_low_loss_tasks():
    uw = get_weighting("uw", 3)
    optimizer = torch.optim.SGD(uw.param_groups())
    losses = torch.tensor([0.1, 1.0, 10.0])
    start = uw.weights().clone()
    for _ in range(100):
        optimizer.zero_grad()
        uw.combine(losses).backward()
        optimizer.step()
    weights = uw.weights()
    assert weights[0] > weights[1] > weights[2]
    assert weights[0] > start[0] and weights[2] < start[2]
    # The optimum is exp(-s_i) = 1 / L_i: the low-loss task is moving towards weight 0.5 / 0.1 = 5.
    assert (0.5 / losses[0]) > weights[0]


def test_dwa_follows_the_ratio_of_the_last_two_losses():
    temperature = 2.0
    dwa = get_weighting("dwa", 3, temperature=temperature)
    history = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.4, 0.9, 1.0])]
    # The first two steps: equal weights, the mean loss.
    for losses in history[:2]:
        assert dwa.combine(losses).item() == pytest.approx(losses.mean().item())
        torch.testing.assert_close(dwa.last_weights, torch.full((3,), 1 / 3))
    # Step 3: r_i = L_i(t-1) / L_i(t-2) from the first two steps.
    ratios = history[1] / history[0]
    w = 3 * torch.softmax(ratios / temperature, 0)
    assert dwa.combine(history[2]).item() == pytest.approx((w * history[2]).sum().item() / 3, rel=1e-6)
    torch.testing.assert_close(dwa.last_weights, w / 3)
    assert dwa.last_weights[2] > dwa.last_weights[1] > dwa.last_weights[0]  # slowest descent, most weight
    # Step 4 uses steps 2 and 3.
    w = 3 * torch.softmax((history[2] / history[1]) / temperature, 0)
    dwa.combine(torch.ones(3))
    torch.testing.assert_close(dwa.last_weights, w / 3)


def test_dwa_averages_losses_over_a_window_of_steps():
    """Liu et al. and LibMTL: w(t) from the ratio of the last two EPOCH-average losses."""
    temperature, window = 2.0, 3
    dwa = get_weighting("dwa", 3, temperature=temperature, window=window)
    generator = torch.Generator().manual_seed(0)
    steps = [torch.rand(3, generator=generator, dtype=torch.float64) + 0.5 for _ in range(4 * window)]
    averages = [torch.stack(steps[w * window:(w + 1) * window]).mean(0) for w in range(4)]
    for n, losses in enumerate(steps):
        epoch = n // window
        if epoch < 2:  # the first two windows: equal weights
            expected = torch.full((3,), 1 / 3, dtype=torch.float64)
        else:
            ratio = averages[epoch - 1] / averages[epoch - 2]
            expected = torch.softmax(ratio / temperature, 0)  # w_i / K
        torch.testing.assert_close(dwa.loss_coefficients(), expected)
        assert dwa.combine(losses).item() == pytest.approx(float(expected @ losses), rel=1e-12)
        torch.testing.assert_close(dwa.last_weights, expected.float())
    # per-step ratios would have given other weights
    per_step = get_weighting("dwa", 3, temperature=temperature)
    for losses in steps[:-1]:
        per_step.combine(losses)
    assert not torch.allclose(per_step.loss_coefficients(), dwa.loss_coefficients())


def test_dwa_window_averages_a_task_over_the_steps_it_is_present():
    dwa = get_weighting("dwa", 2, window=2)
    present = torch.tensor([True, False])
    for losses, mask in [([1.0, 4.0], None), ([3.0, float("nan")], present),   # window 1: task 1 seen once
                         ([2.0, float("nan")], present), ([2.0, float("nan")], present)]:  # window 2: task 1 absent
        dwa.combine(torch.tensor(losses, dtype=torch.float64), mask)
    torch.testing.assert_close(dwa.loss_history[:, 0], torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert dwa.history_count.tolist() == [2, 1]
    torch.testing.assert_close(dwa.loss_history[1, 1], torch.tensor(4.0, dtype=torch.float64))
    assert dwa.window_steps.item() == 0 and dwa.window_loss_count.sum() == 0


@pytest.mark.parametrize("via_safetensors", [False, True])
def test_dwa_window_state_round_trips_mid_window(via_safetensors, tmp_path):
    generator = torch.Generator().manual_seed(1)
    steps = [torch.rand(3, generator=generator, dtype=torch.float64) + 0.5 for _ in range(13)]
    dwa = get_weighting("dwa", 3, window=4)
    for losses in steps[:7]:  # stop in the middle of the second window
        dwa.combine(losses)
    assert dwa.window_steps.item() == 3
    if via_safetensors:
        save_file(dwa.flat_state_dict(), tmp_path / "dwa.safetensors")
        restored = get_weighting("dwa", 3, window=4)
        restored.load_flat_state_dict(load_file(tmp_path / "dwa.safetensors"))
    else:
        restored = get_weighting("dwa", 3, window=4)
        restored.load_state_dict(copy.deepcopy(dwa.state_dict()))
    for losses in steps[7:]:
        assert torch.equal(dwa.combine(losses), restored.combine(losses))
        assert torch.equal(dwa.last_weights, restored.last_weights)
    assert not torch.equal(dwa.last_weights, torch.full((3,), 1 / 3))  # the windows' ratios were used


# ----------------------------------------------------------------------------- PCGrad


def test_pcgrad_projects_two_conflicting_gradients():
    g1 = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    assert g1 @ g2 < 0
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    grads = torch.stack([g1, g2])
    torch.testing.assert_close(get_weighting("pcgrad", 2, reduction="sum").aggregate(grads), p1 + p2)
    update = get_weighting("pcgrad", 2).aggregate(grads)
    torch.testing.assert_close(update, (p1 + p2) / 2)
    # Each projected gradient is orthogonal to the other task's gradient.
    assert abs(float(p1 @ g2)) < 1e-12 and abs(float(p2 @ g1)) < 1e-12


def test_pcgrad_leaves_agreeing_gradients_alone():
    grads = torch.tensor([[1.0, 0.2, 0.0], [0.5, 1.0, -0.1]], dtype=torch.float64)
    assert grads[0] @ grads[1] > 0
    torch.testing.assert_close(get_weighting("pcgrad", 2, reduction="sum").aggregate(grads), grads.sum(0))
    torch.testing.assert_close(get_weighting("pcgrad", 2).aggregate(grads), grads.mean(0))


@pytest.mark.parametrize("k", [3, 4, 6])
def test_pcgrad_gram_form_equals_direct_vector_projection(k):
    # Opposed pairs make many conflicts; the random order then matters.
    grads = random_grads(k, p=8, seed=k)
    grads[1] = -0.7 * grads[0] + 0.3 * grads[1]
    method = get_weighting("pcgrad", k, seed=3, reduction="sum")
    twin = copy.deepcopy(method)  # same generator state: draws the same orders
    update = method.aggregate(grads)

    projected = []
    for i, order in enumerate(twin.draw_orders(k)):
        g = grads[i].clone()
        for j in order:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    torch.testing.assert_close(update, torch.stack(projected).sum(0), rtol=1e-10, atol=1e-12)


def test_pcgrad_orders_follow_the_seed():
    k = 5
    orders = {}
    for seed in (0, 1, 1):
        pcgrad = get_weighting("pcgrad", k, seed=seed)
        drawn = []
        for step in range(3):
            twin = copy.deepcopy(pcgrad)
            drawn.append(twin.draw_orders(k))
            pcgrad.weights_from_grads(random_grads(k, seed=step))  # advances the generator as twin did
        orders.setdefault(seed, []).append(drawn)
    assert orders[1][0] == orders[1][1]  # the same seed: the same orders
    assert orders[0][0] != orders[1][0]  # another seed: other orders
    assert orders[0][0][0] != orders[0][0][1]  # and new orders every step


def test_cagrad_sum_reduction_is_k_times_the_mean():
    grads = random_grads(4, p=10, seed=3)
    grads[1] = -0.8 * grads[0] + 0.2 * grads[1]
    mean = get_weighting("cagrad", 4).aggregate(grads)
    torch.testing.assert_close(get_weighting("cagrad", 4, reduction="sum").aggregate(grads), 4 * mean)


# ----------------------------------------------------------------------------- MGDA


@pytest.mark.parametrize("seed", range(4))
def test_mgda_is_the_min_norm_point_of_two_gradients(seed):
    g1, g2 = random_grads(2, p=5, seed=seed)
    # The minimum of ||a g1 + (1 - a) g2||^2 over a in [0, 1], by hand.
    a = float(torch.clamp((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1))
    expected = a * g1 + (1 - a) * g2
    update = get_weighting("mgda", 2).aggregate(torch.stack([g1, g2]))
    # float64 rounding: a's numerator and denominator (sums of p products, formed from the Gram matrix or from
    # g1 - g2) are each within gamma_{p+2} (|g1| + |g2|)^2 of exact, so a within 2 x 2 gamma kappa, kappa =
    # (|g1| + |g2|)^2 / |g1 - g2|^2 (at most 1.7 here), and the update within that times |g1 - g2| plus its own
    # three roundings. Measured: 0; a solution off the segment's minimum moves it by O(|g1 - g2|).
    kappa = float((g1.norm() + g2.norm()) ** 2 / (g1 - g2).norm() ** 2)
    a_error = 2 * sum_reordering_tolerance(len(g1) + 2, kappa, torch.float64)
    largest = float(torch.maximum(g1.abs(), g2.abs()).max())
    atol = a_error * float((g1 - g2).abs().max()) + 3 * unit_roundoff(torch.float64) * largest
    torch.testing.assert_close(update, expected, rtol=0, atol=atol)


def test_mgda_clips_to_a_vertex():
    # g1 is the shortest point of the segment: the min-norm point is g1 itself.
    grads = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(get_weighting("mgda", 2).weights_from_grads(grads),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("k", [3, 5, 8])
def test_mgda_satisfies_min_norm_optimality_for_many_tasks(k):
    grads = random_grads(k, p=6, seed=10 + k) + 0.3
    weights = get_weighting("mgda", k).weights_from_grads(grads)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-9) and (weights >= 0).all()
    d = weights @ grads
    # KKT of min ||G^T a||^2 on the simplex: g_i . d >= ||d||^2, with equality where a_i > 0.
    margins = grads @ d - d @ d
    assert margins.min() > -1e-8
    assert margins[weights > 1e-9].abs().max() < 1e-8
    # ...and no random point of the simplex does better.
    others = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample((2000,))
    assert ((others @ grads).norm(dim=1) >= d.norm() - 1e-9).all()


@pytest.mark.parametrize("k", [2, 4])
def test_mgda_l2_normalisations(k):
    grads = random_grads(k, p=6, seed=60 + k) * torch.linspace(0.2, 5.0, k, dtype=torch.float64)[:, None]
    norms = grads.norm(dim=1)
    unit = grads / norms[:, None]
    a = get_weighting("mgda", k).weights_from_grads(unit)  # the min-norm point of the unit gradients
    # LibMTL ("l2"): the update is that min-norm point, i.e. weights a_i / ||g_i|| on the raw gradients.
    libmtl = get_weighting("mgda", k, normalize="l2")
    torch.testing.assert_close(libmtl.weights_from_grads(grads), a / norms)
    torch.testing.assert_close(libmtl.aggregate(grads), a @ unit)
    # Sener & Koltun's code ("l2_authors"): the same a, applied to the raw losses.
    authors = get_weighting("mgda", k, normalize="l2_authors")
    torch.testing.assert_close(authors.weights_from_grads(grads), a)
    torch.testing.assert_close(authors.aggregate(grads), a @ grads)


# ----------------------------------------------------------------------------- IMTL-G


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_imtl_has_equal_projections_on_unit_gradients(k):
    grads = random_grads(k, p=12, seed=20 + k) * torch.linspace(0.1, 5.0, k, dtype=torch.float64)[:, None]
    weights = get_weighting("imtl", k).weights_from_grads(grads)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-10)
    d = weights @ grads
    projections = (grads / grads.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections.mean().expand(k), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- Nash-MTL


def raw_nash_residual(alpha, grads):
    """max_i |alpha_i (G G^T alpha)_i - 1| on the raw gradients."""
    gram = grads.double() @ grads.double().T
    return float((alpha * (gram @ alpha) - 1).abs().max())


@pytest.mark.parametrize("k", [2, 3, 5])
def test_nash_alpha_solves_the_bargaining_equation_for_the_raw_gradients(k):
    # Scaled gradients: the authors' alpha depends on the gradients' scale (alpha ~ 1 / scale).
    grads = 37.0 * random_grads(k, p=20, seed=30 + k)
    nash = get_weighting("nash_mtl", k)
    update = nash.aggregate(grads)
    alpha = nash.alpha
    gram = grads @ grads.T
    assert (alpha > 0).all()
    torch.testing.assert_close(gram @ alpha, 1 / alpha, rtol=1e-9, atol=0)
    torch.testing.assert_close(update, alpha @ grads)
    assert update.norm().item() == pytest.approx(math.sqrt(k), rel=1e-9)  # ||d||^2 = alpha^T G G^T alpha = K
    assert nash.solver_failures == 0 and nash.last_residual <= 1e-9
    # ANT's scale: every cluster loss divided by K, i.e. alpha / K.
    ant = get_weighting("nash_mtl", k, divide_losses_by_num_tasks=True)
    torch.testing.assert_close(ant.aggregate(grads), update / k)
    torch.testing.assert_close(ant.alpha, alpha)


def well_conditioned_grads(generator, k, max_condition=1e6):
    """Random K x P gradients with per-task scales over two orders of magnitude, cond(G G^T) bounded."""
    while True:
        p = k + int(torch.randint(3, 40, (1,), generator=generator))
        scales = torch.exp(2 * torch.rand(k, 1, generator=generator, dtype=torch.float64) - 1) ** 2
        grads = torch.randn(k, p, generator=generator, dtype=torch.float64) * scales
        if torch.linalg.cond(grads @ grads.T) <= max_condition:
            return grads


def test_nash_solver_converges_on_hundreds_of_well_conditioned_problems():
    """The full Newton step near the optimum: no stall, including warm starts from the previous
    alpha of a nearby problem (what `update_every` re-solves see during training)."""
    generator = torch.Generator().manual_seed(2024)
    solves = 0
    for problem in range(100):
        k = int(torch.randint(2, 11, (1,), generator=generator))
        nash = get_weighting("nash_mtl", k, update_every=1, solver="newton")
        grads = well_conditioned_grads(generator, k) * float(torch.exp(8 * torch.rand(1, generator=generator) - 4))
        for drift in (0.0, 1e-2, 1e-4, 1e-6):  # a new problem, then ever closer to the previous solution
            grads = grads + drift * grads.norm(dim=1, keepdim=True) / math.sqrt(grads.shape[1]) \
                * torch.randn(grads.shape, generator=generator, dtype=torch.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a failed solve warns: make it an error
                nash.weights_from_grads(grads)
            solves += 1
            assert nash.last_residual <= nash.config.tol, (problem, drift, nash.last_residual)
            assert raw_nash_residual(nash.alpha, grads) <= 1e-8, (problem, drift)
        assert nash.solver_failures == 0
    assert solves == 400


def test_nash_reuses_alpha_between_updates():
    nash = get_weighting("nash_mtl", 3, update_every=3)
    weights = []
    for step in range(7):
        assert nash.needs_gradients_this_step() == (step % 3 == 0)
        weights.append(nash.weights_from_grads(random_grads(3, seed=step)).clone())
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])
    assert not torch.equal(weights[2], weights[3])
    assert torch.equal(weights[3], weights[4]) and torch.equal(weights[3], weights[5])
    assert not torch.equal(weights[5], weights[6])
    # Between updates the trainer may skip the gradients: reuse_weights gives the same weights.
    assert not nash.needs_gradients_this_step()
    torch.testing.assert_close(nash.reuse_weights(), weights[6])
    present = torch.tensor([True, False, True])
    reused = nash.reuse_weights(present)
    assert reused[1] == 0 and reused[0] == weights[6][0]
    with pytest.raises(RuntimeError):
        nash.reuse_weights()  # step 9: an update step


def test_nash_solves_again_when_a_task_the_last_solve_left_out_is_present(tmp_path):
    """Batches smaller than K: cluster 3 is absent at the solve. When it is present again before the next
    scheduled solve, the step solves for the tasks present instead of giving cluster 3 the initial alpha
    of 1 (on no scale: these gradients are of size 1e-3, so every solved alpha is about 30); the next
    scheduled solve stays on its cadence, and the mask travels with the checkpoint."""
    from safetensors.torch import load_file, save_file

    nash = get_weighting("nash_mtl", 5, update_every=25)
    grads = 1e-3 * random_grads(5, p=64, seed=3)
    without_3 = torch.tensor([True, True, True, False, True])
    everyone = torch.ones(5, dtype=torch.bool)
    nash.weights_from_grads(grads, without_3)
    assert nash.alpha[3] == 1.0 and bool((nash.alpha[without_3] > 10).all())
    assert not nash.needs_gradients_this_step(without_3)  # the same tasks: reuse
    assert nash.needs_gradients_this_step(everyone)  # cluster 3 back: solve
    with pytest.raises(RuntimeError):
        nash.stored_weights(everyone)
    weights = nash.weights_from_grads(grads, everyone)
    fresh = get_weighting("nash_mtl", 5).weights_from_grads(grads, everyone)
    # both solved to the solver's tolerance, from other starts: 2 sqrt(5) tol = 4.5e-9 relative (measured 1e-12)
    torch.testing.assert_close(weights, fresh, rtol=nash_alpha_rtol(5, nash.config.tol, nash.config.tol), atol=0)
    assert not nash.needs_gradients_this_step(everyone) and not nash.needs_gradients_this_step(without_3)
    save_file(nash.flat_state_dict(), tmp_path / "nash.safetensors")
    restored = get_weighting("nash_mtl", 5, update_every=25)
    restored.load_flat_state_dict(load_file(tmp_path / "nash.safetensors"))
    assert torch.equal(restored.solved, nash.solved) and restored.step == nash.step == 2
    for _ in range(23):
        nash.reuse_weights(everyone)
    assert nash.step == 25 and nash.needs_gradients_this_step(without_3)  # the cadence is unchanged
    with pytest.raises(RuntimeError):
        nash.stored_weights()


def test_nash_stored_weights_do_not_count_a_step():
    """A reused-weights step whose fp16 overflow shows only after the backward pass: the weights
    come from stored_weights, and reuse_weights counts the step only once it is taken."""
    nash = get_weighting("nash_mtl", 3, update_every=3)
    solved = nash.weights_from_grads(random_grads(3))
    present = torch.tensor([True, False, True])
    peeked = nash.stored_weights(present)
    assert nash.step == 1 and torch.equal(nash.stored_weights(present), peeked)  # a skipped step: nothing moves
    assert peeked[1] == 0 and torch.equal(peeked[[0, 2]], solved[[0, 2]])
    assert torch.equal(nash.reuse_weights(present), peeked) and nash.step == 2
    with pytest.raises(RuntimeError):
        get_weighting("pcgrad", 3).stored_weights()


def test_nash_does_not_fail_silently():
    g = random_grads(1, p=6)[0]
    dependent = torch.stack([g, -2.0 * g, g + 0.1])  # a positive combination of g1, g2 is zero: no solution
    # after a solve, a failed one keeps the previous alpha, loudly
    nash = get_weighting("nash_mtl", 3, max_iter=30, update_every=1)
    solved = nash.weights_from_grads(random_grads(3, p=6))
    before = nash.alpha.clone()
    with pytest.warns(RuntimeWarning, match="did not converge.*Keeping the previous alpha"):
        weights = nash.weights_from_grads(dependent)
    assert nash.solver_failures == 1 and not nash.last_residual <= nash.config.tol
    assert torch.equal(nash.alpha, before) and torch.equal(weights, solved)
    # a failed first solve has no previous alpha: equal weights at a solution's scale (update norm sqrt(K)),
    # not the initial ones (whose update is the plain sum of the gradients)
    first = get_weighting("nash_mtl", 3, max_iter=30)
    with pytest.warns(RuntimeWarning, match="did not converge.*equal weights"):
        weights = first.weights_from_grads(dependent)
    assert first.solver_failures == 1
    assert torch.allclose(weights, weights[0].expand(3)) and float(weights[0]) != 1.0
    # c = sqrt(K / 1'G1) comes from the float32 Gram matrix: each entry within gamma_P |g_i| |g_j| of the exact one,
    # so 1'G1 within gamma_P (sum_i |g_i|)^2, large against 1'G1 itself for these nearly cancelling gradients (they
    # sum to 0.1 x ones); c's relative error is at most 1'G1's (|1 / sqrt(1 + x) - 1| <= |x| for |x| <= 1/2), and
    # the weights are rounded to float32 once more (the float64 sums are far below both)
    exact = dependent.double()
    total = float(exact.sum(0).norm() ** 2)
    relative = gamma(dependent.shape[1]) * float(exact.norm(dim=1).sum()) ** 2 / total
    assert relative <= 0.5
    tolerance = (relative + unit_roundoff()) * 3 ** 0.5
    update_norm = float((weights.double() @ exact).norm())
    assert abs(update_norm - 3 ** 0.5) <= tolerance
    assert abs(total ** 0.5 - 3 ** 0.5) > 10 * tolerance  # the initial ones' update (the plain sum) is far outside
    assert not first.needs_gradients_this_step(torch.ones(3, dtype=torch.bool))  # the window runs on them
    with pytest.raises(RuntimeError, match="did not converge"):
        get_weighting("nash_mtl", 3, max_iter=30, on_failure="raise").weights_from_grads(dependent)


def test_nash_gives_zero_weight_to_a_zero_gradient():
    grads = random_grads(3)
    grads[1] = 0
    nash = get_weighting("nash_mtl", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = nash.weights_from_grads(grads)
    assert weights[1] == 0 and (weights[[0, 2]] > 0).all()


# ----------------------------------------------------------------------------- CAGrad


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_is_a_conflict_averse_descent_direction(seed, c):
    grads = random_grads(4, p=10, seed=40 + seed)
    grads[1] = -0.8 * grads[0] + 0.2 * grads[1]  # a strong conflict
    g0 = grads.mean(0)
    d = get_weighting("cagrad", 4, c=c, rescale=0).aggregate(grads)
    assert d @ g0 > 0
    # d solves max_d min_i g_i . d within the ball ||d - g0|| <= c ||g0||, which holds g0 itself:
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-6)
    assert (grads @ d).min() >= (grads @ g0).min() - 1e-6
    # rescale=1 divides by 1 + c^2
    d1 = get_weighting("cagrad", 4, c=c).aggregate(grads)
    torch.testing.assert_close(d1, d / (1 + c**2))


def test_cagrad_with_c_zero_is_the_mean_gradient():
    grads = random_grads(5)
    for rescale in (0, 1, 2):
        update = get_weighting("cagrad", 5, c=0.0, rescale=rescale).aggregate(grads)
        assert torch.equal(update, torch.full((5,), 0.2, dtype=torch.float64) @ grads)


# ----------------------------------------------------------------------------- presence masks


@pytest.mark.parametrize("name", NAMES)
def test_absent_tasks_get_zero_weight_and_cannot_leak_nan(name):
    k = 4
    present = torch.tensor([True, False, True, True])
    weighting = get_weighting(name, k)
    for seed in range(3):  # several steps, so history-based methods use their history
        inputs = inputs_for(name, k, seed).clone()
        inputs[1] = float("nan")  # an empty cluster's loss (0 / 0) or gradient
        out = step(weighting, inputs, present)
        assert torch.isfinite(out).all()
        assert weighting.last_weights[1] == 0
        assert (weighting.last_weights[present] != 0).any()


@pytest.mark.parametrize("name", [n for n in NAMES if n != "rlw"])  # rlw draws all K normals
def test_absent_task_output_equals_the_method_on_present_tasks_only(name):
    """On a first step the masked call equals the method run on the K - 1 present tasks."""
    k = 4
    present = torch.tensor([True, True, False, True])
    inputs = inputs_for(name, k, 7)
    full = step(get_weighting(name, k), inputs, present)
    reduced = step(get_weighting(name, k - 1), inputs[present])
    torch.testing.assert_close(full, reduced)


def test_absent_tasks_keep_their_state():
    present = torch.tensor([True, False, True])
    # UW: the absent log-variance gets an exactly zero gradient.
    uw = get_weighting("uw", 3)
    uw.combine(torch.tensor([0.5, float("nan"), 2.0]), present).backward()
    assert uw.log_vars.grad[1] == 0 and (uw.log_vars.grad[[0, 2]] != 0).all()
    # DWA: the absent task's history is not advanced.
    dwa = get_weighting("dwa", 3)
    dwa.combine(torch.tensor([1.0, 5.0, 2.0]))
    history, count = dwa.loss_history.clone(), dwa.history_count.clone()
    dwa.combine(torch.tensor([0.5, float("nan"), 1.0]), present)
    assert torch.equal(dwa.loss_history[:, 1], history[:, 1]) and dwa.history_count[1] == count[1]
    assert dwa.loss_history[1, 0] == 0.5 and dwa.history_count[0] == 2
    # Nash-MTL: the absent task's alpha is not overwritten.
    nash = get_weighting("nash_mtl", 3, update_every=1)
    nash.weights_from_grads(random_grads(3, seed=1))
    alpha = nash.alpha.clone()
    nash.weights_from_grads(random_grads(3, seed=2), present)
    assert nash.alpha[1] == alpha[1] and nash.alpha[0] != alpha[0]


# ----------------------------------------------------------------------------- randomness and state


def test_rlw_coefficients_follow_the_seed():
    assert not torch.equal(get_weighting("rlw", 4, seed=0).loss_coefficients(),
                           get_weighting("rlw", 4, seed=1).loss_coefficients())
    assert torch.equal(get_weighting("rlw", 4, seed=1).loss_coefficients(),
                       get_weighting("rlw", 4, seed=1).loss_coefficients())


@pytest.mark.parametrize("name", NAMES)
def test_methods_draw_only_from_their_own_generator(name):
    """No method touches torch's or numpy's global random state: its draws go through the
    generator seeded from config.seed, so the global seed cannot change its output."""
    import numpy as np

    outputs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
        weighting = get_weighting(name, 4, seed=5)
        run = []
        for seed in range(3):
            present = torch.tensor([True, seed != 1, True, True])
            if isinstance(weighting, LossWeighting):
                run.append(weighting.loss_coefficients(present))
            run.append(step(weighting, inputs_for(name, 4, seed), present))
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert (np.random.get_state()[1] == numpy_state).all()
        outputs.append(run)
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", GRADIENT_BASED)
def test_gradient_methods_advance_state_only_when_choosing_weights(name):
    """The engine skips weights_from_grads on an fp16 overflow step; nothing else may advance state."""
    weighting = get_weighting(name, 3, **({"update_every": 2} if name == "nash_mtl" else {}))
    weighting.weights_from_grads(random_grads(3, seed=0))
    before = copy.deepcopy(weighting.state_dict())
    for _ in range(3):
        weighting.needs_gradients_this_step()
    after = weighting.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], dict):
            for sub in before[key]:
                assert torch.equal(torch.as_tensor(before[key][sub]), torch.as_tensor(after[key][sub])), (key, sub)
        else:
            assert torch.equal(before[key], after[key]), key


# ----------------------------------------------------------------------------- state round trips


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("via_safetensors", [False, True])
def test_state_round_trip_reproduces_later_outputs(name, via_safetensors, tmp_path):
    k = 3
    options = {"update_every": 2} if name == "nash_mtl" else {}
    weighting = get_weighting(name, k, seed=11, **options)
    optimizer = torch.optim.SGD(weighting.param_groups()) if name == "uw" else None

    def run(method, opt, seeds):
        outputs = []
        for seed in seeds:
            out = method.combine(inputs_for(name, k, seed)) if isinstance(method, LossWeighting) \
                else method.aggregate(inputs_for(name, k, seed))
            if opt is not None:
                opt.zero_grad()
                out.backward()
                opt.step()
            outputs.append(out.detach().clone())
        return outputs

    run(weighting, optimizer, range(3))
    if via_safetensors:
        save_file(weighting.flat_state_dict(), tmp_path / "weighting.safetensors")
        saved = None
    else:
        saved = copy.deepcopy(weighting.state_dict())
    expected = run(weighting, optimizer, range(3, 8))

    restored = get_weighting(name, k, seed=0, **options)  # a different seed: the state must win
    if via_safetensors:
        restored.load_flat_state_dict(load_file(tmp_path / "weighting.safetensors"))
    else:
        restored.load_state_dict(saved)
    opt2 = torch.optim.SGD(restored.param_groups()) if name == "uw" else None
    got = run(restored, opt2, range(3, 8))
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_fresh_instances_agree_exactly():
    """Same seed and inputs -> the same outputs (what every process of a data-parallel run relies on)."""
    for name in NAMES:
        a, b = get_weighting(name, 4, seed=2), get_weighting(name, 4, seed=2)
        for seed in range(3):
            assert torch.equal(step(a, inputs_for(name, 4, seed)), step(b, inputs_for(name, 4, seed)))


def test_float32_gradients_give_float32_updates():
    grads = random_grads(3, dtype=torch.float32)
    for name in GRADIENT_BASED:
        update = get_weighting(name, 3).aggregate(grads)
        assert update.dtype == torch.float32 and torch.isfinite(update).all()


def test_lazy_engine_export_does_not_break_import():
    import diffusers_ant.weighting as module

    assert "TaskGradientEngine" in module.__all__
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
    assert math.isfinite(get_weighting("ls", 2).combine(torch.ones(2)).item())
