"""The load test's request mix: valid requests (real test images to ``/classify``,
``/classify/batch`` and ``/v2/models/{name}/infer``) and invalid ones of every documented kind,
each with the status and error code it must get.

:class:`Payloads` builds requests of every :data:`KINDS` entry from test images for one model
and one set of server limits; :func:`plan` draws a run's requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from loadtest.bodies import encode_image, infer_body, multipart
from loadtest.image_bytes import encode

BATCH_IMAGES = 4  # images per valid /classify/batch request
INFER_IMAGES = 2  # images per valid infer request


@dataclass(frozen=True)
class Kind:
    """A kind of request: valid ones must get 200, invalid ones ``status`` with ``code``."""

    name: str
    valid: bool
    weight: float  # relative share within the valid or the invalid requests
    status: int = 200
    code: str | None = None
    blocking: bool = False  # sent with httpx's blocking client (see ``clients.drive``)


KINDS = (
    Kind("classify", True, 6.0),
    Kind("classify_batch", True, 1.0),
    Kind("infer", True, 1.0),
    Kind("empty_file", False, 1.0, 400, "empty"),
    Kind("truncated_png", False, 1.0, 400, "corrupt_image"),
    Kind("not_an_image", False, 1.0, 415, "not_an_image"),
    Kind("gif", False, 1.0, 415, "unsupported_format"),
    Kind("wrong_field", False, 1.0, 422, "validation_error"),
    Kind("bad_query", False, 1.0, 422, "validation_error"),
    Kind("too_many_files", False, 1.0, 400, "too_many_files"),
    Kind("pixel_bomb", False, 1.0, 413, "image_too_large"),
    Kind("body_too_large", False, 0.1, 413, "content_too_large", blocking=True),
    Kind("malformed_multipart", False, 1.0, 400, "bad_request"),
    Kind("infer_wrong_shape", False, 1.0, 400, "invalid_tensor"),
    Kind("infer_out_of_range", False, 1.0, 400, "invalid_tensor"),
    Kind("infer_unknown_model", False, 1.0, 404, "unknown_model"),
    Kind("infer_not_json", False, 1.0, 400, "bad_request"),
    Kind("unknown_route", False, 1.0, 404, "not_found"),
)


def kind_index(name: str) -> int:
    """The index into :data:`KINDS` of the kind called ``name`` (StopIteration if none is)."""
    return next(i for i, k in enumerate(KINDS) if k.name == name)


@dataclass(frozen=True)
class Prepared:
    """One HTTP request, encoded once; ``labels``: true classes of its images (valid ones)."""

    kind: int  # index into KINDS
    path: str
    body: bytes
    content_type: str
    labels: tuple[int, ...] = ()


class Payloads:
    """Makes requests of every kind from test images (uint8 NCHW) for one model and limits."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, model: str,
                 settings: Mapping[str, Any], rng: np.random.Generator) -> None:
        self.images, self.labels, self.model, self.rng = images, labels, model, rng
        self.max_files = int(settings["max_files"])
        self.pngs = [encode_image(im.transpose(1, 2, 0)) for im in images]
        self.gif = encode_image(images[0].transpose(1, 2, 0), "GIF")
        side = math.isqrt(int(settings["max_image_pixels"])) + 1  # side^2 over the limit
        self.bomb = encode(Image.new("1", (side, side)), "PNG")  # a few KB, side^2 pixels
        self.too_large = b"\0" * (int(settings["max_body_bytes"]) + 1)
        self.builders: dict[str, Callable[[], Prepared]] = {
            k.name: getattr(self, f"_{k.name}") for k in KINDS}

    def make(self, kind: int) -> Prepared:
        """A new request of kind ``KINDS[kind]``."""
        return self.builders[KINDS[kind].name]()

    def _pick(self, n: int) -> np.ndarray:
        return self.rng.choice(len(self.images), size=n, replace=False)

    def _files(self, path: str, idx: np.ndarray, field_name: str = "file") -> Prepared:
        body, ctype = multipart([(field_name, f"{i}.png", self.pngs[i], "image/png")
                                 for i in idx])
        return Prepared(-1, path, body, ctype, tuple(int(self.labels[i]) for i in idx))

    def _with(self, kind: str, p: Prepared) -> Prepared:
        index = kind_index(kind)
        return Prepared(index, p.path, p.body, p.content_type,
                        p.labels if KINDS[index].valid else ())

    def _upload(self, kind: str, data: bytes, ctype: str = "image/png",
                path: str = "/classify") -> Prepared:
        body, content_type = multipart([("file", "upload", data, ctype)])
        return self._with(kind, Prepared(-1, path, body, content_type))

    def _classify(self) -> Prepared:
        return self._with("classify", self._files("/classify", self._pick(1)))

    def _classify_batch(self) -> Prepared:
        return self._with("classify_batch", self._files(
            "/classify/batch?layers=false", self._pick(BATCH_IMAGES), "files"))

    def _infer(self) -> Prepared:
        idx = self._pick(INFER_IMAGES)
        x = self.images[idx].astype(np.float32) / 255.0
        return self._with("infer", Prepared(-1, f"/v2/models/{self.model}/infer", infer_body(x),
                                            "application/json",
                                            tuple(int(self.labels[i]) for i in idx)))

    def _empty_file(self) -> Prepared:
        return self._upload("empty_file", b"")

    def _truncated_png(self) -> Prepared:
        png = self.pngs[int(self._pick(1)[0])]
        return self._upload("truncated_png", png[: len(png) // 2])

    def _not_an_image(self) -> Prepared:
        return self._upload("not_an_image", b"this is not an image\n" * 20, "text/plain")

    def _gif(self) -> Prepared:
        return self._upload("gif", self.gif, "image/gif")

    def _wrong_field(self) -> Prepared:
        return self._with("wrong_field", self._files("/classify", self._pick(1), "image"))

    def _bad_query(self) -> Prepared:
        p = self._files("/classify?top_k=0", self._pick(1))
        return self._with("bad_query", p)

    def _too_many_files(self) -> Prepared:
        idx = self.rng.choice(len(self.images), size=self.max_files + 1)
        return self._with("too_many_files", self._files("/classify/batch", idx, "files"))

    def _pixel_bomb(self) -> Prepared:
        return self._upload("pixel_bomb", self.bomb)

    def _body_too_large(self) -> Prepared:
        return self._with("body_too_large", Prepared(-1, "/classify", self.too_large,
                                                     "multipart/form-data; boundary=x"))

    def _malformed_multipart(self) -> Prepared:
        variants = [  # a part without a name, a broken header, no boundary, garbage
            (b"--x\r\nContent-Disposition: form-data\r\n\r\n", "boundary=x"),
            (b"--x\r\nbad header line\r\n\r\ndata\r\n--x--\r\n", "boundary=x"),
            (multipart([("file", "a.png", self.pngs[0], "image/png")])[0], ""),
            (bytes(self.rng.integers(0, 256, 64, dtype=np.uint8)), "boundary=x")]
        body, params = variants[int(self.rng.integers(len(variants)))]
        ctype = "multipart/form-data" + (f"; {params}" if params else "")
        return self._with("malformed_multipart", Prepared(-1, "/classify", body, ctype))

    def _infer_tensor(self, kind: str, x: np.ndarray, model: str | None = None) -> Prepared:
        return self._with(kind, Prepared(-1, f"/v2/models/{model or self.model}/infer",
                                         infer_body(x), "application/json"))

    def _infer_wrong_shape(self) -> Prepared:
        c, h, w = self.images.shape[1:]
        return self._infer_tensor("infer_wrong_shape", np.zeros((1, c, h, w + 1), np.float32))

    def _infer_out_of_range(self) -> Prepared:
        x = self.images[self._pick(1)].astype(np.float32)  # 0..255, not / 255
        x.flat[0] = 255.0
        return self._infer_tensor("infer_out_of_range", x)

    def _infer_unknown_model(self) -> Prepared:
        x = self.images[self._pick(1)].astype(np.float32) / 255.0
        return self._infer_tensor("infer_unknown_model", x, f"{self.model}-nope")

    def _infer_not_json(self) -> Prepared:
        return self._with("infer_not_json", Prepared(
            -1, f"/v2/models/{self.model}/infer", b"{\"inputs\": [", "application/json"))

    def _unknown_route(self) -> Prepared:
        return self._with("unknown_route", self._files("/classify/nowhere", self._pick(1)))


def plan(payloads: Payloads, requests: int, invalid_fraction: float,
         rng: np.random.Generator) -> list[Prepared]:
    """``requests`` requests, each invalid with probability ``invalid_fraction``, kinds drawn
    by weight within the valid and the invalid ones (a kind's payloads are reused when many)."""
    valid = [i for i, k in enumerate(KINDS) if k.valid]
    invalid = [i for i, k in enumerate(KINDS) if not k.valid]

    def weights(idx: list[int]) -> np.ndarray:
        w = np.array([KINDS[i].weight for i in idx])
        return w / w.sum()

    is_invalid = rng.random(requests) < invalid_fraction
    kinds = np.where(is_invalid, rng.choice(invalid, size=requests, p=weights(invalid)),
                     rng.choice(valid, size=requests, p=weights(valid)))
    cache: dict[int, list[Prepared]] = {}
    out = []
    for kind in kinds.tolist():
        pool = cache.setdefault(kind, [])
        if len(pool) < 256:  # at most 256 distinct payloads per kind
            pool.append(payloads.make(kind))
            out.append(pool[-1])
        else:
            out.append(pool[int(rng.integers(len(pool)))])
    return out

