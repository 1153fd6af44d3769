"""Decoding untrusted images and making the two views (backbone / decoder) of one image."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dediffusion_jax.data.preprocess import (CLIP_MEAN, CLIP_STD, CorruptExampleError,
                                             PreprocessConfig, Preprocessor, decode_image,
                                             join_captions, split_captions, two_views)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (with a correct CRC) claims width x height: a cheap 'bomb'."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = 8 + 4  # signature, chunk length
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 4 + 13])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "1", "YCbCr"])
def test_odd_modes_become_rgb(mode):
    im = Image.new("RGB", (5, 4), (200, 100, 50)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I") else "PNG"
    if mode == "YCbCr":
        fmt = "JPEG"
    out = decode_image(encode(im, fmt))
    assert out.mode == "RGB" and out.size == (5, 4)


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    arr = np.full((3, 3), 32768, np.uint16)  # mid-grey in 16 bits
    out = np.asarray(decode_image(encode(Image.fromarray(arr))))
    assert abs(int(out[0, 0, 0]) - 128) <= 1


def test_transparency_is_composited_over_white():
    im = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(decode_image(encode(im)))[0, 0].tolist() == [255, 255, 255]


def test_corrupt_inputs_raise_corrupt_example_error_naming_the_decoder_error():
    jpeg = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    cases = {b"": "empty image bytes",
             b"not an image at all": "undecodable image: UnidentifiedImageError",
             jpeg[: len(jpeg) // 2]: "undecodable image: OSError: Truncated File Read",
             bytes(range(256)) * 4: "undecodable image: UnidentifiedImageError"}
    for bad, message in cases.items():
        with pytest.raises(CorruptExampleError) as info:
            decode_image(bad)
        assert str(info.value).startswith(message), str(info.value)


def test_pil_errors_become_corrupt_example_error_but_our_own_bugs_do_not(monkeypatch):
    """Only what PIL raises while opening/decoding counts as a broken file (its error chained);
    a bug in the conversion code after it propagates instead of being skipped as 'corrupt'."""
    from dediffusion_jax.data import preprocess

    def broken_pil_load(self):
        raise SyntaxError("broken PNG chunk")  # one of PIL's odd error types

    good = encode(Image.new("RGB", (4, 4)))
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "load", broken_pil_load)
        with pytest.raises(CorruptExampleError, match="undecodable image: SyntaxError: broken PNG chunk") as info:
            decode_image(good)
        assert isinstance(info.value.__cause__, SyntaxError)

    def buggy_to_rgb(im):
        return im.size[2]  # an IndexError: a bug of ours, not the file's

    monkeypatch.setattr(preprocess, "_to_rgb", buggy_to_rgb)
    with pytest.raises(IndexError):
        decode_image(encode(Image.new("L", (4, 4))))


def test_decompression_bomb_is_refused_by_our_size_check_before_decoding(monkeypatch):
    """A 1x1 PNG claiming 10000x10000 (100 Mpx, above max_pixels but below PIL's own 2x limit, so
    PIL only warns): OUR header check refuses it, and no pixel is decoded (load is never called)."""
    import warnings

    bomb = png_with_claimed_size(10_000, 10_000)
    loads = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or original_load(self))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(CorruptExampleError) as info:
            decode_image(bomb)
        assert str(info.value) == ("image of 10000x10000 pixels exceeds max_pixels=89478485 "
                                   "(decompression-bomb protection)")
        assert loads == []
        # The guard is what caught it: with a higher max_pixels the same file gets past the size
        # check to PIL's decoder, which fails on the missing pixel data.
        with pytest.raises(CorruptExampleError, match="undecodable image"):
            decode_image(bomb, max_pixels=200_000_000)
        assert loads == [(10_000, 10_000)]
    # Claims over PIL's own limit (refused inside Image.open) read the same way.
    with pytest.raises(CorruptExampleError, match=r"image of 10000000000 pixels exceeds max_pixels"):
        decode_image(png_with_claimed_size(100_000, 100_000))
    with pytest.raises(CorruptExampleError, match="image of 50x50 pixels exceeds max_pixels=1000"):
        decode_image(encode(Image.new("RGB", (50, 50))), max_pixels=1000)


def test_two_views_shapes_ranges_and_normalisation():
    im = Image.new("RGB", (40, 30), (255, 255, 255))
    cfg = PreprocessConfig(backbone_size=16, decoder_size=12)
    backbone, decoder = two_views(im, cfg)
    assert backbone.shape == (16, 16, 3) and backbone.dtype == np.float32
    assert decoder.shape == (12, 12, 3) and decoder.dtype == np.float32
    np.testing.assert_allclose(decoder, 1.0, atol=1e-6)
    expected = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(backbone[3, 5], expected, rtol=1e-5)
    black = two_views(Image.new("RGB", (9, 9)), cfg)[1]
    np.testing.assert_allclose(black, -1.0, atol=1e-6)


def test_center_crop_keeps_the_middle_square():
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:20] = (0, 255, 0)   # the center 10x10 square is green
    arr[:, 20:] = (0, 0, 255)
    _, decoder = two_views(Image.fromarray(arr), PreprocessConfig(backbone_size=4, decoder_size=8))
    np.testing.assert_allclose(decoder[2:-2, 2:-2], np.broadcast_to([-1, 1, -1], (4, 4, 3)),
                               atol=0.05)


def test_augmentation_is_seeded_and_shared_by_both_views():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, 16:] = 255  # right half white
    im = Image.fromarray(arr)
    cfg = PreprocessConfig(backbone_size=16, decoder_size=16, augment=True,
                           backbone_mean=(0.5,) * 3, backbone_std=(0.5,) * 3)
    views = [two_views(im, cfg, np.random.default_rng(s)) for s in range(8)]
    again = two_views(im, cfg, np.random.default_rng(3))
    np.testing.assert_array_equal(views[3][0], again[0])
    # With mean=std=0.5 both views are in [-1, 1]: same crop and flip -> the same pixels.
    for backbone, decoder in views:
        np.testing.assert_allclose(backbone, decoder, atol=1e-5)
    right_brighter = {bool(d[:, 12:].mean() > d[:, :4].mean()) for _, d in views}
    assert right_brighter == {True, False}  # some seeds flip, some don't


def test_preprocessor_keeps_id_captions_label():
    rec = {"id": "x/1", "image": encode(Image.new("RGB", (8, 8))),
           "captions": ["a cat\non a mat", b"a dog"], "label": 2}
    out = Preprocessor(PreprocessConfig(backbone_size=4, decoder_size=4))(rec, None)
    assert out["id"] == "x/1" and out["label"] == 2
    assert split_captions(out["captions"]) == ["a cat on a mat", "a dog"]
    assert join_captions([]) == "" and split_captions("") == []
    with pytest.raises(CorruptExampleError):
        Preprocessor()({"id": "no image"}, None)


def test_jpeg_draft_decoding_keeps_the_needed_resolution():
    yy, xx = np.mgrid[0:480, 0:640]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    data = encode(Image.fromarray(arr).resize((640, 480)), "JPEG")
    assert decode_image(data).size == (640, 480)
    drafted = decode_image(data, min_side=100)
    assert drafted.size == (160, 120)  # 1/4 scale: the largest reduction with both sides >= 100
    rec = {"id": "big", "image": data}
    fast = Preprocessor(PreprocessConfig(backbone_size=32, decoder_size=48))(rec)
    full = Preprocessor(PreprocessConfig(backbone_size=32, decoder_size=48, jpeg_draft=False))(rec)
    assert np.abs(fast["decoder"] - full["decoder"]).mean() < 0.05


def test_webp_decodes():
    out = decode_image(encode(Image.new("RGB", (7, 5), (0, 128, 255)), "WEBP"))
    assert out.size == (7, 5)
