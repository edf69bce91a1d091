"""Per-task (per-timestep-cluster) gradients for gradient-based weightings, and the training-step glue.

ANT (Go et al., NeurIPS 2023, Sec. 4.2) balances the K cluster losses L_i with a multi-task method.
Gradient-based methods (PCGrad, Nash-MTL, IMTL-G, MGDA-UB, CAGrad) need the K per-task gradients
g_i = grad_theta L_i; the reference code gets them with K backward passes through one graph
(`retain_graph=True`), 3 to 3.7 times an ordinary step. This module computes them once, for every
method (`GradientWeighting.weights_from_grads(grads[K, P], present) -> w[K]`), and writes the
update w @ G into the parameters' `.grad`, where any optimizer picks it up.

Modes of `TaskGradientEngine`:

* ``"split"`` (default): split the batch by task and run one forward + backward per present task
  on its sub-batch. The K sub-batches together are one batch, so this costs about one ordinary
  step (ENVIRONMENT.md: 1.1x). Exact only for models whose normalisation is per sample (GroupNorm,
  LayerNorm, attention): diffusers' UNets and transformers. Each sub-batch graph is freed after its
  backward, so activation memory is that of the largest sub-batch.
* ``"retain_graph"``: one forward on the whole batch, then K backward passes through the retained
  graph (the reference code's way). Needed for models with batch statistics (BatchNorm).

Per-task gradients over a parameter subset (``subset=``, e.g. the LoRA parameters or a few named
modules): the K x P matrix then only spans the subset (K x |subset| memory), the weights w are
chosen from it and applied as loss weights: ONE further backward pass of sum_i w_i L_i writes the
gradient of every trainable parameter. For that pass the engine keeps the task graphs alive
(``retain_graph=True`` during the task passes) rather than recomputing the forward: the graphs of
all sub-batches together weigh what one ordinary step's graph weighs, and a second forward would
cost a third more time. The result over all parameters is exactly w @ G (tests check). Cost: the
K task passes plus the weighted pass, about twice an ordinary step (the task passes still run the
full backward, see `_backward_into`); the memory saving is the point of this mode.

Steps on stored weights: a method whose `needs_gradients_this_step()` is False (Nash-MTL between
its solves, every `update_every` steps) gets `reuse_weights(present)` and one forward + one
backward of sum_i w_i L_i on the whole batch, as cheap as a vanilla step.

The weights come from `weighting.weights_from_grads(G)`, which works on the K x K Gram matrix
accumulated in float64 over column chunks of G (`base.gram_matrix`); a method that overrides
`weights_from_grads` gets G itself.

How the trainer calls it::

    engine = TaskGradientEngine([p for p in unet.parameters() if p.requires_grad])  # once

    # each step: draw noise and timesteps for the WHOLE batch first, then build the closure
    def per_sample_loss_fn(indices):           # indices: LongTensor into the batch, or None = all
        sel = slice(None) if indices is None else indices
        pred = unwrapped_unet(noisy[sel], timesteps[sel]).sample
        return per_sample_loss(pred, target[sel])   # (len(indices),)

    stats = weighted_backward(weighting, per_sample_loss_fn, task_ids, num_tasks, engine=engine,
                              backward_fn=accelerator.backward,
                              grad_scale=1 / accelerator.gradient_accumulation_steps)
    optimizer.step(); optimizer.zero_grad()

Rules the closure and the trainer must follow:

* The closure must be deterministic per sample: it may not draw new noise / timesteps / dropout
  masks per call (draw them for the whole batch before building it), or the task gradients of
  different sub-batches would belong to different samples. Randomness inside the model (DiT's
  class-label dropout in training mode) still gives valid stochastic gradients, only not bitwise
  the ones of `retain_graph`; pass pre-drawn `force_drop_ids` where exactness matters.
* Data parallelism: for gradient-based weightings the closure must run the UNWRAPPED model
  (`accelerator.unwrap_model(model)`), not the DDP wrapper: the engine all-reduces the per-task
  gradients itself (count-weighted, before the weights are chosen, see `distributed.py`), and the
  DDP reducer would otherwise average them a second time. For loss-based weightings and vanilla
  training the closure runs the wrapped model as usual, and DDP's own backward averages once.
* Gradient accumulation: the engine adds into `.grad` (never overwrites); pass
  `grad_scale = 1 / gradient_accumulation_steps` (what `accelerator.backward` does to a loss).
  With an fp16 `GradScaler`, also multiply `grad_scale` by the scaler's current scale, since the
  engine's gradients bypass the scaled backward.
* Learnable weighting parameters (UW's log-variances) live in the weighting module: give them to
  an optimizer (`weighting.param_groups()`), but do not pass the weighting to
  `accelerator.prepare` (DDP would wrap it; its gradients are already identical everywhere).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from ..losses import reduce_task_losses
from .base import GradientWeighting, LossWeighting, Weighting
from .distributed import (
    all_reduce_sum_tensors_,
    is_distributed,
    sync_task_gradients_,
    sync_task_losses,
    world_size,
)

ENGINE_MODES = ("split", "retain_graph")

PerSampleLossFn = Callable[[Optional[torch.Tensor]], torch.Tensor]


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


class TaskGradientEngine:
    """Per-task gradients G[K, P] for a `GradientWeighting`, and the update w @ G written to `.grad`.

    Args:
        parameters: the parameters the optimizer updates; those with `requires_grad=False` are
            ignored (their `.grad` is never touched). All trainable ones must share one dtype
            (fp32 master weights under Accelerate's mixed precision; see
            `diffusers.training_utils.cast_training_params` for LoRA on a half-precision model).
        mode: ``"split"`` (one forward + backward per task sub-batch; exact for per-sample
            normalisation) or ``"retain_graph"`` (one forward, K backward passes; any model).
        subset: parameters (or modules, whose trainable parameters are taken) to form the task
            gradients on; `None` = all `parameters`. Must be among `parameters`. The weights then
            come from the subset's gradients and all parameters get the gradient of
            sum_i w_i L_i from one extra backward pass.
        sync: average the task gradients over processes when torch.distributed runs with several
            processes (see `distributed.py`). `False` keeps every process local (tests, analysis).

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
    ):
        if mode not in ENGINE_MODES:
            raise ValueError(f"unknown engine mode {mode!r}; valid modes: {', '.join(ENGINE_MODES)}")
        self.mode = mode
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
        self.num_task_params = sum(p.numel() for p in self.task_params)
        self._grads: Optional[torch.Tensor] = None  # (K, P_task), reused between calls
        self._update: Optional[torch.Tensor] = None  # (P_task,), reused between calls
        # Statistics of the backward passes, for tests and benchmarks.
        self.num_forward_calls = 0
        self.num_task_backward_calls = 0

    # -- buffers -----------------------------------------------------------------------------
    @property
    def task_grads(self) -> Optional[torch.Tensor]:
        """The last per-task gradients (K, P_task), synced across processes. Overwritten by the next call."""
        return self._grads

    def _buffers(self, num_tasks: int):
        p0 = self.task_params[0]
        if self._grads is None or self._grads.shape[0] != num_tasks or self._grads.device != p0.device:
            self._grads = torch.zeros(num_tasks, self.num_task_params, dtype=p0.dtype, device=p0.device)
            # w @ G; subset mode writes its update by a backward pass instead and needs no buffer
            self._update = None if self.rest_params else torch.zeros(self.num_task_params, dtype=p0.dtype, device=p0.device)
        return self._grads, self._update

    def _views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Views of a flat (P_task,) tensor shaped like each task parameter."""
        views, offset = [], 0
        for p in self.task_params:
            views.append(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def _backward_into(self, loss: torch.Tensor, row: torch.Tensor, retain_graph: bool) -> None:
        """Add d loss / d task_params into the flat `row`: backward with `.grad` pointing at its views.

        AccumulateGrad adds in place into an existing `.grad`, so the gradient lands in the row with no
        P-sized temporary (torch.autograd.grad would return one).

        The pass runs over ALL trainable parameters (`inputs=self.params`), not just the subset:
        torch 2.13's CPU GroupNorm backward segfaults on channels-last activations (which diffusers
        UNets produce on CPU) when only its weight gradient is requested and not its input gradient,
        which is what a pass restricted to a subset such as `up_blocks` asks of the first GroupNorm
        of the subset (minimal repro: `torch.ops.aten.native_group_norm_backward` with a channels-last
        input and output_mask [False, True, True]). Requesting every trainable parameter asks
        exactly what an ordinary backward asks. The other parameters' gradients of this pass are
        discarded (their `.grad` is restored by the caller)."""
        for p, view in zip(self.task_params, self._views(row)):
            p.grad = view
        for p in self.rest_params:
            p.grad = None
        loss.backward(retain_graph=retain_graph, inputs=self.params)
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
    ) -> Dict[str, torch.Tensor]:
        """Per-task gradients -> weights -> add `grad_scale * w @ G` to the parameters' `.grad`.

        Args:
            weighting: a `GradientWeighting` (loss-based ones go through `combine_task_losses`).
            per_sample_loss_fn: `fn(indices) -> Tensor[len(indices)]`, the per-sample losses of
                those samples of the current batch (`None` = the whole batch), through the
                unwrapped model.
            task_ids: (B,) integer task (cluster) id of every sample of the local batch.
            num_tasks: K; defaults to the weighting's.
            grad_scale: factor on the written gradient (1 / gradient-accumulation steps).

        Returns:
            dict of detached tensors: `task_losses` (K,) global mean loss per task (0 if absent),
            `counts` (K,) global sample counts, `weights` (K,) the task weights (0 if absent),
            `loss` the count-weighted mean loss of the batch (what vanilla training would log).
        """
        if not getattr(weighting, "needs_task_gradients", False):
            raise ValueError(f"weighting {weighting.name or type(weighting).__name__!r} is loss-based: use "
                             "combine_task_losses (or weighted_backward), which needs no per-task gradients")
        num_tasks = _check_num_tasks(weighting, num_tasks)
        task_ids = _check_task_ids(task_ids, num_tasks)
        if not weighting.needs_gradients_this_step():
            return self._backward_reused_weights(weighting, per_sample_loss_fn, task_ids, num_tasks, grad_scale)
        grads, update = self._buffers(num_tasks)
        grads.zero_()
        counts = torch.bincount(task_ids, minlength=num_tasks)
        local_present = [i for i, n in enumerate(counts.tolist()) if n > 0]  # one device sync, not K
        keep_graphs = bool(self.rest_params)  # the final all-parameter pass needs the task graphs
        task_losses = torch.zeros(num_tasks, dtype=torch.float32, device=grads.device)
        graph_losses: Dict[int, torch.Tensor] = {}

        saved_grads = [p.grad for p in self.params]  # restored below: accumulation is preserved
        try:
            if self.mode == "split":
                for i in local_present:
                    indices = (task_ids == i).nonzero().squeeze(1)
                    loss_i = _check_losses(per_sample_loss_fn(indices), indices.numel()).mean()
                    self.num_forward_calls += 1
                    self._backward_into(loss_i, grads[i], retain_graph=keep_graphs)
                    task_losses[i] = loss_i.detach().float()
                    if keep_graphs:
                        graph_losses[i] = loss_i
            else:  # retain_graph: one forward, K backward passes through the same graph
                per_sample = _check_losses(per_sample_loss_fn(None), task_ids.numel())
                self.num_forward_calls += 1
                losses, _ = reduce_task_losses(per_sample, task_ids.to(per_sample.device), num_tasks)
                for n, i in enumerate(local_present):
                    last = n == len(local_present) - 1
                    self._backward_into(losses[i], grads[i], retain_graph=keep_graphs or not last)
                    if keep_graphs:
                        graph_losses[i] = losses[i]
                task_losses = losses.detach().float()
        finally:
            for p, g in zip(self.params, saved_grads):
                p.grad = g

        counts = counts.to(grads.device)
        if self.sync:
            task_losses, global_counts = sync_task_gradients_(grads, task_losses, counts)
        else:
            global_counts = counts
        present = global_counts > 0
        weights = weighting.weights_from_grads(grads, present).detach()

        if self.rest_params:
            # Subset mode: one backward of sum_i w_i L_i through the kept task graphs writes every
            # parameter's gradient, the subset's included (= w @ G_subset).
            self._backward_weighted(graph_losses, weights, counts, global_counts, grad_scale)
        else:
            # w @ G, synced already (identical on every process), added to .grad.
            torch.mv(grads.T, weights.to(grads.dtype), out=update)
            if grad_scale != 1.0:
                update.mul_(grad_scale)
            for p, view in zip(self.task_params, self._views(update)):
                if p.grad is None:
                    p.grad = view.clone()  # a copy: the buffer is reused next step
                else:
                    p.grad.add_(view)

        total = global_counts.sum().clamp_min(1)
        return {
            "task_losses": task_losses.detach(),
            "counts": global_counts.detach(),
            "weights": weights,
            "loss": (task_losses * global_counts.to(task_losses)).sum() / total,
        }

    def _backward_reused_weights(self, weighting, per_sample_loss_fn, task_ids, num_tasks, grad_scale):
        """A step on stored weights (Nash-MTL between its solves): no per-task gradient at all.

        One forward on the whole batch and one backward of sum_i w_i L_i, as cheap as a vanilla step;
        under data parallelism the gradients are summed by the engine (the closure bypasses DDP)."""
        per_sample = _check_losses(per_sample_loss_fn(None), task_ids.numel())
        self.num_forward_calls += 1
        local_losses, counts = reduce_task_losses(per_sample, task_ids.to(per_sample.device), num_tasks)
        if self.sync:
            task_losses, global_counts = sync_task_losses(local_losses.detach(), counts)
        else:
            task_losses, global_counts = local_losses.detach(), counts
        weights = weighting.reuse_weights(global_counts > 0).detach().to(per_sample.dtype)
        graph_losses = {i: local_losses[i] for i, n in enumerate(counts.tolist()) if n > 0}
        self._backward_weighted(graph_losses, weights, counts, global_counts, grad_scale)
        total = global_counts.sum().clamp_min(1)
        return {
            "task_losses": task_losses.float(),
            "counts": global_counts.detach(),
            "weights": weights,
            "loss": (task_losses.float() * global_counts.float()).sum() / total,
        }

    def _backward_weighted(self, graph_losses, weights, local_counts, global_counts, grad_scale) -> None:
        """One backward of sum_i w_i L_i over all trainable parameters (subset mode, reused weights).

        Under data parallelism the local objective is sum_i w_i (n_{i,p} / N_i) L_{i,p}; summing its
        gradient over processes (one bucketed all-reduce) gives sum_i w_i grad L_i^global exactly.
        Earlier content of `.grad` (gradient accumulation) is identical on every process, since the
        engine only ever writes synced values; it is divided by the world size first so that the
        sum restores it (exact for a power-of-two world size, within float rounding otherwise)."""
        distributed = self.sync and is_distributed()
        if not graph_losses and not distributed:
            return  # (a process without samples still joins the all-reduce below)
        total = 0.0
        for i, loss_i in graph_losses.items():
            coefficient = weights[i].to(loss_i.dtype) * grad_scale
            if distributed:
                share = local_counts[i].to(loss_i.dtype) / global_counts[i].clamp_min(1).to(loss_i.dtype)
                coefficient = coefficient * share
            total = total + coefficient * loss_i
        if distributed:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)  # same tensor list on every process for the all-reduce
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
) -> Dict[str, torch.Tensor]:
    """One training step's backward for any weighting; the dispatch the trainer uses.

    * `weighting is None` (vanilla, `--mtl_method none`): mean per-sample loss, `backward_fn(loss)`.
    * a `LossWeighting`: one forward on the whole batch, `combine_task_losses`, `backward_fn(loss)`.
    * a `GradientWeighting`: `engine.backward(...)` (an engine is required; the closure must use the
      unwrapped model, see the module docstring). `grad_scale` applies to this path only; the loss
      paths leave scaling to `backward_fn` (e.g. `accelerator.backward`, which divides by the
      gradient-accumulation steps).

    `backward_fn` defaults to `loss.backward()`. Returns the stats dict of the path taken
    (`task_losses`, `counts`, `weights`, `loss`, all detached).
    """
    backward_fn = backward_fn or (lambda loss: loss.backward())
    if weighting is not None and weighting.needs_task_gradients:
        if engine is None:
            raise ValueError(f"weighting {weighting.name!r} needs per-task gradients: pass engine=TaskGradientEngine(params)")
        return engine.backward(weighting, per_sample_loss_fn, task_ids, num_tasks, grad_scale=grad_scale)

    per_sample = per_sample_loss_fn(None)
    _check_losses(per_sample, torch.as_tensor(task_ids).numel())
    if weighting is None:
        task_ids = _check_task_ids(task_ids, num_tasks).to(per_sample.device)
        loss = per_sample.mean()
        task_losses, counts = reduce_task_losses(per_sample.detach(), task_ids, num_tasks)
        if sync:
            task_losses, counts = sync_task_losses(task_losses, counts)  # for logging only
        backward_fn(loss)
        # A plain mean weighs task i by its share of the batch.
        shares = counts.to(per_sample.dtype) / counts.sum().clamp_min(1)
        return {"task_losses": task_losses.detach(), "counts": counts, "weights": shares, "loss": loss.detach()}

    loss, stats = combine_task_losses(weighting, per_sample, task_ids, num_tasks, sync=sync)
    backward_fn(loss)
    return stats
