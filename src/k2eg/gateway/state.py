"""What the gateway must keep across restarts: its monitors and repeating snapshots.

They live in a compacted Kafka topic owned by the gateway (``--state-topic``),
one record per monitor destination (PV, topic) and per repeating snapshot.
A stop or an expiry writes a tombstone for the same key, so compaction leaves
exactly what is active. At start the gateway reads the topic to its end and
resumes what it finds, without replies (nobody asked) and through the same
hub, so no PV gets a second subscription.

Records are the commands themselves in their wire form (without reply
address), so replay validates them with the same parser as live commands.

Assumption: one gateway per state topic. Several gateways sharing one would
resume each other's monitors; give each its own ``--state-topic``.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import ConfigResource

from k2eg.protocol import commands as C
from k2eg.protocol.codec import HEADER, decode
from k2eg.protocol.uri import PVUri
from k2eg.transport import TopicAdmin

from .options import Options

log = logging.getLogger("k2eg.gateway.state")

VERSION = 1


# ----------------------------------------------------------------------------- records (pure)

@dataclass(frozen=True)
class MonitorState:
    """One monitor destination: ``pv``'s events go to ``command.destination``."""

    command: C.Monitor
    created_topic: bool = False   # the gateway created the destination for this monitor: it may delete it

    @property
    def key(self) -> str:
        return monitor_key(self.command.pv, self.command.destination)


@dataclass(frozen=True)
class SnapshotState:
    command: C.RepeatingSnapshot

    @property
    def key(self) -> str:
        return snapshot_key(self.command.snapshot_name)


State = MonitorState | SnapshotState


class StateError(ValueError):
    """A state record that cannot be resumed; replay logs and skips it."""


def monitor_key(pv: PVUri, topic: str) -> str:
    return json.dumps(["monitor", pv.protocol, pv.name, topic], separators=(",", ":"))


def snapshot_key(name: str) -> str:
    return json.dumps(["snapshot", name], separators=(",", ":"))


def _anonymous(cmd: C.Command) -> C.Command:
    """The command without its reply address: a resumed command answers nobody."""
    return replace(cmd, reply_topic=None, reply_id=None)


def encode_state(item: State) -> tuple[bytes, bytes]:
    """(key, value) of a state record."""
    doc = {"version": VERSION, "command": C.to_wire(_anonymous(item.command))}
    if isinstance(item, MonitorState):
        doc["created_topic"] = item.created_topic
    return item.key.encode(), json.dumps(doc, separators=(",", ":")).encode()


def decode_state(value: bytes) -> State:
    """A state record's value back into what to resume; StateError says why it cannot be."""
    try:
        doc = json.loads(value)
    except (ValueError, TypeError, RecursionError) as e:
        raise StateError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("command"), dict):
        raise StateError("not a state record (no 'command' object)")
    if doc.get("version") != VERSION:
        raise StateError(f"unknown state record version {doc.get('version')!r}")
    try:
        # Commands that need a reply topic get a stand-in for the parser; it is dropped right after.
        cmd = C.parse_command(json.dumps({**doc["command"], "reply_topic": "k2eg-resumed"}))
    except C.CommandError as e:
        raise StateError(f"invalid command: {e.message}") from None
    cmd = _anonymous(cmd)
    if isinstance(cmd, C.Monitor):
        return MonitorState(cmd, doc.get("created_topic") is True)
    if isinstance(cmd, C.RepeatingSnapshot):
        return SnapshotState(cmd)
    raise StateError(f"a '{cmd.name}' command is not kept in the state topic")


def reduce_records(records: Iterable[tuple[bytes | None, bytes | None]]) -> dict[bytes, bytes]:
    """What compaction would leave: the latest value per key, keys whose latest record is a tombstone removed."""
    latest: dict[bytes, bytes] = {}
    for key, value in records:
        if key is None:
            continue
        if value is None:
            latest.pop(key, None)
        else:
            latest.pop(key, None)   # re-insert: the order of resumption follows the order of the latest writes
            latest[key] = value
    return latest


def decode_all(latest: dict[bytes, bytes]) -> list[State]:
    """Decode a reduced state; a record that cannot be resumed is logged and skipped."""
    out: list[State] = []
    for key, value in latest.items():
        try:
            item = decode_state(value)
        except StateError as e:
            log.warning("state record %s skipped: %s", key[:200], e)
            continue
        if item.key.encode() != key:
            log.warning("state record %s skipped: its content belongs to key %s", key[:200], item.key[:200])
            continue
        out.append(item)
    return out


def iteration_of(value: bytes | None, header: bytes | None) -> int | None:
    """The ``iter_index`` of a repeating-snapshot record, or None when it has none."""
    if value is None:
        return None
    try:
        doc = decode(value, header)
    except Exception:
        return None
    it = doc.get("iter_index") if isinstance(doc, dict) else None
    return it if isinstance(it, int) and not isinstance(it, bool) and it > 0 else None


# ----------------------------------------------------------------------------- Kafka

class StateStore:
    """The state topic: created compacted, read once at start, written on every change."""

    def __init__(self, opts: Options):
        self.topic = opts.state_topic
        rdkafka = {"logger": logging.getLogger("k2eg.gateway.rdkafka")}  # the gateway's throttled librdkafka log
        self._sub = {"bootstrap.servers": opts.sub_server_address, **rdkafka, **opts.kv("sub")}
        pub = {"bootstrap.servers": opts.pub_server_address, **rdkafka, **opts.kv("pub")}
        self._admin = TopicAdmin(pub)
        # Its own producer: state records need tombstones (null values), no k2eg header, and acks from all replicas.
        self._producer = Producer({**pub, "acks": "all", "linger.ms": 0})
        self._group = f"{opts.sub_group_id}-state-{uuid.uuid4().hex[:8]}"   # assign only: never joins or commits
        self.lost = 0

    def _consumer(self, eof: bool = False) -> Consumer:
        return Consumer({**self._sub, "group.id": self._group, "enable.auto.commit": False,
                         "enable.partition.eof": eof, "auto.offset.reset": "earliest"})

    def ensure_topic(self, timeout: float = 30.0) -> None:
        """Create the state topic compacted; an existing one that is not compacted is only warned about."""
        if self._admin.ensure([self.topic], timeout, config={"cleanup.policy": "compact"}):
            log.info("created state topic %s (compacted)", self.topic)
            return
        try:
            res = ConfigResource(ConfigResource.Type.TOPIC, self.topic)
            configs = self._admin.client.describe_configs([res], request_timeout=timeout)[res].result(timeout)
            policy = configs.get("cleanup.policy")
            if policy is not None and "compact" not in policy.value:
                log.warning("state topic %s has cleanup.policy=%s, not compact: stopped monitors' records "
                            "are kept until retention removes them", self.topic, policy.value)
        except KafkaException as e:
            log.warning("cannot read the configuration of state topic %s: %s", self.topic, e)

    def read(self, timeout: float = 60.0) -> list[tuple[bytes | None, bytes | None]]:
        """Every record of the state topic, up to the end it had when reading started.

        The end is a position, not a record: the last offsets below the high watermark may hold
        no record any more (compacted away, or a transaction marker), so a partition is read once
        the consumer's position reaches the high watermark or librdkafka reports its end.
        """
        c = self._consumer(eof=True)
        try:
            md = c.list_topics(self.topic, timeout=timeout).topics.get(self.topic)
            if md is None or md.error is not None:
                raise KafkaException(md.error if md is not None else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
            ends: dict[int, int] = {}
            for p in md.partitions:
                low, high = c.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout)
                if high > low:
                    ends[p] = high
            if not ends:
                return []
            c.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
            records: list[tuple[bytes | None, bytes | None]] = []
            deadline = time.monotonic() + timeout
            while ends:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"state topic {self.topic} not read to its end within {timeout:g} s")
                for m in c.consume(1000, 0.5):
                    if m.error() is None:
                        records.append((m.key(), m.value()))
                    elif m.error().code() == KafkaError._PARTITION_EOF:
                        ends.pop(m.partition(), None)
                    else:
                        log.warning("reading state topic %s: %s", self.topic, m.error())
                for tp in c.position([TopicPartition(self.topic, p) for p in ends]):
                    if tp.offset >= ends[tp.partition]:
                        del ends[tp.partition]
            return records
        finally:
            c.close()

    def load(self, stopping: Callable[[], bool] = lambda: False, retry: float = 2.0) -> list[State]:
        """The state to resume, read to the end before the gateway serves; retried while Kafka does not answer."""
        while True:
            try:
                self.ensure_topic()
                records = self.read()
                break
            except (KafkaException, TimeoutError) as e:
                if stopping():
                    return []
                log.error("cannot read state topic %s (retrying in %g s): %s", self.topic, retry, e)
                time.sleep(retry)
        states = decode_all(reduce_records(records))
        log.info("state topic %s: %d records, %d to resume", self.topic, len(records), len(states))
        return states

    def last_iteration(self, topic: str, timeout: float = 10.0) -> int:
        """The highest ``iter_index`` at the end of a snapshot topic (0 when there is none), so a resumed
        snapshot continues its numbering."""
        c = self._consumer()
        best = 0
        try:
            md = c.list_topics(topic, timeout=timeout).topics.get(topic)
            if md is None or md.error is not None:
                return 0
            for p in md.partitions:
                tp = TopicPartition(topic, p)
                low, high = c.get_watermark_offsets(tp, timeout=timeout)
                if high <= low:
                    continue
                c.assign([TopicPartition(topic, p, high - 1)])
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    m = c.poll(0.5)
                    if m is None or m.error() is not None:
                        continue
                    header = next((v for k, v in (m.headers() or []) if k == HEADER), None)
                    best = max(best, iteration_of(m.value(), header) or 0)
                    break
        except KafkaException as e:
            log.warning("cannot read the last iteration of %s: %s", topic, e)
        finally:
            c.close()
        return best

    # -- writes
    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.lost += 1
            log.error("state record %s to %s lost: %s", (msg.key() or b"")[:200], msg.topic(), err)

    def write(self, items: Iterable[State] = (), removed: Iterable[str] = (), timeout: float = 10.0) -> None:
        """Record ``items`` and tombstone the keys ``removed``; waits for the broker (the caller replies after)."""
        n = 0
        for item in items:
            key, value = encode_state(item)
            self._produce(key, value)
            n += 1
        for key in removed:
            self._produce(key.encode(), None)
            n += 1
        if n and self._producer.flush(timeout):
            log.error("state topic %s: records not delivered within %g s", self.topic, timeout)

    def _produce(self, key: bytes, value: bytes | None) -> None:
        for _ in range(100):
            try:
                self._producer.produce(self.topic, value, key, on_delivery=self._delivered)
                return
            except BufferError:
                self._producer.poll(0.1)
        self.lost += 1
        log.error("state record %s dropped: producer queue full", key[:200])

    def close(self) -> None:
        left = self._producer.flush(5)
        if left:
            log.error("%d state records not delivered at shutdown", left)
