"""What the miniature world adds to the core, registered on import (config.imports names this module).

- data source `miniworld:SPLIT[:objects=K][:pool=N]` (SPLIT in train, heldout, all; K in 1, 2: only
  scenes with K objects; N: a fixed pool of N distinct scenes, data_source.py): scenes rendered on the fly;
- evaluator type `miniworld.reconstruction` (projects/miniworld/evaluator.py): redraws held-out scenes
  from the encoder's texts and scores them (world-FID, attributes).
"""

from __future__ import annotations

from typing import Any

from dediffusion_jax.data import sources
from projects.miniworld import data_source, evaluator  # noqa: F401 - evaluator registers itself

SPLITS = ("train", "heldout", "all")
OPTIONS = ("objects", "pool")  # the keyword options of MiniWorldSource a spec may set


def parse_spec(rest: str) -> tuple[str, dict[str, int]]:
    """'train:objects=1:pool=64' (what follows `miniworld:`) -> ('train', {'objects': 1, 'pool': 64}).

    A bad split, key or value is one SourceSpecError (a ValueError) naming what is allowed, before
    any scene is drawn.
    """
    split, *parts = (rest or "train").split(":")
    if split not in SPLITS:
        raise sources.SourceSpecError(f"miniworld:{rest}: unknown split {split!r}; expected {', '.join(SPLITS)}")
    options: dict[str, int] = {}
    allowed = "objects=0|1|2 (0: any), pool=N (N >= 0; 0: the whole split)"
    for part in parts:
        key, eq, raw = part.partition("=")
        if key not in OPTIONS or not eq or key in options:
            raise sources.SourceSpecError(f"miniworld:{rest}: bad option {part!r}; allowed, once each: {allowed}")
        value = int(raw) if raw.isdecimal() else -1
        if value < 0 or (key == "objects" and value not in data_source.OBJECT_COUNTS):
            raise sources.SourceSpecError(f"miniworld:{rest}: bad value {part!r}; allowed: {allowed}")
        options[key] = value
    return split, options


def _miniworld(rest: str, config: Any) -> sources.BuiltSource:
    split, options = parse_spec(rest)
    seed = int(config.seed) if config is not None else 0
    size = int(config.backbone.image_size) if config is not None else data_source.scenes.IMAGE_SIZE
    try:
        source = data_source.MiniWorldSource(split, seed=seed, **options)
    except ValueError as e:  # e.g. a pool larger than the split: the spec's fault
        raise sources.SourceSpecError(f"miniworld:{rest}: {e}") from None
    return sources.BuiltSource(source, data_source.MiniWorldViews(size))


sources.register_source("miniworld", _miniworld)
