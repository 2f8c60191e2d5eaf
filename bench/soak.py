"""Soak run (issue 7): many PVs at a steady rate through the gateway for minutes, every update accounted for.

usage: .venv/bin/python -m bench.soak [--minutes 10] [--pvs 500] [--hz 10] [--protocol mixed|ca|pva] [--keep]

Starts its own Stack (Kafka, demo IOC, gateway) plus a soak IOC (pythonSoftIOC,
CA + PVA) with ``--pvs`` calc records ``soak:<i>`` scanned at ``--hz``. Each
record counts 1, 2, 3, ... while ``soak:run`` is 1, so its value is a per-PV
sequence number and the IOC knows exactly how many updates it offered. The
gateway monitors all of them (a multi-monitor; ``mixed``: first half over
CA, second half over PVA), a plain confluent-kafka consumer reads the PV
topics, and at the end the report gives per-PV offered / received / lost /
duplicated / out-of-order counts, the gateway's RSS sampled every 10 s (with
its slope) and its CPU, and the machine's load (other work shares the cores).
The last stdout line is the report as JSON.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgpack

from bench.util import Commander, Meter, Worker, cpu_seconds, rss_mb
from k2eg.stack.ioc import loopback_server_env

SAMPLE_S = 10.0
WARMUP_S = 60.0
SCAN_PERIODS = {10: ".1 second", 5: ".2 second", 2: ".5 second", 1: "1 second"}  # menuScan choices  # RSS slope is fitted after this: buffers and caches fill first


# ----------------------------------------------------------------------------- the soak IOC (subprocess)

def soak_db(n: int, hz: int) -> str:
    out = ['record(bo, "soak:run") {\n  field(ZNAM, "stop")\n  field(ONAM, "run")\n  field(PINI, "YES")\n}\n']
    for i in range(n):
        # Counts only while soak:run is 1; a frozen value posts no monitor (calc posts on change).
        out.append(f'record(calc, "soak:{i:03d}") {{\n  field(SCAN, "{SCAN_PERIODS[hz]}")\n'
                   f'  field(INPA, "soak:{i:03d} NPP")\n  field(INPB, "soak:run NPP")\n'
                   f'  field(CALC, "B?A+1:A")\n}}\n')
    return "".join(out)


def serve(n: int, hz: int, ca_port: int, pvas_port: int, pvas_bcast: int, work_dir: str) -> None:
    """Runs in the soak IOC process: ``go`` starts counting, ``stop`` freezes and reports the final counts."""
    os.environ.update(loopback_server_env(ca_port, pvas_port, pvas_bcast))
    from softioc import asyncio_dispatcher, imports, softioc

    from bench.servers import _control

    db = os.path.join(work_dir, "soak.db")
    with open(db, "w") as f:
        f.write(soak_db(n, hz))
    softioc.dbLoadDatabase(db)
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    dbf = imports.get_DBF_values()

    def run(on: int) -> None:
        buf = ctypes.c_int32(on)
        imports.db_put_field_process("soak:run", dbf["DBF_LONG"], ctypes.addressof(buf), 1, True)

    def counts() -> list[int]:
        buf = ctypes.c_double()
        out = []
        for i in range(n):
            imports.db_get_field(f"soak:{i:03d}", dbf["DBF_DOUBLE"], ctypes.addressof(buf), 1)
            out.append(int(buf.value))
        return out

    def stop() -> None:
        run(0)
        time.sleep(2 / hz)  # let a scan pass that was under way finish

    import threading
    threading.Thread(target=_control, args=(lambda: run(1), stop, counts), daemon=True).start()
    softioc.non_interactive_ioc()


# ----------------------------------------------------------------------------- orchestration

def make_stack(state_dir: Path, ports: dict):
    from k2eg.stack.ioc import DemoIOC
    from k2eg.stack.runner import Stack

    class SoakIOC(DemoIOC):
        """The demo IOC; the gateway also searches the soak IOC."""

        def client_env(self):
            env = super().client_env()
            env["EPICS_PVA_ADDR_LIST"] += f" 127.0.0.1:{ports['pvas_bcast']}"
            env["EPICS_CA_ADDR_LIST"] += f" 127.0.0.1:{ports['ca']}"
            return env

    return Stack(state_dir, ioc_factory=SoakIOC,
                 gateway_args=["--log-level", "warning", "--pv-connection-timeout", "30"], gateway_timeout=120)


class Tally:
    """Per-PV sequence bookkeeping: how often each sequence number arrived, and order."""

    def __init__(self, names: list[str], hz: int):
        self.hz = hz  # sequence n was made n/hz seconds after "go": says *when* a loss happened
        self.ooo_at: dict[int, int] = {}  # 10 s bucket -> out-of-order arrivals
        self.seen = {n: bytearray() for n in names}
        self.last = dict.fromkeys(names, 0)
        self.out_of_order = dict.fromkeys(names, 0)
        self.other = 0  # records that are not a counted update (disconnect markers, foreign names)
        self.received = 0

    def add(self, name: str, tree: dict) -> None:
        seen = self.seen.get(name)
        seq = int(tree.get("value", 0)) if isinstance(tree, dict) else 0
        if seen is None or seq <= 0 or tree.get("alarm", {}).get("severity", 0) == 3:
            self.other += 1  # the pre-start value 0 (re-published on subscribe) lands here too
            return
        self.received += 1
        if seq >= len(seen):
            seen.extend(bytes(seq + 1 - len(seen) + 1024))
        seen[seq] = min(255, seen[seq] + 1)
        if seq < self.last[name]:
            self.out_of_order[name] += 1
            b = int(seq / self.hz // 10) * 10
            self.ooo_at[b] = self.ooo_at.get(b, 0) + 1
        self.last[name] = max(seq, self.last[name])

    def complete(self, final: dict[str, int]) -> bool:
        return all(self.last[n] >= f for n, f in final.items())

    def report(self, final: dict[str, int]) -> dict:
        per_pv = {}
        lost_at: dict[int, int] = {}
        for name, offered in final.items():
            seen = self.seen[name]
            got = seen[1:offered + 1]
            for i, c in enumerate(got, 1):
                if not c:
                    b = int(i / self.hz // 10) * 10
                    lost_at[b] = lost_at.get(b, 0) + 1
            unique = sum(1 for c in got if c)
            per_pv[name] = {"offered": offered, "unique": unique, "lost": offered - unique,
                            "duplicated": sum(c - 1 for c in got if c > 1), "out_of_order": self.out_of_order[name]}
        total = lambda k: sum(p[k] for p in per_pv.values())  # noqa: E731
        worst = sorted(per_pv.items(), key=lambda kv: -(kv[1]["lost"] + kv[1]["duplicated"] + kv[1]["out_of_order"]))[:5]
        return {"offered": total("offered"), "received": self.received, "unique": total("unique"),
                "lost": total("lost"), "duplicated": total("duplicated"), "out_of_order": total("out_of_order"),
                "pvs_with_loss": sum(1 for p in per_pv.values() if p["lost"]),
                "pvs_with_duplicates": sum(1 for p in per_pv.values() if p["duplicated"]),
                "other_records": self.other,
                "pvs_out_of_order": sum(1 for p in per_pv.values() if p["out_of_order"]),
                "lost_by_10s_after_start": dict(sorted(lost_at.items())),
                "out_of_order_by_10s_after_start": dict(sorted(self.ooo_at.items())),
                "worst_pvs": {n: p for n, p in worst if p["lost"] or p["duplicated"] or p["out_of_order"]}}


def slope_per_hour(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) in MB per hour."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    sxx = sum((t - mx) ** 2 for t, _ in samples)
    return 3600 * sum((t - mx) * (v - my) for t, v in samples) / sxx if sxx else None


def run(args: argparse.Namespace) -> dict:
    from confluent_kafka import Consumer

    from k2eg.stack.ports import free_ports

    work = Path(tempfile.mkdtemp(prefix="k2eg-soak-"))
    ca_port, pvas_port, pvas_bcast = free_ports(3)
    ports = {"ca": ca_port, "pvas": pvas_port, "pvas_bcast": pvas_bcast}
    names = [f"soak:{i:03d}" for i in range(args.pvs)]
    half = len(names) // 2
    proto = {n: (args.protocol if args.protocol != "mixed" else ("ca" if i < half else "pva"))
             for i, n in enumerate(names)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    server = Worker(["-m", "bench.soak", "--serve", str(args.pvs), str(args.hz), str(ca_port), str(pvas_port),
                     str(pvas_bcast), str(work)], env=env, name="soak IOC")
    stack = make_stack(work / "stack", ports)
    consumer = cmd = None
    try:
        server.expect("ready", 60)
        stack.start()
        log(f"stack up in {work}; gateway pid {stack.gateway_pid}; {args.pvs} PVs at {args.hz} Hz "
            f"({args.pvs * args.hz} ev/s), protocol {args.protocol}, {args.minutes:g} min")
        cmd = Commander(stack.bootstrap, stack.cmd_topic)
        rep = cmd.request({"command": "multi-monitor", "pv_name_list": [f"{proto[n]}://{n}" for n in names]})
        if rep.get("error"):
            raise RuntimeError(f"multi-monitor failed: {rep}")
        topics = [n.replace(":", "_") for n in names]
        by_topic = dict(zip(topics, names))
        consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"soak-{os.getpid()}",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        consumer.subscribe(topics)
        tally = Tally(names, args.hz)

        def drain(seconds: float) -> None:
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                for m in consumer.consume(5000, min(0.5, left)):
                    if m.error():
                        continue
                    rec = msgpack.unpackb(m.value(), raw=False, strict_map_key=False)
                    name = by_topic.get(m.topic())
                    tree = rec.get(name) if isinstance(rec, dict) else None
                    if tree is None:
                        tally.other += 1
                    else:
                        tally.add(name, tree)

        # Start counting once every PV's initial value came through: topics created, leaders
        # known, the consumer assigned. Start-up on a starved broker is not what a soak measures.
        settle = time.monotonic() + 180
        while tally.other < len(names) and time.monotonic() < settle:
            drain(1)
        log(f"initial values of {tally.other} of {len(names)} PVs read; starting the counters")
        gw = stack.gateway_pid
        meter = Meter(gateway=gw, kafka=stack.kafka.pid, soak_ioc=server.pid)
        server.send("go")
        server.expect("going")
        t0 = time.monotonic()
        cpu0 = cpu_seconds(gw)
        rss: list[tuple[float, float]] = [(0.0, rss_mb(gw))]
        cpu: list[float] = []
        duration = args.minutes * 60
        while (elapsed := time.monotonic() - t0) < duration:
            drain(min(SAMPLE_S, duration - elapsed))
            t = time.monotonic() - t0
            c = cpu_seconds(gw)
            cpu.append((c - cpu0) / max(1e-6, t - (rss[-1][0])))
            cpu0 = c
            rss.append((t, rss_mb(gw)))
            log(f"t={t:5.0f}s received={tally.received:>9,} ({tally.received / t:,.0f}/s) "
                f"gateway rss={rss[-1][1]:.1f} MB cpu={cpu[-1]:.2f} cores "
                f"records_lost={gateway_status(cmd).get('records_lost')} load1={os.getloadavg()[0]:.2f}")
        load = meter.stop()
        server.send("stop")
        final = dict(zip(names, server.json()["updates"]))
        end = time.monotonic() + 60
        while not tally.complete(final) and time.monotonic() < end:
            drain(1)
        drain(2)  # late duplicates, if any
        status = gateway_status(cmd)
        gw_events = {m["pv"].split("://", 1)[1]: m["events"] for m in status.get("monitors", [])}
        # Each PV's first gateway event is its pre-start value 0; what is missing beyond that
        # never reached the gateway's EPICS callback (coalesced by the server or client library).
        epics_lost = sum(max(0, final[n] + 1 - gw_events.get(n, 0)) for n in names)
        steady = [s for s in rss if s[0] >= min(WARMUP_S, duration / 3)]
        report = {
            "minutes": args.minutes, "pvs": args.pvs, "hz": args.hz, "protocol": args.protocol,
            "offered_per_s": round(sum(final.values()) / duration),
            **tally.report(final),
            "by_protocol": {p: {k: v for k, v in tally.report({n: f for n, f in final.items() if proto[n] == p}).items()
                                if k in ("offered", "lost", "duplicated", "out_of_order", "pvs_out_of_order")}
                            for p in sorted(set(proto.values()))},
            "lost_before_gateway": epics_lost, "gateway_records_lost": status.get("records_lost"),
            "gateway_rss_mb": {"samples_every_s": SAMPLE_S, "first": round(rss[0][1], 1),
                               "last": round(rss[-1][1], 1), "max": round(max(v for _, v in rss), 1),
                               "slope_mb_per_hour_after_warmup": _round(slope_per_hour(steady)),
                               "samples": [round(v, 1) for _, v in rss]},
            "gateway_cpu_cores": {"mean": load["gateway"], "max_10s": round(max(cpu), 2) if cpu else None,
                                  "threads": load.get("gateway_threads")},
            "load": {k: load[k] for k in ("kafka", "soak_ioc", "machine_cores", "bench_tree_cores", "other_cores",
                                          "loadavg")},
            "cpus": os.cpu_count(),
        }
        return report
    finally:
        if consumer is not None:
            consumer.close()
        if cmd is not None:
            cmd.close()
        server.close()
        stack.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)  # a 10 min run leaves ~1 GB of Kafka log


def gateway_status(cmd: Commander) -> dict:
    rep = cmd.request({"command": "status"}, timeout=30)
    return rep.get("status", {}) if not rep.get("error") else {}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        from bench.util import epics_scheduling
        epics_scheduling(realtime=False)  # an IOC on a host of its own, like the stack's (k2eg.stack.ioc)
        n, hz, ca_port, pvas_port, pvas_bcast = map(int, argv[1:6])
        serve(n, hz, ca_port, pvas_port, pvas_bcast, argv[6])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--pvs", type=int, default=500)
    p.add_argument("--hz", type=int, default=10, choices=sorted(SCAN_PERIODS), help="an EPICS periodic scan rate")
    p.add_argument("--protocol", default="mixed", choices=["mixed", "ca", "pva"])
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, Kafka data)")
    args = p.parse_args(argv)
    report = run(args)
    r = report
    log(f"\noffered {r['offered']:,}  received {r['received']:,}  lost {r['lost']} (of which before the gateway "
        f"{r['lost_before_gateway']}, dropped by the gateway {r['gateway_records_lost']})  duplicated {r['duplicated']}  "
        f"out of order {r['out_of_order']}  ({r['offered_per_s']:,} ev/s offered)")
    g = r["gateway_rss_mb"]
    log(f"gateway RSS {g['first']} -> {g['last']} MB (max {g['max']}), slope after warm-up "
        f"{g['slope_mb_per_hour_after_warmup']} MB/h; gateway CPU {r['gateway_cpu_cores']['mean']} cores "
        f"(max 10 s {r['gateway_cpu_cores']['max_10s']}); machine {r['load']['machine_cores']} of {r['cpus']} cores, "
        f"other work {r['load']['other_cores']} cores, load1 {r['load']['loadavg']}")
    print(json.dumps(report), flush=True)
    return 0 if r["lost"] == 0 and r["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
