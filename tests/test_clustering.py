"""Interval clustering (ANT appendix G): the DP against brute force, the three objectives,
TimestepIntervals, and every bad input's error."""

import itertools
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, ScoreSdeVeScheduler

from diffusers_ant.clustering import (
    OBJECTIVES,
    AffinityCost,
    CentreDeviationCost,
    TimestepIntervals,
    cluster_timesteps,
    default_size_bounds,
    interpolate_affinity,
    interval_clustering,
)
from diffusers_ant.schedule import schedule_log_snr

# ---------------------------------------------------------------------------------------------
# brute force: every composition of T into k parts
# ---------------------------------------------------------------------------------------------


def compositions(T, k):
    """All size tuples (n_1..n_k), n_i >= 1, summing to T."""
    for cuts in itertools.combinations(range(1, T), k - 1):
        edges = (0,) + cuts + (T,)
        yield tuple(b - a for a, b in zip(edges, edges[1:]))


def sizes_to_bounds(sizes):
    ends = np.cumsum(sizes) - 1
    return [(int(e - n + 1), int(e)) for n, e in zip(sizes, ends)]


def brute_force(table, k, low, high):
    """Optimum under the documented tie rule: least cost, then least sum of squared sizes,
    then the last interval starting earliest, recursively. None when nothing is finite."""
    T = table.shape[0]
    best = None
    for sizes in compositions(T, k):
        if not all(low <= n <= high for n in sizes):
            continue
        bounds = sizes_to_bounds(sizes)
        cost = sum(table[s, e] for s, e in bounds)
        if not np.isfinite(cost):
            continue
        key = (cost, sum(n * n for n in sizes), tuple(s for s, _ in reversed(bounds)))
        if best is None or key < best[0]:
            best = (key, bounds)
    return best


def random_table(rng, T):
    kind = rng.integers(3)
    if kind == 0:  # small integers: many exact ties, exercising the tie rule
        table = rng.integers(0, 4, size=(T, T)).astype(float)
    elif kind == 1:
        table = rng.normal(size=(T, T))
    else:  # some forbidden intervals
        table = rng.integers(-3, 6, size=(T, T)).astype(float)
        table[rng.random((T, T)) < 0.3] = np.inf
    return table


def test_dp_equals_brute_force_on_random_tables():
    rng = np.random.default_rng(0)
    checked = infeasible = all_infinite = 0
    for _ in range(400):
        T = int(rng.integers(1, 10))
        k = int(rng.integers(1, T + 1))
        low = None if rng.random() < 0.3 else int(rng.integers(1, T + 1))
        high = None if rng.random() < 0.3 else int(rng.integers(1, T + 1))
        table = random_table(rng, T)
        lo, hi = low or 1, high or T
        if lo > hi or k * lo > T or k * hi < T:
            with pytest.raises(ValueError, match="min_size|max_size"):
                interval_clustering(table, T, k, low, high)
            infeasible += 1
            continue
        expected = brute_force(table, k, lo, hi)
        if expected is None:
            with pytest.raises(ValueError, match="infinite cost"):
                interval_clustering(table, T, k, low, high)
            all_infinite += 1
            continue
        (cost, _, _), bounds = expected
        result = interval_clustering(table, T, k, low, high)
        assert result.bounds == bounds, (table, k, low, high)
        assert result.metadata["cost"] == pytest.approx(cost, rel=1e-9, abs=1e-9)
        assert all(lo <= n <= hi for n in result.sizes)
        # the same cost as a plain callable gives the same answer
        assert interval_clustering(lambda s, e: table[s, e], T, k, low, high).bounds == bounds
        checked += 1
    assert checked > 150 and infeasible > 30 and all_infinite > 0


class CountingCost(CentreDeviationCost):
    """Counts the (start, end) pairs evaluated."""

    evaluations = 0

    def costs_ending_at(self, end, starts):
        CountingCost.evaluations += len(starts)
        return super().costs_ending_at(end, starts)


def test_cost_forms_agree_and_evaluations_are_at_most_T_times_max_size():
    rng = np.random.default_rng(1)
    values = np.cumsum(rng.random(60))
    vectorised = CountingCost(values)
    table = np.array([[vectorised(s, e) if s <= e else np.inf for e in range(60)] for s in range(60)])
    CountingCost.evaluations = 0
    result = interval_clustering(vectorised, 60, 4, 5, 25)
    assert CountingCost.evaluations <= 60 * 25
    assert interval_clustering(table, 60, 4, 5, 25) == result
    assert interval_clustering(torch.tensor(table), 60, 4, 5, 25) == result
    assert interval_clustering(lambda s, e: vectorised(s, e), 60, 4, 5, 25) == result


@pytest.mark.parametrize("monotone", [True, False])
def test_centre_deviation_cost_is_exact(monotone):
    rng = np.random.default_rng(2)
    f = np.cumsum(rng.random(40)) if monotone else rng.normal(size=40)
    cost = CentreDeviationCost(f)
    assert (cost.direction is not None) == monotone  # the O(1) prefix-sum path, or the table
    for a in range(40):
        for b in range(a, 40):
            c = (a + b) // 2
            assert cost(a, b) == pytest.approx(np.abs(f[a : b + 1] - f[c]).sum(), abs=1e-9)
    decreasing = CentreDeviationCost(-f)  # both monotone directions take the fast path
    assert decreasing(3, 30) == pytest.approx(cost(3, 30), abs=1e-9)


def test_affinity_cost_is_exact():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(30, 30))
    cost = AffinityCost(A)
    for a in range(30):
        for b in range(a, 30):
            assert cost(a, b) == pytest.approx(-A[(a + b) // 2, a : b + 1].sum(), abs=1e-9)


def check_partition(intervals, T, low, high):
    bounds = intervals.bounds
    assert bounds[0][0] == 0 and bounds[-1][1] == T - 1
    for (s0, e0), (s1, _) in zip(bounds, bounds[1:]):
        assert s0 <= e0 and s1 == e0 + 1
    assert sum(intervals.sizes) == T
    assert all(low <= n <= high for n in intervals.sizes)


# ---------------------------------------------------------------------------------------------
# the objectives
# ---------------------------------------------------------------------------------------------


def _count_cost_evaluations(monkeypatch):
    """Wrap every IntervalCost's vectorised `costs_ending_at`: [calls, (start, end) pairs evaluated]."""
    import diffusers_ant.clustering as clustering

    counts = [0, 0]
    for cls in (clustering.CentreDeviationCost, clustering.AffinityCost):
        original = cls.costs_ending_at

        def counting(self, end, starts, _original=original):
            counts[0] += 1
            counts[1] += len(starts)
            return _original(self, end, starts)

        monkeypatch.setattr(cls, "costs_ending_at", counting)
    return counts


@pytest.mark.parametrize("objective", ["timestep", "snr", "gradient"])
def test_T1000_k5_evaluates_each_interval_cost_once(objective, monkeypatch):
    """The DP's cost is counted, not timed (a timing on a shared machine measures the machine): one vectorised
    call per interval end, and each (start, end) pair a size-bounded partition can use (T x max_size at most)
    evaluated once for all k, where the reference code recomputes every interval per cluster count, O(k T^3)."""
    counts = _count_cost_evaluations(monkeypatch)
    affinity = np.random.default_rng(4).random((1000, 1000)) if objective == "gradient" else None
    intervals = cluster_timesteps(DDPMScheduler(), 5, objective, affinity=affinity)
    check_partition(intervals, 1000, 100, 400)
    calls, pairs = counts
    assert 0 < calls <= 1000 and 0 < pairs <= 1000 * (400 - 100 + 1), counts


def test_timestep_objective_gives_equal_intervals():
    intervals = cluster_timesteps(DDPMScheduler(), 5, "timestep")
    assert intervals.sizes == [200] * 5
    assert intervals.bounds == [(0, 199), (200, 399), (400, 599), (600, 799), (800, 999)]
    for T, k in [(1000, 3), (1000, 7), (997, 5), (50, 8)]:
        intervals = cluster_timesteps(T, k, "timestep")
        assert max(intervals.sizes) - min(intervals.sizes) <= 1, (T, k, intervals.sizes)
        assert intervals == TimestepIntervals.equal(T, k)


def test_snr_objective_on_linear_ddpm_is_sensible():
    scheduler = DDPMScheduler(beta_schedule="linear")
    low, high = default_size_bounds(1000, 5)
    intervals = cluster_timesteps(scheduler, 5, "snr")
    check_partition(intervals, 1000, low, high)
    assert intervals.metadata["objective"] == "snr" and intervals.metadata["log_snr"] is True
    # optimal: no worse than equal intervals under the same cost
    cost = CentreDeviationCost(schedule_log_snr(scheduler))
    equal_cost = sum(cost(s, e) for s, e in TimestepIntervals.equal(1000, 5))
    assert intervals.metadata["cost"] <= equal_cost
    assert intervals.metadata["cost"] == pytest.approx(sum(cost(s, e) for s, e in intervals))
    # log-SNR falls in t, so the log-SNR ranges of the intervals are disjoint and ordered
    log_snr = schedule_log_snr(scheduler).numpy()
    ranges = [(log_snr[s], log_snr[e]) for s, e in intervals]
    assert all(hi_prev > lo_next for (_, hi_prev), (lo_next, _) in zip(ranges, ranges[1:]))
    # raw SNR spans 1e-5..1e4 and collapses the clean end into tiny intervals (PAPERS.md): the
    # size bounds are what keep it usable
    raw_free = cluster_timesteps(scheduler, 5, "snr", log_snr=False, min_size=None, max_size=None)
    assert raw_free.sizes[0] < 10
    raw = cluster_timesteps(scheduler, 5, "snr", log_snr=False)
    check_partition(raw, 1000, low, high)
    assert raw.sizes[0] < intervals.sizes[0]


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True),  # log-SNR -inf at the end
        FlowMatchEulerDiscreteScheduler(shift=3.0),
    ],
)
def test_snr_objective_on_other_schedules(scheduler):
    intervals = cluster_timesteps(scheduler, 4, "snr")
    check_partition(intervals, 1000, *default_size_bounds(1000, 4))
    assert np.isfinite(intervals.metadata["cost"])


def block_affinity(sizes, outside=-0.5):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.where(labels[:, None] == labels[None, :], 1.0, outside), sizes_to_bounds(sizes)


def test_gradient_objective_recovers_blocks():
    affinity, blocks = block_affinity([150, 250, 200, 300, 100])
    assert cluster_timesteps(1000, 5, "gradient", affinity=affinity, min_size=None, max_size=None).bounds == blocks
    assert cluster_timesteps(DDPMScheduler(), 5, "gradient", affinity=torch.tensor(affinity)).bounds == blocks


def test_affinity_on_a_coarse_grid_is_interpolated():
    T = 200
    grid = np.array([0, 13, 50, 51, 120, 199])
    # bilinear interpolation reproduces a bilinear function exactly
    exact = lambda t, s: 0.3 + 0.01 * t - 0.02 * s + 1e-4 * t * s  # noqa: E731
    coarse = exact(grid[:, None], grid[None, :])
    full = interpolate_affinity(coarse, grid, T)
    ts = np.arange(T)
    np.testing.assert_allclose(full, exact(ts[:, None], ts[None, :]), atol=1e-12)
    # outside the grid the nearest grid value is kept
    full = interpolate_affinity(coarse[1:, 1:], grid[1:], T)
    np.testing.assert_allclose(full[:13, :13], coarse[1, 1])


def test_gradient_objective_on_a_coarse_grid(tmp_path):
    fine, blocks = block_affinity([200, 300, 250, 250])
    grid = np.arange(0, 1000, 25)  # 40 grid timesteps
    coarse = fine[np.ix_(grid, grid)]
    intervals = cluster_timesteps(1000, 4, "gradient", affinity=coarse, affinity_timesteps=grid)
    for (start, _), (true_start, _) in zip(intervals, blocks):
        assert abs(start - true_start) <= 25
    # the analysis tool's JSON gives the same result
    path = tmp_path / "affinity.json"
    path.write_text(json.dumps({"timesteps": grid.tolist(), "affinity": coarse.tolist()}))
    assert cluster_timesteps(1000, 4, "gradient", affinity=str(path)) == intervals
    assert cluster_timesteps(1000, 4, "gradient", affinity=path).bounds == intervals.bounds


# ---------------------------------------------------------------------------------------------
# TimestepIntervals
# ---------------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    intervals = cluster_timesteps(DDPMScheduler(), 5, "snr")
    again = TimestepIntervals.from_json(intervals.to_json())
    assert again == intervals and again.bounds == intervals.bounds
    assert again.metadata == intervals.metadata
    assert again.metadata["scheduler"] == "DDPMScheduler"
    assert json.loads(intervals.to_json())["sizes"] == intervals.sizes
    intervals.save(tmp_path / "intervals.json")
    assert TimestepIntervals.load(tmp_path / "intervals.json") == intervals
    assert all(isinstance(b, tuple) for b in again.bounds)


def test_assign_matches_bounds():
    intervals = TimestepIntervals([(0, 9), (10, 10), (11, 40), (41, 99)])
    assert len(intervals) == 4 and intervals.num_timesteps == 100 and intervals.sizes == [10, 1, 30, 59]
    expected = torch.tensor([next(i for i, (s, e) in enumerate(intervals) if s <= t <= e) for t in range(100)])
    for timesteps in (torch.arange(100), torch.arange(100, dtype=torch.int32), np.arange(100), list(range(100))):
        ids = intervals.assign(timesteps)
        assert ids.dtype == torch.long and torch.equal(ids, expected)
    assert intervals.assign(torch.arange(100).float()).tolist() == expected.tolist()
    assert intervals.assign(torch.arange(100).half()).tolist() == expected.tolist()
    assert intervals.assign(10).item() == 1
    assert intervals.assign(torch.tensor([], dtype=torch.long)).numel() == 0
    for bad in ([-1], [100], torch.tensor([5, 100])):
        with pytest.raises(ValueError, match="0..99"):
            intervals.assign(bad)
    with pytest.raises(ValueError, match="NaN"):
        intervals.assign(torch.tensor([float("nan")]))


def test_equal_and_iteration():
    intervals = TimestepIntervals.equal(10, 3)
    assert list(intervals) == [(0, 2), (3, 5), (6, 9)] and intervals[1] == (3, 5)
    assert "num_timesteps=10" in repr(intervals)


@pytest.mark.parametrize(
    "bounds, num_timesteps, message",
    [
        ([], None, "at least one"),
        ([(1, 9)], None, "start at timestep 0"),
        ([(0, 4), (6, 9)], None, "contiguous"),
        ([(0, 4), (4, 9)], None, "contiguous"),
        ([(0, 4), (5, 8)], 10, "end at T - 1 = 9"),
        ([(0, 4), (5, 3)], None, "inclusive"),
        ([(0, 4, 5)], None, "pair"),
        ([(0, 2.5)], None, "integer"),
    ],
)
def test_intervals_validation(bounds, num_timesteps, message):
    with pytest.raises(ValueError, match=message):
        TimestepIntervals(bounds, num_timesteps)


def test_from_json_errors():
    with pytest.raises(ValueError, match="not valid"):
        TimestepIntervals.from_json("{")
    with pytest.raises(ValueError, match="bounds"):
        TimestepIntervals.from_json('{"num_timesteps": 3}')
    with pytest.raises(ValueError, match="contiguous"):
        TimestepIntervals.from_json('{"bounds": [[0, 1], [3, 4]]}')


# ---------------------------------------------------------------------------------------------
# bad input: short ValueErrors that name the fix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, low, high, message",
    [
        (0, None, None, "num_clusters must be between 1 and"),
        (11, None, None, "num_clusters must be between 1 and"),
        (3, 4, None, "lower min_size or num_clusters"),
        (3, None, 3, "raise max_size or num_clusters"),
        (2, 5, 4, "lower min_size or raise max_size"),
        (2, 0, None, "min_size must be at least 1"),
        (2, None, 0, "max_size must be at least 1"),
        (2.5, None, None, "num_clusters must be an integer"),
    ],
)
def test_interval_clustering_errors(k, low, high, message):
    with pytest.raises(ValueError, match=message):
        interval_clustering(np.zeros((10, 10)), 10, k, low, high)


def test_bad_costs():
    with pytest.raises(ValueError, match=r"shape \(T, T\)"):
        interval_clustering(np.zeros((4, 5)), 5, 2)
    with pytest.raises(ValueError, match="callable"):
        interval_clustering("timestep", 5, 2)
    with pytest.raises(ValueError, match="finite or \\+inf"):
        interval_clustering(lambda s, e: float("nan"), 5, 2)


def test_cluster_timesteps_errors(tmp_path):
    scheduler = DDPMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError) as err:
        cluster_timesteps(scheduler, 5, "loss")
    assert all(name in str(err.value) for name in OBJECTIVES)
    with pytest.raises(ValueError, match="affinity"):
        cluster_timesteps(scheduler, 5, "gradient")
    with pytest.raises(ValueError, match="num_clusters must be between 1 and the number of timesteps 100"):
        cluster_timesteps(scheduler, 101, "snr")
    with pytest.raises(ValueError, match="no training noise schedule"):
        cluster_timesteps(ScoreSdeVeScheduler(), 5, "snr")
    with pytest.raises(ValueError, match="give the grid it was measured on"):
        cluster_timesteps(scheduler, 5, "gradient", affinity=np.eye(10))
    with pytest.raises(ValueError, match="square"):
        cluster_timesteps(scheduler, 5, "gradient", affinity=np.ones((100, 99)))
    with pytest.raises(ValueError, match="strictly increasing"):
        cluster_timesteps(scheduler, 5, "gradient", affinity=np.eye(3), affinity_timesteps=[0, 50, 20])
    with pytest.raises(ValueError, match=r"lie in 0\.\.99"):
        cluster_timesteps(scheduler, 5, "gradient", affinity=np.eye(3), affinity_timesteps=[0, 50, 100])
    with pytest.raises(ValueError, match="cannot read the affinity file"):
        cluster_timesteps(scheduler, 5, "gradient", affinity=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"timesteps": [0, 99]}')
    with pytest.raises(ValueError, match='"affinity" matrix'):
        cluster_timesteps(scheduler, 5, "gradient", affinity=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="lower min_size"):
        cluster_timesteps(scheduler, 5, "snr", min_size=30)
    with pytest.raises(ValueError, match='"default"'):
        cluster_timesteps(scheduler, 5, "snr", max_size="large")


def test_public_api_exports():
    import diffusers_ant

    assert diffusers_ant.interval_clustering is interval_clustering
    assert diffusers_ant.cluster_timesteps is cluster_timesteps
    assert diffusers_ant.TimestepIntervals is TimestepIntervals
