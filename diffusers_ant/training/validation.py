"""Validation samples: a grid from the model's diffusers pipeline, saved and sent to the trackers."""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def log_and_save_samples(args, accelerator, adapter, model, step, inputs):
    """Sample `args.num_validation_images` images; save `samples/step-<N>.png`; log to trackers.

    Returns (images, grid_path). Sampling uses a fixed seed so grids of different steps compare.
    """
    from diffusers.utils import make_image_grid

    pipeline = adapter.make_pipeline(model)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # DDIM: a few dozen steps give clean samples where ancestral DDPM would need hundreds.
        images = adapter.sample(pipeline, args.num_validation_images, generator=generator,
                                num_inference_steps=args.num_inference_steps, scheduler="ddim",
                                guidance_scale=getattr(args, "guidance_scale", None), **inputs)
    model.train(was_training)
    cols = int(math.ceil(math.sqrt(len(images))))
    rows = int(math.ceil(len(images) / cols))
    padded = images + [images[0].copy().point(lambda _: 0)] * (rows * cols - len(images))
    grid = make_image_grid(padded, rows=rows, cols=cols)
    # Tiny models (16x16) make tiny grids: upscale with nearest neighbours so a person can see them.
    if grid.width < 512:
        factor = max(1, 512 // grid.width)
        grid = grid.resize((grid.width * factor, grid.height * factor), resample=0)
    folder = os.path.join(args.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    grid_path = os.path.join(folder, f"step-{step}.png")
    grid.save(grid_path)
    prompts = inputs.get("prompts")  # (a dict where --cache_text_embeddings encoded them: no caption text then)
    log_images_to_trackers(accelerator, images, step, captions=prompts if isinstance(prompts, list) else None)
    return images, grid_path


def log_images_to_trackers(accelerator, images, step, captions=None) -> None:
    """Send validation images to every configured tracker through Accelerate's `log_images`.

    TensorBoard takes one NHWC array; wandb gets `wandb.Image`s captioned `"i: prompt"` with `captions`
    (one per image), as diffusers' scripts log them (Accelerate's `log_images` wraps them without a caption);
    the others take the PIL images. A tracker without image support is told once in the log."""
    import logging

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            array = np.stack([np.asarray(img.convert("RGB")) for img in images])
            tracker.log_images({"validation": array}, step, dataformats="NHWC")
        elif tracker.name == "wandb" and captions is not None:
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=f"{i}: {caption}")
                                        for i, (image, caption) in enumerate(zip(images, captions))]}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"validation": list(images)}, step)
        else:
            logging.getLogger("diffusers_ant").info("tracker %s does not take images; skipped", tracker.name)
