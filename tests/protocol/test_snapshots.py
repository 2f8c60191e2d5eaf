from k2eg.protocol import replies as R
from k2eg.protocol.snapshots import IterationAssembler, OneShotCollector, is_unreadable


def run(records, pvs=("a", "b")):
    out = []
    asm = IterationAssembler("s", list(pvs), out.append)
    for r in records:
        asm.feed(r)
    return out, asm


def H(it, ts=None, **kw):
    rec = R.snapshot_header("s", ts if ts is not None else it * 10, it)
    rec.update(kw)
    return rec


def D(name, value, it):
    return R.snapshot_data(name, value, it * 10 + 1, it)


def T(it, **kw):
    return R.snapshot_tail("s", it * 10 + 2, it, **kw)


def test_complete_iteration_has_every_pv_and_timestamps():
    out, _ = run([R.snapshot_header("s", 100, 1), R.snapshot_data("a", {"value": 1}, 101, 1),
                  R.snapshot_tail("s", 102, 1)])
    assert out == [{"iteration": 1, "header_timestamp": 100, "tail_timestamp": 102, "timestamp": 102,
                    "a": [{"value": 1}], "b": []}]


def test_lost_tail_is_reported_incomplete_and_next_iteration_proceeds():
    out, asm = run([H(1), D("a", 1, 1), H(2), D("b", 2, 2), T(2)])
    assert [o["iteration"] for o in out] == [1, 2]
    assert out[0]["incomplete"] is True and out[0]["a"] == [1] and "incomplete" not in out[1]
    assert asm.incomplete == 1


def test_lost_tail_detected_by_data_of_the_next_iteration():
    out, _ = run([H(1), D("a", 1, 1), D("a", 2, 2), T(2)])
    assert [(o["iteration"], o.get("incomplete", False), o["a"]) for o in out] == [(1, True, [1]), (2, True, [2])]


def test_lost_header_after_sync_opens_from_data_and_flags_it():
    out, _ = run([H(4), T(4), D("a", 1, 5), T(5)])
    assert out[1]["iteration"] == 5 and out[1]["incomplete"] is True and out[1]["a"] == [1]
    assert out[1]["header_timestamp"] is None


def test_late_header_is_merged_into_the_iteration_its_data_opened():
    out, _ = run([H(1), T(1), D("a", 7, 2), H(2), D("b", 8, 2), T(2)])
    assert out[1] == {"iteration": 2, "header_timestamp": 20, "tail_timestamp": 22, "timestamp": 22,
                      "a": [7], "b": [8]}


def test_lone_tail_is_one_empty_incomplete_iteration_so_triggers_are_counted():
    out, asm = run([H(1), T(1), T(2), H(3), T(3)])
    assert [o["iteration"] for o in out] == [1, 2, 3]
    assert out[1]["incomplete"] is True and out[1]["a"] == [] and asm.missed == 0


def test_stragglers_and_duplicates_are_ignored():
    out, _ = run([H(2), D("a", 1, 1), T(1), D("a", 5, 2), T(2), D("a", 9, 2), T(2)])
    assert len(out) == 1 and out[0]["a"] == [5] and "incomplete" not in out[0]


def test_records_before_the_first_header_are_skipped():
    out, asm = run([D("a", 1, 7), T(7), H(8), T(8)])
    assert [o["iteration"] for o in out] == [8] and asm.skipped == 2


def test_missing_iterations_are_counted():
    out, asm = run([H(1), T(1), H(4), T(4)])
    assert [o["iteration"] for o in out] == [1, 4] and asm.missed == 2


def test_restarted_snapshot_numbers_from_one_again():
    out, _ = run([H(5), T(5), H(1), D("a", 1, 1), T(1), H(2), T(2)])
    assert [o["iteration"] for o in out] == [5, 1, 2] and all("incomplete" not in o for o in out)


def test_error_tail_marks_the_iteration_incomplete():
    out, _ = run([H(1), T(1, error_code=-2, message="broker hiccup")])
    assert out[0]["incomplete"] is True


def test_tags_of_a_triggered_iteration_reach_the_handler():
    out, _ = run([H(1, tags={"shot": "42"}), T(1)])
    assert out[0]["tags"] == {"shot": "42"}


def test_garbage_is_ignored():
    out, _ = run([None, [], {"message_type": 9, "iter_index": 1}, {"message_type": 0, "iter_index": "x"},
                  {"message_type": 0, "iter_index": True}, H(1), T(1)])
    assert len(out) == 1


def test_one_shot_collects_until_completion():
    done = []
    c = OneShotCollector(["a", "b"], done.append)
    c.feed(R.value("r", "a", {"value": 1}))
    assert not done
    c.feed(R.snapshot_complete("r"))
    assert done == [{"a": [{"value": 1}], "b": []}]
    c.feed(R.value("r", "b", {"value": 2}))       # after completion: ignored
    assert done[0]["b"] == []


def test_one_shot_refused_command_reports_error_and_message():
    done = []
    c = OneShotCollector(["a"], done.append)
    c.feed(R.error("r", -1, "field 'time_window_msec' must be between 0 and 86400000, got -5"))
    assert done[0]["error"] == -1 and "time_window_msec" in done[0]["message"]


def test_unreadable_record_is_recognised():
    from k2eg.gateway.snapshots import unreadable
    assert is_unreadable(unreadable("PV 'x' did not connect within 2 s"))
    assert not is_unreadable({"value": 1, "alarm": {"severity": 3}}) and not is_unreadable(3)


def test_tags_on_the_tail_of_a_scheduled_window_a_trigger_closed_reach_the_handler():
    out, _ = run([H(1), D("a", 1, 1), T(1, tags={"shot": "7"})])
    assert out[0]["tags"] == {"shot": "7"} and "incomplete" not in out[0]


def test_a_truncated_window_says_how_many_values_were_left_out():
    out, _ = run([H(1), D("a", 1, 1), T(1, truncated=12), H(2), T(2), H(3), T(3, truncated="x")])
    assert out[0]["truncated"] == 12 and out[0]["a"] == [1] and "incomplete" not in out[0]
    assert "truncated" not in out[1] and "truncated" not in out[2]
