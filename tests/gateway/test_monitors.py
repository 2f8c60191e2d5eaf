"""The monitor hub's pure parts (the rate cap's state machine) and its timed duties, with a fake provider."""
from __future__ import annotations

import threading
import time

import pytest

from k2eg.gateway.monitors import MonitorHub, Throttle, combined_cap
from k2eg.protocol.codec import decode
from k2eg.protocol.commands import Serialization
from k2eg.protocol.uri import parse_pv_uri


# ---------------------------------------------------------------------------- Throttle (pure)
def test_first_value_goes_out_at_once_and_starts_an_interval():
    t = Throttle(2.0)
    assert t.interval == 0.5
    assert t.offer("a") == ("a", True)


def test_inside_an_interval_the_newest_value_waits_for_its_end_and_older_ones_are_skipped():
    t = Throttle(10.0)
    t.offer(1)
    assert t.offer(2) == (None, False)
    assert t.offer(3) == (None, False)
    assert t.offer(4) == (None, False)
    assert t.skipped == 2  # 2 and 3: replaced by a newer value before they could go out
    assert t.tick() == (4, True)  # the last one of the interval, at its end; the next interval starts
    assert t.tick() == (None, False)  # a quiet interval: nothing pending, no further tick
    assert t.offer(5) == (5, True)  # quiet since: at once again
    assert t.skipped == 2


def test_a_cap_is_never_more_than_one_value_per_interval():
    """Whatever the arrival pattern, one publication per offer-or-tick slot, never two in one interval."""
    t = Throttle(5.0)
    out = []
    for step in range(100):
        for v in range(step % 4):  # 0..3 values per interval
            got, _ = t.offer((step, v))
            if got is not None:
                out.append(got)
        got, _ = t.tick() if t.running else (None, False)
        if got is not None:
            out.append(got)
    assert len(out) <= 100
    assert out == sorted(out)  # never an older value after a newer one
    offered = sum(step % 4 for step in range(100))
    assert len(out) + t.skipped == offered  # each value is either published or counted as skipped


def test_a_cap_must_be_positive():
    with pytest.raises(ValueError):
        Throttle(0)


def test_the_tightest_cap_wins():
    assert combined_cap(None, None) is None and combined_cap(0.0, None) is None
    assert combined_cap(10.0, None) == 10.0 and combined_cap(0.0, 3.0) == 3.0 and combined_cap(10.0, 3.0) == 3.0
    assert combined_cap(2.0, 30.0) == 2.0  # a client cannot raise the operator's cap


# ---------------------------------------------------------------------------- the hub's timed duties
class Provider:
    protocol = "pva"
    disconnected_status = 7

    def __init__(self):
        self.cb = None

    def monitor(self, name, on_event):
        self.cb = on_event
        return self

    def close(self):
        pass


class Published:
    def __init__(self):
        self.items: list[tuple[float, str, dict]] = []
        self.cond = threading.Condition()

    def __call__(self, topic, key, data, ser):
        with self.cond:
            self.items.append((time.monotonic(), topic, decode(data, ser.header)[key]))
            self.cond.notify_all()

    def values(self, topic):
        with self.cond:
            return [v["value"] for _, t, v in self.items if t == topic]

    def wait(self, predicate, timeout=10.0):
        end = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                if not self.cond.wait(max(0.0, end - time.monotonic())) and time.monotonic() > end:
                    return False
            return True


PV = parse_pv_uri("pva://x")


@pytest.fixture
def parts():
    """A hub without refresh, its provider and what it published."""
    provider, pub = Provider(), Published()
    hub = MonitorHub({"pva": provider}, pub)
    yield hub, provider, pub
    hub.close()


def test_a_capped_destination_gets_the_last_value_of_a_burst_and_an_uncapped_one_every_value(parts):
    hub, provider, pub = parts
    hub.add_destination(PV, "capped", Serialization.MSGPACK, max_rate=5.0)
    hub.add_destination(PV, "all", Serialization.MSGPACK)
    for i in range(20):
        provider.cb({"value": i})
    assert pub.values("all") == list(range(20))
    assert pub.wait(lambda: 19 in pub.values("capped"))  # the burst's last value, at the interval's end
    assert pub.values("capped") == [0, 19]
    assert hub.skipped() == 18
    times = [t for t, topic, _ in pub.items if topic == "capped"]
    assert times[1] - times[0] >= 0.2 * 0.9  # 5/s: the second one waited for the interval's end
    hub.remove_destination(PV, "capped")
    assert hub.skipped() == 18  # the total only grows


def test_a_repeated_command_changes_a_destinations_cap(parts):
    hub, provider, pub = parts
    hub.add_destination(PV, "d", Serialization.MSGPACK, max_rate=1.0)
    hub.add_destination(PV, "d", Serialization.MSGPACK)  # no cap any more
    assert hub.get(PV).throttles is None
    for i in range(5):
        provider.cb({"value": i})
    assert pub.values("d") == list(range(5))


def test_refresh_republishes_the_current_value_of_quiet_pvs_only():
    provider, pub = Provider(), Published()
    hub = MonitorHub({"pva": provider}, pub, refresh_period=0.2)
    try:
        hub.add_destination(PV, "d", Serialization.MSGPACK)
        provider.cb({"value": 7})
        assert pub.wait(lambda: pub.values("d").count(7) >= 3)  # the same current value, again and again
        assert hub.refreshes >= 2
    finally:
        hub.close()
    busy_provider, busy_pub = Provider(), Published()
    busy = MonitorHub({"pva": busy_provider}, busy_pub, refresh_period=1.0)
    try:
        busy.add_destination(PV, "d", Serialization.MSGPACK)
        end = time.monotonic() + 2.5
        i = 0
        while time.monotonic() < end:  # an event every 50 ms: never quiet for a whole period
            busy_provider.cb({"value": i})
            i += 1
            time.sleep(0.05)
        assert busy_pub.values("d") == list(range(i)) and busy.refreshes == 0
    finally:
        busy.close()


def test_no_timer_thread_without_a_cap_or_a_refresh(parts):
    hub, provider, pub = parts
    hub.add_destination(PV, "d", Serialization.MSGPACK)
    provider.cb({"value": 1})
    assert hub._timer is None and pub.values("d") == [1]
