"""The gateway's Kafka adapter: command consumer, publisher, topic admin.

It turns Kafka into two calls for the rest of the gateway: an iterator of
raw command payloads and ``publish(topic, key, record)``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from k2eg.protocol.codec import encode, header_value
from k2eg.protocol.commands import Serialization
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.transport import TopicAdmin

from .options import Options

log = logging.getLogger("k2eg.gateway.kafka")


class KafkaIO:
    def __init__(self, opts: Options, on_delivery_error: Callable[[str], None] | None = None):
        pub = {"bootstrap.servers": opts.pub_server_address, "linger.ms": 2,
               "queue.buffering.max.messages": 500_000, "queue.buffering.max.kbytes": 512 * 1024,
               "message.max.bytes": 16 << 20, "enable.idempotence": False}
        pub.update(opts.kv("pub"))
        sub = {"bootstrap.servers": opts.sub_server_address, "group.id": opts.sub_group_id,
               "auto.offset.reset": "latest", "enable.auto.commit": True, "auto.commit.interval.ms": 1000,
               "fetch.wait.max.ms": 10, "session.timeout.ms": 10_000, "heartbeat.interval.ms": 1000}
        sub.update(opts.kv("sub"))
        self.cmd_topic = opts.cmd_input_topic
        self.producer = Producer(pub)
        self.admin = TopicAdmin({k: v for k, v in pub.items() if not k.startswith(("linger", "queue.", "enable.idem"))})
        self._sub_config = sub
        self.consumer: Consumer | None = None
        self.assigned = threading.Event()
        self.dropped = 0
        self.published = 0        # records and bytes handed to librdkafka (metrics)
        self.published_bytes = 0
        self.latency = None       # a prometheus Histogram when metrics are on
        self._on_delivery_error = on_delivery_error
        self._running = True
        self._running_consumer = True
        self._poller = threading.Thread(target=self._poll_loop, name="k2eg-producer-poll", daemon=True)
        self._poller.start()

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
    def _delivery(self, err, msg) -> None:
        if err is None:
            if self.latency is not None:
                self.latency.observe(msg.latency() or 0.0)
            return
        if err is not None:
            self.dropped += 1
            log.error("record to %s lost: %s", msg.topic(), err)
            if self._on_delivery_error:
                self._on_delivery_error(msg.topic())

    def _poll_loop(self) -> None:
        while self._running:
            self.producer.poll(0.1)

    def publish(self, topic: str, key: str | bytes | None, record: dict,
                ser: Serialization = Serialization.MSGPACK, value_key: str | None = None) -> None:
        self.publish_bytes(topic, key, encode(record, ser, value_key), ser)

    def publish_bytes(self, topic: str, key, payload: bytes, ser: Serialization) -> None:
        headers = header_value(ser)
        for attempt in range(200):
            try:
                self.producer.produce(topic, payload, key, headers=headers, on_delivery=self._delivery)
                self.published += 1
                self.published_bytes += len(payload)
                return
            except BufferError:
                # Local queue full: give librdkafka a moment to drain, bounded.
                self.producer.poll(0.05)
        self.dropped += 1
        log.error("producer queue full for 10 s: record to %s dropped", topic)

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
        consumer.assign(partitions)
        self.assigned.set()

    def commands(self, batch: int = 200) -> Iterator[bytes | None]:
        """Raw command payloads until ``stop``; yields None when idle."""
        self.admin.ensure([self.cmd_topic])
        self.consumer = Consumer(self._sub_config)
        self.consumer.subscribe([self.cmd_topic], on_assign=self._on_assign)
        try:
            while self._running and self._running_consumer:
                # Wait for one record, then take what is already there: consume(n, t)
                # alone would hold every command for up to t unless n had arrived.
                first = self.consumer.poll(0.2)
                if first is None:
                    yield None
                    continue
                msgs = [first, *self.consumer.consume(batch - 1, 0)]
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("command consumer: %s", err)
                        continue
                    yield m.value()
        finally:
            try:
                self.consumer.close()  # closed by the thread that polls it
            except Exception as e:
                log.warning("closing command consumer: %s", e)

    def stop_consuming(self) -> None:
        self._running_consumer = False

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Flush and stop the producer; call after the command loop has ended."""
        self._running = False
        left = self.producer.flush(flush_timeout)
        if left:
            log.error("%d records not delivered at shutdown", left)
        self._poller.join(1.0)
