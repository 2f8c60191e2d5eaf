"""KafkaIO's publish paths against real librdkafka producers whose broker is unreachable.

Nothing is mocked: a producer pointed at a closed port queues records until its
bounded local queue is full, which is exactly the overload the side table is for.
"""
from __future__ import annotations

import logging
import socket
import time

import pytest
from confluent_kafka import KafkaError

from k2eg.gateway import kafka
from k2eg.gateway import options as O
from k2eg.protocol.codec import header_value
from k2eg.protocol.commands import Serialization

MSGPACK = Serialization.MSGPACK


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_io(*kv: str, topics_per_producer: int = 1000) -> kafka.KafkaIO:
    addr = f"127.0.0.1:{closed_port()}"
    argv = ["--cmd-input-topic", "cmd", "--sub-server-address", addr, "--pub-server-address", addr]
    for item in ("log_level:0", *kv):  # log_level 0: no librdkafka connection noise in the test output
        argv += ["--pub-impl-kv", item]
    return kafka.KafkaIO(O.parse(argv, environ={}), topics_per_producer=topics_per_producer)


@pytest.fixture
def io():
    made: list[kafka.KafkaIO] = []

    def make(*kv: str, topics_per_producer: int = 1000) -> kafka.KafkaIO:
        made.append(make_io(*kv, topics_per_producer=topics_per_producer))
        return made[-1]

    yield make
    for x in made:
        x.stop(flush_timeout=0)


def wait_until(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_full_queue_keeps_only_the_newest_event_per_topic_and_key(io):
    k = io("queue.buffering.max.messages:2")
    for i in range(2):
        k.publish_event("t1", "pv:a", b"queued%d" % i, MSGPACK)
    assert k.published == 2 and k.pending == 0
    for i in range(5):                      # no room: the side table keeps the newest of pv:a only
        k.publish_event("t1", "pv:a", b"a%d" % i, MSGPACK)
    k.publish_event("t1", "pv:b", b"b0", MSGPACK)
    k.publish_event("t2", "pv:a", b"other-topic", MSGPACK)   # same key, other topic: its own slot
    assert k.pending == 3
    assert k._pending[("t1", "pv:a")] == (b"a4", MSGPACK)
    assert k.coalesced == 4 and k.dropped == 4
    assert list(k._pending) == [("t1", "pv:a"), ("t1", "pv:b"), ("t2", "pv:a")]  # first come, first retried
    assert k.queue_depth() >= 2 + 3   # librdkafka also counts its undelivered error events


def test_side_table_goes_out_when_the_queue_frees_and_failures_are_counted(io):
    """Records time out against the absent broker (counted), the freed room takes the side table."""
    k = io("queue.buffering.max.messages:2", "message.timeout.ms:500")
    k.publish_event("t1", "pv:a", b"1", MSGPACK)
    k.publish_event("t1", "pv:b", b"1", MSGPACK)
    k.publish_event("t1", "pv:a", b"2", MSGPACK)
    k.publish_event("t1", "pv:a", b"3", MSGPACK)
    assert k.pending == 1 and k.coalesced == 1
    assert wait_until(lambda: k.pending == 0), "the poll thread never retried the side table"
    assert k.published == 3                      # 1, 1, then the newest of pv:a
    assert wait_until(lambda: k.delivery_failed == 3)
    assert k.dropped == 1 + 3


def test_events_go_behind_pending_ones_so_a_pv_never_goes_backwards(io):
    k = io("queue.buffering.max.messages:1")
    k.publish_event("t", "pv:a", b"1", MSGPACK)
    k.publish_event("t", "pv:b", b"1", MSGPACK)          # no room: pending
    assert k.pending == 1
    k.publish_event("t", "pv:a", b"2", MSGPACK)          # room or not, it must queue behind pv:b
    assert k.pending == 2 and k.published == 1


def test_a_reply_waits_bounded_for_room_and_its_loss_is_counted_and_logged(io, monkeypatch, caplog):
    monkeypatch.setattr(kafka, "REPLY_BLOCK_S", 0.3)
    k = io("queue.buffering.max.messages:1")
    k.publish_bytes("reply", "k", b"first", MSGPACK)
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="k2eg.gateway.kafka"):
        k.publish_bytes("reply", "k", b"second", MSGPACK)
    assert 0.3 <= time.monotonic() - t0 < 5
    assert k.published == 1 and k.dropped == 1 and k.coalesced == 0
    assert "record to reply dropped" in caplog.text


def test_replies_and_events_use_separate_queues(io):
    """A monitor flood filling the event queue leaves room for replies."""
    k = io("queue.buffering.max.messages:3")
    for i in range(10):
        k.publish_event("events", f"pv:{i}", b"x", MSGPACK)
    assert k.pending == 7
    k.publish_bytes("reply", "k", b"answer", MSGPACK)
    assert k.dropped == 0 and k.published == 3 + 1


def topics_per_producer(k: kafka.KafkaIO) -> list[int]:
    return [sum(1 for q in k._route.values() if q is p) for p in k.events]


def test_each_event_producer_takes_a_share_of_the_topics_in_order_of_first_use(io):
    k = io(topics_per_producer=50)
    for i in range(200):
        k.publish_event(f"topic-{i}", "pv", b"x", MSGPACK)
    first = k._shard("topic-0")
    k.publish_event("topic-0", "pv", b"again", MSGPACK)   # a topic stays with its producer
    assert k._shard("topic-0") is first is k.events[0]
    assert topics_per_producer(k) == [50, 50, 50, 50]


def test_topics_beyond_the_last_producer_are_shared_round_robin(io, monkeypatch):
    monkeypatch.setattr(kafka, "MAX_EVENT_PRODUCERS", 3)
    k = io(topics_per_producer=2)
    for i in range(12):
        k.publish_event(f"t{i}", "pv", b"x", MSGPACK)
    assert topics_per_producer(k) == [4, 4, 4]


def test_operator_options_apply_to_every_producer(io):
    k = io("queue.buffering.max.messages:1", topics_per_producer=1)
    k._shard("t0"), k._shard("t1")
    for p in k.producers:                       # each one refuses a second record
        topic = next(t for t in (f"t{i}" for i in range(100)) if p in (k.replies, k.reported) or k._shard(t) is p)
        p.produce(topic, b"x")
        with pytest.raises(BufferError):
            p.produce(topic, b"y")


def test_header_lists_are_shared_per_serialisation():
    assert header_value(MSGPACK) is header_value(MSGPACK)
    assert header_value(Serialization.JSON) == [("k2eg-ser-type", b"Json")]


class _Queue:
    """A producer's queue as publish() sees it (a real one counts librdkafka's error events too)."""

    def __init__(self):
        self.records: list[str] = []

    def produce(self, topic, value, key=None, headers=None, on_delivery=None):
        self.records.append(topic)

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=0):
        return 0

    def __len__(self):
        return len(self.records)


def test_only_records_whose_verdict_is_awaited_are_reported_one_by_one(io):
    """Replies report failures only; a snapshot record (on_settled) or the latency metric needs every report."""
    k = io()
    k.replies, k.reported = _Queue(), _Queue()
    k.publish("reply", "k", {"error": 0})
    k.publish("snapshot", "k", {"error": 0}, on_settled=lambda: None)
    k.latency = object()  # the metric is on
    k.publish("measured", "k", {"error": 0})
    assert (k.replies.records, k.reported.records) == (["reply"], ["snapshot", "measured"])


def test_a_reply_is_sent_at_once_only_to_a_known_topic_with_room_in_the_configured_queue(io):
    """A library callback thread may publish only what cannot wait: an operator's lower bound counts."""
    k = io("queue.buffering.max.messages:4")
    k.replies, k.reported = _Queue(), _Queue()
    assert not k.publishes_at_once(["t"])  # not created yet: the reply would create it
    k.admin._known.add("t")
    assert k.publishes_at_once(["t"])
    k.publish("t", "k", {"error": 0})
    k.publish("t", "k", {"error": 0})
    assert not k.publishes_at_once(["t"])  # half of 4 queued


@pytest.mark.parametrize("code", [KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
                                  KafkaError.UNKNOWN_TOPIC_OR_PART])
def test_a_delivery_failure_for_a_deleted_topic_makes_the_admin_forget_it(io, code):
    """The next ensure() asks the broker again instead of trusting its cache (deleted from outside)."""
    k = io()
    k.admin._known.update({"gone", "other"})

    class Msg:
        def topic(self):
            return "gone"

        def value(self):
            return b"x"

    k._event_failed(KafkaError(code), Msg())
    k._failed("other", 1, KafkaError(KafkaError._MSG_TIMED_OUT))   # another failure: nothing forgotten
    assert k.admin.missing(["gone", "other"]) == ["gone"]
