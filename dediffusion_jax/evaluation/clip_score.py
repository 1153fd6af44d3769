"""CLIP score of generated images against the texts they were drawn from (optional protocol metric).

Why: FID says whether the reconstructions are distributed like the originals, not whether each image
shows what its text says; the CLIP score (Hessel et al. 2021; torchmetrics' `CLIPScore`, MLPerf's
text-to-image benchmark) measures that per image:

    CLIP score = 100 * mean_i max(cos(E_image(x_i), E_text(t_i)), 0)

with E the projected CLIP embeddings. (torchmetrics clamps the mean instead of each term; the two
agree whenever no cosine is negative, as with real CLIP models on real pairs.)

The model is a local transformers `CLIPModel` folder (config.json + model.safetensors, never
downloaded), run by transformers' PyTorch CLIP on CUDA when torch sees a GPU, else on the CPU.
Images are preprocessed as the folder's `preprocessor_config.json` says, the way transformers'
`CLIPImageProcessor` does it (PIL resize of the short side, centre crop, rescale, normalise);
texts are tokenised by the folder's tokenizer (or `tokenizer=`, another folder) and truncated to
the text tower's context (77 tokens for real CLIP, as Stable Diffusion's own tokenizer truncates).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dediffusion_jax.errors import UserError

WEIGHTS = "model.safetensors"
PREPROCESSOR = "preprocessor_config.json"


class ClipFolderError(UserError, ValueError):
    """The CLIP folder (or its tokenizer) is missing a file or cannot be read."""


def clip_score(cosines: Any) -> float:
    """100 * mean(max(cos, 0)) over per-image cosines; NaN for none."""
    cos = np.asarray(cosines, np.float64).reshape(-1)
    return float(100.0 * np.maximum(cos, 0.0).mean()) if cos.size else float("nan")


def weights_identity(folder: str | os.PathLike) -> str:
    """'clip:' + a hash of the folder's weights file: results record which CLIP scored them."""
    digest = hashlib.sha256()
    with open(Path(folder) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return f"clip:{digest.hexdigest()[:16]}"


def _size(value: Any, what: str) -> tuple[int, int] | int:
    """transformers' size dicts -> (height, width), or the int of {'shortest_edge': n}."""
    if isinstance(value, int):
        return value if what == "size" else (value, value)
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    if "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ClipFolderError(f"{PREPROCESSOR}: unsupported {what} {value!r}")


def preprocess(images: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, S, S] as CLIPImageProcessor with `config` makes them."""
    resample = Image.Resampling(int(config.get("resample", Image.Resampling.BICUBIC)))
    size = _size(config.get("size", {"shortest_edge": 224}), "size")
    crop = _size(config.get("crop_size", 224), "crop_size")
    mean = np.asarray(config.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), np.float32)
    std = np.asarray(config.get("image_std", [0.26862954, 0.26130258, 0.27577711]), np.float32)
    out = []
    for x in np.asarray(images, np.uint8):
        im = Image.fromarray(x).convert("RGB")
        if config.get("do_resize", True):
            w, h = im.size
            if isinstance(size, int):  # short side -> size, long side scaled (floor), as transformers
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = size, int(size * long / short)
                im = im.resize((new_short, new_long) if w <= h else (new_long, new_short), resample)
            else:
                im = im.resize((size[1], size[0]), resample)
        arr = np.asarray(im, np.float32)
        if config.get("do_center_crop", True):
            ch, cw = crop
            top, left = (arr.shape[0] - ch) // 2, (arr.shape[1] - cw) // 2
            arr = arr[max(top, 0):max(top, 0) + ch, max(left, 0):max(left, 0) + cw]
        if config.get("do_rescale", True):
            arr = arr * np.float32(config.get("rescale_factor", 1 / 255))
        if config.get("do_normalize", True):
            arr = (arr - mean) / std
        out.append(arr.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


class ClipScorer:
    """Per-image cosines between CLIP image and text embeddings, batched (see the module doc)."""

    def __init__(self, folder: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *,
                 batch_size: int = 64, device: str | None = None):
        folder = Path(folder).expanduser()
        tok_folder = Path(tokenizer).expanduser() if tokenizer is not None else folder
        for path in (folder / "config.json", folder / WEIGHTS, folder / PREPROCESSOR):
            if not path.is_file():
                raise ClipFolderError(f"--clip {folder}: missing {path.name} (a transformers "
                                      "CLIPModel folder with safetensors weights is needed)")
        if not ((tok_folder / "vocab.json").is_file() or (tok_folder / "tokenizer.json").is_file()):
            raise ClipFolderError(f"no CLIP tokenizer in {tok_folder} (vocab.json or tokenizer.json);"
                                  " give its folder with --clip-tokenizer")
        import torch
        from transformers import AutoTokenizer, CLIPModel

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = CLIPModel.from_pretrained(folder, use_safetensors=True,
                                                   local_files_only=True).eval().to(self.device)
            self.tokenizer = AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ClipFolderError(f"cannot load CLIP from {folder}: {e}") from e
        self.preprocessor = json.loads((folder / PREPROCESSOR).read_text())
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.batch_size = int(batch_size)
        self.name = weights_identity(folder)
        self._torch = torch

    def image_embeddings(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> unit-norm projected image embeddings [B, D] (float64)."""
        torch, out = self._torch, []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.from_numpy(preprocess(images[i:i + self.batch_size], self.preprocessor))
            with torch.inference_mode():
                pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
                out.append(self.model.visual_projection(pooled).float().cpu().numpy())
        return _unit(out)

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> unit-norm projected text embeddings [B, D] (float64), truncated to the context."""
        torch, out = self._torch, []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                pooled = self.model.text_model(
                    input_ids=enc["input_ids"].to(self.device),
                    attention_mask=enc["attention_mask"].to(self.device)).pooler_output
                out.append(self.model.text_projection(pooled).float().cpu().numpy())
        return _unit(out)

    def cosines(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """cos(image_i, text_i) for each pair: [B] float64."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if len(texts) == 0:
            return np.zeros((0,), np.float64)
        return np.sum(self.image_embeddings(images) * self.text_embeddings(texts), axis=-1)


def _unit(chunks: list[np.ndarray]) -> np.ndarray:
    x = np.concatenate(chunks).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
