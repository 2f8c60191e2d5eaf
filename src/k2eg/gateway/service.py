"""The gateway's command handling: one command in, replies and subscriptions out.

Parsing happens on the consumer thread; anything that may block on EPICS
runs on a bounded worker pool so one slow PV never holds up other commands.
No handler may raise past ``handle``: the gateway never dies on a command.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from k2eg.protocol import commands as C
from k2eg.protocol import replies
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import PVUri

from .epics.base import Provider, connect_timeout
from .kafka import KafkaIO
from .monitors import MonitorHub
from .access import PutPolicy, app_of
from .options import Options
from .snapshots import SnapshotManager

log = logging.getLogger("k2eg.gateway")

STATUS_MONITORS = 2000  # monitors listed in a status reply: keeps it far below Kafka's 1 MB record limit


class Gateway:
    def __init__(self, opts: Options, io: KafkaIO, providers: dict[str, Provider]):
        self.opts = opts
        self.io = io
        self.providers = providers
        self.timeout = opts.pv_connection_timeout
        self.hub = MonitorHub(providers, self._publish_bytes)
        self.workers = ThreadPoolExecutor(opts.command_workers, thread_name_prefix="k2eg-cmd")
        self.counters: dict[str, int] = {"received": 0, "bad": 0, "failed": 0, "unanswerable": 0}
        self.operations: dict[tuple[str, str], int] = {}   # (command, ok|error) -> n, for metrics
        self.puts_denied = 0
        self.policy = PutPolicy.from_options(opts.access_rules, opts.read_only)
        self.started = time.time()
        self._lock = threading.Lock()
        self.snapshots = SnapshotManager(self.hub, self.reply, self.io.publish, self.read, self.io.ensure_topics)
        self.handlers: dict[type, Callable[[Any], None]] = {
            C.Get: self.on_get, C.Put: self.on_put, C.Info: self.on_info,
            C.Monitor: self.on_monitor, C.MultiMonitor: self.on_multi_monitor,
            C.Snapshot: self.snapshots.one_shot, C.RepeatingSnapshot: self.snapshots.start,
            C.SnapshotTrigger: self.snapshots.trigger, C.SnapshotStop: self.snapshots.stop,
            C.Status: self.on_status,
        }

    # ------------------------------------------------------------- plumbing
    def _publish_bytes(self, topic: str, key: str, data: bytes, ser: C.Serialization) -> None:
        self.io.publish_bytes(topic, key, data, ser)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    def reply(self, cmd: C.Command, record: dict, key: str | None, value_key: str | None = None) -> None:
        """Send ``record`` to the command's reply topic, created if missing; without one, nothing to do."""
        if not cmd.reply_topic:
            return
        self.io.ensure_topics([cmd.reply_topic])
        self.io.publish(cmd.reply_topic, key, record, cmd.serialization, value_key)

    def fail(self, cmd: C.Command, key: str | None, code: int, message: str) -> None:
        """The one exit of every failed command: logged, counted, answered when a reply topic is known."""
        self._count("failed")
        if not cmd.reply_topic:
            self._count("unanswerable")
            log.warning("%s failed without a reply_topic to tell (reply_id %s): %s",
                        cmd.name or "command", _short(cmd.reply_id, 80), _loggable(message))
            return
        log.info("%s failed (reply_id %s): %s", cmd.name or "command", _short(cmd.reply_id, 80), _loggable(message))
        try:
            self.reply(cmd, replies.error(cmd.reply_id, code, message), key)
        except ProtocolError as e:
            log.error("cannot answer %s on %s: %s", cmd.name or "command", cmd.reply_topic, e.message)

    # ------------------------------------------------------------- entry
    def handle(self, raw: bytes | None) -> None:
        """Consumer thread: parse and hand off. Never raises."""
        self._count("received")
        try:
            cmd = C.parse_command(raw)
        except C.CommandError as e:
            self._count("bad")
            self._submit(self.fail, e.envelope, replies.PARSE_ERROR_KEY, e.code, e.message)
            return
        except Exception as e:  # a parser bug must not stop the command loop
            self._count("bad")
            log.exception("cannot parse a command of %d bytes", len(raw or b""))
            self._submit(self.fail, C.Command(), replies.PARSE_ERROR_KEY, ErrorCode.BAD_REQUEST,
                         f"command could not be read: {type(e).__name__}")
            return
        handler = self.handlers.get(type(cmd))
        if handler is None:
            self._submit(self.fail, cmd, replies.PARSE_ERROR_KEY, ErrorCode.BAD_REQUEST,
                         f"command '{cmd.name}' is not available on this gateway")
            return
        self._submit(self._run, handler, cmd)

    def _submit(self, fn: Callable, *args: Any) -> None:
        try:
            self.workers.submit(self._safe, fn, *args)
        except RuntimeError:  # pool shut down: we are stopping
            log.warning("gateway stopping: a command was not executed")

    def _safe(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("internal error while handling a command")

    @staticmethod
    def _key(cmd: C.Command) -> str:
        """Record key of a command's replies (PROTOCOL 1)."""
        pv = getattr(cmd, "pv", None)
        if pv is not None:
            return pv.uri
        if isinstance(cmd, C.MultiMonitor) and cmd.pvs:
            return cmd.pvs[0].uri
        if isinstance(cmd, (C.RepeatingSnapshot, C.SnapshotTrigger, C.SnapshotStop)):
            return replies.REPEATING_REPLY_KEY
        if isinstance(cmd, C.Snapshot):
            return replies.SNAPSHOT_KEY
        if isinstance(cmd, C.Status):
            return replies.STATUS_KEY
        return replies.PARSE_ERROR_KEY

    def _run(self, handler: Callable[[Any], None], cmd: C.Command) -> None:
        ok = False
        try:
            handler(cmd)
            ok = True
        except ProtocolError as e:
            self.fail(cmd, self._key(cmd), e.code, e.message)
        except Exception as e:  # a bug or library failure: answer, log, keep serving
            log.exception("%s failed unexpectedly", cmd.name)
            self.fail(cmd, self._key(cmd), ErrorCode.EPICS_FAILED, f"{cmd.name} failed: {type(e).__name__}: {e}")
        finally:
            key = (cmd.name, "ok" if ok else "error")
            with self._lock:
                self.operations[key] = self.operations.get(key, 0) + 1

    def metrics(self) -> dict:
        """Everything the Prometheus endpoint shows, read at scrape time."""
        channels = self.hub.channels()
        with self._lock:
            commands, operations, denied = dict(self.counters), dict(self.operations), self.puts_denied
        return {
            "commands": commands, "operations": operations, "puts_denied": denied,
            "events_published": self.io.published, "bytes_published": self.io.published_bytes,
            "events_dropped": self.io.dropped, "producer_queue_depth": len(self.io.producer),
            "pvs_total": len(channels), "pvs_connected": sum(1 for ch in channels if ch.connected),
            "snapshot_iterations": getattr(self.snapshots, "iterations", 0),
            "repeating_snapshots": len(getattr(self.snapshots, "running", {})),
        }

    def provider(self, pv: PVUri) -> Provider:
        return self.providers[pv.protocol]

    def read(self, pv: PVUri) -> dict:
        return self.provider(pv).get(pv.name, self.timeout)

    # ------------------------------------------------------------- commands
    def on_get(self, cmd: C.Get) -> None:
        tree = self.read(cmd.pv)
        self.reply(cmd, replies.value(cmd.reply_id, cmd.pv.name, tree), cmd.pv.uri, cmd.pv.name)

    def on_put(self, cmd: C.Put) -> None:
        app = app_of(cmd.reply_topic)
        try:
            self.policy.check(cmd.pv.name, app)
        except ProtocolError as e:
            with self._lock:
                self.puts_denied += 1
            log.warning("put %s = %s by %s denied: %s", cmd.pv.uri, _short(cmd.value), app or "?", e.message)
            raise
        self.provider(cmd.pv).put(cmd.pv.name, cmd.value, self.timeout)
        log.info("put %s = %s by %s", cmd.pv.uri, _short(cmd.value), app or "?")
        self.reply(cmd, replies.ok(cmd.reply_id, f"put of {cmd.pv.uri} done"), cmd.pv.uri)

    def on_info(self, cmd: C.Info) -> None:
        # A description, not a value: msgpack-compact leaves it a map (its leaves alone would mean nothing).
        info = self.provider(cmd.pv).info(cmd.pv.name, self.timeout)
        self.reply(cmd, replies.value(cmd.reply_id, cmd.pv.name, info), cmd.pv.uri)

    def _subscribe(self, pairs: list[tuple[PVUri, str]], ser: C.Serialization) -> list[PVUri]:
        """Subscribe every (pv, topic); return the PVs that sent no value within one connection timeout."""
        self.io.ensure_topics(list(dict.fromkeys(t for _, t in pairs)))
        chans = [(pv, self.hub.add_destination(pv, topic, ser), topic) for pv, topic in pairs]
        deadline = time.monotonic() + self.timeout  # one timeout for all, not one per PV
        failed = []
        for pv, ch, topic in chans:
            if not ch.first_value.wait(max(0.0, deadline - time.monotonic())):
                self.hub.remove_destination(pv, topic)
                failed.append(pv)
        return failed

    def on_monitor(self, cmd: C.Monitor) -> None:
        if self._subscribe([(cmd.pv, cmd.destination)], cmd.serialization):
            raise connect_timeout(cmd.pv.name, self.timeout)
        self.reply(cmd, replies.ok(cmd.reply_id, f"monitor of {cmd.pv.uri} active on {cmd.destination}"), cmd.pv.uri)

    def on_multi_monitor(self, cmd: C.MultiMonitor) -> None:
        failed = self._subscribe([(pv, pv.topic) for pv in cmd.pvs], cmd.serialization)
        if failed:
            names = ", ".join(pv.uri for pv in failed[:20]) + (", ..." if len(failed) > 20 else "")
            raise ProtocolError(ErrorCode.TIMEOUT, f"{len(failed)} of {len(cmd.pvs)} PVs did not connect within "
                                                   f"{self.timeout:g} s: {names}; the others are monitored")
        self.reply(cmd, replies.ok(cmd.reply_id, f"monitor of {len(cmd.pvs)} PVs active"), self._key(cmd))

    def on_status(self, cmd: C.Status) -> None:
        self.reply(cmd, replies.status(cmd.reply_id, self.status()), replies.STATUS_KEY)

    def status(self) -> dict:
        """ext: what this gateway is doing, for operators and tests (one subscription per PV is visible here)."""
        with self._lock:
            counters = dict(self.counters)
        monitors = []
        channels = self.hub.channels()
        for ch in channels[:STATUS_MONITORS]:
            with ch.lock:
                dests = {t: s.value for t, s in ch.destinations.items()}
            monitors.append({"pv": ch.pv.uri, "connected": ch.connected, "events": ch.events,
                             "destinations": dests, "snapshot_taps": len(ch.taps),
                             "subscriptions_opened": self.hub.opened.get(ch.pv, 0)})
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "pv_connection_timeout_s": self.timeout,
            "commands": counters,
            "subscriptions": {"active": len(channels), "opened": sum(self.hub.opened.values())},
            "monitors": monitors,
            "topics_created": sorted(self.io.admin.created),
            "records_lost": self.io.dropped,
        }

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        self.snapshots.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.hub.close()


def _loggable(text: str, limit: int = 500) -> str:
    """One log line per message, whatever the sender put into it (no forged lines)."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
