"""BitFit and DiffFit (diffusers_ant.peft_modes) on tiny models of all four model types.

What must hold: a few optimizer steps change only the parameters the mode trains (every other one
stays bit-identical); DiffFit's gamma = 1 leaves the output unchanged; merged scales give the same
output as unmerged ones, and the merged model is a plain diffusers model (no extra parameter) that
save_pretrained / from_pretrained reload exactly.

Tolerance of a merge: folding a scale into its layer's weight ((gamma W) x against gamma (W x)) changes
only the rounding, so merged and unmerged outputs are within tests/tolerances.py's `output_tolerance`:
2 gamma_L max |output|, L the summed reduction lengths of the model's layers (1,232 for the tiny DiT to
18,016 for the SD UNet: 3e-4 to 2.6e-3 max |output|; observed about 1e-6). Scales that did nothing, or
were applied twice, move the output by 0.1 to 0.8: 87 to 720 times the bound.
"""

import copy

import pytest
import torch

from diffusers_ant.peft_modes import (
    DIFFFIT_SCALE_NAMES,
    apply_finetune_mode,
    difffit_merged_copy,
    has_difffit_scales,
    merge_difffit_scales,
    parameter_groups,
    validate_finetune_mode,
)
from tolerances import output_tolerance

# ----------------------------------------------------------------------------- tiny models


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, num_class_embeds=3,
    )


def tiny_dit(num_layers=2):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                 num_layers=num_layers, sample_size=8, patch_size=2, num_embeds_ada_norm=3)


def is_scale(name):
    return name.rsplit(".", 1)[-1] in DIFFFIT_SCALE_NAMES


def tiny_sd_unet():
    from diffusers import UNet2DConditionModel

    from diffusers_ant.models.presets import TINY_UNET2D_CONDITION

    torch.manual_seed(0)
    config = dict(TINY_UNET2D_CONDITION, sample_size=8, in_channels=4, out_channels=4)
    return UNet2DConditionModel(**config)


def tiny_controlnet():
    from diffusers import ControlNetModel

    model = ControlNetModel.from_unet(tiny_sd_unet(), conditioning_embedding_out_channels=(16, 32))
    # as if trained: zero convolutions with zero weights would make every output 0
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model


BUILDERS = {"unet": tiny_unet, "dit": tiny_dit, "sd": tiny_sd_unet, "controlnet": tiny_controlnet}


def inputs(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([10, 700])
    if kind in ("unet", "dit"):
        return {"x": torch.randn(2, 1, 8, 8, generator=g), "t": t, "labels": torch.tensor([0, 2])}
    return {
        "x": torch.randn(2, 4, 8, 8, generator=g),
        "t": t,
        "text": torch.randn(2, 5, 32, generator=g),
        "cond": torch.rand(2, 3, 16, 16, generator=g),
    }


def forward(kind, model, batch):
    """One output tensor per model (a ControlNet's residuals concatenated)."""
    if kind == "unet":
        return model(batch["x"], batch["t"], class_labels=batch["labels"]).sample
    if kind == "dit":
        return model(batch["x"], timestep=batch["t"], class_labels=batch["labels"]).sample
    if kind == "sd":
        return model(batch["x"], batch["t"], encoder_hidden_states=batch["text"]).sample
    down, mid = model(batch["x"], batch["t"], encoder_hidden_states=batch["text"], controlnet_cond=batch["cond"],
                      return_dict=False)
    return torch.cat([r.flatten(1) for r in (*down, mid)], dim=1)


def train_steps(kind, model, steps=3):
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        batch = inputs(kind, seed=10 + step)
        out = forward(kind, model, batch)
        loss = (out - 0.5).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ----------------------------------------------------------------------------- only the chosen parameters train


@pytest.mark.parametrize("mode", ["bitfit", "difffit"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_only_the_mode_s_parameters_change(kind, mode):
    model = BUILDERS[kind]()
    summary = apply_finetune_mode(model, mode)
    groups = parameter_groups(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert summary.trainable_parameters == sum(p.numel() for n, p in model.named_parameters() if n in trained)
    assert 0 < summary.trainable_parameters < summary.total_parameters
    assert str(summary).startswith("BitFit" if mode == "bitfit" else "DiffFit")

    # what the mode selects: every bias (BitFit); DiffFit adds norms, embeddings and one gamma per branch
    all_biases = {n for n in groups if n.endswith(".bias")}
    zero_convs = {n for n, g in groups.items() if g == "zero_conv"}
    assert (zero_convs != set()) == (kind == "controlnet")
    if mode == "bitfit":
        assert trained == all_biases | zero_convs
        assert not has_difffit_scales(model)
    else:
        scales = {n for n in groups if is_scale(n)}
        assert scales and scales <= trained and all_biases <= trained
        # DiT's LayerNorms have no affine parameters (adaLN-Zero modulates them): no norm group there
        expected_groups = {"scale", "bias"} | ({"norm"} if kind != "dit" else set())
        expected_groups |= {"class_embedding"} if kind in ("unet", "dit") else set()
        assert expected_groups <= {groups[n] for n in trained} and ("norm" in groups.values()) == (kind != "dit")
        # the authors' selection: embedding MLPs (the time MLP) keep their weights, train their biases
        mlp = {n for n, g in groups.items() if g == "time_embedding"}
        assert mlp and {n for n in mlp if n in trained} == {n for n in mlp if n.endswith(".bias")}
        # scales in the first half of the blocks only: DiT's first of 2 blocks (q, k, v 3 + output 2 +
        # FF 1 = 6); a UNet's down blocks: UNet2DModel 2 resnets + 1 attention (3 + 2) = 7; the SD UNet
        # and its ControlNet 2 resnets + self- and cross-attention (5 + 5) + 1 FF = 13
        first_half = "transformer_blocks.0." if kind == "dit" else "down_blocks."
        assert all(n.startswith(first_half) for n in scales)
        expected_scales = {"unet": 7, "dit": 6, "sd": 13, "controlnet": 13}[kind]
        assert summary.num_scales == len(scales) == expected_scales
        # DiT's adaLN modulation Linear is not a norm parameter: only its bias trains
        assert all(not n.endswith("norm1.linear.weight") for n in trained)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(kind, model)
    after = dict(model.named_parameters())
    frozen_changed = [n for n in before if n not in trained and not torch.equal(before[n], after[n])]
    assert frozen_changed == []
    changed = {n for n in trained if not torch.equal(before[n], after[n])}
    assert changed, "the optimizer changed nothing"
    changed_groups = {groups[n] for n in changed}
    assert "bias" in changed_groups
    if mode == "difffit":
        assert expected_groups <= changed_groups


# ----------------------------------------------------------------------------- gamma = 1 and merging


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_difffit_scales_start_neutral_and_merge_exactly(kind, tmp_path):
    original = BUILDERS[kind]().eval()
    model = copy.deepcopy(original)
    apply_finetune_mode(model, "difffit")
    batch = inputs(kind)
    with torch.no_grad():
        reference = forward(kind, original, batch)
        assert torch.equal(forward(kind, model, batch), reference)  # gamma = 1: bit-identical output

        # trained-looking scales change the output (the hooks are live) ...
        g = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if is_scale(name):
                param.copy_(torch.rand(param.shape, generator=g) + 0.5)
        scaled = forward(kind, model, batch)
        tolerance = output_tolerance(original, scaled)  # module docstring
        assert (scaled - reference).abs().max() > 100 * tolerance

        # ... and folding them into the weights keeps that output, with no parameter left over
        merged = difffit_merged_copy(model)
        assert has_difffit_scales(model) and not has_difffit_scales(merged)
        assert [n for n, _ in merged.named_parameters()] == [n for n, _ in original.named_parameters()]
        torch.testing.assert_close(forward(kind, merged, batch), scaled, rtol=0, atol=tolerance)
        assert not any(merged._forward_hooks for merged in merged.modules())

    # plain diffusers reloads the merged model: no missing or unexpected key, same output
    merged.save_pretrained(tmp_path, safe_serialization=True)
    reloaded, info = type(original).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    with torch.no_grad():
        torch.testing.assert_close(forward(kind, reloaded.eval(), batch), scaled, rtol=0, atol=tolerance)


def reference_difffit_dit(hidden, depth, patch, in_channels, out_channels, num_classes, mlp_ratio=4,
                           frequencies=256, gamma_blocks=14, sample_size=32):
    """(trainable, total) parameters of the authors' DiffFit DiT (thuml/Diffusion-Tuning models.py with
    use_gamma, train.py diff_fit: names holding bias / norm / gamma / y_embed), counted from its layers."""
    d, patches = hidden, (sample_size // patch) ** 2
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    block = linear(d, 3 * d) + linear(d, d) + linear(d, mlp_ratio * d) + linear(mlp_ratio * d, d) + linear(d, 6 * d)
    total = (in_channels * patch * patch * d + d  # x_embedder (a conv)
             + linear(frequencies, d) + linear(d, d)  # t_embedder.mlp
             + (num_classes + 1) * d  # y_embedder, with the null row
             + depth * block + linear(d, 2 * d) + linear(d, patch * patch * out_channels)  # blocks, final layer
             + gamma_blocks * 6 * d  # attn.gamma1 (qkv, 3d), attn.gamma2, block gamma1, gamma2
             + patches * d)  # pos_embed: a frozen parameter there
    biases = (d + 2 * d + depth * (3 * d + d + mlp_ratio * d + d + 6 * d)  # x / t embedders, blocks
              + 2 * d + patch * patch * out_channels)  # final layer
    trainable = biases + gamma_blocks * 6 * d + (num_classes + 1) * d  # norms: DiT's have no parameters
    return trainable, total, patches * d


def test_difffit_on_dit_xl2_trains_what_the_authors_code_trains():
    """DiT-XL/2 from its config (not downloaded; allocated without initialisation, only the embedders
    written): DiffFit trains exactly the authors' selection, about a quarter of a percent, not the
    ~11% that training every block's time MLP and label table gave."""
    from accelerate import init_empty_weights
    from diffusers import DiTTransformer2DModel

    from diffusers_ant.peft_modes import _embedding_copies

    config = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    with init_empty_weights():
        model = DiTTransformer2DModel(**config)
    model.to_empty(device="cpu")  # untouched pages are never committed: little memory
    # a converted checkpoint: convert_dit_to_diffusers.py copies DiT's one t / y embedder into every block
    copies = [module for _, _, module in _embedding_copies(model)]
    assert len(copies) == 28
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in copies[0].parameters():
            param.copy_(torch.randn(param.shape, generator=g))
        for module in copies[1:]:
            for param, source in zip(module.parameters(), copies[0].parameters()):
                param.copy_(source)
    summary = apply_finetune_mode(model, "difffit")
    trainable, total, pos_embed = reference_difffit_dit(1152, 28, 2, 4, 8, 1000)
    assert summary.trainable_parameters == trainable  # 1,739,552
    assert summary.total_parameters == total - pos_embed  # diffusers keeps pos_embed as a buffer
    assert summary.shared_embedding_blocks == 28 and summary.num_scales == 14 * 6
    assert summary.groups["class_embedding"] == 1001 * 1152 and summary.groups["scale"] == 14 * 6 * 1152
    assert abs(summary.fraction - trainable / total) < 1e-5  # 0.258% of the authors' model
    assert "0.26%" in summary.description and "one table, shared by 28 blocks" in summary.description


def test_equal_embedding_copies_train_as_one_table(tmp_path):
    """A DiT whose blocks hold equal embedder copies (a converted DiT) trains one label table and one set
    of time biases: sharing changes no output, the copies stay equal through training, and the saved
    model gives every block its copy back (plain diffusers loads it)."""
    unequal = tiny_dit(num_layers=4)
    separate = apply_finetune_mode(copy.deepcopy(unequal), "difffit")
    assert separate.shared_embedding_blocks == 0  # random copies differ: each block's table trains
    model = unequal
    copies = [block.norm1.emb for block in model.transformer_blocks]
    for other in copies[1:]:
        other.load_state_dict(copies[0].state_dict())
    original = copy.deepcopy(model).eval()
    summary = apply_finetune_mode(model, "difffit")
    assert summary.shared_embedding_blocks == 4
    table, time_biases = 4 * 16, 2 * 16  # (3 classes + null) x hidden 16; two time-MLP biases of 16
    assert separate.trainable_parameters - summary.trainable_parameters == 3 * (table + time_biases)
    assert summary.groups["class_embedding"] == table
    batch = inputs("dit")
    with torch.no_grad():
        assert torch.equal(forward("dit", model.eval(), batch), forward("dit", original, batch))
    train_steps("dit", model)
    merged = difffit_merged_copy(model)
    blocks = merged.transformer_blocks
    assert all(blocks[i].norm1.emb is not blocks[0].norm1.emb for i in range(1, 4))
    trained_table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert not torch.equal(trained_table, original.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight)
    for block in blocks:
        assert torch.equal(block.norm1.emb.class_embedder.embedding_table.weight, trained_table)
    merged.save_pretrained(tmp_path, safe_serialization=True)
    reloaded, info = type(original).from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    with torch.no_grad():
        scaled = forward("dit", model.eval(), batch)
        # the merge's rounding alone (module docstring: 4.6e-4); training moved the output by 0.4, and a merge that
        # gave blocks 1-3 their untrained tables would move it by 0.018, 40x the bound
        tolerance = output_tolerance(original, scaled)
        torch.testing.assert_close(forward("dit", reloaded.eval(), batch), scaled, rtol=0, atol=tolerance)


def test_merge_in_place_and_twice_is_a_no_op():
    model = tiny_unet().eval()
    once = apply_finetune_mode(model, "difffit").num_scales
    twice = apply_finetune_mode(model, "difffit")  # adds no second set of scales
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    scaled_layers = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if is_scale(n)}
    assert twice.num_scales == once == sum(is_scale(n) for n, _ in model.named_parameters())
    assert hooks == len(scaled_layers) == once - 1  # the attention output carries two scales, one hook
    batch = inputs("unet")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_scale(name):
                param.fill_(0.75)
        before = forward("unet", model, batch)
        assert merge_difffit_scales(model) is model
        merge_difffit_scales(model)
        # one merge's rounding (module docstring: 1.2e-3); a second fold of 0.75 would move the output by 0.1
        torch.testing.assert_close(forward("unet", model, batch), before, rtol=0, atol=output_tolerance(model, before))


def test_full_mode_and_bad_modes():
    model = tiny_unet()
    apply_finetune_mode(model, "bitfit")
    summary = apply_finetune_mode(model, "full")
    assert summary.trainable_parameters == summary.total_parameters and summary.groups == {"all": summary.total_parameters}
    with pytest.raises(ValueError, match=r"unknown --finetune 'adapters': choose one of full, lora, bitfit, difffit"):
        apply_finetune_mode(model, "adapters")
    with pytest.raises(ValueError, match="call ModelAdapter.add_lora"):
        apply_finetune_mode(model, "lora")
    with pytest.raises(ValueError, match="--rank is the LoRA rank and does not apply to --finetune difffit"):
        validate_finetune_mode("difffit", rank=4)
    assert validate_finetune_mode("lora", rank=4) == "lora"


def test_lora_mode_counts_the_adapter():
    from peft import LoraConfig

    from diffusers_ant.models.lora import attach_lora

    model = tiny_unet()
    attach_lora(model, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    summary = apply_finetune_mode(model, "lora")
    assert set(summary.groups) == {"lora"} and summary.trainable_parameters == summary.groups["lora"] > 0


@pytest.mark.slow
def test_difffit_on_a_converted_dit_trains_resumes_and_saves_one_table(tmp_path, capsys):
    """Through train_ant.py: a DiT whose blocks hold equal embedder copies trains them as one module
    (the printed share says so), its checkpoints hold that module once and resume exactly, and the saved
    folder gives every block its copy back, all equal, trained, loadable by plain diffusers."""
    from diffusers import DiTTransformer2DModel

    from diffusers_ant.models import get_model_adapter
    from trainer_utils import TINY_RUN, assert_same_tensors, load_safetensors_dir, train_in_process

    torch.manual_seed(0)
    adapter = get_model_adapter("dit").load(model_config_name_or_path="tiny", resolution=16, num_channels=1,
                                            num_classes=10)
    blocks = adapter.model.transformer_blocks
    for block in blocks[1:]:  # as convert_dit_to_diffusers.py writes DiT's one embedder into every block
        block.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    pretrained = tmp_path / "pretrained"
    adapter.save(str(pretrained))

    def run(out, steps, *extra):
        args = ["--model_type", "dit", "--dataset_name", "mnist5k", "--output_dir", str(out), *TINY_RUN,
                "--pretrained_model_name_or_path", str(pretrained), "--finetune", "difffit", "--use_ema",
                "--learning_rate", "1e-2", "--checkpointing_steps", "1", "--max_train_steps", str(steps), *extra]
        i = args.index("--model_config_name_or_path")
        del args[i:i + 2]
        train_in_process(args)

    run(tmp_path / "straight", 2)
    assert f"one table, shared by {len(blocks)} blocks" in capsys.readouterr().out
    checkpoint = load_safetensors_dir(tmp_path / "straight" / "checkpoint-1")
    assert sum("class_embedder" in key for key in checkpoint) == 1  # the shared table, once
    run(tmp_path / "resumed", 1)
    run(tmp_path / "resumed", 2, "--resume_from_checkpoint", "latest")
    straight = load_safetensors_dir(tmp_path / "straight" / "transformer")
    assert_same_tensors(load_safetensors_dir(tmp_path / "resumed" / "transformer"), straight)
    model = DiTTransformer2DModel.from_pretrained(tmp_path / "straight" / "transformer")
    tables = [block.norm1.emb.class_embedder.embedding_table.weight for block in model.transformer_blocks]
    before = blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert not torch.equal(tables[0], before) and all(torch.equal(t, tables[0]) for t in tables)


@pytest.mark.slow
def test_bitfit_under_bf16_saves_the_weights_it_left_alone_bit_for_bit(tmp_path):
    """BitFit trains the biases only, and its output is the whole model: the weights it never trained were
    cast to bf16 for the run (as a LoRA run's frozen base) and lifted back to float32 for the save, which
    cannot restore the dropped bits (a 3x3 convolution's weights moved by ~5e-4). They now stay float32."""
    from diffusers_ant.models import get_model_adapter
    from trainer_utils import TINY_RUN, load_safetensors_dir, train_in_process

    torch.manual_seed(0)
    get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=16, num_channels=1).save(
        str(tmp_path / "pretrained"))
    args = ["--model_type", "unet", "--dataset_name", "mnist5k", "--output_dir", str(tmp_path / "out"), *TINY_RUN,
            "--pretrained_model_name_or_path", str(tmp_path / "pretrained"), "--finetune", "bitfit",
            "--mixed_precision", "bf16", "--max_train_steps", "2", "--learning_rate", "1e-2"]
    i = args.index("--model_config_name_or_path")
    del args[i:i + 2]
    train_in_process(args)
    before = load_safetensors_dir(tmp_path / "pretrained" / "unet")
    after = load_safetensors_dir(tmp_path / "out" / "unet")
    weights = [k for k in before if k.endswith(".weight") and before[k].dim() > 1]
    assert weights and all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in weights)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith(".bias"))  # it did train
