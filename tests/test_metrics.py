"""Metrics: closed forms for the Fréchet distance, behaviour of FID / KID / precision-recall on constructed
sets, the evaluate modules loaded by path offline, and the feature extractors (domain classifier
deterministic and cached, Inception from a safetensors file, any nn.Module)."""

import os

import evaluate
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_ant.metrics import (
    DomainFeatureExtractor,
    InceptionFeatureExtractor,
    ModuleFeatureExtractor,
    compute_metrics,
    default_cache_dir,
    fid_from_features,
    frechet_distance,
    get_feature_extractor,
    images_to_tensor,
    kid,
    metric_module_path,
    precision_recall,
)
from diffusers_ant.metrics import features as features_module
from diffusers_ant.metrics import functional


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def gaussian(n, dim, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, dim)) + shift


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # shared eigenvectors -> the covariances commute
    a, b = rng.uniform(0.2, 2, size=6), rng.uniform(0.2, 2, size=6)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_guards(monkeypatch):
    # fewer samples than dimensions: singular covariances, still a finite positive distance
    a, b = gaussian(10, 32, seed=0), gaussian(10, 32, shift=1.0, seed=1)
    value = fid_from_features(a, b)
    assert np.isfinite(value) and value > 0
    # when the square root fails (non-finite), the diagonals get an offset and it is retried
    real_sqrtm, calls = functional.scipy.linalg.sqrtm, []

    def failing_once(matrix):
        calls.append(matrix.copy())
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(functional.scipy.linalg, "sqrtm", failing_once)
    sigma = np.diag([1.0, 0.0])
    with pytest.warns(RuntimeWarning, match="singular"):
        value = frechet_distance([0, 0], sigma, [1, 0], sigma, eps=1e-6)
    assert len(calls) == 2 and np.allclose(calls[1], (sigma + 1e-6 * np.eye(2)) @ (sigma + 1e-6 * np.eye(2)))
    assert value == pytest.approx(1.0, abs=1e-5)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance([0, 0], np.diag([1.0, -4.0]), [0, 0], np.eye(2))
    with pytest.raises(ValueError, match="same length"):
        frechet_distance([0, 0], np.eye(2), [0, 0, 0], np.eye(3))


def test_fid_is_zero_on_itself_and_grows_with_the_shift():
    real = gaussian(600, 8, seed=0)
    assert abs(fid_from_features(real, real)) < 1e-8
    fids = [fid_from_features(real, gaussian(600, 8, shift=s, seed=1)) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert fids[0] < 0.2  # two samples of one distribution: only estimation noise
    assert all(x < y for x, y in zip(fids, fids[1:])), fids
    # a shift by s in every one of 8 dimensions adds about 8 s^2
    assert fids[-1] == pytest.approx(8 * 2.0**2, rel=0.1)


# --------------------------------------------------------------------------- KID, precision / recall


def test_kid_near_zero_for_same_distribution_positive_when_shifted():
    real = gaussian(300, 16, seed=0)
    same_mean, same_std = kid(real, gaussian(300, 16, seed=1), subsets=10, subset_size=150)
    shifted_mean, shifted_std = kid(real, gaussian(300, 16, shift=0.5, seed=1), subsets=10, subset_size=150)
    assert abs(same_mean) < 0.02 and same_std > 0
    assert shifted_mean > 0.1 > 10 * abs(same_mean)
    assert kid(real, gaussian(300, 16, shift=0.5, seed=1), subsets=10, subset_size=150) == (shifted_mean, shifted_std)


def test_kid_spread_is_the_spread_of_independent_splits():
    # Two sets of 1,000 from N(0, I) and N(0.15, I): with the defaults the old estimator drew
    # subsets of 1,000 from sets of 1,000 (every subset the whole set reordered: spread 0).
    dim, n, shift = 16, 1000, 0.15
    real, fake = gaussian(n, dim, seed=10), gaussian(n, dim, shift=shift, seed=11)
    mean, std = kid(real, fake)  # default subset size: min(1000, 1000 // 2) = 500
    assert std > 0
    # the spread of the KID of independent pairs of 500-sample sets from the same two distributions
    rng = np.random.default_rng(12)
    m = n // 2
    independent = [
        functional._mmd2_unbiased(torch.from_numpy(rng.normal(size=(m, dim))),
                                  torch.from_numpy(rng.normal(size=(m, dim)) + shift), 3, 1.0 / dim, 1.0)
        for _ in range(200)
    ]
    expected = np.std(independent, ddof=1)
    assert 0.7 < std / expected < 1.4, (std, expected)  # measured over 20 seeds: 0.81 to 1.22
    # the mean over subsets estimates the KID of the two whole sets: within 3 of its standard errors
    # (about expected / sqrt(2): twice the samples, variance dominated by the first-order term)
    assert mean == pytest.approx(np.mean(independent), abs=3 * expected / np.sqrt(2))
    # a subset as large as a set leaves no room for disjoint subsets: refused, with the fix named
    with pytest.raises(ValueError, match="pass subset_size <= 500"):
        kid(real, fake, subset_size=1000)
    with pytest.raises(ValueError, match="at least 4 samples"):
        kid(real[:3], fake[:3])
    # through compute_metrics too (its default used to be subset_size=1000)
    assert compute_metrics(real, fake, metrics=("kid",))["kid_std"] == pytest.approx(std)


def test_precision_recall_on_constructed_sets():
    real = gaussian(400, 4, seed=0)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, gaussian(400, 4, shift=100.0, seed=1)) == (0.0, 0.0)
    # mode dropping: real data has 4 well-separated modes, the generator covers only one
    centres = np.eye(4) * 20
    labels = np.arange(400) % 4
    modes = centres[labels] + gaussian(400, 4, seed=2)
    dropped = centres[0] + gaussian(300, 4, seed=3)
    precision, recall = precision_recall(modes, dropped)
    assert precision > 0.9 and recall < 0.35
    # distances computed in small blocks give the same answer
    assert precision_recall(modes, dropped, batch_size=7) == (precision, recall)


def test_evaluate_modules_load_by_path_and_agree(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    real, fake = gaussian(120, 6, seed=0), gaussian(80, 6, shift=0.3, seed=1)
    # float32 storage inside `evaluate`: compare with the functions on float32-rounded inputs
    real32, fake32 = real.astype(np.float32), fake.astype(np.float32)
    fid = evaluate.load(metric_module_path("fid"))
    assert fid.compute(predictions=[fake], references=[real])["fid"] == pytest.approx(fid_from_features(real32, fake32), rel=1e-6)
    # the row-per-sample form, equal counts, incrementally
    fid.add_batch(predictions=fake[:40], references=real[:40])
    fid.add_batch(predictions=fake[40:], references=real[40:80])
    assert fid.compute()["fid"] == pytest.approx(fid_from_features(real32[:80], fake32), rel=1e-6)

    kid_module = evaluate.load(metric_module_path("kid"))
    result = kid_module.compute(predictions=[fake], references=[real], subsets=5, subset_size=40)
    assert (result["kid_mean"], result["kid_std"]) == pytest.approx(kid(real32, fake32, subsets=5, subset_size=40), rel=1e-6)

    pr = evaluate.load(metric_module_path("precision_recall"))
    result = pr.compute(predictions=[fake], references=[real], k=3)
    assert (result["precision"], result["recall"]) == precision_recall(real32, fake32, k=3)
    with pytest.raises(ValueError, match="valid: fid, kid, precision_recall"):
        metric_module_path("inception_score")


# --------------------------------------------------------------------------- feature extractors


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """One trained digits classifier for the module (a few seconds of training)."""
    cache = tmp_path_factory.mktemp("fe_cache_a")
    extractor = DomainFeatureExtractor("digits", cache_dir=cache)
    return cache, extractor


def test_domain_extractor_is_deterministic_accurate_and_cached(digits_cache, tmp_path, monkeypatch):
    cache, first = digits_cache
    assert first.weights_path.parent == cache and first.weights_path.exists()
    assert first.val_accuracy > 0.9  # the stated accuracy (measured 0.98)
    # a second training in a fresh cache dir gives bit-identical weights
    second = DomainFeatureExtractor("digits", cache_dir=tmp_path)
    a, b = load_file(str(first.weights_path)), load_file(str(second.weights_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a later call loads the file: the trainer is not called and the file is not rewritten
    mtime = os.stat(first.weights_path).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded, not retrained")

    monkeypatch.setattr(features_module, "train_domain_classifier", no_training)
    loaded = DomainFeatureExtractor("digits", cache_dir=cache)
    assert os.stat(first.weights_path).st_mtime_ns == mtime
    assert loaded.val_accuracy == first.val_accuracy
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded(x), first(x)) and loaded(x).shape == (5, first.feature_dim)
    assert loaded.weights_sha256() == first.weights_sha256()
    # the cache location follows DIFFUSERS_ANT_CACHE
    monkeypatch.setenv("DIFFUSERS_ANT_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "feature_extractors"


def test_compute_metrics_with_the_domain_extractor(digits_cache):
    from diffusers_ant.data import load_training_dataset

    cache, _ = digits_cache
    data = load_training_dataset(dataset_name="digits")
    real, held_out = data.select(range(0, 400)), data.select(range(400, 800))
    noise = np.random.default_rng(0).random((400, 8, 8)).astype(np.float32)
    good = compute_metrics(real, held_out, feature_extractor="digits", cache_dir=cache, kid_subsets=5, kid_subset_size=200)
    bad = compute_metrics(real, noise, feature_extractor="digits", cache_dir=cache, kid_subsets=5, kid_subset_size=200)
    assert good["feature_extractor"] == "domain_digits" and good["num_real"] == good["num_fake"] == 400
    assert good["fid"] < bad["fid"] / 10
    assert good["kid_mean"] < bad["kid_mean"] / 10
    # held-out real digits against real (400 each, k = 3, 112-d features): measured 0.68 / 0.79
    assert good["precision"] > 0.6 and good["recall"] > 0.6 and bad["precision"] < 0.1
    # features in, same numbers out
    extractor = get_feature_extractor("digits", cache_dir=cache)
    from_feats = compute_metrics(extractor.extract(real), extractor.extract(held_out), metrics=("fid",))
    assert from_feats["fid"] == pytest.approx(good["fid"], rel=1e-9)
    with pytest.raises(ValueError, match="feature_extractor"):
        compute_metrics(noise, noise)


def test_inception_extractor_loads_a_safetensors_state_dict(tmp_path):
    from diffusers_ant.metrics.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    # the layout of pytorch-fid's weights: features + the 1008-way fc, which is ignored
    assert sum(p.numel() for p in net.parameters()) == 21_785_568
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / "inception.safetensors"
    save_file(state, str(path))
    extractor = get_feature_extractor("inception_v3", weights_path=str(path))
    assert isinstance(extractor, InceptionFeatureExtractor)
    images = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)  # greyscale, repeated to RGB
    feats = extractor.extract(images)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1))
    # bit for bit: the same weights, the same input values (grey repeated to RGB) through the same kernels,
    # and float32 to float64 is exact. (The features of this random network are below 4e-7: a tolerance of
    # 1e-5 would let any weights through.)
    assert feats.shape == (2, 2048) and np.array_equal(feats, expected.double().numpy())

    del state["Mixed_7c.branch_pool.conv.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        InceptionFeatureExtractor(str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="not found"):
        InceptionFeatureExtractor(str(tmp_path / "absent.safetensors"))
    (tmp_path / "renamed.safetensors").write_bytes(b"PK\x03\x04 a renamed .pth (a zip)")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        InceptionFeatureExtractor(str(tmp_path / "renamed.safetensors"))


def test_module_extractor_and_image_conversion():
    extractor = get_feature_extractor(torch.nn.Flatten(), num_channels=1, resolution=4, value_range=(-1, 1))
    assert isinstance(extractor, ModuleFeatureExtractor)
    images = np.full((3, 4, 4, 3), 255, dtype=np.uint8)  # uint8 RGB -> grey in [0, 1] -> [-1, 1]
    assert np.allclose(extractor.extract(images, batch_size=2), 1.0) and extractor.extract(images).shape == (3, 16)
    pil = [Image.fromarray(np.full((6, 6), v, dtype=np.uint8)) for v in (0, 51, 255)]
    assert torch.allclose(images_to_tensor(pil).mean(dim=(1, 2, 3)), torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        images_to_tensor(torch.rand(2, 1, 4, 4) * 2 - 1)
    # the other layout is refused, not read as images of H or W channels and averaged to grey
    with pytest.raises(ValueError, match=r"arrays are read as \(N, H, W, C\)"):
        images_to_tensor(np.random.rand(8, 1, 16, 16))  # a pipeline's output_type="pt" images, as numpy
    with pytest.raises(ValueError, match=r"tensors are read as \(N, C, H, W\)"):
        images_to_tensor(torch.rand(8, 16, 16, 1))
    # a colour palette image keeps its colours
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    colour = images_to_tensor([palette])
    assert colour.shape == (1, 3, 2, 2) and torch.equal(colour[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="valid: mnist5k, animal_mnist, digits, inception_v3"):
        get_feature_extractor("lenet")
