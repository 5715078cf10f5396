"""Resident memory of this process, and its peak over a stretch of work (a sampling thread): what the memory
benchmarks on the CPU report."""

from __future__ import annotations

import resource
import threading
import time


def rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


class PeakMemory:
    """Samples the resident memory every millisecond from construction; :meth:`stop` gives the largest seen,
    less the resident memory at construction, in GiB."""

    def __init__(self) -> None:
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        return (self.peak - self.base) / 2**30
