"""The client's Kafka side: send commands, correlate replies, deliver events.

Two consumers, for two different needs:
- replies are read by *assigning* the reply topic (no consumer group), so
  any number of processes with the same app name each see every reply and
  filter by ``reply_id``; nothing fences anybody out;
- monitor and snapshot topics are *subscribed* in a consumer group, which is
  how the gateway sees that somebody still reads a monitor (PROTOCOL 6).
User handlers run on one dispatcher thread, in arrival order, so a slow
handler delays neither replies nor the consumers. Behind a slow handler the
calls queued for it are bounded: past ``HANDLER_QUEUE_HIGH`` calls (or
``HANDLER_QUEUE_HIGH_BYTES`` of records) the event consumer pauses its
partitions, so the backlog waits in Kafka, not in memory, and resumes below
half of that; nothing is dropped.

confluent-kafka consumers are not safe to drive from two threads: each
consumer is only touched by the thread that polls it (subscription changes
are queued to the event thread), and closed only once that thread is gone.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import re
import threading
import time
import uuid
from typing import Any, Callable

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from k2eg.protocol import commands as C
from k2eg.protocol.codec import HEADER, decode
from k2eg.transport import KafkaAccessError, KafkaAuthenticationError, KafkaWatch, TopicAdmin, await_metadata

from .environment import Environment, EnvironmentConfigError
from .errors import ClientClosed, KafkaAuthenticationFailed, KafkaUnavailable, OperationError

log = logging.getLogger("k2eg.client")

HANDLER_QUEUE_HIGH = 10_000            # handler calls queued behind a slow handler before the events pause
HANDLER_QUEUE_HIGH_BYTES = 64 << 20    # ... or bytes of the records behind them (waveforms weigh more)

RecordSink = Callable[[dict], None]           # a reply-topic record for one reply_id
TopicSink = Callable[[str, Any], None]        # (topic, decoded record) from a subscribed topic


# A topic created a moment ago answers these until its partition leader is elected.
_LEADER_PENDING = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                             KafkaError.UNKNOWN_TOPIC_OR_PART})

class KafkaLog(KafkaWatch):
    """librdkafka's log lines, on Python logging (confluent-kafka's ``logger`` option) instead of stderr.

    A broker that is down makes librdkafka repeat the same line many times a
    second; repeats within ``quiet_for`` seconds go to DEBUG. While ``startup``
    is set everything goes to DEBUG: a failed start-up raises one clear
    exception instead (its reason kept by ``KafkaWatch``).
    """

    def __init__(self, logger: logging.Logger, quiet_for: float = 60.0):
        super().__init__(logger)
        self.quiet_for = quiet_for
        self.startup = True
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = self.note(level, fmt, *args)
        if self.startup:
            level = min(level, logging.DEBUG)
        elif level > logging.DEBUG:
            key = re.sub(r"\d+", "#", text)
            now = time.monotonic()
            with self._lock:
                if len(self._last) > 1000:
                    self._last.clear()
                if now - self._last.get(key, -self.quiet_for) < self.quiet_for:
                    level = logging.DEBUG
                else:
                    self._last[key] = now
        self.logger.log(level, "%s", text)


class Pending:
    """One command awaiting its reply (or the reason it never gets one); the first of the two wins.

    The latch is a held Lock: an Event builds a Condition and a waiter lock for every
    wait, which the gateway's workers measured at thousands of gets/s (bench/EXPERIMENTS.md
    row 30).
    """

    __slots__ = ("_latch", "_claims", "record", "error", "_on_settle")

    def __init__(self, on_settle: Callable[["Pending"], None] | None = None) -> None:
        self._latch = threading.Lock()
        self._latch.acquire()
        self._claims = itertools.count()
        self.record: dict | None = None
        self.error: BaseException | None = None
        self._on_settle = on_settle  # for a waiter that cannot block (k2eg.aio): told on the settling thread

    def settle(self, record: dict | None = None, error: BaseException | None = None) -> None:
        if next(self._claims) == 0:  # atomic under the GIL: only the first caller gets 0
            self.record, self.error = record, error
            self._latch.release()
            if self._on_settle is not None:
                try:
                    self._on_settle(self)
                except Exception:  # the reply thread must go on serving everybody else
                    log.exception("reply completion callback failed")

    def fail(self, error: BaseException) -> None:
        self.settle(error=error)

    def wait(self, timeout: float | None) -> bool:
        return self._latch.acquire(timeout=-1 if timeout is None else max(0.0, timeout))


class ReplyIds:
    """Reply ids shaped like the uuid4 0.3.0 sent: random per client, then counted in the last 12 digits.

    ``uuid4()`` per command reads ``os.urandom``, which lets go of the GIL; getting it back among
    32 busy threads cost a context switch per command (bench/EXPERIMENTS.md row 36).
    """

    def __init__(self) -> None:
        self._prefix = str(uuid.uuid4())[:24]
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFFFFFFFFFF:012x}"


class _EventBatch(list):
    """Handler calls of one poll of the event consumer, with the bytes of its records: what the queue bound counts."""

    __slots__ = ("nbytes",)


class ClientTransport:
    def __init__(self, env: Environment, app_name: str, group_name: str | None = None,
                 startup_timeout: float = 10.0, queue_high: int = HANDLER_QUEUE_HIGH,
                 queue_high_bytes: int = HANDLER_QUEUE_HIGH_BYTES):
        self.env = env
        # Handler calls (and record bytes) queued by the event thread, and those the dispatcher finished:
        # one writer each, so no lock; their difference is the backlog the events pause for.
        self.queue_high, self.queue_high_bytes = queue_high, queue_high_bytes
        self._calls_in = self._calls_done = self._bytes_in = self._bytes_done = 0
        self.paused = False       # the event consumer's partitions are paused for a slow handler
        self.pauses = 0           # how often (tests, diagnostics)
        self.backlog_peak = 0     # the most handler calls ever queued
        self.reply_topic = f"{app_name}-reply"
        self.kafka_log = KafkaLog(logging.getLogger("k2eg.client.kafka"))
        self._pending: dict[str, Pending] = {}
        self._streams: dict[str, RecordSink] = {}     # reply_id -> sink (one-shot snapshots)
        self._topics: dict[str, TopicSink] = {}       # subscribed topic -> sink
        self._positions: dict[tuple[str, int], int] = {}  # next offset per event partition (event thread only)
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._running = True
        self._changes: queue.SimpleQueue = queue.SimpleQueue()
        self._assigned: set[str] = set()
        self._assign_cond = threading.Condition()
        self.handlers: queue.SimpleQueue = queue.SimpleQueue()
        self._handoff: list | None = None   # handler calls of the event batch being read, if any
        self._event_ident: int | None = None  # the only thread that fills _handoff without the lock
        self._handoff_lock = threading.Lock()
        self._shared_group = group_name is not None
        self._unique = f"{app_name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.reply_id = ReplyIds()
        self.group_id = group_name or self._unique
        self._replies: Consumer | None = None
        self._events: Consumer | None = None
        self._threads: list[threading.Thread] = []
        try:
            # No linger, one request in flight: commands sent meanwhile share the next request
            # (bench/EXPERIMENTS.md row 25).
            self.producer = Producer(self._config({"linger.ms": 0, "socket.nagle.disable": True,
                                                   "max.in.flight.requests.per.connection": 1}))
            self.admin = TopicAdmin(self._config())
        except KafkaException as e:
            raise EnvironmentConfigError(
                f"{env.path}: librdkafka refused the Kafka settings: {e.args[0].str()} "
                "(check the kafka.<setting> keys)") from None
        try:
            self._start(startup_timeout)
        except BaseException:
            self._abandon()
            raise
        self.kafka_log.startup = False
        self._threads = [
            threading.Thread(target=self._reply_loop, name="k2eg-replies", daemon=True),
            threading.Thread(target=self._event_loop, name="k2eg-events", daemon=True),
            threading.Thread(target=self._dispatch_loop, name="k2eg-handlers", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._event_ident = self._threads[1].ident

    # ------------------------------------------------------------- start-up
    def _config(self, defaults: dict | None = None, **fixed: Any) -> dict:
        """librdkafka settings: our defaults, then the environment's ``kafka.*`` keys, then what must hold."""
        return {"bootstrap.servers": self.env.kafka_broker_url, **(defaults or {}), **self.env.kafka,
                **{k.replace("_", "."): v for k, v in fixed.items()}, "logger": self.kafka_log,
                "error_cb": self.kafka_log.error_cb}

    def _unavailable(self, what: str, error: object) -> KafkaUnavailable:
        detail = error.args[0].str() if isinstance(error, KafkaException) and error.args else (str(error) or
                                                                                              type(error).__name__)
        if self.kafka_log.last_problem:
            detail += f" (librdkafka: {self.kafka_log.last_problem})"
        return KafkaUnavailable(
            f"{what}: {detail}; check kafka_broker_url in {self.env.path} "
            f"(environment '{self.env.name}')")

    def _start(self, timeout: float) -> None:
        """The broker answers, the reply topic exists and is assigned, all before the first command."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        try:
            md = await_metadata(self.admin.client, self.kafka_log, timeout, self.producer)
        except KafkaAuthenticationError:
            user = self.env.kafka.get("sasl.username")
            raise KafkaAuthenticationFailed(
                f"Kafka at {self.env.kafka_broker_url} refused the login{f' of user {user!r}' if user else ''} "
                f"(authentication failed): {self.kafka_log.auth_error}; check kafka.sasl.username, "
                f"kafka.sasl.password and kafka.sasl.mechanism in {self.env.path}") from None
        except KafkaAccessError:
            raise self._unavailable(f"cannot reach Kafka at {self.env.kafka_broker_url} within {timeout:g} s",
                                    "the broker did not answer") from None
        meta = md.topics.get(self.reply_topic)
        if meta is None or meta.error is not None or not meta.partitions:
            try:
                self.admin.ensure([self.reply_topic], timeout=left())
            except Exception as e:
                raise self._unavailable(
                    f"cannot create the reply topic '{self.reply_topic}' on {self.env.kafka_broker_url}", e) from None
        self._replies = Consumer(self._config(  # never joins its group: assign only
            {"fetch.wait.max.ms": 5, "fetch.min.bytes": 1, "fetch.queue.backoff.ms": 1},
            group_id=self._unique, enable_auto_commit=False))
        parts: list[int] = []
        while True:
            try:
                md = self._replies.list_topics(self.reply_topic, timeout=left())
                parts = sorted(md.topics[self.reply_topic].partitions)
            except KafkaException:
                parts = []
            if parts or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not parts:
            raise self._unavailable(f"the reply topic '{self.reply_topic}' on {self.env.kafka_broker_url} "
                                    f"has no partitions after {timeout:g} s",
                                    "topic metadata incomplete")
        tps = []
        for p in parts:
            while True:  # a topic just created may not have its leader yet: retriable until the deadline
                try:
                    _, high = self._replies.get_watermark_offsets(TopicPartition(self.reply_topic, p),
                                                                  timeout=left())
                    break
                except KafkaException as e:
                    code = e.args[0].code() if e.args and hasattr(e.args[0], "code") else None
                    if not (code in _LEADER_PENDING and time.monotonic() < deadline):
                        raise self._unavailable(
                            f"cannot read the end of '{self.reply_topic}' on {self.env.kafka_broker_url}", e) from None
                    time.sleep(0.1)
            tps.append(TopicPartition(self.reply_topic, p, high))
        self._replies.assign(tps)
        self._events = Consumer(self._config(
            {"auto.offset.reset": "latest", "fetch.wait.max.ms": 10, "session.timeout.ms": 10_000,
             "heartbeat.interval.ms": 1000, "topic.metadata.refresh.interval.ms": 5000},
            group_id=self.group_id,
            enable_auto_commit=self._shared_group))  # a private group has nobody to hand offsets to

    def _abandon(self) -> None:
        """Release what a failed start-up created, so no librdkafka thread keeps retrying."""
        self._running = False
        for c in (self._replies, self._events):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
        self._replies = self._events = None
        self.producer = None  # type: ignore[assignment]
        self.admin = None  # type: ignore[assignment]

    # ------------------------------------------------------------- commands
    def send(self, cmd: C.Command, on_error: Callable[[KafkaError], None] | None = None) -> None:
        self.send_to(self.env.cmd_topic, C.to_json(cmd), cmd.name, cmd.reply_id, on_error)

    def send_to(self, topic: str, data: bytes, what: str, reply_id: str | None,
                on_error: Callable[[KafkaError], None] | None = None) -> None:
        """Produce one command (JSON ``data``) to ``topic``; the gateway's and the archiver's commands alike."""
        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                log.warning("command %s not delivered to topic %s: %s", reply_id, topic, err.str())
                if on_error is not None:
                    on_error(err)

        if not self._running:
            raise ClientClosed("this k2eg client is closed")
        for _ in range(50):
            try:
                self.producer.produce(topic, data, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let it drain a little
                self.producer.poll(0.1)
            except KafkaException as e:
                err = e.args[0]
                if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise OperationError(-1, (
                        f"the {what} command is {len(data)} bytes, more than Kafka accepts; raise "
                        f"message.max.bytes (kafka.message.max.bytes in {self.env.path}) and the limits of "
                        f"the broker and topic '{topic}'")) from None
                raise KafkaUnavailable(f"cannot send the {what} command to topic '{topic}' at "
                                       f"{self.env.kafka_broker_url}: {err.str()}") from None
        else:
            raise KafkaUnavailable(f"the producer queue to {self.env.kafka_broker_url} stays full; is Kafka down?")
        # No poll(0) here: it lets go of the GIL, and getting it back among 32 busy threads cost a
        # context switch per command; the reply loop serves delivery reports (EXPERIMENTS row 36).

    def submit(self, cmd: C.Command, on_settle: Callable[[Pending], None] | None = None) -> Pending:
        """Send ``cmd``; its reply, or why none comes, settles the returned ``Pending``.

        The one way commands await replies, blocking (``request``) or not (k2eg.aio passes
        ``on_settle``). The caller must ``forget(cmd.reply_id)`` once it stops waiting.
        """
        p = Pending(on_settle)
        with self._lock:
            self._pending[cmd.reply_id] = p
        try:
            self.send(cmd, lambda err: p.fail(KafkaUnavailable(
                f"command not delivered to topic '{self.env.cmd_topic}' at {self.env.kafka_broker_url}: "
                f"{err.str()}")))
        except BaseException:
            self.forget(cmd.reply_id)
            raise
        return p

    def forget(self, reply_id: str) -> None:
        """Nobody waits for this reply any more (answered, timed out or cancelled): a late one is dropped."""
        with self._lock:
            self._pending.pop(reply_id, None)

    def request(self, cmd: C.Command, timeout: float | None) -> dict | None:
        """Send ``cmd`` and wait for its reply; None on timeout."""
        p = self.submit(cmd)
        try:
            if not p.wait(timeout):
                return None
            if p.error is not None:
                raise p.error
            return p.record
        finally:
            self.forget(cmd.reply_id)

    def request_parts(self, topic: str, data: bytes, what: str, reply_id: str, timeout: float | None) -> list[dict]:
        """Send a command whose answer may come in several records, ending with one that has ``last``
        true; the records in arrival order. OperationTimeout-free: returns what came when ``timeout``
        passes without the last one (the caller says what is missing)."""
        parts: list[dict] = []
        p = Pending()

        def sink(rec: dict) -> None:
            parts.append(rec)
            if rec.get("last") or rec.get("error", 0) != 0:
                p.settle(rec)
        self.open_stream(reply_id, sink)
        try:
            self.send_to(topic, data, what, reply_id, lambda err: p.fail(KafkaUnavailable(
                f"command not delivered to topic '{topic}' at {self.env.kafka_broker_url}: {err.str()}")))
            if p.wait(timeout) and p.error is not None:
                raise p.error
            return list(parts)
        finally:
            self.close_stream(reply_id)

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
        except ValueError as e:  # includes a header that is not UTF-8
            log.warning("skipping record at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), e)
            return None

    @staticmethod
    def _take(consumer: Consumer, timeout: float, batch: int = 500) -> list:
        """Wait for one record, then take what else is already there.

        ``consume(n, timeout)`` waits the whole timeout unless ``n`` records
        arrive, which put up to ``timeout`` on every reply's latency.
        """
        first = consumer.poll(timeout)
        if first is None:
            return []
        return [first, *consumer.consume(batch, 0)]

    def _reply_loop(self) -> None:
        while self._running:
            try:
                self.producer.poll(0)        # delivery reports and librdkafka logs
                self.admin.client.poll(0)
                msgs = self._take(self._replies, 0.1)
            except Exception as e:
                log.warning("reply consumer: %s", e)
                time.sleep(0.1)
                continue
            for m in msgs:
                try:
                    self._on_reply(m)
                except Exception:  # one bad record must never stop the replies of everybody else
                    log.exception("skipping reply record at %s[%s]@%s", m.topic(), m.partition(), m.offset())

    def _on_reply(self, m) -> None:
        if m.error() is not None:
            if m.error().code() != KafkaError._PARTITION_EOF:
                log.debug("reply consumer: %s", m.error())
            return
        rec = self._decode(m)
        if not isinstance(rec, dict):
            if rec is not None:
                log.warning("skipping reply record at %s[%d]@%d: not a map", m.topic(), m.partition(), m.offset())
            return
        rid = rec.get("reply_id")
        if not isinstance(rid, str):
            log.debug("reply record without a string reply_id at %s[%d]@%d", m.topic(), m.partition(), m.offset())
            return
        with self._lock:
            p = self._pending.get(rid)
            sink = None if p is not None else self._streams.get(rid)
        if p is not None:
            p.settle(rec)
        elif sink is not None:
            try:
                sink(rec)
            except Exception:
                log.exception("snapshot record handling failed")

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Resume where this client stopped; a partition new to it starts one record before the end.

        A rebalance (every monitor added or removed) revokes and re-assigns all
        partitions; resuming at our own position neither repeats nor skips events.
        A new topic starts at its newest record (a monitor's current value,
        re-published by the gateway), so a value is delivered at once.
        """
        committed: dict[tuple[str, int], int] = {}
        fresh = [p for p in partitions if (p.topic, p.partition) not in self._positions]
        if self._shared_group and fresh:
            try:
                for c in consumer.committed([TopicPartition(p.topic, p.partition) for p in fresh], timeout=5):
                    if c.offset >= 0:
                        committed[(c.topic, c.partition)] = c.offset
            except Exception as e:
                log.debug("committed offsets: %s", e)
        for p in partitions:
            key = (p.topic, p.partition)
            if key in self._positions:
                p.offset = self._positions[key]
            elif key in committed:
                p.offset = committed[key]
            else:
                try:
                    low, high = consumer.get_watermark_offsets(p, timeout=5)
                    # An empty topic starts at its beginning: "the end" is resolved later, by the
                    # fetcher, and would skip a first record landing in between (a PV that
                    # never changes again then shows nothing at all).
                    p.offset = max(low, high - 1) if high > low else low
                except Exception:
                    p.offset = OFFSET_END
        consumer.assign(partitions)
        with self._assign_cond:
            self._assigned.update(p.topic for p in partitions)
            self._assign_cond.notify_all()

    def _apply_changes(self, current: list[str]) -> list[str]:
        while not self._changes.empty():
            self._changes.get_nowait()
        with self._lock:
            wanted = sorted(self._topics)
        if wanted == current:
            return current
        gone = set(current) - set(wanted)
        for key in [k for k in self._positions if k[0] in gone]:
            del self._positions[key]  # a later monitor of that PV starts from its newest value again
        try:
            if wanted:
                self._events.subscribe(wanted, on_assign=self._on_assign)
            else:
                self._events.unsubscribe()
        except Exception as e:
            log.warning("event consumer subscription %s: %s; retrying", wanted, e)
            self._changes.put(None)
            time.sleep(0.1)
            return current
        return wanted

    def backlog(self) -> tuple[int, int]:
        """Handler calls, and bytes of their records, queued by the event thread and not yet run."""
        return self._calls_in - self._calls_done, self._bytes_in - self._bytes_done

    def _throttle(self) -> None:
        """Event thread: pause every assigned partition while the handlers are behind, resume at half.

        librdkafka drops what it fetched for a paused partition and fetches it again from our
        position on resume, so nothing is lost; a rebalance hands out partitions unpaused, so
        the pause is applied again to whatever is assigned now.
        """
        calls, nbytes = self.backlog()
        if calls > self.queue_high or nbytes > self.queue_high_bytes:
            try:
                self._events.pause(self._events.assignment())
            except KafkaException as e:
                log.debug("pausing the event consumer: %s", e)
            if not self.paused:
                self.paused = True
                self.pauses += 1
                log.info("handlers are behind (%d calls, %d bytes queued): event topics paused", calls, nbytes)
        elif self.paused and calls <= self.queue_high // 2 and nbytes <= self.queue_high_bytes // 2:
            try:
                self._events.resume(self._events.assignment())
                self.paused = False
            except KafkaException as e:
                log.debug("resuming the event consumer: %s", e)

    def _event_loop(self) -> None:
        current: list[str] = []
        while self._running:
            if not self._changes.empty():
                current = self._apply_changes(current)
            if not current:
                time.sleep(0.02)
                continue
            self._throttle()
            try:
                msgs = self._take(self._events, 0.05)
            except Exception as e:
                log.warning("event consumer: %s", e)
                time.sleep(0.05)
                continue
            # One hand-off to the dispatcher per batch, not per event (bench/EXPERIMENTS.md row 4).
            with self._handoff_lock:
                self._handoff = _EventBatch()
            try:
                for m in msgs:
                    try:
                        self._on_event(m)
                    except Exception:  # a bad record or a failing sink must not stop the monitors
                        log.exception("skipping event record at %s[%s]@%s", m.topic(), m.partition(), m.offset())
            finally:
                with self._handoff_lock:
                    batch, self._handoff = self._handoff, None
                if batch:
                    batch.nbytes = sum(len(m.value() or b"") for m in msgs)
                    self._calls_in += len(batch)
                    self._bytes_in += batch.nbytes
                    self.backlog_peak = max(self.backlog_peak, self._calls_in - self._calls_done)
                    self.handlers.put(batch)

    def _on_event(self, m) -> None:
        err = m.error()
        if err is not None:
            if err.code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                log.debug("event consumer: %s", err)
            return
        topic = m.topic()
        self._positions[(topic, m.partition())] = m.offset() + 1
        sink = self._topics.get(topic)
        if sink is None:
            return
        rec = self._decode(m)
        if rec is not None:
            sink(topic, rec)

    def _dispatch_loop(self) -> None:
        get = self.handlers.get
        while True:
            item = get()
            if item is None or not self._running:
                return
            for fn, args in item:
                try:
                    fn(*args)
                except Exception:
                    log.exception("user handler %s raised", getattr(fn, "__name__", fn))
                if not self._running:
                    return
            if type(item) is _EventBatch:
                self._calls_done += len(item)
                self._bytes_done += item.nbytes

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run a user handler on the dispatcher thread, after everything queued before it.

        While the event thread hands out a batch, calls join that batch (from
        any thread), so a call made after an event was queued runs after it.
        The event thread itself owns that batch and appends without the lock:
        it does so once per event (bench/EXPERIMENTS.md row 26).
        """
        batch = self._handoff
        if batch is not None and threading.get_ident() == self._event_ident:
            batch.append((fn, args))
            return
        with self._handoff_lock:
            if self._handoff is not None:
                self._handoff.append((fn, args))
                return
        self.handlers.put([(fn, args)])

    # ------------------------------------------------------------- close
    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads, wake every waiting request, release Kafka; safe from a handler, idempotent.

        Bounded even when the broker hangs: undelivered commands have nobody
        waiting for them any more, and a consumer that cannot leave its group
        in time is left to finish in the background.
        """
        with self._close_lock:
            if not self._running:
                return
            self._running = False
        with self._lock:
            pending = list(self._pending.values())
        for p in pending:
            p.fail(ClientClosed("the k2eg client was closed while waiting for a reply"))
        self.handlers.put(None)
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(timeout)
        consumers = []
        for t, c in ((self._threads[0], self._replies), (self._threads[1], self._events)):
            if t.is_alive():  # never close a consumer under the thread still polling it
                log.warning("%s did not stop within %g s; leaving its consumer open", t.name, timeout)
            else:
                consumers.append(c)

        def close_consumers() -> None:
            for c in consumers:
                try:
                    c.close()
                except Exception as e:
                    log.debug("closing consumer: %s", e)

        closer = threading.Thread(target=close_consumers, name="k2eg-close", daemon=True)
        closer.start()
        try:
            self.producer.flush(min(timeout, 1.0))
        except Exception as e:
            log.debug("flushing producer: %s", e)
        closer.join(min(timeout, 2.0))
        if closer.is_alive():
            log.warning("Kafka at %s does not answer; the consumers finish closing in the background",
                        self.env.kafka_broker_url)
