"""The gateway's command set against the real stack (PROTOCOL 1-6).

Where the bytes on the wire are the contract (headers, record keys, the three
serialisations, error replies) the tests speak raw Kafka through ``Wire``;
elsewhere they use our client ``k``. Values a test writes are restored, so
the session stack stays as the demo IOC defines it for every other test.
"""
from __future__ import annotations

import base64
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from k2eg import OperationError
from k2eg.protocol.codec import HEADER, decode, leaves
from k2eg.serialization import Generic, NTTable

pytestmark = pytest.mark.e2e

WAIT = 30.0  # upper bound against hangs, never a timing assertion
HEADERS = {"msgpack": b"Msgpack", "json": b"Json", "msgpack-compact": b"Msgpack-Compact"}
PARSE_ERROR_KEY = b"k2eg-parse-error"


# ----------------------------------------------------------------------------- raw Kafka
@dataclass
class Record:
    topic: str
    key: bytes | None
    headers: list[tuple[str, bytes]]
    raw: bytes
    value: Any  # decoded per the k2eg-ser-type header

    @property
    def ser(self) -> bytes | None:
        found = [v for k, v in self.headers if k == HEADER]
        return found[0] if len(found) == 1 else None


def fresh_topic(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Reader:
    """Every record of one single-partition topic from its beginning; waits for the topic to appear."""

    def __init__(self, wire: "Wire", topic: str):
        self.topic = topic
        self.records: list[Record] = []
        self._c = Consumer({"bootstrap.servers": wire.bootstrap, "group.id": f"wire-{uuid.uuid4().hex}",
                            "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self._assigned = False

    def _assign(self) -> bool:
        if not self._assigned:
            md = self._c.list_topics(self.topic, timeout=5).topics.get(self.topic)
            if md is None or md.error is not None or not md.partitions:
                return False
            self._c.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in md.partitions])
            self._assigned = True
        return True

    def poll(self, seconds: float = 0.2) -> None:
        if not self._assign():
            time.sleep(seconds)
            return
        for m in self._c.consume(500, seconds):
            if m.error() is not None:
                continue
            headers = list(m.headers() or [])
            header = dict(headers).get(HEADER)
            try:
                value = decode(m.value(), header)
            except ValueError:
                value = None
            self.records.append(Record(m.topic(), m.key(), headers, m.value(), value))

    def wait(self, done: Callable[[list[Record]], bool], timeout: float = WAIT, what: str = "") -> list[Record]:
        deadline = time.monotonic() + timeout
        while not done(self.records):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or 'records'} not seen on {self.topic} within {timeout:g} s; "
                                     f"got {len(self.records)}: {[r.value for r in self.records][:5]}")
            self.poll()
        return self.records

    def wait_count(self, n: int, timeout: float = WAIT) -> list[Record]:
        return self.wait(lambda rs: len(rs) >= n, timeout, f"{n} records")

    def reply(self, reply_id: str, timeout: float = WAIT) -> Record:
        def found(rs):
            return any(isinstance(r.value, dict) and r.value.get("reply_id") == reply_id for r in rs)
        self.wait(found, timeout, f"reply {reply_id}")
        return next(r for r in self.records if isinstance(r.value, dict) and r.value.get("reply_id") == reply_id)

    def close(self) -> None:
        self._c.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Wire:
    """Raw Kafka access to the gateway, for checks where the bytes on the wire are the contract."""

    def __init__(self, bootstrap: str, cmd_topic: str):
        self.bootstrap = bootstrap
        self.cmd_topic = cmd_topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})

    def send(self, command: dict | bytes | str) -> None:
        if isinstance(command, dict):
            payload = json.dumps(command).encode()
        elif isinstance(command, str):
            payload = command.encode()
        else:
            payload = command
        self.producer.produce(self.cmd_topic, payload)
        self.producer.flush(10)

    def reader(self, topic: str) -> Reader:
        return Reader(self, topic)

    def request(self, doc: dict, timeout: float = WAIT) -> Record:
        """Send one command with a fresh reply topic and reply_id; return its reply record."""
        doc = dict(doc)
        doc.setdefault("reply_topic", fresh_topic("reply"))
        doc.setdefault("reply_id", uuid.uuid4().hex)
        with self.reader(doc["reply_topic"]) as r:
            self.send(doc)
            if not isinstance(doc["reply_id"], str):  # unusable as a reply_id: the topic's only record
                return r.wait_count(1, timeout)[0]
            return r.reply(doc["reply_id"], timeout)

    def status(self) -> dict:
        rec = self.request({"command": "status"})
        assert rec.value["error"] == 0, rec.value
        return rec.value["status"]


@pytest.fixture(scope="module")
def wire(stack):
    w = Wire(stack.bootstrap, stack.cmd_topic)
    yield w
    w.producer.flush(10)
    del w.producer  # gone before the session stops the broker, so it does not log reconnect attempts


def b64(obj: Any) -> str:
    return base64.b64encode(msgpack.packb(obj, use_bin_type=True)).decode()


def same(x: Any, y: Any) -> bool:
    """Equal as msgpack bytes (NaN limits compare equal, unlike with ==)."""
    return msgpack.packb(x, use_bin_type=True) == msgpack.packb(y, use_bin_type=True)


def monitor_entry(status: dict, uri: str) -> dict | None:
    return next((m for m in status["monitors"] if m["pv"].lower() == uri.lower()), None)


# ----------------------------------------------------------------------------- get
@pytest.mark.parametrize("ser", ["msgpack", "json", "msgpack-compact"])
@pytest.mark.parametrize("uri", ["ca://variable:a", "pva://variable:a", "pva://pva:struct"])
def test_get_reply_on_the_wire(wire, uri, ser):
    """Header, record key (the URI as sent) and value key are what 0.3.0 clients look up."""
    name = uri.split("://", 1)[1]
    rec = wire.request({"command": "get", "pv_name": uri, "serialization": ser})
    assert rec.ser == HEADERS[ser] and len(rec.headers) == 1
    assert rec.key == uri.encode()
    assert rec.value["error"] == 0 and name in rec.value
    reference = wire.request({"command": "get", "pv_name": uri}).value[name]
    if ser == "msgpack-compact":  # the tree's leaves, depth first, no field names
        assert isinstance(rec.value[name], list) and len(rec.value[name]) == len(leaves(reference))
    else:
        assert _shape(rec.value[name]) == _shape(reference)


def _shape(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _shape(v) for k, v in tree.items()}
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):
        return [_shape(tree[0])]
    return None


def test_get_reply_key_is_the_uri_exactly_as_sent(wire):
    rec = wire.request({"command": "get", "pv_name": "PVA://variable:a"})
    assert rec.key == b"PVA://variable:a" and rec.value["error"] == 0 and "variable:a" in rec.value


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_json_nan_is_the_string_nan(wire, proto):
    """variable:a has no alarm limits: EPICS reports NaN, which JSON cannot carry (C++ sends "NaN")."""
    js = wire.request({"command": "get", "pv_name": f"{proto}://variable:a", "serialization": "json"})
    assert b"NaN" in js.raw and js.value["variable:a"]["valueAlarm"]["highAlarmLimit"] == "NaN"
    mp = wire.request({"command": "get", "pv_name": f"{proto}://variable:a"})
    assert math.isnan(mp.value["variable:a"]["valueAlarm"]["highAlarmLimit"])


def test_json_keeps_unions_and_structure_arrays(wire):
    s = wire.request({"command": "get", "pv_name": "pva://pva:struct", "serialization": "json"}).value["pva:struct"]
    assert isinstance(s["u"], dict) and len(s["u"]) == 1
    assert [set(i) for i in s["items"]] == [{"key", "weight"}] * len(s["items"]) and s["items"]
    assert isinstance(s["a"]["inner"]["values"], list)
    img = wire.request({"command": "get", "pv_name": "pva://pva:image", "serialization": "json"}).value["pva:image"]
    (member, pixels), = img["value"].items()
    assert member == "ushortValue" and len(pixels) == 16 * 16
    assert [d["size"] for d in img["dimension"]] == [16, 16]
    assert {a["name"] for a in img["attribute"]} >= {"ColorMode", "Exposure", "Camera"}


def test_compact_get_of_an_image_flattens_structure_arrays(wire):
    full = wire.request({"command": "get", "pv_name": "pva://pva:image"}).value["pva:image"]
    compact = wire.request({"command": "get", "pv_name": "pva://pva:image",
                            "serialization": "msgpack-compact"}).value["pva:image"]
    assert len(compact) == len(leaves(full))
    assert all(not isinstance(x, dict) for x in compact)


def test_get_of_a_field_name_reads_that_field(k):
    """fix: ca://variable:a.EGU is the channel 'variable:a.EGU' (the C++ gateway drops the suffix)."""
    assert k.get("ca://variable:a.EGU", timeout=WAIT)["value"] == "mm"
    assert k.get("ca://variable:a.DESC", timeout=WAIT)["value"] == "Setpoint A"


# ----------------------------------------------------------------------------- put
@pytest.fixture
def restore(k):
    """Write back the demo IOC's values after a test changed them."""
    saved: list[tuple[str, Any]] = []
    yield lambda uri, value: saved.append((uri, value))
    for uri, value in reversed(saved):
        k.put(uri, value, timeout=WAIT)


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_put_scalar(k, restore, proto):
    restore(f"{proto}://variable:b", 2.5)
    assert k.put(f"{proto}://variable:b", -7.25, timeout=WAIT)["error"] == 0
    assert k.get(f"{proto}://variable:b", timeout=WAIT)["value"] == -7.25
    k.put(f"{proto}://channel:long", 123456, timeout=WAIT)
    restore(f"{proto}://channel:long", 42)
    assert k.get(f"{proto}://channel:long", timeout=WAIT)["value"] == 123456


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_put_double_array(k, restore, proto):
    restore(f"{proto}://channel:waveform", [i + 0.5 for i in range(16)])
    data = np.linspace(-1, 1, 16)
    k.put(f"{proto}://channel:waveform", data, timeout=WAIT)
    assert np.allclose(k.get(f"{proto}://channel:waveform", timeout=WAIT)["value"], data)


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_put_signed_short_array_stays_signed(k, restore, proto):
    restore(f"{proto}://channel:short", [-3, -2, -1, 0, 1, 2, 32767, -32768])
    data = [-32768, -5, 4, -3, 2, -1, 0, 32767]
    k.put(f"{proto}://channel:short", data, timeout=WAIT)
    assert list(k.get(f"{proto}://channel:short", timeout=WAIT)["value"]) == data


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_put_enum_by_index_and_by_choice(k, restore, proto):
    uri = f"{proto}://channel:enum"
    restore(uri, 0)
    k.put(uri, 2, timeout=WAIT)
    assert k.get(uri, timeout=WAIT)["value"]["index"] == 2
    k.put(uri, "Fault", timeout=WAIT)
    assert k.get(uri, timeout=WAIT)["value"]["index"] == 3
    with pytest.raises(OperationError) as e:
        k.put(uri, "Exploded", timeout=WAIT)
    assert e.value.error == -2 and "Exploded" in e.value.args[0] and "Standby" in e.value.args[0]


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_put_string(k, restore, proto):
    restore(f"{proto}://channel:string", "hello k2eg")
    k.put(f"{proto}://channel:string", f"set over {proto}", timeout=WAIT)
    assert k.get(f"{proto}://channel:string", timeout=WAIT)["value"] == f"set over {proto}"


def test_put_ca_string_longer_than_ca_allows_is_an_error(k):
    with pytest.raises(OperationError) as e:
        k.put("ca://channel:string", "x" * 60, timeout=WAIT)
    assert e.value.error == -2 and "39" in e.value.args[0]


def test_put_nttable_columns(k, restore):
    original = k.get("pva://pva:table", timeout=WAIT)["value"]
    restore("pva://pva:table", NTTable(labels=["name", "x", "n"], payload={c: list(v) for c, v in original.items()}))
    table = NTTable(labels=["name", "x", "n"]).wrap([{"name": "p", "x": 0.25, "n": -7}, {"name": "q", "x": 9.5, "n": 8}])
    k.put("pva://pva:table", table, timeout=WAIT)
    got = k.get("pva://pva:table", timeout=WAIT)["value"]
    assert list(got["name"]) == ["p", "q"] and list(got["x"]) == [0.25, 9.5] and list(got["n"]) == [-7, 8]


def test_put_struct_sub_field_leaves_the_rest(k, restore):
    restore("pva://pva:struct", Generic("a", {"b": 1}))
    before = k.get("pva://pva:struct", timeout=WAIT)
    k.put("pva://pva:struct", Generic("a", {"b": 42}), timeout=WAIT)
    after = k.get("pva://pva:struct", timeout=WAIT)
    assert after["a"]["b"] == 42
    assert after["a"]["c"] == before["a"]["c"] and after["a"]["label"] == before["a"]["label"]


def test_put_union_member(k, restore):
    restore("pva://pva:struct", Generic("u", {"i": 7}))
    k.put("pva://pva:struct", Generic("u", {"s": "text"}), timeout=WAIT)
    assert k.get("pva://pva:struct", timeout=WAIT)["u"] == {"s": "text"}


@pytest.mark.parametrize("ser", ["msgpack", "json", "msgpack-compact"])
def test_put_reply_on_the_wire(wire, k, restore, ser):
    restore("ca://variable:b", 2.5)
    rec = wire.request({"command": "put", "pv_name": "ca://variable:b", "value": b64({"value": 11.0}),
                        "serialization": ser})
    assert rec.key == b"ca://variable:b" and rec.ser == HEADERS[ser]
    assert rec.value["error"] == 0 and rec.value["message"]
    assert k.get("ca://variable:b", timeout=WAIT)["value"] == 11.0


# ----------------------------------------------------------------------------- info
def test_info_ca(k):
    info = k.info("ca://variable:a", timeout=WAIT)
    assert info["protocol"] == "ca" and info["connected"] is True and info["type"] == "DBR_DOUBLE"
    assert info["structure"]["value"] == "double" and "display" in info["structure"]


def test_info_pva_structure_and_type_id(k):
    info = k.info("pva://pva:struct", timeout=WAIT)
    assert info["protocol"] == "pva" and info["connected"] is True and info["type"] == "k2eg:demo/Struct:1.0"
    assert info["structure"]["a"]["inner"]["values"] == "double[]"
    assert info["structure"]["u"].startswith("union{") and isinstance(info["structure"]["items"], list)


@pytest.mark.parametrize("ser", ["json", "msgpack-compact"])
def test_info_reply_on_the_wire(wire, ser):
    rec = wire.request({"command": "info", "pv_name": "pva://pva:table", "serialization": ser})
    assert rec.ser == HEADERS[ser] and rec.key == b"pva://pva:table"
    assert rec.value["error"] == 0 and rec.value["pva:table"]["type"].startswith("epics:nt/NTTable")


# ----------------------------------------------------------------------------- monitors
def _event_value(rec: Record, name: str) -> Any:
    """The PV value of one event (first leaf of a compact event)."""
    tree = rec.value[name]
    return tree[0] if isinstance(tree, list) else tree["value"]


@pytest.mark.parametrize("ser", ["msgpack", "json", "msgpack-compact"])
@pytest.mark.parametrize("uri", ["ca://channel:counter", "pva://channel:counter", "pva://pva:counter"])
def test_monitor_events_one_per_update_in_order(wire, uri, ser):
    """Each event is its own payload (fix: C++ repeats a batch's first), keyed by the bare name."""
    name = uri.split("://", 1)[1]
    dest = fresh_topic("mon")
    with wire.reader(dest) as events:
        reply = wire.request({"command": "monitor", "pv_name": uri, "monitor_dest_topic": dest, "serialization": ser})
        assert reply.value["error"] == 0 and reply.value["message"] and reply.key == uri.encode()
        recs = events.wait_count(15)
    for r in recs:
        assert r.key == name.encode() and r.ser == HEADERS[ser]
        assert list(r.value) == [name]  # no reply_id, no snapshot_name: the first key is the PV
    if ser == "msgpack-compact":
        assert all(msgpack.unpackb(r.raw)[0] == name for r in recs)
    values = [_event_value(r, name) for r in recs]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert len({r.raw for r in recs}) == len(recs)


def test_two_destinations_share_one_subscription(wire):
    """Both destinations get the same events from one EPICS subscription (seen in the gateway's status)."""
    uri, name = "ca://channel:counter", "channel:counter"
    before = monitor_entry(wire.status(), uri)
    opened_before = before["subscriptions_opened"] if before else 0
    a, b = fresh_topic("share-a"), fresh_topic("share-b")
    with wire.reader(a) as ra, wire.reader(b) as rb:
        for dest, ser in ((a, "msgpack"), (b, "msgpack-compact")):
            rep = wire.request({"command": "monitor", "pv_name": uri, "monitor_dest_topic": dest, "serialization": ser})
            assert rep.value["error"] == 0
        entry = monitor_entry(wire.status(), uri)
        assert entry["destinations"][a] == "msgpack" and entry["destinations"][b] == "msgpack-compact"
        assert entry["subscriptions_opened"] == opened_before + (0 if before else 1)
        rb.wait_count(10)
        first_b = rb.records[0].value[name]
        ra.wait(lambda rs: any(same(leaves(r.value[name]), first_b) for r in rs), what="b's first event in a")
        start = next(i for i, r in enumerate(ra.records) if same(leaves(r.value[name]), first_b))
        ra.wait_count(start + 10)
    seq_a = [leaves(r.value[name]) for r in ra.records[start:start + 10]]
    seq_b = [r.value[name] for r in rb.records[:10]]
    assert same(seq_a, seq_b)


def test_repeated_monitor_republishes_the_current_value(wire):
    """A client that (re)joins sees the current value at once, even of a PV that never changes."""
    uri = "ca://channel:long"
    dest, other = fresh_topic("again"), fresh_topic("again2")
    with wire.reader(dest) as r, wire.reader(other) as r2:
        assert wire.request({"command": "monitor", "pv_name": uri, "monitor_dest_topic": dest}).value["error"] == 0
        r.wait_count(1)
        assert wire.request({"command": "monitor", "pv_name": uri, "monitor_dest_topic": dest}).value["error"] == 0
        r.wait_count(2)
        assert wire.request({"command": "monitor", "pv_name": uri, "monitor_dest_topic": other}).value["error"] == 0
        r2.wait_count(1)
    assert r.records[0].raw == r.records[1].raw == r2.records[0].raw
    assert r.records[0].value["channel:long"]["value"] == 42


def test_monitor_destination_defaults_to_the_reply_topic(wire):
    reply_topic, rid = fresh_topic("rt"), uuid.uuid4().hex
    with wire.reader(reply_topic) as r:
        wire.send({"command": "monitor", "pv_name": "pva://variable:a", "reply_topic": reply_topic, "reply_id": rid})
        r.reply(rid)
        r.wait(lambda rs: any(list(x.value) == ["variable:a"] for x in rs), what="an event")


def test_monitor_of_a_field_name(wire):
    """fix: the .VAL suffix is part of the channel; events are keyed by the name as written."""
    dest = fresh_topic("field")
    with wire.reader(dest) as r:
        rep = wire.request({"command": "monitor", "pv_name": "ca://variable:a.VAL", "monitor_dest_topic": dest})
        assert rep.value["error"] == 0
        rec = r.wait_count(1)[0]
    assert rec.key == b"variable:a.VAL" and isinstance(rec.value["variable:a.VAL"]["value"], float)


def test_multi_monitor_ca_and_pva_publish_on_each_pvs_topic(wire):
    pvs = {"ca://channel:ramp:ramp": "channel_ramp_ramp", "pva://variable:sum": "variable_sum",
           "ca://variable:b.VAL": "variable_b.VAL"}
    readers = {uri: wire.reader(topic) for uri, topic in pvs.items()}
    try:
        rep = wire.request({"command": "multi-monitor", "pv_name_list": list(pvs), "serialization": "json"})
        assert rep.value["error"] == 0 and rep.value["message"] and rep.ser == b"Json"
        for uri, r in readers.items():
            name = uri.split("://", 1)[1]
            rec = r.wait(lambda rs: any(x.key == name.encode() for x in rs), what=f"an event of {uri}")
            ev = next(x for x in rec if x.key == name.encode())
            assert list(ev.value) == [name] and "value" in ev.value[name]
    finally:
        for r in readers.values():
            r.close()


def test_gateway_creates_missing_reply_and_destination_topics(wire, stack):
    """fix: nobody creates reply topics in the old system; the gateway must, not broker auto-create."""
    dest, reply_topic = fresh_topic("made"), fresh_topic("made-reply")
    existing = AdminClient({"bootstrap.servers": stack.bootstrap}).list_topics(timeout=10).topics
    assert dest not in existing and reply_topic not in existing
    rep = wire.request({"command": "monitor", "pv_name": "pva://variable:a", "monitor_dest_topic": dest,
                        "reply_topic": reply_topic})
    assert rep.value["error"] == 0
    created = wire.status()["topics_created"]
    assert dest in created and reply_topic in created


# ----------------------------------------------------------------------------- errors
ERRORS = [
    # (command, error code, fragment of the message, parse error?)
    ({"command": "get", "pv_name": "variable:a"}, -1, "missing protocol prefix", True),
    ({"command": "get", "pv_name": "xyz://variable:a"}, -1, "unknown protocol", True),
    ({"command": "get", "pv_name": "pva://bad name"}, -1, "invalid PV URI", True),
    ({"command": "get"}, -1, "missing required field 'pv_name'", True),
    ({"command": "put", "pv_name": "pva://variable:a"}, -1, "missing required field 'value'", True),
    ({"command": "monitor"}, -1, "missing required field 'pv_name'", True),
    ({"command": "multi-monitor"}, -1, "missing required field 'pv_name_list'", True),
    ({"command": "multi-monitor", "pv_name_list": []}, -1, "must not be empty", True),
    ({"pv_name": "pva://variable:a"}, -1, "missing required field 'command'", True),
    ({"command": "get", "pv_name": 5}, -1, "'pv_name' must be a string", True),
    ({"command": "get", "pv_name": ["pva://variable:a"]}, -1, "'pv_name' must be a string", True),
    ({"command": "multi-monitor", "pv_name_list": "pva://variable:a"}, -1, "must be a list", True),
    ({"command": "multi-monitor", "pv_name_list": ["pva://variable:a", 7]}, -1, "item 1", True),
    ({"command": 42}, -1, "'command' must be a string", True),
    ({"command": "get", "pv_name": "pva://variable:a", "serialization": 3}, -1, "'serialization'", True),
    ({"command": "get", "pv_name": "pva://variable:a", "serialization": "xml"}, -1, "unknown serialization", True),
    ({"command": "put", "pv_name": "pva://variable:a", "value": 42}, -1, "base64 string", True),
    ({"command": "put", "pv_name": "pva://variable:a", "value": "not base64!"}, -1, "not valid base64", True),
    ({"command": "put", "pv_name": "pva://variable:a", "value": base64.b64encode(b"\xc1").decode()}, -1,
     "not valid msgpack", True),
    ({"command": "put", "pv_name": "pva://variable:a", "value": b64([1, 2])}, -3, "msgpack map", True),
    ({"command": "put", "pv_name": "pva://variable:a", "value": b64(42)}, -3, "msgpack map", True),
    ({"command": "put", "pv_name": "pva://variable:a", "value": b64({})}, -1, "empty map", True),
    ({"command": "put", "pv_name": "pva://variable:a", "value": b64({1: 2})}, -1, "not a string", True),
    ({"command": "monitor", "pv_name": "pva://variable:a", "monitor_dest_topic": "no spaces"}, -1,
     "not a Kafka topic name", True),
    ({"command": "fly", "pv_name": "pva://variable:a"}, -1, "unknown command 'fly'", True),
    ({"command": "get", "pv_name": "pva://variable:a", "reply_id": {"a": 1}}, -1, "'reply_id' must be a string", True),
    # errors EPICS reports
    ({"command": "get", "pv_name": "pva://no:such:pv"}, -3, "'no:such:pv' did not connect within 2 s", False),
    ({"command": "get", "pv_name": "ca://no:such:pv"}, -3, "'no:such:pv' did not connect within 2 s", False),
    ({"command": "info", "pv_name": "pva://no:such:pv"}, -3, "did not connect", False),
    ({"command": "put", "pv_name": "ca://variable:a.NOSUCHFIELD", "value": b64({"value": 1})}, -3,
     "'variable:a.NOSUCHFIELD' did not connect", False),
    ({"command": "put", "pv_name": "ca://variable:a", "value": b64({"value": 1, "nosuch": 2})}, -2,
     "'nosuch'", False),
    ({"command": "put", "pv_name": "pva://variable:a", "value": b64({"nosuch": 2})}, -2, "no field 'nosuch'", False),
    ({"command": "put", "pv_name": "pva://variable:a", "value": b64({"value": "abc"})}, -2, "'abc'", False),
    ({"command": "put", "pv_name": "pva://pva:struct", "value": b64({"u": {"nosuch": 1}})}, -2,
     "no member 'nosuch'", False),
]


PARSE_ERRORS = [e for e in ERRORS if e[3]]
EPICS_ERRORS = [e for e in ERRORS if not e[3]]


def _check_error_reply(wire: Wire, doc: dict, code: int, fragment: str, key: bytes) -> None:
    rec = wire.request(doc)
    assert rec.value["error"] == code, rec.value
    assert fragment in rec.value["message"], rec.value
    assert rec.key == key and len(rec.headers) == 1
    ser = doc.get("serialization")
    assert rec.ser == (HEADERS[ser] if isinstance(ser, str) and ser in HEADERS else b"Msgpack")


@pytest.mark.parametrize("ser", ["msgpack", "json"])
@pytest.mark.parametrize("doc,code,fragment,_", PARSE_ERRORS, ids=[e[2][:40] for e in PARSE_ERRORS])
def test_malformed_command_gets_an_error_reply(wire, doc, code, fragment, _, ser):
    """Answered in the command's serialisation, under the fixed parse-error key (PROTOCOL 1, 3)."""
    _check_error_reply(wire, {"serialization": ser, **doc}, code, fragment, PARSE_ERROR_KEY)


@pytest.mark.parametrize("doc,code,fragment,_", EPICS_ERRORS, ids=[e[2][:40] for e in EPICS_ERRORS])
def test_failed_epics_operation_gets_an_error_reply(wire, doc, code, fragment, _):
    """Never silence: an unknown PV is an error after the connection timeout (2 s in the session stack)."""
    key = doc.get("pv_name") or doc["pv_name_list"][0]
    _check_error_reply(wire, doc, code, fragment, key.encode())


@pytest.mark.parametrize("doc", [{"command": "monitor", "pv_name": "ca://no:such:pv"},
                                 {"command": "multi-monitor", "pv_name_list": ["pva://no:such:pv"]}])
def test_a_monitor_of_a_pv_that_does_not_connect_is_accepted_and_says_so(wire, doc):
    """PROTOCOL 4: kept (an IOC may be rebooting), not refused; the message names the PV."""
    key = doc.get("pv_name") or doc["pv_name_list"][0]
    rec = wire.request(doc)
    assert rec.value["error"] == 0 and "not connected yet" in rec.value["message"], rec.value
    assert key in rec.value["message"] and rec.key == key.encode()


def test_numeric_reply_id_is_echoed_as_a_string(wire):
    reply_topic = fresh_topic("num")
    with wire.reader(reply_topic) as r:
        wire.send({"command": "fly", "reply_topic": reply_topic, "reply_id": 17})
        rec = r.reply("17")
    assert rec.value["error"] == -1


def test_commands_without_a_reply_topic_are_logged_and_counted(wire, stack):
    """Nobody to tell: the gateway logs the problem, counts it and keeps serving."""
    marker = f"fly{uuid.uuid4().hex[:12]}"
    before = wire.status()["commands"]
    wire.send({"command": marker})
    wire.send({"command": "get", "pv_name": "pva://variable:a", "reply_id": marker})
    wire.send(b"\xff\xfe not json at all")
    wire.send({"command": "get", "pv_name": "pva://variable:a", "reply_topic": "bad topic name", "reply_id": marker})
    deadline = time.monotonic() + WAIT
    while wire.status()["commands"]["unanswerable"] < before["unanswerable"] + 4:
        assert time.monotonic() < deadline, "the gateway did not count the unanswerable commands"
        time.sleep(0.2)
    log = stack.gateway_log.read_text(errors="replace")
    assert f"unknown command '{marker}'" in log and "missing required field 'reply_topic'" in log
    assert "not a Kafka topic name" in log and "not valid JSON" in log
    assert stack.gateway_pid is not None
