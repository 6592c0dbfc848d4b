"""Peak resident memory and wall time of a block of work, sampled from a background thread.

`resource.getrusage` only reports the process-lifetime peak, which cannot attribute memory to
one stage of a pipeline; sampling RSS every few milliseconds can.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator


class PeakRSS:
    """with PeakRSS() as m: ...  ->  m.peak_bytes, m.start_bytes, m.seconds."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_bytes = 0
        self.start_bytes = 0
        self.seconds = 0.0

    def __enter__(self) -> "PeakRSS":
        import psutil

        self._proc = psutil.Process()
        self.start_bytes = self.peak_bytes = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
        self.seconds = time.perf_counter() - self._t0


@contextlib.contextmanager
def timed(logger: logging.Logger, what: str) -> Iterator[None]:
    """Log `what: N.NN s` at DEBUG when the block ends (`llmc -v` shows per-step timings; a
    disabled logger costs one level check)."""
    if not logger.isEnabledFor(logging.DEBUG):
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        logger.debug("%s: %.2f s", what, time.perf_counter() - start)
