"""The client's Kafka side: send commands, correlate replies, deliver events.

Two consumers, for two different needs:
- replies are read by *assigning* the reply topic (no consumer group), so
  any number of processes with the same app name each see every reply and
  filter by ``reply_id``; nothing fences anybody out;
- monitor and snapshot topics are *subscribed* in a consumer group, which is
  how the gateway sees that somebody still reads a monitor (PROTOCOL 6).
User handlers run on one dispatcher thread, in arrival order, so a slow
handler delays neither replies nor the consumers.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from confluent_kafka import OFFSET_END, Consumer, KafkaError, Producer, TopicPartition

from k2eg.protocol import commands as C
from k2eg.protocol.codec import HEADER, decode
from k2eg.transport import TopicAdmin

from .environment import Environment

log = logging.getLogger("k2eg.client")

RecordSink = Callable[[dict], None]           # a reply-topic record for one reply_id
TopicSink = Callable[[str, Any], None]        # (topic, decoded record) from a subscribed topic


@dataclass
class Pending:
    """One command awaiting its reply."""

    done: threading.Event = field(default_factory=threading.Event)
    record: dict | None = None


class ClientTransport:
    def __init__(self, env: Environment, app_name: str, group_name: str | None = None,
                 startup_timeout: float = 30.0):
        self.env = env
        self.reply_topic = f"{app_name}-reply"
        common = {"bootstrap.servers": env.kafka_broker_url, **env.kafka}
        self.producer = Producer({**common, "linger.ms": 0, "socket.nagle.disable": True})
        self.admin = TopicAdmin(common)
        self._pending: dict[str, Pending] = {}
        self._streams: dict[str, RecordSink] = {}     # reply_id -> sink (one-shot snapshots)
        self._topics: dict[str, TopicSink] = {}       # subscribed topic -> sink
        self._lock = threading.Lock()
        self._running = True
        self._changes: queue.SimpleQueue = queue.SimpleQueue()
        self._assigned: set[str] = set()
        self._assign_cond = threading.Condition()
        self.handlers: queue.SimpleQueue = queue.SimpleQueue()
        unique = f"{app_name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.group_id = group_name or unique

        # The reply topic must exist and be assigned before the first command leaves.
        self.admin.ensure([self.reply_topic], timeout=startup_timeout)
        self._replies = Consumer({**common, "group.id": unique, "enable.auto.commit": False,
                                  "fetch.wait.max.ms": 5, "fetch.min.bytes": 1, "fetch.queue.backoff.ms": 1})
        deadline = time.monotonic() + startup_timeout
        while True:
            md = self._replies.list_topics(self.reply_topic, timeout=max(0.1, deadline - time.monotonic()))
            parts = md.topics[self.reply_topic].partitions
            if parts or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not parts:
            raise TimeoutError(f"reply topic {self.reply_topic} has no partitions after {startup_timeout:g} s")
        tps = []
        for p in parts:
            _, high = self._replies.get_watermark_offsets(TopicPartition(self.reply_topic, p), timeout=startup_timeout)
            tps.append(TopicPartition(self.reply_topic, p, high))
        self._replies.assign(tps)
        self._events = Consumer({**common, "group.id": self.group_id, "enable.auto.commit": True,
                                 "auto.offset.reset": "latest", "fetch.wait.max.ms": 10,
                                 "session.timeout.ms": 10_000, "heartbeat.interval.ms": 1000,
                                 "topic.metadata.refresh.interval.ms": 5000})
        self._threads = [
            threading.Thread(target=self._reply_loop, name="k2eg-replies", daemon=True),
            threading.Thread(target=self._event_loop, name="k2eg-events", daemon=True),
            threading.Thread(target=self._dispatch_loop, name="k2eg-handlers", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------- commands
    def send(self, cmd: C.Command) -> None:
        self.producer.produce(self.env.cmd_topic, C.to_json(cmd))
        self.producer.poll(0)

    def request(self, cmd: C.Command, timeout: float | None) -> dict | None:
        """Send ``cmd`` and wait for its reply; None on timeout."""
        p = Pending()
        with self._lock:
            self._pending[cmd.reply_id] = p
        try:
            self.send(cmd)
            if not p.done.wait(timeout):
                return None
            return p.record
        finally:
            with self._lock:
                self._pending.pop(cmd.reply_id, None)

    def open_stream(self, reply_id: str, sink: RecordSink) -> None:
        with self._lock:
            self._streams[reply_id] = sink

    def close_stream(self, reply_id: str) -> None:
        with self._lock:
            self._streams.pop(reply_id, None)

    # ------------------------------------------------------------- topics
    def subscribe(self, topic: str, sink: TopicSink) -> None:
        with self._lock:
            self._topics[topic] = sink
        self._changes.put(None)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._topics.pop(topic, None)
        with self._assign_cond:
            self._assigned.discard(topic)
        self._changes.put(None)

    def wait_assigned(self, topic: str, timeout: float) -> bool:
        with self._assign_cond:
            return self._assign_cond.wait_for(lambda: topic in self._assigned, timeout)

    # ------------------------------------------------------------- loops
    def _decode(self, msg) -> Any:
        header = None
        for k, v in msg.headers() or ():
            if k == HEADER:
                header = v
                break
        try:
            return decode(msg.value(), header)
        except ValueError as e:
            log.warning("skipping record at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), e)
            return None

    def _reply_loop(self) -> None:
        while self._running:
            try:
                msgs = self._replies.consume(500, 0.1)
            except Exception as e:
                log.warning("reply consumer: %s", e)
                continue
            for m in msgs:
                if m.error() is not None:
                    continue
                rec = self._decode(m)
                if not isinstance(rec, dict):
                    continue
                rid = rec.get("reply_id")
                with self._lock:
                    p = self._pending.get(rid)
                    sink = None if p is not None else self._streams.get(rid)
                if p is not None:
                    p.record = rec
                    p.done.set()
                elif sink is not None:
                    try:
                        sink(rec)
                    except Exception:
                        log.exception("snapshot record handling failed")

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Start one record before the end: the newest value (a monitor's current
        # value, re-published by the gateway) is delivered at once.
        for p in partitions:
            try:
                low, high = consumer.get_watermark_offsets(p, timeout=5)
                p.offset = max(low, high - 1) if high > 0 else OFFSET_END
            except Exception:
                p.offset = OFFSET_END
        consumer.assign(partitions)
        with self._assign_cond:
            self._assigned.update(p.topic for p in partitions)
            self._assign_cond.notify_all()

    def _event_loop(self) -> None:
        current: list[str] = []
        while self._running:
            if not self._changes.empty():
                while not self._changes.empty():
                    self._changes.get_nowait()
                with self._lock:
                    wanted = sorted(self._topics)
                if wanted != current:
                    current = wanted
                    if wanted:
                        self._events.subscribe(wanted, on_assign=self._on_assign)
                    else:
                        self._events.unsubscribe()
            if not current:
                time.sleep(0.02)
                continue
            try:
                msgs = self._events.consume(1000, 0.05)
            except Exception as e:
                log.warning("event consumer: %s", e)
                continue
            topics = self._topics
            for m in msgs:
                if m.error() is not None:
                    if m.error().code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                        log.debug("event consumer: %s", m.error())
                    continue
                sink = topics.get(m.topic())
                if sink is None:
                    continue
                rec = self._decode(m)
                if rec is not None:
                    sink(m.topic(), rec)

    def _dispatch_loop(self) -> None:
        get = self.handlers.get
        while True:
            item = get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("user handler %s raised", getattr(fn, "__name__", fn))

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run a user handler on the dispatcher thread."""
        self.handlers.put((fn, args))

    # ------------------------------------------------------------- close
    def close(self, timeout: float = 5.0) -> None:
        if not self._running:
            return
        self._running = False
        self.handlers.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        for c in (self._replies, self._events):
            try:
                c.close()
            except Exception as e:
                log.debug("closing consumer: %s", e)
        self.producer.flush(timeout)
