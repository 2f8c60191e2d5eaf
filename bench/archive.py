"""Archive benchmark (issue 19): ingest against a bare consume+decode loop of the same topics in the same run,
retrieval through Kafka, bytes on disk per scalar event; on the embedded and the PostgreSQL backends.

usage: .venv/bin/python -m bench.archive [--backends embedded,postgres] [--quick]

Starts its own Kafka broker (and a throwaway PostgreSQL cluster), fills topics
with PVA-shaped monitor events, then per backend:

- the bare loop: one consumer reads every record and decodes it (``codec.decode``),
  nothing else; events/s;
- ``k2eg-archiver`` as a process reading the same topics from their start in a
  fresh group: events/s from its ready line until its committed offsets reach
  the end, and events per CPU second of the process;
- through Kafka with the client: ``history`` of one PV with 86,400 values (a day
  at 1 Hz), ``values_at`` of 1,000 PVs (median of 5 each);
- bytes on disk of the store / archived events.

Prints each figure as it comes and writes the section "Archive" of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from k2eg.archiver import wire  # noqa: E402
from k2eg.protocol.codec import decode, encode, header_value  # noqa: E402
from k2eg.stack.archiver import ArchiverProcess  # noqa: E402
from k2eg.stack.kafka import KafkaBroker  # noqa: E402
from k2eg.transport import TopicAdmin  # noqa: E402

CMD = "bench-cmd"
DAY_PV, DAY = "bench:day", 86_400
MANY, MANY_TOPICS, MANY_EVENTS = 1000, 10, 100
T0 = 1_700_000_000     # EPICS seconds of the day's first value


def tree(v: float, secs: int, nanos: int = 0) -> dict:
    """A PVA NTScalar double as the gateway publishes it."""
    return {"value": v, "alarm": {"severity": 0, "status": 0, "message": "NO_ALARM"},
            "timeStamp": {"secondsPastEpoch": secs, "nanoseconds": nanos, "userTag": 0},
            "display": {"limitLow": 0.0, "limitHigh": 100.0, "description": "bench", "units": "mm",
                        "precision": 3, "form": {"index": 0, "choices": ["Default", "String"]}},
            "control": {"limitLow": 0.0, "limitHigh": 100.0, "minStep": 0.0},
            "valueAlarm": {"active": False, "lowAlarmLimit": 0.0, "lowWarningLimit": 0.0,
                           "highWarningLimit": 0.0, "highAlarmLimit": 0.0, "lowAlarmSeverity": 0,
                           "lowWarningSeverity": 0, "highWarningSeverity": 0, "highAlarmSeverity": 0,
                           "hysteresis": 0}}


def fill(bootstrap: str, flood_events: int) -> tuple[dict[str, int], int]:
    """The topics and their record counts; every record a monitor event ``{name: tree}``."""
    admin = TopicAdmin({"bootstrap.servers": bootstrap})
    topics = {"bench_day": DAY, **{f"bench_many_{i}": MANY * MANY_EVENTS // MANY_TOPICS for i in range(MANY_TOPICS)},
              **{f"bench_flood_{i}": flood_events // 4 for i in range(4)}}
    admin.ensure(list(topics), 60)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 1_000_000, "compression.type": "none"})
    hdr = header_value(__import__("k2eg.protocol.commands", fromlist=["Serialization"]).Serialization.MSGPACK)

    def send(topic, name, value, secs, nanos=0):
        data = encode({name: tree(value, secs, nanos)})
        while True:
            try:
                p.produce(topic, data, name.encode(), headers=hdr)
                return
            except BufferError:
                p.poll(0.05)
    for i in range(DAY):
        send("bench_day", DAY_PV, float(i), T0 + i)
    for j in range(MANY_EVENTS):
        for pv in range(MANY):
            send(f"bench_many_{pv % MANY_TOPICS}", f"bench:many{pv:04d}", float(j), T0 + j * 10, pv)
    for i in range(flood_events // 4 * 4):
        send(f"bench_flood_{i % 4}", f"bench:flood{i % 40}", float(i), T0 + i // 1000, (i % 1000) * 1000)
    p.flush(120)
    return topics, sum(topics.values())


def bare_loop(bootstrap: str, topics: dict[str, int]) -> tuple[float, float]:
    """Events/s and events per CPU second of a consumer that only reads and decodes every record."""
    total = sum(topics.values())
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-bare-{time.time_ns()}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    c.assign([TopicPartition(t, 0, 0) for t in topics])
    n = 0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    while n < total:
        for m in c.consume(5000, 1.0):
            if m.error() is None:
                h = None
                for k, v in m.headers() or ():
                    if k == "k2eg-ser-type":
                        h = v
                decode(m.value(), h)
                n += 1
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    c.close()
    return total / dt, total / cpu


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def committed_total(bootstrap: str, group: str, topics: dict[str, int]) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return sum(max(0, tp.offset) for tp in c.committed([TopicPartition(t, 0) for t in topics], timeout=10))
    finally:
        c.close()


def write_config(bootstrap: str) -> None:
    """The archive configuration, as archive_add writes it: every bench:* PV."""
    cfg = wire.config_topic(wire.archive_topic(CMD))
    TopicAdmin({"bootstrap.servers": bootstrap}).ensure([cfg], 30, config={"cleanup.policy": "compact"})
    p = Producer({"bootstrap.servers": bootstrap})
    p.produce(cfg, b"{}", wire.config_key("pv", "bench:*"))
    p.flush(10)


def ingest(bootstrap: str, work: Path, backend: str, dsn: str | None, topics: dict[str, int]) -> dict:
    group = f"bench-archiver-{backend}"
    args = ["--group-id", group, "--flush-rows", "50000", "--flush-interval", "1", "--writer-id", backend]
    if backend == "postgres":
        args += ["--backend", "postgres", "--dsn", dsn]
    proc = ArchiverProcess(work / backend, args)
    t_start = time.perf_counter()
    proc.start(bootstrap, CMD, dict(os.environ), timeout=120)
    t_ready = time.perf_counter()
    cpu0 = cpu_seconds(proc.pid)
    total = sum(topics.values())
    while committed_total(bootstrap, group, topics) < total:
        time.sleep(0.2)
        if time.perf_counter() - t_ready > 900:
            raise TimeoutError(f"{backend}: archiver did not catch up within 900 s")
    wall = time.perf_counter() - t_ready
    cpu = cpu_seconds(proc.pid) - cpu0
    return {"proc": proc, "events_per_s": total / wall, "events_per_cpu_s": total / cpu, "wall_s": wall,
            "cpu_s": cpu, "startup_s": t_ready - t_start}


def retrieval(env_dir: Path, quick: bool) -> dict:
    os.environ["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] = str(env_dir)
    from k2eg.dml import dml
    runs = 3 if quick else 5
    with dml("bench", f"bench-{time.time_ns()}") as k:
        hist, at = [], []
        for _ in range(runs):
            t = time.perf_counter()
            h = k.history(f"pva://{DAY_PV}", T0, T0 + DAY)
            hist.append(time.perf_counter() - t)
            assert len(h) == DAY and h[-1]["value"] == DAY - 1, len(h)
        pvs = [f"pva://bench:many{pv:04d}" for pv in range(MANY)]
        for _ in range(runs):
            t = time.perf_counter()
            v = k.values_at(pvs, T0 + 500.5)
            at.append(time.perf_counter() - t)
            assert all(x is not None and x["value"] == 50.0 for x in v.values()), "values_at answered wrong"
    return {"history_s": statistics.median(hist), "values_at_s": statistics.median(at)}


def bytes_on_disk(backend: str, work: Path, dsn: str | None) -> int:
    if backend == "postgres":
        from k2eg.archiver.postgres import PostgresStore
        s = PostgresStore(dsn)
    else:
        from k2eg.archiver.embedded import EmbeddedStore
        s = EmbeddedStore(work / backend / "archive", writer="bench-reader")
    try:
        return s.bytes_on_disk()
    finally:
        s.close()


ROWS: list[tuple] = []


def row(figure: str, value: float, baseline: float | None, target: str, ok: bool | None, unit: str = "") -> None:
    ratio = f"{value / baseline:.2f}" if baseline else "-"
    ROWS.append((figure, value, baseline, ratio, target, ok, unit))
    verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
    base = "-" if baseline is None else f"{baseline:,.4g}"
    print(f"  {figure:<52} {value:>12,.4g} {unit:<6} baseline {base:>10}  ratio {ratio:>6}  target {target:<22} "
          f"{verdict}", flush=True)


def write_results(command: str, info: dict) -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# k2eg benchmark results\n"
    start, end = "<!-- archive:start -->", "<!-- archive:end -->"
    lines = [start, "## Archive (issue 19)", "", f"Produced by: `{command}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  ",
             f"Machine: {info['machine']}  ", f"Load average at start / end: {info['load']}  ",
             f"Data: {info['events']:,} PVA-shaped scalar monitor events on {info['topics']} topics "
             "(one PV of 86,400 values at 1 Hz, 1,000 PVs x 100 values, the rest flood PVs)", "",
             "| figure | value | baseline (same run) | ratio | target | result |", "|---|---|---|---|---|---|"]
    for figure, value, baseline, ratio, target, ok, unit in ROWS:
        verdict = "n/a" if ok is None else ("PASS" if ok else "**FAIL**")
        base = "-" if baseline is None else f"{baseline:,.4g}"
        lines.append(f"| {figure} | {value:,.4g} {unit} | {base} | {ratio} | {target} | {verdict} |")
    lines.append(end)
    block = "\n".join(lines) + "\n"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.archive", description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="embedded,postgres")
    ap.add_argument("--quick", action="store_true", help="fewer flood events and retrieval runs")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    flood = 100_000 if args.quick else 400_000
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="k2eg-bench-archive-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                     else None) as tmp:
        work = Path(tmp)
        broker = KafkaBroker(work / "kafka")
        pg = None
        procs = []
        try:
            bootstrap = broker.start(180)
            env_dir = work / "env"
            env_dir.mkdir()
            (env_dir / "bench.ini").write_text(f"[DEFAULT]\nkafka_broker_url={bootstrap}\nk2eg_cmd_topic={CMD}\n")
            print(f"filling topics ({bootstrap}) ...", flush=True)
            topics, total = fill(bootstrap, flood)
            write_config(bootstrap)
            print(f"{total:,} events on {len(topics)} topics", flush=True)
            for backend in backends:
                print(f"[{backend}]", flush=True)
                dsn = None
                if backend == "postgres":
                    from k2eg.stack.postgres import ThrowawayPostgres
                    pg = pg or ThrowawayPostgres().start()
                    dsn = pg.create_database("bench")
                bare, bare_cpu = bare_loop(bootstrap, topics)
                res = ingest(bootstrap, work, backend, dsn, topics)
                procs.append(res["proc"])
                bare_after, bare_cpu_after = bare_loop(bootstrap, topics)
                # the bare loop before and after: the machine's load moves
                base, base_cpu = (bare + bare_after) / 2, (bare_cpu + bare_cpu_after) / 2
                per_core = res["events_per_cpu_s"]
                row(f"{backend}: archived events per core vs bare consume+decode per core", per_core, base_cpu,
                    ">= 0.5 x bare", per_core >= 0.5 * base_cpu, "ev/cpu-s")
                row(f"{backend}: archived events per core (CPU second of the archiver)", per_core, None,
                    ">= 50,000", per_core >= 50_000, "ev/cpu-s")
                row(f"{backend}: archived events/s (wall) vs bare loop (wall)", res["events_per_s"], base,
                    "(info: machine load)", None, "ev/s")
                r = retrieval(env_dir, args.quick)
                limit_h, limit_a = (0.5, 0.3) if backend == "embedded" else (None, None)
                row(f"{backend}: history of 86,400 values through Kafka", r["history_s"] * 1000, None,
                    "<= 500 ms" if limit_h else "(info)", r["history_s"] <= limit_h if limit_h else None, "ms")
                row(f"{backend}: values_at of 1,000 PVs through Kafka", r["values_at_s"] * 1000, None,
                    "<= 300 ms" if limit_a else "(info)", r["values_at_s"] <= limit_a if limit_a else None, "ms")
                res["proc"].stop()
                b = bytes_on_disk(backend, work, dsn)
                row(f"{backend}: bytes on disk per scalar event", b / total, None, "(info)", None, "B")
        finally:
            for p in procs:
                p.stop()
            if pg is not None:
                pg.stop()
            broker.stop()
    info = {"machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
            "load": f"{load0:.2f} / {os.getloadavg()[0]:.2f}", "events": total, "topics": len(topics)}
    if not args.no_write:
        write_results("python -m bench.archive " + " ".join(argv if argv is not None else sys.argv[1:]), info)
    return 0 if all(r[5] is not False for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
