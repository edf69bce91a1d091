#!/usr/bin/env python
"""Cluster a scheduler's training timesteps into k intervals (ANT interval clustering).

Examples::

    python train_scripts/cluster_timesteps.py --scheduler DDPMScheduler --num_clusters 5 \\
        --objective snr --output intervals.json --plot intervals.png
    python train_scripts/cluster_timesteps.py --scheduler path/to/pipeline --num_clusters 5
    python train_scripts/cluster_timesteps.py --scheduler DDPMScheduler --objective gradient \\
        --affinity task_affinity.json

``--scheduler`` is a folder holding ``scheduler_config.json`` (or a pipeline folder with a
``scheduler/`` subfolder), a Hub model id (when online), or a diffusers scheduler class
name, built with ``--num_train_timesteps`` / ``--beta_schedule`` / ``--prediction_type``.
The intervals are printed as a table, written as JSON (read them back with
``diffusers_ant.TimestepIntervals.load``) and, with ``--plot``, drawn over the log-SNR curve.
The clustering itself lives in ``diffusers_ant.clustering``; this is only the entry point.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import warnings

from diffusers_ant.cli import OneLineErrorParser, check_output_paths

SCHEDULER_CONFIG = "scheduler_config.json"




def _size(text: str):
    """--min_size / --max_size: an integer, 'default' (ANT's T/(2k) and 2T/k) or 'none' (unbounded)."""
    lowered = text.strip().lower()
    if lowered in ("default", "none"):
        return "default" if lowered == "default" else None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'default' or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from diffusers_ant.clustering import OBJECTIVES

    parser = OneLineErrorParser(
        prog="cluster_timesteps.py",
        description="Cluster a diffusers scheduler's training timesteps into k intervals (ANT, Go et al. 2023).",
    )
    parser.add_argument("--scheduler", required=True,
                        help="A folder with scheduler_config.json (or a pipeline folder with scheduler/), a Hub id, "
                             "or a diffusers scheduler class name such as DDPMScheduler.")
    parser.add_argument("--num_train_timesteps", type=int, default=None,
                        help="T, for a scheduler built from a class name (overrides a loaded config).")
    parser.add_argument("--beta_schedule", default=None,
                        help="linear, scaled_linear, squaredcos_cap_v2, ... (DDPM-family class names).")
    parser.add_argument("--prediction_type", default=None,
                        help="epsilon, v_prediction or sample; recorded in the scheduler, it does not change the SNR.")
    parser.add_argument("--num_clusters", type=int, default=5, help="k, the number of intervals (ANT default 5).")
    parser.add_argument("--objective", choices=OBJECTIVES, default="snr",
                        help="timestep: sum |t - c|; snr: sum |logSNR(t) - logSNR(c)|; gradient: -sum TAS(c, t).")
    parser.add_argument("--raw_snr", action="store_true", help="Cluster on raw SNR instead of log-SNR (snr objective).")
    parser.add_argument("--affinity", default=None,
                        help='Task-affinity JSON {"timesteps": [...], "affinity": [[...]]} for the gradient objective.')
    parser.add_argument("--min_size", type=_size, default="default",
                        help="Smallest interval size: an integer, 'default' (T // (2k)) or 'none'.")
    parser.add_argument("--max_size", type=_size, default="default",
                        help="Largest interval size: an integer, 'default' (ceil(2T / k)) or 'none'.")
    parser.add_argument("--output", default="intervals.json", help="Where to write the intervals as JSON.")
    parser.add_argument("--plot", default=None, help="Optional PNG of the intervals over the log-SNR curve.")
    return parser


def _scheduler_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(
            f"{name!r} is neither a folder with {SCHEDULER_CONFIG} nor a diffusers scheduler class "
            "(e.g. DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler)."
        )
    return cls


def _overrides(cls, args) -> dict:
    """The scheduler options given on the command line, refusing ones the class does not take."""
    given = {
        key: getattr(args, key)
        for key in ("num_train_timesteps", "beta_schedule", "prediction_type")
        if getattr(args, key) is not None
    }
    accepted = inspect.signature(cls.__init__).parameters
    for key in given:
        if key not in accepted:
            raise ValueError(f"{cls.__name__} has no {key} option: drop --{key}.")
    return given


def load_scheduler(args):
    """A diffusers scheduler from a folder, a Hub id or a class name (see the module docstring).

    Folders and Hub ids: read the config's ``_class_name``, then call that class's
    ``from_pretrained``, the way diffusers pipelines load their scheduler.
    """
    # SchedulerMixin has no load_config; any scheduler class reads scheduler_config.json the same way
    from diffusers import DDPMScheduler

    spec = args.scheduler
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "scheduler", SCHEDULER_CONFIG)):
            subfolders = ["scheduler"]
        elif os.path.isfile(os.path.join(spec, SCHEDULER_CONFIG)):
            subfolders = [None]
        else:
            raise ValueError(f"no {SCHEDULER_CONFIG} in {spec} or in its scheduler/ subfolder.")
    elif os.path.sep not in spec and "/" not in spec:
        cls = _scheduler_class(spec)
        return cls(**_overrides(cls, args))
    else:  # a Hub id: a pipeline repository keeps its scheduler in scheduler/
        subfolders = ["scheduler", None]
    error = None
    for subfolder in subfolders:
        try:
            with warnings.catch_warnings():  # huggingface_hub deprecation chatter from diffusers' own call
                warnings.simplefilter("ignore")
                config = DDPMScheduler.load_config(spec, subfolder=subfolder)
        except (OSError, ValueError) as err:
            error = err
            continue
        cls = _scheduler_class(config.get("_class_name", ""))
        return cls.from_pretrained(spec, subfolder=subfolder, **_overrides(cls, args))
    raise ValueError(f"cannot load a scheduler from {spec!r}: {str(error).splitlines()[0]}")


def format_table(intervals, log_snr=None) -> str:
    """The intervals as a fixed-width table, with each interval's log-SNR range when known."""
    header = f"{'cluster':>7} {'start':>6} {'end':>6} {'size':>6}"
    if log_snr is not None:
        header += f" {'log-SNR(start)':>15} {'log-SNR(end)':>13}"
    lines = [header]
    for i, (start, end) in enumerate(intervals):
        line = f"{i:>7} {start:>6} {end:>6} {end - start + 1:>6}"
        if log_snr is not None:
            line += f" {log_snr[start]:>15.3f} {log_snr[end]:>13.3f}"
        lines.append(line)
    return "\n".join(lines)


def plot_intervals(intervals, log_snr, path, title: str, affinity=None) -> None:
    """PNG of the log-SNR curve over t with the intervals shaded alternately and boundaries marked.

    With an affinity matrix, a second panel shows it with the intervals as diagonal blocks.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    import numpy as np

    panels = 2 if affinity is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    T = intervals.num_timesteps
    if log_snr is not None:
        ax.plot(np.arange(T), log_snr, color="black", linewidth=1.5, label="log-SNR(t)")
        ax.set_ylabel("log SNR")
        ax.legend(loc="upper right")
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "scheduler has no SNR curve", transform=ax.transAxes, ha="center")
    for i, (start, end) in enumerate(intervals):
        # each interval covers [start, end + 1) on a continuous t axis
        ax.axvspan(start - 0.5, end + 0.5, color=("tab:blue", "tab:orange")[i % 2], alpha=0.18, linewidth=0)
        if start > 0:
            ax.axvline(start - 0.5, color="tab:red", linestyle="--", linewidth=1)
        ax.text((start + end) / 2, 1.01, str(i), transform=ax.get_xaxis_transform(), ha="center", va="bottom")
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_xlabel("training timestep t (0 = clean)")
    ax.set_title(title, pad=16)
    if affinity is not None:
        ax2 = axes[0, 1]
        image = ax2.imshow(affinity, origin="lower", cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax2, label="task affinity")
        for start, end in intervals:
            ax2.add_patch(plt.Rectangle((start - 0.5, start - 0.5), end - start + 1, end - start + 1,
                                        fill=False, edgecolor="white", linewidth=1.5))
        ax2.set_xlabel("t")
        ax2.set_ylabel("t")
        ax2.set_title("task affinity (interpolated) and intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # (without it, a path with no extension is written as path + ".png")
    plt.close(fig)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_clusters < 1:  # checked before the slow diffusers import; the upper bound needs T
        parser.error(f"num_clusters must be between 1 and the number of timesteps, got {args.num_clusters}.")
    if args.objective != "gradient" and args.affinity is not None:
        parser.error("--affinity is only used by --objective gradient.")
    if args.objective == "gradient" and args.affinity is None:  # (the library's message names its keyword)
        parser.error("--objective gradient needs --affinity FILE: the JSON of `analyze.py affinity` (run it first)")
    if args.raw_snr and args.objective != "snr":
        parser.error("--raw_snr is only used by --objective snr.")
    if args.num_train_timesteps is not None and args.num_train_timesteps < 1:
        parser.error(f"--num_train_timesteps must be at least 1, got {args.num_train_timesteps}.")
    # before the clustering (the JSON is written through a temporary file, which an error would have named)
    check_output_paths(parser, ("--output", args.output, False), ("--plot", args.plot, False))

    from diffusers_ant.clustering import cluster_timesteps, resolve_affinity
    from diffusers_ant.schedule import schedule_log_snr

    try:
        scheduler = load_scheduler(args)
        intervals = cluster_timesteps(
            scheduler,
            args.num_clusters,
            objective=args.objective,
            affinity=args.affinity,
            min_size=args.min_size,
            max_size=args.max_size,
            log_snr=not args.raw_snr,
        )
    except NotImplementedError as err:  # what diffusers' schedulers raise for a --beta_schedule they do not know
        if args.beta_schedule is None:
            parser.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
        parser.error(f"--beta_schedule {args.beta_schedule} is not a schedule {args.scheduler} implements: use linear, "
                     "scaled_linear or squaredcos_cap_v2.")
    except (ValueError, OSError) as err:
        parser.error(str(err).splitlines()[0] if str(err) else type(err).__name__)

    try:
        log_snr = schedule_log_snr(scheduler).numpy()
    except ValueError:  # e.g. the timestep objective on a scheduler without a noise schedule
        log_snr = None

    metadata = intervals.metadata
    bounds_text = f"min_size={metadata['min_size']}, max_size={metadata['max_size']}"
    print(f"{type(scheduler).__name__}, T = {intervals.num_timesteps}, objective {args.objective}"
          f"{' (raw SNR)' if args.raw_snr else ''}, {len(intervals)} clusters, {bounds_text}, "
          f"total cost {metadata['cost']:.6g}")
    print(format_table(intervals, log_snr))

    try:
        directory = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(directory, exist_ok=True)
        intervals.save(args.output)
        print(f"wrote {args.output}")
        if args.plot:
            affinity = None
            if args.objective == "gradient":
                affinity = resolve_affinity(args.affinity, None, intervals.num_timesteps)
            title = f"{type(scheduler).__name__}: {len(intervals)} intervals, objective {args.objective}"
            plot_intervals(intervals, log_snr, args.plot, title, affinity)
            print(f"wrote {args.plot}")
    except OSError as err:
        parser.error(f"cannot write {err.filename}: {err.strerror}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
