"""The published k2eg==0.3.0 client, unchanged, against our gateway (issue: wire compatibility)."""

import pytest

from .conftest import scenario_pair

pytestmark = pytest.mark.e2e

STEPS = "get,put,monitor,monitor_many,errors,snapshot"


legacy, ours = scenario_pair(STEPS, "030")


def test_legacy_get_both_protocols(legacy):
    assert legacy["get ca://channel:short"]["negative"] and legacy["get pva://channel:short"]["negative"]
    for uri in ("ca://variable:a", "pva://variable:a"):
        s = legacy[f"get {uri}"]["shape"]
        assert s["value"] == "float" and {"alarm", "timeStamp", "display", "control"} <= set(s)
    assert set(legacy["get ca://channel:enum"]["shape"]["value"]) == {"index", "choices"}


def test_legacy_put_scalar_vector_table_generic_string(legacy):
    assert legacy["put scalar"] == [3.25, 1.5]
    assert legacy["put vector"] == [[1.0, 2.0, 3.0], [-7, 7, -32768]]
    assert legacy["put table"] == {"name": ["p", "q"], "x": [0.5, 1.5], "n": [10, -20]}
    assert legacy["put generic"] == 42
    assert legacy["put string"] == "hello k2eg"


def test_legacy_monitor_and_monitor_many(legacy):
    for uri in ("pva://pva:counter", "ca://bulk:197"):
        m = legacy[f"monitor {uri}"]
        assert m["names"] == [uri.split("://", 1)[1]] and m["n"]
    assert legacy["monitor_many"] == ["bulk:197", "pva:counter"]


def test_legacy_errors(legacy):
    assert legacy["error unknown pv"] == {"type": "OperationError", "code": -3}
    assert legacy["error bad uri"]["type"] == "ValueError"
    assert legacy["monitor not up"] is None and legacy["stop monitor not up"] is None  # PROTOCOL 4


def test_legacy_one_shot_snapshot(legacy):
    assert legacy["snapshot"] == {"keys": ["channel:counter", "error", "variable:a"], "all_read": True}


def test_our_client_hands_user_code_the_same(legacy, ours):
    for key in legacy:
        assert ours.get(key) == legacy[key], key
    assert set(ours) == set(legacy)
