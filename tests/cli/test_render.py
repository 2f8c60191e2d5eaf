"""The CLI's output formats, checked on value trees alone (no Kafka, no IOC)."""
import io
import json
import math
from datetime import timezone

import numpy as np
import pytest
from rich.console import Console

from k2eg.cli import render as r

TS = {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 123_456_789, "userTag": 0}
SCALAR = {
    "value": 1.5,
    "alarm": {"severity": 1, "status": 3, "message": "HIGH"},
    "timeStamp": TS,
    "display": {"limitLow": -100.0, "units": "mm"},
}


def rendered(renderable) -> str:
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(renderable)
    return out.getvalue()


# ----------------------------------------------------------------------------- JSON

def test_json_safe_turns_numpy_into_lists_and_non_finite_floats_into_strings():
    tree = {"value": np.array([1.0, np.nan, np.inf, -np.inf]), "n": np.int16(-3), "t": (1, 2), "b": b"hi"}
    assert r.to_json_safe(tree) == {"value": [1.0, "NaN", "Infinity", "-Infinity"], "n": -3, "t": [1, 2], "b": "hi"}


def test_json_keeps_signed_integers_and_exact_floats():
    text = r.to_json({"value": np.array([-3, -2, -1], dtype=np.int16), "x": 0.1})
    assert json.loads(text) == {"value": [-3, -2, -1], "x": 0.1}


def test_json_is_strict_even_with_nan():
    text = r.to_json({"value": float("nan")}, indent=2)
    assert json.loads(text) == {"value": "NaN"}
    assert "NaN" in text and "\n" in text


def test_json_one_line_by_default():
    assert "\n" not in r.to_json(SCALAR)


# ----------------------------------------------------------------------------- put values

@pytest.mark.parametrize("text,expected", [
    ("42", 42), ("-1.5", -1.5), ("1e3", 1000.0), ("[1, 2, 3]", [1, 2, 3]), ('{"a": 1}', {"a": 1}),
    ('"42"', "42"), ("true", True), ("On", "On"), ("Standby mode", "Standby mode"), ("01", "01"), ("", ""),
])
def test_put_value_is_json_when_it_parses_else_text(text, expected):
    value = r.parse_put_value(text)
    assert value == expected and type(value) is type(expected)


def test_put_value_nan_is_a_float():
    assert math.isnan(r.parse_put_value("NaN"))


def test_put_value_null_is_refused():
    with pytest.raises(ValueError, match="null"):
        r.parse_put_value("null")


# ----------------------------------------------------------------------------- filters

def test_split_fields_accepts_repeats_and_commas_without_duplicates():
    assert r.split_fields(["value", "alarm,timeStamp", " value "]) == ["value", "alarm", "timeStamp"]


def test_filter_keeps_only_top_level_fields_in_the_order_asked():
    assert list(r.filter_fields(SCALAR, ["timeStamp", "value"])) == ["timeStamp", "value"]
    assert r.filter_fields(SCALAR, []) is SCALAR


def test_filter_typo_names_the_available_fields():
    with pytest.raises(ValueError, match="'valeu'.*fields: value, alarm, timeStamp, display"):
        r.filter_fields(SCALAR, ["valeu"])


# ----------------------------------------------------------------------------- cells

@pytest.mark.parametrize("value,text", [
    (1.5, "1.5"), (0.1, "0.1"), (float("nan"), "NaN"), (float("-inf"), "-Infinity"), (True, "true"),
    (None, "null"), ("", '""'), ("hello", "hello"), (np.float32(2.5), "2.5"), (-7, "-7"),
])
def test_scalar_cells(value, text):
    assert r.format_scalar(value) == text


def test_short_arrays_are_shown_whole_and_strings_quoted():
    assert r.format_array([1, 2, 3]) == "[1, 2, 3]"
    assert r.format_array(["a, b", "c"]) == '["a, b", "c"]'


def test_long_arrays_show_head_tail_and_length():
    text = r.format_array(np.arange(1000))
    assert text == "[0, 1, 2, 3, 4, 5, 6, 7, …, 998, 999] (1000 items)"


def test_long_strings_are_clipped_with_their_length():
    text = r.format_scalar("x" * 1000)
    assert len(text) < 300 and text.endswith("(1000 chars)")


# ----------------------------------------------------------------------------- tree rows

def test_rows_dot_nested_fields_in_order():
    rows = dict(r.tree_rows(SCALAR, tz=timezone.utc))
    assert list(rows)[:2] == ["value", "alarm.severity"]
    assert rows["value"] == "1.5"
    assert rows["display.units"] == "mm"
    assert rows["display.limitLow"] == "-100.0"


def test_rows_name_the_severity_and_date_the_timestamp():
    rows = dict(r.tree_rows(SCALAR, tz=timezone.utc))
    assert rows["alarm.severity"] == "1 (MINOR)"
    assert rows["timeStamp"] == "2023-11-14 22:13:20.123456789"
    assert rows["timeStamp.nanoseconds"] == "123456789"


def test_rows_show_the_enum_choice_and_keep_its_members():
    rows = dict(r.tree_rows({"value": {"index": 2, "choices": ["Off", "On", "Standby"]}}))
    assert rows["value"] == "Standby (index 2)"
    assert rows["value.index"] == "2"
    assert rows["value.choices"] == '["Off", "On", "Standby"]'


def test_rows_abbreviate_waveforms():
    rows = dict(r.tree_rows({"value": list(range(16))}))
    assert rows["value"].endswith("(16 items)")


def test_rows_expand_structure_arrays_with_indices_and_count_the_rest():
    items = [{"key": f"k{i}", "weight": float(i)} for i in range(r.STRUCT_LIMIT + 5)]
    rows = dict(r.tree_rows({"items": items}))
    assert rows["items[0].key"] == "k0" and rows["items[1].weight"] == "1.0"
    assert rows["items[…]"] == f"5 more of {r.STRUCT_LIMIT + 5}"


def test_rows_of_empty_and_bare_values():
    assert r.tree_rows({"s": {}, "a": []}) == [("s", "{}"), ("a", "[]")]
    assert r.tree_rows(3) == [("value", "3")]


def test_timestamp_zero_means_not_set():
    assert r.format_timestamp({"secondsPastEpoch": 0, "nanoseconds": 0}) == "(not set)"
    assert r.format_timestamp(TS, tz=timezone.utc, digits=3) == "2023-11-14 22:13:20.123"


# ----------------------------------------------------------------------------- summaries

def test_value_summary_of_the_common_shapes():
    assert r.value_summary(SCALAR) == "1.5"
    assert r.value_summary({"value": {"index": 1, "choices": ["Off", "On"]}}) == "On"
    assert r.value_summary({"value": list(range(100))}).endswith("(100 items)")
    assert r.value_summary({"value": "text"}) == "text"
    assert r.value_summary({"value": {"index": 9, "choices": ["Off"]}}) == "9"


NTTABLE = {"labels": ["name", "x"], "value": {"name": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]}}


def test_nttable_is_recognised_and_summarised():
    assert r.is_nttable(NTTABLE)
    assert not r.is_nttable(SCALAR)
    assert not r.is_nttable({"labels": ["a"], "value": {"a": [1], "b": [1, 2]}})
    assert r.value_summary(NTTABLE) == "table 3 rows × 2 columns (name, x)"


def test_nttable_table_has_one_column_per_label():
    text = rendered(r.nttable_table(NTTABLE, max_rows=2))
    assert "name" in text and "x" in text and "a" in text and "2.0" in text
    assert "3.0" not in text and "2 of 3 rows" in text


def test_fields_table_does_not_interpret_values_as_markup():
    text = rendered(r.fields_table({"value": "[bold]x[/bold]", "w": [1, 2]}))
    assert "[bold]x[/bold]" in text and "[1, 2]" in text


def test_monitor_row_counts_updates_and_names_the_severity():
    row = r.MonitorRow("variable:a")
    row.update(SCALAR, tz=timezone.utc)
    row.update({**SCALAR, "value": 2.5}, tz=timezone.utc)
    assert (row.value, row.severity, row.count) == ("2.5", 1, 2)
    text = rendered(r.monitor_table([row, r.MonitorRow("variable:b")], caption="Ctrl-C to stop"))
    assert "variable:a" in text and "MINOR" in text and "2023-11-14 22:13:20.123" in text
    assert "(waiting)" in text and "Ctrl-C to stop" in text


def test_snapshot_rows_keep_the_asked_order_and_count_values():
    result = {"b": [{"value": 1}, {"value": 2}], "a": [{"value": 9}], "error": 0}
    assert r.snapshot_rows(result, ["a", "b", "c"]) == [("a", "9", 1), ("b", "2", 2), ("c", "(no value)", 0)]
    text = rendered(r.snapshot_table(r.snapshot_rows(result, ["a", "b"])))
    assert "latest value" in text and "count" in text


# ----------------------------------------------------------------------------- gateway status

def _gw(gid, **extra):
    return {"gateway": {"id": gid, "uptime_s": 3725}, "state": "running", "monitors_active": 1,
            "pvs": {"total": 2, "connected": 1}, "rates": {"events_published_per_s": 12.5, "commands_per_s": 0.0},
            "snapshots": [], "records_lost": 0, **extra}


def _text(table):
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_the_live_answer_replaces_its_gateways_beacon_and_comes_first():
    merged = r.merge_gateways([_gw("b:1", last_seen_s=4.0), _gw("a:2", last_seen_s=2.0)],
                                   _gw("b:1", monitors=[]))
    assert [g["gateway"]["id"] for g in merged] == ["b:1", "a:2"]
    assert merged[0]["answered"] and merged[0]["last_seen_s"] == 0.0 and "monitors" in merged[0]


def test_gateways_table_marks_the_answering_and_the_silent_gateways():
    text = _text(r.gateways_table(r.merge_gateways([_gw("old:9", last_seen_s=95.0)], _gw("live:1"))))
    assert "live:1 *" in text and "1h02m05s" in text and "1/2" in text and "12.5/s" in text
    assert "silent" in text and "95 s ago" in text


def test_monitor_status_rows_are_the_busiest_first_and_capped():
    status = {"monitors": [{"pv": f"ca://pv{i}", "connected": True, "events": i, "events_per_s": float(i),
                            "destinations": {f"t{i}": "msgpack"}} for i in range(40)]}
    text = _text(r.monitors_status_table(status, limit=5))
    assert "ca://pv39" in text and "ca://pv35" in text and "ca://pv34" not in text
    assert "5 busiest of 40" in text


def test_snapshot_status_rows_name_type_and_progress():
    text = _text(r.snapshots_status_table({"snapshots": [
        {"name": "orbit", "type": "normal", "triggered": True, "pvs": 3, "iteration": 7, "published": 6,
         "failures": 0}]}))
    assert "orbit" in text and "normal (triggered)" in text and " 7 " in text


def test_capped_lists_show_the_gateways_totals():
    status = {"monitors": [{"pv": f"ca://pv{i}", "events_per_s": float(i)} for i in range(40)], "monitors_total": 9000,
              "snapshots": [{"name": "a"}], "snapshots_total": 3, "topics_created": ["t"] * 5,
              "topics_created_total": 12000, "topics_purging": [], "topics_purging_total": 0,
              "reply_topics": {"created": 1000, "limit": 1000, "refused": 4}}
    assert "30 busiest of 9000" in _text(r.monitors_status_table(status, limit=30))
    assert "1 shown of 3" in _text(r.snapshots_status_table(status))
    assert r.totals_line(status) == ("totals: monitors 9000, snapshots 3, topics created 12000, being purged 0, "
                                     "reply topics created 1000/1000 (4 refused)")
    assert "3" in _text(r.gateways_table([{**status, "gateway": {"id": "g:1"}, "state": "running"}]))
    assert r.totals_line({"monitors": [{}], "snapshots": []}).startswith("totals: monitors 1, snapshots 0")
