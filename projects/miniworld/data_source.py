"""The miniature world as a data source for the grain pipeline (no files: scenes are rendered).

`MiniWorldSource(split)` is a random-access source of a fixed length whose item i is a scene index drawn
from the world's GENERATIVE distribution restricted to `split` (1 or 2 objects with equal probability),
a pure function of (seed, i); the pipeline shuffles, shards and checkpoints it like any other source.
Two options make smaller image sets of the same world, the analogue of the paper's training-data
ablation (WebLI > ImageNet > COCO): `objects=1` (or 2) keeps only scenes with that many objects, and
`pool=N` draws every item from a FIXED set of N distinct scenes, the same for every run seed.
`MiniWorldViews` is its preprocess_fn: both views are the 16x16 image in [-1, 1] (the backbone sees the
same pixels as the decoder; no CLIP normalisation, the ViT is trained from scratch on this world).

Config spec (data.source): ``miniworld:SPLIT[:objects=K][:pool=N]`` with SPLIT in {train, heldout, all},
registered by `projects.miniworld.extensions` (list it in config.imports).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from projects.miniworld import scenes

DEFAULT_SIZE = 1 << 16  # draws per "epoch"; the pipeline repeats and reshuffles
OBJECT_COUNTS = (0, 1, 2)  # 0: scenes with any number of objects (1 or 2)
# The pool is drawn with this seed, not the run's: a pool is a data set, the same for every run seed.
POOL_SEED = 0


def generative_distribution(split: str, objects: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scene indices, probabilities): the generative distribution restricted to `split` and, unless
    `objects` is 0, to scenes with exactly that many objects (as `scenes._split_sampler`, renormalised)."""
    if objects not in OBJECT_COUNTS:
        raise ValueError(f"objects={objects!r}; expected 0 (any), 1 or 2")
    idx = scenes.split_indices(split)
    one = (idx % scenes._N_LAYOUTS) < scenes._N_ONE
    if objects:
        keep = one if objects == 1 else ~one
        idx, one = idx[keep], one[keep]
    p = np.where(one, 0.5 / scenes._N_ONE, 0.5 / scenes._N_TWO)
    return idx, p / p.sum()


def scene_pool(split: str, objects: int, pool: int) -> np.ndarray:
    """`pool` distinct scene indices (sorted) drawn once, without replacement, from the generative
    distribution of (split, objects) with POOL_SEED: the fixed, small image set of `pool=N`."""
    idx, p = generative_distribution(split, objects)
    if not 0 < pool <= len(idx):
        raise ValueError(f"pool={pool!r}; expected 1..{len(idx)} (the {split} scenes with objects={objects})")
    return np.sort(np.random.default_rng([POOL_SEED, 11]).choice(idx, size=pool, replace=False, p=p))


class MiniWorldSource:
    """Item i -> {"image": [16,16,3] float32 in [-1,1], "id": scene key, "scene_index": int32}.

    `objects` (0, 1 or 2): only scenes with that many objects (0: any). `pool` (0: off): every item is
    drawn uniformly from `scene_pool(split, objects, pool)`; the run seed changes the order only.
    """

    def __init__(self, split: str = "train", size: int = DEFAULT_SIZE, seed: int = 0, *,
                 objects: int = 0, pool: int = 0):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"unknown miniworld split {split!r}; expected train, heldout or all")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.objects, self.pool = int(objects), int(pool)
        rng = np.random.default_rng([seed, 7])
        # Vectorised draw once: the whole index table is 0.5 MB at the default size.
        if self.pool:
            chosen = scene_pool(split, self.objects, self.pool)
            self._indices = chosen[rng.integers(0, len(chosen), self.size)]
        elif self.objects:
            idx, p = generative_distribution(split, self.objects)
            self._indices = rng.choice(idx, size=self.size, p=p)
        else:  # as before the options existed: the same draws for the same seed
            self._indices = scenes.sample_indices(rng, self.size, split)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(self._indices[int(index)])
        return {
            "image": scenes.images_of([i])[0],
            "id": scenes.scene_from_index(i).key,
            "scene_index": np.int32(i),
        }

    def __repr__(self) -> str:
        # It names the data (e.g. the reconstruction evaluator's reference-stats cache key): the options
        # appear when set, so a default source keeps the name it had before they existed.
        options = "".join(f", {k}={v}" for k, v in (("objects", self.objects), ("pool", self.pool)) if v)
        return f"MiniWorldSource(split={self.split!r}, size={self.size}, seed={self.seed}{options})"


class MiniWorldViews:
    """preprocess_fn for MiniWorldSource: backbone view == decoder view == the image (optionally
    resized by pixel repetition to `backbone_size`, a multiple of 16)."""

    def __init__(self, backbone_size: int = scenes.IMAGE_SIZE):
        if backbone_size % scenes.IMAGE_SIZE:
            raise ValueError(f"backbone_size {backbone_size} must be a multiple of {scenes.IMAGE_SIZE}")
        self.repeat = backbone_size // scenes.IMAGE_SIZE

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict:
        image = np.asarray(record["image"], np.float32)
        backbone = image
        if self.repeat > 1:
            backbone = image.repeat(self.repeat, axis=0).repeat(self.repeat, axis=1)
        return {"backbone": backbone, "decoder": image, "id": str(record["id"]),
                "scene_index": np.int32(record["scene_index"])}
