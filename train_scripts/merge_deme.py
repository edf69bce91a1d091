#!/usr/bin/env python
"""Merge DeMe's per-interval fine-tunes into one pipeline (or write their ensemble).

    # given weights, one per fine-tune from low to high t (the order of their intervals)
    python train_scripts/merge_deme.py --base pretrained --finetuned out/interval-* --output_dir merged \\
        --weights 0.1 0.1 0.2 0.5
    # searched weights: domain FID of the merged model's samples against a held-out set
    python train_scripts/merge_deme.py --base pretrained --finetuned out/interval-* --output_dir merged \\
        --search coordinate --search_values 0 0.1 0.2 0.5 1 --dataset_name mnist5k --num_samples 500
    # TIES or DARE on the task vectors instead of task arithmetic
    python train_scripts/merge_deme.py ... --weights 1 1 1 1 --merge_method ties --density 0.2
    # the ensemble before merging: a TimestepRouter over the fine-tunes
    python train_scripts/merge_deme.py --base pretrained --finetuned out/interval-* --output_dir ensemble --ensemble

LoRA fine-tunes merged by task arithmetic give one LoRA of rank N*r (B = [w_1 s_1 B_1 ... w_N s_N B_N],
A = [A_1; ...; A_N]: the dense merge, without a dense weight; `diffusers_ant.deme.lora_merge`), and
their ensemble switches the interval LoRAs by timestep on one base denoiser (`deme.lora_ensemble`);
see docs/families/lora.md.

Fine-tunes are the folders `train_ant.py --deme_interval i` writes (full pipelines or LoRA folders);
each one's interval comes from its `training_config.json` and `timestep_intervals.json`. The output
is a diffusers pipeline folder with a model card; load it with `diffusers_ant.models.load_pipeline`
(which re-attaches channel projections and the ensemble's router) and score it with
`evaluate_model.py`. The logic lives in `diffusers_ant.deme.merging`.
"""

from __future__ import annotations

import glob
import sys

from diffusers_ant.analysis.arguments import add_sampling_arguments, check_sampling_arguments
from diffusers_ant.cli import OneLineErrorParser, check_output_paths, report_bad_input
from diffusers_ant.deme.merge import MERGE_METHODS
from diffusers_ant.deme.search import DEFAULT_SEARCH_VALUES, SEARCH_STRATEGIES

PROG = "merge_deme.py"


def build_parser():
    parser = OneLineErrorParser(prog=PROG, description="Merge DeMe's per-interval fine-tunes of one base into one "
                                "pipeline (task arithmetic, TIES or DARE; weights given or searched), or write their ensemble.")
    parser.add_argument("--base", required=True, help="The pretrained pipeline folder the fine-tunes started from.")
    parser.add_argument("--finetuned", required=True, nargs="+",
                        help="The fine-tune folders (e.g. OUT/interval-*), in any order: they are sorted by interval.")
    parser.add_argument("--output_dir", required=True, help="Where to write the merged (or ensemble) pipeline; must be new or empty.")
    g = parser.add_argument_group("merge")
    g.add_argument("--weights", type=float, nargs="+", default=None,
                   help="One merge weight per fine-tune, from low to high t (e.g. 0.1 0.1 0.2 0.5). With --search "
                        "coordinate: the starting point.")
    g.add_argument("--merge_method", default="task_arithmetic", choices=MERGE_METHODS,
                   help="task_arithmetic (DeMe's, default), or TIES / DARE on the task vectors through peft.")
    g.add_argument("--density", type=float, default=None,
                   help="ties / dare: fraction of each task vector kept (default 0.2 for ties, 0.5 for dare).")
    g.add_argument("--majority_sign_method", default="total", choices=["total", "frequency"],
                   help="ties / dare_ties: how the sign of each entry is elected (peft's option).")
    g.add_argument("--merge_seed", type=int, default=0, help="Seeds DARE's random drop.")
    g = parser.add_argument_group("weight search")
    g.add_argument("--search", default=None, choices=SEARCH_STRATEGIES,
                   help="Search the weights on the FID of the merged model's samples against --dataset_name / "
                        "--train_data_dir (use a held-out set): every combination (grid) or coordinate descent.")
    g.add_argument("--search_values", type=float, nargs="+", default=list(DEFAULT_SEARCH_VALUES),
                   help=f"Candidate values of each weight (default {' '.join(f'{v:g}' for v in DEFAULT_SEARCH_VALUES)}).")
    g.add_argument("--search_rounds", type=int, default=3, help="Coordinate search: at most this many rounds (default 3).")
    g.add_argument("--max_evaluations", type=int, default=256,
                   help="Refuse a grid of more points than this (len(search_values) ** N; default 256).")
    g = parser.add_argument_group("ensemble")
    g.add_argument("--ensemble", action="store_true",
                   help="Write the un-merged ensemble instead: the base pipeline whose denoiser routes each timestep "
                        "to its interval's fine-tune (TimestepRouter).")
    g = parser.add_argument_group("scoring (for --search, and the scores in the model card)")
    add_sampling_arguments(parser, num_samples_default=1000)
    parser.add_argument("--device", default=None, help="cpu or cuda for sampling (default: cuda when available).")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: 1 on machines with <= 4 CPUs).")
    return parser


def expand(paths) -> list:
    """Quoted globs expanded (the shell expands unquoted ones); duplicates dropped."""
    found = []
    for path in paths:
        matches = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else [path]
        if not matches:
            raise ValueError(f"--finetuned {path!r} matches no folder")
        found.extend(matches)
    return list(dict.fromkeys(found))


def run(args) -> None:
    from diffusers_ant.deme.merging import merge_finetunes, write_ensemble_folder

    evaluation = None
    if args.dataset_name or args.train_data_dir:
        evaluation = {key: getattr(args, key) for key in (
            "dataset_name", "train_data_dir", "num_samples", "num_real", "num_inference_steps", "batch_size",
            "feature_extractor", "inception_weights", "kid_subsets", "seed")}
        evaluation["scheduler"] = None if args.scheduler == "pipeline" else args.scheduler
    finetuned = expand(args.finetuned)
    if args.ensemble:
        write_ensemble_folder(args.base, finetuned, args.output_dir, evaluation=evaluation, device=args.device)
        return
    merge_finetunes(args.base, finetuned, args.output_dir, weights=args.weights, search=args.search,
                    search_values=args.search_values, search_rounds=args.search_rounds,
                    max_evaluations=args.max_evaluations, method=args.merge_method, density=args.density,
                    majority_sign_method=args.majority_sign_method, merge_seed=args.merge_seed,
                    evaluation=evaluation, device=args.device)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ensemble and (args.weights is not None or args.search is not None):
        parser.error("--ensemble writes the un-merged ensemble: drop --weights / --search")
    if not args.ensemble and args.weights is None and args.search is None:
        parser.error("give --weights (one per fine-tune, low to high t) or --search grid|coordinate")
    if args.search == "grid" and args.weights is not None:
        parser.error("--search grid tries every combination of --search_values: --weights only starts --search coordinate")
    if args.density is not None and args.merge_method == "task_arithmetic":
        parser.error("--density applies to --merge_method ties, dare_linear and dare_ties")
    if args.search is not None and not (args.dataset_name or args.train_data_dir):
        parser.error("--search scores samples against real images: pass --dataset_name or --train_data_dir (a held-out set)")
    if args.search_rounds < 1 or args.max_evaluations < 1:
        parser.error("--search_rounds and --max_evaluations must be positive")
    if args.dataset_name or args.train_data_dir:
        check_sampling_arguments(parser, args)
    if args.num_threads is not None and args.num_threads < 1:
        parser.error("--num_threads must be positive")
    check_output_paths(parser, ("--output_dir", args.output_dir, True))  # before the loading and any search

    from diffusers_ant.analysis.common import set_torch_threads

    set_torch_threads(args.num_threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one "Loading pipeline components" bar per fine-tune otherwise
    return report_bad_input(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
