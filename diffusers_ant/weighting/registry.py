"""The registry of weightings: name -> class, and `get_weighting` to build one from options."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Type

from .base import Weighting

WEIGHTINGS: Dict[str, Type[Weighting]] = {}


def register_weighting(name: str):
    """Class decorator adding a weighting to `WEIGHTINGS` under `name`."""

    def decorator(cls):
        if name in WEIGHTINGS:
            raise ValueError(f"weighting {name!r} is already registered")
        cls.name = name
        WEIGHTINGS[name] = cls
        return cls

    return decorator


def weighting_names() -> List[str]:
    return sorted(WEIGHTINGS)


def weighting_class(name: str) -> Type[Weighting]:
    """The class `get_weighting(name, ...)` builds (`CombinedWeighting` for `"uw+pcgrad"`); a
    ValueError naming the valid names otherwise."""
    from .combined import CombinedWeighting, split_combined_name

    if split_combined_name(name) is not None:
        return CombinedWeighting
    key = _canonical(name)
    if key not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; valid names: {', '.join(weighting_names())}, "
                         "or a loss-based and a gradient-based one joined by '+' (e.g. uw+pcgrad)")
    return WEIGHTINGS[key]


def _canonical(name: str) -> str:
    # "Nash-MTL", "nash_mtl" and "nash-mtl" all name the same method.
    return str(name).strip().lower().replace("-", "_")


def _coerce(field: dataclasses.Field, value):
    """Strings from a command line (`c=0.4`) become the type of the field's default."""
    default = field.default
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            return value
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        pass  # left as a string: validate() names the expected type
    return value


def get_weighting(name: str, num_tasks: int, **options) -> Weighting:
    """Build the weighting `name` for `num_tasks` tasks, its options given as keywords.

    Unknown names and options raise a ValueError listing the valid ones; bad values raise the
    config's own ValueError.

    `"<loss>+<gradient>"` (e.g. `"uw+pcgrad"`, ANT's combined configuration) builds a
    `combined.CombinedWeighting`: the loss-based method's coefficients scale the task losses and the
    gradient-based method combines the scaled task gradients (see `combined.py` for the options)."""
    from .combined import CombinedConfig, CombinedWeighting, route_combined_options, split_combined_name

    pair = split_combined_name(name)
    if pair is not None:
        config = CombinedConfig(**route_combined_options(*pair, options))
        return CombinedWeighting(num_tasks, config)
    key = _canonical(name)
    if key not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; valid names: {', '.join(weighting_names())}, "
                         "or a loss-based and a gradient-based one joined by '+' (e.g. uw+pcgrad)")
    cls = WEIGHTINGS[key]
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for weighting {key!r}; "
                         f"valid options: {', '.join(sorted(fields))}")
    config = cls.config_class(**{k: _coerce(fields[k], v) for k, v in options.items()})
    return cls(num_tasks, config)
