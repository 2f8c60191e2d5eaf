"""ext: what a gateway is doing, told to operators two ways.

The ``status`` command is answered by the one gateway that consumes the command
topic's partition; a beacon on ``<cmd-topic>-gateway-status`` lets ``k2eg status``
also list the gateways that are idle, on standby in the same group, or gone.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Iterable

from k2eg.protocol.commands import Serialization
from k2eg.protocol.uri import gateway_status_topic
from k2eg.transport import TopicAdmin

log = logging.getLogger("k2eg.gateway.status")

BEACON_INTERVAL_S = 10.0
BEACON_RETENTION_MS = 3_600_000  # an hour of beacons: readers only look at the last few intervals
STATUS_LIST_LIMIT = 1000         # entries of each list in a status record: it stays far below Kafka's 1 MB


def capped(doc: dict, name: str, items: Iterable, limit: int = STATUS_LIST_LIMIT, total: int | None = None) -> None:
    """``doc[name]``: at most ``limit`` of ``items``; ``doc[name + "_total"]``: how many there are (``total``
    when ``items`` is already cut), so a reader always knows what it does not see."""
    items = list(items)
    doc[name] = items[:limit]
    doc[f"{name}_total"] = len(items) if total is None else total


def gateway_identity(cmd_topic: str) -> dict:
    from k2eg import __version__

    host = socket.gethostname()
    return {"id": f"{host}:{os.getpid()}", "host": host, "pid": os.getpid(), "version": __version__,
            "cmd_topic": cmd_topic, "started": round(time.time(), 3)}


class RateMeter:
    """Per-second rates from monotonically growing counters, between samples at least ``min_interval`` apart.

    Status answers in quick succession reuse the last rates rather than
    dividing small differences by small times.
    """

    def __init__(self, min_interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, int]] | None = None
        self._rates: dict[str, float] = {}

    def sample(self, counts: dict[str, int]) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            if self._last is None:
                self._last = (now, dict(counts))
                return {k: 0.0 for k in counts}
            then, before = self._last
            if now - then >= self.min_interval:
                dt = now - then
                self._rates = {k: max(0, v - before.get(k, v)) / dt for k, v in counts.items()}
                self._last = (now, dict(counts))
            return {k: round(self._rates.get(k, 0.0), 2) for k in counts}


class StatusBeacon:
    """Publishes a summary of ``status()`` every ``interval`` seconds, and a last one saying 'stopped'."""

    def __init__(self, status: Callable[[], dict], publish: Callable[..., None], admin: TopicAdmin, cmd_topic: str,
                 gateway_id: str, interval: float = BEACON_INTERVAL_S):
        self.topic = gateway_status_topic(cmd_topic)
        self._status = status
        self._publish = publish
        self._admin = admin
        self._id = gateway_id
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="k2eg-status-beacon", daemon=True)

    def start(self) -> "StatusBeacon":
        self._thread.start()
        return self

    def _send(self, state: str) -> None:
        doc = self._status()
        doc["state"] = state
        doc["beacon_interval_s"] = self.interval
        self._publish(self.topic, self._id, doc, Serialization.JSON)

    def _loop(self) -> None:
        ready = False
        while not self._stop.is_set():
            try:
                if not ready:
                    self._admin.ensure([self.topic], config={"retention.ms": str(BEACON_RETENTION_MS)})
                    ready = True
                self._send("running")
            except Exception as e:  # Kafka away: the next beat tries again; never fatal
                log.warning("status beacon to %s: %s", self.topic, e)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self._send("stopped")
        except Exception as e:
            log.warning("last status beacon to %s: %s", self.topic, e)
