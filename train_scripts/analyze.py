#!/usr/bin/env python
"""The analyses of the papers on trained models: task affinity, negative transfer gap, chain of forgetting.

    # ANT's task affinity (O1), averaged over a run's checkpoints; the JSON feeds --clustering gradient
    python train_scripts/analyze.py affinity --model ant-demo --checkpoints 'ant-demo/checkpoint-*' \\
        --dataset_name mnist5k --grid 20 --batches 4 --batch_size 32 --output affinity.json --plot affinity.png
    python train_scripts/train_ant.py ... --clustering gradient --affinity_file affinity.json

    # ANT's negative transfer gap (O2): an all-timestep model and models trained with --timestep_range
    python train_scripts/analyze.py ntg --base vanilla --interval_models int0 int1 int2 \\
        --dataset_name mnist5k --num_samples 500 --output ntg.json --plot ntg.png

    # Diff-Tuning's chain of forgetting: the low-noise fraction f handed back to the pretrained model
    python train_scripts/analyze.py forgetting --finetuned animals --pretrained digits \\
        --dataset_name animal_mnist --fractions 0,0.1,0.2,0.3,0.5,0.7,1 --num_samples 500 \\
        --output forgetting.json --plot forgetting.png

FIDs are domain FIDs by default (see evaluate_model.py). The logic lives in `diffusers_ant.analysis`.
"""

from __future__ import annotations

import argparse
import sys

from diffusers_ant.analysis.arguments import add_sampling_arguments, check_sampling_arguments
from diffusers_ant.cli import OneLineErrorParser, check_output_paths, report_bad_input

PROG = "analyze.py"




def _projection(text):
    if text.strip().lower() in ("auto", "none"):
        return text.strip().lower()
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'auto' or 'none', got {text!r}") from None
    if value < 1:  # 0 read as "no projection" further down: exact gradients, hundreds of GB for SD
        raise argparse.ArgumentTypeError(f"expected a dimension >= 1 ('none' for exact gradients), got {value}")
    return value


def _add_common_flags(parser):
    parser.add_argument("--output", required=True, help="Where to write the JSON result.")
    parser.add_argument("--plot", default=None, help="Optional PNG of the result.")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on machines with <= 4 CPUs, where more threads contend; "
                             "else torch's).")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")


def build_parser():
    parser = OneLineErrorParser(prog=PROG, description="Task affinity, negative transfer gap and chain of forgetting "
                                            "(ANT, Go et al. 2023; Diff-Tuning, Zhong et al. 2024).")
    sub = parser.add_subparsers(dest="command", metavar="{affinity,ntg,forgetting}", required=True, parser_class=OneLineErrorParser)

    aff = sub.add_parser("affinity", help="Task-affinity matrix of a model (cosine of per-timestep gradients).")
    aff.add_argument("--model", nargs="+", required=True,
                     help="Saved model folder(s). The first gives architecture, scheduler and type; without "
                          "--checkpoints the affinity is averaged over these folders' weights.")
    aff.add_argument("--checkpoints", nargs="+", default=None,
                     help="checkpoint-N folders (or model folders) to average over, e.g. 'run/checkpoint-*'.")
    aff.add_argument("--model_type", default=None, help="unet, dit, sd, sdxl, sd3, flux or qwenimage (default: from training_config.json).")
    aff.add_argument("--dataset_name", default=None, help="Training images to take the gradients on (e.g. mnist5k).")
    aff.add_argument("--train_data_dir", default=None, help="An image folder instead of --dataset_name.")
    aff.add_argument("--grid", type=int, default=20, help="Timestep grid points G spread over 0..T-1 (default 20).")
    aff.add_argument("--batches", type=int, default=4, help="Batches per grid point's gradient (default 4).")
    aff.add_argument("--batch_size", type=int, default=32, help="Images per batch (default 32).")
    aff.add_argument("--param_subset", default=None,
                     help="Comma-separated module-name prefixes (e.g. down_blocks.2,mid_block) to measure on.")
    aff.add_argument("--projection_dim", type=_projection, default="auto",
                     help="Count-sketch dimension of each gradient; 'none' for exact gradients; 'auto' (default): "
                          "exact while G x |theta| fits in 512 MiB, else 4096.")
    aff.add_argument("--affinity_estimator", default="mean_gradient", choices=["mean_gradient", "mean_cosine"],
                     help="mean_gradient (default): cosines of the gradients averaged over the batches; mean_cosine: "
                          "the paper's, per-batch cosines averaged (smaller in magnitude: batch noise).")
    aff.add_argument("--permutations", type=int, default=20000,
                     help="Permutations of the Mantel test of O1 (default 20000; smallest p-value 1 / (1 + this)).")
    aff.add_argument("--seed", type=int, default=0, help="Seeds the batches, the noise, the projection and the permutations.")
    _add_common_flags(aff)

    ntg = sub.add_parser("ntg", help="Negative transfer gap of interval-trained models.")
    ntg.add_argument("--base", required=True, help="The model trained on all timesteps (a saved folder).")
    ntg.add_argument("--interval_models", nargs="+", required=True,
                     help="Models trained on one interval each (train_ant.py --timestep_range START END).")
    ntg.add_argument("--intervals", default=None,
                     help="JSON of the intervals, one per interval model ([[t1, t2], ...] or an intervals file); "
                          "default: each folder's training_config.json timestep_range.")
    add_sampling_arguments(ntg)
    _add_common_flags(ntg)

    fgt = sub.add_parser("forgetting", help="Chain of forgetting of a fine-tuned model and its pretrained one.")
    fgt.add_argument("--finetuned", required=True, help="The fine-tuned model (a saved folder).")
    fgt.add_argument("--pretrained", required=True, help="The pretrained model it was fine-tuned from.")
    fgt.add_argument("--fractions", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                     help="Comma-separated fractions f in [0, 1] of the reverse process (low-noise end) given "
                          "to the pretrained model (default 0,0.1,...,1).")
    add_sampling_arguments(fgt)
    _add_common_flags(fgt)
    return parser


def _write_json(path, data):
    from diffusers_ant.files import write_json_atomically

    write_json_atomically(path, data)  # (a truncated affinity file would stop `train_ant.py --affinity_file`)
    print(f"wrote {path}")


def _reference(args, pipeline):
    from diffusers_ant.analysis.evaluate import reference_for

    return reference_for(pipeline, args.dataset_name, args.num_real or args.num_samples, args.feature_extractor,
                         args.inception_weights, seed=args.seed, train_data_dir=args.train_data_dir,
                         batch_size=args.batch_size, kid_subsets=args.kid_subsets)


def mantel_summary(p_value, permutations) -> str:
    """The Mantel p-value in words: "p <= 1 / (1 + n)" when no permutation reached the statistic."""
    floor = 1.0 / (1 + permutations)
    if p_value is None:
        return "Mantel test: not defined (fewer than 4 grid points or a constant matrix)"
    bound = "p <= " if p_value <= floor * (1 + 1e-9) else "p = "
    return f"Mantel permutation test ({permutations} permutations of the grid labels): {bound}{p_value:.2g}"


def run_affinity(args):
    from diffusers_ant.analysis.affinity import affinity_from_folders
    from diffusers_ant.analysis.common import resolve_device

    projection = {"auto": "auto", "none": None}.get(args.projection_dim, args.projection_dim)
    result = affinity_from_folders(args.model, checkpoints=args.checkpoints, dataset_name=args.dataset_name,
                                   grid=args.grid, batches=args.batches, batch_size=args.batch_size,
                                   param_subset=args.param_subset, projection_dim=projection, seed=args.seed,
                                   model_type=args.model_type, train_data_dir=args.train_data_dir,
                                   progress=not args.no_progress, estimator=args.affinity_estimator,
                                   permutations=args.permutations, device=resolve_device(args.device))
    dim = "exact" if result["projection_dim"] is None else f"count sketch to {result['projection_dim']}"
    print(f"task affinity: {len(result['timesteps'])}-point grid over T = {result['num_timesteps']}, "
          f"{len(result['checkpoints'])} checkpoint(s) x {result['batches']} batches of {result['batch_size']}, "
          f"{result['num_parameters']} gradient coordinates ({dim}), {result['estimator']} estimator, "
          f"{result['seconds']:.1f} s")
    rho = result["o1_spearman"]
    if rho is not None:
        print(f"O1: Spearman rank correlation of |t_i - t_j| and TAS(i, j) = {rho:.4f} "
              "(negative: affinity falls with timestep distance)")
        print(f"    {mantel_summary(result['o1_mantel_pvalue'], result['o1_mantel_permutations'])}; "
              f"the pairwise Spearman p = {result['o1_spearman_pvalue']:.2g} assumes independent pairs, which a matrix's entries are not (read the Mantel p)")
    _write_json(args.output, result)
    if args.plot:
        from diffusers_ant.analysis.plots import plot_affinity

        plot_affinity(result, args.plot)
        print(f"wrote {args.plot}")


def _prompts(args, pipeline):
    """A text-to-image pipeline's prompts: the captions of the dataset rows the real images are drawn from, as
    evaluate_model prompts (so the two tools' FIDs agree); None for the other types."""
    from diffusers_ant.analysis.evaluate import dataset_captions, is_text_to_image

    if not is_text_to_image(pipeline):
        return None
    return dataset_captions(args.dataset_name, args.num_samples, seed=args.seed, train_data_dir=args.train_data_dir)


def run_ntg(args):
    from diffusers_ant.analysis.common import denoiser_name, load_denoiser, resolve_device, training_routing_scheduler
    from diffusers_ant.routing import check_interchangeable, check_same_schedule
    from diffusers_ant.analysis.ntg import describe, interval_from_folder, load_intervals, negative_transfer_gap

    base_pipeline, _ = load_denoiser(args.base, "--base")
    base_pipeline.to(resolve_device(args.device))
    if args.intervals:
        intervals = load_intervals(args.intervals, len(args.interval_models))
    else:
        intervals = [interval_from_folder(folder) for folder in args.interval_models]
    loaded = [load_denoiser(folder, "--interval_models") for folder in args.interval_models]
    models, schedulers = [denoiser.to(resolve_device(args.device)) for _, denoiser in loaded], [pipeline.scheduler for pipeline, _ in loaded]
    # refuse models trained with another noise schedule before the (slow) reference and sampling
    check_same_schedule([base_pipeline.scheduler, *schedulers], [f"--base {args.base}", *args.interval_models])
    check_interchangeable([getattr(base_pipeline, denoiser_name(base_pipeline)), *models],
                          [f"--base {args.base}", *args.interval_models])
    # the table the intervals index (the runs' --flow_shift or FLUX.1 resolution), also before the reference
    training_scheduler = training_routing_scheduler(base_pipeline, args.interval_models)
    reference = _reference(args, base_pipeline)
    result = negative_transfer_gap(base_pipeline, models, intervals, reference, num_samples=args.num_samples,
                                   scheduler=args.scheduler, num_inference_steps=args.num_inference_steps,
                                   batch_size=args.batch_size, seed=args.seed, names=args.interval_models,
                                   progress=not args.no_progress, interval_schedulers=schedulers,
                                   training_scheduler=training_scheduler,
                                   prompts=_prompts(args, base_pipeline))
    result["base_model"] = args.base
    print(describe(result))
    _write_json(args.output, result)
    if args.plot:
        from diffusers_ant.analysis.plots import plot_ntg

        plot_ntg(result, args.plot)
        print(f"wrote {args.plot}")


def run_forgetting(args):
    from diffusers_ant.analysis.common import denoiser_name, load_denoiser, resolve_device, training_routing_scheduler
    from diffusers_ant.routing import check_interchangeable, check_same_schedule
    from diffusers_ant.analysis.forgetting import chain_of_forgetting, describe, parse_fractions

    fractions = parse_fractions(args.fractions)
    finetuned_pipeline, _ = load_denoiser(args.finetuned, "--finetuned")
    pretrained_pipeline, pretrained = load_denoiser(args.pretrained, "--pretrained")
    finetuned_pipeline.to(resolve_device(args.device))
    pretrained = pretrained.to(resolve_device(args.device))
    check_same_schedule([finetuned_pipeline.scheduler, pretrained_pipeline.scheduler],
                        [f"--finetuned {args.finetuned}", f"--pretrained {args.pretrained}"])
    check_interchangeable([getattr(finetuned_pipeline, denoiser_name(finetuned_pipeline)), pretrained],
                          [f"--finetuned {args.finetuned}", f"--pretrained {args.pretrained}"])
    training_scheduler = training_routing_scheduler(finetuned_pipeline, [args.finetuned])
    reference = _reference(args, finetuned_pipeline)
    result = chain_of_forgetting(finetuned_pipeline, pretrained, fractions, reference, num_samples=args.num_samples,
                                 scheduler=args.scheduler, num_inference_steps=args.num_inference_steps,
                                 batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                                 pretrained_scheduler=pretrained_pipeline.scheduler,
                                 training_scheduler=training_scheduler,
                                 prompts=_prompts(args, finetuned_pipeline))
    result.update(finetuned_model=args.finetuned, pretrained_model=args.pretrained)
    print(describe(result))
    _write_json(args.output, result)
    if args.plot:
        from diffusers_ant.analysis.plots import plot_forgetting

        plot_forgetting(result, args.plot)
        print(f"wrote {args.plot}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_threads is not None and args.num_threads < 1:
        parser.error("--num_threads must be positive")
    if args.command == "affinity":
        if args.dataset_name is None and args.train_data_dir is None:
            parser.error("affinity needs training images: pass --dataset_name (e.g. mnist5k) or --train_data_dir")
        for name in ("grid", "batches", "batch_size", "permutations"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be positive")
    else:
        check_sampling_arguments(parser, args)
    check_output_paths(parser, ("--output", args.output, False), ("--plot", args.plot, False))

    from diffusers_ant.analysis.common import set_torch_threads

    set_torch_threads(args.num_threads)
    if args.no_progress:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # also the "Loading pipeline components" bars
    command = {"affinity": run_affinity, "ntg": run_ntg, "forgetting": run_forgetting}[args.command]
    return report_bad_input(PROG, command, args)


if __name__ == "__main__":
    sys.exit(main())
