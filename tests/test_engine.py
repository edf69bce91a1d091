"""The per-task gradient engine (diffusers_ant/weighting/engine.py) on tiny diffusers models.

Tolerances (`engine_tolerance`): the engine's modes, the brute-force reference and a window forwarded in
chunks compute the same task gradients as sums of the same products in other orders and batch
compositions, so they differ by float32 rounding alone: tests/tolerances.py's `gradient_tolerance`, whose
L is the weight gradient's own sum over the batch's samples and positions plus twice (forward and backward)
the model's summed layer reductions (tiny UNet: 12 x 64 + 2 x 6,704 = 14,176 terms, 1.7e-3 max |G|). A
written update w @ G is itself the gradient of the weighted loss, so the same bound holds with its own
magnitude. A real defect (a sample in another task's row, a missing task, an unscaled accumulation) moves
entries by max |G| / K or more, a hundred times the bound.
"""

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from tolerances import (gradient_tolerance, low_precision_norm_tolerance, path_reduction_length,
                        sum_reordering_tolerance, unit_roundoff)

from diffusers_ant.weighting import get_weighting
from diffusers_ant.weighting.base import GRAM_CHUNK, GradientWeighting, gram_matrix
from diffusers_ant.weighting.engine import TaskGradientEngine, combine_task_losses, weighted_backward

K = 4


def gram_error_bound(g: torch.Tensor) -> torch.Tensor:
    """Worst-case error of `gram_matrix`'s float32 path: each entry is a sum over chunks of float32 dot
    products of at most GRAM_CHUNK terms, whose error is at most n u sum_p |g_ip g_jp| (u = 2^-24;
    Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), then summed in float64 (its
    error ~1e-16 relative, covered by the 1% margin)."""
    a = g.abs().double()
    return 1.01 * GRAM_CHUNK * 2.0 ** -24 * (a @ a.T)


class RecordingWeights(GradientWeighting):
    """A stand-in gradient weighting with fixed weights that records the Gram matrix it is given."""

    name = "recording"

    def __init__(self, num_tasks, weights):
        super().__init__(num_tasks)
        self.fixed = torch.as_tensor(weights, dtype=torch.float64)
        self.seen_gram, self.seen_present = None, None

    def task_weights(self, gram, present):
        self.seen_gram, self.seen_present = gram.clone(), present.clone()
        return self.fixed[present]


class RecordingGrads(RecordingWeights):
    """The same, for a method that overrides `weights_from_grads` (it gets G itself)."""

    def weights_from_grads(self, grads, present=None):
        self.seen_grads = grads.detach().clone()
        return super().weights_from_grads(grads, present)


def test_gram_matrix_fast_path_is_within_float32_rounding_of_the_exact_product():
    torch.manual_seed(0)
    base = torch.randn(3 * GRAM_CHUNK + 123)
    # nearly collinear rows (the ill-conditioned case PCGrad / IMTL-G see late in training) and one opposed
    grads = torch.stack([base + 1e-3 * torch.randn_like(base), base + 1e-3 * torch.randn_like(base), -base,
                         torch.randn_like(base)])
    exact = grads.double() @ grads.double().T
    gram = gram_matrix(grads)
    assert gram.dtype == torch.float64
    assert ((gram - exact).abs() <= gram_error_bound(grads)).all()
    # a half-precision buffer is widened to float32 per chunk, not multiplied in its own precision
    half = grads.bfloat16()
    exact_half = half.double() @ half.double().T
    assert ((gram_matrix(half) - exact_half).abs() <= gram_error_bound(half)).all()


def test_gram_matrix_sums_every_chunk_of_a_buffer_taken_in_several_batched_calls():
    """Chunks are multiplied `chunks_per_call` at a time (one `bmm` each) plus a shorter last chunk: with
    16-column chunks, 2,053 columns are two calls of 64 chunks and a tail of 5 columns, each counted once."""
    torch.manual_seed(0)
    grads = torch.randn(3, 2 * 64 * 16 + 5)
    exact = grads.double() @ grads.double().T
    a = grads.abs().double()
    bound = 1.01 * 16 * 2.0 ** -24 * (a @ a.T)  # float32 dot products of at most 16 terms, summed in float64
    gram = gram_matrix(grads, chunk_size=16)
    assert ((gram - exact).abs() <= bound).all()
    # dropping any one call's columns (or the tail's) moves an entry by far more than the bound
    for lost in (grads[:, :1024], grads[:, 1024:2048], grads[:, 2048:]):
        assert ((lost.double() @ lost.double().T).diagonal() > 1000 * bound.diagonal()).all()
    # an absent task's NaN row, in every chunk, reaches no other entry
    grads[1] = float("nan")
    gram = gram_matrix(grads, present=torch.tensor([True, False, True]), chunk_size=16)
    kept = [0, 2]
    assert ((gram[kept][:, kept] - exact[kept][:, kept]).abs() <= bound[kept][:, kept]).all()
    assert torch.equal(gram[1], torch.zeros(3, dtype=torch.float64)) and torch.equal(gram[:, 1], gram[1])


def test_gram_matrix_sums_the_chunk_products_in_float64():
    """One-column chunks whose products are exact in float32 (4096^2 = 2^24 and 1 x 1): summed in float64, the
    entry is exactly 2^24 + 63; summed in float32 each 1 added to 2^24 rounds away (2^24 + 1 is not a float32)."""
    grads = torch.tensor([[4096.0] + [1.0] * 63, [1.0] * 64])
    gram = gram_matrix(grads, chunk_size=1)
    assert gram[0, 0].item() == 2.0 ** 24 + 63 and gram[0, 1].item() == 4096 + 63 and gram[1, 1].item() == 64
    assert float(torch.tensor(2.0 ** 24) + 1.0) == 2.0 ** 24  # what a float32 sum would have lost


def test_gram_matrix_multiplies_without_tf32(monkeypatch):
    """`gram_matrix` runs its float32 products inside `_full_float32_matmul` (tested above), for the buffer's device."""
    import contextlib

    from diffusers_ant.weighting import base

    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        yield

    monkeypatch.setattr(base, "_full_float32_matmul", recording)
    gram_matrix(torch.randn(2, 8))
    assert entered == [torch.device("cpu")]


def test_gram_matrix_falls_back_to_float64_where_float32_cannot_hold_the_products():
    # finite gradients whose squares overflow float32: a finite Gram matrix (not a false overflow)
    big = torch.tensor([[1e30, 2e30, 0.0], [1.0, 2.0, 3.0]])
    # (float64 dot products of 3 terms: 2 gamma_3 relative, Higham eq. 3.5)
    float64_bound = sum_reordering_tolerance(3, 1.0, torch.float64)
    torch.testing.assert_close(gram_matrix(big), big.double() @ big.double().T, rtol=float64_bound, atol=0)
    # squares below float32's range keep their value (float32 would make the row zero)
    tiny = torch.tensor([[1e-30, 3e-30, 0.0], [1.0, 2.0, 3.0]])
    torch.testing.assert_close(gram_matrix(tiny), tiny.double() @ tiny.double().T, rtol=float64_bound, atol=0)
    assert gram_matrix(tiny)[0, 0] > 0
    # an infinite or NaN gradient still shows on the diagonal (the engine's overflow check)
    assert gram_matrix(torch.tensor([[float("inf"), 0.0], [1.0, 1.0]]))[0, 0] == float("inf")
    assert gram_matrix(torch.tensor([[float("nan"), 0.0], [1.0, 1.0]]))[0, 0].isnan()
    # an absent task's row is zeroed, NaNs included, and does not stop the fast path of the others
    grads = torch.tensor([[float("nan"), 1.0], [1.0, 2.0]])
    gram = gram_matrix(grads, present=torch.tensor([False, True]))
    assert torch.equal(gram, torch.tensor([[0.0, 0.0], [0.0, 5.0]], dtype=torch.float64))


def test_gram_matrix_is_not_computed_in_tf32():
    """`--allow_tf32` turns TF32 on for CUDA matmuls; the Gram matrix's float32 products turn it off
    for themselves and restore the setting (the switch is a process-wide flag, settable without a GPU)."""
    from diffusers_ant.weighting.base import _full_float32_matmul

    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with _full_float32_matmul(torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                  num_layers=2, sample_size=8, patch_size=2, norm_num_groups=1)
    # eval(): DiT drops class labels at random in training mode, so two forward passes of the same
    # samples would differ and the split / retain_graph comparison would not be exact.
    return model.eval()


def make_batch(batch_size=12, seed=1, task_ids=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 1, 8, 8, generator=g)
    target = torch.randn(batch_size, 1, 8, 8, generator=g)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=g)
    labels = torch.randint(0, 10, (batch_size,), generator=g)
    if task_ids is None:
        task_ids = timesteps * K // 1000  # K equal intervals
    return x, target, timesteps, labels, torch.as_tensor(task_ids)


def loss_fn_for(model, batch, calls=None):
    x, target, timesteps, labels, _ = batch

    def per_sample_loss_fn(indices):
        if calls is not None:
            calls.append(None if indices is None else indices.clone())
        sel = slice(None) if indices is None else indices
        if isinstance(model, DiTTransformer2DModel):
            pred = model(x[sel], timestep=timesteps[sel], class_labels=labels[sel]).sample
        else:
            pred = model(x[sel], timesteps[sel]).sample
        return ((pred - target[sel]) ** 2).mean(dim=(1, 2, 3))

    return per_sample_loss_fn


def engine_tolerance(model, reference, batch) -> float:
    """The module docstring's bound on two float32 computations of one (task) gradient of `model` on `batch`:
    its weight gradients sum over the batch's samples x positions. `reference` a number: the relative bound."""
    x = batch[0]
    return gradient_tolerance(model, reference, summed_terms=x.shape[0] * x[0, 0].numel())


def loss_tolerance(model, losses, batch) -> float:
    """Two float32 computations of the per-task mean losses: one forward path of `model` and the mean over
    the batch's samples x positions (the same sum of rounding bounds, tests/tolerances.py)."""
    x = batch[0]
    length = path_reduction_length(model) + x.shape[0] * x[0, 0].numel()
    return sum_reordering_tolerance(length, float(losses.abs().max()))


def whole_batch_once(calls, batch):
    """The closure was called once, on every sample of the batch."""
    n = batch[-1].numel()
    return len(calls) == 1 and (calls[0] is None or calls[0].tolist() == list(range(n)))


def flat_grad(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def reference_task_grads(model, batch, params):
    """Per-task gradients by brute force: autograd.grad of each task's mean loss over its samples only."""
    task_ids = batch[-1]
    fn = loss_fn_for(model, batch)
    rows = []
    for i in range(K):
        idx = (task_ids == i).nonzero().squeeze(1)
        if idx.numel() == 0:
            rows.append(torch.zeros(sum(p.numel() for p in params)))
            continue
        grads = torch.autograd.grad(fn(idx).mean(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("build", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_split_equals_retain_graph_and_brute_force(build):
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = make_batch()
    weights = [0.1, 0.4, 0.2, 0.3]
    results = {}
    for mode in ("split", "retain_graph"):
        model.zero_grad(set_to_none=True)
        weighting = RecordingWeights(K, weights)
        engine = TaskGradientEngine(params, mode=mode)
        stats = engine.backward(weighting, loss_fn_for(model, batch), batch[-1], K)
        results[mode] = (engine.task_grads.clone(), flat_grad(params), stats)
        # the weighting saw the Gram matrix of the engine's task gradients
        assert torch.equal(weighting.seen_gram, gram_matrix(engine.task_grads))

    split_grads, split_update, split_stats = results["split"]
    retain_grads, retain_update, retain_stats = results["retain_graph"]
    assert split_grads.abs().max() > 1e-3  # not a trivially zero comparison
    assert (split_grads - retain_grads).abs().max() <= engine_tolerance(model, split_grads, batch)
    assert (split_update - retain_update).abs().max() <= engine_tolerance(model, split_update, batch)
    losses_bound = loss_tolerance(model, split_stats["task_losses"], batch)
    torch.testing.assert_close(split_stats["task_losses"], retain_stats["task_losses"], rtol=0, atol=losses_bound)
    assert torch.equal(split_stats["counts"], torch.bincount(batch[-1], minlength=K))

    brute = reference_task_grads(model, batch, params)
    assert (split_grads - brute).abs().max() <= engine_tolerance(model, brute, batch)
    # the written update is w @ G with the weighting's weights
    w = torch.tensor(weights, dtype=torch.float32)
    assert (split_update - w @ brute).abs().max() <= engine_tolerance(model, w @ brute, batch)


@pytest.mark.parametrize("mode", ["split", "retain_graph"])
def test_subset_weights_from_subset_grads_and_full_update(mode):
    model = tiny_unet()
    params = list(model.parameters())
    subset_modules = [model.up_blocks, model.conv_out]
    subset = [p for m in subset_modules for p in m.parameters()]
    subset_ids = {id(p) for p in subset}
    batch = make_batch()
    weights = [0.5, 0.1, 0.3, 0.7]

    weighting = RecordingGrads(K, weights)
    engine = TaskGradientEngine(params, mode=mode, subset=subset_modules)  # modules are accepted too
    assert engine.num_task_params == sum(p.numel() for p in subset) < sum(p.numel() for p in params)
    engine.backward(weighting, loss_fn_for(model, batch), batch[-1], K)
    update = flat_grad(params)

    full = reference_task_grads(model, batch, params)
    in_subset = torch.cat([torch.full((p.numel(),), id(p) in subset_ids) for p in params])
    # the weights were chosen from the subset's task gradients only (K x |subset|)
    assert weighting.seen_grads.shape == (K, int(in_subset.sum()))
    assert (weighting.seen_grads - full[:, in_subset]).abs().max() <= engine_tolerance(model, full, batch)
    # and every parameter, inside the subset or not, received sum_i w_i g_i
    expected = torch.tensor(weights, dtype=torch.float32) @ full
    assert update[~in_subset].abs().max() > 1e-3
    assert (update - expected).abs().max() <= engine_tolerance(model, expected, batch)


@pytest.mark.parametrize("mode", ["split", "retain_graph"])
def test_empty_clusters_are_skipped(mode):
    model = tiny_unet()
    params = list(model.parameters())
    task_ids = torch.tensor([0, 0, 1, 3, 3, 3, 1, 0])  # task 2 has no sample
    batch = make_batch(batch_size=8, task_ids=task_ids)
    calls = []
    weighting = RecordingWeights(K, [1.0, 1.0, 1.0, 1.0])
    engine = TaskGradientEngine(params, mode=mode)
    stats = engine.backward(weighting, loss_fn_for(model, batch, calls), task_ids, K)

    assert weighting.seen_present.tolist() == [True, True, False, True]
    assert all(c is None or c.numel() > 0 for c in calls)  # never a forward on an empty sub-batch
    assert len(calls) == (3 if mode == "split" else 1)
    assert torch.all(engine.task_grads[2] == 0)
    assert stats["weights"][2] == 0 and stats["counts"][2] == 0 and stats["task_losses"][2] == 0
    assert torch.isfinite(flat_grad(params)).all() and torch.isfinite(stats["task_losses"]).all()


@pytest.mark.parametrize("method", ["pcgrad", "nash_mtl", "uw+pcgrad"])
def test_a_weighting_on_another_device_than_the_parameters_is_refused_in_one_line(method):
    """Under NCCL a weighting left on the CPU beside GPU parameters fails in the broadcast of its state, and on one
    GPU Nash-MTL's stored weights (CPU) meet the GPU counts: refused before any pass, naming the fix. The meta
    device stands in for the other device on this CPU machine."""
    model = tiny_unet()
    params = list(model.parameters())
    task_ids = torch.tensor([0, 1, 2, 3])
    calls = []
    weighting = get_weighting(method, K).to("meta")
    with pytest.raises(ValueError, match=r"holds .* on meta and the parameters are on cpu: move it once before "
                                         r"training, weighting.to\('cpu'\)") as error:
        TaskGradientEngine(params).backward(weighting, loss_fn_for(model, make_batch(4, task_ids=task_ids), calls), task_ids,
                                            K)
    assert "\n" not in str(error.value) and calls == [] and all(p.grad is None for p in params)


def test_accumulation_grad_scale_and_frozen_params():
    model = tiny_unet()
    frozen = list(model.conv_in.parameters())
    for p in frozen:
        p.requires_grad_(False)
    params = list(model.parameters())  # includes frozen ones: the engine must ignore them
    engine = TaskGradientEngine(params)
    assert len(engine.params) == len(params) - len(frozen)
    trainable = engine.params
    batches = [make_batch(seed=11), make_batch(seed=12)]
    weights = [0.25, 0.5, 0.75, 1.0]

    # one update per batch, from a clean state
    single = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        engine.backward(RecordingWeights(K, weights), loss_fn_for(model, batch), batch[-1], K)
        single.append(flat_grad(trainable))

    # accumulated on top of an existing gradient, each scaled by 1/2
    torch.manual_seed(5)
    for p in trainable:
        p.grad = torch.randn_like(p)
    start = flat_grad(trainable)
    for batch in batches:
        engine.backward(RecordingWeights(K, weights), loss_fn_for(model, batch), batch[-1], K, grad_scale=0.5)
    expected = start + 0.5 * (single[0] + single[1])
    # each batch's update to rounding (its own bound), plus the two additions into the existing gradient
    bound = sum(engine_tolerance(model, 0.5 * g, b) for g, b in zip(single, batches))
    bound += 2 * 2 * unit_roundoff() * float(expected.abs().max())
    assert (flat_grad(trainable) - expected).abs().max() <= bound
    assert all(p.grad is None for p in frozen)


def test_real_gradient_weighting_through_engine_equals_aggregate():
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch()
    engine = TaskGradientEngine(params)
    stats = engine.backward(get_weighting("pcgrad", K, seed=3), loss_fn_for(model, batch), batch[-1], K)
    # the same method on the engine's matrix, called directly through its pure entry point
    direct = get_weighting("pcgrad", K, seed=3).aggregate(engine.task_grads.clone(), stats["counts"] > 0)
    # the same weights on the same G: only the K-term sums w @ G may be ordered otherwise
    terms = (stats["weights"].abs().float() @ engine.task_grads.abs()).max()
    assert (flat_grad(params) - direct).abs().max() <= sum_reordering_tolerance(K, float(terms))


@pytest.mark.parametrize("method", ["ls", "uw"])
def test_loss_based_path_never_forms_task_gradients(method):
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch()
    calls, backward_count = [], [0]
    # one hook on one parameter counts the backward passes that reach the model
    model.conv_in.weight.register_hook(lambda g: backward_count.__setitem__(0, backward_count[0] + 1))
    weighting = get_weighting(method, K)
    weighted_backward(weighting, loss_fn_for(model, batch, calls), batch[-1], K)
    assert whole_batch_once(calls, batch) and backward_count[0] == 1  # one forward on the whole batch, one backward
    assert all(p.grad is not None for p in params)

    # the scalar it backpropagated is the weighting's combine of the per-task means
    per_sample = loss_fn_for(model, batch)(None)
    loss, stats2 = combine_task_losses(get_weighting(method, K), per_sample, batch[-1], K)
    means = torch.stack([per_sample[batch[-1] == i].mean() for i in range(K)])
    torch.testing.assert_close(stats2["task_losses"], means.detach())
    torch.testing.assert_close(loss, get_weighting(method, K).combine(means, torch.ones(K, dtype=torch.bool)))

    with pytest.raises(ValueError, match="loss-based"):
        TaskGradientEngine(params).backward(weighting, loss_fn_for(model, batch), batch[-1], K)
    with pytest.raises(ValueError, match="gradient-based"):
        combine_task_losses(get_weighting("pcgrad", K), per_sample, batch[-1], K)


def test_vanilla_path_is_the_plain_mean():
    model = tiny_unet()
    batch = make_batch()
    stats = weighted_backward(None, loss_fn_for(model, batch), batch[-1], K)
    update = flat_grad(list(model.parameters()))
    model.zero_grad(set_to_none=True)
    loss_fn_for(model, batch)(None).mean().backward()
    torch.testing.assert_close(update, flat_grad(list(model.parameters())))
    assert int(stats["counts"].sum()) == batch[-1].numel()


def test_errors_name_the_fix():
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch()
    with pytest.raises(ValueError, match="split, retain_graph"):
        TaskGradientEngine(params, mode="vmap")
    with pytest.raises(ValueError, match="not among"):
        TaskGradientEngine(params[:3], subset=[params[5]])
    with pytest.raises(ValueError, match="cast_training_params"):
        TaskGradientEngine([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    engine = TaskGradientEngine(params)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        engine.backward(RecordingWeights(K, [1.0] * K), loss_fn_for(model, batch), batch[-1] + 4, K)
    with pytest.raises(ValueError, match="num_tasks"):
        engine.backward(RecordingWeights(K, [1.0] * K), loss_fn_for(model, batch), batch[-1], K + 1)
    with pytest.raises(ValueError, match="one loss per sample"):
        engine.backward(RecordingWeights(K, [1.0] * K), lambda idx: loss_fn_for(model, batch)(idx).mean(), batch[-1], K)
    with pytest.raises(ValueError, match="engine"):
        weighted_backward(get_weighting("pcgrad", K), loss_fn_for(model, batch), batch[-1], K)


def test_nash_mtl_steps_between_solves_need_no_task_gradients():
    model = tiny_unet()
    params = list(model.parameters())
    weighting = get_weighting("nash_mtl", K, update_every=2)
    engine = TaskGradientEngine(params)
    first, second = make_batch(seed=21), make_batch(seed=22)

    engine.backward(weighting, loss_fn_for(model, first), first[-1], K)  # step 0: solve alpha
    assert engine.num_task_backward_calls == int((torch.bincount(first[-1], minlength=K) > 0).sum())
    alpha = weighting.alpha.clone()

    model.zero_grad(set_to_none=True)
    calls = []
    before = engine.num_task_backward_calls
    stats = engine.backward(weighting, loss_fn_for(model, second, calls), second[-1], K)  # step 1: reuse
    assert whole_batch_once(calls, second) and engine.num_task_backward_calls == before  # one forward, no task passes
    present = torch.bincount(second[-1], minlength=K) > 0
    expected_weights = torch.where(present, alpha, torch.zeros_like(alpha)).float()
    torch.testing.assert_close(stats["weights"], expected_weights)
    expected = expected_weights @ reference_task_grads(model, second, params)
    assert (flat_grad(params) - expected).abs().max() <= engine_tolerance(model, expected, second)


def test_benchmark_script_runs_and_reports_ratios(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "train_scripts" / "benchmark_weighting.py"
    spec = importlib.util.spec_from_file_location("benchmark_weighting", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--sizes", "tiny", "--methods", "none,ls,pcgrad", "--steps", "1", "--warmup", "0",
                "--batch_size", "6", "--no_memory", "--tap_breakdown", "--output", str(out)])
    report = json.loads(out.read_text())["sizes"]["tiny"]
    # the batched engine's hooks, timed per layer kind (the demo UNet has all four), beside the whole-batch
    # weight gradients of its Linear and convolution layers
    taps = report["tap_breakdown_ms_per_step"]
    assert set(taps) == {"convolution kxk", "convolution 1x1", "linear", "normalisation"}
    assert all(entry["calls_per_step"] > 0 and entry["per_cluster_ms"] > 0 for entry in taps.values())
    assert taps["normalisation"]["whole_batch_ms"] is None and taps["linear"]["whole_batch_ms"] > 0
    assert set(report["seconds_per_step"]) == {"none", "ls", "pcgrad", "pcgrad@batched", "pcgrad@last_layers",
                                               "pcgrad@retain_graph"}
    assert report["ratio_to_vanilla"]["none"] == 1.0
    assert all(t > 0 for t in report["seconds_per_step"].values())
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "gradnorm"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--engines", "vmap"])


# --------------------------------------------------------------------------- fp16 with a GradScaler


def _autocast(fn, scale=1.0):
    def wrapped(idx):
        with torch.autocast("cpu", dtype=torch.float16):
            return fn(idx) * scale
    return wrapped


def test_fp16_engine_writes_the_scaled_update_and_survives_underflow():
    """Scaled task losses keep fp16 task gradients from underflowing; the written update is scaled, so
    a real GradScaler's unscale_ restores exactly the fp32 update."""
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch()
    tiny = 2.0**-20  # small losses: their fp16 gradients underflow without a loss scale
    engine = TaskGradientEngine(params)

    engine.backward(get_weighting("pcgrad", K, seed=1), _scaled(loss_fn_for(model, batch), tiny), batch[-1], K)
    reference = flat_grad(params)  # fp32 throughout
    model.zero_grad(set_to_none=True)

    engine.backward(get_weighting("pcgrad", K, seed=1), _autocast(loss_fn_for(model, batch), tiny), batch[-1], K)
    unscaled = flat_grad(params)
    model.zero_grad(set_to_none=True)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = torch.optim.SGD(params, lr=0.1)
    stats = engine.backward(get_weighting("pcgrad", K, seed=1), _autocast(loss_fn_for(model, batch), tiny), batch[-1],
                            K, loss_scale=current_scale(scaler))
    assert not bool(stats["found_inf"])
    written = flat_grad(params)
    scaler.unscale_(optimizer)
    restored = flat_grad(params)
    torch.testing.assert_close(restored, written / 2.0**16, rtol=0, atol=0)  # a power of two: exact

    def rel(a):
        return ((a - reference).norm() / reference.norm()).item()

    bound = low_precision_norm_tolerance(model, torch.float16)  # 2.0e-2 (tests/tolerances.py)
    assert rel(restored) < bound, (rel(restored), bound)
    assert rel(unscaled) > 10 * bound, "without the loss scale fp16 task gradients should have underflowed"


def current_scale(scaler):
    """The scaler's scale, initialising it as `scaler.scale(loss)` would (the trainer's `current_loss_scale`)."""
    from diffusers_ant.training.precision import current_loss_scale

    return current_loss_scale(scaler)


def _scaled(fn, scale):
    return lambda idx: fn(idx) * scale


def test_fp16_overflow_skips_the_step_and_leaves_the_method_untouched():
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch()
    huge = torch.ones(batch[-1].numel())
    huge[batch[-1] == 2] = 1e30  # task 2 overflows fp16 once scaled
    fn = _autocast(loss_fn_for(model, batch))
    overflowing = lambda idx: fn(idx) * huge[idx]  # noqa: E731

    weighting = get_weighting("nash_mtl", K, update_every=1)
    before = {k: v.clone() for k, v in weighting.state_dict().items() if torch.is_tensor(v)}
    step_before = weighting.step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = torch.optim.SGD(params, lr=0.1)
    start = [p.detach().clone() for p in params]
    stats = TaskGradientEngine(params).backward(weighting, overflowing, batch[-1], K, loss_scale=current_scale(scaler))
    assert bool(stats["found_inf"])
    assert weighting.step == step_before  # Nash-MTL never saw the step
    for key, value in before.items():
        assert torch.equal(weighting.state_dict()[key], value), key
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, s) for p, s in zip(params, start)), "the optimizer step must be skipped"
    assert scaler.get_scale() < 2.0**16


def test_chunked_window_equals_one_batch():
    """A window forwarded in chunks of 3 gives the update of the whole batch at once, for the engine's
    modes, subset mode (recomputed weighted pass) and the loss-based path."""
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch(batch_size=10)
    subset = [model.conv_out]
    for method, kwargs in [("pcgrad", {}), ("pcgrad", {"mode": "retain_graph"}), ("mgda", {"subset": subset}),
                           ("mgda", {"subset": subset, "mode": "retain_graph", "restrict_task_backward": True}),
                           ("uw", None), ("dwa", None), (None, None)]:
        results = []
        for chunk_size in (None, 3):
            model.zero_grad(set_to_none=True)
            weighting = get_weighting(method, K, seed=2) if method else None
            engine = TaskGradientEngine(params, **kwargs) if kwargs is not None else None
            stats = weighted_backward(weighting, loss_fn_for(model, batch), batch[-1], K, engine=engine,
                                      chunk_size=chunk_size)
            results.append((flat_grad(params), stats["task_losses"], stats["weights"]))
        (g1, l1, w1), (g2, l2, w2) = results
        assert g1.abs().max() > 1e-4
        assert (g1 - g2).abs().max() <= engine_tolerance(model, g1, batch), (method, kwargs)
        bound = loss_tolerance(model, l1, batch)
        torch.testing.assert_close(l1, l2, rtol=0, atol=bound)
        # the weights, a function of the task losses or gradients: their relative rounding carried through
        # with the method's conditioning taken as one, as the network's is
        relative = engine_tolerance(model, 1.0, batch)
        torch.testing.assert_close(w1, w2, rtol=relative, atol=relative)


def test_last_layers_mode_takes_weights_from_the_output_layer_and_updates_everything():
    model = tiny_unet()
    params = list(model.parameters())
    batch = make_batch()
    weights = [0.5, 0.1, 0.3, 0.7]
    weighting = RecordingGrads(K, weights)
    engine = TaskGradientEngine(params, mode="retain_graph", subset=[model.conv_out], restrict_task_backward=True)
    calls = []
    engine.backward(weighting, loss_fn_for(model, batch, calls), batch[-1], K)
    assert len(calls) == 1  # one forward for the task gradients and the weighted backward
    full = reference_task_grads(model, batch, params)
    in_subset = torch.cat([torch.full((p.numel(),), any(p is q for q in model.conv_out.parameters())) for p in params])
    assert (weighting.seen_grads - full[:, in_subset]).abs().max() <= engine_tolerance(model, full, batch)
    expected = torch.tensor(weights) @ full
    assert (flat_grad(params) - expected).abs().max() <= engine_tolerance(model, expected, batch)
