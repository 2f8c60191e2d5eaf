"""k2eg benchmark suite (issue 6): every figure next to a baseline measured in the same run.

usage: .venv/bin/python -m bench [NAME ...] [--quick] [--profile] [options, see --help]   (or bench/run.sh ...)
names: pva_flood ca_flood flood_gets get_latency get_throughput monitor_delivery snapshot scale10k aio_gets
       aio_monitor (default: all)

Starts its own Stack (Kafka, demo IOC with bulk records, the gateway under
bench/probe.py) in a temporary directory, runs the chosen benchmarks one
after the other, prints each result as it comes and writes RESULTS.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from bench.util import HERE, PY, ROOT, Commander, Meter, Worker, log_append_time, pyspy_start, pyspy_summary, \
    read_topics, rss_mb, run_json
from k2eg import scheduling

ORDER = ["pva_flood", "ca_flood", "flood_gets", "get_latency", "get_throughput", "monitor_delivery", "snapshot", "scale10k",
         "aio_gets", "aio_monitor"]
LEGACY_VENV = Path(os.environ.get("K2EG_CACHE_DIR", Path.home() / ".cache" / "k2eg")) / "venv-k2eg-0.3.0-ck2.13.0"
CLIENT = str(HERE / "client_worker.py")
AIO_CLIENT = str(HERE / "aio_worker.py")


@dataclass
class Row:
    bench: str
    figure: str
    value: float
    baseline: float | None
    target: str
    ok: bool | None
    unit: str = ""

    @property
    def ratio(self) -> str:
        return f"{self.value / self.baseline:.2f}" if self.baseline else "-"


@dataclass
class Ctx:
    stack: object
    cmd: Commander
    args: argparse.Namespace
    ports: dict
    work: Path
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def row(self, bench, figure, value, baseline, target, ok, unit=""):
        r = Row(bench, figure, value, baseline, target, ok, unit)
        self.rows.append(r)
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        base = "-" if baseline is None else f"{baseline:,.3g}"
        print(f"  {figure:<44} {value:>12,.4g} {unit:<6} baseline {base:>10}  ratio {r.ratio:>6}  "
              f"target {target:<26} {verdict}", flush=True)

    def note(self, bench, key, value):
        self.details.setdefault(bench, {})[key] = value
        print(f"    {key}: {json.dumps(value, default=str)[:600]}", flush=True)

    @property
    def gw_pid(self) -> int:
        return self.stack.gateway_pid

    def client_env(self, legacy: bool = False) -> dict:
        env = dict(os.environ)
        env.update(self.stack.client_env())
        if legacy:
            env.pop("PYTHONPATH", None)  # the published client must not see our source tree
        return env

    def epics_env(self) -> dict:
        """What a bare EPICS client needs to see the flood servers too."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        env.update(self.stack.ioc.client_env())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return env

    def probe(self) -> dict:
        """The gateway's per-PV callback counters (bench/probe.py)."""
        d = self.stack.state_dir
        (d / "bench-probe.json").unlink(missing_ok=True)
        (d / "bench-probe.req").touch()
        for _ in range(600):  # a flooded gateway can take a while to give the probe thread the GIL
            if (d / "bench-probe.json").exists():
                return json.loads((d / "bench-probe.json").read_text())
            time.sleep(0.05)
        raise TimeoutError("the gateway probe did not answer")

    def profiled(self, bench: str, seconds: float, run) -> None:
        """``run()`` while py-spy samples the gateway: a separate pass, so the sampler costs no measured one."""
        out = self.work / f"profile-{bench}.txt"
        spy = pyspy_start(self.gw_pid, seconds, out)
        run()
        if spy is not None:
            spy.wait(60)
            self.note(bench, "gateway_profile", pyspy_summary(out))


# ============================================================================ floods

def flood(ctx: Ctx, kind: str) -> None:
    """A flood server updates ``--flood-pvs`` PVs as fast as it can for ``--seconds``, twice.

    Baseline: a bare client process (p4p or pyepics) counting updates. Gateway: a multi-monitor
    of the same PVs; the rate is records *appended* in the window (topics switched to
    LogAppendTime, so a record's timestamp is when it reached Kafka), read back afterwards by a
    plain consumer. Servers coalesce updates under load, so a gap in a counter is no loss; a loss
    is an update the gateway's EPICS callback received (bench/probe.py counts and sums them per
    PV) that is missing from Kafka once the gateway drained (see _sequence_check).
    """
    bench, n, T = f"{kind}_flood", ctx.args.flood_pvs, ctx.args.seconds
    names = [f"flood:{kind}:{i}" for i in range(n)]
    server = _flood_server(ctx, kind)
    try:
        # -- baseline: a bare client process counting the same updates
        client = Worker(["-m", "bench.workers", "count", kind, *names], env=ctx.epics_env(), name=f"bare {kind} client")
        client.expect("ready", 60)
        client.send("start")
        client.expect("started")
        meter = Meter(client=client.pid, server=server.pid)
        server.send("go")
        server.expect("going")
        time.sleep(T)
        client.send("stop")
        base = client.json()
        load_b = meter.stop()
        server.send("stop")
        offered_b = sum(server.json()["updates"])
        client.close()
        ctx.note(bench, "baseline", {"events_per_s": round(base["events"] / base["seconds"]),
                                     "offered_per_s": round(offered_b / T), "client_cpu_cores": round(base["cpu_cores"], 2),
                                     "cpu_us_per_event": round(1e6 * base["cpu_cores"] * base["seconds"] / max(1, base["events"]), 1),
                                     "load": load_b})
        # -- the gateway: same flood, monitored through a multi-monitor command
        topics = {f"{kind}://{nm}": nm.replace(":", "_") for nm in names}
        rep = ctx.cmd.request({"command": "multi-monitor", "pv_name_list": list(topics)})
        if rep.get("error"):
            raise RuntimeError(f"multi-monitor failed: {rep}")
        log_append_time(ctx.stack.bootstrap, list(topics.values()))
        time.sleep(1.0)
        before = ctx.probe()
        t_go = time.time()
        meter = Meter(gateway=ctx.gw_pid, server=server.pid, kafka=ctx.stack.kafka.pid)
        server.send("go")
        server.expect("going")
        time.sleep(T)
        load_g = meter.stop()
        t_stop = time.time()
        rt = {"gateway": realtime_threads(ctx.gw_pid), "flood_server": realtime_threads(server.pid)}
        ctx.note(bench, "realtime_threads", rt)
        during = ctx.probe()
        server.send("stop")
        offered_g = sum(server.json()["updates"])
        received = _settle(ctx, list(topics))
        records = read_topics(ctx.stack.bootstrap, list(topics.values()))
        check = _sequence_check(topics, received, records, t_go, t_stop)
        rate = check["kafka_in_window"] / T
        base_rate = base["events"] / base["seconds"]
        ctx.row(bench, "events/s appended to Kafka via gateway", rate, base_rate, ">= 0.85 x bare client",
                rate >= 0.85 * base_rate, "ev/s")
        ctx.row(bench, "events lost callback->Kafka", check["lost"], None, "0", check["lost"] == 0, "ev")
        asked = any("epics-realtime" in a for a in ctx.args.gw_arg)  # then any count is what was asked for
        ctx.row(bench, "gateway threads at real-time priority", len(rt["gateway"]), None,
                "(info: --epics-realtime)" if asked else "0", None if asked else not rt["gateway"], "thr")
        gw_cpu = load_g["gateway"]
        handled = sum(during.get(u, {}).get("count", 0) - before.get(u, {}).get("count", 0) for u in topics)
        ctx.note(bench, "gateway", {"events_per_s": round(rate), "offered_per_s": round(offered_g / T),
                                    "received_by_gateway": check["received"], "in_kafka": check["kafka"],
                                    "duplicates": check["duplicates"], "out_of_order": check["out_of_order"],
                                    "sum_mismatch_pvs": check["sum_mismatch"],
                                    "last_append_after_stop_s": round(check["last_ts"] / 1000 - t_stop, 2),
                                    "received_in_window_per_s": round(handled / T),
                                    "cpu_us_per_event": round(1e6 * gw_cpu * load_g["seconds"] / max(1, handled), 1),
                                    "load": load_g})
        if ctx.args.profile:
            def again():
                server.send("go")
                server.expect("going")
                time.sleep(T)
                server.send("stop")
                server.json()
            ctx.profiled(bench, T, again)
            _settle(ctx, list(topics))
    finally:
        server.close()


def _flood_server(ctx: Ctx, kind: str) -> Worker:
    """A bench.servers flood source of ``--flood-pvs`` PVs, ready for ``go``."""
    n, p = ctx.args.flood_pvs, ctx.ports
    args = ([kind, str(n), str(p["pva_server"]), str(p["pva_bcast"])] if kind == "pva" else
            [kind, str(n), str(p["ca_server"]), str(p["ca_pvas"]), str(p["ca_pvas_bcast"]), str(ctx.work)])
    server = Worker(["-m", "bench.servers", *args], env=ctx.epics_env(), name=f"{kind} flood server")
    try:
        server.expect("ready", 60)
    except BaseException:
        server.close()
        raise
    return server


def flood_gets(ctx: Ctx) -> None:
    """Gets (one thread) while the gateway forwards a PVA flood: what real-time priority would be for.

    Baseline: the same get load on the quiet gateway, in the same run. Then the PVA flood server
    floods ``--flood-pvs`` PVs, monitored through the gateway, while the gets run. The gets read a
    demo IOC PV, the flood comes from its own server: both pass the gateway's one pvxs client
    context (its PVXCTCP thread) and its Kafka producers. On 2 cores the machine is saturated, so
    the gateway's dropped events (coalesced or lost, never in Kafka) are counted too.
    """
    bench, n, T = "flood_gets", ctx.args.flood_pvs, ctx.args.seconds
    get = ["get", "local", "bench-flood-gets", "pva://variable:a", "1", str(T)]
    quiet = run_json([CLIENT, *get], env=ctx.client_env())
    uris = [f"pva://flood:pva:{i}" for i in range(n)]
    server = _flood_server(ctx, "pva")
    try:
        rep = ctx.cmd.request({"command": "multi-monitor", "pv_name_list": uris})
        if rep.get("error"):
            raise RuntimeError(f"multi-monitor failed: {rep}")
        time.sleep(1.0)
        before = ctx.probe()
        meter = Meter(gateway=ctx.gw_pid, server=server.pid, kafka=ctx.stack.kafka.pid)
        server.send("go")
        server.expect("going")
        under = run_json([CLIENT, *get], env=ctx.client_env())
        load = meter.stop()
        during = ctx.probe()
        server.send("stop")
        offered = sum(server.json()["updates"])
        after = _settle(ctx, uris)
    finally:
        server.close()
    received = sum(during.get(u, {}).get("count", 0) - before.get(u, {}).get("count", 0) for u in uris)
    dropped = after.get("_dropped", 0) - before.get("_dropped", 0)
    ctx.row(bench, "get p50 under a PVA flood vs quiet gateway", under["p50_ms"], quiet["p50_ms"], "(info)", None, "ms")
    ctx.row(bench, "get p99 under a PVA flood vs quiet gateway", under["p99_ms"], quiet["p99_ms"], "(info)", None, "ms")
    ctx.row(bench, "flood events received by the gateway during the gets", received / under["seconds"], None,
            "(info)", None, "ev/s")
    ctx.row(bench, "flood events the gateway dropped (coalesced or lost)", dropped, None, "(info)", None, "ev")
    ctx.note(bench, "gets", {"quiet": quiet, "under_flood": under, "offered_per_s": round(offered / under["seconds"]),
                             "load": load, "realtime_threads": realtime_threads(ctx.gw_pid)})


def _settle(ctx: Ctx, uris: list[str], quiet: float = 1.5, timeout: float = 60) -> dict:
    """Gateway callback counters once they stopped moving (the gateway drained its queues)."""
    last, since, end = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        got = ctx.probe()
        cur = {u: got.get(u, {}).get("count", 0) for u in uris}
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since > quiet:
            break
        time.sleep(0.3)
    time.sleep(1.0)  # linger + delivery
    return ctx.probe()


def _sequence_check(topics: dict, received: dict, records: dict, t_go: float, t_stop: float) -> dict:
    """What reached Kafka vs what the gateway's EPICS callback got, per PV.

    Servers coalesce under load, so a gap in the counter is not a loss; a loss
    is an update the gateway *received* that is not in Kafka. Per PV: records
    in Kafka (distinct counter values, in order) must equal the callback count,
    and their sum must equal the callback's running sum of values.
    """
    out = {"received": 0, "kafka": 0, "lost": 0, "duplicates": 0, "out_of_order": 0, "sum_mismatch": 0,
           "kafka_in_window": 0, "last_ts": 0}
    for uri, topic in topics.items():
        name = uri.split("://", 1)[1]
        got = received.get(uri, {"count": 0, "sum": 0.0})
        vals, in_window = [], 0
        for ts, rec in records.get(topic, []):
            tree = rec.get(name) if isinstance(rec, dict) else None
            v = tree.get("value") if isinstance(tree, dict) else None
            if isinstance(v, (int, float)):
                vals.append(v)
                in_window += t_go * 1000 <= ts <= t_stop * 1000  # broker append time (LogAppendTime)
                out["last_ts"] = max(out["last_ts"], ts)
        distinct = list(dict.fromkeys(vals))
        out["out_of_order"] += sum(1 for a, b in zip(vals, vals[1:]) if b < a)
        out["duplicates"] += len(vals) - len(distinct)
        out["received"] += got["count"]
        out["kafka"] += len(distinct)
        out["lost"] += max(0, got["count"] - len(distinct))
        out["sum_mismatch"] += abs(sum(distinct) - got["sum"]) > 1e-6 * max(1.0, abs(got["sum"]))
        out["kafka_in_window"] += in_window
    return out


# ============================================================================ gets

def get_latency(ctx: Ctx) -> None:
    bench, T = "get_latency", ctx.args.seconds
    ours = run_json([CLIENT, "get", "local", "bench-lat", "pva://variable:a", "1", str(T)], env=ctx.client_env())
    p4p = run_json(["-m", "bench.workers", "p4pget", "variable:a", str(T / 2)], env=ctx.epics_env())
    kafka = _through_echo(ctx, "bench-ping", "ping", str(T / 2))
    base = p4p["p50_ms"] + kafka["roundtrip_p50_ms"]
    ctx.row(bench, "get p50 (1 thread)", ours["p50_ms"], None, "<= 3 ms", ours["p50_ms"] <= 3, "ms")
    ctx.row(bench, "get p50 vs p4p get + Kafka round trip", ours["p50_ms"], base, "<= 2 x baseline",
            ours["p50_ms"] <= 2 * base, "ms")
    ctx.row(bench, "get p99 (1 thread)", ours["p99_ms"], p4p["p99_ms"] + kafka["roundtrip_p99_ms"], "(info)", None, "ms")
    ctx.note(bench, "ours", ours)
    ctx.note(bench, "raw_p4p_get", p4p)
    ctx.note(bench, "raw_kafka", kafka)


def _through_echo(ctx: Ctx, prefix: str, worker: str, *args: str) -> dict:
    """Run ``bench.workers <worker>`` against a bare echo relay (two hops, like a get, without EPICS)."""
    ping, pong = f"{prefix}-ping", f"{prefix}-pong"
    for t in (ping, pong):
        ctx.stack.create_topic(t)
    echo = Worker(["-m", "bench.workers", "echo", ctx.stack.bootstrap, ping, pong], name="kafka echo")
    try:
        echo.expect("ready", 30)
        meter = Meter(echo=echo.pid, kafka=ctx.stack.kafka.pid)
        out = run_json(["-m", "bench.workers", worker, ctx.stack.bootstrap, ping, pong, *args])
        return dict(out, load=meter.stop())
    finally:
        echo.close()


def legacy_python() -> str:
    py = LEGACY_VENV / "bin" / "python"
    if not (LEGACY_VENV / ".installed").exists():  # same recipe as tests/compat/conftest.py
        subprocess.run([PY, "-m", "venv", "--clear", str(LEGACY_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "k2eg==0.3.0", "confluent-kafka==2.13.0"], check=True)
        (LEGACY_VENV / ".installed").touch()
    return str(py)


def get_throughput(ctx: Ctx) -> None:
    bench, T, threads = "get_throughput", ctx.args.seconds, 32
    uri = "pva://variable:a"
    legacy_apps = (f"bench-tput-legacy-{n}" for n in itertools.count(1))

    def run(who: str, seconds: float = T) -> dict:
        if who == "ours":
            return run_json([CLIENT, "get", "local", "bench-tput", uri, str(threads), str(seconds)],
                            env=ctx.client_env())
        # 0.3.0 starts its reply thread before the lock that thread takes (dml.py, __init__): a reply
        # left in its topic can kill that thread at once, and every get then times out. Each run gets
        # a fresh reply topic (0.3.0 waits for it but never creates it), and one that fails like
        # that, without a figure, is run again.
        for attempt in itertools.count(1):
            app = next(legacy_apps)
            ctx.stack.create_topic(f"{app}-reply")
            try:
                return run_json([CLIENT, "get", "local", app, uri, str(threads), str(seconds)],
                                python=legacy_python(), env=ctx.client_env(legacy=True))
            except RuntimeError as e:
                if attempt == 3 or "reply_wait_condition" not in str(e):
                    raise
                ctx.note(bench, "legacy_restarted", "0.3.0's reply thread died at start; run again")

    # Ours and 0.3.0 take turns, three times; each figure is the mean of its runs. On this shared
    # machine one pair of runs moved the ratio by +-20 % (bench/EXPERIMENTS.md), and taking turns
    # keeps a drift in the machine's load from favouring either client. A 20 s load first, not
    # counted: under this load the broker's JIT compiler still used a quarter of a core 15-35 s
    # after it began, and after an 8 s warm-up the first run was still ~20 % below the later
    # ones of the same client (EXPERIMENTS row 39).
    run("ours", max(T, 20.0))
    runs: dict[str, list[dict]] = {"ours": [], "legacy": []}
    meter = Meter(gateway=ctx.gw_pid, kafka=ctx.stack.kafka.pid, ioc=ctx.stack.ioc.pid)
    runs["ours"].append(run("ours"))
    load = meter.stop()
    for who in ("legacy", "ours", "legacy", "ours", "legacy"):
        runs[who].append(run(who))
    ours, legacy = _mean_of_runs(runs["ours"]), _mean_of_runs(runs["legacy"])
    if ctx.args.profile:
        ctx.profiled(bench, T, lambda: run("ours"))
    # The floor of request/reply through Kafka with Python at both ends: 32 threads, bare records,
    # relayed by a process that only consumes and produces (no EPICS, no parsing, no encoding).
    bare = _through_echo(ctx, "bench-tput", "pingmany", str(threads), str(T))
    ctx.note(bench, "bare_kafka_relay", bare)
    # A CPU floor per get, from two bare parts measured here: the relay's round trip (requester, echo,
    # broker) plus a bare p4p get (client and IOC), both from 32 threads. The machine's cores divided
    # by that is the most gets/s a gateway doing one EPICS read per get could do here; ours shares a
    # read among the gets of one PV that arrive together, so under load it can pass that bound and
    # only the relay's row bounds it.
    meter = Meter(ioc=ctx.stack.ioc.pid)
    p4p = run_json(["-m", "bench.workers", "p4pget", uri.split("://", 1)[1], str(T / 2), str(threads)],
                   env=ctx.epics_env())
    p4p["load"] = meter.stop()
    ctx.note(bench, "bare_p4p_get", p4p)
    trips = bare["roundtrips_per_s"] * T
    relay_us = 1e6 * (bare["cpu_s"] + (bare["load"]["echo"] + bare["load"]["kafka"]) * T) / max(1.0, trips)
    p4p_us = 1e6 * (p4p["cpu_s"] + p4p["load"]["ioc"] * T / 2) / max(1, p4p["n"])
    cores = os.cpu_count() or 1
    floor = cores * 1e6 / (relay_us + p4p_us)
    ctx.note(bench, "floor_per_get_us", {"relay": round(relay_us), "p4p_get": round(p4p_us), "cores": cores,
                                         "gets_per_s": round(floor)})
    ctx.row(bench, "gets/s, 32 threads", ours["gets_per_s"], None, ">= 2000", ours["gets_per_s"] >= 2000, "get/s")
    ctx.row(bench, "gets/s vs 0.3.0 client, 32 threads", ours["gets_per_s"], legacy["gets_per_s"], ">= 5 x 0.3.0",
            ours["gets_per_s"] >= 5 * legacy["gets_per_s"], "get/s")
    ctx.row(bench, "bare Kafka relay round trips/s vs 0.3.0 (ceiling)", bare["roundtrips_per_s"],
            legacy["gets_per_s"], "(info: >= 5 x 0.3.0 possible?)", None, "trip/s")
    ctx.row(bench, "cores / CPU per bare relay trip + bare p4p get vs 0.3.0 (ceiling at one read per get)", floor,
            legacy["gets_per_s"], "(info: >= 5 x 0.3.0 possible?)", None, "get/s")
    ctx.row(bench, "gets/s vs bare Kafka relay", ours["gets_per_s"], bare["roundtrips_per_s"], "(info)", None,
            "get/s")
    ctx.note(bench, "ours", dict(ours, load=load,
                                 gateway_cpu_us_per_get=round(1e6 * load["gateway"] / max(1, runs["ours"][0]["gets_per_s"]))))
    ctx.note(bench, "legacy_0.3.0", legacy)


def _mean_of_runs(runs: list[dict]) -> dict:
    """One get-load result from several: rates and percentiles averaged, counts added, each run's rate kept."""
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("gets_per_s", "p50_ms", "p99_ms", "client_cpu_s")}
    return dict(mean, gets=sum(r["gets"] for r in runs), errors=sum(r["errors"] for r in runs),
                error_kinds=sorted({k for r in runs for k in r["error_kinds"]}),
                runs_gets_per_s=[round(r["gets_per_s"]) for r in runs])


# ============================================================================ asyncio client (issue 20)

def aio_gets(ctx: Ctx) -> None:
    """Gets/s of 32 coroutines on one k2eg.aio client against 32 threads on one dml client.

    Same PV, same gateway, one process each; the two take turns four times (this machine is
    shared: turns keep a drift in its load from favouring either), after a 20 s warm-up of each.
    """
    bench, T, n = "aio_gets", ctx.args.seconds, 32
    uri = "pva://variable:a"

    def run(who: str, seconds: float = T) -> dict:
        worker = AIO_CLIENT if who == "aio" else CLIENT
        return run_json([worker, "get", "local", f"bench-aio-gets-{who}", uri, str(n), str(seconds)],
                        env=ctx.client_env())

    # Warm both clients and the broker's JIT first: without the aio warm-up the first (aio) turn ran
    # 15-30 % below the later ones on a quiet machine (2026-12-04 20:33 UTC: 1473 then 1808, 2064).
    run("dml", max(T, 20.0))
    run("aio", max(T, 20.0))
    runs: dict[str, list[dict]] = {"aio": [], "dml": []}
    for who in ("aio", "dml", "dml", "aio") * 2:  # ABBA twice: a steady drift favours neither
        runs[who].append(run(who))
        ctx.note(bench, f"turn_{who}_{len(runs[who])}", {"gets_per_s": round(runs[who][-1]["gets_per_s"]),
                                                         "loadavg": os.getloadavg()[0]})
    aio, threaded = _mean_of_runs(runs["aio"]), _mean_of_runs(runs["dml"])
    ctx.row(bench, "async gets/s, 32 tasks on one client vs dml 32 threads", aio["gets_per_s"],
            threaded["gets_per_s"], ">= 1 x dml", aio["gets_per_s"] >= threaded["gets_per_s"], "get/s")
    # CPU per get in the measured window: what the client itself costs, less moved by the machine's load
    # than a rate (a process of 32 runnable threads gets a larger share of a busy machine than one loop).
    cpu = {who: 1e6 * sum(r["window_cpu_s"] for r in rs) / max(1, sum(r["gets"] for r in rs))
           for who, rs in runs.items()}
    ctx.row(bench, "client CPU per get, async vs dml (lower is better)", cpu["aio"], cpu["dml"], "(info)", None,
            "us")
    ctx.note(bench, "aio", aio)
    ctx.note(bench, "dml", threaded)


def aio_monitor(ctx: Ctx) -> None:
    """Events an ``async for`` consumer of k2eg.aio takes, against dml's handler, from the same backlog.

    The procedure of ``monitor_delivery`` (a topic pre-filled with ``--events`` copies of the
    gateway's event) for both clients, taking turns twice. The async iterator's queue is made
    large enough to hold the backlog, so the figure is delivery, not coalescing; a run with the
    default bound (1000, newest value wins) is reported beside it with its ``dropped`` count.
    """
    bench, uri, count = "aio_monitor", "pva://variable:b", ctx.args.events
    rate = lambda r: r["backlog_drain_per_s"] or r["overall_per_s"]  # noqa: E731
    results: dict[str, list[dict]] = {"aio": [], "dml": []}
    for who in ("aio", "dml", "dml", "aio"):  # ABBA: a steady drift in the machine's load favours neither
        args = ([AIO_CLIENT, "monitor", "local", f"bench-aio-mon-{len(results[who])}", uri, "60", str(2 * count)]
                if who == "aio" else None)
        results[who].append(_deliver(ctx, f"{who}_{len(results[who])}", uri, count, PY, worker_args=args))
        ctx.note(bench, f"turn_{who}_{len(results[who])}", {"per_s": rate(results[who][-1]),
                                                            "loadavg": os.getloadavg()[0]})
    bounded = _deliver(ctx, "aio_bounded", uri, count, PY,
                       worker_args=[AIO_CLIENT, "monitor", "local", "bench-aio-mon-b", uri, "60", "1000"])
    ctx.note(bench, "aio_default_bound", {k: bounded.get(k) for k in ("events", "sent", "overall_per_s",
                                                                      "backlog_drain_per_s")})
    aio = sum(rate(r) for r in results["aio"]) / len(results["aio"])
    threaded = sum(rate(r) for r in results["dml"]) / len(results["dml"])
    ctx.row(bench, "events/s to an async for consumer vs dml handler", aio, threaded, ">= 0.8 x dml",
            aio >= 0.8 * threaded, "ev/s")
    ctx.row(bench, "events/s, async for, default queue bound (newest wins)", rate(bounded), threaded,
            "(info)", None, "ev/s")


# ============================================================================ client monitor delivery

def monitor_delivery(ctx: Ctx) -> None:
    """Events a client hands to its user handler, from a backlog filled into a monitored topic.

    Both clients start reading at the end of a monitor topic, so "pre-filled" means: once the
    client sees the topic (it got a marker event), the benchmark fills it with ``--events``
    copies of the gateway's own event for that PV, faster than a client reads; the rate is taken
    while the client drains the backlog.
    """
    bench = "monitor_delivery"
    results = {}
    for who, uri, count, python in (("ours", "pva://variable:b", ctx.args.events, PY),
                                    ("legacy_0.3.0", "pva://channel:long", ctx.args.events // 5, None)):
        results[who] = _deliver(ctx, who, uri, count, python)
        ctx.note(bench, who, results[who])
    if ctx.args.profile:  # a separate pass with py-spy on our client
        ctx.note(bench, "ours_client_profile", _deliver(ctx, "ours", "pva://variable:b", ctx.args.events, PY,
                                                        profile=True)["profile"])
    rate = lambda r: r["backlog_drain_per_s"] or r["overall_per_s"]  # noqa: E731
    ours, legacy = rate(results["ours"]), rate(results["legacy_0.3.0"])
    # The floor of any Python client: the same backlog read by a bare consume + msgpack unpack +
    # handler call loop, in one process. If that is under 5 x 0.3.0, no Python client reaches it.
    high = _high_watermark(ctx, "variable_b")
    bare = run_json(["-m", "bench.workers", "drain", ctx.stack.bootstrap, "variable_b",
                     str(max(0, high - ctx.args.events)), str(ctx.args.events)])
    ctx.note(bench, "bare_consume_unpack", bare)
    ctx.row(bench, "events/s to user handlers", ours, None, ">= 100k", ours >= 100_000, "ev/s")
    ctx.row(bench, "events/s vs 0.3.0 client", ours, legacy, ">= 5 x 0.3.0", ours >= 5 * legacy, "ev/s")
    ctx.row(bench, "bare consume+unpack loop vs 0.3.0 (ceiling)", bare["per_s"], legacy,
            "(info: >= 5 x 0.3.0 possible?)", None, "ev/s")
    ctx.row(bench, "events/s vs bare consume+unpack loop", ours, bare["per_s"], "(info)", None, "ev/s")


def _high_watermark(ctx: Ctx, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": ctx.stack.bootstrap, "group.id": "bench-watermark"})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        c.close()


def _deliver(ctx: Ctx, who: str, uri: str, count: int, python: str | None, profile: bool = False,
             worker_args: list[str] | None = None) -> dict:
    import select

    from confluent_kafka import Producer

    name = uri.split("://", 1)[1]
    topic = name.replace(":", "_")
    app = f"bench-mon-{who.split('_')[0]}-{'p' if profile else 'm'}"
    ctx.stack.create_topic(f"{app}-reply")  # 0.3.0 waits for it but never creates it
    worker = Worker(worker_args or [CLIENT, "monitor", "local", app, uri, "60"], python=python or legacy_python(),
                    env=ctx.client_env(legacy=python is None), name=f"{who} monitor client")
    prod = Producer({"bootstrap.servers": ctx.stack.bootstrap, "linger.ms": 20, "batch.num.messages": 10000,
                     "queue.buffering.max.messages": 2_000_000, "queue.buffering.max.kbytes": 2 << 20})
    headers = [("k2eg-ser-type", b"msgpack")]
    prof = None
    try:
        template = _first_event(ctx, topic, name)
        payloads = [msgpack.packb({name: dict(template, value=float(i))}) for i in range(count)]
        marker = msgpack.packb({name: dict(template, value=-1.0)})
        deadline = time.monotonic() + 90
        while True:  # markers until the client says it sees the topic
            prod.produce(topic, marker, name, headers=headers)
            prod.flush(5)
            if select.select([worker.proc.stdout], [], [], 0.2)[0]:
                worker.expect("ready", 5)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{who}: monitor never delivered a marker; {worker.stderr()}")
        meter = Meter(client=worker.pid)
        if profile:
            prof = (pyspy_start(worker.pid, 4, ctx.work / f"profile-client-{who}.txt"),
                    ctx.work / f"profile-client-{who}.txt")
        t0 = time.time()
        for data in payloads:
            while True:
                try:
                    prod.produce(topic, data, name, headers=headers)
                    break
                except BufferError:
                    prod.poll(0.01)
        prod.flush(60)
        t_filled = time.time()
        out = worker.json(120)
        load = meter.stop()
    finally:
        worker.close()
    n = out.get("n", 0)
    overall = (n - 1) / (out["last"] - out["first"]) if n > 1 and out["last"] > out["first"] else 0.0
    after = [(t, c) for t, c in out.get("samples", []) if t >= t_filled]
    drain = ((after[-1][1] - after[0][1]) / (after[-1][0] - after[0][0])
             if len(after) >= 2 and after[-1][0] - after[0][0] > 0.3 else None)
    res = {"events": n, "sent": count, "overall_per_s": round(overall), "backlog_drain_per_s": drain and round(drain),
           "fill_seconds": round(t_filled - t0, 2), "client_cpu_us_per_event":
           round(1e6 * load["client"] * load["seconds"] / max(1, n), 1), "load": load}
    if prof and prof[0]:
        prof[0].wait(30)
        res["profile"] = pyspy_summary(prof[1])
    return res


def _first_event(ctx: Ctx, topic: str, name: str) -> dict:
    """The gateway's own event for ``name`` (a real value tree), once the client's monitor made it publish one."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            recs = read_topics(ctx.stack.bootstrap, [topic], timeout=5)[topic]
        except Exception:
            recs = []
        for _, rec in recs:
            if isinstance(rec, dict) and isinstance(rec.get(name), dict):
                return rec[name]
        time.sleep(0.5)
    raise TimeoutError(f"no gateway event on {topic}")


# ============================================================================ snapshot, scale

def snapshot(ctx: Ctx) -> None:
    bench, window = "snapshot", 1000
    from k2eg.stack.ioc import bulk_names

    names = bulk_names(ctx.stack.bulk)[:1000]
    lst = ctx.work / "snapshot-pvs.txt"
    lst.write_text("\n".join(f"pva://{n}" for n in names))
    out = run_json([CLIENT, "snapshot", "local", "bench-snap", str(lst), str(window), "3"], env=ctx.client_env())
    ms = [r["ms"] for r in out["runs"]]
    ctx.row(bench, f"1000-PV snapshot completion (worst of {len(ms)})", max(ms), window, "<= window + 200 ms",
            max(ms) <= window + 200, "ms")
    ctx.note(bench, "runs", out["runs"])


def scale10k(ctx: Ctx) -> None:
    """10k PVs at 1 Hz (the demo IOC's bulk records), subscribed 1000 per multi-monitor command.

    Measured at 1000, 3000 and 10000 PVs, as far as the subscription time budget goes: cost per PV
    is the point, and a stage that already breaks the target settles the question for 10k.
    """
    bench, T, budget = "scale10k", max(10.0, ctx.args.seconds), ctx.args.scale_budget
    from k2eg.stack.ioc import bulk_names

    uris = [f"pva://{n}" for n in bulk_names(ctx.stack.bulk)[:10000]]
    pid = ctx.gw_pid
    meter = Meter(gateway=pid, kafka=ctx.stack.kafka.pid, ioc=ctx.stack.ioc.pid)
    time.sleep(T / 2)
    idle = dict(meter.stop(), rss_mb=round(rss_mb(pid)))
    ctx.note(bench, "idle", idle)
    # The same topics, 1 record/s each, from bare producers set up as the gateway's: the CPU that
    # librdkafka alone needs (it sends one ProduceRequest per partition batch), before any EPICS.
    from k2eg.protocol.uri import parse_pv_uri
    from k2eg.transport import TopicAdmin

    topics = [parse_pv_uri(u).topic for u in uris]
    TopicAdmin({"bootstrap.servers": ctx.stack.bootstrap}).ensure(topics, timeout=budget)
    meter = Meter(kafka=ctx.stack.kafka.pid)
    bare = run_json(["-m", "bench.workers", "produce1hz", ctx.stack.bootstrap, "450", str(T), *topics])
    bare["load"] = meter.stop()
    ctx.note(bench, "bare_librdkafka_10k_topics_1hz", bare)
    t0 = time.monotonic()
    rep = ctx.cmd.request({"command": "multi-monitor", "pv_name_list": uris}, timeout=budget)
    subscribed = len(uris) if not rep.get("error") else 0
    ctx.note(bench, "one_command_for_10k", {"error": rep.get("error"), "seconds": round(time.monotonic() - t0, 1),
                                            "message": str(rep.get("message"))[-200:]})
    stages, last = [], None
    for stage in (1000, 3000, 10000):
        if subscribed < stage:  # the chunks of a stage go out together: the gateway runs commands in parallel
            chunks = [uris[i:i + 1000] for i in range(subscribed, stage, 1000)]
            left = max(10.0, budget - (time.monotonic() - t0))
            for i, rep in enumerate(ctx.cmd.request_many([{"command": "multi-monitor", "pv_name_list": c}
                                                          for c in chunks], timeout=left)):
                if rep.get("error"):
                    ctx.note(bench, f"chunk_{subscribed + 1000 * i}", str(rep.get("message"))[:200])
            subscribed = stage
            if time.monotonic() - t0 >= budget:
                ctx.note(bench, "budget", f"subscription budget of {budget:g}s ran out during the {stage}-PV stage")
        time.sleep(5)
        before = ctx.probe()
        meter = Meter(gateway=pid, kafka=ctx.stack.kafka.pid, ioc=ctx.stack.ioc.pid)
        time.sleep(T)
        load = meter.stop()
        after = ctx.probe()
        got = sum(after.get(u, {}).get("count", 0) - before.get(u, {}).get("count", 0) for u in uris) / load["seconds"]
        active = sum(1 for u in uris if after.get(u, {}).get("count", 0) > 0)  # PVs the gateway hears from
        last = {"pvs": active, "requested": subscribed, "subscribed_after_s": round(time.monotonic() - t0 - T - 5),
                "events_per_s_received": round(got), "rss_mb": round(rss_mb(pid)),
                "gateway_cpu_us_per_event": round(1e6 * load["gateway"] / max(1.0, got)),
                "producer_queue": [before.get("_producer_queue"), after.get("_producer_queue")],
                "dropped_per_s": round((after.get("_dropped", 0) - before.get("_dropped", 0)) / load["seconds"]),
                "load": load}
        if "_python_heap_mb" in after:
            last["python_heap"] = {"mb": after["_python_heap_mb"], "top": after["_python_heap_top"]}
        stages.append(last)
        ctx.note(bench, f"stage_{subscribed}", last)
        if subscribed >= len(uris):
            break
    n, cpu, rss = last["pvs"], last["load"]["gateway"], last["rss_mb"]
    def verdict(ok: bool) -> bool | None:  # below 10k PVs only a miss is conclusive
        return ok if n >= 10000 else (None if ok else False)

    ctx.row(bench, f"gateway CPU, {n} PVs at 1 Hz", cpu, idle["gateway"], "<= 0.5 core at 10k PVs",
            verdict(cpu <= 0.5), "cores")
    ctx.row(bench, f"bare librdkafka publishing {len(topics)} topics at 1 Hz (floor)", bare["cores"], None,
            "(info: <= 0.5 core possible?)", None, "cores")
    ctx.row(bench, f"gateway RSS, {n} PVs at 1 Hz", rss, idle["rss_mb"], "<= 500 MB at 10k PVs",
            verdict(rss <= 500), "MB")
    ctx.row(bench, f"PV events/s received by the gateway, {n} PVs", last["events_per_s_received"], n,
            "= PVs x 1 Hz", last["events_per_s_received"] >= 0.95 * n, "ev/s")
    # Received is not delivered: a broker that cannot keep up makes the gateway coalesce (count, drop).
    ctx.row(bench, f"PV events/s lost on the way to Kafka, {n} PVs", last["dropped_per_s"], None, "0",
            last["dropped_per_s"] == 0, "ev/s")


BENCHES = {"pva_flood": lambda c: flood(c, "pva"), "ca_flood": lambda c: flood(c, "ca"), "flood_gets": flood_gets,
           "get_latency": get_latency, "get_throughput": get_throughput, "monitor_delivery": monitor_delivery,
           "aio_gets": aio_gets, "aio_monitor": aio_monitor,
           "snapshot": snapshot, "scale10k": scale10k}


# ============================================================================ main

def make_stack(state_dir: Path, bulk: int, ports: dict, extra: list[str] = ()):
    from k2eg.stack.ioc import DemoIOC
    from k2eg.stack.runner import Stack

    class BenchIOC(DemoIOC):
        """The demo IOC; clients (the gateway) also search the flood servers."""

        def client_env(self):
            env = super().client_env()
            env["EPICS_PVA_ADDR_LIST"] += f" 127.0.0.1:{ports['pva_bcast']}"
            env["EPICS_CA_ADDR_LIST"] += f" 127.0.0.1:{ports['ca_server']}"
            return env

    return Stack(state_dir, bulk=bulk, ioc_factory=BenchIOC, gateway_cmd=[PY, str(HERE / "probe.py")],
                 gateway_args=["--log-level", "warning", "--pv-connection-timeout", "30", *extra], gateway_timeout=120)


def realtime_threads(pid: int | None) -> list[str]:
    """k2eg.scheduling.realtime_threads of a process that may be gone or not started: then none."""
    try:
        return scheduling.realtime_threads(pid)
    except (OSError, TypeError):
        return []


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "git": rev + (" + uncommitted changes in src/" if dirty.strip() else ""),
            "loadavg_start": os.getloadavg(), "realtime": scheduling.realtime_possible()}


def write_results(path: Path, ctx: Ctx, info: dict, command: str, failed: dict, append: bool = False) -> None:
    L = ["## Run" if append else "# k2eg benchmark results", "", f"Produced by: `{command}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  ",
         f"Machine: {info['cpus']} x {info['cpu']}, Python {info['python']}, git {info['git']}  ",
         f"Code under test: {info['src']}" + (f", gateway extra args: {' '.join(ctx.args.gw_arg)}" if ctx.args.gw_arg else "")
         + "  ", f"Kafka data: {info['kafka_data']}  ",
         "Real-time scheduling: " + ("allowed (root with CAP_SYS_NICE, or RLIMIT_RTPRIO > 0)" if info["realtime"]
                                     else "not allowed (no CAP_SYS_NICE, RLIMIT_RTPRIO 0"
                                     + (": --no-sys-nice)" if ctx.args.no_sys_nice else ")"))
         + "; threads at real-time priority at the end of the run: gateway "
         + (", ".join(info["realtime_threads"]["gateway"]) or "none") + ", demo IOC "
         + (", ".join(info["realtime_threads"]["ioc"]) or "none") + "  ",
         f"Load average at start / end: {info['loadavg_start'][0]:.2f} / {os.getloadavg()[0]:.2f} "
         "(other users of this machine run their own stacks; see `other_cores` per benchmark)", "",
         "| benchmark | figure | value | baseline (same run) | ratio | target | result |",
         "|---|---|---|---|---|---|---|"]
    for r in ctx.rows:
        verdict = "n/a" if r.ok is None else ("PASS" if r.ok else "**FAIL**")
        base = "-" if r.baseline is None else f"{r.baseline:,.4g}"
        L.append(f"| {r.bench} | {r.figure} | {r.value:,.4g} {r.unit} | {base} | {r.ratio} | {r.target} | {verdict} |")
    for name, err in failed.items():
        L.append(f"| {name} | did not complete | - | - | - | - | **ERROR** {err[:200]} |")
    if append:  # one block among several runs: the table and the load the rest of the machine put on it
        L += ["", "`other_cores` (cores busy outside this benchmark) per measured window: " + "; ".join(
            f"{bench} {', '.join(f'{c:.2f}' for c in _other_cores(d))}" for bench, d in ctx.details.items()), ""]
        path.write_text((path.read_text() if path.exists() else "") + "\n" + "\n".join(L) + "\n")
        return
    L += ["", "## Details", "", "Loads: `machine_cores` = CPU busy on the whole machine, `bench_tree_cores` = this "
          "benchmark's processes (Kafka, IOC, gateway, workers), `other_cores` = everything else; per-process "
          "figures are cores used during the measured window.", ""]
    for bench, d in ctx.details.items():
        L.append(f"### {bench}")
        L.append("```json")
        L.append(json.dumps(d, indent=1, default=str))
        L.append("```")
    path.write_text("\n".join(L) + "\n")


def _other_cores(detail) -> list[float]:
    """Every ``other_cores`` figure in a benchmark's details, in order."""
    if isinstance(detail, dict):
        here = [detail["other_cores"]] if isinstance(detail.get("other_cores"), (int, float)) else []
        return here + [c for v in detail.values() for c in _other_cores(v)]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=" ".join(ORDER))
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window of each benchmark (default 8)")
    ap.add_argument("--quick", action="store_true", help="3 s windows, fewer events: a smoke run")
    ap.add_argument("--profile", action="store_true", help="py-spy the gateway during floods and get throughput")
    ap.add_argument("--flood-pvs", type=int, default=8)
    ap.add_argument("--scale-budget", type=float, default=240, help="seconds scale10k may spend subscribing")
    ap.add_argument("--gw-arg", action="append", default=[], metavar="ARG",
                    help="extra gateway argument, repeatable (e.g. --gw-arg=--pub-impl-kv --gw-arg=linger.ms:20)")
    ap.add_argument("--src", type=Path, help="run gateway and our client from this source tree (A/B experiments)")
    ap.add_argument("--events", type=int, default=400_000, help="events pre-filled for monitor_delivery (ours)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--disk", action="store_true", help="keep the stack's data (Kafka's log) on disk, not in /dev/shm")
    ap.add_argument("--no-sys-nice", action="store_true",
                    help="run without real-time privileges: drop CAP_SYS_NICE and RLIMIT_RTPRIO before starting "
                         "anything (default: as invoked; the gateway, IOCs and servers drop them themselves, "
                         "--gw-arg=--epics-realtime --gw-arg=true keeps them in the gateway)")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--append", action="store_true",
                    help="add this run's table after what --out holds (runs side by side, e.g. taking turns "
                         "with and without --no-sys-nice) instead of replacing it")
    args = ap.parse_args(argv)
    unknown = set(args.names) - set(ORDER)
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    if args.quick:
        args.seconds, args.events, args.scale_budget = 3.0, 100_000, 60.0
    if args.src:
        os.environ["PYTHONPATH"] = str(args.src.resolve())
    names = [n for n in ORDER if n in (args.names or ORDER)]
    argv = sys.argv[1:] if argv is None else argv
    if args.no_sys_nice:  # before any thread or process starts: every process of the run inherits it
        from k2eg.scheduling import epics_scheduling
        print(epics_scheduling(realtime=False)[1], flush=True)
    command = "python -m bench " + " ".join(argv)
    bulk = 10000 if "scale10k" in names else (1000 if "snapshot" in names else 0)

    from k2eg.stack.ports import free_ports

    p = free_ports(5)
    ports = dict(zip(["pva_server", "pva_bcast", "ca_server", "ca_pvas", "ca_pvas_bcast"], p))
    # Kafka's data on tmpfs unless --disk: on this VM's ext4 the broker's page faults on its
    # memory-mapped index files, not the gateway, cap 10k partitions (bench/EXPERIMENTS.md row 23).
    ram = None if args.disk or not os.access("/dev/shm", os.W_OK) else "/dev/shm"
    work = Path(tempfile.mkdtemp(prefix="k2eg-bench-", dir=ram))
    info = machine()
    info["src"] = str(args.src.resolve()) if args.src else str(ROOT / "src")
    info["kafka_data"] = "disk" if ram is None else "tmpfs (/dev/shm)"
    print(f"k2eg bench: {', '.join(names)}; work dir {work}; load {info['loadavg_start'][0]:.2f}", flush=True)
    stack = make_stack(work / "stack", bulk, ports, args.gw_arg)
    t0 = time.monotonic()
    try:
        stack.start()
    except BaseException:  # e.g. a broker too slow to start on a loaded machine (the stack stopped its parts)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"stack up in {time.monotonic() - t0:.0f}s (bulk={bulk})", flush=True)
    failed: dict[str, str] = {}
    ctx = Ctx(stack, Commander(stack.bootstrap, stack.cmd_topic), args, ports, work)
    try:
        for name in names:
            print(f"\n== {name}", flush=True)
            t = time.monotonic()
            try:
                BENCHES[name](ctx)
            except Exception as e:  # report and go on with the next benchmark
                import traceback
                traceback.print_exc()
                failed[name] = f"{type(e).__name__}: {e}"
            print(f"   ({time.monotonic() - t:.0f}s)", flush=True)
    finally:
        info["realtime_threads"] = {"gateway": realtime_threads(stack.gateway_pid), "ioc": realtime_threads(stack.ioc.pid)}
        ctx.cmd.close()
        stack.stop()
        write_results(args.out, ctx, info, command, failed, append=args.append)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.out} (total {time.monotonic() - t0:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
