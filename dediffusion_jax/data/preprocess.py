"""Image decoding and the two views De-Diffusion trains on.

One image gives two views with the SAME geometry (same crop box, same flip):
- the backbone view: what the trainable image encoder sees, at its own resolution, normalised the way
  the backbone was pre-trained (CLIP mean/std by default);
- the decoder view: the reconstruction target of the frozen text-to-image decoder, at the decoder's
  resolution, in [-1, 1].
Sharing the geometry matters: the text must describe exactly the pixels the decoder is asked to redraw.

Images come from the internet (LAION, COCO, user folders), so decoding is treated as untrusted: every
decoding failure becomes a `CorruptExampleError` (the pipeline skips and counts those), odd modes are
converted to RGB, and absurd sizes are refused before any pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from dediffusion_jax.errors import UserError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# PIL's own default bomb threshold (~89 Mpx, a 1024x1024x3 RGBA bomb is far below it).
DEFAULT_MAX_PIXELS = 89_478_485


class CorruptExampleError(UserError, ValueError):
    """An example that cannot be used (undecodable, truncated, absurd size): skip it, don't crash."""


ImageInput = bytes | bytearray | memoryview | str | os.PathLike | np.ndarray | Image.Image


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited over white (logos, PNG icons)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # 16/32-bit grayscale: PIL's convert('RGB') clips at 255 instead of rescaling.
        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 1.0 if (im.mode == "F" and hi <= 1.0) else (65535.0 if hi > 255 else 255.0)
        arr8 = np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _too_large(size: str, max_pixels: int) -> CorruptExampleError:
    return CorruptExampleError(f"image of {size} pixels exceeds max_pixels={max_pixels} "
                               "(decompression-bomb protection)")


def decode_image(data: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int | None = None) -> Image.Image:
    """Decodes encoded bytes / a file path / an HWC array / a PIL image into an RGB PIL image.

    Raises CorruptExampleError for anything unusable; the size check runs on the header, before the
    pixels are decompressed, so a decompression bomb costs nothing. (PIL's own check refuses claims
    over 2 x Image.MAX_IMAGE_PIXELS already in Image.open; that is reported with the same message.)
    `min_side` lets JPEG decode at a reduced scale (PIL draft: DCT scaling by 1/2, 1/4, 1/8) that
    keeps both sides >= min_side: a 4000x3000 photo headed for 256x256 decodes several times faster.

    Any error while PIL opens or decodes the file is the file's (PIL raises a zoo of types:
    OSError, SyntaxError, ValueError, EOFError, struct.error, ...) and becomes CorruptExampleError
    with the cause chained; an error in our own conversion code afterwards is a bug and propagates.
    """
    im = _open(data, max_pixels, min_side)
    try:
        im = ImageOps.exif_transpose(im)  # phone photos: honour the orientation tag
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the image
        pass
    try:
        return _to_rgb(im)
    except (OSError, ValueError) as e:  # a mode PIL cannot convert
        raise CorruptExampleError(f"cannot convert image mode {im.mode!r} to RGB: "
                                  f"{type(e).__name__}: {e}") from e


def _open(data: ImageInput, max_pixels: int, min_side: int | None) -> Image.Image:
    """The decoded PIL image (pixels loaded), or CorruptExampleError."""
    try:
        if isinstance(data, Image.Image):
            im = data
        elif isinstance(data, np.ndarray):
            arr = data
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
                raise CorruptExampleError(f"array image of shape {arr.shape} is not HW, HWC(3|4)")
            if arr.dtype != np.uint8:
                raise CorruptExampleError(f"array image must be uint8, got {arr.dtype}")
            im = Image.fromarray(arr)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) == 0:
                raise CorruptExampleError("empty image bytes")
            im = Image.open(io.BytesIO(bytes(data)))
        elif isinstance(data, (str, os.PathLike)):
            im = Image.open(Path(data))
        else:
            raise CorruptExampleError(f"cannot decode an image from {type(data).__name__}")
        width, height = im.size
        if width <= 0 or height <= 0:
            raise CorruptExampleError(f"image has size {width}x{height}")
        if width * height > max_pixels:  # the header's claim, before any pixel is decompressed
            raise _too_large(f"{width}x{height}", max_pixels)
        if min_side and im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))
        im.load()  # decodes now: a truncated file fails here, not later in resize
        return im
    except CorruptExampleError:
        raise
    except Image.DecompressionBombError as e:  # PIL's check in Image.open (claims over 2x its limit)
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(claimed.group(1) if claimed else "too many", max_pixels) from e
    except Exception as e:  # noqa: BLE001 - PIL raises a zoo of error types for broken files
        raise CorruptExampleError(f"undecodable image: {type(e).__name__}: {e}") from e


def _center_square(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _random_resized_box(width: int, height: int, rng: np.random.Generator,
                        scale: tuple[float, float], ratio: tuple[float, float]
                        ) -> tuple[float, float, float, float]:
    """Inception-style random crop box (as torchvision's RandomResizedCrop); center square fallback."""
    area = width * height
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w = np.sqrt(target_area * aspect)
        h = np.sqrt(target_area / aspect)
        if 0 < w <= width and 0 < h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    return _center_square(width, height)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What the two views look like. Defaults: CLIP-normalised 224 backbone view, 256 decoder view."""

    backbone_size: int = 224
    backbone_mean: tuple[float, float, float] = CLIP_MEAN
    backbone_std: tuple[float, float, float] = CLIP_STD
    decoder_size: int = 256
    augment: bool = False             # random resized crop (+ flip) shared by both views
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True                 # horizontal flip with p=0.5, only when augment=True
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_draft: bool = True           # reduced-scale JPEG decoding, never below the needed size
    image_key: str = "image"

    def min_decode_side(self) -> int:
        """Smallest image side that still gives full-resolution views (crops included)."""
        side = max(self.backbone_size, self.decoder_size)
        if self.augment:  # a crop of area fraction s has sides ~sqrt(s) of the image's
            side = int(np.ceil(side / np.sqrt(max(self.crop_scale[0], 1e-3))))
        return side

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """From an ml_collections ConfigDict / dict; unknown keys are an error (typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown preprocess keys {sorted(unknown)}; known: {sorted(names)}")
        kw = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}
        return cls(**kw)


def two_views(im: Image.Image, config: PreprocessConfig,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(backbone view [S,S,3], decoder view [D,D,3]) float32 from one RGB image, same crop for both.

    Without augmentation the crop is the center square (= resize shorter side + center crop).
    """
    width, height = im.size
    if config.augment:
        if rng is None:
            raise ValueError("augment=True needs a per-example rng (the pipeline passes one)")
        box = _random_resized_box(width, height, rng, config.crop_scale, config.crop_ratio)
        flip = config.flip and bool(rng.random() < 0.5)
    else:
        box, flip = _center_square(width, height), False

    def view(size: int) -> np.ndarray:
        out = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.float32)

    mean = np.asarray(config.backbone_mean, np.float32) * 255.0
    std = np.asarray(config.backbone_std, np.float32) * 255.0
    backbone = (view(config.backbone_size) - mean) / std
    decoder = view(config.decoder_size) / 127.5 - 1.0
    return backbone.astype(np.float32), decoder.astype(np.float32)


def join_captions(captions: Sequence[str | bytes]) -> str:
    """Captions as one newline-joined string: a fixed structure that batches (COCO has 5-7 each)."""
    out = []
    for c in captions:
        c = c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
        out.append(" ".join(c.split()))  # no newlines inside a caption
    return "\n".join(out)


def split_captions(joined: str | bytes) -> list[str]:
    """Inverse of join_captions."""
    if isinstance(joined, bytes):
        joined = joined.decode("utf-8")
    return [c for c in str(joined).split("\n") if c]


class Preprocessor:
    """The default `preprocess_fn`: record dict -> {'backbone', 'decoder', 'id'[, 'captions', 'label']}.

    Called as `fn(record, rng)` by the pipeline; `rng` is seeded per example, so augmentation is
    reproducible and a resumed run augments exactly as the uninterrupted one would have.
    """

    def __init__(self, config: PreprocessConfig | None = None):
        self.config = config or PreprocessConfig()

    def __call__(self, record: Mapping[str, Any],
                 rng: np.random.Generator | None = None) -> dict[str, Any]:
        key = self.config.image_key
        if key not in record:
            raise CorruptExampleError(f"record has no {key!r} field (keys: {sorted(record)})")
        im = decode_image(record[key], max_pixels=self.config.max_pixels,
                          min_side=self.config.min_decode_side() if self.config.jpeg_draft else None)
        backbone, decoder = two_views(im, self.config, rng)
        out: dict[str, Any] = {"backbone": backbone, "decoder": decoder,
                               "id": str(record.get("id", ""))}
        if "captions" in record:
            out["captions"] = join_captions(record["captions"])
        if "label" in record:
            out["label"] = np.int32(record["label"])
        return out
