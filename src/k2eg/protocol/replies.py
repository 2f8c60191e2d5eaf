"""Reply and event records, and the Kafka keys they travel under (PROTOCOL sections 1, 4, 6).

Each record is built in exactly one place so client and gateway agree on it.
"""
from __future__ import annotations

from typing import Any

from .errors import ErrorCode

PARSE_ERROR_KEY = "k2eg-parse-error"        # key of replies to commands that could not be read
SNAPSHOT_KEY = "snapshot-dist-key"          # one-shot snapshot records
REPEATING_REPLY_KEY = "repeating-snapshot-events"
STATUS_KEY = "k2eg-status"                  # ext: replies to 'status'


def ok(reply_id: str | None, message: str | None = None, **extra: Any) -> dict:
    rec: dict[str, Any] = {"error": 0, "reply_id": reply_id}
    if message is not None:
        rec["message"] = message
    rec.update(extra)
    return rec


def error(reply_id: str | None, code: int, message: str) -> dict:
    """Every failed command answers with this; ``message`` says what is wrong."""
    return {"error": int(code), "reply_id": reply_id, "message": message}


def value(reply_id: str | None, name: str, tree: Any) -> dict:
    """get success, and each PV record of a one-shot snapshot."""
    return {"error": 0, "reply_id": reply_id, name: tree}


def event(name: str, tree: Any) -> dict:
    """A monitor event: only the PV key, so 0.3.0 clients take the first key as the PV."""
    return {name: tree}


def status(reply_id: str | None, state: dict) -> dict:
    """ext: a gateway's state (counters, monitors, subscriptions) under ``status``."""
    return {"error": 0, "reply_id": reply_id, "status": state}


def snapshot_complete(reply_id: str | None) -> dict:
    return {"error": int(ErrorCode.SNAPSHOT_COMPLETE), "reply_id": reply_id}


# Repeating snapshot stream (PROTOCOL section 7).
HEADER, DATA, TAIL = 0, 1, 2


def snapshot_header(snapshot_name: str, timestamp_ms: int, iteration: int) -> dict:
    return {"message_type": HEADER, "snapshot_name": snapshot_name, "timestamp": timestamp_ms, "iter_index": iteration}


def snapshot_data(name: str, tree: Any, timestamp_ms: int, iteration: int) -> dict:
    return {"message_type": DATA, "timestamp": timestamp_ms, "iter_index": iteration, name: tree}


def snapshot_tail(snapshot_name: str, timestamp_ms: int, iteration: int, error_code: int = 0, **extra: Any) -> dict:
    rec = {"message_type": TAIL, "error": error_code, "iter_index": iteration, "timestamp": timestamp_ms,
           "snapshot_name": snapshot_name}
    rec.update(extra)
    return rec
