"""Snapshot results as tables and arrays: pandas DataFrames, numpy arrays, Parquet files.

Works on what the snapshot handlers receive:

- a one-shot result ``{pv_name: [value, ...], "error": 0}`` (``snapshot_sync``),
- one iteration of a repeating snapshot ``{"iteration": n, ..., pv_name: [value, ...]}``,
- or a list of iterations (see ``Recorder``).

Each value tree becomes one row: ``iteration`` (iterations only), ``pv``,
``value``, ``timestamp`` (the EPICS timeStamp, UTC), ``severity``,
``status``, ``message``. Enums give their choice text, records a gateway
could not read give ``value`` None with the INVALID alarm that says why.

pandas and pyarrow are optional (``pip install 'k2eg[data]'``); they are
imported when a function needs them.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["rows", "to_dataframe", "to_wide", "to_numpy", "save_parquet", "Recorder"]

# Keys of handler data that are not PVs.
META = frozenset({"error", "message", "reply_id", "iteration", "header_timestamp", "tail_timestamp", "timestamp",
                  "incomplete", "tags", "truncated", "message-size"})


def _need(module: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{what} needs {module}, an optional dependency of k2eg: "
                          f"pip install 'k2eg[data]' (or pip install {module})") from None


def _iterations(data: Any) -> list[dict]:
    if isinstance(data, dict):
        return [data]
    if isinstance(data, (list, tuple)) and all(isinstance(d, dict) for d in data):
        return list(data)
    raise TypeError("expected a snapshot result dict or a list of iteration dicts, "
                    f"got {type(data).__name__}")


def _scalar(value: Any) -> Any:
    """The user-facing value of a tree's ``value`` field (enums as their choice text)."""
    if isinstance(value, dict) and "index" in value and "choices" in value:
        choices, index = value.get("choices") or [], value.get("index")
        if isinstance(index, int) and 0 <= index < len(choices):
            return choices[index]
        return index
    return value


def _nanoseconds(tree: dict) -> int | None:
    ts = tree.get("timeStamp")
    if not isinstance(ts, dict):
        return None
    s, ns = ts.get("secondsPastEpoch"), ts.get("nanoseconds") or 0
    if isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0:
        return None
    return int(s) * 1_000_000_000 + int(ns)


def rows(data: Any) -> Iterator[dict]:
    """One dict per value: iteration (when known), pv, value, timestamp_ns, severity, status, message."""
    for it in _iterations(data):
        iteration = it.get("iteration")
        for pv, values in it.items():
            if pv in META or not isinstance(values, list):
                continue
            for tree in values:
                row: dict[str, Any] = {"iteration": iteration} if iteration is not None else {}
                row["pv"] = pv
                if isinstance(tree, dict):
                    alarm = tree.get("alarm") if isinstance(tree.get("alarm"), dict) else {}
                    row.update(value=_scalar(tree.get("value")), timestamp_ns=_nanoseconds(tree),
                               severity=alarm.get("severity"), status=alarm.get("status"),
                               message=alarm.get("message"))
                else:  # msgpack-compact leaves, or a bare value
                    row.update(value=tree, timestamp_ns=None, severity=None, status=None, message=None)
                yield row


def to_dataframe(data: Any):
    """A long pandas DataFrame, one row per value (see the module docstring)."""
    pd = _need("pandas", "to_dataframe")
    records = list(rows(data))
    cols = (["iteration"] if any("iteration" in r for r in records) else []) + \
        ["pv", "value", "timestamp_ns", "severity", "status", "message"]
    df = pd.DataFrame.from_records(records, columns=cols)
    # Int64 keeps nanoseconds exact where a float column (NaN for missing stamps) would round them.
    ns = pd.array([r["timestamp_ns"] for r in records], dtype="Int64")
    df.pop("timestamp_ns")
    df["timestamp"] = pd.to_datetime(ns, unit="ns", utc=True)
    order = [c for c in ("iteration", "pv", "value", "timestamp", "severity", "status", "message") if c in df]
    return df[order]


def to_wide(iterations: Any):
    """One row per iteration (index), one column per PV holding its last value in that iteration.

    The natural table of a *normal* repeating snapshot; PVs without a value are NaN/None.
    """
    pd = _need("pandas", "to_wide")
    table: dict[Any, dict[str, Any]] = {}
    for it in _iterations(iterations):
        row = table.setdefault(it.get("iteration"), {})
        for pv, values in it.items():
            if pv in META or not isinstance(values, list):
                continue
            last = values[-1] if values else None
            row[pv] = _scalar(last.get("value")) if isinstance(last, dict) else last
    df = pd.DataFrame.from_dict(table, orient="index")
    df.index.name = "iteration"
    return df


def to_numpy(data: Any) -> dict[str, np.ndarray]:
    """Per PV, its values as one array: scalars 1-D, equal-length waveforms 2-D (one row per value).

    A record the gateway could not read is NaN in a numeric array.
    """
    out: dict[str, list] = {}
    for row in rows(data):
        out.setdefault(row["pv"], []).append(row["value"])
    arrays = {}
    for pv, values in out.items():
        known = [v for v in values if v is not None]
        if known and len(known) < len(values) and all(
                isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in known):
            arrays[pv] = np.array([np.nan if v is None else v for v in values], dtype=float)
            continue
        try:
            arr = np.asarray(values)
            if arr.dtype == object and len(values) and all(isinstance(v, (list, np.ndarray)) for v in values):
                raise ValueError
            arrays[pv] = arr
        except ValueError:  # ragged waveforms or mixed kinds
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            arrays[pv] = arr
    return arrays


# ----------------------------------------------------------------------------- Parquet

def _typed(value: Any) -> tuple[float | None, str | None, list | None, str | None]:
    """A value split over the Parquet columns value / value_text / value_array / value_json."""
    if value is None:
        return None, None, None, None
    if isinstance(value, (bool, np.bool_)):
        return float(value), None, None, None
    if isinstance(value, (int, float, np.number)):
        return float(value), None, None, None
    if isinstance(value, str):
        return None, value, None, None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None, None, [float(v) for v in value], None
    return None, None, None, json.dumps(value, default=str, allow_nan=True)


def save_parquet(data: Any, path: str | Path) -> Path:
    """Write snapshot values (a result, an iteration or a list of iterations) to one Parquet file.

    Columns: iteration (int64, null for one-shot results), pv, timestamp (UTC,
    ns), severity, status, message, and the value split by kind so every
    column has one type: ``value`` (float64: numbers, booleans), ``value_text``
    (strings, enum choices), ``value_array`` (list<float64>: numeric
    waveforms), ``value_json`` (anything else, e.g. tables, as JSON).
    """
    pa = _need("pyarrow", "save_parquet")
    pq = __import__("pyarrow.parquet", fromlist=["parquet"])
    cols: dict[str, list] = {k: [] for k in ("iteration", "pv", "timestamp", "severity", "status", "message",
                                             "value", "value_text", "value_array", "value_json")}
    for row in rows(data):
        num, text, arr, js = _typed(row["value"])
        cols["iteration"].append(row.get("iteration"))
        cols["pv"].append(row["pv"])
        cols["timestamp"].append(row["timestamp_ns"])
        for k in ("severity", "status"):
            v = row[k]
            cols[k].append(v if isinstance(v, int) and not isinstance(v, bool) else None)
        cols["message"].append(row["message"] if isinstance(row["message"], str) else None)
        for k, v in (("value", num), ("value_text", text), ("value_array", arr), ("value_json", js)):
            cols[k].append(v)
    schema = pa.schema([("iteration", pa.int64()), ("pv", pa.string()), ("timestamp", pa.timestamp("ns", tz="UTC")),
                        ("severity", pa.int32()), ("status", pa.int32()), ("message", pa.string()),
                        ("value", pa.float64()), ("value_text", pa.string()), ("value_array", pa.list_(pa.float64())),
                        ("value_json", pa.string())])
    table = pa.Table.from_pydict(cols, schema=schema)
    path = Path(path)
    pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------- collecting

class Recorder:
    """A repeating-snapshot handler that keeps the iterations it receives (thread-safe).

    ``k.snapshot_recurring(props, rec := Recorder())``, later ``rec.to_dataframe()``,
    ``rec.to_wide()`` or ``rec.save_parquet("run.parquet")``. ``limit`` keeps
    only the newest iterations.
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self._lock = threading.Lock()
        self._iterations: list[dict] = []
        self.snapshot_name: str | None = None

    def __call__(self, snapshot_name: str, data: dict) -> None:
        with self._lock:
            self.snapshot_name = snapshot_name
            self._iterations.append(data)
            if self.limit is not None and len(self._iterations) > self.limit:
                del self._iterations[: len(self._iterations) - self.limit]

    @property
    def iterations(self) -> list[dict]:
        with self._lock:
            return list(self._iterations)

    def __len__(self) -> int:
        with self._lock:
            return len(self._iterations)

    def to_dataframe(self):
        return to_dataframe(self.iterations)

    def to_wide(self):
        return to_wide(self.iterations)

    def save_parquet(self, path: str | Path) -> Path:
        return save_parquet(self.iterations, path)
