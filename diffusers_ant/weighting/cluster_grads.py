"""Per-cluster parameter gradients from ONE forward and ONE backward pass (the engine's ``"batched"`` mode).

Why not `torch.autograd.grad(..., is_grads_batched=True)` over the K one-hot cluster weightings:
that vmaps the backward over K cotangents, so every backward kernel does K times the work of an
ordinary backward (each of the K cotangents is zero outside its own cluster's samples, but vmap
does not know it): about the cost of the reference code's K backward passes, only in fewer, wider
kernels. It also fails inside diffusers' UNets on torch 2.13 ("NYI: querying is_contiguous inside
of vmap for memory_format other than torch.contiguous_format", from the channels-last activations
of their convolutions on CPU); on a DiTTransformer2DModel it runs, without a batching-rule fallback.

What is genuinely cheaper, for models whose normalisation is per sample (the condition under which
the split engine is exact too): sample s's activations depend on sample s alone, so the gradient
of task i's loss L_i (the mean over its samples) with respect to sample s's activations is zero
unless s belongs to task i, and is then equal to the gradient of the objective sum_i L_i. ONE
backward pass of sum_i L_i therefore carries every task's activation gradients at once, in one
(B, ...) tensor. The K task gradients only differ where a layer reduces over the batch: the
gradient of its weight, sum_s contribution(x_s, dy_s). So this module lets the backward pass run
on the whole batch (full-size kernels for every input gradient, which is where the split engine
loses to small sub-batches) but asks autograd for no parameter gradient at all; instead, each
trainable layer's output passes through `_ClusterTap`, whose backward sees the layer's output
gradient dy and its saved input x and adds the weight gradient of each cluster's samples into
that cluster's row of the engine's (K, P) buffer. Samples are ordered by cluster, so each
cluster is one contiguous slice of the batch. Arithmetic: one forward, one input-gradient pass and
one weight-gradient pass, as in an ordinary step; only the weight-gradient reductions are split by
cluster (K smaller calls for convolutions and matrix products; one `index_add` for biases and
normalisation scales). This is the per-sample-gradient technique of Opacus and BackPACK (forward
and backward hooks on each layer), summed per cluster instead of per sample; it is written by hand
because neither library sums per group, and neither is a dependency here.

Layers covered (exactly those forwards, with all their options): `nn.Linear`, `nn.Conv1d/2d/3d`
(any padding mode; not transposed), `nn.GroupNorm`, `nn.LayerNorm`, `nn.RMSNorm` and diffusers'
`RMSNorm` (its CPU / CUDA path; not the NPU kernel), `nn.Embedding` (without
`max_norm`, `scale_grad_by_freq`, `sparse`), and subclasses that keep their forward (LoRA's
`lora_A` / `lora_B` layers are plain `nn.Linear` / `nn.Conv2d`). `uncovered_parameters` names every
trainable parameter outside them (e.g. a bare `nn.Parameter` used in a custom forward, DiffFit's
scales): the engine refuses the batched mode for such a model (use ``"split"``).

Assumptions, checked where cheap: every covered layer is called on tensors whose first dimension is
the samples of the forward pass, in order (true for diffusers' UNets and transformers; a video model
that folds frames into the batch is refused by the shape check), and a covered layer's parameters
are used only by that layer's own forward (weight tying through a functional call elsewhere would
be missed; the engine tests compare against the split engine on each model family).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
try:  # diffusers' RMSNorm (the q / k norms of SD3.5, Flux, Qwen-Image), over the last dimension
    from diffusers.models.normalization import RMSNorm as _DiffusersRMSNorm
except ImportError:  # pragma: no cover
    _DiffusersRMSNorm = None
_RMS_NORMS = tuple(c for c in (getattr(nn, "RMSNorm", None), _DiffusersRMSNorm) if c is not None)
_SUPPORTED = (nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding) + _CONVS + _RMS_NORMS


def _supported(module: nn.Module) -> bool:
    """A layer whose forward is one of the covered ones (a subclass must not override forward)."""
    for base in _SUPPORTED:
        if isinstance(module, base) and type(module).forward is base.forward:
            if isinstance(module, _CONVS):
                return isinstance(module.padding, tuple) or module.padding == "valid"
            if isinstance(module, nn.Embedding):
                return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
            return True
    return False


def _owners(root_modules: Sequence[nn.Module]) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """id(parameter) -> [(module, attribute name)] for every parameter held directly by a module."""
    owners: Dict[int, List[Tuple[nn.Module, str]]] = {}
    seen = set()
    for root in root_modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((module, name))
    return owners


def uncovered_parameters(params: Sequence[nn.Parameter], owners) -> List[str]:
    """Descriptions of the parameters the batched mode cannot form per-cluster gradients for."""
    out = []
    for p in params:
        places = owners.get(id(p), [])
        if not places:
            out.append(f"a parameter of shape {tuple(p.shape)} held by none of the given modules")
            continue
        for module, name in places:
            if not _supported(module) or name not in ("weight", "bias"):
                out.append(f"{type(module).__name__}.{name}")
    return out


class BatchedModeUnsupported(RuntimeError):
    """Raised in a chunk's forward pass when the model does something the batched mode cannot follow (a
    layer on a batch of another size, a layer run without gradients), before that chunk's backward: an
    engine in ``"auto"`` mode zeroes what earlier chunks added and runs the window again in ``"split"`` mode."""


class _ClusterTap(torch.autograd.Function):
    """Identity on a layer's output; its backward adds the layer's per-cluster parameter gradients.

    `anchor` (a 0-dim leaf that requires grad) puts every tap on the path of the task pass's
    `torch.autograd.grad(objective, anchor)`: autograd then runs every input-gradient kernel between
    the loss and the taps, and no parameter gradient (no parameter is requested)."""

    @staticmethod
    def forward(ctx, output, anchor, layer_input, recorder, module):
        ctx.recorder, ctx.module = recorder, module
        ctx.save_for_backward(layer_input)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        if ctx.recorder.active:
            (layer_input,) = ctx.saved_tensors
            ctx.recorder.accumulate(ctx.module, layer_input, grad)
        return grad, None, None, None, None


class ClusterGradientRecorder:
    """Installs the taps on the layers that hold `params` and routes their per-cluster gradients into
    per-parameter views (K, *shape) of the engine's buffer.

    Use: `with recorder.recording(row_views, task_ids, counts):` around the forward pass of a chunk
    whose samples are sorted by task; then the backward pass of the chunk's objective with
    `torch.autograd.grad(objective, recorder.anchor)`."""

    def __init__(self, params: Sequence[nn.Parameter], modules: Sequence[nn.Module]):
        owners = _owners(modules)
        missing = uncovered_parameters(params, owners)
        if missing:
            names = sorted(set(missing))
            raise ValueError("the batched per-cluster gradient mode covers nn.Linear, nn.Conv1d/2d/3d, nn.GroupNorm, "
                             "nn.LayerNorm, RMSNorm and nn.Embedding layers; these trainable parameters are elsewhere: "
                             f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''} (use mode='split')")
        wanted = {id(p) for p in params}
        self.layers: List[nn.Module] = []
        seen = set()
        for p in params:
            for module, _ in owners[id(p)]:
                if id(module) not in seen:
                    seen.add(id(module))
                    self.layers.append(module)
        # per layer: which of weight / bias are wanted (trainable task parameters)
        self.wanted = {id(m): {name: getattr(m, name) for name in ("weight", "bias")
                               if getattr(m, name, None) is not None and id(getattr(m, name)) in wanted}
                       for m in self.layers}
        self.anchor: Optional[torch.Tensor] = None
        self.active = False
        self.ran_without_grad = False
        self._handles = []
        self._views: Dict[int, torch.Tensor] = {}
        self._ids: Optional[torch.Tensor] = None
        self._segments: List[Tuple[int, int, int]] = []
        self._sizes: List[int] = []       # sample counts of the chunk's non-empty clusters, in order
        self._tasks: List[int] = []       # their task ids
        self._rows: Dict[int, Tuple[torch.Tensor, ...]] = {}  # id(p) -> its K rows (views[id(p)].unbind(0))
        self._rows_of = None              # the views dict `_rows` was made from
        self._n = 0
        # per convolution, its arguments to aten.convolution_backward, worked out once (the taps run in
        # every backward pass, and each Python-level torch call costs microseconds)
        self._conv_plans = {id(m): _conv_plan(m) for m in self.layers if isinstance(m, _CONVS)}

    # -- set-up per chunk ------------------------------------------------------------------------
    def start(self, views: Dict[int, torch.Tensor], task_ids: torch.Tensor, num_tasks: int) -> None:
        """Record the next forward pass: `views[id(p)]` is p's (K, *p.shape) slice of the buffer,
        `task_ids` the (sorted) task of each sample of the chunk."""
        device = task_ids.device
        if self.anchor is None or self.anchor.device != device:
            self.anchor = torch.zeros((), device=device, requires_grad=True)
        counts = torch.bincount(task_ids, minlength=num_tasks).tolist()  # one device sync per chunk
        segments, start = [], 0
        for i, c in enumerate(counts):
            if c:
                segments.append((i, start, start + c))
                start += c
        self._views, self._ids, self._segments, self._n = views, task_ids, segments, int(task_ids.numel())
        self._sizes = [b - a for _, a, b in segments]
        self._tasks = [i for i, _, _ in segments]
        if views is not self._rows_of:  # the engine re-creates its buffer only when K or the device changes
            self._rows = {key: view.unbind(0) for key, view in views.items()}
            self._rows_of = views
        self.active = True
        self.ran_without_grad = False
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def stop_recording_forward(self) -> None:
        """Remove the forward hooks (the taps already in the graph stay, and fire while `active`)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def finish(self) -> None:
        self.stop_recording_forward()
        self.active = False
        self._views, self._ids, self._segments = {}, None, []

    def _hook(self, module, args, output):
        if not torch.is_grad_enabled():
            # (reentrant gradient checkpointing runs the forward so, and recomputes it in the backward
            # pass where no tap is installed: its layers' gradients would be lost)
            self.ran_without_grad = True
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        layer_input = args[0]
        if layer_input.shape[0] != self._n or output.shape[0] != self._n:
            raise BatchedModeUnsupported(f"{type(module).__name__} was called on a batch of {layer_input.shape[0]} rows in a forward "
                               f"pass of {self._n} samples: the batched per-cluster gradient mode needs layers that "
                               "keep the samples on the first dimension (use mode='split')")
        return _ClusterTap.apply(output, self.anchor, layer_input, self, module)

    # -- the per-cluster reductions ----------------------------------------------------------------
    # Each cluster is a contiguous slice of the chunk: `split` cuts a tensor into all of them in one
    # call, and each weight gradient is added into its row by one fused call (`addmm_`) where there is
    # one. Biases and normalisation scales take one per-sample reduction and one `index_add_`.
    def accumulate(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
        if self._n == 0:
            return  # an empty chunk adds nothing
        wanted = self.wanted[id(module)]
        weight, bias = wanted.get("weight"), wanted.get("bias")
        if x.dtype != dy.dtype and not isinstance(module, (nn.Embedding,) + _RMS_NORMS):
            x = x.to(dy.dtype)  # (an RMSNorm normalises in its own precision, below)
        if isinstance(module, nn.Linear):
            if weight is not None:
                self._matmul_rows(weight, x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
            if bias is not None:
                self._index_add(bias, dy.reshape(self._n, -1, dy.shape[-1]).sum(1))
        elif isinstance(module, _CONVS):
            self._conv(module, x, dy, weight, bias)
        elif isinstance(module, nn.GroupNorm):
            dims = tuple(range(2, dy.dim()))
            if weight is not None:
                x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
                self._index_add(weight, (dy * x_hat).sum(dims) if dims else dy * x_hat)
            if bias is not None:
                self._index_add(bias, dy.sum(dims) if dims else dy)
        elif isinstance(module, nn.LayerNorm):
            shape = tuple(module.normalized_shape)
            if weight is not None:
                x_hat = F.layer_norm(x, shape, eps=module.eps)
                self._index_add(weight, (dy * x_hat).reshape(self._n, -1, *shape).sum(1))
            if bias is not None:
                self._index_add(bias, dy.reshape(self._n, -1, *shape).sum(1))
        elif isinstance(module, _RMS_NORMS):
            if _DiffusersRMSNorm is not None and isinstance(module, _DiffusersRMSNorm):
                shape = dy.shape[-1:]
                x_hat = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + module.eps)
            else:
                shape = tuple(module.normalized_shape)
                x_hat = F.rms_norm(x, shape, eps=module.eps)
            x_hat = x_hat.to(dy.dtype)
            if weight is not None:
                self._index_add(weight, (dy * x_hat).reshape(self._n, -1, *shape).sum(1))
            if bias is not None:
                self._index_add(bias, dy.reshape(self._n, -1, *shape).sum(1))
        elif isinstance(module, nn.Embedding):
            rows = self._rows[id(weight)]
            for i, a, b in self._segments:
                idx = x[a:b].reshape(-1)
                grad_rows = dy[a:b].reshape(-1, dy.shape[-1])
                if module.padding_idx is not None:
                    keep = idx != module.padding_idx
                    idx, grad_rows = idx[keep], grad_rows[keep]
                rows[i].index_add_(0, idx, grad_rows.to(rows[i].dtype))
        else:  # pragma: no cover - refused in __init__
            raise TypeError(type(module).__name__)

    def _matmul_rows(self, weight: nn.Parameter, x_rows: torch.Tensor, dy_rows: torch.Tensor) -> None:
        """Row i of `weight` += dy_i^T x_i for each cluster i: x_rows (samples * positions, in) and
        dy_rows (samples * positions, out), their rows grouped by sample (a Linear layer, or a 1x1
        convolution's activations as (positions, channels) rows: views of channels-last ones, copies otherwise)."""
        per_sample = x_rows.shape[0] // self._n
        sizes = [n * per_sample for n in self._sizes]
        rows = self._rows[id(weight)]
        fused = dy_rows.dtype == rows[0].dtype  # (under autocast the product is half precision, the buffer float32)
        for i, x_i, dy_i in zip(self._tasks, x_rows.split(sizes), dy_rows.split(sizes)):
            row = rows[i].view(dy_rows.shape[1], x_rows.shape[1])
            if fused:
                row.addmm_(dy_i.T, x_i)
            else:
                row.add_(dy_i.T.mm(x_i))

    def _index_add(self, param: nn.Parameter, per_sample: torch.Tensor) -> None:
        """param's row task(s) += per_sample[s] for every sample s of the chunk, in one call."""
        out = self._views[id(param)]
        out.index_add_(0, self._ids, per_sample if per_sample.dtype == out.dtype else per_sample.to(out.dtype))

    def _conv(self, module, x, dy, weight, bias) -> None:
        pad, padding, stride, dilation, zeros, groups, pointwise = self._conv_plans[id(module)]
        if pad is not None:  # as nn.ConvNd._conv_forward: pad explicitly, then convolve without padding
            x = F.pad(x, pad, mode=module.padding_mode)
        if bias is not None:
            self._index_add(bias, dy.sum(tuple(range(2, dy.dim()))))
        if weight is None:
            return
        if pointwise:
            self._pointwise(weight, x, dy)
            return
        # The output gradient in the input's memory layout, once for all clusters: a layout that differs
        # from the input's (diffusers' UNets on CPU mix channels-last and contiguous activations) or none
        # (an output gradient sliced out of a concatenation) makes every per-cluster call below convert it
        # again (measured: 1.3 to 1.6 ms against 1.0 to 1.2 per layer at batch 64, 16x16).
        layout = _memory_format(x)
        if not dy.is_contiguous(memory_format=layout):
            dy = dy.contiguous(memory_format=layout)
        w = module.weight if module.weight.dtype == dy.dtype else module.weight.to(dy.dtype)
        rows = self._rows[id(weight)]
        for i, x_i, dy_i in zip(self._tasks, x.split(self._sizes), dy.split(self._sizes)):
            _, dw, _ = torch.ops.aten.convolution_backward(dy_i, x_i, w, None, stride, padding, dilation, False, zeros,
                                                           groups, [False, True, False])
            rows[i].add_(dw)

    def _pointwise(self, weight: nn.Parameter, x: torch.Tensor, dy: torch.Tensor) -> None:
        """A 1x1 convolution (UNets' shortcuts) is a Linear layer on the channels, so its weight gradient is
        a matrix product per cluster (torch's small-batch weight gradient of a 1x1 convolution takes its
        slow path). Which product depends on the layout of the activations:
        * channels-last input and output gradient: the (positions, channels) views are free, one matrix
          product per cluster over all its samples' positions (`_matmul_rows`);
        * otherwise (channels-first), the per-sample products dy_s x_s^T of one batched `bmm` over the
          cluster's samples, summed: no transposing copy of either activation. It holds one (O, C) product
          per sample, so it is taken only where those are no larger than the activations themselves
          (O * C <= positions * (O + C)); elsewhere the transposing copy is the smaller cost.
        Measured at batch 64, K = 5 (2 threads): 96 -> 32 channels at 16x16 channels-first, 3.0 ms for the
        copies and `addmm_` against 0.96 for `bmm` (0.66 for torch's weight gradient of the whole batch)."""
        order = (0, *range(2, x.dim()), 1)
        x_last, dy_last = x.permute(order), dy.permute(order)
        out_channels, in_channels = dy.shape[1], x.shape[1]
        positions = x[0, 0].numel()
        if ((x_last.is_contiguous() and dy_last.is_contiguous())
                or out_channels * in_channels > positions * (out_channels + in_channels)):
            self._matmul_rows(weight, x_last.reshape(-1, in_channels), dy_last.reshape(-1, out_channels))
            return
        rows = self._rows[id(weight)]
        for i, x_i, dy_i in zip(self._tasks, x.split(self._sizes), dy.split(self._sizes)):
            per_sample = torch.bmm(dy_i.flatten(2), x_i.flatten(2).transpose(1, 2))  # (n, O, C)
            rows[i].view(out_channels, in_channels).add_(per_sample.sum(0, dtype=rows[i].dtype))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The channels-last format `x` is laid out in, else the contiguous one."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _conv_plan(module) -> tuple:
    """(explicit padding or None, padding, stride, dilation, output padding, groups, is a 1x1 convolution
    without stride or padding) of a convolution layer, for `convolution_backward`."""
    n = module.weight.dim() - 2
    pad = None
    if module.padding_mode != "zeros":
        pad, padding = module._reversed_padding_repeated_twice, [0] * n
    elif module.padding == "valid":
        padding = [0] * n
    else:
        padding = list(module.padding)
    pointwise = (module.groups == 1 and all(k == 1 for k in module.weight.shape[2:])
                 and all(s == 1 for s in module.stride) and all(p == 0 for p in padding))
    return pad, padding, list(module.stride), list(module.dilation), [0] * n, module.groups, pointwise
