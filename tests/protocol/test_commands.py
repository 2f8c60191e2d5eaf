import base64
import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2eg.protocol import commands as C
from k2eg.protocol.uri import parse_pv_uri

PV = parse_pv_uri("pva://variable:a")


def cmd(**doc):
    return C.parse_command(json.dumps(doc).encode())


def err(raw):
    with pytest.raises(C.CommandError) as e:
        C.parse_command(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
    return e.value


@pytest.mark.parametrize("c", [
    C.Get(reply_topic="app-reply", reply_id="1", pv=PV),
    C.Put(reply_topic="app-reply", reply_id="2", pv=parse_pv_uri("ca://x.VAL"), value={"value": [1, -2, 3.5]}),
    C.Info(reply_topic="r", reply_id="3", pv=PV, serialization=C.Serialization.JSON),
    C.Monitor(reply_topic="r", reply_id="4", pv=PV, destination="variable_a"),
    C.MultiMonitor(reply_topic="r", reply_id="5", pvs=(PV, parse_pv_uri("ca://y"))),
    C.Monitor(reply_topic="r", reply_id="4b", pv=PV, destination="d", max_events_per_second=2.5),
    C.MultiMonitor(reply_topic="r", reply_id="5b", pvs=(PV,), max_events_per_second=10.0),
    C.Snapshot(reply_topic="r", reply_id="6", pvs=(PV,), time_window_msec=250),
    C.RepeatingSnapshot(reply_topic="r", reply_id="7", snapshot_name="s-1", pvs=(PV,), repeat_delay_msec=10,
                        triggered=True, kind=C.SnapshotKind.TIMED_BUFFERED, field_filter=("value",)),
    C.SnapshotTrigger(reply_topic="r", reply_id="8", snapshot_name="s", tags={"a": "b"}),
    C.SnapshotStop(reply_topic="r", reply_id="9", snapshot_name="s"),
])
def test_round_trip(c):
    assert C.parse_command(C.to_json(c)) == c


def test_0_3_0_monitor_command_with_extra_fields():
    c = cmd(command="monitor", serialization="msgpack", pv_name="pva://variable:a", activate=True,
            reply_topic="app-reply", reply_id="x", monitor_dest_topic="variable_a")
    assert isinstance(c, C.Monitor) and c.destination == "variable_a"


def test_monitor_destination_defaults_to_reply_topic():
    assert cmd(command="monitor", pv_name="ca://x", reply_topic="r").destination == "r"


def test_monitor_rate_cap_is_optional_and_a_positive_number():
    assert cmd(command="monitor", pv_name="ca://x", reply_topic="r").max_events_per_second is None
    assert cmd(command="monitor", pv_name="ca://x", reply_topic="r", max_events_per_second=5).max_events_per_second \
        == 5.0
    for bad in (0, -1, "5", True, 1e9, [1]):
        e = err({"command": "monitor", "pv_name": "ca://x", "reply_topic": "r", "max_events_per_second": bad})
        assert e.code == -1 and "max_events_per_second" in e.message and e.envelope.reply_topic == "r"
    e = err(b'{"command": "multi-monitor", "pv_name_list": ["ca://x"], "reply_topic": "r", '
            b'"max_events_per_second": NaN}')
    assert "max_events_per_second" in e.message


def test_serialization_is_case_insensitive():
    assert cmd(command="get", pv_name="ca://x", reply_topic="r", serialization="Msgpack-Compact").serialization \
        is C.Serialization.MSGPACK_COMPACT


def test_duplicate_pvs_are_served_once():
    c = cmd(command="snapshot", pv_name_list=["ca://a", "ca://a", "pva://a"], reply_topic="r", reply_id="1")
    assert [p.uri for p in c.pvs] == ["ca://a", "pva://a"]


@pytest.mark.parametrize("doc,fragment", [
    (b"not json", "not valid JSON"),
    (b"[1]", "must be a JSON object"),
    ({"reply_topic": "r"}, "missing required field 'command'"),
    ({"command": "fly", "reply_topic": "r"}, "unknown command 'fly'"),
    ({"command": "get", "reply_topic": "r"}, "missing required field 'pv_name'"),
    ({"command": "get", "pv_name": "ca://x"}, "missing required field 'reply_topic'"),
    ({"command": "get", "pv_name": 5, "reply_topic": "r"}, "must be a string"),
    ({"command": "put", "pv_name": "ca://x", "reply_topic": "r"}, "missing required field 'value'"),
    ({"command": "put", "pv_name": "ca://x", "value": "@@", "reply_topic": "r"}, "not valid base64"),
    ({"command": "snapshot", "pv_name_list": [], "reply_topic": "r"}, "must not be empty"),
    ({"command": "snapshot", "pv_name_list": "ca://x", "reply_topic": "r"}, "must be a list"),
    ({"command": "snapshot", "pv_name_list": ["ca://x"], "time_window_msec": -1, "reply_topic": "r"}, "between"),
    ({"command": "repeating_snapshot", "snapshot_name": "a b", "pv_name_list": ["ca://x"], "reply_topic": "r"},
     "invalid snapshot_name"),
    ({"command": "repeating_snapshot", "snapshot_name": "a", "pv_name_list": ["ca://x"], "type": "weird",
      "reply_topic": "r"}, "'normal' or 'timedbuffered'"),
    ({"command": "get", "pv_name": "ca://x", "reply_topic": "r", "serialization": "xml"}, "unknown serialization"),
])
def test_errors_name_the_problem_and_keep_the_reply_address(doc, fragment):
    e = err(doc)
    assert fragment in e.message and e.code == -1
    if isinstance(doc, dict) and "reply_topic" in doc:
        assert e.envelope.reply_topic == "r"


def test_put_of_non_map_is_code_minus_3():
    value = base64.b64encode(msgpack.packb([1, 2])).decode()
    e = err({"command": "put", "pv_name": "ca://x", "value": value, "reply_topic": "r"})
    assert e.code == -3 and "msgpack map" in e.message


def test_deep_put_value_is_refused():
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["a"] = {}
        node = node["a"]
    value = base64.b64encode(msgpack.packb(deep)).decode()
    assert "nested deeper" in err({"command": "put", "pv_name": "ca://x", "value": value, "reply_topic": "r"}).message


def test_deep_json_is_refused_not_crashing():
    assert "JSON" in err(b"[" * 100_000).message


@settings(max_examples=500, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                    max_leaves=20))
def test_any_json_yields_command_or_command_error(doc):
    try:
        C.parse_command(json.dumps(doc).encode())
    except C.CommandError as e:
        assert e.message
