"""What the miniature world adds to the core, registered on import (config.imports names this module).

- data source `miniworld:SPLIT` (SPLIT in train, heldout, all): scenes rendered on the fly;
- evaluator type `miniworld.reconstruction` (projects/miniworld/evaluator.py): redraws held-out scenes
  from the encoder's texts and scores them (world-FID, attributes).
"""

from __future__ import annotations

from typing import Any

from dediffusion_jax.data import sources
from projects.miniworld import data_source, evaluator  # noqa: F401 - evaluator registers itself


def _miniworld(rest: str, config: Any) -> sources.BuiltSource:
    seed = int(config.seed) if config is not None else 0
    size = int(config.backbone.image_size) if config is not None else data_source.scenes.IMAGE_SIZE
    return sources.BuiltSource(data_source.MiniWorldSource(rest or "train", seed=seed),
                               data_source.MiniWorldViews(size))


sources.register_source("miniworld", _miniworld)
