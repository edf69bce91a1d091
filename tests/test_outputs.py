"""What a training run leaves in its output folder (issue 9): unconditional DiT on an unlabelled folder,
a ControlNet LoRA that learns its condition, and no absolute path of the training machine in any file.

The trainer runs in-process (tests/trainer_utils.py) on the tiny presets for a few steps.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_utils import TINY_RUN, train_in_process


def _image_folder(root, count=8, size=8):
    """A flat folder of PNGs: no subfolders, no metadata, so no label column."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_dit_on_an_unlabelled_image_folder_trains_unconditionally(tmp_path):
    """Refused before ("the dataset has no class label column"); the DiT's null class makes it unconditional."""
    from diffusers_ant.models import load_pipeline

    out = tmp_path / "out"
    train_in_process(["--model_type", "dit", "--train_data_dir", str(_image_folder(tmp_path / "images")),
                      "--output_dir", str(out), "--resolution", "8", *TINY_RUN, "--max_train_steps", "1"])
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["num_embeds_ada_norm"] == 1  # one (unused) class + the null class the run trained
    pipeline = load_pipeline(str(out))
    images = pipeline(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
