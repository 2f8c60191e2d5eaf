"""Per-PV rate caps, the periodic refresh and idle channel release against the real stack.

A stack of its own: its gateway caps nothing by default but refreshes quiet
PVs every REFRESH s and closes channels idle for IDLE s.
"""
from __future__ import annotations

import time
import uuid

import pytest

from k2eg.dml import dml

from ..stacks import own_stack
from .test_gateway_commands import Wire, b64, fresh_topic

pytestmark = pytest.mark.e2e

REFRESH = 2.0
IDLE = 3.0
WAIT = 30.0


@pytest.fixture(scope="module")
def rates_stack(tmp_path_factory):
    with own_stack(tmp_path_factory, "rates", "--monitor-refresh-period", str(REFRESH),
                   "--channel-idle-timeout", str(IDLE)) as s:
        yield s


@pytest.fixture(scope="module")
def wire(rates_stack):
    w = Wire(rates_stack.bootstrap, rates_stack.cmd_topic)
    yield w
    w.producer.flush(10)
    del w.producer


def _monitor(wire: Wire, uri: str, dest: str, **extra) -> dict:
    rec = wire.request({"command": "monitor", "pv_name": uri, "monitor_dest_topic": dest, **extra})
    assert rec.value["error"] == 0, rec.value
    return rec.value


def _values(reader, name: str) -> list:
    return [r.value[name]["value"] for r in reader.records if isinstance(r.value, dict) and name in r.value]


def test_a_capped_monitor_publishes_at_most_its_rate_and_the_newest_value(wire):
    """channel:counter counts at 10 Hz; capped at 2/s its topic gets about 2 values a second, newest first-come."""
    dest = fresh_topic("capped")
    with wire.reader(dest) as r:
        _monitor(wire, "pva://channel:counter", dest, max_events_per_second=2)
        r.wait(lambda rs: len(_values(r, "channel:counter")) >= 2)
        t0 = time.monotonic()
        first = len(_values(r, "channel:counter"))
        while time.monotonic() - t0 < 4.0:
            r.poll()
        values = _values(r, "channel:counter")
    got = len(values) - first
    assert 2 <= got <= 2 * 4 + 2, values  # at most the cap over the 4 s read, give or take an interval's edge
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s > 0 for s in steps), values  # never an older value after a newer one
    assert max(steps) >= 3, values  # values in between were left out, not queued
    status = wire.status()
    (entry,) = [m for m in status["monitors"] if dest in m["destinations"]]
    assert entry["max_events_per_second"] == {dest: 2.0} and entry["events_rate_capped"] > 0
    assert status["events_rate_capped"] >= entry["events_rate_capped"]


def test_the_last_value_of_a_burst_reaches_a_capped_monitor(wire):
    """Puts faster than the cap: the first goes out at once, the last at the end of its interval."""
    dest = fresh_topic("burst")
    with wire.reader(dest) as r:
        _monitor(wire, "ca://variable:b", dest, max_events_per_second=1)
        r.wait(lambda rs: len(_values(r, "variable:b")) >= 1)
        burst = [10.0 + i for i in range(8)]  # within the record's drive limits (±100)
        replies = fresh_topic("burst-reply")
        wire.request({"command": "get", "pv_name": "ca://variable:b", "reply_topic": replies})  # topic made
        with wire.reader(replies) as answers:
            for i, v in enumerate(burst):  # one after the other, each answered before the next
                wire.send({"command": "put", "pv_name": "ca://variable:b", "value": b64({"value": v}),
                           "reply_topic": replies, "reply_id": f"p{i}"})
                assert answers.reply(f"p{i}").value["error"] == 0
        r.wait(lambda rs: _values(r, "variable:b")[-1:] == [burst[-1]], what="the burst's last value")
        values = _values(r, "variable:b")
    assert len(values) < 1 + len(burst), values  # some of the burst was left out
    wire.request({"command": "put", "pv_name": "ca://variable:b", "value": b64({"value": 2.5})})


def test_a_quiet_pv_publishes_its_current_value_again_every_refresh_period(wire):
    dest = fresh_topic("refresh")
    with wire.reader(dest) as r:
        _monitor(wire, "ca://channel:long", dest)  # a record nobody writes: quiet
        r.wait(lambda rs: len(_values(r, "channel:long")) >= 3, timeout=REFRESH * 3 + WAIT)
        values = _values(r, "channel:long")
    assert set(values) == {values[0]}  # the same current value, again
    assert wire.status()["events_refreshed"] >= 2


def test_a_channel_nothing_uses_is_closed_after_the_idle_timeout(wire):
    """A get of a misspelled name opens a channel that searches; it is closed again once idle."""
    def ca_channels() -> int:
        return wire.status()["epics_channels"]["ca"]

    before = ca_channels()
    name = f"no:such:{uuid.uuid4().hex[:8]}"
    rec = wire.request({"command": "get", "pv_name": f"ca://{name}"})
    assert rec.value["error"] == -3
    assert ca_channels() == before + 1
    deadline = time.monotonic() + IDLE + WAIT
    while ca_channels() > before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ca_channels() <= before
