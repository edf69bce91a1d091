"""LoRA machinery every model family inherits (issue 16, items 3 and 4):

- the frozen teacher of Diff-Tuning's `--retention kd` and DeMe's consistency loss is, under LoRA, the
  student with its adapters (and DeMe's channel projections) switched off: its prediction is the base
  model's, and it holds no parameter of its own (the student's storage, compared by `data_ptr`);
- DeMe merges LoRA fine-tunes into one LoRA of rank N*r, equal to the dense task-arithmetic merge.
"""

import copy
import json
import os

import pytest
import torch

from diffusers_ant.deme import add_channel_projection, channel_projections, save_adapter_output
from diffusers_ant.models import get_model_adapter, load_pipeline
from diffusers_ant.teacher import AdapterDisabledTeacher, FrozenTeacher, make_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _perturb(module, scale, seed, only=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is None or only in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


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
        _perturb(adapter.text_encoder, 0.5, seed=3, only="lora_")
    _perturb(adapter.model, 0.5, seed=2, only="lora_B")  # B = 0 at init would make any teacher pass
    add_channel_projection(adapter.model)  # DeMe's trainable projections: identity for the teacher
    for projection in channel_projections(adapter.model).values():
        _perturb(projection, 0.2, seed=4)
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
