"""Diff-Tuning's timestep densities with exponents: draws follow psi_a(t) ∝ (T - t)^a and xi_b(t) ∝ (t + 1)^b.

Chi-square goodness of fit on many draws (scipy.stats.chisquare); the same test rejects the wrong
density, so it has the power to notice a sampler that ignores its exponent.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from diffusers_ant.diff_tuning import (
    reconsolidation_sampler,
    reconsolidation_weights,
    retention_sampler,
    retention_weights,
)
from diffusers_ant.timesteps import DensityTimestepSampler

T = 40
DRAWS = 100_000


def counts(sampler, seed=0):
    t = sampler.sample(DRAWS, generator=torch.Generator().manual_seed(seed))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < T
    return np.bincount(t.numpy(), minlength=T)


def expected(weights):
    w = np.asarray(weights, dtype=np.float64)
    return DRAWS * w / w.sum()


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.0, 3.5])
def test_retention_draws_follow_psi(exponent):
    t = np.arange(T)
    observed = counts(retention_sampler(T, exponent), seed=int(exponent * 10))
    assert chisquare(observed, expected((T - t) ** exponent)).pvalue > 1e-3
    if exponent > 0:  # the uniform density (what an ignored exponent gives) is rejected
        assert chisquare(observed, expected(np.ones(T))).pvalue < 1e-6
    if exponent != 1.0:  # and so is the paper's a = 1
        assert chisquare(observed, expected(T - t)).pvalue < 1e-6


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.0, 3.5])
def test_reconsolidation_draws_follow_xi(exponent):
    t = np.arange(T)
    observed = counts(reconsolidation_sampler(T, exponent), seed=100 + int(exponent * 10))
    assert chisquare(observed, expected((t + 1.0) ** exponent)).pvalue > 1e-3
    if exponent > 0:
        assert chisquare(observed, expected(np.ones(T))).pvalue < 1e-6
    if exponent != 1.0:
        assert chisquare(observed, expected(t + 1.0)).pvalue < 1e-6


def test_exponent_one_is_the_paper_s_density_and_zero_is_uniform():
    low, high = DensityTimestepSampler.low_noise(T), DensityTimestepSampler.high_noise(T)
    torch.testing.assert_close(retention_sampler(T).probabilities, low.probabilities)
    torch.testing.assert_close(reconsolidation_sampler(T).probabilities, high.probabilities)
    uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
    torch.testing.assert_close(retention_sampler(T, 0).probabilities, uniform)
    torch.testing.assert_close(reconsolidation_sampler(T, 0).probabilities, uniform)
    # large exponents stay finite (weights are normalised by T before the power)
    w = retention_weights(1000, 300.0)
    assert torch.isfinite(w).all() and w[0] == 1.0
    assert reconsolidation_weights(1000, 300.0)[-1] == 1.0


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "x", None])
def test_bad_exponents_are_one_line_errors(bad):
    for build, flag in ((retention_sampler, "retention exponent"), (reconsolidation_sampler, "reconsolidation exponent")):
        with pytest.raises(ValueError, match=f"{flag} must be a .*number >= 0") as info:
            build(T, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="num_timesteps must be a positive int"):
        retention_sampler(0, 1.0)
