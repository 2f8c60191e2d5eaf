"""Issue 7: the gateway's producer path while the Kafka broker is down or too slow.

A stack of its own (the broker is stopped and restarted on the same port and
data directory), a real gateway process and the demo IOC's 10 Hz counter.
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid

import msgpack
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from k2eg.stack.ports import free_port
from k2eg.stack.runner import Stack

from ..stacks import own_stack

OUTAGE_S = 8          # broker down at least this long (restarting it adds its boot time)
WAIT = 120            # "eventually" deadlines: generous, the machine is shared
TICK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory):
    port = free_port()
    with own_stack(tmp_path_factory, "faults", "--pv-connection-timeout", "5", "--metric-enable", "true",
                   "--metric-server-http-port", str(port)) as s:
        s.metrics_port = port
        yield s


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


class TopicReader:
    """Every record of one topic from offset 0, decoded (msgpack monitor events keyed by PV name)."""

    def __init__(self, bootstrap: str, topic: str):
        self.records: list[tuple[str, float]] = []    # (pv, value) in topic order
        self._c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"faults-{uuid.uuid4().hex}",
                            "enable.auto.commit": False, "log_level": 0})
        self._c.assign([TopicPartition(topic, 0, 0)])

    def pump(self, seconds: float = 0.5) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for m in self._c.consume(1000, 0.1):
                if m.error() is None:
                    doc = msgpack.unpackb(m.value(), raw=False)
                    name = m.key().decode()
                    self.records.append((name, doc[name]["value"]))

    def values(self, pv: str) -> list[float]:
        return [v for name, v in self.records if name == pv]

    def until(self, cond, what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; {len(self.records)} records"
            self.pump()

    def close(self) -> None:
        self._c.close()


def send(stack: Stack, command: dict) -> None:
    p = Producer({"bootstrap.servers": stack.bootstrap, "linger.ms": 0})
    p.produce(stack.cmd_topic, json.dumps(command).encode())
    assert p.flush(30) == 0


def monitor(stack: Stack, uri: str, topic: str) -> None:
    send(stack, {"command": "monitor", "pv_name": uri, "monitor_dest_topic": topic, "serialization": "msgpack",
                 "reply_topic": f"faults-reply-{uuid.uuid4().hex[:8]}", "reply_id": uuid.uuid4().hex})


@pytest.fixture
def pva(fault_stack):
    """A PVA client context on the stack's IOC, for values that do not go through the gateway."""
    from p4p.client.thread import Context

    ctx = Context("pva", conf={k: v for k, v in fault_stack.client_env().items() if k.startswith("EPICS_PVA")},
                  useenv=False)
    yield ctx
    ctx.close()


def test_events_of_a_broker_outage_arrive_after_it_and_the_gateway_idles_meanwhile(fault_stack, pva):
    s, topic = fault_stack, f"faults-counter-{uuid.uuid4().hex[:8]}"
    monitor(s, "pva://channel:counter", topic)
    r = TopicReader(s.bootstrap, topic)
    try:
        r.until(lambda: len(r.values("channel:counter")) >= 10, "counter events before the outage")
        pid = s.gateway_pid
        s.stop_kafka()
        at_stop = float(pva.get("channel:counter"))
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(OUTAGE_S)
        outage_cores = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        s.start_kafka()
        at_restart = float(pva.get("channel:counter"))
        r.until(lambda: r.values("channel:counter")[-1] >= at_restart + 30, "events after the restart")
    finally:
        r.close()
    assert at_restart - at_stop >= OUTAGE_S * 10 * 0.5    # the IOC kept counting meanwhile
    values = sorted(set(r.values("channel:counter")))  # a retried batch may repeat records: never lose one
    gaps = [(a, b) for a, b in zip(values, values[1:]) if b - a != 1]
    assert not gaps, f"events lost around the outage: {gaps[:10]}"
    assert values[0] < at_stop and values[-1] > at_restart    # so the outage's values are all among them
    assert s.gateway_pid == pid, "the gateway died"
    assert outage_cores < 0.3, f"gateway used {outage_cores:.2f} cores while the broker was down"


def test_overflow_during_an_outage_is_counted_bounded_and_keeps_the_newest_value(fault_stack, pva):
    """A 40-record producer queue overflows within seconds: older values give way to newer ones."""
    s, topic = fault_stack, f"faults-overflow-{uuid.uuid4().hex[:8]}"
    s.stop_gateway()
    s.gateway_args += ["--pub-impl-kv", "queue.buffering.max.messages:40"]
    s.start_gateway()
    port = s.metrics_port
    monitor(s, "pva://channel:counter", topic)       # one topic: both PVs share one producer queue
    monitor(s, "pva://variable:b", topic)
    r = TopicReader(s.bootstrap, topic)
    try:
        r.until(lambda: r.values("channel:counter") and r.values("variable:b"), "events of both PVs")
        pid = s.gateway_pid
        dropped0 = metric(port, "k2eg_events_dropped_total")
        rss0 = rss_mb(pid)
        s.stop_kafka()
        time.sleep(OUTAGE_S)                             # 80 counter events: more than the queue holds
        start = 10 + time.time_ns() % 7000 / 100         # fresh values within variable:b's DRVL..DRVH
        puts = [start + i for i in range(6)]
        newest = puts[-1]                                # the one that must arrive
        for v in puts:
            pva.put("variable:b", v)
            time.sleep(0.2)
        dropped = metric(port, "k2eg_events_dropped_total")
        coalesced = metric(port, "k2eg_events_coalesced_total")
        pending = metric(port, "k2eg_producer_pending_events")
        rss1 = rss_mb(pid)
        last_counter = float(pva.get("channel:counter"))
        s.start_kafka()
        r.until(lambda: newest in r.values("variable:b") and r.values("channel:counter")[-1] > last_counter,
                f"the newest values after the restart (variable:b {newest} -> {r.values('variable:b')[-8:]})")
    finally:
        r.close()
    assert dropped > dropped0 and coalesced > 0 and pending >= 1
    assert rss1 - rss0 < 100, f"RSS grew from {rss0:.0f} to {rss1:.0f} MB during the outage"
    b = r.values("variable:b")
    assert b.index(newest) == len(b) - 1, f"an older variable:b value came after the newest: {b[-8:]}"
    assert s.gateway_pid == pid
    assert metric(port, "k2eg_events_coalesced_total") >= coalesced
