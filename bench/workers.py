"""Baseline processes (our venv): bare EPICS clients and raw Kafka round trips.

usage: python -m bench.workers count {pva|ca} NAME...      (stdin: start / stop)
       python -m bench.workers p4pget NAME SECONDS
       python -m bench.workers echo BOOTSTRAP IN_TOPIC OUT_TOPIC
       python -m bench.workers ping BOOTSTRAP OUT_TOPIC IN_TOPIC SECONDS
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

from bench.util import pct

FAST_CONSUMER = {"fetch.wait.max.ms": 5, "fetch.min.bytes": 1, "fetch.queue.backoff.ms": 1,
                 "enable.auto.commit": False}
FAST_PRODUCER = {"linger.ms": 0, "socket.nagle.disable": True}


def count(kind: str, names: list[str]) -> None:
    """Subscribe ``names``; after ``start`` count updates until ``stop``, then print events and CPU."""
    counts = dict.fromkeys(names, 0)

    if kind == "pva":
        from p4p.client.thread import Context

        ctx = Context("pva", nt=False)
        subs = {}

        def subscribe(name):
            def cb(v, name=name):
                if not isinstance(v, Exception):
                    counts[name] += 1
            subs[name] = ctx.monitor(name, cb, notify_disconnect=False)

        for n in names:
            subscribe(n)
        end = time.monotonic() + 20
        while time.monotonic() < end and not all(counts.values()):
            time.sleep(0.5)
            for n in names:  # p4p can lose a first update that races monitor(): resubscribe silent PVs
                if not counts[n]:
                    subs[n].close()
                    subscribe(n)
    else:
        from epics import ca

        def cb(pvname=None, **kw):
            counts[pvname] += 1

        keep = []
        for n in names:
            chid = ca.create_channel(n, connect=False)
            keep.append((chid, ca.create_subscription(chid, use_time=True, callback=cb)))
        end = time.monotonic() + 20
        while time.monotonic() < end and not all(counts.values()):
            time.sleep(0.1)
    if not all(counts.values()):
        raise SystemExit(f"silent PVs: {[n for n, c in counts.items() if not c]}")
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "start":
            for n in names:
                counts[n] = 0
            c0, t0 = os.times(), time.monotonic()
            print("started", flush=True)
        elif line.strip() == "stop":
            c1, dt = os.times(), time.monotonic() - t0
            snap = dict(counts)
            cpu = (c1.user + c1.system - c0.user - c0.system) / dt
            print(json.dumps({"events": sum(snap.values()), "per_pv": snap, "seconds": dt, "cpu_cores": cpu}),
                  flush=True)
    os._exit(0)


def p4pget(name: str, seconds: float) -> None:
    from p4p.client.thread import Context

    ctx = Context("pva", nt=False)
    ctx.get(name, timeout=5)
    lat, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        ctx.get(name, timeout=5)
        lat.append((time.perf_counter() - t) * 1000)
    print(json.dumps({"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}))
    os._exit(0)


def echo(bootstrap: str, src: str, dst: str) -> None:
    """A gateway stand-in that does nothing: every record of ``src`` goes back out on ``dst``."""
    from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-echo", **FAST_CONSUMER})
    c.assign([TopicPartition(src, 0, OFFSET_END)])
    p = Producer({"bootstrap.servers": bootstrap, **FAST_PRODUCER})
    c.consume(1, 1.0)
    print("ready", flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        m = c.poll(0.1)  # consume(n, t) would wait for n records or t: poll, then drain what is there
        for m in ([m] + c.consume(100, 0)) if m is not None else ():
            if not m.error():
                p.produce(dst, m.value())
        p.poll(0)


def ping(bootstrap: str, dst: str, src: str, seconds: float) -> None:
    """Round trips through ``echo`` (two hops, like a get) and one-hop produce->consume times."""
    from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

    p = Producer({"bootstrap.servers": bootstrap, **FAST_PRODUCER})
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-ping", **FAST_CONSUMER})
    c.assign([TopicPartition(src, 0, OFFSET_END), TopicPartition(dst, 0, OFFSET_END)])
    c.consume(1, 1.0)

    def trip(wanted: str) -> float:
        tag = os.urandom(8)
        t = time.perf_counter()
        p.produce(dst, tag)
        p.poll(0)
        while True:
            m = c.poll(1.0)
            if m is not None and not m.error() and m.topic() == wanted and m.value() == tag:
                return (time.perf_counter() - t) * 1000

    for _ in range(20):
        trip(src)  # warm up
    rt, one, end = [], [], time.monotonic() + seconds
    while time.monotonic() < end:
        rt.append(trip(src))
        one.append(trip(dst))  # our own topic: produce -> consume, one hop (the echo answers that too; ignored)
    print(json.dumps({"n": len(rt), "roundtrip_p50_ms": pct(rt, 50), "roundtrip_p99_ms": pct(rt, 99),
                      "onehop_p50_ms": pct(one, 50), "onehop_p99_ms": pct(one, 99)}))
    os._exit(0)


if __name__ == "__main__":
    cmd, *a = sys.argv[1:]
    if cmd == "count":
        count(a[0], a[1:])
    elif cmd == "p4pget":
        p4pget(a[0], float(a[1]))
    elif cmd == "echo":
        echo(*a)
    elif cmd == "ping":
        ping(a[0], a[1], a[2], float(a[3]))
    else:
        raise SystemExit(__doc__)
