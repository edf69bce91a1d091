"""Issue 16, item 3: `--cache_latents` / `--cache_text_embeddings` and `--aspect_ratio_buckets`.

The trainer runs share one tiny Stable Diffusion set-up (the `tiny` preset, 16 px, batch 2) on a folder
of non-square images written here (the offline datasets are all square): 12 images of three shapes,
with captions. Four short in-process runs, shared through module fixtures: uncached with buckets
(4 steps, checkpoint at 2), the same to 2 steps then resumed to 4, and cached (latents and text) with
buckets (4 steps, the same seed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tolerances import unit_roundoff
from trainer_utils import TINY_RUN, assert_same_tensors, load_safetensors_dir, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest.py)

# (width, height) of the images and how many of each
SHAPES = {(32, 16): 4, (16, 32): 4, (24, 24): 4}


@pytest.fixture(scope="module")
def nonsquare_folder(tmp_path_factory):
    """An imagefolder of 12 RGB images of three aspect ratios (2:1, 1:2, 1:1), captions in metadata.jsonl."""
    root = tmp_path_factory.mktemp("nonsquare")
    rng = np.random.default_rng(0)
    rows = []
    for (width, height), count in SHAPES.items():
        for i in range(count):
            name = f"{width}x{height}-{i}.png"
            # smooth gradients plus noise: the crop position changes the pixels
            ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
            pixels = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name)
            rows.append({"file_name": name, "text": f"a {'wide' if width > height else 'tall' if height > width else 'square'} picture {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _dataset(folder):
    from diffusers_ant.data import load_training_dataset, resolve_columns

    dataset = load_training_dataset(train_data_dir=str(folder))
    return dataset, resolve_columns(dataset, need_captions=True)


# --------------------------------------------------------------------------- buckets: the list, the assignment


def test_bucket_list_has_equal_areas_and_allowed_sides():
    from diffusers_ant.data.buckets import bucket_sizes

    buckets = bucket_sizes(64, 8)
    assert (64, 64) in buckets
    for width, height in buckets:
        assert width % 8 == 0 and height % 8 == 0
        assert width * height <= 64 * 64
        # about resolution^2 pixels: one more strip of 8 along the longer side would pass it
        assert width * height + 8 * max(width, height) > 64 * 64
        assert max(width, height) / min(width, height) <= 4.0
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios) and ratios[0] <= 0.25 + 1e-9 and ratios[-1] >= 4.0 - 1e-9
    assert buckets == [(h, w) for w, h in reversed(buckets)]  # symmetric: portrait and landscape alike
    with pytest.raises(ValueError, match="raise --resolution"):
        bucket_sizes(4, 8)


def test_every_image_lands_in_its_nearest_ratio_bucket_and_is_cropped_to_it(nonsquare_folder):
    from diffusers_ant.data import TrainingDataset
    from diffusers_ant.data.buckets import bucket_sizes

    dataset, columns = _dataset(nonsquare_folder)
    buckets = bucket_sizes(16, 2)
    data = TrainingDataset(dataset, columns, 16, num_channels=3, center_crop=True, buckets=buckets)
    seen = {}
    for row in range(len(data)):
        width, height = dataset[row]["image"].size
        bucket = buckets[data.row_buckets[row]]
        # brute force: no bucket has a nearer aspect ratio
        distance = [abs(math.log((w / h) / (width / height))) for w, h in buckets]
        assert abs(math.log((bucket[0] / bucket[1]) / (width / height))) == pytest.approx(min(distance))
        assert data[row]["pixel_values"].shape == (3, bucket[1], bucket[0])
        seen.setdefault((width, height), set()).add(bucket)
    # one bucket per shape, three distinct ones; the square images train at the square
    assert all(len(b) == 1 for b in seen.values()) and len({next(iter(b)) for b in seen.values()}) == 3
    assert seen[(24, 24)] == {(16, 16)} and seen[(32, 16)] == {(22, 10)} and seen[(16, 32)] == {(10, 22)}
    # the centre crop of the 2:1 image: resized to cover 22 x 10 (32 x 16 -> 22 x 11), rows 0..9 of 11
    image = dataset[0]["image"].resize((22, 11), resample=Image.Resampling.BILINEAR).crop((0, 0, 22, 10))
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    # the same uint8 pixels scaled in float32 two ways, x / 255 * 2 - 1 and x / 127.5 - 1: two roundings each
    # of values up to 2 and 1, 3u a side. Measured: 0; one pixel level is 1 / 127.5 = 8e-3, the crop one row
    # lower 0.64 away.
    assert (data[0]["pixel_values"] - expected).abs().max() <= 2 * 3 * unit_roundoff()


def test_buckets_are_assigned_from_the_headers_as_decoding_would_turn_the_images(tmp_path, monkeypatch):
    """assign_buckets decoded every image of the data set in the main process (its docstring said PIL read only
    the header); it now reads sizes from the headers, turned by their EXIF orientation as datasets' decoding
    turns the images, and equal to the decoded sizes."""
    import datasets
    from PIL import ImageFile

    from diffusers_ant.data.buckets import assign_buckets, bucket_sizes, nearest_bucket

    paths = []
    for i, (size, orientation) in enumerate([((32, 16), None), ((32, 16), 6), ((16, 32), 8), ((24, 24), None)]):
        exif = Image.Exif()
        if orientation is not None:
            exif[0x0112] = orientation
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", size, (i * 40, 0, 0)).save(path, exif=exif)
        paths.append(str(path))
    dataset = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    buckets = bucket_sizes(16, 2)
    decoded = [nearest_bucket(*dataset[i]["image"].size, buckets) for i in range(len(dataset))]
    assert [dataset[i]["image"].size for i in range(4)] == [(32, 16), (16, 32), (32, 16), (24, 24)]  # turned
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or original(self))
    assert assign_buckets(dataset, "image", buckets) == decoded and loads == []


def test_bucket_batches_are_single_bucket_seeded_and_sharded_over_processes():
    from accelerate.data_loader import BatchSamplerShard

    from diffusers_ant.data.buckets import BucketBatchSampler

    row_buckets = [0] * 7 + [1] * 4 + [2] * 5  # 3 + 2 + 2 full batches of 2, incomplete ones dropped
    sampler = BucketBatchSampler(row_buckets, 2, seed=3)
    assert len(sampler) == 7
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 7 and all(len(b) == 2 for b in batches)
        assert all(len({row_buckets[i] for i in b}) == 1 for b in batches)
        assert len({i for b in batches for i in b}) == 14  # no row twice
        epochs.append(batches)
    assert len({str(e) for e in epochs}) == 3  # three epochs, three orders
    again = BucketBatchSampler(row_buckets, 2, seed=3)
    again.set_epoch(1)
    assert list(again) == epochs[1]  # a pure function of (seed, epoch): what a resumed run relies on
    # two processes (Accelerate's shard of the batch sampler): whole single-bucket batches, disjoint
    sampler.set_epoch(0)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=p, even_batches=False)) for p in (0, 1)]
    # (drop_last: the seventh batch, which one process alone would get, is dropped as for any batch sampler)
    assert shards[0] == epochs[0][0:6:2] and shards[1] == epochs[0][1:6:2]
    with pytest.raises(ValueError, match="lower --train_batch_size"):
        BucketBatchSampler([0, 1, 2], 2)
    # gradient accumulation 2 on 2 processes: runs of 4 batches of one bucket, so that each process's
    # window of 2 micro-batches (batches p, p + 2 of a run) is one bucket, whose tensors concatenate
    grouped = BucketBatchSampler([0] * 9 + [1] * 8 + [2] * 3, 2, seed=3, group_size=4)
    assert len(grouped) == 8  # one run in buckets 0 and 1, none in bucket 2
    grouped_buckets = [0] * 9 + [1] * 8 + [2] * 3
    for p in (0, 1):
        shard = list(BatchSamplerShard(grouped, num_processes=2, process_index=p))
        assert len(shard) == 4
        for window in (shard[0:2], shard[2:4]):
            assert len({grouped_buckets[i] for batch in window for i in batch}) == 1


# --------------------------------------------------------------------------- refusals


def test_pixel_models_and_freezing_combinations_are_refused_in_one_line(tmp_path):
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training.caching import check_adapter_support

    base = ["--dataset_name", "mnist5k_captions", "--output_dir", str(tmp_path)]
    refused = {
        ("--model_type", "unet", "--aspect_ratio_buckets"): "--aspect_ratio_buckets is for latent models",
        ("--model_type", "sd", "--cache_text_embeddings", "--train_text_encoder", "--rank", "4",
         "--pretrained_model_name_or_path", str(tmp_path)): "--train_text_encoder trains it",
        ("--model_type", "sd", "--cache_latents", "--random_flip", "--center_crop"): "drop --random_flip",
        ("--model_type", "sd", "--cache_latents"): "add --center_crop",
        ("--model_type", "dit", "--cache_text_embeddings"): "has no text encoder",
        ("--model_type", "sd", "--training_cache_dir", "scratch"): "add one of them, or drop --training_cache_dir",
        ("--model_type", "sd", "--cache_text_embeddings", "--training_cache_dir", __file__): "is a file: give a folder",
        ("--model_type", "sd", "--aspect_ratio_buckets", "--knowledge_bank", str(tmp_path),
         "--pretrained_model_name_or_path", str(tmp_path)): "use --retention kd",
    }
    for flags, message in refused.items():
        with pytest.raises(UsageError, match=message) as err:
            parse_args([*base, *flags])
        assert "\n" not in str(err.value)
    # a pixel-space DiT is known once loaded
    args = parse_args([*base, "--model_type", "dit", "--aspect_ratio_buckets"])
    pixel_dit = get_model_adapter("dit").load(model_config_name_or_path="tiny", resolution=16, num_channels=1)
    with pytest.raises(ValueError, match="is for latent models: this dit model trains pixels") as err:
        check_adapter_support(args, pixel_dit)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the adapter seam


def test_cached_moments_and_text_give_the_adapters_exactly_what_encoding_gives():
    """latent DiT and ControlNet (the seam every type inherits): a batch carrying the VAE posterior and
    the cached text entries is encoded into the same latents (same generator) and conditioning."""
    from diffusers_ant.models import get_model_adapter

    torch.manual_seed(0)
    dit = get_model_adapter("dit").load(model_config_name_or_path="tiny-latent", resolution=16, num_channels=3,
                                      num_classes=3)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2])
    direct = dit.encode_batch({"pixel_values": pixels, "class_labels": labels}, generator=torch.Generator().manual_seed(5))
    cached = dit.encode_batch({"latent_moments": dit.encode_moments(pixels), "class_labels": labels},
                              generator=torch.Generator().manual_seed(5))
    assert torch.equal(direct[0], cached[0]) and torch.equal(direct[1]["class_labels"], cached[1]["class_labels"])
    assert direct[0].std() > 0.1  # real latents, not zeros

    control = get_model_adapter("controlnet").load(model_config_name_or_path="tiny", resolution=16)
    ids = control.tokenize(["a digit", ""])
    image = torch.rand(2, 3, 16, 16)
    encoded = control.encode_batch({"pixel_values": pixels[:2], "input_ids": ids, "conditioning_pixel_values": image},
                                   generator=torch.Generator().manual_seed(1))
    text = control.encode_text({"input_ids": ids})
    batch = {"latent_moments": control.encode_moments(pixels[:2]), "conditioning_pixel_values": image,
             **{f"cached_text/{k}": v for k, v in text.items()}}
    freed = control.free_text_encoders()
    assert control.text_encoder is None and list(freed) == ["text_encoder"]
    from_cache = control.encode_batch(batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(encoded[0], from_cache[0])
    assert sorted(from_cache[1]) == ["controlnet_cond", "encoder_hidden_states"]
    assert torch.equal(encoded[1]["encoder_hidden_states"], from_cache[1]["encoder_hidden_states"])
    assert torch.equal(encoded[1]["controlnet_cond"], from_cache[1]["controlnet_cond"])
    # a type whose encode_batch bypasses the hooks (reads pixels itself) is refused in one line at set-up
    import types

    from diffusers_ant.training.caching import probe_cached_batch

    row = {k: v[0] for k, v in batch.items()}
    probe_cached_batch(types.SimpleNamespace(cache_latents=True, cache_text_embeddings=True, model_type="controlnet"),
                       control, [row])
    control.encode_batch = lambda batch, **kwargs: control.encode_pixels(batch["pixel_values"])
    with pytest.raises(ValueError, match="encodes batches without the cache hooks .*; drop --cache_latents") as err:
        probe_cached_batch(types.SimpleNamespace(cache_latents=True, cache_text_embeddings=False, model_type="x"),
                           control, [row])
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- trainer runs


def _run_args(folder, out, steps, *extra):
    args = ["--model_type", "sd", "--train_data_dir", str(folder), "--output_dir", str(out), *TINY_RUN,
            "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--checkpointing_steps", "2", "--num_validation_images", "1", "--aspect_ratio_buckets",
            "--proportion_empty_prompts", "0.3", *extra]
    args[args.index("--max_train_samples") + 1] = "12"
    args[args.index("--num_clusters") + 1] = "1"  # the interval DP is not what is tested here
    return args


class _Recorder:
    """Records every step's loss and the adapter once the encoders are freed (monkeypatched into the loop)."""

    def __init__(self, monkeypatch):
        import diffusers_ant.training.caching as caching
        import diffusers_ant.training.loop as loop

        self.losses, self.shapes, self.adapter, self.cache = [], [], None, None
        original_step, original_free, original_build = loop.training_step, caching.free_encoders, caching.build_training_cache

        def step(accelerator, objective, model, window, *args, **kwargs):
            self.shapes.append(tuple(objective.prepare(window, torch.Generator().manual_seed(0))["x_t"].shape))
            logs = original_step(accelerator, objective, model, window, *args, **kwargs)
            self.losses.append(logs["loss"].item())
            return logs

        def free(args, accelerator, adapter):
            freed = original_free(args, accelerator, adapter)
            self.adapter, self.freed = adapter, freed
            self.freed_devices = {p.device.type for _, _, m in freed._modules() for p in m.parameters()}
            return freed

        def build(*args, **kwargs):
            self.cache = original_build(*args, **kwargs)
            # what the cache holds, read back from its files now (training ends by deleting them)
            self.cached_latents = list(self.cache.latents or [])
            self.cached_captions = {c: self.cache.text[c] for c in self.cache.text} if self.cache.text else {}
            self.cache_files = sorted(p for store in self.cache.stores for p in os.listdir(store.directory))
            self.cache_folders = [store.directory for store in self.cache.stores]
            return self.cache

        monkeypatch.setattr(loop, "training_step", step)
        monkeypatch.setattr(caching, "free_encoders", free)
        monkeypatch.setattr(caching, "build_training_cache", build)


def _encode_row_by_row(monkeypatch, family):
    """Make the VAE and text encoders of model type `family` encode every row of a batch on its own (used by
    this file's SD runs and the family matrix's bucket runs). A cached run encodes
    its images and captions in batches of another composition than the training batches an uncached run
    encodes (grouped by bucket, in dataset order), and a matrix product's rounding may depend on how many
    rows it multiplies; row by row, the encodings are the same bits in both runs, so their losses must be
    equal exactly, and any difference is the cache's own."""
    from diffusers_ant.models import get_model_adapter

    adapter_class = get_model_adapter(family)
    encode_moments, encode_text = adapter_class.encode_moments, adapter_class.encode_text
    batch_sizes = []  # of every call: returned, so that a test can see the patch was in the runs' way

    def moments_row_by_row(self, pixel_values, chunk_size=None):
        batch_sizes.append(pixel_values.shape[0])
        rows = torch.cat([encode_moments(self, pixel_values[i:i + 1], chunk_size=chunk_size)
                          for i in range(pixel_values.shape[0])])
        # in the memory layout of the whole batch's moments (the VAE's CPU convolutions return channels-last
        # ones for several images, contiguous ones for one): making the layouts of encoded and cached moments
        # alike is `latents_from_moments`'s work, which this keeps under test
        return torch.empty_like(encode_moments(self, pixel_values, chunk_size=chunk_size)).copy_(rows)

    def text_row_by_row(self, batch):
        size = len(next(iter(batch.values())))
        batch_sizes.append(size)
        rows = [encode_text(self, {key: value[i:i + 1] for key, value in batch.items()}) for i in range(size)]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    monkeypatch.setattr(adapter_class, "encode_moments", moments_row_by_row)
    monkeypatch.setattr(adapter_class, "encode_text", text_row_by_row)
    return batch_sizes


@pytest.fixture(scope="module")
def runs(nonsquare_folder, tmp_path_factory):
    """Three runs, with their records: uncached 4 steps (checkpoint at 2); its checkpoint-2 resumed to 4 in
    another folder (the first half of "2N == N + resume + N" is the same seeded run, so it is run once);
    cached (latents and text) 4 steps."""
    import shutil

    root = tmp_path_factory.mktemp("runs")
    out = {"root": root}
    with pytest.MonkeyPatch.context() as encoders:  # (both runs' encoders take one row at a time)
        batch_sizes = _encode_row_by_row(encoders, "sd")
        with pytest.MonkeyPatch.context() as monkeypatch:
            out["straight"] = _Recorder(monkeypatch)
            train_in_process(_run_args(nonsquare_folder, root / "straight", 4))
        out["straight"].encoded_batch_sizes = list(batch_sizes)
        shutil.copytree(root / "straight" / "checkpoint-2", root / "resumed" / "checkpoint-2")
        with pytest.MonkeyPatch.context() as monkeypatch:
            out["resumed"] = _Recorder(monkeypatch)
            train_in_process(_run_args(nonsquare_folder, root / "resumed", 4, "--resume_from_checkpoint", "checkpoint-2"))
        with pytest.MonkeyPatch.context() as monkeypatch:
            out["cached"] = _Recorder(monkeypatch)
            # what a killed 4-process run of this output folder left in its cache folder: no process of this 1-process
            # run rewrites it; and another run's cache in the same scratch folder, which this run must leave alone
            from types import SimpleNamespace

            from diffusers_ant.training.caching import training_cache_root

            ours = training_cache_root(SimpleNamespace(output_dir=str(root / "cached"), training_cache_dir=str(root / "scratch")))
            (Path(ours) / ".training_cache_3").mkdir(parents=True)
            theirs = training_cache_root(SimpleNamespace(output_dir=str(root / "other"), training_cache_dir=str(root / "scratch")))
            (Path(theirs) / ".training_cache_1").mkdir(parents=True)
            out["cache_folder"], out["other_cache_folder"] = ours, theirs
            before = len(batch_sizes)
            train_in_process(_run_args(nonsquare_folder, root / "cached", 4, "--cache_latents", "--cache_text_embeddings",
                                       "--checkpointing_steps", "100", "--training_cache_dir", str(root / "scratch")))
            out["cached"].encoded_batch_sizes = batch_sizes[before:]
    return out


def _unet(folder):
    return {k: v for k, v in load_safetensors_dir(folder / "unet").items()}


def test_bucketed_training_uses_single_bucket_batches_of_several_shapes_and_resumes_exactly(runs):
    root = runs["root"]
    shapes = runs["straight"].shapes
    # batch 2, latents of the bucket's shape (VAE factor 2): one bucket per batch, not all square
    assert len(shapes) == 4 and all(s[0] == 2 and s[2:] in {(8, 8), (5, 11), (11, 5)} for s in shapes)
    assert len(set(shapes)) > 1
    # 20 == 10 + resume + 10 at this scale: 4 == 2 + resume + 2 (6 batches an epoch: mid-epoch), and the
    # checkpoint at step 2 of both runs is the same
    assert runs["resumed"].losses == runs["straight"].losses[2:]
    assert runs["resumed"].shapes == shapes[2:]
    assert_same_tensors(_unet(root / "straight"), _unet(root / "resumed"))
    assert_same_tensors(load_safetensors_dir(root / "straight" / "checkpoint-4"),
                        load_safetensors_dir(root / "resumed" / "checkpoint-4"))


def test_cached_run_has_the_losses_of_the_uncached_one_and_frees_the_encoders(runs):
    """Same seed: the same samples, captions (with dropout to the cached empty prompt), latent draws,
    timesteps and noise, and the same losses and weights to the bit.

    Why equality and not a tolerance: what the cache changes is only how the encoders are batched. The cache
    encodes each bucket's rows in chunks of the batch size and the captions in chunks of 2, where an
    uncached step encodes the step's own pair, and a matrix product's rounding may depend on the rows beside
    a row (measured on one machine, it did not; nothing guarantees it). So both runs' encoders take one row
    at a time (`_encode_row_by_row`), and the posterior moments and text embeddings the two runs feed a step
    are the same bits by construction. What differed once was their memory layout: the VAE's CPU
    convolutions return channels-last moments for a batch, the cached rows are collated NCHW, and the UNet's
    convolutions then ran another kernel on equal values: outputs 1e-6..2e-5 apart from step 1 on, and 8%
    of the weights different after step 2 (Adam's m / sqrt(v) keeps the rounding). `latents_from_moments`
    now returns NCHW whatever the encoder's layout: from equal inputs every operation of the step is then
    the same operation on the same bits, and any difference is a real one (another draw, caption or crop)."""
    straight, cached = runs["straight"], runs["cached"]
    assert len(cached.losses) == 4 and min(cached.losses) > 0
    # in both runs batches of two reached the encoders, which took them row by row
    assert max(straight.encoded_batch_sizes) == 2 and max(cached.encoded_batch_sizes) == 2
    assert cached.losses == straight.losses
    assert_same_tensors(_unet(runs["root"] / "cached"), _unet(runs["root"] / "straight"))
    assert cached.shapes == straight.shapes
    # the encoders are gone from the adapter; the VAE decoder stayed for validation
    adapter = cached.adapter
    assert adapter.text_encoder is None and adapter.vae.encoder is None and adapter.vae.quant_conv is None
    assert adapter.vae.decoder is not None
    # their weights were stashed (this run writes the whole pipeline) and the modules hold no memory
    assert sorted(cached.freed.text) == ["text_encoder"] and sorted(cached.freed.vae) == ["encoder", "quant_conv"]
    assert cached.freed_devices == {"meta"}
    latents, captions = cached.cached_latents, cached.cached_captions
    assert len(latents) == 12 and "" in captions and len(captions) == 13  # 12 captions + the empty one
    assert {tuple(m.shape[1:]) for m in latents} == {(8, 8), (5, 11), (11, 5)}
    assert latents[0].shape[0] == 2 * adapter.vae.config.latent_channels  # mean and log-variance
    # kept on disk while training (one safetensors shard at this size), in no list or dict of tensors; the files
    # are deleted when training ends
    from diffusers_ant.training.caching import StoredCaptions, StoredRows

    assert isinstance(cached.cache.latents, StoredRows) and isinstance(cached.cache.text, StoredCaptions)
    assert cached.cache_files == ["owner", "shard-00000.safetensors"]
    # in this run's own folder under --training_cache_dir, not in the output folder; gone at the end, with the folder
    # of the process index this run lacks and the run's folder itself; another run's cache there left alone
    scratch = runs["root"] / "scratch"
    assert cached.cache_folders == [os.path.join(runs["cache_folder"], ".training_cache_0")]
    assert os.path.dirname(runs["cache_folder"]) == str(scratch) and os.path.basename(runs["cache_folder"]).startswith("cached-")
    saved = runs["root"] / "cached"
    assert not list(saved.glob(".training_cache_*")) and not os.path.exists(runs["cache_folder"])
    assert [p.name for p in scratch.iterdir()] == [os.path.basename(runs["other_cache_folder"])]
    assert (Path(runs["other_cache_folder"]) / ".training_cache_1").is_dir()
    # the whole pipeline written at the end has its encoders back (stashed, restored while saving)
    assert not (saved / ".freed_encoders").exists()
    assert_same_tensors({k: v for k, v in load_safetensors_dir(saved).items() if k.startswith(("vae/", "text_encoder/"))},
                        {k: v for k, v in load_safetensors_dir(runs["root"] / "straight").items()
                         if k.startswith(("vae/", "text_encoder/"))})
    assert (saved / "samples").is_dir()  # validation sampled from the prompts encoded before the encoders went


def test_cached_text_follows_the_per_epoch_caption_draw_and_dropout():
    """Rows with several captions and caption dropout: the cache holds every caption and the empty prompt,
    and each row serves the entry of the caption drawn for its (seed, epoch, row), as uncached rows do."""
    import datasets

    from diffusers_ant.data import TrainingDataset
    from diffusers_ant.training.caching import TrainingCache

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))})
    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 3,
                                        "text": [["a red one", "a blue one"], ["c"], ["d", "e"]]}, features=features)
    columns = {"image_column": "image", "caption_column": "text"}
    data = TrainingDataset(table, columns, 8, center_crop=True, proportion_empty_prompts=0.4, seed=1)
    variants = data.caption_variants()
    assert variants == ["", "a blue one", "a red one", "c", "d", "e"]
    data.cache = TrainingCache(text={c: {"encoder_hidden_states": torch.full((2,), float(i))} for i, c in enumerate(variants)})
    uncached = TrainingDataset(table, columns, 8, center_crop=True, proportion_empty_prompts=0.4, seed=1)
    served = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        uncached.set_epoch(epoch)
        for row in range(3):
            caption = uncached[row]["captions"]  # no tokenizer: the drawn caption itself
            entry = data[row]["cached_text/encoder_hidden_states"]
            assert torch.equal(entry, torch.full((2,), float(variants.index(caption))))
            served.add(caption)
    assert "" in served and "a red one" in served and "a blue one" in served  # dropout and both captions drawn


def test_the_default_bucket_step_is_kohyas_64_pixels_so_varied_ratios_fill_their_buckets():
    """A step of one latent patch (8 or 16 pixels) made 257 buckets at 1024: 1,000 images of ratios spread
    from 1:2 to 2:1 (107 buckets) left 224 out of every epoch at batch 4 on 2 processes, and no bucket held a
    run of batches for 4 processes (refused). kohya's 64-pixel step (its `--bucket_reso_steps` default; 13
    buckets here) leaves out only the runs each bucket's last images fall short of."""
    import math
    import types

    from diffusers_ant.data.buckets import BucketBatchSampler, bucket_sizes, default_bucket_step, nearest_bucket
    from diffusers_ant.training.args import UsageError
    from diffusers_ant.training import parse_args
    from diffusers_ant.training.loop import bucket_step

    assert [default_bucket_step(r, m) for r, m in ((1024, 8), (1024, 16), (512, 8), (256, 8), (16, 8))] == [64, 64, 64, 32, 8]
    assert len(bucket_sizes(1024, 8)) == 257 and len(bucket_sizes(1024, 64)) == 33

    ratios = [math.exp(math.log(0.5) + math.log(4.0) * i / 999) for i in range(1000)]

    def left_out(step, processes):
        buckets = bucket_sizes(1024, step)
        rows = [nearest_bucket(round(1024 * r), 1024, buckets) for r in ratios]
        sampler = BucketBatchSampler(rows, batch_size=4, group_size=processes)
        return len(rows) - len({row for batch in sampler for row in batch})

    assert left_out(8, 2) == 224 and left_out(64, 2) == 32 and left_out(64, 4) == 88
    with pytest.raises(ValueError, match="no aspect-ratio bucket holds 16 images"):
        left_out(8, 4)
    # the trainer: the default for the model's resolution, a given step checked against its latent patch
    adapter = types.SimpleNamespace(latent=True, sample_size=128, vae=None, vae_scale_factor=lambda vae: 8,
                                    pixel_multiple=16)
    assert bucket_step(types.SimpleNamespace(bucket_step=None), adapter) == 64
    assert bucket_step(types.SimpleNamespace(bucket_step=32), adapter) == 32
    with pytest.raises(ValueError, match="--bucket_step 24 must be a positive multiple of 16 pixels"):
        bucket_step(types.SimpleNamespace(bucket_step=24), adapter)
    with pytest.raises(UsageError, match="add --aspect_ratio_buckets"):
        parse_args(["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--bucket_step", "64"])
    # a step no model takes is refused with the arguments, before the model is loaded
    for step, message in (("0", "must be a positive number of pixels"), ("-8", "must be a positive number of pixels"),
                          ("1024", "larger than --resolution 512")):
        with pytest.raises(UsageError, match=message):
            parse_args(["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--aspect_ratio_buckets",
                        "--resolution", "512", "--bucket_step", step])
    # a bucketed checkpoint written before the flag existed resumes on its own buckets (one latent patch)
    from diffusers_ant.training.loop import adopt_recorded_defaults

    def bucketed(*extra):
        return parse_args(["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--aspect_ratio_buckets", *extra])

    old = bucketed()
    assert adopt_recorded_defaults(old, {"aspect_ratio_buckets": True}) and bucket_step(old, adapter) == 16
    recorded = bucketed()
    assert not adopt_recorded_defaults(recorded, {"aspect_ratio_buckets": True, "bucket_step": None})
    assert bucket_step(recorded, adapter) == 64
    given = bucketed("--bucket_step", "128")
    assert not adopt_recorded_defaults(given, {"aspect_ratio_buckets": True}) and bucket_step(given, adapter) == 128


def test_cached_text_is_kept_in_the_narrowest_dtype_that_holds_it_exactly():
    """The families' encoders return float32 of what a bf16 / fp16 text encoder computed: kept in that half type
    (half the memory: a FLUX.1 caption is 512 x 4096 values), returned as float32 with the same bits; values
    that need float32 stay float32."""
    from types import SimpleNamespace

    from diffusers_ant.training.caching import TrainingCache, cache_text

    g = torch.Generator().manual_seed(0)
    from_bf16 = torch.randn(3, 4, 8, generator=g).to(torch.bfloat16).float()
    full = torch.randn(3, 4, 8, generator=g, dtype=torch.float64).float()
    captions = ["", "a cat", "seven"]
    adapter = SimpleNamespace(encode_text=lambda batch: {
        "prompt_embeds": from_bf16[[captions.index(c) for c in batch["captions"]]],
        "pooled": full[[captions.index(c) for c in batch["captions"]]]})
    dataset = SimpleNamespace(caption_variants=lambda: list(captions), text_fields=lambda c: {"captions": c})
    cache = TrainingCache(**cache_text(adapter, dataset, batch_size=2, disable_progress=True))
    assert {k: v.dtype for k, v in cache.text["a cat"].items()} == {"prompt_embeds": torch.bfloat16, "pooled": torch.float32}
    for i, caption in enumerate(captions):
        fields = cache.text_fields(caption)
        assert torch.equal(fields["cached_text/prompt_embeds"], from_bf16[i])
        assert fields["cached_text/prompt_embeds"].dtype == torch.float32
        assert torch.equal(fields["cached_text/pooled"], full[i])
    assert cache.nbytes() == 3 * (4 * 8 * 2 + 4 * 8 * 4)
