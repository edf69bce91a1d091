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

from trainer_utils import TINY_RUN, failure_output, train_in_process


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


def _absolute_paths_in(folder, needles):
    """(file, needle) for every file of the output folder containing a needle: what may be pushed, and
    the checkpoints too (never pushed, but an output folder is copied and shared as a whole)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files, f"nothing in {folder}"
    return [(name, needle) for name in files for needle in needles if needle.encode() in (folder / name).read_bytes()]


def _machine_paths(tmp_path):
    """The absolute paths of this machine a published file must not contain."""
    needles = {str(tmp_path), str(tmp_path.parent.parent), os.getcwd()}  # pytest's base temp folder too
    home = os.path.expanduser("~")
    if len(home) > 1:
        needles.add(home)
    return needles


def _control_difference(folder):
    """Largest pixel difference between samples under a white and a black control image (same seed)."""
    from diffusers_ant.models import load_pipeline

    pipeline = load_pipeline(str(folder))
    pipeline.set_progress_bar_config(disable=True)
    outputs = []
    for colour in ("white", "black"):
        outputs.append(pipeline("a handwritten digit 3", image=Image.new("RGB", (16, 16), colour), num_inference_steps=2,
                                generator=torch.Generator().manual_seed(0), output_type="np").images)
    return float(np.abs(outputs[0] - outputs[1]).max())


@pytest.mark.slow
def test_outputs_name_no_path_of_this_machine_and_a_new_controlnet_lora_learns_its_condition(tmp_path):
    """Three runs chained as a user would: SD from scratch, then on it a ControlNet LoRA (new ControlNet)
    and a full ControlNet. Every file that can be pushed names paths relative to its folder (or not at
    all); the LoRA responds to its control image, and its checkpoints hold the trained embedding."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from safetensors.torch import load_file

    from diffusers_ant.models import load_pipeline
    from trainer_utils import assert_same_tensors, load_safetensors_dir

    common = ["--dataset_name", "mnist5k_captions", *TINY_RUN, "--cache_dir", str(tmp_path / "cache"),
              "--report_to", "tensorboard"]  # TensorBoard writes the run's configuration into logs/
    sd = tmp_path / "sd"
    train_in_process(["--model_type", "sd", "--output_dir", str(sd), *common, "--max_train_steps", "1",
                      "--validation_prompt", "a digit"])

    # ControlNet LoRA on a new ControlNet (from_unet of the SD UNet): conv_out of its conditioning
    # embedding starts at zero and is no LoRA target; without training the embedding in full, a white
    # and a black control image gave outputs differing by exactly 0.
    lora = tmp_path / "cn-lora"
    lora_args = ["--model_type", "controlnet", "--pretrained_model_name_or_path", str(sd), "--rank", "4",
                 "--output_dir", str(lora), *common, "--learning_rate", "2e-2", "--max_train_steps", "4",
                 "--checkpointing_steps", "2"]
    train_in_process(lora_args)
    assert (lora / "controlnet_cond_embedding.safetensors").is_file()
    # the base: the untrained ControlNet in base_model/, which names the SD pipeline (not a copy of it)
    assert json.loads((lora / "ant_lora.json").read_text())["base_model"] == "base_model"
    assert json.loads((lora / "base_model" / "ant_controlnet.json").read_text())["base_model"] == "../../sd"
    assert not (lora / "base_model" / "base_model").exists()
    assert _control_difference(lora) > 1e-3, "the ControlNet LoRA ignores its control image"
    # the embedding is trainable state: checkpoint-2 holds it as a 2-step run ends with it
    two_steps = tmp_path / "cn-lora-2"
    train_in_process([*lora_args[:lora_args.index("--output_dir")], "--output_dir", str(two_steps),
                      *common, "--learning_rate", "2e-2", "--max_train_steps", "2"])
    trained = load_file(two_steps / "controlnet_cond_embedding.safetensors")
    checkpointed = {key.split("controlnet_cond_embedding.", 1)[1]: value
                    for key, value in load_safetensors_dir(lora / "checkpoint-2").items()
                    if "controlnet_cond_embedding." in key}
    assert sorted(checkpointed) == sorted(trained)
    assert_same_tensors(checkpointed, trained)

    # a full ControlNet: saved alone at the root, the diffusers way, its base named relative to it
    control_image = tmp_path / "control.png"
    Image.new("RGB", (16, 16), "white").save(control_image)
    full = tmp_path / "cn-full"
    train_in_process(["--model_type", "controlnet", "--pretrained_model_name_or_path", str(sd), "--output_dir", str(full),
                      *common, "--max_train_steps", "1", "--validation_image", str(control_image)])
    ControlNetModel.from_pretrained(str(full))
    assert json.loads((full / "ant_controlnet.json").read_text())["base_model"] == "../sd"
    assert type(load_pipeline(str(full))) is StableDiffusionControlNetPipeline
    config = json.loads((full / "training_config.json").read_text())
    assert config["output_dir"] == "." and config["pretrained_model_name_or_path"] == "../sd"
    assert config["validation_image"] == ["../control.png"] and config["cache_dir"] == "../cache"
    assert list((full / "logs").rglob("*")), "TensorBoard wrote nothing"

    for folder in (sd, lora, full):
        assert _absolute_paths_in(folder, _machine_paths(tmp_path)) == []


def test_a_full_save_over_an_earlier_lora_output_loads_as_the_full_model(tmp_path):
    """A LoRA run, then a full fine-tune, saved into one --output_dir: `load_pipeline` read the earlier
    run's ant_lora.json first and returned the old LoRA on its base. The full save now removes the earlier
    output's records, and the folder loads as the model just saved."""
    from diffusers_ant.models import get_model_adapter, load_pipeline

    torch.manual_seed(0)
    base = tmp_path / "base"
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1).save(str(base))
    out = tmp_path / "out"
    lora = get_model_adapter("unet").load(pretrained_model_name_or_path=str(base))
    lora.add_lora(4)
    lora.save(str(out), lora=True)
    assert (out / "ant_lora.json").is_file()
    full = get_model_adapter("unet").load(pretrained_model_name_or_path=str(base))
    with torch.no_grad():
        for p in full.model.parameters():
            p.add_(0.1)  # "trained": differs from the base everywhere
    # an earlier DeMe run's projections and ensemble record, which load_pipeline would attach on top
    for name in ("channel_projection.json", "channel_projection.safetensors", "deme_ensemble.json"):
        (out / name).write_text("{}")
    full.save(str(out))
    for name in ("ant_lora.json", "channel_projection.json", "channel_projection.safetensors", "deme_ensemble.json"):
        assert not (out / name).exists(), name
    loaded = load_pipeline(str(out)).unet
    for name, value in full.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


_REVISION_SCRIPT = r"""
import json, sys, torch
from diffusers_ant.hub import write_model_card
from diffusers_ant.models import get_model_adapter, load_pipeline
from safetensors.torch import load_file

out, v1_unet, kind = sys.argv[1], sys.argv[2], sys.argv[3]
adapter = get_model_adapter(kind).load(pretrained_model_name_or_path="someone/tiny-sd", revision="v1")
if kind == "sd":
    adapter.add_lora(2)
adapter.save(out, lora=kind == "sd")
record = json.load(open(f"{out}/{'ant_lora.json' if kind == 'sd' else 'ant_controlnet.json'}"))
pipe = load_pipeline(out)
want = load_file(v1_unet)
have = {k: v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
have = {k.replace(".base_layer", ""): v for k, v in have.items()}
same = all(torch.equal(have[k], v) for k, v in want.items())
card = write_model_card(out, model_type=kind, lora=kind == "sd", method_summary={}).read_text()
print(json.dumps({"revision": record.get("revision"), "same_as_v1": same, "card_pins": 'revision="v1"' in card}))
"""


@pytest.mark.parametrize("kind", ["sd", "controlnet"])
def test_an_output_over_a_hub_base_loads_the_revision_it_trained_on(tmp_path, kind):
    """A LoRA (or a ControlNet) trained on a Hub base at --revision v1 names the base; it recorded the id alone,
    so load_pipeline and the card's snippet loaded the repo's newest commit (`main`, other weights here). Now
    the revision is recorded, loaded and written into the snippet. The Hub is a Hugging Face cache in
    huggingface_hub's own layout with two revisions, read offline by a child process (HF_HUB_CACHE is read
    at import)."""
    import subprocess
    import sys

    from hub_server import cache_snapshot

    from diffusers_ant.models import get_model_adapter
    from trainer_utils import offline_env

    torch.manual_seed(0)
    adapter = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16)
    adapter.save(str(tmp_path / "v1"))
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(0.5)
    adapter.save(str(tmp_path / "main"))
    for revision in ("v1", "main"):
        cache_snapshot(tmp_path / "cache", "someone/tiny-sd", tmp_path / revision, revision=revision)
    result = subprocess.run([sys.executable, "-c", _REVISION_SCRIPT, str(tmp_path / "out"),
                             str(tmp_path / "v1" / "unet" / "diffusion_pytorch_model.safetensors"), kind],
                            env=offline_env(HF_HUB_CACHE=str(tmp_path / "cache")), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, failure_output(result.stderr)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"revision": "v1", "same_as_v1": True, "card_pins": True}
