"""TopicAdmin against the session's real broker."""
from __future__ import annotations

import time
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


def test_exists_and_delete_including_a_topic_already_gone(stack):
    admin = TopicAdmin({"bootstrap.servers": stack.bootstrap})
    name = f"purged-{uuid.uuid4().hex[:8]}"
    assert not admin.exists(name)          # and asking did not create it
    assert admin.ensure([name]) == [name] and admin.exists(name)
    admin.delete(name)
    deadline = time.monotonic() + 30        # the broker serves the deletion a moment later
    while admin.exists(name):
        assert time.monotonic() < deadline, f"{name} still listed 30 s after its deletion"
        time.sleep(0.1)
    admin.delete(name)                     # gone already: counts as deleted, no error
    assert admin.missing([name]) == [name]  # forgotten: a new monitor creates it again
