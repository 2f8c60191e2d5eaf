"""Gateway restart (issue 7): after ``kill -9`` and a new start, monitors and repeating snapshots resume
from the gateway's state topic, without clients re-sending commands and without duplicate subscriptions.

Runs its own stack: it kills the gateway, which the shared session stack must never see.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any, Callable

import pytest
from confluent_kafka import Consumer, TopicPartition

from k2eg.broker import SnapshotProperties
from k2eg.protocol.codec import HEADER, decode
from k2eg.protocol.uri import pv_topic, snapshot_topic

from ..stacks import own_stack
from .test_gateway_commands import monitor_entry, wire  # noqa: F401 (fixture, on this module's stack)

pytestmark = pytest.mark.e2e
T = 30  # generous bound against hangs; never a timing assertion
RECOVERY_S = 10  # the bound for resuming after a restart
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with own_stack(tmp_path_factory, "restart") as s:
        yield s


class Tail:
    """Records of a single-partition topic from a given offset on, with their arrival time."""

    def __init__(self, bootstrap: str, topic: str, offset: int):
        self.topic = topic
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"tail-{uuid.uuid4().hex}",
                           "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self.c.assign([TopicPartition(topic, 0, offset)])
        self.records: list[tuple[float, dict]] = []

    def wait(self, done: Callable[[dict], bool], timeout: float = T) -> float:
        """Arrival time of the first record satisfying ``done``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, rec in self.records:
                if done(rec):
                    return at
            for m in self.c.consume(100, 0.1):
                if m.error() is None:
                    header = dict(m.headers() or []).get(HEADER)
                    self.records.append((time.monotonic(), decode(m.value(), header)))
        raise AssertionError(f"no such record on {self.topic} within {timeout} s: {[r for _, r in self.records][:5]}")

    def close(self) -> None:
        self.c.close()


def end_offset(bootstrap: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex}"})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        c.close()


class Events:
    """A client handler recording when each call arrived."""

    def __init__(self):
        self.calls: list[tuple[float, str, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, name: str, value: Any) -> None:
        with self.cond:
            self.calls.append((time.monotonic(), name, value))
            self.cond.notify_all()

    def wait(self, check: Callable[[float, str, Any], bool], timeout: float = T) -> tuple[float, str, Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: any(check(*c) for c in self.calls), timeout), self.calls[-3:]
            return next(c for c in self.calls if check(*c))


def kill_gateway(stack) -> float:
    pid = stack.gateway_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    deadline = killed + T
    while stack.gateway_pid is not None:
        assert time.monotonic() < deadline, "the gateway survived SIGKILL"
        time.sleep(0.05)
    return killed


MONITORED = ["ca://channel:counter", "pva://pva:counter"]
SNAP_PVS = ["ca://variable:a", "pva://pva:counter", "ca://channel:ramp:ramp"]


def test_monitors_and_repeating_snapshot_resume_after_kill_9(stack, wire):
    from k2eg.dml import dml

    snap = f"restart_{uuid.uuid4().hex[:8]}"
    events, iterations = Events(), Events()
    with dml(stack.environment, f"restart-{uuid.uuid4().hex[:8]}") as k:
        for uri in MONITORED:
            k.monitor(uri, events)
        k.snapshot_recurring(SnapshotProperties(snapshot_name=snap, time_window=300, repeat_delay=0,
                                                pv_uri_list=SNAP_PVS), iterations)
        for uri in MONITORED:
            events.wait(lambda at, name, v, n=uri.split("://")[1]: name == n)
        iterations.wait(lambda at, name, data: data["iteration"] >= 3)
        # The command consumer commits every second: a kill -9 sooner would replay the commands (at-least-once),
        # and their replies would hide whether the resumed ones answer anybody.
        time.sleep(2.5)
        reply_end = end_offset(stack.bootstrap, k.reply_topic)

        killed = kill_gateway(stack)
        before = max(d["iteration"] for _, _, d in iterations.calls)
        ends = {t: end_offset(stack.bootstrap, t) for t in [*map(lambda u: pv_topic(u.split("://")[1]), MONITORED),
                                                             snapshot_topic(snap)]}
        tails = {t: Tail(stack.bootstrap, t, off) for t, off in ends.items()}
        spawned = time.monotonic()
        starter = threading.Thread(target=stack.start_gateway, name="restart-gateway")
        starter.start()
        try:
            for uri in MONITORED:
                topic = pv_topic(uri.split("://")[1])
                at = tails[topic].wait(lambda rec: True)   # any record past the end at the kill: the new gateway's
                MEASURED[f"monitor {uri} events again after kill"] = at - killed
                MEASURED[f"monitor {uri} events again after spawn"] = at - spawned
                assert at - killed < RECOVERY_S, f"{uri}: no event within {RECOVERY_S} s of the kill"
            at = tails[snapshot_topic(snap)].wait(lambda rec: rec.get("message_type") == 2)
            MEASURED["snapshot Tail again after kill"] = at - killed
            assert at - killed < RECOVERY_S
            first_new = next(r for _, r in tails[snapshot_topic(snap)].records if "iter_index" in r)["iter_index"]
            assert first_new > before, "a resumed snapshot continues its numbering"
            # The client, which sent nothing again, keeps receiving both streams.
            for uri in MONITORED:
                events.wait(lambda at, name, v, n=uri.split("://")[1]: at > spawned and name == n)
            iterations.wait(lambda at, name, data: at > spawned and data["iteration"] > before)
        finally:
            starter.join(stack.gateway_timeout + 5)
            for t in tails.values():
                t.close()
        MEASURED["gateway ready after kill"] = time.monotonic() - killed
        assert stack.gateway_pid is not None

        status = wire.status()
        for uri in {*MONITORED, *SNAP_PVS}:
            entry = monitor_entry(status, uri)
            assert entry is not None, f"{uri} not subscribed after the restart"
            assert entry["subscriptions_opened"] == 1, entry
        for uri in MONITORED:
            assert monitor_entry(status, uri)["destinations"] == {pv_topic(uri.split("://")[1]): "msgpack"}
        assert snap in [s["name"] for s in status["snapshots"]]
        assert status["subscriptions"]["opened"] == status["subscriptions"]["active"]

        # A client sending its monitor again (as after its own restart) joins the resumed subscription.
        for uri in MONITORED:
            wire.request({"command": "monitor", "pv_name": uri, "monitor_dest_topic": pv_topic(uri.split("://")[1])})
        again = wire.status()
        for uri in MONITORED:
            assert monitor_entry(again, uri)["subscriptions_opened"] == 1
        # Resumed commands answer nobody: the client's reply topic got nothing from the restart.
        assert end_offset(stack.bootstrap, k.reply_topic) == reply_end
        stopped = k.snapshot_stop(snap)
    print("\nrecovery after kill -9:", {k: round(v, 2) for k, v in MEASURED.items()}, "stop:", stopped)


def test_a_stopped_snapshot_does_not_come_back_after_a_restart(stack, wire):
    from k2eg.dml import dml

    snap = f"gone_{uuid.uuid4().hex[:8]}"
    iterations = Events()
    with dml(stack.environment, f"stopper-{uuid.uuid4().hex[:8]}") as k:
        k.snapshot_recurring(SnapshotProperties(snapshot_name=snap, time_window=200, pv_uri_list=["ca://variable:b"]),
                             iterations)
        iterations.wait(lambda at, name, data: data["iteration"] >= 1)
        k.snapshot_stop(snap)
    # The command consumer commits every second: a kill -9 sooner would replay the start (at-least-once).
    time.sleep(2.5)
    kill_gateway(stack)
    stack.start_gateway()
    assert snap not in [s["name"] for s in wire.status()["snapshots"]]


def test_garbage_in_the_state_topic_is_skipped(stack, wire):
    """Records nobody should have written there do not stop the gateway from starting and resuming the rest."""
    from confluent_kafka import Producer

    from k2eg.dml import dml

    events = Events()
    with dml(stack.environment, f"garbage-{uuid.uuid4().hex[:8]}") as k:
        k.monitor("ca://variable:sum", events)
        events.wait(lambda at, name, v: name == "variable:sum")
        p = Producer({"bootstrap.servers": stack.bootstrap})
        state_topic = f"{stack.cmd_topic}-gateway-state"
        failures = []
        garbage = [(b"junk", b"\xff\x00"), (b'["monitor","ca","x","y"]', b'{"version":1}'),
                   (b"cmd", b'{"version":1,"command":{"command":"get","pv_name":"ca://variable:a"}}')]
        for key, value in garbage:  # (a compacted topic refuses records without a key: those cannot occur)
            p.produce(state_topic, value, key, on_delivery=lambda err, msg: err and failures.append(err))
        assert p.flush(10) == 0 and not failures
        log_start = stack.gateway_log.stat().st_size
        kill_gateway(stack)
        stack.start_gateway()
        entry = monitor_entry(wire.status(), "ca://variable:sum")
        assert entry is not None and entry["destinations"] == {pv_topic("variable:sum"): "msgpack"}
        with open(stack.gateway_log, "rb") as f:
            f.seek(log_start)
            assert f.read().count(b"skipped") == len(garbage)


def test_a_graceful_restart_resumes_too(stack, wire):
    """SIGTERM closes snapshots without ending them: they are kept, like monitors, for the next start."""
    from k2eg.dml import dml

    snap = f"graceful_{uuid.uuid4().hex[:8]}"
    iterations = Events()
    with dml(stack.environment, f"graceful-{uuid.uuid4().hex[:8]}") as k:
        k.snapshot_recurring(SnapshotProperties(snapshot_name=snap, time_window=200, pv_uri_list=["ca://variable:b"]),
                             iterations)
        k.monitor("ca://channel:waveform", Events())
        iterations.wait(lambda at, name, data: data["iteration"] >= 2)
        time.sleep(2.5)  # past the command consumer's commit: nothing is replayed
        stack.stop_gateway()
        stopped = time.monotonic()
        before = max(d["iteration"] for _, _, d in iterations.calls)
        stack.start_gateway()
        iterations.wait(lambda at, name, data: at > stopped and data["iteration"] > before)
        status = wire.status()
        assert snap in [s["name"] for s in status["snapshots"]]
        assert monitor_entry(status, "ca://channel:waveform")["subscriptions_opened"] == 1
        k.snapshot_stop(snap)
