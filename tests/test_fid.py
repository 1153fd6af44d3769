"""FID arithmetic: closed forms, agreement with a direct scipy computation, streaming statistics."""

import numpy as np
import pytest
import scipy.linalg

from dediffusion_jax.evaluation import fid


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_rotated_gaussians_matches_closed_form():
    # Same covariance spectrum in a common (random) eigenbasis: sqrtm(S1 S2) = Q sqrt(D1 D2) Q^T.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d1, d2 = rng.uniform(0.5, 2.0, size=6), rng.uniform(0.5, 2.0, size=6)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    expected = 1.0 + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    mu2 = np.zeros(6)
    mu2[0] = 1.0
    assert fid.frechet_distance(np.zeros(6), s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_from_features_matches_direct_scipy_computation():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 16)).astype(np.float32)
    b = (rng.normal(size=(250, 16)) * 1.3 + 0.2).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a64.mean(0), b64.mean(0)
    c1, c2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert fid.fid_from_features(a, b) == pytest.approx(direct, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 12))
    assert abs(fid.fid_from_features(x, x)) < 1e-8
    noise = rng.normal(size=x.shape)
    scores = [fid.fid_from_features(x, x + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    assert all(lo < hi for lo, hi in zip(scores, scores[1:])), scores
    assert scores[0] > 0


def test_singular_covariances_get_an_eps_offset_instead_of_nan():
    # Fewer samples than dims: both covariances are rank-deficient, sqrtm(0) is flagged singular.
    zero = np.zeros((4, 4))
    assert fid.frechet_distance(np.zeros(4), zero, np.ones(4), zero) == pytest.approx(4.0, abs=1e-5)
    rng = np.random.default_rng(4)
    got = fid.fid_from_features(rng.normal(size=(5, 32)), rng.normal(size=(5, 32)))
    assert np.isfinite(got) and got > 0


def test_large_imaginary_component_raises():
    # A "covariance" with a negative eigenvalue: sqrtm of the product is genuinely complex.
    bad = np.diag([1.0, -4.0])
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), bad, np.zeros(2), np.eye(2))


def test_streaming_stats_equal_batch_stats_and_merge():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(103, 10)) * rng.uniform(0.5, 2, size=10) + 3.0
    stream = fid.FeatureStats.empty(10, name="toy")
    for start in range(0, 103, 16):  # uneven final batch
        stream.update(x[start : start + 16].astype(np.float32))
    np.testing.assert_allclose(stream.mean(), x.astype(np.float32).mean(0, dtype=np.float64))
    np.testing.assert_allclose(
        stream.covariance(), np.cov(x.astype(np.float32).astype(np.float64), rowvar=False),
        rtol=1e-9, atol=1e-12,
    )
    merged = fid.FeatureStats.from_features(x[:40], "toy").merge(
        fid.FeatureStats.from_features(x[40:], "toy")
    )
    assert merged.n == 103
    np.testing.assert_allclose(merged.covariance(), np.cov(x, rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError, match="different extractors"):
        merged.merge(fid.FeatureStats.from_features(x, "other"))


def test_stats_npz_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(6)
    stats = fid.FeatureStats.from_features(rng.normal(size=(20, 5)), name="inception")
    path = tmp_path / "stats.npz"
    stats.save(path)
    loaded = fid.FeatureStats.load(path)
    assert (loaded.n, loaded.name) == (20, "inception")
    np.testing.assert_array_equal(loaded.sum, stats.sum)
    np.testing.assert_array_equal(loaded.sum_outer, stats.sum_outer)
    assert fid.fid_from_stats(loaded, stats) == pytest.approx(0.0, abs=1e-9)

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(fid.StatsFileError, match="corrupt.npz"):
        fid.FeatureStats.load(corrupt)

    foreign = tmp_path / "pytorch_fid.npz"
    np.savez(foreign, mu=stats.mean(), sigma=stats.covariance())
    with pytest.raises(fid.StatsFileError, match="load_mu_sigma"):
        fid.FeatureStats.load(foreign)
    mu, sigma = fid.load_mu_sigma(foreign)
    assert fid.frechet_distance(mu, sigma, stats.mean(), stats.covariance()) == pytest.approx(
        0.0, abs=1e-9
    )


class _MeanColour:
    """A toy extractor: mean RGB and its square; shows the FeatureExtractor protocol."""

    name = "mean_colour"
    input_size = 8

    def __call__(self, images):
        x = np.asarray(images)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        m = x.mean(axis=(1, 2))
        return np.concatenate([m, m**2], axis=1)


def test_compute_stats_runs_an_extractor_over_batches():
    extractor = _MeanColour()
    assert isinstance(extractor, fid.FeatureExtractor)
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    batches = (images[i : i + 4] for i in range(0, 10, 4))  # 4 + 4 + 2 images
    stats = fid.compute_stats(extractor, batches, progress=False)
    assert (stats.n, stats.dim, stats.name) == (10, 6, "mean_colour")
    np.testing.assert_allclose(stats.mean(), extractor(images).mean(0), rtol=1e-6)
