"""A corpus of awkward image files (issue 17): valid-but-odd images every reader must use, and broken
files every reader must name and skip. `build(folder) -> (valid relative paths, bad relative paths)`."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (CRC fixed) claims width x height: a decompression bomb, cheaply."""
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def build(folder: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8))
    jpeg = _encode(rgb, "JPEG")
    valid = {
        "rgb.png": _encode(rgb, "PNG"),
        "photo.jpg": jpeg,
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "grey16.png": _encode(Image.fromarray(rng.integers(0, 65535, (20, 20), np.uint16)), "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "wide.png": _encode(Image.new("RGB", (2000, 3), (10, 200, 30)), "PNG"),   # extreme aspect
        "tall.webp": _encode(Image.new("RGB", (3, 900), (200, 10, 30)), "WEBP"),
        "large.jpg": _encode(Image.new("RGB", (3000, 2000), (90, 90, 90)), "JPEG"),  # 6 Mpx: used
        "nested/deeper/inner.png": _encode(rgb.rotate(90), "PNG"),
    }
    bad = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
        "text.png": b"this is a text file, not an image\n",
        "random.jpg": rng.integers(0, 256, 4096, np.uint8).tobytes(),
        "bomb.png": png_claiming(100_000, 100_000),
        "nested/broken.webp": b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    }
    for name, data in {**valid, **bad}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    os.symlink("..", folder / "nested" / "loop")  # a symlink loop: listed once, not forever
    valid_names, bad_names = sorted(valid), sorted(bad)
    locked = folder / "unreadable.png"
    locked.write_bytes(valid["rgb.png"])
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: then it is a valid image
        valid_names.append("unreadable.png")
    else:
        bad_names.append("unreadable.png")
    return sorted(valid_names), sorted(bad_names)
