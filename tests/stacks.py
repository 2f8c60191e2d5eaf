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


def app_with_a_small_reply_topic(stack, app_name: str) -> str:
    """An app name whose reply topic takes the records of ``pva://variable:a`` and error records
    (~450 bytes) but not one carrying ``pva://pva:image``'s value: its limit sits halfway between
    the two records' sizes, measured through a normal topic (both get the same batch overhead)."""
    import msgpack
    from confluent_kafka.admin import AdminClient, NewTopic

    from k2eg.dml import dml

    def record(k, uri: str) -> int:
        name = uri.split("://", 1)[1]
        return len(msgpack.packb({"error": 0, "reply_id": "x" * 36, name: k.get(uri, timeout=10)}))

    with dml(stack.environment, app_name) as k:
        image, small = record(k, "pva://pva:image"), max(600, record(k, "pva://variable:a"))
    assert image - small > 150, (image, small)
    name = f"{app_name}-small"
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(f"{name}-reply", 1, 1, config={"max.message.bytes": str((image + small) // 2)})])[
        f"{name}-reply"].result(10)
    return name


@contextlib.contextmanager
def extra_gateway(bootstrap: str, cmd_topic: str, *args: str, env: dict | None = None,
                  group: str | None = None) -> Iterator[dict]:
    """A gateway on the Kafka at ``bootstrap``, reading its own ``cmd_topic``, with ``args`` (``env``: a
    stack's ``client_env()``, for its IOC); yields ``{"proc", "log"}`` (its stderr lines) once it is ready."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "k2eg.gateway", "--cmd-input-topic", cmd_topic, "--sub-server-address",
         bootstrap, "--pub-server-address", bootstrap, "--sub-group-id", group or f"{cmd_topic}-group",
         "--pv-connection-timeout", "2", *args],
        env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump():
        for line in proc.stderr:
            lines.append(line)
            if "k2eg gateway ready" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(60), "".join(lines[-20:])
        yield {"proc": proc, "log": lines}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
