"""Tests for diffusers_ant.data: built-in offline sets, loading, columns, transforms, data loader."""

import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ant.data import (
    BUILTIN_DATASETS,
    EpochRandomSampler,
    TrainingDataset,
    build_transforms,
    class_names,
    edge_map,
    load_numpy_pickle,
    load_training_dataset,
    make_toy_caption_dataset,
    make_train_dataloader,
    resolve_columns,
)

# --------------------------------------------------------------------------------------------------
# Built-in datasets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, rows, size, per_class",
    [("mnist5k", 5000, 28, 500), ("animal_mnist", 10000, 28, 1000), ("digits", 1797, 8, None)],
)
def test_builtin_dataset_shape_labels_and_pixels(name, rows, size, per_class):
    dataset = load_training_dataset(name)
    assert len(dataset) == rows
    assert dataset.column_names == ["image", "label"]
    assert dataset.features["label"].num_classes == 10
    labels = np.asarray(dataset["label"])
    assert labels.min() == 0 and labels.max() == 9
    counts = np.bincount(labels, minlength=10)
    if per_class is not None:
        assert (counts == per_class).all()
    else:
        assert counts.min() > 150  # scikit-learn's digits are roughly balanced
    stack = np.stack([np.asarray(dataset[i]["image"]) for i in range(0, rows, rows // 50)])
    image = dataset[0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (size, size)
    assert stack.dtype == np.uint8 and stack.min() == 0 and stack.max() == 255


def test_mnist5k_labels_match_the_pictures():
    # A real check of the CSV layout (pixels first, label last): a "1" has far less ink than a "0".
    dataset = load_training_dataset("mnist5k")
    labels = np.asarray(dataset["label"])
    ink = {d: np.mean([np.asarray(dataset[int(i)]["image"]).mean() for i in np.where(labels == d)[0][:50]]) for d in (0, 1)}
    assert ink[1] < 0.7 * ink[0]


def test_builtin_names_are_case_insensitive_and_fresh_objects():
    a = load_training_dataset("MNIST5K")
    b = load_training_dataset("mnist5k")
    a.set_format("numpy")  # an in-place change by one caller ...
    assert isinstance(b[0]["image"], Image.Image)  # ... does not reach the next
    assert isinstance(load_training_dataset("mnist5k")[0]["image"], Image.Image)


def test_mnist5k_captions_columns_and_content():
    dataset = load_training_dataset("mnist5k_captions")
    assert len(dataset) == 5000
    assert set(dataset.column_names) == {"image", "label", "text", "conditioning_image"}
    names = dataset.features["label"].names
    interior = 0
    for i in (0, 1, 17, 4321):
        row = dataset[i]
        assert row["text"] == f"a handwritten digit {names[row['label']]}"
        image, edges = np.asarray(row["image"]), np.asarray(row["conditioning_image"])
        assert edges.shape == image.shape
        assert edges.any() and (image[edges > 0] >= 128).all()  # outline pixels lie on the ink
        interior += (image >= 128).sum() - (edges > 0).sum()
    assert interior > 0  # an outline, not the whole stroke


def test_make_toy_caption_dataset_is_balanced_and_resized():
    dataset = make_toy_caption_dataset(20, resolution=12)
    assert len(dataset) == 20
    assert np.bincount(dataset["label"], minlength=10).tolist() == [2] * 10
    assert dataset[0]["image"].size == (12, 12) and dataset[0]["conditioning_image"].size == (12, 12)
    with pytest.raises(ValueError, match="num_samples"):
        make_toy_caption_dataset(0)


def test_edge_map_is_the_outline():
    square = np.zeros((7, 7), np.uint8)
    square[1:6, 1:6] = 255
    edges = edge_map(square)
    assert edges[1:6, 1:6].sum() == 16 * 255  # the 5x5 square's border ring
    assert edges[3, 3] == 0 and edges[0].sum() == 0


# --------------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(f"touch {marker}"))
    with pytest.raises(pickle.UnpicklingError, match="only admits numpy arrays"):
        load_numpy_pickle(payload)
    assert not marker.exists()
    # the same payload really would run through the ordinary unpickler's door
    assert b"system" in payload


def test_restricted_unpickler_reads_arrays_and_refuses_objects():
    for array in (np.arange(12, dtype=np.int64).reshape(3, 4), np.linspace(0, 1, 5, dtype=np.float32)):
        for protocol in (2, 4, 5):
            loaded = load_numpy_pickle(pickle.dumps(array, protocol=protocol))
            assert loaded.dtype == array.dtype and np.array_equal(loaded, array)
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(pickle.dumps({"not": "an array"}))


# --------------------------------------------------------------------------------------------------
# Image folders and errors
# --------------------------------------------------------------------------------------------------


def _write_image_folder(root, per_class=3, size=(20, 12)):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def test_imagefolder_loads_and_batches(tmp_path):
    _write_image_folder(tmp_path / "train")
    dataset = load_training_dataset(train_data_dir=tmp_path / "train", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 6
    columns = resolve_columns(dataset, need_classes=True)
    assert columns["image_column"] == "image" and columns["class_column"] == "label"
    assert class_names(dataset, "label") == ["cat", "dog"]
    loader = make_train_dataloader(dataset, columns, resolution=8, batch_size=3, num_channels=3, seed=1)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["pixel_values"].shape == (3, 3, 8, 8)
    labels = torch.cat([b["class_labels"] for b in batches])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # a local folder given as --dataset_name goes through datasets.load_dataset's folder inference
    by_name = load_training_dataset(str(tmp_path / "train"), cache_dir=str(tmp_path / "cache"))
    assert len(by_name) == 6 and "image" in by_name.column_names


def test_a_folder_is_one_split_whatever_its_file_names(tmp_path):
    """--train_data_dir loads every file of the folder, as diffusers' text-to-image scripts
    (data_files={"train": "<dir>/**"}): with data_dir, `datasets` guessed splits from names, so images named
    train_*.png beside a metadata.jsonl lost their captions, and a test/ subfolder became the only split."""
    import json

    rng = np.random.default_rng(0)
    named = tmp_path / "named"
    named.mkdir()
    with open(named / "metadata.jsonl", "w") as f:
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(named / f"train_{i:04d}.png")
            f.write(json.dumps({"file_name": f"train_{i:04d}.png", "text": f"digit {i}"}) + "\n")
    dataset = load_training_dataset(train_data_dir=named, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 3 and sorted(dataset["text"]) == ["digit 0", "digit 1", "digit 2"]
    assert resolve_columns(dataset, need_captions=True)["caption_column"] == "text"

    mixed = tmp_path / "mixed"
    (mixed / "test").mkdir(parents=True)
    for path in (mixed / "a.png", mixed / "b.png", mixed / "test" / "c.png"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    no_captions = load_training_dataset(train_data_dir=mixed, cache_dir=str(tmp_path / "cache"))
    assert len(no_captions) == 3
    with pytest.raises(ValueError, match="metadata.jsonl"):  # the fix, not a --caption_column it cannot take
        resolve_columns(no_captions, need_captions=True)


def test_the_image_column_is_never_taken_from_a_conditioning_name():
    """A ControlNet set whose target column has no conventional name: the image fell back to the first Image
    column, 'conditioning_image', and the conditioning to the target (trained swapped, silently)."""
    import datasets

    blank = Image.new("RGB", (4, 4))
    dataset = datasets.Dataset.from_dict(
        {"conditioning_image": [blank], "target_image": [blank], "text": ["a"]},
        features=datasets.Features({"conditioning_image": datasets.Image(), "target_image": datasets.Image(),
                                    "text": datasets.Value("string")}))
    columns = resolve_columns(dataset, need_captions=True, need_conditioning=True)
    assert columns["image_column"] == "target_image" and columns["conditioning_image_column"] == "conditioning_image"


def test_unlabelled_folder_has_no_class_column_unless_required(tmp_path):
    """A flat image folder has no label column: a model with a null class (DiT) trains unconditionally on it."""
    rng = np.random.default_rng(0)
    (tmp_path / "flat").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    flat = load_training_dataset(train_data_dir=tmp_path / "flat", cache_dir=str(tmp_path / "cache"))
    assert flat.column_names == ["image"]
    assert resolve_columns(flat, classes_if_present=True)["class_column"] is None
    with pytest.raises(ValueError, match="no class label column; pass --class_column"):
        resolve_columns(flat, need_classes=True)
    _write_image_folder(tmp_path / "labelled")
    labelled = load_training_dataset(train_data_dir=tmp_path / "labelled", cache_dir=str(tmp_path / "cache"))
    assert resolve_columns(labelled, classes_if_present=True)["class_column"] == "label"
    assert resolve_columns(labelled)["class_column"] is None  # not asked for: not looked up


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="--dataset_name.*--train_data_dir"):
        load_training_dataset()
    with pytest.raises(ValueError, match="not both"):
        load_training_dataset("mnist5k", train_data_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_training_dataset(train_data_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match="contains no images"):
        load_training_dataset(train_data_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="only the 'train' split"):
        load_training_dataset("digits", split="test")


def test_unknown_dataset_offline_lists_builtins(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="'no-such-user/no-such-dataset' was not found") as error:
        load_training_dataset("no-such-user/no-such-dataset")
    for name in BUILTIN_DATASETS:
        assert name in str(error.value)


def test_resolve_columns_defaults_and_errors():
    captions = make_toy_caption_dataset(10)
    assert resolve_columns(captions) == {
        "image_column": "image",
        "caption_column": None,
        "conditioning_image_column": None,
        "class_column": None,
    }
    full = resolve_columns(captions, need_captions=True, need_conditioning=True, need_classes=True)
    assert full == {
        "image_column": "image",
        "caption_column": "text",
        "conditioning_image_column": "conditioning_image",
        "class_column": "label",
    }
    # unconventional names fall back to the feature types
    renamed = captions.rename_columns({"image": "pic", "text": "words", "conditioning_image": "edges", "label": "y"})
    assert resolve_columns(renamed, need_captions=True, need_conditioning=True, need_classes=True) == {
        "image_column": "pic",
        "caption_column": "words",
        "conditioning_image_column": "edges",
        "class_column": "y",
    }
    with pytest.raises(ValueError, match="--caption_column 'prompt'.*available columns: image, label, text, conditioning_image"):
        resolve_columns(captions, caption_column="prompt")
    with pytest.raises(ValueError, match="--image_column 'photo'.*available columns"):
        resolve_columns(captions, image_column="photo")
    digits = load_training_dataset("digits")
    with pytest.raises(ValueError, match="no caption column; pass --caption_column.*image, label"):
        resolve_columns(digits, need_captions=True)
    with pytest.raises(ValueError, match="--conditioning_image_column"):
        resolve_columns(digits, need_conditioning=True)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def test_transforms_range_shape_and_channels():
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white: both ends of the range are present after resize
    image = Image.fromarray(pixels)
    for channels in (1, 3):
        out = build_transforms(16, center_crop=True, num_channels=channels)(image)
        assert out.shape == (channels, 16, 16) and out.dtype == torch.float32
        assert out.min() == -1.0 and out.max() == 1.0
    grey = build_transforms(8, center_crop=True)(Image.fromarray(pixels[:, :, 0]))
    assert grey.shape == (1, 8, 8)  # num_channels=None keeps greyscale
    conditioning = build_transforms(8, center_crop=True, num_channels=3, normalize=False)(image)
    assert conditioning.min() == 0.0 and conditioning.max() == 1.0


def test_center_crop_takes_the_middle():
    pixels = np.arange(40 * 20, dtype=np.uint8).reshape(40, 20)  # 20 wide, 40 tall: no resize needed
    out = build_transforms(20, center_crop=True)(Image.fromarray(pixels))
    expected = torch.from_numpy(pixels[10:30].astype(np.float32)) / 127.5 - 1
    assert torch.allclose(out[0], expected)


def test_random_crop_and_flip_follow_the_generator():
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)
    transform = build_transforms(16, random_flip=True)
    outs = [transform(Image.fromarray(pixels), np.random.default_rng(seed)) for seed in range(8)]
    assert torch.equal(outs[3], transform(Image.fromarray(pixels), np.random.default_rng(3)))
    assert len({o.sum().item() for o in outs}) > 1  # different generators, different crops/flips
    # every output is some 16x16 crop of the (resized) picture, possibly mirrored
    resized = Image.fromarray(pixels).resize((21, 16), Image.BILINEAR)
    full = torch.from_numpy(np.asarray(resized, np.float32)) / 127.5 - 1
    for out in outs:
        windows = [full[:, i : i + 16] for i in range(21 - 16 + 1)]
        assert any(torch.allclose(out[0], w) or torch.allclose(out[0], w.flip(-1)) for w in windows)


def test_transform_errors():
    with pytest.raises(ValueError, match="resolution"):
        build_transforms(0)
    with pytest.raises(ValueError, match="num_channels"):
        build_transforms(8, num_channels=2)
    with pytest.raises(ValueError, match="PIL image"):
        build_transforms(8)("not an image")


# --------------------------------------------------------------------------------------------------
# The data loader
# --------------------------------------------------------------------------------------------------


def _tiny_tokenizer(max_length=8):
    """A word-level tokenizer over the toy captions' words (no download; its size is asserted)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "a", "handwritten", "digit"] + [str(i) for i in range(10)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )
    assert len(tokenizer) == len(words)
    return tokenizer


@pytest.fixture(scope="module")
def toy():
    return make_toy_caption_dataset(40, resolution=8)


def test_dataloader_unconditional_batch_has_only_pixels(toy):
    loader = make_train_dataloader(toy, resolve_columns(toy), resolution=8, batch_size=4, num_channels=1)
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values"}
    assert batch["pixel_values"].shape == (4, 1, 8, 8)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert len(loader) == 10


def test_dataloader_all_optional_keys(toy):
    tokenizer = _tiny_tokenizer()
    columns = resolve_columns(toy, need_captions=True, need_conditioning=True, need_classes=True)
    loader = make_train_dataloader(toy, columns, resolution=8, batch_size=5, num_channels=3, tokenizer=tokenizer, seed=3)
    batch = next(iter(loader))
    assert set(batch) == {"pixel_values", "class_labels", "input_ids", "conditioning_pixel_values"}
    assert batch["pixel_values"].shape == (5, 3, 8, 8)
    assert batch["conditioning_pixel_values"].shape == (5, 3, 8, 8)
    assert batch["conditioning_pixel_values"].min() >= 0 and batch["conditioning_pixel_values"].max() <= 1
    assert batch["class_labels"].dtype == torch.long
    assert batch["input_ids"].shape == (5, tokenizer.model_max_length) and batch["input_ids"].dtype == torch.long
    for ids, label in zip(batch["input_ids"], batch["class_labels"]):
        words = tokenizer.convert_ids_to_tokens(ids.tolist())
        assert words[:4] == ["a", "handwritten", "digit", str(label.item())]  # caption matches its label
        assert words[4:] == ["<pad>"] * (tokenizer.model_max_length - 4)
    # truncation to model_max_length
    short = make_train_dataloader(toy, columns, 8, 5, num_channels=1, tokenizer=_tiny_tokenizer(max_length=2))
    assert next(iter(short))["input_ids"].shape == (5, 2)
    # without a tokenizer the raw captions come through
    raw = next(iter(make_train_dataloader(toy, columns, 8, 5, num_channels=1)))
    assert all(c.startswith("a handwritten digit") for c in raw["captions"])


def test_string_class_column_and_list_captions(toy):
    names = toy.features["label"].names
    data = toy.map(
        lambda row: {"kind": "even" if row["label"] % 2 == 0 else "odd", "many": [row["text"], "x"]},
        keep_in_memory=True,
    )
    dataset = TrainingDataset(data, {"image_column": "image", "class_column": "kind", "caption_column": "many"}, 8)
    assert dataset.class_names == ["even", "odd"] and dataset.num_classes == 2
    picked = set()
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["class_labels"].item() == int(names[data[i]["label"]]) % 2
        picked.add(item["captions"] == "x")
    assert picked == {True, False}  # one of several captions, chosen per sample


@pytest.mark.parametrize("bad,shown", [(None, "None"), ([], "an empty list"), (["a cat", None], "['a cat', None]")])
def test_a_row_without_a_caption_is_refused_at_once_naming_it(toy, bad, shown):
    """A metadata row without its caption (read as None), an empty list or a list holding None failed only when
    that row was drawn (hours in, and at the same step again after every exact resume), or as a traceback in
    --cache_text_embeddings: refused in one line when the data set is built, naming the row."""
    data = toy.map(lambda row, i: {"many": bad if i == 7 else [row["text"]]}, with_indices=True, keep_in_memory=True)
    with pytest.raises(ValueError, match=f"row 7 of --caption_column 'many' is {re.escape(shown)}: every image needs") as error:
        TrainingDataset(data, {"image_column": "image", "caption_column": "many"}, 8)
    assert "\n" not in str(error.value)


def test_complete_caption_columns_are_checked_from_arrows_counts_and_a_selection_from_its_own_rows(toy):
    """The start-up caption check reads Arrow's null counts and list lengths, not every row in Python (a million
    rows took 7 s that way); a column those counts do not clear is read row by row, so that a bad row outside a
    --max_train_samples selection does not refuse the run, and one inside it is named."""
    import datasets

    from diffusers_ant.data.dataloader import _arrow_captions_complete

    cells = {"text": ["a", "b", "c"], "many": [["a"], ["b", "c"], ["d"]], "empty": [["a"], [], ["d"]],
             "none_in_list": [["a"], ["b", None], ["d"]], "missing": ["a", None, "c"], "number": [1, 2, 3]}
    table = datasets.Dataset.from_dict(cells)
    assert {column: _arrow_captions_complete(table, column) for column in cells} == {
        "text": True, "many": True, "empty": False, "none_in_list": False, "missing": False, "number": False}
    # a complete column is never read row by row: the data set is built with the per-row check broken
    import diffusers_ant.data.dataloader as dataloader

    complete = toy.map(lambda row: {"many": [row["text"]]}, keep_in_memory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dataloader, "_is_caption", lambda value: pytest.fail("a caption was read row by row"))
        TrainingDataset(complete, {"image_column": "image", "caption_column": "many"}, 8)
    # row 7 without its caption: outside a selection the run goes on, inside it the row is named
    data = toy.map(lambda row, i: {"many": None if i == 7 else [row["text"]]}, with_indices=True, keep_in_memory=True)
    assert not _arrow_captions_complete(data, "many")
    chosen = TrainingDataset(data.select([1, 2, 3]), {"image_column": "image", "caption_column": "many"}, 8)
    assert len(chosen) == 3
    with pytest.raises(ValueError, match="row 1 of --caption_column 'many' is None"):
        TrainingDataset(data.select([1, 7, 3]), {"image_column": "image", "caption_column": "many"}, 8)


def _order(loader, epoch=0):
    loader.sampler.set_epoch(epoch)
    return [(b["pixel_values"], b["class_labels"]) for b in loader]


def test_seeded_shuffle_is_reproducible(toy):
    columns = resolve_columns(toy, need_classes=True)

    def loader(seed):
        return make_train_dataloader(toy, columns, 8, 8, num_channels=1, seed=seed, random_flip=True)

    torch.manual_seed(0)
    first = _order(loader(7))
    torch.manual_seed(1)  # the global RNG plays no part
    again = _order(loader(7))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    labels = lambda batches: torch.cat([b[1] for b in batches]).tolist()  # noqa: E731
    assert labels(_order(loader(8))) != labels(first)
    epoch1 = _order(loader(7), epoch=1)
    assert labels(epoch1) != labels(first)
    assert sorted(labels(epoch1)) == sorted(labels(first))  # a permutation of the same rows
    unshuffled = make_train_dataloader(toy, columns, 8, 8, num_channels=1, shuffle=False)
    assert labels(_order(unshuffled)) == toy["label"]


def test_batches_do_not_depend_on_worker_count(toy):
    columns = resolve_columns(toy)

    def batches(workers, epoch):
        loader = make_train_dataloader(
            toy, columns, 8, 8, num_channels=1, seed=3, random_flip=True, shuffle=False, num_workers=workers
        )
        loader.sampler.set_epoch(epoch)  # must reach the dataset copies in the workers too
        return torch.cat([b["pixel_values"] for b in loader])

    in_workers = batches(2, 1)
    assert torch.equal(in_workers, batches(0, 1))
    assert not torch.equal(in_workers, batches(0, 0))  # same order, new flips in a new epoch


def test_sampler_epoch_reaches_dataset(toy):
    dataset = TrainingDataset(toy, resolve_columns(toy), 8, random_flip=True)
    sampler = EpochRandomSampler(dataset, seed=0)
    sampler.set_epoch(5)
    assert dataset.epoch == 5
    assert sorted(sampler) == list(range(len(toy)))


def test_max_samples_and_small_dataset_errors(toy):
    columns = resolve_columns(toy)
    loader = make_train_dataloader(toy, columns, 8, 4, num_channels=1, max_samples=12)
    assert len(loader.dataset) == 12 and len(loader) == 3
    with pytest.raises(ValueError, match="lower --train_batch_size"):
        make_train_dataloader(toy, columns, 8, 64, num_channels=1)
    with pytest.raises(ValueError, match="available columns"):
        make_train_dataloader(toy, {"image_column": "nope"}, 8, 4)


def test_accelerate_resume_and_sharding(toy):
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    columns = resolve_columns(toy, need_classes=True)
    base = make_train_dataloader(toy, columns, 8, 4, num_channels=1, seed=11, random_flip=True)
    loader = prepare_data_loader(base, device=torch.device("cpu"), num_processes=1, process_index=0, put_on_device=True)
    loader.set_epoch(2)
    full = [b["pixel_values"] for b in loader]
    # a resumed run: set the epoch, skip the batches already seen, get exactly the rest
    loader.set_epoch(2)
    rest = [b["pixel_values"] for b in skip_first_batches(loader, 3)]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:]))
    # two processes: each reads its own batches of the same permutation
    labels = []
    for rank in (0, 1):
        shard = prepare_data_loader(base, device=torch.device("cpu"), num_processes=2, process_index=rank, put_on_device=True)
        shard.set_epoch(2)
        labels.append([b["class_labels"] for b in shard])
    single = [b["class_labels"] for b in (loader.set_epoch(2) or loader)]
    assert all(torch.equal(labels[0][i], single[2 * i]) and torch.equal(labels[1][i], single[2 * i + 1]) for i in range(5))


def test_16_bit_images_scale_by_their_full_range_whatever_they_hold(tmp_path):
    """A 16-bit PNG (Pillow: mode I;16) of value 200 is dark (200 / 65535), like one of value 300; scaled by
    each image's own peak, the first read as 8-bit data (200 / 255, bright) and the second as 16-bit."""
    from diffusers_ant.data import ImageTransform

    transform = ImageTransform(resolution=8, num_channels=1)
    values = {}
    for value in (200, 300, 65535):
        path = tmp_path / f"{value}.png"
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(path)
        image = Image.open(path)
        assert image.mode.startswith("I;16")
        values[value] = float(transform(image).mean())
    # both near black in [-1, 1] (after the 8-bit step: 200 and 300 of 65535 are 0 and 1 of 255)
    assert values[200] == pytest.approx(-1.0, abs=0.01) and values[300] == pytest.approx(-1.0, abs=0.01)
    assert values[65535] == pytest.approx(1.0)
