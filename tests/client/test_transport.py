"""Client start-up without a broker, librdkafka's logging and reply correlation (no stack needed)."""
from __future__ import annotations

import logging
import socket
import threading
import uuid

import pytest

from k2eg.client.errors import KafkaUnavailable
from k2eg.client.transport import KafkaLog, Pending, ReplyIds
from k2eg.dml import dml


@pytest.fixture
def down_env(tmp_path, monkeypatch):
    """An environment whose broker address refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nobody listens there
    path = tmp_path / "down.ini"
    path.write_text(f"[DEFAULT]\nkafka_broker_url=127.0.0.1:{port}\nk2eg_cmd_topic=k2eg-cmd\n")
    monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(tmp_path))
    return path, f"127.0.0.1:{port}"


@pytest.mark.timeout(60)
def test_unreachable_kafka_is_one_clear_error(down_env, capfd, caplog):
    """Not a bare TimeoutError after a screen of librdkafka lines: one exception naming broker and file."""
    path, address = down_env
    caplog.set_level(logging.DEBUG, logger="k2eg.client.kafka")
    with pytest.raises(KafkaUnavailable) as e:
        dml("down", "nobody-home", startup_timeout=1.5)
    msg = str(e.value)
    assert address in msg and str(path) in msg and "'down'" in msg
    assert isinstance(e.value, ConnectionError)
    err = capfd.readouterr().err
    assert "rdkafka" not in err and "Connect to" not in err  # librdkafka wrote nothing to stderr
    kafka_lines = [r for r in caplog.records if r.name == "k2eg.client.kafka"]
    assert kafka_lines and all(r.levelno == logging.DEBUG for r in kafka_lines)  # routed, and quiet at start-up


def test_kafka_log_demotes_repeats(caplog):
    """A broker that is down makes librdkafka repeat itself; the first line is kept, repeats go to DEBUG."""
    log = KafkaLog(logging.getLogger("k2eg.test.kafka"))
    log.startup = False
    caplog.set_level(logging.DEBUG, logger="k2eg.test.kafka")
    for ms in (0, 2, 5):
        log.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1",
                f"Connect to ipv4#127.0.0.1:1 failed (after {ms}ms in state CONNECT)")
    log.log(logging.WARNING, "%s", "something else")
    levels = [(r.levelno, r.getMessage()[:4]) for r in caplog.records]
    assert levels == [(logging.ERROR, "FAIL"), (logging.DEBUG, "FAIL"), (logging.DEBUG, "FAIL"),
                      (logging.WARNING, "some")]


def test_environment_settings_win_over_client_defaults(tmp_path):
    """``kafka.session.timeout.ms`` in the .ini beats our default; the group and the logger stay ours."""
    from k2eg.client.environment import Environment
    from k2eg.client.transport import ClientTransport

    t = ClientTransport.__new__(ClientTransport)  # no broker needed to build a configuration
    t.env = Environment("x", tmp_path / "x.ini", "b:9092", "cmd",
                        {"session.timeout.ms": "30000", "group.id": "theirs", "linger.ms": "5"})
    t.kafka_log = KafkaLog(logging.getLogger("k2eg.test.kafka"))
    cfg = t._config({"session.timeout.ms": 10_000, "fetch.wait.max.ms": 10}, group_id="ours")
    assert cfg["session.timeout.ms"] == "30000" and cfg["fetch.wait.max.ms"] == 10
    assert cfg["group.id"] == "ours" and cfg["logger"] is t.kafka_log and cfg["bootstrap.servers"] == "b:9092"


class _Watermarks:
    """Just enough of a Consumer for ``_on_assign``: watermarks per topic, and what got assigned."""

    def __init__(self, marks: dict[str, tuple[int, int]]):
        self.marks, self.assigned = marks, []

    def get_watermark_offsets(self, tp, timeout=None):
        return self.marks[tp.topic]

    def committed(self, tps, timeout=None):
        return []

    def assign(self, tps):
        self.assigned = tps


def test_a_new_monitor_topic_starts_at_its_newest_record_or_at_its_beginning_when_empty():
    """An empty topic must not start at "the end": that is resolved later and can skip the PV's first value."""
    import threading

    from confluent_kafka import TopicPartition

    from k2eg.client.transport import ClientTransport

    t = ClientTransport.__new__(ClientTransport)
    t._positions, t._shared_group = {("known", 0): 42}, False
    t._assign_cond, t._assigned = threading.Condition(), set()
    c = _Watermarks({"empty": (0, 0), "used": (3, 10), "known": (0, 99), "expired": (7, 7)})
    t._on_assign(c, [TopicPartition(n, 0) for n in ("empty", "used", "known", "expired")])
    assert {p.topic: p.offset for p in c.assigned} == {"empty": 0, "used": 9, "known": 42, "expired": 7}
    assert t._assigned == {"empty", "used", "known", "expired"}


def test_a_pending_command_keeps_the_first_of_reply_and_failure():
    p = Pending()
    assert not p.wait(0.01) and not p.wait(-1)  # nothing yet; a spent timeout does not raise
    p.settle({"reply_id": "1"})
    p.fail(KafkaUnavailable("too late"))  # e.g. the client closing after the reply came
    assert p.wait(0) and p.record == {"reply_id": "1"} and p.error is None


def test_a_waiting_command_wakes_on_failure_from_another_thread():
    p = Pending()
    threading.Timer(0.05, p.fail, args=(KafkaUnavailable("gone"),)).start()
    assert p.wait(30)
    assert isinstance(p.error, KafkaUnavailable) and p.record is None


def test_reply_ids_look_like_0_3_0_uuids_and_never_repeat():
    ids, other = ReplyIds(), ReplyIds()
    mine = [ids() for _ in range(1000)]
    assert len(set(mine)) == 1000
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in mine)
    assert other()[:24] != mine[0][:24]  # two clients sharing a reply topic still tell their replies apart
