"""base.Deadlines: what is not cancelled expires once, in time, on the deadline thread."""
from __future__ import annotations

import threading
import time

from k2eg.gateway.epics.base import Deadlines


class _Expired:
    def __init__(self):
        self.names: list[tuple[str, float, str]] = []
        self.event = threading.Event()

    def __call__(self, name: str, n: int = 1):
        def expire():
            self.names.append((name, time.monotonic(), threading.current_thread().name))
            if len(self.names) >= n:
                self.event.set()
        return expire


def test_only_what_is_not_cancelled_expires_once_after_its_timeout():
    d, expired = Deadlines("test-deadlines"), _Expired()
    try:
        t0 = time.monotonic()
        d.add(0.2, expired("late"))
        d.cancel(d.add(0.1, expired("cancelled")))
        assert expired.event.wait(5)
        time.sleep(0.3)
        [(name, at, thread)] = expired.names
        assert name == "late" and at - t0 >= 0.2 and thread == "test-deadlines"
    finally:
        d.close()


def test_a_shorter_timeout_added_later_expires_first():
    """One FIFO per timeout: a short one must not wait behind a long one registered before it."""
    d, expired = Deadlines("test-deadlines"), _Expired()
    try:
        d.add(30, expired("long"))
        d.add(0.05, expired("short"))
        assert expired.event.wait(5)
        assert [n for n, _, _ in expired.names] == ["short"]
    finally:
        d.close()


def test_a_failing_expiry_does_not_stop_the_others():
    d, expired = Deadlines("test-deadlines"), _Expired()

    def boom():
        raise RuntimeError("bug in one expiry")

    try:
        d.add(0.05, boom)
        d.add(0.05, expired("after", 1))
        assert expired.event.wait(5)
    finally:
        d.close()


def test_close_stops_the_thread_and_nothing_expires_after():
    d, expired = Deadlines("test-deadlines"), _Expired()
    d.add(0.1, expired("never"))
    d.close()
    time.sleep(0.3)
    assert expired.names == [] and not d._thread.is_alive()
