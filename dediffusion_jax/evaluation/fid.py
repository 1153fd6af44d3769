"""Fréchet Inception Distance: streaming feature statistics and the Fréchet distance, in float64.

Why: the paper's headline metric is reconstruction FID (image -> text -> third-party text-to-image
model -> FID against the originals, 30K COCO val at 256x256). The numbers are only comparable with
published ones if every step matches the reference implementation (pytorch-fid):

- features: InceptionV3 pool3 (see `evaluation/inception.py`), accumulated in float64;
- statistics: mean and *unbiased* covariance (`np.cov(features, rowvar=False)`, ddof=1);
- distance: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) with `scipy.linalg.sqrtm`, an eps*I
  offset when the product is singular, and tiny imaginary parts dropped (large ones raise).

The feature network is pluggable (`FeatureExtractor`) so the miniature world can use its own small
network; statistics remember the extractor's name and refuse to be compared across extractors.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from dediffusion_jax.errors import UserError

STATS_FORMAT = "dediffusion_jax.FeatureStats"
STATS_VERSION = 1


class StatsFileError(UserError, ValueError):
    """A .npz file is not a FeatureStats file (or is corrupt / inconsistent)."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """What `compute_stats` needs from a feature network.

    `__call__` takes an NHWC image batch, uint8 in [0, 255] or float in [0, 1], of any spatial size
    (the extractor resizes to its own `input_size`), and returns `[B, F]` features. `name`
    identifies the network (and its weights) so statistics from different networks are never
    compared.
    """

    name: str
    input_size: int

    def __call__(self, images: Any) -> Any: ...


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid does.

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 @ sigma2)).

    The product is often numerically singular (fewer samples than feature dimensions); then `eps`
    is added to both diagonals and the square root retried. A small imaginary part of the square
    root is numerical noise and dropped; a large one (diagonal imaginary part > 1e-3) means the
    inputs are not covariance matrices and raises ValueError.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"covariances {sigma1.shape} / {sigma2.shape} do not fit means of shape {mu1.shape}"
        )
    diff = mu1 - mu2

    covmean, singular = _sqrtm(sigma1 @ sigma2)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("sqrtm(sigma1 @ sigma2) is not finite even with an eps offset")

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has a large imaginary component "
                f"{np.max(np.abs(covmean.imag)):.3g}; are these covariance matrices?"
            )
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's sqrtm, reporting whether scipy flagged the matrix as singular."""
    import scipy.linalg  # here, not at the top: scipy's array-API layer imports jax (slow `--help`s)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    return np.asarray(root), singular


@dataclasses.dataclass
class FeatureStats:
    """Streaming first and second moments of features, in float64.

    Holds n, sum(x) and sum(x x^T) so batches can be added in any order and partial results (e.g.
    one per host or per shard of COCO) merged exactly. `name` is the feature extractor's name.
    """

    n: int
    sum: np.ndarray
    sum_outer: np.ndarray
    name: str = ""

    @classmethod
    def empty(cls, dim: int, name: str = "") -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64), name)

    @classmethod
    def from_features(cls, features: Any, name: str = "") -> FeatureStats:
        feats = _as_features(features)
        stats = cls.empty(feats.shape[1], name)
        stats.update(feats)
        return stats

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def update(self, features: Any) -> None:
        """Adds a `[B, F]` batch of features."""
        feats = _as_features(features)
        if feats.shape[1] != self.dim:
            raise ValueError(f"features have dim {feats.shape[1]}, stats have dim {self.dim}")
        self.n += feats.shape[0]
        self.sum += feats.sum(axis=0)
        self.sum_outer += feats.T @ feats

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of both sample sets (a new object)."""
        _check_compatible(self, other)
        return FeatureStats(
            self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer, self.name
        )

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("mean of empty FeatureStats")
        return self.sum / self.n

    def covariance(self) -> np.ndarray:
        """Unbiased (ddof=1) covariance, as `np.cov(features, rowvar=False)` in pytorch-fid."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.n}")
        mu = self.mean()
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2.0  # exact symmetry; rounding can break it slightly

    def save(self, path: str | os.PathLike) -> None:
        np.savez(
            path,
            format=np.array(STATS_FORMAT),
            version=np.array(STATS_VERSION),
            name=np.array(self.name),
            n=np.array(self.n, np.int64),
            sum=self.sum,
            sum_outer=self.sum_outer,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Reads a file written by `save`; anything else raises StatsFileError naming the file."""
        try:
            with np.load(path, allow_pickle=False) as data:
                contents = {k: data[k] for k in data.files}
        except Exception as e:  # zipfile / pickle / IO errors all mean "not our file"
            raise StatsFileError(f"{path}: not a readable FeatureStats .npz file ({e})") from e
        if str(contents.get("format", "")) != STATS_FORMAT:
            keys = sorted(contents)
            hint = ""
            if {"mu", "sigma"} <= set(keys):
                hint = " (it looks like pytorch-fid mu/sigma stats; use load_mu_sigma)"
            raise StatsFileError(f"{path}: not a FeatureStats file, keys {keys}{hint}")
        version = int(contents["version"])
        if version != STATS_VERSION:
            raise StatsFileError(
                f"{path}: FeatureStats version {version}, expected {STATS_VERSION}"
            )
        try:
            n = int(contents["n"])
            total = np.asarray(contents["sum"], np.float64)
            outer = np.asarray(contents["sum_outer"], np.float64)
            name = str(contents["name"])
        except KeyError as e:
            raise StatsFileError(f"{path}: FeatureStats file lacks {e}") from e
        if total.ndim != 1 or outer.shape != (total.shape[0], total.shape[0]) or n < 0:
            raise StatsFileError(
                f"{path}: inconsistent FeatureStats (n={n}, sum {total.shape}, "
                f"sum_outer {outer.shape})"
            )
        return cls(n, total, outer, name)


def load_mu_sigma(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) from a FeatureStats file or a pytorch-fid `--save-stats` npz (mu, sigma).

    Why: reference statistics are often shared in pytorch-fid's format; they are not mergeable but
    are enough for `frechet_distance`. Nothing records which network made a mu/sigma file.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" in data.files and "sigma" in data.files:
                return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except Exception as e:
        raise StatsFileError(f"{path}: not a readable .npz file ({e})") from e
    stats = FeatureStats.load(path)
    return stats.mean(), stats.covariance()


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sample sets' statistics (which must come from the same extractor)."""
    _check_compatible(a, b)
    return frechet_distance(a.mean(), a.covariance(), b.mean(), b.covariance())


def fid_from_features(a: Any, b: Any) -> float:
    """FID between two `[N, F]` feature arrays."""
    return fid_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b))


def compute_stats(
    extractor: FeatureExtractor,
    image_batches: Iterable[Any],
    progress: bool = True,
) -> FeatureStats:
    """Runs `extractor` over NHWC image batches and accumulates float64 statistics."""
    stats: FeatureStats | None = None
    batches = image_batches
    if progress:
        try:
            from tqdm.auto import tqdm

            batches = tqdm(image_batches, desc=f"features ({extractor.name})", unit="batch")
        except ImportError:  # pragma: no cover - tqdm is a pinned dependency
            pass
    for images in batches:
        feats = _as_features(extractor(images))
        if stats is None:
            stats = FeatureStats.empty(feats.shape[1], extractor.name)
        stats.update(feats)
    if stats is None:
        raise ValueError("compute_stats got no image batches")
    if progress:
        print(f"{extractor.name}: {stats.n} images", file=sys.stderr)
    return stats


def _as_features(features: Any) -> np.ndarray:
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be [B, F], got shape {feats.shape}")
    return feats


def _check_compatible(a: FeatureStats, b: FeatureStats) -> None:
    if a.name != b.name:
        raise ValueError(f"statistics come from different extractors: {a.name!r} vs {b.name!r}")
    if a.dim != b.dim:
        raise ValueError(f"statistics have different dims: {a.dim} vs {b.dim}")
