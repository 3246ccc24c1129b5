"""Resources a server process uses, seen from outside: CPU seconds, resident memory (RSS) and
its peak, for a process alone or with its children (psutil; the kernel's peak mark from Linux
``/proc``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """Process ``pid`` and its live descendants (server workers, inference workers, the fork
    server that starts them)."""
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and its descendants."""
    total = 0
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return int(total)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` and its live descendants."""
    total = 0.0
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` to its current RSS; False where that is not
    allowed (then sample with :class:`PeakSampler`)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss(pid: int) -> int:
    """The kernel's peak-RSS mark of ``pid`` (VmHWM) in bytes: since start or since
    :func:`reset_peak_rss`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def reset_tree_peak_rss(pid: int) -> bool:
    """:func:`reset_peak_rss` for ``pid`` and each of its descendants; False if any refused."""
    return all([reset_peak_rss(p.pid) for p in tree(pid)])  # a list: reset every one


def tree_peak_rss(pid: int) -> int:
    """The sum of the peak-RSS marks of ``pid`` and its live descendants: an upper bound on
    their peak together (pages they share count once per process)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            total += peak_rss(p.pid)
    return total


class PeakSampler:
    """The largest value of ``measure()`` (e.g. an RSS), sampled every ``every`` seconds in a
    thread while the ``with`` block runs, and once at each end."""

    def __init__(self, measure: Callable[[], float], every: float) -> None:
        self.measure, self.every = measure, every
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.measure())

    def __enter__(self) -> PeakSampler:
        self.peak = self.measure()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())
