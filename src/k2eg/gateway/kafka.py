"""The gateway's Kafka adapter: command consumer, publishers, topic admin.

It turns Kafka into calls for the rest of the gateway: an iterator of raw
command payloads, ``publish``/``publish_bytes`` for records that must not be
lost (replies, snapshots) and ``publish_event`` for monitor events, where
under overload the newest value of each PV matters more than every value.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from functools import partial
from typing import Callable, Iterable, Iterator, Protocol

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from k2eg.protocol.codec import encode, header_value
from k2eg.protocol.commands import Serialization
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.transport import TopicAdmin

from .commits import CommitTracker, Position
from .options import Options

log = logging.getLogger("k2eg.gateway.kafka")

# Event producers: librdkafka finds a topic by a linear search on every produce()
# (37 us at 10k topics in one producer, 2 us at 1000: bench/EXPERIMENTS.md), so
# each producer takes this many topics, in order of first use; a few topics stay
# in one producer, whose requests then carry them all (the broker's cost is per request).
TOPICS_PER_PRODUCER = 1000
MAX_EVENT_PRODUCERS = 16  # beyond 16k topics they are shared round-robin
REPLY_BLOCK_S = 10.0      # longest a reply or snapshot record waits for queue space (worker thread)
POLL_S = 0.05             # poll thread period: delivery reports and side-table retries
# Offsets of handled commands are committed this often (ms): a gateway killed -9 runs again
# its unfinished commands and those handled in the last interval. A commit per batch instead
# flooded the group coordinator at thousands of gets/s until heartbeats timed out (bench get_throughput).
COMMIT_INTERVAL_MS = 200
# Commands read whose offsets cannot be committed yet (one slow command holds back those behind it):
# beyond this many the gateway stops reading until the slow one finishes, bounding its memory and
# what a crash would run again.
UNCOMMITTED_MAX = 100_000
LOG_EVERY_S = 10.0        # at most one log line per kind of loss per this many seconds

_COMMON = {"message.max.bytes": 16 << 20, "enable.idempotence": False,
           # Long enough to ride out a broker restart from the local queue (issue 7).
           "message.timeout.ms": 300_000,
           "log.connection.close": False}  # a broker going away is reported once, by error_cb
# Producers keep librdkafka's allow.auto.create.topics=true although the gateway creates every
# topic itself (PROTOCOL 1) and only writes once the broker serves it (TopicAdmin.ensure; without
# that wait, 10k producers' metadata retries held the topics back for minutes: EXPERIMENTS row 21).
# Off, a broker that answers "unknown topic" while it restarts makes librdkafka write the topic
# off until its next metadata refresh, minutes later (tests/e2e/test_broker_faults.py lost it).
# Replies: one command waits for each, so no lingering; but one request in flight, so that
# replies produced meanwhile share the next request: batching that grows with load and costs
# nothing when idle (broker CPU per get 650-725 -> 260-305 us: bench/EXPERIMENTS.md row 25).
# A topic deleted from outside fails the records queued for it after topic.metadata.propagation.max.ms
# (30 s by default, all of them lost); TopicAdmin.ensure waits until the broker serves a new topic before
# anything is produced to it, so replies need little propagation slack.
_REPLY = {"linger.ms": 0, "socket.nagle.disable": True, "max.in.flight.requests.per.connection": 1,
          "topic.metadata.propagation.max.ms": 3000,
          "queue.buffering.max.messages": 100_000, "queue.buffering.max.kbytes": 256 * 1024}
# Monitor events: throughput (the broker's CPU per record falls with fuller requests:
# bench/EXPERIMENTS.md); only failures come back as delivery reports. Queue bounds are
# per producer: the first one carries floods of up to 1000 PVs and rides out a broker
# stall of ~40 s at 5k events/s (the soak saw 10 s stalls on a loaded machine: a 50k
# bound coalesced 42k events); the others take 1000 topics each (10 s of 1 Hz updates),
# so that 10k PVs stay near 500 MB when Kafka cannot keep up. Idempotence keeps each
# PV's events in order across retries (a stream must never step back in time).
# batch.size stays under the broker's default 1 MB record-batch limit: a larger batch is
# refused whole (MSG_SIZE_TOO_LARGE) once a backlog fills it.
_EVENT = {"linger.ms": 50, "batch.num.messages": 10_000, "batch.size": 1_000_000, "compression.type": "none",
          "queue.buffering.max.messages": 200_000, "queue.buffering.max.kbytes": 160 * 1024,
          "delivery.report.only.error": True, "enable.idempotence": True}
_EVENT_MORE = {"queue.buffering.max.messages": 10_000, "queue.buffering.max.kbytes": 16 * 1024}


TooLarge = Callable[[int, str], None]  # (record size in bytes, Kafka's reason)
Settled = Callable[[], None]           # after a record's delivery report, whatever it said
_TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)
# The topic was deleted (librdkafka fails records queued for it with _UNKNOWN_PARTITION, then refuses new ones).
_GONE = (KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART)


def too_large(size: int, topic: str, why: str, batch: bool = True) -> str:
    """The error message for a reply Kafka refused for its size: what to raise, and where.

    The broker (``batch``) refuses a whole record batch above the topic's limit, so a
    small reply batched with a large one is refused with it; librdkafka's own check
    at produce time is about the one record.
    """
    if batch:
        return (f"Kafka refused the reply ({size} bytes) on topic '{topic}' ({why}): it, or the batch it went "
                f"in with other replies, is larger than the topic's max.message.bytes; raise that "
                f"(and the gateway's --pub-impl-kv message.max.bytes)")
    return (f"the reply is {size} bytes, more than Kafka accepts on topic '{topic}' ({why}); "
            f"raise the gateway's --pub-impl-kv message.max.bytes (and the topic's max.message.bytes)")


class _Throttle:
    """Counts occurrences and says when one more log line is due (no log line per event)."""

    def __init__(self, every: float = LOG_EVERY_S):
        self.every, self.last, self.unlogged = every, 0.0, 0

    def due(self) -> int:
        """0 if this occurrence stays unlogged, else how many (itself included) the line covers."""
        self.unlogged += 1
        now = time.monotonic()
        if now - self.last < self.every:
            return 0
        n, self.unlogged, self.last = self.unlogged, 0, now
        return n


class _OnePerFacility(logging.Filter):
    """librdkafka logs each reconnect attempt of each client: one line per facility per LOG_EVERY_S."""

    def __init__(self):
        super().__init__()
        self._throttles: dict[str, _Throttle] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        fac = record.args[0] if isinstance(record.args, tuple) and record.args else record.msg
        return bool(self._throttles.setdefault(str(fac), _Throttle()).due())


_rdkafka_log = logging.getLogger("k2eg.gateway.rdkafka")  # every client's librdkafka log, via poll()
_rdkafka_log.addFilter(_OnePerFacility())


Batch = tuple[list, list]  # (payloads, positions) of the commands read in one poll


class PartitionListener(Protocol):
    """Told about the command partitions, on the consumer thread (the put journal)."""

    def assigned(self, starts: dict[int, int]) -> None: ...   # partition -> first offset to be read

    def revoked(self, partitions: list[int]) -> None: ...

    def committed(self, offsets: dict[int, int]) -> None: ...  # partition -> committed offset


class KafkaIO:
    def __init__(self, opts: Options, on_delivery_error: Callable[[str], None] | None = None,
                 topics_per_producer: int = TOPICS_PER_PRODUCER):
        common = {"bootstrap.servers": opts.pub_server_address, **_COMMON, "error_cb": self._on_kafka_error,
                  "logger": _rdkafka_log}
        operator = opts.kv("pub")   # operators' --pub-impl-kv apply to every producer
        # Replies report failures only (a refusal for size, a loss): a report per reply cost a Python
        # call and a wake-up of the poll thread per get (bench/EXPERIMENTS.md row 38). Records whose
        # sender waits for the verdict (one-shot snapshots), and every record while the latency
        # metric is on, go through ``reported``, which reports each one.
        self.replies = Producer({**common, **_REPLY, "delivery.report.only.error": True, **operator})
        self.reported = Producer({**common, **_REPLY, **operator})
        # Half the reply queue's bound, as configured (an operator may lower it): below it a reply
        # cannot wait for queue space (``publishes_at_once``).
        self._reply_room = int({**_REPLY, **operator}["queue.buffering.max.messages"]) // 2
        self._event_conf = {**common, **_EVENT, "on_delivery": self._event_failed, **operator}
        self._more_conf = {**self._event_conf, **_EVENT_MORE, **operator}
        self.events = [Producer(self._event_conf)]   # more as topics come (_shard)
        self._route: dict[str, Producer] = {}          # topic -> its event producer, fixed (keeps order)
        self._route_lock = threading.Lock()
        self._topics_per_producer = topics_per_producer
        sub = {"bootstrap.servers": opts.sub_server_address, "group.id": opts.sub_group_id,
               "auto.offset.reset": "latest", "enable.auto.commit": True, "auto.commit.interval.ms": COMMIT_INTERVAL_MS,
               # Only offsets of handled commands are stored, and so committed (``_settle``).
               "enable.auto.offset.store": False, "on_commit": self._on_commit,
               "fetch.wait.max.ms": 10, "session.timeout.ms": 10_000, "heartbeat.interval.ms": 1000,
               "logger": _rdkafka_log}
        sub.update(opts.kv("sub"))
        self.cmd_topic = opts.cmd_input_topic
        self.drain_s = float(opts.command_drain_timeout)
        self.commits = CommitTracker()
        self.handled = self.commits.done   # any thread: the command at this position is handled
        self.partitions: PartitionListener | None = None
        admin = {"bootstrap.servers": opts.pub_server_address, **operator}
        self.admin = TopicAdmin({k: v for k, v in admin.items() if not k.startswith(("linger", "queue.", "enable.idem",
                                                                                     "batch.", "compression",
                                                                                     "delivery.report"))})
        self._sub_config = sub
        self.consumer: Consumer | None = None
        self.assigned = threading.Event()
        self.dropped = 0          # records lost for any reason (metrics, status)
        self.coalesced = 0        # monitor events replaced by a newer value of the same PV while Kafka lagged
        self.delivery_failed = 0  # records librdkafka gave up on (e.g. broker away beyond message.timeout.ms)
        self.command_pauses = 0   # times the command topic was paused for a worker backlog
        self.left_unfinished = 0  # commands still running when the drain at a stop ended (left to the group)
        self.published = 0        # records and bytes handed to librdkafka (metrics)
        self.published_bytes = 0
        self.latency = None       # a prometheus Histogram when metrics are on (replies and snapshots)
        # Monitor events librdkafka had no room for: newest per (topic, key), retried by the poll
        # thread in first-come order. Bounded by the number of monitored (topic, PV) pairs.
        self._pending: dict[tuple[str, object], tuple[bytes, Serialization]] = {}
        self._pending_lock = threading.Lock()
        # Replies the broker refused for their size, to be sent again one at a time (poll thread only):
        # the broker refuses a whole batch, so a small reply may have gone down with a large one.
        self._resend: deque = deque()
        self._resending = False
        self._throttles: dict[str, _Throttle] = {}
        self._on_delivery_error = on_delivery_error
        self._running = True
        self._running_consumer = True
        self._poller = threading.Thread(target=self._poll_loop, name="k2eg-producer-poll", daemon=True)
        self._poller.start()

    @property
    def producers(self) -> list[Producer]:
        return [self.replies, self.reported, *self.events]

    def publishes_at_once(self, topics: Iterable[str]) -> bool:
        """A reply to ``topics`` would neither create a topic nor wait for queue space.

        Only then may a library callback thread (pvxs) publish it: that thread must not block.
        """
        queued = max(len(self.replies), len(self.reported))
        return queued < self._reply_room and not self.admin.missing(topics)

    def queue_depth(self) -> int:
        """Records not yet acknowledged by the broker, including those waiting in the side table."""
        return sum(len(p) for p in self.producers) + len(self._pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ topics
    def ensure_topics(self, topics: list[str]) -> list[str]:
        """Create missing topics (PROTOCOL 1: never rely on broker auto-create); return those created.

        A topic the broker refuses is the requester's error and says why.
        """
        try:
            return self.admin.ensure(topics)
        except KafkaException as e:
            err = e.args[0]
            refused = err.code() in (KafkaError.TOPIC_EXCEPTION, KafkaError.INVALID_CONFIG,
                                     KafkaError.POLICY_VIOLATION, KafkaError.TOPIC_AUTHORIZATION_FAILED)
            raise ProtocolError(ErrorCode.BAD_REQUEST if refused else ErrorCode.EPICS_FAILED,
                                f"cannot create topic {', '.join(topics)[:300]}: {err.str()}") from None

    # ------------------------------------------------------------------ publish
    def _warn(self, kind: str, fmt: str, *args, level: int = logging.ERROR) -> None:
        """Rate-limited log of one kind of loss or fault."""
        n = self._throttles.setdefault(kind, _Throttle()).due()
        if n:
            log.log(level, fmt + " (%d such in the last %g s; records lost so far: %d)",
                    *args, n, LOG_EVERY_S, self.dropped)

    def _on_kafka_error(self, err) -> None:
        """librdkafka's producer-level errors (broker down, resolution, auth); records wait in the queue."""
        self._warn(f"kafka-{err.code()}", "Kafka producer: %s", err.str(), level=logging.WARNING)

    def _lost(self, topic: str) -> None:
        self.dropped += 1
        if self._on_delivery_error:
            self._on_delivery_error(topic)

    def _delivered(self, err, msg, on_too_large: TooLarge | None = None, on_settled: Settled | None = None,
                   alone: bool = False) -> None:
        """Per-record report of replies and snapshot records: latency, or a loss said out loud.

        A reply refused for its size is first sent again on its own (``_resend_next``); only a
        refusal of it alone goes to ``on_too_large``, and ``on_settled`` waits for that verdict.
        """
        if err is None:
            if self.latency is not None:
                self.latency.observe(msg.latency() or 0.0)
        elif err.code() in _TOO_LARGE and on_too_large is not None and not alone:
            self._resend.append((msg.topic(), msg.value(), msg.key(), msg.headers(), on_too_large, on_settled))
            return
        else:
            size = len(msg.value() or b"")
            self._failed(msg.topic(), size, err)
            if on_too_large is not None and err.code() in _TOO_LARGE:
                on_too_large(size, err.str())
        if on_settled is not None:
            on_settled()

    def _failed(self, topic: str, size: int, why: object) -> None:
        self.delivery_failed += 1
        self._forget_if_gone(topic, why)
        self._lost(topic)
        log.error("record of %d bytes to %s lost: %s", size, topic, why)

    def _forget_if_gone(self, topic: str, why: object) -> None:
        """A topic deleted from outside: the topic admin forgets it, so the next ``ensure`` creates it again."""
        if isinstance(why, KafkaError) and why.code() in _GONE:
            self.admin.forget(topic)

    def _resend_next(self) -> None:
        """Poll thread: the next refused reply goes out while no other one is in flight, so it is not
        batched with another refused one (replies produced meanwhile may still share its batch)."""
        topic, value, key, headers, on_too_large, on_settled = self._resend.popleft()
        self._resending = True

        def done(err, msg) -> None:
            self._resending = False
            self._delivered(err, msg, on_too_large, on_settled, alone=True)

        try:
            self.reported.produce(topic, value, key, headers=headers, on_delivery=done)
        except (BufferError, KafkaException) as e:
            self._resending = False
            self._failed(topic, len(value or b""), e)
            on_too_large(len(value or b""), str(e))
            if on_settled is not None:
                on_settled()

    def _event_failed(self, err, msg) -> None:
        """Event producers report failures only (``delivery.report.only.error``)."""
        if err is None:
            return
        self.delivery_failed += 1
        self._forget_if_gone(msg.topic(), err)
        self._lost(msg.topic())
        self._warn("event-delivery", "monitor event to %s lost: %s", msg.topic(), err)

    def _poll_loop(self) -> None:
        while self._running:
            for p in self.events:
                p.poll(0)
            self.replies.poll(0)           # failures only
            self.reported.poll(POLL_S)
            if self._resend and not self._resending:
                self._resend_next()
            if self._pending:
                self._retry_pending()

    def _shard(self, topic: str) -> Producer:
        p = self._route.get(topic)
        return p if p is not None else self._assign(topic)

    def _assign(self, topic: str) -> Producer:
        """A topic's first event: the newest producer, or a new one when that one has its share."""
        with self._route_lock:
            p = self._route.get(topic)
            if p is None:
                n, events = len(self._route), self.events
                if n < len(events) * self._topics_per_producer:
                    p = events[-1]
                elif len(events) < MAX_EVENT_PRODUCERS:
                    p = Producer(self._more_conf)
                    events.append(p)
                    log.info("event producer %d for topics beyond %d", len(events), n)
                else:
                    p = events[n % len(events)]
                self._route[topic] = p
            return p

    def publish(self, topic: str, key: str | bytes | None, record: dict,
                ser: Serialization = Serialization.MSGPACK, value_key: str | None = None,
                on_too_large: TooLarge | None = None, on_settled: Settled | None = None) -> None:
        self.publish_bytes(topic, key, encode(record, ser, value_key), ser, on_too_large, on_settled)

    def publish_bytes(self, topic: str, key, payload: bytes, ser: Serialization,
                      on_too_large: TooLarge | None = None, on_settled: Settled | None = None) -> None:
        """A record that must not be lost nor replaced (reply, snapshot): waits, bounded, for queue space.

        Runs on a worker thread, or on a library's callback thread once ``publishes_at_once``
        said it will not wait; the poll thread frees the space. A record the broker refuses
        for its size is reported to ``on_too_large(size, why)``, and every record's report
        ends with ``on_settled()`` (both on the poll thread: they must not wait for the
        caller). A record librdkafka refuses at once raises ProtocolError, and one dropped
        for a full queue gets neither.
        """
        deadline = time.monotonic() + REPLY_BLOCK_S
        report = (self._delivered if on_too_large is None and on_settled is None
                  else partial(self._delivered, on_too_large=on_too_large, on_settled=on_settled))
        producer = self.replies if on_settled is None and self.latency is None else self.reported
        recreated = False
        while True:
            try:
                producer.produce(topic, payload, key, headers=header_value(ser), on_delivery=report)
            except KafkaException as e:
                if e.args[0].code() in _GONE and time.monotonic() < deadline and self._running:
                    # Deleted from outside: created again; librdkafka sees it at its next metadata query (~1 s).
                    if not recreated:
                        self.admin.forget(topic)
                        self.ensure_topics([topic])
                        recreated = True
                        log.warning("topic %s was deleted from outside: created again", topic)
                    time.sleep(0.1)
                    continue
                if e.args[0].code() not in _TOO_LARGE:
                    raise
                self._lost(topic)
                raise ProtocolError(ErrorCode.EPICS_FAILED,
                                    too_large(len(payload), topic, e.args[0].str(), batch=False)) from None
            except BufferError:
                if time.monotonic() < deadline and self._running:
                    time.sleep(0.01)
                    continue
                self._lost(topic)
                log.error("producer queue full for %g s: record to %s dropped", REPLY_BLOCK_S, topic)
                return
            self.published += 1
            self.published_bytes += len(payload)
            return

    def publish_event(self, topic: str, key, payload: bytes, ser: Serialization) -> None:
        """A monitor event; never blocks the EPICS callback thread.

        When librdkafka has no room, only the newest event per (topic, key) waits in the
        side table; each one it replaces is counted as dropped ("coalesced"). While the
        side table holds anything, new events go there too, so no PV's values overtake
        each other.
        """
        if not self._pending:
            try:
                self._shard(topic).produce(topic, payload, key, headers=header_value(ser))
            except BufferError:
                pass
            except KafkaException as e:  # e.g. a record above message.max.bytes: this event only
                self._forget_if_gone(topic, e.args[0])   # deleted from outside: the expiry round creates it again
                self._lost(topic)
                self._warn("event-refused", "monitor event to %s refused: %s", topic, e)
                return
            else:
                self.published += 1
                self.published_bytes += len(payload)
                return
        with self._pending_lock:
            replaced = self._pending.get((topic, key))
            self._pending[(topic, key)] = (payload, ser)
        if replaced is not None:
            self.coalesced += 1
            self._lost(topic)
            self._warn("coalesced", "Kafka is not keeping up: older monitor events replaced by newer ones, "
                                    "e.g. %s on %s", key, topic)

    def _retry_pending(self, chunk: int = 1000) -> None:
        """Poll thread: move side-table events into producers that have room again, oldest first.

        The lock is let go between chunks so EPICS callbacks queueing behind it wait little.
        """
        full: set[int] = set()
        with self._pending_lock:
            keys = list(self._pending)
        for i in range(0, len(keys), chunk):
            if len(full) == len(self.events):
                return
            with self._pending_lock:
                for topic, key in keys[i:i + chunk]:
                    item = self._pending.get((topic, key))
                    p = self._shard(topic)
                    if item is None or id(p) in full:
                        continue
                    payload, ser = item
                    try:
                        p.produce(topic, payload, key, headers=header_value(ser))
                    except BufferError:
                        full.add(id(p))
                        continue
                    except KafkaException as e:
                        self._lost(topic)
                        self._warn("event-refused", "monitor event to %s refused: %s", topic, e)
                    else:
                        self.published += 1
                        self.published_bytes += len(payload)
                    del self._pending[(topic, key)]

    # ------------------------------------------------------------------ commands
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Without a committed offset start at the current end *now*, so a command
        # sent after 'ready' cannot fall into the gap of a lazy offset lookup.
        committed = consumer.committed(partitions, timeout=10)
        for p, c in zip(partitions, committed):
            if c.offset == OFFSET_INVALID or c.offset < 0:
                _, high = consumer.get_watermark_offsets(p, timeout=10)
                p.offset = high
            else:
                p.offset = c.offset
        self.commits.forget([p.partition for p in partitions])
        if self.partitions is not None:   # before any command of these partitions is read
            self.partitions.assigned({p.partition: p.offset for p in partitions})
        consumer.assign(partitions)
        self.assigned.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """What was handled is stored now, and committed by librdkafka as the partitions go."""
        self._settle()
        gone = [p.partition for p in partitions]
        self.commits.forget(gone)
        if self.partitions is not None:
            self.partitions.revoked(gone)

    def _on_commit(self, err, partitions: list[TopicPartition]) -> None:
        if err is not None or self.partitions is None:
            return
        done = {p.partition: p.offset for p in partitions
                if p.error is None and p.offset >= 0 and p.topic == self.cmd_topic}
        if done:
            self.partitions.committed(done)

    def _settle(self) -> None:
        """Consumer thread: store the offsets of handled commands, for librdkafka's next commit."""
        moved = self.commits.settle()
        if moved and self.consumer is not None:
            try:
                self.consumer.store_offsets(offsets=[TopicPartition(self.cmd_topic, p, o) for p, o in moved.items()])
            except KafkaException as e:   # e.g. a partition revoked meanwhile: its commands run again elsewhere
                log.warning("storing command offsets %s: %s", moved, e)

    def commands(self, batch: int = 200, busy: Callable[[], bool] | None = None,
                 drained: Callable[[], None] | None = None) -> Iterator[Batch]:
        """Raw command payloads with their positions, as read together in one poll, until ``stop_consuming``;
        empty lists when idle. Pass each position to ``handled`` once its command is handled: only then
        is its offset committed.

        While ``busy()`` (the workers are behind), or while too many commands wait behind an
        unfinished one, the command topic is paused: commands wait in Kafka rather than in memory,
        and polling goes on so the group keeps us. At the stop the commands read get
        ``command_drain_timeout`` to finish (``_drain``); ``drained()`` is called once it is over.
        """
        self.admin.ensure([self.cmd_topic])
        self.consumer = Consumer(self._sub_config)
        self.consumer.subscribe([self.cmd_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while self._running and self._running_consumer:
                if self._behind(busy):
                    yield from self._paused(busy)
                    continue
                # Wait for one record, then take what is already there: consume(n, t)
                # alone would hold every command for up to t unless n had arrived.
                first = self.consumer.poll(0.2)
                self._settle()
                yield ([], []) if first is None else self._received([first, *self.consumer.consume(batch - 1, 0)])
            self._drain(drained)
        finally:
            try:
                self.consumer.close()  # closed by the thread that polls it; commits what was stored
            except Exception as e:
                log.warning("closing command consumer: %s", e)

    def _received(self, msgs: list) -> Batch:
        payloads, positions = [], []
        read = self.commits.read
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("command consumer: %s", err)
                continue
            payloads.append(m.value())
            positions.append(read(m.partition(), m.offset()))
        return payloads, positions

    def _behind(self, busy: Callable[[], bool] | None) -> bool:
        return (busy is not None and busy()) or self.commits.uncommitted() >= UNCOMMITTED_MAX

    def _paused(self, busy: Callable[[], bool] | None) -> Iterator[Batch]:
        consumer = self.consumer
        assert consumer is not None
        self.command_pauses += 1
        n = self._throttles.setdefault("cmd-backlog", _Throttle()).due()
        if n:
            if busy is not None and busy():
                why = "command workers are behind"
            else:
                why = (f"{self.commits.uncommitted()} commands wait for the command at (partition, offset) "
                       f"{self.commits.oldest()} to finish before their offsets can be committed")
            log.warning("%s: reading %s paused until they catch up (%d such pauses in the last %g s)",
                        why, self.cmd_topic, n, LOG_EVERY_S)
        try:
            consumer.pause(consumer.assignment())
            while self._behind(busy) and self._running and self._running_consumer:
                m = consumer.poll(0.05)  # nothing comes from paused partitions; keeps group membership
                self._settle()
                # fetched before the pause, or assigned since: never dropped
                yield ([], []) if m is None else self._received([m])
        finally:
            try:
                consumer.resume(consumer.assignment())
            except KafkaException as e:
                log.warning("resuming the command topic: %s", e)

    def _drain(self, drained: Callable[[], None] | None) -> None:
        """The stop: no command is read any more; those read get ``drain_s`` to finish. The offsets of the
        handled ones are stored (the consumer's close commits them); the others stay for the next gateway
        of the group, which runs them."""
        consumer = self.consumer
        assert consumer is not None
        self._settle()
        unfinished = self.commits.unfinished()
        if unfinished:
            log.info("stopping: waiting up to %g s for %d commands read to finish", self.drain_s, unfinished)
            try:
                consumer.pause(consumer.assignment())
            except KafkaException as e:
                log.warning("pausing the command topic: %s", e)
            deadline = time.monotonic() + self.drain_s
            while self.commits.unfinished() and time.monotonic() < deadline:
                consumer.poll(0.05)   # keeps the group membership; a record fetched before the pause is left
                self._settle()
        if drained is not None:
            drained()
        self._settle()
        self.left_unfinished = self.commits.unfinished()
        if self.left_unfinished:
            log.warning("stopping: %d commands read did not finish within %g s (--command-drain-timeout); their "
                        "offsets stay uncommitted, so the next gateway of group %s runs them",
                        self.left_unfinished, self.drain_s, self._sub_config["group.id"])

    def stop_consuming(self) -> None:
        self._running_consumer = False

    def flush(self, timeout: float = 5.0) -> int:
        """Wait, at most ``timeout``, for what has been produced so far to reach Kafka, while the poll thread
        goes on (it retries the side table and resends); returns how many records are still queued."""
        deadline = time.monotonic() + timeout
        for p in self.producers:
            p.flush(max(0.0, deadline - time.monotonic()))
        return self.queue_depth()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Flush and stop the producers; call after the command loop has ended and EPICS is closed."""
        self._running = False
        self._poller.join(1.0)
        deadline = time.monotonic() + flush_timeout
        if self._pending:
            self._retry_pending()
        left = len(self._pending)
        for p in self.producers:
            left += p.flush(max(0.0, deadline - time.monotonic()))
        left += len(self._resend)  # refused once for their size; no poll thread left to send them again
        if left:
            log.error("%d records not delivered at shutdown", left)
