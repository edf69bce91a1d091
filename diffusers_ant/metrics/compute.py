"""`compute_metrics`: images (or features) in, FID / KID / precision / recall out."""

import numpy as np
import torch

from .features import get_feature_extractor
from .functional import fid_from_features, kid, precision_recall

__all__ = ["METRIC_NAMES", "compute_metrics"]

METRIC_NAMES = ("fid", "kid", "precision_recall")


def _is_feature_matrix(x):
    return isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 2


def compute_metrics(
    real,
    fake,
    feature_extractor=None,
    batch_size=64,
    metrics=METRIC_NAMES,
    k=3,
    kid_subsets=100,
    kid_subset_size=None,
    device=None,
    cache_dir=None,
    seed=0,
):
    """FID, KID and improved precision / recall of `fake` against `real`.

    `real` / `fake` are either feature matrices (N, D) (then `feature_extractor` must be None) or
    images in [0, 1] in any form `images_to_tensor` takes (then `feature_extractor` is a name for
    `get_feature_extractor`, e.g. "mnist5k" for the domain classifier, or an `nn.Module`).

    Returns a dict with `fid`, `kid_mean`, `kid_std`, `precision`, `recall` (those asked for in
    `metrics`), `num_real`, `num_fake`, `feature_extractor` (its name: "domain_mnist5k" marks a
    domain FID, which is not Inception FID) and `feature_extractor_sha256` (the hash of its weights,
    `FeatureExtractor.weights_sha256`; None for given features). KID uses subsets of `kid_subset_size` rows (default
    min(1000, smaller set // 2)); `kid_std` is the spread of a KID on that many samples, measured on
    disjoint subsets (see `functional.kid`).
    """
    unknown = set(metrics) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; valid: {', '.join(METRIC_NAMES)}")
    if feature_extractor is None:
        if not (_is_feature_matrix(real) and _is_feature_matrix(fake)):
            raise ValueError("images need a feature_extractor (e.g. feature_extractor='mnist5k'); or pass (N, D) features")
        real_feats, fake_feats, extractor_name, extractor_hash = real, fake, "given_features", None
    else:
        extractor = get_feature_extractor(feature_extractor, cache_dir=cache_dir, device=device)
        real_feats = extractor.extract(real, batch_size=batch_size)
        fake_feats = extractor.extract(fake, batch_size=batch_size)
        extractor_name, extractor_hash = extractor.name, extractor.weights_sha256()

    results = {"num_real": int(len(real_feats)), "num_fake": int(len(fake_feats)), "feature_extractor": extractor_name,
               "feature_extractor_sha256": extractor_hash}
    if "fid" in metrics:
        results["fid"] = fid_from_features(real_feats, fake_feats)
    if "kid" in metrics:
        results["kid_mean"], results["kid_std"] = kid(
            real_feats, fake_feats, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
    if "precision_recall" in metrics:
        results["precision"], results["recall"] = precision_recall(real_feats, fake_feats, k=k)
    return results
