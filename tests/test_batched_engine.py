"""The engine's `batched` mode (one forward, one backward, per-cluster weight gradients summed inside the
backward: diffusers_ant/weighting/cluster_grads.py) against the split engine it must equal.

Tolerance (`engine_tolerance`): the two engines compute the same sums of the same products, in other
orders and batch compositions, so they differ by float32 rounding alone. tests/tolerances.py derives
the bound (Higham, "Accuracy and Stability of Numerical Algorithms", eq. 4.4): 2 gamma_L max |G|, L the
weight gradient's own sum over the chunk's samples and positions (12 x 8 x 8 = 768 terms here) plus
twice (forward and backward) the summed reduction lengths of the model's layers (6,704 for the tiny
UNet: L = 14,176, 1.7e-3 max |G|; 1,232 for the tiny DiT: 3.9e-4 max |G|). The written update
sum_i w_i G_i is itself the gradient of the weighted loss sum_i w_i L_i, so the same bound holds for it
with the update's own magnitude (the weights agree to their own rounding, checked beside it). A wrong
cluster (a sample's contribution in another row) moves an entry by about max |G| / K, a hundred times
more; the observed difference is about 1e-6 max |G|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_engine import K, RecordingGrads, engine_tolerance, flat_grad, loss_fn_for, make_batch, tiny_dit, tiny_unet
from tolerances import adam_run_tolerance, gradient_tolerance, low_precision_norm_tolerance
from trainer_utils import perturb_parameters

from diffusers_ant.weighting import get_weighting
from diffusers_ant.weighting.engine import TaskGradientEngine, weighted_backward

GRADIENT_METHODS = ["pcgrad", "nash_mtl", "imtl", "mgda", "cagrad"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only contends


def run_engine(model, params, batch, mode, weighting, chunk_size=None, subset=None, loss_fn=None, loss_scale=1.0):
    model.zero_grad(set_to_none=True)
    calls = []
    engine = TaskGradientEngine(params, mode=mode, subset=subset, modules=[model])
    stats = weighted_backward(weighting, loss_fn or loss_fn_for(model, batch, calls), batch[-1], K, engine=engine,
                              chunk_size=chunk_size, loss_scale=loss_scale)
    return engine.task_grads.clone(), flat_grad(params), stats, calls


@pytest.mark.parametrize("build", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_batched_equals_split_for_every_gradient_method(build):
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch()
    for method in GRADIENT_METHODS:
        split = run_engine(model, params, batch, "split", get_weighting(method, K, seed=4))
        batched = run_engine(model, params, batch, "batched", get_weighting(method, K, seed=4))
        assert len(batched[3]) == 1 and batched[3][0].numel() == batch[-1].numel()  # one forward, whole batch
        assert split[0].abs().max() > 1e-3
        assert (batched[0] - split[0]).abs().max() <= engine_tolerance(model, split[0], batch), method
        # the written update w @ G
        assert (batched[1] - split[1]).abs().max() <= engine_tolerance(model, split[1], batch), method
        # the weights, a function of the Gram matrix: its relative rounding carried through with the method's
        # conditioning taken as one, as the network's is (a wrong G moves them by tens of percent)
        relative = engine_tolerance(model, 1.0, batch)
        torch.testing.assert_close(batched[2]["weights"], split[2]["weights"], rtol=relative, atol=relative)
        torch.testing.assert_close(batched[2]["task_losses"], split[2]["task_losses"])


def test_windows_empty_clusters_and_subset_mode():
    """Gradient accumulation (a window of 10 samples forwarded in chunks of 3, which cut through clusters),
    an empty cluster, and subset mode (weights from the subset's task gradients, then one weighted pass:
    through the kept graph for one chunk, recomputed for several) all equal the split engine."""
    model = tiny_unet()
    params = list(model.parameters())
    task_ids = torch.tensor([3, 0, 1, 3, 0, 1, 1, 0, 3, 3])  # cluster 2 is empty
    batch = make_batch(batch_size=10, task_ids=task_ids)
    reference = run_engine(model, params, batch, "split", RecordingGrads(K, [0.2, 0.5, 0.9, 0.4]))
    for chunk_size in (None, 3):
        batched = run_engine(model, params, batch, "batched", RecordingGrads(K, [0.2, 0.5, 0.9, 0.4]), chunk_size)
        assert all(c.numel() <= (chunk_size or 10) for c in batched[3])
        assert torch.all(batched[0][2] == 0) and batched[2]["weights"][2] == 0
        assert (batched[0] - reference[0]).abs().max() <= engine_tolerance(model, reference[0], batch)
        assert (batched[1] - reference[1]).abs().max() <= engine_tolerance(model, reference[1], batch)

    subset = [model.up_blocks, model.conv_out]
    reference = run_engine(model, params, batch, "split", get_weighting("mgda", K), subset=subset)
    for chunk_size in (None, 3):
        batched = run_engine(model, params, batch, "batched", get_weighting("mgda", K), chunk_size, subset=subset)
        assert batched[0].shape == reference[0].shape
        assert (batched[0] - reference[0]).abs().max() <= engine_tolerance(model, reference[0], batch)
        assert (batched[1] - reference[1]).abs().max() <= engine_tolerance(model, reference[1], batch)


def lora_unet(train_base: bool):
    """tiny_unet with LoRA on its attention projections and its resnets' convolutions (peft's nn.Linear and
    nn.Conv2d adapter layers), the adapters perturbed away from peft's zero initialisation of B."""
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_unet()
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    model = inject_adapter_in_model(config, model)
    perturb_parameters(model, 0.05, seed=3, only="lora_")
    for name, p in model.named_parameters():
        p.requires_grad_(train_base or "lora_" in name)
    return model


def test_lora_adapters_alone_and_as_the_subset():
    """LoRA training (the adapters are the trainable parameters) and `--task_gradient_subset lora` (the task
    gradients over the adapters, the weights then applied to every trainable parameter)."""
    batch = make_batch()
    model = lora_unet(train_base=False)
    params = [p for p in model.parameters() if p.requires_grad]
    split = run_engine(model, params, batch, "split", get_weighting("pcgrad", K, seed=1))
    batched = run_engine(model, params, batch, "batched", get_weighting("pcgrad", K, seed=1))
    assert split[0].abs().max() > 1e-4
    assert (batched[0] - split[0]).abs().max() <= engine_tolerance(model, split[0], batch)
    assert (batched[1] - split[1]).abs().max() <= engine_tolerance(model, split[1], batch)

    model = lora_unet(train_base=True)
    params = list(model.parameters())
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    split = run_engine(model, params, batch, "split", get_weighting("imtl", K), subset=lora)
    batched = run_engine(model, params, batch, "batched", get_weighting("imtl", K), subset=lora)
    assert batched[0].shape[1] == sum(p.numel() for p in lora)
    assert (batched[0] - split[0]).abs().max() <= engine_tolerance(model, split[0], batch)
    assert (batched[1] - split[1]).abs().max() <= engine_tolerance(model, split[1], batch)


def test_fp16_with_a_grad_scaler_matches_split():
    """Under fp16 autocast with a loss scale the batched engine writes the scaled update, as the split
    engine does. Two fp16 evaluations differ by rounding: tests/tolerances.py's norm-wise bound for two
    evaluations (2.8e-2 for the tiny UNet; observed 9e-4), where a wrong cluster moves the update by tens
    of percent."""
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch()
    base = loss_fn_for(model, batch)

    def fp16(idx):
        with torch.autocast("cpu", dtype=torch.float16):
            return base(idx)

    results = {mode: run_engine(model, params, batch, mode, get_weighting("cagrad", K), loss_fn=fp16,
                                loss_scale=2.0**12) for mode in ("split", "batched")}
    split, batched = results["split"][1], results["batched"][1]
    assert not bool(results["batched"][2]["found_inf"])
    assert torch.isfinite(batched).all() and split.abs().max() > 1e-3
    assert ((batched - split).norm() / split.norm()).item() < low_precision_norm_tolerance(model, torch.float16, 2)


class LayoutZoo(nn.Module):
    """Convolutions whose activations come in each layout the batched mode handles differently: a 1x1
    convolution on channels-first activations (per-sample `bmm`), one whose (O, C) products would outgrow
    its activations (transposing copy), one on channels-last activations (free views), a 1x1 Conv1d and
    a channels-last 1x1 Conv3d,
    and 3x3 convolutions whose output gradient is laid out unlike their input (channels-last input,
    contiguous gradient) or in no layout at all (sliced out of a concatenation's gradient)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise_first = nn.Conv2d(8, 6, 1)     # 6 * 8 <= 64 * (6 + 8): bmm
        self.pointwise_wide = nn.Conv2d(6, 40, 1)     # at 2x2: 40 * 6 > 4 * 46: transposing copy
        self.pointwise_last = nn.Conv2d(8, 5, 1)      # channels-last: views
        self.mixed = nn.Conv2d(8, 4, 3, padding=1)    # channels-last input, contiguous output gradient
        self.sliced = nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect")  # output gradient a slice
        self.line = nn.Conv1d(8, 3, 1)
        self.volume = nn.Conv3d(2, 4, 1)

    def forward(self, x):
        h = torch.tanh(self.stem(x))                                        # (B, 8, 8, 8)
        first = self.pointwise_first(h)
        wide = self.pointwise_wide(F.avg_pool2d(torch.tanh(first), 4))      # (B, 40, 2, 2)
        h_last = h.contiguous(memory_format=torch.channels_last)
        last = self.pointwise_last(h_last)
        if last.requires_grad:  # its output gradient channels-last too (torch's own backward gives it contiguous)
            last.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last))
        mixed = self.mixed(h_last).contiguous()                             # its output gradient: contiguous
        both = torch.cat([self.sliced(h), h[:, :4]], 1)                     # sliced's gradient is a slice of both's
        line = self.line(h.flatten(2))                                      # (B, 3, 64)
        volume = self.volume(h.reshape(-1, 2, 4, 8, 8).contiguous(memory_format=torch.channels_last_3d))
        if volume.requires_grad:
            volume.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last_3d))
        parts = [first, wide, last, mixed, both, line, volume]
        # (a mean over the non-batch dimensions keeps each part's layout in its gradient; flatten would not)
        return sum(part.pow(2).mean(tuple(range(1, part.dim()))) for part in parts)


def test_every_activation_layout_of_a_convolution_matches_split(monkeypatch):
    from diffusers_ant.weighting import cluster_grads

    torch.manual_seed(0)
    model = LayoutZoo()
    params = list(model.parameters())
    x, ids = torch.randn(10, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 0])
    transposed, layouts = [], {}
    original = cluster_grads.ClusterGradientRecorder._matmul_rows
    monkeypatch.setattr(cluster_grads.ClusterGradientRecorder, "_matmul_rows",
                        lambda self, weight, *a: transposed.append(weight) or original(self, weight, *a))
    original_conv = cluster_grads.ClusterGradientRecorder._conv

    def conv(self, module, x, dy, *rest):  # the layouts each convolution's hook received
        layouts[module] = (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                           dy.is_contiguous(), dy.is_contiguous(memory_format=torch.channels_last))
        return original_conv(self, module, x, dy, *rest)

    monkeypatch.setattr(cluster_grads.ClusterGradientRecorder, "_conv", conv)
    task_grads = {}
    for mode in ("split", "batched"):
        engine = TaskGradientEngine(params, mode=mode, modules=[model])
        model.zero_grad(set_to_none=True)
        weighted_backward(get_weighting("pcgrad", K), lambda idx: model(x[idx]), ids, K, engine=engine)
        task_grads[mode] = engine.task_grads.clone()
    # the 3x3 cases the model is for: a channels-last input with a contiguous output gradient, and an output
    # gradient in no layout at all
    assert layouts[model.mixed] == (True, True, False) and layouts[model.sliced][1:] == (False, False)
    # the two routes of a 1x1 convolution that are not per-sample products went through `_matmul_rows`
    assert {id(w) for w in transposed} == {id(model.pointwise_wide.weight), id(model.pointwise_last.weight),
                                           id(model.volume.weight)}
    # sums of at most 3 samples x 64 positions for a weight gradient, and the layers' reductions on the way
    # (module docstring), against max |G|
    split, batched = task_grads["split"], task_grads["batched"]
    assert split.abs().max() > 1e-3
    assert (batched - split).abs().max() <= gradient_tolerance(model, split, summed_terms=3 * 64)


class WithBareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.proj(x) * self.scale


class FoldsTheBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)

    def forward(self, x):  # (B, 4) -> (2B, 2): rows are no longer samples
        return self.proj(x.reshape(-1, 2)).reshape(x.shape[0], -1)


class FoldsSmallBatches(nn.Module):
    """Keeps samples on the first dimension for batches of 4 or more, folds smaller ones."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.folded = False

    def forward(self, x):
        if x.shape[0] >= 4:
            return torch.cat([self.proj(x[:, :2]), self.proj(x[:, 2:])], 1)
        self.folded = True
        return self.proj(x.reshape(-1, 2)).reshape(x.shape[0], -1)


def test_models_it_cannot_cover_are_refused_with_the_fix():
    model = WithBareParameter()
    with pytest.raises(ValueError, match=r"WithBareParameter\.scale.*mode='split'"):
        TaskGradientEngine(list(model.parameters()), mode="batched", modules=[model])
    with pytest.raises(ValueError, match="modules=\\[model\\]"):
        TaskGradientEngine(list(model.parameters()), mode="batched")

    model = FoldsTheBatch()
    x, ids = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 2, 3])
    engine = TaskGradientEngine(list(model.parameters()), mode="batched", modules=[model])
    with pytest.raises(RuntimeError, match="keep the samples on the first dimension"):
        engine.backward(get_weighting("pcgrad", K), lambda idx: model(x[idx]).pow(2).mean(1), ids, K)
    # the hooks are gone after the failure: the model runs as before
    assert not model.proj._forward_hooks


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion pipeline folder (RGB), the pretrained model of a LoRA run."""
    from diffusers_ant.models import get_model_adapter

    folder = tmp_path_factory.mktemp("tiny-sd")
    get_model_adapter("sd").load(model_config_name_or_path="tiny", resolution=16, num_channels=3).save(str(folder))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("model_type, extra", [
    ("unet", ["--gradient_accumulation_steps", "2", "--train_batch_size", "4"]),
    ("sd", ["--rank", "4", "--task_gradient_subset", "lora"]),
], ids=["unet-accumulation", "sd-lora-subset"])
def test_trainer_batched_equals_split(model_type, extra, tmp_path, request, caplog, monkeypatch):
    """`train_ant.py --task_gradients batched` takes the split engine's steps: a UNet over windows of two
    micro-batches, and Stable Diffusion's UNet2DConditionModel (cross-attention, LayerNorm, GEGLU) with LoRA
    and `--task_gradient_subset lora`. Adam's epsilon is large so that the update is a smooth function of
    the gradient: Adam's first step is lr g / (|g| + 1), whose derivative in g is at most lr. The bound is
    tests/tolerances.py's `adam_run_tolerance`: each step's gradient rounding (the module docstring's bound,
    L: the window's samples x positions plus twice the trained denoiser's layer reductions, LoRA layers
    included) and its clipping coefficient's, scaled by the largest gradient entry that step applied
    (recorded), carried through Adam's averages over the two steps at lr = 1: about 1.5e-3 for the UNet and
    9e-5 for the LoRA (observed: 6e-8 and 2e-8), where the two steps move the weights by about 0.2 (0.01 for
    LoRA B, which starts at zero) and a wrong gradient by about lr |g|."""
    from trainer_utils import (TINY_RUN, assert_same_tensors, largest_difference, largest_gradients,
                               load_safetensors_dir, train_in_process)

    dataset = {"unet": "mnist5k", "sd": "mnist5k_captions"}[model_type]
    if model_type == "sd":  # LoRA on a pretrained pipeline
        extra = [*extra, "--pretrained_model_name_or_path", str(request.getfixturevalue("tiny_sd_folder"))]
    weights, modes = {}, []
    backward = TaskGradientEngine.backward

    def recorded(self, *args, **kwargs):  # which engine the trainer's flag gave (equal weights prove nothing else)
        modes.append(self.mode)
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(TaskGradientEngine, "backward", recorded)
    for engine in ("split", "batched"):
        modes.clear()
        out = tmp_path / engine
        run = ["--model_type", model_type, "--dataset_name", dataset, "--output_dir", str(out), *TINY_RUN]
        if model_type == "sd":
            i = run.index("--model_config_name_or_path")
            del run[i:i + 2]
        with largest_gradients() as applied:
            train_in_process([*run, "--mtl_method", "pcgrad", "--task_gradients", engine, "--max_train_steps", "2",
                              "--adam_epsilon", "1", "--learning_rate", "1", "--max_train_samples", "16",
                              "--num_validation_images", "1", *extra])
        assert set(modes) == {engine} and len(modes) == 2, (engine, modes)
        if engine == "split":
            largest = applied
        weights[engine] = {k: v for k, v in load_safetensors_dir(out).items()
                           if not k.startswith(("checkpoint-", "vae/", "text_encoder/")) and "samples" not in k}
    assert weights["split"]
    from diffusers_ant.models import load_pipeline

    denoiser = load_pipeline(str(tmp_path / "split")).unet  # (with its LoRA layers, for sd)
    window = 8 * denoiser.config.sample_size ** 2  # samples per update x positions
    assert len(largest) == 2
    # (the clipping norm: torch's clip_grad_norm_, per tensor, then across the trained tensors)
    trained = [p.numel() for name, p in denoiser.named_parameters() if model_type != "sd" or "lora" in name]
    tolerance = adam_run_tolerance(denoiser, largest, window, 1.0, 1.0,
                                   max(float(v.abs().max()) for v in weights["split"].values()),
                                   clip_norm_terms=max(trained) + len(trained) + 1)
    difference = largest_difference(weights["batched"], weights["split"])
    print(f"batched - split: {difference:.3g} (tolerance {tolerance:.3g})")
    assert_same_tensors(weights["batched"], weights["split"], atol=tolerance)
    if model_type == "sd":  # peft starts B at zero: what it holds now is the two steps' movement
        assert max(float(v.abs().max()) for k, v in weights["split"].items() if "lora.up" in k) > 20 * tolerance
        # PCGrad on a subset is said to be a heuristic outside it, once per run (LibMTL refuses it)
        said = [r.getMessage() for r in caplog.records if "a heuristic for the rest" in r.getMessage()]
        assert len(said) == 2 and "pcgrad on the per-cluster gradients of --task_gradient_subset lora" in said[0]
    else:
        assert not any("a heuristic for the rest" in r.getMessage() for r in caplog.records)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_gradient_checkpointing_is_refused():
    from diffusers_ant.training.args import UsageError, parse_args

    with pytest.raises(UsageError, match="gradient checkpointing"):
        parse_args(["--model_type", "unet", "--model_config_name_or_path", "tiny", "--dataset_name", "mnist5k",
                    "--mtl_method", "pcgrad", "--task_gradients", "batched", "--gradient_checkpointing"])
    # the engine itself: a layer run without gradients inside the closure (what reentrant checkpointing does)
    model = tiny_unet()
    batch = make_batch()
    base = loss_fn_for(model, batch)
    reentrant = lambda idx: torch.utils.checkpoint.checkpoint(base, idx, use_reentrant=True)  # noqa: E731
    engine = TaskGradientEngine(list(model.parameters()), mode="batched", modules=[model])
    with pytest.raises(RuntimeError, match="gradients disabled"):
        engine.backward(get_weighting("pcgrad", K), reentrant, batch[-1], K)


def test_auto_mode_takes_batched_where_it_runs_and_split_elsewhere():
    model = tiny_unet()
    assert TaskGradientEngine(list(model.parameters()), mode="auto", modules=[model]).mode == "batched"
    # no modules to hook, a sharded engine, a parameter outside the covered layers: split, with the reason
    assert TaskGradientEngine(list(model.parameters()), mode="auto").mode == "split"
    assert TaskGradientEngine(list(model.parameters()), mode="auto", modules=[model], lockstep=True).mode == "split"
    bare = WithBareParameter()
    engine = TaskGradientEngine(list(bare.parameters()), mode="auto", modules=[bare])
    assert engine.mode == "split" and "WithBareParameter.scale" in engine.auto_reason


def test_auto_mode_falls_back_to_split_when_the_forward_pass_defeats_batched():
    """A model the batched mode only finds out about in the forward pass (rows that are not samples):
    `auto` runs the window again in split mode, with split's gradients, and stays there."""
    model = FoldsTheBatch()
    x, ids = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 2, 3])
    loss = lambda idx: model(x[idx]).pow(2).mean(1)  # noqa: E731
    auto = TaskGradientEngine(list(model.parameters()), mode="auto", modules=[model])
    assert auto.mode == "batched"
    auto.backward(get_weighting("pcgrad", K, seed=1), loss, ids, K)
    split = TaskGradientEngine(list(model.parameters()), mode="split")
    split.backward(get_weighting("pcgrad", K, seed=1), loss, ids, K)
    assert auto.mode == "split" and "first dimension" in auto.auto_reason
    assert split.task_grads.abs().max() > 0 and torch.equal(auto.task_grads, split.task_grads)
    assert not model.proj._forward_hooks

    # a window of two chunks whose SECOND chunk defeats the batched mode: what the first chunk added is
    # dropped, the task losses and gradients are split's
    model = FoldsSmallBatches()
    x, ids = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 2, 3])
    loss = lambda idx: model(x[idx]).pow(2).mean(1)  # noqa: E731
    auto = TaskGradientEngine(list(model.parameters()), mode="auto", modules=[model])
    auto_stats = auto.backward(get_weighting("pcgrad", K, seed=1), loss, ids, K, chunk_size=4)
    split = TaskGradientEngine(list(model.parameters()), mode="split")
    split_stats = split.backward(get_weighting("pcgrad", K, seed=1), loss, ids, K, chunk_size=4)
    assert auto.mode == "split" and model.folded  # the batched pass did reach the second chunk
    assert torch.equal(auto.task_grads, split.task_grads)
    assert torch.equal(auto_stats["task_losses"], split_stats["task_losses"])


def test_auto_mode_falls_back_to_split_when_the_batched_pass_runs_out_of_memory():
    """`auto` chose batched, which needs about twice split's memory: an out-of-memory error in its pass
    (raised here by the first forward, as a CUDA allocator would) runs the window again in split mode, with
    split's gradients, and stays there. Asked for by name, batched lets the error through."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, ids = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 2, 3])
    calls = []

    def loss(idx):
        calls.append(idx.numel())
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(x[idx]).pow(2).mean(1)

    auto = TaskGradientEngine(list(model.parameters()), mode="auto", modules=[model])
    assert auto.mode == "batched"
    auto.backward(get_weighting("pcgrad", K, seed=1), loss, ids, K)
    assert auto.mode == "split" and "out of device memory" in auto.auto_reason
    split = TaskGradientEngine(list(model.parameters()), mode="split")
    split.backward(get_weighting("pcgrad", K, seed=1), lambda idx: model(x[idx]).pow(2).mean(1), ids, K)
    assert split.task_grads.abs().max() > 0 and torch.equal(auto.task_grads, split.task_grads)
    assert not any(m._forward_hooks for m in model.modules())

    calls.clear()
    named = TaskGradientEngine(list(model.parameters()), mode="batched", modules=[model])
    with pytest.raises(torch.OutOfMemoryError):
        named.backward(get_weighting("pcgrad", K, seed=1), loss, ids, K)


def test_trainer_default_engine_is_batched_and_split_under_gradient_checkpointing():
    from diffusers_ant.models import get_model_adapter
    from diffusers_ant.training.args import parse_args
    from diffusers_ant.training.components import build_task_gradient_engine

    args = parse_args(["--model_type", "unet", "--model_config_name_or_path", "tiny", "--dataset_name", "mnist5k",
                       "--mtl_method", "pcgrad"])
    assert args.task_gradients == "auto"
    adapter = get_model_adapter("unet").load(model_config_name_or_path="tiny", resolution=8, num_channels=1)
    params = adapter.trainable_parameters()
    assert build_task_gradient_engine(adapter, params, args.task_gradients, None).mode == "batched"
    engine = build_task_gradient_engine(adapter, params, args.task_gradients, None, gradient_checkpointing=True)
    assert engine.mode == "split"
    # a run that asks for split gets split
    assert build_task_gradient_engine(adapter, params, "split", None).mode == "split"
