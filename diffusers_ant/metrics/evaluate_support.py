"""Shared input handling of the `evaluate` metric modules in `evaluate_modules/`."""

import datasets
import numpy as np


def feature_schemas():
    """Two input forms: one feature vector per row (same count on both sides, as `evaluate` requires
    of row-wise inputs), or one whole (N, D) feature matrix per row (any counts)."""
    vector = datasets.Sequence(datasets.Value("float32"))
    matrix = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
    return [
        datasets.Features({"predictions": vector, "references": vector}),
        datasets.Features({"predictions": matrix, "references": matrix}),
    ]


def stack_features(rows):
    """Rows of features, or a list of whole feature matrices, as one (N, D) float64 array."""
    arrays = [np.asarray(row, dtype=np.float64) for row in rows]
    if arrays and arrays[0].ndim == 2:
        return np.concatenate(arrays, axis=0)
    return np.stack(arrays)
