"""Request and response models of the HTTP API (pydantic v2; they make the OpenAPI schema).

Two families: the image API (``/classify``) and the Open Inference Protocol (``/v2``,
https://github.com/kserve/open-inference-protocol) for exact tensors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictFloat


class ErrorBody(BaseModel):
    """Every error response: a message for people and a code for programs."""

    error: str = Field(description="what went wrong and how to fix it")
    code: str = Field(description="machine-readable reason, e.g. not_an_image, overloaded")
    errors: list[dict[str, Any]] | None = Field(
        None, description="for request validation errors (422): each failed field")


# --- image API -------------------------------------------------------------------------------


class ModelRef(BaseModel):
    name: str = Field(description="the bundle's name")
    version: str = Field(description="first 12 hex digits of the weights' SHA-256")


class ClassScore(BaseModel):
    index: int = Field(description="class index")
    label: str = Field(description="class name")
    probability: float = Field(ge=0.0, le=1.0, description="softmax probability")


class Prediction(BaseModel):
    index: int = Field(description="predicted class index")
    label: str = Field(description="predicted class name")
    confidence: float = Field(ge=0.0, le=1.0, description="softmax probability of the "
                              "predicted class")
    top_k: list[ClassScore] = Field(description="the k most probable classes, best first")


class Adversarial(BaseModel):
    score: float = Field(ge=0.0, le=1.0, description="calibrated probability that the input "
                         "is adversarial")
    flagged: bool = Field(description="score above the threshold")
    verdict: Literal["adversarial", "clean"]
    threshold: float = Field(description="the bundle's decision threshold on the score")
    target_fpr: float = Field(description="false-positive rate on clean data the threshold "
                              "was set for")
    clean_fpr: float | None = Field(description="false-positive rate the threshold gave on "
                                    "held-out clean data")
    fpr_confidence: float | None = Field(
        gt=0.0, lt=1.0,
        description="a lower bound on the probability, over the draw of the held-out clean "
                    "images, that the threshold's false-positive rate on new clean images from "
                    "their distribution is at most target_fpr (a one-sided Clopper-Pearson "
                    "bound); null: the threshold is the plain (1 - target_fpr) quantile of "
                    "those images")


class FilterReport(BaseModel):
    """Every filter of one gated layer, by filter index (with ``filters=true``)."""

    open: list[bool] = Field(description="each filter's gate for this input (true = open)")
    class_frequency: list[float] = Field(
        description="the predicted class's typical path: share of its clean training images "
                    "that open each filter (smoothed, in (0, 1)); a filter is unusual for the "
                    "class when its state here is rare there: open with a low frequency, or "
                    "closed with a high one")


class LayerReport(BaseModel):
    name: str = Field(description="module path of the gated conv in the network")
    depth: int = Field(ge=0, description="position of the layer among the gated layers in "
                       "execution order (0 = first)")
    open: int = Field(ge=0, description="filters the gates left open for this input")
    total: int = Field(ge=1, description="filters of the layer")
    anomaly: float = Field(description="z-score of the layer's path against the predicted "
                           "class's typical path on clean data (above ~3 is unusual)")
    filters: FilterReport | None = Field(None, description="every filter's state and its "
                                         "class frequency (only with filters=true)")


class PathReport(BaseModel):
    open_fraction: float = Field(ge=0.0, le=1.0, description="open share of all gated "
                                 "filters")
    flops_fraction: float = Field(ge=0.0, description="executed / dense multiply-accumulates")
    max_anomaly: float = Field(description="largest layer anomaly")
    execution: str = Field(description="how the network ran: masked (every filter computed, "
                           "closed ones zeroed) or sparse (only open filters computed)")
    layers: list[LayerReport] | None = Field(
        None, description="gated layers, most anomalous first (left out with layers=false)")


class InputReport(BaseModel):
    filename: str | None = Field(None, description="the upload's file name")
    format: str = Field(description="file format: PNG, JPEG, WEBP or BMP")
    width: int = Field(description="width of the uploaded image")
    height: int = Field(description="height of the uploaded image")
    mode: str = Field(description="Pillow mode of the upload (L, RGB, RGBA, P, I;16, ...)")
    resized: bool = Field(description="scaled to the model's input size (bilinear)")
    converted: bool = Field(description="colour mode, bit depth or transparency changed")
    lossy: bool = Field(description="the file format compressed lossily (JPEG, lossy WebP)")
    model_input: list[int] = Field(description="(C, H, W) the model saw")
    note: str | None = Field(None, description="why the score may not reflect the original "
                             "pixels")


class ImageResult(BaseModel):
    prediction: Prediction
    adversarial: Adversarial
    path: PathReport
    input: InputReport


class Timing(BaseModel):
    decode_ms: float = Field(description="reading and decoding the upload(s)")
    queue_ms: float = Field(description="waiting for an inference worker")
    inference_ms: float = Field(description="the forward pass with the detector")
    total_ms: float = Field(description="in the handler, end to end")
    batch_size: int = Field(description="images in the forward pass this request shared")


class ClassifyResponse(ImageResult):
    model: ModelRef
    timing: Timing


class BatchResponse(BaseModel):
    model: ModelRef
    results: list[ImageResult] = Field(description="one per uploaded file, in upload order")
    timing: Timing


# --- perturb demo and web page --------------------------------------------------------------


class AttackReport(BaseModel):
    name: Literal["fgsm", "pgd"] = Field(description="the attack: FGSM (one step) or PGD (20 "
                                         "steps of eps/8 from a random start), L-inf")
    eps: float = Field(description="the L-inf budget asked for (pixel values in [0, 1])")
    attacked_class: ClassScore = Field(description="the class the attack pushed away from: "
                                       "the original image's prediction")
    linf: float = Field(description="largest pixel change of the perturbed image as returned "
                        "(rounded to 8 bits, within eps)")
    prediction_changed: bool = Field(description="the perturbed image's prediction differs")


class PerturbTiming(BaseModel):
    craft_ms: float = Field(description="crafting the perturbed image")
    total_ms: float = Field(description="in the handler, end to end")


class PerturbResponse(BaseModel):
    model: ModelRef
    attack: AttackReport
    original: ImageResult = Field(description="the uploaded image, as /classify reports it")
    perturbed: ImageResult = Field(description="its perturbed copy, scored as the PNG in "
                                   "'image' holds it")
    image: str = Field(description="the perturbed image as a data: URL of a PNG at the "
                       "model's input size; uploading it to /classify gives 'perturbed' again")
    timing: PerturbTiming


class PerturbSettings(BaseModel):
    enabled: bool = Field(description="whether POST /perturb is served (PATHGUARD_PERTURB)")
    attacks: list[str] = Field(description="attacks it offers")
    max_eps: float = Field(description="largest eps it accepts")
    default_eps: float = Field(description="eps used when none is given: the strength the "
                               "bundle's detector was evaluated at, capped at max_eps")
    per_minute: int = Field(description="requests a minute it serves")


class Sample(BaseModel):
    label: str = Field(description="the image's true class")
    url: str = Field(description="where to fetch the PNG")


class PageConfig(BaseModel):
    """What the web page needs before its first request."""

    key_required: bool = Field(description="the API routes need an X-API-Key header")
    perturb: PerturbSettings
    samples: list[Sample] = Field(description="test images of the served model's data set "
                                  "(empty if the package has none for it)")


# --- Open Inference Protocol -----------------------------------------------------------------

Parameters = dict[str, str | int | float | bool]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = []


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInput(BaseModel):
    name: str = Field(description="must be 'input'")
    shape: list[int] = Field(description="[N, C, H, W] with the model's C, H, W")
    datatype: str = Field(description="must be FP32")
    data: list[StrictFloat] = Field(description="N*C*H*W numbers in [0, 1], flat, row-major "
                                    "(NCHW)")
    parameters: Parameters | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: Parameters | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = Field(
        None, description="outputs to return (default: all)")
    parameters: Parameters | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[bool | int | float] = Field(description="flat, row-major")
    parameters: Parameters | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[InferOutput]


#: What each error status means, for the OpenAPI ``responses`` (codes as in docs/SERVICE.md).
ERROR_DESCRIPTIONS = {
    400: "empty upload, truncated or corrupt image, too many files, invalid tensor, or a body "
         "that cannot be parsed: malformed or cut-short multipart, invalid JSON (codes empty, "
         "corrupt_image, too_many_files, invalid_tensor, bad_request)",
    401: "API key missing or wrong (code unauthorized)",
    404: "another model name (code unknown_model)",
    408: "the request body did not arrive within body_timeout (code request_timeout)",
    413: "request body over max_body_bytes or over what the model can use, image over "
         "max_image_pixels or Pillow's decompression-bomb limit, or too costly to decode "
         "(codes content_too_large, image_too_large, image_too_complex)",
    415: "not an image, or an image format other than PNG, JPEG, WebP, BMP (codes "
         "not_an_image, unsupported_format)",
    422: "a well-formed body or query with missing or invalid fields (code validation_error)",
    429: "too many /perturb requests (code rate_limited)",
    503: "queue full, the model not loaded yet, or the inference worker gone (codes overloaded, "
         "not_ready, inference_failed)",
}

#: Headers that come with some error statuses.
ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "the header that carries the key (X-API-Key)",
                               "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying",
                          "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying",
                          "schema": {"type": "integer"}}},
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses: the :class:`ErrorBody`
    model, what the status means and the headers it carries."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code],
                   **({"headers": ERROR_HEADERS[code]} if code in ERROR_HEADERS else {})}
            for code in codes}
