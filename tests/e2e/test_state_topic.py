"""The state topic against real Kafka: read to its end by position, whatever the last offset holds."""
from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from k2eg.gateway import options as O
from k2eg.gateway import state as S
from k2eg.protocol import commands as C
from k2eg.protocol.uri import parse_pv_uri

pytestmark = pytest.mark.e2e


def test_the_state_topic_is_read_to_its_end_when_its_last_offset_holds_no_record(stack):
    """A transactional write ends with a commit marker: the offset before the high watermark is a control
    record no consumer ever sees (as is a record compaction removed). Start-up must not wait for it."""
    topic = f"state-{uuid.uuid4().hex[:10]}"
    opts = O.parse(["--cmd-input-topic", f"cmd-{topic}", "--sub-server-address", stack.bootstrap,
                    "--pub-server-address", stack.bootstrap, "--state-topic", topic], environ={})
    store = S.StateStore(opts)
    store.ensure_topic()
    item = S.MonitorState(C.Monitor(pv=parse_pv_uri("ca://variable:a"), destination="dest"), created_topic=True)
    key, value = S.encode_state(item)
    p = Producer({"bootstrap.servers": stack.bootstrap, "transactional.id": f"tx-{topic}"})
    p.init_transactions(60)
    p.begin_transaction()
    p.produce(topic, value, key)
    p.commit_transaction(60)
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"probe-{topic}"})
    deadline = time.monotonic() + 30
    try:   # the record at 0, the commit marker at 1 (a loaded broker may show them a moment later)
        while (marks := c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)) != (0, 2):
            assert time.monotonic() < deadline, marks
            time.sleep(0.2)
    finally:
        c.close()
    assert store.read(timeout=30) == [(key, value)]
    assert store.load() == [item]
    store.close()
