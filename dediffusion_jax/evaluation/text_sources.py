"""Where the reconstruction protocol's texts come from: captions, other captioners, De-Diffusion.

A text source turns a batch of source records ({'id', 'image' bytes, 'captions'?}, as
`data.sources` gives them) into one text per record. `key` identifies what the texts depend on; a
resumed evaluation refuses to mix shards of a source whose key changed.

Caption baselines follow the paper's three (COCO has 5-7 human captions per image):
- longest: the caption with the most characters (whitespace-normalised; the first one on ties);
- random: one caption drawn per image from a generator seeded by (seed, image id), so the choice
  does not depend on batching, sharding, order or resumption;
- concat: all captions, whitespace-normalised, joined with a space in their stored order (a caption
  without final punctuation gets a period, so sentences stay apart).
The paper does not say how "longest" is measured or how the concatenation is joined; these choices
are ours. A long concatenation is truncated by the text-to-image model's tokenizer (77 tokens for
Stable Diffusion), as it is in any reproduction of that baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

CAPTION_MODES = ("longest", "random", "concat")
CAPTION_NAMES = {
    "longest": "COCO longest caption",
    "random": "COCO random caption",
    "concat": "COCO concatenated",
}


@runtime_checkable
class TextSource(Protocol):
    """`texts(records) -> one str per record`; `name` labels the table row, `key` the content."""

    name: str
    key: str

    def texts(self, records: Sequence[dict[str, Any]]) -> list[str]: ...


def _normalise(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(str(text).split())


def _captions_of(record: dict[str, Any]) -> list[str]:
    caps = [c for c in (_normalise(c) for c in record.get("captions") or []) if c]
    if not caps:
        raise ValueError(f"image {record.get('id')!r} has no captions; caption text sources need "
                         "a captioned dataset (e.g. tfds coco_captions)")
    return caps


def longest_caption(captions: Sequence[str]) -> str:
    """The caption with the most characters (first on ties)."""
    caps = [_normalise(c) for c in captions]
    return max(caps, key=len)  # max keeps the first maximal element


def random_caption(captions: Sequence[str], image_id: str, seed: int = 0) -> str:
    """One caption chosen by a generator seeded by (seed, image id): reproducible per image."""
    digest = hashlib.sha256(f"{seed}\x00{image_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    caps = [_normalise(c) for c in captions]
    return caps[int(rng.integers(len(caps)))]


def concat_captions(captions: Sequence[str]) -> str:
    """All captions in stored order, each ending in punctuation, joined with a space."""
    parts = []
    for c in captions:
        c = _normalise(c)
        if c and c[-1] not in ".!?":
            c += "."
        if c:
            parts.append(c)
    return " ".join(parts)


def select_caption(captions: Sequence[str], mode: str, image_id: str = "", seed: int = 0) -> str:
    if mode == "longest":
        return longest_caption(captions)
    if mode == "random":
        return random_caption(captions, image_id, seed)
    if mode == "concat":
        return concat_captions(captions)
    raise ValueError(f"unknown caption mode {mode!r}; choose from {CAPTION_MODES}")


class CaptionTexts:
    """The dataset's own captions (longest / random / concat)."""

    def __init__(self, mode: str, seed: int = 0, name: str | None = None):
        if mode not in CAPTION_MODES:
            raise ValueError(f"unknown caption mode {mode!r}; choose from {CAPTION_MODES}")
        self.mode, self.seed = mode, int(seed)
        self.name = name or CAPTION_NAMES[mode]
        self.key = f"captions:{mode}" + (f":seed={seed}" if mode == "random" else "")

    def texts(self, records: Sequence[dict[str, Any]]) -> list[str]:
        return [select_caption(_captions_of(r), self.mode, str(r.get("id", "")), self.seed)
                for r in records]


class JsonlTexts:
    """Texts from any other captioner: a JSONL file of {"id": ..., "text": ...} lines.

    Ids must match the image source's ids (`python -m dediffusion_jax.encode` writes such files).
    An image without a line is an error, not a silent empty prompt.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = Path(path).expanduser()
        self.name = name or self.path.stem
        self.by_id: dict[str, str] = {}
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.by_id[str(row["id"])] = str(row["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.path}:{n}: expected a JSON object with 'id' and "
                                     f"'text' ({e})") from e
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self.key = f"jsonl:{digest}"

    def texts(self, records: Sequence[dict[str, Any]]) -> list[str]:
        missing = [str(r.get("id")) for r in records if str(r.get("id")) not in self.by_id]
        if missing:
            raise KeyError(f"{self.path} has no text for image ids {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing)")
        return [self.by_id[str(r["id"])] for r in records]


class DeDiffusionTexts:
    """De-Diffusion text of each image: a trained encoder's argmax tokens, detokenized.

    `encoder` is an `inference.TextEncoder`; `key` should name the checkpoint (default: the
    encoder's key, its path and step or weights hash) so a resumed run never mixes two checkpoints'
    shards.
    """

    def __init__(self, encoder: Any, *, name: str = "De-Diffusion", key: str | None = None):
        self.name = name
        self.key = key or encoder.key
        self.encoder = encoder
        self.last_token_ids: np.ndarray | None = None

    def texts(self, records: Sequence[dict[str, Any]]) -> list[str]:
        from dediffusion_jax import encode

        if not records:
            return []
        views = np.stack([encode.backbone_view(r, self.encoder.preprocess) for r in records])
        self.last_token_ids = self.encoder.token_ids(views)
        return self.encoder.texts_of_ids(self.last_token_ids)


def from_checkpoint(path: str | os.PathLike, *, name: str = "De-Diffusion", batch_size: int = 32,
                    mesh: Any = None, decoder: Any = None) -> DeDiffusionTexts:
    """A De-Diffusion text source from a training workdir, WORKDIR/checkpoints/STEP or an exported
    encoder folder (`decoder` overrides the recorded decoder folder)."""
    from dediffusion_jax.inference import TextEncoder, is_exported

    encoder = TextEncoder.load(path, decoder, batch_size=batch_size, mesh=mesh)
    key = encoder.key if is_exported(path) else checkpoint_key(path)
    return DeDiffusionTexts(encoder, name=name, key=key)


def checkpoint_key(path: str | os.PathLike) -> str:
    """'dediffusion:<resolved path>:step=<step>': a workdir's latest step is resolved now, so a
    resumed evaluation notices when training has written a newer checkpoint since."""
    p = Path(path).expanduser().resolve()
    step = p.name if p.parent.name == "checkpoints" else None
    if (p / "checkpoints").is_dir():
        steps = [int(c.name) for c in (p / "checkpoints").iterdir() if c.name.isdigit()]
        step = str(max(steps)) if steps else None
    return f"dediffusion:{p}:step={step}"
