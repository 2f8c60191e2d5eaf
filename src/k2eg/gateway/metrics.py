"""Prometheus metrics and health endpoints (``--metric-enable``).

Hot-path numbers (events, bytes) are plain integers owned by the gateway
and read at scrape time by a collector, so publishing an event costs no
metric lock; latencies use prometheus-client histograms.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("k2eg.gateway.metrics")


class _Collector:
    """Reads the gateway's own counters at scrape time (``read`` returns them as one dict)."""

    def __init__(self, read: Callable[[], dict]):
        self.read = read

    def collect(self):
        s = self.read()
        c = CounterMetricFamily("k2eg_commands", "Commands by outcome", labels=["outcome"])
        for what, n in sorted(s.get("commands", {}).items()):
            c.add_metric([what], n)
        yield c
        e = CounterMetricFamily("k2eg_epics_operations", "Operations by kind and outcome", labels=["kind", "outcome"])
        for (kind, outcome), n in sorted(s.get("operations", {}).items()):
            e.add_metric([kind, outcome], n)
        yield e
        for name, text in _COUNTERS.items():
            yield CounterMetricFamily(f"k2eg_{name}", text, value=s.get(name, 0))
        for name, text in _GAUGES.items():
            yield GaugeMetricFamily(f"k2eg_{name}", text, value=s.get(name, 0))
        g = GaugeMetricFamily("k2eg_epics_channels", "EPICS channels open (idle ones close after "
                                                     "--channel-idle-timeout)", labels=["protocol"])
        for protocol, n in sorted(s.get("epics_channels", {}).items()):
            g.add_metric([protocol], n)
        yield g


_COUNTERS = {
    "events_published": "Records handed to Kafka (events, replies, snapshots)",
    "bytes_published": "Bytes handed to Kafka",
    "events_dropped": "Records lost: coalesced events, delivery failures, refused records",
    "events_coalesced": "Monitor events replaced by a newer value of the same PV while Kafka lagged",
    "delivery_failures": "Records Kafka did not acknowledge within message.timeout.ms",
    "puts_denied": "Puts refused by the access rules",
    "snapshot_iterations": "Repeating snapshot iterations",
    "events_rate_capped": "Monitor events left out by a rate cap (a newer value of the PV went out instead)",
    "events_refreshed": "Current values re-published by the periodic refresh (--monitor-refresh-period)",
}
_GAUGES = {
    "pvs_total": "PVs subscribed",
    "pvs_connected": "PVs connected",
    "producer_queue_depth": "Records not yet acknowledged by Kafka (producer queues and side table)",
    "producer_pending_events": "Monitor events waiting for producer queue space, newest per PV",
    "repeating_snapshots": "Repeating snapshots running",
}


class Metrics:
    def __init__(self, read: Callable[[], dict], ready: Callable[[], bool]):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(read))
        self.produce_latency = Histogram("k2eg_produce_latency_seconds", "produce() to broker ack",
                                         registry=self.registry,
                                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.snapshot_iteration = Histogram("k2eg_snapshot_iteration_seconds", "Repeating snapshot iterations",
                                            registry=self.registry,
                                            buckets=(.01, .05, .1, .25, .5, 1, 2, 5, 10, 30, 60))
        self.ready = ready
        self._server: ThreadingHTTPServer | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.startswith("/metrics"):
                    body, code, ctype = metrics.render(), 200, "text/plain; version=0.0.4"
                elif self.path.startswith("/healthz"):
                    body, code, ctype = b"ok\n", 200, "text/plain"
                elif self.path.startswith("/readyz"):
                    ok = metrics.ready()
                    body, code, ctype = (b"ready\n", 200, "text/plain") if ok else (b"not ready\n", 503, "text/plain")
                else:
                    body, code, ctype = b"try /metrics, /healthz or /readyz\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not worth a log line
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, name="k2eg-metrics", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics", host, self._server.server_port)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
