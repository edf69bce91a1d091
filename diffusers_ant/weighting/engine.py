"""Per-task (per-timestep-cluster) gradients for gradient-based weightings, and the training-step glue.

ANT (Go et al., NeurIPS 2023, Sec. 4.2) balances the K cluster losses L_i with a multi-task method.
Gradient-based methods (PCGrad, Nash-MTL, IMTL-G, MGDA-UB, CAGrad) need the K per-task gradients
g_i = grad_theta L_i; the reference code gets them with K backward passes through one graph
(`retain_graph=True`), 3 to 3.7 times an ordinary step. This module computes them once, for every
method (`GradientWeighting.weights_from_grads(grads[K, P], present) -> w[K]`), and writes the
update w @ G into the parameters' `.grad`, where any optimizer picks it up.

One call = one optimizer step ("window"). The trainer draws the timesteps and noise of ALL the
micro-batches of a gradient-accumulation window first and hands the engine one closure over the
whole window plus `chunk_size` (the micro-batch size): no forward pass ever sees more than
`chunk_size` samples, so memory is that of one micro-batch, but the task losses, the per-task
gradients and the weights are those of the whole window. Gradient accumulation over GA
micro-batches of B samples is therefore the same step as one batch of GA * B samples, for every
method: weights are chosen once per optimizer step, stateful methods advance once per step.

Modes of `TaskGradientEngine`:

* ``"split"`` (default): split the window by task and run one forward + backward per present task
  on its sub-batch (in chunks of at most `chunk_size`). Together the sub-batches are one batch, so
  this costs about one ordinary step (ENVIRONMENT.md: 1.1x). Exact only for models whose
  normalisation is per sample (GroupNorm, LayerNorm, attention): diffusers' UNets and
  transformers. Each sub-batch graph is freed after its backward.
* ``"batched"``: one forward and ONE backward pass per chunk over the whole window (samples ordered
  by task), as in vanilla training; each trainable layer's per-cluster weight gradients are summed
  from its input and output gradient inside that backward pass (`cluster_grads.py`, which also says
  why `torch.autograd.grad(..., is_grads_batched=True)` is no cheaper). Same condition of exactness
  as ``"split"`` (per-sample normalisation), full-size kernels for the forward and the input
  gradients; only the weight-gradient reductions run per cluster. Needs the model's modules
  (`modules=`) and trainable parameters that sit in covered layers (Linear, Conv, GroupNorm,
  LayerNorm, Embedding, LoRA's layers): otherwise it is refused at construction.
* ``"auto"``: ``"batched"`` where it runs (`modules` given, every task parameter in a covered layer,
  no `lockstep` / `write_update`), else ``"split"``; a window the batched mode cannot follow at run
  time (`BatchedModeUnsupported`: a layer called on a batch of another size, reentrant gradient
  checkpointing), or one that runs out of device memory (`torch.OutOfMemoryError`), is run again in
  split mode, which the engine then keeps. `self.mode` says which.
  At batch 64, K = 5 and 16x16 on two CPU threads batched costs 1.23-1.35x vanilla and split 1.4-1.7x
  (the README's cost table); at 32x32 both cost about vanilla's step (split slightly less), and
  batched needs about twice split's memory (181 against 95 MB at 16x16).
* ``"retain_graph"``: one forward per chunk, then one backward per task present in the chunk
  through the retained graph (the reference code's way). Needed for models with batch statistics
  (BatchNorm). With a `subset` of output-side layers and `restrict_task_backward=True` this is the
  cheap "last layers" mode: one forward, K short backward passes that stop at the subset, and one
  weighted backward over everything; its cost does not depend on how small the task sub-batches
  are (on a GPU, sub-batches of 1 to 3 samples leave the device idle in split mode).

Per-task gradients over a parameter subset (``subset=``, e.g. the LoRA parameters, a few named
modules, or the output layers): the K x P matrix then only spans the subset (K x |subset|
memory), the weights w are chosen from it and applied as loss weights: ONE further backward pass
of sum_i w_i L_i writes the gradient of every trainable parameter. When the window is one chunk
the engine keeps the task graphs alive for that pass (the graphs of all sub-batches together
weigh what one ordinary step's graph weighs); a window of several chunks is recomputed chunk by
chunk instead, so that memory stays that of one micro-batch.

Steps on stored weights: a method whose `needs_gradients_this_step()` is False (Nash-MTL between
its solves, every `update_every` steps) gets `reuse_weights(present)` and one forward + one
backward of sum_i w_i L_i per chunk, as cheap as a vanilla step.

Mixed precision (fp16 with a GradScaler): pass `loss_scale = scaler.get_scale()`. The engine
backpropagates the scaled task losses (unscaled fp16 task backward passes underflow), unscales the
task gradients before the weights are chosen, and writes the SCALED update into `.grad`, where the
scaler's `unscale_` / `step` expects it. A window whose task gradients are not finite (an fp16
overflow) is not shown to the weighting (no state advances); the engine writes `inf` into `.grad`
so that the scaler skips the optimizer step and lowers its scale, and reports `found_inf`. Without a
scaler (bf16, fp32) the caller must skip the step on `found_inf` itself, as the trainer does
(`training.loop.task_gradients_overflowed`).

Data parallelism: all processes agree on the global task counts before any forward (one small
all-reduce), per-task gradients are all-reduced as count-weighted means before the weights are
chosen (`distributed.py`), and the chosen weights and the weighting's state are then broadcast
from process 0, so every process takes bitwise the same step whatever its solver did.

Sharded engines (`training/sharding.py`, split mode on a subset that is every trainable parameter):
`lockstep=True` (FSDP2, ZeRO-3) makes every process run the same forward and backward passes, padding with
zero-loss passes where it has fewer samples of a task (the engines' all-gathers are collectives);
`write_update=fn` (DeepSpeed) takes the task gradients with `torch.autograd.grad` (no
parameter's gradient-accumulation hook runs) and hands the synced update to `fn(params, update_views)`
instead of adding it to `.grad`. Neither changes the step.

How the trainer calls it::

    engine = TaskGradientEngine([p for p in unet.parameters() if p.requires_grad])  # once
    weighting = get_weighting("pcgrad", num_tasks).to(device)  # once: its state beside the parameters

    # each optimizer step: draw noise and timesteps for the WHOLE window first, then build the closure
    def per_sample_loss_fn(indices):           # indices: LongTensor into the window
        pred = unwrapped_unet(noisy[indices], timesteps[indices]).sample
        return per_sample_loss(pred, target[indices])   # (len(indices),)

    stats = weighted_backward(weighting, per_sample_loss_fn, task_ids, num_tasks, engine=engine,
                              backward_fn=accelerator.backward, chunk_size=micro_batch_size,
                              no_sync=lambda: accelerator.no_sync(model), loss_scale=scale)
    optimizer.step(); optimizer.zero_grad()

Rules the closure and the trainer must follow:

* The closure must be deterministic per sample: it may not draw new noise / timesteps / dropout
  masks per call (draw them for the whole window before building it), or the task gradients of
  different sub-batches would belong to different samples (DiT's class-label dropout: pre-draw it).
* Data parallelism: for gradient-based weightings the closure must run the UNWRAPPED model
  (`accelerator.unwrap_model(model)`), not the DDP wrapper: the engine all-reduces the per-task
  gradients itself, and the DDP reducer would otherwise average them a second time. For loss-based
  weightings and vanilla training the closure runs the wrapped model as usual: DDP's own backward
  averages once (on the last chunk; `no_sync` defers it for the others).
* The engine adds into `.grad` (never overwrites); `grad_scale` multiplies what it writes.
* Learnable weighting parameters (UW's log-variances) live in the weighting module: give them to
  an optimizer (`weighting.param_groups()`), but do not pass the weighting to
  `accelerator.prepare` (DDP would wrap it; its gradients are already identical everywhere).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..losses import reduce_task_losses
from .base import GradientWeighting, LossWeighting, Weighting, gram_matrix
from .cluster_grads import BatchedModeUnsupported
from .distributed import (
    all_reduce_sum_,
    all_reduce_sum_tensors_,
    broadcast_,
    broadcast_module_state_,
    is_distributed,
    sync_task_gradients_,
    sync_task_losses,
    world_size,
)

logger = logging.getLogger(__name__)

ENGINE_MODES = ("split", "retain_graph", "batched", "auto")

PerSampleLossFn = Callable[[Optional[torch.Tensor]], torch.Tensor]


def _without_split_hint(error: Exception) -> str:
    """A batched-mode refusal as `auto`'s reason for choosing split (without the advice to use split)."""
    return str(error).replace(" (use mode='split')", "").replace("; use mode='split'", "")


def _unique_trainable(parameters: Iterable) -> List[nn.Parameter]:
    """Trainable tensors in order, without duplicates (tied weights appear once)."""
    seen, out = set(), []
    for p in parameters:
        if isinstance(p, nn.Module):
            raise ValueError("pass parameters, not a module: use `list(model.parameters())`")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _reads_gram_only(weighting) -> bool:
    """The method's weights depend on G only through G G^T (it keeps the base `weights_from_grads`)."""
    return type(weighting).weights_from_grads is GradientWeighting.weights_from_grads


def _check_weighting_device(weighting: Weighting, device: torch.device) -> None:
    """A gradient weighting's state (its weights, Nash-MTL's alpha, UW's log-variances) must live where the
    parameters do: NCCL broadcasts only GPU tensors (gloo, on a CPU, takes both), and a GPU step mixes the
    stored weights into its gradients. One line that names the fix, instead of either error."""
    for name, tensor in list(weighting.named_parameters()) + list(weighting.named_buffers()):
        if tensor.device != device:
            raise ValueError(f"the weighting {weighting.name or type(weighting).__name__!r} holds {name} on "
                             f"{tensor.device} and the parameters are on {device}: move it once before training, "
                             f"weighting.to({str(device)!r}) (the trainer does)")


def _check_task_ids(task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    task_ids = torch.as_tensor(task_ids).reshape(-1)
    if task_ids.is_floating_point() or task_ids.dtype == torch.bool:
        raise ValueError("task_ids must be an integer tensor of task (cluster) ids, e.g. intervals.assign(timesteps)")
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(f"task_ids must lie in [0, {num_tasks - 1}]; got {int(task_ids.min())}..{int(task_ids.max())}")
    return task_ids.long()


def _check_num_tasks(weighting: Weighting, num_tasks: Optional[int]) -> int:
    if num_tasks is None:
        return weighting.num_tasks
    if int(num_tasks) != weighting.num_tasks:
        raise ValueError(f"num_tasks={num_tasks} but the weighting was built for {weighting.num_tasks} tasks; "
                         "build it with get_weighting(name, num_tasks)")
    return int(num_tasks)


def _check_losses(losses: torch.Tensor, expected: int) -> torch.Tensor:
    if losses.dim() != 1 or losses.shape[0] != expected:
        raise ValueError(f"per_sample_loss_fn must return one loss per sample, shape ({expected},); "
                         f"got {tuple(losses.shape)} (reduce with diffusers_ant.losses.per_sample_loss)")
    return losses


def _check_chunk_size(chunk_size: Optional[int]) -> Optional[int]:
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (the micro-batch size) or None, got {chunk_size!r}")
    return None if chunk_size is None else int(chunk_size)


def _chunks(indices: torch.Tensor, chunk_size: Optional[int]) -> List[torch.Tensor]:
    """`indices` in consecutive pieces of at most `chunk_size` (one piece when None)."""
    if chunk_size is None or indices.numel() <= chunk_size:
        return [indices]
    return list(torch.split(indices, chunk_size))


def global_task_counts(task_ids: torch.Tensor, num_tasks: int, sync: bool = True):
    """(local counts, global counts) per task, LongTensors; one all-reduce when distributed.

    Known before any forward pass, so every weight of the step (and every count-normalised loss
    coefficient) can be fixed before the first micro-batch is back-propagated."""
    local = torch.bincount(task_ids, minlength=num_tasks)
    if not (sync and is_distributed()):
        return local, local
    return local, all_reduce_sum_(local.clone())


def loss_coefficients(weighting: LossWeighting, present: torch.Tensor) -> torch.Tensor:
    """c_i = d combine / d L_i for the coming step (float64, 0 for absent tasks), without changing state.

    Every loss-based method here (LS, RLW, UW, DWA) is linear in the task losses with coefficients
    that do not depend on the current losses, so the gradient of `combine` w.r.t. the model is
    sum_i c_i grad L_i, and c can be fixed before the step's losses exist: the methods provide
    `loss_coefficients(present)` (`base.py`). A weighting written against `combine` alone still
    works: c is then read off `combine` by autograd on a probe, with the weighting's state (its
    generator, history, `last_weights`) put back afterwards.
    """
    try:
        return weighting.loss_coefficients(present).detach().double()
    except NotImplementedError:
        pass
    state = copy.deepcopy(weighting.state_dict())
    last = weighting.last_weights.detach().clone()
    probe = torch.ones(weighting.num_tasks, dtype=torch.float32, device=present.device, requires_grad=True)
    try:
        (grad,) = torch.autograd.grad(weighting.combine(probe, present), probe, allow_unused=True)
    finally:
        weighting.load_state_dict(state)
        weighting.last_weights = last
    if grad is None:
        grad = torch.zeros_like(probe)
    return torch.where(present, grad.detach().double(), torch.zeros((), dtype=torch.float64, device=grad.device))


def finish_loss_weighting_step(weighting: LossWeighting, task_losses, present, coefficients, backward_fn) -> None:
    """After the window: back-propagate into the method's own parameters (UW's log-variances) and
    commit its step (RLW's draw, DWA's history, `last_weights`), on the window's global task losses."""
    if type(weighting).loss_coefficients is LossWeighting.loss_coefficients:
        # a weighting with `combine` only: combine commits the step and carries the parameters' gradient
        combined = weighting.combine(task_losses.detach(), present)
        if combined.requires_grad:
            backward_fn(combined)
        return
    own = weighting.weighting_loss(task_losses.detach(), present)
    if own is not None:
        backward_fn(own)
    weighting.finish_step(task_losses.detach(), present, coefficients)


class TaskGradientEngine:
    """Per-task gradients G[K, P] for a `GradientWeighting`, and the update w @ G written to `.grad`.

    Args:
        parameters: the parameters the optimizer updates; those with `requires_grad=False` are
            ignored (their `.grad` is never touched). All trainable ones must share one dtype
            (fp32 master weights under Accelerate's mixed precision; see
            `diffusers.training_utils.cast_training_params` for LoRA on a half-precision model).
        mode: ``"split"`` (one forward + backward per task sub-batch; exact for per-sample
            normalisation), ``"batched"`` (the same gradients from one forward + one backward over
            the whole batch, each layer's weight gradient summed per task; needs `modules`) or
            ``"retain_graph"`` (one forward, K backward passes; any model) or ``"auto"`` (batched where
            it runs, else split; see the module docstring). `self.mode` is the mode in use.
        subset: parameters (or modules, whose trainable parameters are taken) to form the task
            gradients on; `None` = all `parameters`. Must be among `parameters`. The weights then
            come from the subset's gradients and all parameters get the gradient of
            sum_i w_i L_i from one extra backward pass.
        sync: average the task gradients over processes when torch.distributed runs with several
            processes (see `distributed.py`). `False` keeps every process local (tests, analysis).
        modules: the modules whose forward passes use the parameters (e.g. `[model]`); needed by
            ``"batched"`` mode only, which hooks the layers holding the (subset's) parameters.
        restrict_task_backward: let the task backward passes stop at the subset (`inputs=subset`)
            instead of running over every trainable parameter. Much cheaper for a subset of
            output-side layers, but only safe when the subset holds no normalisation layer whose
            input gradient is not otherwise needed (see `_backward_into` for the torch crash this
            avoids); the trainer sets it for its output-layer and LoRA subsets only.

    The K x P buffer (`task_grads`, 4 bytes per parameter and task in fp32) is allocated on the first
    call and reused. Rows are filled by backpropagating each task loss directly into per-parameter
    views of its row (`.grad` temporarily points there), which needs no extra P-sized copy, unlike
    `torch.autograd.grad`; the parameters' own `.grad` is put back untouched before the update is
    added to it.
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        mode: str = "split",
        subset: Optional[Sequence[Union[nn.Parameter, nn.Module]]] = None,
        sync: bool = True,
        restrict_task_backward: bool = False,
        modules: Optional[Sequence[nn.Module]] = None,
        lockstep: bool = False,
        write_update: Optional[Callable[[List[nn.Parameter], List[torch.Tensor]], None]] = None,
    ):
        if mode not in ENGINE_MODES:
            raise ValueError(f"unknown engine mode {mode!r}; valid modes: {', '.join(ENGINE_MODES)}")
        self.sync = bool(sync)
        self.params = _unique_trainable(parameters)
        if not self.params:
            raise ValueError("no trainable parameters: pass the parameters with requires_grad=True")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise ValueError(f"trainable parameters have mixed dtypes {sorted(map(str, dtypes))}; cast them to one "
                             "(e.g. diffusers.training_utils.cast_training_params(model, torch.float32))")
        if subset is None:
            self.task_params = self.params
            self.rest_params: List[nn.Parameter] = []
        else:
            expanded = []
            for item in subset:
                expanded.extend(item.parameters() if isinstance(item, nn.Module) else [item])
            subset_ids = {id(p) for p in _unique_trainable(expanded)}
            known = {id(p) for p in self.params}
            if not subset_ids:
                raise ValueError("subset has no trainable parameter; pass e.g. the LoRA parameters or a list of modules")
            if not subset_ids <= known:
                raise ValueError("subset contains parameters that are not among `parameters`; "
                                 "pass a subset of the trainable parameters")
            self.task_params = [p for p in self.params if id(p) in subset_ids]
            self.rest_params = [p for p in self.params if id(p) not in subset_ids]
        self.restrict_task_backward = bool(restrict_task_backward) and bool(self.rest_params)
        # Sharded engines (`training.sharding`, "Gradient-based methods"): `lockstep`, every process runs the same forward
        # and backward passes (FSDP's all-gathers are collectives); `write_update`, the update w @ G is
        # handed to a callable instead of `.grad` (DeepSpeed owns the gradients), and the task gradients
        # are taken with `torch.autograd.grad`, which runs no parameter's gradient-accumulation hook.
        # "auto": batched where it can run, split otherwise (and at run time, see `backward`)
        self.fallback_to_split = mode == "auto"
        self.auto_reason: Optional[str] = None  # why "auto" chose split
        if mode == "auto":
            if lockstep or write_update is not None:
                mode, self.auto_reason = "split", "sharded engines (FSDP, DeepSpeed) run the split mode"
            elif not modules:
                mode, self.auto_reason = "split", "no modules given"
            else:
                mode = "batched"
        if (lockstep or write_update is not None) and (self.rest_params or mode != "split"):
            raise ValueError("lockstep / write_update: mode='split' with every trainable parameter in the subset")
        self.lockstep = bool(lockstep)
        self.write_update = write_update
        self._recorder = None
        if mode == "batched":
            from .cluster_grads import ClusterGradientRecorder

            if not modules:
                raise ValueError("mode='batched' needs the model: pass modules=[model] (the layers holding the "
                                 "parameters get hooks that sum their gradients per cluster)")
            modules = [modules] if isinstance(modules, nn.Module) else list(modules)
            try:
                self._recorder = ClusterGradientRecorder(self.task_params, modules)
            except ValueError as error:
                if not self.fallback_to_split:
                    raise
                mode, self.auto_reason = "split", _without_split_hint(error)
        self.mode = mode
        # Shapes taken once: under DeepSpeed ZeRO-3 a task parameter may be partitioned (empty) between a
        # module's forward and the next gather, even a persistent one in the step that records ZeRO-3's
        # module trace, while the gradients autograd returns have its whole shape (training.sharding)
        self._task_shapes = [p.shape for p in self.task_params]
        self.num_task_params = sum(p.numel() for p in self.task_params)
        self._grads: Optional[torch.Tensor] = None  # (K, P_task), reused between calls
        self._update: Optional[torch.Tensor] = None  # (P_task,), reused between calls
        # Statistics of the passes, for tests and benchmarks.
        self.num_forward_calls = 0
        self.num_task_backward_calls = 0

    # -- buffers -----------------------------------------------------------------------------
    @property
    def task_grads(self) -> Optional[torch.Tensor]:
        """The last per-task gradients (K, P_task), synced across processes and unscaled. Overwritten by the next call."""
        return self._grads

    def _buffers(self, num_tasks: int):
        p0 = self.task_params[0]
        if self._grads is None or self._grads.shape[0] != num_tasks or self._grads.device != p0.device:
            self._grads = torch.zeros(num_tasks, self.num_task_params, dtype=p0.dtype, device=p0.device)
            # w @ G; subset mode writes its update by a backward pass instead and needs no buffer
            self._update = None if self.rest_params else torch.zeros(self.num_task_params, dtype=p0.dtype, device=p0.device)
            # batched mode: each task parameter's (K, *shape) slice of the buffer
            self._task_views, offset = {}, 0
            for p, shape in zip(self.task_params, self._task_shapes):
                self._task_views[id(p)] = self._grads[:, offset:offset + shape.numel()].view(num_tasks, *shape)
                offset += shape.numel()
        return self._grads, self._update

    def _views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Views of a flat (P_task,) tensor shaped like each task parameter."""
        views, offset = [], 0
        for shape in self._task_shapes:
            views.append(flat[offset:offset + shape.numel()].view(shape))
            offset += shape.numel()
        return views

    def _backward_into(self, loss: torch.Tensor, row: torch.Tensor, retain_graph: bool) -> None:
        """Add d loss / d task_params into the flat `row`: backward with `.grad` pointing at its views.

        AccumulateGrad adds in place into an existing `.grad`, so the gradient lands in the row with no
        P-sized temporary (torch.autograd.grad would return one), and several chunks of one task add up.

        By default the pass runs over ALL trainable parameters (`inputs=self.params`), not just the
        subset: torch 2.13's CPU GroupNorm backward segfaults on channels-last activations (which
        diffusers UNets produce on CPU) when only its weight gradient is requested and not its input
        gradient, which is what a pass restricted to a subset such as `up_blocks` asks of the first
        GroupNorm of the subset (minimal repro: `torch.ops.aten.native_group_norm_backward` with a
        channels-last input and output_mask [False, True, True]). Requesting every trainable
        parameter asks exactly what an ordinary backward asks. With `restrict_task_backward` (a
        subset without such a layer: output convolutions, LoRA matrices) the pass stops at the
        subset. The other parameters' gradients of this pass are discarded.

        With `write_update` (DeepSpeed) the gradients are taken by `torch.autograd.grad` and added to
        the row: no parameter's `.grad` is touched and no gradient-accumulation hook runs."""
        if self.write_update is not None:
            grads = torch.autograd.grad(loss, self.task_params, retain_graph=retain_graph, allow_unused=True)
            for view, grad in zip(self._views(row), grads):
                if grad is not None:
                    view.add_(grad)
            self.num_task_backward_calls += 1
            return
        for p, view in zip(self.task_params, self._views(row)):
            p.grad = view
        for p in self.rest_params:
            p.grad = None
        loss.backward(retain_graph=retain_graph, inputs=self.task_params if self.restrict_task_backward else self.params)
        for p in self.rest_params:
            p.grad = None  # drop this pass's non-subset gradients now, not at the end of the step
        self.num_task_backward_calls += 1

    # -- the step ----------------------------------------------------------------------------
    def backward(
        self,
        weighting: GradientWeighting,
        per_sample_loss_fn: PerSampleLossFn,
        task_ids: torch.Tensor,
        num_tasks: Optional[int] = None,
        grad_scale: float = 1.0,
        chunk_size: Optional[int] = None,
        loss_scale: float = 1.0,
    ) -> Dict[str, torch.Tensor]:
        """Per-task gradients -> weights -> add `grad_scale * loss_scale * w @ G` to the parameters' `.grad`.

        Args:
            weighting: a `GradientWeighting` (loss-based ones go through `weighted_backward`).
            per_sample_loss_fn: `fn(indices) -> Tensor[len(indices)]`, the per-sample losses of
                those samples of the window (a LongTensor of indices; never more than `chunk_size`),
                through the unwrapped model.
            task_ids: (N,) integer task (cluster) id of every sample of the local window.
            num_tasks: K; defaults to the weighting's.
            grad_scale: factor on the written gradient.
            chunk_size: the most samples one forward pass may see (the micro-batch size); None = all.
            loss_scale: an fp16 GradScaler's current scale (1 without one); see the module docstring.

        Returns:
            dict of detached tensors: `task_losses` (K,) global mean loss per task (0 if absent),
            `counts` (K,) global sample counts, `weights` (K,) the task weights (0 if absent),
            `loss` the count-weighted mean loss of the window (what vanilla training would log),
            `found_inf` (bool tensor) whether the task gradients overflowed (step to be skipped).
        """
        if not getattr(weighting, "needs_task_gradients", False):
            raise ValueError(f"weighting {weighting.name or type(weighting).__name__!r} is loss-based: use "
                             "combine_task_losses (or weighted_backward), which needs no per-task gradients")
        num_tasks = _check_num_tasks(weighting, num_tasks)
        chunk_size = _check_chunk_size(chunk_size)
        device = self.params[0].device
        _check_weighting_device(weighting, device)
        task_ids = _check_task_ids(task_ids, num_tasks).to(device)
        local_counts, global_counts = global_task_counts(task_ids, num_tasks, self.sync)
        present = global_counts > 0
        everything = torch.arange(task_ids.numel(), device=device)

        if not weighting.needs_gradients_this_step(present):
            # A step on stored weights (Nash-MTL between its solves): no per-task gradient at all.
            weights = weighting.reuse_weights(present).detach().double()
            if self.sync:
                broadcast_(weights)
            task_sums = self._weighted_pass(per_sample_loss_fn, task_ids, everything, weights, global_counts,
                                            grad_scale * loss_scale, chunk_size)
            return self._finish(weighting, task_sums, global_counts, present, weights, grad_scale * loss_scale)

        grads, update = self._buffers(num_tasks)
        grads.zero_()
        local_present = [i for i, n in enumerate(local_counts.tolist()) if n > 0]  # one device sync, not K
        # The final all-parameter pass of subset mode reuses the task graphs when the window is one
        # chunk; a longer window is recomputed chunk by chunk (memory of one micro-batch).
        keep_graphs = bool(self.rest_params) and (chunk_size is None or task_ids.numel() <= chunk_size)
        task_sums = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        graph_losses: Dict[int, torch.Tensor] = {}

        saved_grads = [p.grad for p in self.params]  # restored below: accumulation is preserved
        try:
            if self.mode == "split":
                self._split_pass(per_sample_loss_fn, task_ids, local_counts, local_present, chunk_size, loss_scale,
                                 keep_graphs, grads, task_sums, graph_losses)
            elif self.mode == "batched":
                unsupported = None
                try:
                    self._batched_pass(per_sample_loss_fn, task_ids, num_tasks, local_counts, chunk_size, loss_scale,
                                       keep_graphs, task_sums, graph_losses)
                except BatchedModeUnsupported as error:
                    if not self.fallback_to_split:
                        raise
                    unsupported = _without_split_hint(error)
                except torch.OutOfMemoryError:
                    # The batched mode holds the whole batch's graph and the K x P buffer (about twice split's
                    # memory in the README's measurement); split holds one cluster's sub-batch graph at a time.
                    if not self.fallback_to_split:
                        raise
                    unsupported = "out of device memory (it needs about twice the split mode's memory)"
                if unsupported is not None:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()  # hand back what the failed pass cached before split runs
                    # Raised in a chunk's forward pass (out of memory: anywhere in the pass); earlier chunks of
                    # the window may have added to the buffers: start the window again in split mode (outside the `except`,
                    # whose traceback would keep the failed forward's activations alive meanwhile).
                    self.mode, self._recorder, self.auto_reason = "split", None, unsupported
                    logger.warning("per-cluster gradients: the batched mode cannot run here (%s); "
                                   "using the split mode from now on", unsupported)
                    grads.zero_()
                    task_sums.zero_()
                    graph_losses.clear()
                    self._split_pass(per_sample_loss_fn, task_ids, local_counts, local_present, chunk_size,
                                     loss_scale, keep_graphs, grads, task_sums, graph_losses)
            else:  # retain_graph: one forward per chunk, a backward per task through the same graph
                for chunk in _chunks(everything, chunk_size):
                    losses = _check_losses(per_sample_loss_fn(chunk), chunk.numel())
                    self.num_forward_calls += 1
                    ids = task_ids[chunk]
                    sums = losses.new_zeros(num_tasks).index_add(0, ids, losses)
                    in_chunk = [i for i in local_present if bool((ids == i).any())]
                    for n, i in enumerate(in_chunk):
                        mean_part = sums[i] / local_counts[i].to(sums.dtype)
                        last = n == len(in_chunk) - 1
                        self._backward_into(mean_part * loss_scale, grads[i], retain_graph=keep_graphs or not last)
                        if keep_graphs:
                            graph_losses[i] = mean_part
                    task_sums.index_add_(0, ids, losses.detach().double())
        finally:
            for p, g in zip(self.params, saved_grads):
                p.grad = g

        if self.sync:
            local_means = (task_sums / local_counts.clamp_min(1).double()).float()
            sync_task_gradients_(grads, local_means, local_counts)
        if loss_scale != 1.0:
            grads.div_(loss_scale)
        # Identical on every process (the rows are synced); one device sync. A method that reads only
        # the Gram matrix (all built-in ones) gets it here, and the check reads its diagonal: sum_p g_ip^2
        # in float64 is inf / nan exactly when a g_ip is (squares of float32 values cannot overflow in
        # float64), which saves a pass over the (K, P) buffer.
        gram = gram_matrix(grads, present) if _reads_gram_only(weighting) else None
        found_inf = not bool(torch.isfinite(grads if gram is None else gram.diagonal()).all())
        if found_inf:
            self._mark_overflow()
            weights = torch.zeros(num_tasks, dtype=torch.float64, device=device)
            return self._stats(task_sums, global_counts, weights, found_inf=True)

        if gram is None:
            weights = weighting.weights_from_grads(grads, present).detach().double()
        else:  # = weights_from_grads(grads, present), without forming the Gram matrix twice
            weights = weighting.weights_from_gram(gram, present).to(grads.dtype).detach().double()
        if self.sync and is_distributed():
            broadcast_(weights)
            broadcast_module_state_(weighting)

        if self.rest_params:
            # Subset mode: one backward of sum_i w_i L_i writes every parameter's gradient, the
            # subset's included (= w @ G_subset).
            if keep_graphs:
                self._backward_weighted(graph_losses, weights, local_counts, global_counts, grad_scale * loss_scale)
            else:
                self._weighted_pass(per_sample_loss_fn, task_ids, everything, weights, global_counts,
                                    grad_scale * loss_scale, chunk_size, count_sums=False)
        else:
            # w @ G, synced already (identical on every process), added to .grad.
            torch.mv(grads.T, weights.to(grads.dtype), out=update)
            if grad_scale * loss_scale != 1.0:
                update.mul_(grad_scale * loss_scale)
            if self.write_update is not None:  # DeepSpeed: the engine's own backward takes the update
                self.write_update(self.task_params, self._views(update))
                return self._finish(weighting, task_sums, global_counts, present, weights, grad_scale * loss_scale)
            for p, view in zip(self.task_params, self._views(update)):
                if p.grad is None:
                    p.grad = view.clone()  # a copy: the buffer is reused next step
                else:
                    p.grad.add_(view)
        return self._finish(weighting, task_sums, global_counts, present, weights, grad_scale * loss_scale)

    def _in_lockstep(self) -> bool:
        return self.lockstep and self.sync and is_distributed()

    def _lockstep_chunks(self, counts: List[int], chunk_size) -> List[int]:
        """How many chunks each entry of `counts` takes on the process that needs the most (one all-reduce)."""
        local = torch.tensor([0 if n == 0 else (1 if chunk_size is None else -(-n // chunk_size)) for n in counts],
                             dtype=torch.long, device=self.params[0].device)
        if is_distributed():
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
        return local.tolist()

    def _padding_loss(self, per_sample_loss_fn, task_ids) -> torch.Tensor:
        """A forward pass whose loss is zero times one sample's: it joins the collectives of a pass that
        this process has no samples for, and adds exact zeros to the gradients."""
        self.num_forward_calls += 1
        return per_sample_loss_fn(torch.zeros(1, dtype=torch.long, device=task_ids.device)).sum() * 0.0

    def _split_pass(self, per_sample_loss_fn, task_ids, local_counts, local_present, chunk_size, loss_scale,
                    keep_graphs, grads, task_sums, graph_losses) -> None:
        """Split mode: one forward + backward per task sub-batch (in chunks of at most `chunk_size`),
        each backpropagated straight into the task's row of the buffer.

        Lockstep (FSDP: each forward and backward all-gathers the sharded frozen weights, a collective):
        every process runs task i in as many passes as the process with the most samples of it needs,
        padding with passes of zero loss where it has fewer (none with equal shares per process,
        stratified sampling)."""
        passes = self._lockstep_chunks(local_counts.tolist(), chunk_size) if self._in_lockstep() else None
        for i in (range(len(passes)) if passes is not None else local_present):
            members = (task_ids == i).nonzero().squeeze(1)
            pieces = _chunks(members, chunk_size) if members.numel() else []
            for chunk in pieces:
                losses = _check_losses(per_sample_loss_fn(chunk), chunk.numel())
                self.num_forward_calls += 1
                mean_part = losses.sum() / members.numel()  # chunk's share of task i's local mean
                self._backward_into(mean_part * loss_scale, grads[i], retain_graph=keep_graphs)
                task_sums[i] += losses.detach().double().sum()
                if keep_graphs:
                    graph_losses[i] = mean_part
            for _ in range(passes[i] - len(pieces) if passes is not None else 0):
                padding = self._padding_loss(per_sample_loss_fn, task_ids)
                self._backward_into(padding * loss_scale, grads[i], retain_graph=False)

    def _batched_pass(self, per_sample_loss_fn, task_ids, num_tasks, local_counts, chunk_size, loss_scale,
                      keep_graphs, task_sums, graph_losses) -> None:
        """Batched mode: the window sorted by task (each task one contiguous slice of a chunk), one
        forward and one backward per chunk of the objective sum_i L_i (L_i task i's LOCAL mean, as the
        split engine's rows), asking autograd for no parameter gradient: the taps of `cluster_grads`
        add every layer's per-cluster weight gradients into the rows of the buffer."""
        order = torch.sort(task_ids, stable=True).indices
        inverse_counts = loss_scale / local_counts.clamp_min(1).double()
        recorder = self._recorder
        for chunk in _chunks(order, chunk_size):
            ids = task_ids[chunk]
            recorder.start(self._task_views, ids, num_tasks)
            try:
                losses = _check_losses(per_sample_loss_fn(chunk), chunk.numel())
                recorder.stop_recording_forward()
                if recorder.ran_without_grad:
                    raise BatchedModeUnsupported("a trainable layer ran with gradients disabled inside the loss closure (e.g. "
                                       "reentrant gradient checkpointing): the batched mode cannot form its per-cluster "
                                       "gradients; use mode='split'")
                self.num_forward_calls += 1
                objective = (inverse_counts[ids].to(losses.dtype) * losses).sum()
                torch.autograd.grad(objective, recorder.anchor, retain_graph=keep_graphs, allow_unused=True)
                self.num_task_backward_calls += 1
            finally:
                recorder.finish()
            task_sums.index_add_(0, ids, losses.detach().double())
            if keep_graphs:  # one chunk holds the whole window: the final weighted pass reuses its graph
                start = 0
                for i, n in enumerate(torch.bincount(ids, minlength=num_tasks).tolist()):
                    if n:
                        graph_losses[i] = losses[start:start + n].sum() / local_counts[i].to(losses.dtype)
                        start += n

    def _finish(self, weighting, task_sums, global_counts, present, weights, scale) -> Dict[str, torch.Tensor]:
        """The step's statistics, then `weighting.finish_task_step` on its global task losses (a
        combined weighting trains UW's log-variances there, scaled like the model's gradients)."""
        stats = self._stats(task_sums, global_counts, weights, found_inf=False)
        weighting.finish_task_step(stats["task_losses"], present, lambda loss: (loss * scale).backward())
        return stats

    def _stats(self, task_sums, global_counts, weights, found_inf: bool) -> Dict[str, torch.Tensor]:
        if self.sync:
            task_sums = all_reduce_sum_(task_sums.clone())
        task_losses = (task_sums / global_counts.clamp_min(1).double()).float()
        total = global_counts.sum().clamp_min(1)
        return {
            "task_losses": task_losses,
            "counts": global_counts.detach(),
            "weights": weights.float(),
            "loss": (task_sums.sum() / total.double()).float(),
            "found_inf": torch.tensor(found_inf),
        }

    def _mark_overflow(self) -> None:
        """Make the GradScaler see the overflow: it then skips `optimizer.step()` and lowers its scale.
        With `write_update` (DeepSpeed) nothing is handed to the engine, which then does not step."""
        if self.write_update is not None:
            return
        p = self.params[0]
        if p.grad is None:
            p.grad = torch.full_like(p, float("inf"))
        else:
            p.grad.fill_(float("inf"))

    def _weighted_pass(self, per_sample_loss_fn, task_ids, everything, weights, global_counts, scale, chunk_size,
                       count_sums: bool = True) -> torch.Tensor:
        """Forward + backward of sum_i w_i L_i chunk by chunk, into every trainable parameter's `.grad`.

        L_i is task i's mean over the GLOBAL window, so sample s of task i enters with coefficient
        w_i / N_i: the local objectives of all processes sum to the global one, and the engine sums
        the gradients over processes itself (the closure bypasses DDP). Returns the per-task sums of
        the detached per-sample losses (for the statistics)."""
        coefficient = (weights.double() / global_counts.clamp_min(1).double())
        task_sums = torch.zeros(len(global_counts), dtype=torch.float64, device=task_ids.device)
        distributed = self.sync and is_distributed()
        pieces = [chunk for chunk in _chunks(everything, chunk_size) if chunk.numel()]
        if self.write_update is not None:
            # DeepSpeed: the gradient of this process's share by autograd.grad into a flat buffer (DeepSpeed owns
            # `.grad`), summed over processes below, then handed to the engine's own backward (`write_update`)
            _, update = self._buffers(len(global_counts))
            update.zero_()

            def backward(objective):
                self._backward_into(objective, update, False)
        else:
            if distributed:
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)  # same tensor list on every process for the all-reduce
                    else:
                        p.grad.div_(world_size())  # the sum below restores what was there

            def backward(objective):
                objective.backward(inputs=self.params)
        # lockstep (FSDP): the passes another process runs and this one has not, as padding passes
        padding = (self._lockstep_chunks([everything.numel()], chunk_size)[0] - len(pieces)
                   if self._in_lockstep() else 0)
        for chunk in pieces:
            losses = _check_losses(per_sample_loss_fn(chunk), chunk.numel())
            self.num_forward_calls += 1
            ids = task_ids[chunk]
            backward((coefficient[ids].to(losses.dtype) * losses).sum() * scale)
            if count_sums:
                task_sums.index_add_(0, ids, losses.detach().double())
        for _ in range(max(padding, 0)):
            backward(self._padding_loss(per_sample_loss_fn, task_ids))
        if self.write_update is not None:
            if distributed:
                all_reduce_sum_(update)
            self.write_update(self.task_params, self._views(update))
        elif distributed:
            all_reduce_sum_tensors_([p.grad for p in self.params])
        return task_sums

    def _backward_weighted(self, graph_losses, weights, local_counts, global_counts, scale) -> None:
        """One backward of sum_i w_i L_i over all trainable parameters, through the kept task graphs.

        `graph_losses[i]` is task i's local mean. Under data parallelism the local objective is
        sum_i w_i (n_{i,p} / N_i) L_{i,p}; summing its gradient over processes (one bucketed
        all-reduce) gives sum_i w_i grad L_i^global exactly. Earlier content of `.grad` (identical
        on every process, since the engine only ever writes synced values) is divided by the world
        size first so that the sum restores it (exact for a power-of-two world size, within float
        rounding otherwise)."""
        distributed = self.sync and is_distributed()
        if not graph_losses and not distributed:
            return  # (a process without samples still joins the all-reduce below)
        total = 0.0
        for i, loss_i in graph_losses.items():
            coefficient = weights[i].to(loss_i.dtype) * scale
            if distributed:
                share = local_counts[i].to(loss_i.dtype) / global_counts[i].clamp_min(1).to(loss_i.dtype)
                coefficient = coefficient * share
            total = total + coefficient * loss_i
        if distributed:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.div_(world_size())
        if torch.is_tensor(total):
            total.backward(inputs=self.params)
        if distributed:
            all_reduce_sum_tensors_([p.grad for p in self.params])


def combine_task_losses(
    weighting: LossWeighting,
    per_sample: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: Optional[int] = None,
    sync: bool = True,
):
    """The loss-based path: per-sample losses -> K task means -> `weighting.combine` -> one scalar.

    Never forms a per-task gradient: the returned scalar is backpropagated once, through the
    (DDP-wrapped) model, like a vanilla loss. Under data parallelism (`sync=True` and several
    processes) the weighting sees the global count-weighted task means on every process, while the
    gradient of the local losses is scaled so that DDP's average is the exact global gradient
    (`distributed.sync_task_losses`).

    Returns:
        `(loss, stats)`: the scalar to backpropagate, and a dict of detached `task_losses` (K,),
        `counts` (K,), `weights` (K,) (the weighting's `last_weights`) and `loss`.
    """
    if getattr(weighting, "needs_task_gradients", False):
        raise ValueError(f"weighting {weighting.name or type(weighting).__name__!r} is gradient-based: "
                         "use TaskGradientEngine.backward (or weighted_backward with an engine)")
    num_tasks = _check_num_tasks(weighting, num_tasks)
    task_ids = _check_task_ids(task_ids, num_tasks).to(per_sample.device)
    task_losses, counts = reduce_task_losses(per_sample, task_ids, num_tasks)
    if sync:
        task_losses, counts = sync_task_losses(task_losses, counts)
    present = counts > 0
    loss = weighting.combine(task_losses, present)
    total = counts.sum().clamp_min(1)
    stats = {
        "task_losses": task_losses.detach(),
        "counts": counts.detach(),
        "weights": weighting.last_weights.detach().clone(),
        "loss": (task_losses.detach() * counts.to(task_losses.dtype)).sum() / total,
    }
    return loss, stats


def weighted_backward(
    weighting: Optional[Weighting],
    per_sample_loss_fn: PerSampleLossFn,
    task_ids: torch.Tensor,
    num_tasks: int,
    engine: Optional[TaskGradientEngine] = None,
    backward_fn: Optional[Callable[[torch.Tensor], None]] = None,
    grad_scale: float = 1.0,
    sync: bool = True,
    chunk_size: Optional[int] = None,
    no_sync: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
    loss_scale: float = 1.0,
    task_groups: Optional[torch.Tensor] = None,
    weighting_backward_fn: Optional[Callable[[torch.Tensor], None]] = None,
) -> Dict[str, torch.Tensor]:
    """One optimizer step's backward for any weighting, over a window of micro-batches; the trainer's dispatch.

    * `weighting is None` (vanilla, `--mtl_method none`): the mean per-sample loss of the window; with
      `task_groups` (the group of each task, e.g. Diff-Tuning's sources), the sum over groups of the
      mean loss within each group (downstream mean + lambda x retention mean).
    * a `LossWeighting`: the gradient of `combine(L_1..L_K)` over the window's task means, i.e.
      sum_i c_i grad L_i with c = `loss_coefficients(weighting, present)` fixed before the first
      chunk; after the last chunk, on the window's (global, detached) task losses, the method's
      `weighting_loss` is back-propagated into its own parameters (UW's log-variances) through
      `backward_fn`, and `finish_step` commits its step (RLW's draw, DWA's history), as `base.py`
      describes.
    * a `GradientWeighting`: `engine.backward(...)` (an engine is required; the closure must use the
      unwrapped model, see the module docstring).

    Vanilla and loss-based windows run chunk by chunk (`chunk_size` samples at most) through
    `backward_fn` (e.g. `accelerator.backward`, which applies an fp16 GradScaler's scale itself) on
    the DDP-wrapped model; `no_sync()` (e.g. `lambda: accelerator.no_sync(model)`) defers DDP's
    all-reduce to the last chunk. Sample s of task i enters with coefficient c_i / N_i (N_i its
    GLOBAL count, agreed before the first chunk) times the number of processes, so that DDP's
    average is the exact gradient of the global objective. `loss_scale` is only for the engine
    (gradient-based path); `grad_scale` multiplies every path's gradient.

    `backward_fn` defaults to `loss.backward()`. `weighting_backward_fn` (default `backward_fn`) takes
    the weighting's own loss instead, where the model's backward cannot (under DeepSpeed the engine's
    `backward` would count it as one more micro-batch: `training.deepspeed_support`). Returns the stats dict of the path taken
    (`task_losses`, `counts`, `weights`, `loss`, `found_inf`, all detached).
    """
    backward_fn = backward_fn or (lambda loss: loss.backward())
    if weighting is not None and weighting.needs_task_gradients:
        if engine is None:
            raise ValueError(f"weighting {weighting.name!r} needs per-task gradients: pass engine=TaskGradientEngine(params)")
        return engine.backward(weighting, per_sample_loss_fn, task_ids, num_tasks, grad_scale=grad_scale,
                               chunk_size=chunk_size, loss_scale=loss_scale)

    chunk_size = _check_chunk_size(chunk_size)
    if weighting is not None:
        num_tasks = _check_num_tasks(weighting, num_tasks)
    task_ids = _check_task_ids(task_ids, num_tasks)
    local_counts, global_counts = global_task_counts(task_ids, num_tasks, sync)
    present = global_counts > 0
    if weighting is None:
        groups = torch.zeros(num_tasks, dtype=torch.long) if task_groups is None else torch.as_tensor(task_groups).long()
        groups = groups.to(task_ids.device)
        group_counts = torch.zeros(int(groups.max()) + 1, dtype=torch.float64, device=task_ids.device)
        group_counts.index_add_(0, groups, global_counts.double())
        task_coefficients = 1.0 / group_counts.clamp_min(1)[groups]
    else:
        coefficients = loss_coefficients(weighting, present.to(weighting.last_weights.device)).to(task_ids.device)
        if sync:
            broadcast_(coefficients)
        task_coefficients = coefficients / global_counts.clamp_min(1).double()
    # DDP averages the processes' gradients: scale the local objective by the world size.
    factor = (world_size() if sync else 1) * grad_scale

    task_sums = torch.zeros(num_tasks, dtype=torch.float64, device=task_ids.device)
    pieces = _chunks(torch.arange(task_ids.numel(), device=task_ids.device), chunk_size)
    for n, chunk in enumerate(pieces):
        deferred = no_sync is not None and n < len(pieces) - 1
        with (no_sync() if deferred else contextlib.nullcontext()):
            losses = _check_losses(per_sample_loss_fn(chunk), chunk.numel())
            ids = task_ids[chunk].to(losses.device)
            task_sums.index_add_(0, ids.to(task_sums.device), losses.detach().double().to(task_sums.device))
            objective = (task_coefficients.to(losses.device)[ids].to(losses.dtype) * losses).sum() * factor
            backward_fn(objective)
    if sync:
        all_reduce_sum_(task_sums)
    task_losses = (task_sums / global_counts.clamp_min(1).double()).float()
    total = global_counts.sum().clamp_min(1)
    stats = {"task_losses": task_losses, "counts": global_counts,
             "loss": (task_sums.sum() / total.double()).float(), "found_inf": torch.tensor(False)}
    if weighting is None:
        # A plain mean weighs task i by its share of the window (of its group).
        stats["weights"] = (global_counts.double() * task_coefficients).float()
        return stats
    # Commit the method's step on the window's global task losses (the trainer puts the state back
    # if an fp16 overflow makes the optimizer skip the step).
    device = weighting.last_weights.device
    finish_loss_weighting_step(weighting, task_losses.to(device), present.to(device), coefficients.to(device),
                               lambda loss: (weighting_backward_fn or backward_fn)(loss * grad_scale))
    stats["weights"] = weighting.last_weights.detach().clone().float()
    return stats
