"""Float tolerances derived from the computation a test compares, not from one machine's run.

Two evaluations of the same function that differ only in how their floating-point operations are ordered
or grouped (another kernel or batch composition, a LoRA folded into its weight, gradients summed per
cluster or all at once, a gradient all-reduced in halves) differ by rounding alone. The bound used here:

* A sum of n terms t_j computed in floating point, in any order, is within gamma_n * sum_j |t_j| of the
  exact sum, gamma_n = n u / (1 - n u) (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
  eq. 4.4; u is the unit roundoff: 2^-24 for float32). Two orderings are then within 2 gamma_n sum |t_j|
  of each other.
* One layer of a network forms each output entry by one such sum, forward over its fan-in, backward
  (the input gradient) over its fan-out. The rounding a layer adds is carried to the output by the
  layers after it, each of which is a sum too. Taking the network's conditioning as one (its
  normalisation layers rescale every activation, so a relative error is neither amplified nor damped by
  orders of magnitude) and sum_j |t_j| as the magnitude of the result (no cancellation by orders of
  magnitude in these random tiny models), the relative errors of the layers on a path add up:
  |a - b| <= 2 u (sum over the path of each layer's reduction length) max |result|.
* The layers of a path are bounded by all of the model's Linear and convolution layers
  (`path_reduction_length`; the attention's own products, over the head dimension and the tokens, and the
  normalisations' sums are not counted: 1 to 2% of L in these models, inside the bound's slack), so the
  bound is loose: the differences the tests observe are 10 to 1000 times below it. The errors the tests are
  for (a lost LoRA, a sample's gradient in another cluster's row, an unreduced gradient) are far above it,
  and each test says by how much.

Each helper returns an absolute tolerance for `|a - b|`; a test that compares a computation of another
shape (a sum over steps, an optimizer's update) says in its docstring how it builds its own from these.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u: half the distance from 1 to the next float (2^-24 for float32, 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n successive roundings."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"{n} roundings in {dtype} bound nothing (n u = {nu:.2g} >= 1)")
    return nu / (1 - nu)


def sum_reordering_tolerance(length: int, magnitude: float, dtype: torch.dtype = torch.float32) -> float:
    """How far two evaluations of a sum of `length` terms whose magnitudes add up to `magnitude` may differ
    when only the order of the additions differs: 2 gamma_length * magnitude (Higham eq. 4.4)."""
    return 2 * gamma(length, dtype) * magnitude


def task_arithmetic_tolerance(base: torch.Tensor, finetuned, weights, term_roundings: int = 3) -> float:
    """How far a merge's float32 (1 - sum w) base + sum_i w_i theta_i may lie from the formula
    base + sum_i w_i (theta_i - base) evaluated in float32. Each term passes through at most `term_roundings`
    roundings (3: w_i cast to float32, the difference, the product; a LoRA fold adds its rank's products),
    then the K additions, so each side is within gamma_{K+roundings} M of the exact value (Higham, section
    3.1), M = max (|base| + sum_i |w_i| (|theta_i| + |base|)) bounding both sides' summed |terms|."""
    magnitude = base.abs() + sum(abs(w) * (theta.abs() + base.abs()) for w, theta in zip(weights, finetuned))
    return sum_reordering_tolerance(len(weights) + term_roundings, float(magnitude.max()))


def layer_reduction_lengths(model: nn.Module) -> list[int]:
    """Per Linear / convolution layer of `model`: the longest sum it forms for one entry, forward (fan-in:
    in_channels / groups x kernel area) or backward (fan-out: out_channels x kernel area)."""
    lengths = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and weight is not None:
            kernel_area = weight[0, 0].numel() if weight.dim() > 2 else 1
            lengths.append(max(weight[0].numel(), weight.shape[0] * kernel_area))
    return lengths


def path_reduction_length(models: nn.Module | Iterable[nn.Module]) -> int:
    """An upper bound on the summed reduction lengths along any path through `models`: every layer counted
    once (a path visits each layer at most once, forward; backward again, see `gradient_tolerance`)."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    return sum(sum(layer_reduction_lengths(m)) for m in models)


def output_tolerance(models: nn.Module | Iterable[nn.Module], output: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> float:
    """Two forward passes of the same function through `models` that differ only in rounding (a LoRA folded
    into its base weight, W x + B (A x) against (W + B A) x; another batch size; peft's re-loaded scaling):
    2 gamma_L max |output|, L the path's summed reduction lengths."""
    return sum_reordering_tolerance(path_reduction_length(models), _magnitude(output), dtype)


def gradient_tolerance(model: nn.Module, reference: torch.Tensor | float, summed_terms: int,
                       dtype: torch.dtype = torch.float32) -> float:
    """Two computations of one parameter gradient of `model` that differ only in rounding (per cluster or
    all at once, sub-batches or one batch, a gradient all-reduced in halves): the forward and the backward
    pass each add one path of layer reductions, and the weight gradient itself is a sum over `summed_terms`
    products (samples x positions of the layer's output): L = summed_terms + 2 x the path; scaled by the
    reference gradient's largest entry (a number: the relative tolerance, for a reference of magnitude 1)."""
    length = summed_terms + 2 * path_reduction_length(model)
    return sum_reordering_tolerance(length, _magnitude(reference), dtype)


def _magnitude(reference: torch.Tensor | float) -> float:
    return float(reference.detach().abs().max()) if isinstance(reference, torch.Tensor) else float(reference)


def low_precision_norm_tolerance(models: nn.Module | Iterable[nn.Module], dtype: torch.dtype,
                                 evaluations: int = 1, deviations: float = 4.0) -> float:
    """The norm-wise relative error of a gradient computed under fp16 / bf16 autocast, against the exact one
    (`evaluations=1`) or against another low-precision evaluation (`evaluations=2`).

    Autocast rounds each layer's input, weight and output to `dtype` (the products accumulate in float32),
    in the forward pass and again in the backward pass: 6 roundings per layer on a path, each a relative
    error uniform in [-u, u] (variance u^2 / 3), independent of each other (the model of Higham and Mary,
    "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41, 2019). With the
    network's conditioning taken as one, the relative error of the result has a standard deviation of
    sqrt(6 x layers x u^2 / 3) = sqrt(2 x layers) u per evaluation; the bound is `deviations` of them. The
    worst case (every rounding in one direction) is useless here: 6 x layers x u is of the order of 0.1 in
    fp16 for the tiny UNet, where a lost loss scale moves the gradient by tens of percent."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    layers = sum(len(layer_reduction_lengths(m)) for m in models)
    return deviations * (2 * layers * evaluations) ** 0.5 * unit_roundoff(dtype)


def clipping_tolerance(norm_terms: int, dtype: torch.dtype = torch.float32) -> float:
    """The relative difference of the gradient two runs apply after clipping at a norm, when the runs compute
    the norm in another order (DDP over whole tensors, FSDP2 over each process's shards, ZeRO over flat
    partitions). The squared norm is a sum of positive terms, so it is within gamma_n of the exact one in any
    order (Higham eq. 4.4, no cancellation), n = `norm_terms`, the most additions one squared entry passes
    through (within its tensor or partition, then across tensors and processes, one more for its own
    square); the square root halves that and adds u, adding torch's 1e-6 and dividing max_norm by it add u
    each, and scaling an entry by the coefficient adds u: each run within gamma_n / 2 + 4u of the exact
    clipped gradient, relative, the two within gamma_n + 8u. It holds whether or not the norm exceeded the
    limit (below it torch multiplies by exactly 1)."""
    return gamma(norm_terms, dtype) + 8 * unit_roundoff(dtype)


def adam_tolerance(gradient_differences: Iterable[float], lr: float, eps: float, beta1: float = 0.9,
                   beta2: float = 0.999) -> float:
    """How far two runs of the same Adam(W) steps may end apart when the gradient entries of step i differ by
    at most `gradient_differences[i]` between them (their rounding: `gradient_tolerance`, `clipping_tolerance`).

    Step j moves a weight by lr m_j / (sqrt(v_j) + eps), m_j = sum_i w_ij g_i and v_j = sum_i w'_ij g_i^2 the
    bias-corrected averages, w_ij = (1 - beta1) beta1^(j - i) / (1 - beta1^j) and w'_ij the same under beta2.
    A change dg of step i's gradient changes m_j by w_ij dg and sqrt(v_j) by w'_ij g_i dg / sqrt(v_j), at
    most sqrt(w'_ij) |dg| (w'_ij g_i^2 <= v_j). And |m_j| <= c_j sqrt(v_j), c_j^2 = sum_i w_ij^2 / w'_ij
    (Cauchy-Schwarz), so |m_j| / (sqrt(v_j) + eps)^2 <= c_j / (4 eps). Step j's move therefore changes by at
    most (lr / eps) (w_ij + c_j sqrt(w'_ij) / 4) |dg|, whatever the gradients' size, and the steps j >= i
    whose averages carry step i's gradient add up. (A weight's own difference reaches later gradients through
    the loss's curvature, lr times smaller at the tests' learning rates and neglected; the weights' own
    rounding, one ulp per step and copy, is `adam_run_tolerance`'s.) With a large eps (the tests take eps = 1)
    the update is a smooth function of the gradient, where Adam's usual scale invariance would hide a
    gradient of the wrong size."""
    differences = list(gradient_differences)
    steps = len(differences)

    def weight(beta, i, j):
        return (1 - beta) * beta ** (j - i) / (1 - beta ** j)

    c = {j: sum(weight(beta1, i, j) ** 2 / weight(beta2, i, j) for i in range(1, j + 1)) ** 0.5
         for j in range(1, steps + 1)}
    total = 0.0
    for i, difference in enumerate(differences, start=1):
        carried = sum(weight(beta1, i, j) + c[j] * weight(beta2, i, j) ** 0.5 / 4 for j in range(i, steps + 1))
        total += lr / eps * carried * difference
    return total


def adam_run_tolerance(model: nn.Module, applied: list[float], summed_terms: int, lr: float, eps: float,
                       largest_weight: float, clip_norm_terms: int | None = None, weight_roundings: int = 1) -> float:
    """How far the weights of two runs of the same Adam(W) steps on `model` may end apart when they differ by
    rounding alone (another engine: DDP against FSDP2 or ZeRO; another accumulation or gradient engine).
    `applied[t]` is the largest |entry| of the gradient step t applied (recorded), `summed_terms` the samples x
    positions its weight gradients sum. Step t's gradients differ by `gradient_tolerance` and, when both runs
    clip at a norm, by `clipping_tolerance(clip_norm_terms)` of their entries; `adam_tolerance` carries that
    through the steps; each step rounds every weight once per run and per copy (`weight_roundings`: 2 with an
    EMA of the weights), 2u max|w| between two runs."""
    differences = [gradient_tolerance(model, g, summed_terms)
                   + (clipping_tolerance(clip_norm_terms) * g if clip_norm_terms else 0.0) for g in applied]
    rounding = len(applied) * weight_roundings * 2 * unit_roundoff() * largest_weight
    return adam_tolerance(differences, lr, eps) + rounding


def uw_log_variance_tolerance(model: nn.Module, applied: list[float], summed_terms: int, lr: float, eps: float,
                              largest_log_variance: float) -> float:
    """The same for UW's log-variances s_i (weighting/uw.py), which step on dL/ds_i = 0.5 (1 - exp(-s_i) L_i).
    That gradient's rounding is the task loss L_i's times 0.5 exp(-s_i) L_i / L_i, where 0.5 exp(-s_i) L_i =
    0.5 - dL/ds_i is at most 0.5 plus the step's largest applied entry: L_i is one forward path of `model` and a
    mean over `summed_terms` samples x positions, within 2 gamma_L of the other run's, relative
    (`sum_reordering_tolerance`), and exp, the product and the difference add 4u. (The losses are also taken
    at weights that differ between the runs by their earlier steps' rounding; like the curvature in
    `adam_tolerance`, that feedback is neglected over these few steps.)"""
    relative = sum_reordering_tolerance(path_reduction_length(model) + summed_terms, 1.0) + 4 * unit_roundoff()
    differences = [(0.5 + g) * relative for g in applied]
    rounding = len(applied) * 2 * unit_roundoff() * largest_log_variance
    return adam_tolerance(differences, lr, eps) + rounding
