"""Snapshots end to end: our client, the real gateway, Kafka and the demo IOC (CA and PVA).

Windows are short (100-500 ms) to keep the module fast; no assertion depends
on how long something took, only on what arrived and in which order.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from k2eg import OperationError
from k2eg.broker import SnapshotProperties, SnapshotType
from k2eg.protocol import commands as C
from k2eg.protocol import replies as R
from k2eg.protocol.snapshots import is_unreadable
from k2eg.protocol.uri import PVUri, parse_pv_uri, snapshot_topic

from ..conftest import BULK
from ..stacks import app_with_a_small_reply_topic

pytestmark = pytest.mark.e2e
PROTOS = ["ca", "pva"]
T = 30  # generous upper bound for any single wait; never reached when things work
BULK_NAMES = [f"bulk:{i:03d}" for i in range(BULK)]
TIMINGS: dict[str, float] = {}


class Calls:
    """A repeating-snapshot handler that records (name, data) and lets tests wait for a count."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.cond = threading.Condition()

    def __call__(self, name: str, data: dict) -> None:
        with self.cond:
            self.calls.append((name, data))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = T) -> list[dict]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.calls) >= n, timeout), f"{len(self.calls)} of {n} iterations"
            return [d for _, d in self.calls]

    def wait_iteration(self, it: int, timeout: float = T) -> list[dict]:
        with self.cond:
            assert self.cond.wait_for(lambda: any(d["iteration"] >= it for _, d in self.calls), timeout)
            return [d for _, d in self.calls]

    @property
    def data(self) -> list[dict]:
        with self.cond:
            return [d for _, d in self.calls]


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def props(snapshot_name, uris, **kw) -> SnapshotProperties:
    return SnapshotProperties(snapshot_name=snapshot_name, pv_uri_list=list(uris), **kw)


def read_topic(stack, topic: str, until, timeout: float = T) -> list[dict]:
    """Every record of ``topic`` from the beginning, until ``until(records)`` holds."""
    from k2eg.protocol.codec import HEADER, decode

    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"raw-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while not until(out) and time.monotonic() < deadline:
            for m in c.consume(100, 0.2):
                if m.error() is None:
                    out.append(decode(m.value(), dict(m.headers() or ()).get(HEADER)))
        return out
    finally:
        c.close()


def tail_of(it):
    return lambda recs: any(r.get("message_type") == R.TAIL and r.get("iter_index") == it for r in recs)


def raw(k, cmd: C.Command, timeout: float = T) -> dict:
    """Send a command as built (even an invalid one) and return the gateway's reply."""
    rec = k._t.request(cmd, timeout)
    assert rec is not None, "no reply"
    return rec


def envelope(k) -> dict:
    return {"reply_topic": k.reply_topic, "reply_id": uuid.uuid4().hex}


# ----------------------------------------------------------------------------- one-shot

def test_one_shot_pv_whose_record_the_broker_refuses_gets_an_error_record(stack, app_name):
    """The reply topic takes less than the image's record: the image PV is reported, not silently missing."""
    from k2eg.dml import dml

    small = app_with_a_small_reply_topic(stack, app_name)
    with dml(stack.environment, small) as k:
        snap = k.snapshot_sync(["pva://pva:image", "pva://variable:a"], timeout=T, time_window_msec=200)
    assert set(snap) == {"pva:image", "variable:a", "error"} and snap["error"] == 0
    [image] = snap["pva:image"]
    assert is_unreadable(image) and "max.message.bytes" in image["alarm"]["message"]
    assert f"{small}-reply" in image["alarm"]["message"]
    # The broker refuses a whole batch; a small record that went down with the image's is sent again alone.
    [scalar] = snap["variable:a"]
    assert not is_unreadable(scalar) and scalar["value"] is not None


@pytest.mark.parametrize("proto", PROTOS)
def test_one_shot_each_pv_once_then_completion(k, proto):
    uris = [f"{proto}://variable:a", f"{proto}://channel:ramp:ramp", f"{proto}://channel:enum",
            f"{proto}://channel:waveform", f"{proto}://variable:a"]          # a duplicate is served once
    if proto == "pva":
        uris.append("pva://pva:table")
    snap = k.snapshot_sync(uris, timeout=T, time_window_msec=300)
    names = {u.split("://")[1] for u in uris}
    assert set(snap) == names | {"error"} and snap["error"] == 0
    for n in names:
        assert len(snap[n]) == 1, n
        assert not is_unreadable(snap[n][0])
    assert isinstance(snap["variable:a"][0]["value"], float)
    assert snap["variable:a"][0]["timeStamp"]["secondsPastEpoch"] > 1_600_000_000
    assert set(snap["channel:enum"][0]["value"]) == {"index", "choices"}
    assert len(snap["channel:waveform"][0]["value"]) == 16


def test_one_shot_handler_gets_reply_id_and_a_record_for_unknown_pvs(k):
    got, done = [], threading.Event()
    uris = ["pva://variable:a", "ca://no:such:pv", "pva://no:such:pv2", "ca://channel:counter"]
    rid = k.snapshot(uris, lambda r, d: (got.append((r, d)), done.set()), time_window_msec=200)
    assert done.wait(T)
    r, data = got[0]
    assert r == rid and set(data) == {"variable:a", "no:such:pv", "no:such:pv2", "channel:counter"}
    for unknown in ("no:such:pv", "no:such:pv2"):
        [value] = data[unknown]
        assert is_unreadable(value) and unknown in value["alarm"]["message"]
    assert data["variable:a"][0]["value"] is not None and data["channel:counter"][0]["alarm"]["severity"] == 0


@pytest.mark.parametrize("proto", PROTOS)
def test_one_shot_of_200_bulk_pvs(k, proto):
    uris = [f"{proto}://{n}" for n in BULK_NAMES]
    t0 = time.monotonic()
    snap = k.snapshot_sync(uris, timeout=T, time_window_msec=500)
    TIMINGS[f"one-shot {BULK} {proto} PVs, 500 ms window"] = time.monotonic() - t0
    assert set(snap) == set(BULK_NAMES) | {"error"}
    for i, n in enumerate(BULK_NAMES):
        [v] = snap[n]
        assert v["value"] >= i and v["alarm"]["severity"] == 0, n
    # Once subscribed (by a monitor here), values are known at once: the snapshot does not wait for the window.
    k.monitor_many(uris[:50], lambda *_: None, timeout=T)
    t0 = time.monotonic()
    snap = k.snapshot_sync(uris[:50], timeout=T, time_window_msec=5000)
    TIMINGS[f"one-shot 50 monitored {proto} PVs, 5000 ms window"] = time.monotonic() - t0
    assert all(len(snap[n]) == 1 for n in BULK_NAMES[:50])


def test_one_shot_shares_a_running_monitor_and_never_robs_it(k):
    events, more = [], threading.Event()

    def on_event(name, value):
        events.append(value["value"])
        if len(events) >= n_before + 5:
            more.set()
    n_before = 10 ** 9
    k.monitor("pva://channel:counter", on_event, timeout=T)
    for _ in range(3):
        snap = k.snapshot_sync(["pva://channel:counter", "ca://channel:counter"], timeout=T, time_window_msec=200)
        assert len(snap["channel:counter"]) == 2
    n_before = len(events)
    assert more.wait(T), "the monitor stopped delivering after the snapshots"


def test_snapshot_sync_raises_when_the_gateway_refuses_the_command(k):
    with pytest.raises(OperationError) as e:
        k.snapshot_sync(["pva://variable:a"], timeout=T, time_window_msec=-5)
    assert e.value.error == -1 and "time_window_msec" in str(e.value)


def test_gateway_refuses_bad_snapshot_commands_with_a_message(k):
    good = (parse_pv_uri("pva://variable:a"),)
    cases = {
        "empty list": C.Snapshot(**envelope(k), pvs=()),
        "bad uri": C.Snapshot(**envelope(k), pvs=(PVUri("ca", "bad name!"),)),
        "negative window": C.Snapshot(**envelope(k), pvs=good, time_window_msec=-1),
        "bad name": C.RepeatingSnapshot(**envelope(k), snapshot_name="bad name", pvs=good),
        "empty name": C.RepeatingSnapshot(**envelope(k), snapshot_name="", pvs=good),
        "repeating empty list": C.RepeatingSnapshot(**envelope(k), snapshot_name=name("x"), pvs=()),
        "repeating bad uri": C.RepeatingSnapshot(**envelope(k), snapshot_name=name("x"), pvs=(PVUri("pva", "a b"),)),
        "zero window": C.RepeatingSnapshot(**envelope(k), snapshot_name=name("x"), pvs=good, time_window_msec=0),
        "negative delay": C.RepeatingSnapshot(**envelope(k), snapshot_name=name("x"), pvs=good, repeat_delay_msec=-1),
        "negative push": C.RepeatingSnapshot(**envelope(k), snapshot_name=name("x"), pvs=good,
                                             sub_push_delay_msec=-1),
        "trigger unknown": C.SnapshotTrigger(**envelope(k), snapshot_name=name("never")),
    }
    for what, cmd in cases.items():
        rec = raw(k, cmd)
        assert rec["error"] == -1 and rec.get("message"), what
    assert "no running snapshot" in raw(k, cases["trigger unknown"])["message"]
    # The client refuses what it can check itself.
    with pytest.raises(ValueError):
        k.snapshot_recurring(props("bad name", ["pva://variable:a"]), Calls())
    with pytest.raises(ValueError):
        k.snapshot_recurring(props(name("x"), []), Calls())
    with pytest.raises(ValueError):
        k.snapshot_recurring(props(name("x"), ["pva://variable:a"], time_window=-1), Calls())
    with pytest.raises(ValueError):
        k.snapshot(["variable:a"], lambda *_: None)


# ----------------------------------------------------------------------------- repeating, normal

@pytest.mark.parametrize("proto", PROTOS)
def test_recurring_normal_and_stop_publishes_the_final_iteration(k, stack, proto):
    snap_name = name(f"Normal_{proto}")            # upper case and '_': the topic differs from the name
    uris = [f"{proto}://variable:a", f"{proto}://channel:counter", f"{proto}://channel:enum"]
    calls = Calls()
    rec = k.snapshot_recurring(props(snap_name, uris, time_window=200), calls, timeout=T)
    assert rec["error"] == 0 and rec["publishing_topic"] == snapshot_topic(snap_name) != snap_name
    got = calls.wait(3)
    assert {n for n, _ in calls.calls} == {snap_name}       # the handler gets the name the user gave
    assert [d["iteration"] for d in got[:3]] == [1, 2, 3]
    for d in got:
        assert "incomplete" not in d and d["header_timestamp"] <= d["tail_timestamp"] == d["timestamp"]
        for u in uris:
            [v] = d[u.split("://")[1]]                        # normal: exactly the latest value of each PV
            assert v["alarm"]["severity"] == 0
    counters = [d["channel:counter"][0]["value"] for d in got]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)   # 10 Hz: moves every window
    stop = k.snapshot_stop(snap_name, timeout=T)
    final = stop["iter_index"]
    assert final >= 3 and calls.data[-1]["iteration"] == final
    n = len(calls.data)
    time.sleep(0.5)
    assert len(calls.data) == n                               # nothing after the stop
    stream = read_topic(stack, rec["publishing_topic"], tail_of(final))
    assert stream[-1]["message_type"] == R.TAIL and stream[-1]["iter_index"] == final
    again = k.snapshot_stop(snap_name, timeout=T)            # already stopped: no error (compat)
    assert again["error"] == 0 and "already stopped" in again["message"]


def test_stop_of_a_snapshot_never_started_answers_already_stopped(k):
    """Scripts written for 0.3.0 stop a recurring snapshot before they start it."""
    snap_name = name("never")
    rec = k.snapshot_stop(snap_name, timeout=T)
    assert rec["error"] == 0 and "already stopped" in rec["message"]
    calls = Calls()
    k.snapshot_recurring(props(snap_name, ["pva://variable:a"], time_window=100), calls, timeout=T)
    assert calls.wait(1)[0]["iteration"] == 1
    assert k.snapshot_stop(snap_name, timeout=T)["iter_index"] >= 1


def test_stop_cuts_the_open_window_and_publishes_it(k):
    snap_name = name("long")
    calls = Calls()
    k.snapshot_recurring(props(snap_name, ["pva://variable:a"], time_window=60_000), calls, timeout=T)
    time.sleep(0.3)
    stop = k.snapshot_stop(snap_name, timeout=T)
    assert stop["iter_index"] == 1
    [d] = calls.data
    assert d["iteration"] == 1 and len(d["variable:a"]) == 1


@pytest.mark.parametrize("proto", PROTOS)
def test_normal_iteration_is_one_instant_bulk_counters_from_one_scan_tick(k, proto):
    """All bulk counters tick together (one 1 s scan pass): one iteration never mixes two ticks."""
    uris = [f"{proto}://{n}" for n in BULK_NAMES]
    snap_name = name(f"instant-{proto}")
    calls = Calls()
    k.snapshot_recurring(props(snap_name, uris, time_window=250), calls, timeout=T)
    got = calls.wait(8)
    k.snapshot_stop(snap_name, timeout=T)
    ticks_seen = set()
    for d in got:
        stamps = [d[n][0]["timeStamp"]["secondsPastEpoch"] + d[n][0]["timeStamp"]["nanoseconds"] * 1e-9
                  for n in BULK_NAMES]
        assert max(stamps) - min(stamps) < 0.5, f"iteration {d['iteration']} mixes scan ticks"
        key = f"largest timeStamp spread of one {proto} iteration of {BULK} bulk PVs"
        TIMINGS[key] = max(TIMINGS.get(key, 0.0), max(stamps) - min(stamps))
        # bulk:i counts up from i: the tick count value - i is the same for every PV of one tick.
        ticks = {d[n][0]["value"] - i for i, n in enumerate(BULK_NAMES)}
        assert len(ticks) == 1, f"iteration {d['iteration']} mixes ticks {sorted(ticks)}"
        ticks_seen |= ticks
    assert len(ticks_seen) >= 2                                # the counters did move meanwhile


@pytest.mark.parametrize("proto", PROTOS)
def test_repeat_delay_is_honoured_and_field_filter_applies_to_normal(k, proto):
    snap_name = name(f"delay-{proto}")
    calls = Calls()
    k.snapshot_recurring(props(snap_name, [f"{proto}://variable:a", f"{proto}://channel:enum"], time_window=100,
                               repeat_delay=400, pv_field_filter_list=["value", "alarm"]), calls, timeout=T)
    got = calls.wait(3)
    k.snapshot_stop(snap_name, timeout=T)
    starts = [d["header_timestamp"] for d in got]
    # Each window starts repeat_delay after the previous one closed: never sooner.
    assert all(b - a >= 100 + 400 - 5 for a, b in zip(starts, starts[1:])), starts
    for d in got:
        assert set(d["variable:a"][0]) == {"value", "alarm"} and set(d["channel:enum"][0]) == {"value", "alarm"}


@pytest.mark.parametrize("ser", ["json", "msgpack-compact"])
def test_snapshots_in_the_other_serialisations(stack, ser):
    from k2eg.dml import dml

    with dml(stack.environment, f"ser-{uuid.uuid4().hex[:6]}", serialization=ser) as kk:
        snap = kk.snapshot_sync(["pva://variable:a", "ca://channel:waveform"], timeout=T, time_window_msec=200)
        calls = Calls()
        snap_name = name("ser")
        kk.snapshot_recurring(props(snap_name, ["pva://variable:a", "ca://channel:counter"], time_window=150), calls,
                              timeout=T)
        got = calls.wait(2)
        kk.snapshot_stop(snap_name, timeout=T)
    [a] = snap["variable:a"]
    if ser == "json":
        assert isinstance(a["value"], float) and len(snap["channel:waveform"][0]["value"]) == 16
        assert isinstance(got[0]["channel:counter"][0]["value"], float)
    else:  # msgpack-compact: the leaves of each value, no field names
        assert isinstance(a, list) and isinstance(a[0], float)
        assert isinstance(got[0]["channel:counter"][0], list)
    assert [d["iteration"] for d in got[:2]] == [1, 2] and all(len(d["variable:a"]) == 1 for d in got)


# ----------------------------------------------------------------------------- repeating, timed buffered

@pytest.mark.parametrize("proto", PROTOS)
def test_timedbuffered_with_sub_push_delay_and_field_filter(k, stack, proto):
    snap_name = name(f"tb-{proto}")
    calls = Calls()
    p = props(snap_name, [f"{proto}://channel:counter", f"{proto}://variable:a"], time_window=500,
              sub_push_delay_msec=100, type=SnapshotType.TIMED_BUFFERED, pv_field_filter_list=["value", "timeStamp"])
    k.snapshot_recurring(p, calls, timeout=T)
    got = calls.wait(3)
    k.snapshot_stop(snap_name, timeout=T)
    values = []
    for d in got:
        assert "incomplete" not in d
        assert len(d["channel:counter"]) >= 2                     # 10 Hz in a 500 ms window: every update
        assert all(set(v) == {"value", "timeStamp"} for v in d["channel:counter"])
        values += [v["value"] for v in d["channel:counter"]]
    assert values == sorted(values) and len(values) == len(set(values))  # each update once, in order
    # The gateway pushed the window in parts: Data of one iteration carry several push times.
    stream = read_topic(stack, snapshot_topic(snap_name), tail_of(2))
    data2 = [r for r in stream if r.get("iter_index") == 2 and r["message_type"] == R.DATA]
    assert len({r["timestamp"] for r in data2}) >= 2


# ----------------------------------------------------------------------------- repeating, triggered

@pytest.mark.parametrize("proto", PROTOS)
def test_triggered_ten_times_in_a_row_ten_handler_calls(k, proto):
    snap_name = name(f"trig-{proto}")
    calls = Calls()
    uris = [f"{proto}://variable:a", f"{proto}://channel:counter"]
    k.snapshot_recurring(props(snap_name, uris, time_window=100, triggered=True), calls, timeout=T)
    time.sleep(0.3)
    assert calls.data == []                                    # nothing happens without a trigger
    for i in range(10):
        rec = k.snapshot_trigger(snap_name, timeout=T, tags={"shot": str(i)})
        assert rec["error"] == 0 and rec["iter_index"] == i + 1
    got = calls.wait(10)
    time.sleep(0.3)
    assert len(calls.data) == 10
    assert [d["iteration"] for d in got] == list(range(1, 11))
    assert [d["tags"] for d in got] == [{"shot": str(i)} for i in range(10)]
    assert all(len(d["variable:a"]) == 1 and len(d["channel:counter"]) == 1 for d in got)
    k.snapshost_trigger(snap_name, timeout=T)                  # 0.3.0's spelling still works
    assert calls.wait(11)[-1]["iteration"] == 11
    assert k.snapshot_stop(snap_name, timeout=T)["iter_index"] == 11


@pytest.mark.parametrize("kind", [SnapshotType.NORMAL, SnapshotType.TIMED_BUFFERED])
def test_trigger_of_a_scheduled_snapshot_closes_its_window_now_and_the_schedule_goes_on(k, kind):
    """The package page's example: triggered=False, then snapshost_trigger."""
    snap_name = name("sched")
    calls = Calls()
    uris = ["pva://channel:counter", "ca://variable:a"]
    k.snapshot_recurring(props(snap_name, uris, time_window=60_000, triggered=False, type=kind,
                               sub_push_delay_msec=200), calls, timeout=T)
    time.sleep(0.5)
    rec = k.snapshot_trigger(snap_name, timeout=T, tags={"why": "beam loss"})
    assert rec["error"] == 0 and rec["iter_index"] == 1
    [first] = calls.wait(1)
    assert first["iteration"] == 1 and first["tags"] == {"why": "beam loss"} and "incomplete" not in first
    assert first["channel:counter"]            # updates in the window (variable:a stands still: none when timed)
    if kind == SnapshotType.NORMAL:
        assert len(first["variable:a"]) == 1
    time.sleep(0.5)
    assert k.snapshost_trigger(snap_name, timeout=T)["iter_index"] == 2     # 0.3.0's spelling
    second = calls.wait(2)[1]
    assert second["iteration"] == 2 and second["channel:counter"]
    if kind == SnapshotType.TIMED_BUFFERED:      # back-to-back windows: each update in exactly one iteration
        values = [v["value"] for d in (first, second) for v in d["channel:counter"]]
        assert values == [values[0] + i for i in range(len(values))]
    assert k.snapshot_stop(snap_name, timeout=T)["iter_index"] == 3      # the schedule went on: window 3 was open


# ----------------------------------------------------------------------------- second start

def test_second_start_replies_with_the_publishing_topic_and_the_snapshot_goes_on(k, stack):
    from k2eg.dml import dml

    snap_name = name("Twice")
    first, second = Calls(), Calls()
    rec1 = k.snapshot_recurring(props(snap_name, ["pva://variable:a"], time_window=150), first, timeout=T)
    first.wait(2)
    with dml(stack.environment, f"other-{uuid.uuid4().hex[:6]}") as other:
        rec2 = other.snapshot_recurring(props(snap_name, ["pva://variable:a"], time_window=150), second, timeout=T)
        assert rec2["error"] == 0 and rec2["publishing_topic"] == rec1["publishing_topic"]
        assert "already running" in rec2["message"]
        got = second.wait(2)
        assert got[-1]["iteration"] > 2                        # the same stream, not a restart
    k.snapshot_stop(snap_name, timeout=T)
    # Stopped and started again: numbering starts over on the same topic.
    third = Calls()
    k.snapshot_recurring(props(snap_name, ["pva://variable:a"], time_window=150), third, timeout=T)
    assert third.wait(1)[0]["iteration"] == 1
    k.snapshot_stop(snap_name, timeout=T)


def test_report_timings():
    """Not a check: prints what the bulk snapshots measured (pytest -s)."""
    for what, seconds in TIMINGS.items():
        print(f"{what}: {seconds * 1000:.3f} ms")


# ----------------------------------------------------------------------------- timedbuffered bound

@pytest.fixture(scope="module")
def capped(stack, tmp_path_factory):
    """A second gateway (own command topic, group and IOC, the session's broker) holding 5 values at most."""
    from k2eg.stack.runner import Stack

    from ..stacks import GATEWAY_ARGS

    tag = uuid.uuid4().hex[:8]
    s = Stack(tmp_path_factory.mktemp("capped"), kafka_bootstrap=stack.bootstrap,
              gateway_args=[*GATEWAY_ARGS, "--snapshot-max-buffered", "5", "--sub-group-id", f"capped-{tag}"])
    s.cmd_topic = f"k2eg-cmd-capped-{tag}"
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_timedbuffered_window_beyond_the_gateways_bound_says_how_many_values_it_left_out(capped, monkeypatch):
    from k2eg.dml import dml

    monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(capped.env_dir))
    snap_name = name("capped")
    calls = Calls()
    with dml(capped.environment, f"capped-{uuid.uuid4().hex[:6]}") as kk:
        kk.snapshot_recurring(props(snap_name, ["pva://channel:counter"], time_window=2000,
                                    type=SnapshotType.TIMED_BUFFERED), calls, timeout=T)
        got = calls.wait(2)
        kk.snapshot_stop(snap_name, timeout=T)
    first, second = got[0], got[1]
    for d in (first, second):
        values = [v["value"] for v in d["channel:counter"]]
        assert values == [values[0] + i for i in range(5)]          # the window's first 5 updates, in order
        assert d["truncated"] >= 5 and "incomplete" not in d          # 10 Hz for 2 s: far more than 5
    # Back-to-back windows: the values left out are exactly those up to the next window's first.
    assert second["channel:counter"][0]["value"] - first["channel:counter"][0]["value"] == 5 + first["truncated"]
    tails = [r for r in read_topic(capped, snapshot_topic(snap_name), tail_of(1)) if r["message_type"] == R.TAIL]
    assert tails[0]["truncated"] == first["truncated"] and tails[0]["error"] == 0
