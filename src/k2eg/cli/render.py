"""Pure formatting and parsing for the ``k2eg`` command: value trees in, text and rich tables out.

Nothing here talks to Kafka, so every output format is unit-testable and the
command modules stay thin.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from rich.table import Table
from rich.text import Text
from k2eg.protocol.codec import json_safe

ARRAY_LIMIT = 10     # array items shown in a table cell before abbreviating
STRING_LIMIT = 200   # characters of a string shown in a table cell
STRUCT_LIMIT = 20    # elements of a structure array expanded into rows
TABLE_ROW_LIMIT = 50  # NTTable rows shown

SEVERITY_NAMES = {0: "NO_ALARM", 1: "MINOR", 2: "MAJOR", 3: "INVALID"}
_SEVERITY_STYLE = {"NO_ALARM": "green", "MINOR": "yellow", "MAJOR": "bold red", "INVALID": "magenta"}


# ----------------------------------------------------------------------------- JSON

to_json_safe = json_safe  # one converter for the wire and the terminal


def to_json(obj: Any, indent: int | None = None) -> str:
    """Always valid JSON, whatever the tree holds; one line unless ``indent`` is given."""
    separators = None if indent is not None else (",", ":")
    return json.dumps(to_json_safe(obj), indent=indent, separators=separators, allow_nan=False,
                      ensure_ascii=False)


# ----------------------------------------------------------------------------- put values

def parse_put_value(text: str) -> Any:
    """JSON when it parses (42, 1.5, [1,2], {"a":1}, "quoted"), else the text itself (an enum choice).

    ``null`` is refused here because no PV accepts it and a silent string
    "null" would hide the typo.
    """
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if value is None:
        raise ValueError("cannot put null: give a number, a string, a JSON list or object")
    return value


# ----------------------------------------------------------------------------- field filter

def split_fields(fields: Iterable[str]) -> list[str]:
    """``--filter a --filter b,c`` -> [a, b, c]: both spellings are natural on a command line."""
    out: list[str] = []
    for f in fields:
        out.extend(p.strip() for p in f.split(",") if p.strip())
    return list(dict.fromkeys(out))


def filter_fields(tree: Any, fields: Sequence[str]) -> Any:
    """Keep only the given top-level fields; a typo is an error naming the fields there are."""
    if not fields:
        return tree
    if not isinstance(tree, Mapping):
        raise ValueError(f"cannot filter fields of a {type(tree).__name__} value")
    missing = [f for f in fields if f not in tree]
    if missing:
        raise ValueError(f"no field {', '.join(repr(m) for m in missing)} in the value "
                         f"(fields: {', '.join(map(str, tree))})")
    return {f: tree[f] for f in fields}


# ----------------------------------------------------------------------------- scalars and arrays

def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def format_float(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(float(x))


def format_item(v: Any, limit: int = ARRAY_LIMIT) -> str:
    """One element inside an array or a nested value: strings quoted so ``["a, b"]`` stays readable."""
    v = _plain(v)
    if isinstance(v, str):
        return json.dumps(_clip(v), ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return format_array(v, limit)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {format_item(x, limit)}" for k, x in v.items()) + "}"
    return format_scalar(v)


def format_scalar(v: Any) -> str:
    """A leaf as a table cell: strings bare, floats round-trip exact, booleans and null as in JSON."""
    v = _plain(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format_float(v)
    if isinstance(v, str):
        return _clip(v) if v else '""'
    if isinstance(v, (bytes, bytearray)):
        return _clip(bytes(v).decode("utf-8", "replace"))
    if isinstance(v, (list, tuple)):
        return format_array(v)
    if isinstance(v, Mapping):
        return format_item(v)
    return str(v)


def format_array(seq: Sequence[Any], limit: int = ARRAY_LIMIT) -> str:
    """``[1, 2, …, 99] (100 items)``: a waveform of thousands of points must not flood a table."""
    seq = _plain(seq)
    n = len(seq)
    if n <= limit:
        return "[" + ", ".join(format_item(v, limit) for v in seq) + "]"
    tail = 2
    head = max(1, limit - tail)
    shown = [format_item(v, limit) for v in seq[:head]] + ["…"] + [format_item(v, limit) for v in seq[n - tail:]]
    return "[" + ", ".join(shown) + f"] ({n} items)"


def _clip(s: str) -> str:
    return s if len(s) <= STRING_LIMIT else s[:STRING_LIMIT] + f"… ({len(s)} chars)"


# ----------------------------------------------------------------------------- EPICS shapes

def is_enum(v: Any) -> bool:
    return (isinstance(v, Mapping) and "index" in v and "choices" in v and len(v) == 2
            and isinstance(_plain(v["choices"]), (list, tuple)))


def enum_text(v: Mapping) -> str:
    choices = _plain(v["choices"])
    i = _plain(v["index"])
    if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(choices):
        return str(choices[i])
    return str(i)


def is_timestamp(v: Any) -> bool:
    return isinstance(v, Mapping) and "secondsPastEpoch" in v and "nanoseconds" in v


def format_timestamp(ts: Any, tz: tzinfo | None = None, digits: int = 9) -> str:
    """EPICS timeStamp -> local (or ``tz``) date and time; 0 means the IOC never set it."""
    if not is_timestamp(ts):
        return ""
    try:
        sec = int(_plain(ts["secondsPastEpoch"]))
        ns = int(_plain(ts["nanoseconds"]))
    except (TypeError, ValueError):
        return ""
    if sec == 0 and ns == 0:
        return "(not set)"
    try:
        dt = datetime.fromtimestamp(sec, tz or timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{sec}.{ns:09d}"
    if tz is None:
        dt = dt.astimezone()  # the user's local time zone
    text = dt.strftime("%Y-%m-%d %H:%M:%S")
    if digits > 0:
        text += "." + f"{ns:09d}"[:digits]
    return text


def severity_of(tree: Any) -> int | None:
    alarm = tree.get("alarm") if isinstance(tree, Mapping) else None
    sev = _plain(alarm.get("severity")) if isinstance(alarm, Mapping) else None
    return sev if isinstance(sev, int) and not isinstance(sev, bool) else None


def severity_name(sev: int | None) -> str:
    if sev is None:
        return ""
    return SEVERITY_NAMES.get(sev, str(sev))


def is_nttable(tree: Any) -> bool:
    """NTTable: ``labels`` plus ``value`` holding one equally long column per label."""
    if not isinstance(tree, Mapping):
        return False
    labels, cols = _plain(tree.get("labels")), tree.get("value")
    if not isinstance(labels, (list, tuple)) or not isinstance(cols, Mapping) or not cols:
        return False
    lengths = {len(_plain(c)) for c in cols.values() if isinstance(_plain(c), (list, tuple))}
    return len(lengths) == 1 and all(isinstance(_plain(c), (list, tuple)) for c in cols.values())


def value_summary(tree: Any, limit: int = ARRAY_LIMIT) -> str:
    """The one cell a PV gets in monitor and snapshot tables: its ``value`` field, made short."""
    if not isinstance(tree, Mapping):
        return format_scalar(tree)
    if is_nttable(tree):
        cols = tree["value"]
        rows = len(_plain(next(iter(cols.values()))))
        return f"table {rows} rows × {len(cols)} columns ({', '.join(map(str, cols))})"
    if "value" not in tree:
        alarm = tree.get("alarm")
        if isinstance(alarm, Mapping) and alarm.get("message"):
            return f"(no value: {alarm['message']})"  # e.g. a snapshot PV that never connected
        return format_item(tree, limit)
    v = tree["value"]
    if is_enum(v):
        return enum_text(v)
    if isinstance(v, Mapping):
        return format_item(v, limit)
    return format_scalar(v) if not isinstance(_plain(v), (list, tuple)) else format_array(v, limit)


# ----------------------------------------------------------------------------- tree -> rows

def tree_rows(tree: Any, prefix: str = "", tz: tzinfo | None = None, limit: int = ARRAY_LIMIT) -> list[tuple[str, str]]:
    """Flatten a value tree to (dotted field, text) rows, depth first in field order.

    Enums and timestamps get an extra readable row (``Off``, a date) above
    their raw members, so nothing is hidden and nothing needs decoding.
    """
    rows: list[tuple[str, str]] = []
    _walk(_plain(tree), prefix, rows, tz, limit)
    return rows


def _walk(node: Any, path: str, rows: list, tz: tzinfo | None, limit: int) -> None:
    node = _plain(node)
    if isinstance(node, Mapping):
        if not node:
            rows.append((path or ".", "{}"))
            return
        if path and is_enum(node):
            rows.append((path, f"{enum_text(node)} (index {format_scalar(node['index'])})"))
        elif path and is_timestamp(node) and format_timestamp(node, tz):
            rows.append((path, format_timestamp(node, tz)))
        for k, v in node.items():
            child = f"{path}.{k}" if path else str(k)
            if k == "severity" and path.rsplit(".", 1)[-1] == "alarm" and isinstance(_plain(v), int):
                rows.append((child, f"{_plain(v)} ({severity_name(_plain(v))})"))
            else:
                _walk(v, child, rows, tz, limit)
        return
    if isinstance(node, (list, tuple)) and node and all(isinstance(x, Mapping) for x in node):
        # A structure array: expand the first elements, count the rest.
        for i, item in enumerate(node[:STRUCT_LIMIT]):
            _walk(item, f"{path}[{i}]", rows, tz, limit)
        if len(node) > STRUCT_LIMIT:
            rows.append((f"{path}[…]", f"{len(node) - STRUCT_LIMIT} more of {len(node)}"))
        return
    rows.append((path or "value", format_scalar(node) if not isinstance(node, (list, tuple))
                 else format_array(node, limit)))


# ----------------------------------------------------------------------------- rich tables

def fields_table(tree: Any, title: str | None = None, tz: tzinfo | None = None) -> Table:
    table = Table(title=title, show_header=True, header_style="bold", title_justify="left")
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, text in tree_rows(tree, tz=tz):
        table.add_row(Text(name), Text(text))  # Text: values like "[1, 2]" are not rich markup
    return table


def nttable_table(tree: Mapping, title: str | None = None, max_rows: int = TABLE_ROW_LIMIT) -> Table:
    """An NTTable as the table it is, columns by label."""
    cols = {str(k): _plain(v) for k, v in tree["value"].items()}
    table = Table(title=title, title_justify="left", header_style="bold")
    for label in cols:
        table.add_column(label, overflow="fold")
    n = len(next(iter(cols.values()))) if cols else 0
    for i in range(min(n, max_rows)):
        table.add_row(*(Text(format_scalar(c[i])) for c in cols.values()))
    if n > max_rows:
        table.caption = f"{max_rows} of {n} rows shown"
    return table


@dataclass
class MonitorRow:
    """What the live monitor table shows of one PV."""

    pv: str
    value: str = "(waiting)"
    severity: int | None = None
    timestamp: str = ""
    count: int = 0

    def update(self, tree: Any, tz: tzinfo | None = None) -> None:
        self.value = value_summary(tree)
        self.severity = severity_of(tree)
        ts = tree.get("timeStamp") if isinstance(tree, Mapping) else None
        self.timestamp = format_timestamp(ts, tz, digits=3) if ts is not None else ""
        self.count += 1


def monitor_table(rows: Iterable[MonitorRow], caption: str | None = None) -> Table:
    table = Table(header_style="bold", caption=caption)
    table.add_column("PV", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("severity", no_wrap=True)
    table.add_column("timestamp", no_wrap=True)
    table.add_column("updates", justify="right")
    for r in rows:
        sev = severity_name(r.severity)
        table.add_row(Text(r.pv), Text(r.value), Text(sev, style=_SEVERITY_STYLE.get(sev, "")),
                      Text(r.timestamp), Text(str(r.count)))
    return table


def snapshot_rows(result: Mapping[str, Any], pv_names: Sequence[str]) -> list[tuple[str, str, int]]:
    """(PV, latest value, count) in the order asked for; PVs the gateway added come after."""
    names = list(dict.fromkeys([*pv_names, *(k for k in result if k not in ("error", "message"))]))
    out = []
    for name in names:
        values = result.get(name) or []
        values = list(_plain(values)) if isinstance(_plain(values), (list, tuple)) else [values]
        out.append((name, value_summary(values[-1]) if values else "(no value)", len(values)))
    return out


def snapshot_table(rows: Iterable[tuple[str, str, int]], title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("PV", style="cyan", no_wrap=True)
    table.add_column("latest value", overflow="fold")
    table.add_column("count", justify="right")
    for name, latest, count in rows:
        table.add_row(Text(name), Text(latest), Text(str(count)))
    return table


# ----------------------------------------------------------------------------- gateway status

STATUS_MONITOR_ROWS = 30  # busiest monitors shown; --json has them all


def merge_gateways(beacons: Sequence[Mapping], live: Mapping | None) -> list[dict]:
    """The gateways to show: each beacon, with the live ``status`` answer in place of its own gateway's beacon."""
    out: dict[str, dict] = {}
    for doc in beacons:
        gid = str((doc.get("gateway") or {}).get("id", "?"))
        out[gid] = dict(doc)
    if live is not None:
        gid = str((live.get("gateway") or {}).get("id", "?"))
        out[gid] = {**live, "state": "running", "last_seen_s": 0.0, "answered": True}
    return sorted(out.values(), key=lambda d: (not d.get("answered"), str((d.get("gateway") or {}).get("id"))))


def _duration(seconds: Any) -> str:
    try:
        s = int(seconds)
    except (TypeError, ValueError):
        return "?"
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d or h:
        return (f"{d}d" if d else "") + f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s"


def _rate(x: Any) -> str:
    return f"{x:,.1f}/s" if isinstance(x, (int, float)) else "?"


def gateways_table(gateways: Iterable[Mapping], stale_after: float = 30.0) -> Table:
    table = Table(title="gateways", title_justify="left", header_style="bold")
    for col, justify in (("gateway", "left"), ("state", "left"), ("uptime", "right"), ("monitors", "right"),
                         ("snapshots", "right"), ("PVs connected", "right"), ("events", "right"),
                         ("commands", "right"), ("lost", "right"), ("last seen", "right")):
        table.add_column(col, justify=justify, no_wrap=col != "gateway", overflow="fold")
    for g in gateways:
        ident = g.get("gateway") or {}
        seen = g.get("last_seen_s")
        state = str(g.get("state", "?"))
        if state == "running" and isinstance(seen, (int, float)) and seen > stale_after:
            state = "silent"
        style = {"running": "green", "stopped": "dim", "silent": "yellow"}.get(state, "")
        pvs = g.get("pvs") or {}
        rates = g.get("rates") or {}
        table.add_row(Text(f"{ident.get('id', '?')}" + (" *" if g.get("answered") else ""), style="cyan"),
                      Text(state, style=style), _duration(ident.get("uptime_s", g.get("uptime_s"))),
                      str(g.get("monitors_active", "?")), str(_total(g, "snapshots")),
                      f"{pvs.get('connected', '?')}/{pvs.get('total', '?')}",
                      _rate(rates.get("events_published_per_s")), _rate(rates.get("commands_per_s")),
                      str(g.get("records_lost", 0)), "now" if not seen else f"{seen:g} s ago")
    return table


def _total(status: Mapping, name: str) -> int:
    """How many ``name`` the gateway has: its ``<name>_total`` (the list is capped), else the list's length."""
    total = status.get(f"{name}_total")
    return total if isinstance(total, int) else len(status.get(name) or [])


def _shown(what: str, shown: int, total: int) -> str | None:
    return f"{shown} {what} of {total}" if total > shown else None


def totals_line(status: Mapping) -> str:
    """The sizes of the gateway's lists, of which a status record carries at most a capped part."""
    reply = status.get("reply_topics") or {}
    parts = [f"monitors {_total(status, 'monitors')}", f"snapshots {_total(status, 'snapshots')}",
             f"topics created {_total(status, 'topics_created')}",
             f"being purged {_total(status, 'topics_purging')}"]
    if reply:
        parts.append(f"reply topics created {reply.get('created', '?')}/{reply.get('limit', '?')}"
                     + (f" ({reply['refused']} refused)" if reply.get("refused") else ""))
    return "totals: " + ", ".join(parts)


def monitors_status_table(status: Mapping, limit: int = STATUS_MONITOR_ROWS) -> Table:
    monitors = sorted(status.get("monitors") or [], key=lambda m: -(m.get("events_per_s") or 0))
    total = max(_total(status, "monitors"), len(monitors))
    caption = _shown("busiest", min(limit, len(monitors)), total)
    table = Table(title="monitors", title_justify="left", header_style="bold", caption=caption)
    for col, justify in (("PV", "left"), ("connected", "left"), ("rate", "right"), ("events", "right"),
                         ("destinations", "left")):
        table.add_column(col, justify=justify, no_wrap=col not in ("PV", "destinations"), overflow="fold")
    for m in monitors[:limit]:
        dests = ", ".join(m.get("destinations") or {}) or (f"{m.get('snapshot_taps', 0)} snapshot(s)")
        table.add_row(Text(str(m.get("pv")), style="cyan"),
                      Text("yes" if m.get("connected") else "no", style="green" if m.get("connected") else "magenta"),
                      _rate(m.get("events_per_s")), str(m.get("events", 0)), Text(dests))
    return table


def snapshots_status_table(status: Mapping) -> Table:
    snaps = status.get("snapshots") or []
    table = Table(title="repeating snapshots", title_justify="left", header_style="bold",
                  caption=_shown("shown", len(snaps), _total(status, "snapshots")))
    for col in ("name", "type", "PVs", "iteration", "published", "failures"):
        table.add_column(col, justify="left" if col in ("name", "type") else "right", no_wrap=True)
    for s in snaps:
        kind = str(s.get("type", "?")) + (" (triggered)" if s.get("triggered") else "")
        table.add_row(Text(str(s.get("name")), style="cyan"), kind, str(s.get("pvs", "?")),
                      str(s.get("iteration", "?")), str(s.get("published", "?")), str(s.get("failures", 0)))
    return table
