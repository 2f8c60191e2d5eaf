"""The gateway, plus a counter at its EPICS callback: what the gateway *received*, per PV.

Run instead of ``python -m k2eg.gateway`` (same arguments). It wraps the
``on_event`` callback each provider's ``monitor()`` is given, so every update
the gateway's monitor code sees is counted (count, sum and last of the
``value`` field) before the gateway handles it. Touching ``bench-probe.req``
in the working directory makes it write ``bench-probe.json`` there.
Cost: one Python call and a dict update per event. With K2EG_BENCH_TRACEMALLOC=1 it
also reports where the Python heap goes (for memory attribution runs only: slow).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import tracemalloc

STATS: dict[str, list] = {}  # "proto://name" -> [count, sum of values, last value]
KAFKA: list = []  # the gateway's KafkaIO, for its producer queue depth


def _wrap(cls, proto: str) -> None:
    original = cls.monitor

    def monitor(self, name, on_event, *a, **kw):
        key = f"{proto}://{name}"
        st = STATS.setdefault(key, [0, 0.0, None])

        def counted(tree):
            st[0] += 1  # one dispatcher/libca thread per subscription: no lock needed for counts
            v = tree.get("value") if isinstance(tree, dict) else None
            if isinstance(v, (int, float)):
                st[1] += v
                st[2] = v
            on_event(tree)

        return original(self, name, counted, *a, **kw)

    cls.monitor = monitor


def _queue_depth(io) -> int:
    """Records the gateway has not had acknowledged (one producer before the reply/event split, --src A/B)."""
    return io.queue_depth() if hasattr(io, "queue_depth") else len(io.producer)


def _dumper() -> None:
    while True:
        time.sleep(0.05)
        if os.path.exists("bench-probe.req"):
            doc = {k: {"count": c, "sum": s, "last": last} for k, (c, s, last) in list(STATS.items())}
            doc["_producer_queue"] = _queue_depth(KAFKA[0]) if KAFKA else -1  # records not yet acknowledged
            doc["_dropped"] = getattr(KAFKA[0], "dropped", 0) if KAFKA else -1  # lost or coalesced, never in Kafka
            if tracemalloc.is_tracing():
                snap = tracemalloc.take_snapshot()
                doc["_python_heap_mb"] = round(sum(s.size for s in snap.statistics("filename")) / 2**20, 1)
                doc["_python_heap_top"] = [(str(s.traceback), round(s.size / 2**20, 1))
                                           for s in snap.statistics("lineno")[:12]]
            data = json.dumps(doc)
            with open("bench-probe.tmp", "w") as f:
                f.write(data)
            os.replace("bench-probe.tmp", "bench-probe.json")
            os.unlink("bench-probe.req")


def main() -> int:
    from k2eg.gateway import options
    try:  # what the gateway's main() does first, done before this wrapper imports EPICS or starts a thread
        from k2eg.scheduling import epics_scheduling
        epics_scheduling(options.parse(sys.argv[1:]).epics_realtime)
    except options.OptionError:
        pass  # the gateway's main() reports it
    except ImportError:
        pass  # a --src tree older than k2eg.scheduling
    if os.environ.get("K2EG_BENCH_TRACEMALLOC"):  # memory attribution runs only: slows the gateway a lot
        tracemalloc.start(1)
    from k2eg.gateway import __main__ as gw
    from k2eg.gateway import kafka
    from k2eg.gateway.epics import ca, pva

    init = kafka.KafkaIO.__init__

    def kafka_init(self, *a, **kw):
        init(self, *a, **kw)
        KAFKA.append(self)

    kafka.KafkaIO.__init__ = kafka_init
    _wrap(pva.PVAProvider, "pva")
    _wrap(ca.CAProvider, "ca")
    threading.Thread(target=_dumper, name="bench-probe", daemon=True).start()
    return gw.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
