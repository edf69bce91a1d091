"""Command-line arguments of `train_scripts/train_ant.py`.

Flag names follow diffusers' example scripts (train_unconditional.py, train_text_to_image.py,
train_controlnet.py) wherever a flag means the same thing, so a diffusers user can carry their
command lines over; ANT's own flags (--num_clusters, --clustering, --mtl_method, ...) are added.

Run with no arguments at all, the script trains the embedded demo (`DEMO_ARGS`).
"""

from __future__ import annotations

import argparse

from ..cli import OneLineErrorParser
import os
import sys

# The embedded default: a small attention UNet on MNIST-5k at 16x16 with ANT (SNR clustering,
# k = 5, uncertainty weighting). ENVIRONMENT.md measured 0.2-0.29 s/step for this model at batch
# 64 on 2 CPU cores, and legible digits after about 4.5 minutes of training.
DEMO_ARGS = [
    "--model_type", "unet",
    "--model_config_name_or_path", "small",
    "--dataset_name", "mnist5k",
    "--resolution", "16",
    "--train_batch_size", "64",
    "--max_train_steps", "1500",
    "--learning_rate", "2e-3",
    "--lr_scheduler", "cosine",
    "--lr_warmup_steps", "100",
    "--use_ema",
    "--ema_max_decay", "0.999",
    "--num_clusters", "5",
    "--clustering", "snr",
    "--mtl_method", "uw",
    "--checkpointing_steps", "500",
    "--checkpoints_total_limit", "2",
    "--validation_steps", "500",
    "--num_validation_images", "64",
    "--output_dir", "ant-demo",
    "--seed", "0",
    "--report_to", "tensorboard",
]

MODEL_TYPES = ("unet", "dit", "sd", "controlnet", "sdxl", "flux", "sd3", "qwenimage")
# the model types whose AutoencoderKL --pretrained_vae_model_name_or_path may replace (diffusers' SDXL scripts)
VAE_REPLACEABLE_TYPES = ("sd", "sdxl", "controlnet")
# the text-to-image types (captions needed, validation prompts) and those trained by flow matching only
TEXT_TO_IMAGE_TYPES = ("sd", "sdxl", "controlnet", "flux", "sd3", "qwenimage")
# --image_interpolation_mode: torchvision's InterpolationMode names that diffusers' scripts accept (data.transforms
# resamples with PIL for each; kept here so that parsing the flags imports no data module), and the default per
# type: lanczos in its text-to-image scripts, bilinear in its unconditional and ControlNet scripts.
IMAGE_INTERPOLATIONS = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
LANCZOS_TYPES = ("sd", "sdxl", "sd3", "flux", "qwenimage")
FLOW_MATCHING_TYPES = ("sd3", "flux", "qwenimage")
CLUSTERING_OBJECTIVES = ("timestep", "snr", "gradient")
TIMESTEP_SAMPLINGS = ("uniform", "stratified")
# diffusers_ant.schedule's NOISE_SCHEDULERS and FLOW_WEIGHTING_SCHEMES, written out so that building the
# parser (--help) imports no torch; tests/test_flow_matching.py checks that they agree
NOISE_SCHEDULERS = ("ddpm", "flow_match")
FLOW_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "warmup_stable_decay")


# The authors' optimiser for DeMe fine-tunes (MqLeet/DeMe: lsun_church_deme.sh and the defaults of
# train_unconditional_deme.py): constant learning rate 5e-5, AdamW beta1 0.95, weight decay 1e-6, EMA.
# With --deme_interval they replace this script's defaults for every flag the user did not give.
DEME_AUTHORS_DEFAULTS = {"learning_rate": 5e-5, "adam_beta1": 0.95, "adam_weight_decay": 1e-6, "use_ema": True}


class UsageError(ValueError):
    """A bad invocation: reported as one short line, without a traceback."""




def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="train_ant.py",
        description="Train a diffusers model with ANT / multi-task weighting over timestep clusters. "
        "With no arguments, trains the MNIST-5k demo into ./ant-demo.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model_type", default="unet", help=f"One of {', '.join(MODEL_TYPES)}.")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="A local folder saved with save_pretrained (a pipeline folder), or a Hub id when online.")
    g.add_argument("--model_config_name_or_path", default=None,
                   help="Train from scratch: a preset name (`tiny`, `small`) or a path to a model config JSON.")
    g.add_argument("--controlnet_model_name_or_path", default=None,
                   help="ControlNet weights to start from; by default the ControlNet is initialised from the UNet.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="A VAE to use instead of the pipeline's (sd, sdxl), e.g. madebyollin/sdxl-vae-fp16-fix, the SDXL "
                   "VAE that does not overflow in fp16 (as diffusers' SDXL scripts).")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="Override the scheduler's prediction type (flow-matching schedulers always predict the flow).")
    g.add_argument("--num_classes", type=int, default=None,
                   help="Class-conditional training with this many classes (unet, dit). Default: the dataset's "
                   "class count for dit when it has a class column (else unconditional, through DiT's null class), "
                   "unconditional for unet. A pretrained DiT keeps its label table (and its null row) whatever the "
                   "data's class count: the data set's classes train its rows 0..K-1, or those of --class_map.")
    g.add_argument("--class_map", default=None,
                   help="dit from a pretrained model: the pretrained label row each data-set class trains, as a JSON "
                   "object {\"class name\": row} (inline or a .json file) or the rows in class-id order "
                   "(\"207,360,387\"). Default: rows 0..K-1. Samples and the model card use the data set's classes "
                   "through it; the output folder records it in class_map.json.")
    g.add_argument("--rank", type=int, default=None, help="Train LoRA adapters of this rank instead of the full model.")
    g.add_argument("--lora_alpha", type=int, default=None,
                   help="LoRA alpha; the update is scaled by alpha / rank. Default: the rank (scale 1, as diffusers' SD, "
                   "SDXL and SD3 scripts), but 4 for flux and qwenimage, as diffusers' train_dreambooth_lora_flux.py and "
                   "_qwen_image.py default it.")
    g.add_argument("--lora_dropout", type=float, default=0.0,
                   help="Dropout on the LoRA branch's input (peft's lora_dropout), as diffusers' LoRA scripts.")
    g.add_argument("--finetune", default=None, choices=["full", "lora", "bitfit", "difffit"],
                   help="What trains: the whole model, LoRA adapters (--rank), the bias terms (BitFit), or DiffFit's "
                   "biases, norms, label table and scales in the first half of the blocks (Xie et al. 2023, as the "
                   "Diff-Tuning authors' code; the time-embedding MLP's weights stay frozen). Default: lora with "
                   "--rank, else full.")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="sd / sdxl with --rank: train a LoRA adapter on the text encoder(s) too (diffusers' DreamBooth LoRA).")
    g.add_argument("--lora_layers", default=None,
                   help="With --rank: the modules given LoRA (peft target_modules), comma-separated module names, as "
                   "diffusers' SDXL / SD3 / Flux scripts (e.g. \"to_k,to_q,to_v,to_out.0\"); default: the model type's "
                   "own list (the targets of diffusers' LoRA script for that family). A new ControlNet keeps its zero "
                   "convolutions among them: without them no gradient reaches any other layer.")
    g.add_argument("--quantize_base", default=None, choices=["int8", "nf4"],
                   help="With --rank: load the frozen pretrained denoiser's Linear layers in 8 bits (about 1.0 byte "
                   "per parameter, half of bf16) or 4-bit NF4 (about 0.52, a quarter) through diffusers' "
                   "quantization_config and bitsandbytes (QLoRA; pip install bitsandbytes, >= 0.46 for a CPU, "
                   "where it runs too). See docs/families/lora.md.")

    # ---- flow matching (one block: the scheduler family, SD3's --weighting_scheme and its parameters)
    g = p.add_argument_group("flow matching")
    g.add_argument("--noise_scheduler", default=None, choices=list(NOISE_SCHEDULERS),
                   help="Training noise schedule: ddpm (DDPMScheduler) or flow_match (FlowMatchEulerDiscreteScheduler, "
                   "rectified flow; pixel-space unet and dit only). Default: the pretrained folder's scheduler, else ddpm.")
    g.add_argument("--flow_shift", type=float, default=None,
                   help="Shift of the flow-matching sigmas (default 1.0 from scratch, else the folder's; SD3 uses 3.0).")
    g.add_argument("--weighting_scheme", default=None, choices=list(FLOW_WEIGHTING_SCHEMES),
                   help="As diffusers' SD3 script, flow matching only: logit_normal or mode draw the timesteps from "
                   "that density (by default i.i.d.: the density decides how often each cluster is trained; with "
                   "--timestep_sampling stratified each cluster gets an equal share of the batch, drawn from the density "
                   "inside the cluster), sigma_sqrt or cosmap weight the loss (instead of --loss_weighting). Default: "
                   "logit_normal for sd3 (diffusers' SD3 script), else none.")
    g.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density (SD3: 0.0).")
    g.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal density (SD3: 1.0).")
    g.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode density (SD3 script: 1.29).")
    g.add_argument("--precondition_outputs", type=int, default=None, choices=[0, 1],
                   help="As diffusers' SD3 script (EDM-style preconditioning): the loss compares x0_hat = x_t - sigma * "
                   "model_output with the clean latents instead of the velocity with noise - x0 (the same minimiser, "
                   "weighted by sigma^2). Flow matching only. Default: 1 for sd3 (the script's default), else 0.")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="A built-in offline set (mnist5k, animal_mnist, digits, mnist5k_captions, animal_mnist_captions) or a datasets name.")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="A folder of images (datasets' imagefolder layout).")
    g.add_argument("--image_column", default=None)
    g.add_argument("--caption_column", default=None)
    g.add_argument("--conditioning_image_column", default=None)
    g.add_argument("--class_column", default=None)
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Keep N training samples, a seeded random choice as diffusers' scripts (shuffle(seed).select(range(N))); "
                   "never cuts a --knowledge_bank.")
    g.add_argument("--resolution", type=int, default=None, help="Default: the model preset's size.")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--image_interpolation_mode", default=None, choices=IMAGE_INTERPOLATIONS,
                   help="Resampling filter of the resize to --resolution. Default: lanczos for the text-to-image types "
                   "(sd, sdxl, sd3, flux, qwenimage), as diffusers' text-to-image scripts; bilinear for unet, dit and "
                   "controlnet, as its unconditional and ControlNet scripts.")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                   help="Share of captions replaced by the empty prompt (sd, sdxl, sd3, qwenimage, controlnet), so the model learns the "
                   "unconditional branch for classifier-free guidance (0 to 1).")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    # ---- caching and aspect-ratio buckets (issue 16; see training/caching.py, data/buckets.py)
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode every training image with the VAE once before training (its posterior, kept on disk: "
                   "--training_cache_dir), then free the VAE encoder (the decoder stays for validation), as diffusers' "
                   "SD3 / Flux scripts. "
                   "Needs deterministic images: --center_crop (or --aspect_ratio_buckets), no --random_flip.")
    g.add_argument("--cache_text_embeddings", action="store_true",
                   help="Encode every distinct caption (and the empty prompt, and the validation prompts) once, then "
                   "free the text encoders for the rest of the run. Not with --train_text_encoder.")
    g.add_argument("--training_cache_dir", default=None,
                   help="Where --cache_latents / --cache_text_embeddings keep the cache (safetensors read back row by "
                   "row, deleted when training ends): a folder of this run's own in it, one .training_cache_<process> "
                   "per process. Default: --output_dir itself; a fast local disk when --output_dir is on network storage.")
    g.add_argument("--aspect_ratio_buckets", action="store_true",
                   help="Train each image at its own aspect ratio: buckets of about --resolution^2 pixels (sides "
                   "multiples of the VAE factor x patch size), nearest-ratio bucket, resized and centre-cropped; one "
                   "bucket per batch. Latent models only.")
    g.add_argument("--bucket_step", type=int, default=None,
                   help="With --aspect_ratio_buckets: the step of the buckets' sides in pixels, a multiple of the VAE "
                   "factor x patch size. Default 64 (kohya's --bucket_reso_steps; resolution / 8 below 512): a finer "
                   "step spreads the images over more buckets, and a bucket short of a batch per process is never trained.")

    g = p.add_argument_group("ANT: timestep clusters and multi-task weighting")
    g.add_argument("--num_clusters", type=int, default=5, help="k, the number of timestep intervals (1..T).")
    g.add_argument("--clustering", default="snr", help=f"Interval clustering objective: {', '.join(CLUSTERING_OBJECTIVES)}.")
    g.add_argument("--affinity_file", default=None,
                   help="Task-affinity JSON for --clustering gradient (written by `analyze.py affinity`).")
    g.add_argument("--raw_snr", action="store_true", help="SNR clustering on raw SNR instead of log-SNR.")
    g.add_argument("--cluster_min_size", type=int, default=None, help="Default T/(2k) (ANT appendix G).")
    g.add_argument("--cluster_max_size", type=int, default=None, help="Default 2T/k (ANT appendix G).")
    g.add_argument("--mtl_method", default="none",
                   help="`none` (vanilla training) or a weighting: loss-based ls, rlw, uw, dwa; gradient-based pcgrad, "
                   "nash_mtl, imtl, mgda, cagrad; or one of each joined by '+' (`uw+pcgrad`, ANT's combined "
                   "configuration): the loss method's coefficients c_i scale the task losses and the gradient method "
                   "combines the scaled task gradients c_i g_i.")
    g.add_argument("--mtl_options", default=None,
                   help='JSON object of the weighting\'s options, e.g. \'{"update_every": 25}\'.')
    g.add_argument("--task_gradients", default="auto", choices=["auto", "split", "batched", "retain_graph", "last_layers"],
                   help="How gradient-based methods form per-cluster gradients: `auto` (default), `batched` where it "
                   "runs, else `split`; `split`, one forward/backward per cluster sub-batch (exact for per-sample "
                   "normalisation; the least memory; about as fast as batched once the sub-batches are large, e.g. 32x32 "
                   "at batch 64 on a CPU); `batched`, the same gradients from one forward and one backward over the whole "
                   "batch, each layer's weight gradient summed per cluster (Linear / Conv / GroupNorm / LayerNorm / "
                   "Embedding layers and LoRA; other trainable layers and gradient checkpointing are refused; about twice "
                   "split's memory at 16x16); `retain_graph`, the reference way (one "
                   "forward, k backward passes); `last_layers`, one forward, the k gradients of the output-side layers "
                   "only, then one weighted backward (cost independent of the sub-batch size: for small per-device "
                   "batches on a GPU).")
    g.add_argument("--task_gradient_subset", default=None,
                   help="Form per-cluster gradients on a parameter subset only: `lora` or comma-separated "
                   "module-name prefixes; the weights are then applied as loss weights (memory: k subset gradients).")
    g.add_argument("--timestep_sampling", default=None,
                   help="uniform or stratified (each cluster an equal share of the batch). "
                   "Default: stratified when --mtl_method is set, else uniform.")
    g.add_argument("--timestep_range", type=int, nargs=2, default=None, metavar=("START", "END"),
                   help="Train on the inclusive timestep interval [START, END] only (negative-transfer-gap models).")
    g.add_argument("--loss_weighting", default="none", help="Timestep loss weight: none, min_snr, p2, debiased.")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR gamma (Hang et al. 2023); giving it alone selects --loss_weighting min_snr. 5.0 is recommended.")
    g.add_argument("--p2_k", type=float, default=1.0)
    g.add_argument("--p2_gamma", type=float, default=1.0)

    g = p.add_argument_group("Diff-Tuning: transfer along the chain of forgetting (Zhong et al., NeurIPS 2024)")
    g.add_argument("--knowledge_bank", default=None,
                   help="A knowledge bank written by build_knowledge_bank.py: turns Diff-Tuning on (retention on the bank). "
                   "Checked against the weights of --pretrained_model_name_or_path (its recorded fingerprint); read "
                   "whole (--max_train_samples cuts the downstream data only).")
    g.add_argument("--retention", default=None, choices=["bank", "kd"],
                   help="Knowledge retention from the bank (default with --knowledge_bank) or by distillation (`kd`: "
                   "downstream images with the frozen pretrained model's prediction as target; no bank).")
    g.add_argument("--bank_fraction", type=float, default=0.2,
                   help="Share of each batch given to retention samples (bank images or kd samples), in (0, 1): "
                   "floor(B x fraction) rows, as the authors' int(0.2 * B).")
    g.add_argument("--bank_weight", type=float, default=0.1,
                   help="lambda: loss = mean over downstream samples + lambda x mean over retention samples.")
    g.add_argument("--retention_exponent", type=_exponent_or_tied, default="tied",
                   help="a: retention timesteps drawn with probability (T - t)^a (low noise); 0 = uniform; `tied` "
                   "(default): a = --reconsolidation_exponent, as the authors' code uses one exponent for both.")
    g.add_argument("--reconsolidation_exponent", type=float, default=1.0,
                   help="b: downstream timesteps drawn with probability (t + 1)^b (high noise); 0 = uniform.")
    g.add_argument("--bank_keep_prompts", action="store_true",
                   help="Text-to-image: train bank images with their prompts instead of the empty prompt.")
    g.add_argument("--track_convergence", action="store_true",
                   help="ControlNet: measure sudden convergence (the condition re-extracted from samples against the input).")
    g.add_argument("--convergence_steps", type=int, default=100, help="Check convergence every N steps.")
    g.add_argument("--convergence_threshold", type=float, default=0.05,
                   help="Converged when the distance of the re-extracted condition falls below this.")
    g.add_argument("--condition_extractor", default="outline",
                   help="How to re-extract the condition from an image: `outline` (the mnist5k_captions outlines) or "
                   "`module:function` (a function PIL image -> array).")
    g.add_argument("--convergence_distance", default="mse", choices=["mse", "mae", "iou"],
                   help="Distance between the re-extracted and the input condition.")

    g = p.add_argument_group(
        "DeMe: decouple, then merge (Decouple-Then-Merge, CVPR 2025)",
        "With --deme_interval the run uses the authors' settings (MqLeet/DeMe) for every flag not given: "
        + ", ".join(f"--{k} {v}" for k, v in DEME_AUTHORS_DEFAULTS.items() if not isinstance(v, bool))
        + ", --use_ema (turn it off with --no-use_ema), antithetic timestep pairs (--no-deme_antithetic), "
        "channel projection on (--no_channel_projection); the "
        "projections and norms get no weight decay (decay pulls a projection toward zero, not the identity).")
    g.add_argument("--deme_interval", type=int, default=None,
                   help="Fine-tune the pretrained model on this interval (0 = lowest noise) of the run's --num_clusters "
                   "intervals (--clustering timestep: the paper's equal intervals).")
    g.add_argument("--consistency_weight", type=float, default=1.0,
                   help="Weight of the consistency loss ||pretrained(x_t) - model(x_t)||^2 (DeMe: 1).")
    g.add_argument("--deme_global_prob", type=float, default=0.3,
                   help="p: probability that a micro-batch draws its timesteps from the whole range instead of the "
                   "interval (authors: 0.3).")
    g.add_argument("--deme_sampling", default="per_batch", choices=["per_batch", "per_sample"],
                   help="Flip the global-range coin once per micro-batch of --train_batch_size rows (the authors, before "
                   "gradient accumulation) or once per sample.")
    g.add_argument("--deme_antithetic", action=argparse.BooleanOptionalAction, default=None,
                   help="The authors' antithetic draw: half of each micro-batch's timesteps t, the other half "
                   "lo + hi - t in the same range. On by default with --deme_interval and --deme_sampling per_batch "
                   "(it pairs draws under one coin); --no-deme_antithetic turns it off.")
    g.add_argument("--channel_projection", action="store_true",
                   help="A learnable channel mixing initialised to the identity after each block, on the main path (skip "
                   "connections unprojected), as DeMe. On by default with --deme_interval; this flag adds it elsewhere.")
    g.add_argument("--no_channel_projection", action="store_true",
                   help="A DeMe fine-tune without the channel projection (the authors always use it).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=16, help="Per device.")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", default="constant", help=f"One of {', '.join(LR_SCHEDULERS)}.")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    g.add_argument("--lr_decay_steps", type=int, default=None,
                   help="warmup_stable_decay: the cool-down, this many updates of half-cosine decay from the learning "
                   "rate to --lr_min_ratio times it (required with that scheduler).")
    g.add_argument("--lr_stable_steps", type=int, default=None,
                   help="warmup_stable_decay: constant updates between the warm-up and the cool-down (default: the "
                   "cool-down ends at --max_train_steps). Fixing it lets a cool-down branch off a constant-rate run: "
                   "resuming a constant_with_warmup checkpoint at or before the cool-down's start is exact.")
    g.add_argument("--lr_min_ratio", type=float, default=0.0,
                   help="warmup_stable_decay: the learning rate after the cool-down, as a fraction of --learning_rate.")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes' 8-bit AdamW: Adam's two moments in 1 byte per value instead of 4 (tensors of "
                   "4,096 values or more); on a GPU or, with bitsandbytes >= 0.46, the CPU (pip install bitsandbytes).")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep an EMA of the weights and save it (default: off; on for DeMe runs, --no-use_ema turns it off).")
    g.add_argument("--ema_max_decay", type=float, default=0.9999)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=3 / 4)
    g.add_argument("--offload_ema", action="store_true", help="Keep the EMA weights in CPU memory between updates.")
    g.add_argument("--foreach_ema", action="store_true", help="Update the EMA weights with torch's foreach kernels.")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention in the trained model (pip install xformers).")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ddp_timeout", type=int, default=1800,
                   help="Seconds a process waits in a collective before the launch is aborted (transformers' "
                   "flag and default; NCCL's own is 600): process 0 alone writes checkpoints and validation samples "
                   "while the others wait. Raise it for large full fine-tunes or many validation images. Under "
                   "DeepSpeed it takes the place of DEEPSPEED_TIMEOUT.")

    g = p.add_argument_group("checkpoints, validation, outputs")
    g.add_argument("--output_dir", default="ant-output")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--report_to", default="tensorboard")
    g.add_argument("--tracker_project_name", default="diffusers-ant")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save a resumable checkpoint every this many updates, the last one included when it falls "
                   "on the period (continue a finished run with a larger --max_train_steps and "
                   "--resume_from_checkpoint latest).")
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    g.add_argument("--validation_steps", type=int, default=None, help="Sample a grid every N steps (and at the end).")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="Sample a grid after the first epoch and every N epochs after it, as diffusers' scripts do "
                   "(and at the end).")
    g.add_argument("--num_validation_images", type=int, default=16)
    g.add_argument("--validation_prompt", nargs="+", default=None,
                   help="Validation prompt(s) (text-to-image types); with --validation_image (controlnet), one per image or "
                   "one for all.")
    g.add_argument("--validation_image", nargs="+", default=None,
                   help="Conditioning image(s) for ControlNet validation, paired with --validation_prompt.")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="Classifier-free guidance scale of the validation samples (default: the pipeline's). flux: the "
                   "distilled guidance a guidance-distilled transformer (FLUX.1-dev) is trained and sampled with "
                   "(default 1.0, the value diffusers' Flux README trains with; ignored by schnell).")
    g.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for validation samples.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None)
    g.add_argument("--hub_private_repo", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate. No arguments at all selects the demo (`DEMO_ARGS`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    demo = len(argv) == 0
    parser = build_parser()
    args = parser.parse_args(DEMO_ARGS if demo else argv)
    args.demo = demo
    given = given_options(parser, DEMO_ARGS if demo else argv)
    validate_args(args, given=given)
    # flags left at a default that changed (a run resumed from a checkpoint written under the old default keeps
    # the checkpoint's value: training.loop.adopt_recorded_defaults); private, so never written to the records
    args._defaulted = frozenset(name for name in DEFAULTS_CHANGED if name not in given)
    return args


# Flags whose default changed after checkpoints had been written with the old one: the authors' antithetic draw
# for DeMe fine-tunes (was off), the retention exponent tied to the data's (was 1), FLUX.1 / Qwen-Image's LoRA
# alpha (was the rank, recorded as None), the text-to-image types' resize filter (was bilinear), and the
# aspect-ratio buckets' step (was one latent patch, before the flag existed: `loop.adopt_recorded_defaults`).
DEFAULTS_CHANGED = ("deme_antithetic", "retention_exponent", "lora_alpha", "image_interpolation_mode", "bucket_step")

# `args.bucket_step` of a run resumed from a bucketed checkpoint written before `--bucket_step` existed: its
# buckets stepped by one latent patch of the model (`loop.bucket_step`)
BUCKET_STEP_OF_ONE_PATCH = "patch"

# --lora_alpha where the family's diffusers script does not default it to the rank: train_dreambooth_lora_flux.py
# and train_dreambooth_lora_qwen_image.py take `--lora_alpha` with default 4 whatever the rank.
LORA_ALPHA_DEFAULTS = {"flux": 4, "qwenimage": 4}


def given_options(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations of the flags ``argv`` gives explicitly (abbreviations and ``--flag=value``
    included): argparse only fills the defaults of destinations the namespace lacks, so a second parse
    into a namespace pre-filled with a marker leaves the marker exactly where nothing was given."""
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(list(argv), namespace=namespace)
    return {dest for dest, value in vars(namespace).items() if value is not marker}


def validate_args(args: argparse.Namespace, given: set | None = None) -> None:
    """Checks that need no model or data; each failure names the fix. Raises UsageError.

    ``given``: the flags given explicitly (``given_options``); a DeMe run fills the others with the
    authors' settings. None (a namespace not from ``parse_args``): every value counts as given."""
    from ..losses import LOSS_WEIGHTINGS

    if args.model_type not in MODEL_TYPES:
        raise UsageError(f"unknown --model_type {args.model_type!r}; choose one of: {', '.join(MODEL_TYPES)}")
    if getattr(args, "num_validation_images", 1) < 1:  # the run samples at its end for samples/ and the card (0 crashed the pipeline)
        raise UsageError(f"--num_validation_images {args.num_validation_images}: the run samples validation images at "
                         "its end (samples/, the model card); give 1 or more")
    # values whose error came after training (a traceback at the end's samples, losing them, the card and the push), or
    # never (a negative clipping norm flips every gradient: torch scales by max_norm / norm)
    if getattr(args, "num_inference_steps", 1) < 1:
        raise UsageError(f"--num_inference_steps {args.num_inference_steps}: the validation samples need 1 or more")
    if getattr(args, "max_grad_norm", 0) < 0:
        raise UsageError(f"--max_grad_norm {args.max_grad_norm:g} is negative, which would reverse every gradient: give "
                         "a positive norm, or 0 to turn clipping off")
    if getattr(args, "ddp_timeout", 1) < 1:
        raise UsageError(f"--ddp_timeout {args.ddp_timeout}: give the seconds a process may wait in a collective, 1 "
                         "or more (default 1800)")
    if getattr(args, "use_ema", False):
        if args.ema_inv_gamma <= 0:
            raise UsageError(f"--ema_inv_gamma must be > 0 (EMA's warm-up divides the step by it); got {args.ema_inv_gamma:g}")
        if not 0 <= args.ema_max_decay <= 1:
            raise UsageError(f"--ema_max_decay must be between 0 and 1; got {args.ema_max_decay:g}")
    if args.pretrained_model_name_or_path and args.model_config_name_or_path and args.model_type != "controlnet":
        raise UsageError("give either --pretrained_model_name_or_path or --model_config_name_or_path, not both")
    if args.pretrained_model_name_or_path and not os.path.isdir(args.pretrained_model_name_or_path):
        # A Hub id is fine while online (the model loader reports what it cannot find); offline it
        # cannot be found, so say so now rather than after minutes of hub retries.
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
            raise UsageError(f"pretrained model {args.pretrained_model_name_or_path!r} not found: give a local folder "
                             "saved with save_pretrained, or a Hub id while online")
    if args.dataset_name is None and args.train_data_dir is None:
        raise UsageError("give --dataset_name (e.g. mnist5k) or --train_data_dir (a folder of images)")
    if args.num_clusters < 1:
        raise UsageError(f"--num_clusters must be at least 1, got {args.num_clusters}")
    if args.clustering not in CLUSTERING_OBJECTIVES:
        raise UsageError(f"unknown --clustering {args.clustering!r}; choose one of: {', '.join(CLUSTERING_OBJECTIVES)}")
    if args.clustering == "gradient":
        if args.affinity_file is None:
            raise UsageError("--clustering gradient needs --affinity_file (write one with `analyze.py affinity`)")
        if not os.path.isfile(args.affinity_file):
            raise UsageError(f"--affinity_file {args.affinity_file!r} does not exist")
    if args.mtl_method != "none":
        from ..weighting.registry import weighting_class

        try:
            weighting_class(args.mtl_method)
        except ValueError as e:
            raise UsageError(f"--mtl_method: {e}") from None
    if args.task_gradients == "batched" and getattr(args, "gradient_checkpointing", False):
        raise UsageError("--task_gradients batched sums each layer's gradient per cluster as the layer's backward runs, "
                         "which gradient checkpointing recomputes out of its sight: use --task_gradients split")
    if args.snr_gamma is not None and args.loss_weighting == "none":
        args.loss_weighting = "min_snr"  # diffusers' scripts switch Min-SNR on by giving --snr_gamma alone
    if args.loss_weighting not in LOSS_WEIGHTINGS:
        raise UsageError(f"unknown --loss_weighting {args.loss_weighting!r}; choose one of: {', '.join(LOSS_WEIGHTINGS)}")
    if args.loss_weighting == "min_snr" and args.snr_gamma is None:
        args.snr_gamma = 5.0
    if args.snr_gamma is not None and args.loss_weighting != "min_snr":
        raise UsageError(f"--snr_gamma is Min-SNR's gamma, which --loss_weighting {args.loss_weighting} does not use: drop "
                         "--snr_gamma" + (" (P2 takes --p2_k and --p2_gamma)" if args.loss_weighting == "p2" else ""))
    p2_flags = sorted({"p2_k", "p2_gamma"} & (given or set()))
    if p2_flags and args.loss_weighting != "p2":  # (they trained plain MSE, or Min-SNR, without a word)
        raise UsageError(f"--{p2_flags[0]} is P2's, which --loss_weighting {args.loss_weighting} does not use: add "
                         f"--loss_weighting p2, or drop --{' / --'.join(p2_flags)}")
    # (checked again by the loss weight itself, at the first step: after the data, the model and any cache)
    if args.loss_weighting == "min_snr" and args.snr_gamma <= 0:
        raise UsageError(f"--snr_gamma must be > 0 (5 is recommended); got {args.snr_gamma:g}")
    if args.loss_weighting == "p2" and (args.p2_k <= 0 or args.p2_gamma < 0):
        raise UsageError(f"P2 needs --p2_k > 0 and --p2_gamma >= 0 (the paper: k 1, gamma 0.5 or 1); got {args.p2_k:g}, "
                         f"{args.p2_gamma:g}")
    # ---- flow matching: --noise_scheduler, --flow_shift, --weighting_scheme (before the sampling default below)
    from ..timesteps import FLOW_DENSITY_SCHEMES, FlowMatchingDensitySampler

    if args.noise_scheduler not in (None, *NOISE_SCHEDULERS):
        raise UsageError(f"unknown --noise_scheduler {args.noise_scheduler!r}; choose one of: {', '.join(NOISE_SCHEDULERS)}")
    if args.model_type in FLOW_MATCHING_TYPES:  # their pipelines sample FlowMatchEuler and nothing else
        if args.noise_scheduler == "ddpm":
            raise UsageError(f"--model_type {args.model_type} trains with flow matching (its pipeline samples "
                             "FlowMatchEuler): drop --noise_scheduler ddpm")
        args.noise_scheduler = "flow_match"
    if args.model_type == "sd3":
        own_draws = args.knowledge_bank is not None or args.retention is not None or args.deme_interval is not None
        if args.weighting_scheme is None and not own_draws:  # Diff-Tuning and DeMe draw their own timesteps
            args.weighting_scheme = "logit_normal"  # the default of diffusers' train_dreambooth_lora_sd3.py
        if args.precondition_outputs is None:
            args.precondition_outputs = 1  # the default of diffusers' train_dreambooth_lora_sd3.py
    if args.weighting_scheme is None:
        args.weighting_scheme = "none"
    if args.noise_scheduler == "flow_match":
        if args.model_type in ("sd", "sdxl", "controlnet"):
            raise UsageError(f"--noise_scheduler flow_match is for pixel-space models (unet, dit); {args.model_type} is latent")
        if args.prediction_type is not None:
            raise UsageError("--noise_scheduler flow_match trains the velocity (noise - x0): drop --prediction_type")
    ddpm = args.noise_scheduler == "ddpm" or (args.noise_scheduler is None and args.pretrained_model_name_or_path is None)
    if args.flow_shift is not None and (args.flow_shift <= 0 or ddpm):
        raise UsageError("--flow_shift must be > 0 and needs a flow-matching scheduler (--noise_scheduler flow_match)")
    if args.weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
        raise UsageError(f"unknown --weighting_scheme {args.weighting_scheme!r}; choose one of: {', '.join(FLOW_WEIGHTING_SCHEMES)}")
    if args.weighting_scheme != "none":
        if ddpm:
            raise UsageError(f"--weighting_scheme {args.weighting_scheme} is for flow matching: add --noise_scheduler flow_match")
        if args.weighting_scheme in FLOW_DENSITY_SCHEMES:
            # the density decides how often each noise level is trained (default: i.i.d. draws, grouped into
            # clusters afterwards); an explicit --timestep_sampling stratified composes with it (equal cluster
            # shares, the density inside each cluster: timesteps.StratifiedDensitySampler); --timestep_range
            # would train one interval
            if args.timestep_range is not None:
                raise UsageError(f"--weighting_scheme {args.weighting_scheme} draws the timesteps from its density: "
                                 "drop --timestep_range (or use --weighting_scheme none)")
            if args.knowledge_bank is not None or args.retention is not None or args.deme_interval is not None:
                # their samplers would replace the density without a word
                raise UsageError(f"Diff-Tuning and DeMe draw their own timesteps: drop --weighting_scheme "
                                 f"{args.weighting_scheme} (or use sigma_sqrt / cosmap, which weight the loss)")
            if args.timestep_sampling != "stratified":
                args.timestep_sampling = "uniform"
            try:  # the sampler's own checks of --logit_std / --mode_scale, now rather than at set-up
                FlowMatchingDensitySampler(args.weighting_scheme, 1000, args.logit_mean, args.logit_std, args.mode_scale)
            except ValueError as err:
                raise UsageError(f"--{err}") from None  # its messages start with the parameter's name
        elif args.loss_weighting != "none":
            raise UsageError(f"--weighting_scheme {args.weighting_scheme} is a loss weight: drop --loss_weighting "
                             f"{args.loss_weighting} (and --snr_gamma), or use a density scheme (logit_normal, mode) with it")
    if args.precondition_outputs is None:
        args.precondition_outputs = 0
    if args.precondition_outputs and ddpm:
        raise UsageError("--precondition_outputs 1 preconditions a flow-matching model's output: add --noise_scheduler "
                         "flow_match, or drop it")
    from ..peft_modes import validate_finetune_mode

    if args.finetune is None:
        args.finetune = "lora" if args.rank is not None else "full"
    try:
        validate_finetune_mode(args.finetune, args.rank)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.finetune == "lora" and args.rank is None:
        raise UsageError("--finetune lora needs the LoRA rank: add --rank (e.g. --rank 4)")
    if args.finetune in ("bitfit", "difffit") and args.pretrained_model_name_or_path is None:
        raise UsageError(f"--finetune {args.finetune} adapts a pretrained model: give --pretrained_model_name_or_path")
    if args.model_type in TEXT_TO_IMAGE_TYPES and (args.num_classes is not None or args.class_column is not None):
        # (read and collated, never used: the text-to-image types take captions, as sd3 and qwenimage said)
        raise UsageError(f"--model_type {args.model_type} is conditioned on captions, not classes: drop --num_classes / "
                         "--class_column (class labels train --model_type unet or dit)")
    if args.class_map is not None:
        if args.model_type != "dit" or args.pretrained_model_name_or_path is None:
            raise UsageError("--class_map maps data-set classes to a pretrained DiT's label rows: it needs "
                             "--model_type dit and --pretrained_model_name_or_path")
        if args.num_classes is not None:
            raise UsageError("--class_map gives every data-set class its row: drop --num_classes")
    if args.track_convergence:
        if args.model_type != "controlnet":
            raise UsageError("--track_convergence measures a ControlNet's sudden convergence: use --model_type controlnet")
        if args.convergence_steps < 1 or not args.convergence_threshold > 0:
            raise UsageError("--convergence_steps must be >= 1 and --convergence_threshold > 0")
    _validate_diff_tuning(args)
    _validate_deme(args, given)
    from .caching import validate_caching_args

    validate_caching_args(args)  # --cache_latents, --cache_text_embeddings, --aspect_ratio_buckets
    if args.timestep_sampling is None:
        args.timestep_sampling = "stratified" if args.mtl_method != "none" else "uniform"
    if args.timestep_sampling not in TIMESTEP_SAMPLINGS:
        raise UsageError(f"unknown --timestep_sampling {args.timestep_sampling!r}; choose one of: {', '.join(TIMESTEP_SAMPLINGS)}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise UsageError(f"--proportion_empty_prompts must lie in [0, 1], got {args.proportion_empty_prompts}")
    if args.proportion_empty_prompts and args.model_type not in ("sd", "sdxl", "sd3", "qwenimage", "controlnet"):
        raise UsageError("--proportion_empty_prompts drops captions: it applies to --model_type sdxl, sd3, qwenimage, "
                         "sd and controlnet only")
    if args.validation_epochs is not None and args.validation_epochs < 1:
        raise UsageError("--validation_epochs must be at least 1")
    if args.validation_prompt and args.validation_image and len(args.validation_prompt) not in (1, len(args.validation_image)) \
            and len(args.validation_image) != 1:
        raise UsageError(f"{len(args.validation_prompt)} --validation_prompt and {len(args.validation_image)} --validation_image: "
                         "give one prompt per image, or one of either for all")
    for path in args.validation_image or []:
        if not os.path.isfile(path):
            raise UsageError(f"--validation_image {path!r} does not exist")
    if args.lr_num_cycles < 1:
        raise UsageError("--lr_num_cycles must be at least 1")
    if args.lr_scheduler == "warmup_stable_decay":
        if args.lr_decay_steps is None or args.lr_decay_steps < 1:
            raise UsageError("--lr_scheduler warmup_stable_decay needs --lr_decay_steps (the cool-down's length, >= 1)")
        if args.lr_stable_steps is not None and args.lr_stable_steps < 0:
            raise UsageError("--lr_stable_steps must be at least 0")
        if not 0.0 <= args.lr_min_ratio < 1.0:
            raise UsageError("--lr_min_ratio must lie in [0, 1), e.g. 0.05 to end at 5% of --learning_rate")
    else:
        for name in ("lr_decay_steps", "lr_stable_steps"):
            if getattr(args, name) is not None:
                raise UsageError(f"--{name} applies to --lr_scheduler warmup_stable_decay only")
        if args.lr_min_ratio:
            raise UsageError("--lr_min_ratio applies to --lr_scheduler warmup_stable_decay only")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    if args.quantize_base is not None and args.model_type == "controlnet":
        # The ControlNet is the trained model (copied from the UNet's weights, which a quantized UNet no longer
        # holds as tensors), and its frozen UNet, once quantized, refuses the cast to the weight dtype:
        # diffusers' train_controlnet.py quantizes nothing either.
        raise UsageError("--quantize_base quantizes a LoRA run's frozen denoiser; a ControlNet run trains the ControlNet "
                         "beside a frozen UNet, which it cannot quantize: drop --quantize_base")
    if args.quantize_base is not None:
        from ..models.quantization import check_quantize_base

        try:
            check_quantize_base(args.quantize_base, args.rank)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UsageError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers") from None
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise UsageError(f"unknown --lr_scheduler {args.lr_scheduler!r}; choose one of: {', '.join(LR_SCHEDULERS)}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "num_train_epochs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise UsageError("--max_train_steps must be at least 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError("--checkpoints_total_limit must be at least 1")
    if args.rank is not None and args.rank < 1:
        raise UsageError("--rank must be at least 1")
    if args.train_text_encoder and (args.model_type not in ("sd", "sdxl") or args.rank is None):
        raise UsageError("--train_text_encoder trains a LoRA on Stable Diffusion's text encoder(s): use it with "
                         "--model_type sd or sdxl and --rank")
    if args.pretrained_vae_model_name_or_path and args.model_type not in VAE_REPLACEABLE_TYPES:
        raise UsageError(f"--pretrained_vae_model_name_or_path replaces the VAE of {', '.join(VAE_REPLACEABLE_TYPES)}; "
                         f"--model_type {args.model_type} takes none: drop it")
    if args.image_interpolation_mode is None:
        args.image_interpolation_mode = "lanczos" if args.model_type in LANCZOS_TYPES else "bilinear"
    if args.rank is not None and args.lora_alpha is None and args.model_type in LORA_ALPHA_DEFAULTS:
        args.lora_alpha = LORA_ALPHA_DEFAULTS[args.model_type]
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout {args.lora_dropout}: give a probability in [0, 1)")
    if args.lora_dropout and args.rank is None:
        raise UsageError("--lora_dropout applies to LoRA adapters: add --rank, or drop it")
    if args.lora_layers is not None and (args.rank is None or not [x for x in args.lora_layers.split(",") if x.strip()]):
        raise UsageError("--lora_layers names the modules given LoRA: add --rank and at least one module name")
    if args.rank is not None and args.pretrained_model_name_or_path is None:
        raise UsageError("--rank trains LoRA adapters on a pretrained model: give --pretrained_model_name_or_path")
    if args.pretrained_model_name_or_path is None and args.model_config_name_or_path is None:
        args.model_config_name_or_path = "tiny"
    if args.mtl_options is not None:
        import json
        try:
            args.mtl_options_dict = json.loads(args.mtl_options)
        except json.JSONDecodeError as e:
            raise UsageError(f"--mtl_options is not valid JSON ({e.msg}); example: '{{\"update_every\": 25}}'") from None
        if not isinstance(args.mtl_options_dict, dict):
            raise UsageError("--mtl_options must be a JSON object")
    else:
        args.mtl_options_dict = {}
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        # a bare name is looked up in --output_dir, as in diffusers' scripts
        if not os.path.isdir(os.path.join(args.output_dir, args.resume_from_checkpoint)):
            raise UsageError(f"checkpoint {args.resume_from_checkpoint!r} not found (neither a folder nor in --output_dir); "
                             'use "latest" or a checkpoint-N folder')
    if args.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # before any training, not at the upload after it
            raise UsageError("--push_to_hub needs the network but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub")
    from ..hub import check_hub_token_safety

    try:  # with or without --push_to_hub (as diffusers' scripts): the tracker uploads the command line either way
        check_hub_token_safety(args.report_to, args.hub_token)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.model_type in TEXT_TO_IMAGE_TYPES and args.dataset_name in ("mnist5k", "animal_mnist", "digits"):
        raise UsageError(f"--model_type {args.model_type} needs captions: use --dataset_name mnist5k_captions or a captioned dataset")


def _exponent_or_tied(text: str):
    """`--retention_exponent`: a number, or `tied` (resolved to `--reconsolidation_exponent` in validation)."""
    if text == "tied":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or `tied`, got {text!r}") from None


def _validate_diff_tuning(args: argparse.Namespace) -> None:
    """Diff-Tuning's flags; `args.diff_tuning` says whether it is on (a bank, or `--retention kd`)."""
    if args.retention_exponent == "tied":  # the authors' code draws both sources with one exponent
        args.retention_exponent = args.reconsolidation_exponent
    if args.retention is None and args.knowledge_bank is not None:
        args.retention = "bank"
    args.diff_tuning = args.retention is not None
    if args.bank_keep_prompts and (args.retention != "bank" or args.model_type not in TEXT_TO_IMAGE_TYPES):
        # a DiT's bank rows train its null class (their pretrained labels would go through the data set's
        # class map, meant for the data's classes), a class-conditional UNet's keep their labels
        raise UsageError("--bank_keep_prompts keeps a text-to-image bank's prompts: it applies to --knowledge_bank runs of "
                         f"{', '.join(TEXT_TO_IMAGE_TYPES)}, drop it")
    if not args.diff_tuning:
        return
    if args.retention == "bank" and args.knowledge_bank is None:
        raise UsageError("--retention bank needs --knowledge_bank (write one with build_knowledge_bank.py), or use --retention kd")
    if args.retention == "kd" and args.knowledge_bank is not None:
        raise UsageError("--retention kd distils from the pretrained model and uses no bank: drop --knowledge_bank")
    if args.knowledge_bank is not None and not os.path.isdir(args.knowledge_bank):
        raise UsageError(f"--knowledge_bank {args.knowledge_bank!r} does not exist: build it with build_knowledge_bank.py")
    if args.pretrained_model_name_or_path is None:
        raise UsageError("Diff-Tuning transfers a pretrained model: give --pretrained_model_name_or_path")
    # --retention kd with --train_text_encoder is fine: --train_text_encoder needs --rank, and a LoRA run's
    # teacher is the student with every adapter off, the text encoder's too (teacher.AdapterDisabledTeacher),
    # so the teacher encodes captions with the pretrained encoder.
    if not 0.0 < args.bank_fraction < 1.0:
        raise UsageError(f"--bank_fraction must lie strictly between 0 and 1, got {args.bank_fraction}")
    if args.bank_weight < 0:
        raise UsageError(f"--bank_weight must be >= 0, got {args.bank_weight}")
    for name in ("retention_exponent", "reconsolidation_exponent"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0 (0 = uniform), got {getattr(args, name)}")
    from ..diff_tuning import retention_share

    retained = retention_share(args.train_batch_size, args.bank_fraction)
    if not 0 < retained < args.train_batch_size:
        raise UsageError(f"--bank_fraction {args.bank_fraction} of --train_batch_size {args.train_batch_size} leaves "
                         f"{retained} retention samples: raise --train_batch_size or change --bank_fraction")
    if args.timestep_sampling == "stratified" or args.timestep_range is not None:
        raise UsageError("Diff-Tuning draws timesteps from its retention / reconsolidation densities: drop "
                         "--timestep_sampling stratified / --timestep_range (set the exponents to 0 for uniform draws)")
    args.timestep_sampling = "uniform"  # per-source densities; clusters are assigned after the draw


def _validate_deme(args: argparse.Namespace, given: set | None = None) -> None:
    """DeMe's flags (the interval's range is checked once the clusters exist), and the authors'
    defaults of a DeMe run: channel projection on, their optimiser (``DEME_AUTHORS_DEFAULTS``) for
    every flag not given explicitly."""
    if args.no_channel_projection and args.deme_interval is None:
        raise UsageError("--no_channel_projection turns off DeMe's default projection: it needs --deme_interval")
    if args.no_channel_projection and args.channel_projection:
        raise UsageError("--channel_projection and --no_channel_projection contradict each other: give one")
    if args.deme_antithetic and args.deme_interval is None:
        raise UsageError("--deme_antithetic pairs DeMe's interval draws: it needs --deme_interval")
    if args.deme_antithetic and args.deme_sampling != "per_batch":
        raise UsageError("--deme_antithetic pairs draws under one coin: use --deme_sampling per_batch")
    if args.deme_antithetic is None:  # the authors' draw wherever it applies (MqLeet/DeMe pairs every batch)
        args.deme_antithetic = args.deme_interval is not None and args.deme_sampling == "per_batch"
    if args.deme_interval is None:
        if args.channel_projection and args.pretrained_model_name_or_path is None:
            raise UsageError("--channel_projection adapts a pretrained model: give --pretrained_model_name_or_path")
        return
    if args.pretrained_model_name_or_path is None:
        raise UsageError("DeMe fine-tunes a pretrained model per interval: give --pretrained_model_name_or_path")
    if args.deme_interval < 0 or args.deme_interval >= args.num_clusters:
        raise UsageError(f"--deme_interval {args.deme_interval} is out of range: the run has --num_clusters "
                         f"{args.num_clusters} intervals, numbered 0..{args.num_clusters - 1}")
    if not 0.0 <= args.deme_global_prob <= 1.0:
        raise UsageError(f"--deme_global_prob must lie in [0, 1], got {args.deme_global_prob}")
    args.channel_projection = not args.no_channel_projection  # the authors' script always projects
    if given is not None:
        for name, value in DEME_AUTHORS_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
    if args.consistency_weight < 0:
        raise UsageError(f"--consistency_weight must be >= 0, got {args.consistency_weight}")
    if args.timestep_range is not None or args.diff_tuning:
        raise UsageError("--deme_interval chooses the timesteps itself: drop --timestep_range / Diff-Tuning's flags")
    if args.train_text_encoder:
        raise UsageError("--deme_interval compares with the frozen pretrained model: drop --train_text_encoder")
    if args.timestep_sampling == "stratified":
        raise UsageError("--deme_interval draws from its interval: drop --timestep_sampling stratified")
    args.timestep_sampling = "uniform"
