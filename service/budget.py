"""What decoding an upload will cost, read from its bytes before Pillow decodes a pixel.

A header states the width and height, but the work of decoding also grows with things a
header does not state or can lie about. Each is counted here on the bytes themselves, and an
upload over a limit is refused before it is decoded:

- **aspect ratio**: the long side at most :data:`MAX_ASPECT_RATIO` times the short side (a
  1-pixel-wide image of 16.7 M pixels is 16.7 M rows, each with its own per-row overhead);
- **PNG chunks**: at most :data:`MAX_PNG_CHUNKS` chunks, of which at most
  :data:`MAX_PNG_COMPRESSED_METADATA` compressed text or colour-profile chunks (zTXt, iTXt,
  iCCP: each may inflate to 1 MB). Pillow parses chunks one by one in Python;
- **PNG rows**: the pixel data must inflate to every row the header claims (a complete zlib
  stream holding 4 of 4,096 rows would otherwise be decoded with the rest zero-filled). It is
  inflated here in 1 MiB steps, never past the size the rows need;
- **JPEG scans**: at most :data:`MAX_JPEG_SCANS` scans (SOS markers, counted in the whole
  file; a progressive JPEG has about 10). libjpeg passes over the image's coefficients once
  per scan, so a file repeating one tiny scan 20,000 times costs 20,000 passes;
- **JPEG segments**: at most :data:`MAX_JPEG_SEGMENTS` marker segments and
  :data:`MAX_JPEG_SKIPPED_BYTES` junk or fill bytes before the first scan (Pillow parses that
  part one marker, and junk one byte, at a time in Python).

The pixel count itself (width x height against ``max_pixels``) is checked by
:func:`service.imaging.decode_image` from the header Pillow reads.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAX_ASPECT_RATIO = 64
MAX_PNG_CHUNKS = 4096
MAX_PNG_COMPRESSED_METADATA = 16
MAX_JPEG_SCANS = 32
MAX_JPEG_SEGMENTS = 256
MAX_JPEG_SKIPPED_BYTES = 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_PNG_COMPRESSED_METADATA = (b"zTXt", b"iTXt", b"iCCP")
#: Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20


class TooComplexError(ValueError):
    """The upload would cost more to decode than the limits allow; the message says why."""


class TruncatedError(ValueError):
    """The upload's pixel data ends before the image the header describes."""


def check_aspect_ratio(width: int, height: int) -> None:
    """TooComplexError if the long side is more than :data:`MAX_ASPECT_RATIO` times the short."""
    short, long = sorted((width, height))
    if short > 0 and long > MAX_ASPECT_RATIO * short:
        raise TooComplexError(f"image is {width}x{height}, an aspect ratio over the limit of "
                              f"{MAX_ASPECT_RATIO}:1")


@dataclass(frozen=True)
class PngLayout:
    """What :func:`png_layout` read from a PNG's chunks: the header's size and sample layout,
    and the pixel data (the IDAT chunks, not yet inflated)."""

    width: int
    height: int
    bits_per_pixel: int
    interlaced: bool
    idat: tuple[memoryview, ...]


def png_layout(data: bytes) -> PngLayout | None:
    """Count the chunks of a PNG; its layout, or None if ``data`` is not a well-formed PNG
    (Pillow then says what is wrong with it). Raises :class:`TooComplexError`."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, chunks, metadata = len(_PNG_SIGNATURE), 0, 0
    header: tuple[int, int, int, int, int] | None = None
    idat: list[memoryview] = []
    view = memoryview(data)
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise TooComplexError(f"the PNG has more than {MAX_PNG_CHUNKS} chunks")
        body = view[pos + 8:pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            width, height, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", body)
            header = (width, height, depth, colour, interlace)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind in _PNG_COMPRESSED_METADATA:
            metadata += 1
            if metadata > MAX_PNG_COMPRESSED_METADATA:
                raise TooComplexError(f"the PNG has more than {MAX_PNG_COMPRESSED_METADATA} "
                                      f"compressed text or colour-profile chunks")
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        return None
    width, height, depth, colour, interlace = header
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        return None
    return PngLayout(width, height, depth * _PNG_CHANNELS[colour], interlace == 1, tuple(idat))


def check_png_rows(layout: PngLayout) -> None:
    """TruncatedError unless the pixel data inflates to every row the header claims.

    Call it after the pixel limit is checked: it inflates up to width x height samples.
    """
    needed = _png_raw_size(layout.width, layout.height, layout.bits_per_pixel,
                           layout.interlaced)
    got = _inflated_size(layout.idat, needed)
    if got < needed:
        raise TruncatedError(f"the PNG's pixel data ends early: it inflates to {got} of the "
                             f"{needed} bytes its {layout.width}x{layout.height} pixels need")


def _png_raw_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines (a filter byte per row) a PNG of this size inflates to."""
    def rows(w: int, h: int) -> int:
        return 0 if w <= 0 or h <= 0 else h * (1 + (w * bits_per_pixel + 7) // 8)
    if not interlaced:
        return rows(width, height)
    return sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy)
               for x0, y0, dx, dy in _ADAM7)


def _inflated_size(parts: tuple[memoryview, ...], limit: int) -> int:
    """How many bytes the zlib stream in ``parts`` inflates to, counting at most ``limit``
    (in steps of 1 MiB, so memory stays small). A corrupt stream counts as far as it goes."""
    inflater = zlib.decompressobj()
    total = 0
    try:
        for part in parts:
            pending: bytes | memoryview = part
            while pending and total < limit and not inflater.eof:
                out = inflater.decompress(pending, min(_INFLATE_STEP, limit - total))
                total += len(out)
                if not out and len(inflater.unconsumed_tail) == len(pending):
                    break  # no progress
                pending = inflater.unconsumed_tail
            if total >= limit or inflater.eof:
                break
    except zlib.error:
        pass
    return total


def check_jpeg(data: bytes) -> None:
    """Count a JPEG's scans and the segments and junk before its first scan.

    Raises :class:`TooComplexError`. Data that is not a well-formed JPEG is left to Pillow.
    """
    if not data.startswith(b"\xff\xd8"):
        return
    scans = data.count(b"\xff\xda")  # 0xFF in entropy-coded data is followed by 0x00 or RSTn
    if scans > MAX_JPEG_SCANS:
        raise TooComplexError(f"the JPEG has {scans} scans, more than the {MAX_JPEG_SCANS} "
                              f"this server decodes (a progressive JPEG has about 10)")
    pos, segments, skipped = 2, 0, 0
    while pos + 4 <= len(data):
        marker_at = data.find(b"\xff", pos)
        if marker_at < 0:
            return
        skipped += marker_at - pos
        pos = marker_at
        while pos + 1 < len(data) and data[pos + 1] == 0xFF and skipped <= MAX_JPEG_SKIPPED_BYTES:
            pos += 1  # fill bytes
            skipped += 1
        if skipped > MAX_JPEG_SKIPPED_BYTES:
            raise TooComplexError(f"the JPEG has more than {MAX_JPEG_SKIPPED_BYTES} junk or "
                                  f"fill bytes between its segments")
        if pos + 4 > len(data):
            return
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):  # start of scan, end of image
            return
        if 0xD0 <= marker <= 0xD8 or marker in (0x00, 0x01):  # no length field
            pos += 2
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise TooComplexError(f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments "
                                  f"before its first scan")
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
