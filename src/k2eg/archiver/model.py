"""What the archive stores, as plain rows, and how a value tree becomes one and back (pure, no I/O).

One row per archived Kafka record: a monitor event, or one Data record of a
repeating snapshot. A value tree is split so that what changes per event is
in typed columns and what rarely changes is one blob that the backends store
once per distinct value:

- ``value``: a number (ints, floats, bools) or ``text`` (strings); any other
  ``value`` field (arrays, enums, tables, unions) is kept whole in ``data``;
- ``severity``, ``status``, ``message``: the alarm;
- ``epics_ns``: the EPICS time stamp in ns since 1970 (None when the tree has
  none), ``user_tag`` its userTag;
- ``rest``: every other field (display, control, valueAlarm ...), msgpack.

A record that is not a value tree (a msgpack-compact event is a bare list of
leaves) is kept whole in ``data`` with ``opaque`` set.

The time axis of every query is ``t_ns``: the EPICS time stamp, else the
Kafka time stamp. Rows are unique by (topic, partition, offset).

Numbers are stored as float64: integers beyond 2**53 lose precision (EPICS
int64 values that large are rare; their text form is not kept).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgpack

from k2eg.protocol.codec import _np_default

#: Column names and order of the events table, shared by every backend.
EVENT_COLUMNS = ("topic", "partition", "offset", "pv", "t_ns", "epics_ns", "kafka_ms", "value", "text", "data",
                 "severity", "status", "message", "user_tag", "rest", "opaque", "snapshot", "iteration")
#: Columns of the marks table: one row per Header (kind 0) and per Tail (kind 2) of a repeating snapshot.
MARK_COLUMNS = ("snapshot", "iteration", "kind", "ts_ms", "tags", "error", "topic", "partition", "offset")

_pack = msgpack.Packer(default=_np_default, use_bin_type=True, autoreset=True).pack
_TREE_FIELDS = ("value", "alarm", "timeStamp")


def pack(obj: Any) -> bytes:
    return _pack(obj)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass
class Rows:
    """A batch of rows in columns (what every backend writes in one transaction)."""

    events: dict[str, list] = field(default_factory=lambda: {c: [] for c in EVENT_COLUMNS})
    marks: dict[str, list] = field(default_factory=lambda: {c: [] for c in MARK_COLUMNS})

    def __len__(self) -> int:
        return len(self.events["offset"]) + len(self.marks["offset"])

    def add_event(self, topic: str, partition: int, offset: int, kafka_ms: int, pv: str, tree: Any,
                  snapshot: str | None = None, iteration: int | None = None) -> None:
        ev = self.events
        ev["topic"].append(topic)
        ev["partition"].append(partition)
        ev["offset"].append(offset)
        ev["pv"].append(pv)
        ev["kafka_ms"].append(kafka_ms)
        ev["snapshot"].append(snapshot)
        ev["iteration"].append(iteration)
        value = text = data = message = rest = user_tag = epics_ns = None
        severity = status = None
        opaque = not isinstance(tree, dict)
        if opaque:
            data = pack(tree)
        else:
            v = tree.get("value")
            if isinstance(v, (bool, int, float)) and not (isinstance(v, int) and abs(v) > 1 << 63):
                value = float(v)
            elif isinstance(v, str):
                text = v
            elif "value" in tree:
                data = pack(v)
            alarm = tree.get("alarm")
            if isinstance(alarm, dict):
                severity, status, message = alarm.get("severity"), alarm.get("status"), alarm.get("message")
            ts = tree.get("timeStamp")
            if isinstance(ts, dict) and isinstance(ts.get("secondsPastEpoch"), int):
                epics_ns = ts["secondsPastEpoch"] * 1_000_000_000 + int(ts.get("nanoseconds") or 0)
                user_tag = ts.get("userTag")
            others = {k: tree[k] for k in tree if k not in _TREE_FIELDS}
            if others or "value" not in tree:
                # the marker keeps apart a tree without 'value' (an unreadable PV) from one with value None
                rest = pack(others if "value" in tree else {**others, "\0novalue": True})
        ev["value"].append(value)
        ev["text"].append(text)
        ev["data"].append(data)
        ev["severity"].append(severity)
        ev["status"].append(status)
        ev["message"].append(message)
        ev["user_tag"].append(user_tag)
        ev["epics_ns"].append(epics_ns)
        ev["t_ns"].append(epics_ns if epics_ns is not None else kafka_ms * 1_000_000)
        ev["rest"].append(rest)
        ev["opaque"].append(opaque)

    def add_mark(self, snapshot: str, iteration: int, kind: int, ts_ms: int | None, tags: dict | None,
                 error: int, topic: str, partition: int, offset: int) -> None:
        """A Header (kind 0) or Tail (kind 2) of a repeating snapshot's iteration."""
        it = self.marks
        for k, v in (("snapshot", snapshot), ("iteration", iteration), ("kind", kind), ("ts_ms", ts_ms),
                     ("tags", json.dumps(tags) if tags else None), ("error", error),
                     ("topic", topic), ("partition", partition), ("offset", offset)):
            it[k].append(v)

    def keep_after(self, floor: dict[tuple[str, int], int]) -> "Rows":
        """Only the rows whose offset is above ``floor`` of their partition (what is not stored yet)."""
        out = Rows()
        for src, dst in ((self.events, out.events), (self.marks, out.marks)):
            keep = [i for i, (t, p, o) in enumerate(zip(src["topic"], src["partition"], src["offset"]))
                    if o > floor.get((t, p), -1)]
            if len(keep) == len(src["offset"]):
                dst.update(src)
            else:
                for c, col in src.items():
                    dst[c] = [col[i] for i in keep]
        return out

    def high_offsets(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for src in (self.events, self.marks):
            for t, p, o in zip(src["topic"], src["partition"], src["offset"]):
                if o > out.get((t, p), -1):
                    out[(t, p)] = o
        return out


def tree_of(row: dict) -> Any:
    """A stored row back into the value tree it came from."""
    if row.get("opaque"):
        return unpack(row["data"])
    tree: dict[str, Any] = {}
    rest = unpack(row["rest"]) if row.get("rest") is not None else {}
    novalue = rest.pop("\0novalue", False)
    if not novalue:
        if row.get("data") is not None:
            tree["value"] = unpack(row["data"])
        elif row.get("text") is not None:
            tree["value"] = row["text"]
        else:
            tree["value"] = row.get("value")
    if row.get("severity") is not None or row.get("status") is not None or row.get("message") is not None:
        alarm: dict[str, Any] = {"severity": row.get("severity"), "status": row.get("status")}
        if row.get("message") is not None:
            alarm["message"] = row["message"]
        tree["alarm"] = alarm
    if row.get("epics_ns") is not None:
        secs, ns = divmod(int(row["epics_ns"]), 1_000_000_000)
        ts = {"secondsPastEpoch": secs, "nanoseconds": ns}
        if row.get("user_tag") is not None:
            ts["userTag"] = row["user_tag"]
        tree["timeStamp"] = ts
    tree.update(rest)
    return tree


def column_rows(cols: dict[str, list]) -> list[dict]:
    """Columns -> list of row dicts."""
    names = list(cols)
    return [dict(zip(names, vals)) for vals in zip(*(cols[n] for n in names))]


def iteration_record(it: dict, events: list[dict], pv_names: list[str] | None = None) -> dict:
    """The handler data of a repeating-snapshot iteration (what ``snapshot_recurring`` handlers receive)."""
    data: dict[str, Any] = {"iteration": it["iteration"], "header_timestamp": it.get("header_ms"),
                            "tail_timestamp": it.get("tail_ms"), "timestamp": it.get("tail_ms")}
    for name in pv_names or ():
        data[name] = []
    for row in events:
        data.setdefault(row["pv"], []).append(tree_of(row))
    if it.get("tags"):
        data["tags"] = json.loads(it["tags"]) if isinstance(it["tags"], str) else it["tags"]
    if it.get("error"):
        data["incomplete"] = True
    return data
