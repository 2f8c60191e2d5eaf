"""Session fixtures: one real local stack (Apache Kafka, demo IOC, gateway) for the whole run."""
from __future__ import annotations

import os
import uuid

import pytest

BULK = 200  # bulk:000..bulk:199 for snapshot and scale tests


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    from k2eg.stack.runner import Stack

    s = Stack(tmp_path_factory.mktemp("stack"), bulk=BULK,
              gateway_args=["--pv-connection-timeout", "2", "--log-level", "info"])
    s.start()
    old = os.environ.get("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER")
    os.environ["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] = str(s.env_dir)
    yield s
    if old is None:
        os.environ.pop("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", None)
    else:
        os.environ["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] = old
    s.stop()


@pytest.fixture
def app_name():
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def k(stack, app_name):
    """Our client, connected to the session stack."""
    from k2eg.dml import dml

    with dml(stack.environment, app_name) as client:
        yield client
