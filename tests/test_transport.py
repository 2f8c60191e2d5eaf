"""TopicAdmin against the session's real broker."""
from __future__ import annotations

import uuid

import pytest

from k2eg import transport
from k2eg.transport import TopicAdmin

pytestmark = pytest.mark.e2e


def test_ensure_creates_more_topics_than_one_request_may_carry(stack):
    admin = TopicAdmin({"bootstrap.servers": stack.bootstrap})
    prefix = f"chunk-{uuid.uuid4().hex[:8]}"
    topics = [f"{prefix}-{i}" for i in range(transport.CREATE_CHUNK * 2 + 7)]
    try:
        made = admin.ensure(topics)
        assert sorted(made) == sorted(topics)
        # ensure() returns once the broker serves them, not when the controller accepted them
        served = admin.client.list_topics(timeout=10).topics
        for t in topics:
            assert t in served and served[t].error is None, t
            assert all(p.leader >= 0 for p in served[t].partitions.values()), t
        assert admin.ensure(topics) == []  # remembered: no second request
    finally:
        for fut in admin.client.delete_topics(topics, operation_timeout=30).values():
            fut.result(30)


def test_asking_after_a_topic_does_not_create_it(stack):
    """PROTOCOL 1: only explicit creation; a metadata request must not auto-create."""
    admin = TopicAdmin({"bootstrap.servers": stack.bootstrap})
    name = f"absent-{uuid.uuid4().hex[:8]}"
    asked = admin.client.list_topics(name, timeout=10).topics
    assert name not in asked or asked[name].error is not None
    assert name not in admin.client.list_topics(timeout=10).topics
