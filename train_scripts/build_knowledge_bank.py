#!/usr/bin/env python
"""Sample a pretrained model's knowledge bank for Diff-Tuning (Zhong et al., NeurIPS 2024).

    python train_scripts/build_knowledge_bank.py --pretrained_model_name_or_path mnist-pretrained \\
        --num_images 1000 --output_dir bank
    python train_scripts/build_knowledge_bank.py --pretrained_model_name_or_path sd-model \\
        --prompts_file prompts.txt --num_images 500 --guidance_scale 7.5 --output_dir bank
    python train_scripts/build_knowledge_bank.py --pretrained_model_name_or_path controlnet-model \\
        --dataset_name mnist5k_captions --num_images 500 --output_dir bank
    python train_scripts/build_knowledge_bank.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --prompts_file prompts.txt --num_images 200 --num_inference_steps 28 --guidance_scale 3.5 \
        --resolution 512 --torch_dtype bfloat16 --batch_size 4 --output_dir bank

Class-conditional models draw every class in turn (or `--class_labels`); text-to-image models (sd, sdxl,
sd3, flux, qwenimage; each sampled by its own pipeline and scheduler, FlowMatchEuler for the
flow-matching ones) draw from `--prompts_file` (evenly over it when it holds more prompts than the bank
images, in turn otherwise) and store each image with its prompt; ControlNet models sample from `--conditioning_dir` or a dataset's
conditioning column (with the row's caption as the prompt unless `--prompts_file` is given), or from a
blank condition when neither is given. A ControlNet bank pairs each image with a condition that
matches it: the condition re-extracted from the image (`--condition_extractor`, the function that made
the training conditions, `outline` by default for `mnist5k_captions` only; the default `--bank_condition extracted`) or a blank one (`--bank_condition blank`), never the
condition it was sampled from, which Diff-Tuning's untrained ControlNet ignores.

The bank is an image folder (`metadata.jsonl` + `images/`) with a manifest `bank.json`: train on it
with `train_ant.py --knowledge_bank BANK`, or read it as any `--train_data_dir`. Interrupted? Run the
same command again: it continues where it stopped and ends with the bank an uninterrupted run makes.
The logic lives in `diffusers_ant.diff_tuning.bank`.
"""

from __future__ import annotations

import argparse
import os
import sys

from diffusers_ant.cli import OneLineErrorParser, check_output_paths, report_bad_input

PROG = "build_knowledge_bank.py"


def _class_labels(text: str) -> list:
    try:
        labels = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as 0,1,2, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("expected at least one class label, e.g. 0,1,2")
    return labels


def build_parser():
    parser = OneLineErrorParser(prog=PROG, description="Sample a pretrained diffusers pipeline into a Diff-Tuning "
                                                       "knowledge bank (an image folder with bank.json).")
    parser.add_argument("--pretrained_model_name_or_path", required=True,
                        help="The pretrained pipeline folder (or Hub id) that fine-tuning starts from.")
    parser.add_argument("--output_dir", required=True, help="The bank folder (new, empty, or a bank to resume).")
    parser.add_argument("--num_images", type=int, required=True, help="Images in the bank.")
    parser.add_argument("--model_type", choices=("unet", "dit", "sd", "controlnet", "sdxl", "sd3", "flux", "qwenimage"),
                        default=None, help="The pipeline's model type (default: read from the pipeline's class).")
    parser.add_argument("--resolution", type=int, default=None,
                        help="The square size to sample at: the --resolution you train at (default: the model's own "
                             "size; flux / qwenimage: 512, train_ant.py's default for them).")
    parser.add_argument("--revision", default=None, help="Hub revision of a Hub model id.")
    parser.add_argument("--seed", type=int, default=0, help="Image i is drawn from a generator seeded with (seed, i).")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="Images sampled per pipeline call, latent DiTs included (part of the bank's settings: "
                             "keep it when resuming).")
    parser.add_argument("--num_inference_steps", type=int, default=50,
                        help="Sampling steps (the paper gives no count; its ablation finds more steps better, "
                             "with diminishing returns).")
    parser.add_argument("--scheduler", default=None,
                        help="Sampler: the pipeline's own (default), ddim, ddpm or a diffusers scheduler class name.")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Classifier-free guidance (FLUX.1-dev: its distilled guidance; default: the pipeline's "
                             "own, 3.5 for FLUX.1).")
    parser.add_argument("--class_labels", type=_class_labels, default=None,
                        help="Classes to cycle through, e.g. 0,1,2 (default: every class in turn).")
    parser.add_argument("--prompts_file", default=None, help="Text-to-image / ControlNet: one prompt per line.")
    parser.add_argument("--conditioning_dir", default=None,
                        help="ControlNet: a folder of conditions to sample from (default: a blank condition).")
    parser.add_argument("--dataset_name", default=None,
                        help="Text-to-image (sd, sdxl, sd3, flux, qwenimage): a dataset whose captions are the prompts, "
                             "in place of --prompts_file. ControlNet: a dataset whose conditions are sampled from and "
                             "whose captions are the prompts (built-in: mnist5k_captions).")
    parser.add_argument("--bank_condition", choices=("extracted", "blank"), default=None,
                        help="ControlNet: the condition each bank image is paired with: `extracted` (default: "
                             "re-extracted from the image by --condition_extractor) or `blank` (sampled from and "
                             "paired with an all-zero condition). Never the condition an image was sampled from: "
                             "the untrained ControlNet ignores it.")
    parser.add_argument("--condition_extractor", default=None,
                        help="ControlNet, --bank_condition extracted: the function that made the training "
                             "conditions, module:function or file.py:function (PIL image -> condition image or "
                             "array), or `outline` (the outline that made mnist5k_captions' conditions, as "
                             "train_ant.py --track_convergence re-extracts; the default for that data set only).")
    parser.add_argument("--dataset_config_name", default=None, help="The dataset's configuration name.")
    parser.add_argument("--conditioning_image_column", default=None,
                        help="Column of --dataset_name holding the conditioning images (default: found by name).")
    parser.add_argument("--caption_column", default=None,
                        help="Column of --dataset_name holding captions, used as prompts (default: found by name).")
    parser.add_argument("--cache_dir", default=None,
                        help="Cache folder of the datasets and of a Hub model id (default: their own caches).")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--torch_dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="Precision of sampling (part of the bank's settings).")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    return parser


def _source_model_type(args):
    """The model type of the pipeline to sample: a LoRA output's recorded one (its ant_lora.json), else read from
    its model_index.json (a local folder's, or a Hub id's, which downloads that file alone); None where there is
    none (a ControlNet saved alone)."""
    import json

    from diffusers_ant.models.base import LORA_INFO_NAME
    from diffusers_ant.models.families import model_type_of_folder, model_type_of_index

    name = args.pretrained_model_name_or_path
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, LORA_INFO_NAME)):  # (a LoRA folder has no model_index.json)
            with open(os.path.join(name, LORA_INFO_NAME), encoding="utf-8") as f:
                return json.load(f).get("model_type")
        return model_type_of_folder(name) if os.path.isfile(os.path.join(name, "model_index.json")) else None
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(name, revision=args.revision, cache_dir=args.cache_dir)
    except (OSError, ValueError):
        return None  # unreachable or not a pipeline: build_knowledge_bank's load says so in one line
    return model_type_of_index(index)


def build(args) -> None:
    from diffusers_ant.diff_tuning.bank import (ConditioningImages, build_knowledge_bank, read_dataset_captions,
                                                read_prompts_file)
    if args.conditioning_dir is not None and args.dataset_name is not None:
        raise ValueError("give either --conditioning_dir or --dataset_name, not both")
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file is not None else None
    prompts_source = "prompts file"
    source_type = args.model_type or _source_model_type(args)
    if args.dataset_name is not None and source_type in ("unet", "dit"):
        raise ValueError(f"a {source_type} bank samples class labels (--class_labels) or nothing: it takes no prompts or "
                         "conditions, drop --dataset_name")
    conditioning = None
    if args.dataset_name is not None and source_type not in (None, "controlnet"):
        # a text-to-image base (sd, sdxl, sd3, flux, qwenimage): the dataset's captions are the prompts
        if prompts is not None:
            raise ValueError("give either --prompts_file or --dataset_name (its captions), not both")
        prompts = read_dataset_captions(args.dataset_name, args.caption_column,
                                        dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir)
        prompts_source = f"dataset {args.dataset_name}, captions"
    elif args.conditioning_dir is not None:
        conditioning = ConditioningImages.from_folder(args.conditioning_dir)
    elif args.dataset_name is not None:
        conditioning = ConditioningImages.from_dataset(
            args.dataset_name, args.conditioning_image_column, args.caption_column,
            dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir,
        )
    manifest = build_knowledge_bank(
        args.pretrained_model_name_or_path, args.output_dir, args.num_images, cache_dir=args.cache_dir,
        model_type=args.model_type, revision=args.revision, seed=args.seed, batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps, scheduler=args.scheduler,
        guidance_scale=args.guidance_scale, class_labels=args.class_labels, prompts=prompts,
        conditioning=conditioning, bank_condition=args.bank_condition, condition_extractor=args.condition_extractor,
        device=args.device, torch_dtype=args.torch_dtype,
        progress=not args.no_progress, resolution=args.resolution, prompts_source=prompts_source,
    )
    print(f"knowledge bank {args.output_dir}: {manifest['num_images']} {manifest['model_type']} images at "
          f"{manifest['resolution']}x{manifest['resolution']}, {manifest['num_inference_steps']} "
          f"{manifest['scheduler']} steps, seed {manifest['seed']}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # before the model loads and its weights are hashed (minutes for FLUX.1), as the other scripts do
    check_output_paths(parser, ("--output_dir", args.output_dir, True))
    if args.no_progress:
        from diffusers.utils import logging as diffusers_logging

        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # also the "Loading pipeline components" bars
        transformers_logging.disable_progress_bar()  # and the text encoders' "Loading weights" bars
    return report_bad_input(PROG, build, args)


if __name__ == "__main__":
    sys.exit(main())
