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
        deadline = time.monotonic() + 15  # metadata follows creation by a moment
        while not set(topics) <= set(admin.client.list_topics(timeout=10).topics):
            assert time.monotonic() < deadline, "created topics never appeared in the metadata"
            time.sleep(0.2)
        assert admin.ensure(topics) == []  # remembered: no second request
    finally:
        for fut in admin.client.delete_topics(topics, operation_timeout=30).values():
            fut.result(30)
