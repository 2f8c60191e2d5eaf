"""Client-side assembly of snapshot streams into what handlers receive (PROTOCOL 7, 8).

Pure state machines fed one decoded record at a time; no Kafka, no threads.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from . import replies
from .errors import ErrorCode

log = logging.getLogger("k2eg.snapshots")

_STREAM_META = ("message_type", "timestamp", "iter_index", "snapshot_name", "error", "reply_id", "message",
                "message-size", "tags", "truncated")


def _pv_entries(rec: dict) -> Iterable[tuple[str, Any]]:
    return ((k, v) for k, v in rec.items() if k not in _STREAM_META)


def is_unreadable(value: Any) -> bool:
    """True for the record a gateway sends for a PV it could not read: an INVALID alarm and no ``value``."""
    if not isinstance(value, dict) or "value" in value:
        return False
    alarm = value.get("alarm")
    return isinstance(alarm, dict) and alarm.get("severity") == 3


class OneShotCollector:
    """Collects ``{pv: [values]}`` for one snapshot until its completion record (error == 1).

    A record with any other non-zero error is the gateway refusing the whole
    command: the result then also holds ``error`` and ``message``.
    """

    def __init__(self, pv_names: list[str], on_done: Callable[[dict], None]):
        self.results: dict[str, list] = {name: [] for name in pv_names}
        self._on_done = on_done
        self.done = False

    def feed(self, rec: dict) -> None:
        if self.done or not isinstance(rec, dict):
            return
        error = rec.get("error", 0)
        if error == ErrorCode.SNAPSHOT_COMPLETE:
            self.done = True
            self._on_done(self.results)
            return
        if error != 0:
            self.done = True
            self.results["error"] = error
            self.results["message"] = rec.get("message")
            self._on_done(self.results)
            return
        for name, value in _pv_entries(rec):
            self.results.setdefault(name, []).append(value)


class IterationAssembler:
    """Header/Data/Tail records of one repeating snapshot -> one handler call per iteration.

    The handler data is 0.3.0's: ``iteration``, ``header_timestamp``,
    ``tail_timestamp``, ``timestamp`` and every requested PV (``[]`` when it
    sent nothing), plus ``tags`` when the trigger carried some (on the
    Header, or on the Tail of a scheduled window a trigger closed after its
    first push), and ``truncated``: how many values a timedbuffered window
    left out beyond the gateway's bound, when it left some out. Lost or
    out-of-order records never wedge it and are never hidden: an iteration
    whose Header or Tail was lost, or whose Tail reports an error, is
    delivered with ``"incomplete": True`` (and counted in ``incomplete``):

    - a Header (or a record of a newer iteration) closes the open iteration;
    - a Data record that arrives before its Header opens the iteration, and
      the late Header is merged into it;
    - a Tail whose Header and Data were all lost is delivered as an empty,
      incomplete iteration, so a triggered snapshot still gets one call per
      trigger;
    - records of iterations already delivered are stragglers and dropped;
    - a Header with a lower ``iter_index`` than delivered ones means the
      snapshot restarted: numbering starts over.

    Until the first Header the stream is joined mid-way (or a record of an
    earlier run is read): those records are skipped and counted in
    ``skipped``. Iterations never seen at all are counted in ``missed``.
    """

    def __init__(self, snapshot_name: str, pv_names: list[str], on_iteration: Callable[[dict], None]):
        self.snapshot_name = snapshot_name
        self.pv_names = list(dict.fromkeys(pv_names))
        self._emit = on_iteration
        self._iteration: int | None = None       # open iteration
        self._header_ts: int | None = None
        self._tags: dict | None = None
        self._has_header = False
        self._results: dict[str, list] = {}
        self._last: int | None = None            # last iteration delivered (None: not synchronised yet)
        self.delivered = 0
        self.incomplete = 0
        self.skipped = 0
        self.missed = 0

    @property
    def last_iteration(self) -> int | None:
        """The newest iteration delivered so far."""
        return self._last

    def _open(self, iteration: int, header_ts: int | None, has_header: bool, tags: dict | None = None) -> None:
        if self._last is not None and iteration > self._last + 1:
            self.missed += iteration - self._last - 1
            log.warning("snapshot %s: iterations %d..%d never arrived", self.snapshot_name, self._last + 1,
                        iteration - 1)
        self._iteration, self._header_ts, self._has_header, self._tags = iteration, header_ts, has_header, tags
        self._results = {name: [] for name in self.pv_names}

    def _close(self, tail_ts: int | None, complete: bool, tail: dict | None = None) -> None:
        data: dict[str, Any] = {"iteration": self._iteration, "header_timestamp": self._header_ts,
                                "tail_timestamp": tail_ts, "timestamp": tail_ts}
        data.update(self._results)
        tags = dict(self._tags or {})
        if tail is not None and isinstance(tail.get("tags"), dict):
            tags.update(tail["tags"])
        if tags:
            data["tags"] = tags
        left_out = tail.get("truncated") if tail is not None else None
        if isinstance(left_out, int) and not isinstance(left_out, bool) and left_out > 0:
            data["truncated"] = left_out
            log.warning("snapshot %s iteration %s: the gateway left out %d values beyond its bound",
                        self.snapshot_name, self._iteration, left_out)
        if not complete:
            data["incomplete"] = True
            self.incomplete += 1
            log.warning("snapshot %s iteration %s delivered incomplete", self.snapshot_name, self._iteration)
        self.delivered += 1
        self._last = self._iteration
        self._iteration = None
        self._results = {}
        self._emit(data)

    def _stale(self, it: int) -> bool:
        return self._last is not None and it <= self._last

    def feed(self, rec: Any) -> None:
        if not isinstance(rec, dict):
            return
        kind = rec.get("message_type")
        it = rec.get("iter_index")
        if kind not in (replies.HEADER, replies.DATA, replies.TAIL) or isinstance(it, bool) or not isinstance(it, int):
            return
        if kind == replies.HEADER:
            tags = rec.get("tags") if isinstance(rec.get("tags"), dict) else None
            if self._iteration == it and not self._has_header:
                self._header_ts, self._has_header, self._tags = rec.get("timestamp"), True, tags  # came late
                return
            if self._iteration is not None:
                self._close(None, complete=False)
            if self._stale(it):
                log.info("snapshot %s restarted at iteration %d", self.snapshot_name, it)
                self._last = None
            self._open(it, rec.get("timestamp"), True, tags)
            if self._last is None and self.delivered == 0:
                self._last = it - 1               # synchronised: numbering is known from here on
            return
        if self._iteration is None and self._last is None:
            self.skipped += 1                    # not synchronised yet: joined mid-iteration
            return
        if self._iteration is not None and it < self._iteration or self._iteration is None and self._stale(it):
            return                               # a straggler of an iteration already delivered
        if self._iteration is not None and it > self._iteration:
            self._close(None, complete=False)    # its Tail was lost
        if kind == replies.DATA:
            if self._iteration is None:
                self._open(it, None, False)      # its Header was lost (or comes later)
            for name, value in _pv_entries(rec):
                self._results.setdefault(name, []).append(value)
        else:  # TAIL
            if self._iteration is None:
                self._open(it, None, False)      # Header and Data all lost
            self._close(rec.get("timestamp"), complete=self._has_header and rec.get("error", 0) == 0, tail=rec)
