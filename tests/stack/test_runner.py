"""The stack orchestration: parts start in order, stop cleanly, restart in place, and the CLI finds them again.

The gateway is a stand-in script here (the real one has its own tests); Kafka is real.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from k2eg.stack.kafka import StackError, _alive
from k2eg.stack.runner import CMD_TOPIC, Stack, read_state

FAKE_GATEWAY = textwrap.dedent("""
    import os, signal, sys, time
    print("args", " ".join(sys.argv[1:]), file=sys.stderr, flush=True)
    print("ca", os.environ.get("EPICS_CA_ADDR_LIST"), file=sys.stderr, flush=True)
    if os.environ.get("FAKE_GATEWAY_FAIL"):
        print("cannot reach the broker", file=sys.stderr, flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print("k2eg gateway ready: consuming", file=sys.stderr, flush=True)
    while True:
        time.sleep(1)
""")


class FakeIOC:
    """Stands in for DemoIOC: the orchestration only needs its lifecycle and client_env()."""

    def __init__(self, work_dir: Path, bulk: int = 0):
        self.work_dir = Path(work_dir)
        self.bulk = bulk
        self.running = False
        self.pid = None
        self.starts = 0

    def start(self, timeout: float = 30):
        self.running = True
        self.starts += 1
        return self

    def stop(self) -> None:
        self.running = False

    def client_env(self) -> dict[str, str]:
        return {"EPICS_CA_ADDR_LIST": "127.0.0.1:15064", "EPICS_CA_AUTO_ADDR_LIST": "NO"}


@pytest.fixture
def fake_gateway(tmp_path) -> list[str]:
    script = tmp_path / "fake_gateway.py"
    script.write_text(FAKE_GATEWAY)
    return [sys.executable, str(script)]


def _topics(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics)


def _jvm_running(config: Path) -> bool:
    return subprocess.run(["pgrep", "-f", f"kafka.Kafka {config}"], capture_output=True).returncode == 0


def test_stack_starts_restarts_parts_and_stops(tmp_path, fake_gateway):
    stack = Stack(tmp_path / "stack", gateway_args=["--log-level", "debug"], gateway_cmd=fake_gateway,
                  ioc_factory=FakeIOC)
    try:
        stack.start()
        bootstrap = stack.bootstrap
        assert stack.environment == "local" and stack.cmd_topic == CMD_TOPIC
        assert (stack.env_dir / "local.ini").read_text() == (
            f"[DEFAULT]\nkafka_broker_url={bootstrap}\nk2eg_cmd_topic={CMD_TOPIC}\n")
        env = stack.client_env()
        assert env["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] == str(stack.env_dir)
        assert env["EPICS_CA_ADDR_LIST"] == "127.0.0.1:15064"
        assert CMD_TOPIC in _topics(bootstrap)
        log = stack.gateway_log.read_text()
        assert f"--cmd-input-topic {CMD_TOPIC} --sub-server-address {bootstrap}" in log
        assert "--log-level debug" in log and "ca 127.0.0.1:15064" in log
        assert stack.failed() is None

        pid = stack.gateway_pid
        stack.stop_gateway()
        assert stack.gateway_pid is None and not _alive(pid)
        stack.start_gateway()
        assert stack.gateway_pid not in (None, pid)

        stack.stop_kafka()
        assert not _jvm_running(stack.kafka.config_path)
        stack.start_kafka()
        assert stack.bootstrap == bootstrap
        assert CMD_TOPIC in _topics(bootstrap)  # same data dir

        stack.stop_ioc()
        stack.start_ioc()
        assert stack.ioc.starts == 2
    finally:
        stack.stop()
    assert not _jvm_running(stack.kafka.config_path)
    assert stack.gateway_pid is None and not stack.ioc.running


def test_external_kafka_is_used_not_managed(tmp_path, fake_gateway):
    from k2eg.stack.kafka import KafkaBroker

    with KafkaBroker(tmp_path / "kafka") as broker:
        with Stack(tmp_path / "stack", kafka_bootstrap=broker.bootstrap, gateway_cmd=fake_gateway,
                   ioc_factory=FakeIOC) as stack:
            assert stack.kafka is None and stack.bootstrap == broker.bootstrap
            assert CMD_TOPIC in _topics(broker.bootstrap)
            stack.stop_kafka()  # not ours: a no-op
            assert broker.running
    assert not (tmp_path / "stack" / "kafka").exists()


def test_gateway_failure_is_reported_and_nothing_is_left(tmp_path, fake_gateway, monkeypatch):
    monkeypatch.setenv("FAKE_GATEWAY_FAIL", "1")
    stack = Stack(tmp_path / "stack", gateway_cmd=fake_gateway, ioc_factory=FakeIOC)
    with pytest.raises(StackError, match="(?s)exited during startup with code 3.*cannot reach the broker"):
        stack.start()
    assert not _jvm_running(stack.kafka.config_path)
    assert not stack.ioc.running


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "k2eg.stack", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_cli_start_env_stop(tmp_path, fake_gateway):
    state_dir = tmp_path / "stack"
    gw = " ".join(fake_gateway)
    r = _cli("start", "--state-dir", str(state_dir), "--gateway-command", gw)
    try:
        assert r.returncode == 0, r.stderr
        assert "k2eg local stack is ready" in r.stdout
        st = read_state(state_dir)
        assert st is not None
        pids = [st["pid"], st["kafka"]["pid"], st["ioc"]["pid"], st["gateway"]["pid"], st["archiver"]["pid"]]
        assert all(p and _alive(p) for p in pids)
        assert st["archiver"]["http"].startswith("http://127.0.0.1:") and "archiver" in r.stdout
        assert Path(st["env_file"]).read_text().startswith("[DEFAULT]\nkafka_broker_url=127.0.0.1:")

        env = _cli("env", "--state-dir", str(state_dir))
        assert env.returncode == 0, env.stderr
        exported = dict(line[len("export "):].split("=", 1) for line in env.stdout.splitlines()
                        if line.startswith("export "))
        assert exported["K2EG_PYTHON_CONFIGURATION_PATH_FOLDER"] == st["env_dir"]
        assert exported["EPICS_CA_ADDR_LIST"] == st["client_env"]["EPICS_CA_ADDR_LIST"]

        again = _cli("start", "--state-dir", str(state_dir), "--gateway-command", gw)
        assert again.returncode == 0 and "already running" in again.stderr
    finally:
        stop = _cli("stop", "--state-dir", str(state_dir))
    assert stop.returncode == 0, stop.stderr
    assert not any(_alive(p) for p in pids)
    assert read_state(state_dir) is None
    assert _cli("env", "--state-dir", str(state_dir)).returncode == 1


def test_cli_run_stops_everything_on_sigint(tmp_path, fake_gateway):
    state_dir = tmp_path / "stack"
    proc = subprocess.Popen(
        [sys.executable, "-m", "k2eg.stack", "run", "--state-dir", str(state_dir),
         "--gateway-command", " ".join(fake_gateway)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        end = time.monotonic() + 300
        while (st := read_state(state_dir)) is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < end, "the stack never became ready"
            time.sleep(0.2)
        pids = [st["kafka"]["pid"], st["ioc"]["pid"], st["gateway"]["pid"]]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopping" in out
    assert not any(_alive(p) for p in pids)
    assert not (state_dir / "stack.json").exists()
    json.dumps(st)  # the state file is plain JSON
