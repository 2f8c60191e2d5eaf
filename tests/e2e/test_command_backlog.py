"""More commands than the workers can take wait in Kafka, not in the gateway, and every one is answered.

One worker, a backlog of 3 and a 0.3 s connection timeout: a flood of gets of
PVs that do not exist (each its own, so no two share a read) keeps the worker busy for seconds, so the gateway pauses
its command topic and resumes it as the worker catches up.
"""
from __future__ import annotations

import threading
import uuid

import pytest

from k2eg import OperationError
from k2eg.dml import dml

from ..stacks import own_stack

pytestmark = pytest.mark.e2e

TIMEOUT = 0.3
FLOOD = 24


@pytest.fixture(scope="module")
def backlog_stack(tmp_path_factory):
    with own_stack(tmp_path_factory, "backlog", "--pv-connection-timeout", str(TIMEOUT),
                   "--command-workers", "1", "--command-backlog", "3") as s:
        yield s


def test_a_flood_beyond_the_backlog_waits_in_kafka_and_every_command_is_answered(backlog_stack):
    with dml(backlog_stack.environment, f"backlog-{uuid.uuid4().hex[:8]}") as k:
        outcomes: list = []

        def one(i: int) -> None:
            try:
                k.get(f"pva://no:such:pv{i}", timeout=90)
                outcomes.append("value")
            except OperationError as e:
                outcomes.append(e.error)
            except Exception as e:  # a timeout here would be a command lost or never answered
                outcomes.append(repr(e))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(FLOOD)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert outcomes == [-3] * FLOOD  # each one's own "did not connect" reply
        backlog = k.status()["command_backlog"]
        assert backlog["limit"] == 3 and backlog["reads_paused"] >= 1 and backlog["waiting"] == 0
        assert "value" in k.get("pva://variable:a", timeout=10)  # reading went on after the pause
