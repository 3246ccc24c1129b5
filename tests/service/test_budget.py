"""service.budget: decode costs counted on the bytes; ordinary images pass, costly ones do not."""

from __future__ import annotations

import zlib

import pytest

from loadtest import abusive_inputs as abusive
from loadtest.hostile_corpus import by_name
from loadtest.image_bytes import PNG_HEADER_END, colour, encode, grey, png, png_chunk
from service import budget
from service.imaging import DecodeErrorKind, ImageDecodeError, decode_image


@pytest.mark.parametrize(("image", "fmt", "options"), [
    (colour(40, 30), "PNG", {}), (grey(40, 30), "PNG", {"optimize": True}),
    (colour(33, 17).convert("P"), "PNG", {"transparency": 2}),
    (grey(20, 20).convert("1"), "PNG", {}),
    (colour(64, 64), "JPEG", {"progressive": True}), (grey(64, 64), "JPEG", {}),
    (colour(64, 64), "JPEG", {"progressive": True, "optimize": True}),
])
def test_ordinary_images_pass(image, fmt, options):
    data = encode(image, fmt, **options)
    layout = budget.png_layout(data)
    if fmt == "PNG":
        assert layout is not None
        budget.check_png_rows(layout)
    budget.check_jpeg(data)
    budget.check_aspect_ratio(*image.size)


def test_interlaced_and_16_bit_pngs_hold_all_their_rows():
    for name in ("interlaced.png", "sixteen_bit.png", "rgb16.png", "apng.png"):
        layout = budget.png_layout(by_name(name).make())
        assert layout is not None, name
        budget.check_png_rows(layout)


def test_png_rows_are_counted():
    layout = budget.png_layout(abusive.truncated_rows_png(64, 100, 99))
    assert layout is not None
    with pytest.raises(budget.TruncatedError, match="6435 of the 6500 bytes"):
        budget.check_png_rows(layout)
    full = budget.png_layout(abusive.truncated_rows_png(64, 100, 100))
    assert full is not None
    budget.check_png_rows(full)


def test_png_chunk_limits():
    budget.png_layout(abusive.chunk_bomb_png(budget.MAX_PNG_CHUNKS - 3))
    with pytest.raises(budget.TooComplexError, match="more than 4096 chunks"):
        budget.png_layout(abusive.chunk_bomb_png(budget.MAX_PNG_CHUNKS))
    base = png(8, 8, zlib.compress((b"\x00" + bytes(8)) * 8, 9))
    ztxt = png_chunk(b"zTXt", b"k\x00\x00" + b"x\x9c\x03\x00\x00\x00\x00\x01")
    many = (base[:PNG_HEADER_END] + ztxt * (budget.MAX_PNG_COMPRESSED_METADATA + 1)
            + base[PNG_HEADER_END:])
    with pytest.raises(budget.TooComplexError, match="compressed text"):
        budget.png_layout(many)


def test_jpeg_scan_segment_and_junk_limits():
    budget.check_jpeg(abusive.many_scans_jpeg(budget.MAX_JPEG_SCANS))
    with pytest.raises(budget.TooComplexError, match="33 scans"):
        budget.check_jpeg(abusive.many_scans_jpeg(budget.MAX_JPEG_SCANS + 1))
    jpeg = encode(colour(16, 16), "JPEG")
    comments = b"\xff\xfe\x00\x03x" * (budget.MAX_JPEG_SEGMENTS + 1)
    with pytest.raises(budget.TooComplexError, match="marker segments"):
        budget.check_jpeg(jpeg[:2] + comments + jpeg[2:])
    with pytest.raises(budget.TooComplexError, match="junk or fill bytes"):
        budget.check_jpeg(jpeg[:2] + b"\x00" * 2000 + jpeg[2:])


@pytest.mark.parametrize(("width", "height", "ok"), [
    (1, 64, True), (64, 1, True), (1, 65, False), (6400, 99, False), (1, 1, True)])
def test_aspect_ratio(width, height, ok):
    if ok:
        budget.check_aspect_ratio(width, height)
    else:
        with pytest.raises(budget.TooComplexError, match="aspect ratio"):
            budget.check_aspect_ratio(width, height)


def test_large_jpeg_is_decoded_at_reduced_scale_with_its_own_size_reported():
    data = encode(colour(800, 600), "JPEG", quality=90)
    out = decode_image(data, channels=3, size=(28, 28), max_pixels=10**6)
    assert (out.width, out.height, out.mode) == (600, 800, "RGB")
    assert out.resized and not out.converted and out.array.shape == (3, 28, 28)
    grey = decode_image(data, channels=1, size=(28, 28), max_pixels=10**6)
    assert grey.converted and grey.mode == "RGB"


def test_decode_refuses_with_typed_errors():
    with pytest.raises(ImageDecodeError) as e:
        decode_image(abusive.tall_png(100_000), channels=1, size=(8, 8), max_pixels=10**6)
    assert e.value.kind is DecodeErrorKind.TOO_COMPLEX
    with pytest.raises(ImageDecodeError) as e:
        decode_image(abusive.truncated_rows_png(), channels=1, size=(8, 8), max_pixels=10**6)
    assert e.value.kind is DecodeErrorKind.CORRUPT and "truncated" in str(e.value)
