"""The storage interface, on every backend: the same tests, files in tmp or a throwaway PostgreSQL."""
import pytest

from k2eg.archiver.model import Rows, column_rows, tree_of

from .backends import BACKENDS, open_store

S = 1_000_000_000


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    return request.param


@pytest.fixture
def store(backend, tmp_path, request):
    s = open_store(backend, tmp_path, request)
    yield s
    s.close()


def counter(rows, topic, pv, first, n, t0=100, partition=0, offset0=0):
    for i in range(n):
        rows.add_event(topic, partition, offset0 + i, (t0 + i) * 1000, pv,
                       {"value": first + i, "alarm": {"severity": 0, "status": 0, "message": ""},
                        "timeStamp": {"secondsPastEpoch": t0 + i, "nanoseconds": 0, "userTag": 0},
                        "display": {"units": "counts"}})


def test_history_is_every_value_in_time_order(store):
    rows = Rows()
    counter(rows, "a", "pv:a", 0, 50)
    counter(rows, "b", "pv:b", 1000, 10)
    assert store.write(rows) == 60
    h = store.history("pv:a", 110 * S, 119 * S)
    assert h["value"] == [float(v) for v in range(10, 20)]
    assert [r["display"] for r in map(tree_of, column_rows(h))] == [{"units": "counts"}] * 10
    assert store.history("pv:a", 0, 10**19)["offset"] == list(range(50))
    assert store.history("pv:a", 0, 10**19, limit=7)["offset"] == list(range(7))
    assert store.history("pv:zzz", 0, 10**19)["offset"] == []


def test_a_republished_event_is_listed_once(store):
    from k2eg.archiver.store import drop_republished
    rows = Rows()
    counter(rows, "a", "pv:a", 0, 3)
    counter(rows, "a", "pv:a", 2, 1, t0=102, offset0=3)        # the gateway published value 2 again
    counter(rows, "a", "pv:a", 3, 2, t0=103, offset0=4)
    rows.add_event("a", 0, 6, 0, "pv:a", {"value": 7})          # no EPICS stamp: never merged
    rows.add_event("a", 0, 7, 0, "pv:a", {"value": 7})
    store.write(rows)
    h = store.history("pv:a", 0, 10**19)
    assert len(h["offset"]) == 8                              # every record is stored
    assert drop_republished(h)["value"] == [7.0, 7.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_history_orders_by_time_not_arrival(store):
    rows = Rows()
    rows.add_event("a", 0, 0, 0, "pv", {"value": 2, "timeStamp": {"secondsPastEpoch": 20, "nanoseconds": 0}})
    rows.add_event("a", 0, 1, 0, "pv", {"value": 1, "timeStamp": {"secondsPastEpoch": 10, "nanoseconds": 0}})
    store.write(rows)
    assert store.history("pv", 0, 100 * S)["value"] == [1.0, 2.0]


def test_a_batch_written_twice_is_stored_once(store, backend, tmp_path, request):
    rows = Rows()
    counter(rows, "a", "pv:a", 0, 20)
    assert store.write(rows) == 20
    assert store.write(rows) == 0
    more = Rows()
    counter(more, "a", "pv:a", 15, 10, t0=115, offset0=15)     # overlaps 15..19, new 20..24
    assert store.write(more) == 5
    assert store.history("pv:a", 0, 10**19)["offset"] == list(range(25))
    assert store.stored_offsets()[("a", 0)] == 24
    store.close()
    again = open_store(backend, tmp_path, request)            # a restarted archiver: the store remembers
    try:
        assert again.stored_offsets()[("a", 0)] == 24
        assert again.write(more) == 0
        assert again.history("pv:a", 0, 10**19)["offset"] == list(range(25))
    finally:
        again.close()


def test_values_at_is_the_newest_at_or_before(store):
    rows = Rows()
    counter(rows, "a", "pv:a", 0, 10, t0=100)
    counter(rows, "b", "pv:b", 100, 10, t0=105)
    store.write(rows)
    at = store.values_at(["pv:a", "pv:b", "pv:c"], 104 * S + 5)
    assert dict(zip(at["pv"], at["value"])) == {"pv:a": 4.0}
    at = store.values_at(["pv:a", "pv:b"], 106 * S)
    assert dict(zip(at["pv"], at["value"])) == {"pv:a": 6.0, "pv:b": 101.0}
    assert store.values_at([], 106 * S)["pv"] == []


def test_many_small_writes_read_like_one(backend, tmp_path, request):
    s = open_store(backend, tmp_path, request, compact_after=4)
    try:
        for i in range(11):
            rows = Rows()
            counter(rows, "a", "pv:a", i * 3, 3, t0=100 + i * 3, offset0=i * 3)
            s.write(rows)
        assert s.history("pv:a", 0, 10**19)["value"] == [float(v) for v in range(33)]
    finally:
        s.close()


def snapshot_rows(rows, name, iteration, off, values, ts):
    rows.add_mark(name, iteration, 0, ts, {"run": str(iteration)}, 0, name, 0, off)
    for i, (pv, v) in enumerate(values):
        rows.add_event(name, 0, off + 1 + i, ts, pv, {"value": v}, name, iteration)
    rows.add_mark(name, iteration, 2, ts + 5, None, 0, name, 0, off + 1 + len(values))
    return off + 2 + len(values)


def test_snapshot_iterations_come_back_whole(store):
    rows = Rows()
    off = 0
    for it in range(1, 6):
        off = snapshot_rows(rows, "orbit", it, off, [("x", it), ("y", -it), ("x", it + 0.5)], it * 1000)
    snapshot_rows(rows, "other", 1, 0, [("x", 99)], 3000)
    store.write(rows)
    its = store.iterations("orbit", 2000, 4005)
    assert [i["iteration"] for i in its] == [2, 3, 4]
    third = its[1]
    assert third["header_ms"] == 3000 and third["tail_ms"] == 3005 and third["tags"] == '{"run": "3"}'
    assert [tree_of(r) for r in column_rows(third["events"])] == [{"value": 3}, {"value": -3}, {"value": 3.5}]
    (newest,) = store.iterations("orbit", None, 2500, newest_only=True)
    assert newest["iteration"] == 2 and newest["events"]["value"] == [2.0, -2.0, 2.5]
    assert store.iterations("orbit", None, 10, newest_only=True) == []


def test_restarted_iteration_numbers_stay_apart(store):
    rows = Rows()
    off = snapshot_rows(rows, "s", 1, 0, [("x", 1)], 1000)
    off = snapshot_rows(rows, "s", 2, off, [("x", 2)], 2000)
    snapshot_rows(rows, "s", 1, off, [("x", 10)], 3000)     # the snapshot restarted: numbering again from 1
    store.write(rows)
    its = store.iterations("s", None, None)
    assert [(i["iteration"], i["events"]["value"]) for i in its] == [(1, [1.0]), (2, [2.0]), (1, [10.0])]


def test_snapshot_events_stay_out_of_pv_history(store):
    rows = Rows()
    snapshot_rows(rows, "s", 1, 0, [("x", 1)], 1000)
    rows.add_event("x", 0, 0, 1000, "x", {"value": 5})
    store.write(rows)
    assert store.history("x", 0, 10**19)["value"] == [5.0]
    assert store.values_at(["x"], 10**19)["value"] == [5.0]
