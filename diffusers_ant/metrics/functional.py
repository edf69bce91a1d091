"""Distribution metrics on feature vectors: Fréchet distance (FID), KID and improved precision / recall.

Every function here takes plain feature matrices (one row per image) and knows nothing about the
network that produced them; `features.py` holds the feature extractors and `compute.py` joins the two.

Why by hand: the usual packages (pytorch-fid, clean-fid, torch-fidelity) import torchvision, which does
not load beside this project's torch build (see ENVIRONMENT.md), and torchmetrics' FID needs
torch-fidelity for its default network. The formulas are short, so they live here, each citing its paper.
"""

import warnings

import numpy as np
import scipy.linalg
import torch

__all__ = ["feature_statistics", "frechet_distance", "fid_from_features", "kid", "kid_subset_size", "precision_recall"]


def _as_features(feats, name):
    """(N, D) float64 numpy array from a numpy array, a torch tensor or a list of rows."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().double().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (num_samples, feature_dim) array, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or inf; check the images or the feature extractor")
    return feats


def feature_statistics(feats):
    """Mean and covariance (rows are samples) of a feature matrix: the Gaussian FID fits to a set."""
    feats = _as_features(feats, "feats")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet (2-Wasserstein) distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})
    (Dowson & Landau 1982; used as FID by Heusel et al., NeurIPS 2017, eq. 6).

    Numerical guard, as in the reference implementations: when the square root of the product is
    not finite or inaccurate (a singular product, e.g. fewer samples than feature dimensions), add
    `eps` to both diagonals and retry; a complex result whose imaginary part is tiny (rounding) is
    replaced by its real part, and a large imaginary part raises a `ValueError`.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d}, got {sigma1.shape} and {sigma2.shape}")

    def _sqrtm(a):
        with warnings.catch_warnings():
            # scipy warns on any singular input; the residual below tells whether the root is usable.
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm(a)
        # The relative residual of X @ X = A: scipy >= 1.16 no longer returns it.
        norm = np.linalg.norm(a)
        err = np.linalg.norm(root @ root - a) / norm if norm > 0 else 0.0
        return root, err

    covmean, err = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or not np.isfinite(err) or err > 1e-3:
        warnings.warn(
            f"frechet_distance: the product of covariances is (nearly) singular; adding {eps} to the diagonals",
            RuntimeWarning,
        )
        offset = np.eye(d) * eps
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))

    if np.iscomplexobj(covmean):
        # Rounding gives a tiny imaginary part; a large one means the covariances are not PSD.
        max_imag = np.max(np.abs(np.diagonal(covmean).imag)) if d else 0.0
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: sqrt of the covariance product has an imaginary part of {max_imag:.3g}; "
                "the covariances must be symmetric positive semi-definite (use more samples)"
            )
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(feats_a, feats_b, eps=1e-6):
    """FID between two sets of features (Heusel et al. 2017): `frechet_distance` of their Gaussian fits.

    With few samples FID is biased upwards (Binkowski et al. 2018), so only compare FIDs computed on
    the same number of samples with the same feature extractor.
    """
    mu_a, sigma_a = feature_statistics(feats_a)
    mu_b, sigma_b = feature_statistics(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b, eps=eps)


KID_MAX_SUBSET_SIZE = 1000


def kid_subset_size(num_a, num_b, subset_size=None):
    """The KID subset size for sets of `num_a` and `num_b` rows: `subset_size`, or by default
    min(1000, smaller // 2), so that every round cuts at least two disjoint subsets (see `kid`).
    An explicit size above half the smaller set is refused (torch-fidelity refuses sizes above the
    set; at the set's size every subset is the whole set reordered and the spread is 0)."""
    smaller = min(int(num_a), int(num_b))
    if subset_size is None:
        subset_size = min(KID_MAX_SUBSET_SIZE, smaller // 2)
        if subset_size < 2:
            raise ValueError(f"KID needs at least 4 samples per set (two disjoint subsets of 2), got {smaller}")
        return subset_size
    subset_size = int(subset_size)
    if subset_size < 2:
        raise ValueError(f"KID subset_size must be at least 2, got {subset_size}")
    if 2 * subset_size > smaller:
        raise ValueError(
            f"KID subset_size {subset_size} leaves fewer than two disjoint subsets in {smaller} samples; "
            f"pass subset_size <= {smaller // 2} (or None for the automatic size)"
        )
    return subset_size


def _mmd2_unbiased(x, y, degree, gamma, coef0):
    """Unbiased MMD^2 of two equal-size row sets under the polynomial kernel (Binkowski et al., eq. 4)."""
    m = x.shape[0]
    k_xx = (gamma * x @ x.T + coef0) ** degree
    k_yy = (gamma * y @ y.T + coef0) ** degree
    k_xy = (gamma * x @ y.T + coef0) ** degree
    # Unbiased: the within-set terms leave out the diagonal k(x_i, x_i).
    return float(
        (k_xx.sum() - k_xx.trace()) / (m * (m - 1))
        + (k_yy.sum() - k_yy.trace()) / (m * (m - 1))
        - 2.0 * k_xy.mean()
    )


def kid(feats_a, feats_b, subsets=100, subset_size=None, degree=3, gamma=None, coef0=1.0, seed=0):
    """Kernel Inception Distance (Binkowski et al., ICLR 2018, "Demystifying MMD GANs", eq. 4 / sec. 3).

    The unbiased estimate of MMD^2 with the polynomial kernel k(x, y) = (gamma x.y + coef0)^degree,
    gamma = 1 / feature_dim by default, computed on subsets of `subset_size` rows of each set and
    averaged. `subset_size` None: min(1000, smaller set // 2); larger sizes raise (`kid_subset_size`).

    Subsets come in rounds: each round shuffles both sets and cuts each into s = smaller // m
    disjoint subsets of m = `subset_size` rows, pairing the i-th subset of one set with the i-th of
    the other; rounds are added until there are at least `subsets` estimates. The s estimates of a
    round share no sample, so they are independent draws of the KID of two m-sample sets, and their
    spread is the sampling spread of that KID. (The usual way, subsets drawn independently from the
    whole set, as clean-fid and torch-fidelity do, gives overlapping subsets whose spread shrinks
    as m approaches the set size, to exactly 0 when m equals it: the spread then says nothing.)

    Returns `(mean, std)`: the mean over all subsets, and the pooled within-round standard deviation,
    an unbiased estimate (of the variance) of the spread of a KID computed on m-sample sets. Unlike
    FID the estimate is unbiased, so values near 0 (possibly slightly negative) mean "same distribution".
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = kid_subset_size(a.shape[0], b.shape[0], subset_size)
    per_round = min(a.shape[0], b.shape[0]) // m
    rounds = -(-int(subsets) // per_round)
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.default_rng(seed)
    # torch for the kernel matrices: on a busy machine its matmuls are several times faster than numpy's.
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)

    values = np.empty((rounds, per_round))
    for r in range(rounds):
        order_a = torch.from_numpy(rng.permutation(a.shape[0])[: per_round * m].reshape(per_round, m))
        order_b = torch.from_numpy(rng.permutation(b.shape[0])[: per_round * m].reshape(per_round, m))
        for i in range(per_round):
            values[r, i] = _mmd2_unbiased(a_t[order_a[i]], b_t[order_b[i]], degree, gamma, coef0)
    # pooled within-round variance: only estimates from disjoint data enter each deviation
    within = values - values.mean(axis=1, keepdims=True)
    std = float(np.sqrt((within**2).sum() / (rounds * (per_round - 1))))
    return float(values.mean()), std


def _kth_neighbour_radii(feats, k, batch_size):
    """Distance from each row to its k-th nearest other row, computed `batch_size` rows at a time."""
    radii = torch.empty(feats.shape[0], dtype=feats.dtype)
    for start in range(0, feats.shape[0], batch_size):
        dist = torch.cdist(feats[start : start + batch_size], feats)
        # k + 1: the smallest distance is the row to itself (0).
        radii[start : start + batch_size] = dist.kthvalue(k + 1, dim=1).values
    return radii


def _fraction_in_manifold(queries, support, radii, batch_size):
    """Fraction of `queries` inside the union of balls B(support_j, radii_j)."""
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        dist = torch.cdist(queries[start : start + batch_size], support)
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_feats, fake_feats, k=3, batch_size=1024):
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019, eqs. 1-3).

    Each set's manifold is the union of balls around its samples, each ball's radius the distance to
    the sample's k-th nearest neighbour in the same set. Precision is the fraction of fake samples
    inside the real manifold (quality); recall the fraction of real samples inside the fake manifold
    (coverage: low recall means mode dropping). The paper uses k = 3.

    The formula is the paper's; the features are whatever is passed. Kynkäänniemi et al. use the
    4096-d fc2 features of an ImageNet VGG-16; this project passes Inception or domain features
    (`diffusers_ant.metrics.features`), so its precision / recall are not comparable with published
    values computed on VGG-16 features, only with each other.

    Distances are computed `batch_size` rows at a time, so memory is O(batch_size * N), not O(N^2).
    Returns `(precision, recall)`.
    """
    real = torch.from_numpy(_as_features(real_feats, "real_feats"))
    fake = torch.from_numpy(_as_features(fake_feats, "fake_feats"))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1 or k >= min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be in [1, min(num_real, num_fake) - 1], got k={k} for {real.shape[0]} / {fake.shape[0]} samples")
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _fraction_in_manifold(fake, real, real_radii, batch_size)
    recall = _fraction_in_manifold(real, fake, fake_radii, batch_size)
    return precision, recall
