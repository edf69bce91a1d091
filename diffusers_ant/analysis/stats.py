"""Confidence intervals over seeds, for the benchmarks (issue 10: "paired differences with an interval").

Methods compared on the same seeds share their initial weights, their data order and the sampling
noise of the evaluation, so the per-seed difference method - vanilla removes everything the seed
contributes to both: the paired difference is the quantity to report, with a Student-t interval
over seeds (the seeds are the independent replicates; the samples within a seed are not).

    from diffusers_ant.analysis.stats import paired_differences
    paired_differences({0: 30.1, 1: 28.7, 2: 33.0}, {0: 31.5, 1: 30.0, 2: 33.4})
    # {"mean": -1.03, "low": ..., "high": ..., "n": 3, "seeds": [0, 1, 2], "differences": [...], ...}

The t interval comes from scipy (`scipy.stats.ttest_1samp(...).confidence_interval`), not by hand.
"""

from __future__ import annotations

import numpy as np

__all__ = ["describe_interval", "paired_differences", "t_interval"]


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean, standard deviation and the Student-t confidence interval of the mean of independent values.

    Returns `{"mean", "sd", "n", "low", "high", "p_value"}`; `p_value` is the two-sided one-sample
    t test of mean 0 (meaningful for differences). With fewer than 2 values, or no spread, the
    interval and p-value are None (no interval can be formed) and `sd` is None or 0.
    """
    from scipy.stats import ttest_1samp

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("t_interval: values must be finite")
    n = int(x.size)
    result = {"mean": float(x.mean()) if n else None, "sd": None, "n": n, "low": None, "high": None,
              "p_value": None, "confidence": confidence}
    if n < 2:
        return result
    result["sd"] = float(x.std(ddof=1))
    if result["sd"] == 0.0:
        return result
    test = ttest_1samp(x, 0.0)
    interval = test.confidence_interval(confidence)
    result.update(low=float(interval.low), high=float(interval.high), p_value=float(test.pvalue))
    return result


def paired_differences(treatment: dict, control: dict, confidence: float = 0.95) -> dict:
    """Per-seed differences `treatment[seed] - control[seed]` over the seeds both have, and their
    `t_interval`. Keys may be ints or strings (JSON turns int keys into strings); both sides are
    matched by `str(seed)`. Adds `seeds` and `differences` (in seed order) to the interval's dict."""
    a = {str(k): float(v) for k, v in treatment.items()}
    b = {str(k): float(v) for k, v in control.items()}
    seeds = sorted(set(a) & set(b), key=lambda s: (len(s), s))
    differences = [a[s] - b[s] for s in seeds]
    result = t_interval(differences, confidence)
    result.update(seeds=[int(s) if s.lstrip("-").isdigit() else s for s in seeds], differences=differences)
    return result


def describe_interval(result: dict, digits: int = 2) -> str:
    """`-1.03 [-4.10, 2.04]` (mean and interval), or `-1.03 (n = 1)` when there is no interval."""
    if result["mean"] is None:
        return "n/a"
    if result["low"] is None:
        return f"{result['mean']:+.{digits}f} (n = {result['n']}, no interval)"
    return f"{result['mean']:+.{digits}f} [{result['low']:+.{digits}f}, {result['high']:+.{digits}f}]"
