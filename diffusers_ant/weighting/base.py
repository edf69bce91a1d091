"""Base classes for multi-task weightings over timestep clusters (ANT, Go et al. 2023, Sec. 4.2).

Following torchjd's split, computing per-task gradients (see `engine.py`) is kept apart from
choosing how to combine them (the classes here):

* a `LossWeighting` turns the K task losses into one scalar to backpropagate:
  `combine(task_losses[K]) -> Tensor[]`; it never needs per-task gradients.
* a `GradientWeighting` turns K flattened per-task gradients into one update direction:
  `aggregate(grads[K, P]) -> Tensor[P]`. Every method here returns a direction in the span of
  the task gradients, so each is defined by `task_weights(gram[K, K]) -> w[K]` on the Gram matrix
  G G^T and `aggregate(G) = w @ G`. Working on the K x K Gram matrix keeps the methods cheap,
  and lets the engine apply the weights as loss weights when the gradients were formed on a
  parameter subset only.

Empty tasks: both entry points take an optional boolean `present[K]`. Absent tasks (a timestep
cluster with no sample in this batch) get weight 0 and do not enter the method's computation;
their state (UW's log-variance, DWA's history, Nash-MTL's alpha) is left untouched.

`last_weights[K]` holds, after each call, the coefficient of each task's loss (or gradient) in the
update, absent tasks at 0: the figure to log per task.

One optimizer step, one weighting step. A method's state (RLW's generator, DWA's loss history,
Nash-MTL's alpha and step counter, PCGrad's generator) advances once per optimizer step, in one
place, so that gradient accumulation (weights chosen once for the whole accumulation window) and
an fp16 step skipped for inf / nan (nothing advances) are both exact:

* loss-based methods (`LossWeighting`): every one here is linear in the task losses, with
  coefficients that do not depend on the current losses. The trainer splits a step into

      coefficients = weighting.loss_coefficients(present)     # pure: c_i = d combine / d L_i, float64
      for micro_batch in window:                              # backpropagate sum_i c_i L_i, batch by batch
          backward(sum_i coefficients[i] * L_i(micro_batch) * its share of the step)
      own = weighting.weighting_loss(task_losses, present)    # pure: None, or a scalar for the
      if own is not None: backward(own)                       #   method's own parameters (UW)
      optimizer.step()
      if the step was taken (not skipped for inf / nan):
          weighting.finish_step(task_losses, present, coefficients)   # commits the step's state

  `task_losses` are the step's global (all processes, all micro-batches) detached mean task
  losses. `loss_coefficients` and `weighting_loss` change nothing, however often they are called
  (RLW peeks at its next draw); `finish_step` is the one call that advances state (RLW's
  generator, DWA's loss window and history) and records `last_weights`. Because `finish_step`
  comes after `optimizer.step()` (which is when a skipped step is known), it records the
  `coefficients` passed to it rather than recomputing them: UW's log-variances have moved by then.
  `combine(task_losses, present)` is exactly these calls on one batch (coefficients, the scalar,
  `finish_step`), returning the scalar to backpropagate: its gradient w.r.t. the model is that of
  sum_i c_i L_i and w.r.t. the method's parameters that of `weighting_loss`.
* gradient-based methods (`GradientWeighting`): state advances only in `weights_from_grads`,
  `weights_from_gram` and `reuse_weights`, each called once per optimizer step (the engine does
  not call them on a step it skips); `needs_gradients_this_step` and `stored_weights` only read.
  On a step with stored weights (Nash-MTL between solves) the overflow is known only after the
  backward pass: take the weights from `stored_weights(present)` and call
  `reuse_weights(present)` (which returns the same weights) once the step is known to be taken.

State: learnable parameters and tensor state live in parameters / buffers; Python-side state
(the random generator, step counters, solver records) goes through nn.Module's
`get_extra_state` / `set_extra_state`, so `state_dict()` / `load_state_dict()` carry everything.
The extra state holds tensors only, so `flat_state_dict()` can be written with safetensors.

Every process of a data-parallel run must see identical inputs (the task losses or per-task
gradients averaged across processes first); the methods use no process-dependent randomness, so
they then return identical weights everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

EXTRA_STATE_KEY = "_extra_state"


@dataclass
class WeightingConfig:
    """Options shared by every weighting. Subclasses add their own fields, each with `help` metadata."""

    seed: int = dataclasses.field(
        default=0,
        metadata={"help": "Seed of the method's own generator, through which all its random draws go (RLW "
                  "weights, PCGrad orders); the trainer derives it from --seed. Identical on every process, so "
                  "every process takes the same step."},
    )

    def validate(self) -> None:
        """Raise a short ValueError naming the fix. Subclasses extend it (and call super)."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def options_help(cls) -> Dict[str, str]:
        """Option name -> help text (with its default), for command-line help and error messages."""
        return {
            f.name: f"{f.metadata.get('help', '')} (default: {f.default!r})"
            for f in dataclasses.fields(cls)
        }


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and (value >= 0 if allow_zero else value > 0) and value != float("inf")
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


class Weighting(nn.Module):
    """A multi-task weighting of K tasks. Subclasses set `name`, `config_class` and `needs_task_gradients`."""

    name: str = ""
    config_class = WeightingConfig
    needs_task_gradients: bool = False

    def __init__(self, num_tasks: int, config: Optional[WeightingConfig] = None):
        super().__init__()
        if isinstance(num_tasks, bool) or int(num_tasks) != num_tasks or int(num_tasks) < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        self.num_tasks = int(num_tasks)
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                             f"got {type(config).__name__}")
        self.config = config
        self.config.validate()
        # A CPU generator: its draws are the same on every process and every device.
        self.generator = torch.Generator().manual_seed(self.config.seed)
        # Last weights used, for logging (K,), absent tasks at 0.
        self.register_buffer("last_weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks), persistent=False)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, config={self.config}"

    def spec(self) -> dict:
        """JSON-ready description from which `get_weighting(**spec)` rebuilds this weighting."""
        return {"name": self.name, "num_tasks": self.num_tasks, **self.config.to_dict()}

    def _present(self, present: Optional[torch.Tensor], device=None) -> torch.Tensor:
        if present is None:
            return torch.ones(self.num_tasks, dtype=torch.bool, device=device)
        present = torch.as_tensor(present, device=device)
        if present.dtype != torch.bool:
            raise ValueError(f"present must be a boolean mask, got dtype {present.dtype}")
        if present.shape != (self.num_tasks,):
            raise ValueError(f"present must have shape ({self.num_tasks},), got {tuple(present.shape)}")
        return present

    def _record_weights(self, present: torch.Tensor, weights_present: torch.Tensor) -> None:
        full = torch.zeros(self.num_tasks, dtype=self.last_weights.dtype, device=self.last_weights.device)
        full[present.to(full.device)] = weights_present.detach().to(full)
        self.last_weights = full

    # Stateful methods store their state in parameters / buffers (saved by nn.Module.state_dict)
    # plus `extra_state` for Python-side state (step counters, RNG). nn.Module's
    # get_extra_state / set_extra_state hooks carry it through state_dict / load_state_dict.
    # Subclasses extend both (calling super) and keep every value a tensor.
    def get_extra_state(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state) -> None:
        if state and "generator" in state:
            self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8).cpu())

    def flat_state_dict(self) -> Dict[str, torch.Tensor]:
        """`state_dict()` with the extra-state dict flattened into tensors, for `safetensors.torch.save_file`."""
        flat = {}
        for key, value in self.state_dict().items():
            if key.endswith(EXTRA_STATE_KEY) and isinstance(value, dict):
                for sub, tensor in value.items():
                    flat[f"{key}.{sub}"] = torch.as_tensor(tensor).detach().cpu().contiguous().clone()
            else:
                flat[key] = value.detach().cpu().contiguous().clone()
        return flat

    def load_flat_state_dict(self, flat: Dict[str, torch.Tensor], strict: bool = True):
        """Inverse of `flat_state_dict`."""
        state: dict = {}
        for key, value in flat.items():
            head, sep, sub = key.partition(EXTRA_STATE_KEY + ".")
            if sep:
                state.setdefault(head + EXTRA_STATE_KEY, {})[sub] = value
            else:
                state[key] = value
        return self.load_state_dict(state, strict=strict)


# Columns per float32 product in `gram_matrix`: short enough that a chunk's float32 sums stay at
# float32 rounding of the result (their error grows with the summed length), long enough that the
# per-call overhead is small (about 70 calls at 1M parameters).
GRAM_CHUNK = 1 << 14
# Below this times P, a diagonal entry of the float32 Gram matrix may owe too much to squares that fell
# under float32's normal range (|g| < 2^-63) for the fast path to give float32 rounding of the exact
# value (an all-zero row, which float32 gives exactly, is recomputed too: rare, and cheap to be sure of).
_GRAM_SMALLEST_DIAGONAL = 2.0 ** -100


def gram_matrix(grads: torch.Tensor, present: Optional[torch.Tensor] = None, chunk_size: int = GRAM_CHUNK) -> torch.Tensor:
    """G G^T of grads (K, P), returned in float64 (the small K x K algebra is done in float64 for stability).

    Fast path: each chunk of `chunk_size` columns is multiplied in float32 (low-precision gradients
    are widened to float32 a few chunks at a time) and the K x K products are summed in float64. Each
    entry is then float32's rounding of the exact sum, the precision of the gradients themselves,
    without a float64 copy of the (K, P) buffer (at K = 5 and 1.1M parameters that copy and the
    float64 product took a third of the batched engine's time over vanilla). Where float32 cannot
    give that (a square overflows, a square underflows, a NaN or infinity in a gradient) the Gram
    matrix is recomputed in float64, 64 chunks at a time (a K x 2^20 float64 copy), so that an infinite
    diagonal still means an infinite gradient (the engine's overflow check reads it) and tiny gradients keep
    their precision.

    Rows of absent tasks (`present` False) are zeroed so that NaNs in them cannot leak.
    """
    if present is not None and bool(present.all()):
        present = None  # nothing to zero: skip a (K, P) `where` per chunk (a tenth of a PCGrad step at 1M parameters)
    grads = grads.detach()
    if grads.dtype != torch.float64:
        with _full_float32_matmul(grads.device):
            gram = _chunked_gram(grads, present, chunk_size, torch.float32)
        diagonal = gram.diagonal() if present is None else gram.diagonal()[present]
        # squares below float32's range are lost (at most 2^-126 each, P of them): relative to a diagonal
        # of at least P * 2^-100 that is under 2^-26, within float32 rounding
        smallest = _GRAM_SMALLEST_DIAGONAL * max(grads.shape[1], 1)
        if bool(torch.isfinite(gram).all()) and bool((diagonal >= smallest).all()):
            return gram
    return _chunked_gram(grads, present, chunk_size, torch.float64)


@contextlib.contextmanager
def _full_float32_matmul(device: torch.device):
    """float32 products in float32, not TF32 (which `--allow_tf32` turns on for CUDA matmuls: its 2^-11
    relative error would pass the fast path's checks and reach IMTL-G / MGDA / Nash-MTL's solvers)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _chunked_gram(grads: torch.Tensor, present: Optional[torch.Tensor], chunk_size: int, dtype: torch.dtype,
                  chunks_per_call: int = 64) -> torch.Tensor:
    """sum over column chunks of (chunk @ chunk.T) formed in `dtype`, summed in float64.

    The chunks' products are taken `chunks_per_call` at a time by one batched product (`bmm` over a
    (chunks, K, chunk_size) view of the buffer): the same float32 dot products as one `mm` per chunk, in
    one call instead of one per chunk (68 chunks at 1.1M parameters: 2.8 ms a step as `mm`s on this CPU,
    1.3 ms as one `bmm`; on a GPU, one kernel instead of 68 launches). A call converts at most
    `chunks_per_call` chunks of a low-precision buffer at once (K x 2^20 floats), never the whole buffer.
    Absent tasks' rows and columns are zeroed in the result: each entry of the product reads its own two
    rows only, so a NaN in an absent row reaches nothing else."""
    num_tasks, width = grads.shape
    gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=grads.device)
    whole = width - width % chunk_size  # columns in whole chunks; the rest is one shorter chunk
    step = chunk_size * chunks_per_call
    for start in range(0, whole, step):
        block = grads[:, start:min(start + step, whole)].to(dtype)
        block = block.unflatten(1, (-1, chunk_size)).transpose(0, 1)  # (chunks, K, chunk_size), a view
        gram += torch.bmm(block, block.transpose(1, 2)).sum(0, dtype=torch.float64)
    if whole < width:
        tail = grads[:, whole:].to(dtype)
        gram += (tail @ tail.T).double()
    if present is not None:
        both = present[:, None] & present[None, :]
        gram = torch.where(both, gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
    return gram


class LossWeighting(Weighting):
    """Combines task losses into one scalar. Loss-based methods never pay for per-task gradients.

    Subclasses implement `loss_coefficients` (pure) and, if they keep state, `_commit`; a method
    with learnable parameters also implements `weighting_loss` and its own `combine`."""

    needs_task_gradients = False

    def loss_coefficients(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """c[K] (float64, on the module's device) with c_i = d combine / d L_i for the coming step,
        0 for absent tasks.

        Pure: changes no state, so it may be called any number of times before the step."""
        raise NotImplementedError

    def weighting_loss(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """A scalar whose gradient w.r.t. the method's own learnable parameters equals that of
        `combine(task_losses, present)`, with the task losses detached; None for methods without
        parameters. Pure: changes no state."""
        self._check_losses(task_losses, present)
        return None

    def finish_step(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None,
                    coefficients: Optional[torch.Tensor] = None) -> None:
        """Commit one optimizer step: advance the method's state with the step's (global, detached)
        task losses and record `last_weights`. Call it once per step actually taken, after
        `optimizer.step()`; never for a skipped step.

        `coefficients`: the `loss_coefficients(present)` the step was weighted with (recorded as
        `last_weights`); by default they are recomputed, which for UW is only right before its
        log-variances have been stepped."""
        task_losses, present = self._check_losses(task_losses, present)
        if coefficients is None:
            coefficients = self.loss_coefficients(present)
        coefficients = torch.as_tensor(coefficients)
        if coefficients.shape != (self.num_tasks,):
            raise ValueError(f"coefficients must have shape ({self.num_tasks},), got {tuple(coefficients.shape)}; "
                             "pass what loss_coefficients(present) returned")
        self._commit(task_losses.detach(), present)
        self._record_weights(present, coefficients.to(present.device)[present])

    def _coefficients(self, present: torch.Tensor, weights_present: torch.Tensor) -> torch.Tensor:
        """Full-length float64 coefficients on the module's device: weights_present scattered
        into the present tasks, 0 elsewhere."""
        device = self.last_weights.device
        full = torch.zeros(self.num_tasks, dtype=torch.float64, device=device)
        full[present.to(device)] = weights_present.detach().to(device=device, dtype=torch.float64)
        return full

    def _commit(self, task_losses: torch.Tensor, present: torch.Tensor) -> None:
        """Advance the state by one step (stateless methods: nothing)."""

    def combine(self, task_losses: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The scalar to backpropagate from task_losses[K]; absent tasks' entries are ignored (may be NaN).

        One whole step: the coefficients, sum_i c_i L_i, then `finish_step`."""
        task_losses, present = self._check_losses(task_losses, present)
        coefficients = self.loss_coefficients(present)
        total = self._linear_combination(task_losses, present, coefficients)
        self.finish_step(task_losses, present, coefficients)
        return total

    def _linear_combination(self, task_losses: torch.Tensor, present: torch.Tensor,
                            coefficients: torch.Tensor) -> torch.Tensor:
        """sum_i c_i L_i over the present tasks (absent entries never enter, so a NaN cannot leak)."""
        weights = coefficients.to(device=task_losses.device, dtype=task_losses.dtype)[present]
        return (weights * task_losses[present]).sum()

    def _check_losses(self, task_losses: torch.Tensor, present: Optional[torch.Tensor]):
        task_losses = torch.as_tensor(task_losses)
        if task_losses.shape != (self.num_tasks,):
            raise ValueError(f"task_losses must have shape ({self.num_tasks},), got {tuple(task_losses.shape)}")
        return task_losses, self._present(present, task_losses.device)


class GradientWeighting(Weighting):
    """Combines K per-task gradients into one update direction in their span."""

    needs_task_gradients = True

    def task_weights(self, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Weights w[K'] for the K' present tasks, such that the update is w @ G[present].

        `gram` is the K' x K' Gram matrix G G^T of the present tasks' gradients (float64);
        `present` is the full boolean mask (K,), for methods that keep per-task state."""
        raise NotImplementedError

    def needs_gradients_this_step(self, present: Optional[torch.Tensor] = None) -> bool:
        """False when the next call can reuse stored weights (Nash-MTL between updates) for the tasks
        `present` (the step's global mask; None: any): the trainer may then skip per-task gradients and
        call `reuse_weights` instead."""
        return True

    def stored_weights(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weights `reuse_weights(present)` would return, without advancing any state (only
        when `needs_gradients_this_step()` is False)."""
        raise RuntimeError(f"{self.name} needs per-task gradients every step")

    def reuse_weights(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-length weights w[K] for a step with no per-task gradients (only when
        `needs_gradients_this_step()` is False); apply them as loss weights. Counts the step."""
        raise RuntimeError(f"{self.name} needs per-task gradients every step")

    def finish_task_step(self, task_losses: torch.Tensor, present: torch.Tensor,
                         backward_fn: Callable[[torch.Tensor], None]) -> None:
        """Called by the engine once per step taken, after the weights, with the step's global
        detached task losses: a combined weighting (`combined.py`) trains its loss method's own
        parameters here (through `backward_fn`) and commits its state. Plain methods: nothing."""

    def weights_from_gram(self, gram: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-length weights w[K] (0 for absent tasks) from the full K x K Gram matrix
        (entries of absent tasks are ignored). For engines that accumulate G G^T themselves."""
        if gram.shape != (self.num_tasks, self.num_tasks):
            raise ValueError(f"gram must have shape ({self.num_tasks}, {self.num_tasks}), got {tuple(gram.shape)}")
        present = self._present(present, gram.device)
        weights = torch.zeros(self.num_tasks, dtype=torch.float64, device=gram.device)
        if present.any():
            sub = gram.double()[present][:, present]
            weights[present] = self.task_weights(sub, present).to(weights)
        self.last_weights = weights.detach().to(self.last_weights)
        return weights

    def weights_from_grads(self, grads: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-length weights w[K] (0 for absent tasks) from per-task gradients grads[K, P]."""
        if grads.dim() != 2 or grads.shape[0] != self.num_tasks:
            raise ValueError(f"grads must have shape ({self.num_tasks}, P), got {tuple(grads.shape)}")
        present = self._present(present, grads.device)
        return self.weights_from_gram(gram_matrix(grads, present), present).to(grads.dtype)

    def aggregate(self, grads: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The update direction (P,) from per-task gradients grads[K, P]."""
        weights = self.weights_from_grads(grads, present)
        present = self._present(present, grads.device)
        return weights[present] @ grads[present]
