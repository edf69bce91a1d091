"""The command-line flags of the scripts that sample models and score them (evaluate_model.py, analyze.py ntg /
forgetting, merge_deme.py, train_deme.py's search), and their checks, once.

A module of its own, apart from `evaluate`: the scripts import it before parsing, and `evaluate` imports
diffusers (seconds, and bitsandbytes' messages on stderr), which `--help` and a one-line error should not wait for.
"""

from __future__ import annotations

from ..metrics.features import DOMAIN_DATASETS

FEATURE_EXTRACTOR_CHOICES = ("domain", "inception")
FEATURE_EXTRACTOR_NAMES = FEATURE_EXTRACTOR_CHOICES + DOMAIN_DATASETS
# KID's cost grows with subsets x subset_size^2; 50 subsets give a standard error of the mean well
# below its spread between runs, at half the cost of the common 100.
DEFAULT_KID_SUBSETS = 50


def add_sampling_arguments(parser, num_samples_default: int = 1000) -> None:
    """The flags that choose real images, the sampler and the metric features."""
    parser.add_argument("--dataset_name", default=None,
                        help="Real images: a built-in dataset (mnist5k, animal_mnist, digits) or a datasets name.")
    parser.add_argument("--train_data_dir", default=None, help="Real images from an image folder instead.")
    parser.add_argument("--num_samples", type=int, default=num_samples_default,
                        help=f"Images to generate per model or configuration (default {num_samples_default}).")
    parser.add_argument("--num_real", type=int, default=None, help="Real images to draw (default: --num_samples).")
    parser.add_argument("--scheduler", default="ddim",
                        help="Sampling scheduler: ddim (default), ddpm or any diffusers scheduler class name "
                             "(evaluate_model.py also takes 'pipeline': the scheduler saved with the model). "
                             "For a flow-matching model ddim and ddpm mean its Euler sampler "
                             "(FlowMatchEulerDiscreteScheduler).")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Sampling steps (default 50).")
    parser.add_argument("--batch_size", type=int, default=256, help="Images per sampling batch (default 256).")
    parser.add_argument("--feature_extractor", default="domain",
                        help="domain (the dataset's classifier: a domain FID), inception (needs --inception_weights) "
                             "or a built-in dataset name whose classifier to use.")
    parser.add_argument("--inception_weights", default=None, help="FID Inception-v3 weights as a .safetensors file.")
    parser.add_argument("--kid_subsets", type=int, default=DEFAULT_KID_SUBSETS,
                        help=f"KID subsets (default {DEFAULT_KID_SUBSETS}).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the sampling noise and the draw of real images.")


def check_sampling_arguments(parser, args) -> None:
    """`parser.error` (one line) for what `add_sampling_arguments`' flags cannot be."""
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("pass --dataset_name (e.g. mnist5k) or --train_data_dir for the real images")
    for name in ("num_samples", "num_inference_steps", "batch_size", "kid_subsets"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if getattr(args, "num_real", None) is not None and args.num_real < 1:
        # (a negative count sliced the shuffled rows from the end; 0 fell back to --num_samples)
        parser.error("--num_real must be positive (leave it out for --num_samples real images)")
    if args.feature_extractor not in FEATURE_EXTRACTOR_NAMES:
        parser.error(f"unknown --feature_extractor {args.feature_extractor!r}; valid: {', '.join(FEATURE_EXTRACTOR_NAMES)}")
    problem = feature_extractor_problem(args.feature_extractor, args.dataset_name, args.train_data_dir,
                                        args.inception_weights)
    if problem:
        parser.error(problem)


def feature_extractor_problem(feature_extractor, dataset_name, train_data_dir, inception_weights, prefix: str = "",
                              otherwise: str = "") -> str | None:
    """Why `feature_extractor` cannot score against these real images, in one line naming the flags (spelt
    `--{prefix}feature_extractor` ..., as `train_deme.py`'s `--search_` ones), or None. Checked before any
    sampling: `resolve_feature_extractor` would raise it only once every sample is drawn. `otherwise` ends
    the domain refusal with the caller's other way out."""
    if feature_extractor == "inception" and not inception_weights:
        return f"--{prefix}feature_extractor inception needs --{prefix}inception_weights FILE.safetensors"
    if feature_extractor == "domain" and (train_data_dir is not None or dataset_name not in DOMAIN_DATASETS):
        data = dataset_name if train_data_dir is None else f"--{prefix}train_data_dir {train_data_dir}"
        # (a built-in classifier works offline, where Inception's weights cannot be downloaded)
        return (f"no domain feature extractor for {data} (there are: {', '.join(DOMAIN_DATASETS)}): use "
                f"--{prefix}feature_extractor {'|'.join(DOMAIN_DATASETS)} (that data set's classifier) or "
                f"--{prefix}feature_extractor inception --{prefix}inception_weights FILE.safetensors{otherwise}")
    return None
