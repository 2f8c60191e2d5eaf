"""Monitor expiry (PROTOCOL 6, issue 7) against a real gateway whose timeout is 3 s.

A monitor stops once no consumer group with an active member has its topic
assigned for the timeout; a client still consuming keeps it alive; the gateway
deletes only a topic it created for the monitor, never a reply topic or a
topic somebody else created. Expiry also removes the monitor from the state
topic, so a restart does not bring it back.
"""
from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from k2eg.gateway.state import monitor_key, reduce_records
from k2eg.protocol.uri import parse_pv_uri, pv_topic

from ..stacks import own_stack
from .test_gateway_commands import fresh_topic, wire  # noqa: F401 (fixture, on this module's stack)
from .test_gateway_restart import Events

pytestmark = pytest.mark.e2e
TIMEOUT = 3
T = 30  # generous bound against hangs; never a timing assertion


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with own_stack(tmp_path_factory, "expiry", "--nc-monitor-expiration-timeout", str(TIMEOUT),
                   "--nc-monitor-consumer-filterout-regex", "archiver-.*") as s:
        yield s


def destinations(wire, uri: str) -> dict:
    entry = next((m for m in wire.status()["monitors"] if m["pv"] == uri), None)
    return {} if entry is None else entry["destinations"]


def wait_gone(wire, uri: str, topic: str, timeout: float = T) -> float:
    """Seconds until ``uri`` no longer feeds ``topic`` according to the gateway's status."""
    start = time.monotonic()
    while topic in destinations(wire, uri):
        assert time.monotonic() - start < timeout, f"{uri} still feeds {topic} after {timeout} s"
        time.sleep(0.5)
    return time.monotonic() - start


def topic_exists(stack, topic: str) -> bool:
    md = AdminClient({"bootstrap.servers": stack.bootstrap}).list_topics(timeout=10)
    return topic in md.topics


def topic_deleted(stack, topic: str, timeout: float = T) -> bool:
    """Eventually gone: the gateway drops the monitor first, then deletes its topic."""
    deadline = time.monotonic() + timeout
    while topic_exists(stack, topic):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def purge_done(wire, topic: str, timeout: float = T) -> bool:
    """The gateway no longer looks at ``topic``: gone after its last deletion, or left in place (logged)."""
    deadline = time.monotonic() + timeout
    while topic in wire.status()["topics_purging"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def state_keys(stack) -> set[bytes]:
    """Keys the state topic holds once compaction is applied."""
    topic = f"{stack.cmd_topic}-gateway-state"
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"probe-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    try:
        high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
        c.assign([TopicPartition(topic, 0, 0)])
        records, deadline = [], time.monotonic() + T
        while len(records) < high and time.monotonic() < deadline:
            records += [(m.key(), m.value()) for m in c.consume(500, 0.2) if m.error() is None]
        return set(reduce_records(records))
    finally:
        c.close()


def test_a_closed_client_s_monitor_expires_a_consuming_one_survives(stack, wire):
    from k2eg.dml import dml

    gone_uri, kept_uri = "ca://channel:ramp:ramp", "pva://pva:counter"
    gone_topic, kept_topic = pv_topic("channel:ramp:ramp"), pv_topic("pva:counter")
    kept_events = Events()
    with dml(stack.environment, f"keeper-{uuid.uuid4().hex[:8]}") as keeper:
        keeper.monitor(kept_uri, kept_events)
        leaver = dml(stack.environment, f"leaver-{uuid.uuid4().hex[:8]}")
        gone_events = Events()
        leaver.monitor(gone_uri, gone_events)
        gone_events.wait(lambda at, name, v: True)
        assert gone_topic in destinations(wire, gone_uri)
        assert monitor_key(parse_pv_uri(gone_uri), gone_topic).encode() in state_keys(stack)
        reply_topic = leaver.reply_topic
        closing = time.monotonic()
        leaver.close()

        wait_gone(wire, gone_uri, gone_topic)
        took = time.monotonic() - closing
        print(f"\nmonitor expired within {took:.1f} s of its client closing (timeout {TIMEOUT} s)")
        assert took >= TIMEOUT, "expired before the timeout had passed without a consumer"
        assert topic_deleted(stack, gone_topic), "the gateway created this topic for the monitor: purged"
        assert purge_done(wire, gone_topic) and not topic_exists(stack, gone_topic)
        assert topic_exists(stack, reply_topic), "a reply topic is never deleted"
        assert monitor_key(parse_pv_uri(gone_uri), gone_topic).encode() not in state_keys(stack)

        # Several timeouts later the consumed monitor still runs and still delivers.
        time.sleep(max(0.0, closing + 4 * TIMEOUT - time.monotonic()))
        assert destinations(wire, kept_uri) == {kept_topic: "msgpack"}
        recent = time.monotonic()
        kept_events.wait(lambda at, name, v: at > recent)
        assert monitor_key(parse_pv_uri(kept_uri), kept_topic).encode() in state_keys(stack)
    # ...until its client goes too.
    wait_gone(wire, kept_uri, kept_topic)


def test_reply_topics_and_topics_the_gateway_did_not_create_are_never_deleted(stack, wire):
    foreign = fresh_topic("foreign")
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(foreign, 1, 1)])[foreign].result(10)
    reply = fresh_topic("reply")
    # A monitor without monitor_dest_topic publishes on the reply topic, which is read by assign (no group).
    assert wire.request({"command": "monitor", "pv_name": "ca://variable:a", "reply_topic": reply})
    assert wire.request({"command": "monitor", "pv_name": "ca://variable:b", "monitor_dest_topic": foreign})
    assert reply in destinations(wire, "ca://variable:a") and foreign in destinations(wire, "ca://variable:b")
    wait_gone(wire, "ca://variable:a", reply)
    wait_gone(wire, "ca://variable:b", foreign)
    assert topic_exists(stack, reply) and topic_exists(stack, foreign)


def test_a_filtered_out_consumer_group_does_not_keep_a_monitor_alive(stack, wire):
    """--nc-monitor-consumer-filterout-regex archiver-.*: such groups are not consumers of a monitor."""
    topic = fresh_topic("archived")
    assert wire.request({"command": "monitor", "pv_name": "ca://channel:counter", "monitor_dest_topic": topic})
    archiver = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"archiver-{uuid.uuid4().hex[:6]}"})
    try:
        archiver.subscribe([topic])
        deadline = time.monotonic() + T
        while not archiver.assignment():
            assert time.monotonic() < deadline, "the archiver was never assigned"
            archiver.poll(0.2)
        wait_gone(wire, "ca://channel:counter", topic)
    finally:
        archiver.close()
    assert topic_deleted(stack, topic)
    assert purge_done(wire, topic)
    assert not topic_exists(stack, topic), "deleted, the topic came back and the gateway stopped purging it"
