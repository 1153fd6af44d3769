"""The world's reconstruction evaluation, on the core's protocol (`evaluation.reconstruction`).

The world's version of the paper's protocol (PAPER.md, "Evaluation protocol"): each held-out scene is
described by several text sources (De-Diffusion text, the short one-object caption, the short caption
plus the background, the full ground-truth caption as the upper reference, empty text as the lower
one); the frozen decoder redraws the scene from each text; the world's attribute classifier scores
what was kept (`AttributeScorer`), and the Fréchet distance in its feature space (world-FID,
`ClassifierFeatures`) compares the redrawn images with the originals.

What the world plugs into the core protocol: an image source of held-out scenes, a feature extractor,
an attribute scorer and the caption text sources. The same function serves the demo, the probe's
benches and training (the evaluator type `miniworld.reconstruction`, registered by
`projects.miniworld.extensions`):

    config.evals = {"world": {"type": "miniworld.reconstruction", "every_steps": 0, "num_scenes": 256}}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dediffusion_jax.evaluation import evaluators, reconstruction, report
from projects.miniworld import captions, classifier, metrics, scenes

ATTRIBUTES = metrics.ATTRIBUTES
CAPTION_SOURCES: dict[str, Callable[[scenes.Scene], str]] = {
    "full caption (upper ref.)": captions.full_caption,
    "short caption": captions.short_caption,
    "short caption + background": captions.short_caption_with_background,
    "empty text (lower ref.)": lambda scene: "",
}
DE_DIFFUSION = "De-Diffusion text"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float images -> uint8 (the protocol's format for every image)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> [-1, 1] float32 (what the world's networks read)."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


class SceneSource:
    """The protocol's image source: scenes by index, {"id", "image" (uint8), "scene_index"}."""

    def __init__(self, indices: Sequence[int]):
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        return {"id": scenes.scene_from_index(index).key, "image": to_uint8(scenes.images_of([index])[0]),
                "scene_index": index}

    def __repr__(self) -> str:  # the protocol's cache key: which scenes, in which order
        digest = int(np.bitwise_xor.reduce(self.indices * 2654435761 % (2**31))) if len(self.indices) else 0
        return f"miniworld.SceneSource(n={len(self.indices)}, first={self.indices[:4].tolist()}, hash={digest})"


class ClassifierFeatures:
    """The attribute classifier's penultimate features: world-FID's feature space."""

    name = "miniworld_classifier"
    # KID's cubic kernel wants x.y/d of order 1 (as Inception's features give); these features have an
    # RMS of 9.8 on held-out scenes (x.y/d about 97), so KID reads them scaled by 0.1.
    kid_feature_scale = 0.1

    def __init__(self, params: Any, config: classifier.ClassifierConfig):
        self.params, self.config = params, config

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return classifier.features(self.params, to_float(images), self.config)


class AttributeScorer:
    """Per-image attribute hits and counts against the source scene (metrics.attribute_accuracy)."""

    name = "miniworld_attributes"

    def __init__(self, params: Any, config: classifier.ClassifierConfig):
        self.params, self.config = params, config

    def __call__(self, images: np.ndarray, records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        pred = classifier.predict_batched(self.params, to_float(images), config=self.config)
        truth = metrics.scene_labels(np.asarray([int(r["scene_index"]) for r in records], np.int64))
        return metrics.attribute_counts(pred, truth)


class CaptionSource:
    """A caption of the scene (full, short, ...) as the protocol's TextSource."""

    def __init__(self, name: str, caption_fn: Callable[[scenes.Scene], str]):
        self.name, self.key, self._fn = name, f"miniworld:{name}", caption_fn

    def texts(self, records: Sequence[dict]) -> list[str]:
        return [self._fn(scenes.scene_from_index(int(r["scene_index"]))) for r in records]


class EncoderTextSource:
    """Texts written by a De-Diffusion encoder (`view.texts(images)`) for the scenes' float images."""

    def __init__(self, view: Any, key: str, name: str = DE_DIFFUSION):
        self.view, self.name, self.key = view, name, key

    def texts(self, records: Sequence[dict]) -> list[str]:
        indices = np.asarray([int(r["scene_index"]) for r in records], np.int64)
        return list(self.view.texts(scenes.images_of(indices)))


class TextsOfScenes:
    """Texts already written for scene indices ({index: text}), e.g. by an encoder loaded elsewhere."""

    def __init__(self, name: str, texts: Mapping[int, str], key: str):
        self.name, self.key, self._texts = name, key, {int(k): str(v) for k, v in texts.items()}

    def texts(self, records: Sequence[dict]) -> list[str]:
        return [self._texts[int(r["scene_index"])] for r in records]


def caption_sources() -> list[CaptionSource]:
    return [CaptionSource(name, fn) for name, fn in CAPTION_SOURCES.items()]


def evaluate(decoder: Any, text_sources: Sequence[Any], indices: Sequence[int], workdir: str | Path, *,
             num_steps: int = 25, guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 128,
             mesh: Any = None, classifier_dir: str | Path | None = None, progress: bool = False,
             guidance_scales: Sequence[float] | None = None, generate_fn: Any = None,
             generator_key: str | None = None) -> dict[str, Any]:
    """Redraws `indices` from each text source and scores them; returns the protocol's results.

    Each row of results["sources"] has "fid" (world-FID) and "scores" (the attributes) per guidance.
    `rows_of(results)` gives {source: {world_fid, occupancy, ...}} at one guidance scale.
    `guidance_scales` sweeps several (default: `guidance_scale` alone); `generate_fn` and
    `generator_key` draw with another text-to-image tool than `decoder` (the protocol's
    `GenerateFn`, e.g. `third_party.diffusers_renderer`).
    """
    params, config = classifier.load_classifier(classifier_dir)
    indices = np.asarray(indices, np.int64)
    scales = [float(g) for g in (guidance_scales or [guidance_scale])]
    return reconstruction.run_protocol(
        SceneSource(indices), list(text_sources), decoder, scales, int(num_steps),
        ClassifierFeatures(params, config), workdir, shard_size=max(len(indices), 1), seed=seed,
        batch_size=batch_size, mesh=mesh, resolution=scenes.IMAGE_SIZE, extract_batch_size=256,
        scorer=AttributeScorer(params, config), progress=progress, generate_fn=generate_fn,
        generator_key=generator_key)


def rows_of(results: Mapping[str, Any], guidance: str | None = None) -> dict[str, dict[str, float]]:
    """{source name: {"world_fid", "world_kid", *ATTRIBUTES}} at `guidance` (default: the first scale);
    world-KID is the unbiased kernel distance of the same features (None where it could not be computed)."""
    g = guidance or results["guidance_scales"][0]
    return {row["name"]: {"world_fid": row["fid"][g], "world_kid": row.get("kid", {}).get(g), **row["scores"][g]}
            for row in results["sources"]}


def text_statistics(texts: Sequence[str], indices: Sequence[int]) -> dict[str, float]:
    """Mean attribute-word recall/precision of texts against each scene's ground truth."""
    per = [captions.word_recall_precision(t, scenes.scene_from_index(int(i))) for t, i in zip(texts, indices)]
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]} if per else {}


def markdown_table(results: Mapping[str, Any]) -> str:
    """Rows: text sources; columns: world-FID and world-KID x10^3 (lower is better), then attribute accuracies."""
    return report.scores_table(dict(results), fid_label="world-FID ↓", metrics=ATTRIBUTES, fid_digits=1,
                               kid_label="world-KID ×10³ ↓")


def scalar_key(source_name: str) -> str:
    """'full caption (upper ref.)' -> 'full_caption', 'De-Diffusion text' -> 'de_diffusion_text'."""
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"\(.*?\)", "", source_name).lower()).strip("_")


class ReconstructionEvaluator:
    """`miniworld.reconstruction`: the world's redrawing evaluation of the model being trained.

    Scalars `SOURCE/world_fid` and `SOURCE/ATTRIBUTE` (SOURCE: de_diffusion_text, short_caption, ...
    the caption sources only where `captions` is true, they do not change with training), the
    De-Diffusion texts' attribute-word recall, and the protocol's grid as an image. Each run writes
    its protocol workdir under WORKDIR/eval/NAME/step_N.
    """

    def __init__(self, *, name: str, every_steps: int, run_config: Any, num_scenes: int = 64,
                 ddim_steps: int = 12, guidance: float = 1.0, seed: int = 0, captions: bool = False,
                 batch_size: int = 128):
        self.name, self.every_steps = name, int(every_steps)
        self.indices = scenes.evaluation_indices(int(num_scenes))
        self.ddim_steps, self.guidance, self.seed = int(ddim_steps), float(guidance), int(seed)
        self.captions, self.batch_size = bool(captions), int(batch_size)
        self.last_results: dict[str, Any] | None = None

    def run(self, view: Any) -> evaluators.EvalResult:
        """`view`: .step, .workdir, .decoder (spec or loaded decoder the pipeline takes), .texts(images)."""
        workdir = Path(view.workdir) / "eval" / self.name / f"step_{int(view.step)}"
        sources = [EncoderTextSource(view, key=f"encoder@step{int(view.step)}")]
        if self.captions:
            sources += caption_sources()
        results = evaluate(view.decoder, sources, self.indices, workdir, num_steps=self.ddim_steps,
                           guidance_scale=self.guidance, seed=self.seed, batch_size=self.batch_size)
        self.last_results = results
        scalars = {}
        for name, row in rows_of(results).items():
            key = scalar_key(name)
            scalars.update({f"{key}/{k}": float(v) for k, v in row.items() if v is not None})
        texts = EncoderTextSource(view, key="").texts([{"scene_index": i} for i in self.indices])
        stats = text_statistics(texts, self.indices)
        scalars["text_recall"] = stats.get("recall", 0.0)
        scalars["distinct_texts"] = float(len(set(texts)))
        grid = np.asarray(_read_png(workdir / "grid.png"))
        return evaluators.EvalResult(scalars=scalars, images={"grid": grid})


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


evaluators.register_evaluator("miniworld.reconstruction", ReconstructionEvaluator)
