"""The embedded broker is real Kafka: messages go through it, and it leaves no JVM behind."""
from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from k2eg.stack import kafka as kafka_mod
from k2eg.stack.kafka import KAFKA_VERSION, KafkaBroker, StackError, resolve_classpath
from k2eg.stack.ports import free_port, free_ports


def _jvm_running(config: Path) -> bool:
    """Looks for the JVM by its command line, not by pid: a broker that forked or was re-parented still counts."""
    r = subprocess.run(["pgrep", "-f", f"kafka.Kafka {config}"], capture_output=True, text=True)
    return r.returncode == 0


def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    p.produce(topic, value)
    assert p.flush(60) == 0


def _consume_one(bootstrap: str, topic: str, group: bool = True, deadline_s: float = 60) -> bytes:
    """With ``group=False`` the partition is assigned directly: the data is checked without the group protocol."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        if group:
            c.subscribe([topic])
        else:
            c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            m = c.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, m.error()
            return m.value()
        raise AssertionError(f"no message on {topic}")
    finally:
        c.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as b:
        yield b
    assert not _jvm_running(b.config_path)


def test_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", free_port()))
    finally:
        s.close()


def test_produce_and_consume(broker):
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    topic = f"t-{uuid.uuid4().hex[:8]}"  # auto-created on first produce
    _produce(broker.bootstrap, topic, b"hello")
    assert _consume_one(broker.bootstrap, topic) == b"hello"


def test_classpath_is_cached(monkeypatch):
    first = resolve_classpath()
    assert any(p.name == f"kafka_2.13-{KAFKA_VERSION}.jar" for p in first)
    assert any(p.name.startswith("log4j-slf4j2-impl") for p in first)

    def no_maven(*a, **k):
        raise AssertionError("Maven ran although the classpath is cached")

    monkeypatch.setattr(kafka_mod, "_mvn", no_maven)
    monkeypatch.setattr(kafka_mod.subprocess, "run", no_maven)
    assert resolve_classpath() == first


def test_missing_tools_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(StackError, match=r"Java 17\+ is required"):
        kafka_mod._java()
    with pytest.raises(StackError, match=r"Apache Maven is required"):
        resolve_classpath(tmp_path / "empty-cache")


def test_restart_keeps_address_and_data(tmp_path):
    b = KafkaBroker(tmp_path / "kafka")
    try:
        b.start()
        topic = "kept"
        _produce(b.bootstrap, topic, b"before restart")
        first_pid = b.pid
        b.stop()
        assert not _jvm_running(b.config_path)
        assert b.start() == f"127.0.0.1:{b.port}"
        assert b.pid != first_pid
        assert _consume_one(b.bootstrap, topic, group=False) == b"before restart"
    finally:
        b.stop()
    assert not _jvm_running(b.config_path)


def test_startup_failure_reports_the_log(tmp_path):
    # The port is taken: Kafka cannot bind its listener and exits.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        b = KafkaBroker(tmp_path / "kafka", port=s.getsockname()[1])
        with pytest.raises(StackError, match="exited during startup") as e:
            b.start()
    assert "bind" in str(e.value).lower() or "address already in use" in str(e.value).lower()
    assert not _jvm_running(b.config_path)
