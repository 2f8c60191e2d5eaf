"""The storage interface every archive backend implements, and what they share.

A backend stores ``Rows`` batches and answers the four retrieval questions in
columns (dict of lists, ``EVENT_COLUMNS``), which is also how answers travel.
``write`` returns once the rows are durable (the archiver commits Kafka
offsets after it), and drops rows at or below what it already holds for
their partition, so a batch written twice (a crash between the write and the
commit) is stored once. ``stored_offsets`` tells the archiver where to
resume a partition it is assigned.
"""
from __future__ import annotations

import abc
from typing import Iterable

from .model import EVENT_COLUMNS, Rows

Partition = tuple[str, int]
Columns = dict[str, list]


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says which and why."""


def empty_columns(names: Iterable[str] = EVENT_COLUMNS) -> Columns:
    return {c: [] for c in names}


class Store(abc.ABC):
    """One archive: events (monitor events and snapshot Data) and snapshot marks (Headers and Tails)."""

    @abc.abstractmethod
    def write(self, rows: Rows) -> int:
        """Store ``rows`` durably; rows of a partition at or below its stored offset are dropped. Returns how
        many rows were stored."""

    @abc.abstractmethod
    def stored_offsets(self) -> dict[Partition, int]:
        """The highest offset stored per (topic, partition)."""

    @abc.abstractmethod
    def history(self, pv: str, start_ns: int, end_ns: int, limit: int | None = None) -> Columns:
        """Every event of ``pv`` with ``start_ns <= t_ns <= end_ns``, in time order (then Kafka order); at most
        ``limit`` rows."""

    @abc.abstractmethod
    def values_at(self, pvs: list[str], at_ns: int) -> Columns:
        """For each PV of ``pvs`` its newest event with ``t_ns <= at_ns`` (PVs without one are absent)."""

    @abc.abstractmethod
    def marks(self, snapshot: str, end_ms: int | None) -> Columns:
        """Headers and Tails of ``snapshot`` (``MARK_COLUMNS``) with ``ts_ms <= end_ms`` (None: all)."""

    @abc.abstractmethod
    def snapshot_events(self, snapshot: str, topic: str, partition: int, after: int, upto: int) -> Columns:
        """Data records of ``snapshot`` with ``after < offset <= upto`` on (topic, partition), in Kafka order."""

    def close(self) -> None:
        pass

    # ----------------------------------------------------------------- shared logic

    def iterations(self, snapshot: str, start_ms: int | None, end_ms: int | None,
                   newest_only: bool = False) -> list[dict]:
        """Iterations of ``snapshot`` whose Tail time lies in the range, each with its events.

        An iteration is bounded by Tails in its partition: its Data records lie
        after the previous Tail. Iteration numbers may restart (a gateway that
        lost its state), so rows are matched by offset range and number.
        """
        marks = self.marks(snapshot, end_ms)
        return assemble_iterations(snapshot, marks, start_ms, end_ms, newest_only, self.snapshot_events)


_SAME_EVENT = ("pv", "epics_ns", "value", "text", "data", "severity", "status", "message")


def drop_republished(cols: Columns) -> Columns:
    """A history without the copies of an event the gateway re-published.

    A repeated monitor command makes the gateway publish the PV's current
    value again (PROTOCOL 6): the topic then holds the same EPICS event at
    several offsets. Each is stored (one row per record), but a history lists
    the event once: a row equal to the previous one in PV, EPICS time stamp,
    value and alarm is dropped. Rows without an EPICS time stamp are kept.
    """
    keys = list(zip(*(cols[c] for c in _SAME_EVENT)))
    keep = [i for i, k in enumerate(keys) if i == 0 or k[1] is None or k != keys[i - 1]]
    if len(keep) == len(keys):
        return cols
    return {c: [col[i] for i in keep] for c, col in cols.items()}


def assemble_iterations(snapshot: str, marks: Columns, start_ms: int | None, end_ms: int | None,
                        newest_only: bool, fetch) -> list[dict]:
    """Marks (Headers, Tails) -> iterations with their rows; ``fetch`` reads Data rows by offset range."""
    rows = sorted(zip(marks["topic"], marks["partition"], marks["offset"], marks["kind"], marks["iteration"],
                      marks["ts_ms"], marks["tags"], marks["error"]), key=lambda r: (r[0], r[1], r[2]))
    found: list[dict] = []
    prev_tail: dict[Partition, int] = {}
    headers: dict[tuple[str, int, int], tuple] = {}
    for topic, part, offset, kind, iteration, ts, tags, error in rows:
        if kind == 0:
            headers[(topic, part, iteration)] = (ts, tags, offset)
            continue
        after = prev_tail.get((topic, part), -1)
        prev_tail[(topic, part)] = offset
        if (start_ms is not None and ts < start_ms and not newest_only) or (end_ms is not None and ts > end_ms):
            continue
        head = headers.pop((topic, part, iteration), None)
        found.append({"snapshot": snapshot, "iteration": iteration, "tail_ms": ts, "error": error or 0,
                      "header_ms": head[0] if head else None, "tags": (head[1] if head else None) or tags,
                      "topic": topic, "partition": part, "after": head[2] if head else after, "upto": offset})
    if newest_only:
        found = found[-1:]
    for it in found:
        it["events"] = fetch(snapshot, it["topic"], it["partition"], it["after"], it["upto"])
        ev = it["events"]
        keep = [i for i, n in enumerate(ev["iteration"]) if n == it["iteration"]]
        if len(keep) != len(ev["iteration"]):
            it["events"] = {c: [col[i] for i in keep] for c, col in ev.items()}
    return found
