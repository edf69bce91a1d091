"""A pretrained DiT fine-tuned on a data set with another class count keeps its label table (issue 17,
item 3), as the Diff-Tuning authors' code does (num_classes=1000 whatever the data, strict=False):
the data set's classes train rows 0..K-1 or the rows of --class_map, the null row stays the
pretrained null row, and sampling, the saved folder and the card use the data set's classes through
the map."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ant.models import get_model_adapter
from trainer_utils import TINY_RUN, assert_same_tensors, load_safetensors_dir, record_prepared, train_in_process

PRETRAINED_CLASSES = 10
NAMES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretrained tiny class-conditional DiT (pixel space, 16x16, 1 channel, 10 classes), saved."""
    torch.manual_seed(0)
    adapter = get_model_adapter("dit").load(model_config_name_or_path="tiny", resolution=16, num_channels=1,
                                            num_classes=PRETRAINED_CLASSES)
    folder = tmp_path_factory.mktemp("pretrained-dit")
    adapter.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """An image folder of 3 classes (4 grey 16x16 images each)."""
    root = tmp_path_factory.mktemp("three") / "train"
    rng = np.random.default_rng(0)
    for name in NAMES:
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(root / name / f"{i}.png")
    return root


def _tables(model):
    from diffusers.models.embeddings import LabelEmbedding

    return [m.embedding_table.weight for m in model.modules() if isinstance(m, LabelEmbedding)]


def _recorded_labels(pipeline):
    """Record the class labels each transformer call receives."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["class_labels"].tolist())

    pipeline.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# --------------------------------------------------------------------------- the adapter


def test_fewer_classes_keep_the_pretrained_table_and_the_map_picks_its_rows(pretrained):
    reference = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained))
    adapter = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained), num_classes=3)
    # the model is the pretrained one, bit for bit (so is a teacher copied from it)
    assert adapter.model_from_pretrained and adapter.num_classes == PRETRAINED_CLASSES
    assert_same_tensors(adapter.model.state_dict(), reference.model.state_dict())
    assert adapter.class_rows == [0, 1, 2] and adapter.null_class == PRETRAINED_CLASSES

    def labels_of(ids):
        batch = {"pixel_values": torch.zeros(len(ids), 1, 16, 16), "class_labels": torch.tensor(ids)}
        return adapter.conditioning(batch)["class_labels"].tolist()

    assert labels_of([0, 2, 1]) == [0, 2, 1]
    with pytest.raises(ValueError, match="out of range for the data set's class map with 3 classes"):
        labels_of([3])
    adapter.set_data_classes(list(NAMES), class_map='{"ant": 7, "bee": 2, "cat": 5}')
    assert labels_of([0, 1, 2, 0]) == [7, 2, 5, 7]
    assert adapter.null_condition_batch({"class_labels": torch.tensor([0])}) == {}  # bank rows: the null row
    # validation samples: the data set's classes through the map, never the 7 other pretrained classes
    pipeline = adapter.make_pipeline()
    seen = _recorded_labels(pipeline)
    adapter.sample(pipeline, 4, torch.Generator().manual_seed(0), num_inference_steps=1)
    assert seen == [[7, 2, 5, 7]]
    assert adapter.class_map_record == {"class_names": list(NAMES), "rows": [7, 2, 5], "null_row": 10,
                                        "num_model_classes": 10}


def test_more_classes_grow_the_table_around_the_pretrained_rows(pretrained):
    reference = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained))
    adapter = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained), num_classes=12)
    assert adapter.num_classes == 12 and adapter.null_class == 12 and adapter.class_rows is None
    assert not adapter.model_from_pretrained  # a LoRA output must then carry its base
    for grown, old in zip(_tables(adapter.model), _tables(reference.model)):
        assert grown.shape[0] == 13
        assert torch.equal(grown[:10], old[:10]) and torch.equal(grown[12], old[10])  # classes and null row kept
        # new rows as DiT initialises its table (std 0.02): 2 x 32 draws, far below the pretrained rows' scale
        assert grown[10:12].std() < 0.05
    grown_rows = [t[10:12] for t in _tables(adapter.model)]
    assert all(torch.equal(rows, grown_rows[0]) for rows in grown_rows)  # equal copies stay equal
    assert adapter.grown_label_table == (10, 12)


def test_a_grown_table_is_refused_where_its_new_rows_would_not_train(pretrained, tmp_path):
    """LoRA (on the attention) and BitFit (biases) leave a grown table's new rows at std 0.02: the new classes
    would stay near-equal vectors. The trainer refuses them in one line before training; DiffFit trains the table."""
    root = tmp_path / "eleven" / "train"
    for k in range(11):
        (root / f"c{k:02d}").mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 20 * k, dtype=np.uint8), mode="L").save(root / f"c{k:02d}" / "0.png")
    for extra, how in ((("--rank", "2"), "LoRA \\(--rank\\)"), (("--finetune", "bitfit"), "--finetune bitfit")):
        with pytest.raises(ValueError, match=f"has 10 classes and this run's 11 grow its label table, whose new rows "
                                             f"{how} does not train"):
            train_in_process(_args(pretrained, root, tmp_path / "out", *extra))
        assert not (tmp_path / "out" / "checkpoint-1").exists()
    from diffusers_ant.training.loop import check_new_label_rows

    adapter = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained), num_classes=11)
    for finetune in (None, "full", "difffit"):
        check_new_label_rows(SimpleNamespace(finetune=finetune, rank=None), adapter)


BAD_MAPS = [
    ("0,1,10", "to class 10, which the pretrained DiT does not have (its classes are 0..9; 10 is its null class)"),
    ('{"ant": 0, "bee": 1, "cat": 1000}', "maps 'cat' to class 1000, which the pretrained DiT does not have"),
    ('{"ant": 0, "bee": 1, "dog": 2}', "names 'dog', which is not a class of the data set (ant, bee, cat)"),
    ('{"ant": 0, "bee": 1}', "has no row for the data set's class 'cat'"),
    ("0,1", "gives 2 rows for the data set's 3 classes"),
    ("0,1,1", "maps 'bee' and 'cat' to the same class 1"),
    ("0,one,2", "row 'one' for 'bee' is not a class number"),
    ("{nope", "is not valid JSON"),
]


@pytest.mark.parametrize("spec,needle", BAD_MAPS)
def test_bad_class_maps_are_one_line_errors(spec, needle):
    from diffusers_ant.models.dit import parse_class_map

    with pytest.raises(ValueError, match="^--class_map") as err:
        parse_class_map(spec, list(NAMES), PRETRAINED_CLASSES)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_class_map_forms(tmp_path):
    from diffusers_ant.models.dit import parse_class_map

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"cat": 4, "ant": 9, "1": 0}))  # a class by its id too
    for spec in (str(path), '{"cat": 4, "ant": 9, "bee": 0}', "[9, 0, 4]", "9, 0, 4"):
        assert parse_class_map(spec, list(NAMES), PRETRAINED_CLASSES) == [9, 0, 4]
    with pytest.raises(ValueError, match="no class column"):
        parse_class_map("0", None, PRETRAINED_CLASSES)


# --------------------------------------------------------------------------- through train_ant.py


def _args(pretrained, data, out, *extra):
    args = ["--model_type", "dit", "--train_data_dir", str(data), "--output_dir", str(out), *TINY_RUN,
            "--pretrained_model_name_or_path", str(pretrained), *extra]
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    return args


@pytest.mark.slow
def test_diff_tuning_at_learning_rate_zero_returns_the_pretrained_weights(pretrained, three_classes, tmp_path,
                                                                         monkeypatch, capsys):
    """10-class DiT -> 3-class folder with a knowledge bank, learning rate 0: the saved transformer is the
    pretrained one bit for bit (no label table re-created); data rows train rows 0..2 (or the map's),
    bank rows the pretrained null row 10; samples, class_map.json and the card use the map."""
    from diffusers_ant.diff_tuning import build_knowledge_bank

    bank = tmp_path / "bank"
    build_knowledge_bank(str(pretrained), str(bank), num_images=8, num_inference_steps=1, batch_size=8,
                         progress=False)
    seen = record_prepared(monkeypatch, lambda p: (p["task_ids"].clone(), p["conditioning"]["class_labels"].clone()))
    for name, extra, rows in (("default", [], [0, 1, 2]), ("mapped", ["--class_map", "7,2,5"], [7, 2, 5])):
        seen.clear()
        out = tmp_path / name
        train_in_process(_args(pretrained, three_classes, out, "--knowledge_bank", str(bank), "--learning_rate", "0",
                               "--max_train_steps", "2", "--num_clusters", "1", *extra))
        assert_same_tensors(load_safetensors_dir(out / "transformer"), load_safetensors_dir(pretrained / "transformer"))
        data = torch.cat([labels[task_ids == 0] for task_ids, labels in seen])
        bank_labels = torch.cat([labels[task_ids == 1] for task_ids, labels in seen])
        assert bank_labels.numel() and (bank_labels == PRETRAINED_CLASSES).all()
        assert set(data.tolist()) - {PRETRAINED_CLASSES} == set(rows)  # (10: DiT's own label dropout)
        record = json.loads((out / "class_map.json").read_text())
        assert record == {"class_names": list(NAMES), "rows": rows, "null_row": 10, "num_model_classes": 10}
        card = (out / "README.md").read_text()
        assert f"class_labels={rows + rows[:1]}" in card and f"'ant' = {rows[0]}" in card
        # the saved folder samples its data set's rows, not all 10 of the kept table (evaluation, analysis)
        from diffusers_ant.analysis.evaluate import sample_images
        from diffusers_ant.models import load_pipeline

        pipeline = load_pipeline(str(out))
        assert pipeline.class_rows == rows
        original_call = type(pipeline).__call__
        sampled = []

        def recording_call(self, *args, **kwargs):
            sampled.extend(kwargs["class_labels"])
            return original_call(self, *args, **kwargs)

        monkeypatch.setattr(type(pipeline), "__call__", recording_call)
        sample_images(pipeline, 7, num_inference_steps=1, batch_size=4, progress=False)
        assert sampled == (rows * 3)[:7]
        monkeypatch.setattr(type(pipeline), "__call__", original_call)
        # training on from the saved folder keeps the recorded rows
        again = get_model_adapter("dit").load(pretrained_model_name_or_path=str(out), num_classes=3)
        assert again.class_rows == rows
    printed = capsys.readouterr().out
    assert "full fine-tuning: " in printed and "parameters trained (100.00%)" in printed


def test_a_class_map_naming_a_class_the_model_lacks_is_one_line(pretrained, three_classes, tmp_path, capsys):
    from train_scripts_loader import load_train_main

    for extra, needle in ((["--class_map", '{"ant": 0, "bee": 1, "cat": 1000}'], "--class_map maps 'cat' to class 1000"),
                          (["--class_map", "0,1,2", "--model_type", "unet"], "--class_map maps data-set classes")):
        with pytest.raises(SystemExit):
            load_train_main()(_args(pretrained, three_classes, tmp_path / "o", "--max_train_steps", "1", *extra))
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_a_fine_tuned_latent_dit_keeps_the_pretrained_label_names(tmp_path):
    """A pretrained DiTPipeline's model_index.json names its labels (facebook/DiT-XL-2-256: ImageNet's
    id2label), which DiTPipeline.get_label_ids reads. The saved fine-tune dropped them (DiTPipeline takes
    id2label but does not record it), so get_label_ids failed on it in plain diffusers."""
    from diffusers import DiffusionPipeline

    torch.manual_seed(0)
    get_model_adapter("dit").load(model_config_name_or_path="tiny-latent", resolution=16, num_channels=3,
                                  num_classes=3).save(str(tmp_path / "pretrained"))
    index = json.loads((tmp_path / "pretrained" / "model_index.json").read_text())
    names = {"0": "tench, Tinca tinca", "1": "goldfish", "2": "great white shark"}
    (tmp_path / "pretrained" / "model_index.json").write_text(json.dumps({**index, "id2label": names}))
    adapter = get_model_adapter("dit").load(pretrained_model_name_or_path=str(tmp_path / "pretrained"))
    adapter.save(str(tmp_path / "finetuned"))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "finetuned"))
    assert pipe.get_label_ids(["goldfish", "tench"]) == [1, 0]
    # a fine-tune on two classes trains rows 0 and 1 for them: those rows take the data set's names
    mapped = get_model_adapter("dit").load(pretrained_model_name_or_path=str(tmp_path / "pretrained"), num_classes=2)
    mapped.set_data_classes(["cat", "dog"])
    mapped.save(str(tmp_path / "mapped"))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "mapped"))
    assert pipe.get_label_ids(["dog", "great white shark"]) == [1, 2] and "tench" not in pipe.labels


def test_a_dit_trained_at_another_resolution_saves_the_function_it_trained(pretrained, tmp_path):
    """DiT at a new --resolution: the pretrained `PatchEmbed` recomputed its sin-cos table with the old grid as
    base (positions scaled to 16 px), while the saved folder, rebuilt from its new sample_size, used the new grid:
    the saved model computed another function. The table is now rebuilt for the new size when training starts."""
    from diffusers_ant.models import load_pipeline

    adapter = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained), resolution=32)
    assert adapter.model.config.sample_size == 32 and adapter.model.pos_embed.base_size == 32 // 2  # (was 16 // 2)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    timesteps, labels = torch.tensor([100, 700]), {"class_labels": torch.tensor([4, 7])}
    with torch.no_grad():
        trained = adapter.predict(adapter.model, x, timesteps, labels)
    adapter.save(str(tmp_path / "out"))
    saved = load_pipeline(str(tmp_path / "out")).transformer
    with torch.no_grad():
        reloaded = adapter.predict(saved, x, timesteps, labels)
    # the same weights and the same position table: the same operations, so the same bits
    assert torch.equal(reloaded, trained)
    # and the patch projection is the pretrained one
    source = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained))
    assert torch.equal(saved.pos_embed.proj.weight, source.model.pos_embed.proj.weight)
    assert saved.pos_embed.pos_embed.dtype == torch.float32  # the sin-cos table as PatchEmbed builds it

    # a LoRA output: it named the pretrained folder as its base, which loads back at its own size and table
    lora = get_model_adapter("dit").load(pretrained_model_name_or_path=str(pretrained), resolution=32)
    assert not lora.model_from_pretrained  # so the output carries its base at this size
    lora.add_lora(rank=2)
    with torch.no_grad():
        for name, param in lora.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        trained = lora.predict(lora.model, x, timesteps, labels)
    lora.save(str(tmp_path / "lora"), lora=True)
    with torch.no_grad():
        reloaded = lora.predict(load_pipeline(str(tmp_path / "lora")).transformer, x, timesteps, labels)
    # the same weights and table; peft's LoRA layers compute W x + B A x in the same order either way
    assert torch.equal(reloaded, trained)
