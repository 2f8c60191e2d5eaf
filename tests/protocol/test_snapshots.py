from k2eg.protocol import replies as R
from k2eg.protocol.snapshots import IterationAssembler, OneShotCollector


def run(records, pvs=("a", "b")):
    out = []
    asm = IterationAssembler("s", list(pvs), out.append)
    for r in records:
        asm.feed(r)
    return out


def test_complete_iteration_has_every_pv_and_timestamps():
    out = run([R.snapshot_header("s", 100, 1), R.snapshot_data("a", {"value": 1}, 101, 1), R.snapshot_tail("s", 102, 1)])
    assert out == [{"iteration": 1, "header_timestamp": 100, "tail_timestamp": 102, "timestamp": 102,
                    "a": [{"value": 1}], "b": []}]


def test_lost_tail_is_reported_incomplete_and_next_iteration_proceeds():
    out = run([R.snapshot_header("s", 1, 1), R.snapshot_data("a", 1, 1, 1),
               R.snapshot_header("s", 2, 2), R.snapshot_data("b", 2, 2, 2), R.snapshot_tail("s", 3, 2)])
    assert [o["iteration"] for o in out] == [1, 2]
    assert out[0]["incomplete"] is True and "incomplete" not in out[1]


def test_lost_header_starts_iteration_from_data_and_flags_it():
    out = run([R.snapshot_data("a", 1, 1, 5), R.snapshot_tail("s", 3, 5)])
    assert out[0]["iteration"] == 5 and out[0]["incomplete"] is True and out[0]["a"] == [1]


def test_stragglers_and_foreign_tails_are_ignored():
    out = run([R.snapshot_header("s", 1, 3), R.snapshot_data("a", 1, 1, 2), R.snapshot_tail("s", 1, 2),
               R.snapshot_tail("s", 4, 3)])
    assert len(out) == 1 and out[0]["a"] == []


def test_one_shot_collects_until_completion():
    done = []
    c = OneShotCollector(["a", "b"], done.append)
    c.feed(R.value("r", "a", {"value": 1}))
    assert not done
    c.feed(R.snapshot_complete("r"))
    assert done == [{"a": [{"value": 1}], "b": []}]
