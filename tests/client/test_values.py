"""``put_value_map``: what ``dml.put`` accepts and the map it sends."""
from __future__ import annotations

import numpy as np
import pytest

from k2eg.client.values import put_value_map
from k2eg.protocol.commands import decode_put_value, encode_put_value
from k2eg.serialization import Generic, NTTable, Scalar, Vector


@pytest.mark.parametrize("value, expected", [
    (42, {"value": 42}),
    (2.5, {"value": 2.5}),
    (True, {"value": True}),
    ("text", {"value": "text"}),
    ([1, 2, 3], {"value": [1, 2, 3]}),
    ((1, 2), {"value": [1, 2]}),
    (np.array([-1, 2], dtype=np.int16), {"value": [-1, 2]}),
    (np.array([[1, 2], [3, 4]]), {"value": [[1, 2], [3, 4]]}),
    (np.float64(1.25), {"value": 1.25}),
    (np.int32(-7), {"value": -7}),
    (Scalar(42), {"value": 42}),
    (Vector([1, 2, 3]), {"value": [1, 2, 3]}),
    (Generic("a", {"b": 1}), {"a": {"b": 1}}),
    (NTTable(labels=["x"]).set_column("x", [1.0]), {"value": {"x": [1.0]}}),
])
def test_plain_and_wrapped_values(value, expected):
    m = put_value_map(value)
    assert m == expected
    assert decode_put_value(encode_put_value(m)) == expected  # survives the wire


def test_numpy_scalars_become_python_numbers():
    assert type(put_value_map(np.float32(0.5))["value"]) is float
    assert all(type(x) is int for x in put_value_map(np.array([1, 2], dtype=np.uint8))["value"])


def test_any_object_with_to_dict_works():
    """0.3.0's own Scalar (another package) has to_dict too; duck typing keeps old scripts working."""
    class Legacy:
        def to_dict(self):
            return {"value": 9}

    assert put_value_map(Legacy()) == {"value": 9}


@pytest.mark.parametrize("bad", [None, object(), {1, 2}])
def test_unsupported_values_are_a_clear_error(bad):
    with pytest.raises(ValueError, match="cannot put"):
        put_value_map(bad)
