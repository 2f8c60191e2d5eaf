import threading
import time

from k2eg.gateway.memory import Trimmer, _malloc_trim


class Counting:
    def __init__(self):
        self.n = 0
        self.done = threading.Event()

    def __call__(self):
        self.n += 1
        self.done.set()


def test_a_burst_of_changes_gives_one_trim_once_quiet():
    trim = Counting()
    t = Trimmer(trim, quiet=0.2, latest=30)
    try:
        for _ in range(1000):
            t.changed()
        assert not trim.done.wait(0.1)  # still inside the quiet period
        assert trim.done.wait(5)
        time.sleep(0.5)
        assert trim.n == 1 and t.trims == 1
    finally:
        t.close()


def test_steady_churn_still_trims_by_the_latest_time():
    trim = Counting()
    t = Trimmer(trim, quiet=0.3, latest=0.6)
    try:
        end = time.monotonic() + 5
        while not trim.done.is_set() and time.monotonic() < end:
            t.changed()  # never quiet for 0.3 s
            time.sleep(0.05)
        assert trim.done.is_set()
    finally:
        t.close()


def test_no_change_no_trim_and_a_failing_trim_is_survived():
    calls = []

    def broken():
        calls.append(1)
        raise OSError("no")

    t = Trimmer(broken, quiet=0.05, latest=1)
    try:
        time.sleep(0.2)
        assert calls == []
        t.changed()
        time.sleep(0.3)
        t.changed()
        time.sleep(0.3)
        assert len(calls) == 2 and t.trims == 0
    finally:
        t.close()


def test_glibc_trim_is_found_and_runs():
    trim = _malloc_trim()
    assert trim is not None  # this project's machines run glibc
    assert trim() in (0, 1)
