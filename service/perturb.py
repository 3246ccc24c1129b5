"""``POST /perturb``: the "perturb it" demo, an FGSM or PGD copy of an upload, both scored.

Served only with ``PATHGUARD_PERTURB=true`` (off by default: it spends CPU on request, and
hands out adversarial examples of the served model). The attacks are :mod:`detector.perturb`'s
(plain torch, no ``train`` extra needed), untargeted against the upload's own prediction.
Crafting runs in a worker thread, one at a time, at most ``perturb_per_minute`` requests a
minute (429 ``rate_limited`` beyond, with ``Retry-After``). The original is scored first
(its prediction is the label the attack pushes away from), the perturbed copy after, both
through the micro-batcher like any ``/classify``. The perturbed image is rounded to 8 bits
before it is scored, so the PNG in the response, uploaded to ``/classify``, gets the same
answer.
"""

from __future__ import annotations

import base64
import io
import time
from fractions import Fraction
from typing import Annotated, Literal

import anyio
import numpy as np
import torch
from fastapi import APIRouter, File, Query, UploadFile
from PIL import Image

from detector.bundle import Bundle
from detector.perturb import GRADIENT_ATTACKS, perturb
from service.bodies import MultipartRoute
from service.deps import AuthorizedServiceDep, PerturbState, ServiceState
from service.errors import ApiError
from service.imaging import DecodedImage
from service.limits import rate_limited
from service.results import image_result
from service.routes import Filters, TopK, analyze, decode_uploads
from service.schemas import (
    AttackReport,
    ClassScore,
    PerturbResponse,
    PerturbSettings,
    PerturbTiming,
    error_responses,
)

perturb_router = APIRouter(route_class=MultipartRoute, tags=["demo"])

AttackName = Annotated[Literal["fgsm", "pgd"], Query(description="FGSM: one signed-gradient "
                                                     "step of eps; PGD: 20 steps of eps/8 "
                                                     "from a random start")]
Eps = Annotated[float | None, Query(gt=0.0, le=1.0, description="L-inf budget in pixel values "
                                    "[0, 1] (at most PATHGUARD_PERTURB_MAX_EPS; default: the "
                                    "strength the bundle's detector was evaluated at)")]

#: Used when the bundle's manifest names no FGSM or PGD strength.
FALLBACK_EPS = 0.1


def suggested_eps(bundle: Bundle, max_eps: float) -> float:
    """The PGD (else FGSM) strength the bundle's detector was evaluated at, from its
    manifest's metrics (``"PGD eps=8/255"``), capped at ``max_eps``."""
    names = list(bundle.manifest.metrics.get("auroc", {}))
    for prefix in ("PGD eps=", "FGSM eps="):
        for name in names:
            if name.startswith(prefix):
                try:
                    return min(max_eps, float(Fraction(name[len(prefix):])))
                except (ValueError, ZeroDivisionError):
                    continue
    return min(max_eps, FALLBACK_EPS)


def perturb_settings(service: ServiceState) -> PerturbSettings:
    s = service.settings
    default = service.perturb.default_eps if service.perturb else suggested_eps(
        service.bundle, s.perturb_max_eps)
    return PerturbSettings(enabled=s.perturb, attacks=list(GRADIENT_ATTACKS),
                           max_eps=s.perturb_max_eps, default_eps=default,
                           per_minute=s.perturb_per_minute)


def craft(bundle: Bundle, image: np.ndarray, label: int, attack: str, eps: float) -> np.ndarray:
    """(C, H, W) float32 in [0, 1] -> its perturbed copy on the 8-bit grid, within ``eps``
    of ``image`` (a pixel that rounding took past eps is moved one step back)."""
    x = torch.from_numpy(image)
    adv = perturb(attack, bundle.model, x[None], torch.tensor([label]), eps)[0]
    q = torch.round(adv * 255) / 255
    over = (q - x).abs() > eps + 1e-7
    q = torch.where(over, q - torch.sign(q - x) / 255, q)
    return q.numpy().astype(np.float32)


def png_data_url(image: np.ndarray) -> str:
    """(C, H, W) in [0, 1] on the 8-bit grid -> a data: URL of the lossless PNG."""
    pixels = np.round(image * 255).astype(np.uint8)
    im = Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _gate(service: ServiceState) -> PerturbState:
    gate = service.perturb
    if gate is None:  # the route is only mounted with the setting on
        raise ApiError(404, "not_found", "the perturb demo is off on this server "
                       "(PATHGUARD_PERTURB)")
    wait = gate.rate.take()
    if wait > 0:
        raise rate_limited("/perturb", service.settings.perturb_per_minute, wait)
    return gate


@perturb_router.post("/perturb",
                     responses=error_responses(400, 401, 408, 413, 415, 422, 429, 503))
async def perturb_image(
    service: AuthorizedServiceDep,
    file: Annotated[UploadFile, File(description="PNG, JPEG, WebP or BMP image")],
    attack: AttackName = "pgd",
    eps: Eps = None,
    top_k: TopK = 5,
    filters: Filters = False,
) -> PerturbResponse:
    """An FGSM or PGD copy of the image, pushed away from its own prediction, and the
    analysis of both: how the prediction, the adversarial score and the path change."""
    start = time.perf_counter()
    gate = _gate(service)
    settings = service.settings
    eps = gate.default_eps if eps is None else eps
    if eps > settings.perturb_max_eps:
        raise ApiError(422, "validation_error", f"query field 'eps': {eps:g} is over this "
                       f"server's limit of {settings.perturb_max_eps:g}")
    [decoded] = await decode_uploads(service, [file], named=False)
    card = service.card
    first = await analyze(service, torch.from_numpy(decoded.array)[None])
    label = int(first.analysis.predictions[0])
    craft_start = time.perf_counter()
    adv = await anyio.to_thread.run_sync(craft, service.bundle, decoded.array, label, attack,
                                         eps, limiter=gate.limiter)
    craft_s = time.perf_counter() - craft_start
    second = await analyze(service, torch.from_numpy(adv)[None])
    c, h, w = card.input_shape
    made = DecodedImage(array=adv, format="PNG", width=w, height=h, mode="L" if c == 1 else "RGB",
                        resized=False, converted=False, lossy=False)
    k = min(top_k, len(card.labels))
    profile = service.bundle.profile if filters else None
    original = image_result(card, first.analysis, 0, decoded, file.filename, top_k=k,
                            layers=True, filters=profile)
    perturbed = image_result(card, second.analysis, 0, made, f"{attack}.png", top_k=k,
                             layers=True, filters=profile)
    report = AttackReport(
        name=attack, eps=eps,
        attacked_class=ClassScore(index=label, label=card.labels[label],
                                  probability=float(first.analysis.probs[0, label])),
        linf=float(np.abs(adv - decoded.array).max()),
        prediction_changed=perturbed.prediction.index != label)
    return PerturbResponse(model=card.ref, attack=report, original=original,
                           perturbed=perturbed, image=png_data_url(adv),
                           timing=PerturbTiming(craft_ms=craft_s * 1e3,
                                                total_ms=(time.perf_counter() - start) * 1e3))
