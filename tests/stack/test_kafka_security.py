"""A secured embedded broker: SASL logins (and TLS) are really required, and a refused login is named at once.

The SCRAM-over-TLS broker is exercised end to end in tests/e2e/test_authenticated_kafka.py;
here a PLAIN broker without TLS covers the other listener kind, plus the pure parts.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from k2eg.stack.kafka import BROKER_USER, KafkaBroker, Security, StackError, make_certificates
from k2eg.client.environment import load as load_environment
from k2eg.stack.runner import CLIENT_USER, GATEWAY_USER, Stack, read_state
from k2eg.transport import KafkaAccessError, KafkaAuthenticationError, check_credentials

from .test_runner import FAKE_GATEWAY, FakeIOC, _cli

QUIET = {"log_level": 0}  # librdkafka's retries of refused logins would flood the test output


# ---------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("kwargs, text", [
    ({"mechanism": "GSSAPI", "users": {"a": "b"}}, "not supported"),
    ({"users": {}}, "at least one user"),
    ({"users": {BROKER_USER: "x"}}, "reserved"),
    ({"users": {"alice": 'pa"ss'}}, "quotes"),
    ({"users": {"alice": "a,b"}}, "commas"),
    ({"users": {"al ice": "x"}}, "spaces"),
])
def test_bad_security_is_refused_with_the_reason(kwargs, text):
    with pytest.raises(ValueError, match=text):
        Security(**kwargs)


def test_secured_properties_leave_no_open_client_port(tmp_path):
    """Only the loopback controller listener is PLAINTEXT; inter-broker traffic logs in too."""
    b = KafkaBroker(tmp_path, port=19001, controller_port=19002,
                    security=Security("SCRAM-SHA-512", {"alice": "alice-pw"}, tls=True))
    props = dict(line.split("=", 1) for line in b.server_properties().splitlines() if not line.startswith("#"))
    assert props["listeners"] == "SASL_SSL://127.0.0.1:19001,CONTROLLER://127.0.0.1:19002"
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
    assert props["inter.broker.listener.name"] == "SASL_SSL"
    assert props["sasl.enabled.mechanisms"] == props["sasl.mechanism.inter.broker.protocol"] == "SCRAM-SHA-512"
    assert f'username="{BROKER_USER}"' in props["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    assert props["ssl.keystore.type"] == "PEM"
    # SCRAM users are added when the storage is formatted, the broker's own login included
    args = b._scram_args()
    assert "SCRAM-SHA-512=[name=alice,password=alice-pw]" in args and args.count("--add-scram") == 2
    assert b.client_config("alice") == {
        "bootstrap.servers": "127.0.0.1:19001", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "alice", "sasl.password": "alice-pw", "ssl.ca.location": str(tmp_path / "tls" / "ca.pem")}
    with pytest.raises(KeyError, match="alice"):
        b.client_config("bob")


def test_plaintext_default_is_unchanged(tmp_path):
    b = KafkaBroker(tmp_path, port=19003, controller_port=19004)
    assert "listeners=PLAINTEXT://127.0.0.1:19003,CONTROLLER://127.0.0.1:19004" in b.server_properties()
    assert "sasl" not in b.server_properties() and b._scram_args() == []
    assert b.client_config() == {"bootstrap.servers": "127.0.0.1:19003"}


def test_certificates_chain_to_the_ca_and_name_loopback(tmp_path):
    ca, broker = make_certificates(tmp_path / "tls")
    assert (broker.stat().st_mode & 0o077) == 0  # the broker's private key is in there
    assert "PRIVATE KEY" in broker.read_text() and "CERTIFICATE" in broker.read_text()
    r = subprocess.run(["openssl", "verify", "-CAfile", str(ca), "-verify_ip", "127.0.0.1", str(broker)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert make_certificates(tmp_path / "tls") == (ca, broker)  # made once: clients keep trusting the CA


def test_secured_stack_hands_out_logins_without_argv(tmp_path, monkeypatch):
    """The client gets its login in a private .ini, the gateway in its environment; neither in a command line."""
    monkeypatch.setenv("EPICS_K2EG_PUB_IMPL_KV", "linger.ms:5")
    s = Stack(tmp_path, secure=True, ioc_factory=FakeIOC, gateway_args=["--log-level", "debug"])
    users = s.security.users
    assert set(users) == {GATEWAY_USER, CLIENT_USER} and users[GATEWAY_USER] != users[CLIENT_USER]
    path = s.write_env_file()
    text = path.read_text()
    assert (path.stat().st_mode & 0o077) == 0
    assert f"kafka.sasl.password={users[CLIENT_USER]}" in text and "kafka.security.protocol=SASL_SSL" in text
    assert f"kafka.ssl.ca.location={s.kafka.ca_path}" in text
    env = s._gateway_env()
    pub = env["EPICS_K2EG_PUB_IMPL_KV"].splitlines()
    assert f"sasl.username:{GATEWAY_USER}" in pub and f"sasl.password:{users[GATEWAY_USER]}" in pub
    assert pub[-1] == "linger.ms:5"  # the user's own settings come last, so they still apply
    assert f"sasl.password:{users[GATEWAY_USER]}" in env["EPICS_K2EG_SUB_IMPL_KV"].splitlines()
    assert not any(users[GATEWAY_USER] in a or users[CLIENT_USER] in a for a in s.gateway_command())
    assert s.describe()["security"]["mechanism"] == "SCRAM-SHA-256"
    assert users[CLIENT_USER] not in str(s.describe())


def test_secured_stack_refuses_settings_it_would_lose(tmp_path):
    with pytest.raises(StackError, match="EPICS_K2EG_PUB_IMPL_KV"):
        Stack(tmp_path, secure=True, ioc_factory=FakeIOC, gateway_args=["--pub-impl-kv", "linger.ms:5"])
    with pytest.raises(StackError, match="own broker"):
        Stack(tmp_path, secure=True, ioc_factory=FakeIOC, kafka_bootstrap="127.0.0.1:9092")


def test_unreachable_broker_is_a_bounded_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # nobody listens once the block ends
    t0 = time.monotonic()
    with pytest.raises(KafkaAccessError, match=f"(?s){address}.*no Kafka broker answered within 1.5 s") as e:
        check_credentials({"bootstrap.servers": address}, timeout=1.5)
    assert not isinstance(e.value, KafkaAuthenticationError)
    assert time.monotonic() - t0 < 15  # bounded, not librdkafka's endless retries


def test_invalid_settings_are_named():
    with pytest.raises(KafkaAccessError, match="invalid Kafka settings"):
        check_credentials({"bootstrap.servers": "127.0.0.1:1", "security.protocol": "CARRIER_PIGEON"}, timeout=1)


# ---------------------------------------------------------------------------- a PLAIN broker without TLS


@pytest.fixture(scope="module")
def plain_broker(tmp_path_factory):
    b = KafkaBroker(tmp_path_factory.mktemp("kafka-plain"),
                    security=Security("PLAIN", {"alice": "alice-pw", "bob": "bob-pw"}, tls=False))
    with b:
        yield b


def test_plain_login_produces_and_consumes(plain_broker):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    p = Producer({**plain_broker.client_config("alice"), **QUIET})
    p.produce(topic, b"hello")
    assert p.flush(60) == 0
    c = Consumer({**plain_broker.client_config("bob"), **QUIET, "group.id": f"g-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest"})
    try:
        c.subscribe([topic])
        end = time.monotonic() + 60
        while time.monotonic() < end:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                assert m.value() == b"hello"
                break
        else:
            raise AssertionError("nothing consumed through the SASL listener")
    finally:
        c.close()


def test_wrong_password_is_named_at_once(plain_broker):
    config = {**plain_broker.client_config("alice"), "sasl.password": "not-the-password"}
    t0 = time.monotonic()
    with pytest.raises(KafkaAuthenticationError, match="(?i)authentication") as e:
        check_credentials(config, timeout=30)
    assert "alice" in str(e.value) and "PLAIN" in str(e.value)
    assert "not-the-password" not in str(e.value)
    assert time.monotonic() - t0 < 20  # at the first refusal, not after the timeout
    check_credentials(plain_broker.client_config("bob"), timeout=30)  # the right one passes


def test_anonymous_client_is_refused(plain_broker):
    with pytest.raises(KafkaAccessError):
        check_credentials({"bootstrap.servers": plain_broker.bootstrap}, timeout=3)


# ---------------------------------------------------------------------------- the command line


@pytest.fixture
def fake_gateway(tmp_path) -> list[str]:
    """test_runner's stand-in gateway: the real one has its own secured test in tests/e2e."""
    script = tmp_path / "fake_gateway.py"
    script.write_text(FAKE_GATEWAY)
    return [sys.executable, str(script)]


def test_cli_start_secure_hands_the_client_a_working_login(tmp_path, fake_gateway, monkeypatch):
    """``k2eg-stack --secure start`` reaches the background runner; its environment file logs in for real."""
    state_dir = tmp_path / "stack"
    r = _cli("--secure", "start", "--state-dir", str(state_dir), "--sasl-mechanism", "SCRAM-SHA-512",
             "--gateway-command", " ".join(fake_gateway))
    try:
        assert r.returncode == 0, r.stderr
        assert "security  SASL_SSL SCRAM-SHA-512" in r.stdout
        st = read_state(state_dir)
        monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", st["env_dir"])
        env = load_environment(st["environment"])
        assert env.kafka["sasl.username"] == CLIENT_USER and env.kafka["sasl.password"] not in r.stdout
        check_credentials({"bootstrap.servers": env.kafka_broker_url, **env.kafka}, timeout=30)
        with pytest.raises(KafkaAccessError):  # and the port is closed to anonymous clients
            check_credentials({"bootstrap.servers": env.kafka_broker_url}, timeout=3)
    finally:
        stop = _cli("stop", "--state-dir", str(state_dir))
    assert stop.returncode == 0, stop.stderr
