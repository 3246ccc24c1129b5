"""A corpus of hostile and unusual uploads for ``POST /classify``, each with its expected answer.

Every :class:`HostileFile` builds its bytes on demand (nothing is generated at import) and says
what the server must answer: a 4xx with a given error code and words in the message, or 200 with
given fields in the response's ``input`` report (and, for some, exactly the same scores as a
plain reference image). ``tests/service/test_hostile.py`` posts each one to an in-process app;
:func:`write` writes them to a directory and :func:`loadtest.hostile_check.check_server` posts
them to a running server (``python benchmarks/hostile_corpus.py DIR [--url URL]`` does both).

The expectations assume the default limits (``max_body_bytes`` 8 MiB, ``max_image_pixels``
4096 x 4096) and a model with an input smaller than 16 x 16 (the digits and MNIST bundles).
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from loadtest.image_bytes import (
    adam7_png,
    bmp_header,
    colour,
    encode,
    flat_png,
    flip_byte,
    gradient_png,
    grey,
    idat_crc_offset,
    jpeg_with_size,
    pixels,
    png,
    with_ztxt_bomb,
)


@dataclass(frozen=True)
class HostileFile:
    """One upload and the answer it must get.

    name: file name in the corpus directory (ASCII); make: builds the bytes; status: expected
    HTTP status; code: expected error ``code`` (4xx); words: must occur in the error message;
    input: expected fields of the 200 response's ``input`` report; reference: builds a plain
    image that must get exactly the same scores; filename / content_type: what the multipart
    part claims (default: ``name`` and ``application/octet-stream``); what: one line for docs.
    """

    name: str
    what: str
    make: Callable[[], bytes]
    status: int
    code: str | None = None
    words: str = ""
    input: Mapping[str, object] = field(default_factory=dict)
    reference: Callable[[], bytes] | None = None
    filename: bytes | None = None
    content_type: str = "application/octet-stream"

    @property
    def upload_name(self) -> bytes:
        return self.name.encode() if self.filename is None else self.filename


# --- files of the corpus (the generic pieces are in loadtest.image_bytes) --------------------


def rgb16_png() -> bytes:
    """An 8x8 16-bit RGB PNG (Pillow reads it with 8 bits per channel)."""
    values = (pixels(8, 8, 3).astype(">u2") * 257)
    raw = b"".join(b"\x00" + row.tobytes() for row in values)
    return png(8, 8, zlib.compress(raw), depth=16, colour_type=2)


def exif_rotated_jpeg() -> bytes:
    """A 16x8 grey JPEG with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(grey(8, 16), "JPEG", quality=90, exif=exif.tobytes())


def palette_alpha_png() -> bytes:
    image = colour().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def animated(fmt: str, **options: Any) -> bytes:
    frames = [colour(seed=0), colour(seed=1), colour(seed=2)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50,
                  **options)


def svg() -> bytes:
    return (b"<?xml version='1.0' encoding='UTF-8'?>\n<svg xmlns='http://www.w3.org/2000/svg' "
            b"width='8' height='8'><rect width='8' height='8' fill='white'/></svg>\n")


def zip_file() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("digit.png", encode(grey(), "PNG"))
    return buf.getvalue()


def pdf() -> bytes:
    return (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n"
            b"%%EOF\n")


def digit_png() -> bytes:
    """The plain 8x8 grey PNG that several hostile variants are compared with."""
    return encode(grey(), "PNG")


# --- the corpus ------------------------------------------------------------------------------

def _noise64(fmt: str) -> bytes:
    return encode(grey(64, 64, seed=3), fmt)


CORPUS: tuple[HostileFile, ...] = (
    # not images, or not usable ones: 4xx with a code and a message that says why
    HostileFile("empty.png", "0 bytes", lambda: b"", 400, "empty", "empty"),
    HostileFile("random.png", "4 KiB of random bytes sent as image/png",
                lambda: np.random.default_rng(1).bytes(4096), 415, "not_an_image",
                "not an image", content_type="image/png"),
    HostileFile("text.png", "plain text sent as image/png (wrong content type)",
                lambda: b"hello, I am not a picture\n" * 4, 415, "not_an_image", "not an image",
                content_type="image/png"),
    HostileFile("script.png", "HTML with a script (the message must not echo it)",
                lambda: b"<html><body><script>alert('x')</script></body></html>", 415,
                "not_an_image", "not an image"),
    HostileFile("truncated.png", "64x64 PNG cut in half", lambda: _noise64("PNG")[:1500],
                400, "corrupt_image", "truncated or corrupt"),
    HostileFile("truncated.jpg", "64x64 JPEG without its last 200 bytes",
                lambda: _noise64("JPEG")[:-200], 400, "corrupt_image", "truncated"),
    HostileFile("signature_only.png", "PNG signature and nothing else",
                lambda: b"\x89PNG\r\n\x1a\n" + bytes(10), 400, "corrupt_image",
                "starts like PNG"),
    HostileFile("bad_ihdr_crc.png", "PNG whose IHDR checksum is wrong",
                lambda: flip_byte(digit_png(), 29), 400, "corrupt_image", "starts like PNG"),
    HostileFile("zero_size.png", "PNG whose IHDR says 0x0",
                lambda: png(0, 0, zlib.compress(b"")), 400, "corrupt_image", "PNG"),
    HostileFile("bit_depth_3.png", "PNG with an invalid bit depth (3)",
                lambda: png(8, 8, zlib.compress(bytes(40)), depth=3), 400, "corrupt_image",
                "PNG"),
    HostileFile("header_4000x4000.png", "IHDR of 4000x4000 (allowed) with 100 bytes of data",
                lambda: png(4000, 4000, zlib.compress(bytes(100))), 400, "corrupt_image",
                "truncated"),
    HostileFile("truncated.webp", "WebP cut after 30 bytes",
                lambda: encode(colour(), "WEBP")[:30], 400, "corrupt_image", "corrupt"),
    HostileFile("truncated.bmp", "BMP cut after 40 bytes", lambda: encode(grey(), "BMP")[:40],
                400, "corrupt_image", "corrupt"),
    HostileFile("ztxt_bomb.png", "8x8 PNG with a zTXt chunk inflating to 50 MB (54 KB file)",
                lambda: with_ztxt_bomb(digit_png()), 400, "corrupt_image", "too large"),
    HostileFile("ihdr_100000x100000.png", "PNG header claiming 100000x100000, no real data",
                lambda: png(100_000, 100_000, zlib.compress(bytes(16))), 413,
                "image_too_large", "decompression bomb"),
    HostileFile("bomb_6000x6000.png", "valid 6000x6000 PNG of zeros: 36 KB inflating to 36 MB",
                lambda: flat_png(6000), 413, "image_too_large",
                "6000x6000 = 36000000 pixels, over the limit"),
    HostileFile("sof_65500x65500.jpg", "JPEG whose SOF header claims 65500x65500",
                lambda: jpeg_with_size(encode(grey(), "JPEG"), 65500, 65500), 413,
                "image_too_large", "decompression bomb"),
    HostileFile("header_30000x30000.bmp", "BMP header claiming 30000x30000, no pixels",
                lambda: bmp_header(30000, 30000), 413, "image_too_large", "decompression bomb"),
    HostileFile("too_big_body.png", "9 MiB of random bytes (over max_body_bytes)",
                lambda: np.random.default_rng(2).bytes(9 << 20), 413, "content_too_large",
                "larger than the limit"),
    HostileFile("animated.gif", "animated GIF, 3 frames", lambda: animated("GIF"), 415,
                "unsupported_format", "GIF images are not supported"),
    HostileFile("image.tiff", "TIFF", lambda: encode(grey(), "TIFF"), 415,
                "unsupported_format", "TIFF images are not supported"),
    HostileFile("multipage.tiff", "TIFF with 3 pages", lambda: animated("TIFF"), 415,
                "unsupported_format", "TIFF images are not supported"),
    HostileFile("icon.ico", "Windows icon", lambda: encode(grey(16, 16), "ICO"), 415,
                "unsupported_format", "ICO images are not supported"),
    HostileFile("image.svg", "SVG (XML)", svg, 415, "unsupported_format",
                "SVG images are not supported", content_type="image/svg+xml"),
    HostileFile("zip_renamed.png", "ZIP archive (holding a PNG) renamed .png", zip_file, 415,
                "not_an_image", "not an image", content_type="image/png"),
    HostileFile("pdf_renamed.png", "PDF renamed .png", pdf, 415, "unsupported_format",
                "PDF images are not supported", content_type="image/png"),
    HostileFile("photo.heic", "HEIC (ISO media) header",
                lambda: b"\x00\x00\x00\x18ftypheic" + bytes(40), 415, "unsupported_format",
                "HEIC"),
    HostileFile("layers.psd", "Photoshop header", lambda: b"8BPS" + bytes(40), 415,
                "unsupported_format", "PSD images are not supported"),
    # valid images in unusual modes, sizes and containers: 200, with an honest input report
    HostileFile("one_pixel.png", "1x1 grey PNG", lambda: encode(grey(1, 1), "PNG"), 200,
                input={"width": 1, "height": 1, "resized": True, "converted": False,
                       "lossy": False}),
    HostileFile("huge_valid.png", "4000x4000 grey PNG (16 M pixels, 21 KB)",
                lambda: gradient_png(4000), 200,
                input={"width": 4000, "height": 4000, "resized": True, "lossy": False}),
    HostileFile("sixteen_bit.png", "16-bit grey PNG (precision kept)",
                lambda: encode(Image.fromarray(pixels(8, 8).astype(np.uint16) * 257), "PNG"),
                200, input={"mode": "I;16", "converted": True, "resized": False}),
    HostileFile("rgb16.png", "16-bit RGB PNG (read with 8 bits per channel)", rgb16_png, 200,
                input={"mode": "RGB;16", "converted": True}),
    HostileFile("palette_alpha.png", "palette PNG with a transparent colour",
                palette_alpha_png, 200, input={"mode": "P", "converted": True}),
    HostileFile("grey_alpha.png", "LA (grey + alpha) PNG",
                lambda: encode(grey().convert("LA"), "PNG"), 200,
                input={"mode": "LA", "converted": True}),
    HostileFile("transparent.png", "fully transparent RGBA PNG",
                lambda: encode(Image.new("RGBA", (8, 8)), "PNG"), 200,
                input={"mode": "RGBA", "converted": True}),
    HostileFile("one_bit.png", "1-bit PNG", lambda: encode(grey().convert("1"), "PNG"), 200,
                input={"mode": "1", "converted": True}),
    HostileFile("interlaced.png", "Adam7-interlaced PNG", lambda: adam7_png(pixels(8, 8)), 200,
                input={"mode": "L", "converted": False}, reference=digit_png),
    HostileFile("apng.png", "animated PNG, 3 frames (first frame used)",
                lambda: encode(grey(seed=0), "PNG", save_all=True,
                               append_images=[grey(seed=1), grey(seed=2)], duration=50), 200,
                input={"format": "PNG", "mode": "L"}, reference=digit_png),
    HostileFile("trailing_zip.png", "PNG followed by a ZIP archive (polyglot)",
                lambda: digit_png() + zip_file(), 200, input={"format": "PNG"},
                reference=digit_png),
    HostileFile("bad_idat_crc.png", "PNG whose IDAT checksum is wrong (Pillow does not check "
                "it; the pixels are intact)",
                lambda: flip_byte(digit_png(), idat_crc_offset(digit_png())), 200,
                input={"format": "PNG"}, reference=digit_png),
    HostileFile("wrong_type.png", "valid PNG sent as application/pdf", digit_png, 200,
                input={"format": "PNG", "converted": False}, reference=digit_png,
                content_type="application/pdf"),
    HostileFile("cmyk.jpg", "CMYK JPEG", lambda: encode(colour().convert("CMYK"), "JPEG"), 200,
                input={"format": "JPEG", "mode": "CMYK", "converted": True, "lossy": True}),
    HostileFile("exif_rotated.jpg", "16x8 JPEG with EXIF orientation 6 (ignored)",
                exif_rotated_jpeg, 200,
                input={"width": 16, "height": 8, "resized": True, "lossy": True},
                reference=lambda: encode(grey(8, 16), "JPEG", quality=90)),
    HostileFile("progressive.jpg", "progressive JPEG",
                lambda: encode(grey(), "JPEG", progressive=True), 200,
                input={"format": "JPEG", "lossy": True, "converted": False}),
    HostileFile("short_scan.jpg", "JPEG whose SOF claims 3000x3000 over 8x8 of data "
                "(libjpeg fills the rest)",
                lambda: jpeg_with_size(encode(grey(), "JPEG"), 3000, 3000), 200,
                input={"width": 3000, "height": 3000, "resized": True, "lossy": True}),
    HostileFile("multi_frame.mpo", "MPO: a JPEG with a second frame",
                lambda: encode(colour(seed=0), "MPO", save_all=True,
                               append_images=[colour(seed=1)]), 200,
                input={"format": "JPEG", "lossy": True}),
    HostileFile("lossless.webp", "lossless WebP", lambda: encode(grey(), "WEBP", lossless=True),
                200, input={"format": "WEBP", "lossy": False}, reference=digit_png),
    HostileFile("lossy.webp", "lossy WebP", lambda: encode(colour(), "WEBP", quality=50), 200,
                input={"format": "WEBP", "lossy": True}),
    HostileFile("animated.webp", "animated lossless WebP, 3 frames",
                lambda: animated("WEBP", lossless=True), 200,
                input={"format": "WEBP", "lossy": False}),
    HostileFile("image.bmp", "24-bit BMP", lambda: encode(colour(), "BMP"), 200,
                input={"format": "BMP", "mode": "RGB", "lossy": False}),
    HostileFile("rle8.bmp", "RLE8-compressed palette BMP",
                lambda: encode(grey().convert("P"), "BMP", compression=1), 200,
                input={"format": "BMP", "lossy": False}),
    HostileFile("non_utf8_name.png", "file name with bytes that are not UTF-8 (read as "
                "Latin-1)", digit_png, 200, input={"filename": "\xff\xfe\x80digit.png"},
                filename=b"\xff\xfe\x80digit.png"),
    HostileFile("utf8_name.png", "UTF-8 file name with accents, CJK and an emoji", digit_png,
                200, input={"filename": "ziffer_\u00fc_\u6570\u5b57_\U0001f600.png"},
                filename="ziffer_\u00fc_\u6570\u5b57_\U0001f600.png".encode()),
    HostileFile("traversal_name.png", "file name ../../etc/passwd (echoed, never used)",
                digit_png, 200, input={"filename": "../../etc/passwd"},
                filename=b"../../etc/passwd"),
    HostileFile("long_name.png", "2000-character file name", digit_png, 200,
                input={"filename": "a" * 1996 + ".png"}, filename=b"a" * 1996 + b".png"),
)


def by_name(name: str) -> HostileFile:
    """The corpus file called ``name`` (StopIteration if none is)."""
    return next(f for f in CORPUS if f.name == name)


def write(directory: Path) -> list[dict[str, Any]]:
    """Write every file of the corpus into ``directory`` and ``expected.json`` beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in CORPUS:
        (directory / item.name).write_bytes(item.make())
        rows.append({"file": item.name, "what": item.what, "status": item.status,
                     "code": item.code, "words": item.words, "input": dict(item.input),
                     "upload_name_hex": item.upload_name.hex(),
                     "content_type": item.content_type})
    (directory / "expected.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows
