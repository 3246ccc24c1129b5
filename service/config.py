"""Service settings from environment variables (prefix ``PATHGUARD_``) or a ``.env`` file.

Example: ``PATHGUARD_BUNDLE=runs/digits/detector/bundle PATHGUARD_PORT=9000 python -m service``.
Environment variables override the ``.env`` file; unknown ``PATHGUARD_*`` names are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PATHGUARD_"
DEFAULT_BUNDLE = Path("runs/digits/detector/bundle")
#: Where forward passes run (:mod:`service.inference`).
InferenceMode = Literal["process", "thread"]
#: The HTTP parser of the server's connections (:mod:`service.protocol`).
HttpParser = Literal["httptools", "h11"]


class Settings(BaseSettings):
    """Everything the server can be told; defaults suit one CPU process on localhost."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env",
                                      env_file_encoding="utf-8", extra="ignore")

    bundle: Path = Field(DEFAULT_BUNDLE, description="bundle directory written by "
                         "`python -m training.fit_detector`")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    workers: int = Field(1, ge=1, description="server processes; each loads its own model")
    replicas: int = Field(1, ge=1, description="Ray Serve replicas (`serve run "
                          "service.ray_serve:build_app`), each a process with its own model; "
                          "the plain server ignores it")
    max_replicas: int = Field(0, ge=0, description="above replicas: Ray Serve autoscales "
                              "between replicas and max_replicas on ongoing requests per "
                              "replica (target max_batch_size); 0: a fixed replicas count")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level of the server")
    access_log: bool = Field(False, description="one log line per request (metrics count "
                             "requests either way)")

    inference: InferenceMode = Field(
        "process", description="where forward passes run: process, worker processes with "
        "their own copy of the bundle, so that request parsing in the server process cannot "
        "hold them up; thread, threads of the server process (less memory, no start-up)")
    inference_threads: int = Field(1, ge=1, description="torch intra-op threads per "
                                   "inference worker")
    inference_workers: int = Field(1, ge=1, description="forward passes that may run at once "
                                   "(inference worker processes or threads)")
    decode_workers: int = Field(2, ge=1, description="image decodes that may run at once")
    micro_batch: bool = Field(True, description="merge concurrent requests into one forward "
                              "pass")
    max_batch_size: int = Field(32, ge=1, description="most images merged into one forward "
                                "pass by the micro-batcher")
    batch_wait_ms: float = Field(0.0, ge=0.0, le=1000.0, description="how long an idle "
                                 "micro-batcher waits for more requests before it runs "
                                 "(0: run what is queued at once)")
    execution: Literal["auto", "masked", "sparse"] = Field(
        "auto", description="masked: every filter computed, closed ones zeroed; sparse: only "
        "open filters run (pays only for wide layers, see docs/RESULTS.md); auto: time both at "
        "start-up, at batch 1 and at the largest batch, and use sparse where it is more than 10 % "
        "faster")
    max_queue: int = Field(256, ge=1, description="images queued or running; beyond it "
                           "requests get 503")
    shutdown_timeout: int = Field(8, ge=1, description="seconds in-flight requests get to "
                                  "finish after SIGTERM before they are cancelled (below "
                                  "Docker's default 10 s stop grace period)")

    header_timeout: float = Field(10.0, gt=0, description="seconds a connection has to send "
                                  "a request's complete headers (from connecting, or from the "
                                  "previous response); then it is closed with 408")
    body_timeout: float = Field(30.0, gt=0, description="seconds a request has to send its "
                                "whole body once its headers are in; then 408 and the "
                                "connection is closed")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle keep-alive "
                                      "connection stays open between requests")
    max_connections: int = Field(512, ge=1, description="open connections per server "
                                 "process; a connection beyond it gets 503 and is closed")
    http: HttpParser = Field(
        "httptools", description="HTTP parser: httptools (C) or h11 (pure Python, slower: "
        "under abusive traffic its parsing holds up valid requests)")

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="largest request body; "
                                "beyond it 413")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest decoded image "
                                  "(width x height); Pillow's own bomb limit also applies")
    max_files: int = Field(32, ge=1, description="most images per /classify/batch request "
                           "or OIP infer request")
    alpha_background: Literal["black", "white"] = Field(
        "black", description="colour transparent pixels are composited onto")

    api_key: SecretStr | None = Field(None, description="if set, required in the X-API-Key "
                                      "header of /classify and /v2/models/* requests")
    metrics_require_key: bool = Field(False, description="also require the API key for "
                                      "/metrics")

    perturb: bool = Field(False, description="serve POST /perturb and the web page's "
                          "'perturb it' control: an FGSM or PGD copy of an uploaded image, "
                          "crafted on the server (CPU: PGD is 20 forward and backward passes)")
    perturb_per_minute: int = Field(10, ge=1, description="most /perturb requests per minute "
                                    "per process (one at a time); beyond it 429")
    perturb_max_eps: float = Field(0.3, gt=0.0, le=1.0, description="largest L-inf "
                                   "perturbation /perturb accepts (pixel values in [0, 1])")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queue < self.max_files:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_files "
                             f"({self.max_files}) or a full batch request could never run")
        return self


def bundle_help(bundle: Path, problem: str) -> str:
    """The message the server gives when ``bundle`` cannot be served, with how to fix it."""
    return (f"cannot serve the model bundle at {bundle}: {problem}\n"
            f"Build a bundle with `python -m training.fit_detector` (it writes "
            f"{DEFAULT_BUNDLE} by default), or point {ENV_PREFIX}BUNDLE at an existing "
            f"bundle directory.")
