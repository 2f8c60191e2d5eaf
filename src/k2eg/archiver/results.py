"""Answers of the archiver -> what the client hands to user code (pure; pandas only for the frame forms)."""
from __future__ import annotations

from typing import Any

from . import wire
from .model import column_rows, iteration_record, trees_of

FRAME_COLUMNS = ("pv", "time", "value", "text", "severity", "status", "message", "kafka_ms")


def columns_of(parts: list[dict]) -> dict[str, list]:
    """Event answer records (any order) -> their columns joined in part order."""
    ordered = sorted(parts, key=lambda r: r.get("part", 0))
    return wire.concat_columns([wire.unwire_columns(r["columns"]) for r in ordered])


def trees(cols: dict[str, list]) -> list[dict]:
    """Columns -> value trees (what a monitor handler got), in row order."""
    return trees_of(cols)


def iterations_of(parts: list[dict]) -> list[dict]:
    """Iteration answer records -> handler-shaped iterations (as ``snapshot_recurring`` delivers them)."""
    ordered = sorted(parts, key=lambda r: r.get("part", 0))
    out = []
    for it in wire.merge_iterations(ordered):
        out.append(iteration_record(it, column_rows(it["columns"])))
    return out


def frame(cols: dict[str, list]):
    """Columns -> a pandas DataFrame: ``pv``, ``time`` (UTC), ``value``, ``text``, alarm, ``kafka_ms``;
    arrays and structures in ``tree``."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("the DataFrame form needs pandas: pip install 'k2eg[data]'") from None
    df = pd.DataFrame({
        "pv": cols["pv"],
        "time": pd.to_datetime(pd.Series(cols["t_ns"], dtype="int64"), unit="ns", utc=True),
        "value": pd.Series(cols["value"], dtype="float64"),
        "text": cols["text"],
        "severity": pd.Series(cols["severity"], dtype="Int16"),
        "status": pd.Series(cols["status"], dtype="Int16"),
        "message": cols["message"],
        "kafka_ms": pd.Series(cols["kafka_ms"], dtype="int64"),
    })
    if any(d is not None for d in cols["data"]):
        df["tree"] = [t.get("value") if isinstance(t, dict) else t for t in trees(cols)]
    return df


def snapshot_frame(iterations: list[dict]) -> Any:
    from k2eg.snapshot_data import to_dataframe
    return to_dataframe(iterations)
