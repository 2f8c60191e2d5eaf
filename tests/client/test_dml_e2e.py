"""The client library against the real stack: every public method, CA and PVA, and its failure modes.

Timeouts here only bound hangs; assertions are about values and ordering.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from k2eg.client.errors import ClientClosed, MonitorNotActive
from k2eg.dml import OperationError, OperationTimeout, dml
from k2eg.protocol import commands as C
from k2eg.protocol.codec import decode
from k2eg.protocol.uri import pv_topic
from k2eg.serialization import Generic, NTTable, Scalar, Vector

pytestmark = pytest.mark.e2e

T = 20          # bound against hangs, never a performance claim
PROTOS = ["ca", "pva"]


# ----------------------------------------------------------------- helpers
@pytest.fixture
def restore(k):
    """Put back the values of PVs a test writes, so other tests see the demo IOC's state."""
    saved: dict[str, object] = {}

    def remember(uri: str) -> str:
        if uri not in saved:
            saved[uri] = k.get(uri, T)["value"]
        return uri

    yield remember
    for uri, value in saved.items():
        k.put(uri, value, T)


@pytest.fixture
def produce(stack):
    """Write raw records to any topic, as a broken or foreign producer would."""
    p = Producer({"bootstrap.servers": stack.bootstrap})

    def send(topic: str, value, headers=None, key=None):
        p.produce(topic, value, key=key, headers=headers)
        p.flush(T)

    yield send
    p.flush(T)


def collect(n: int):
    """A monitor handler recording (name, value); ``done`` is set after ``n`` calls."""
    got: list[tuple[str, dict]] = []
    done = threading.Event()
    lock = threading.Lock()

    def handler(name, value):
        with lock:
            got.append((name, value))
            if len(got) >= n:
                done.set()

    return handler, got, done


def wait_until(event: threading.Event, what: str) -> None:
    assert event.wait(T), f"timed out waiting for {what}"


def ser(kind: str):
    return [("k2eg-ser-type", kind.encode())]


# ----------------------------------------------------------------- construction
def test_reply_topic_exists_before_the_first_command(stack):
    """A get straight after construction succeeds: the reply topic was created and assigned first."""
    app = f"fresh-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    assert f"{app}-reply" not in admin.list_topics(timeout=T).topics
    with dml(stack.environment, app) as k:
        assert f"{app}-reply" in admin.list_topics(timeout=T).topics
        assert k.get("pva://variable:a", T)["value"] is not None


def test_app_name_is_validated(stack):
    with pytest.raises(ValueError, match="mandatory"):
        dml(stack.environment, None)
    with pytest.raises(ValueError, match="topic"):
        dml(stack.environment, "has space")


def test_wait_for_backends_is_immediately_true(k):
    assert k.wait_for_backends() is True
    assert k.get("ca://variable:b", T)["value"] is not None


def test_kafka_settings_from_the_environment_reach_librdkafka(stack, tmp_path, monkeypatch):
    """``kafka.client.id`` in the .ini shows up as the client id of our consumer-group member."""
    ini = stack.env_file.read_text() + "kafka.client.id=k2eg-test-client-id\n"
    (tmp_path / "custom.ini").write_text(ini)
    monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(tmp_path))
    group = f"grp-{uuid.uuid4().hex[:8]}"
    handler, _got, first = collect(1)
    with dml("custom", f"app-{uuid.uuid4().hex[:6]}", group_name=group) as k:
        k.monitor("pva://pva:counter", handler, T)
        wait_until(first, "a pva:counter event")
        admin = AdminClient({"bootstrap.servers": stack.bootstrap})
        desc = admin.describe_consumer_groups([group])[group].result(T)
        assert {m.client_id for m in desc.members} == {"k2eg-test-client-id"}


# ----------------------------------------------------------------- get / info
@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("pv, check", [
    ("variable:a", lambda v: isinstance(v["value"], float)),
    ("channel:waveform", lambda v: len(v["value"]) >= 1),
    ("channel:enum", lambda v: v["value"]["choices"][:2] == ["Off", "On"]),
    ("channel:string", lambda v: isinstance(v["value"], str)),
    ("channel:short", lambda v: min(v["value"]) < 0),
])
def test_get(k, proto, pv, check):
    v = k.get(f"{proto}://{pv}", T)
    assert check(v), v


@pytest.mark.parametrize("proto", PROTOS)
def test_get_with_field_suffix(k, proto):
    """``.VAL`` is part of the channel name (PROTOCOL 2), and the reply is found under it."""
    plain = k.get(f"{proto}://variable:b", T)["value"]
    assert k.get(f"{proto}://variable:b.VAL", T)["value"] == plain
    assert k.get("ca://variable:b.EGU", T)["value"] == "mm"


def test_get_pva_structures(k):
    assert set(k.get("pva://pva:table", T)["value"]) == {"name", "x", "n"}
    assert k.get("pva://pva:struct", T)["a"]["inner"]["flag"] in (True, False)


@pytest.mark.parametrize("proto", PROTOS)
def test_unknown_pv_is_an_operation_error(k, proto):
    with pytest.raises(OperationError) as e:
        k.get(f"{proto}://no:such:pv", T)
    assert e.value.error != 0 and "no:such:pv" in e.value.args[0]


def test_a_timeout_is_operation_timeout_and_the_late_reply_is_harmless(k):
    """The gateway answers an unknown PV after 2 s; a 0.2 s timeout gives up first."""
    with pytest.raises(OperationTimeout, match="no:such:pv"):
        k.get("pva://no:such:pv", 0.2)
    assert k.get("pva://variable:a", T)["value"] is not None


def test_bad_uris_are_refused_before_sending(k):
    for bad in ("variable:a", "http://variable:a", "pva://bad name", 42):
        with pytest.raises(ValueError):
            k.get(bad, T)


@pytest.mark.parametrize("proto", PROTOS)
def test_info(k, proto):
    info = k.info(f"{proto}://variable:a", T)
    assert info["protocol"] == proto and info["connected"] is True
    assert "value" in info["structure"]


# ----------------------------------------------------------------- put
@pytest.mark.parametrize("proto", PROTOS)
def test_put_plain_values(k, restore, proto):
    """put(uri, 42), lists, numpy arrays and strings without wrapping them first."""
    a, wf, short, s, long_ = (restore(f"{proto}://{pv}") for pv in
                              ("variable:a", "channel:waveform", "channel:short", "channel:string", "channel:long"))
    reply = k.put(a, 42, T)
    assert reply["error"] == 0
    assert k.get(a, T)["value"] == 42.0
    k.put(wf, [1, 2, 3], T)
    assert list(k.get(wf, T)["value"]) == [1.0, 2.0, 3.0]
    k.put(wf, np.array([4.5, 5.5, 6.5]), T)
    assert list(k.get(wf, T)["value"]) == [4.5, 5.5, 6.5]
    k.put(short, np.array([-5, 5, -32768], dtype=np.int16), T)
    assert list(k.get(short, T)["value"])[:3] == [-5, 5, -32768]
    k.put(s, f"text via {proto}", T)
    assert k.get(s, T)["value"] == f"text via {proto}"
    k.put(long_, np.int32(-1234), T)
    assert k.get(long_, T)["value"] == -1234


@pytest.mark.parametrize("proto", PROTOS)
def test_put_wrapped_values(k, restore, proto):
    a, wf = restore(f"{proto}://variable:a"), restore(f"{proto}://channel:waveform")
    k.put(a, Scalar(7.5), T)
    assert k.get(a, T)["value"] == 7.5
    k.put(a, Scalar("value", 8.5), T)
    assert k.get(a, T)["value"] == 8.5
    k.put(wf, Vector([1, 2, 3]), T)
    assert list(k.get(wf, T)["value"]) == [1.0, 2.0, 3.0]


def test_put_nttable_and_generic(k, restore):
    table, struct = restore("pva://pva:table"), "pva://pva:struct"
    before = k.get(struct, T)["a"]["b"]
    t = NTTable(labels=["name", "x", "n"]).wrap([("p", 0.5, 10), ("q", 1.5, -20)])
    k.put(table, t, T)
    assert k.get(table, T)["value"] == {"name": ["p", "q"], "x": [0.5, 1.5], "n": [10, -20]}
    try:
        k.put(struct, Generic("a", {"b": before + 1}), T)
        assert k.get(struct, T)["a"]["b"] == before + 1
    finally:
        k.put(struct, Generic("a", {"b": before}), T)


@pytest.mark.parametrize("proto", PROTOS)
def test_put_errors(k, proto):
    with pytest.raises(OperationError):
        k.put(f"{proto}://no:such:pv", 1, T)
    with pytest.raises(ValueError):
        k.put(f"{proto}://variable:a", None, T)


def test_a_command_too_large_for_kafka_is_an_operation_error(k):
    """Not a raw KafkaException: the error says which limit to raise, and the client keeps working."""
    with pytest.raises(OperationError, match="message.max.bytes") as e:
        k.put("pva://channel:waveform", np.zeros(1_000_000), T)
    assert e.value.error == -1
    assert k.get("pva://channel:waveform", T)["value"] is not None


# ----------------------------------------------------------------- monitor
def topic_events(stack, topic: str, name: str) -> list[tuple]:
    """Every event of ``name`` on ``topic``, in topic order, as (value, seconds, nanoseconds)."""
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    try:
        tp = TopicPartition(topic, 0)
        _, high = c.get_watermark_offsets(tp, timeout=T)
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        out, offset = [], -1
        while offset < high - 1:
            m = c.poll(T)
            assert m is not None, f"{topic} ended before offset {high - 1}"
            if m.error() is not None:
                continue
            offset = m.offset()
            rec = decode(m.value(), dict(m.headers() or []).get("k2eg-ser-type"))
            if isinstance(rec, dict) and isinstance(rec.get(name), dict):
                out.append(stamp(rec[name]))
        return out
    finally:
        c.close()


def stamp(value: dict) -> tuple:
    ts = value.get("timeStamp") or {}
    return value.get("value"), ts.get("secondsPastEpoch"), ts.get("nanoseconds")


def is_contiguous_run(part: list, whole: list) -> bool:
    n = len(part)
    return any(whole[i:i + n] == part for i in range(len(whole) - n + 1))


@pytest.mark.parametrize("uri", ["ca://channel:counter", "pva://pva:counter"])
def test_monitor_delivers_name_and_value_in_order(k, stack, uri):
    """One PV's events reach the handler in topic order, none repeated or skipped, also across rebalances.

    Every monitor added or removed re-subscribes the event consumer; the PV
    must resume where it was. The handler's sequence has to be one unbroken
    run of the topic's records (CA and PVA monitors of one name share a
    topic, so the topic, not the counter, is the reference).
    """
    name = uri.split("://")[1]
    handler, got, ten = collect(10)
    reply = k.monitor(uri, handler, T)
    assert reply["error"] == 0
    wait_until(ten, "10 events")
    for other in ("pva://channel:ramp:ramp", "ca://variable:sum"):  # each forces a rebalance
        seen = threading.Event()
        k.monitor(other, lambda *_, e=seen: e.set(), T)
        wait_until(seen, f"an event of {other}")
    before_stop = len(got)
    k.stop_monitor("channel:ramp:ramp")
    seen = threading.Event()
    k.monitor("pva://channel:ramp:ramp", lambda *_: seen.set(), T)
    wait_until(seen, "the ramp again")
    deadline = time.monotonic() + T  # the PV resumes after the last rebalance too
    while len(got) <= before_stop and time.monotonic() < deadline:
        time.sleep(0.05)
    k.stop_monitor("channel:ramp:ramp")
    k.stop_monitor("variable:sum")
    k.stop_monitor(name)
    assert {n for n, _ in got} == {name} and len(got) > before_stop >= 10
    delivered = [stamp(v) for _, v in got]
    assert is_contiguous_run(delivered, topic_events(stack, pv_topic(name), name)), delivered
    if name == "pva:counter":  # one source only: strictly counting up, but for the first value:
        # when the PV is already monitored into this topic (an earlier test's monitor, not yet
        # expired), our monitor command re-publishes the current value (PROTOCOL: repeated monitor)
        # and the client starts one record before the end, so that value may come twice.
        values = [v for v, _, _ in delivered]
        assert values[0] <= values[1] and all(b > a for a, b in zip(values[1:], values[2:])), values


def test_no_event_reaches_the_handler_after_stop_monitor(k):
    """Both counters tick at 10 Hz: once five pva:counter events followed stop, channel:counter stayed quiet."""
    handler, got, started = collect(2)
    k.monitor("ca://channel:counter", handler, T)
    wait_until(started, "channel:counter events")
    k.stop_monitor("channel:counter")
    stopped_at = len(got)
    witness, _, five = collect(5)
    k.monitor("pva://pva:counter", witness, T)
    wait_until(five, "five pva:counter events")
    assert len(got) == stopped_at


@pytest.mark.parametrize("proto", PROTOS)
def test_monitor_with_field_suffix(k, restore, proto):
    """``ca://variable:a.VAL``: events come under the name as written, with the new value."""
    a = restore(f"{proto}://variable:a")
    target = 12.25 if proto == "ca" else 13.25
    seen = threading.Event()
    names = set()

    def handler(name, value):
        names.add(name)
        if value["value"] == target:
            seen.set()

    k.monitor(f"{proto}://variable:a.VAL", handler, T)
    k.put(a, target, T)
    wait_until(seen, f"variable:a.VAL == {target}")
    k.stop_monitor(f"{proto}://variable:a.VAL")  # a URI is accepted too
    assert names == {"variable:a.VAL"}


def test_monitor_many(k):
    handler, got, _ = collect(0)
    both = threading.Event()

    def h(name, value):
        handler(name, value)
        if {n for n, _ in got} == {"pva:counter", "channel:ramp:ramp"}:
            both.set()

    reply = k.monitor_many(["pva://pva:counter", "ca://channel:ramp:ramp"], h, T)
    assert reply["error"] == 0
    wait_until(both, "events of both PVs")
    assert k.monitor_many(["pva://pva:counter"], h, T) is None  # already active, as in 0.3.0
    assert k.monitor("ca://channel:ramp:ramp", h, T) is None
    k.stop_monitor("pva:counter")
    k.stop_monitor("channel:ramp:ramp")
    with pytest.raises(ValueError):
        k.monitor_many([], h, T)


def test_stop_monitor_of_an_unknown_pv_is_a_key_error(k):
    with pytest.raises(KeyError) as e:
        k.stop_monitor("never:monitored")
    assert isinstance(e.value, MonitorNotActive) and "never:monitored" in str(e.value)


def test_a_failing_handler_does_not_stop_the_monitor(k):
    calls = []
    three = threading.Event()

    def handler(name, value):
        calls.append(value["value"])
        if len(calls) >= 3:
            three.set()
        raise RuntimeError("user bug")

    k.monitor("pva://pva:counter", handler, T)
    wait_until(three, "three calls of a raising handler")
    k.stop_monitor("pva:counter")


def test_a_slow_handler_does_not_delay_replies(k, restore):
    """Handlers run on their own thread: while one blocks, gets, puts and other replies flow."""
    entered, release = threading.Event(), threading.Event()
    values: list[float] = []

    def slow(name, value):
        values.append(value["value"])
        entered.set()
        release.wait(T)

    k.monitor("pva://pva:counter", slow, T)
    wait_until(entered, "the handler to block")
    try:
        b = restore("ca://variable:b")
        for i in range(5):
            k.put(b, 60.0 + i, T)
            assert k.get(b, T)["value"] == 60.0 + i
        h2, _, _ = collect(1)
        assert k.monitor("ca://channel:ramp:ramp", h2, T)["error"] == 0
        assert len(values) == 1  # still blocked in the first call
    finally:
        release.set()
    k.stop_monitor("pva:counter")
    k.stop_monitor("channel:ramp:ramp")


# ----------------------------------------------------------------- close
def test_close_is_idempotent_and_the_context_manager_closes(stack, app_name):
    with dml(stack.environment, app_name) as k:
        k.get("pva://variable:a", T)
    k.close()
    k.close()
    with pytest.raises(ClientClosed):
        k.get("pva://variable:a", T)
    assert isinstance(ClientClosed(), RuntimeError)


def test_close_from_within_a_handler(stack, app_name):
    k = dml(stack.environment, app_name)
    closed = threading.Event()

    def handler(name, value):
        k.close()
        closed.set()

    k.monitor("pva://pva:counter", handler, T)
    wait_until(closed, "close() inside the handler to return")
    k.close()


def test_close_wakes_a_waiting_call(stack, app_name, monkeypatch):
    """A get waiting for a reply that will never come ends with ClientClosed once another thread closes."""
    k = dml(stack.environment, app_name)
    sent = threading.Event()
    monkeypatch.setattr(k._t, "send", lambda cmd, on_error=None: sent.set())  # the command is lost
    outcome: list[BaseException] = []

    def waiter():
        try:
            k.get("pva://variable:a")  # no timeout: would wait forever
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    wait_until(sent, "the get to be sent")
    k.close()
    t.join(T)
    assert not t.is_alive() and isinstance(outcome[0], ClientClosed)


@pytest.mark.timeout(60)
def test_close_returns_while_the_broker_hangs(stack, app_name):
    """A frozen broker (SIGSTOP) cannot answer the consumer's leave-group: close still returns."""
    if stack.kafka is None:
        pytest.skip("needs the embedded broker, to freeze it")
    k = dml(stack.environment, app_name)
    handler, _, first = collect(1)
    k.monitor("pva://pva:counter", handler, T)  # a joined consumer group, which close has to leave
    wait_until(first, "an event")
    os.kill(stack.kafka.pid, signal.SIGSTOP)
    try:
        with pytest.raises(OperationTimeout):
            k.get("pva://variable:a", 0.5)  # an undelivered command still in the producer
        k.close()
    finally:
        os.kill(stack.kafka.pid, signal.SIGCONT)
    with dml(stack.environment, app_name) as again:  # and the broker is fine afterwards
        assert again.get("pva://variable:a", T)["value"] is not None


# ----------------------------------------------------------------- serialisations and malformed records
@pytest.mark.parametrize("kind", ["json", "msgpack-compact"])
def test_other_serialisations_end_to_end(stack, app_name, k, kind):
    """JSON and compact replies and events decode.

    The gateway serialises a PV topic the way the latest monitor command asked,
    and the topic is shared by every client (0.3.0 cannot read compact), so a
    msgpack monitor command puts it back afterwards.
    """
    try:
        with dml(stack.environment, f"{app_name}-{kind}", serialization=kind) as other:
            v = other.get("pva://variable:a", T)
            handler, got, three = collect(3)
            other.monitor("ca://bulk:198", handler, T)  # a topic no other test feeds
            wait_until(three, "three events")
            other.stop_monitor("bulk:198")
    finally:
        k.monitor("ca://bulk:198", lambda *_: None, T)  # msgpack again for everybody
        k.stop_monitor("bulk:198")
    if kind == "json":
        assert isinstance(v["value"], float) and isinstance(got[-1][1]["value"], (int, float))
    else:  # leaves in depth-first order, no field names
        assert isinstance(v, list) and isinstance(v[0], float)
        assert got[-1][0] == "bulk:198" and isinstance(got[-1][1], list)


GARBAGE = [
    (b"\xc1\xff\x00garbage", None),                       # no header at all
    (b"\xc1\xff\x00garbage", ser("msgpack")),             # undecodable msgpack
    (b"{not json", ser("json")),                          # undecodable JSON
    (msgpack.packb({"x": 1}), ser("thrift")),             # unknown serialisation
    (msgpack.packb({"x": 1}), [("k2eg-ser-type", b"\xff\xfe")]),  # header not UTF-8
    (msgpack.packb([1, 2, 3]), ser("msgpack")),          # not a map
    (msgpack.packb(42), ser("Msgpack")),
    (msgpack.packb({"reply_id": ["un", "hashable"], "error": 0}), ser("msgpack")),
    (msgpack.packb({"reply_id": {"a": 1}}), ser("msgpack-compact")),
    (msgpack.packb({}), ser("msgpack")),
    (None, ser("msgpack")),                               # a tombstone
    (b"", ser("json")),
    (msgpack.packb({"variable:a": {"value": 1}}), ser("msgpack")),  # an event on the reply topic
]


def test_malformed_reply_records_are_skipped(k, produce):
    for value, headers in GARBAGE:
        produce(k.reply_topic, value, headers)
    for proto in PROTOS:
        assert k.get(f"{proto}://variable:a", T)["value"] is not None


@pytest.mark.parametrize("kind, encode", [
    ("json", lambda rec: json.dumps(rec).encode()),
    ("Msgpack-Compact", lambda rec: msgpack.packb({**rec, "fake:pv": [1.5, 0, 0]})),
    ("msgpack", lambda rec: msgpack.packb(rec)),
])
def test_reply_records_in_every_serialisation_are_decoded(k, produce, monkeypatch, kind, encode):
    """A reply produced by hand (here in place of the gateway) is matched by reply_id in any serialisation."""
    def fake_gateway(cmd, on_error=None):
        rec = {"error": 0, "reply_id": cmd.reply_id, "fake:pv": {"value": 1.5}}
        produce(k.reply_topic, msgpack.packb(["junk"]), ser("msgpack"))  # noise first
        produce(k.reply_topic, encode(rec), ser(kind))

    monkeypatch.setattr(k._t, "send", fake_gateway)
    v = k.get("pva://fake:pv", T)
    assert v == ([1.5, 0, 0] if kind.lower() == "msgpack-compact" else {"value": 1.5})


def test_malformed_monitor_records_are_skipped_and_good_ones_decoded(k, restore, produce):
    """Garbage on a monitor topic is logged and skipped; JSON and compact events reach the handler."""
    pv = restore("pva://channel:string")
    got: list = []
    final = threading.Event()

    def handler(name, value):
        got.append((name, value))
        if isinstance(value, dict) and value.get("value") == "after the garbage":
            final.set()

    k.monitor(pv, handler, T)
    assert k._t.wait_assigned("channel_string", T)  # so records written now are read
    for value, headers in GARBAGE:
        produce("channel_string", value, headers, key="channel:string")
    produce("channel_string", json.dumps({"channel:string": {"value": "from json"}}).encode(), ser("json"),
            key="channel:string")
    produce("channel_string", msgpack.packb(["channel:string", "from compact", 0]), ser("msgpack-compact"),
            key="channel:string")
    produce("channel_string", msgpack.packb({"other:pv": {"value": 1}}), ser("msgpack"), key="other:pv")
    k.put(pv, "after the garbage", T)
    wait_until(final, "the put's event after the garbage")
    k.stop_monitor("channel:string")
    assert {name for name, _ in got} == {"channel:string"}
    values = [v for _, v in got]
    assert {"value": "from json"} in values and ["from compact", 0] in values
    assert values.index({"value": "from json"}) < values.index(["from compact", 0])


# ----------------------------------------------------------------- concurrency
def test_two_processes_with_the_same_app_name(stack):
    """Both read the same reply topic and each gets its own replies and events; nobody is fenced."""
    app = f"shared-{uuid.uuid4().hex[:8]}"
    worker = Path(__file__).with_name("worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), stack.environment, app, tag],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for tag in "AB"]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout.readline().strip() == "done"
            results.append(json.loads(p.stdout.readline()))
        for p in procs:
            p.stdin.write("exit\n")
            p.stdin.flush()
            assert p.wait(T) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r in results:
        assert len(r["gets"]) == 20
        for name, description in r["gets"]:
            assert description == f"Bulk counter {int(name.split(':')[1])}"
        assert r["three_events"] and {n for n, _ in r["events"]} == {"pva:counter"}
        counts = [v for _, v in r["events"]]
        # never backwards; a value may come twice: the other process's monitor command makes the
        # gateway re-publish the current value (PROTOCOL: repeated monitor), which this one may have seen
        assert all(b >= a for a, b in zip(counts, counts[1:]))


WRITABLE = [  # (uri, value for thread i and round r, how the get shows it)
    ("ca://variable:a", lambda i, r: 10.0 + r, lambda v: v["value"]),
    ("pva://variable:b", lambda i, r: 20.0 + r, lambda v: v["value"]),
    ("ca://channel:long", lambda i, r: 1000 + r, lambda v: v["value"]),
    ("pva://channel:string", lambda i, r: f"thread {i} round {r}", lambda v: v["value"]),
    ("ca://channel:alarm", lambda i, r: 50.0 + r, lambda v: v["value"]),
    ("pva://channel:waveform", lambda i, r: [float(i), float(r)], lambda v: list(v["value"])[:2]),
    ("pva://pva:struct", lambda i, r: Generic("a", {"label": f"round {r}"}), lambda v: v["a"]["label"]),
    ("pva://pva:counter", lambda i, r: 1e6 + r, lambda v: v["value"]),
]


def test_32_threads_at_once_each_answer_checked(k, restore):
    """8 threads put-and-get their own PV, 24 get bulk PVs whose description names them."""
    for uri, _, _ in WRITABLE:
        if "struct" not in uri:  # restored by field below
            restore(uri)
    label = k.get("pva://pva:struct", T)["a"]["label"]
    barrier = threading.Barrier(32)
    errors: list[str] = []

    def putter(i: int):
        uri, make, show = WRITABLE[i]
        barrier.wait(T)
        for r in range(5):
            value = make(i, r)
            assert k.put(uri, value, T)["error"] == 0
            got = show(k.get(uri, T))
            want = value.payload["label"] if isinstance(value, Generic) else value
            if "counter" in uri:
                ok = got >= want  # it keeps counting from the value put
            else:
                ok = got == want
            if not ok:
                errors.append(f"{uri}: put {want!r}, got {got!r}")

    def getter(i: int):
        barrier.wait(T)
        for r in range(8):
            n = (i * 8 + r) % 200
            proto = "ca" if (i + r) % 2 else "pva"
            v = k.get(f"{proto}://bulk:{n:03d}", T)
            if v["display"]["description"] != f"Bulk counter {n}" or v["value"] < n:
                errors.append(f"bulk:{n:03d} answered with {v['display']['description']!r} = {v['value']}")

    def run(fn, i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"{fn.__name__} {i}: {e!r}")

    threads = [threading.Thread(target=run, args=(putter if i < 8 else getter, i), daemon=True) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * T)
    k.put("pva://pva:struct", Generic("a", {"label": label}), T)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


@pytest.mark.parametrize("proto", PROTOS)
def test_a_slow_reply_never_blocks_fast_ones(k, proto):
    """A get of an unknown PV waits 2 s for the gateway; gets sent after it finish before it."""
    real_send = k._t.send
    slow_sent, slow_done = threading.Event(), threading.Event()
    outcome: list = []

    def send(cmd, on_error=None):
        real_send(cmd, on_error)
        if isinstance(cmd, C.Get) and cmd.pv.name == "no:such:pv":
            slow_sent.set()

    k._t.send = send

    def slow():
        try:
            k.get(f"{proto}://no:such:pv", T)
        except OperationError as e:
            outcome.append(e)
        slow_done.set()

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    try:
        wait_until(slow_sent, "the slow get to be sent")
        answers: dict[int, str] = {}

        def fast(i: int):
            answers[i] = k.get(f"{proto}://bulk:{i:03d}", T)["display"]["description"]

        fast_threads = [threading.Thread(target=fast, args=(i,), daemon=True) for i in range(16)]
        for f in fast_threads:
            f.start()
        for f in fast_threads:
            f.join(T)
        assert not slow_done.is_set(), "the fast gets waited for the slow one"
        assert answers == {i: f"Bulk counter {i}" for i in range(16)}
    finally:
        t.join(T)
        del k._t.send
    assert isinstance(outcome[0], OperationError)
