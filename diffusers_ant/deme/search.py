"""The search for DeMe's merge weights (PAPERS.md section 2, item 5: "the w_i chosen by a search on a
validation metric"; the authors report w = [0.1, 0.1, 0.2, 0.5] from low to high t on LSUN Church).

The metric is any function ``weights -> score`` (lower is better), or ``weights -> dict`` of metrics
with the score under ``metric``: ``merging.py`` passes one that merges the fine-tunes with those
weights, samples the merged model and returns its domain FID on a held-out set
(``diffusers_ant.analysis.evaluate``); tests pass a constructed function.

- ``grid``: every combination of ``values`` for the N weights (``len(values) ** N`` evaluations).
- ``coordinate``: coordinate descent over the same values: start from ``initial`` (default 1/N
  each), then, one weight at a time, low to high t, try every value with the others fixed and keep
  the best; repeat until a round changes nothing or after ``max_rounds`` rounds. Each distinct
  point is evaluated once. Finds the grid optimum of a separable metric in one round, at
  ``N * len(values)`` evaluations; on other metrics it may stop at a coordinate-wise optimum.

Ties keep the first point evaluated (the table's order).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..files import write_json_atomically, write_text_atomically

__all__ = ["DEFAULT_SEARCH_SAMPLES", "DEFAULT_SEARCH_VALUES", "NO_FINETUNE_HELPED", "SEARCH_STRATEGIES", "returns_base", "SearchResult", "search_merge_weights", "ScoredPoints", "write_search_table"]

SEARCH_STRATEGIES = ("grid", "coordinate")
# The authors' values (PAPERS.md section 2, item 5: w = [0.1, 0.1, 0.2, 0.5] on LSUN Church): each weight
# is searched over 0, 0.1, 0.2, 0.5 and 1, and the weights are not tied to sum to 1 (a coordinate or
# grid point may sum to anything up to N: task arithmetic extrapolates as well as it interpolates).
DEFAULT_SEARCH_VALUES = (0.0, 0.1, 0.2, 0.5, 1.0)
# Samples per search point: a domain FID on fewer is too noisy to rank points a few FID apart.
DEFAULT_SEARCH_SAMPLES = 1000
NO_FINETUNE_HELPED = ("no fine-tune helped: the search returned the base (all weights 0), so the merged model is the "
                      "pretrained model itself")


def returns_base(weights) -> bool:
    """Whether merge weights leave the base as it is (every weight 0): a search that ends there found
    no fine-tune that helps, which is never a win for DeMe."""
    return all(float(w) == 0.0 for w in weights)
SEARCH_TABLE_NAME = "deme_search"  # .json and .md beside the result


@dataclass
class SearchResult:
    """The best weights and score, and the table of every evaluation (``rows``: dicts with
    ``weights``, ``score`` and the metric function's other values)."""

    strategy: str
    metric: str
    best_weights: list
    best_score: float
    rows: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "metric": self.metric, "best_weights": self.best_weights,
                "best_score": self.best_score, "rows": self.rows}


def grid_size(num_models: int, values: Sequence[float]) -> int:
    """Points of the grid search: every combination of ``values`` for ``num_models`` weights."""
    return len(values) ** num_models


def search_merge_weights(score: Callable[[tuple], float | Mapping], num_models: int, strategy: str = "grid",
                         values: Sequence[float] = DEFAULT_SEARCH_VALUES, initial: Sequence[float] | None = None,
                         max_rounds: int = 3, max_evaluations: int | None = None, metric: str = "fid",
                         progress: Callable[[dict], None] | None = None) -> SearchResult:
    """Search the N merge weights (low to high t) minimising ``score`` (module docstring).

    Args:
        score: ``weights (tuple of N floats) -> float``, or ``-> dict`` holding the score under ``metric``.
        num_models: N, the number of fine-tunes.
        strategy: ``grid`` or ``coordinate``.
        values: the candidate values of each weight.
        initial: the coordinate search's starting point (default 1/N each); not used by ``grid``.
        max_rounds: the coordinate search's maximum number of rounds.
        max_evaluations: refuse a grid larger than this (the grid's size is ``len(values) ** N``).
        metric: the key of the score when ``score`` returns a dict; the table's label.
        progress: called with each new table row.
    """
    if strategy not in SEARCH_STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}: choose one of {', '.join(SEARCH_STRATEGIES)}")
    if num_models < 1:
        raise ValueError("the search needs at least one fine-tune")
    values = [float(v) for v in values]
    if not values or len(set(values)) != len(values):
        raise ValueError("give distinct candidate weights (--search_values)")
    if max_rounds < 1:
        raise ValueError("max_rounds must be at least 1")
    if strategy == "grid" and max_evaluations is not None and grid_size(num_models, values) > max_evaluations:
        raise ValueError(f"a grid of {len(values)} values for {num_models} weights is {grid_size(num_models, values)} "
                         f"evaluations, over the limit of {max_evaluations}: give fewer --search_values, use --search "
                         "coordinate, or raise --max_evaluations")

    rows, seen = [], {}

    def evaluate(weights):
        weights = tuple(float(w) for w in weights)
        if weights in seen:
            return seen[weights]
        result = score(weights)
        if isinstance(result, Mapping):
            if metric not in result:
                raise ValueError(f"the metric function returned no {metric!r}")
            row = {"weights": list(weights), "score": float(result[metric]),
                   **{k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}}
        else:
            row = {"weights": list(weights), "score": float(result)}
        if math.isnan(row["score"]):
            row["score"] = math.inf  # a failed evaluation never wins
        rows.append(row)
        seen[weights] = row["score"]
        if progress is not None:
            progress(row)
        return row["score"]

    if strategy == "grid":
        for weights in itertools.product(values, repeat=num_models):
            evaluate(weights)
    else:
        current = list(initial) if initial is not None else [1.0 / num_models] * num_models
        if len(current) != num_models:
            raise ValueError(f"the starting weights have {len(current)} entries for {num_models} fine-tunes")
        current_score = evaluate(current)
        for _ in range(max_rounds):
            changed = False
            for i in range(num_models):
                for value in values:
                    candidate = list(current)
                    candidate[i] = value
                    candidate_score = evaluate(candidate)
                    if candidate_score < current_score:
                        current, current_score, changed = candidate, candidate_score, True
            if not changed:
                break

    best = min(range(len(rows)), key=lambda r: (rows[r]["score"], r))
    return SearchResult(strategy, metric, rows[best]["weights"], rows[best]["score"], rows)


class ScoredPoints:
    """The points a weight search has scored, kept in a JSON file as each is scored, so that a search stopped
    part way (each point samples and scores 1,000 images: hours in all) continues where it stopped: the same
    merge run again reuses the points scored under the same `settings` (the base, the fine-tunes, the merge
    and the evaluation, which fix a point's score: the evaluation is seeded) and scores only the rest. A file
    written under other settings is not used, and is replaced."""

    def __init__(self, path: str, settings: dict):
        self.path = path
        self.settings = json.loads(json.dumps(settings, default=str))  # as the file holds them
        self.rows: list = []
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = None  # (written atomically; unreadable only if changed by hand): score again
            if isinstance(saved, dict) and saved.get("settings") == self.settings:
                self.rows = list(saved.get("rows", []))
        self._scores = {tuple(row["weights"]): row["result"] for row in self.rows}

    def remembering(self, score: Callable[[tuple], float | Mapping]) -> Callable[[tuple], float | Mapping]:
        """`score`, answered from the file for a point scored before, and recorded in it otherwise."""
        def remembered(weights):
            key = tuple(float(w) for w in weights)
            if key not in self._scores:
                # as the file holds it (numbers, names), so a search resumed from the file sees the same values
                result = json.loads(json.dumps(score(weights), default=str))
                self._scores[key] = result
                self.rows.append({"weights": list(key), "result": result})
                write_json_atomically(self.path, {"settings": self.settings, "rows": self.rows})
            return self._scores[key]

        return remembered

    def remove(self) -> None:
        """Forget the points (the search has finished and its table is in the output folder)."""
        if os.path.isfile(self.path):
            os.remove(self.path)


def write_search_table(result: SearchResult, folder: str, name: str = SEARCH_TABLE_NAME) -> tuple:
    """Write the search as ``folder/<name>.json`` and ``folder/<name>.md`` (a table, best row marked);
    return the two paths."""
    json_path = write_json_atomically(os.path.join(folder, f"{name}.json"), result.to_dict())
    md_path = write_text_atomically(os.path.join(folder, f"{name}.md"), search_table_markdown(result))
    return json_path, md_path


def search_table_markdown(result: SearchResult) -> str:
    """The search as a markdown table: one row per evaluated point, the best one in bold."""
    extra = [k for k in ("kid_mean", "precision", "recall") if any(k in r for r in result.rows)]
    header = ["weights (low to high t)", result.metric] + extra
    lines = [f"Merge-weight search ({result.strategy}, lower {result.metric} is better): "
             f"best {_weights_text(result.best_weights)}, {result.metric} {result.best_score:.4f}."
             + (f" **{NO_FINETUNE_HELPED[0].upper() + NO_FINETUNE_HELPED[1:]}.**" if returns_base(result.best_weights) else ""),
             "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in result.rows:
        cells = [_weights_text(row["weights"]), f"{row['score']:.4f}"] + [
            f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in extra]
        if row["weights"] == result.best_weights:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _weights_text(weights) -> str:
    return "[" + ", ".join(f"{w:g}" for w in weights) + "]"
