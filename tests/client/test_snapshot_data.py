"""Snapshot results -> pandas / numpy / Parquet (k2eg.snapshot_data)."""
import builtins

import numpy as np
import pytest

from k2eg import snapshot_data as SD
from k2eg.gateway.snapshots import unreadable


def v(value, secs=1_700_000_000, ns=500, severity=0):
    return {"value": value, "alarm": {"severity": severity, "status": 0, "message": "NO_ALARM"},
            "timeStamp": {"secondsPastEpoch": secs, "nanoseconds": ns, "userTag": 0}}


ONE_SHOT = {"error": 0, "a": [v(1.5)], "enum": [v({"index": 1, "choices": ["Off", "On"]})],
            "wave": [v([1.0, 2.0, 3.0])], "text": [v("hello")], "lost": [unreadable("PV 'lost' did not connect")],
            "table": [v({"x": [1, 2], "y": ["p", "q"]})]}

ITERATIONS = [
    {"iteration": 1, "header_timestamp": 1, "tail_timestamp": 2, "timestamp": 2, "a": [v(1.0), v(2.0)], "b": [v(10)]},
    {"iteration": 2, "header_timestamp": 3, "tail_timestamp": 4, "timestamp": 4, "a": [v(3.0)], "b": []},
]


def test_dataframe_of_a_one_shot_result():
    df = SD.to_dataframe(ONE_SHOT)
    assert list(df.columns) == ["pv", "value", "timestamp", "severity", "status", "message"]
    by = df.set_index("pv")
    assert by.loc["a", "value"] == 1.5 and by.loc["enum", "value"] == "On" and by.loc["wave", "value"] == [1.0, 2.0, 3.0]
    assert by.loc["lost", "value"] is None and by.loc["lost", "severity"] == 3 and "connect" in by.loc["lost", "message"]
    assert str(by.loc["a", "timestamp"]) == "2023-11-14 22:13:20.000000500+00:00"
    assert "error" not in set(df["pv"])


def test_dataframe_and_wide_table_of_iterations():
    df = SD.to_dataframe(ITERATIONS)
    assert list(df["iteration"]) == [1, 1, 1, 2] and list(df["pv"]) == ["a", "a", "b", "a"]
    wide = SD.to_wide(ITERATIONS)
    assert list(wide.index) == [1, 2] and wide.loc[1, "a"] == 2.0 and wide.loc[2, "a"] == 3.0
    assert wide.loc[1, "b"] == 10 and wide.loc[2, "b"] is None or np.isnan(wide.loc[2, "b"])


def test_numpy_arrays():
    arrays = SD.to_numpy(ITERATIONS)
    assert arrays["a"].tolist() == [1.0, 2.0, 3.0] and arrays["a"].dtype == float
    assert SD.to_numpy({"w": [v([1, 2]), v([3, 4])]})["w"].shape == (2, 2)
    ragged = SD.to_numpy({"w": [v([1, 2]), v([3])]})["w"]
    assert ragged.dtype == object and len(ragged) == 2
    with_lost = SD.to_numpy({"a": [v(1), unreadable("gone")]})["a"]
    assert with_lost[0] == 1 and np.isnan(with_lost[1])


def test_parquet_round_trip(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = SD.save_parquet(ITERATIONS + [{"iteration": 3, **{k: x for k, x in ONE_SHOT.items() if k != "error"}}],
                           tmp_path / "snap.parquet")
    t = pq.read_table(path).to_pandas()
    assert len(t) == 4 + 6
    assert t["value"].iloc[0] == 1.0 and t["iteration"].iloc[0] == 1
    row = t[t["pv"] == "wave"].iloc[0]
    assert list(row["value_array"]) == [1.0, 2.0, 3.0]
    assert t[t["pv"] == "enum"]["value_text"].iloc[0] == "On"
    assert '"x"' in t[t["pv"] == "table"]["value_json"].iloc[0]
    assert t[t["pv"] == "lost"]["severity"].iloc[0] == 3


def test_recorder_collects_iterations_as_a_handler():
    rec = SD.Recorder(limit=1)
    for it in ITERATIONS:
        rec("snap", it)
    assert len(rec) == 1 and rec.iterations[0]["iteration"] == 2 and rec.snapshot_name == "snap"
    assert list(rec.to_dataframe()["iteration"]) == [2]


def test_missing_optional_dependency_has_a_clear_message(monkeypatch):
    real = builtins.__import__

    def no_pandas(name, *a, **kw):
        if name == "pandas":
            raise ImportError("no pandas here")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match=r"pip install 'k2eg\[data\]'"):
        SD.to_dataframe(ONE_SHOT)
