"""The gateway's command handling: one command in, replies and subscriptions out.

Parsing happens on the consumer thread; anything that may block on EPICS
runs on a bounded worker pool so one slow PV never holds up other commands.
No handler may raise past ``handle``: the gateway never dies on a command.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from k2eg.protocol import commands as C
from k2eg.protocol import replies
from k2eg.protocol.codec import encode
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import PVUri

from .epics.base import Provider
from .kafka import KafkaIO
from .monitors import MonitorHub
from .options import Options
from .snapshots import SnapshotManager

log = logging.getLogger("k2eg.gateway")


class Gateway:
    def __init__(self, opts: Options, io: KafkaIO, providers: dict[str, Provider]):
        self.opts = opts
        self.io = io
        self.providers = providers
        self.timeout = opts.pv_connection_timeout
        self.hub = MonitorHub(providers, self._publish_bytes)
        self.workers = ThreadPoolExecutor(opts.command_workers, thread_name_prefix="k2eg-cmd")
        self.counters: dict[str, int] = {"received": 0, "bad": 0, "failed": 0}
        self._lock = threading.Lock()
        self.snapshots = SnapshotManager(self.hub, self.reply, self.io.publish, self.read,
                                         self.io.admin.ensure)
        self.handlers: dict[type, Callable[[Any], None]] = {
            C.Get: self.on_get, C.Put: self.on_put, C.Info: self.on_info,
            C.Monitor: self.on_monitor, C.MultiMonitor: self.on_multi_monitor,
            C.Snapshot: self.snapshots.one_shot, C.RepeatingSnapshot: self.snapshots.start,
            C.SnapshotTrigger: self.snapshots.trigger, C.SnapshotStop: self.snapshots.stop,
        }

    # ------------------------------------------------------------- plumbing
    def _publish_bytes(self, topic: str, key: str, data: bytes, ser: C.Serialization) -> None:
        self.io.publish_bytes(topic, key, data, ser)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    def reply(self, cmd: C.Command, record: dict, key: str | None, value_key: str | None = None) -> None:
        if not cmd.reply_topic:
            return
        self.io.admin.ensure([cmd.reply_topic])
        self.io.publish(cmd.reply_topic, key, record, cmd.serialization, value_key)

    def fail(self, cmd: C.Command, key: str | None, code: int, message: str) -> None:
        self._count("failed")
        log.info("%s failed: %s", cmd.name or "command", message)
        self.reply(cmd, replies.error(cmd.reply_id, code, message), key)

    # ------------------------------------------------------------- entry
    def handle(self, raw: bytes | None) -> None:
        """Consumer thread: parse and hand off. Never raises."""
        self._count("received")
        try:
            cmd = C.parse_command(raw)
        except C.CommandError as e:
            self._count("bad")
            log.info("bad command (%s): %s", e.command or "?", e.message)
            if e.envelope.reply_topic:
                self.workers.submit(self._safe, self.fail, e.envelope, replies.PARSE_ERROR_KEY, e.code, e.message)
            return
        handler = self.handlers.get(type(cmd))
        if handler is None:
            self.workers.submit(self._safe, self.fail, cmd, replies.PARSE_ERROR_KEY, ErrorCode.BAD_REQUEST,
                                f"command '{cmd.name}' is not available on this gateway")
            return
        self.workers.submit(self._run, handler, cmd)

    def _safe(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("while replying")

    def _run(self, handler: Callable[[Any], None], cmd: C.Command) -> None:
        key = getattr(getattr(cmd, "pv", None), "uri", None) or (
            replies.REPEATING_REPLY_KEY if isinstance(cmd, (C.RepeatingSnapshot, C.SnapshotTrigger, C.SnapshotStop))
            else replies.SNAPSHOT_KEY if isinstance(cmd, C.Snapshot) else replies.PARSE_ERROR_KEY)
        try:
            handler(cmd)
        except ProtocolError as e:
            self._safe(self.fail, cmd, key, e.code, e.message)
        except Exception as e:  # a bug or library failure: answer, log, keep serving
            log.exception("%s failed unexpectedly", cmd.name)
            self._safe(self.fail, cmd, key, ErrorCode.EPICS_FAILED, f"{cmd.name} failed: {type(e).__name__}: {e}")

    def provider(self, pv: PVUri) -> Provider:
        return self.providers[pv.protocol]

    def read(self, pv: PVUri) -> dict:
        return self.provider(pv).get(pv.name, self.timeout)

    # ------------------------------------------------------------- commands
    def on_get(self, cmd: C.Get) -> None:
        tree = self.read(cmd.pv)
        self.reply(cmd, replies.value(cmd.reply_id, cmd.pv.name, tree), cmd.pv.uri, cmd.pv.name)

    def on_put(self, cmd: C.Put) -> None:
        self.provider(cmd.pv).put(cmd.pv.name, cmd.value, self.timeout)
        log.info("put %s = %r by %s", cmd.pv.uri, _short(cmd.value), cmd.reply_topic or "?")
        self.reply(cmd, replies.ok(cmd.reply_id, "put done"), cmd.pv.uri)

    def on_info(self, cmd: C.Info) -> None:
        info = self.provider(cmd.pv).info(cmd.pv.name, self.timeout)
        self.reply(cmd, replies.value(cmd.reply_id, cmd.pv.name, info), cmd.pv.uri)

    def _subscribe(self, pairs: list[tuple[PVUri, str]], ser: C.Serialization) -> list[str]:
        """Subscribe every (pv, topic); return messages for PVs that did not connect in time."""
        self.io.admin.ensure([t for _, t in pairs])
        chans = [(pv, self.hub.add_destination(pv, topic, ser), topic) for pv, topic in pairs]
        failed = []
        for pv, ch, topic in chans:
            if not ch.first_value.wait(self.timeout):
                self.hub.remove_destination(pv, topic)
                failed.append(pv.uri)
        return failed

    def on_monitor(self, cmd: C.Monitor) -> None:
        failed = self._subscribe([(cmd.pv, cmd.destination)], cmd.serialization)
        if failed:
            raise ProtocolError(ErrorCode.TIMEOUT, f"PV '{cmd.pv.name}' did not connect within {self.timeout:g} s")
        self.reply(cmd, replies.ok(cmd.reply_id, f"monitor of {cmd.pv.uri} active on {cmd.destination}"), cmd.pv.uri)

    def on_multi_monitor(self, cmd: C.MultiMonitor) -> None:
        failed = self._subscribe([(pv, pv.topic) for pv in cmd.pvs], cmd.serialization)
        if failed:
            raise ProtocolError(ErrorCode.TIMEOUT, f"{len(failed)} of {len(cmd.pvs)} PVs did not connect within "
                                                   f"{self.timeout:g} s: {', '.join(failed[:20])}")
        self.reply(cmd, replies.ok(cmd.reply_id, f"monitor of {len(cmd.pvs)} PVs active"), cmd.pvs[0].uri)

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        self.snapshots.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.hub.close()


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
