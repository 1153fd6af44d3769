"""Kernel Inception Distance: the unbiased MMD² with a cubic polynomial kernel, over random subsets.

Why beside FID: FID is biased at small N (its value depends on N, not only on the two
distributions), so reduced runs (a few thousand images, the miniature world) cannot be compared
across image counts; KID's estimator is unbiased, so its expectation does not depend on N, and it
needs no covariance matrix (fine with fewer images than feature dimensions). Definition as in
Bińkowski et al. 2018 and the reference implementations (clean-fid `kernel_distance`,
torch-fidelity `kid`):

- kernel k(x, y) = (x·y / d + 1)^3, d the feature dimension;
- per subset: m = min(subset_size, n_x, n_y) features drawn without replacement from each set,
  MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1)) − 2 Σ_{i,j} k(x_i, y_j) / m²;
- KID = mean of MMD²_u over `num_subsets` subsets (defaults 100 x 1000, as both references).

The subsets come from `np.random.default_rng(seed)`, so a KID is a deterministic function of the
two feature sets; with the same seed, every row of a table sees the same reference subsets.
Computed in float64. KID can be slightly negative (it is unbiased around 0 for equal distributions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

KID_NUM_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x_i, y_j) = (x_i·y_j / d + 1)^3 for all pairs: [n_x, n_y] (sklearn's default degree 3,
    gamma 1/d, coef0 1)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Any, y: Any) -> float:
    """The unbiased MMD² between two equally sized feature sets `[m, d]` (m >= 2)."""
    x, y = _features(x), _features(y)
    m = x.shape[0]
    if y.shape != x.shape or m < 2:
        raise ValueError(f"mmd2_unbiased needs two [m, d] sets of the same shape with m >= 2, "
                         f"got {x.shape} and {y.shape}")
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * polynomial_kernel(x, y).sum() / (m * m))


def kid_subsets(x: Any, y: Any, *, num_subsets: int = KID_NUM_SUBSETS,
                subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> np.ndarray:
    """MMD²_u of each of `num_subsets` random subset pairs (size min(subset_size, n_x, n_y)).

    The sets stay in their own dtype (30K Inception features are 245 MB in float32); each subset is
    converted to float64.
    """
    x, y = _features(x, None), _features(y, None)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features have different dims: {x.shape[1]} vs {y.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs num_subsets >= 1 and subset_size >= 2, got {num_subsets} and "
                         f"{subset_size}")
    m = min(int(subset_size), x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    if m == x.shape[0] == y.shape[0]:  # every subset is a permutation of the full sets
        return np.full(num_subsets, mmd2_unbiased(x, y))
    rng = np.random.default_rng(seed)
    out = np.empty(num_subsets, np.float64)
    for s in range(num_subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        out[s] = mmd2_unbiased(xs, ys)
    return out


def kernel_inception_distance(x: Any, y: Any, *, num_subsets: int = KID_NUM_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0
                              ) -> tuple[float, float]:
    """(KID, standard deviation over the subsets) between two `[n, d]` feature sets."""
    values = kid_subsets(x, y, num_subsets=num_subsets, subset_size=subset_size, seed=seed)
    return float(values.mean()), float(values.std())


def _features(features: Any, dtype: Any = np.float64) -> np.ndarray:
    feats = np.asarray(features, dtype=dtype)
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {feats.shape}")
    return feats
