"""``python -m service``: serve the detector with uvicorn.

Settings come from ``PATHGUARD_*`` environment variables or a ``.env`` file in the working
directory (see :class:`service.config.Settings`, or ``python -m service --help``); the
command-line flags ``--host``, ``--port``, ``--bundle``, ``--workers`` and ``--log-level``
override them, as with other uvicorn-style servers. The bundle is checked before the server
starts; without a usable one the command exits with status 2 and says how to build one.

Slow and idle clients: request heads have ``header_timeout`` seconds (:mod:`service.protocol`),
bodies ``body_timeout`` (:mod:`service.limits`), idle keep-alive connections
``keep_alive_timeout``; beyond ``max_connections`` a new connection gets 503 and is closed.

SIGTERM (and Ctrl+C) shut down gracefully: uvicorn stops accepting connections, in-flight
requests finish (at most ``shutdown_timeout`` seconds), the micro-batcher drains, and the
command exits with status 0.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.config import LOGGING_CONFIG

from detector.bundle import BundleError, load_bundle
from service.app import create_app
from service.config import ENV_PREFIX, Settings, bundle_help
from service.protocol import protocol_factory

log = logging.getLogger("service")


def _settings_help() -> str:
    lines = ["settings (environment variables, or a .env file):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {ENV_PREFIX}{name.upper():<22} {field.description or ''} "
                     f"(default: {default})")
    return "\n".join(lines)


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config plus this package's loggers (applied in every worker)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    for name in ("service", "detector"):
        config["loggers"][name] = {"handlers": ["default"], "level": level.upper(),
                                   "propagate": False}
    return config


def _graceful_exit(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler in force after uvicorn's own: the server has already shut down."""
    log.info("stopped by %s", signal.Signals(signum).name)


@contextmanager
def _sigterm_after_shutdown_is_clean() -> Iterator[None]:
    """Make the SIGTERM that uvicorn re-raises after its graceful shutdown a clean exit.

    uvicorn handles SIGTERM itself while it runs, restores the previous handler, then raises
    the signal again; with the default handler the process would die of it (status -15,
    143 in a shell) after a clean shutdown. With this no-op handler it exits with status 0.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _graceful_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Command-line flags: setting name -> (flag, metavar). Each overrides its PATHGUARD_ variable.
FLAGS = {"host": ("--host", "HOST"), "port": ("--port", "PORT"), "bundle": ("--bundle", "DIR"),
         "workers": ("--workers", "N"), "log_level": ("--log-level", "LEVEL")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Serve the adversarial-example detector. Flags "
        "override the environment variables and the .env file listed below.",
        epilog=_settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (flag, metavar) in FLAGS.items():
        field = Settings.model_fields[name]
        parser.add_argument(flag, dest=name, metavar=metavar, default=None,
                            help=f"{field.description} (else {ENV_PREFIX}{name.upper()}, "
                                 f"default: {field.get_default()})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        sys.stderr.write(f"python -m service: invalid settings:\n{e}\n")
        return 2
    if settings.workers > 1:  # worker processes build their settings from the environment
        for name in overrides:
            os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(getattr(settings, name))
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Load and verify it all (hashes, version, allow-listed detector types, weight shapes)
        # before uvicorn starts: a clean message and status 2, not a startup traceback. A single
        # process serves this bundle; worker processes each load their own.
        bundle = load_bundle(settings.bundle)
    except BundleError as e:
        log.error("%s", bundle_help(settings.bundle, str(e)))
        return 2
    common = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
              "access_log": settings.access_log, "log_config": _log_config(settings.log_level),
              "timeout_graceful_shutdown": settings.shutdown_timeout,
              "timeout_keep_alive": settings.keep_alive_timeout,
              "http": protocol_factory(settings.header_timeout, settings.max_connections,
                                       settings.http)}
    with _sigterm_after_shutdown_is_clean():
        if settings.workers == 1:
            uvicorn.run(create_app(settings, bundle), **common)
        else:  # each worker process builds its app from the same environment
            uvicorn.run("service.app:create_app", factory=True, workers=settings.workers,
                        **common)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
