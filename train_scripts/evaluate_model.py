#!/usr/bin/env python
"""Sample from a saved pipeline and report FID / KID / precision / recall against a dataset.

    python train_scripts/evaluate_model.py --model ant-demo --dataset_name mnist5k --num_samples 1000
    python train_scripts/evaluate_model.py --model ant-demo --dataset_name mnist5k \\
        --scheduler ddpm --num_inference_steps 250 --output metrics.json --save_samples samples/

The default feature extractor is the dataset's DOMAIN classifier (`diffusers_ant.metrics`): its FID is
a "domain FID", comparable only with other domain FIDs of the same dataset, extractor weights (the
`feature_extractor_sha256` written with the results) and sample count, never with published
Inception FIDs. `--feature_extractor inception --inception_weights FILE.safetensors` gives Inception
FID, comparable with published numbers only with pytorch-fid's Inception weights. Precision / recall
are computed on the same features (not the VGG-16 of Kynkaanniemi et al.). The logic lives in
`diffusers_ant.analysis.evaluate`.
"""

from __future__ import annotations

import sys

from diffusers_ant.analysis.arguments import add_sampling_arguments, check_sampling_arguments
from diffusers_ant.cli import OneLineErrorParser, check_output_paths, report_bad_input

PROG = "evaluate_model.py"




def build_parser():
    parser = OneLineErrorParser(prog=PROG, description="Sample a saved pipeline and score it against a dataset "
                                            "(domain FID by default, KID, improved precision / recall).")
    parser.add_argument("--model", required=True, help="A saved pipeline folder (what train_ant.py writes).")
    add_sampling_arguments(parser, num_samples_default=1000)
    parser.add_argument("--resolution", type=int, default=None,
                        help="Sampling resolution in pixels of a text-to-image model (default: its denoiser's "
                             "sample_size; needed for flux and qwenimage, whose transformers record none).")
    parser.add_argument("--output", default=None, help="Write the metrics as JSON here.")
    parser.add_argument("--save_samples", default=None, help="Save the generated images as PNG files in this folder.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on machines with <= 4 CPUs, where more threads contend; "
                             "else torch's).")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    return parser


def evaluate(args) -> None:
    """Sample the model, score it, print the table and write the JSON."""
    from diffusers_ant.analysis.common import load_denoiser, resolve_device
    from diffusers_ant.analysis.evaluate import evaluate_pipeline, format_results

    pipeline, _ = load_denoiser(args.model)
    pipeline.to(resolve_device(args.device))
    results = evaluate_pipeline(
        pipeline, args.dataset_name, num_samples=args.num_samples,
        scheduler=None if args.scheduler == "pipeline" else args.scheduler,
        num_inference_steps=args.num_inference_steps, batch_size=args.batch_size,
        feature_extractor=args.feature_extractor, inception_weights=args.inception_weights, seed=args.seed,
        num_real=args.num_real, kid_subsets=args.kid_subsets, save_samples=args.save_samples,
        progress=not args.no_progress, train_data_dir=args.train_data_dir, resolution=args.resolution,
    )
    results["model"] = args.model
    print(f"{args.model}: {results['num_fake']} samples, {results['scheduler']} {results['num_inference_steps']} steps, "
          f"vs {results['dataset_name']}")
    print(format_results(results))
    if args.output:
        from diffusers_ant.files import write_json_atomically

        write_json_atomically(args.output, results)
        print(f"wrote {args.output}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_threads is not None and args.num_threads < 1:
        parser.error("--num_threads must be positive")
    check_sampling_arguments(parser, args)
    check_output_paths(parser, ("--output", args.output, False), ("--save_samples", args.save_samples, True))

    from diffusers_ant.analysis.common import set_torch_threads

    set_torch_threads(args.num_threads)
    if args.no_progress:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # also the "Loading pipeline components" bars
    return report_bad_input(PROG, evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
