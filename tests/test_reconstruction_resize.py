"""The protocol's resize, pinned to PIL: generated images are `Image.resize((R, R), BICUBIC)`
exactly; source images are their centre square resized by the same bicubic filter (one PIL call
with a box, which differs from crop-then-resize only on the cut edges' outermost output pixels)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dediffusion_jax.evaluation import reconstruction as rc


def png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def test_generated_images_are_pil_bicubic_resized_exactly():
    rng = np.random.default_rng(0)
    for size, r in ((512, 256), (64, 16), (20, 48)):  # SD2-base's 512 -> the paper's 256; upscale
        x = rng.integers(0, 256, (2, size, size, 3), np.uint8)
        want = np.stack([np.asarray(Image.fromarray(im).resize((r, r), Image.Resampling.BICUBIC))
                         for im in x])
        got = rc.resize_images(x, r)
        assert got.dtype == np.uint8 and got.shape == (2, r, r, 3)
        np.testing.assert_array_equal(got, want)
    same = rng.integers(0, 256, (1, 16, 16, 3), np.uint8)
    np.testing.assert_array_equal(rc.resize_images(same, 16), same)  # already R x R: untouched


def test_source_images_are_centre_cropped_then_bicubic_resized():
    rng = np.random.default_rng(1)
    r = 16
    for h, w in ((40, 60), (60, 40)):  # landscape and portrait, a 10-pixel margin each side
        x = rng.integers(0, 256, (h, w, 3), np.uint8)
        side, top, left = min(h, w), (h - min(h, w)) // 2, (w - min(h, w)) // 2
        got = rc.reference_image(png(x), r)
        im = Image.fromarray(x)
        box = (left, top, left + side, top + side)
        # exactly PIL's bicubic resize of the centre square
        np.testing.assert_array_equal(
            got, np.asarray(im.resize((r, r), Image.Resampling.BICUBIC, box=box)))
        # = crop, then resize, on every output pixel whose filter taps stay inside the square:
        # the taps reach 2 * side / r = 5 pixels, so only the 2 outermost output columns (rows) on
        # the cut sides differ; the uncut sides are image edges in both and agree everywhere
        cropped = np.asarray(im.crop(box).resize((r, r), Image.Resampling.BICUBIC))
        differ = np.any(got != cropped, axis=-1)
        inner = differ[:, 2:-2] if w > h else differ[2:-2, :]
        assert not inner.any() and differ.any()
        # a generated image of the same shape gets the same centre square
        np.testing.assert_array_equal(rc.resize_images(x[None], r)[0], got)
