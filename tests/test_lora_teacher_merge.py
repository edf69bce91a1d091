"""LoRA machinery every model family inherits (issue 16, items 3 and 4):

- the frozen teacher of Diff-Tuning's `--retention kd` and DeMe's consistency loss is, under LoRA, the
  student with its adapters (and DeMe's channel projections) switched off: its prediction is the base
  model's, and it holds no parameter of its own (the student's storage, compared by `data_ptr`);
- DeMe merges LoRA fine-tunes into one LoRA of rank N*r, equal to the dense task-arithmetic merge.
"""

import contextlib
import copy
import json
import os
import shutil
import sys

import pytest
import torch

from diffusers_ant.deme import add_channel_projection, channel_projections, save_adapter_output
from diffusers_ant.models import get_model_adapter, load_pipeline
from diffusers_ant.teacher import AdapterDisabledTeacher, FrozenTeacher, make_teacher
from tolerances import gamma
from trainer_utils import perturb_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


TYPE_OPTIONS = {"unet": {"num_channels": 1, "num_classes": 3}, "dit": {"num_channels": 1, "num_classes": 3},
                "sd": {}, "controlnet": {}}


def _batch(model_type, adapter, n=2):
    g = torch.Generator().manual_seed(1)
    channels = adapter.num_channels
    batch = {"pixel_values": torch.rand(n, channels, 16, 16, generator=g) * 2 - 1}
    if model_type in ("unet", "dit"):
        batch["class_labels"] = torch.tensor([0, 2])[:n]
    if model_type in ("sd", "controlnet"):
        batch["input_ids"] = adapter.tokenize(["a cat", "a dog"][:n])
    if model_type == "controlnet":
        batch["conditioning_pixel_values"] = torch.rand(n, 3, 16, 16, generator=g)
    return batch


def _storage(*modules):
    return {p.data_ptr() for module in modules for p in module.parameters()}


@pytest.mark.parametrize("model_type", ["unet", "dit", "sd", "controlnet"])
def test_lora_teacher_is_the_student_with_adapters_disabled(model_type):
    torch.manual_seed(0)
    adapter = get_model_adapter(model_type).load(model_config_name_or_path="tiny", resolution=16,
                                                 **TYPE_OPTIONS[model_type])
    pretrained = copy.deepcopy(adapter.model).eval()  # the reference: the base model before any change
    adapter.add_lora(2, alpha=4)
    if model_type == "sd":
        adapter.add_text_encoder_lora(2)  # the teacher must also leave the text encoder's LoRA out
        pretrained_text = copy.deepcopy(adapter.text_encoder)
        perturb_parameters(adapter.text_encoder, 0.5, seed=3, only="lora_")
    perturb_parameters(adapter.model, 0.5, seed=2, only="lora_B")  # B = 0 at init would make any teacher pass
    add_channel_projection(adapter.model)  # DeMe's trainable projections: identity for the teacher
    for projection in channel_projections(adapter.model).values():
        perturb_parameters(projection, 0.2, seed=4)
    adapter.model.train()
    trainable_before = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    params_before = sum(p.numel() for p in adapter.model.parameters())

    teacher = make_teacher(adapter, lora=True)
    assert isinstance(teacher, AdapterDisabledTeacher) and teacher.shares_student
    # no second copy: every parameter the teacher reads is the student's own storage
    assert teacher.model is adapter.model
    assert _storage(teacher.model) == _storage(adapter.model)
    x0, cond = adapter.encode_batch(_batch(model_type, adapter), training=True)
    if model_type == "sd":
        assert "input_ids" in cond  # the trained text encoder runs inside predict, LoRA and all
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([10, 900])
    taught = teacher.predict(x_t, t, cond)

    # the base model's prediction, computed with the untouched copy
    with torch.no_grad():
        student_text = adapter.text_encoder
        if model_type == "sd":
            adapter.text_encoder = pretrained_text
        expected = adapter.predict(pretrained, x_t, t, cond).float()
        adapter.text_encoder = student_text
        student = adapter.predict(adapter.model, x_t, t, cond).float()
    # the same weights and the same operations (a disabled LoRA layer returns its base layer's output)
    assert torch.equal(taught, expected)
    assert (student - expected).abs().max() > 1e-3  # the student differs: the comparison can fail
    # and everything is switched back on: LoRA, projections, training mode, trainable flags
    assert adapter.model.training and channel_projections(adapter.model)
    assert [n for n, p in adapter.model.named_parameters() if p.requires_grad] == trainable_before
    assert sum(p.numel() for p in adapter.model.parameters()) == params_before
    with torch.no_grad():
        again = adapter.predict(adapter.model, x_t, t, cond).float()
    assert torch.equal(again, student)


def test_full_finetuning_keeps_the_frozen_copy():
    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1)
    teacher = make_teacher(adapter)
    assert isinstance(teacher, FrozenTeacher) and not teacher.shares_student
    assert not _storage(teacher.model) & _storage(adapter.model)


# ---------------------------------------------------------------------------- a DeMe LoRA run, then the merge

@pytest.fixture(scope="module")
def deme_lora(tmp_path_factory):
    """A tiny SD base; interval 0 trained by the trainer (LoRA rank 2, alpha 4, DeMe's projections and
    consistency loss, the teacher captured); interval 1 a hand-made LoRA of rank 3, alpha 3."""
    from diffusers_ant import teacher as teachers
    from trainer_utils import train_in_process

    root = tmp_path_factory.mktemp("lora_deme")
    torch.manual_seed(0)
    base = str(root / "base")
    get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16).save(base)
    made = []
    make = teachers.make_teacher

    def capture(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teachers, "make_teacher", capture)
        out0 = str(root / "interval-0")
        train_in_process(["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--pretrained_model_name_or_path",
                          base, "--output_dir", out0, "--resolution", "16", "--rank", "2", "--lora_alpha", "4",
                          "--deme_interval", "0", "--num_clusters", "2", "--clustering", "timestep",
                          "--train_batch_size", "4", "--max_train_samples", "8", "--max_train_steps", "2",
                          "--learning_rate", "5e-2", "--report_to", "none", "--seed", "0",
                          "--num_validation_images", "1", "--num_inference_steps", "1", "--checkpointing_steps", "100"])
    adapter = get_model_adapter("sd").load(pretrained_model_name_or_path=base)
    adapter.add_lora(3, alpha=3)
    perturb_parameters(adapter.model, 0.3, seed=7, only="lora_B")
    out1 = str(root / "interval-1")
    save_adapter_output(adapter, out1, lora=True)
    with open(os.path.join(out0, "training_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out1, "training_config.json"), "w") as f:
        json.dump({**config, "deme_interval": 1}, f)
    with open(os.path.join(out0, "timestep_intervals.json")) as src, open(os.path.join(out1, "timestep_intervals.json"), "w") as dst:
        dst.write(src.read())
    return {"root": root, "base": base, "finetunes": [out0, out1], "teachers": made}


def test_trained_lora_run_distils_from_itself_with_adapters_off(deme_lora):
    """The trainer's DeMe LoRA run built its teacher as the student with its adapters off (no copy), and
    after training (B and the projections moved) that teacher still predicts exactly the base model."""
    from diffusers_ant.deme import has_channel_projection

    [teacher] = deme_lora["teachers"]
    assert isinstance(teacher, AdapterDisabledTeacher) and teacher.model is teacher.adapter.model
    student = teacher.model
    assert has_channel_projection(student) and any((p.weight - p.identity).abs().max() > 0
                                                   for p in channel_projections(student).values())
    assert any(p.abs().max() > 0 for n, p in student.named_parameters() if "lora_B" in n)
    base_unet = load_pipeline(deme_lora["base"]).unet.eval()
    assert _storage(student).isdisjoint(_storage(base_unet))  # the reference is a separate load
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3, 400])
    hidden = torch.randn(2, 77, base_unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        expected = base_unet(x, t, encoder_hidden_states=hidden).sample
    teacher.autocast = contextlib.nullcontext  # the run's accelerator is gone (float32 run: autocast was a no-op)
    taught = teacher.predict(x, t, {"encoder_hidden_states": hidden})
    assert torch.equal(taught, expected)
    with torch.no_grad():
        trained = student(x, t, encoder_hidden_states=hidden).sample
    assert (trained - expected).abs().max() > 1e-4


def test_lora_finetunes_merge_as_one_lora_equal_to_the_dense_merge(deme_lora, tmp_path, monkeypatch):
    """sum_i w_i s_i B_i A_i as one LoRA of rank 2 + 3 (each alpha / r folded into its B block): the
    folder is a LoRA (no dense weight), loads with load_pipeline and with diffusers' load_lora_weights,
    and its folded weights equal the dense task-arithmetic merge within float32's error bound."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from diffusers_ant.deme.finetunes import dense_denoiser, read_finetunes
    from diffusers_ant.deme.lora_merge import LoraCandidates, read_lora_file
    from diffusers_ant.deme.merge import merge_task_vectors
    from diffusers_ant.deme.merging import load_merge_inputs, merge_finetunes

    base, folders = deme_lora["base"], deme_lora["finetunes"]
    weights = [0.6, -0.3]
    out = tmp_path / "merged"
    record = merge_finetunes(base, folders[::-1], str(out), weights=weights, log=lambda *_: None)
    assert record["merged_as"] == "lora" and record["lora_rank"] == 5 and record["channel_projection"]
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()  # no dense copy
    info = json.loads((out / "ant_lora.json").read_text())
    assert info["rank"] == info["lora_alpha"] == 5 and info["model_type"] == "sd"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora.down.weight")}
    assert ranks == {5}
    assert "rank 5" in (out / "README.md").read_text()

    merged = dense_denoiser(load_pipeline(str(out)).unet).state_dict()
    # the dense merge, as merge_deme.py computes it for full fine-tunes: LoRAs folded, then task arithmetic
    inputs = load_merge_inputs(base, read_finetunes(folders))
    dense = merge_task_vectors(inputs.base_state, inputs.states, weights)
    assert merged.keys() == dense.keys()
    files = [read_lora_file(folder) for folder in folders]
    assert [m.scale for m in (f.modules[next(iter(f.modules))] for f in files)] == [2.0, 1.0]
    modules = dict(inputs.denoiser.named_modules())
    moved = 0.0
    for key, value in dense.items():
        stem = "unet." + key[: -len(".weight")]
        base_value = inputs.base_state[key].float()
        if "channel_projection" in key:  # both merge the projections with merge_task_vectors around I
            assert torch.equal(merged[key], value), key
            continue
        # Not adapted: the LoRA merge keeps the base bitwise, the dense one rounds (1 - sum w) W + sum w_i W.
        # Adapted: W + [w_i s_i B_i] @ [A_i] (rank K = 5) against the rounded sum of the folded W + s_i B_i A_i.
        adapted = [f.modules[stem] for f in files] if stem in files[0].modules else []
        spread = sum(abs(w) * m.scale * (m.B.abs() @ m.A.abs()) for w, m in zip(weights, adapted))
        n = sum(m.rank for m in adapted) + len(files) + 4  # rank-K products, N+1 terms, 3 more roundings
        total = sum(abs(w) for w in weights)
        bound = gamma(n) * ((1 + 2 * total + abs(1 - sum(weights))) * base_value.abs() + 2 * spread)
        error = (merged[key] - value).abs()
        assert (error <= bound).all(), (key, (error - bound).max())
        if adapted:
            moved = max(moved, (value - base_value).abs().max().item())
    assert moved > 1e-3  # the merge moved the weights: the comparison is not base against base
    assert modules  # the dense inputs were loaded

    # diffusers' own loader reads the same LoRA (the channel projections are this project's addition)
    plain = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    plain.load_lora_weights(str(out))
    folded = dense_denoiser(plain.unet).state_dict()
    assert all(torch.equal(folded[k], merged[k]) for k in folded)
    # the search's candidates: the merged LoRA attached once, B rewritten in place per weight vector
    candidates = LoraCandidates(base, files)
    candidates.set(weights)
    again = dense_denoiser(candidates.pipeline.unet).state_dict()
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    candidates.set([0.0, 0.0])
    zero = dense_denoiser(candidates.pipeline.unet).state_dict()
    assert all(torch.equal(zero[k], inputs.base_state[k]) for k in inputs.base_state if "channel_projection" not in k)
    # the candidates' temporary folder far from the base (they share only /, as /tmp and a base under /home):
    # the base is recorded by its absolute path; relative to the folder it was its last name, read as a Hub id
    far = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else os.path.expanduser("~"), f"ant-far-{os.getpid()}")
    os.makedirs(far, exist_ok=True)
    try:
        assert os.path.commonpath([far, os.path.abspath(base)]) == os.sep
        import tempfile

        monkeypatch.setattr(tempfile, "tempdir", far)
        LoraCandidates(base, files).set(weights)
    finally:
        shutil.rmtree(far, ignore_errors=True)


def test_lora_merge_falls_back_or_refuses_in_one_line(deme_lora, tmp_path):
    from diffusers_ant.deme.merging import merge_finetunes

    base, folders = deme_lora["base"], deme_lora["finetunes"]
    quiet = {"log": lambda *_: None}
    # TIES is not linear in B A: the dense path, a full pipeline
    record = merge_finetunes(base, folders, str(tmp_path / "ties"), weights=[1, 1], method="ties", density=0.5, **quiet)
    assert record["merged_as"] == "dense" and (tmp_path / "ties" / "model_index.json").is_file()
    # a LoRA of another model type on this base: one line naming both
    unet_base = str(tmp_path / "unet-base")
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1).save(unet_base)
    adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=unet_base)
    adapter.add_lora(2)
    other = str(tmp_path / "unet-lora")
    adapter.save(other, lora=True)
    for name in ("training_config.json", "timestep_intervals.json"):
        with open(os.path.join(folders[1], name)) as src, open(os.path.join(other, name), "w") as dst:
            dst.write(src.read())
    lora_info = json.loads(open(os.path.join(other, "ant_lora.json")).read())
    lora_info["base_model"] = os.path.relpath(base, other)  # claims the SD base
    with open(os.path.join(other, "ant_lora.json"), "w") as f:
        json.dump(lora_info, f)
    with pytest.raises(ValueError) as err:
        merge_finetunes(base, [other], str(tmp_path / "bad"), weights=[1], **quiet)
    message = str(err.value)
    assert "\n" not in message and other in message and base in message and "unet LoRA" in message
    # an SD LoRA recorded as trained on another base: one line naming both bases
    moved = str(tmp_path / "other-base-lora")
    shutil.copytree(folders[1], moved)
    lora_info = json.loads(open(os.path.join(moved, "ant_lora.json")).read())
    lora_info["base_model"] = os.path.relpath(unet_base, moved)
    with open(os.path.join(moved, "ant_lora.json"), "w") as f:
        json.dump(lora_info, f)
    with pytest.raises(ValueError) as err:
        merge_finetunes(base, [folders[0], moved], str(tmp_path / "bad2"), weights=[1, 1], **quiet)
    message = str(err.value)
    assert "\n" not in message and "unet-base" in message and base in message


def test_peft_format_lora_with_convolutions_merges_as_a_lora(tmp_path):
    """UNet2DModel LoRAs (peft's format, convolution LoRAs on the ResNet blocks, ranks 2 and 1, alphas 4
    and 3): the merged folder's adapter_config.json gives scale 1 at rank 3 and folds to the dense merge."""
    from diffusers_ant.deme.finetunes import dense_denoiser, read_finetunes
    from diffusers_ant.deme.lora_merge import read_lora_file
    from diffusers_ant.deme.merge import merge_task_vectors
    from diffusers_ant.deme.merging import load_merge_inputs, merge_finetunes
    from diffusers_ant import TimestepIntervals

    torch.manual_seed(0)
    base = str(tmp_path / "base")
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(base)
    intervals = TimestepIntervals.equal(1000, 2)
    folders = []
    for index, (rank, alpha) in enumerate([(2, 4), (1, 3)]):
        adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=base)
        adapter.add_lora(rank, alpha=alpha)
        perturb_parameters(adapter.model, 0.3, seed=index, only="lora_B")
        folder = str(tmp_path / f"interval-{index}")
        adapter.save(folder, lora=True)
        intervals.save(os.path.join(folder, "timestep_intervals.json"))
        with open(os.path.join(folder, "training_config.json"), "w") as f:
            json.dump({"deme_interval": index, "pretrained_model_name_or_path": base, "model_type": "unet"}, f)
        folders.append(folder)
    weights = [0.5, 1.5]
    out = tmp_path / "merged"
    assert merge_finetunes(base, folders, str(out), weights=weights, log=lambda *_: None)["merged_as"] == "lora"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and not config["rank_pattern"]
    merged = dense_denoiser(load_pipeline(str(out)).unet).state_dict()
    inputs = load_merge_inputs(base, read_finetunes(folders))
    dense = merge_task_vectors(inputs.base_state, inputs.states, weights)
    files = [read_lora_file(folder) for folder in folders]
    assert any(m.A.dim() == 4 for m in files[0].modules.values())  # convolution LoRAs are in the merge
    moved = 0.0
    for key, value in dense.items():
        stem = key[: -len(".weight")]
        adapted = [f.modules[stem] for f in files] if stem in files[0].modules else []
        base_value = inputs.base_state[key].float()
        spread = sum(abs(w) * m.scale * (m.B.abs().flatten(1) @ m.A.abs().flatten(1)).view(value.shape)
                     for w, m in zip(weights, adapted))
        bound = gamma(sum(m.rank for m in adapted) + len(files) + 4) * (
            (1 + 2 * sum(abs(w) for w in weights) + abs(1 - sum(weights))) * base_value.abs() + 2 * spread)
        assert ((merged[key] - value).abs() <= bound).all(), key
        if adapted:
            moved = max(moved, (value - base_value).abs().max().item())
    assert moved > 1e-3

    # and their ensemble: both peft adapters on one UNet2DModel, switched by timestep
    from diffusers_ant.deme.merging import write_ensemble_folder

    write_ensemble_folder(base, folders, str(tmp_path / "ensemble"), log=lambda *_: None)
    unet = load_pipeline(str(tmp_path / "ensemble")).unet
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for index, t in ((1, 900), (0, 10)):
            expected = load_pipeline(folders[index]).unet(x, t).sample
            # bitwise: the same base weights and LoRA file run by the same peft layers (the ensemble only chooses
            # the active adapter); the other interval's LoRA is 1.5 away
            assert torch.equal(unet(x, t).sample, expected), index


# ---------------------------------------------------------------------------- quantized base, 8-bit Adam


@pytest.mark.parametrize("flags, expected", [
    (["--quantize_base", "nf4"], ["--quantize_base", "add --rank"]),
    (["--quantize_base", "int8", "--rank", "4"], ["--quantize_base", "pip install bitsandbytes"]),
    (["--use_8bit_adam", "--rank", "4"], ["--use_8bit_adam", "pip install bitsandbytes"]),
])
def test_quantized_base_and_8bit_adam_refusals_are_one_line(flags, expected, tmp_path, capsys, monkeypatch):
    """Without bitsandbytes (hidden here: the test extra installs it) each flag says what to install; a
    quantized base without a LoRA is refused first (nothing could train on an 8 / 4-bit base)."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    from train_scripts_loader import load_train_main

    with pytest.raises(SystemExit):
        load_train_main()(["--model_type", "sd", "--dataset_name", "mnist5k_captions", "--output_dir", str(tmp_path),
                           "--pretrained_model_name_or_path", os.getcwd(), *flags])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(text in err for text in expected), err


def test_quantization_config_reaches_only_the_denoiser(tmp_path, monkeypatch):
    """The BitsAndBytesConfig goes to the denoiser's from_pretrained (unet / transformer), never to the
    VAE or text encoder; a preset (nothing pretrained to quantize) is refused in one line."""
    from diffusers_ant.models.base import PretrainedSource
    from diffusers_ant.models.quantization import quantization_config

    with monkeypatch.context() as hidden:
        hidden.setitem(sys.modules, "bitsandbytes", None)
        with pytest.raises(ValueError, match="pip install bitsandbytes"):
            quantization_config("nf4")
    base = str(tmp_path / "base")
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1).save(base)
    seen = []

    class Recorder:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            seen.append((kwargs.get("subfolder"), kwargs.get("quantization_config")))
            return cls()

    source = PretrainedSource(base, quantization_config="CONFIG")
    for subfolder in ("unet", "vae", "text_encoder", "transformer"):
        source.load(Recorder, subfolder=subfolder)
    assert seen == [("unet", "CONFIG"), ("vae", None), ("text_encoder", None), ("transformer", "CONFIG")]
    with pytest.raises(ValueError, match="--quantize_base quantizes a pretrained denoiser") as err:
        get_model_adapter("unet").load(model_config_name_or_path="tiny", quantization_config="CONFIG")
    assert "\n" not in str(err.value)


def test_lora_ensemble_switches_adapters_by_timestep_on_one_denoiser(deme_lora, tmp_path):
    """--ensemble of LoRA fine-tunes: the base UNet with both LoRAs as named adapters (no router, no
    copy); each call is the fine-tune of its timestep's interval (adapter and channel projections)."""
    from diffusers_ant.deme.merging import write_ensemble_folder

    base, folders = deme_lora["base"], deme_lora["finetunes"]
    out = tmp_path / "ensemble"
    write_ensemble_folder(base, folders, str(out), log=lambda *_: None)
    info = json.loads((out / "deme_ensemble.json").read_text())
    assert info["kind"] == "lora" and info["members"] == ["members/interval-0", "members/interval-1"]
    member = out / "members" / "interval-0"
    assert (member / "pytorch_lora_weights.safetensors").is_file() and not (member / "config.json").exists()  # no denoiser
    pipeline = load_pipeline(str(out))
    unet = pipeline.unet
    base_unet = load_pipeline(base).unet.eval()
    lora_params = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    extra = sum(p.numel() for n, p in unet.named_parameters() if "channel_projection" in n)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in base_unet.parameters()) + lora_params + extra
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    outputs = {}
    finetuned = [load_pipeline(folder).unet.eval() for folder in folders]
    with torch.no_grad():
        for index, t in ((0, 100), (1, 700), (0, 20)):  # switch there and back
            expected = finetuned[index](x, t, encoder_hidden_states=hidden).sample
            got = unet(x, t, encoder_hidden_states=hidden).sample
            # bitwise: the same base weights, LoRA file and projections, run by the same layers (the ensemble only
            # chooses the active adapter and projections)
            assert torch.equal(got, expected), index
            outputs[index] = got
        assert (outputs[0] - outputs[1]).abs().max() > 1e-3
        # an interval no fine-tune covers runs the base: every adapter off, identity projections
        switch = pipeline.lora_ensemble
        switch.adapters[1], switch.projections[1], switch.active = None, None, -1
        # bitwise: a disabled LoRA layer returns its base layer's output, an identity projection x + (P - I) x = x
        assert torch.equal(unet(x, 700, encoder_hidden_states=hidden).sample,
                           base_unet(x, 700, encoder_hidden_states=hidden).sample)
    images = pipeline(["a cat"], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3)


def test_a_lora_ensemble_runs_legacy_members_as_they_were_trained(deme_lora, tmp_path):
    """Members whose projections are the legacy skip-projecting kind (channel_projection.json version 1) run so
    in the LoRA ensemble, as the dense ensemble and the merges run them; a mix of both kinds is refused."""
    from diffusers_ant.deme.merging import write_ensemble_folder
    from diffusers_ant.deme.projection import channel_projections

    base, folders = deme_lora["base"], deme_lora["finetunes"]
    out = tmp_path / "ensemble"
    write_ensemble_folder(base, folders, str(out), log=lambda *_: None)
    import shutil

    members = sorted((out / "members").iterdir())
    with_projections = [m for m in members if (m / "channel_projection.json").is_file()]
    assert len(members) == 2 and len(with_projections) == 1
    for other in members:  # the other member's projections: a copy of the first's
        if other not in with_projections:
            for name in ("channel_projection.json", "channel_projection.safetensors"):
                shutil.copy(with_projections[0] / name, other / name)
    configs = [m / "channel_projection.json" for m in members]
    assert not any(p.projects_skip for p in channel_projections(load_pipeline(str(out)).unet).values())

    def set_version(path, version):
        path.write_text(json.dumps({**json.loads(path.read_text()), "version": version}))

    set_version(configs[0], 1)
    with pytest.raises(ValueError, match="mix legacy skip-projecting channel projections"):
        load_pipeline(str(out))
    set_version(configs[1], 1)
    projections = channel_projections(load_pipeline(str(out)).unet).values()
    assert projections and all(p.projects_skip for p in projections)
