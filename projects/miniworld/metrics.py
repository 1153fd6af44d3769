"""Scoring images against their source scenes with the world's attribute classifier.

Definitions (docs/miniworld.md): occupancy per cell (all four cells of every scene; an
all-empty guess scores ~0.62); colour and shape on truly occupied cells only; background per image;
object = an object's cell predicted occupied with the right colour and shape; exact scene = everything
in the image right (background, all four cells' occupancy, every object's colour and shape).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dediffusion_jax.evaluation.fid import fid_from_features

from projects.miniworld import classifier as clf
from projects.miniworld import scenes as S

ATTRIBUTES = ("occupancy", "colour", "shape", "background", "object", "exact_scene")


def scene_labels(scenes: Sequence[S.Scene] | np.ndarray) -> dict[str, np.ndarray]:
    """Ground-truth label arrays of scenes (or of scene indices)."""
    if isinstance(scenes, np.ndarray):
        return S.labels_of(scenes)
    return S.labels_of(np.array([s.index for s in scenes], np.int64))


def attribute_counts(pred: dict[str, np.ndarray],
                     truth: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-image (hits, counts) of each attribute (see module docstring): pooled over any set of
    images, an attribute's accuracy is sum(hits) / sum(counts), as `attribute_accuracy` computes."""
    occ_t = np.asarray(truth["occupied"], bool)
    occ_p = np.asarray(pred["occupied"], bool)
    col_ok = (pred["colour"] == truth["colour"]) & occ_t
    shp_ok = (pred["shape"] == truth["shape"]) & occ_t
    bg_ok = np.asarray(pred["background"] == truth["background"])
    obj_ok = occ_p & col_ok & shp_ok  # only counted on true objects
    cells_ok = (occ_p == occ_t) & (~occ_t | (col_ok & shp_ok))
    ones = np.ones(len(occ_t))
    n_obj = occ_t.sum(axis=1).astype(np.float64)
    return {
        "occupancy": ((occ_p == occ_t).sum(axis=1).astype(np.float64), np.full(len(occ_t), occ_t.shape[1], np.float64)),
        "colour": (col_ok.sum(axis=1).astype(np.float64), n_obj),
        "shape": (shp_ok.sum(axis=1).astype(np.float64), n_obj),
        "background": (bg_ok.astype(np.float64), ones),
        "object": (obj_ok.sum(axis=1).astype(np.float64), n_obj),
        "exact_scene": ((bg_ok & cells_ok.all(axis=1)).astype(np.float64), ones),
    }


def attribute_accuracy(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-attribute accuracy of predicted vs true label arrays (see module docstring)."""
    return {k: float(hits.sum() / max(counts.sum(), 1.0))
            for k, (hits, counts) in attribute_counts(pred, truth).items()}


def score_images(
    params: clf.Params,
    images: np.ndarray,
    scenes: Sequence[S.Scene] | np.ndarray,
    config: clf.ClassifierConfig = clf.ClassifierConfig(),
) -> dict[str, float]:
    """Attribute accuracy of (generated) images [B, 16, 16, 3] in [-1, 1] against their source scenes."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    pred = clf.predict_batched(params, np.asarray(images, np.float32), config=config)
    return attribute_accuracy(pred, scene_labels(scenes))


def named_object_drawn(params: clf.Params, images: np.ndarray, scenes: Sequence[S.Scene],
                       config: clf.ClassifierConfig = clf.ClassifierConfig()) -> float:
    """Fraction of images drawn from a short caption ('green circle': the scene's first object) in
    which some cell holds that object, whatever the cell: the calibration gate's last condition."""
    pred = clf.predict_batched(params, np.asarray(images, np.float32), config=config)
    colour = np.array([S.COLOURS.index(s.objects[0].colour) for s in scenes])[:, None]
    shape = np.array([S.SHAPES.index(s.objects[0].shape) for s in scenes])[:, None]
    hit = np.asarray(pred["occupied"], bool) & (pred["colour"] == colour) & (pred["shape"] == shape)
    return float(hit.any(axis=1).mean())


def classifier_heldout_accuracy(params: clf.Params, n: int = 512, seed: int = 0) -> dict[str, float]:
    """The classifier itself on `n` real held-out scenes (should be ~1.0 everywhere)."""
    idx = S.sample_indices(np.random.default_rng(seed), n, "heldout")
    return score_images(params, S.images_of(idx), idx)


def world_fid(
    params: clf.Params,
    images_a: np.ndarray,
    images_b: np.ndarray,
    config: clf.ClassifierConfig = clf.ClassifierConfig(),
    batch: int = 256,
) -> float:
    """Fréchet distance in the classifier's feature space: the world's stand-in for FID."""

    def feats(x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            pad = batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            out.append(clf.features(params, chunk, config)[: batch - pad])
        return np.concatenate(out)

    return fid_from_features(feats(np.asarray(images_a, np.float32)), feats(np.asarray(images_b, np.float32)))
