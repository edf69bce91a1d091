"""Plots of the analyses (matplotlib, Agg backend: training machines have no display).

- `plot_affinity`: the task-affinity heatmap over the timestep grid, with log-SNR on the top axis,
  beside TAS(i, j) against |t_i - t_j| (observation O1, with its Spearman rank correlation);
- `plot_ntg`: the negative transfer gap of each interval as bars (below zero: negative transfer);
- `plot_forgetting`: the chain-of-forgetting curve, FID against the handed-over fraction;
- `plot_ntg_summary`: the gap of each interval over seeds, mean with its confidence interval;
- `plot_fid_curve`: FID over training steps, one line per seed and their mean (convergence);
- `plot_method_summary`: a metric per method over seeds (bars, intervals, seed dots);
- `plot_forgetting_comparison`: the chain-of-forgetting curves of several methods on one plot;
- `plot_convergence_curves`: ControlNet's condition distance over steps per method, with the threshold.
"""

from __future__ import annotations

import numpy as np

__all__ = ["plot_affinity", "plot_convergence_curves", "plot_fid_curve", "plot_fid_curves", "plot_forgetting", "plot_forgetting_comparison",
           "plot_method_summary", "plot_ntg", "plot_ntg_summary"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_affinity(result: dict, path: str, title: str | None = None) -> None:
    """Heatmap of `result["affinity"]` (the dict `affinity_from_folders` returns) and the O1 scatter."""
    plt = _pyplot()
    t = np.asarray(result["timesteps"], dtype=float)
    A = np.asarray(result["affinity"], dtype=float)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})

    # the grid is evenly spaced, so each cell spans one grid step in timestep units
    step = (t[-1] - t[0]) / max(len(t) - 1, 1)
    extent = (t[0] - step / 2, t[-1] + step / 2, t[0] - step / 2, t[-1] + step / 2)
    image = ax.imshow(A, origin="lower", extent=extent, cmap="viridis", vmin=min(0.0, A.min()), vmax=1.0)
    fig.colorbar(image, ax=ax, label="task affinity (gradient cosine)", fraction=0.046, pad=0.12)
    ax.set_xlabel("training timestep t (0 = clean)")
    ax.set_ylabel("training timestep t")
    log_snr = result.get("log_snr")
    if log_snr is not None:
        # top axis: the log-SNR of the grid timesteps under the ticks
        ticks = t[:: max(1, len(t) // 5)]
        top = ax.secondary_xaxis("top")  # follows the heatmap's own x axis (twiny would not, with aspect "equal")
        top.set_xticks(ticks)
        values = dict(zip(t.tolist(), log_snr))
        top.set_xticklabels(["" if values[x] is None else f"{values[x]:.1f}" for x in ticks.tolist()])
        top.set_xlabel("log SNR(t)")
    ax.set_title(title or f"task affinity, {len(t)}-point grid", pad=34 if log_snr is not None else 6)

    i, j = np.triu_indices(len(t), k=1)
    ax2.scatter(np.abs(t[i] - t[j]), A[i, j], s=8, alpha=0.5)
    rho = result.get("o1_spearman")
    ax2.set_xlabel("|t_i - t_j|")
    ax2.set_ylabel("TAS(i, j)")
    ax2.set_title("O1: affinity vs timestep distance" + (f" (Spearman rho = {rho:.3f})" if rho is not None else ""))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ntg(result: dict, path: str, title: str | None = None) -> None:
    """Bars of NTG per interval (the dict `negative_transfer_gap` returns); red bars: negative transfer."""
    plt = _pyplot()
    rows = result["intervals"]
    labels = [f"[{r['interval'][0]}, {r['interval'][1]}]" for r in rows]
    gaps = [r["ntg"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    colors = ["tab:red" if g < 0 else "tab:blue" for g in gaps]
    ax.bar(range(len(rows)), gaps, color=colors)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels)
    ax.set_xlabel("interval [t1, t2] given to the interval-trained model")
    ax.set_ylabel("NTG = FID(mixed) - FID(base)")
    base = result["base"]["fid"]
    ax.set_title(title or f"negative transfer gap (< 0: negative transfer)\nbase FID {base:.3f}, {result['feature_extractor']}",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forgetting(result: dict, path: str, title: str | None = None) -> None:
    """FID (and precision / recall on a second axis) against the fraction f (the dict
    `chain_of_forgetting` returns)."""
    plt = _pyplot()
    points = result["points"]
    f = [p["fraction"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(f, [p["fid"] for p in points], "o-", color="tab:blue", label="FID")
    ax.set_xlabel("fraction f of the reverse process (low-noise end) given to the pretrained model")
    ax.set_ylabel(f"FID ({result['feature_extractor']})", color="tab:blue")
    if all("precision" in p for p in points):
        right = ax.twinx()
        right.plot(f, [p["precision"] for p in points], "s--", color="tab:green", label="precision")
        right.plot(f, [p["recall"] for p in points], "^--", color="tab:orange", label="recall")
        right.set_ylim(0, 1.05)
        right.set_ylabel("precision / recall")
        right.legend(loc="upper center", fontsize=8)
    ax.set_title(title or "chain of forgetting (f = 0: fine-tuned model only, f = 1: pretrained only)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gap_colors(rows) -> list:
    """The bar colour of each interval's gap: red / blue only where its confidence interval lies wholly below /
    above 0; a gap without an interval (one seed, or no spread) is gray whatever its sign, since the plot's
    "interval < 0" would not hold."""
    colors = []
    for r in rows:
        low, high = r["gap"]["low"], r["gap"]["high"]
        if low is None or high is None or not low < high:
            colors.append("tab:gray")
        else:
            colors.append("tab:red" if high < 0 else "tab:blue" if low > 0 else "tab:gray")
    return colors


def plot_ntg_summary(summary: dict, path: str, title: str | None = None) -> None:
    """Bars of the mean NTG per interval over seeds with their confidence intervals, and each seed's gap
    as a dot. `summary`: {"intervals": [{"interval": [t1, t2], "gap": t_interval dict with
    "differences" (per seed), ...}], "feature_extractor", "confidence", ...} (benchmark_ntg.py)."""
    plt = _pyplot()
    rows = summary["intervals"]
    labels = [f"[{r['interval'][0]}, {r['interval'][1]}]" for r in rows]
    means = np.array([r["gap"]["mean"] for r in rows], dtype=float)
    low = np.array([r["gap"]["low"] if r["gap"]["low"] is not None else r["gap"]["mean"] for r in rows], dtype=float)
    high = np.array([r["gap"]["high"] if r["gap"]["high"] is not None else r["gap"]["mean"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    colors = gap_colors(rows)
    ax.bar(x, means, color=colors, alpha=0.75)
    ax.errorbar(x, means, yerr=[means - low, high - means], fmt="none", ecolor="black", capsize=4, linewidth=1)
    for i, r in enumerate(rows):
        seeds = r["gap"].get("differences") or []
        ax.scatter(np.full(len(seeds), i) + np.linspace(-0.15, 0.15, max(len(seeds), 1))[: len(seeds)], seeds,
                   s=10, color="black", zorder=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_xlabel("interval [t1, t2] denoised by the interval-trained model")
    ax.set_ylabel("NTG = FID(mixed) - FID(base)")
    level = f"{summary.get('confidence', 0.95):.0%}"
    ax.set_title(title or f"negative transfer gap (red: interval < 0, negative transfer)\nmean over seeds, {level} "
                 f"interval, dots: seeds; {summary.get('feature_extractor', '')}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fid_curve(curve: dict, path: str, title: str | None = None) -> None:
    """FID against training step: `curve` is {step: {seed: metrics with "fid"}}; one thin line per
    seed and the mean over seeds in bold."""
    plt = _pyplot()
    steps = sorted(int(s) for s in curve)
    by_step = {int(k): v for k, v in curve.items()}
    seeds = sorted({str(seed) for per_seed in curve.values() for seed in per_seed})
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed in seeds:
        points = [(s, {str(k): v for k, v in by_step[s].items()}.get(seed)) for s in steps]
        points = [(s, m["fid"]) for s, m in points if m is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "-", color="tab:blue", alpha=0.35, linewidth=1)
    means = [(s, np.mean([m["fid"] for m in by_step[s].values()])) for s in steps if by_step[s]]
    label = "mean over seeds" if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else "FID"
    ax.plot([p[0] for p in means], [p[1] for p in means], "o-", color="tab:blue", linewidth=2, label=label)
    values = [p[1] for p in means]
    if values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")  # a curve from an untrained model spans decades: the late points stay legible
    ax.set_xlabel("training step")
    ax.set_ylabel("domain FID")
    ax.set_title(title or "FID over training", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fid_curves(summaries: dict, path: str, title: str | None = None) -> None:
    """FID against training step for several rows on one plot: ``summaries`` is {label: {step: t
    interval over seeds}} (``benchmark_quality.summarise_curve``); the mean of each row, its interval
    shaded where there is one (log scale when the curves span a decade)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors
    values = []
    for (label, summary), color in zip(summaries.items(), colors * (1 + len(summaries) // len(colors))):
        steps = sorted(int(s) for s in summary)
        cells = [summary[s] if s in summary else summary[str(s)] for s in steps]
        means = [c["mean"] for c in cells]
        values += means
        ax.plot(steps, means, "o-", color=color, linewidth=1.5, markersize=3, label=label)
        if all(c.get("low") is not None for c in cells):
            ax.fill_between(steps, [c["low"] for c in cells], [c["high"] for c in cells], color=color, alpha=0.12)
    if values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("domain FID")
    ax.set_title(title or "FID over training, every row", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_method_summary(rows: list, path: str, ylabel: str = "domain FID", title: str | None = None,
                        reference: tuple | None = None) -> None:
    """Bars of a metric per method over seeds: the mean with its confidence interval and each seed's
    value as a dot. `rows`: [{"label", "mean", "low", "high", "values"}] (a `t_interval` dict with a
    label and the per-seed values; `low` / `high` None: no interval drawn). `reference`: optional
    `(label, value)` drawn as a dashed line (e.g. the pretrained model before fine-tuning)."""
    plt = _pyplot()
    x = np.arange(len(rows))
    means = np.array([r["mean"] for r in rows], dtype=float)
    low = np.array([r["low"] if r.get("low") is not None else r["mean"] for r in rows], dtype=float)
    high = np.array([r["high"] if r.get("high") is not None else r["mean"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(rows) + 2.5), 4.2))
    ax.bar(x, means, color="tab:blue", alpha=0.7)
    ax.errorbar(x, means, yerr=[means - low, high - means], fmt="none", ecolor="black", capsize=4, linewidth=1)
    for i, r in enumerate(rows):
        values = list(r.get("values") or [])
        ax.scatter(np.full(len(values), i) + np.linspace(-0.15, 0.15, max(len(values), 1))[: len(values)], values,
                   s=10, color="black", zorder=3)
    if reference is not None:
        ax.axhline(reference[1], color="tab:red", linestyle="--", linewidth=1, label=reference[0])
        ax.legend(fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} per method: mean over seeds, interval, dots: seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_forgetting_comparison(curves: dict, path: str, title: str | None = None) -> None:
    """Chain-of-forgetting curves of several fine-tuning methods on one plot (Diff-Tuning's Fig. 1):
    `curves` is {label: [results of `chain_of_forgetting`, one per seed]}; one thin line per seed and
    the mean over seeds in bold, FID against the fraction f handed to the pretrained model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
    extractor = ""
    for (label, results), color in zip(curves.items(), colors * (1 + len(curves) // len(colors))):
        if not results:
            continue
        fractions = [p["fraction"] for p in results[0]["points"]]
        extractor = results[0].get("feature_extractor") or extractor
        for result in results:
            ax.plot([p["fraction"] for p in result["points"]], [p["fid"] for p in result["points"]], "-",
                    color=color, alpha=0.3, linewidth=1)
        mean = np.mean([[p["fid"] for p in result["points"]] for result in results], axis=0)
        ax.plot(fractions, mean, "o-", color=color, linewidth=2,
                label=f"{label} ({len(results)} seed{'s' if len(results) > 1 else ''})")
    ax.set_xlabel("fraction f of the reverse process (low-noise end) given to the pretrained model")
    ax.set_ylabel(f"FID ({extractor})" if extractor else "FID")
    ax.set_title(title or "chain of forgetting (f = 0: fine-tuned model only, f = 1: pretrained only)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence_curves(histories: dict, path: str, threshold: float | None = None, ylabel: str = "distance",
                            title: str | None = None) -> None:
    """ControlNet's condition distance over training steps per method: `histories` is {label: {seed:
    [{"step", "distance"}, ...]}} (the `history` of each run's convergence.json); one thin line per
    seed, the mean over seeds in bold, and the convergence threshold as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    for (label, per_seed), color in zip(histories.items(), colors * (1 + len(histories) // len(colors))):
        by_step = {}
        for history in per_seed.values():
            ax.plot([e["step"] for e in history], [e["distance"] for e in history], "-", color=color, alpha=0.3,
                    linewidth=1)
            for e in history:
                by_step.setdefault(int(e["step"]), []).append(float(e["distance"]))
        steps = sorted(by_step)
        ax.plot(steps, [np.mean(by_step[s]) for s in steps], "o-", color=color, linewidth=2, markersize=3,
                label=f"{label} (mean of {len(per_seed)} seeds)")
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "ControlNet: distance of the re-extracted condition to the input\n(sudden convergence: "
                 "the first check below the threshold)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
