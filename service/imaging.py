"""Image bytes -> the model's input array: a pure function that raises a typed error.

Only PNG, JPEG, WebP and BMP are parsed (Pillow is told which plugins it may use), and each
upload is opened once. Before any pixel is decoded, what decoding will cost is bounded from the
bytes themselves (:mod:`service.budget`: chunk, segment and scan counts, aspect ratio, PNG rows
present) and the image size is checked against a limit straight after the header is read;
Pillow's own decompression-bomb guard stays on as well.

Conversion to the model's input:

- colour (RGB) or grey (L, ITU-R 601-2 luma) as the model expects;
- transparent pixels are composited onto black or white first (``background``);
- 16-bit grey PNGs keep their precision (scaled by 1/65535); 16-bit colour PNGs are read with
  8 bits per channel (reported as mode ``RGB;16``, ``RGBA;16``, ... and ``converted``);
- palette and 1-bit images are expanded; CMYK JPEGs converted to RGB;
- only the first frame of an animated image is used (APNG, animated WebP, MPO: a JPEG with
  more frames, reported as JPEG); EXIF orientation is ignored (pixels are used as stored);
- resized to the model's H x W with Pillow's bilinear filter (which averages over the source
  pixels when shrinking) only if the size differs; large reductions first average blocks of
  pixels, and JPEGs at least twice the model's size are decoded at 1/2 to 1/8 scale by
  libjpeg (never below the model's size), so time and memory follow the pixels decoded;
- values / 255 -> float32 in [0, 1], (C, H, W).

Resizing, colour conversion and lossy formats (JPEG, lossy WebP) change pixel values, and with
them any adversarial perturbation: :class:`DecodedImage` says which of these happened.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from service import budget

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")

_ALLOWED_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"))
_OTHER_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"DDS ", "DDS"),
    (b"v/1\x01", "OpenEXR"), (b"\xff\n", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class DecodeErrorKind(StrEnum):
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    CORRUPT = "corrupt_image"
    TOO_LARGE = "image_too_large"
    TOO_COMPLEX = "image_too_complex"


class ImageDecodeError(ValueError):
    """Bytes that do not give a usable image; ``kind`` says why, the message says what."""

    def __init__(self, kind: DecodeErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodedImage:
    """array: (C, H, W) float32 in [0, 1], the model's input for one image.

    format: the file format (PNG, JPEG, WEBP, BMP); width, height, mode: the file's own size
    and Pillow mode; resized: scaled to the model's size; converted: colour mode, bit depth or
    transparency changed; lossy: the file format itself discarded detail (JPEG, lossy WebP).
    """

    array: np.ndarray
    format: str
    width: int
    height: int
    mode: str
    resized: bool
    converted: bool
    lossy: bool


def decode_image(data: bytes, *, channels: int, size: tuple[int, int], max_pixels: int,
                 background: Literal["black", "white"] = "black") -> DecodedImage:
    """Decode ``data`` to the model's input of ``channels`` (1 or 3) and ``size`` (H, W).

    The bytes are opened once. Before any pixel is decoded, the cost is bounded
    (:mod:`service.budget`: PNG chunks, JPEG segments and scans, aspect ratio) and the header's
    size checked against ``max_pixels`` (width x height) and Pillow's bomb limit; a PNG's pixel
    data must hold every row. JPEGs larger than the model's input are decoded at a reduced
    scale (libjpeg's DCT scaling, 1/2 to 1/8, never below the model's size).

    Raises :class:`ImageDecodeError` for empty, unknown, disallowed, corrupt, truncated,
    too large or too costly data.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not data:
        raise ImageDecodeError(DecodeErrorKind.EMPTY, "the upload is empty (0 bytes)")
    limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(
        max_pixels, int(Image.MAX_IMAGE_PIXELS))
    h, w = size
    try:
        png = budget.png_layout(data)
        budget.check_jpeg(data)
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as im:
            fmt, mode, (width, height) = _format(im), im.mode, im.size
            if width * height > limit:
                raise ImageDecodeError(
                    DecodeErrorKind.TOO_LARGE, f"image is {width}x{height} = "
                    f"{width * height} pixels, over the limit of {limit} pixels")
            budget.check_aspect_ratio(width, height)
            if png is not None and fmt == "PNG":
                budget.check_png_rows(png)
            if fmt == "JPEG" and width >= 2 * w and height >= 2 * h:
                im.draft(None, (w, h))  # DCT scaling: decode at 1/2, 1/4 or 1/8
            im.load()
            array, converted = _to_model(im, mode, channels, size, background)
            if fmt == "PNG" and _png_bit_depth(data) == 16 and not mode.startswith("I"):
                mode, converted = f"{mode};16", True  # Pillow keeps 8 of the 16 bits
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(DecodeErrorKind.TOO_LARGE, f"image refused as a possible "
                               f"decompression bomb: its header claims more than {limit} "
                               f"pixels") from None
    except budget.TooComplexError as e:
        raise ImageDecodeError(DecodeErrorKind.TOO_COMPLEX,
                               f"image refused as too costly to decode: {e}") from None
    except budget.TruncatedError as e:
        raise ImageDecodeError(DecodeErrorKind.CORRUPT,
                               f"the image data is truncated or corrupt: {e}") from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except ImageDecodeError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(DecodeErrorKind.CORRUPT, _why_corrupt(e)) from None
    return DecodedImage(array=array, format=fmt, width=width, height=height, mode=mode,
                        resized=(height, width) != tuple(size), converted=converted,
                        lossy=fmt == "JPEG" or (fmt == "WEBP" and _webp_is_lossy(data)))


def _why_corrupt(error: Exception) -> str:
    """A message for a decoder's error, in our words (never the exception's own text)."""
    text = str(error)
    if "decompressed data too large" in text.lower():
        return ("the image data is corrupt: a compressed text or colour-profile chunk is too "
                "large when inflated (over 1 MB)")
    if "truncated" in text:
        return "the image data is truncated or corrupt: it ends before the image is complete"
    return "the image data is truncated or corrupt; it could not be decoded"


def _format(im: Image.Image) -> str:
    """The file format; MPO (JPEG with more frames, opened by the JPEG plugin) is JPEG."""
    return "JPEG" if im.format == "MPO" else str(im.format)


def _png_bit_depth(data: bytes) -> int:
    """Bits per sample from a PNG's IHDR (the signature and IHDR were already parsed)."""
    return data[24] if len(data) > 24 else 8


def _to_model(im: Image.Image, mode: str, channels: int, size: tuple[int, int],
              background: str) -> tuple[np.ndarray, bool]:
    """Loaded image -> ((C, H, W) float32 in [0, 1], whether the pixels were converted).

    mode: the file's own mode (a JPEG decoded at a reduced scale keeps it).
    """
    target = "L" if channels == 1 else "RGB"
    h, w = size
    if im.mode == "I" or im.mode.startswith("I;16"):
        # 16-bit grey (PNG): keep the precision as a float image in [0, 1]
        grey = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
        fim = Image.fromarray(grey, mode="F")
        if fim.size != (w, h):
            fim = _resize(fim, w, h)
        arr = np.array(fim, dtype=np.float32)[None]  # (1, H, W), a writable copy
        if channels == 3:
            arr = np.repeat(arr, 3, axis=0)
        return np.ascontiguousarray(arr), True
    converted = mode != target
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        fill = (0, 0, 0, 255) if background == "black" else (255, 255, 255, 255)
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, fill), rgba)
        converted = True
    if im.mode != target:
        im = im.convert(target)
    if im.size != (w, h):
        im = _resize(im, w, h)
    arr = np.asarray(im, dtype=np.float32) / np.float32(255.0)  # (H, W) or (H, W, 3)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr), converted


def _resize(im: Image.Image, w: int, h: int) -> Image.Image:
    """Bilinear resize to w x h. Large reductions first average blocks of pixels (Pillow's
    ``reducing_gap``), so memory and time stay proportional to the source image."""
    return im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _unidentified(data: bytes) -> ImageDecodeError:
    """Why Pillow (limited to the allowed formats) could not identify ``data``."""
    head = data[:32]
    allowed = ", ".join(ALLOWED_FORMATS)
    for magic, name in _ALLOWED_MAGIC:
        if head.startswith(magic):
            return ImageDecodeError(DecodeErrorKind.CORRUPT,
                                    f"the data starts like {name} but is not a readable image")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageDecodeError(DecodeErrorKind.CORRUPT,
                                "the data starts like WEBP but is not a readable image")
    name = next((n for m, n in _OTHER_MAGIC if head.startswith(m)), None)
    if name is None and head[4:8] == b"ftyp":
        name = f"ISO media ({head[8:12].decode('latin-1').strip()}, e.g. HEIC/AVIF)"
    if name is None and b"<svg" in data[:1024].lower():
        name = "SVG"
    if name is not None:
        return ImageDecodeError(DecodeErrorKind.UNSUPPORTED_FORMAT,
                                f"{name} images are not supported; send one of {allowed}")
    return ImageDecodeError(DecodeErrorKind.NOT_AN_IMAGE,
                            f"the upload is not an image in a supported format ({allowed})")


def _webp_is_lossy(data: bytes) -> bool:
    """Whether a WebP file's (first) bitstream is lossy (VP8) rather than lossless (VP8L),
    looking into the first frame of an animated WebP."""
    pos = 12
    while pos + 8 <= len(data):
        fourcc = data[pos:pos + 4]
        if fourcc == b"VP8 ":
            return True
        if fourcc == b"VP8L":
            return False
        if fourcc == b"ANMF":  # animation frame: 16 bytes of frame header, then its chunks
            pos += 8 + 16
            continue
        (length,) = struct.unpack("<I", data[pos + 4:pos + 8])
        pos += 8 + length + (length & 1)
    return True
