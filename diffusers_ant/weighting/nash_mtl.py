"""Nash-MTL: multi-task learning as a bargaining game.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022, Eq. 2 / Theorem 5.1: the Nash bargaining update is
d = sum_i alpha_i g_i with alpha > 0 solving

    G G^T alpha = 1 / alpha   (elementwise),

G the K x P matrix of the RAW task gradients, so that ||d||^2 = alpha^T G G^T alpha = K.

Scale, as in the authors' code (AvivNavon/nash-mtl, `methods/weight_methods.py`): they divide
the Gram matrix by its Frobenius norm nf before handing it to the solver, but write the
constraint as -log(alpha_i nf) - log((G G^T / nf) alpha)_i <= 0, which puts the normalisation
back: their alpha solves the equation above for the raw gradients (update norm sqrt(K)). We do the
same: the solver works on M = G G^T / nf (well scaled whatever the gradients' magnitude) and its
solution a is mapped back to alpha = a / sqrt(nf), which solves G G^T alpha = 1 / alpha.
`alpha` (the buffer, saved with the checkpoint) holds that raw-scale alpha and warm-starts the
next solve, like the authors' `prvs_alpha`. ANT's reference code (Go et al., NeurIPS 2023)
divides every cluster loss by K before weighting, i.e. uses alpha / K:
`divide_losses_by_num_tasks=True` does that (K = num_tasks, the number of clusters).

As in ANT, alpha is re-solved every `update_every` = 25 steps and reused in between;
`needs_gradients_this_step(present)` tells the trainer when it can skip per-task gradients and call
`reuse_weights` instead. It also asks for a solve off that cadence when a present task was not
covered by the last solve: with batches smaller than K (each cluster present with probability B / K)
a cluster absent at the solve would otherwise take the alpha of an earlier solve over other tasks, or
the initial 1, for the rest of the window. (The authors' tasks are present in every batch.) Only
`weights_from_grads` / `weights_from_gram` / `reuse_weights` advance the step counter and alpha
(one call per optimizer step); `needs_gradients_this_step` and `stored_weights` (the weights
`reuse_weights` will return, for a step whose fp16 overflow is known only after its backward pass)
only read it.

Subset mode (per-task gradients of a parameter subset, the engine's `subset=`): the authors form
G from the shared parameters only and apply alpha as loss weights to every parameter; weights
chosen from a subset's gradients and applied as loss weights are the same practice.

Solver. alpha is the unique minimiser of the strictly convex, self-concordant function
f(a) = 0.5 a^T M a - sum_i log a_i (its gradient is M a - 1/a), so a damped Newton method in
float64 on the K-dimensional problem converges globally and quadratically; it needs no optional
dependency. (The authors iterate a sequence of convex problems with cvxpy / ECOS, which newer
cvxpy no longer bundles; their code silently keeps the old alpha when the solver fails.)
Convergence is checked on the equation itself, max_i |a_i (M a)_i - 1| <= tol (the same number
as max_i |alpha_i (G G^T alpha)_i - 1| up to rounding). When it is not reached (e.g. linearly
dependent or zero gradients, where no finite solution exists) the failure is recorded in
`solver_failures` / `last_residual`, and by default a RuntimeWarning is raised and the previous
alpha reused (the authors' behaviour, made loud); `on_failure="raise"` stops training instead. Where
no earlier solve gave a present task an alpha (a failed first solve), the window takes equal weights
scaled so that the update's norm is sqrt(K), as a solution's, not the initial ones (their update's
norm is that of the summed gradients, on no particular scale). A
task whose gradient is exactly zero has no bargaining position and gets weight 0.

`solver="cvxpy"` solves the same convex problem with cvxpy (`pip install cvxpy`); `"auto"` uses
Newton and, if that fails and cvxpy is installed, tries cvxpy before giving up.

The authors also clip the update to `max_norm` = 1.0; here that is the trainer's gradient
clipping (`--max_grad_norm`), so this class does not clip.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .base import GradientWeighting, WeightingConfig, _check_choice, _check_positive
from .registry import register_weighting

logger = logging.getLogger(__name__)


@dataclass
class NashMTLConfig(WeightingConfig):
    update_every: int = dataclasses.field(
        default=25, metadata={"help": "Re-solve alpha every this many steps, reusing it in between (ANT: 25)."}
    )
    solver: str = dataclasses.field(
        default="auto",
        metadata={"help": "'newton' (built in), 'cvxpy' (needs `pip install cvxpy`), or 'auto' "
                  "(Newton, then cvxpy if installed when Newton fails)."},
    )
    max_iter: int = dataclasses.field(default=100, metadata={"help": "Most Newton iterations per solve."})
    tol: float = dataclasses.field(
        default=1e-9, metadata={"help": "Convergence: max_i |a_i (M a)_i - 1| <= tol, M the Gram matrix "
                                 "divided by its Frobenius norm (= the residual of the raw equation)."}
    )
    divide_losses_by_num_tasks: bool = dataclasses.field(
        default=False,
        metadata={"help": "False: the authors' alpha, solving G G^T alpha = 1/alpha for the raw task gradients "
                  "(update norm sqrt(K)). True: alpha / K, ANT's reference code, which divides every "
                  "cluster loss by K = num_tasks before weighting."},
    )
    on_failure: str = dataclasses.field(
        default="warn",
        metadata={"help": "When the solver does not converge: 'warn' (RuntimeWarning, keep the previous "
                  "alpha, count it in solver_failures) or 'raise'."},
    )

    def validate(self) -> None:
        super().validate()
        for name in ("update_every", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.divide_losses_by_num_tasks, bool):
            raise ValueError("divide_losses_by_num_tasks must be true or false, "
                             f"got {self.divide_losses_by_num_tasks!r}")
        _check_choice("solver", self.solver, ("auto", "newton", "cvxpy"))
        _check_positive("tol", self.tol)
        _check_choice("on_failure", self.on_failure, ("warn", "raise"))
        if self.solver == "cvxpy":
            _import_cvxpy()


def _import_cvxpy():
    try:
        import cvxpy
    except ImportError as error:
        raise ImportError("nash_mtl with solver='cvxpy' needs cvxpy: pip install cvxpy "
                          "(or use solver='newton', which needs nothing)") from error
    return cvxpy


def _residual(matrix: torch.Tensor, alpha: torch.Tensor) -> float:
    return float((alpha * (matrix @ alpha) - 1.0).abs().max())


# Boyd & Vandenberghe, "Convex Optimization", Sec. 9.6.4: for a self-concordant f and a
# backtracking line search with Armijo parameter ARMIJO, every Newton step whose decrement is at
# most (1 - 2 ARMIJO) / 4 is accepted in full (the quadratically convergent phase).
ARMIJO = 0.25
FULL_STEP_DECREMENT = (1.0 - 2.0 * ARMIJO) / 4.0


def solve_nash_newton(matrix: torch.Tensor, init: torch.Tensor, max_iter: int = 100,
                      tol: float = 1e-9) -> Tuple[torch.Tensor, float, int]:
    """Damped Newton for alpha > 0 with `matrix @ alpha = 1 / alpha` (matrix PSD, float64).

    Minimises f(a) = 0.5 a^T M a - sum log a, which is self-concordant (a quadratic plus
    logarithmic barriers). Far from the optimum the step is damped by a backtracking (Armijo) line
    search; once the Newton decrement lambda = sqrt(-grad . step) is at most
    `FULL_STEP_DECREMENT` the full step is taken without a line search. In exact arithmetic the
    line search would accept it anyway (Boyd & Vandenberghe, Sec. 9.6.4), and for lambda < 1 the
    full step stays inside a > 0 (|step_i| / a_i <= lambda). Skipping the test matters in floating
    point: near the optimum f(a + step) - f(a) is below f's rounding error, the Armijo comparison
    of two numbers that round to the same value fails, and the step would halve to nothing while
    the residual sits just above `tol`.

    Returns (alpha, residual, iterations); the caller checks residual <= tol."""
    m = matrix.double()
    a = init.double().clone()
    if not torch.isfinite(a).all() or (a <= 0).any():
        a = torch.ones_like(a)
    # Best rescaling of the start: f(s a) is minimised at s = sqrt(K / a^T M a).
    quad = a @ m @ a
    if quad > 0:
        a = a * torch.sqrt(a.numel() / quad)

    def f(x):
        return 0.5 * (x @ m @ x) - torch.log(x).sum()

    iterations = 0
    for iterations in range(1, max_iter + 1):
        if _residual(m, a) <= tol:
            return a, _residual(m, a), iterations - 1
        grad = m @ a - 1.0 / a
        hess = m + torch.diag(1.0 / a**2)
        try:
            step = -torch.linalg.solve(hess, grad)
        except RuntimeError:  # singular Hessian: cannot happen for a > 0 in exact arithmetic
            break
        slope = float(grad @ step)  # = -lambda^2 <= 0
        full = a + step
        if -slope <= FULL_STEP_DECREMENT**2 and bool((full > 0).all()):
            a = full
        else:
            t = 1.0
            # Stay in the domain a > 0, then backtrack (Armijo) on f.
            negative = step < 0
            if negative.any():
                t = min(1.0, 0.99 * float((-a[negative] / step[negative]).min()))
            f_a = f(a)
            while t > 1e-12 and f(a + t * step) > f_a + ARMIJO * t * slope:
                t *= 0.5
            a = a + t * step
        if not torch.isfinite(a).all():
            break
    return a, _residual(m, a) if torch.isfinite(a).all() else float("inf"), iterations


def solve_nash_cvxpy(matrix: torch.Tensor) -> torch.Tensor:
    """The same convex problem with cvxpy: min 0.5 a^T M a - sum log a."""
    cp = _import_cvxpy()
    m = matrix.double().cpu().numpy()
    a = cp.Variable(m.shape[0])
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(a, cp.psd_wrap(m)) - cp.sum(cp.log(a))))
    problem.solve()
    if a.value is None:
        return torch.full((m.shape[0],), float("nan"), dtype=torch.float64)
    return torch.as_tensor(a.value, dtype=torch.float64)


@register_weighting("nash_mtl")
class NashMTL(GradientWeighting):
    """Nash bargaining weights, re-solved every `update_every` steps."""

    config_class = NashMTLConfig

    def __init__(self, num_tasks: int, config: Optional[NashMTLConfig] = None):
        super().__init__(num_tasks, config)
        # Alpha of every task on the raw gradients' scale (G G^T alpha = 1 / alpha), ones before the
        # first solve as in the authors' code (their `prvs_alpha`); float64 like the solver.
        self.register_buffer("alpha", torch.ones(self.num_tasks, dtype=torch.float64))
        # The tasks the last solve gave an alpha (present, with a nonzero gradient). A task outside it has
        # a leftover alpha from another set of tasks, or the initial 1 (on no particular scale): when one
        # is present, the step solves again instead of reusing (batches smaller than K leave clusters out).
        # A buffer (uint8: every backend broadcasts it; not persistent: the extra state saves it), so that the
        # engine's `broadcast_module_state_` sends process 0's mask with its alpha: a process whose solve failed
        # where process 0's converged would keep another mask, decide otherwise whether the next step solves, and
        # enter other collectives than the rest (a hang).
        self.register_buffer("solved_mask", torch.zeros(self.num_tasks, dtype=torch.uint8), persistent=False)
        self.step = 0
        self.solver_failures = 0
        self.last_residual = float("nan")
        self.last_iterations = 0

    @property
    def solved(self) -> torch.Tensor:
        """The tasks the last solve gave an alpha, as a boolean mask on the CPU (a copy: assign to change it)."""
        return self.solved_mask.detach().cpu().bool()

    @solved.setter
    def solved(self, mask) -> None:
        self.solved_mask.copy_(torch.as_tensor(mask).to(self.solved_mask.device, torch.uint8))

    def _weights_of(self, alpha: torch.Tensor) -> torch.Tensor:
        """The loss weights for a given alpha: alpha itself, or alpha / K in ANT's scale."""
        return alpha / self.num_tasks if self.config.divide_losses_by_num_tasks else alpha

    def needs_gradients_this_step(self, present: Optional[torch.Tensor] = None) -> bool:
        if self.step % self.config.update_every == 0:
            return True
        return present is not None and bool((present.detach().cpu() & ~self.solved).any())

    def stored_weights(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.needs_gradients_this_step(present):
            raise RuntimeError("nash_mtl re-solves alpha at this step: it needs the per-task gradients")
        present = self._present(present, self.alpha.device)
        return torch.where(present, self._weights_of(self.alpha), torch.zeros_like(self.alpha))

    def reuse_weights(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = self.stored_weights(present)
        self.step += 1
        self.last_weights = weights.detach().to(self.last_weights)
        return weights

    def task_weights(self, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        present = present.to(self.alpha.device)
        if self.needs_gradients_this_step(present):
            self._update_alpha(gram.detach().double().cpu(), present)
        self.step += 1
        return self._weights_of(self.alpha[present]).to(gram.device)

    def _update_alpha(self, gram: torch.Tensor, present: torch.Tensor) -> None:
        # Tasks with an exactly-zero gradient have no finite solution (alpha_i -> inf); they get 0.
        nonzero = torch.diagonal(gram) > 0
        index = present.nonzero().flatten().cpu()
        if not nonzero.any():
            return  # every present gradient is zero: any alpha gives the zero update
        gram = gram[nonzero][:, nonzero]
        # The authors' normalisation, for the solver only: a = alpha sqrt(nf) solves
        # (G G^T / nf) a = 1 / a exactly when alpha solves G G^T alpha = 1 / alpha.
        scale = torch.sqrt(torch.linalg.matrix_norm(gram))
        init = self.alpha.detach().cpu()[index[nonzero]] * scale
        alpha, residual, iterations, converged = self._solve(gram / scale**2, init)
        self.last_residual, self.last_iterations = residual, iterations
        # A present task that no earlier solve gave an alpha (the first solve, or a cluster absent until now) has
        # no previous alpha to fall back on, only the initial 1, on no particular scale.
        unsolved = bool((present.cpu() & ~self.solved).any())
        if not converged:
            self.solver_failures += 1
            fallback = ("Using equal weights for this window, scaled so that the update's norm is sqrt(K) as a "
                        "solution's (no earlier solve gave these tasks an alpha)." if unsolved
                        else "Keeping the previous alpha.")
            message = (f"nash_mtl: the solver did not converge (residual {residual:.2e} > tol "
                       f"{self.config.tol:.0e} after {iterations} iterations; failure "
                       f"{self.solver_failures}); the task gradients are probably linearly dependent. {fallback}")
            if self.config.on_failure == "raise":
                raise RuntimeError(message.replace(fallback, "Set on_failure='warn' to train on: it keeps the "
                                                             "previous alpha (equal weights before any solve)."))
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)
            if not unsolved:
                self.solved |= present.cpu()  # the window runs on the previous alpha, without a solve every step
                return
            # Equal weights c * 1 at the bargaining solution's scale: ||c sum_i g_i||^2 = K, i.e. the minimiser of
            # the Nash objective along the direction of ones (the Newton solver's own rescaled start). If the
            # gradients sum to zero, any c gives the zero update: c = 1.
            total = float(gram.sum())
            alpha = torch.full((gram.shape[0],), (gram.shape[0] / total) ** 0.5 if total > 0 else 1.0,
                               dtype=torch.float64) * scale
        new = self.alpha.detach().clone()
        new[index[nonzero].to(new.device)] = (alpha / scale).to(new)
        new[index[~nonzero].to(new.device)] = 0.0
        self.alpha.copy_(new)
        solved = torch.zeros(self.num_tasks, dtype=torch.bool)
        solved[index[nonzero]] = True
        self.solved = solved

    def _solve(self, matrix: torch.Tensor, init: torch.Tensor) -> Tuple[torch.Tensor, float, int, bool]:
        """(alpha, residual, Newton iterations, converged)."""
        if self.config.solver == "cvxpy":
            return self._solve_cvxpy(matrix, 0)
        alpha, residual, iterations = solve_nash_newton(matrix, init, self.config.max_iter, self.config.tol)
        converged = residual <= self.config.tol
        if not converged and self.config.solver == "auto":
            try:
                _import_cvxpy()
            except ImportError:
                return alpha, residual, iterations, False
            logger.warning("nash_mtl: Newton did not converge (residual %.2e); trying cvxpy", residual)
            return self._solve_cvxpy(matrix, iterations)
        return alpha, residual, iterations, converged

    def _solve_cvxpy(self, matrix: torch.Tensor, iterations: int) -> Tuple[torch.Tensor, float, int, bool]:
        alpha = solve_nash_cvxpy(matrix)
        residual = _residual(matrix, alpha)
        # Interior-point solvers stop at about 1e-8 relative accuracy: judge them at 1e-6.
        return alpha, residual, iterations, residual <= max(1e-6, self.config.tol)

    def get_extra_state(self):
        state = super().get_extra_state()
        state.update(
            step=torch.tensor(self.step, dtype=torch.long),
            solver_failures=torch.tensor(self.solver_failures, dtype=torch.long),
            last_residual=torch.tensor(self.last_residual, dtype=torch.float64),
            last_iterations=torch.tensor(self.last_iterations, dtype=torch.long),
            solved=self.solved.to(torch.uint8),
        )
        return state

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        if state:
            self.step = int(state.get("step", 0))
            self.solver_failures = int(state.get("solver_failures", 0))
            self.last_residual = float(state.get("last_residual", float("nan")))
            self.last_iterations = int(state.get("last_iterations", 0))
            # (a checkpoint written before the mask existed: its alpha counts as solved, as it was used then)
            solved = state.get("solved")
            self.solved = (torch.ones(self.num_tasks, dtype=torch.bool) if solved is None
                           else torch.as_tensor(solved).cpu().bool())
