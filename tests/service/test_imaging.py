"""service.imaging: decoding is pure, converts to the model's input and refuses bad data."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.imaging import DecodeErrorKind, ImageDecodeError, decode_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def grey(size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) pixel stream."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def decode(data: bytes, channels: int = 1, size: tuple[int, int] = (8, 8),
           max_pixels: int = 10_000, **kwargs: object):
    return decode_image(data, channels=channels, size=size, max_pixels=max_pixels, **kwargs)


def test_grey_png_is_exact():
    pixels = grey()
    out = decode(encode(Image.fromarray(pixels)))
    assert out.array.shape == (1, 8, 8) and out.array.dtype == np.float32
    np.testing.assert_array_equal(out.array[0], pixels / np.float32(255))
    assert (out.format, out.mode, out.width, out.height) == ("PNG", "L", 8, 8)
    assert not (out.resized or out.converted or out.lossy)


@pytest.mark.parametrize(("fmt", "options", "lossy"), [
    ("BMP", {}, False), ("JPEG", {"quality": 90}, True), ("WEBP", {"lossless": True}, False),
    ("WEBP", {"quality": 80}, True)])
def test_allowed_formats(fmt, options, lossy):
    pixels = grey()
    out = decode(encode(Image.fromarray(pixels), fmt, **options))
    assert out.format == fmt and out.lossy is lossy
    assert out.array.shape == (1, 8, 8)
    if not lossy:
        np.testing.assert_allclose(out.array[0], pixels / 255.0, atol=1e-6)


def test_colour_to_grey_uses_luma():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    out = decode(encode(Image.fromarray(rgb)))
    assert out.converted and out.mode == "RGB"
    np.testing.assert_allclose(out.array, round(200 * 0.587) / 255.0, atol=1 / 255)


def test_grey_to_colour_repeats_channels():
    pixels = grey()
    out = decode(encode(Image.fromarray(pixels)), channels=3)
    assert out.array.shape == (3, 8, 8) and out.converted
    np.testing.assert_array_equal(out.array[0], out.array[2])


@pytest.mark.parametrize(("background", "value"), [("black", 0.0), ("white", 1.0)])
def test_alpha_is_composited_onto_background(background, value):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[:4, :, 3] = 255  # top half opaque white, bottom half fully transparent
    out = decode(encode(Image.fromarray(rgba)), background=background)
    assert out.converted and out.mode == "RGBA"
    np.testing.assert_allclose(out.array[0, :4], 1.0)
    np.testing.assert_allclose(out.array[0, 4:], value)


def test_palette_with_transparency():
    im = Image.fromarray(grey()).convert("P")
    im.info["transparency"] = 0
    out = decode(encode(im, transparency=0), background="white")
    assert out.converted and out.array.shape == (1, 8, 8)


def test_sixteen_bit_keeps_precision():
    pixels = np.array([[0, 65535], [32768, 1]], dtype=np.uint16)
    out = decode(encode(Image.fromarray(pixels)), size=(2, 2))
    assert out.mode.startswith("I") and out.converted
    np.testing.assert_allclose(out.array[0], pixels / 65535.0, atol=1e-6)


def test_resizes_only_when_needed():
    out = decode(encode(Image.fromarray(grey(16))))
    assert out.resized and out.array.shape == (1, 8, 8)
    assert (out.width, out.height) == (16, 16)
    flat = decode(encode(Image.new("L", (20, 12), 77)))
    np.testing.assert_allclose(flat.array, 77 / 255.0, atol=1e-6)  # bilinear keeps a flat image


@pytest.mark.parametrize(("data", "kind"), [
    (b"", DecodeErrorKind.EMPTY),
    (b"hello, this is text", DecodeErrorKind.NOT_AN_IMAGE),
    (b"GIF89a" + b"\x00" * 20, DecodeErrorKind.UNSUPPORTED_FORMAT),
    (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>",
     DecodeErrorKind.UNSUPPORTED_FORMAT),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, DecodeErrorKind.CORRUPT),
])
def test_bad_bytes(data, kind):
    with pytest.raises(ImageDecodeError) as e:
        decode(data)
    assert e.value.kind == kind and str(e.value)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "ICO"])
def test_other_real_formats_are_refused(fmt):
    with pytest.raises(ImageDecodeError, match=f"{fmt} images are not supported") as e:
        decode(encode(Image.fromarray(grey()), fmt))
    assert e.value.kind == DecodeErrorKind.UNSUPPORTED_FORMAT


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt):
    data = encode(Image.fromarray(grey(64)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt") as e:
        decode(data[: len(data) // 2], max_pixels=100_000)
    assert e.value.kind == DecodeErrorKind.CORRUPT


def test_size_limit_checked_before_decoding():
    with pytest.raises(ImageDecodeError, match="over the limit of 10000 pixels") as e:
        decode(png_header(200, 200))  # the pixel data is invalid: never read
    assert e.value.kind == DecodeErrorKind.TOO_LARGE


def test_pillow_bomb_guard_stays_on():
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 10
    with pytest.raises(ImageDecodeError) as e:
        decode(png_header(side, side), max_pixels=10**12)
    assert e.value.kind == DecodeErrorKind.TOO_LARGE


def test_is_pure():
    data = encode(Image.fromarray(grey()))
    a, b = decode(data), decode(data)
    np.testing.assert_array_equal(a.array, b.array)
    a.array[...] = 0
    assert decode(data).array.any()
