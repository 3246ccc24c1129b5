"""The real server in a subprocess, started the way an operator starts it.

:func:`serving` starts ``python -m service`` (settings through ``PATHGUARD_*`` environment
variables) on a free localhost port, in an empty working directory (so no stray ``.env`` file
changes its settings), waits until it reports ready, and stops it on exit. The server's stderr
goes to a log file, read by :meth:`Server.log`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


class ServerError(RuntimeError):
    """The server exited or is not ready; the message says where and carries its log's tail."""


@dataclass
class Server:
    """A running ``python -m service``: its process, base URL and stderr log file."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (graceful shutdown), wait up to ``timeout`` s (then kill); exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(bundle: Path, port: int, threads: int = 1,
               overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``PATHGUARD_*``, plus the server's settings.

    threads: the server's torch (and OpenMP / MKL) threads. ``overrides``: more
    ``PATHGUARD_*`` (or other) variables, applied last.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_")}
    env.update(PATHGUARD_BUNDLE=str(Path(bundle).resolve()), PATHGUARD_HOST="127.0.0.1",
               PATHGUARD_PORT=str(port), PATHGUARD_INFERENCE_THREADS=str(threads),
               PATHGUARD_LOG_LEVEL="warning", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    env.update(overrides or {})
    return env


def answers_ready(url: str, timeout: float = 10.0) -> bool:
    """Whether the server at base URL ``url`` answers ``/v2/health/ready`` with 200."""
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(server: Server, timeout: float) -> None:
    """Poll ``/v2/health/ready`` until 200; :class:`ServerError` if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerError(f"the server exited with status {server.proc.returncode}:\n"
                              f"{server.log()[-4000:]}")
        if answers_ready(server.url, timeout=1.0):
            return
        time.sleep(0.05)
    raise ServerError(f"the server was not ready within {timeout:g} s:\n{server.log()[-4000:]}")


@contextmanager
def serving(bundle: Path, *, env: Mapping[str, str] | None = None, threads: int = 1,
            ready_timeout: float = 120.0, stop_timeout: float = 30.0) -> Iterator[Server]:
    """``python -m service`` on ``bundle`` and a free port, ready; stopped (SIGTERM) on exit.

    env: extra variables for the server, e.g. ``{"PATHGUARD_MAX_QUEUE": "8"}``. The server is
    this interpreter (``sys.executable``), so it runs the installed ``service`` package.
    """
    with tempfile.TemporaryDirectory(prefix="pathguard-server-") as tmp:
        port = free_port()
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp,
                                    env=server_env(bundle, port, threads, env),
                                    stdout=subprocess.DEVNULL, stderr=log_file)
        server = Server(proc, f"http://127.0.0.1:{port}", log_path)
        try:
            wait_ready(server, ready_timeout)
            yield server
        finally:
            server.stop(stop_timeout)
