"""The archiver process: Kafka in, store, Kafka out (the driver around the pure parts).

Two threads:

- ``k2eg-archiver-ingest`` reads the archived topics in the consumer group
  ``--group-id`` (several archivers split the topics between them), turns
  records into rows, writes a batch every ``--flush-interval`` seconds or
  ``--flush-rows`` rows, and commits the batch's offsets only after the
  store returned (auto-commit off). When a partition is assigned it resumes
  after the higher of the committed offset and the highest offset the store
  holds, so a crash between write and commit stores nothing twice.
- ``k2eg-archiver-commands`` reads the configuration topic (compacted; every
  archiver reads all of it) and the command topic (in the group
  ``<group-id>-commands``, so each command is run by one archiver), applies
  configuration commands by writing the configuration topic, and answers
  queries from the store.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from k2eg.protocol import commands as C
from k2eg.protocol.codec import HEADER, decode
from k2eg.protocol import replies
from k2eg.protocol.uri import parse_pv_uri, pv_topic
from k2eg.transport import TopicAdmin

from . import wire
from .model import Rows
from .store import Store, StoreError, drop_republished

log = logging.getLogger("k2eg.archiver")

READY = "k2eg archiver ready"
_MSGPACK_HEADERS = [(HEADER, b"Msgpack")]


@dataclass
class ArchiverOptions:
    bootstrap: str
    cmd_topic: str = "k2eg-cmd-archive"
    config_topic: str | None = None
    group_id: str = "k2eg-archiver"
    #: Static group membership (``group.instance.id``): a restarted archiver gets its partitions back at
    #: once instead of after the dead member's session timeout. Distinct per archiver.
    instance_id: str | None = None
    session_timeout_ms: int = 10_000
    gateway_cmd_topic: str | None = None       # set: PV URIs added to the archive are monitored through it
    flush_interval: float = 1.0
    flush_rows: int = 50_000
    topic_refresh: float = 2.0
    chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES
    max_answer_rows: int = 5_000_000     # a history answer beyond this is refused: narrow the range
    store_retry: float = 2.0             # seconds between tries while the store refuses a batch
    kafka: dict[str, str] = field(default_factory=dict)

    @property
    def config_topic_name(self) -> str:
        return self.config_topic or wire.config_topic(self.cmd_topic)


def decode_record(msg) -> Any:
    header = None
    for k, v in msg.headers() or ():
        if k == HEADER:
            header = v
            break
    return decode(msg.value(), header)


class Ingest:
    """Kafka records -> rows: what is archived of each record (pure apart from reading ``msg``'s accessors)."""

    def __init__(self) -> None:
        self.skipped = 0

    def add(self, rows: Rows, msg, snapshot: str | None, wants_pv: Callable[[str], bool]) -> None:
        try:
            rec = decode_record(msg)
        except ValueError as e:
            self.skipped += 1
            log.debug("skipping %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), e)
            return
        topic, part, off = msg.topic(), msg.partition(), msg.offset()
        kafka_ms = msg.timestamp()[1]
        if snapshot is not None:
            self.add_snapshot(rows, rec, snapshot, topic, part, off, kafka_ms)
            return
        if not isinstance(rec, dict) or len(rec) != 1:
            self.skipped += 1          # not a monitor event (a reply, a snapshot record on a PV-pattern topic)
            return
        ((name, tree),) = rec.items()
        if not wants_pv(name):
            self.skipped += 1
            return
        rows.add_event(topic, part, off, kafka_ms, name, tree)

    def add_snapshot(self, rows: Rows, rec: Any, snapshot: str, topic: str, part: int, off: int,
                     kafka_ms: int) -> None:
        kind = rec.get("message_type") if isinstance(rec, dict) else None
        it = rec.get("iter_index") if isinstance(rec, dict) else None
        if kind not in (replies.HEADER, replies.DATA, replies.TAIL) or not isinstance(it, int) or isinstance(it, bool):
            self.skipped += 1
            return
        ts = rec.get("timestamp") if isinstance(rec.get("timestamp"), int) else kafka_ms
        if kind == replies.DATA:
            for name, tree in rec.items():
                if name not in ("message_type", "timestamp", "iter_index"):
                    rows.add_event(topic, part, off, kafka_ms, name, tree, snapshot, it)
            return
        tags = rec.get("tags") if isinstance(rec.get("tags"), dict) else None
        error = rec.get("error", 0) if isinstance(rec.get("error", 0), int) else -1
        rows.add_mark(snapshot, it, kind, ts, tags, error, topic, part, off)


class Archiver:
    def __init__(self, opts: ArchiverOptions, store: Store):
        self.opts = opts
        self.store = store
        self.config = wire.ArchiveConfig()
        self._config_version = 0
        self._config_lock = threading.Lock()
        self._running = True
        self._stop = threading.Event()
        self.ingest = Ingest()
        self.stored = 0
        self.commits = 0
        base = {"bootstrap.servers": opts.bootstrap, **opts.kafka,
                "logger": logging.getLogger("k2eg.archiver.rdkafka")}
        self._base = base
        self.admin = TopicAdmin(base)
        self.producer = Producer({**base, "linger.ms": 5, "acks": "all", "message.max.bytes": 8 << 20})
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()

    # ----------------------------------------------------------------- life cycle

    def start(self, timeout: float = 60.0) -> None:
        self.admin.ensure([self.opts.cmd_topic], timeout)
        self.admin.ensure([self.opts.config_topic_name], timeout, config={"cleanup.policy": "compact"})
        self._config_consumer = Consumer({**self._base, "group.id": f"{self.opts.group_id}-config",
                                          "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                          "enable.partition.eof": True})
        self._read_config_to_end(timeout)
        static = {"session.timeout.ms": self.opts.session_timeout_ms}
        if self.opts.instance_id:
            static["group.instance.id"] = self.opts.instance_id
        self._commands = Consumer({**self._base, **static, "group.id": f"{self.opts.group_id}-commands",
                                   "auto.offset.reset": "latest", "enable.auto.commit": True,
                                   "fetch.wait.max.ms": 10})
        self._commands.subscribe([self.opts.cmd_topic], on_assign=self._commands_assigned)
        # roundrobin: PV topics have one partition each, and the default range assignor would give every
        # topic's partition 0 to the same archiver of the group
        self._data = Consumer({**self._base, **static, "group.id": self.opts.group_id, "enable.auto.commit": False,
                               "partition.assignment.strategy": "roundrobin",
                               "auto.offset.reset": "earliest", "fetch.wait.max.ms": 50,
                               "topic.metadata.refresh.interval.ms": 5000})
        self._threads = [threading.Thread(target=self._ingest_loop, name="k2eg-archiver-ingest", daemon=True),
                         threading.Thread(target=self._command_loop, name="k2eg-archiver-commands", daemon=True)]
        for t in self._threads:
            t.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the archiver's command topic {self.opts.cmd_topic} was not assigned within "
                               f"{timeout:g} s")

    def _commands_assigned(self, consumer, partitions) -> None:
        # Resume at the group's committed offset (commands sent while the partition moved between
        # archivers are still answered); a fresh group starts at the end, sought explicitly so the
        # first command is not skipped by an offset reset resolved later.
        try:
            committed = {(c.topic, c.partition): c.offset for c in consumer.committed(
                [TopicPartition(p.topic, p.partition) for p in partitions], timeout=10)}
        except KafkaException:
            committed = {}
        for p in partitions:
            if committed.get((p.topic, p.partition), -1) >= 0:
                p.offset = committed[(p.topic, p.partition)]
            else:
                try:
                    _low, high = consumer.get_watermark_offsets(p, timeout=5)
                    p.offset = high
                except KafkaException:
                    pass
        consumer.assign(partitions)
        self._ready.set()

    def stop(self) -> None:
        """Flush what was read, commit it, leave the groups."""
        self._running = False
        self._stop.set()
        for t in self._threads:
            t.join(30)
        for c in (getattr(self, "_commands", None), getattr(self, "_config_consumer", None)):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
        self.producer.flush(5)
        self.store.close()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            if not all(t.is_alive() for t in self._threads):
                raise RuntimeError("an archiver thread died")

    # ----------------------------------------------------------------- configuration

    def _read_config_to_end(self, timeout: float) -> None:
        topic = self.opts.config_topic_name
        c = self._config_consumer
        md = c.list_topics(topic, timeout=timeout).topics[topic]
        ends = {}
        for p in md.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                ends[p] = high
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions])
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for m in c.consume(1000, 0.2):
                if m.error() is None:
                    self._apply_config(m.key(), m.value())
                    if m.partition() in ends and m.offset() + 1 >= ends[m.partition()]:
                        del ends[m.partition()]
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    ends.pop(m.partition(), None)
        log.info("archive configuration: %s", self.config.describe())

    def _apply_config(self, key, value) -> None:
        with self._config_lock:
            wire.apply_config_record(self.config, key, value)
            self._config_version += 1

    def _write_config(self, cmd: wire.ArchiveCommand) -> None:
        remove = cmd.command == "archive_remove"
        recs = [(wire.config_key("pv", p), None if remove else b"{}") for p in cmd.pvs]
        recs += [(wire.config_key("snapshot", s), None if remove else b"{}") for s in cmd.snapshots]
        failed: list[str] = []

        def done(err, _msg):
            if err is not None:
                failed.append(err.str())
        for key, value in recs:
            self.producer.produce(self.opts.config_topic_name, value, key, on_delivery=done)
        if self.producer.flush(10) or failed:
            raise RuntimeError(f"the configuration topic {self.opts.config_topic_name} did not take the change: "
                               f"{failed[0] if failed else 'no answer within 10 s'}")
        if not remove and self.opts.gateway_cmd_topic:
            self._monitor_uris([wire.parse_pattern(p) for p in cmd.pvs])

    def _monitor_uris(self, patterns: list[wire.PVPattern]) -> None:
        """A PV given as a URI gets a monitor from the gateway, kept alive by this archiver's group."""
        for p in patterns:
            if p.protocol is None or p.is_glob:
                continue
            cmd = C.Monitor(pv=parse_pv_uri(p.text), destination=pv_topic(p.name))
            self.producer.produce(self.opts.gateway_cmd_topic, C.to_json(cmd))
        self.producer.poll(0)

    # ----------------------------------------------------------------- ingest

    def _wanted_topics(self, existing: list[str]) -> dict[str, str | None]:
        excluded = {self.opts.cmd_topic, self.opts.config_topic_name}
        if self.opts.gateway_cmd_topic:
            excluded.add(self.opts.gateway_cmd_topic)
        with self._config_lock:
            return self.config.topics(existing, excluded)

    def _on_assign(self, consumer, partitions) -> None:
        stored = self.store.stored_offsets()
        try:
            committed = {(c.topic, c.partition): c.offset
                         for c in consumer.committed([TopicPartition(p.topic, p.partition) for p in partitions],
                                                     timeout=10)}
        except KafkaException as e:
            log.warning("committed offsets: %s", e)
            committed = {}
        for p in partitions:
            key = (p.topic, p.partition)
            pos = committed.get(key, -1)
            if key in stored and stored[key] + 1 > pos:
                pos = stored[key] + 1
            if pos >= 0:
                p.offset = pos
        consumer.assign(partitions)
        log.info("archiving %d partitions", len(partitions))

    def _on_revoke(self, consumer, partitions) -> None:
        self._flush(consumer)
        consumer.unassign()

    def _flush(self, consumer) -> None:
        rows = self._rows
        if not len(rows) and not self._skipped_positions:
            self._last_flush = time.monotonic()
            return
        while len(rows):
            try:
                self.stored += self.store.write(rows)   # durable on return: only then commit
                break
            except StoreError as e:   # a full disk, a database restart: keep the batch, never commit past it
                log.error("the store refused %d rows (retrying in %g s): %s", len(rows), self.opts.store_retry, e)
                if self._stop.wait(self.opts.store_retry):    # stopping: the batch was never committed
                    raise
        positions = dict(self._skipped_positions)
        for key, o in rows.high_offsets().items():
            positions[key] = max(o + 1, positions.get(key, -1))
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        self._rows = Rows()
        self._skipped_positions = {}
        self._last_flush = time.monotonic()
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
                self.commits += 1
            except KafkaException as e:   # stored anyway: the store's offsets keep a re-read from doubling it
                log.warning("offset commit failed (the store's offsets cover it): %s", e)

    def _ingest_loop(self) -> None:
        consumer = self._data
        self._rows = Rows()
        self._skipped_positions: dict[tuple[str, int], int] = {}
        self._last_flush = time.monotonic()
        seen_version = -1
        topics: dict[str, str | None] = {}
        next_refresh = 0.0
        try:
            while self._running:
                now = time.monotonic()
                if now >= next_refresh or seen_version != self._config_version:
                    seen_version = self._config_version
                    next_refresh = now + self.opts.topic_refresh
                    try:
                        existing = list(consumer.list_topics(timeout=10).topics)
                        wanted = self._wanted_topics(existing)
                    except KafkaException as e:
                        log.warning("listing topics: %s", e)
                        wanted = topics
                    if sorted(wanted) != sorted(topics):
                        self._flush(consumer)
                        topics = wanted
                        if topics:
                            consumer.subscribe(sorted(topics), on_assign=self._on_assign, on_revoke=self._on_revoke)
                        else:
                            consumer.unsubscribe()
                        log.info("archived topics: %d", len(topics))
                    else:
                        topics = wanted
                if not topics:
                    self._stop.wait(0.1)
                    continue
                msgs = consumer.consume(5000, 0.1)
                rows = self._rows
                wants = self.config.wants_pv
                for m in msgs:
                    if m.error() is not None:
                        if m.error().code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                            log.debug("archiver consumer: %s", m.error())
                        continue
                    topic = m.topic()
                    if topic not in topics:
                        continue
                    before = len(rows)
                    self.ingest.add(rows, m, topics[topic], wants)
                    if len(rows) == before:   # nothing stored from it: its offset is still to be committed
                        self._skipped_positions[(topic, m.partition())] = m.offset() + 1
                if len(self._rows) >= self.opts.flush_rows or \
                        time.monotonic() - self._last_flush >= self.opts.flush_interval:
                    self._flush(consumer)
            self._flush(consumer)
        except Exception:
            log.exception("archiver ingest stopped")
            raise
        finally:
            try:
                consumer.close()
            except Exception:
                pass

    # ----------------------------------------------------------------- commands

    def _command_loop(self) -> None:
        cfg = self._config_consumer
        while self._running:
            try:
                for m in cfg.consume(500, 0):
                    if m.error() is None:
                        self._apply_config(m.key(), m.value())
                msgs = self._commands.consume(100, 0.1)
            except KafkaException as e:
                log.warning("archiver command consumer: %s", e)
                self._stop.wait(0.5)
                continue
            for m in msgs:
                if m.error() is not None:
                    continue
                try:
                    self.handle(m.value())
                except Exception:   # a command must never stop the archiver
                    log.exception("archive command at %s[%d]@%d failed", m.topic(), m.partition(), m.offset())
            self.producer.poll(0)

    def _reply(self, topic: str, reply_id: str, records) -> None:
        for data in records:
            for _ in range(100):
                try:
                    self.producer.produce(topic, data, reply_id.encode(), headers=_MSGPACK_HEADERS)
                    break
                except BufferError:
                    self.producer.poll(0.1)
        self.producer.poll(0)

    def handle(self, raw: bytes) -> None:
        """Run one command and answer it (errors are answered too, whenever a reply address is known)."""
        try:
            cmd = wire.parse_command(raw)
        except wire.ArchiveCommandError as e:
            try:
                doc = json.loads(raw)
                rt, rid = doc.get("reply_topic"), doc.get("reply_id")
            except Exception:
                rt = rid = None
            log.warning("archive command refused: %s", e)
            if isinstance(rt, str) and isinstance(rid, str):
                self._reply(rt, rid, [wire.error_answer(rid, str(e))])
            return
        rid = cmd.reply_id
        try:
            self._reply(cmd.reply_topic, rid, self.answer(cmd))
        except wire.ArchiveCommandError as e:
            self._reply(cmd.reply_topic, rid, [wire.error_answer(rid, str(e))])
        except Exception as e:
            log.exception("archive command %s failed", cmd.command)
            self._reply(cmd.reply_topic, rid, [wire.error_answer(rid, f"{cmd.command} failed: {e}", -2)])

    def answer(self, cmd: wire.ArchiveCommand):
        rid, chunk = cmd.reply_id, self.opts.chunk_bytes
        if cmd.command in ("archive_add", "archive_remove"):
            self._write_config(cmd)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:   # answered once this archiver applies it too
                with self._config_lock:
                    have = set(self.config.patterns), set(self.config.snapshots)
                added = cmd.command == "archive_add"
                if all((p in have[0]) == added for p in cmd.pvs) and all((s in have[1]) == added
                                                                          for s in cmd.snapshots):
                    break
                time.sleep(0.02)
                for m in self._config_consumer.consume(500, 0.05):
                    if m.error() is None:
                        self._apply_config(m.key(), m.value())
            with self._config_lock:
                return [wire.ok_answer(rid, archive=self.config.describe())]
        if cmd.command == "archive_list":
            with self._config_lock:
                return [wire.ok_answer(rid, archive=self.config.describe())]
        if cmd.command == "history":
            cols = drop_republished(self.store.history(cmd.pvs[0], cmd.start_ns, cmd.end_ns,
                                                       self.opts.max_answer_rows + 1))
            if len(cols["pv"]) > self.opts.max_answer_rows:
                raise wire.ArchiveCommandError(
                    f"more than {self.opts.max_answer_rows:,} values of {cmd.pvs[0]} in that range (the archiver's "
                    "--max-answer-rows): ask for a shorter range")
            return wire.event_answers(rid, cols, chunk)
        if cmd.command == "values_at":
            return wire.event_answers(rid, self.store.values_at(list(cmd.pvs), cmd.at_ns), chunk)
        if cmd.command == "snapshot_at":
            its = self.store.iterations(cmd.snapshot, None, cmd.at_ns // 1_000_000, newest_only=True)
            return wire.iteration_answers(rid, its, chunk)
        if cmd.command == "snapshot_iterations":
            start = None if cmd.start_ns is None else cmd.start_ns // 1_000_000
            end = None if cmd.end_ns is None else cmd.end_ns // 1_000_000
            return wire.iteration_answers(rid, self.store.iterations(cmd.snapshot, start, end), chunk)
        raise wire.ArchiveCommandError(f"unknown archive command {cmd.command!r}")
