"""KID arithmetic: the unbiased MMD² against a direct pairwise computation, ~0 for one distribution,
clearly > 0 for shifted ones, deterministic subsets, sklearn's kernel where sklearn is installed."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dediffusion_jax.evaluation import kid


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Bińkowski et al.'s unbiased estimator written out pair by pair (no matrices)."""
    m, d = x.shape

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_equals_the_direct_unbiased_mmd2_when_every_subset_is_the_full_set():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    y = (rng.normal(size=(12, 5)) * 1.5 + 0.3).astype(np.float32)
    expected = direct_mmd2(x.astype(np.float64), y.astype(np.float64))
    assert kid.mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)
    # subset_size >= n: each subset is a permutation of the full sets, so every value is the same
    values = kid.kid_subsets(x, y, num_subsets=7, subset_size=1000)
    np.testing.assert_allclose(values, expected, rtol=1e-10)
    mean, std = kid.kernel_inception_distance(x, y, num_subsets=7)
    assert mean == pytest.approx(expected, rel=1e-10) and std < 1e-9 * abs(expected)


def test_kid_is_near_zero_for_one_distribution_and_clearly_positive_for_shifted_ones():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same_mean, same_std = kid.kernel_inception_distance(a, b, num_subsets=50, subset_size=100)
    shifted, _ = kid.kernel_inception_distance(a, b + 0.5, num_subsets=50, subset_size=100)
    # unbiased: the same-distribution estimate is within noise of 0, which an N-biased one is not
    assert abs(same_mean) < 3 * same_std / np.sqrt(50) + 1e-3, (same_mean, same_std)
    assert shifted > 20 * max(abs(same_mean), same_std / np.sqrt(50)), (shifted, same_mean)
    more, _ = kid.kernel_inception_distance(a, b + 1.0, num_subsets=50, subset_size=100)
    assert more > shifted


def test_kid_subsets_are_seeded_and_subset_size_is_capped_by_the_smaller_set():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(30, 4)) + 0.2
    a = kid.kid_subsets(x, y, num_subsets=5, subset_size=20, seed=3)
    np.testing.assert_array_equal(a, kid.kid_subsets(x, y, num_subsets=5, subset_size=20, seed=3))
    assert not np.array_equal(a, kid.kid_subsets(x, y, num_subsets=5, subset_size=20, seed=4))
    assert len(set(a.tolist())) > 1  # subsets differ
    # each value is the direct MMD²_u of the subsets drawn without replacement (x's, then y's)
    rng = np.random.default_rng(3)
    for value in a:
        ix, iy = rng.choice(50, 20, replace=False), rng.choice(30, 20, replace=False)
        assert value == pytest.approx(direct_mmd2(x[ix], y[iy]), rel=1e-10)
    # m = min(1000, 50, 30) = 30: y is used whole in every subset, x subsampled, so values vary
    capped = kid.kid_subsets(x, y, num_subsets=3)
    assert len(set(capped.tolist())) == 3
    # the full-set shortcut (m = n_x = n_y) gives what sampling would
    np.testing.assert_allclose(kid.kid_subsets(x[:30], y, num_subsets=2),
                               direct_mmd2(x[:30], y), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        kid.kid_subsets(x, y[:1])
    with pytest.raises(ValueError, match="dims"):
        kid.kid_subsets(x, rng.normal(size=(30, 5)))


def test_polynomial_kernel_matches_sklearn():
    pairwise = pytest.importorskip("sklearn.metrics.pairwise")
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(9, 7)), rng.normal(size=(11, 7))
    np.testing.assert_allclose(kid.polynomial_kernel(x, y), pairwise.polynomial_kernel(x, y),
                               rtol=1e-12)
