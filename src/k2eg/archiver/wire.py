"""The archiver's Kafka protocol, shared by the client and the archiver (pure, no I/O).

Commands are JSON objects on the archive command topic (``<k2eg_cmd_topic>-archive``
by default), with ``reply_topic`` and ``reply_id`` as for the gateway.
Answers are msgpack records (header ``k2eg-ser-type: Msgpack``) on the reply
topic, keyed by ``reply_id``; a large answer comes in several records
(``part`` 0, 1, ...; the final one has ``last: true``). See README "Archive".
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from k2eg.protocol.uri import parse_pv_uri, pv_topic, snapshot_topic
from k2eg.protocol.errors import ProtocolError

from .model import EVENT_COLUMNS, pack

#: Columns an answer carries (the storage-only topic/partition/offset stay home).
WIRE_COLUMNS = tuple(c for c in EVENT_COLUMNS if c not in ("topic", "partition", "offset", "snapshot", "iteration"))
MAX_PATTERNS = 10_000
MAX_QUERY_PVS = 100_000
DEFAULT_CHUNK_BYTES = 768 * 1024      # below Kafka's default 1 MB record limit, with room for the envelope

CONFIG_COMMANDS = ("archive_add", "archive_remove", "archive_list")
QUERY_COMMANDS = ("history", "values_at", "snapshot_at", "snapshot_iterations")


def archive_topic(cmd_topic: str) -> str:
    """The archive command topic that goes with a gateway command topic."""
    return f"{cmd_topic}-archive"


def config_topic(archive_cmd_topic: str) -> str:
    return f"{archive_cmd_topic}-config"


class ArchiveCommandError(ValueError):
    """A command the archiver cannot run; ``str()`` says what is wrong."""


# ----------------------------------------------------------------------------- times

def to_ns(when: Any, what: str = "time") -> int:
    """A datetime, an ISO 8601 string, or seconds since 1970 (int/float) -> ns since 1970 (UTC).

    Naive datetimes and strings without an offset are local time, as Python's
    ``datetime.timestamp()`` takes them.
    """
    if isinstance(when, bool):
        raise ValueError(f"{what}: expected a datetime, an ISO 8601 string or seconds, got a bool")
    if isinstance(when, int):
        return when * 1_000_000_000
    if isinstance(when, float):   # a float holds about 0.2 us at today's epoch: round to the microsecond
        return int(round(when * 1e6)) * 1000
    if isinstance(when, str):
        text = when.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            when = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{what}: {when!r} is not an ISO 8601 time such as 2024-05-01T03:12:07Z") from None
    if isinstance(when, _dt.datetime) and isinstance(getattr(when, "value", None), int) and when.tzinfo is not None:
        return when.value        # a tz-aware pandas Timestamp: ns precision
    if isinstance(when, _dt.date) and not isinstance(when, _dt.datetime):
        when = _dt.datetime(when.year, when.month, when.day)
    if not isinstance(when, _dt.datetime):
        raise ValueError(f"{what}: expected a datetime, an ISO 8601 string or seconds, got {type(when).__name__}")
    # exact: whole seconds and microseconds kept apart from float rounding
    epoch = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
    aware = when if when.tzinfo is not None else when.astimezone()
    delta = aware - epoch
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def ns_to_datetime(ns: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ns // 1_000_000_000, _dt.timezone.utc) + _dt.timedelta(
        microseconds=(ns % 1_000_000_000) // 1000)


# ----------------------------------------------------------------------------- what to archive

@dataclass(frozen=True)
class PVPattern:
    """A PV name pattern (fnmatch: ``*``, ``?``, ``[..]``), optionally a URI of one PV (``pva://name``)."""

    text: str                 # as given: the key in the configuration
    name: str                 # without protocol
    protocol: str | None      # set for a URI: the archiver asks the gateway to monitor it

    @property
    def is_glob(self) -> bool:
        return any(c in self.name for c in "*?[")

    def matches(self, pv_name: str) -> bool:
        return fnmatch.fnmatchcase(pv_name, self.name)

    def topic_glob(self) -> str:
        """The pattern on topic names: characters a topic cannot hold become '_', like PV topics."""
        return "".join(c if c in "*?[]" else pv_topic(c) for c in self.name)


def parse_pattern(text: Any) -> PVPattern:
    if not isinstance(text, str) or not text.strip():
        raise ArchiveCommandError(f"a PV pattern must be a non-empty string, got {text!r}")
    text = text.strip()
    if "://" in text:
        try:
            uri = parse_pv_uri(text)
        except ProtocolError as e:
            raise ArchiveCommandError(f"invalid PV URI {text!r}: {e.message}") from None
        return PVPattern(text, uri.name, uri.protocol)
    if len(text) > 1000 or any(c.isspace() for c in text):
        raise ArchiveCommandError(f"invalid PV pattern {text!r}: no spaces, at most 1000 characters")
    return PVPattern(text, text, None)


_SNAPSHOT = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_snapshot_name(name: Any) -> str:
    if not isinstance(name, str) or not _SNAPSHOT.match(name):
        raise ArchiveCommandError(f"invalid snapshot name {name!r}: letters, digits, '_' or '-'")
    return name


@dataclass
class ArchiveConfig:
    """What is archived: PV patterns and repeating-snapshot names."""

    patterns: dict[str, PVPattern] = field(default_factory=dict)
    snapshots: set[str] = field(default_factory=set)

    def topics(self, existing: list[str], excluded: set[str]) -> dict[str, str | None]:
        """Existing topics to read -> snapshot name (None: a PV monitor topic)."""
        out: dict[str, str | None] = {}
        snaps = {snapshot_topic(s): s for s in self.snapshots}
        globs = [p.topic_glob() for p in self.patterns.values()]
        for t in existing:
            if t in excluded or t.startswith("__") or t.endswith("-reply"):
                continue
            if t in snaps:
                out[t] = snaps[t]
            elif any(fnmatch.fnmatchcase(t, g) for g in globs):
                out[t] = None
        return out

    def wants_pv(self, name: str) -> bool:
        return any(p.matches(name) for p in self.patterns.values())

    def describe(self) -> dict:
        return {"pvs": sorted(self.patterns), "snapshots": sorted(self.snapshots)}


# config records in the compacted topic: key names the item, a tombstone removes it
def config_key(kind: str, name: str) -> bytes:
    return json.dumps([kind, name], separators=(",", ":")).encode()


def apply_config_record(cfg: ArchiveConfig, key: bytes | None, value: bytes | None) -> None:
    """Fold one record of the configuration topic into ``cfg``; a record it cannot read is ignored."""
    try:
        kind, name = json.loads(key or b"")
    except (ValueError, TypeError):
        return
    if kind == "pv":
        if value is None:
            cfg.patterns.pop(name, None)
        else:
            try:
                cfg.patterns[name] = parse_pattern(name)
            except ArchiveCommandError:
                pass
    elif kind == "snapshot":
        if value is None:
            cfg.snapshots.discard(name)
        elif _SNAPSHOT.match(name):
            cfg.snapshots.add(name)


# ----------------------------------------------------------------------------- commands

@dataclass(frozen=True)
class ArchiveCommand:
    command: str
    reply_topic: str
    reply_id: str
    pvs: tuple[str, ...] = ()            # patterns (config) or PV names (queries)
    snapshots: tuple[str, ...] = ()
    snapshot: str | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    at_ns: int | None = None


def _ns_field(doc: dict, key: str, required: bool) -> int | None:
    v = doc.get(key)
    if v is None:
        if required:
            raise ArchiveCommandError(f"'{key}' is missing (ns since 1970)")
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ArchiveCommandError(f"'{key}' must be an integer (ns since 1970), got {v!r}")
    return v


def _names(doc: dict, key: str, limit: int) -> tuple[str, ...]:
    v = doc.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ArchiveCommandError(f"'{key}' must be a list of strings")
    if len(v) > limit:
        raise ArchiveCommandError(f"'{key}' has {len(v)} entries, more than the limit of {limit}")
    return tuple(dict.fromkeys(v))


def query_pv_name(text: str) -> str:
    """The name a query asks for: a URI's channel name, or a bare name."""
    if "://" in text:
        try:
            return parse_pv_uri(text).name
        except ProtocolError as e:
            raise ArchiveCommandError(f"invalid PV URI {text!r}: {e.message}") from None
    if not text:
        raise ArchiveCommandError("empty PV name")
    return text


def parse_command(raw: bytes | str | None) -> ArchiveCommand:
    """JSON -> ArchiveCommand; ArchiveCommandError names what is wrong (replied when a reply address is known)."""
    try:
        doc = json.loads(raw or b"")
    except (ValueError, TypeError, RecursionError) as e:
        raise ArchiveCommandError(f"not a JSON command: {e}") from None
    if not isinstance(doc, dict):
        raise ArchiveCommandError("a command must be a JSON object")
    rt, rid = doc.get("reply_topic"), doc.get("reply_id")
    if not isinstance(rt, str) or not re.match(r"^[A-Za-z0-9._-]{1,249}$", rt):
        raise ArchiveCommandError(f"'reply_topic' missing or not a topic name: {rt!r}")
    if not isinstance(rid, str) or not rid or len(rid) > 1024:
        raise ArchiveCommandError(f"'reply_id' missing or invalid: {rid!r}")
    name = doc.get("command")
    base = {"command": name, "reply_topic": rt, "reply_id": rid}
    if name in ("archive_add", "archive_remove"):
        pvs = _names(doc, "pvs", MAX_PATTERNS)
        for p in pvs:
            parse_pattern(p)
        snaps = tuple(check_snapshot_name(s) for s in _names(doc, "snapshots", MAX_PATTERNS))
        if not pvs and not snaps:
            raise ArchiveCommandError(f"{name}: give 'pvs' (PV names or patterns) and/or 'snapshots'")
        return ArchiveCommand(**base, pvs=pvs, snapshots=snaps)
    if name == "archive_list":
        return ArchiveCommand(**base)
    if name == "history":
        pv = doc.get("pv_name")
        if not isinstance(pv, str):
            raise ArchiveCommandError("'pv_name' is missing")
        start, end = _ns_field(doc, "start_ns", True), _ns_field(doc, "end_ns", True)
        if end < start:  # type: ignore[operator]
            raise ArchiveCommandError("'end_ns' is before 'start_ns'")
        return ArchiveCommand(**base, pvs=(query_pv_name(pv),), start_ns=start, end_ns=end)
    if name == "values_at":
        pvs = tuple(query_pv_name(p) for p in _names(doc, "pv_name_list", MAX_QUERY_PVS))
        if not pvs:
            raise ArchiveCommandError("'pv_name_list' is missing or empty")
        return ArchiveCommand(**base, pvs=pvs, at_ns=_ns_field(doc, "at_ns", True))
    if name in ("snapshot_at", "snapshot_iterations"):
        snap = check_snapshot_name(doc.get("snapshot_name"))
        if name == "snapshot_at":
            return ArchiveCommand(**base, snapshot=snap, at_ns=_ns_field(doc, "at_ns", True))
        return ArchiveCommand(**base, snapshot=snap, start_ns=_ns_field(doc, "start_ns", False),
                              end_ns=_ns_field(doc, "end_ns", False))
    raise ArchiveCommandError(f"unknown archive command {name!r} "
                              f"(known: {', '.join(CONFIG_COMMANDS + QUERY_COMMANDS)})")


def command(name: str, reply_topic: str, reply_id: str, **fields: Any) -> bytes:
    """A command's JSON (the client side of ``parse_command``)."""
    return json.dumps({"command": name, "reply_topic": reply_topic, "reply_id": reply_id, **fields},
                      separators=(",", ":")).encode()


# ----------------------------------------------------------------------------- answers

def _row_bytes(cols: dict[str, list], i: int) -> int:
    n = 64 + len(cols["pv"][i])
    for c in ("data", "text", "message"):
        v = cols[c][i]
        if v is not None:
            n += len(v)
    return n


def chunk_rows(cols: dict[str, list], max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """[start, end) row ranges whose wire size stays under ``max_bytes`` (a single larger row goes alone)."""
    n = len(cols["pv"])
    start, size = 0, 0
    fixed = all(v is None for c in ("data", "text", "message") for v in cols[c])
    if fixed:  # the common case, scalars: no per-row sizing
        per = 64 + max((len(p) for p in cols["pv"]), default=0)
        step = max(1, max_bytes // per)
        for s in range(0, n, step):
            yield s, min(n, s + step)
        return
    for i in range(n):
        b = _row_bytes(cols, i)
        if size and size + b > max_bytes:
            yield start, i
            start, size = i, 0
        size += b
    if start < n or n == 0:
        yield start, n


def wire_columns(cols: dict[str, list], start: int, end: int) -> dict:
    """Rows [start, end) for the wire: the ``rest`` blobs sent once each (``rest_dict`` + indexes)."""
    out = {c: cols[c][start:end] for c in WIRE_COLUMNS if c != "rest"}
    index: dict[bytes, int] = {}
    refs = []
    for blob in cols["rest"][start:end]:
        if blob is None:
            refs.append(None)
        else:
            refs.append(index.setdefault(blob, len(index)))
    out["rest"] = refs
    out["rest_dict"] = list(index)
    return out


def unwire_columns(wire: dict) -> dict[str, list]:
    """The inverse of ``wire_columns``."""
    d = wire.get("rest_dict") or []
    cols = {c: wire[c] for c in WIRE_COLUMNS if c != "rest"}
    cols["rest"] = [None if i is None else d[i] for i in wire["rest"]]
    return cols


def concat_columns(parts: list[dict[str, list]]) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in WIRE_COLUMNS}
    for p in parts:
        for c in WIRE_COLUMNS:
            out[c].extend(p[c])
    return out


def event_answers(reply_id: str, cols: dict[str, list], max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The records answering a history or values_at query."""
    ranges = list(chunk_rows(cols, max_bytes)) or [(0, 0)]
    for part, (s, e) in enumerate(ranges):
        yield pack({"error": 0, "reply_id": reply_id, "part": part, "last": part == len(ranges) - 1,
                    "columns": wire_columns(cols, s, e)})


def iteration_answers(reply_id: str, iterations: list[dict], max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The records answering snapshot_at / snapshot_iterations: iterations, each split by size if needed."""
    out: list[dict] = []
    size = 0
    part = 0
    for it in iterations:
        meta = {k: it.get(k) for k in ("iteration", "header_ms", "tail_ms", "tags", "error")}
        ranges = list(chunk_rows(it["events"], max_bytes)) or [(0, 0)]
        for s, e in ranges:
            piece = {**meta, "columns": wire_columns(it["events"], s, e)}
            b = sum(_row_bytes(it["events"], i) for i in range(s, e)) if e > s else 64
            if out and size + b > max_bytes:
                yield pack({"error": 0, "reply_id": reply_id, "part": part, "last": False, "iterations": out})
                part += 1
                out, size = [], 0
            out.append(piece)
            size += b
    yield pack({"error": 0, "reply_id": reply_id, "part": part, "last": True, "iterations": out})


def merge_iterations(records: list[dict]) -> list[dict]:
    """Answer records (in part order) -> iterations with their columns joined."""
    merged: list[dict] = []
    for rec in records:
        for piece in rec.get("iterations", ()):
            cols = unwire_columns(piece["columns"])
            if merged and merged[-1]["_key"] == (piece["iteration"], piece["tail_ms"]):   # split by size
                prev = merged[-1]["columns"]
                for c in WIRE_COLUMNS:
                    prev[c].extend(cols[c])
            else:
                merged.append({**{k: piece.get(k) for k in ("iteration", "header_ms", "tail_ms", "tags", "error")},
                               "columns": cols, "_key": (piece["iteration"], piece["tail_ms"])})
    for m in merged:
        del m["_key"]
    return merged


def error_answer(reply_id: str | None, message: str, code: int = -1) -> bytes:
    return pack({"error": code, "reply_id": reply_id, "message": message, "last": True})


def ok_answer(reply_id: str, **extra: Any) -> bytes:
    return pack({"error": 0, "reply_id": reply_id, "last": True, **extra})
