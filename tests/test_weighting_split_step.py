"""The split step of the loss-based weightings (base.py): `loss_coefficients` before the step,
`weighting_loss` for the method's own parameters, `finish_step` after a step that was taken.

Over several consecutive steps with random losses and random presence masks, the split calls must
reproduce `combine` exactly: the gradient w.r.t. the model, the gradient w.r.t. the method's
parameters, the state afterwards and `last_weights`. A skipped step (fp16 overflow) calls no
`finish_step` and must leave every state as it was.

Exactly, bit for bit: `combine` is `loss_coefficients` and the same sum_i c_i L_i as the split step, and
the two micro-batches' losses enter through exact scalings (a share of 1/2, the mean of two: powers of two)
and one addition of the two on each side, so both run the same float64 operations on the same values.
(Measured: every difference 0; a defect such as RLW drawing its weights twice changes them by O(1).)"""

import copy

import pytest
import torch

from diffusers_ant.weighting import get_weighting

CASES = [
    ("ls", {}),
    ("ls", {"reduction": "sum"}),
    ("rlw", {}),
    ("uw", {}),
    ("uw", {"divide_losses_by_num_tasks": True}),
    ("dwa", {}),
    ("dwa", {"window": 3}),
]
K = 4
DIM = 6


def task_losses(theta, data):
    """K smooth, positive task losses of the model parameters theta (DIM,)."""
    a, b = data
    return (a @ theta + b) ** 2 + 0.1


def micro_batch_data(generator, num_micro):
    return [(torch.randn(K, DIM, generator=generator, dtype=torch.float64),
             torch.randn(K, generator=generator, dtype=torch.float64)) for _ in range(num_micro)]


def state_of(weighting):
    """Every tensor of the state, the generator's included, as comparable copies."""
    state = {k: v for k, v in weighting.state_dict().items() if not k.endswith("_extra_state")}
    extra = weighting.get_extra_state()
    return {**{k: v.detach().clone() for k, v in state.items()},
            **{f"extra.{k}": torch.as_tensor(v).clone() for k, v in extra.items()}}


def assert_same_state(a, b):
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key  # the same operations on the same values (module docstring)


def optimizer_for(theta, weighting):
    groups = [{"params": [theta]}]
    if hasattr(weighting, "param_groups"):
        groups += weighting.param_groups()
    return torch.optim.SGD(groups, lr=0.05)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_split_step_equals_combine(case):
    name, options = CASES[case]
    generator = torch.Generator().manual_seed(100 + case)
    whole = get_weighting(name, K, seed=3, **options)
    split = get_weighting(name, K, seed=3, **options)
    if name == "uw":  # start away from 0 so every coefficient differs
        with torch.no_grad():
            whole.log_vars.copy_(torch.randn(K, generator=generator))
            split.log_vars.copy_(whole.log_vars)
    theta_whole = torch.randn(DIM, generator=generator, dtype=torch.float64).requires_grad_()
    theta_split = theta_whole.detach().clone().requires_grad_()
    opt_whole, opt_split = optimizer_for(theta_whole, whole), optimizer_for(theta_split, split)
    own_params = [p for p in whole.parameters()]
    own_params_split = [p for p in split.parameters()]

    for step in range(12):
        present = torch.rand(K, generator=generator) < 0.7
        if step == 0:
            present[:] = True
        data = micro_batch_data(generator, num_micro=2)  # two micro-batches of equal size
        skipped = step in (4, 9)  # an fp16 overflow: the optimizer step is not taken

        # --- the split step, as the trainer runs it ---
        before = state_of(split)
        coefficients = split.loss_coefficients(present)
        assert coefficients.dtype == torch.float64 and coefficients.shape == (K,)
        assert (coefficients[~present] == 0).all()
        torch.testing.assert_close(split.loss_coefficients(present), coefficients, rtol=0, atol=0)  # pure
        opt_split.zero_grad()
        step_losses = torch.zeros(K, dtype=torch.float64)
        for micro in data:
            losses = task_losses(theta_split, micro)
            share = 1.0 / len(data)
            (coefficients[present] * losses[present]).sum().mul(share).backward()
            step_losses += share * losses.detach()
        step_losses[~present] = float("nan")  # an empty cluster: its mean is 0 / 0
        own = split.weighting_loss(step_losses, present)
        assert (own is None) == (name != "uw")
        if own is not None:
            own.backward()
        for key, value in state_of(split).items():  # coefficients and weighting_loss changed nothing
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
        if skipped:
            continue  # no optimizer.step(), no finish_step(): nothing may advance
        grads_split = [theta_split.grad.clone()] + [p.grad.clone() for p in own_params_split]
        opt_split.step()
        split.finish_step(step_losses, present, coefficients)

        # --- the same step through combine, on the whole step's losses ---
        opt_whole.zero_grad()
        losses = sum(task_losses(theta_whole, micro) for micro in data) / len(data)
        losses = torch.where(present, losses, torch.full_like(losses, float("nan")))
        total = whole.combine(losses, present)
        total.backward()
        grads_whole = [theta_whole.grad.clone()] + [p.grad.clone() for p in own_params]
        opt_whole.step()

        # bit for bit (module docstring)
        assert all(torch.equal(g_split, g_whole) for g_split, g_whole in zip(grads_split, grads_whole))
        assert torch.equal(split.last_weights, whole.last_weights)
        assert_same_state(split, whole)
        assert torch.equal(theta_split, theta_whole)
        # combine's gradient w.r.t. each task loss is the coefficient
        leaf = torch.where(present, losses.detach(), torch.zeros_like(losses)).requires_grad_()
        probe = copy.deepcopy(whole)
        (d_losses,) = torch.autograd.grad(probe.combine(leaf, present), leaf)
        assert torch.equal(d_losses, whole.loss_coefficients(present).to(d_losses))  # d (c . L) / dL = c, exactly


def test_rlw_coefficients_peek_without_advancing():
    rlw = get_weighting("rlw", 3, seed=1)
    first = rlw.loss_coefficients()
    assert torch.equal(rlw.loss_coefficients(), first)
    rlw.finish_step(torch.ones(3))
    second = rlw.loss_coefficients()
    assert not torch.equal(second, first)
    # the draws are those of combine, one per step
    twin = get_weighting("rlw", 3, seed=1)
    twin.combine(torch.ones(3))
    torch.testing.assert_close(twin.last_weights, first.float())
    twin.combine(torch.ones(3))
    torch.testing.assert_close(twin.last_weights, second.float())


def test_uw_finish_step_after_the_optimizer_records_the_step_coefficients():
    uw = get_weighting("uw", 3)
    optimizer = torch.optim.SGD(uw.param_groups())
    losses = torch.tensor([0.1, 1.0, 10.0])
    coefficients = uw.loss_coefficients()
    uw.weighting_loss(losses).backward()
    optimizer.step()
    assert not torch.equal(uw.loss_coefficients(), coefficients)  # the log-variances moved
    uw.finish_step(losses, coefficients=coefficients)
    torch.testing.assert_close(uw.last_weights, coefficients.float())


def test_finish_step_checks_its_inputs():
    ls = get_weighting("ls", 3)
    with pytest.raises(ValueError, match="task_losses"):
        ls.finish_step(torch.ones(4))
    with pytest.raises(ValueError, match="coefficients"):
        ls.finish_step(torch.ones(3), coefficients=torch.ones(2))
