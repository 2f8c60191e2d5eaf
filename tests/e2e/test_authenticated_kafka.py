"""Issue 8: the whole stack behind a broker that requires a SCRAM-SHA-256 login over TLS (SASL_SSL).

Real broker, real demo IOC, real gateway process, our client: commands work
through the secured listener, and a wrong or missing login is a clear error
at start instead of a hang.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from k2eg.client.errors import KafkaUnavailable
from k2eg.client.errors import KafkaAuthenticationFailed
from k2eg.dml import dml
from k2eg.stack.runner import CLIENT_USER, GATEWAY_USER, Stack

from ..stacks import own_stack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    with own_stack(tmp_path_factory, "secured-stack", secure=True) as s:
        yield s


@pytest.fixture
def env_of(secured, tmp_path, monkeypatch):
    """Point the client at an environment file: the stack's own, or one with the login replaced."""
    def use(**replace: str | None) -> str:
        lines = secured.env_file.read_text().splitlines()
        if not replace:
            monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(secured.env_dir))
            return secured.environment
        kept = [ln for ln in lines if ln.split("=", 1)[0] not in replace]
        kept += [f"{k}={v}" for k, v in replace.items() if v is not None]
        name = f"variant-{uuid.uuid4().hex[:6]}"
        (tmp_path / f"{name}.ini").write_text("\n".join(kept) + "\n")
        monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(tmp_path))
        return name
    return use


def test_get_put_monitor_through_sasl_ssl(secured, env_of):
    assert secured.security.protocol == "SASL_SSL" and secured.security.mechanism == "SCRAM-SHA-256"
    with dml(env_of(), f"auth-{uuid.uuid4().hex[:6]}") as k:
        assert k.get("ca://variable:a", timeout=20)["value"] is not None
        k.put("ca://variable:b", 4.25, timeout=20)
        assert k.get("pva://variable:b", timeout=20)["value"] == pytest.approx(4.25)
        seen: list[float] = []
        two = threading.Event()

        def on_update(name: str, value: dict) -> None:
            seen.append(value["value"])
            if len(seen) >= 2:
                two.set()

        k.monitor("ca://channel:counter", on_update, timeout=20)
        assert two.wait(60), f"monitor delivered {seen}"
        k.stop_monitor("channel:counter")


def test_wrong_password_fails_the_client_at_once(env_of):
    name = env_of(**{"kafka.sasl.password": "not-the-password"})
    t0 = time.monotonic()
    with pytest.raises(KafkaAuthenticationFailed) as e:
        dml(name, "wrong-password", startup_timeout=30)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "authentication failed" in msg and CLIENT_USER in msg and f"{name}.ini" in msg, msg
    assert "not-the-password" not in msg
    assert isinstance(e.value, KafkaUnavailable)  # existing handlers of an unusable Kafka still catch it
    assert took < 20, f"took {took:.1f} s: the refusal must end the start-up, not the timeout"


def test_anonymous_client_is_refused(env_of):
    name = env_of(**{"kafka.security.protocol": None, "kafka.sasl.mechanism": None, "kafka.sasl.username": None,
                     "kafka.sasl.password": None, "kafka.ssl.ca.location": None})
    with pytest.raises(KafkaUnavailable, match="(?s)cannot reach Kafka.*security.protocol") as e:
        dml(name, "anonymous", startup_timeout=4)
    assert not isinstance(e.value, KafkaAuthenticationFailed)  # no login was even tried


def test_untrusted_ca_is_refused(env_of, tmp_path):
    """TLS really verifies the broker: a CA that did not sign its certificate fails the start-up."""
    from k2eg.stack.kafka import make_certificates

    other_ca, _ = make_certificates(tmp_path / "other-tls")
    name = env_of(**{"kafka.ssl.ca.location": str(other_ca)})
    with pytest.raises(KafkaUnavailable, match="certificate verify failed"):
        dml(name, "untrusted", startup_timeout=4)


def _gateway(secured: Stack, password: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = secured._gateway_env()
    for key in ("EPICS_K2EG_PUB_IMPL_KV", "EPICS_K2EG_SUB_IMPL_KV"):
        env[key] = "\n".join(f"sasl.password:{password}" if ln.startswith("sasl.password:") else ln
                             for ln in env[key].splitlines())
    cmd = [*secured.gateway_command()]
    cmd[cmd.index("--sub-group-id") + 1] = f"wrong-{uuid.uuid4().hex[:6]}"  # never disturb the stack's gateway
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_wrong_password_stops_the_gateway_with_a_message(secured):
    t0 = time.monotonic()
    r = _gateway(secured, "not-the-password")
    took = time.monotonic() - t0
    assert r.returncode != 0, r.stderr[-2000:]
    assert "authentication failed" in r.stderr and GATEWAY_USER in r.stderr, r.stderr[-2000:]
    assert "k2eg gateway ready" not in r.stderr
    assert "not-the-password" not in r.stderr
    assert took < 60, f"took {took:.1f} s"


def test_unreachable_broker_stops_the_gateway_with_a_message():
    """Not a gateway that looks alive while librdkafka retries for ever: exit 1 naming the broker, bounded."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"  # nobody listens once the block ends
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "k2eg.gateway", "--cmd-input-topic", "nobody-cmd",
                        "--sub-server-address", address, "--pub-server-address", address],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"Kafka at {address}" in r.stderr and "no Kafka broker answered within 30 s" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 90


def test_passwords_stay_out_of_process_listings(secured):
    secrets = list(secured.security.users.values())
    for pid in (secured.gateway_pid, secured.kafka.pid):
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        assert not any(p in cmdline for p in secrets), f"a password is visible in the command line of pid {pid}"
    assert (os.stat(secured.env_file).st_mode & 0o077) == 0
    assert (os.stat(secured.kafka.config_path).st_mode & 0o077) == 0


def test_logins_survive_a_broker_restart(secured, env_of):
    """SCRAM users live in the KRaft metadata: a restarted broker (same data) still accepts both logins.

    Last in this module: it takes the broker down under the gateway.
    """
    secured.stop_kafka()
    secured.start_kafka()
    with dml(env_of(), f"after-restart-{uuid.uuid4().hex[:6]}", startup_timeout=30) as k:
        deadline = time.monotonic() + 90
        while True:  # the gateway reconnects on its own, with its own login
            try:
                assert k.get("ca://variable:a", timeout=5)["value"] is not None
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
    assert secured.gateway_pid is not None
