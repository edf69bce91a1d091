"""Interval clustering of the T denoising tasks into k timestep clusters (ANT, Go et al. 2023).

ANT (PAPERS.md section 1; the paper's Sec. 4.1 and appendix G) partitions the training
timesteps ``0 .. T-1`` (``t = 0`` the cleanest) into k contiguous intervals
``I_1 .. I_k`` minimising ``sum_i cost(I_i)``, solved exactly by the dynamic programme of
appendix G, eq. 6-7::

    D[i, m] = min_j  D[j - 1, m - 1] + cost(j, i)      (interval [j, i], inclusive)

with every interval's size n kept within ``min_size <= n <= max_size`` *inside* the
programme (eq. 7). Three costs, each with ``c`` the interval's centre timestep:

* ``timestep``: ``sum_{t in I} |t - c|`` (near-equal intervals);
* ``snr``: ``sum_{t in I} |f(t) - f(c)|`` with ``f`` the log-SNR (default) or the raw SNR;
* ``gradient``: ``- sum_{t in I} TAS(c, t)``, TAS the task-affinity matrix (cosine
  similarity of per-timestep gradients, appendix B).

Conventions used throughout:

* bounds are **inclusive and 0-based**: ``(start, end)`` covers ``start, ..., end``; the
  intervals of a partition cover ``0 .. T-1`` with no gap (the reference code was off by
  one here and hard-coded the last bound to 1000);
* the centre of ``[a, b]`` is ``c = (a + b) // 2`` (for an even size, the lower of the two
  middle timesteps);
* ties are broken deterministically: among partitions of equal cost (up to a relative
  1e-10, i.e. float rounding) the programme prefers the most balanced one (smallest sum of
  squared sizes), then the one whose last interval starts earliest, recursively. The
  balance rule matters: ``sum |t - c|`` is ``floor(n^2 / 4)`` for an interval of n
  timesteps, which is convex but not strictly, so e.g. sizes (199, 201) cost exactly as much
  as (200, 200); with the rule, the timestep objective returns equal intervals, the larger
  ones last when k does not divide T (as :meth:`TimestepIntervals.equal`).

The reference implementation's DP is O(k T^3) and ignores the size bounds; this one makes
O(T * max_size) <= O(T^2) cost evaluations, each O(1) thanks to prefix sums, and one
vectorised numpy min per end timestep, so T = 1000, k = 5 takes a few tens of milliseconds.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

OBJECTIVES = ("timestep", "snr", "gradient")
"""The clustering objectives of :func:`cluster_timesteps`."""

# Ties within this relative tolerance count as equal cost (see the module docstring): it only
# absorbs float rounding of the prefix sums, so the returned cost is optimal to ~1e-10.
_TIE_RTOL = 1e-10


# --------------------------------------------------------------------------------------------
# The result: a partition of 0..T-1 into inclusive intervals
# --------------------------------------------------------------------------------------------


def _as_int(value, name: str) -> int:
    """An integer argument (bools and non-integral floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(value)


class TimestepIntervals:
    """k contiguous, inclusive timestep intervals covering ``0 .. T-1`` (ANT's task clusters).

    Args:
        bounds: inclusive ``(start, end)`` pairs in order; the first starts at 0, each next
            one starts right after the previous end, the last ends at ``num_timesteps - 1``.
        num_timesteps: T; inferred from the last bound when omitted.
        metadata: free-form JSON-serialisable facts kept with the intervals (objective,
            scheduler class, size bounds, total cost, ...).

    ``intervals.assign(t)`` maps training timesteps to cluster ids;
    ``to_json`` / ``from_json`` (and ``save`` / ``load``) round-trip it through JSON.
    """

    def __init__(self, bounds: Sequence[Sequence[int]], num_timesteps: Optional[int] = None, metadata: Optional[dict] = None):
        pairs = []
        for pair in bounds:
            if isinstance(pair, (str, bytes)) or len(pair) != 2:
                raise ValueError(f"each bound must be a (start, end) pair, got {pair!r}.")
            pairs.append((_as_int(pair[0], "a bound's start"), _as_int(pair[1], "a bound's end")))
        if not pairs:
            raise ValueError("TimestepIntervals needs at least one (start, end) pair.")
        T = pairs[-1][1] + 1 if num_timesteps is None else _as_int(num_timesteps, "num_timesteps")
        if pairs[0][0] != 0:
            raise ValueError(f"the first interval must start at timestep 0, got {pairs[0]}.")
        for (s0, e0), (s1, e1) in zip(pairs, pairs[1:] + [(T, T)]):
            if e0 < s0:
                raise ValueError(f"interval {(s0, e0)} is empty: bounds are inclusive (start <= end).")
            if s1 != e0 + 1:
                what = f"the last interval must end at T - 1 = {T - 1}" if s1 == T else f"{(s1, e1)} must start at {e0 + 1}"
                raise ValueError(f"intervals must be contiguous and cover 0..{T - 1}: after {(s0, e0)}, {what}.")
        self._bounds = pairs
        self.num_timesteps = T
        self.metadata = dict(metadata or {})

    # -- construction helpers ----------------------------------------------------------------

    @classmethod
    def equal(cls, num_timesteps: int, num_clusters: int) -> "TimestepIntervals":
        """k intervals whose sizes differ by at most one, the larger ones last.

        This is what the ``timestep`` objective returns (see the module docstring).
        """
        T = _as_int(num_timesteps, "num_timesteps")
        k = _check_num_clusters(num_clusters, T)
        base, extra = divmod(T, k)
        sizes = [base] * (k - extra) + [base + 1] * extra
        ends = np.cumsum(sizes) - 1
        starts = np.concatenate([[0], ends[:-1] + 1])
        return cls(list(zip(starts.tolist(), ends.tolist())), T, metadata={"objective": "equal"})

    # -- views -------------------------------------------------------------------------------

    @property
    def bounds(self) -> list:
        """Inclusive ``(start, end)`` pairs, in order, covering ``0 .. T-1``."""
        return list(self._bounds)

    @property
    def sizes(self) -> list:
        """Number of timesteps in each interval."""
        return [e - s + 1 for s, e in self._bounds]

    def __len__(self) -> int:
        return len(self._bounds)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._bounds)

    def __getitem__(self, index: int) -> tuple:
        return self._bounds[index]

    def __eq__(self, other) -> bool:
        # metadata (objective, cost, ...) describes how the intervals were found, not what they are
        if not isinstance(other, TimestepIntervals):
            return NotImplemented
        return self._bounds == other._bounds and self.num_timesteps == other.num_timesteps

    def __repr__(self) -> str:
        return f"TimestepIntervals({self._bounds}, num_timesteps={self.num_timesteps})"

    # -- use ---------------------------------------------------------------------------------

    def assign(self, timesteps) -> torch.Tensor:
        """Cluster id (0 .. k-1) of each training timestep, as a LongTensor on its device.

        ``timesteps`` are training indices ``0 .. T-1`` (an int, a sequence, a numpy array or
        a tensor on any device); anything outside that range raises a ``ValueError``.
        Vectorised with ``torch.bucketize`` on the inclusive end bounds.
        """
        t = timesteps if isinstance(timesteps, torch.Tensor) else torch.as_tensor(np.asarray(timesteps))
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"timesteps must be real training indices in 0..{self.num_timesteps - 1}, got dtype {t.dtype}.")
        if t.numel():
            if t.is_floating_point() and bool(torch.isnan(t).any()):
                raise ValueError("timesteps contain NaN.")
            low, high = t.min().item(), t.max().item()  # one device sync, needed to validate
            if low < 0 or high > self.num_timesteps - 1:
                raise ValueError(
                    f"timesteps must lie in 0..{self.num_timesteps - 1} (training indices), got {low}..{high}."
                )
        if t.is_floating_point():
            t = t.float()  # bucketize lacks half-precision kernels on some devices
        ends = torch.tensor([e for _, e in self._bounds], device=t.device, dtype=t.dtype)
        # bucketize(right=False) returns i with ends[i-1] < t <= ends[i]: interval i is [ends[i-1] + 1, ends[i]]
        return torch.bucketize(t, ends, right=False)

    # -- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "num_timesteps": self.num_timesteps,
            "num_clusters": len(self),
            "bounds": [list(b) for b in self._bounds],
            "sizes": self.sizes,  # for readers; recomputed, not read back
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        """One key per line, each value compact (a k-row bounds list stays readable)."""
        items = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in self.to_dict().items()]
        return "{\n" + ",\n".join(items) + "\n}"

    @classmethod
    def from_json(cls, text: str) -> "TimestepIntervals":
        """Inverse of :meth:`to_json` (validates the bounds again)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid intervals JSON ({err}).") from None
        if not isinstance(data, dict) or not isinstance(data.get("bounds"), list):
            raise ValueError('intervals JSON must be an object with a "bounds" list of [start, end] pairs.')
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError('"metadata" in intervals JSON must be an object.')
        return cls(data["bounds"], data.get("num_timesteps"), metadata)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_json` to `path`, atomically (`files.write_text_atomically`)."""
        from .files import write_text_atomically

        write_text_atomically(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "TimestepIntervals":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


# --------------------------------------------------------------------------------------------
# Interval costs
# --------------------------------------------------------------------------------------------


class IntervalCost:
    """A cost over inclusive intervals ``[start, end]`` of ``0 .. T-1``, vectorised over starts.

    Subclasses implement :meth:`costs_ending_at`, which the dynamic programme calls once per
    end timestep with every start it needs; calling the object, ``cost(start, end)``, gives
    one value. Any plain callable ``cost(start, end) -> float`` or a ``T x T`` table
    ``cost[start, end]`` works with :func:`interval_clustering` as well, only slower.
    """

    num_timesteps: int

    def costs_ending_at(self, end: int, starts: np.ndarray) -> np.ndarray:
        """Cost of ``[s, end]`` for every ``s`` in ``starts`` (all ``<= end``), float64."""
        raise NotImplementedError

    def __call__(self, start: int, end: int) -> float:
        return float(self.costs_ending_at(int(end), np.array([int(start)]))[0])


class CentreDeviationCost(IntervalCost):
    """``cost([a, b]) = sum_{t=a}^{b} |f(t) - f(c)|`` with ``c = (a + b) // 2`` (ANT eq. 4).

    ``f = t`` gives the timestep objective, ``f = log SNR(t)`` the SNR objective.

    Exact for any ``f``. When ``f`` is monotone over ``0 .. T-1`` (log-SNR is, for every
    real schedule), ``f(t) - f(c)`` has one sign on ``[a, c]`` and the other on ``[c, b]``, so
    the sum splits at ``c`` into two prefix-sum differences: O(1) per interval, O(T)
    memory. Otherwise the costs of all intervals are tabulated once in O(T^2) time and
    memory, growing the windows around each centre by one timestep on each side (the
    intervals centred at ``c`` are exactly ``[c - r, c + r]`` and ``[c - r, c + r + 1]``).
    """

    def __init__(self, values):
        f = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
        if f.ndim != 1 or f.size == 0:
            raise ValueError("CentreDeviationCost needs a non-empty 1-D array of per-timestep values.")
        if not np.isfinite(f).all():
            raise ValueError("CentreDeviationCost values must be finite.")
        # deviations are shift-invariant: centring keeps the prefix sums small and precise
        self.values = f - f.mean()
        self.num_timesteps = f.size
        steps = np.diff(self.values)
        if (steps >= 0).all():
            self.direction = 1.0
        elif (steps <= 0).all():
            self.direction = -1.0
        else:
            self.direction = None
        if self.direction is not None:
            self._prefix = np.concatenate([[0.0], np.cumsum(self.values)])
            self._table = None
        else:
            self._table = self._tabulate(self.values)

    @staticmethod
    def _tabulate(f: np.ndarray) -> np.ndarray:
        T = f.size
        table = np.full((T, T), np.inf)  # table[a, b]; a > b never read
        for c in range(T):
            dev = np.abs(f - f[c])
            reach = min(c, T - 1 - c)  # odd windows [c - r, c + r], r = 0..reach
            r = np.arange(reach + 1)
            odd = np.cumsum(dev[c - r]) + np.cumsum(dev[c + r])  # dev[c] = 0, counted twice harmlessly
            table[c - r, c + r] = odd
            reach_even = min(c, T - 2 - c)  # even windows [c - r, c + r + 1]
            if reach_even >= 0:
                r = np.arange(reach_even + 1)
                table[c - r, c + r + 1] = odd[: reach_even + 1] + dev[c + r + 1]
        return table

    def costs_ending_at(self, end: int, starts: np.ndarray) -> np.ndarray:
        starts = np.asarray(starts, dtype=np.int64)
        if self._table is not None:
            return self._table[starts, end]
        centre = (starts + end) // 2
        f_c = self.values[centre]
        left_sum = self._prefix[centre + 1] - self._prefix[starts]  # t in [start, c]
        right_sum = self._prefix[end + 1] - self._prefix[centre + 1]  # t in (c, end]
        left_n = centre - starts + 1
        right_n = end - centre
        cost = self.direction * ((right_sum - right_n * f_c) - (left_sum - left_n * f_c))
        return np.maximum(cost, 0.0)  # exact value is >= 0; clip rounding noise


class AffinityCost(IntervalCost):
    """``cost([a, b]) = - sum_{t=a}^{b} TAS(c, t)`` with ``c = (a + b) // 2`` (ANT's gradient objective).

    ``affinity`` is the ``T x T`` task-affinity matrix (row = centre). Row-wise prefix sums
    make each cost O(1): ``-(R[c, b + 1] - R[c, a])``.
    """

    def __init__(self, affinity):
        A = np.asarray(affinity.detach().cpu() if isinstance(affinity, torch.Tensor) else affinity, dtype=np.float64)
        if A.ndim != 2 or A.shape[0] != A.shape[1] or A.size == 0:
            raise ValueError(f"the affinity matrix must be square (T x T), got shape {A.shape}.")
        if not np.isfinite(A).all():
            raise ValueError("the affinity matrix must be finite.")
        self.num_timesteps = A.shape[0]
        self._row_prefix = np.concatenate([np.zeros((A.shape[0], 1)), np.cumsum(A, axis=1)], axis=1)

    def costs_ending_at(self, end: int, starts: np.ndarray) -> np.ndarray:
        starts = np.asarray(starts, dtype=np.int64)
        centre = (starts + end) // 2
        return -(self._row_prefix[centre, end + 1] - self._row_prefix[centre, starts])


CostLike = Union[IntervalCost, Callable[[int, int], float], np.ndarray, torch.Tensor]


def _ending_costs(cost: CostLike, T: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """Adapt any accepted cost to ``f(end, starts) -> costs`` (see :func:`interval_clustering`)."""
    if hasattr(cost, "costs_ending_at"):
        return lambda end, starts: np.asarray(cost.costs_ending_at(end, starts), dtype=np.float64)
    if isinstance(cost, (np.ndarray, torch.Tensor)):
        table = np.asarray(cost.detach().cpu() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
        if table.shape != (T, T):
            raise ValueError(f"a cost table must have shape (T, T) = ({T}, {T}) indexed [start, end], got {table.shape}.")
        return lambda end, starts: table[starts, end]
    if callable(cost):
        return lambda end, starts: np.array([float(cost(int(s), end)) for s in starts], dtype=np.float64)
    raise ValueError(
        "cost must be a callable cost(start, end), an object with costs_ending_at(end, starts), "
        f"or a (T, T) table; got {type(cost).__name__}."
    )


# --------------------------------------------------------------------------------------------
# The dynamic programme
# --------------------------------------------------------------------------------------------


def _check_num_clusters(num_clusters, T: int) -> int:
    k = _as_int(num_clusters, "num_clusters")
    if k < 1 or k > T:
        raise ValueError(f"num_clusters must be between 1 and the number of timesteps {T}, got {k}.")
    return k


def _check_sizes(T: int, k: int, min_size, max_size) -> tuple:
    """Validated (min, max) interval sizes; ``None`` means unbounded (1 and T)."""
    low = 1 if min_size is None else _as_int(min_size, "min_size")
    high = T if max_size is None else _as_int(max_size, "max_size")
    if low < 1:
        raise ValueError(f"min_size must be at least 1 (or None), got {low}.")
    if high < 1:
        raise ValueError(f"max_size must be at least 1 (or None), got {high}.")
    if low > high:
        raise ValueError(f"min_size {low} is larger than max_size {high}: lower min_size or raise max_size.")
    if k * low > T:
        raise ValueError(f"{k} intervals of at least {low} timesteps need {k * low} > T = {T}: lower min_size or num_clusters.")
    if k * high < T:
        raise ValueError(f"{k} intervals of at most {high} timesteps cover only {k * high} < T = {T}: raise max_size or num_clusters.")
    return low, min(high, T)


def interval_clustering(
    cost: CostLike,
    num_timesteps: int,
    num_clusters: int,
    min_size: Optional[int] = None,
    max_size: Optional[int] = None,
) -> TimestepIntervals:
    """Exact minimum-cost partition of ``0 .. T-1`` into k contiguous intervals (ANT appendix G).

    Solves ``D[i, m] = min_j D[j-1, m-1] + cost(j, i)`` (eq. 6) with each interval's size
    ``n = i - j + 1`` restricted to ``min_size <= n <= max_size`` inside the recursion
    (eq. 7): starts giving other sizes are never considered, so the result is the optimum
    *under* the bounds, not an unconstrained optimum repaired afterwards.

    Args:
        cost: the cost of an inclusive, 0-based interval ``[start, end]``. One of
            - an :class:`IntervalCost` (or any object with
              ``costs_ending_at(end, starts) -> array``): vectorised, the fast path;
            - a callable ``cost(start, end) -> float`` (one Python call per interval);
            - a ``(T, T)`` array / tensor indexed ``[start, end]``.
            ``+inf`` marks a forbidden interval; NaN and ``-inf`` are refused.
        num_timesteps: T.
        num_clusters: k, between 1 and T.
        min_size, max_size: bounds on every interval's size; ``None`` means unbounded.

    Returns:
        :class:`TimestepIntervals` with ``metadata["cost"]``, the minimum total cost. Ties
        (equal cost up to float rounding) go to the most balanced partition, then to the
        one whose last interval starts earliest, recursively.

    Costs are evaluated for every (start, end) pair that a feasible partition can use:
    at most ``T * max_size`` evaluations, each vectorised over starts for an
    :class:`IntervalCost`.
    """
    T = _as_int(num_timesteps, "num_timesteps")
    if T < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {T}.")
    k = _check_num_clusters(num_clusters, T)
    low, high = _check_sizes(T, k, min_size, max_size)
    ending_costs = _ending_costs(cost, T)

    # best[m, n]: least cost of splitting timesteps 0..n-1 into m intervals (inf: impossible);
    # balance[m, n]: sum of squared sizes of that split (the tie-break); first[m, n]: start of
    # its last interval, for backtracking.
    best = np.full((k + 1, T + 1), np.inf)
    balance = np.full((k + 1, T + 1), np.inf)
    first = np.full((k + 1, T + 1), -1, dtype=np.int64)
    best[0, 0] = balance[0, 0] = 0.0

    for n in range(low, T + 1):
        end = n - 1
        # the last interval [s, end] has size n - s in [low, high]
        starts = np.arange(max(0, n - high), n - low + 1)
        prev_best = best[:k, starts]  # row m-1 feeds row m
        reachable = np.isfinite(prev_best).any(axis=0)
        if not reachable.any():
            continue
        starts, prev_best = starts[reachable], prev_best[:, reachable]
        costs = ending_costs(end, starts)
        if costs.shape != starts.shape:
            raise ValueError(f"cost returned {costs.shape} values for {starts.size} starts.")
        if np.isnan(costs).any() or np.isneginf(costs).any():
            bad = int(starts[np.isnan(costs) | np.isneginf(costs)][0])
            raise ValueError(f"cost({bad}, {end}) is {costs[starts == bad][0]}: costs must be finite or +inf.")
        total = prev_best + costs  # (k, S); inf stays inf
        lowest = total.min(axis=1)
        rows = np.nonzero(np.isfinite(lowest))[0]
        if rows.size == 0:
            continue
        total, lowest = total[rows], lowest[rows]
        near = total <= (lowest + _TIE_RTOL * np.maximum(1.0, np.abs(lowest)))[:, None]
        sizes = (n - starts).astype(np.float64)
        tie_break = np.where(near, balance[rows][:, starts] + sizes**2, np.inf)
        pick = tie_break.argmin(axis=1)  # first minimum = earliest start
        picked = np.arange(rows.size)
        best[rows + 1, n] = total[picked, pick]
        balance[rows + 1, n] = tie_break[picked, pick]
        first[rows + 1, n] = starts[pick]

    if not np.isfinite(best[k, T]):
        raise ValueError(
            f"every partition into {k} intervals within the size bounds has an infinite cost: "
            "allow more intervals (finite costs) or loosen min_size / max_size."
        )
    bounds, n = [], T
    for m in range(k, 0, -1):
        s = int(first[m, n])
        bounds.append((s, n - 1))
        n = s
    return TimestepIntervals(bounds[::-1], T, metadata={"cost": float(best[k, T])})


# --------------------------------------------------------------------------------------------
# The ANT objectives
# --------------------------------------------------------------------------------------------


def default_size_bounds(num_timesteps: int, num_clusters: int) -> tuple:
    """ANT appendix G's size bounds: ``min = T // (2k)`` (at least 1), ``max = ceil(2T / k)``."""
    T, k = int(num_timesteps), int(num_clusters)
    return max(1, T // (2 * k)), min(T, math.ceil(2 * T / k))


def interpolate_affinity(affinity, timesteps, num_timesteps: int) -> np.ndarray:
    """Bilinearly interpolate an affinity matrix measured on a timestep grid to ``T x T``.

    ``affinity[i, j]`` is the affinity of grid timesteps ``timesteps[i]`` and
    ``timesteps[j]`` (strictly increasing, within ``0 .. T-1``). Interpolation is separable:
    ``W A W^T`` with ``W[t, i]`` the linear-interpolation weight of grid point i at
    timestep t (``np.interp``); timesteps outside the grid take the value of the nearest grid
    point. Measuring affinity on a grid is what keeps the analysis affordable (the reference
    code stored T full gradients, see PAPERS.md).
    """
    A = np.asarray(affinity, dtype=np.float64)
    grid = np.asarray(timesteps, dtype=np.float64)
    T = int(num_timesteps)
    if grid.ndim != 1 or grid.size != A.shape[0]:
        raise ValueError(f"affinity_timesteps must list the {A.shape[0]} grid timesteps of the affinity matrix, got {grid.size}.")
    if grid.size > 1 and not (np.diff(grid) > 0).all():
        raise ValueError("affinity_timesteps must be strictly increasing.")
    if grid[0] < 0 or grid[-1] > T - 1:
        raise ValueError(f"affinity_timesteps must lie in 0..{T - 1} (training indices), got {grid[0]:g}..{grid[-1]:g}.")
    eye = np.eye(grid.size)
    weights = np.stack([np.interp(np.arange(T), grid, eye[i]) for i in range(grid.size)], axis=1)  # (T, G)
    return weights @ A @ weights.T


def load_affinity(path: Union[str, os.PathLike]) -> tuple:
    """Read ``{"timesteps": [...], "affinity": [[...]]}`` (the task-affinity tool's JSON).

    Returns ``(affinity, timesteps)``; ``timesteps`` is ``None`` when the file has none.
    """
    data = _read_affinity_file(path)
    return data["affinity"], data.get("timesteps")


def _read_affinity_file(path) -> dict:
    """The affinity file's JSON object, checked to hold an "affinity" matrix (one short error otherwise)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read the affinity file {os.fspath(path)!r}: {err.strerror}.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"the affinity file {os.fspath(path)!r} is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or "affinity" not in data:
        raise ValueError(f'the affinity file {os.fspath(path)!r} must be a JSON object with an "affinity" matrix.')
    return data


def _check_affinity_file_length(data: dict, path, num_timesteps: int) -> None:
    """An affinity file records the T of the model it was measured on: another T (another scheduler) is refused
    in one line, instead of being stretched (constant beyond the measured grid) or refused without the fix."""
    recorded = data.get("num_timesteps")
    if recorded is not None and int(recorded) != int(num_timesteps):
        raise ValueError(f"the affinity file {os.fspath(path)!r} was measured on a model of {recorded} timesteps and "
                         f"this scheduler has {num_timesteps}: re-run analyze.py affinity on this model")


def resolve_affinity(affinity, affinity_timesteps, num_timesteps: int) -> np.ndarray:
    """The ``T x T`` affinity from a matrix or a JSON path, interpolated from its grid if any.

    Accepts what :func:`cluster_timesteps` accepts as ``affinity`` / ``affinity_timesteps``.
    """
    T = int(num_timesteps)
    if isinstance(affinity, (str, os.PathLike)):
        data = _read_affinity_file(affinity)
        _check_affinity_file_length(data, affinity, T)
        matrix, file_grid = data["affinity"], data.get("timesteps")
        if affinity_timesteps is not None and file_grid is not None:
            raise ValueError("the affinity file already lists its timesteps: do not also pass affinity_timesteps.")
        affinity, affinity_timesteps = matrix, (affinity_timesteps if file_grid is None else file_grid)
    if isinstance(affinity, torch.Tensor):
        affinity = affinity.detach().cpu().numpy()
    try:
        A = np.asarray(affinity, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("the affinity matrix must be a square array of numbers.") from None
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.size == 0:
        raise ValueError(f"the affinity matrix must be square, got shape {A.shape}.")
    if not np.isfinite(A).all():
        raise ValueError("the affinity matrix must be finite.")
    if affinity_timesteps is None:
        if A.shape[0] != T:
            raise ValueError(
                f"the affinity matrix is {A.shape[0]}x{A.shape[0]} but the scheduler has {T} timesteps: "
                "give the grid it was measured on (the JSON's \"timesteps\", as analyze.py affinity writes it; "
                "affinity_timesteps= from Python)."
            )
        return A
    if isinstance(affinity_timesteps, torch.Tensor):
        affinity_timesteps = affinity_timesteps.detach().cpu().numpy()
    return interpolate_affinity(A, affinity_timesteps, T)


def _finite_curve(values: torch.Tensor, what: str) -> np.ndarray:
    """The SNR curve as float64 numpy, with infinite ends clamped to the nearest finite value.

    A zero-terminal-SNR schedule (and flow matching at s = 1) has SNR = 0, log-SNR = -inf,
    at t = T-1; that timestep is then treated like the least noisy finite one, which keeps
    every deviation finite and leaves the rest of the curve untouched.
    """
    f = values.detach().cpu().numpy().astype(np.float64)
    finite = np.isfinite(f)
    if np.isnan(f).any() or not finite.any():
        raise ValueError(f"the scheduler's {what} has no usable values (NaN or all infinite).")
    return np.clip(f, f[finite].min(), f[finite].max())


def _scheduler_timesteps(scheduler) -> int:
    if isinstance(scheduler, (int, np.integer)) and not isinstance(scheduler, bool):
        return int(scheduler)
    config = getattr(scheduler, "config", None)
    T = getattr(config, "num_train_timesteps", None) if config is not None else None
    if T is None:
        raise ValueError(f"{type(scheduler).__name__} has no config.num_train_timesteps: pass a diffusers training scheduler.")
    return int(T)


def cluster_timesteps(
    scheduler,
    num_clusters: int,
    objective: str = "snr",
    affinity=None,
    min_size: Union[int, None, str] = "default",
    max_size: Union[int, None, str] = "default",
    log_snr: bool = True,
    affinity_timesteps=None,
) -> TimestepIntervals:
    """Cluster a scheduler's T training timesteps into k intervals with an ANT objective.

    Args:
        scheduler: a diffusers training scheduler (DDPM family or flow matching, see
            :func:`diffusers_ant.schedule.schedule_snr`). For the ``timestep`` and
            ``gradient`` objectives an ``int`` T works too.
        num_clusters: k (ANT's default is 5).
        objective: ``"timestep"`` (``sum |t - c|``), ``"snr"`` (``sum |f(t) - f(c)|``,
            ``f`` the log-SNR, or the raw SNR with ``log_snr=False``) or ``"gradient"``
            (``- sum TAS(c, t)``); ``c = (a + b) // 2`` is the centre of ``[a, b]``.
        affinity: for ``gradient``: the task-affinity matrix, ``T x T``, or ``G x G`` on the
            grid ``affinity_timesteps`` (bilinearly interpolated to ``T x T``), or the path
            of a JSON file ``{"timesteps": [...], "affinity": [[...]]}``.
        min_size, max_size: interval size bounds. ``"default"``: ANT appendix G's
            ``T // (2k)`` and ``ceil(2T / k)``; ``None``: unbounded. On raw SNR the bounds
            are essential: a linear schedule's SNR spans four orders of magnitude and
            collapses the clean end into tiny intervals.
        log_snr: cluster on log-SNR (default) or raw SNR; ``snr`` objective only.
        affinity_timesteps: the grid of a coarse ``affinity`` matrix.

    Returns:
        :class:`TimestepIntervals` whose metadata records the objective, the scheduler
        class, the size bounds and the total cost.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown clustering objective {objective!r}; use one of {', '.join(OBJECTIVES)}.")
    if objective == "gradient" and affinity is None:
        raise ValueError(
            "the gradient objective needs a task-affinity matrix: pass affinity= (a matrix or the JSON "
            "written by the task-affinity analysis tool; run that tool first)."
        )
    if objective == "snr":
        from .schedule import schedule_log_snr, schedule_snr

        if isinstance(scheduler, (int, np.integer)):
            raise ValueError("the snr objective needs a scheduler, not a number of timesteps.")
        curve = schedule_log_snr(scheduler) if log_snr else schedule_snr(scheduler)
        cost = CentreDeviationCost(_finite_curve(curve, "log-SNR" if log_snr else "SNR"))
        T = cost.num_timesteps
    else:
        T = _scheduler_timesteps(scheduler)
        if objective == "timestep":
            cost = CentreDeviationCost(np.arange(T, dtype=np.float64))
        else:
            cost = AffinityCost(resolve_affinity(affinity, affinity_timesteps, T))
    k = _check_num_clusters(num_clusters, T)
    default_low, default_high = default_size_bounds(T, k)
    low = default_low if isinstance(min_size, str) and min_size == "default" else min_size
    high = default_high if isinstance(max_size, str) and max_size == "default" else max_size
    for name, value in (("min_size", low), ("max_size", high)):
        if isinstance(value, str):
            raise ValueError(f'{name} must be an integer, None (unbounded) or "default", got {value!r}.')
    result = interval_clustering(cost, T, k, min_size=low, max_size=high)
    metadata = {
        "objective": objective,
        "scheduler": type(scheduler).__name__ if not isinstance(scheduler, (int, np.integer)) else None,
        "min_size": low,
        "max_size": high,
        **result.metadata,
    }
    if objective == "snr":
        metadata["log_snr"] = bool(log_snr)
    return TimestepIntervals(result.bounds, T, metadata=metadata)


__all__ = [
    "OBJECTIVES",
    "TimestepIntervals",
    "IntervalCost",
    "CentreDeviationCost",
    "AffinityCost",
    "interval_clustering",
    "cluster_timesteps",
    "default_size_bounds",
    "interpolate_affinity",
    "load_affinity",
    "resolve_affinity",
]
