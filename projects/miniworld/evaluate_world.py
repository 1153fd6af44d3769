"""Reconstruction evaluation in the miniature world: text -> decoder -> images -> attributes and world-FID.

The world's version of the paper's protocol (PAPER.md, "Evaluation protocol"): each held-out scene is
described by several text sources (De-Diffusion text, the short one-object caption, the short caption
plus the background, the full ground-truth caption as the upper reference, empty text as the lower
one); the frozen decoder redraws the scene from each text; the world's attribute classifier scores
what was kept, and the Fréchet distance in its feature space (world-FID) compares the redrawn images
with the originals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dediffusion_jax.evaluation.fid import FeatureStats, fid_from_stats
from projects.miniworld import captions, classifier, metrics, scenes
from dediffusion_jax.t2i import pipeline
from dediffusion_jax.t2i.folder import Decoder

CAPTION_SOURCES: dict[str, Callable[[scenes.Scene], str]] = {
    "full caption (upper ref.)": captions.full_caption,
    "short caption": captions.short_caption,
    "short caption + background": captions.short_caption_with_background,
    "empty text (lower ref.)": lambda scene: "",
}
ATTRIBUTES = ("occupancy", "colour", "shape", "background", "object", "exact_scene")


def caption_texts(indices: Sequence[int]) -> dict[str, list[str]]:
    """Texts of every caption source for the given scene indices."""
    sc = [scenes.scene_from_index(int(i)) for i in indices]
    return {name: [fn(s) for s in sc] for name, fn in CAPTION_SOURCES.items()}


def reconstruct(
    decoder: Decoder,
    texts: Sequence[str],
    *,
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 128,
    mesh: Any = None,
) -> np.ndarray:
    """Texts -> images [B, 16, 16, 3] in [-1, 1], the same starting noise for every source."""
    images = pipeline.generate(
        decoder, list(texts), num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
        batch_size=batch_size, mesh=mesh,
    )
    return images.astype(np.float32) / 127.5 - 1.0


def world_features(clf_params: Any, clf_config: Any, images: np.ndarray, batch: int = 256) -> np.ndarray:
    out = [
        classifier.features(clf_params, images[i : i + batch], clf_config)
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate_sources(
    decoder: Decoder,
    indices: Sequence[int],
    texts_by_source: Mapping[str, Sequence[str]],
    *,
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    seed: int = 0,
    mesh: Any = None,
    progress: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Scores each text source's reconstructions of the scenes `indices`.

    Returns ({source: {world_fid, occupancy, colour, shape, background, object, exact_scene}},
    {source: reconstructed images}).
    """
    clf_params, clf_config = classifier.load_classifier()
    originals = scenes.images_of(np.asarray(indices))
    reference = FeatureStats.from_features(
        world_features(clf_params, clf_config, originals), name="miniworld_classifier"
    )
    labels = metrics.scene_labels(np.asarray(indices))
    rows: dict[str, dict[str, float]] = {}
    images_by_source: dict[str, np.ndarray] = {}
    for name, texts in texts_by_source.items():
        progress(f"  reconstructing {len(texts)} scenes from: {name}")
        images = reconstruct(
            decoder, texts, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed, mesh=mesh
        )
        pred = classifier.predict_batched(clf_params, images, config=clf_config)
        row = metrics.attribute_accuracy(pred, labels)
        stats = FeatureStats.from_features(
            world_features(clf_params, clf_config, images), name="miniworld_classifier"
        )
        row["world_fid"] = fid_from_stats(stats, reference)
        rows[name] = row
        images_by_source[name] = images
    return rows, images_by_source


def text_statistics(texts: Sequence[str], indices: Sequence[int]) -> dict[str, float]:
    """Mean attribute-word recall/precision of texts against each scene's ground truth."""
    per = [
        captions.word_recall_precision(t, scenes.scene_from_index(int(i)))
        for t, i in zip(texts, indices)
    ]
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]} if per else {}


def markdown_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Rows: text sources; columns: world-FID (lower is better) then attribute accuracies."""
    head = "| text source | world-FID ↓ | " + " | ".join(ATTRIBUTES) + " |"
    sep = "|---|---|" + "---|" * len(ATTRIBUTES)
    lines = [head, sep]
    for name, r in rows.items():
        cells = " | ".join(f"{r[a]:.3f}" for a in ATTRIBUTES)
        lines.append(f"| {name} | {r['world_fid']:.1f} | {cells} |")
    return "\n".join(lines)


def save_grid(path: str | Path, originals: np.ndarray, columns: Mapping[str, np.ndarray],
              rows: int = 8, scale: int = 4) -> Path:
    """PNG grid: one scene per row; columns = original | each source's reconstruction."""
    from PIL import Image

    tiles = [originals[:rows], *[c[:rows] for c in columns.values()]]
    n = min(len(t) for t in tiles)
    pad = 2
    h = w = originals.shape[1] * scale
    canvas = np.full((n * (h + pad) + pad, len(tiles) * (w + pad) + pad, 3), 255, np.uint8)
    for j, col in enumerate(tiles):
        for i in range(n):
            img = np.clip(np.round((col[i] + 1) * 127.5), 0, 255).astype(np.uint8)
            img = img.repeat(scale, 0).repeat(scale, 1)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
