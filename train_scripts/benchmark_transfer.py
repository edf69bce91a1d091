#!/usr/bin/env python
"""Diff-Tuning's transfer benchmark (issue 11, item 5): MNIST-5k -> Animal-MNIST at 16x16 (or at the
`--pretrained` model's own resolution), and a ControlNet's sudden convergence.

Transfer. One unconditional UNet (the 0.28M bench UNet of `benchmark_quality.py`) is pretrained on
MNIST-5k digits at 16x16, or taken from `--pretrained` (e.g. `bench-quality/vanilla/seed-0`, or an 8x8
base from `pretrain_base.py --resolution 8`), and fine-tuned on 500 Animal-MNIST silhouettes with every row of `METHODS`: full fine-tuning, Diff-Tuning (knowledge
bank), Diff-Tuning KD (`--retention kd`), LoRA, LoRA + Diff-Tuning, DiffFit, DiffFit + Diff-Tuning,
all for the same steps from the same seeds. The knowledge bank is sampled once from the pretrained
model (`build_knowledge_bank.py`); the model is unconditional, so its bank images carry no label and
train the model as they are. Each fine-tuned model is scored against held-out Animal-MNIST images
(other rows than the 500) in the `animal_mnist` domain features: domain FID, KID, precision, recall.
The whole unconditional half runs at one resolution, the pretrained UNet's `sample_size` (16 when it is
pretrained here): the Animal-MNIST images are resized to it for fine-tuning and for the evaluation
reference, the bank is sampled at it, every fine-tune trains at it, and the time plan is scaled to it
(`resolution_cost_factor`); `results.json` records it (`resolution`).
Since the seeds are shared (same data order, same sampling noise), each method is compared with full
fine-tuning, and each Diff-Tuning row with its own base (LoRA + Diff-Tuning with LoRA, ...), by the
per-seed difference with a Student-t interval over seeds. The chain of forgetting (`analyze.py
forgetting`: the low-noise fraction f of sampling handed back to the pretrained model) of full
fine-tuning and of Diff-Tuning is drawn on one plot.

ControlNet. Always at 16x16 (`CONTROLNET_RESOLUTION`), whatever `--pretrained`'s resolution: it does not
start from that model. A tiny Stable Diffusion is made here (`diffusers_ant.diff_tuning.benchmark`): its VAE
fitted to MNIST-5k (`diffusers_ant.models.autoencoder`; the `tiny` preset's random VAE cannot be
sampled meaningfully), its UNet pretrained on `mnist5k_captions`. A ControlNet copied from that UNet is trained on the
captions' outline conditions, plain and with Diff-Tuning (a bank sampled from the untrained
ControlNet pipeline), with `--track_convergence`: every `--convergence_steps` steps the trainer
samples the validation conditions, re-extracts the outlines and records their distance (1 - IoU) to
the input outlines. Sudden convergence is the first check below the threshold, which
`--convergence_threshold auto` sets before any run to half-way between the distance of the untrained
ControlNet's samples (which ignore the condition) and that of the real images themselves.

    python train_scripts/benchmark_transfer.py --output_dir bench-transfer                  # ~1.5 h on 2 cores
    python train_scripts/benchmark_transfer.py --output_dir bench-transfer-smoke --quick    # a smoke run
    python train_scripts/benchmark_transfer.py --pretrained bench-quality/vanilla/seed-0    # reuse a model

Every run is a real process (`train_ant.py`, `build_knowledge_bank.py`, `analyze.py`; one torch thread
each, `--workers` at a time, each with its log); finished runs and evaluations are kept and skipped
when the command is run again (an evaluation is redone when its settings or the feature extractor's
weights changed), so an interrupted benchmark resumes. Outputs: `results.json` (every run's numbers,
the summaries, the target checks, settings, hashes, the plan and the times), `results.md` (the tables,
written to be pasted into the README), `fid_by_method.png`, `forgetting.png`, `convergence.png`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from diffusers_ant.analysis.benchmark import (
    BENCH_UNET,
    RESOLUTION,
    SECONDS_PER_IMAGE_STEP,
    SECONDS_PER_RUN,
    SECONDS_PER_STEP_BENCH_UNET,
    base_resolution,
    check_benchmark_settings,
    command_line,
    evaluate_in_pool,
    evaluate_saved_model,
    folder_weights_sha256,
    format_difference,
    format_mean_sd,
    invocation_recorded,
    recorded_seconds,
    relative_differences,
    resolution_cost_factor,
    run_logged,
    run_parallel,
    split_rows,
    stored_metrics,
    time_path,
    verdict,
    write_image_folder,
    write_json,
)

HERE = os.path.dirname(os.path.abspath(__file__))

SOURCE_DATASET = "mnist5k"          # pretraining
TARGET_DATASET = "animal_mnist"     # fine-tuning, its held-out reference and its domain features
CONTROL_DATASET = "mnist5k_captions"  # captions and outline conditions for the ControlNet part
TARGET_ROWS = 10000                 # Animal-MNIST's size
TARGET_SIDE = 28                    # Animal-MNIST's images are 28x28: a larger model would only upsample them
# RESOLUTION (16, the quality benchmark's): the UNet pretrained here when --pretrained is absent; the
# unconditional half runs at args.resolution, the pretrained model's own (base_resolution).
CONTROLNET_RESOLUTION = 16          # the ControlNet half (tiny SD, VAE, conditions), independent of --pretrained
METRICS = ("fid", "kid_mean", "precision", "recall")
# Diff-Tuning's settings in every Diff-Tuning row (the authors' defaults, PAPERS.md section 3)
DIFF_TUNING_FLAGS = ["--bank_fraction", "0.2", "--bank_weight", "0.1", "--retention_exponent", "1",
                     "--reconsolidation_exponent", "1"]

# The rows: what trains (`--finetune`), how knowledge is retained (None: not at all, "bank": the
# knowledge bank, "kd": distillation from the frozen pretrained model), and which row a Diff-Tuning
# row is compared with (the same fine-tuning without Diff-Tuning).
METHODS = {
    "full": {"finetune": "full", "retention": None, "base": None, "label": "full fine-tuning"},
    "diff_tuning": {"finetune": "full", "retention": "bank", "base": "full", "label": "Diff-Tuning"},
    "diff_tuning_kd": {"finetune": "full", "retention": "kd", "base": "full", "label": "Diff-Tuning KD"},
    "lora": {"finetune": "lora", "retention": None, "base": None, "label": "LoRA"},
    "lora_diff_tuning": {"finetune": "lora", "retention": "bank", "base": "lora", "label": "LoRA + Diff-Tuning"},
    "difffit": {"finetune": "difffit", "retention": None, "base": None, "label": "DiffFit"},
    "difffit_diff_tuning": {"finetune": "difffit", "retention": "bank", "base": "difffit",
                            "label": "DiffFit + Diff-Tuning"},
}
CONTROLNET_METHODS = {
    "controlnet": {"retention": None, "label": "ControlNet"},
    "controlnet_diff_tuning": {"retention": "bank", "label": "ControlNet + Diff-Tuning"},
}

# Planning figures (seconds, one torch thread, idle 2-core CPU). The bench UNet's step at batch 64 is
# measured (ENVIRONMENT.md, 0.14 s); the factors of the other rows are estimates, not measurements:
# the bank rows read a second loader, KD adds a frozen forward on a fifth of the batch, LoRA adds its
# low-rank products to every convolution. The latent models' figures are ENVIRONMENT.md's 2-thread
# measurements (tiny SD UNet at 8x8x4 latents, batch 16: 0.09 s; ControlNet 1.09x that) times 1.5 for
# one thread; the VAE's step and the latent sampling cost are estimates.
STEP_FACTOR = {"full": 1.0, "diff_tuning": 1.05, "diff_tuning_kd": 1.2, "lora": 1.2, "lora_diff_tuning": 1.25,
               "difffit": 1.05, "difffit_diff_tuning": 1.1}
SD_SECONDS_PER_STEP_16 = 0.135         # tiny SD, batch 16
CONTROLNET_SECONDS_PER_STEP_16 = 0.15  # ControlNet on it, batch 16
VAE_SECONDS_PER_STEP_64 = 0.3          # tiny AutoencoderKL, 16x16, batch 64 (estimate)
LATENT_SECONDS_PER_IMAGE_STEP = 0.005  # SD (+ ControlNet) sampling, per image and step (estimate)


_PRINT_LOCK = threading.Lock()


def say(message: str) -> None:
    """Print one line from any worker thread (whole lines: the jobs report as they finish)."""
    with _PRINT_LOCK:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------ arguments


def parse_args(argv=None):
    from diffusers_ant.cli import OneLineErrorParser

    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="bench-transfer")
    p.add_argument("--pretrained", default=None,
                   help="a pretrained unconditional greyscale UNet pipeline folder to fine-tune (e.g. "
                        "bench-quality/vanilla/seed-0, or an 8x8 base from pretrain_base.py --resolution 8); the "
                        "unconditional half (data, bank, fine-tunes, scores) runs at its sample_size (8 to 28, a "
                        "multiple of its UNet's downsampling); default: pretrain a 16x16 one on MNIST-5k here")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="fine-tuning and sampling seeds, shared by all methods (default 0 1 2)")
    g = p.add_argument_group("pretraining (MNIST-5k)")
    g.add_argument("--pretrain_steps", type=int, default=2000, help="(default 2000: twice the quality benchmark's)")
    g.add_argument("--pretrain_learning_rate", type=float, default=2e-3)
    g.add_argument("--pretrain_seed", type=int, default=0)
    g = p.add_argument_group("fine-tuning (Animal-MNIST)")
    g.add_argument("--num_train_images", type=int, default=500, help="Animal-MNIST images to fine-tune on (default 500)")
    g.add_argument("--num_real", type=int, default=5000,
                   help="held-out Animal-MNIST images (other rows) of the evaluation reference (default 5000)")
    g.add_argument("--data_seed", type=int, default=0, help="seeds the choice of the two disjoint subsets")
    g.add_argument("--max_train_steps", type=int, default=1000, help="fine-tuning steps of every row (default 1000)")
    g.add_argument("--train_batch_size", type=int, default=64, help="(bank or KD rows included: 20%% of it)")
    g.add_argument("--learning_rate", type=float, default=5e-4, help="full fine-tuning and its Diff-Tuning rows")
    g.add_argument("--peft_learning_rate", type=float, default=2e-3, help="the LoRA and DiffFit rows")
    g.add_argument("--lr_warmup_steps", type=int, default=50)
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    g.add_argument("--bank_images", type=int, default=1000, help="knowledge-bank images (default 1000)")
    g.add_argument("--bank_inference_steps", type=int, default=50, help="DDIM steps of the bank (the paper: 250 DDPM)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--num_samples", type=int, default=2000, help="generated images per model (default 2000)")
    g.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--eval_batch_size", type=int, default=250)
    g.add_argument("--validation_images", type=int, default=16, help="images of each run's final sample grid")
    g.add_argument("--forgetting_methods", default="full,diff_tuning",
                   help="rows whose chain of forgetting is measured (default full,diff_tuning)")
    g.add_argument("--forgetting_seeds", type=int, nargs="+", default=None, help="(default: the first seed)")
    g.add_argument("--fractions", default="0,0.1,0.2,0.3,0.5,0.7,1", help="fractions f of the chain of forgetting")
    g.add_argument("--forgetting_samples", type=int, default=1000, help="generated images per fraction (default 1000)")
    g.add_argument("--confidence", type=float, default=0.95, help="of the t intervals over seeds (default 0.95)")
    g = p.add_argument_group("ControlNet sudden convergence", f"always at {CONTROLNET_RESOLUTION}x{CONTROLNET_RESOLUTION} "
                             "(a tiny SD made here, not --pretrained)")
    g.add_argument("--skip_controlnet", action="store_true", help="leave the ControlNet part out")
    g.add_argument("--vae_steps", type=int, default=500, help="fitting steps of the tiny SD's VAE (batch 64)")
    g.add_argument("--sd_steps", type=int, default=1200, help="pretraining steps of the tiny SD UNet")
    g.add_argument("--sd_batch_size", type=int, default=32)
    g.add_argument("--sd_learning_rate", type=float, default=1e-3)
    g.add_argument("--controlnet_steps", type=int, default=800)
    g.add_argument("--controlnet_batch_size", type=int, default=16)
    g.add_argument("--controlnet_learning_rate", type=float, default=1e-3)
    g.add_argument("--controlnet_bank_images", type=int, default=500)
    g.add_argument("--convergence_steps", type=int, default=50, help="check the condition every N steps")
    g.add_argument("--convergence_images", type=int, default=16, help="validation conditions per check")
    g.add_argument("--convergence_inference_steps", type=int, default=20, help="DDIM steps per check")
    g.add_argument("--convergence_threshold", default="auto",
                   help="distance below which a ControlNet has converged; auto: --convergence_fraction of the way "
                        "from the untrained ControlNet's distance down to the real images' distance")
    g.add_argument("--convergence_fraction", type=float, default=0.5)
    g.add_argument("--guidance_scale", type=float, default=1.0,
                   help="classifier-free guidance of the ControlNet's samples and bank (default 1: none)")
    p.add_argument("--phase", default="all", choices=["train", "all"], help="train: stop after the training runs")
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="processes in parallel, one torch thread each")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, a few steps of everything, tiny samples")
    args = p.parse_args(argv)
    if args.quick:  # a smoke test of the machinery, not of the numbers: few steps, small batches and samples
        args.seeds = args.seeds if args.seeds != [0, 1, 2] else [0, 1]
        args.pretrain_steps, args.max_train_steps, args.lr_warmup_steps, args.train_batch_size = 10, 4, 1, 16
        args.num_train_images, args.num_real = 100, 128
        args.bank_images, args.bank_inference_steps = 16, 2
        args.num_samples, args.num_inference_steps, args.eval_batch_size, args.validation_images = 32, 2, 32, 4
        args.fractions, args.forgetting_samples = "0,0.5,1", 32
        args.vae_steps, args.sd_steps, args.sd_batch_size = 20, 10, 16
        args.controlnet_steps, args.convergence_steps, args.convergence_images = 10, 5, 4
        args.convergence_inference_steps, args.controlnet_bank_images = 4, 16
    for name, valid in (("methods", METHODS), ("forgetting_methods", METHODS)):
        chosen = [m for m in getattr(args, name).split(",") if m]
        unknown = [m for m in chosen if m not in valid]
        if unknown:
            p.error(f"unknown --{name} {', '.join(unknown)}; choose from {', '.join(valid)}")
        setattr(args, name, chosen)
    missing_bases = sorted({METHODS[m]["base"] for m in args.methods if METHODS[m]["base"]} - set(args.methods))
    if missing_bases:
        p.error(f"--methods: the Diff-Tuning rows are compared with their base rows; add {', '.join(missing_bases)}")
    args.forgetting_methods = [m for m in args.forgetting_methods if m in args.methods]
    if len(set(args.seeds)) < 2:
        p.error("give at least 2 --seeds: the intervals are over seeds")
    args.forgetting_seeds = args.forgetting_seeds or args.seeds[:1]
    if not set(args.forgetting_seeds) <= set(args.seeds):
        p.error("--forgetting_seeds must be among --seeds (the curves are of trained models)")
    for name in ("pretrain_steps", "num_train_images", "num_real", "max_train_steps", "train_batch_size", "rank",
                 "bank_images", "bank_inference_steps", "num_samples", "num_inference_steps", "eval_batch_size",
                 "forgetting_samples", "validation_images", "vae_steps", "sd_steps", "sd_batch_size", "controlnet_steps",
                 "controlnet_batch_size", "controlnet_bank_images", "convergence_steps", "convergence_images",
                 "convergence_inference_steps", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if args.num_train_images + args.num_real > TARGET_ROWS:
        p.error(f"--num_train_images + --num_real must not exceed Animal-MNIST's {TARGET_ROWS} images (they are disjoint)")
    if round(args.train_batch_size * 0.2) < 1 or round(args.controlnet_batch_size * 0.2) < 1:
        p.error("--train_batch_size and --controlnet_batch_size must be at least 3 (a fifth goes to retention)")
    from diffusers_ant.analysis.forgetting import parse_fractions

    try:
        args.fraction_values = parse_fractions(args.fractions)
    except ValueError as err:
        p.error(str(err))
    if args.convergence_threshold != "auto":
        try:
            args.convergence_threshold = float(args.convergence_threshold)
        except ValueError:
            p.error("--convergence_threshold must be a number or auto")
        if not args.convergence_threshold > 0:
            p.error("--convergence_threshold must be > 0")
    if not 0 < args.convergence_fraction < 1:
        p.error("--convergence_fraction must be in (0, 1)")
    if not 0 < args.confidence < 1:
        p.error("--confidence must be in (0, 1)")
    if args.pretrained is not None:
        problem = check_pretrained(args.pretrained)
        if problem:
            p.error(f"--pretrained {args.pretrained}: {problem}")
    # the side of the whole unconditional half: the pretrained model's own, else the 16 pretrained here
    args.resolution = base_resolution(args.pretrained)
    return args


def check_pretrained(folder):
    """Why `folder` cannot be the pretrained model here (None when it can): it must be a saved
    unconditional UNet pipeline for greyscale images whose side the benchmark can use: 8 to
    `TARGET_SIDE` (Animal-MNIST's 28) and a multiple of the UNet's downsampling (2 per down block
    but the last)."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        return "no saved pipeline there (model_index.json): give a folder train_ant.py wrote"
    config_path = os.path.join(folder, "unet", "config.json")
    if not os.path.isfile(config_path):
        return "not a UNet pipeline (no unet/config.json)"
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("_class_name") != "UNet2DModel" or config.get("num_class_embeds"):
        return "the benchmark fine-tunes an unconditional UNet2DModel"
    side, channels = config.get("sample_size"), config.get("in_channels")
    if channels != 1 or config.get("out_channels", 1) != 1:
        return f"a model with {channels} channel(s); the benchmark fine-tunes a greyscale (1-channel) model"
    factor = 2 ** max(0, len(config.get("down_block_types") or [None]) - 1)
    if not isinstance(side, int) or not 8 <= side <= TARGET_SIDE or side % factor:
        return (f"a {side}x{side} model; the benchmark needs a side from 8 to {TARGET_SIDE} (Animal-MNIST's) "
                f"that its UNet's {factor}x downsampling divides")
    return None


# ------------------------------------------------------------------------------------------ layout


class Layout:
    """Where everything of one benchmark lives under `root` (the output folder)."""

    def __init__(self, args):
        self.root = args.output_dir
        self.unet_config = os.path.join(self.root, "bench_unet.json")
        self.train_images = os.path.join(self.root, "data", "animal-train")
        self.heldout_images = os.path.join(self.root, "data", "animal-heldout")
        self.pretrained = args.pretrained or os.path.join(self.root, "pretrained")
        self.bank = os.path.join(self.root, "bank")
        self.controlnet = os.path.join(self.root, "controlnet")
        self.sd_init = os.path.join(self.controlnet, "sd-init")
        self.sd = os.path.join(self.controlnet, "sd-pretrained")
        self.controlnet_init = os.path.join(self.controlnet, "controlnet-init")
        self.controlnet_bank = os.path.join(self.controlnet, "bank")
        self.threshold = os.path.join(self.controlnet, "threshold.json")

    def run(self, method, seed) -> str:
        root = self.controlnet if method in CONTROLNET_METHODS else os.path.join(self.root, "finetune")
        return os.path.join(root, method, f"seed-{seed}")

    def forgetting(self, method, seed) -> str:
        return os.path.join(self.root, "forgetting", f"{method}-seed-{seed}.json")


# ------------------------------------------------------------------------------------------ the plan


def plan(args) -> dict:
    """Estimated wall seconds of each stage with `args.workers` processes on an idle 2-core CPU (see
    the planning figures above, measured at 16x16 and scaled to `args.resolution` by
    `resolution_cost_factor`): pretraining (UNet beside the tiny SD), banks, fine-tunes and ControlNet
    runs, evaluations, chains of forgetting."""
    workers = args.workers
    batch = args.train_batch_size / 64
    step = SECONDS_PER_STEP_BENCH_UNET * resolution_cost_factor(args.resolution)  # the UNet's, at its side
    image_step = SECONDS_PER_IMAGE_STEP * resolution_cost_factor(args.resolution)
    pretrain = 0.0 if args.pretrained else args.pretrain_steps * SECONDS_PER_STEP_BENCH_UNET * batch + SECONDS_PER_RUN
    bank = args.bank_images * args.bank_inference_steps * image_step + 15
    finetunes = [args.max_train_steps * step * batch * STEP_FACTOR[m] + SECONDS_PER_RUN
                 for m in args.methods for _ in args.seeds]
    sd = cn_prep = 0.0
    controlnet = []
    if not args.skip_controlnet:
        sd = (args.vae_steps * VAE_SECONDS_PER_STEP_64 + 10
              + args.sd_steps * SD_SECONDS_PER_STEP_16 * args.sd_batch_size / 16 + SECONDS_PER_RUN)
        check = args.convergence_images * args.convergence_inference_steps * LATENT_SECONDS_PER_IMAGE_STEP
        cn_prep = (args.controlnet_bank_images * args.convergence_inference_steps * LATENT_SECONDS_PER_IMAGE_STEP + 15
                   + len(args.seeds) * check + 15)
        one = (args.controlnet_steps * CONTROLNET_SECONDS_PER_STEP_16 * args.controlnet_batch_size / 16
               + (args.controlnet_steps // args.convergence_steps) * check + SECONDS_PER_RUN)
        controlnet = [one] * (len(CONTROLNET_METHODS) * len(args.seeds))

    def in_parallel(*jobs):
        return max(jobs) if workers >= 2 else sum(jobs)

    models = len(args.methods) * len(args.seeds) + 1  # + the pretrained model, scored on the target
    images = models * args.num_samples
    forgetting_images = len(args.forgetting_methods) * len(args.forgetting_seeds) * len(args.fraction_values) \
        * args.forgetting_samples
    stages = {
        "pretraining": in_parallel(pretrain, sd),
        "banks": in_parallel(bank, cn_prep),
        "fine-tuning and ControlNet runs": (sum(finetunes) + sum(controlnet)) / workers,
        "evaluation": (images * args.num_inference_steps * image_step + 10 * models) / workers,
        "chains of forgetting": (forgetting_images * args.num_inference_steps * image_step
                                 + 20 * len(args.forgetting_methods) * len(args.forgetting_seeds)) / workers,
    }
    return {"stages": stages, "total_seconds": sum(stages.values()), "runs": len(finetunes) + len(controlnet),
            "generated_images": images + forgetting_images, "resolution": args.resolution}


def describe_plan(estimate, args) -> str:
    parts = ", ".join(f"{name} {seconds / 60:.0f} min" for name, seconds in estimate["stages"].items())
    return (f"{estimate['runs']} training runs, {estimate['generated_images']} generated images, the UNet's at "
            f"{args.resolution}x{args.resolution}; estimated on an idle "
            f"2-core CPU with {args.workers} workers: {estimate['total_seconds'] / 60:.0f} min ({parts}); a busy "
            "machine is slower")


# ------------------------------------------------------------------------------------------ commands


def script(name) -> list:
    return [sys.executable, os.path.join(HERE, name)]


def validation_flags(args) -> list:
    """The sample grid every UNet run saves at its end (the evaluation's sampler, a few images)."""
    return ["--num_validation_images", str(args.validation_images), "--num_inference_steps", str(args.num_inference_steps)]


def pretrain_command(args, layout) -> list:
    """The pretrained model (only without --pretrained): the bench UNet on MNIST-5k at `RESOLUTION`
    (cosine decay after warm-up, EMA 0.999)."""
    return [*script("train_ant.py"), "--model_type", "unet", "--model_config_name_or_path", layout.unet_config,
            "--dataset_name", SOURCE_DATASET, "--resolution", str(RESOLUTION),
            "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.pretrain_steps),
            "--learning_rate", str(args.pretrain_learning_rate), "--lr_scheduler", "cosine",
            "--lr_warmup_steps", str(min(100, args.pretrain_steps // 10)), "--use_ema", "--ema_max_decay", "0.999",
            "--seed", str(args.pretrain_seed), "--output_dir", layout.pretrained,
            "--checkpointing_steps", str(args.pretrain_steps + 1), *validation_flags(args), "--report_to", "none"]


def bank_command(args, layout) -> list:
    return [*script("build_knowledge_bank.py"), "--pretrained_model_name_or_path", layout.pretrained,
            "--num_images", str(args.bank_images), "--output_dir", layout.bank, "--scheduler", "ddim",
            "--num_inference_steps", str(args.bank_inference_steps), "--batch_size", "50", "--seed", "0",
            "--no_progress"]


def finetune_command(args, layout, method, seed) -> list:
    """One fine-tuning row: the pretrained UNet on the Animal-MNIST subset; the same recipe for every row
    but the learning rate (full rows `--learning_rate`, LoRA and DiffFit rows `--peft_learning_rate`)."""
    row = METHODS[method]
    lr = args.learning_rate if row["finetune"] == "full" else args.peft_learning_rate
    cmd = [*script("train_ant.py"), "--model_type", "unet", "--pretrained_model_name_or_path", layout.pretrained,
           "--train_data_dir", layout.train_images, "--resolution", str(args.resolution),
           "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
           "--learning_rate", str(lr), "--lr_scheduler", "constant_with_warmup",
           "--lr_warmup_steps", str(args.lr_warmup_steps), "--use_ema", "--ema_max_decay", "0.999",
           "--seed", str(seed), "--output_dir", layout.run(method, seed),
           "--checkpointing_steps", str(args.max_train_steps + 1), *validation_flags(args),
           "--report_to", "none", "--finetune", row["finetune"]]
    if row["finetune"] == "lora":
        cmd += ["--rank", str(args.rank)]
    if row["retention"] == "bank":
        cmd += ["--knowledge_bank", layout.bank, *DIFF_TUNING_FLAGS]
    elif row["retention"] == "kd":
        cmd += ["--retention", "kd", *DIFF_TUNING_FLAGS]
    return cmd


def sd_command(args, layout) -> list:
    """The tiny SD's UNet pretrained on the captioned digits (10% empty prompts: an unconditional branch
    for the bank's null-prompt rows)."""
    return [*script("train_ant.py"), "--model_type", "sd", "--pretrained_model_name_or_path", layout.sd_init,
            "--dataset_name", CONTROL_DATASET, "--resolution", str(CONTROLNET_RESOLUTION),
            "--train_batch_size", str(args.sd_batch_size), "--max_train_steps", str(args.sd_steps),
            "--learning_rate", str(args.sd_learning_rate), "--lr_scheduler", "cosine",
            "--lr_warmup_steps", str(min(100, args.sd_steps // 10)), "--use_ema", "--ema_max_decay", "0.999",
            "--proportion_empty_prompts", "0.1", "--seed", "0", "--output_dir", layout.sd,
            "--checkpointing_steps", str(args.sd_steps + 1), "--num_validation_images", "8",
            "--num_inference_steps", str(args.convergence_inference_steps), "--guidance_scale", str(args.guidance_scale),
            "--report_to", "none"]


def controlnet_bank_command(args, layout) -> list:
    return [*script("build_knowledge_bank.py"), "--pretrained_model_name_or_path", layout.controlnet_init,
            "--num_images", str(args.controlnet_bank_images), "--output_dir", layout.controlnet_bank,
            "--dataset_name", CONTROL_DATASET, "--scheduler", "ddim",
            "--num_inference_steps", str(args.convergence_inference_steps), "--guidance_scale", str(args.guidance_scale),
            "--batch_size", "16", "--seed", "0", "--no_progress"]


def controlnet_command(args, layout, method, seed, threshold) -> list:
    """One ControlNet run from the shared untrained ControlNet, its convergence tracked (no EMA: the
    tracked weights are the trained ones, as in diffusers' ControlNet script)."""
    cmd = [*script("train_ant.py"), "--model_type", "controlnet", "--pretrained_model_name_or_path",
           layout.controlnet_init, "--dataset_name", CONTROL_DATASET, "--resolution", str(CONTROLNET_RESOLUTION),
           "--train_batch_size", str(args.controlnet_batch_size), "--max_train_steps", str(args.controlnet_steps),
           "--learning_rate", str(args.controlnet_learning_rate), "--lr_scheduler", "constant",
           "--seed", str(seed), "--output_dir", layout.run(method, seed),
           "--checkpointing_steps", str(args.controlnet_steps + 1),
           "--num_validation_images", str(args.convergence_images),
           "--num_inference_steps", str(args.convergence_inference_steps), "--guidance_scale", str(args.guidance_scale),
           "--track_convergence", "--convergence_steps", str(args.convergence_steps),
           "--convergence_threshold", repr(float(threshold)), "--convergence_distance", "iou",
           "--report_to", "none"]
    if CONTROLNET_METHODS[method]["retention"] == "bank":
        cmd += ["--knowledge_bank", layout.controlnet_bank, *DIFF_TUNING_FLAGS]
    return cmd


def forgetting_command(args, layout, method, seed) -> list:
    out = layout.forgetting(method, seed)
    return [*script("analyze.py"), "forgetting", "--finetuned", layout.run(method, seed), "--pretrained",
            layout.pretrained, "--train_data_dir", layout.heldout_images, "--feature_extractor", TARGET_DATASET,
            "--fractions", args.fractions, "--num_samples", str(args.forgetting_samples),
            "--num_real", str(args.num_real), "--num_inference_steps", str(args.num_inference_steps),
            "--batch_size", str(args.eval_batch_size), "--seed", str(seed), "--output", out,
            "--plot", out.replace(".json", ".png"), "--no_progress", "--num_threads", "1"]


def logged(cmd, folder, what) -> str:
    """`run_logged` with the log `folder/train.log`; its time file (written only after a successful exit)
    marks the run as done, whatever the run saves (a pipeline, LoRA weights, a ControlNet)."""
    log = os.path.join(folder, "train.log")
    return run_logged(cmd, log, time_path(log), what)


# ------------------------------------------------------------------------------------------ the ControlNet's base


def make_sd_base(args, layout) -> str:
    """The tiny SD before its UNet is trained, its VAE fitted to MNIST-5k (`diff_tuning.benchmark`); once."""
    record_path = layout.sd_init + ".json"
    if os.path.isfile(os.path.join(layout.sd_init, "model_index.json")) and os.path.isfile(record_path):
        return "kept"
    from diffusers_ant.diff_tuning.benchmark import make_sd_base as make

    record = make(layout.sd_init, SOURCE_DATASET, CONTROLNET_RESOLUTION, vae_steps=args.vae_steps)
    write_json(record_path, record)
    return f"{record['seconds']:.0f}s (VAE reconstruction MSE {record['reconstruction_mse']:.4f} on [-1, 1])"


def make_controlnet_init(layout) -> str:
    if os.path.isfile(os.path.join(layout.controlnet_init, "ant_controlnet.json")):
        return "kept"
    from diffusers_ant.diff_tuning.benchmark import make_controlnet_init as make

    make(layout.sd, layout.controlnet_init)
    return "made"


def measure_threshold(args, layout) -> dict:
    """The distances of the untrained ControlNet's samples (per seed: the noise of that seed's checks)
    and of the real images, and the threshold (given, or auto); stored in threshold.json and reused
    while its settings match."""
    settings = {"seeds": list(args.seeds), "images": args.convergence_images, "distance": "iou",
                "inference_steps": args.convergence_inference_steps, "guidance_scale": args.guidance_scale,
                "fraction": args.convergence_fraction, "threshold": args.convergence_threshold}
    if os.path.isfile(layout.threshold):
        with open(layout.threshold, encoding="utf-8") as f:
            stored = json.load(f)
        if stored.get("settings") == settings:
            return stored
    from diffusers_ant.diff_tuning import ConvergenceTracker
    from diffusers_ant.diff_tuning.benchmark import convergence_conditions, measure_start_distances, threshold_from

    conditions, prompts, real = convergence_conditions(CONTROL_DATASET, args.convergence_images, CONTROLNET_RESOLUTION)
    start = measure_start_distances(layout.controlnet_init, args.seeds, conditions, prompts,
                                    args.convergence_inference_steps, args.guidance_scale, distance="iou")
    real_distance = ConvergenceTracker(1.0, distance="iou").measure(real, conditions)
    if args.convergence_threshold == "auto":
        threshold = threshold_from(start, real_distance, args.convergence_fraction)
        rule = (f"auto: {args.convergence_fraction:g} of the way from the untrained ControlNet's distance down to "
                "the real images' distance")
    else:
        threshold, rule = float(args.convergence_threshold), "given"
    result = {"settings": settings, "start_distance": {str(k): v for k, v in start.items()},
              "real_distance": real_distance, "threshold": threshold, "rule": rule}
    write_json(layout.threshold, result)
    return result


# ------------------------------------------------------------------------------------------ evaluation


def eval_settings(args, layout) -> dict:
    """What a fine-tuned model's numbers depend on besides its weights (stored with each result)."""
    return {"num_samples": args.num_samples, "num_inference_steps": args.num_inference_steps,
            "eval_batch_size": args.eval_batch_size, "num_real": args.num_real, "resolution": args.resolution,
            "num_channels": 1, "reference_dir": os.path.abspath(layout.heldout_images), "features": TARGET_DATASET,
            "scheduler": "ddim"}


def evaluate_models(args, layout, extractor_sha) -> tuple:
    """({method: {seed: metrics}}, metrics of the pretrained model on the target), evaluating what is
    missing in `--workers` processes."""
    settings = eval_settings(args, layout)
    results, tasks = {m: {} for m in args.methods}, []
    pretrained_path = os.path.join(layout.root, "pretrained_on_target.json")
    pretrained = stored_metrics(pretrained_path, settings, extractor_sha)
    if pretrained is None:
        tasks.append((None, args.seeds[0], {"model": layout.pretrained, "seed": args.seeds[0], "path": pretrained_path,
                                            "settings": settings}))
    for method in args.methods:
        for seed in args.seeds:
            path = os.path.join(layout.run(method, seed), "metrics.json")
            stored = stored_metrics(path, settings, extractor_sha)
            if stored is not None:
                results[method][seed] = stored
            else:
                tasks.append((method, seed, {"model": layout.run(method, seed), "seed": seed, "path": path,
                                             "settings": settings}))
    evaluated = evaluate_in_pool(evaluate_saved_model, [(f"{method or 'pretrained'} seed {seed}", task)
                                                        for method, seed, task in tasks], args.workers)
    for (method, seed, _), metrics in zip(tasks, evaluated):
        if method is None:
            pretrained = metrics
        else:
            results[method][seed] = metrics
    return results, pretrained


def forgetting_curves(args, layout, extractor_sha) -> dict:
    """{method: {seed: chain_of_forgetting result}} through `analyze.py forgetting` (kept while its
    settings and the extractor's hash match)."""
    settings = {"fractions": args.fraction_values, "num_samples": args.forgetting_samples, "num_real": args.num_real,
                "num_inference_steps": args.num_inference_steps, "eval_batch_size": args.eval_batch_size,
                "pretrained": os.path.abspath(layout.pretrained)}
    jobs = [(m, s) for m in args.forgetting_methods for s in args.forgetting_seeds]

    def one(job):
        method, seed = job
        out = layout.forgetting(method, seed)
        if os.path.isfile(out):
            with open(out, encoding="utf-8") as f:
                stored = json.load(f)
            if stored.get("benchmark_settings") == settings and stored.get("feature_extractor_sha256") == extractor_sha:
                return stored
        log = out.replace(".json", ".log")
        status = run_logged(forgetting_command(args, layout, method, seed), log, [], f"forgetting {method} seed {seed}")
        with open(out, encoding="utf-8") as f:
            data = json.load(f)
        data["benchmark_settings"] = settings
        write_json(out, data)
        say(f"chain of forgetting {method} seed {seed}: {status}")
        return data

    curves = {m: {} for m in args.forgetting_methods}
    for (method, seed), data in zip(jobs, run_parallel(one, jobs, args.workers)):
        curves[method][seed] = data
    return curves


def read_convergence(args, layout) -> dict:
    """{method: {seed: convergence.json of the run}} of the ControlNet runs."""
    out = {}
    for method in CONTROLNET_METHODS:
        out[method] = {}
        for seed in args.seeds:
            path = os.path.join(layout.run(method, seed), "convergence.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    out[method][seed] = json.load(f)
    return out


# ------------------------------------------------------------------------------------------ summaries


def summarise(results, confidence=0.95) -> dict:
    """Per method the t interval of each metric over seeds; the paired difference of each metric from
    full fine-tuning; the per-seed relative FID change (percent) of each Diff-Tuning row against its
    base row (the target check's quantity)."""
    from diffusers_ant.analysis.stats import paired_differences, t_interval

    table, paired, relative = {}, {}, {}
    for method, per_seed in results.items():
        table[method] = {key: t_interval([m[key] for m in per_seed.values()], confidence) for key in METRICS}
        table[method]["fid"]["values"] = [per_seed[s]["fid"] for s in sorted(per_seed, key=str)]
        if method != "full" and "full" in results:
            paired[method] = {key: paired_differences({s: m[key] for s, m in per_seed.items()},
                                                      {s: m[key] for s, m in results["full"].items()}, confidence)
                              for key in METRICS}
        base = METHODS[method]["base"]
        if base and base in results:
            relative[method] = relative_differences({s: m["fid"] for s, m in per_seed.items()},
                                                    {s: m["fid"] for s, m in results[base].items()}, confidence)
    return {"table": table, "paired_vs_full": paired, "relative_fid_vs_base": relative}


def target_checks(summary, convergence_summary) -> dict:
    """The issue's targets, read honestly: Diff-Tuning at least 20% lower domain FID than full
    fine-tuning (the paper: 26% on average), and ControlNet's sudden convergence reached sooner (the
    paper: 24%). 'met' needs both: the mean over seeds reaches the target and the seeds support the
    direction (the interval lies below 0); a mean on the right side with an interval that contains 0 is
    not met, and the reading says so."""
    checks = {}
    fid = summary["relative_fid_vs_base"].get("diff_tuning")
    if fid is not None and fid["mean"] is not None:
        checks["fid"] = {"target": "Diff-Tuning's domain FID at least 20% below full fine-tuning's (paper: -26%)",
                         "measured_percent": fid, "met": fid["mean"] <= -20.0 and _below_zero(fid),
                         "reading": verdict(fid, "Diff-Tuning lower", "Diff-Tuning higher")}
    if convergence_summary and "relative_steps" in convergence_summary:
        steps = convergence_summary["relative_steps"]
        counts = convergence_summary["converged_counts"]
        checks["convergence"] = {
            "target": "ControlNet's sudden convergence reached sooner with Diff-Tuning (paper: 24% sooner)",
            "measured_percent": steps, "converged": counts,
            "met": steps["mean"] is not None and steps["mean"] < 0 and _below_zero(steps),
            "reading": verdict(steps, "Diff-Tuning sooner", "Diff-Tuning later") if steps["mean"] is not None
            else "not measurable: no seed where both runs converged"}
    return checks


def _below_zero(interval: dict) -> bool:
    """The interval over seeds lies below 0 (a difference the seeds support)."""
    return interval.get("high") is not None and interval["high"] < 0


# ------------------------------------------------------------------------------------------ tables


def _trains(method, args) -> str:
    mode = METHODS[method]["finetune"]
    return {"full": "all weights", "lora": f"LoRA r{args.rank}", "difffit": "DiffFit"}[mode]


def _retention(method) -> str:
    return {None: "-", "bank": "knowledge bank", "kd": "distillation"}[METHODS[method]["retention"]]


def _percent(cell) -> str:
    return format_difference(cell, digits=1, unit="%") if cell else "-"


def markdown(summary, pretrained, convergence_summary, forgetting, checks, args, extractor_sha, timing=None) -> str:
    level = f"{args.confidence:.0%}"
    table, paired, relative = summary["table"], summary["paired_vs_full"], summary["relative_fid_vs_base"]
    lines = [f"| method | trains | retention | domain FID | FID - full [{level} CI] | FID vs its base [{level} CI] "
             "| domain KID | precision | recall |", "|---|---|---|---|---|---|---|---|---|"]
    if pretrained is not None:
        lines.append(f"| pretrained on MNIST-5k, not fine-tuned | - | - | {pretrained['fid']:.2f} | - | - "
                     f"| {pretrained.get('kid_mean', float('nan')):.4f} | {pretrained.get('precision', float('nan')):.3f} "
                     f"| {pretrained.get('recall', float('nan')):.3f} |")
    for method, row in table.items():
        diff = paired.get(method)
        lines.append(
            f"| {METHODS[method]['label']} | {_trains(method, args)} | {_retention(method)} | {format_mean_sd(row['fid'])} "
            f"| {format_difference(diff['fid']) if diff else '-'} | {_percent(relative.get(method))} "
            f"| {format_mean_sd(row['kid_mean'], digits=4)} | {format_mean_sd(row['precision'], digits=3)} "
            f"| {format_mean_sd(row['recall'], digits=3)} |")
    n = len(args.seeds)
    lines += ["", f"Mean ± standard deviation over {n} seeds ({', '.join(map(str, args.seeds))}); 'FID - full' is the "
              f"per-seed difference from full fine-tuning (same seed: same data order and sampling noise) with a "
              f"{level} Student-t interval over the seeds; 'FID vs its base' is the per-seed relative change of a "
              "Diff-Tuning row from the same fine-tuning without Diff-Tuning. An interval that excludes 0 is a "
              f"difference the seeds support. Fine-tuning: {args.num_train_images} Animal-MNIST images at "
              f"{args.resolution}x{args.resolution} (the pretrained model's side; samples, bank and reference too), "
              f"{args.max_train_steps} steps at batch {args.train_batch_size} (AdamW {args.learning_rate:g} for full "
              f"rows, {args.peft_learning_rate:g} for LoRA / DiffFit rows, EMA 0.999); Diff-Tuning: a bank of "
              f"{args.bank_images} DDIM-{args.bank_inference_steps} samples of the pretrained model, 20% of each batch, "
              "lambda 0.1, retention t ~ (T - t), reconsolidation t ~ (t + 1). Scores: "
              f"{args.num_samples} DDIM-{args.num_inference_steps} samples per model against {args.num_real} held-out "
              f"Animal-MNIST images (not the fine-tuning images) in the animal_mnist domain features (sha256 "
              f"{extractor_sha[:12]}; not Inception: not comparable with published FIDs)."]
    if relative:
        lines += ["", "Diff-Tuning against its base, FID change per seed:", "",
                  f"| rows | per seed | mean [{level} CI] | reading |", "|---|---|---|---|"]
        for method, cell in relative.items():
            seeds = ", ".join(f"{s}: {v:+.1f}%" for s, v in zip(cell["seeds"], cell["differences"]))
            lines.append(f"| {METHODS[method]['label']} vs {METHODS[METHODS[method]['base']]['label']} | {seeds} "
                         f"| {_percent(cell)} | {verdict(cell)} |")
    if forgetting:
        fractions = args.fraction_values
        labels = [METHODS[m]["label"] for m in forgetting]
        lines += ["", f"Chain of forgetting (domain FID when the last fraction f of sampling is done by the pretrained "
                  f"model; {args.forgetting_samples} samples per point, seed(s) "
                  f"{', '.join(map(str, args.forgetting_seeds))}):", "",
                  "| f | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for i, f in enumerate(fractions):
            cells = []
            for method in forgetting:
                values = [r["points"][i]["fid"] for r in forgetting[method].values()]
                cells.append(f"{sum(values) / len(values):.2f}" if values else "-")
            lines.append(f"| {f:g} | " + " | ".join(cells) + " |")
    if convergence_summary:
        c = convergence_summary
        lines += ["", f"ControlNet sudden convergence (first check with 1 - IoU of the re-extracted and the input "
                  f"outlines below {c['threshold']:.3f}; checks every {args.convergence_steps} steps on "
                  f"{args.convergence_images} conditions, {args.controlnet_steps} steps at most):", "",
                  "| method | converged at step, per seed | mean distance over the checks | last distance |",
                  "|---|---|---|---|"]
        for method, rows in c["per_method"].items():
            steps = ", ".join(f"{s}: {r['converged_step'] if r['converged_step'] is not None else '> ' + str(c['max_steps'])}"
                              for s, r in rows.items())
            mean = [r["mean_distance"] for r in rows.values() if r["mean_distance"] is not None]
            last = [r["final_distance"] for r in rows.values() if r["final_distance"] is not None]
            lines.append(f"| {CONTROLNET_METHODS[method]['label']} | {steps} "
                         f"| {sum(mean) / len(mean):.3f} | {sum(last) / len(last):.3f} |" if mean else
                         f"| {CONTROLNET_METHODS[method]['label']} | {steps} | - | - |")
        if "paired_steps" in c:
            lines += ["", f"Diff-Tuning - plain, paired by seed: steps to convergence {format_difference(c['paired_steps'], digits=0)} "
                      f"({_percent(c['relative_steps'])}; seeds where both converged: {c['paired_steps']['n']}); mean "
                      f"distance over the checks {format_difference(c['paired_mean_distance'], digits=3)}."]
    if checks:
        lines += ["", "Targets (issue 11):"]
        for check in checks.values():
            cell = check["measured_percent"]
            state = "met" if check["met"] else "not met"
            lines.append(f"- {check['target']}: measured {_percent(cell)} over {cell['n']} seeds: {state} "
                         f"({check['reading']}).")
    if timing:
        total = timing.get("all_invocations_wall_seconds", timing.get("wall_seconds", 0))
        lines += ["", f"Wall time {total / 60:.0f} min over all invocations of this folder (invocations.json; this one "
                      f"{timing.get('wall_seconds', 0) / 60:.1f} min), {args.workers} workers, one thread each."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


# What the kept bank, pretraining and fine-tunes of a folder were made with (evaluation settings are checked
# per stored score, `eval_settings`).
TRAINING_SETTINGS = ("pretrain_steps", "pretrain_learning_rate", "pretrain_seed", "num_train_images", "num_real",
                     "data_seed", "max_train_steps", "train_batch_size", "learning_rate", "peft_learning_rate",
                     "lr_warmup_steps", "rank", "bank_images", "bank_inference_steps", "resolution", "skip_controlnet",
                     "vae_steps", "sd_steps", "sd_batch_size", "sd_learning_rate", "controlnet_steps",
                     "controlnet_batch_size", "controlnet_learning_rate", "controlnet_bank_images", "guidance_scale",
                     # the ControlNet runs' convergence checks (--track_convergence's cadence goes into their commands)
                     "convergence_steps", "convergence_images", "convergence_inference_steps")


def training_settings(args) -> dict:
    """`TRAINING_SETTINGS` of this command, and the pretrained model (absolute where it is a folder)."""
    pretrained = args.pretrained
    if pretrained is not None and os.path.isdir(pretrained):
        pretrained = os.path.abspath(pretrained)
    return {"pretrained": pretrained, "pretrained_weights": folder_weights_sha256(pretrained),
            **{key: getattr(args, key) for key in TRAINING_SETTINGS}}


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    command = command_line(argv, script=__file__)
    with invocation_recorded(args, command, started, "benchmark_transfer.py") as invocation:
        return run(args, invocation)


def run(args, invocation):
    """The benchmark: data, pretraining, banks, training runs, evaluation, results (main records the
    invocation when it stops early)."""
    command, started = invocation.command, invocation.started
    layout = Layout(args)
    # kept runs are reused by folder (a stage is done when its time file exists): a folder trained with other
    # settings is refused in one line, as benchmark_quality.py / benchmark_deme.py do
    check_benchmark_settings(args.output_dir, training_settings(args), "benchmark_transfer.py")
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(layout.unet_config, BENCH_UNET)
    estimate = plan(args)
    print(describe_plan(estimate, args), flush=True)
    import torch

    torch.set_num_threads(1)  # the in-process work (VAE fit, threshold) runs beside a subprocess
    timing = {}

    # the data: two disjoint Animal-MNIST subsets, as image folders
    train_rows, heldout_rows = split_rows(TARGET_ROWS, [args.num_train_images, args.num_real], seed=args.data_seed)
    write_image_folder(TARGET_DATASET, train_rows, layout.train_images)
    write_image_folder(TARGET_DATASET, heldout_rows, layout.heldout_images)

    def stage(name, fn, jobs):
        start = time.time()
        out = run_parallel(fn, jobs, args.workers)
        timing[name] = round(time.time() - start, 1)
        return out

    def pretraining_job(job):
        if job == "unet":
            if not args.pretrained:
                say(f"pretrained UNet: {logged(pretrain_command(args, layout), layout.pretrained, 'pretraining')}")
        else:
            say(f"tiny SD base (VAE fit): {make_sd_base(args, layout)}")
            say(f"tiny SD pretrained: {logged(sd_command(args, layout), layout.sd, 'SD pretraining')}")

    def bank_job(job):
        if job == "unet":
            status = run_logged(bank_command(args, layout), layout.bank + ".log", time_path(layout.bank + ".log"),
                                "knowledge bank")
            say(f"knowledge bank: {status}")
        else:
            say(f"untrained ControlNet: {make_controlnet_init(layout)}")
            status = run_logged(controlnet_bank_command(args, layout), layout.controlnet_bank + ".log",
                                time_path(layout.controlnet_bank + ".log"), "ControlNet knowledge bank")
            say(f"ControlNet knowledge bank: {status}")

    parts = ["unet"] + ([] if args.skip_controlnet else ["controlnet"])
    stage("pretraining", pretraining_job, parts)
    stage("banks", bank_job, parts)
    threshold = None
    if not args.skip_controlnet:
        threshold = measure_threshold(args, layout)
        print(f"convergence threshold {threshold['threshold']:.4f} ({threshold['rule']}; untrained ControlNet "
              f"{', '.join(f'{v:.3f}' for v in threshold['start_distance'].values())}, real images "
              f"{threshold['real_distance']:.3f})", flush=True)

    runs = [(m, s) for m in args.methods for s in args.seeds]
    if not args.skip_controlnet:
        runs += [(m, s) for m in CONTROLNET_METHODS for s in args.seeds]
    # longest first, so that the last runs do not leave a worker idle
    runs.sort(key=lambda r: -(args.controlnet_steps * CONTROLNET_SECONDS_PER_STEP_16 if r[0] in CONTROLNET_METHODS
                              else args.max_train_steps * SECONDS_PER_STEP_BENCH_UNET * STEP_FACTOR[r[0]]))

    def train_job(run):
        method, seed = run
        if method in CONTROLNET_METHODS:
            cmd = controlnet_command(args, layout, method, seed, threshold["threshold"])
        else:
            cmd = finetune_command(args, layout, method, seed)
        say(f"trained {method} seed {seed}: {logged(cmd, layout.run(method, seed), f'{method} seed {seed}')}")

    stage("fine-tuning and ControlNet runs", train_job, runs)
    if args.phase == "train":
        invocation.finished(time.time() - started)
        return None

    from diffusers_ant.analysis.evaluate import resolve_feature_extractor

    extractor_sha = resolve_feature_extractor(TARGET_DATASET).weights_sha256()  # trains and caches it once
    start = time.time()
    results, pretrained = evaluate_models(args, layout, extractor_sha)
    timing["evaluation"] = round(time.time() - start, 1)
    start = time.time()
    forgetting = forgetting_curves(args, layout, extractor_sha) if args.forgetting_methods else {}
    timing["chains of forgetting"] = round(time.time() - start, 1)
    timing["wall_seconds"] = round(time.time() - started, 1)
    # a resumed benchmark's wall time is the sum of its invocations (OUTPUT_DIR/invocations.json)
    timing["all_invocations_wall_seconds"] = round(invocation.finished(timing["wall_seconds"]), 1)
    timing["train_seconds_per_run"] = {f"{m}/seed-{s}": recorded_seconds(os.path.join(layout.run(m, s), "train.log"))
                                       for m, s in runs}

    summary = summarise(results, args.confidence)
    convergence = read_convergence(args, layout) if not args.skip_controlnet else {}
    convergence_summary = None
    if convergence:
        from diffusers_ant.diff_tuning.benchmark import summarise_convergence

        convergence_summary = summarise_convergence(convergence, threshold["threshold"], args.controlnet_steps,
                                                    confidence=args.confidence)
    checks = target_checks(summary, convergence_summary)
    text = markdown(summary, pretrained, convergence_summary, forgetting, checks, args, extractor_sha, timing)
    print(text)
    from diffusers_ant.analysis.plots import plot_convergence_curves, plot_forgetting_comparison, plot_method_summary

    bars = [dict(summary["table"][m]["fid"], label=METHODS[m]["label"]) for m in args.methods]
    plot_method_summary(bars, os.path.join(args.output_dir, "fid_by_method.png"), ylabel="domain FID (animal_mnist)",
                        title=f"MNIST-5k -> {args.num_train_images} Animal-MNIST images: domain FID over "
                              f"{len(args.seeds)} seeds ({args.confidence:.0%} interval, dots: seeds)",
                        reference=("pretrained, not fine-tuned", pretrained["fid"]) if pretrained else None)
    if forgetting:
        plot_forgetting_comparison({METHODS[m]["label"]: list(per_seed.values()) for m, per_seed in forgetting.items()},
                                   os.path.join(args.output_dir, "forgetting.png"))
    if convergence:
        plot_convergence_curves({CONTROLNET_METHODS[m]["label"]: {s: r["history"] for s, r in per_seed.items()}
                                 for m, per_seed in convergence.items()},
                                os.path.join(args.output_dir, "convergence.png"), threshold=threshold["threshold"],
                                ylabel="1 - IoU of re-extracted and input outlines")
    record = {
        "command": command,
        "resolution": args.resolution,  # of the unconditional half; the ControlNet half: controlnet_resolution
        "controlnet_resolution": CONTROLNET_RESOLUTION if not args.skip_controlnet else None,
        "args": {k: v for k, v in vars(args).items()},
        "methods": {m: METHODS[m] for m in args.methods},
        "controlnet_methods": CONTROLNET_METHODS if not args.skip_controlnet else {},
        "feature_extractor": f"domain_{TARGET_DATASET}",
        "feature_extractor_sha256": extractor_sha,
        "data": {"train_rows": train_rows, "heldout_rows_count": len(heldout_rows)},
        "per_run": results,
        "pretrained_on_target": pretrained,
        "summary": summary,
        "forgetting": forgetting,
        "convergence": {"threshold": threshold, "per_run": convergence, "summary": convergence_summary},
        "targets": checks,
        "plan": estimate,
        "timing": timing,
    }
    write_json(os.path.join(args.output_dir, "results.json"), record)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"`{record['command']}`\n\n{text}\n")
    print(f"wrote {os.path.join(args.output_dir, 'results.json')}, results.md and the plots "
          f"({timing['wall_seconds'] / 60:.1f} min this invocation; planned {estimate['total_seconds'] / 60:.0f} min)")
    return record


if __name__ == "__main__":
    main()
