"""A slow handler against real Kafka: the client pauses its event topics instead of queueing without bound,
and every event still arrives, in order."""
from __future__ import annotations

import time
import uuid

import msgpack
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from k2eg.dml import dml
from k2eg.protocol.codec import HEADER

pytestmark = pytest.mark.e2e

EVENTS = 3000
HIGH = 100          # the handler queue's bound in this test (the default is 10,000)
POLL_BATCH = 501    # records one poll of the event consumer can hand over at once


def test_a_slow_handler_pauses_the_event_topics_and_every_event_arrives(stack, app_name):
    topic = f"flood-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})   # kept alive until its future is done
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    got: list[int] = []

    def slow(rec: dict) -> None:
        time.sleep(0.001)
        got.append(rec["seq"])

    with dml(stack.environment, app_name) as k:
        t = k._t
        t.queue_high = HIGH
        t.subscribe(topic, lambda _topic, rec: t.call_soon(slow, rec))
        assert t.wait_assigned(topic, 60)
        p = Producer({"bootstrap.servers": stack.bootstrap, "linger.ms": 5})
        for i in range(EVENTS):
            p.produce(topic, msgpack.packb({"seq": i, "pad": "x" * 200}), headers=[(HEADER, b"Msgpack")])
        assert p.flush(30) == 0
        deadline = time.monotonic() + 180
        while len(got) < EVENTS and time.monotonic() < deadline:
            time.sleep(0.1)
        assert got == list(range(EVENTS))       # nothing dropped, nothing repeated, in order
        assert t.pauses >= 1                    # it paused behind the handler...
        while t.paused and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not t.paused                     # ...and resumed once it caught up
        assert t.backlog_peak <= HIGH + POLL_BATCH, t.backlog_peak
        assert t.backlog() == (0, 0)
