"""Request bodies built by hand: multipart uploads (any file name bytes), image files from
pixels, and Open Inference Protocol tensors."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

from loadtest.image_bytes import encode


def multipart(parts: Sequence[tuple[str, str | bytes, bytes, str]],
              boundary: str = "pathguard-boundary") -> tuple[bytes, str]:
    """(field, filename, data, content type) parts -> (multipart/form-data body, its
    Content-Type header), built by hand so that a filename may be any bytes.

    ValueError if ``boundary`` occurs in a part's data.
    """
    sep = boundary.encode()
    chunks = []
    for name, filename, data, ctype in parts:
        if sep in data:
            raise ValueError(f"the multipart boundary occurs in the data of {filename!r}")
        fname = filename if isinstance(filename, bytes) else filename.encode()
        chunks += [b"--" + sep + f'\r\nContent-Disposition: form-data; name="{name}"; '
                   'filename="'.encode() + fname + f'"\r\nContent-Type: {ctype}\r\n\r\n'
                   .encode(), data, b"\r\n"]
    chunks.append(b"--" + sep + b"--\r\n")
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def encode_image(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """(H, W, C) uint8 in [0, 255] -> image file bytes (grey for one channel)."""
    return encode(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels), fmt)


def infer_body(x: np.ndarray, name: str = "input") -> bytes:
    """(N, C, H, W) float32 -> an Open Inference Protocol request body (FP32 tensor)."""
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32",
              "data": [float(v) for v in x.ravel()]}
    return json.dumps({"inputs": [tensor]}).encode()
