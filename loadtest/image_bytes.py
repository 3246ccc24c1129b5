"""Image files built byte by byte, honest or lying: noise images in any format, PNGs from their
header fields and chunks, JPEG and BMP headers that claim another size.

The building blocks of the hostile corpus (:mod:`loadtest.hostile_corpus`) and of the abusive
inputs (:mod:`loadtest.abusive_inputs`). Every function is pure: the same arguments give the
same bytes.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Bytes of the signature and the IHDR chunk at the start of every PNG.
PNG_HEADER_END = len(PNG_SIGNATURE) + 25


def pixels(height: int, width: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 noise in [0, 255], the same for the same arguments."""
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """The file bytes of ``image`` saved by Pillow as ``fmt`` with its save ``options``."""
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def grey(height: int = 8, width: int = 8, seed: int = 0) -> Image.Image:
    """A grey (mode L) noise image."""
    return Image.fromarray(pixels(height, width, 1, seed))


def colour(height: int = 8, width: int = 8, seed: int = 0) -> Image.Image:
    """An RGB noise image."""
    return Image.fromarray(pixels(height, width, 3, seed))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png(width: int, height: int, idat: bytes, *, depth: int = 8, colour_type: int = 0,
        interlace: int = 0) -> bytes:
    """A PNG from its IHDR fields and already compressed IDAT data (which may not match).

    colour_type 0 is grey; the IDAT data of an honest grey 8-bit PNG inflates to ``height``
    filtered scanlines of a filter byte and ``width`` samples.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def flat_png(side: int, filter_type: int = 0) -> bytes:
    """A valid side x side grey PNG of zeros, compressed row by row (no side^2 buffer)."""
    comp = zlib.compressobj(9)
    row = bytes([filter_type]) + bytes(side)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return png(side, side, body)


def gradient_png(side: int) -> bytes:
    """A valid side x side grey PNG, a horizontal ramp: the first row once, then 'Up' rows."""
    comp = zlib.compressobj(9)
    first = b"\x00" + bytes(i % 256 for i in range(side))
    rest = b"\x02" + bytes(side)  # filter Up, no change: every row equals the first
    body = comp.compress(first) + b"".join(comp.compress(rest) for _ in range(side - 1))
    return png(side, side, body + comp.flush())


def adam7_png(image: np.ndarray) -> bytes:
    """An interlaced (Adam7) grey PNG of ``image`` (H, W) uint8 (Pillow cannot write one)."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
              (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = image[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    h, w = image.shape
    return png(w, h, zlib.compress(raw), interlace=1)


def with_ztxt_bomb(data: bytes, inflated: int = 50 << 20) -> bytes:
    """``data`` (a PNG) with a zTXt chunk after IHDR that inflates to ``inflated`` bytes."""
    payload = b"Comment\x00\x00" + zlib.compress(bytes(inflated), 9)
    return data[:PNG_HEADER_END] + png_chunk(b"zTXt", payload) + data[PNG_HEADER_END:]


def flip_byte(data: bytes, index: int) -> bytes:
    """``data`` with the lowest bit of byte ``index`` flipped."""
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def idat_crc_offset(data: bytes) -> int:
    """Where the CRC of the first IDAT chunk of the PNG ``data`` starts."""
    start = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4:start])
    return start + 4 + length


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A baseline JPEG whose SOF0 header claims width x height (the scan data is unchanged)."""
    sof = data.index(b"\xff\xc0")
    out = bytearray(data)
    out[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def bmp_header(width: int, height: int) -> bytes:
    """A BMP header (BITMAPINFOHEADER, 8 bits) claiming width x height, and no pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info
