"""The gateway's snapshot engine against a scripted EPICS provider: no Kafka, no IOC, fast."""
from __future__ import annotations

import threading
import time
from collections import deque

import pytest

from k2eg.gateway.monitors import MonitorHub
from k2eg.gateway.snapshots import SnapshotManager, coherent, stamp
from k2eg.protocol import commands as C
from k2eg.protocol import replies as R
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import parse_pv_uri


class FakeProvider:
    """Monitors the test drives by hand; gets answer from ``values`` or fail."""

    protocol = "pva"

    def __init__(self):
        self.callbacks: dict[str, list] = {}
        self.values: dict[str, dict] = {}
        self.gets: list[str] = []
        self.closed: list[str] = []

    def monitor(self, name, on_event):
        self.callbacks.setdefault(name, []).append(on_event)
        prov = self

        class Sub:
            def close(self):
                prov.closed.append(name)
                prov.callbacks[name].remove(on_event)
        return Sub()

    def emit(self, name, tree):
        for cb in list(self.callbacks.get(name, ())):
            cb(tree)

    def get(self, name, timeout):
        self.gets.append(name)
        if name in self.values:
            return self.values[name]
        raise ProtocolError(ErrorCode.TIMEOUT, f"PV '{name}' did not connect within {timeout:g} s")


def tree(v, t=None):
    t = time.time() if t is None else t
    return {"value": v, "alarm": {"severity": 0, "status": 0, "message": ""},
            "timeStamp": {"secondsPastEpoch": int(t), "nanoseconds": int(round((t - int(t)) * 1e9)), "userTag": 0}}


class Rig:
    def __init__(self, settle=0.0, refuse=()):
        self.refuse = set(refuse)  # PV names whose records the "broker" refuses for their size
        self.prov = FakeProvider()
        self.events: list[tuple[str, bytes]] = []
        self.hub = MonitorHub({"pva": self.prov, "ca": self.prov}, lambda t, k, d, s: self.events.append((t, d)))
        self.records: list[tuple[str, str, dict]] = []   # (topic, key, record) as published
        self.replies: list[dict] = []
        self.cond = threading.Condition()
        self.mgr = SnapshotManager(self.hub, self._reply, self._publish, lambda pv: self.prov.get(pv.name, 0.2),
                                   lambda topics: None, connect_timeout=0.3, settle=settle)

    def _reply(self, cmd, record, key):
        with self.cond:
            self.replies.append(record)
            self.cond.notify_all()

    def _publish(self, topic, key, record, ser, value_key, on_too_large=None, on_settled=None):
        """Delivery reports come later, from another thread, as from a producer's poll thread."""
        refused = value_key in self.refuse and "cannot encode" not in str(record)
        if not (refused and on_too_large):
            with self.cond:
                self.records.append((topic, key, dict(record)))
                self.cond.notify_all()

        def report():
            if refused and on_too_large:
                on_too_large(2_000_000, "Broker: Message size too large")
            if on_settled:
                on_settled()
        threading.Timer(0.02, report).start()

    def wait(self, pred, timeout=5.0):
        with self.cond:
            assert self.cond.wait_for(pred, timeout), "condition not reached"

    def reply_to(self, rid, timeout=5.0):
        self.wait(lambda: any(r.get("reply_id") == rid for r in self.replies), timeout)
        return next(r for r in self.replies if r.get("reply_id") == rid)

    def stream(self, topic):
        return [r for t, _, r in self.records if t == topic]


def pvs(*uris):
    return tuple(parse_pv_uri(u) for u in uris)


def repeating(name, *uris, **kw):
    kw.setdefault("time_window_msec", 50)
    return C.RepeatingSnapshot(reply_topic="r", reply_id=f"start-{name}", snapshot_name=name, pvs=pvs(*uris), **kw)


def iterations(records):
    """Stream records -> {iter_index: [message_type, ...]}."""
    out: dict[int, list] = {}
    for r in records:
        out.setdefault(r["iter_index"], []).append(r["message_type"])
    return out


# ----------------------------------------------------------------------------- coherent()

def test_coherent_takes_newest_value_stamped_before_the_instant_even_if_it_arrived_later():
    T = 1000.0
    hist = {"a": [(999.0, "a-old"), (999.99, "a-new"), (1000.5, "a-future")]}
    used, values = coherent(hist, {"a": "a-old"}, T)
    assert used == T and values == {"a": "a-new"}


def test_coherent_moves_the_instant_before_a_burst_it_would_cut():
    T = 1000.0
    # One scan pass stamped 999.999 .. 1000.001: cutting it would tear the iteration.
    hist = {f"p{i}": [(999.0, f"p{i}-tick0"), (999.999 + i * 0.0005, f"p{i}-tick1")] for i in range(5)}
    used, values = coherent(hist, {k: v[0][1] for k, v in hist.items()}, T)
    assert used < 999.999
    assert set(values.values()) == {f"p{i}-tick0" for i in range(5)}


def test_coherent_does_not_move_when_the_burst_is_longer_than_the_limit():
    T = 1000.0
    hist = {f"p{i}": [(999.5 + i * 0.001, f"v{i}")] for i in range(1000)}   # 1 s of back-to-back updates
    used, values = coherent(hist, {}, T)
    assert used == T


def test_coherent_falls_back_to_the_arrived_value_without_usable_stamps():
    T = 1000.0
    hist = {"nostamp": [(None, "n1")], "ahead": [(1003.0, "a1")], "never": []}
    used, values = coherent(hist, {"nostamp": "n1", "ahead": "a1"}, T)
    assert values == {"nostamp": "n1", "ahead": "a1"}


def test_stamp_reads_epics_time():
    assert stamp(tree(1, 1234.5)) == pytest.approx(1234.5)
    assert stamp({"value": 1}) is None and stamp({"timeStamp": {"secondsPastEpoch": 0}}) is None


# ----------------------------------------------------------------------------- one-shot

def test_one_shot_known_value_at_once_silent_pv_read_unknown_pv_reported_completion_last():
    rig = Rig()
    rig.hub.add_destination(parse_pv_uri("pva://running"), "mon", C.Serialization.MSGPACK)
    rig.prov.emit("running", tree(1))
    rig.prov.values["silent"] = tree(2)
    cmd = C.Snapshot(reply_topic="r", reply_id="s1", pvs=pvs("pva://running", "pva://silent", "pva://unknown"),
                     time_window_msec=50)
    rig.mgr.one_shot(cmd)
    recs = [r for _, _, r in rig.records]
    assert recs[-1] == {"error": 1, "reply_id": "s1"}
    by_name = {k: v for r in recs[:-1] for k, v in r.items() if k not in ("error", "reply_id")}
    assert by_name["running"]["value"] == 1 and by_name["silent"]["value"] == 2
    assert by_name["unknown"]["alarm"]["severity"] == 3 and "unknown" in by_name["unknown"]["alarm"]["message"]
    assert all(r["error"] == 0 for r in recs[:-1]) and len(recs) == 4
    assert rig.prov.gets == ["silent", "unknown"] or sorted(rig.prov.gets) == ["silent", "unknown"]
    # The running monitor keeps its subscription and destination; the snapshot's own ones are gone.
    assert "running" not in rig.prov.closed and {"silent", "unknown"} <= set(rig.prov.closed)
    rig.prov.emit("running", tree(3))
    assert rig.events and rig.events[-1][0] == "mon"


def test_one_shot_record_the_broker_refuses_becomes_an_error_record_before_completion():
    rig = Rig(refuse={"big"})
    rig.prov.values.update(big=tree(1), small=tree(2))
    cmd = C.Snapshot(reply_topic="r", reply_id="s2", pvs=pvs("pva://big", "pva://small"), time_window_msec=20)
    rig.mgr.one_shot(cmd)
    recs = [r for _, _, r in rig.records]
    assert recs[-1] == {"error": 1, "reply_id": "s2"} and len(recs) == 3
    by_name = {k: v for r in recs[:-1] for k, v in r.items() if k not in ("error", "reply_id")}
    assert by_name["small"]["value"] == 2
    why = by_name["big"]["alarm"]["message"]
    assert by_name["big"]["alarm"]["severity"] == 3 and "2000000 bytes" in why and "max.message.bytes" in why


def test_one_shot_of_many_unreachable_pvs_costs_one_timeout_not_one_each():
    rig = Rig()

    def slow_get(name, timeout):
        rig.prov.gets.append(name)
        time.sleep(timeout)
        raise ProtocolError(ErrorCode.TIMEOUT, f"PV '{name}' did not connect within {timeout:g} s")
    rig.mgr.read = lambda pv: slow_get(pv.name, 0.3)
    names = [f"dead:{i}" for i in range(100)]
    cmd = C.Snapshot(reply_topic="r", reply_id="d", pvs=pvs(*(f"ca://{n}" for n in names)), time_window_msec=10)
    rig.mgr.one_shot(cmd)
    recs = [r for _, _, r in rig.records]
    assert recs[-1]["error"] == 1 and len(recs) == 101
    got = {k: v for r in recs[:-1] for k, v in r.items() if k not in ("error", "reply_id")}
    assert set(got) == set(names) and all(v["alarm"]["severity"] == 3 for v in got.values())
    assert len(rig.prov.gets) < 100          # 16 readers, one deadline: the rest were never tried
    assert any("could not be read within" in v["alarm"]["message"] for v in got.values())


def test_one_shot_completes_as_soon_as_every_pv_answered():
    rig = Rig()
    cmd = C.Snapshot(reply_topic="r", reply_id="s2", pvs=pvs("pva://a", "ca://a"), time_window_msec=10_000)
    t = threading.Thread(target=rig.mgr.one_shot, args=(cmd,))
    t.start()
    rig.wait(lambda: len(rig.prov.callbacks.get("a", ())) == 2)
    rig.prov.emit("a", tree(5))   # both protocols' subscriptions
    t.join(2)
    assert not t.is_alive()
    recs = [r for _, _, r in rig.records]
    assert [r["error"] for r in recs] == [0, 0, 1] and rig.prov.gets == []


# ----------------------------------------------------------------------------- repeating

def test_normal_iterations_numbered_from_one_and_stop_publishes_final_then_replies():
    rig = Rig()
    cmd = repeating("n1", "pva://a", "pva://b", time_window_msec=30)
    t = threading.Thread(target=rig.mgr.start, args=(cmd,))
    t.start()
    rig.wait(lambda: "a" in rig.prov.callbacks and "b" in rig.prov.callbacks)
    rig.prov.emit("a", tree(1))
    rig.prov.emit("b", tree(2))
    start = rig.reply_to("start-n1")
    assert start["publishing_topic"] == "n1" and start["error"] == 0
    rig.wait(lambda: sum(1 for r in rig.stream("n1") if r["message_type"] == R.TAIL) >= 3)
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="n1"))
    reply = rig.reply_to("stop")
    stream = rig.stream("n1")
    final = reply["iter_index"]
    assert stream[-1] == {**stream[-1], "message_type": R.TAIL, "iter_index": final}
    its = iterations(stream)
    assert sorted(its) == list(range(1, final + 1))
    for n, kinds in its.items():
        assert kinds == [R.HEADER, R.DATA, R.DATA, R.TAIL], (n, kinds)
    assert "n1" not in rig.mgr.running
    # Stopping it again (or a snapshot never started) is no error: it is already stopped (compat).
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop2", snapshot_name="n1"))
    again = rig.reply_to("stop2")
    assert again["error"] == 0 and "already stopped" in again["message"] and "iter_index" not in again
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop3", snapshot_name="never_started"))
    assert rig.reply_to("stop3")["error"] == 0


def test_stop_cuts_a_long_window_short():
    rig = Rig()
    rig.mgr.start(repeating("long", "pva://a", time_window_msec=60_000))
    rig.wait(lambda: rig.mgr.running["long"].iteration == 1)     # its window is open
    t0 = time.monotonic()
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="long"))
    assert rig.reply_to("stop")["iter_index"] == 1
    assert time.monotonic() - t0 < 30
    assert [r["message_type"] for r in rig.stream("long")] == [R.HEADER, R.TAIL]


def test_second_start_replies_with_the_publishing_topic_and_keeps_the_first():
    rig = Rig()
    rig.mgr.start(repeating("Twice_X", "pva://a"))
    first = rig.mgr.running["Twice_X"]
    rig.mgr.start(C.RepeatingSnapshot(reply_topic="r", reply_id="again", snapshot_name="Twice_X", pvs=pvs("pva://b")))
    again = rig.reply_to("again")
    assert again["error"] == 0 and again["publishing_topic"] == "twice_x" and "already running" in again["message"]
    assert rig.mgr.running["Twice_X"] is first
    rig.mgr.close()


def test_triggered_ten_triggers_ten_iterations_with_tags():
    rig = Rig()
    rig.mgr.start(repeating("trig", "pva://a", triggered=True, time_window_msec=5))
    rig.prov.emit("a", tree(1))
    time.sleep(0.1)
    assert rig.stream("trig") == []          # nothing without a trigger
    for i in range(10):
        rig.mgr.trigger(C.SnapshotTrigger(reply_topic="r", reply_id=f"t{i}", snapshot_name="trig", tags={"n": str(i)}))
    answers = [rig.reply_to(f"t{i}") for i in range(10)]
    assert [a["iter_index"] for a in answers] == list(range(1, 11))
    headers = [r for r in rig.stream("trig") if r["message_type"] == R.HEADER]
    assert [h["tags"] for h in headers] == [{"n": str(i)} for i in range(10)]
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="trig"))
    assert rig.reply_to("stop")["iter_index"] == 10
    rig.mgr.close()


def test_timedbuffered_sub_push_and_field_filter():
    rig = Rig()
    rig.mgr.start(repeating("tb", "pva://a", kind=C.SnapshotKind.TIMED_BUFFERED, time_window_msec=400,
                            sub_push_delay_msec=50, field_filter=("value",)))
    stop = threading.Event()

    def feed():
        n = 0
        while not stop.is_set():
            n += 1
            rig.prov.emit("a", tree(n))
            time.sleep(0.01)
    threading.Thread(target=feed, daemon=True).start()
    rig.wait(lambda: sum(1 for r in rig.stream("tb") if r["message_type"] == R.TAIL) >= 2)
    stop.set()
    stream = rig.stream("tb")
    first = [r for r in stream if r["iter_index"] == 2]
    data = [r for r in first if r["message_type"] == R.DATA]
    assert len(data) > 5 and all(set(r["a"]) == {"value"} for r in data)
    assert len({r["timestamp"] for r in data}) >= 2      # partial pushes inside the window
    values = [r["a"]["value"] for r in stream if r["message_type"] == R.DATA]
    assert values == sorted(values) and len(values) == len(set(values))  # each update in one iteration only
    rig.mgr.close()


def test_a_failing_iteration_is_published_as_an_error_tail_and_the_snapshot_goes_on():
    rig = Rig()
    calls = {"n": 0}
    original = rig._publish

    def flaky(topic, key, record, ser, value_key):
        if record.get("message_type") == R.HEADER:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("broker hiccup")
        original(topic, key, record, ser, value_key)
    rig.mgr.publish_record = flaky
    rig.mgr.start(repeating("flaky", "pva://a", time_window_msec=10))
    rig.wait(lambda: sum(1 for r in rig.stream("flaky") if r["message_type"] == R.TAIL and r["error"] == 0) >= 2)
    tails = [r for r in rig.stream("flaky") if r["message_type"] == R.TAIL]
    assert tails[0]["error"] == ErrorCode.EPICS_FAILED and "broker hiccup" in tails[0]["message"]
    assert rig.mgr.running["flaky"].thread.is_alive()
    rig.mgr.close()


def test_a_snapshot_that_keeps_failing_gives_up_and_answers_pending_requests():
    rig = Rig()

    def broken(topic, key, record, ser, value_key):
        if record.get("message_type") == R.HEADER:
            raise RuntimeError("always")
    rig.mgr.publish_record = broken
    import k2eg.gateway.snapshots as S
    old = S.MAX_FAILURES
    S.MAX_FAILURES = 2
    try:
        rig.mgr.start(repeating("broken", "pva://a", triggered=True))
        for i in range(3):
            rig.mgr.trigger(C.SnapshotTrigger(reply_topic="r", reply_id=f"b{i}", snapshot_name="broken"))
        answers = [rig.reply_to(f"b{i}") for i in range(3)]
    finally:
        S.MAX_FAILURES = old
    assert all(a["error"] == ErrorCode.EPICS_FAILED and a["message"] for a in answers)
    rig.wait(lambda: "broken" not in rig.mgr.running)


def test_one_shot_never_makes_the_epics_callback_thread_wait_for_kafka():
    """A tap runs on the provider's callback thread; while Kafka takes its time, that thread goes on."""
    rig = Rig()
    kafka_free = threading.Event()
    original = rig._publish

    def lagging(*args, **kw):
        assert kafka_free.wait(30), "never released"
        original(*args, **kw)
    rig.mgr.publish_record = lagging
    cmd = C.Snapshot(reply_topic="r", reply_id="lag", pvs=pvs("pva://a", "pva://b"), time_window_msec=10_000)
    worker = threading.Thread(target=rig.mgr.one_shot, args=(cmd,))
    worker.start()
    rig.wait(lambda: "a" in rig.prov.callbacks and "b" in rig.prov.callbacks)
    callback = threading.Thread(target=lambda: (rig.prov.emit("a", tree(1)), rig.prov.emit("b", tree(2))))
    callback.start()
    callback.join(10)
    blocked = callback.is_alive()
    kafka_free.set()
    worker.join(10)
    assert not blocked, "the EPICS callback thread waited for Kafka"
    recs = [r for _, _, r in rig.records]
    assert [r["error"] for r in recs] == [0, 0, 1] and rig.prov.gets == []


# ----------------------------------------------------------------------------- requests, stops, triggers

class LockedOnly(deque):
    """A snapshot's request queue that notes every use made without the snapshot's lock held."""

    def __init__(self, cv, misuse: list):
        super().__init__()
        self.cv, self.misuse = cv, misuse

    def _check(self, what):
        if not self.cv._is_owned():
            self.misuse.append(f"{what} on {threading.current_thread().name}")

    def __iter__(self):
        self._check("iteration")
        return super().__iter__()

    def __len__(self):
        self._check("len")
        return super().__len__()

    def __getitem__(self, i):
        self._check("index")
        return super().__getitem__(i)

    def append(self, x):
        self._check("append")
        super().append(x)

    def popleft(self):
        self._check("popleft")
        return super().popleft()


def test_requests_are_read_and_changed_only_under_the_snapshot_lock():
    """Command workers append while the snapshot's thread walks the queue: every use holds the lock."""
    rig = Rig()
    misuse: list[str] = []
    rig.mgr.start(repeating("locked", "pva://a", kind=C.SnapshotKind.TIMED_BUFFERED, time_window_msec=20))
    snap = rig.mgr.running["locked"]
    with snap.cv:
        snap.requests = LockedOnly(snap.cv, misuse)
    rig.prov.emit("a", tree(1))
    rig.wait(lambda: sum(1 for r in rig.stream("locked") if r["message_type"] == R.TAIL) >= 3)
    assert snap.stopping is False
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="locked"))
    assert rig.reply_to("stop")["error"] == 0
    assert misuse == []


@pytest.mark.parametrize("kind", list(C.SnapshotKind))
def test_a_stop_closes_a_triggered_snapshots_open_window_at_once(kind):
    rig = Rig()
    rig.mgr.start(repeating("trig_long", "pva://a", triggered=True, kind=kind, time_window_msec=120_000))
    rig.prov.emit("a", tree(1))
    rig.mgr.trigger(C.SnapshotTrigger(reply_topic="r", reply_id="t1", snapshot_name="trig_long"))
    rig.mgr.trigger(C.SnapshotTrigger(reply_topic="r", reply_id="t2", snapshot_name="trig_long"))
    rig.wait(lambda: rig.mgr.running["trig_long"].iteration == 1)      # the first trigger's window is open
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="trig_long"))
    # Both triggers queued ahead of the stop are served, their windows cut short; then the stop.
    assert rig.reply_to("stop", timeout=20)["iter_index"] == 2
    assert [rig.reply_to(t)["iter_index"] for t in ("t1", "t2")] == [1, 2]
    # Started again at once: the start does not wait for a window to end.
    rig.mgr.start(repeating("trig_long", "pva://a", triggered=True))
    assert rig.reply_to("start-trig_long")["error"] == 0
    rig.mgr.close()


def test_a_trigger_of_a_scheduled_snapshot_closes_its_window_now_and_the_schedule_goes_on():
    rig = Rig()
    rig.mgr.start(repeating("sched", "pva://a", time_window_msec=120_000))
    rig.prov.emit("a", tree(1))
    snap = rig.mgr.running["sched"]
    rig.wait(lambda: snap.iteration == 1)
    rig.mgr.trigger(C.SnapshotTrigger(reply_topic="r", reply_id="t1", snapshot_name="sched", tags={"why": "now"}))
    first = rig.reply_to("t1", timeout=20)
    assert first["error"] == 0 and first["iter_index"] == 1
    rig.wait(lambda: snap.iteration == 2)                            # the next window opened at once
    rig.prov.emit("a", tree(2))
    rig.mgr.trigger(C.SnapshotTrigger(reply_topic="r", reply_id="t2", snapshot_name="sched"))
    assert rig.reply_to("t2", timeout=20)["iter_index"] == 2
    rig.wait(lambda: snap.iteration == 3)
    assert snap.thread.is_alive()
    its = iterations(rig.stream("sched"))
    assert its == {1: [R.HEADER, R.DATA, R.TAIL], 2: [R.HEADER, R.DATA, R.TAIL]}
    header1 = next(r for r in rig.stream("sched") if r["message_type"] == R.HEADER)
    assert header1["tags"] == {"why": "now"}
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="sched"))
    assert rig.reply_to("stop", timeout=20)["iter_index"] == 3


def test_a_trigger_in_the_pause_of_a_scheduled_snapshot_takes_the_state_now():
    rig = Rig()
    rig.mgr.start(repeating("paused", "pva://a", time_window_msec=10, repeat_delay_msec=120_000))
    rig.prov.emit("a", tree(1))
    rig.wait(lambda: any(r["message_type"] == R.TAIL for r in rig.stream("paused")))
    rig.prov.emit("a", tree(2))
    rig.mgr.trigger(C.SnapshotTrigger(reply_topic="r", reply_id="t", snapshot_name="paused"))
    assert rig.reply_to("t", timeout=20)["iter_index"] == 2
    data = [r["a"]["value"] for r in rig.stream("paused") if r["message_type"] == R.DATA and r["iter_index"] == 2]
    assert data == [2]
    rig.mgr.close()


def test_a_trigger_of_a_snapshot_that_is_not_running_is_an_error():
    rig = Rig()
    with pytest.raises(ProtocolError, match="no running snapshot"):
        rig.mgr.trigger(C.SnapshotTrigger(reply_topic="r", reply_id="x", snapshot_name="nothing"))


# ----------------------------------------------------------------------------- when the Header goes out

def test_normal_header_goes_out_with_the_data_at_the_windows_end():
    rig = Rig()
    rig.mgr.start(repeating("late_h", "pva://a", time_window_msec=120_000))
    rig.prov.emit("a", tree(1))
    rig.wait(lambda: rig.mgr.running["late_h"].iteration == 1)
    time.sleep(0.3)
    assert rig.stream("late_h") == []              # the window is open: nothing published yet
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="late_h"))
    rig.reply_to("stop", timeout=20)
    assert [r["message_type"] for r in rig.stream("late_h")] == [R.HEADER, R.DATA, R.TAIL]


def test_timedbuffered_header_goes_out_with_the_first_push_that_carries_data():
    rig = Rig()
    rig.mgr.start(repeating("late_tb", "pva://a", kind=C.SnapshotKind.TIMED_BUFFERED, time_window_msec=120_000,
                            sub_push_delay_msec=20))
    snap = rig.mgr.running["late_tb"]
    rig.wait(lambda: snap.iteration == 1)
    time.sleep(0.2)                                # several empty pushes
    assert rig.stream("late_tb") == []
    opened = snap.header["timestamp"]
    rig.prov.emit("a", tree(1))
    rig.wait(lambda: len(rig.stream("late_tb")) >= 2)
    header, data = rig.stream("late_tb")[:2]
    assert header["message_type"] == R.HEADER and header["timestamp"] == opened   # the window's opening time
    assert data["message_type"] == R.DATA and data["a"]["value"] == 1
    rig.mgr.close()


# ----------------------------------------------------------------------------- timedbuffered bound

def test_timedbuffered_window_beyond_its_bound_is_truncated_and_says_how_much_was_left_out():
    rig = Rig()
    rig.mgr.max_buffered = 5
    rig.mgr.start(repeating("capped", "pva://a", "pva://b", kind=C.SnapshotKind.TIMED_BUFFERED,
                            time_window_msec=120_000))
    rig.wait(lambda: rig.mgr.running["capped"].iteration == 1)
    for i in range(12):
        rig.prov.emit("a" if i % 2 else "b", tree(i))
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="capped"))
    rig.reply_to("stop", timeout=20)
    stream = rig.stream("capped")
    data = [r.get("a", r.get("b"))["value"] for r in stream if r["message_type"] == R.DATA]
    assert data == [0, 1, 2, 3, 4]                 # the first values of the window, in order
    assert stream[-1]["message_type"] == R.TAIL and stream[-1]["truncated"] == 7 and stream[-1]["error"] == 0


def test_timedbuffered_bound_applies_between_pushes_and_a_full_window_says_nothing():
    rig = Rig()
    rig.mgr.max_buffered = 3
    rig.mgr.start(repeating("pushed", "pva://a", kind=C.SnapshotKind.TIMED_BUFFERED, time_window_msec=120_000,
                            sub_push_delay_msec=10))
    snap = rig.mgr.running["pushed"]
    rig.wait(lambda: snap.iteration == 1)
    for i in range(6):                             # two values per push: never more than the bound waits
        rig.prov.emit("a", tree(i))
        if i % 2:
            n = (i + 1) // 2
            rig.wait(lambda: sum(1 for r in rig.stream("pushed") if r["message_type"] == R.DATA) >= 2 * n)
    rig.mgr.stop(C.SnapshotStop(reply_topic="r", reply_id="stop", snapshot_name="pushed"))
    rig.reply_to("stop", timeout=20)
    stream = rig.stream("pushed")
    assert [r["a"]["value"] for r in stream if r["message_type"] == R.DATA] == list(range(6))
    assert "truncated" not in stream[-1]
