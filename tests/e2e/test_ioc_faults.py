"""IOC down and back, seen the way a client sees it: through the monitor topics and get replies.

A stack of its own (the IOC is stopped and restarted), gateway with a 2 s PV
connection timeout. CA and PVA watch the same 10 Hz record under two names
(``channel:counter`` and ``channel:counter.VAL``) so their events land on two
topics.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from k2eg import OperationError
from k2eg.dml import dml

from ..stacks import own_stack

pytestmark = pytest.mark.e2e

CONNECT_TIMEOUT = 2.0
URIS = {"ca": "ca://channel:counter", "pva": "pva://channel:counter.VAL"}
INVALID = 3


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory):
    with own_stack(tmp_path_factory, "iocfaults", "--pv-connection-timeout", str(CONNECT_TIMEOUT)) as s:
        yield s


@pytest.fixture
def client(fault_stack):
    with dml(fault_stack.environment, f"faults-{uuid.uuid4().hex[:8]}") as k:
        yield k


class Events:
    """Monitor events as a client's handler gets them, with their arrival time."""

    def __init__(self):
        self.items: list[tuple[float, dict]] = []
        self._cond = threading.Condition()

    def __call__(self, _name: str, value: dict) -> None:
        with self._cond:
            self.items.append((time.monotonic(), value))
            self._cond.notify_all()

    def wait(self, predicate, since: float, timeout: float) -> tuple[float, dict] | None:
        """The first event after ``since`` matching ``predicate``, or None once ``timeout`` passed."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, v in self.items:
                    if t >= since and predicate(v):
                        return t, v
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def wait_count(self, n: int, since: float, predicate, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while sum(1 for t, v in self.items if t >= since and predicate(v)) < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


def disconnected(v: dict) -> bool:
    alarm = v.get("alarm", {})
    return alarm.get("severity") == INVALID and "disconnected" in str(alarm.get("message", "")).lower()


def live(v: dict) -> bool:
    return v.get("alarm", {}).get("severity") != INVALID


def monitor_all(k) -> dict[str, Events]:
    events = {proto: Events() for proto in URIS}
    for proto, uri in URIS.items():
        k.monitor(uri, events[proto], 30)
    t0 = time.monotonic() - 60  # the value re-published at subscribe counts too
    for proto, ev in events.items():
        assert ev.wait(live, t0, 30), f"no value from {URIS[proto]} before the fault"
    return events


def restart_cycle(stack, k, events: dict[str, Events], crash: bool) -> dict[str, float]:
    """Take the IOC away, check what clients see while it is gone, bring it back; seconds to the first value."""
    ports = stack.ioc.ports
    t_down = time.monotonic()
    if crash:
        stack.ioc.kill()
    else:
        stack.stop_ioc()
    for proto, ev in events.items():
        got = ev.wait(disconnected, t_down, 20)
        assert got, f"{URIS[proto]}: no disconnected event (severity {INVALID}) on the topic within 20 s"

    for uri in URIS.values():  # a get of a disconnected PV is an error reply, not a hang
        t = time.monotonic()
        with pytest.raises(OperationError) as err:
            k.get(uri, 30)
        took = time.monotonic() - t
        assert took < CONNECT_TIMEOUT + 8, f"get of {uri} took {took:.1f} s to fail"
        assert err.value.error != 0 and str(err.value.args[0])

    stack.start_ioc()
    assert stack.ioc.ports == ports, "the restarted IOC must keep its ports"
    t_up = time.monotonic()
    back = {}
    for proto, ev in events.items():
        got = ev.wait(live, t_up, 60)
        assert got, f"{URIS[proto]}: no value within 60 s after the IOC came back"
        back[proto] = round(got[0] - t_up, 2)
    for proto, ev in events.items():  # values keep coming, not just one
        assert ev.wait_count(5, t_up, live, 30), f"{URIS[proto]}: values stopped after the first one"
    for uri in URIS.values():
        assert isinstance(k.get(uri, 30)["value"], (int, float))
    return back


def test_ioc_stop_and_restart_reach_monitor_clients(fault_stack, client):
    events = monitor_all(client)
    back = restart_cycle(fault_stack, client, events, crash=False)
    print(f"\nreconnection (IOC answering -> first value at the client): {back}")


def test_ioc_crash_and_restart(fault_stack, client):
    events = monitor_all(client)
    back = restart_cycle(fault_stack, client, events, crash=True)
    print(f"\nreconnection after a crash (IOC answering -> first value at the client): {back}")
    status = client.status()
    monitored = {m["pv"]: m for m in status["monitors"]}
    for uri in URIS.values():
        assert monitored[uri]["connected"], monitored.get(uri)


NOT_UP = {"ca": "ca://channel:ramp:ramp", "pva": "pva://channel:ramp:ramp.VAL"}  # monitored by no other test here


def test_a_monitor_of_a_pv_whose_ioc_is_not_up_is_kept_and_delivered_once_it_connects(fault_stack, client):
    """PROTOCOL 4: accepted (error 0, the message says not connected yet), a disconnected event on its
    topic meanwhile, values once the IOC is up. A second client's monitor of the same PV, also refused
    no more, leaves the first one's in place."""
    fault_stack.stop_ioc()
    try:
        events = {proto: Events() for proto in NOT_UP}
        t0 = time.monotonic()
        for proto, uri in NOT_UP.items():
            reply = client.monitor(uri, events[proto], 30)
            assert reply["error"] == 0 and "not connected yet" in reply["message"], reply
        for proto, ev in events.items():
            assert ev.wait(disconnected, t0, 20), f"{NOT_UP[proto]}: no disconnected event on its topic"
        with dml(fault_stack.environment, f"faults-{uuid.uuid4().hex[:8]}") as other:
            for uri in NOT_UP.values():
                assert other.monitor(uri, lambda *_: None, 30)["error"] == 0
            monitored = {m["pv"]: m for m in other.status()["monitors"]}
        for uri in NOT_UP.values():
            assert not monitored[uri]["connected"] and monitored[uri]["destinations"], monitored.get(uri)
    finally:
        fault_stack.start_ioc()
    t_up = time.monotonic()
    back = {}
    for proto, ev in events.items():
        got = ev.wait(live, t_up, 60)
        assert got, f"{NOT_UP[proto]}: no value within 60 s after its IOC came up"
        assert isinstance(got[1]["value"], (int, float))
        back[proto] = round(got[0] - t_up, 2)
    print(f"\nfirst value of a monitor made while its IOC was down (IOC up -> value at the client): {back}")
