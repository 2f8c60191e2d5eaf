"""``k2eg.serialization``: the 0.3.0 put values, plus the positional forms its docs promised."""
from __future__ import annotations

import base64

import msgpack
import numpy as np
import pytest

from k2eg.serialization import Generic, MessagePackSerializable, NTTable, Scalar, Vector


def unpacked(v: MessagePackSerializable):
    return msgpack.unpackb(base64.b64decode(v.to_base_64()), raw=False)


@pytest.mark.parametrize("value, expected", [
    (Scalar("value", 3.25), {"value": 3.25}),          # 0.3.0: key first
    (Scalar(payload=1.5), {"value": 1.5}),             # 0.3.0 keywords
    (Scalar(key="VAL", payload=2), {"VAL": 2}),
    (Scalar(42), {"value": 42}),                        # positional payload
    (Scalar(), {"value": ""}),                          # 0.3.0 default payload
    (Vector([1, 2, 3]), {"value": [1, 2, 3]}),
    (Vector("value", [1.0, 2.0]), {"value": [1.0, 2.0]}),
    (Vector(payload=[-7, 7]), {"value": [-7, 7]}),
    (Vector(), {"value": []}),
    (Generic("a", {"b": 42}), {"a": {"b": 42}}),
    (Generic({"a": {"b": 1}}), {"value": {"a": {"b": 1}}}),
])
def test_values_become_the_map_written_to_the_pv(value, expected):
    assert value.to_dict() == expected
    assert unpacked(value) == expected


def test_a_string_first_argument_is_the_key_as_in_0_3_0():
    """``Scalar("text")`` meant key='text' in 0.3.0; keep it so old scripts write the same field."""
    assert Scalar("text").to_dict() == {"text": ""}
    assert Scalar("value", "text").to_dict() == {"value": "text"}


def test_numpy_payloads_travel_as_signed_msgpack_arrays():
    """numpy arrays are not msgpack bin, and int16 stays signed (PROTOCOL 5)."""
    v = Vector(np.array([-3, -2, 32767, -32768], dtype=np.int16))
    raw = msgpack.unpackb(v.to_msgpack(), raw=False)
    assert raw == {"value": [-3, -2, 32767, -32768]}
    assert unpacked(Scalar(np.float32(1.5))) == {"value": 1.5}


def test_nttable_by_columns():
    t = NTTable(labels=["name", "x", "n"])
    assert t.set_column("name", ["p", "q"]) is t
    t.set_column("x", [0.5, 1.5]).set_column("n", np.array([10, -20], dtype=np.int32))
    assert unpacked(t) == {"value": {"name": ["p", "q"], "x": [0.5, 1.5], "n": [10, -20]}}


def test_nttable_unknown_column_names_the_labels():
    with pytest.raises(ValueError, match="'y'.*name, x"):
        NTTable(labels=["name", "x"]).set_column("y", [1])


def test_nttable_wrap_rows_of_dicts_or_sequences():
    """0.3.0's wrap() wrote to an attribute that did not exist; ours fills the columns."""
    t = NTTable(labels=["name", "x"]).wrap([{"name": "a", "x": 1.0}, ("b", 2.0), ["c", 3.0]])
    assert t.to_dict() == {"value": {"name": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]}}


@pytest.mark.parametrize("rows, error", [
    ([{"name": "a"}], ValueError),     # a missing column
    ([("a",)], ValueError),            # too short
    ([42], TypeError),                 # not a row
])
def test_nttable_wrap_rejects_bad_rows(rows, error):
    with pytest.raises(error):
        NTTable(labels=["name", "x"]).wrap(rows)


def test_unexpected_keywords_are_refused():
    with pytest.raises(TypeError, match="colour"):
        Scalar(colour=1)


def test_equality_and_repr_help_debugging():
    assert Vector([1, 2]) == Vector("value", [1, 2]) and Vector([1]) != Scalar([1])
    assert "payload=[1, 2]" in repr(Vector([1, 2]))
