"""evaluate_model.py and diffusers_ant.analysis.evaluate: sampling, real images, metrics, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_ant.analysis.evaluate import (
    evaluate_pipeline,
    format_results,
    real_image_indices,
    real_images,
    resolve_feature_extractor,
    sample_images,
    sampling_pipeline,
)
from diffusers_ant.models import get_model_adapter, load_pipeline
from trainer_utils import REPO, offline_env

SCRIPT = os.path.join(REPO, "train_scripts", "evaluate_model.py")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny 8x8 greyscale UNet pipeline folder, and a feature-extractor cache shared by the tests."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1)
    adapter.save(str(root / "model"))
    return {"model": str(root / "model"), "cache": str(root / "cache")}


def test_evaluate_model_end_to_end(saved, tmp_path):
    out, samples = tmp_path / "metrics.json", tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--model", saved["model"], "--dataset_name", "digits", "--num_samples", "12",
         "--num_inference_steps", "3", "--batch_size", "5", "--kid_subsets", "3", "--output", str(out),
         "--save_samples", str(samples), "--num_threads", "1"],
        env=offline_env(DIFFUSERS_ANT_CACHE=saved["cache"]), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"fid", "kid_mean", "kid_std", "precision", "recall"} <= set(data)
    assert data["num_fake"] == 12 and data["num_real"] == 12 and data["feature_extractor"] == "domain_digits"
    assert data["fid"] > 0 and 0 <= data["precision"] <= 1 and 0 <= data["recall"] <= 1
    assert data["scheduler"] == "ddim" and data["num_inference_steps"] == 3 and data["resolution"] == 8
    assert len(list(samples.glob("sample_*.png"))) == 12
    assert "FID (domain, digits)" in proc.stdout and "precision" in proc.stdout
    assert "sampling" in proc.stderr  # the tqdm progress bar
    # the hash of the extractor's weights is recorded with the result (and printed)
    from diffusers_ant.metrics import DomainFeatureExtractor

    sha = DomainFeatureExtractor("digits", cache_dir=os.path.join(saved["cache"], "feature_extractors")).weights_sha256()
    assert data["feature_extractor_sha256"] == sha and sha[:16] in proc.stdout


def test_evaluate_pipeline_is_seeded_and_reports_domain_fid(saved, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ANT_CACHE", saved["cache"])
    pipeline = load_pipeline(saved["model"])
    options = {"num_samples": 8, "num_inference_steps": 2, "batch_size": 3, "kid_subsets": 2, "progress": False}
    first = evaluate_pipeline(pipeline, "digits", seed=1, **options)
    again = evaluate_pipeline(pipeline, "digits", seed=1, **options)
    other = evaluate_pipeline(pipeline, "digits", seed=2, **options)
    assert first["fid"] == again["fid"] and first["fid"] != other["fid"]
    assert "FID (domain, digits)" in format_results(first)


def test_real_images_and_the_extractor_are_ready_before_any_sample_is_drawn(saved, tmp_path, monkeypatch):
    """A missing Inception weights file (or real-image set: `reference_for` builds both) failed after every
    sample had been drawn and saved: 1,000 by default."""
    from diffusers_ant.analysis import evaluate

    monkeypatch.setenv("DIFFUSERS_ANT_CACHE", saved["cache"])
    drawn = []
    monkeypatch.setattr(evaluate, "sample_images", lambda *args, **kwargs: drawn.append(args))
    pipeline = load_pipeline(saved["model"])
    with pytest.raises(ValueError, match="Inception weights file not found"):
        evaluate_pipeline(pipeline, "digits", feature_extractor="inception", num_samples=4,
                          inception_weights=str(tmp_path / "none.safetensors"), save_samples=str(tmp_path / "samples"))
    assert drawn == [] and not (tmp_path / "samples").exists()


@pytest.mark.parametrize("script", ["evaluate_model", "analyze", "merge_deme"])
def test_a_bad_invocation_is_one_line_in_a_fresh_process(script):
    """The scripts imported diffusers (through the evaluation module) before parsing: bitsandbytes' two
    messages came first on stderr, even for --help, so no error of theirs was one line."""
    argv = {"evaluate_model": ["--model", "m", "--dataset_name", "digits", "--feature_extractor", "clip"],
            "analyze": ["ntg", "--base", "b", "--interval_models", "m", "--dataset_name", "digits",
                        "--feature_extractor", "clip", "--output", "x.json"],
            "merge_deme": ["--base", "b", "--finetuned", "m", "--output_dir", "o", "--search", "coordinate",
                           "--dataset_name", "digits", "--feature_extractor", "clip"]}[script]
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(SCRIPT), f"{script}.py"), *argv],
                          env=offline_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--feature_extractor" in lines[0], proc.stderr


def test_sampling_batches_and_schedulers(saved):
    from diffusers import DDIMPipeline, DDPMPipeline

    pipeline = load_pipeline(saved["model"])
    assert isinstance(sampling_pipeline(pipeline, scheduler="ddim"), DDIMPipeline)
    assert isinstance(sampling_pipeline(pipeline, scheduler="ddpm"), DDPMPipeline)
    with pytest.raises(ValueError, match="unknown scheduler"):
        sampling_pipeline(pipeline, scheduler="fastest")
    options = {"scheduler": "ddim", "num_inference_steps": 2, "progress": False}
    images = sample_images(pipeline, 5, batch_size=2, seed=3, **options)  # batches of 2, 2 and 1
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1
    assert np.array_equal(images, sample_images(pipeline, 5, batch_size=2, seed=3, **options))  # seeded
    assert not np.allclose(images, sample_images(pipeline, 5, batch_size=2, seed=4, **options))
    assert not np.allclose(images[0], images[1])  # each image its own noise


def test_real_images_are_a_seeded_shuffle_across_classes():
    from diffusers_ant.data import load_training_dataset

    labels = np.asarray(load_training_dataset("digits")["label"])
    indices = real_image_indices(len(labels), 40, seed=0)
    assert len(set(indices)) == 40 and len(set(labels[indices].tolist())) >= 8  # not the first rows of one class
    assert real_image_indices(len(labels), 40, seed=1) != indices
    images = real_images("digits", 40, resolution=8, num_channels=1, seed=0)
    assert images.shape == (40, 8, 8, 1) and 0 <= images.min() and images.max() <= 1
    assert np.array_equal(images, real_images("digits", 40, resolution=8, num_channels=1, seed=0))


def test_feature_extractor_names():
    with pytest.raises(ValueError, match="valid: domain, inception"):
        resolve_feature_extractor("clip", "digits")
    with pytest.raises(ValueError, match="--inception_weights"):
        resolve_feature_extractor("inception", "digits")
    with pytest.raises(ValueError, match="no domain feature extractor"):
        resolve_feature_extractor("domain", "cifar10")


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--model", "/no/such/folder", "--dataset_name", "digits"], 1, "no such folder"),
        (["--model", "MODEL", "--dataset_name", "digits", "--feature_extractor", "clip"], 2, "unknown --feature_extractor"),
        (["--model", "MODEL"], 2, "--dataset_name"),
        (["--model", "MODEL", "--dataset_name", "digits", "--scheduler", "fastest", "--num_samples", "2"], 1,
         "unknown scheduler"),
        # no classifier for the user's own images: refused as a usage error (2) before loading or sampling,
        # not after every sample is drawn
        (["--model", "MODEL", "--train_data_dir", "TMP"], 2, "no domain feature extractor for --train_data_dir"),
        (["--model", "MODEL", "--dataset_name", "mnist5k_captions"], 2, "no domain feature extractor for mnist5k_captions"),
        # naming the way out that works offline too: a built-in data set's classifier
        (["--model", "MODEL", "--dataset_name", "mnist5k_captions"], 2, "--feature_extractor mnist5k|animal_mnist|digits"),
        # where the results go, checked before the sampling (it failed after it)
        (["--model", "MODEL", "--dataset_name", "digits", "--output", "MODEL"], 2, "is a folder: give a file name"),
        (["--model", "MODEL", "--dataset_name", "digits", "--save_samples", "MODEL/model_index.json"], 2,
         "is a file, not a folder"),
    ],
)
def test_bad_input_is_one_short_line(saved, extra, code, message, capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [a.replace("MODEL", saved["model"]) if a.startswith("MODEL") else {"TMP": str(tmp_path)}.get(a, a)
            for a in extra]
    try:
        result = module.main(argv + ["--no_progress"])
    except SystemExit as exit_:
        result = exit_.code
    err = capsys.readouterr().err.strip()
    assert result == code
    assert len(err.splitlines()) == 1 and err.startswith("evaluate_model.py: error:") and message in err


def test_prompts_from_caption_lists_are_their_first_caption(tmp_path):
    """A dataset whose caption cells are lists (several captions per image, as COCO): the evaluation prompts
    are each row's first caption, as training's validation prompts; `str` made them the text "['a', 'b']"."""
    from PIL import Image

    from diffusers_ant.analysis.evaluate import dataset_captions

    rows = []
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": [f"caption {i}", f"other {i}"]}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert sorted(dataset_captions(train_data_dir=str(tmp_path), num_captions=3)) == ["caption 0", "caption 1", "caption 2"]


def test_saved_samples_replace_an_earlier_set(tmp_path):
    """`--save_samples` into a folder of an earlier, larger run left 5 stale images beside the 3 new ones, which
    looked like one set; the earlier `sample_*.png` files are removed, other files kept."""
    from diffusers_ant.analysis.evaluate import save_images

    folder = tmp_path / "samples"
    save_images(np.zeros((8, 4, 4, 3)), str(folder))
    (folder / "notes.txt").write_text("mine")
    paths = save_images(np.ones((3, 4, 4, 1)), str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "sample_00000.png", "sample_00001.png",
                                                        "sample_00002.png"]
    assert [os.path.basename(p) for p in paths] == ["sample_00000.png", "sample_00001.png", "sample_00002.png"]
