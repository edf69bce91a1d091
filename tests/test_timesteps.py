"""Timestep samplers: shares, ranges, rates and densities, all seeded through a torch.Generator."""

import math

import pytest
import torch

from diffusers_ant.timesteps import (
    TIMESTEP_SAMPLERS,
    DensityTimestepSampler,
    FlowMatchingDensitySampler,
    IntervalTimestepSampler,
    StratifiedTimestepSampler,
    TimestepSampler,
    UniformTimestepSampler,
    get_timestep_sampler,
)

# uneven clusters, as the SNR objective produces
BOUNDS = [(0, 9), (10, 99), (100, 499), (500, 989), (990, 999)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class FakeIntervals:
    """Stands in for clustering.TimestepIntervals: only `.bounds` is used."""

    def __init__(self, bounds):
        self.bounds = bounds


def assert_close_to_rate(count, n, p, sigmas=5.0):
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= sigmas * sd + 1, (count, n * p)


# ---------------------------------------------------------------- uniform


def test_uniform_range_reproducibility_and_coverage():
    sampler = UniformTimestepSampler(50)
    assert isinstance(sampler, TimestepSampler) and sampler.num_timesteps == 50
    t = sampler.sample(20000, generator=gen(1))
    assert t.dtype == torch.long and t.shape == (20000,)
    assert t.min() == 0 and t.max() == 49
    assert torch.equal(t, sampler.sample(20000, generator=gen(1)))
    counts = torch.bincount(t, minlength=50)
    for c in counts.tolist():
        assert_close_to_rate(c, 20000, 1 / 50)
    assert sampler.sample(3, device="cpu").device.type == "cpu"


# ---------------------------------------------------------------- stratified


@pytest.mark.parametrize("batch_size", [1, 3, 5, 7, 10, 13, 64])
def test_stratified_gives_every_cluster_its_share(batch_size):
    sampler = StratifiedTimestepSampler(BOUNDS)
    k = len(BOUNDS)
    q, r = divmod(batch_size, k)
    for seed in range(20):
        t, ids = sampler.sample_with_ids(batch_size, generator=gen(seed))
        assert t.shape == ids.shape == (batch_size,) and t.dtype == ids.dtype == torch.long
        counts = torch.bincount(ids, minlength=k)
        # q each, plus one more for exactly r distinct clusters
        assert counts.sum() == batch_size
        assert ((counts == q) | (counts == q + 1)).all()
        assert (counts == q + 1).sum() == r
        # every t lies in its cluster, and the batch comes in cluster order
        starts = torch.tensor([a for a, _ in BOUNDS])[ids]
        ends = torch.tensor([b for _, b in BOUNDS])[ids]
        assert ((t >= starts) & (t <= ends)).all()
        assert (ids[1:] >= ids[:-1]).all()


def test_stratified_remainder_is_spread_at_random():
    # B < k: each cluster is present with probability B / k, never twice
    sampler = StratifiedTimestepSampler(BOUNDS)
    g = gen(7)
    presence = torch.zeros(5)
    n = 4000
    for _ in range(n):
        _, ids = sampler.sample_with_ids(3, generator=g)
        presence += torch.bincount(ids, minlength=5)
    for c in presence.tolist():
        assert_close_to_rate(c, n, 3 / 5)


def test_stratified_is_uniform_inside_each_cluster():
    sampler = StratifiedTimestepSampler(BOUNDS)
    t, ids = sampler.sample_with_ids(50000, generator=gen(3))
    first = t[ids == 0]  # cluster (0, 9): 10 timesteps
    counts = torch.bincount(first, minlength=10)
    assert counts.shape == (10,)
    for c in counts.tolist():
        assert_close_to_rate(c, first.numel(), 1 / 10)
    # both ends of a large cluster are reachable
    third = t[ids == 2]
    assert third.min() == 100 and third.max() == 499


def test_stratified_accepts_timestep_intervals_and_is_seeded():
    a = StratifiedTimestepSampler(FakeIntervals(BOUNDS))
    b = StratifiedTimestepSampler(BOUNDS)
    assert a.num_timesteps == 1000 and a.num_clusters == 5 and a.bounds == BOUNDS
    assert torch.equal(a.sample(17, generator=gen(5)), b.sample(17, generator=gen(5)))
    assert not torch.equal(a.sample(17, generator=gen(5)), a.sample(17, generator=gen(6)))
    assert a.sample(0).shape == (0,)


@pytest.mark.parametrize(
    "bounds, message",
    [
        ([], "empty"),
        ([(1, 9), (10, 19)], "start at timestep 0"),
        ([(0, 9), (12, 19)], "not contiguous"),
        ([(0, 9), (9, 19)], "not contiguous"),
        ([(0, 9), (10, 5)], "end < start"),
        ([0, 9], "pairs"),
        (FakeIntervals([(0, 4), (6, 9)]), "previous end \\+ 1"),
    ],
)
def test_stratified_bad_bounds_raise(bounds, message):
    with pytest.raises(ValueError, match=message):
        StratifiedTimestepSampler(bounds)


# ---------------------------------------------------------------- interval (DeMe)


def test_interval_without_p_full_stays_inside():
    sampler = IntervalTimestepSampler(200, 399, 1000)
    t = sampler.sample(5000, generator=gen(0))
    assert t.min() == 200 and t.max() == 399


@pytest.mark.parametrize("p_full", [0.3, 0.7])
def test_interval_p_full_rate(p_full):
    T, start, end = 1000, 200, 399
    sampler = IntervalTimestepSampler(start, end, T, p_full=p_full)
    n = 20000
    t = sampler.sample(n, generator=gen(1))
    assert t.min() >= 0 and t.max() < T
    outside = ((t < start) | (t > end)).sum().item()
    # a full-range draw lands outside the interval with probability (T - size) / T
    assert_close_to_rate(outside, n, p_full * (T - (end - start + 1)) / T)
    # full-range draws are uniform: below and above the interval in proportion to their sizes
    below, above = (t < start).sum().item(), (t > end).sum().item()
    assert_close_to_rate(below, below + above, start / (T - (end - start + 1)))


def test_interval_per_batch_coin():
    sampler = IntervalTimestepSampler(0, 0, 1000, p_full=0.3, per_batch=True)
    g = gen(2)
    n = 2000
    batches = [sampler.sample(16, generator=g) for _ in range(n)]
    full = [bool((b > 0).any()) for b in batches]
    # a batch is either all inside (all zeros) or drawn from the whole range
    assert_close_to_rate(sum(full), n, 0.3)
    assert all(((b > 0).sum() >= 12) for b, f in zip(batches, full) if f)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(start=5, end=4, num_timesteps=10), "start <= end"),
        (dict(start=0, end=10, num_timesteps=10), "end < num_timesteps"),
        (dict(start=0, end=5, num_timesteps=10, p_full=1.5), "p_full"),
        (dict(start=0, end=5, num_timesteps=0), "num_timesteps"),
    ],
)
def test_interval_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IntervalTimestepSampler(**kwargs)


# ---------------------------------------------------------------- density (Diff-Tuning)


def _empirical(sampler, n, seed=0):
    t = sampler.sample(n, generator=gen(seed))
    return torch.bincount(t, minlength=sampler.num_timesteps)


@pytest.mark.parametrize("kind", ["low_noise", "high_noise", "custom"])
def test_density_sampler_follows_its_density(kind):
    T, n = 10, 40000
    if kind == "low_noise":
        sampler, w = DensityTimestepSampler.low_noise(T), [T - t for t in range(T)]
    elif kind == "high_noise":
        sampler, w = DensityTimestepSampler.high_noise(T), [t + 1 for t in range(T)]
    else:
        w = [0, 5, 0, 1, 1, 0, 0, 3, 0, 0]
        sampler = DensityTimestepSampler(w)
    total = sum(w)
    counts = _empirical(sampler, n)
    for c, wt in zip(counts.tolist(), w):
        if wt == 0:
            assert c == 0
        else:
            assert_close_to_rate(c, n, wt / total)
    torch.testing.assert_close(sampler.probabilities, torch.tensor(w, dtype=torch.float64) / total)


@pytest.mark.parametrize(
    "weights, message",
    [([0.0, 0.0], "not all zero"), ([1.0, -1.0], "non-negative"), ([[1.0, 2.0]], "1-D"), ([1.0, math.nan], "finite")],
)
def test_density_bad_weights_raise(weights, message):
    with pytest.raises(ValueError, match=message):
        DensityTimestepSampler(weights)


# ---------------------------------------------------------------- factory


def test_get_timestep_sampler():
    assert isinstance(get_timestep_sampler("uniform", 100), UniformTimestepSampler)
    s = get_timestep_sampler("stratified", 1000, intervals=FakeIntervals(BOUNDS))
    assert isinstance(s, StratifiedTimestepSampler) and s.bounds == BOUNDS
    i = get_timestep_sampler("interval", 100, start=10, end=20, p_full=0.3)
    assert (i.start, i.end, i.p_full) == (10, 20, 0.3)
    assert get_timestep_sampler("low_noise", 10).probabilities[0] > get_timestep_sampler("high_noise", 10).probabilities[0]
    d = get_timestep_sampler("density", 3, weights=[1, 0, 0])
    assert d.sample(5, generator=gen()).tolist() == [0] * 5


def test_get_timestep_sampler_errors():
    with pytest.raises(ValueError, match=", ".join(TIMESTEP_SAMPLERS)):
        get_timestep_sampler("lognormal", 100)
    with pytest.raises(ValueError, match="needs intervals"):
        get_timestep_sampler("stratified", 1000)
    with pytest.raises(ValueError, match="cover 0..999 but the scheduler has 500"):
        get_timestep_sampler("stratified", 500, intervals=BOUNDS)
    with pytest.raises(ValueError, match="start=... and end="):
        get_timestep_sampler("interval", 100)
    with pytest.raises(ValueError, match="one weight per timestep"):
        get_timestep_sampler("density", 100, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="num_timesteps"):
        get_timestep_sampler("uniform", 0)


# ---------------------------------------------------------------- SD3's flow-matching densities


def sd3_index_probabilities(scheme, T, logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    """P(t = j), j = 0..T-1 (0 cleanest), of the SD3 script's map index = floor(u T), t = T - 1 - index,
    from the closed-form distribution of u (float64, independent of the sampler's code)."""
    import numpy as np
    from scipy.special import logit
    from scipy.stats import norm

    edges = np.arange(T + 1, dtype=np.float64) / T  # P(index = i) = P(edges[i] <= u < edges[i + 1])
    if scheme == "logit_normal":
        cdf = norm.cdf((logit(edges) - logit_mean) / logit_std)  # logit(0) = -inf, logit(1) = inf
    else:
        # u = f(v), v ~ U[0, 1), f decreasing from 1 to 0: P(u < x) = 1 - f^{-1}(x); invert by bisection
        f = lambda v: 1 - v - mode_scale * (np.cos(np.pi * v / 2) ** 2 - 1 + v)  # noqa: E731
        lo, hi = np.zeros_like(edges), np.ones_like(edges)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = f(mid) > edges
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        cdf = 1 - (lo + hi) / 2
    p_index = np.diff(cdf)
    return p_index[::-1] / p_index.sum()


def chi_square_p_value(draws, probabilities, num_bins=25):
    """Pearson's chi-square of integer draws against `probabilities`, over bins of about equal expected mass."""
    import numpy as np
    from scipy.stats import chisquare

    cum = np.cumsum(probabilities)
    bins = np.minimum((num_bins * (cum - probabilities / 2)).astype(int), num_bins - 1)
    observed = np.bincount(bins[draws.numpy()], minlength=num_bins)
    expected = np.bincount(bins, weights=probabilities, minlength=num_bins) * len(draws)
    return chisquare(observed, expected).pvalue


@pytest.mark.parametrize(
    "scheme,options",
    [("logit_normal", {}), ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.8}), ("mode", {}), ("mode", {"mode_scale": -0.5})],
)
def test_flow_matching_densities_follow_their_distribution(scheme, options):
    import numpy as np

    T, n = 1000, 200_000
    sampler = FlowMatchingDensitySampler(scheme, T, **options)
    draws = sampler.sample(n, generator=gen(11))
    assert draws.dtype == torch.long and draws.shape == (n,) and 0 <= int(draws.min()) and int(draws.max()) < T
    expected = sd3_index_probabilities(scheme, T, **options)
    assert chi_square_p_value(draws, expected) > 1e-3
    # the test has power: the uniform density, and (for an asymmetric density) the index order of
    # diffusers' timesteps without this project's reversal, are rejected on the same draws
    assert chi_square_p_value(draws, np.full(T, 1 / T)) < 1e-12
    if options.get("logit_mean"):
        assert chi_square_p_value(draws, expected[::-1].copy()) < 1e-12


def test_flow_matching_density_equals_the_sd3_script_draw_for_draw():
    """The same generator state gives the SD3 script's indices, reversed into this project's order."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from diffusers_ant.schedule import model_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    T = scheduler.config.num_train_timesteps
    for scheme in ("logit_normal", "mode"):
        u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=gen(3))
        script_timesteps = scheduler.timesteps[(u * T).long()]  # what train_dreambooth_lora_sd3.py feeds the model
        t = FlowMatchingDensitySampler(scheme, T).sample(64, generator=gen(3))
        assert torch.equal(model_timesteps(scheduler, t), script_timesteps)


def test_flow_matching_density_uses_only_the_generator():
    sampler = FlowMatchingDensitySampler("logit_normal", 1000)
    state = torch.get_rng_state()
    a = sampler.sample(50, generator=gen(5))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    assert torch.equal(a, sampler.sample(50, generator=gen(5)))
    assert not torch.equal(a, sampler.sample(50, generator=gen(6)))
    assert sampler.sample(0, generator=gen()).shape == (0,)
    assert isinstance(get_timestep_sampler("mode", 100, mode_scale=0.5), FlowMatchingDensitySampler)


def test_flow_matching_density_bad_arguments():
    with pytest.raises(ValueError, match="logit_normal, mode"):
        FlowMatchingDensitySampler("sigma_sqrt", 1000)
    with pytest.raises(ValueError, match="logit_std"):
        FlowMatchingDensitySampler("logit_normal", 1000, logit_std=0.0)
    with pytest.raises(ValueError, match="mode_scale must lie in"):
        FlowMatchingDensitySampler("mode", 1000, mode_scale=2.0)


# ---------------------------------------------------------------- dtypes every device has


_RANDOM_FUNCTIONS = {"rand", "randn", "randint", "randperm", "multinomial", "bernoulli", "normal", "uniform_", "random_"}


class _RecordRandomDraws(torch.overrides.TorchFunctionMode):
    """Records the float64 tensors that random draws produce or read (MPS has no float64)."""

    def __init__(self):
        super().__init__()
        self.float64_draws = []
        self.draws = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if getattr(func, "__name__", "") in _RANDOM_FUNCTIONS:
            self.draws += 1
            tensors = [a for a in (*args, *kwargs.values(), result) if isinstance(a, torch.Tensor)]
            if kwargs.get("dtype") == torch.float64 or any(t.dtype == torch.float64 for t in tensors):
                self.float64_draws.append(func.__name__)
        return result


@pytest.mark.parametrize("name", ["uniform", "stratified", "interval", "low_noise", "high_noise", "density"])
def test_no_sampler_draws_float64(name):
    kwargs = {"stratified": {"intervals": BOUNDS}, "interval": {"start": 10, "end": 20, "p_full": 0.3},
              "density": {"weights": [1.0] * 1000}}.get(name, {})
    sampler = get_timestep_sampler(name, 1000, **kwargs)
    with _RecordRandomDraws() as recorder:
        t = sampler.sample(64, generator=gen(0))
    assert recorder.draws > 0, "the recorder saw no random draw"
    assert recorder.float64_draws == [], f"{name} draws float64 ({recorder.float64_draws}), which MPS lacks"
    assert t.dtype == torch.long and ((t >= 0) & (t < 1000)).all()


def test_stratified_float32_draw_stays_inside_its_cluster(monkeypatch):
    # the largest float32 below 1 (and 0): floor(u * size) must give the cluster's last (first) index
    sampler = StratifiedTimestepSampler([(0, 2), (3, 999), (1000, 1000 + 2**23)])
    real_rand = torch.rand
    for value in (1.0 - 2.0**-24, 0.0):
        monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full(a[0] if isinstance(a[0], tuple) else (a[0],),
                                                                       value, dtype=k.get("dtype", torch.float32)))
        t, ids = sampler.sample_with_ids(30, generator=gen(0))
        monkeypatch.setattr(torch, "rand", real_rand)
        ends = torch.tensor([b for _, b in sampler.bounds])[ids]
        starts = torch.tensor([a for a, _ in sampler.bounds])[ids]
        assert torch.equal(t, ends if value > 0 else starts), (value, t)
