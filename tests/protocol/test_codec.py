import json
import math

import msgpack
import numpy as np

from k2eg.protocol.codec import decode, encode, leaves
from k2eg.protocol.commands import Serialization as S

TREE = {"value": 1.5, "alarm": {"severity": 0, "status": 0, "message": ""},
        "timeStamp": {"secondsPastEpoch": 10, "nanoseconds": 5, "userTag": 0},
        "display": {"limitLow": float("nan"), "units": "mm"}}


def test_msgpack_is_a_plain_map_under_the_pv_name():
    rec = msgpack.unpackb(encode({"error": 0, "reply_id": "r", "x:y": TREE}))
    assert rec["x:y"]["alarm"]["severity"] == 0 and rec["reply_id"] == "r"


def test_signed_short_arrays_stay_signed_and_are_arrays_not_bin():
    data = encode({"w": {"value": np.array([-3, -1, 0, 32767, -32768], dtype=np.int16)}})
    assert msgpack.unpackb(data)["w"]["value"] == [-3, -1, 0, 32767, -32768]
    assert b"\xc4" not in data[:3]


def test_json_nan_is_a_string_and_unions_and_struct_arrays_survive():
    tree = {"value": {"doubleValue": [1.0, math.nan]}, "dimension": [{"size": 2}, {"size": 3}],
            "display": {"limitLow": float("nan")}}
    doc = json.loads(encode({"img": tree}, S.JSON))
    assert doc["img"]["value"] == {"doubleValue": [1.0, "NaN"]}
    assert doc["img"]["dimension"] == [{"size": 2}, {"size": 3}]
    assert doc["img"]["display"]["limitLow"] == "NaN"


def test_compact_event_is_name_then_leaves_depth_first():
    data = encode({"pv": {"value": 3, "alarm": {"severity": 1, "status": 2}}}, S.MSGPACK_COMPACT, "pv")
    assert msgpack.unpackb(data) == ["pv", 3, 1, 2]
    assert decode(data, b"Msgpack-Compact") == {"pv": [3, 1, 2]}


def test_compact_reply_flattens_only_the_value():
    data = encode({"error": 0, "reply_id": "r", "pv": {"value": 3}}, S.MSGPACK_COMPACT, "pv")
    assert msgpack.unpackb(data) == {"error": 0, "reply_id": "r", "pv": [3]}


def test_leaves_walk_structure_arrays():
    assert leaves({"a": [{"x": 1}, {"x": 2}], "b": [1, 2]}) == [1, 2, [1, 2]]


def test_decode_rejects_garbage_with_value_error():
    for data, header in [(b"\xc1", b"Msgpack"), (b"{", b"Json"), (b"\x90", b"Xml")]:
        try:
            decode(data, header)
        except ValueError:
            continue
        raise AssertionError(f"{header} accepted")


def test_decode_takes_the_header_as_bytes_str_or_missing_in_any_case():
    rec = {"pv": {"value": 1.5}}
    packed, as_json = encode(rec, S.MSGPACK), encode(rec, S.JSON)
    for header in (b"msgpack", "msgpack", None, b"MSGPACK", "MsgPack"):
        assert decode(packed, header) == rec, header
    for header in (b"json", "json", b"JSON"):
        assert decode(as_json, header) == rec, header
