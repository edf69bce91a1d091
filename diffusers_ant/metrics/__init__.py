"""Sample-quality metrics, offline: FID, KID, improved precision / recall, and their feature extractors.

    from diffusers_ant.metrics import compute_metrics
    compute_metrics(real_images, generated_images, feature_extractor="mnist5k")

`feature_extractor="mnist5k"` (or "animal_mnist", "digits") gives a DOMAIN FID: the Fréchet distance
in the features of a small classifier of that dataset, trained and cached on first use. It is not
Inception FID; never report it as such. Inception FID needs the user's weights file
(`feature_extractor="inception_v3"` through `InceptionFeatureExtractor(weights_path)`), and is
comparable with published FIDs only with pytorch-fid's port of the TensorFlow Inception weights
(not with other weights; and clean-fid or ADM's evaluator, which ANT and DiT used, differ slightly
even then). Precision / recall are Kynkäänniemi et al.'s formula on these same features, not on
the VGG-16 features of their paper. Every result records `feature_extractor_sha256`, the hash of
the extractor's weights: compare numbers only when it matches.

The same metrics are `evaluate` modules (`evaluate.load(metric_module_path("fid"))`), which take
feature vectors as `predictions` (generated) and `references` (real).
"""

from pathlib import Path

from .compute import METRIC_NAMES, compute_metrics
from .features import (
    DOMAIN_DATASETS,
    DOMAIN_RESOLUTIONS,
    DomainFeatureExtractor,
    FeatureExtractor,
    InceptionFeatureExtractor,
    ModuleFeatureExtractor,
    default_cache_dir,
    get_feature_extractor,
    images_to_tensor,
    train_domain_classifier,
)
from .functional import feature_statistics, fid_from_features, frechet_distance, kid, kid_subset_size, precision_recall

EVALUATE_MODULES = ("fid", "kid", "precision_recall")


def metric_module_path(name):
    """Path of the `evaluate` metric module `name` ("fid", "kid", "precision_recall") for `evaluate.load`."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown metric module {name!r}; valid: {', '.join(EVALUATE_MODULES)}")
    return str(Path(__file__).parent / "evaluate_modules" / name / f"{name}.py")


__all__ = [
    "DOMAIN_DATASETS",
    "DOMAIN_RESOLUTIONS",
    "EVALUATE_MODULES",
    "METRIC_NAMES",
    "DomainFeatureExtractor",
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "ModuleFeatureExtractor",
    "compute_metrics",
    "default_cache_dir",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "get_feature_extractor",
    "images_to_tensor",
    "kid",
    "kid_subset_size",
    "metric_module_path",
    "precision_recall",
    "train_domain_classifier",
]
