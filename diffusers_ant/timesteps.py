"""Timestep samplers: which training indices t (0 = cleanest) a batch is trained on.

* :class:`UniformTimestepSampler`: t ~ U{0..T-1}, what every diffusers script does.
* :class:`StratifiedTimestepSampler`: ANT's stratified batch (Go et al. 2023, section 4.2 and
  the reference code): the batch is split into k equal slices and slice i draws t uniformly
  from cluster I_i, so every cluster loss is present in every batch.
* :class:`IntervalTimestepSampler`: one interval, with DeMe's probabilistic sampling (a draw
  from the whole range with probability p; p = 0.3 in the authors' scripts).
* :class:`DensityTimestepSampler`: any density over timesteps, e.g. Diff-Tuning's
  psi(t) ∝ T - t (knowledge retention) and xi(t) ∝ t + 1 (reconsolidation).
* :class:`FlowMatchingDensitySampler`: SD3's ``logit_normal`` and ``mode`` timestep densities
  for flow matching, drawn by diffusers' ``compute_density_for_timestep_sampling``.
* :class:`StratifiedDensitySampler`: ANT's stratified batch with such a density inside each cluster.

Every draw goes through the ``torch.Generator`` passed in (on the generator's device, then
moved to ``device``), so a seed gives the same timesteps on CPU and GPU. No draw uses float64,
which MPS (Apple Silicon) lacks: random numbers are integers or float32.
"""

from __future__ import annotations

import math

import torch

TIMESTEP_SAMPLERS = ("uniform", "stratified", "interval", "density", "low_noise", "high_noise")
FLOW_DENSITY_SCHEMES = ("logit_normal", "mode")
# SD3 (Esser et al. 2024, eq. 20): the mode density is monotone, hence a density on [0, 1], for -1 <= s <= 2 / (pi - 2)
_MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


def _draw_device(generator: torch.Generator | None, device) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int; got {batch_size!r}.")


def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int (the scheduler's num_train_timesteps); got {num_timesteps!r}.")


class TimestepSampler:
    """Base class: ``sample(batch_size, generator=None, device=None) -> LongTensor[B]``."""

    num_timesteps: int

    def sample(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_timesteps={self.num_timesteps})"


class UniformTimestepSampler(TimestepSampler):
    """t ~ U{0..T-1}, the sampler of diffusers' training scripts."""

    def __init__(self, num_timesteps: int):
        _check_num_timesteps(num_timesteps)
        self.num_timesteps = num_timesteps

    def sample(self, batch_size, generator=None, device=None):
        _check_batch_size(batch_size)
        t = torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=_draw_device(generator, device)
        )
        return t.to(device) if device is not None else t


def _validate_bounds(bounds) -> list[tuple[int, int]]:
    """Inclusive (start, end) pairs that partition 0..T-1 in order; ValueError otherwise."""
    bounds = getattr(bounds, "bounds", bounds)  # a TimestepIntervals or a plain list
    try:
        pairs = [(int(a), int(b)) for a, b in bounds]
    except (TypeError, ValueError):
        raise ValueError("bounds must be a list of inclusive (start, end) int pairs, e.g. [(0, 499), (500, 999)].") from None
    if not pairs:
        raise ValueError("bounds is empty; pass at least one (start, end) pair covering 0..T-1.")
    if pairs[0][0] != 0:
        raise ValueError(f"bounds must start at timestep 0; the first interval is {pairs[0]}.")
    for i, (start, end) in enumerate(pairs):
        if end < start:
            raise ValueError(f"interval {i} {(start, end)} has end < start; bounds are inclusive (start, end) pairs.")
        if i and start != pairs[i - 1][1] + 1:
            raise ValueError(
                f"intervals {i - 1} {pairs[i - 1]} and {i} {(start, end)} are not contiguous; "
                "each start must be the previous end + 1."
            )
    return pairs


class StratifiedTimestepSampler(TimestepSampler):
    """ANT's stratified batch: every timestep cluster gets an equal share of the batch.

    ``bounds``: inclusive ``(start, end)`` pairs partitioning 0..T-1, or any object with a
    ``.bounds`` attribute (a ``TimestepIntervals``). A batch of ``B = q k + r`` samples gives
    ``q`` samples to every cluster and one more to ``r`` distinct clusters chosen at random
    (so for ``B < k`` each cluster is present with probability B / k and none twice); within a
    cluster t is uniform. The batch comes in cluster order, slice i holding cluster i, as in
    the reference code. The reference code needs B divisible by k; this sampler does not.
    """

    def __init__(self, bounds):
        self.bounds = _validate_bounds(bounds)
        self.num_timesteps = self.bounds[-1][1] + 1
        self._starts = torch.tensor([a for a, _ in self.bounds], dtype=torch.long)
        self._sizes = torch.tensor([b - a + 1 for a, b in self.bounds], dtype=torch.long)

    @property
    def num_clusters(self) -> int:
        return len(self.bounds)

    def cluster_counts(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """How many samples each cluster gets in a batch of ``batch_size`` -> LongTensor[k] (CPU)."""
        _check_batch_size(batch_size)
        k = self.num_clusters
        q, r = divmod(batch_size, k)
        counts = torch.full((k,), q, dtype=torch.long)
        if r:
            lucky = torch.randperm(k, generator=generator, device=_draw_device(generator, None)).cpu()[:r]
            counts[lucky] += 1
        return counts

    def sample_with_ids(self, batch_size, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``[B]`` and the cluster id of each ``[B]``, both LongTensors on ``device``."""
        counts = self.cluster_counts(batch_size, generator)
        # cluster id of batch position j: how many cluster slices end at or before j (the same as
        # repeat_interleave(arange(k), counts), which takes milliseconds on a busy CPU; this takes microseconds)
        ids = torch.searchsorted(counts.cumsum(0), torch.arange(batch_size), right=True)
        draw = _draw_device(generator, device)
        # t = start + floor(u * size) with u ~ U[0, 1): uniform over the cluster's integers for
        # every cluster at once. u is float32 because MPS (Apple Silicon) has no float64. Rounded
        # to nearest, the float32 product of u < 1 and a size below 2**24 stays below the size,
        # and its 2**24 equally likely values put each of the size integers within size / 2**24
        # of its exact share; the clamp keeps t inside its cluster whatever the rounding mode.
        u = torch.rand(batch_size, generator=generator, device=draw, dtype=torch.float32).cpu()
        sizes = self._sizes[ids]
        offset = torch.minimum((u * sizes.float()).long(), sizes - 1)
        t = self._starts[ids] + offset
        if device is not None:
            t, ids = t.to(device), ids.to(device)
        return t, ids

    def sample(self, batch_size, generator=None, device=None):
        return self.sample_with_ids(batch_size, generator, device)[0]

    def __repr__(self) -> str:
        return f"StratifiedTimestepSampler(bounds={self.bounds})"


class IntervalTimestepSampler(TimestepSampler):
    """t uniform in ``[start, end]`` (inclusive), with DeMe's probabilistic sampling.

    Each sample is drawn from the whole range ``[0, num_timesteps)`` instead with probability
    ``p_full`` (DeMe, "Decouple-Then-Merge", section 3: it keeps a copy fine-tuned on one
    interval from forgetting the others; p = 0.3 in the authors' scripts). Where the coin is flipped:

    * ``per_batch=False`` (default): once per sample;
    * ``per_batch=True``: once per group of ``group_size`` consecutive rows (the rows of one
      micro-batch: a window of gradient-accumulation micro-batches is drawn in one call, its
      micro-batches one after the other), or once per call when ``group_size`` is None. The
      authors flip it once per data-loader batch, before ``accelerator.accumulate``
      (MqLeet/DeMe ``train_unconditional_deme.py``: ``if random.random() < args.kd_global_ratio``),
      i.e. once per micro-batch: ``group_size`` = the micro-batch size.

    ``antithetic=True`` (needs ``per_batch``): the authors' pairing. Each group draws half its rows
    uniformly in the range its coin chose, ``[lo, hi]``, and mirrors them, ``lo + hi - t`` (their
    ``kd_high + kd_low - t - 1`` with an exclusive ``kd_high``; ``T - 1 - t`` for the whole range),
    so the group's mean timestep is the range's centre. An odd group keeps one unpaired draw; the
    authors draw ``B // 2 + 1`` and cut to ``B``, which leaves two draws unpaired in an even batch.
    """

    def __init__(self, start: int, end: int, num_timesteps: int, p_full: float = 0.0, per_batch: bool = False,
                 group_size: int | None = None, antithetic: bool = False):
        _check_num_timesteps(num_timesteps)
        if not (0 <= start <= end < num_timesteps):
            raise ValueError(f"need 0 <= start <= end < num_timesteps={num_timesteps}; got start={start}, end={end}.")
        if not (0.0 <= p_full <= 1.0):
            raise ValueError(f"p_full is a probability in [0, 1] (DeMe uses 0.3); got {p_full}.")
        if group_size is not None and (not per_batch or int(group_size) < 1):
            raise ValueError(f"group_size ({group_size}) is the rows per coin of per_batch=True: give per_batch=True and a size >= 1.")
        if antithetic and not per_batch:
            raise ValueError("antithetic pairs share their coin: give per_batch=True (a coin per micro-batch).")
        self.start, self.end, self.num_timesteps = int(start), int(end), num_timesteps
        self.p_full, self.per_batch = float(p_full), per_batch
        self.group_size = None if group_size is None else int(group_size)
        self.antithetic = bool(antithetic)

    def sample(self, batch_size, generator=None, device=None):
        _check_batch_size(batch_size)
        draw = _draw_device(generator, device)
        if self.group_size is None and not self.antithetic:
            # one coin per sample, or one per call: the original draws, unchanged
            inside = torch.randint(self.start, self.end + 1, (batch_size,), generator=generator, device=draw)
            full = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=draw)
            coins = torch.rand(1 if self.per_batch else batch_size, generator=generator, device=draw)
            t = torch.where(coins < self.p_full, full, inside)
            return t.to(device) if device is not None else t
        size = self.group_size or max(batch_size, 1)
        lengths = [min(size, batch_size - offset) for offset in range(0, batch_size, size)]
        coins = torch.rand(len(lengths), generator=generator, device=draw)
        parts = []
        for length, coin in zip(lengths, coins.tolist()):
            lo, hi = (0, self.num_timesteps - 1) if coin < self.p_full else (self.start, self.end)
            if self.antithetic:
                half = torch.randint(lo, hi + 1, ((length + 1) // 2,), generator=generator, device=draw)
                parts.append(torch.cat([half, lo + hi - half])[:length])
            else:
                parts.append(torch.randint(lo, hi + 1, (length,), generator=generator, device=draw))
        t = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=draw)
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return (
            f"IntervalTimestepSampler(start={self.start}, end={self.end}, num_timesteps={self.num_timesteps}, "
            f"p_full={self.p_full}, per_batch={self.per_batch}, group_size={self.group_size}, antithetic={self.antithetic})"
        )


class DensityTimestepSampler(TimestepSampler):
    """t drawn with probability proportional to ``weights[t]`` (with replacement).

    ``weights``: any non-negative 1-D sequence of length T with a positive sum.
    """

    def __init__(self, weights):
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        if w.ndim != 1 or w.numel() < 1:
            raise ValueError(f"weights must be a 1-D sequence with one weight per timestep; got shape {tuple(w.shape)}.")
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero.")
        self.probabilities = w / w.sum()
        self.num_timesteps = int(w.numel())

    @classmethod
    def low_noise(cls, num_timesteps: int) -> "DensityTimestepSampler":
        """Diff-Tuning's retention density psi(t) ∝ T - t (Zhong et al. 2024): favours t near 0."""
        _check_num_timesteps(num_timesteps)
        return cls(num_timesteps - torch.arange(num_timesteps, dtype=torch.float64))

    @classmethod
    def high_noise(cls, num_timesteps: int) -> "DensityTimestepSampler":
        """Diff-Tuning's reconsolidation density xi(t) ∝ t + 1 (Zhong et al. 2024): favours t near T."""
        _check_num_timesteps(num_timesteps)
        return cls(torch.arange(num_timesteps, dtype=torch.float64) + 1)

    def sample(self, batch_size, generator=None, device=None):
        _check_batch_size(batch_size)
        if batch_size == 0:
            t = torch.zeros(0, dtype=torch.long)
        else:
            # float32 on the draw device: MPS (Apple Silicon) has no float64. The float64
            # `probabilities` stay on the CPU, exact, for whoever reads them.
            probs = self.probabilities.to(_draw_device(generator, device), torch.float32)
            t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return t.to(device) if device is not None else t


class FlowMatchingDensitySampler(TimestepSampler):
    """SD3's timestep densities over the training indices (Esser et al. 2024, "Scaling Rectified
    Flow Transformers for High-Resolution Image Synthesis", section 3.1).

    ``weighting_scheme``: ``logit_normal`` (``u = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)``;
    SD3 trains with 0 and 1) or ``mode`` (``u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v)``,
    ``v ~ U[0, 1)``; 1.29 in diffusers' scripts). ``u`` is drawn by diffusers'
    ``compute_density_for_timestep_sampling`` (float32, through ``generator``: never the global
    RNG and no float64, which MPS lacks) and mapped to a training index exactly as diffusers'
    ``train_dreambooth_lora_sd3.py`` does: ``indices = (u * T).long()`` into the scheduler's
    ``timesteps``, which run from the noisiest, i.e. this project's ``t = T - 1 - index`` (index
    0 is the cleanest here). The scheduler's ``shift`` acts through the sigma of each index, as in
    the script. ``u`` is thus ``1 - sigma`` up to the shift: the paper's density is over sigma, so a
    positive ``logit_mean`` favours *low* noise here as in diffusers' script (the default 0 and the
    mode density are symmetric, so nothing changes for them).

    One departure: the index is clamped to T - 1, because the mode density returns u = 1 when the
    uniform draw is exactly 0 (probability 2^-24), which would index past the end in the script.
    For flow-matching schedulers only (the caller checks with
    :func:`diffusers_ant.schedule.check_weighting_scheme`); this sampler replaces stratified sampling
    (the clusters are assigned after the draw); :class:`StratifiedDensitySampler` combines the two.
    """

    def __init__(self, weighting_scheme: str, num_timesteps: int, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        _check_num_timesteps(num_timesteps)
        if weighting_scheme not in FLOW_DENSITY_SCHEMES:
            raise ValueError(f"unknown timestep density {weighting_scheme!r}; use one of {', '.join(FLOW_DENSITY_SCHEMES)}.")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0 (SD3 uses 1.0); got {logit_std}.")
        low, high = _MODE_SCALE_RANGE
        if not low <= mode_scale <= high:
            raise ValueError(f"mode_scale must lie in [{low:g}, {high:.4f}] for the mode density to be monotone (SD3 uses 1.29); got {mode_scale}.")
        self.weighting_scheme, self.num_timesteps = weighting_scheme, num_timesteps
        self.logit_mean, self.logit_std, self.mode_scale = float(logit_mean), float(logit_std), float(mode_scale)

    def sample(self, batch_size, generator=None, device=None):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        _check_batch_size(batch_size)
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, batch_size, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, device=_draw_device(generator, device), generator=generator,
        )
        indices = (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)
        t = (self.num_timesteps - 1) - indices
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return (
            f"FlowMatchingDensitySampler({self.weighting_scheme!r}, num_timesteps={self.num_timesteps}, "
            f"logit_mean={self.logit_mean}, logit_std={self.logit_std}, mode_scale={self.mode_scale})"
        )


def get_timestep_sampler(name: str, num_timesteps: int, intervals=None, **kwargs) -> TimestepSampler:
    """Build a sampler by name: one of :data:`TIMESTEP_SAMPLERS`.

    ``uniform``; ``stratified`` (needs ``intervals``: bounds or a ``TimestepIntervals``
    covering 0..num_timesteps-1); ``interval`` (keyword ``start``, ``end``, optional
    ``p_full``, ``per_batch``); ``density`` (keyword ``weights``); ``low_noise`` /
    ``high_noise`` (Diff-Tuning's psi / xi); ``logit_normal`` / ``mode`` (SD3's flow-matching
    densities, keywords ``logit_mean``, ``logit_std``, ``mode_scale``).
    """
    _check_num_timesteps(num_timesteps)
    if name == "uniform":
        return UniformTimestepSampler(num_timesteps, **kwargs)
    if name == "stratified":
        if intervals is None:
            raise ValueError("the stratified sampler needs intervals: pass intervals=cluster_timesteps(...) or bounds.")
        sampler = StratifiedTimestepSampler(intervals, **kwargs)
        if sampler.num_timesteps != num_timesteps:
            raise ValueError(
                f"intervals cover 0..{sampler.num_timesteps - 1} but the scheduler has {num_timesteps} timesteps; "
                "cluster with the same scheduler."
            )
        return sampler
    if name == "interval":
        if "start" not in kwargs or "end" not in kwargs:
            raise ValueError("the interval sampler needs start=... and end=... (inclusive training indices).")
        return IntervalTimestepSampler(num_timesteps=num_timesteps, **kwargs)
    if name == "density":
        weights = kwargs.get("weights")
        if weights is None or len(weights) != num_timesteps:
            raise ValueError(f"the density sampler needs weights=... with one weight per timestep ({num_timesteps}).")
        return DensityTimestepSampler(weights)
    if name == "low_noise":
        return DensityTimestepSampler.low_noise(num_timesteps)
    if name == "high_noise":
        return DensityTimestepSampler.high_noise(num_timesteps)
    if name in FLOW_DENSITY_SCHEMES:
        return FlowMatchingDensitySampler(name, num_timesteps, **kwargs)
    names = TIMESTEP_SAMPLERS + FLOW_DENSITY_SCHEMES
    raise ValueError(f"unknown timestep sampler {name!r}; use one of {', '.join(names)}.")


def flow_density_masses(weighting_scheme: str, num_timesteps: int, logit_mean: float = 0.0, logit_std: float = 1.0,
                        mode_scale: float = 1.29) -> torch.Tensor:
    """The probability of each training index t (0 = cleanest) under :class:`FlowMatchingDensitySampler`,
    float64 [T], computed exactly instead of drawn.

    The sampler's index is ``floor(u T)`` of diffusers' ``u`` and ``t = T - 1 - index``, so
    ``P(t) = P(i / T <= u < (i + 1) / T)`` with ``i = T - 1 - t``. ``logit_normal``: ``u = sigmoid(n)``,
    ``n ~ N(mean, std^2)``, a difference of two normal CDFs at ``logit(i / T)``. ``mode``: ``u(v)``
    falls monotonically from 1 to 0 over ``v ~ U[0, 1)`` (SD3 eq. 20 for a valid scale), so the mass
    is the length of the ``v`` interval mapped into the bin, whose ends are found by bisection."""
    edges = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # u-bin edges of index i
    if weighting_scheme == "logit_normal":
        logits = torch.logit(edges)  # -inf at 0, +inf at 1
        cdf = torch.special.ndtr((logits - logit_mean) / logit_std)
    elif weighting_scheme == "mode":
        def u_of(v):
            return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)

        low, high = torch.zeros_like(edges), torch.ones_like(edges)
        for _ in range(60):  # v with u(v) = edge; u decreases in v
            mid = (low + high) / 2
            above = u_of(mid) > edges
            low, high = torch.where(above, mid, low), torch.where(above, high, mid)
        cdf = 1.0 - (low + high) / 2  # P(u < edge) = P(v > v(edge))
    else:
        raise ValueError(f"unknown timestep density {weighting_scheme!r}; use one of {', '.join(FLOW_DENSITY_SCHEMES)}.")
    index_mass = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return torch.flip(index_mass, dims=[0]) / index_mass.sum()  # index i -> t = T - 1 - i


class StratifiedDensitySampler(StratifiedTimestepSampler):
    """ANT's stratified batch on a flow-matching density: every cluster gets its equal share of the
    batch (:class:`StratifiedTimestepSampler`), and inside its cluster t follows the density
    (``logit_normal`` / ``mode``, :func:`flow_density_masses`) restricted to the cluster, instead of
    uniform. The two compose: the clusters decide how often each noise range is trained (equal shares,
    then the MTL weighting), the density how the draws spread inside a range. A scheduler's shift needs
    no extra step: it lives in the sigma of each index, on which both act.

    One uniform number per sample (float32, from ``generator``), mapped through the cluster's
    conditional CDF; a cluster the density gives no mass at all (a far tail in float64) is drawn uniformly."""

    def __init__(self, bounds, weighting_scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        super().__init__(bounds)
        self.weighting_scheme = weighting_scheme
        FlowMatchingDensitySampler(weighting_scheme, self.num_timesteps, logit_mean, logit_std, mode_scale)  # checks
        self.masses = flow_density_masses(weighting_scheme, self.num_timesteps, logit_mean, logit_std, mode_scale)
        self._cdf = torch.cumsum(self.masses, 0)

    def sample_with_ids(self, batch_size, generator=None, device=None):
        counts = self.cluster_counts(batch_size, generator)
        ids = torch.searchsorted(counts.cumsum(0), torch.arange(batch_size), right=True)
        u = torch.rand(batch_size, generator=generator, device=_draw_device(generator, device), dtype=torch.float32).cpu()
        starts, sizes = self._starts[ids], self._sizes[ids]
        ends = starts + sizes - 1
        before = torch.where(starts > 0, self._cdf[(starts - 1).clamp_min(0)], torch.zeros((), dtype=torch.float64))
        mass = self._cdf[ends] - before
        target = before + u.double() * mass
        t = torch.searchsorted(self._cdf, target, right=True)
        t = torch.minimum(torch.maximum(t, starts), ends)
        uniform = starts + torch.minimum((u * sizes.float()).long(), sizes - 1)
        t = torch.where(mass > 0, t, uniform)
        if device is not None:
            t, ids = t.to(device), ids.to(device)
        return t, ids

    def __repr__(self) -> str:
        return f"StratifiedDensitySampler(bounds={self.bounds}, weighting_scheme={self.weighting_scheme!r})"
