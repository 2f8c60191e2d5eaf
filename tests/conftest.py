"""Session fixtures: one real local stack (Apache Kafka, demo IOC, gateway) for the whole run."""
from __future__ import annotations

import uuid

import pytest

from .stacks import own_stack

BULK = 200  # bulk:000..bulk:199 for snapshot and scale tests


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    with own_stack(tmp_path_factory, "stack", bulk=BULK) as s:
        yield s


@pytest.fixture
def app_name():
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def k(stack, app_name):
    """Our client, connected to the session stack."""
    from k2eg.dml import dml

    with dml(stack.environment, app_name) as client:
        yield client
