"""The put journal: a put is applied at most once, even across ``kill -9``, and always answered.

The gateway commits a command's offset only once the command is handled
(``commits.py``), so a gateway that dies runs its unfinished commands again
on the next start. That is harmless for a get, not for a put (a relative
move, a counter, a pulse). So before a put goes to EPICS the gateway writes
*started* to a compacted topic of its own and waits for the broker's
acknowledgement (acks=all); once the put's outcome is known it writes
*finished* with that outcome, acknowledged too, and only then replies. A
gateway that reads a put command again (its predecessor died before
committing it) finds it in the journal: a finished put is answered with its
recorded result, a started one with an error saying that its outcome is
unknown. Neither is written to EPICS again.

Records are keyed by the command's position (consumer group, command topic,
partition, offset), which names one command; the value carries a digest of
the command, so an entry never answers a different command at a reused
position (a command topic deleted and created again). Once the group has
committed past a position, no gateway of the group reads that command
again: the entry leaves memory and gets a tombstone, which compaction
removes. Memory is so bounded by the commands not yet committed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from k2eg.protocol import commands as C
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.transport import TopicAdmin

from .commits import Position
from .options import Options

log = logging.getLogger("k2eg.gateway.journal")

VERSION = 1
WRITE_TIMEOUT_S = 10.0   # longest a put waits for the broker to acknowledge a journal record
READ_TIMEOUT_S = 60.0    # reading the journal at an assignment, before it is tried again
# Compaction keeps one record per key; tombstones and the records they replace go within about an hour,
# so a gateway reading the journal at start reads about an hour of puts at most.
TOPIC_CONFIG = {"cleanup.policy": "compact", "segment.ms": "3600000", "delete.retention.ms": "3600000",
                "min.cleanable.dirty.ratio": "0.1"}
UNKNOWN = ErrorCode.EPICS_FAILED  # the code of "outcome unknown" replies (README: Commands after a stop or crash)


# ----------------------------------------------------------------------------- records (pure)

@dataclass(frozen=True)
class Entry:
    """What the journal says about one put: started, or finished with the reply it got."""

    digest: str
    finished: bool = False
    error: int = 0
    message: str = ""


class JournalError(ValueError):
    """A journal record that cannot be read; it is skipped."""


def put_digest(cmd: C.Put) -> str:
    """Identifies a put command's content (PV, value, reply address)."""
    return hashlib.blake2b(C.to_json(cmd), digest_size=12).hexdigest()


def entry_key(group: str, topic: str, at: Position) -> bytes:
    return json.dumps(["put", group, topic, at[0], at[1]], separators=(",", ":")).encode()


def position_of(key: bytes | None, group: str, topic: str) -> Position | None:
    """The command position of a journal key when it belongs to this group and command topic, else None."""
    try:
        kind, g, t, partition, offset = json.loads(key or b"")
    except (ValueError, TypeError):
        return None
    if kind != "put" or g != group or t != topic or not isinstance(partition, int) or not isinstance(offset, int):
        return None
    return partition, offset


def encode_entry(entry: Entry) -> bytes:
    doc = {"version": VERSION, "state": "finished" if entry.finished else "started", "digest": entry.digest}
    if entry.finished:
        doc.update(error=entry.error, message=entry.message)
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_entry(value: bytes) -> Entry:
    try:
        doc = json.loads(value)
    except (ValueError, TypeError, RecursionError) as e:
        raise JournalError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise JournalError(f"not a version {VERSION} journal record")
    state, digest = doc.get("state"), doc.get("digest")
    if state not in ("started", "finished") or not isinstance(digest, str):
        raise JournalError(f"unknown state {state!r} or no digest")
    if state == "started":
        return Entry(digest)
    error, message = doc.get("error"), doc.get("message")
    if not isinstance(error, int) or not isinstance(message, str):
        raise JournalError("a finished record without its error code and message")
    return Entry(digest, True, error, message)


def unknown_outcome(uri: str, topic: str) -> ProtocolError:
    """The answer to a put that a gateway started and never finished: it may or may not have been applied."""
    return ProtocolError(UNKNOWN, f"outcome of the put of {uri} is unknown: a gateway stopped while applying it "
                                  f"(put journal {topic}); it was not written again: read the PV to see its value")


class Ledger:
    """The journal's entries for the command positions this gateway may still read (pure)."""

    def __init__(self) -> None:
        self.entries: dict[int, dict[int, Entry]] = {}   # partition -> offset -> entry

    def __len__(self) -> int:
        return sum(map(len, self.entries.values()))

    def replay(self, records: Iterable[tuple[bytes | None, bytes | None]], group: str, topic: str,
               starts: dict[int, int]) -> list[Position]:
        """Take in the journal as read from Kafka, for partitions ``starts`` (partition -> the first offset the
        group will read). Returns the positions it holds below those offsets: committed, to be tombstoned.

        An entry this gateway finished itself is not set back to started by a record read before its own
        "finished" was acknowledged (a rebalance during a put).
        """
        stale: set[Position] = set()
        for p, start in starts.items():
            self.committed(p, start)
        for key, value in records:
            at = position_of(key, group, topic)
            if at is None or at[0] not in starts:
                continue
            if at[1] < starts[at[0]]:
                if value is not None:
                    stale.add(at)
                else:
                    stale.discard(at)
                continue
            entries = self.entries.setdefault(at[0], {})
            if value is None:
                entries.pop(at[1], None)
                continue
            try:
                entry = decode_entry(value)
            except JournalError as e:
                log.warning("put journal record %s skipped: %s", key[:200] if key else key, e)
                continue
            old = entries.get(at[1])
            if old is None or not old.finished or old.digest != entry.digest:
                entries[at[1]] = entry
        return sorted(stale)

    def forget(self, partitions: Iterable[int]) -> None:
        """These command partitions are no longer this gateway's: their entries leave memory (not the topic)."""
        for p in partitions:
            self.entries.pop(p, None)

    def get(self, at: Position, digest: str) -> Entry | None:
        """The entry of the command at ``at``; None when there is none, or it is another command's."""
        entry = self.entries.get(at[0], {}).get(at[1])
        if entry is not None and entry.digest != digest:
            log.warning("put journal entry at partition %d offset %d belongs to another command (was the command "
                        "topic created again?): ignored", *at)
            return None
        return entry

    def set(self, at: Position, entry: Entry) -> None:
        self.entries.setdefault(at[0], {})[at[1]] = entry

    def committed(self, partition: int, next_offset: int) -> list[Position]:
        """The group committed ``partition`` up to ``next_offset``: entries below it leave; returns them."""
        entries = self.entries.get(partition)
        if not entries:
            return []
        gone = [o for o in entries if o < next_offset]
        for o in gone:
            del entries[o]
        return [(partition, o) for o in gone]


# ----------------------------------------------------------------------------- Kafka

def read_to_end(consumer: Consumer, topic: str, timeout: float) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of ``topic`` up to the end it had when reading started. The end is known by position
    (partition EOF), not by the last offset: compaction may have removed the record there. The consumer
    needs ``enable.partition.eof``."""
    md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if md is None or md.error is not None:
        raise KafkaException(md.error if md is not None else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    ends: set[int] = set()
    for p in md.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
        if high > low:
            ends.add(p)
    if not ends:
        return []
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    records: list[tuple[bytes | None, bytes | None]] = []
    deadline = time.monotonic() + timeout
    while ends:
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic} not read to its end within {timeout:g} s")
        for m in consumer.consume(1000, 0.5):
            err = m.error()
            if err is None:
                records.append((m.key(), m.value()))
            elif err.code() == KafkaError._PARTITION_EOF:
                ends.discard(m.partition())
            else:
                log.warning("reading %s: %s", topic, err)
    return records


class PutJournal:
    """The journal topic (``--put-journal-topic``): read at each assignment of command partitions, written
    twice per put, tombstoned as the group commits."""

    def __init__(self, opts: Options, stopping: Callable[[], bool] = lambda: False):
        self.topic = opts.put_journal_topic
        self._stopping = stopping
        self.group, self.cmd_topic = opts.sub_group_id, opts.cmd_input_topic
        rdkafka = {"logger": logging.getLogger("k2eg.gateway.rdkafka")}
        self._sub = {"bootstrap.servers": opts.sub_server_address, **rdkafka, **opts.kv("sub")}
        pub = {"bootstrap.servers": opts.pub_server_address, **rdkafka, **opts.kv("pub")}
        self._admin = TopicAdmin(pub)
        # acks from all replicas; idempotence keeps a put's records in order across retries (started before finished).
        self._producer = Producer({**pub, "acks": "all", "enable.idempotence": True, "linger.ms": 0,
                                   "message.timeout.ms": int(WRITE_TIMEOUT_S * 1000)})
        self.ledger = Ledger()
        self._lock = threading.Lock()
        self.unknown = 0     # puts answered "outcome unknown" (metrics, logs)
        self.answered = 0    # puts answered again from a finished entry

    # The command consumer's partition events (KafkaIO.partitions), on its thread.
    def assigned(self, starts: dict[int, int], retry: float = 2.0) -> None:
        """Command partitions assigned (``starts``: partition -> first offset to read): the journal is read to
        its end before any of their commands runs; retried while Kafka does not answer."""
        while True:
            try:
                self._admin.ensure([self.topic], 30.0, config=TOPIC_CONFIG)
                c = Consumer({**self._sub, "group.id": f"{self.group}-journal", "enable.auto.commit": False,
                              "enable.partition.eof": True, "auto.offset.reset": "earliest"})
                try:
                    records = read_to_end(c, self.topic, READ_TIMEOUT_S)
                finally:
                    c.close()
                break
            except (KafkaException, TimeoutError) as e:
                if self._stopping():
                    return
                log.error("cannot read put journal %s (retrying in %g s): %s", self.topic, retry, e)
                time.sleep(retry)
        with self._lock:
            stale = self.ledger.replay(records, self.group, self.cmd_topic, starts)
            held = {p: len(self.ledger.entries.get(p, {})) for p in starts}
        self._tombstone(stale)
        log.info("put journal %s: %d records read, %d puts of partitions %s not committed yet", self.topic,
                 len(records), sum(held.values()), sorted(starts))

    def apply(self, at: Position, cmd: C.Put, put: Callable[[], str]) -> str:
        """Apply a put at most once: ``put()`` (its success message, or ProtocolError) runs only if this command
        never started before. Returns the message of the reply; raises the ProtocolError of an error reply."""
        digest = put_digest(cmd)
        with self._lock:
            known = self.ledger.get(at, digest)
        if known is not None:
            if not known.finished:
                self.unknown += 1
                log.warning("put %s at partition %d offset %d was started by a gateway that stopped: answered "
                            "'outcome unknown', not written again", cmd.pv.uri, *at)
                raise unknown_outcome(cmd.pv.uri, self.topic)
            self.answered += 1
            log.info("put %s at partition %d offset %d was finished before: answered with its recorded result",
                     cmd.pv.uri, *at)
            if known.error:
                raise ProtocolError(known.error, known.message)
            return known.message
        why = self._write(at, Entry(digest))
        if why is not None:
            failed = ProtocolError(ErrorCode.EPICS_FAILED, f"put of {cmd.pv.uri} not applied: the put journal "
                                                           f"{self.topic} cannot be written: {why}")
            self._finish(at, Entry(digest, True, failed.code, failed.message), wait=False)
            raise failed
        try:
            message = put()
        except ProtocolError as e:
            self._finish(at, Entry(digest, True, e.code, e.message))
            raise
        except Exception as e:  # answered with the same words the journal keeps
            failed = ProtocolError(ErrorCode.EPICS_FAILED, f"put failed: {type(e).__name__}: {e}")
            self._finish(at, Entry(digest, True, failed.code, failed.message))
            raise failed from e
        self._finish(at, Entry(digest, True, 0, message))
        return message

    def _finish(self, at: Position, entry: Entry, wait: bool = True) -> None:
        """Record a put's outcome; a failure to do so is logged, never raised: the outcome is answered anyway."""
        why = self._write(at, entry, wait)
        if why is not None:
            log.error("put journal %s: the outcome of the put at partition %d offset %d is not recorded (%s); "
                      "should this gateway stop before committing it, the put is answered 'outcome unknown'",
                      self.topic, at[0], at[1], why)

    def _write(self, at: Position, entry: Entry, wait: bool = True) -> str | None:
        """Write an entry (memory and Kafka); None once the broker acknowledged it, else why not."""
        with self._lock:
            self.ledger.set(at, entry)
        done = threading.Event()
        result: list = []

        def delivered(err, _msg) -> None:
            result.append(err)
            done.set()

        try:
            self._producer.produce(self.topic, encode_entry(entry), entry_key(self.group, self.cmd_topic, at),
                                   on_delivery=delivered)
        except (BufferError, KafkaException) as e:
            return str(e)
        if not wait:
            self._producer.poll(0)
            return None
        deadline = time.monotonic() + WRITE_TIMEOUT_S
        while not done.is_set():   # any waiting thread's poll serves every delivery report
            left = deadline - time.monotonic()
            if left <= 0:
                return f"not acknowledged within {WRITE_TIMEOUT_S:g} s"
            self._producer.poll(min(left, 0.05))
        return None if result[0] is None else result[0].str()

    def revoked(self, partitions: list[int]) -> None:
        with self._lock:
            self.ledger.forget(partitions)

    def committed(self, offsets: dict[int, int]) -> None:
        """The group committed these command partitions up to these offsets."""
        with self._lock:
            gone = [at for p, o in offsets.items() for at in self.ledger.committed(p, o)]
        self._tombstone(gone)

    def _tombstone(self, positions: list[Position]) -> None:
        for at in positions:
            try:
                self._producer.produce(self.topic, None, entry_key(self.group, self.cmd_topic, at))
            except (BufferError, KafkaException) as e:  # the entry stays in the topic; the next start drops it again
                log.warning("put journal %s: tombstone of partition %d offset %d not written: %s",
                            self.topic, at[0], at[1], e)
        if positions:
            self._producer.poll(0)

    def close(self, timeout: float = 5.0) -> None:
        left = self._producer.flush(timeout)
        if left:
            log.error("put journal %s: %d records not delivered at shutdown", self.topic, left)
