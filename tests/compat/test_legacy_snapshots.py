"""The published k2eg==0.3.0 client's snapshot calls against our gateway, next to our client's.

0.3.0 joins a repeating snapshot's topic only after the start reply, so it
may miss the first iterations: assertions look at what it received once it
had joined (consecutive iterations, one call per trigger), never at ``1``.
Its handlers run on a thread pool, so order is not compared either.
"""

import pytest

from .conftest import scenario_pair

pytestmark = pytest.mark.e2e

STEPS = "snap_one_shot,snap_recurring_normal,snap_recurring_timed,snap_triggered"


legacy, ours = scenario_pair(STEPS, "snap")


ITERATION_KEYS = ["header_timestamp", "iteration", "tail_timestamp", "timestamp"]


def test_legacy_one_shot_snapshot_with_duplicate_and_unknown_pv(legacy):
    s = legacy["snap_one_shot"]
    assert s["id_matches"]
    assert s["keys"] == ["channel:counter", "no:such:pv", "variable:a"]
    assert s["counts"] == {"channel:counter": 1, "no:such:pv": 1, "variable:a": 1}
    # The unknown PV did not end the snapshot early (its record has error 0) and says what happened.
    assert s["unknown"] == {"has_value": False, "severity": 3, "names_pv": True}
    assert {"value", "alarm", "timeStamp"} <= set(s["counter_shape"])


def test_legacy_recurring_normal(legacy):
    s = legacy["snap_recurring_normal"]
    assert s["first_arg"] == ["topic"]                     # 0.3.0 passes the publishing topic
    assert s["publishing_topic"] and s["n"] and s["consecutive"] and s["every_pv"] and s["one_value_each"]
    assert s["keys"] == sorted(ITERATION_KEYS + ["channel:counter", "channel:enum", "variable:a"])


def test_legacy_recurring_timedbuffered_with_sub_push_and_filter(legacy):
    s = legacy["snap_recurring_timed"]
    assert s["first_arg"] == ["topic"]
    assert s["n"] and s["consecutive"] and s["every_pv"] and s["several_per_window"]
    assert s["filtered"] == ["value"]
    assert s["keys"] == sorted(ITERATION_KEYS + ["channel:counter", "variable:b"])


def test_legacy_triggered_one_call_per_trigger(legacy):
    s = legacy["snap_triggered"]
    assert s["untriggered"] == 0 and s["after_five"] == 5
    assert s["first_arg"] == ["topic"] and s["consecutive"] and s["every_pv"]


def test_our_client_hands_user_code_the_same_except_the_snapshot_name(legacy, ours):
    assert ours["snap_one_shot"] == legacy["snap_one_shot"]
    for step in ("snap_recurring_normal", "snap_recurring_timed", "snap_triggered"):
        mine, theirs = dict(ours[step]), dict(legacy[step])
        assert mine.pop("first_arg") == ["name"] and theirs.pop("first_arg") == ["topic"]
        mine_keys = set(mine.pop("keys"))
        assert mine_keys - {"tags"} == set(theirs.pop("keys")), step
        assert mine == theirs, step
