"""The web page at ``GET /``: plain HTML, CSS and JavaScript shipped in ``service/page/``.

No build step, no CDN, no inline script: the page's own files are served from
``/ui/<file>`` under a Content-Security-Policy that allows only this origin (and ``data:`` /
``blob:`` images for the uploads and the perturbed PNG). The page calls the same API as any
client (``/classify``, ``/perturb``) with the same API key rules: it asks for the key when
the server needs one and sends it in ``X-API-Key``. ``GET /ui/config`` tells it whether a key is
needed, whether the perturb demo is on and which sample images there are.

Sample images: a bundle may ship its own in ``<bundle>/samples/`` (an ``index.json`` as below,
and the PNGs it lists); otherwise a few test images per data set ship in
``service/page/samples/<set>/`` with an ``index.json`` (input shape, class names, files), and
the set whose shape and class names match the served bundle is offered, none otherwise. Only
the PNG files an index lists are served.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Response
from fastapi import Path as PathParam

from service.deps import ServiceDep
from service.errors import ApiError, shorten
from service.perturb import perturb_settings
from service.results import ModelCard
from service.schemas import PageConfig, Sample, error_responses

log = logging.getLogger("service")

PAGE_DIR = Path(__file__).parent / "page"
SAMPLES_DIR = PAGE_DIR / "samples"
#: The files the page is made of, and their media types; nothing else under page/ is served.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
#: Same origin only; images may also be data: (the perturbed PNG) and blob: (the upload).
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

page = APIRouter(tags=["page"])


@cache
def _read(name: str) -> bytes:
    return (PAGE_DIR / name).read_bytes()


@dataclass(frozen=True)
class SampleSet:
    """Sample images in ``directory``: file name -> true class name."""

    directory: Path
    files: dict[str, str]

    @property
    def name(self) -> str:
        return self.directory.name


def read_sample_index(directory: Path) -> tuple[tuple[int, ...], tuple[str, ...], SampleSet]:
    """``directory/index.json`` -> (input shape, class names, the set); ValueError if it is
    malformed or lists a file that is not a plain ``.png`` name in ``directory``."""
    try:
        meta = json.loads((directory / "index.json").read_text())
        files = {str(f["file"]): str(f["label"]) for f in meta["images"]}
        shape, labels = tuple(int(v) for v in meta["input_shape"]), tuple(meta["labels"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{directory / 'index.json'} is not a sample index ({e!r})") from e
    for name in files:
        if Path(name).name != name or not name.endswith(".png") or not (
                directory / name).is_file():
            raise ValueError(f"{directory / 'index.json'} lists {name!r}, not a PNG file there")
    return shape, labels, SampleSet(directory, files)


@cache
def sample_sets() -> list[tuple[tuple[int, ...], tuple[str, ...], SampleSet]]:
    """Every set shipped in the package with the input shape and class names it fits."""
    return [read_sample_index(index.parent) for index in sorted(SAMPLES_DIR.glob("*/index.json"))]


def samples_for(card: ModelCard, bundle_dir: Path | None = None) -> SampleSet | None:
    """The bundle's own samples (``bundle_dir/samples``) if it ships a usable set, else the
    package's set whose input shape and class names are the served model's."""
    if bundle_dir is not None and (bundle_dir / "samples" / "index.json").is_file():
        try:
            return read_sample_index(bundle_dir / "samples")[2]
        except ValueError as e:
            log.warning("ignoring the bundle's sample images: %s", e)
    for shape, labels, samples in sample_sets():
        if shape == tuple(card.input_shape) and labels == tuple(card.labels):
            return samples
    return None


@page.get("/", include_in_schema=False)
async def index() -> Response:
    """The page (open: it holds no data; the API calls it makes follow the API's rules)."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8",
                    headers=HEADERS)


@page.get("/ui/config", responses=error_responses(503))
async def config(service: ServiceDep) -> PageConfig:
    """What the web page needs to know before its first request (no API key needed)."""
    samples = samples_for(service.card, service.bundle.path)
    listed = [] if samples is None else [
        Sample(label=label, url=f"/ui/samples/{name}") for name, label in samples.files.items()]
    return PageConfig(key_required=service.settings.api_key is not None,
                      perturb=perturb_settings(service), samples=listed)


def _not_found(what: str, name: str) -> ApiError:
    return ApiError(404, "not_found", f"no such {what}: {shorten(name, 60)!r}")


@page.get("/ui/samples/{name}", include_in_schema=False)
async def sample(service: ServiceDep, name: Annotated[str, PathParam(max_length=100)]
                 ) -> Response:
    """A sample image of the served model's data set (only names its index lists)."""
    samples = samples_for(service.card, service.bundle.path)
    if samples is None or name not in samples.files:
        raise _not_found("sample image", name)
    return Response((samples.directory / name).read_bytes(), media_type="image/png",
                    headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})


@page.get("/ui/{name}", include_in_schema=False)
async def asset(name: Annotated[str, PathParam(max_length=100)]) -> Response:
    """The page's script, style sheet and icon."""
    if name not in ASSETS:
        raise _not_found("page file", name)
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)
