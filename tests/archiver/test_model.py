"""Value trees <-> archive rows: every kind of tree comes back equal."""
import numpy as np
import pytest

from k2eg.archiver.model import Rows, column_rows, iteration_record, tree_of

TREES = [
    {"value": 3.5, "alarm": {"severity": 0, "status": 0, "message": "NO_ALARM"},
     "timeStamp": {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 123, "userTag": 0},
     "display": {"limitLow": 0.0, "limitHigh": 10.0, "units": "mm", "description": "", "precision": 3, "form": {}}},
    {"value": 7, "alarm": {"severity": 2, "status": 3}, "timeStamp": {"secondsPastEpoch": 5, "nanoseconds": 9}},
    {"value": True},
    {"value": "text value", "alarm": {"severity": 0, "status": 0, "message": ""}},
    {"value": [1, 2, 3], "timeStamp": {"secondsPastEpoch": 5, "nanoseconds": 0, "userTag": 4}},
    {"value": {"index": 1, "choices": ["a", "b"]}, "alarm": {"severity": 0, "status": 0, "message": ""}},
    {"alarm": {"severity": 3, "status": 9, "message": "cannot read"}},          # unreadable PV: no value
    {"value": None, "extra": {"x": 1}},
    {"labels": ["a"], "value": {"a": [1.0, 2.0]}},
]


@pytest.mark.parametrize("tree", TREES)
def test_a_tree_comes_back_equal(tree):
    rows = Rows()
    rows.add_event("t", 0, 5, 1_000, "pv:x", tree)
    (row,) = column_rows(rows.events)
    assert tree_of(row) == tree


def test_a_scalar_is_a_number_and_the_time_axis_is_the_epics_stamp():
    rows = Rows()
    rows.add_event("t", 0, 1, 1_000, "pv", TREES[0])
    rows.add_event("t", 0, 2, 2_000, "pv", {"value": 1})              # no timeStamp: Kafka's time
    assert rows.events["value"] == [3.5, 1.0]
    assert rows.events["t_ns"] == [1_700_000_000 * 10**9 + 123, 2_000 * 10**6]
    assert rows.events["epics_ns"] == [1_700_000_000 * 10**9 + 123, None]
    assert rows.events["severity"] == [0, None]


def test_numpy_arrays_are_kept_whole():
    rows = Rows()
    rows.add_event("t", 0, 1, 1, "pv", {"value": np.arange(4, dtype=np.int16) - 2})
    assert tree_of(column_rows(rows.events)[0]) == {"value": [-2, -1, 0, 1]}


def test_an_opaque_record_is_kept_whole():
    rows = Rows()
    rows.add_event("t", 0, 1, 1, "pv", [1, "a", 2.5])     # a msgpack-compact event: leaves only
    assert tree_of(column_rows(rows.events)[0]) == [1, "a", 2.5]


def test_keep_after_drops_what_is_stored():
    rows = Rows()
    for off in range(5):
        rows.add_event("t", 0, off, 1, "pv", {"value": off})
    rows.add_event("u", 1, 0, 1, "pv", {"value": 9})
    rows.add_mark("s", 1, 2, 5, None, 0, "s", 0, 3)
    kept = rows.keep_after({("t", 0): 2, ("s", 0): 3})
    assert kept.events["offset"] == [3, 4, 0] and kept.events["topic"] == ["t", "t", "u"]
    assert kept.marks["offset"] == []
    assert rows.high_offsets() == {("t", 0): 4, ("u", 1): 0, ("s", 0): 3}


def test_iteration_record_has_the_handler_shape():
    rows = Rows()
    rows.add_event("s", 0, 1, 1, "a", {"value": 1}, "snap", 3)
    rows.add_event("s", 0, 2, 1, "a", {"value": 2}, "snap", 3)
    data = iteration_record({"iteration": 3, "header_ms": 10, "tail_ms": 20, "tags": '{"k": "v"}'},
                            column_rows(rows.events), ["a", "b"])
    assert data == {"iteration": 3, "header_timestamp": 10, "tail_timestamp": 20, "timestamp": 20,
                    "a": [{"value": 1}, {"value": 2}], "b": [], "tags": {"k": "v"}}


def test_trees_of_columns_equal_tree_of_each_row():
    from k2eg.archiver.model import trees_of
    rows = Rows()
    for i, tree in enumerate(TREES * 2):
        rows.add_event("t", 0, i, 1_000, "pv:x", tree)
    assert trees_of(rows.events) == [tree_of(r) for r in column_rows(rows.events)] == TREES * 2
