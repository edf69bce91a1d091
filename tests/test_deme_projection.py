"""DeMe's channel-wise projection: identity at insertion, trained values saved and re-attached, plain diffusers unaffected."""

import copy
import json

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_ant.deme import (
    ChannelProjection,
    add_channel_projection,
    channel_projection_detached,
    channel_projections,
    has_channel_projection,
    save_adapter_output,
    save_pipeline,
)
from diffusers_ant.models import get_model_adapter, load_pipeline
from diffusers_ant.models.lora import has_lora, lora_disabled
from tolerances import output_tolerance

RES = 16
CASES = {
    "unet": ("unet", "tiny", {"num_channels": 1}),
    "dit": ("dit", "tiny", {"num_channels": 1, "num_classes": 3}),
    "sd": ("sd", "tiny", {}),
    "controlnet": ("controlnet", "tiny", {}),
}
# what add_channel_projection inserts: (block names, channels)
EXPECTED_BLOCKS = {
    "unet": (["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"], [16, 32, 32, 32, 16]),
    "dit": (["transformer_blocks.0", "transformer_blocks.1"], [32, 32]),
    "sd": (["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"], [32, 64, 64, 64, 32]),
    "controlnet": (["down_blocks.0", "down_blocks.1"], [32, 64]),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def build(case):
    model_type, preset, options = CASES[case]
    torch.manual_seed(0)
    adapter = get_model_adapter(model_type).load(model_config_name_or_path=preset, resolution=RES, **options)
    adapter.model.eval()
    return adapter


def inputs(adapter):
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.rand(2, adapter.num_channels, RES, RES, generator=g) * 2 - 1}
    if adapter.model_type == "dit":
        batch["class_labels"] = torch.tensor([0, 2])
    if adapter.tokenizer is not None:
        batch["input_ids"] = adapter.tokenize(["a cat", "digit 7"])
        batch["conditioning_pixel_values"] = torch.rand(2, 3, RES, RES, generator=g)
    x0, cond = adapter.encode_batch(batch)
    return torch.randn(x0.shape, generator=g), torch.tensor([10, 900]), cond


def predict(adapter, model, x_t, t, cond):
    with torch.no_grad():
        return adapter.predict(model, x_t, t, cond)


def perturb(module, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def perturb_projections(model, seed=3):
    for projection in channel_projections(model).values():
        perturb(projection, 0.1, seed)
    if type(model).__name__ == "ControlNetModel":
        # its zero convolutions hide everything before them at initialisation: give them weights,
        # as training would
        perturb(model.controlnet_down_blocks, 0.1, seed + 1)
        perturb(model.controlnet_mid_block, 0.1, seed + 2)


@pytest.mark.parametrize("case", list(CASES))
def test_identity_projection_leaves_the_output_unchanged_bitwise(case):
    adapter = build(case)
    model = adapter.model
    x_t, t, cond = inputs(adapter)
    if case == "controlnet":
        perturb(model.controlnet_down_blocks, 0.1, 5)  # so that the ControlNet's blocks reach its output
        perturb(model.controlnet_mid_block, 0.1, 6)
    before = predict(adapter, model, x_t, t, cond)

    projections = add_channel_projection(model)
    names, channels = EXPECTED_BLOCKS[case]
    assert list(channel_projections(model)) == names
    assert [p.channels for p in projections] == channels
    assert all(p.weight.requires_grad for p in projections)
    # bitwise: the forward is x + (P - I) x and P - I is exactly zero at the identity
    assert torch.equal(predict(adapter, model, x_t, t, cond), before)

    # the hooks are live: a non-identity projection changes the output
    for projection in projections:
        perturb(projection, 0.1, 7)
    assert not torch.allclose(predict(adapter, model, x_t, t, cond), before)
    # idempotent: adding again returns the same projections
    assert add_channel_projection(model) == projections


@pytest.mark.parametrize("case", ["unet", "dit"])
def test_identity_is_exact_under_bf16_autocast_and_trains(case):
    # the projections are exact identities under mixed precision too, and they learn
    adapter = build(case)
    model = adapter.model
    x_t, t, cond = inputs(adapter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = predict(adapter, model, x_t, t, cond)
        add_channel_projection(model)
        assert torch.equal(predict(adapter, model, x_t, t, cond), before)
    # one SGD step moves the projections away from the identity
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.mse_loss(adapter.predict(model, x_t, t, cond), torch.zeros_like(x_t)).backward()
    optimizer.step()
    assert all(not torch.equal(p.weight, p.identity) for p in channel_projections(model).values())


def test_deepcopy_has_its_own_projections_and_detaching_restores_them():
    adapter = build("unet")
    model = adapter.model
    x_t, t, cond = inputs(adapter)
    add_channel_projection(model)
    perturb_projections(model)
    out = predict(adapter, model, x_t, t, cond)
    twin = copy.deepcopy(model)
    perturb_projections(twin, seed=11)
    assert torch.equal(predict(adapter, model, x_t, t, cond), out)  # the copy's hooks use the copy's projections
    assert not torch.equal(predict(adapter, twin, x_t, t, cond), out)

    with channel_projection_detached(model) as detached:
        assert not has_channel_projection(model)
        assert all("channel_projection" not in k for k in model.state_dict())
        plain = predict(adapter, model, x_t, t, cond)
    assert not torch.equal(plain, out)
    assert has_channel_projection(model) and list(detached) == list(channel_projections(model))
    assert torch.equal(predict(adapter, model, x_t, t, cond), out)


def test_unsupported_model_is_refused():
    with pytest.raises(ValueError, match="channel projection supports"):
        add_channel_projection(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="channel_dim"):
        ChannelProjection(4, channel_dim=2)


@pytest.mark.parametrize("case", list(CASES))
def test_trained_projection_survives_save_and_load_pipeline(case, tmp_path):
    adapter = build(case)
    model = adapter.model
    x_t, t, cond = inputs(adapter)
    add_channel_projection(model)
    perturb_projections(model)
    expected = predict(adapter, model, x_t, t, cond)
    with channel_projection_detached(model):
        without = predict(adapter, model, x_t, t, cond)
    assert not torch.allclose(expected, without)

    save_adapter_output(adapter, str(tmp_path), model)
    info = json.loads((tmp_path / "channel_projection.json").read_text())
    component = {"dit": "transformer", "controlnet": "controlnet"}.get(case, "unet")
    assert info["component"] == component and list(info["blocks"]) == EXPECTED_BLOCKS[case][0]
    # diffusers' own weights do not hold the projections
    from safetensors.torch import load_file

    # (a ControlNet output holds the ControlNet at its root, as diffusers' train_controlnet.py saves it)
    weights_folder = tmp_path if case == "controlnet" else tmp_path / component
    weights = load_file(next(weights_folder.glob("*.safetensors")))
    assert not any("channel_projection" in k for k in weights)

    loaded = getattr(load_pipeline(str(tmp_path)), component).eval()
    assert has_channel_projection(loaded)
    assert torch.equal(predict(adapter, loaded, x_t, t, cond), expected)

    # plain diffusers loads the folder, without the projections (the pixel DiT's pipeline class is
    # this project's, shipped in the folder as community code)
    if case == "controlnet":
        from diffusers import ControlNetModel

        plain = ControlNetModel.from_pretrained(str(tmp_path)).eval()
    else:
        plain = getattr(DiffusionPipeline.from_pretrained(str(tmp_path), trust_remote_code=True), component).eval()
    assert not has_channel_projection(plain)
    assert torch.equal(predict(adapter, plain, x_t, t, cond), without)


def test_lora_run_keeps_projections_trainable_and_saves_them_beside_the_adapter(tmp_path):
    adapter = build("unet")
    base_dir = tmp_path / "base"
    adapter.save(str(base_dir))
    adapter = get_model_adapter("unet").load(pretrained_model_name_or_path=str(base_dir))
    adapter.model.eval()
    x_t, t, cond = inputs(adapter)
    adapter.add_lora(rank=2)
    add_channel_projection(adapter.model)  # after add_lora, which freezes everything else
    trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert any("channel_projection" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert all("channel_projection" in n or "lora_" in n for n in trainable)
    perturb_projections(adapter.model)
    for name, p in adapter.model.named_parameters():
        if "lora_B" in name:
            perturb(torch.nn.ParameterList([p]), 0.05, 9)
    expected = predict(adapter, adapter.model, x_t, t, cond)
    # the reloaded LoRA (peft's re-loaded scaling) and the folded one ((W + s B A) x against W x + s B (A x)) compute
    # the same function in other roundings: tests/tolerances.py's output_tolerance, L the UNet's layers with their
    # LoRA (2.3e-3 here; observed 2e-6). A lost LoRA or lost projections move the output by 1.2 or more
    atol = output_tolerance(adapter.model, expected)
    with lora_disabled(adapter.model):
        assert (predict(adapter, adapter.model, x_t, t, cond) - expected).abs().max() > 100 * atol
    with channel_projection_detached(adapter.model):
        assert (predict(adapter, adapter.model, x_t, t, cond) - expected).abs().max() > 100 * atol

    out = tmp_path / "lora"
    save_adapter_output(adapter, str(out), lora=True)
    assert (out / "ant_lora.json").is_file() and (out / "channel_projection.safetensors").is_file()
    loaded = load_pipeline(str(out)).unet.eval()
    assert has_lora(loaded) and has_channel_projection(loaded)
    torch.testing.assert_close(predict(adapter, loaded, x_t, t, cond), expected, rtol=0, atol=atol)
    # a full save of the LoRA run folds the LoRA in and keeps the projections
    full = tmp_path / "full"
    save_adapter_output(adapter, str(full), lora=False)
    dense = load_pipeline(str(full)).unet.eval()
    assert not has_lora(dense) and has_channel_projection(dense)
    torch.testing.assert_close(predict(adapter, dense, x_t, t, cond), expected, rtol=0, atol=atol)


def test_save_pipeline_without_projection_is_plain_save_pretrained(tmp_path):
    adapter = build("unet")
    pipeline = adapter.make_pipeline()
    save_pipeline(pipeline, str(tmp_path / "mine"))
    pipeline.save_pretrained(str(tmp_path / "theirs"))
    assert not (tmp_path / "mine" / "channel_projection.json").exists()
    mine = load_pipeline(str(tmp_path / "mine")).unet.state_dict()
    theirs = DiffusionPipeline.from_pretrained(str(tmp_path / "theirs")).unet.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_projection_is_on_the_main_path_only_the_skip_connections_stay_unprojected(tmp_path):
    """The authors' UNet (MqLeet/DeMe unet_2d.py) projects `sample` after `down_block_res_samples += res_samples`:
    the next block gets P x, the skip connection x. Legacy folders (version 1) projected both, and load as trained."""
    from diffusers_ant.deme.projection import set_skip_mode

    adapter = build("unet")
    model = adapter.model
    add_channel_projection(model)
    perturb_projections(model)
    raw, final = {}, {}
    block = model.down_blocks[0]
    block.register_forward_hook(lambda m, a, out: raw.setdefault("out", out), prepend=True)  # before the projection
    block.register_forward_hook(lambda m, a, out: final.__setitem__("out", out))  # after it
    x_t, t, cond = inputs(adapter)
    predict(adapter, model, x_t, t, cond)
    hidden, skips = raw["out"][0], raw["out"][1]
    assert skips[-1] is hidden  # diffusers hands the block's output out twice
    assert not torch.equal(final["out"][0], hidden)  # the main path is projected
    assert final["out"][1][-1] is hidden  # the skip connection is not
    # version 2 on disk; a version-1 folder is loaded with its skip connection projected, as it was trained
    out = tmp_path / "v2"
    save_pipeline(adapter.make_pipeline(model), str(out))
    info = json.loads((out / "channel_projection.json").read_text())
    assert info["version"] == 2
    assert not any(p.projects_skip for p in channel_projections(load_pipeline(str(out)).unet).values())
    info["version"] = 1
    (out / "channel_projection.json").write_text(json.dumps(info))
    legacy = load_pipeline(str(out)).unet.eval()
    assert all(p.projects_skip for p in channel_projections(legacy).values())
    set_skip_mode(model, True)
    raw.clear()
    expected = predict(adapter, model, x_t, t, cond)
    assert final["out"][1][-1] is final["out"][0]  # legacy: the skip connection gets the projected map
    torch.testing.assert_close(predict(adapter, legacy, x_t, t, cond), expected, rtol=0, atol=0)


def test_training_from_a_folder_with_projections_is_refused_in_one_line(tmp_path):
    """The trainer loads a pretrained denoiser without the projections saved beside it: a run from a merged
    DeMe model started from another function than the model's and dropped its projections from the outputs."""
    from diffusers_ant.training.args import UsageError
    from trainer_utils import train_in_process

    adapter = build("unet")
    add_channel_projection(adapter.model)
    perturb_projections(adapter.model)
    merged = tmp_path / "merged"
    save_adapter_output(adapter, str(merged))
    assert (merged / "channel_projection.json").is_file()
    with pytest.raises(UsageError, match="holds DeMe channel projections") as error:
        train_in_process(["--model_type", "unet", "--dataset_name", "mnist5k", "--pretrained_model_name_or_path",
                          str(merged), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
