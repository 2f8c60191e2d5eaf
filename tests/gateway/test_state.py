"""State records of the gateway (monitors and repeating snapshots kept across restarts), without Kafka."""
from __future__ import annotations

import json

import pytest

from k2eg.gateway import state as S
from k2eg.protocol import commands as C
from k2eg.protocol.codec import encode
from k2eg.protocol.uri import parse_pv_uri


def monitor(uri="ca://channel:counter", dest="dest-topic", ser=C.Serialization.JSON, **kw) -> C.Monitor:
    return C.Monitor(pv=parse_pv_uri(uri), destination=dest, serialization=ser, **kw)


def repeating(**kw) -> C.RepeatingSnapshot:
    base = dict(snapshot_name="My_Snap-1", pvs=(parse_pv_uri("ca://variable:a"), parse_pv_uri("pva://pva:counter")),
                time_window_msec=250, repeat_delay_msec=100, sub_push_delay_msec=50, triggered=False,
                kind=C.SnapshotKind.TIMED_BUFFERED, field_filter=("value", "alarm"),
                serialization=C.Serialization.MSGPACK_COMPACT)
    base.update(kw)
    return C.RepeatingSnapshot(**base)


def test_monitor_round_trip_keeps_pv_destination_serialisation_and_created_flag():
    item = S.MonitorState(monitor(), created_topic=True)
    key, value = S.encode_state(item)
    back = S.decode_state(value)
    assert back == item and back.key.encode() == key


def test_snapshot_round_trip_keeps_every_setting():
    item = S.SnapshotState(repeating())
    key, value = S.encode_state(item)
    back = S.decode_state(value)
    assert back.command == item.command and key == S.snapshot_key("My_Snap-1").encode()


def test_reply_address_is_not_kept_so_a_resumed_command_answers_nobody():
    item = S.MonitorState(monitor(reply_topic="app-reply", reply_id="r1"))
    _, value = S.encode_state(item)
    assert b"app-reply" not in value and b"r1" not in value
    back = S.decode_state(value).command
    assert back.reply_topic is None and back.reply_id is None


def test_keys_separate_pv_and_topic_unambiguously():
    a = S.monitor_key(parse_pv_uri("ca://x"), "t")
    assert a != S.monitor_key(parse_pv_uri("pva://x"), "t")
    assert a != S.monitor_key(parse_pv_uri("ca://x"), "u")
    assert S.monitor_key(parse_pv_uri("ca://x"), "t") != S.snapshot_key("x")


@pytest.mark.parametrize("value, why", [
    (b"\xff\x00", "not JSON"),
    (b"[1, 2]", "not a state record"),
    (b'{"version": 1}', "not a state record"),
    (b'{"version": 99, "command": {"command": "monitor"}}', "version"),
    (b'{"version": 1, "command": {"command": "monitor", "pv_name": "nope"}}', "invalid command"),
    (b'{"version": 1, "command": {"command": "get", "pv_name": "ca://x"}}', "not kept"),
])
def test_garbage_is_a_clear_state_error(value, why):
    with pytest.raises(S.StateError, match=why):
        S.decode_state(value)


def test_reduction_keeps_the_latest_per_key_and_drops_tombstoned_keys():
    records = [(b"a", b"1"), (b"b", b"1"), (b"a", b"2"), (b"b", None), (None, b"x"), (b"c", b"1"), (b"b", b"3"),
               (b"c", None)]
    assert S.reduce_records(records) == {b"a": b"2", b"b": b"3"}


def test_a_tombstone_then_a_restart_of_the_same_monitor_is_active():
    item = S.MonitorState(monitor())
    key, value = S.encode_state(item)
    assert S.decode_all(S.reduce_records([(key, value), (key, None), (key, value)])) == [item]
    assert S.decode_all(S.reduce_records([(key, value), (key, None)])) == []


def test_decode_all_skips_garbage_and_records_under_a_foreign_key(caplog):
    good = S.MonitorState(monitor())
    snap = S.SnapshotState(repeating())
    gk, gv = S.encode_state(good)
    sk, sv = S.encode_state(snap)
    latest = {gk: gv, b"junk": b"{not json", sk: sv, b"wrong-key": gv}
    assert S.decode_all(latest) == [good, snap]
    assert "junk" in caplog.text and "wrong-key" in caplog.text


@pytest.mark.parametrize("ser", list(C.Serialization))
def test_iteration_of_a_snapshot_record_in_any_serialisation(ser):
    tail = {"message_type": 2, "error": 0, "iter_index": 7, "timestamp": 1, "snapshot_name": "s"}
    assert S.iteration_of(encode(tail, ser), ser.header) == 7


@pytest.mark.parametrize("value, header", [(None, None), (b"\xc1", b"Msgpack"), (json.dumps({"x": 1}).encode(), b"Json"),
                                           (json.dumps({"iter_index": "3"}).encode(), b"Json"),
                                           (json.dumps({"iter_index": True}).encode(), b"Json")])
def test_iteration_of_anything_else_is_none(value, header):
    assert S.iteration_of(value, header) is None
