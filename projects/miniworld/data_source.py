"""The miniature world as a data source for the grain pipeline (no files: scenes are rendered).

`MiniWorldSource(split)` is a random-access source of a fixed length whose item i is a scene index drawn
from the world's GENERATIVE distribution restricted to `split` (1 or 2 objects with equal probability),
a pure function of (seed, i); the pipeline shuffles, shards and checkpoints it like any other source.
`MiniWorldViews` is its preprocess_fn: both views are the 16x16 image in [-1, 1] (the backbone sees the
same pixels as the decoder; no CLIP normalisation, the ViT is trained from scratch on this world).

Config spec (data.source): ``miniworld:SPLIT`` with SPLIT in {train, heldout, all}, registered by
`projects.miniworld.extensions` (list it in config.imports).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from projects.miniworld import scenes

DEFAULT_SIZE = 1 << 16  # draws per "epoch"; the pipeline repeats and reshuffles


class MiniWorldSource:
    """Item i -> {"image": [16,16,3] float32 in [-1,1], "id": scene key, "scene_index": int32}."""

    def __init__(self, split: str = "train", size: int = DEFAULT_SIZE, seed: int = 0):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"unknown miniworld split {split!r}; expected train, heldout or all")
        self.split, self.size, self.seed = split, int(size), int(seed)
        # Vectorised draw once: the whole index table is 0.5 MB at the default size.
        self._indices = scenes.sample_indices(np.random.default_rng([seed, 7]), self.size, split)

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
        return f"MiniWorldSource(split={self.split!r}, size={self.size}, seed={self.seed})"


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
