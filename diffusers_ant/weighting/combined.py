"""A loss-based weighting and a gradient-based one together (`--mtl_method uw+pcgrad`).

ANT's strongest configuration (Go et al., NeurIPS 2023, Sections 5.3 / 5.4, Appendix D.2 / D.3)
applies uncertainty weighting and PCGrad simultaneously, with P2 inside the task losses. The two
act on different objects, so they compose without either changing:

* the loss-based method (UW, LS, RLW, DWA) chooses coefficients c_i of the task losses, exactly as
  it would alone (`LossWeighting.loss_coefficients`), and trains its own parameters (UW's
  log-variances) with its own objective on the step's detached task losses
  (`LossWeighting.weighting_loss`);
* the gradient-based method (PCGrad, Nash-MTL, IMTL-G, MGDA-UB, CAGrad) combines the task
  gradients of the SCALED losses, c_i g_i, with g_i = grad L_i:

      update = sum_i w'_i (c_i g_i),    w' = gradient_method(Gram matrix of the c_i g_i)
             = sum_i w_i g_i,           w_i = c_i w'_i.

The Gram matrix of the scaled gradients is D (G G^T) D with D = diag(c), so the gradient method
sees it without a second pass over P-sized tensors, and the engine applies w to the raw task
gradients like any other gradient-based weighting: the split engine, `last_layers`, subsets,
gradient accumulation, fp16 and data parallelism all work unchanged. `last_weights` holds w.

Scale, as ANT's reference code: it divides every cluster loss by K once, inside UW
(0.5 (exp(-s_i) L_i / K + s_i)), and PCGrad then SUMS the projected gradients. Kendall's UW (the default
here, 0.5 (exp(-s_i) L_i + s_i)) reaches the same loss coefficients at its optimum (0.5 / L_i, see
`uw.py`), so the K is already accounted for in c: inside a combined weighting PCGrad's `reduction`
defaults to `sum` (alone it defaults to `mean`, which is where ANT's /K goes when no UW carries it).
Every other option keeps its own default.

One step, in order (`TaskGradientEngine.backward`): c from the loss method (pure); w' from the
gradient method (advances its state: PCGrad's orders, Nash-MTL's counter); then, once the step's
global task losses are known, `finish_task_step` back-propagates the loss method's own objective
(UW's s_i, trained at their own constant learning rate) and commits its state (RLW's draw, DWA's
history). On a Nash-MTL step with stored weights, w = c * (stored w'), c being this step's.

Options (`get_weighting("uw+pcgrad", K, **options)`, `--mtl_options`): a plain option goes to each
part that has it (`seed` to both); `uw.lr` or `pcgrad.reduction` address one part. Unknown options
name the valid ones.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .base import GradientWeighting, LossWeighting, WeightingConfig

logger = logging.getLogger(__name__)

# Defaults of a gradient method that differ inside a combined weighting (see "Scale" above).
COMBINED_GRADIENT_DEFAULTS = {"pcgrad": {"reduction": "sum"}}


@dataclass
class CombinedConfig(WeightingConfig):
    loss_method: str = dataclasses.field(
        default="uw", metadata={"help": "The loss-based method whose coefficients scale the task losses."})
    gradient_method: str = dataclasses.field(
        default="pcgrad", metadata={"help": "The gradient-based method that combines the scaled task gradients."})
    loss_options: dict = dataclasses.field(
        default_factory=dict, metadata={"help": "Options of the loss-based method (its own config fields)."})
    gradient_options: dict = dataclasses.field(
        default_factory=dict, metadata={"help": "Options of the gradient-based method (its own config fields)."})

    def validate(self) -> None:
        super().validate()
        from .registry import WEIGHTINGS

        for role, name, kind in (("loss", self.loss_method, LossWeighting),
                                 ("gradient", self.gradient_method, GradientWeighting)):
            cls = WEIGHTINGS.get(name)
            if cls is None or not issubclass(cls, kind):
                valid = sorted(n for n, c in WEIGHTINGS.items() if issubclass(c, kind))
                raise ValueError(f"{role}_method must be a {role}-based weighting ({', '.join(valid)}), got {name!r}")
        for field in ("loss_options", "gradient_options"):
            if not isinstance(getattr(self, field), dict):
                raise ValueError(f"{field} must be a dict of options, got {getattr(self, field)!r}")


class CombinedWeighting(GradientWeighting):
    """Loss coefficients c from a `LossWeighting`, a `GradientWeighting` on the scaled gradients c_i g_i.

    Built by `get_weighting("<loss>+<gradient>", K)`; `name` is that pair."""

    config_class = CombinedConfig

    def __init__(self, num_tasks: int, config: Optional[CombinedConfig] = None):
        super().__init__(num_tasks, config)
        from .registry import get_weighting

        seed = self.config.seed
        self.loss_weighting: LossWeighting = get_weighting(
            self.config.loss_method, num_tasks, **{"seed": seed, **self.config.loss_options})
        gradient_options = {"seed": seed, **COMBINED_GRADIENT_DEFAULTS.get(self.config.gradient_method, {}),
                            **self.config.gradient_options}
        self.gradient_weighting: GradientWeighting = get_weighting(self.config.gradient_method, num_tasks,
                                                                   **gradient_options)
        self.name = f"{self.config.loss_method}+{self.config.gradient_method}"
        blind = _blind_to_task_scale(self.gradient_weighting, self.config.loss_method)
        if blind:  # allowed (the combination is well defined), but the user should know what it adds
            logger.warning("%s: %s", self.name, blind)
        # The loss coefficients the current step's weights were formed with, for `finish_task_step`.
        self._step_coefficients: Optional[torch.Tensor] = None

    def spec(self) -> dict:
        return {"name": self.name, "num_tasks": self.num_tasks, "seed": self.config.seed,
                **{f"{self.config.loss_method}.{k}": v for k, v in self.config.loss_options.items()},
                **{f"{self.config.gradient_method}.{k}": v for k, v in self.config.gradient_options.items()}}

    def param_groups(self) -> List[dict]:
        """The loss method's optimiser groups (UW's log-variances at their constant lr), if any."""
        groups = getattr(self.loss_weighting, "param_groups", None)
        return groups() if groups is not None else []

    # -- the weights ---------------------------------------------------------------------------
    def _loss_coefficients(self, present: torch.Tensor) -> torch.Tensor:
        from .engine import loss_coefficients

        device = self.loss_weighting.last_weights.device
        return loss_coefficients(self.loss_weighting, present.to(device)).double()

    def weights_from_gram(self, gram: torch.Tensor, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        if gram.shape != (self.num_tasks, self.num_tasks):
            raise ValueError(f"gram must have shape ({self.num_tasks}, {self.num_tasks}), got {tuple(gram.shape)}")
        present = self._present(present, gram.device)
        c = self._loss_coefficients(present).to(gram.device)
        scaled_gram = gram.double() * c[:, None] * c[None, :]  # Gram matrix of the c_i g_i
        inner = self.gradient_weighting.weights_from_gram(scaled_gram, present).double()
        return self._scaled_weights(c, inner)

    def task_weights(self, gram: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        full = self.weights_from_gram(_embed(gram, present, self.num_tasks), present)
        return full[present.to(full.device)]

    def needs_gradients_this_step(self, present: Optional[torch.Tensor] = None) -> bool:
        return self.gradient_weighting.needs_gradients_this_step(present)

    def stored_weights(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        present = self._present(present)
        inner = self.gradient_weighting.stored_weights(present).double()
        return inner.cpu() * self._loss_coefficients(present).cpu()

    def reuse_weights(self, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        present = self._present(present)
        c = self._loss_coefficients(present)
        inner = self.gradient_weighting.reuse_weights(present).double()
        return self._scaled_weights(c.to(inner.device), inner)

    def _scaled_weights(self, c: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        weights = c * inner
        self._step_coefficients = c.detach().clone()
        self.last_weights = weights.detach().to(self.last_weights)
        return weights

    # -- after the step's losses are known ------------------------------------------------------
    def finish_task_step(self, task_losses: torch.Tensor, present: torch.Tensor,
                         backward_fn: Callable[[torch.Tensor], None]) -> None:
        """Train the loss method's own parameters on the step's global detached task losses, and
        commit its state, with the coefficients this step's weights were formed with."""
        from .engine import finish_loss_weighting_step

        device = self.loss_weighting.last_weights.device
        present = present.to(device)
        coefficients = self._step_coefficients
        if coefficients is None:  # weights chosen elsewhere (a probe): use the current coefficients
            coefficients = self._loss_coefficients(present)
        finish_loss_weighting_step(self.loss_weighting, task_losses.detach().to(device), present,
                                   coefficients.to(device), backward_fn)
        self._step_coefficients = None

    def combine_parts(self) -> Dict[str, object]:
        """The two parts, for logs and tests."""
        return {"loss": self.loss_weighting, "gradient": self.gradient_weighting}


def _embed(sub_gram: torch.Tensor, present: torch.Tensor, k: int) -> torch.Tensor:
    """A K x K Gram matrix with `sub_gram` in the rows / columns of the present tasks, 0 elsewhere."""
    full = torch.zeros(k, k, dtype=torch.float64, device=sub_gram.device)
    index = present.to(sub_gram.device).nonzero().squeeze(1)
    full[index[:, None], index[None, :]] = sub_gram.double()
    return full


def split_combined_name(name: str):
    """`"uw+pcgrad"` -> `("uw", "pcgrad")`; None for a plain name. Raises ValueError naming the fix
    when the parts are not one loss-based and one gradient-based method."""
    from .registry import WEIGHTINGS, _canonical

    if "+" not in str(name):
        return None
    parts = [_canonical(part) for part in str(name).split("+")]
    loss_names = sorted(n for n, c in WEIGHTINGS.items() if issubclass(c, LossWeighting))
    gradient_names = sorted(n for n, c in WEIGHTINGS.items() if issubclass(c, GradientWeighting))
    example = "e.g. uw+pcgrad"
    if len(parts) != 2:
        raise ValueError(f"{name!r}: combine exactly one loss-based and one gradient-based method ({example})")
    unknown = [p for p in parts if p not in WEIGHTINGS]
    if unknown:
        raise ValueError(f"unknown weighting {unknown[0]!r} in {name!r}; loss-based: {', '.join(loss_names)}; "
                         f"gradient-based: {', '.join(gradient_names)}")
    kinds = [issubclass(WEIGHTINGS[p], LossWeighting) for p in parts]
    if kinds[0] and kinds[1]:
        raise ValueError(f"{name!r} names two loss-based methods: combine one of {', '.join(loss_names)} "
                         f"with one gradient-based method ({', '.join(gradient_names)}), {example}")
    if not kinds[0] and not kinds[1]:
        raise ValueError(f"{name!r} names two gradient-based methods: combine one of {', '.join(gradient_names)} "
                         f"with one loss-based method ({', '.join(loss_names)}), {example}")
    return (parts[0], parts[1]) if kinds[0] else (parts[1], parts[0])


def route_combined_options(loss_name: str, gradient_name: str, options: dict) -> dict:
    """Flat options -> the `CombinedConfig` keywords: `seed` to both parts, `uw.lr` to one part, a
    plain option to each part that has it. Unknown options raise a ValueError listing the valid ones."""
    from .registry import WEIGHTINGS

    fields = {role: {f.name for f in dataclasses.fields(WEIGHTINGS[name].config_class)} - {"seed"}
              for role, name in (("loss", loss_name), ("gradient", gradient_name))}
    names = {"loss": loss_name, "gradient": gradient_name}
    routed = {"loss_options": {}, "gradient_options": {}}
    config = {"loss_method": loss_name, "gradient_method": gradient_name}
    for key, value in options.items():
        if key == "seed":
            config["seed"] = value
            continue
        if key in ("loss_options", "gradient_options"):
            routed[key].update(value)
            continue
        if key in ("loss_method", "gradient_method"):
            if value != config[key]:
                raise ValueError(f"{key}={value!r} contradicts the name {loss_name}+{gradient_name}")
            continue
        head, dot, option = key.partition(".")
        if dot:
            roles = [role for role in names if names[role] == head]
            if not roles or option not in fields[roles[0]]:
                raise ValueError(f"unknown option {key!r}; valid options: {_valid(names, fields)}")
            routed[f"{roles[0]}_options"][option] = value
            continue
        roles = [role for role in fields if key in fields[role]]
        if not roles:
            raise ValueError(f"unknown option {key!r} for weighting {loss_name}+{gradient_name}; "
                             f"valid options: {_valid(names, fields)}")
        for role in roles:
            routed[f"{role}_options"][key] = value
    return {**config, **routed}


def _valid(names, fields) -> str:
    return ", ".join(["seed"] + [f"{names[role]}.{f}" for role in ("loss", "gradient") for f in sorted(fields[role])])


def _blind_to_task_scale(method: GradientWeighting, loss_method: str) -> Optional[str]:
    """What the loss method's coefficients c_i (a scale on each task's gradient) leave of `method`'s
    update, when that is less than its direction; else None.

    Nash-MTL: if a solves (D G G^T D) a = 1 / a for D = diag(c), then alpha = D a solves G G^T alpha =
    1 / alpha, the unscaled problem, and the update a^T D G = alpha^T G is the same. MGDA on unit-norm
    gradients sees D G normalised, i.e. G normalised. IMTL-G's direction (equal projections on the unit
    gradients) is scale-free; only its length follows the scales."""
    from .imtl import IMTLG
    from .mgda import MGDA
    from .nash_mtl import NashMTL

    if isinstance(method, NashMTL):
        return (f"Nash-MTL's solution is the same for any scale of each task's gradient, so {loss_method}'s "
                "coefficients cancel at each solve (between solves they scale the stored weights by how much "
                "they changed since)")
    if isinstance(method, MGDA) and method.config.normalize == "l2":
        return (f"MGDA on unit-norm gradients (normalize l2) does not see the scale of a task's gradient, so "
                f"{loss_method}'s coefficients change nothing in the update")
    if isinstance(method, IMTLG):
        return (f"IMTL-G's direction is the same for any scale of each task's gradient, so {loss_method}'s "
                "coefficients change only the update's length")
    return None
