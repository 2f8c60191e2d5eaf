"""Real stacks for tests: the session's shared one, and private ones for modules that kill or restart parts."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

GATEWAY_ARGS = ("--pv-connection-timeout", "2", "--log-level", "info")


@contextlib.contextmanager
def own_stack(tmp_path_factory, name: str = "stack", *gateway_args: str, bulk: int = 0, **options) -> Iterator:
    """Kafka, demo IOC and gateway on ports of their own; ``dml`` environments point at it meanwhile.

    ``gateway_args`` come after the test defaults (a short PV connection
    timeout), so a module can override them.
    """
    from k2eg.stack.runner import Stack

    s = Stack(tmp_path_factory.mktemp(name), bulk=bulk, gateway_args=[*GATEWAY_ARGS, *gateway_args], **options)
    old = os.environ.get("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER")
    try:
        s.start()
        os.environ["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] = str(s.env_dir)
        yield s
    finally:
        if old is None:
            os.environ.pop("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", None)
        else:
            os.environ["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] = old
        s.stop()
