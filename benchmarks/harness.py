"""The real server in a subprocess, for benchmarks and end-to-end tests.

:func:`serving` starts ``python -m service`` exactly as an operator would (settings through
``PATHGUARD_*`` environment variables) on a free localhost port, in an empty working
directory (so no stray ``.env`` file changes its settings), waits until it reports ready, and
stops it on exit. The server's stderr goes to a log file, read by :meth:`Server.log`.

Small helpers for driving it: :func:`process_cpu` (CPU seconds of a process),
:func:`metric_value` (one sample from the Prometheus text of ``/metrics``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """The server exited or did not become ready; the message carries its log's tail."""


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

    ``overrides``: more ``PATHGUARD_*`` (or other) variables, applied last.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_")}
    env.update(PATHGUARD_BUNDLE=str(Path(bundle).resolve()), PATHGUARD_HOST="127.0.0.1",
               PATHGUARD_PORT=str(port), PATHGUARD_INFERENCE_THREADS=str(threads),
               PATHGUARD_LOG_LEVEL="warning", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    env.update(overrides or {})
    return env


def wait_ready(server: Server, timeout: float) -> None:
    """Poll ``/v2/health/ready`` until 200; :class:`ServerError` if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerError(f"the server exited with status {server.proc.returncode}:\n"
                              f"{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise ServerError(f"the server was not ready within {timeout:g} s:\n{server.log()[-4000:]}")


@contextmanager
def serving(bundle: Path, *, env: Mapping[str, str] | None = None, threads: int = 1,
            ready_timeout: float = 120.0, stop_timeout: float = 30.0) -> Iterator[Server]:
    """``python -m service`` on ``bundle`` and a free port, ready; stopped (SIGTERM) on exit.

    env: extra variables for the server, e.g. ``{"PATHGUARD_MAX_QUEUE": "8"}``.
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


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_value(metrics_text: str, name: str, default: float = 0.0) -> float:
    """The value of the unlabelled sample ``name`` in Prometheus text (``default`` if absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics_text, flags=re.MULTILINE)
    return float(match.group(1)) if match else default
