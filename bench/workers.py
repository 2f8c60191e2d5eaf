"""Baseline processes (our venv): bare EPICS clients and raw Kafka round trips.

usage: python -m bench.workers count {pva|ca} NAME...      (stdin: start / stop)
       python -m bench.workers p4pget NAME SECONDS [THREADS]
       python -m bench.workers echo BOOTSTRAP IN_TOPIC OUT_TOPIC
       python -m bench.workers ping BOOTSTRAP OUT_TOPIC IN_TOPIC SECONDS
       python -m bench.workers pingmany BOOTSTRAP OUT_TOPIC IN_TOPIC THREADS SECONDS
       python -m bench.workers drain BOOTSTRAP TOPIC FIRST_OFFSET COUNT
       python -m bench.workers produce1hz BOOTSTRAP PAYLOAD_BYTES SECONDS TOPIC...
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

from bench.util import pct, rss_mb

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


def p4pget(name: str, seconds: float, threads: int = 1) -> None:
    """Bare p4p gets of one PV from ``threads`` threads: latency, and this process's CPU per get."""
    from p4p.client.thread import Context

    ctx = Context("pva", nt=False)
    ctx.get(name, timeout=5)
    lats: list[list[float]] = [[] for _ in range(threads)]
    end = time.monotonic() + seconds

    def loop(lat: list[float]) -> None:
        while time.monotonic() < end:
            t = time.perf_counter()
            ctx.get(name, timeout=5)
            lat.append((time.perf_counter() - t) * 1000)

    cpu0 = time.process_time()
    workers = [threading.Thread(target=loop, args=(lat,)) for lat in lats]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    lat = [x for xs in lats for x in xs]
    print(json.dumps({"n": len(lat), "threads": threads, "gets_per_s": len(lat) / seconds, "p50_ms": pct(lat, 50),
                      "p99_ms": pct(lat, 99), "cpu_s": time.process_time() - cpu0}))
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


def pingmany(bootstrap: str, dst: str, src: str, threads: int, seconds: float) -> None:
    """Round trips through ``echo`` from ``threads`` threads at once: what Kafka and two bare Python
    processes allow for request/reply, with no EPICS and no command or reply parsing at all."""
    from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition

    p = Producer({"bootstrap.servers": bootstrap, **FAST_PRODUCER})
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-pingmany", **FAST_CONSUMER})
    c.assign([TopicPartition(src, 0, OFFSET_END)])
    c.consume(1, 1.0)
    waiting: dict[bytes, threading.Event] = {}
    running = True

    def reader() -> None:
        while running:
            m = c.poll(0.05)
            for m in ([m] + c.consume(500, 0)) if m is not None else ():
                ev = None if m.error() else waiting.pop(m.value(), None)
                if ev is not None:
                    ev.set()
            p.poll(0)

    done, lat = [0] * threads, [[] for _ in range(threads)]
    end = time.monotonic() + 2 + seconds

    def loop(i: int) -> None:
        while time.monotonic() < end:
            tag, ev = os.urandom(8), threading.Event()
            waiting[tag] = ev
            t = time.perf_counter()
            p.produce(dst, tag)
            if ev.wait(5):
                if time.monotonic() < end - seconds:
                    continue  # warm-up
                done[i] += 1
                lat[i].append((time.perf_counter() - t) * 1000)

    threading.Thread(target=reader, daemon=True).start()
    mark: list[float] = []  # CPU at the end of the warm-up
    threading.Timer(2, lambda: mark.append(time.process_time())).start()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    running = False
    all_lat = [x for xs in lat for x in xs]
    print(json.dumps({"threads": threads, "roundtrips_per_s": sum(done) / seconds, "p50_ms": pct(all_lat, 50),
                      "cpu_s": time.process_time() - mark[0]}))
    os._exit(0)


def drain(bootstrap: str, topic: str, first: int, count: int) -> None:
    """The least any Python client does per monitor event: consume, unpack msgpack, call a handler."""
    import msgpack
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-drain", **FAST_CONSUMER})
    c.assign([TopicPartition(topic, 0, first)])
    unpack, seen = msgpack.unpackb, []

    def handler(name, value) -> None:
        seen.append(name)

    n, t0, cpu0 = 0, None, 0.0
    while n < count:
        msgs = c.consume(500, 5.0)
        if not msgs:
            break
        if t0 is None:
            t0, cpu0 = time.monotonic(), time.process_time()
        for m in msgs:
            if m.error() is None:
                m.headers()
                rec = unpack(m.value(), raw=False, strict_map_key=False)
                for name, value in rec.items():
                    handler(name, value)
                seen.clear()
        n += len(msgs)
    dt = time.monotonic() - t0
    print(json.dumps({"events": n, "per_s": n / dt, "cpu_us_per_event": 1e6 * (time.process_time() - cpu0) / n}))
    os._exit(0)


def produce1hz(bootstrap: str, size: int, seconds: float, topics: list[str]) -> None:
    """One record per topic per second, evenly spread, through producers set up as the gateway's event
    producers (same settings, same topics per producer): librdkafka's share of publishing monitors."""
    from confluent_kafka import Producer

    from bench.util import thread_cpu
    from k2eg.gateway import kafka as gk

    conf = {"bootstrap.servers": bootstrap, **gk._COMMON, **gk._EVENT}
    per = gk.TOPICS_PER_PRODUCER
    producers = [Producer(conf) for _ in range(0, len(topics), per)]
    route = [(t, producers[i // per]) for i, t in enumerate(topics)]
    payload = os.urandom(size)
    for t, p in route:  # metadata and connections first: not measured
        p.produce(t, payload)
    for p in producers:
        p.flush(60)
    tick, k = 0.01, 0
    step = max(1, round(len(route) * tick))
    cpu0, t0 = thread_cpu(os.getpid()), time.monotonic()
    nxt = t0
    while time.monotonic() - t0 < seconds:
        for t, p in route[k:k + step]:
            p.produce(t, payload)
        k = (k + step) % len(route)
        for p in producers:
            p.poll(0)
        nxt += tick
        time.sleep(max(0.0, nxt - time.monotonic()))
    dt = time.monotonic() - t0
    cpu1 = thread_cpu(os.getpid())
    per_thread: dict[str, float] = {}
    for name, c in cpu1.items():
        per_thread[name] = per_thread.get(name, 0.0) + (c - cpu0.get(name, 0.0)) / dt
    queued = sum(len(p) for p in producers)
    print(json.dumps({"topics": len(route), "records_per_s": round(step / tick), "cores": round(sum(per_thread.values()), 3),
                      "threads": {k: round(v, 3) for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1]) if v >= 0.005},
                      "queued_at_end": queued, "rss_mb": round(rss_mb(os.getpid()))}))
    os._exit(0)


if __name__ == "__main__":
    # Baselines at normal scheduling, as the gateway runs by default: as root a bare EPICS client would
    # otherwise run SCHED_FIFO, ahead of every other process on a busy machine, and the ratio would
    # move with the privileges the benchmark was started with rather than with the gateway.
    from bench.util import epics_scheduling
    epics_scheduling(realtime=False)
    cmd, *a = sys.argv[1:]
    if cmd == "count":
        count(a[0], a[1:])
    elif cmd == "p4pget":
        p4pget(a[0], float(a[1]), int(a[2]) if len(a) > 2 else 1)
    elif cmd == "echo":
        echo(*a)
    elif cmd == "ping":
        ping(a[0], a[1], a[2], float(a[3]))
    elif cmd == "pingmany":
        pingmany(a[0], a[1], a[2], int(a[3]), float(a[4]))
    elif cmd == "drain":
        drain(a[0], a[1], int(a[2]), int(a[3]))
    elif cmd == "produce1hz":
        produce1hz(a[0], int(a[1]), float(a[2]), a[3:])
    else:
        raise SystemExit(__doc__)
