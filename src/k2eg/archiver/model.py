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


class Rows:
    """A batch of rows (what every backend writes in one transaction): kept as tuples while it fills (one
    tuple per event is what a busy archiver can afford), handed out in columns (``events``, ``marks``)."""

    def __init__(self, events: dict[str, list] | None = None, marks: dict[str, list] | None = None):
        self._ev: list[tuple] = list(zip(*(events[c] for c in EVENT_COLUMNS))) if events else []
        self._mk: list[tuple] = list(zip(*(marks[c] for c in MARK_COLUMNS))) if marks else []

    def __len__(self) -> int:
        return len(self._ev) + len(self._mk)

    @staticmethod
    def _columns(rows: list[tuple], names: tuple[str, ...]) -> dict[str, list]:
        if not rows:
            return {c: [] for c in names}
        return dict(zip(names, map(list, zip(*rows))))

    @property
    def events(self) -> dict[str, list]:
        return self._columns(self._ev, EVENT_COLUMNS)

    @property
    def marks(self) -> dict[str, list]:
        return self._columns(self._mk, MARK_COLUMNS)

    def add_event(self, topic: str, partition: int, offset: int, kafka_ms: int, pv: str, tree: Any,
                  snapshot: str | None = None, iteration: int | None = None) -> None:
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
            if "value" not in tree:
                # the marker keeps apart a tree without 'value' (an unreadable PV) from one with value None
                rest = pack({**others, "\0novalue": True})
            elif others:
                rest = _packed_rest(pv, others)
        self._ev.append((topic, partition, offset, pv, epics_ns if epics_ns is not None else kafka_ms * 1_000_000,
                         epics_ns, kafka_ms, value, text, data, severity, status, message, user_tag, rest, opaque,
                         snapshot, iteration))

    def add_mark(self, snapshot: str, iteration: int, kind: int, ts_ms: int | None, tags: dict | None,
                 error: int, topic: str, partition: int, offset: int) -> None:
        """A Header (kind 0) or Tail (kind 2) of a repeating snapshot's iteration."""
        self._mk.append((snapshot, iteration, kind, ts_ms, json.dumps(tags) if tags else None, error,
                         topic, partition, offset))

    def keep_after(self, floor: dict[tuple[str, int], int]) -> "Rows":
        """Only the rows whose offset is above ``floor`` of their partition (what is not stored yet)."""
        out = Rows()
        # (topic, partition, offset) sit at 0, 1, 2 in events and at 6, 7, 8 in marks
        out._ev = [r for r in self._ev if r[2] > floor.get((r[0], r[1]), -1)]
        out._mk = [r for r in self._mk if r[8] > floor.get((r[6], r[7]), -1)]
        return out

    def high_offsets(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for t, p, o in [r[:3] for r in self._ev] + [r[6:9] for r in self._mk]:
            if o > out.get((t, p), -1):
                out[(t, p)] = o
        return out


_REST: dict[str, tuple[dict, bytes]] = {}   # per PV: its last 'rest' fields and their msgpack
_REST_LIMIT = 200_000


def _packed_rest(pv: str, others: dict) -> bytes:
    """msgpack of a tree's other fields: display, control ... rarely change, so comparing with the PV's
    last ones is cheaper than packing them again (and the equal bytes object is shared)."""
    last = _REST.get(pv)
    if last is not None and last[0] == others:
        return last[1]
    packed = pack(others)
    if len(_REST) >= _REST_LIMIT:
        _REST.clear()
    _REST[pv] = (others, packed)
    return packed


def _tree(opaque, data, text, value, severity, status, message, epics_ns, user_tag, rest: dict | None) -> Any:
    """The value tree of one stored row; ``rest`` already unpacked (it is shared, read-only, between the trees
    of one answer: value trees are read-only everywhere in k2eg)."""
    if opaque:
        return unpack(data)
    tree: dict[str, Any] = {}
    novalue = rest is not None and "\0novalue" in rest
    if not novalue:
        if data is not None:
            tree["value"] = unpack(data)
        elif text is not None:
            tree["value"] = text
        else:
            tree["value"] = value
    if severity is not None or status is not None or message is not None:
        alarm: dict[str, Any] = {"severity": severity, "status": status}
        if message is not None:
            alarm["message"] = message
        tree["alarm"] = alarm
    if epics_ns is not None:
        secs, ns = divmod(int(epics_ns), 1_000_000_000)
        ts = {"secondsPastEpoch": secs, "nanoseconds": ns}
        if user_tag is not None:
            ts["userTag"] = user_tag
        tree["timeStamp"] = ts
    if rest:
        if novalue:
            tree.update((k, v) for k, v in rest.items() if k != "\0novalue")
        else:
            tree.update(rest)
    return tree


_TREE_COLUMNS = ("opaque", "data", "text", "value", "severity", "status", "message", "epics_ns", "user_tag", "rest")


def tree_of(row: dict) -> Any:
    """A stored row back into the value tree it came from."""
    rest = row.get("rest")
    return _tree(*(row.get(c) for c in _TREE_COLUMNS[:-1]), unpack(rest) if rest is not None else None)


def trees_of(cols: dict[str, list]) -> list:
    """Columns -> value trees; each distinct ``rest`` blob unpacked once.

    The common row (a numeric scalar with alarm, time stamp and other fields)
    is built as one dict display, the rest through ``_tree``: at 86,400 values
    per history call the per-row cost is what the caller waits for.
    """
    cache: dict[bytes, dict] = {}
    out = []
    append = out.append
    for opaque, data, text, value, sev, st, msg, ens, tag, rest in zip(*(cols[c] for c in _TREE_COLUMNS)):
        if rest is not None:
            r = cache.get(rest)
            if r is None:
                r = cache[rest] = unpack(rest)
            rest = r
        if (not opaque and data is None and text is None and sev is not None and st is not None
                and msg is not None and ens is not None and tag is not None and rest and "\0novalue" not in rest):
            append({"value": value, "alarm": {"severity": sev, "status": st, "message": msg},
                    "timeStamp": {"secondsPastEpoch": ens // 1_000_000_000, "nanoseconds": ens % 1_000_000_000,
                                  "userTag": tag}, **rest})
        else:
            append(_tree(opaque, data, text, value, sev, st, msg, ens, tag, rest))
    return out


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
