"""A real demo IOC per test module, and the two EPICS providers pointed at it."""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest

from k2eg.stack.ioc import DemoIOC

BULK = 200


@contextmanager
def client_env(ioc: DemoIOC) -> Iterator[None]:
    """Providers read EPICS_* when built: expose the IOC's only while building them."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("EPICS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(ioc.client_env())
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("EPICS_")]:
            del os.environ[k]
        os.environ.update(saved)


@pytest.fixture(scope="module")
def demo_ioc(tmp_path_factory) -> Iterator[DemoIOC]:
    ioc = DemoIOC(tmp_path_factory.mktemp("ioc"), bulk=BULK)
    ioc.start()
    try:
        yield ioc
    finally:
        ioc.stop()


@pytest.fixture(scope="module")
def pva(demo_ioc):
    from k2eg.gateway.epics.pva import PVAProvider

    with client_env(demo_ioc):
        provider = PVAProvider()
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture(scope="module")
def ca(demo_ioc):
    from k2eg.gateway.epics.ca import CAProvider

    with client_env(demo_ioc):
        provider = CAProvider()
    try:
        yield provider
    finally:
        provider.close()


class Recorder:
    """Collects monitor events; waits are bounded so a silent PV fails instead of hanging."""

    def __init__(self):
        self.events: list[dict[str, Any]] = []
        self.threads: set[int] = set()
        self._cond = threading.Condition()

    def __call__(self, tree: dict[str, Any]) -> None:
        with self._cond:
            self.events.append(tree)
            self.threads.add(threading.get_ident())
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.events):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_count(self, n: int, timeout: float = 10.0) -> bool:
        return self.wait_for(lambda ev: len(ev) >= n, timeout)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.events)


@pytest.fixture
def recorder() -> Callable[[], Recorder]:
    return Recorder


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def check_idle_release(provider: Any, rec: Recorder, open_missing: Callable[[], int]) -> None:
    """A provider built with a 2 s idle timeout: what nothing uses goes, a monitor's channel stays.

    ``open_missing`` reads names that do not exist and returns the channel count it expects then
    (the monitor's included).
    """
    sub = provider.monitor("channel:counter", rec)
    assert rec.wait_count(1, 10)
    expected = open_missing()
    assert provider.channel_count() == expected
    assert provider.get("variable:a", 5)["value"] is not None
    assert wait_until(lambda: provider.channel_count() == 1), provider.channel_count()
    n = len(rec.events)
    assert rec.wait_count(n + 3, 10), "the monitor stopped delivering"
    assert provider.get("variable:a", 5)["value"] is not None  # a released name is opened again on use
    assert provider.info("channel:long", 5)["structure"]
    sub.close()
    assert wait_until(lambda: provider.channel_count() == 0), provider.channel_count()
