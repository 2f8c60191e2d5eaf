"""One-shot and repeating snapshots on top of the shared monitor hub (PROTOCOL section 7).

"Same instant" for a *normal* iteration means: the latest value of every PV
as held by the gateway at the instant the window closes, read in one pass
while no update can interleave (the taps write under the snapshot's lock).
A *timedbuffered* iteration carries every update that arrived inside the
window instead.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from k2eg.protocol import commands as C
from k2eg.protocol import replies
from k2eg.protocol.codec import encode
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import PVUri, snapshot_topic

from .monitors import Channel, MonitorHub

log = logging.getLogger("k2eg.gateway.snapshots")


def now_ms() -> int:
    return int(time.time() * 1000)


def unreadable(reason: str) -> dict:
    """The record value of a PV that could not be read: an INVALID alarm saying why."""
    return {"alarm": {"severity": 3, "status": 0, "message": reason}}


def filtered(tree: dict, keep: tuple[str, ...]) -> dict:
    return {k: v for k, v in tree.items() if k in keep} if keep and isinstance(tree, dict) else tree


# ----------------------------------------------------------------------------- one-shot

class OneShot:
    """Publishes each PV's first value, reads the silent ones at the window's end, then completes."""

    def __init__(self, cmd: C.Snapshot, hub: MonitorHub, publish: Callable[[dict, str | None], None],
                 read: Callable[[PVUri], dict]):
        self.cmd, self.hub, self.publish, self.read = cmd, hub, publish, read
        self.sent: set[PVUri] = set()
        self.lock = threading.Lock()

    def _tap(self, ch: Channel, tree: dict) -> None:
        with self.lock:
            if ch.pv in self.sent:
                return
            self.sent.add(ch.pv)
        self.publish(replies.value(self.cmd.reply_id, ch.pv.name, tree), ch.pv.name)
        self.hub.remove_tap(ch.pv, self._tap)

    def run(self) -> None:
        deadline = time.monotonic() + self.cmd.time_window_msec / 1000
        for pv in self.cmd.pvs:
            ch = self.hub.add_tap(pv, self._tap)
            if ch.last is not None:       # a running monitor already knows the current value
                self._tap(ch, ch.last)
        try:
            while time.monotonic() < deadline:
                with self.lock:
                    if len(self.sent) == len(self.cmd.pvs):
                        break
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        finally:
            for pv in self.cmd.pvs:
                self.hub.remove_tap(pv, self._tap)
        for pv in self.cmd.pvs:
            with self.lock:
                if pv in self.sent:
                    continue
                self.sent.add(pv)
            try:
                tree = self.read(pv)
            except ProtocolError as e:
                tree = unreadable(e.message)
            self.publish(replies.value(self.cmd.reply_id, pv.name, tree), pv.name)
        self.publish(replies.snapshot_complete(self.cmd.reply_id), None)


# ----------------------------------------------------------------------------- repeating

@dataclass
class _Pending:
    kind: str                      # "trigger" or "stop"
    done: threading.Event = field(default_factory=threading.Event)
    tags: dict = field(default_factory=dict)


class Repeating:
    """A named snapshot running iterations on its own thread until stopped."""

    def __init__(self, cmd: C.RepeatingSnapshot, hub: MonitorHub,
                 publish: Callable[[str, str, dict, str | None], None]):
        self.cmd = cmd
        self.name = cmd.snapshot_name
        self.topic = snapshot_topic(cmd.snapshot_name)
        self.hub = hub
        self._publish = publish
        self.iteration = 0
        self.latest: dict[PVUri, dict] = {}
        self.buffer: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.requests: deque[_Pending] = deque()
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.last_duration = 0.0
        self.thread = threading.Thread(target=self._loop, name=f"k2eg-snap-{self.name}", daemon=True)

    # -- state fed by the hub
    def _tap(self, ch: Channel, tree: dict) -> None:
        with self.lock:
            self.latest[ch.pv] = tree
            if self.cmd.kind is C.SnapshotKind.TIMED_BUFFERED and self._window_open:
                self.buffer.append((ch.pv.name, tree))

    _window_open = False

    def start(self) -> None:
        for pv in self.cmd.pvs:
            ch = self.hub.add_tap(pv, self._tap)
            if ch.last is not None:
                with self.lock:
                    self.latest.setdefault(pv, ch.last)
        self.thread.start()

    def request(self, kind: str, tags: dict | None = None, timeout: float | None = None) -> bool:
        """Queue a trigger or a stop; wait until the iteration it asked for is published."""
        p = _Pending(kind, tags=tags or {})
        self.requests.append(p)
        self.wake.set()
        return p.done.wait(timeout)

    # -- publishing
    def _emit(self, record: dict, value_key: str | None = None) -> None:
        self._publish(self.topic, self.name, record, value_key)

    def _flush_buffer(self, ts: int) -> None:
        with self.lock:
            items, self.buffer = self.buffer, []
        for name, tree in items:
            self._emit(replies.snapshot_data(name, filtered(tree, self.cmd.field_filter), ts, self.iteration), name)

    def _iterate(self, tags: dict | None = None) -> None:
        """One window: Header, Data (pushed as it comes or at the end), Tail."""
        t0 = time.monotonic()
        self.iteration += 1
        header = replies.snapshot_header(self.name, now_ms(), self.iteration)
        if tags:
            header["tags"] = tags
        timed = self.cmd.kind is C.SnapshotKind.TIMED_BUFFERED
        with self.lock:
            self.buffer = []
            self._window_open = True
        self._emit(header)
        end = t0 + self.cmd.time_window_msec / 1000
        push = self.cmd.sub_push_delay_msec / 1000
        next_push = t0 + push if timed and push > 0 else None
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if next_push is not None and now >= next_push:
                self._flush_buffer(now_ms())
                next_push += push
            wait_until = min(end, next_push) if next_push else end
            if self.stopped.wait(max(0.0, wait_until - now)):
                break
        ts = now_ms()
        if timed:
            with self.lock:
                self._window_open = False
            self._flush_buffer(ts)
        else:
            with self.lock:  # one pass, no update interleaves: the "same instant"
                values = [(pv.name, self.latest[pv]) for pv in self.cmd.pvs if pv in self.latest]
            for name, tree in values:
                self._emit(replies.snapshot_data(name, filtered(tree, self.cmd.field_filter), ts, self.iteration), name)
        self._emit(replies.snapshot_tail(self.name, now_ms(), self.iteration))
        self.last_duration = time.monotonic() - t0

    def _loop(self) -> None:
        try:
            while not self.stopped.is_set():
                if self.cmd.triggered:
                    self.wake.wait()
                    self.wake.clear()
                    while self.requests:
                        p = self.requests.popleft()
                        if p.kind == "stop":
                            self._finish(p)
                            return
                        self._iterate(p.tags)
                        p.done.set()
                    continue
                self._iterate()
                if self.requests and self.requests[0].kind == "stop":
                    self._finish(self.requests.popleft(), final_done=True)
                    return
                if self.cmd.repeat_delay_msec and self.wake.wait(self.cmd.repeat_delay_msec / 1000):
                    self.wake.clear()
        except Exception:
            log.exception("snapshot %s stopped by an error", self.name)
        finally:
            self._detach()

    def _finish(self, p: _Pending, final_done: bool = False) -> None:
        if not final_done and not self.cmd.triggered:
            self._iterate()
        self._detach()
        p.done.set()

    def _detach(self) -> None:
        if not self.stopped.is_set():
            self.stopped.set()
            for pv in self.cmd.pvs:
                self.hub.remove_tap(pv, self._tap)
            while self.requests:
                self.requests.popleft().done.set()


class SnapshotManager:
    """The gateway's snapshot commands."""

    def __init__(self, hub: MonitorHub, reply: Callable, publish_record: Callable, read: Callable[[PVUri], dict],
                 ensure_topics: Callable[[list[str]], Any]):
        self.hub = hub
        self.reply = reply                  # (cmd, record, key) -> None
        self.publish_record = publish_record  # (topic, key, record, ser, value_key) -> None
        self.read = read
        self.ensure_topics = ensure_topics
        self.running: dict[str, Repeating] = {}
        self.lock = threading.Lock()
        self.iterations = 0

    def one_shot(self, cmd: C.Snapshot) -> None:
        self.ensure_topics([cmd.reply_topic])

        def publish(record: dict, value_key: str | None) -> None:
            self.publish_record(cmd.reply_topic, replies.SNAPSHOT_KEY, record, cmd.serialization, value_key)

        OneShot(cmd, self.hub, publish, self.read).run()

    def start(self, cmd: C.RepeatingSnapshot) -> None:
        topic = snapshot_topic(cmd.snapshot_name)
        with self.lock:
            existing = self.running.get(cmd.snapshot_name)
            if existing is not None and not existing.stopped.is_set():
                self.reply(cmd, replies.ok(cmd.reply_id, f"snapshot {cmd.snapshot_name} is already running",
                                           publishing_topic=existing.topic), replies.REPEATING_REPLY_KEY)
                return
            self.ensure_topics([topic])

            def publish(t: str, key: str, record: dict, value_key: str | None) -> None:
                self.publish_record(t, key, record, cmd.serialization, value_key)
                if record.get("message_type") == replies.TAIL:
                    self.iterations += 1

            snap = Repeating(cmd, self.hub, publish)
            self.running[cmd.snapshot_name] = snap
            snap.start()
        self.reply(cmd, replies.ok(cmd.reply_id, f"snapshot {cmd.snapshot_name} started", publishing_topic=topic),
                   replies.REPEATING_REPLY_KEY)

    def _find(self, name: str) -> Repeating:
        with self.lock:
            snap = self.running.get(name)
        if snap is None or snap.stopped.is_set():
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"no running snapshot named '{name}'")
        return snap

    def trigger(self, cmd: C.SnapshotTrigger) -> None:
        snap = self._find(cmd.snapshot_name)
        if not snap.cmd.triggered:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"snapshot '{cmd.snapshot_name}' is not a triggered snapshot: "
                                                       "it runs on its own schedule")
        timeout = snap.cmd.time_window_msec / 1000 * (len(snap.requests) + 2) + 30
        if not snap.request("trigger", cmd.tags, timeout):
            raise ProtocolError(ErrorCode.TIMEOUT, f"snapshot '{cmd.snapshot_name}' did not complete the triggered "
                                                   f"iteration within {timeout:g} s")
        self.reply(cmd, replies.ok(cmd.reply_id, f"snapshot {cmd.snapshot_name} iteration {snap.iteration} published"),
                   replies.REPEATING_REPLY_KEY)

    def stop(self, cmd: C.SnapshotStop) -> None:
        snap = self._find(cmd.snapshot_name)
        timeout = snap.cmd.time_window_msec / 1000 * 2 + snap.cmd.repeat_delay_msec / 1000 + 30
        snap.request("stop", timeout=timeout)
        snap.thread.join(timeout)
        with self.lock:
            if self.running.get(cmd.snapshot_name) is snap:
                del self.running[cmd.snapshot_name]
        self.reply(cmd, replies.ok(cmd.reply_id, f"snapshot {cmd.snapshot_name} stopped after iteration "
                                                 f"{snap.iteration}"), replies.REPEATING_REPLY_KEY)

    def close(self) -> None:
        with self.lock:
            snaps = list(self.running.values())
            self.running.clear()
        for s in snaps:
            s.stopped.set()
            s.wake.set()
