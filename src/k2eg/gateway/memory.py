"""Give freed heap back to the system after the set of subscriptions changed.

glibc keeps memory freed by a thread in that thread's arena. Subscribing 10k
PVs (one command, its topics, the first burst of values from libca/pvxs and
librdkafka threads) left ~70 MB resident that nothing used any more; one
``malloc_trim(0)`` returned it (531 -> 458 MB) and it stayed returned
(bench/EXPERIMENTS.md row 29). PVs dropped are followed by a trim too.
A trim takes ~0.1 s of one thread, so it waits for the churn to settle.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger("k2eg.gateway.memory")

QUIET_S = 5.0      # trim once subscriptions stopped changing this long...
LATEST_S = 60.0    # ...or this long after the first change, under steady churn (recurring snapshots)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0); None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Trimmer:
    """``changed()`` is cheap (called once per PV subscribed or dropped); one thread does the trims."""

    def __init__(self, trim: Callable[[], object] | None = None, quiet: float = QUIET_S, latest: float = LATEST_S):
        self._trim = trim if trim is not None else _malloc_trim()
        self.quiet, self.latest = quiet, latest
        self.trims = 0
        self._first = self._last = 0.0    # monotonic times of the first and last change not yet trimmed
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if self._trim is not None:
            self._thread = threading.Thread(target=self._run, name="k2eg-memory-trim", daemon=True)
            self._thread.start()

    def changed(self) -> None:
        now = time.monotonic()
        if not self._wake.is_set():
            self._first = now
        self._last = now
        self._wake.set()

    def _run(self) -> None:
        while self._wake.wait() and not self._closed:
            while not self._closed:
                now = time.monotonic()
                due = min(self._last + self.quiet, self._first + self.latest)
                if now >= due:
                    break
                time.sleep(min(due - now, self.quiet))
            if self._closed:
                return
            self._wake.clear()  # changes from here on start the next round
            before = _rss_mb()
            try:
                self._trim()
                self.trims += 1
            except Exception:  # never worth more than a log line
                log.exception("malloc_trim failed")
            else:
                log.info("freed heap returned to the system: resident %.0f -> %.0f MB", before, _rss_mb())

    def close(self) -> None:
        self._closed = True
        self._wake.set()
