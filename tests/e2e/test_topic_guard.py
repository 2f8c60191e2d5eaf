"""Topics a sender names, against real Kafka: never the gateway's own or Kafka's internal ones, a bounded
number of reply topics created, and a reply topic deleted from outside created again."""
from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from ..stacks import extra_gateway
from .test_gateway_commands import WAIT, Wire, fresh_topic, wire  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e


def status_counters(wire: Wire) -> dict:
    return wire.status()["commands"]


@pytest.mark.parametrize("dest, why", [("{cmd}", "command topic"), ("{cmd}-gateway-state", "state topic"),
                                       ("{cmd}-gateway-status", "status topic"),
                                       ("__consumer_offsets", "Kafka internal topic")])
def test_a_monitor_destination_of_the_gateway_or_of_kafka_is_refused_naming_why(wire, stack, dest, why):
    dest = dest.format(cmd=stack.cmd_topic)
    rec = wire.request({"command": "monitor", "pv_name": "pva://variable:a", "monitor_dest_topic": dest})
    assert rec.value["error"] == -1 and why in rec.value["message"] and dest in rec.value["message"], rec.value
    assert not any(m["destinations"].get(dest) for m in wire.status()["monitors"])


def test_a_snapshot_publishing_on_the_command_topic_is_refused(wire, stack):
    rec = wire.request({"command": "repeating_snapshot", "snapshot_name": stack.cmd_topic.upper(),
                        "pv_name_list": ["pva://variable:a"], "time_window_msec": 100})
    assert rec.value["error"] == -1 and "command topic" in rec.value["message"], rec.value


def test_a_reply_to_the_command_topic_is_not_written_but_counted(wire, stack):
    before = status_counters(wire).get("reply_topic_refused", 0)
    rid = uuid.uuid4().hex
    wire.send({"command": "get", "pv_name": "pva://variable:a", "reply_topic": stack.cmd_topic, "reply_id": rid})
    deadline = time.monotonic() + WAIT
    while status_counters(wire).get("reply_topic_refused", 0) < before + 1:
        assert time.monotonic() < deadline, "the refused reply topic was not counted"
        time.sleep(0.2)
    with wire.reader(stack.cmd_topic) as r:   # every command so far, and no reply among them
        r.wait(lambda rs: any(rid.encode() in (x.raw or b"") for x in rs), what="the get itself")
        assert not [x for x in r.records if x.ser is not None], "a reply landed on the command topic"


def test_reply_topics_created_are_capped_and_an_existing_one_is_still_answered(stack):
    cmd = fresh_topic("cmd-cap")
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    with extra_gateway(stack.bootstrap, cmd, "--max-reply-topics", "2") as gw:
        w = Wire(stack.bootstrap, cmd)
        for _ in range(2):
            assert w.request({"command": "status"}).value["error"] == 0
        over = fresh_topic("reply-over")
        w.send({"command": "status", "reply_topic": over, "reply_id": "over"})
        theirs = fresh_topic("reply-theirs")
        admin.create_topics([NewTopic(theirs, 1, 1)])[theirs].result(10)
        rec = w.request({"command": "status", "reply_topic": theirs})   # exists already: no creation needed
        deadline = time.monotonic() + WAIT
        while rec.value["status"]["commands"]["reply_topic_refused"] < 1:   # "over" may be handled after it
            assert time.monotonic() < deadline, "the reply topic over the cap was not counted"
            rec = w.request({"command": "status", "reply_topic": theirs})
        assert over not in admin.list_topics(timeout=10).topics
        assert "--max-reply-topics" in "".join(gw["log"]) and over in "".join(gw["log"])


@pytest.fixture(scope="module")
def strict_kafka(tmp_path_factory):
    """A broker that never creates a topic by itself (auto.create.topics.enable=false), as many sites run."""
    from k2eg.stack.kafka import KafkaBroker

    class Strict(KafkaBroker):
        def server_properties(self) -> str:
            return super().server_properties() + "auto.create.topics.enable=false\n"

    broker = Strict(tmp_path_factory.mktemp("strict-kafka"))
    broker.start(timeout=300)   # a loaded shared machine can take minutes
    yield broker
    broker.stop()


def test_a_reply_topic_deleted_from_outside_is_created_again(strict_kafka):
    cmd, reply = fresh_topic("cmd-del"), fresh_topic("reply-del")
    admin = AdminClient({"bootstrap.servers": strict_kafka.bootstrap})
    with extra_gateway(strict_kafka.bootstrap, cmd):
        w = Wire(strict_kafka.bootstrap, cmd)
        assert w.request({"command": "status", "reply_topic": reply}).value["error"] == 0
        admin.delete_topics([reply])[reply].result(10)
        deadline = time.monotonic() + WAIT
        while reply in admin.list_topics(timeout=10).topics:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # The first reply after the deletion may be lost (it tells the gateway the topic is gone); later ones arrive.
        lost = 0
        with w.reader(reply) as r:
            while True:
                rid = uuid.uuid4().hex
                w.send({"command": "status", "reply_topic": reply, "reply_id": rid})
                try:
                    r.reply(rid, timeout=5)
                    break
                except AssertionError:
                    lost += 1
                    assert time.monotonic() < deadline + WAIT, f"no reply after the deletion ({lost} lost)"
        assert lost <= 1, lost
        w.producer.flush(10)
        del w.producer   # before the broker stops, so it does not log reconnect attempts
