#!/usr/bin/env python
"""End-to-end Diff-Tuning demonstration per model family (issue 16, "Measured"): MNIST-5k -> Animal-MNIST.

    python train_scripts/demo_families.py --output_dir docs/benchmark_families/demo --work_dir demo-work  # ~16 min, 2 cores
    python train_scripts/demo_families.py --quick --families sd3 --output_dir q --work_dir q/work       # smoke run

For each of `sdxl`, `sd3`, `flux`, `qwenimage`, at its `tiny` preset and 16x16 pixels, through the
project's own scripts (each a real process with its log, one torch thread, `--workers` families at a time):

0. **The base's VAE.** The preset's VAE is random, and a random decoder does not invert a random encoder
   (the samples of a latent model trained on it are not images, and no FID against real images means
   anything). It is fitted once with `diffusers_ant.models.autoencoder.fit_autoencoder` (reconstruction
   plus a small KL term) on digits and silhouettes together, as a real checkpoint's VAE is a generic one
   that both domains pass through (Qwen-Image's video VAE on its unclamped decoder output, see
   `_FrameVAE`); the latent scale (and SD3 / Flux's shift, Qwen-Image's per-channel mean / std) is set
   from the fitted latents. The pipeline, denoiser still random, is saved (`init/`).
1. **Pretraining**: `train_ant.py`, full fine-tuning of the denoiser on `mnist5k_captions` ("a
   handwritten digit 3"; 10% empty prompts, so the base has the unconditional branch that Diff-Tuning's
   bank rows train by default; not for flux, where the trainer refuses it), cosine schedule, EMA 0.999
   (`pretrained/`).
2. **The base's own samples**: `diffusers_ant.analysis.evaluate.sample_images` with the MNIST prompts
   (digits 0-9 in turn), DDIM (the Euler sampler for the flow-matching families), a fixed seed.
3. **Knowledge bank**: `build_knowledge_bank.py` from the base with the same MNIST prompts (`bank/`).
4. **Two LoRAs** on `animal_mnist_captions` ("a silhouette of a cat"; `--max_train_samples` rows):
   `lora/` plain and `lora_diff_tuning/` with `--knowledge_bank` and Diff-Tuning's defaults (PAPERS.md
   section 3: 20% of each batch from the bank, lambda 0.1, retention t ~ (T - t), reconsolidation
   t ~ (t + 1); bank rows on the empty prompt), same steps, learning rate and seed.
5. **Scores** (domain features, not Inception: comparable only within this demo):
   - *retention*: domain FID (mnist5k features) of each model's samples on the MNIST prompts against
     the base's own samples (step 2): lower = keeps more of the base's behaviour. The base sampled with
     another seed gives the floor (the FID of two sample sets of one model at this sample count);
   - *new domain*: domain FID (animal_mnist features) of each model's samples on the Animal prompts
     against held-out real Animal-MNIST images (rows the LoRAs did not train on): lower = learned more.
   Every model samples from the same noise (the same generator seed) in each prompt set.
6. **Grid** per family: real images, base, LoRA, LoRA + Diff-Tuning; digit prompts 0-9 then the ten
   animal prompts (`<family>_grid.png`).

Outputs in `--output_dir`: `results.json` (settings, every number, per-family times, the Diff-Tuning
run's recorded configuration), `results.md` (the command line, the table, the grids) and the grids.
Models, banks and logs go to `--work_dir`; finished steps are kept and skipped when run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

FAMILIES = ("sdxl", "sd3", "flux", "qwenimage")
RESOLUTION = 16
SOURCE = "mnist5k_captions"   # pretraining (and the base's prompts)
TARGET = "animal_mnist_captions"  # the LoRAs' data
TARGET_ROWS = 10000
MNIST_PROMPTS = [f"a handwritten digit {d}" for d in range(10)]
# Diff-Tuning's defaults (PAPERS.md section 3), as in benchmark_transfer.py
DIFF_TUNING_FLAGS = ["--bank_fraction", "0.2", "--bank_weight", "0.1", "--retention_exponent", "1",
                     "--reconsolidation_exponent", "1"]
ARMS = ("base", "lora", "lora_diff_tuning")
LABELS = {"base": "base (pretrained on MNIST-5k)", "lora": "LoRA", "lora_diff_tuning": "LoRA + Diff-Tuning"}


def animal_prompts() -> list:
    from diffusers_ant.data.builtin import ANIMAL_NAMES
    from diffusers_ant.data.toy import ANIMAL_CAPTION_TEMPLATE

    return [ANIMAL_CAPTION_TEMPLATE.format(name) for name in ANIMAL_NAMES]


def parse_args(argv=None):
    from diffusers_ant.cli import OneLineErrorParser, check_output_paths

    p = OneLineErrorParser(prog="demo_families.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    p.add_argument("--output_dir", default="docs/benchmark_families/demo", help="results.json, results.md, the grids")
    p.add_argument("--work_dir", default="demo-families-work", help="models, banks, samples and logs")
    p.add_argument("--workers", type=int, default=2, help="families at a time (one torch thread each)")
    g = p.add_argument_group("base")
    g.add_argument("--vae_steps", type=int, default=120, help="VAE fitting steps (batch 32)")
    g.add_argument("--vae_images", type=int, default=1000, help="images of each domain the VAE is fitted on")
    g.add_argument("--pretrain_steps", type=int, default=400)
    g.add_argument("--pretrain_batch_size", type=int, default=32)
    g.add_argument("--pretrain_learning_rate", type=float, default=1e-3)
    g = p.add_argument_group("Diff-Tuning and the LoRAs")
    g.add_argument("--bank_images", type=int, default=200)
    g.add_argument("--finetune_steps", type=int, default=200)
    g.add_argument("--finetune_batch_size", type=int, default=32, help="(the Diff-Tuning run: 20%% of it from the bank)")
    g.add_argument("--learning_rate", type=float, default=2e-3, help="of both LoRAs")
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--num_train_images", type=int, default=1000, help="Animal-MNIST rows the LoRAs train on")
    g = p.add_argument_group("evaluation")
    g.add_argument("--num_samples", type=int, default=250, help="samples per model and prompt set")
    g.add_argument("--num_real", type=int, default=1000, help="held-out real Animal-MNIST images")
    g.add_argument("--num_inference_steps", type=int, default=20)
    g.add_argument("--seed", type=int, default=0, help="of the sampling noise (shared by every model)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps of everything, tiny sample sets")
    p.add_argument("--family_job", default=None, help=argparse.SUPPRESS)  # internal: run one family in this process
    args = p.parse_args(argv)
    if args.quick:
        args.vae_steps, args.vae_images = 2, 64
        args.pretrain_steps, args.pretrain_batch_size = 4, 8
        args.bank_images, args.finetune_steps, args.finetune_batch_size = 8, 3, 8
        args.num_train_images, args.num_samples, args.num_real, args.num_inference_steps = 64, 20, 40, 2
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        p.error(f"--families: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(FAMILIES)}")
    args.families = families
    for name in ("vae_steps", "vae_images", "pretrain_steps", "pretrain_batch_size", "bank_images", "finetune_steps",
                 "num_train_images", "num_samples", "num_real", "num_inference_steps", "rank", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if args.finetune_batch_size < 5:
        p.error("--finetune_batch_size must be at least 5 (a fifth of the Diff-Tuning run's batch is the bank)")
    if args.num_train_images + args.num_real > TARGET_ROWS:
        p.error(f"--num_train_images + --num_real must not exceed Animal-MNIST's {TARGET_ROWS} rows")
    check_output_paths(p, ("--output_dir", args.output_dir, True), ("--work_dir", args.work_dir, True))
    return args


# What a work folder's models, banks and samples depend on: each step counts as done when its output exists, so
# a folder of other settings (a --quick run's, in the default --work_dir) would be reported as this command's
WORK_SETTINGS = ("vae_steps", "vae_images", "pretrain_steps", "pretrain_batch_size", "pretrain_learning_rate",
                 "bank_images", "finetune_steps", "finetune_batch_size", "learning_rate", "rank", "num_train_images",
                 "num_samples", "num_real", "num_inference_steps", "seed")


def forwarded_args(args) -> list:
    """The settings a family job receives from the main process (everything but the family list)."""
    out = []
    for name in ("output_dir", "work_dir", *WORK_SETTINGS):
        out += [f"--{name}", str(getattr(args, name))]
    return out


# ------------------------------------------------------------------------------------------ data


def lora_train_rows(num_rows: int, num_train: int, seed: int) -> list:
    """The rows `train_ant.py --max_train_samples num_train --seed seed` trains on: diffusers' rule,
    `dataset.shuffle(seed).select(range(num_train))` (`diffusers_ant.data.dataloader`)."""
    import datasets

    return sorted(datasets.Dataset.from_dict({"row": list(range(num_rows))}).shuffle(seed=seed)["row"][:num_train])


def heldout_rows(args) -> list:
    """`--num_real` Animal-MNIST rows the LoRAs never see (a seeded draw from the rest)."""
    import torch

    train = set(lora_train_rows(TARGET_ROWS, args.num_train_images, args.seed))
    rest = [r for r in range(TARGET_ROWS) if r not in train]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(1000 + args.seed)).tolist()
    return sorted(rest[i] for i in order[: args.num_real])


# ------------------------------------------------------------------------------------------ the base's VAE


class _FrameVAE:
    """Qwen-Image's video VAE seen as an image VAE (a frame axis of 1 added and removed), so that
    `fit_autoencoder` trains it as it trains an `AutoencoderKL`."""

    class _Config(dict):
        __getattr__ = dict.get

    def __init__(self, vae):
        self.vae = vae
        self.config = self._Config(in_channels=3)

    def __getattr__(self, name):  # device, dtype, parameters, requires_grad_, train, eval
        return getattr(self.vae, name)

    def encode(self, x):
        out = self.vae.encode(x[:, :, None])
        return type("Encoded", (), {"latent_dist": out.latent_dist})()

    def decode(self, z):
        # The decoder's output before `AutoencoderKLQwenImage._decode` clamps it to [-1, 1] (the same steps, one
        # frame): through the clamp, a decoder that starts below -1 everywhere gets no gradient at all and the
        # fit collapses to black (it did: reconstruction MSE 0.34). Sampling keeps the pipeline's clamped decode.
        vae = self.vae
        vae.clear_cache()
        x = vae.post_quant_conv(z)
        vae._conv_idx = [0]
        out = vae.decoder(x[:, :, 0:1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
        vae.clear_cache()
        return type("Decoded", (), {"sample": out[:, :, 0]})()


def fit_base_vae(adapter, images, steps: int, seed: int) -> dict:
    """Fit the adapter's VAE to `images` ((N, 3, H, W) in [-1, 1]) and set its latent normalisation from
    the posterior means: SDXL `scaling_factor` = 1 / std (SD's rule, `set_latent_scaling`); SD3 / Flux
    also `shift_factor` = mean; Qwen-Image per-channel `latents_mean` / `latents_std`."""
    import torch

    from diffusers_ant.models.autoencoder import fit_autoencoder, reconstruction_error, set_latent_scaling

    vae = adapter.vae
    frames = type(vae).__name__ == "AutoencoderKLQwenImage"
    fitted = _FrameVAE(vae) if frames else vae
    losses = fit_autoencoder(fitted, images, steps, batch_size=32, learning_rate=2e-3, seed=seed)
    with torch.no_grad():
        means = torch.cat([fitted.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    if frames:
        dims = [0] + list(range(2, means.ndim))
        vae.register_to_config(latents_mean=means.mean(dim=dims).tolist(), latents_std=means.std(dim=dims).tolist())
        normalisation = {"latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std}
    elif vae.config.get("shift_factor") is not None:
        vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=1.0 / float(means.std()))
        normalisation = {"shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor}
    else:
        normalisation = {"scaling_factor": set_latent_scaling(vae, images)}
    return {"final_loss": losses[-1], "reconstruction_mse": reconstruction_error(fitted, images[:256]),
            **normalisation}


def make_init(family, args, layout) -> dict:
    """The tiny preset with its VAE fitted (`fit_base_vae`), saved to `init/` (once)."""
    record_path = os.path.join(layout["family"], "init.json")
    if os.path.isfile(os.path.join(layout["init"], "model_index.json")) and os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as f:
            return json.load(f)
    import torch

    from diffusers_ant.analysis.benchmark import write_json
    from diffusers_ant.analysis.evaluate import real_images
    from diffusers_ant.diff_tuning.benchmark import _save_atomically
    from diffusers_ant.models import get_model_adapter

    start = time.time()
    torch.manual_seed(args.seed)
    adapter = get_model_adapter(family).load(model_config_name_or_path="tiny", resolution=RESOLUTION)
    digits = real_images("mnist5k", args.vae_images, RESOLUTION, num_channels=3, seed=args.seed)
    animals = real_images(train_data_dir=layout["animal_train"], num_images=args.vae_images, resolution=RESOLUTION,
                          num_channels=3, seed=args.seed)
    pixels = torch.from_numpy(__import__("numpy").concatenate([digits, animals])).permute(0, 3, 1, 2) * 2 - 1
    record = fit_base_vae(adapter, pixels.contiguous(), args.vae_steps, args.seed)
    _save_atomically(adapter, layout["init"])
    record.update(vae_steps=args.vae_steps, vae_images_per_domain=args.vae_images, seconds=round(time.time() - start, 1))
    write_json(record_path, record)
    return record


# ------------------------------------------------------------------------------------------ commands


def script(name) -> list:
    return [sys.executable, os.path.join(HERE, name)]


def pretrain_command(family, args, layout) -> list:
    steps = args.pretrain_steps
    return [*script("train_ant.py"), "--model_type", family, "--pretrained_model_name_or_path", layout["init"],
            "--dataset_name", SOURCE, "--resolution", str(RESOLUTION), "--train_batch_size", str(args.pretrain_batch_size),
            "--max_train_steps", str(steps), "--learning_rate", str(args.pretrain_learning_rate),
            "--lr_scheduler", "cosine", "--lr_warmup_steps", str(min(50, steps // 10)), "--use_ema",
            "--ema_max_decay", "0.999", "--seed", str(args.seed),
            "--output_dir", layout["pretrained"], "--checkpointing_steps", str(steps + 1),
            "--num_validation_images", "4", "--num_inference_steps", str(args.num_inference_steps), "--report_to", "none",
            # an unconditional branch for the bank rows (the trainer drops no Flux captions: Flux has no CFG)
            *(["--proportion_empty_prompts", "0.1"] if family != "flux" else [])]


def bank_command(family, args, layout) -> list:
    return [*script("build_knowledge_bank.py"), "--pretrained_model_name_or_path", layout["pretrained"],
            "--model_type", family, "--prompts_file", layout["mnist_prompts"], "--num_images", str(args.bank_images),
            # flux / qwenimage transformers record no sample size: the bank's size is the training --resolution
            *(["--resolution", str(RESOLUTION)] if family in ("flux", "qwenimage") else []), "--scheduler", "ddim", "--num_inference_steps", str(args.num_inference_steps),
            "--batch_size", "50", "--seed", str(args.seed), "--output_dir", layout["bank"], "--no_progress"]


def lora_command(family, args, layout, arm) -> list:
    steps = args.finetune_steps
    cmd = [*script("train_ant.py"), "--model_type", family, "--pretrained_model_name_or_path", layout["pretrained"],
           "--dataset_name", TARGET, "--max_train_samples", str(args.num_train_images), "--resolution", str(RESOLUTION),
           "--train_batch_size", str(args.finetune_batch_size), "--max_train_steps", str(steps),
           "--learning_rate", str(args.learning_rate), "--lr_scheduler", "constant_with_warmup",
           "--lr_warmup_steps", str(min(20, steps // 10)), "--rank", str(args.rank), "--seed", str(args.seed),
           "--output_dir", layout[arm], "--checkpointing_steps", str(steps + 1), "--num_validation_images", "4",
           "--num_inference_steps", str(args.num_inference_steps), "--report_to", "none"]
    if arm == "lora_diff_tuning":
        cmd += ["--knowledge_bank", layout["bank"], *DIFF_TUNING_FLAGS]
    return cmd


def family_layout(family, args) -> dict:
    root = os.path.join(args.work_dir, family)
    return {"family": root, "init": os.path.join(root, "init"), "pretrained": os.path.join(root, "pretrained"),
            "bank": os.path.join(root, "bank"), "lora": os.path.join(root, "lora"),
            "lora_diff_tuning": os.path.join(root, "lora_diff_tuning"), "samples": os.path.join(root, "samples"),
            "mnist_prompts": os.path.join(args.work_dir, "mnist_prompts.txt"),
            "animal_train": os.path.join(args.work_dir, "data", "animal-train"),
            "animal_heldout": os.path.join(args.work_dir, "data", "animal-heldout")}


# ------------------------------------------------------------------------------------------ sampling and scores


def samples_of(folder, prompts, args, seed, cache_path):
    """(N, H, W, 3) samples of the saved pipeline or LoRA folder `folder` on `prompts` (cycled), from the
    noise of `seed` (kept in `cache_path`)."""
    import numpy as np

    if os.path.isfile(cache_path):
        return np.load(cache_path)
    from diffusers_ant.analysis.evaluate import sample_images
    from diffusers_ant.models import load_pipeline

    pipeline = load_pipeline(folder)
    pipeline.set_progress_bar_config(disable=True)
    images = sample_images(pipeline, args.num_samples, scheduler="ddim", num_inference_steps=args.num_inference_steps,
                           batch_size=50, seed=seed, progress=False, prompts=prompts, resolution=RESOLUTION)
    from diffusers_ant.files import write_atomically

    # beside and renamed: a kill mid-write left a truncated file that every later run loaded and failed on
    write_atomically(cache_path, lambda f: np.save(f, images))
    return images


def score_family(family, args, layout) -> dict:
    """Sample every model on both prompt sets (same noise) and compute the domain FIDs."""
    import torch

    from diffusers_ant.analysis.evaluate import ReferenceSet, real_images, resolve_feature_extractor

    torch.set_num_threads(1)
    folders = {"base": layout["pretrained"], "lora": layout["lora"], "lora_diff_tuning": layout["lora_diff_tuning"]}
    prompts = {"mnist": MNIST_PROMPTS, "animal": animal_prompts()}
    samples = {arm: {name: samples_of(folders[arm], p, args, args.seed,
                                      os.path.join(layout["samples"], f"{arm}_{name}.npy"))
                     for name, p in prompts.items()} for arm in ARMS}
    floor = samples_of(folders["base"], MNIST_PROMPTS, args, args.seed + 1,
                       os.path.join(layout["samples"], "base_mnist_other_seed.npy"))
    mnist_features = resolve_feature_extractor("mnist5k")
    animal_features = resolve_feature_extractor("animal_mnist")
    base_ref = ReferenceSet(samples["base"]["mnist"], mnist_features, seed=args.seed)
    real_animals = real_images(train_data_dir=layout["animal_heldout"], num_images=args.num_real,
                               resolution=RESOLUTION, num_channels=3, seed=args.seed)
    animal_ref = ReferenceSet(real_animals, animal_features, seed=args.seed)
    real_digits = real_images("mnist5k", args.num_real, RESOLUTION, num_channels=3, seed=args.seed)
    digit_ref = ReferenceSet(real_digits, mnist_features, seed=args.seed)
    scores = {"retention_fid_floor": base_ref.score(floor)["fid"]}
    for arm in ARMS:
        scores[arm] = {
            "retention_fid": base_ref.score(samples[arm]["mnist"])["fid"] if arm != "base" else 0.0,
            "new_domain_fid": animal_ref.score(samples[arm]["animal"])["fid"],
            "mnist_fid_vs_real_digits": digit_ref.score(samples[arm]["mnist"])["fid"],
        }
    scores["feature_extractors_sha256"] = {"mnist5k": base_ref.extractor_sha256, "animal_mnist": animal_ref.extractor_sha256}
    return scores, samples, real_digits, real_animals


def save_grid(samples, path, label_rows) -> None:
    """One row per arm (and the real images first): the 10 digit prompts, a gap, the 10 animal prompts,
    each image enlarged 3x (nearest), a label column on the left."""
    import numpy as np
    from PIL import Image, ImageDraw

    cell, gap, label_width = RESOLUTION * 3, 8, 170
    rows = len(label_rows)
    width = label_width + 20 * cell + gap
    grid = Image.new("RGB", (width, rows * cell + 18), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_width, 2), "prompts: a handwritten digit 0..9", fill="black")
    draw.text((label_width + 10 * cell + gap, 2), "prompts: a silhouette of a bear, bird, ..., zebra", fill="black")
    for r, (label, digits, animals) in enumerate(label_rows):
        y = 18 + r * cell
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(list(digits[:10]) + list(animals[:10])):
            array = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            tile = Image.fromarray(array if array.shape[-1] == 3 else array[..., 0]).convert("RGB")
            x = label_width + c * cell + (gap if c >= 10 else 0)
            grid.paste(tile.resize((cell, cell), Image.NEAREST), (x, y))
    grid.save(path)


def class_examples(dataset_name, train_data_dir=None) -> "np.ndarray":
    """One real image per class 0..9 at the demo's resolution, greyscale as RGB in [0, 1]."""
    import numpy as np

    from diffusers_ant.data import TrainingDataset, load_training_dataset, resolve_columns

    dataset = load_training_dataset(dataset_name=dataset_name)
    labels = np.asarray(dataset["label"])
    data = TrainingDataset(dataset, {"image_column": resolve_columns(dataset)["image_column"]}, RESOLUTION, num_channels=3)
    pixels = [data[int(np.flatnonzero(labels == c)[0])]["pixel_values"] for c in range(10)]
    return np.stack([((p + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() for p in pixels])


def run_family(family, args) -> dict:
    """Everything of one family (in its own process): base, pretraining, bank, two LoRAs, scores, grid."""
    from diffusers_ant.analysis.benchmark import recorded_seconds, run_logged, time_path, write_json

    layout = family_layout(family, args)
    os.makedirs(layout["family"], exist_ok=True)
    times = {}
    start = time.time()
    init = make_init(family, args, layout)
    times["vae_fit_and_init"] = round(time.time() - start, 1)

    def logged(cmd, log, done, what):
        status = run_logged(cmd, log, done, what)
        print(f"[{family}] {what}: {status}", flush=True)
        times[what] = recorded_seconds(log)

    logged(pretrain_command(family, args, layout), os.path.join(layout["family"], "pretrain.log"),
           time_path(os.path.join(layout["family"], "pretrain.log")), "pretraining")
    logged(bank_command(family, args, layout), os.path.join(layout["family"], "bank.log"),
           time_path(os.path.join(layout["family"], "bank.log")), "knowledge bank")
    for arm in ("lora", "lora_diff_tuning"):
        log = os.path.join(layout["family"], f"{arm}.log")
        logged(lora_command(family, args, layout, arm), log, time_path(log), arm)
    start = time.time()
    scores, samples, real_digits, real_animals = score_family(family, args, layout)
    times["sampling_and_scoring"] = round(time.time() - start, 1)
    with open(os.path.join(layout["lora_diff_tuning"], "training_config.json"), encoding="utf-8") as f:
        dt_config = json.load(f)
    with open(os.path.join(layout["lora"], "training_config.json"), encoding="utf-8") as f:
        plain_config = json.load(f)
    with open(os.path.join(layout["bank"], "bank.json"), encoding="utf-8") as f:
        bank = json.load(f)
    os.makedirs(args.output_dir, exist_ok=True)
    grid = os.path.join(args.output_dir, f"{family}_grid.png")
    rows = [("real images", class_examples("mnist5k"), class_examples("animal_mnist"))]
    rows += [(LABELS[arm], samples[arm]["mnist"], samples[arm]["animal"]) for arm in ARMS]
    save_grid(samples, grid, rows)
    keys = ("diff_tuning", "knowledge_bank", "bank_fraction", "bank_weight", "retention", "retention_exponent",
            "reconsolidation_exponent", "bank_keep_prompts", "finetune", "rank", "max_train_steps", "seed",
            "learning_rate", "train_batch_size")
    result = {"family": family, "init": init, "scores": scores, "times_seconds": times, "grid": os.path.basename(grid),
              "runs": {"lora": {k: plain_config.get(k) for k in keys},
                       "lora_diff_tuning": {k: dt_config.get(k) for k in keys}},
              "bank": {k: bank.get(k) for k in ("num_images", "model_type", "resolution", "num_inference_steps",
                                                "scheduler", "seed", "prompts_source")}}
    write_json(os.path.join(layout["family"], "result.json"), result)
    return result


# ------------------------------------------------------------------------------------------ report


def markdown(report) -> str:
    a = report["args"]
    lines = [f"Command: `{report['command']}`", "",
             f"Tiny presets at {RESOLUTION}x{RESOLUTION}. Base: the preset with its VAE fitted ({a['vae_steps']} steps on "
             f"{a['vae_images']} digits + {a['vae_images']} silhouettes), then {a['pretrain_steps']} steps of full "
             f"fine-tuning on `{SOURCE}` (batch {a['pretrain_batch_size']}, AdamW {a['pretrain_learning_rate']:g}, cosine, "
             f"EMA 0.999, 10% empty prompts, none for flux). LoRAs (rank {a['rank']}, {a['finetune_steps']} steps, batch "
             f"{a['finetune_batch_size']}, AdamW {a['learning_rate']:g}, seed {a['seed']}) on {a['num_train_images']} rows "
             f"of `{TARGET}`; Diff-Tuning adds a bank of {a['bank_images']} base samples on the MNIST prompts with "
             "the method's defaults (20% of each batch, lambda 0.1, psi / xi densities, bank rows on the empty prompt). "
             f"Scores: {a['num_samples']} samples per model and prompt set ({a['num_inference_steps']} DDIM / Euler steps, "
             f"one noise seed for every model), domain features (not Inception). Retention: FID to the base's own "
             f"samples on the digit prompts (floor: the base against itself with another seed). New domain: FID "
             f"to {a['num_real']} held-out real Animal-MNIST images on the animal prompts.", "",
             "| family | retention floor | retention FID, LoRA | retention FID, LoRA + Diff-Tuning | new-domain FID, base "
             "| new-domain FID, LoRA | new-domain FID, LoRA + Diff-Tuning | base vs real digits |",
             "|---|---|---|---|---|---|---|---|"]
    for family, r in report["families"].items():
        s = r["scores"]
        lines.append(f"| {family} | {s['retention_fid_floor']:.2f} | {s['lora']['retention_fid']:.2f} "
                     f"| {s['lora_diff_tuning']['retention_fid']:.2f} | {s['base']['new_domain_fid']:.2f} "
                     f"| {s['lora']['new_domain_fid']:.2f} | {s['lora_diff_tuning']['new_domain_fid']:.2f} "
                     f"| {s['base']['mnist_fid_vs_real_digits']:.2f} |")
    lines += ["", f"Wall time of this invocation {report['wall_seconds'] / 60:.1f} min ({a['workers']} families at a "
              "time, one thread each; families kept from an earlier invocation cost nothing here); each family's "
              "whole job: " + ", ".join(f"{f} {r['job_seconds'] / 60:.1f} min" for f, r in report["families"].items()
                                        if r.get("job_seconds")) + "; its steps (seconds): " + "; ".join(
                  f"{f} " + ", ".join(f"{k} {v:.0f}" for k, v in r["times_seconds"].items() if v is not None)
                  for f, r in report["families"].items()), ""]
    for family, r in report["families"].items():
        lines += [f"![{family}: real, base, LoRA, LoRA + Diff-Tuning]({r['grid']})", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.family_job:
        run_family(args.family_job, args)
        return None
    from diffusers_ant.analysis.benchmark import (check_benchmark_settings, command_line, recorded_seconds, run_logged,
                                                  run_parallel, time_path, write_image_folder, write_json)

    started = time.time()
    check_benchmark_settings(args.work_dir, {name: getattr(args, name) for name in WORK_SETTINGS}, "demo_families.py")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.work_dir, "mnist_prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(MNIST_PROMPTS) + "\n")
    layout = family_layout(args.families[0], args)
    write_image_folder("animal_mnist", lora_train_rows(TARGET_ROWS, args.num_train_images, args.seed)[:args.vae_images],
                       layout["animal_train"])
    write_image_folder("animal_mnist", heldout_rows(args), layout["animal_heldout"])
    from diffusers_ant.analysis.evaluate import resolve_feature_extractor

    for name in ("mnist5k", "animal_mnist"):  # trained and cached once, before the families start
        resolve_feature_extractor(name)

    def job(family):
        log = os.path.join(args.work_dir, family, "family.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--family_job", family, *forwarded_args(args)]
        print(f"{family}: started; its steps are logged in {log}", flush=True)
        print(f"{family}: {run_logged(cmd, log, time_path(log), family)}", flush=True)
        with open(os.path.join(args.work_dir, family, "result.json"), encoding="utf-8") as f:
            return json.load(f)

    results = run_parallel(job, args.families, args.workers)
    for r in results:  # each family's whole job, as run_logged recorded it (also when kept from an earlier run)
        r["job_seconds"] = recorded_seconds(os.path.join(args.work_dir, r["family"], "family.log"))
    report = {"command": command_line(argv, script=__file__), "args": vars(args),
              "families": {r["family"]: r for r in results}, "wall_seconds": round(time.time() - started, 1)}
    write_json(os.path.join(args.output_dir, "results.json"), report)
    text = markdown(report)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
