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
                "message-size")


def _pv_entries(rec: dict) -> Iterable[tuple[str, Any]]:
    return ((k, v) for k, v in rec.items() if k not in _STREAM_META)


class OneShotCollector:
    """Collects ``{pv: [values]}`` for one snapshot until its completion record (error == 1)."""

    def __init__(self, pv_names: list[str], on_done: Callable[[dict], None]):
        self.results: dict[str, list] = {name: [] for name in pv_names}
        self._on_done = on_done
        self.done = False

    def feed(self, rec: dict) -> None:
        if self.done:
            return
        error = rec.get("error", 0)
        if error == ErrorCode.SNAPSHOT_COMPLETE:
            self.done = True
            self._on_done(self.results)
            return
        if error != 0:
            # A whole-command failure (bad request): report it as the result.
            self.done = True
            self.results["error"] = error
            self.results["message"] = rec.get("message")
            self._on_done(self.results)
            return
        for name, value in _pv_entries(rec):
            self.results.setdefault(name, []).append(value)


class IterationAssembler:
    """Header/Data/Tail records of one repeating snapshot -> one handler call per iteration.

    A lost or out-of-order record never wedges it: a Header (or Data of a newer
    iteration) closes whatever iteration was open, which is then delivered
    with ``"incomplete": True`` rather than hidden.
    """

    def __init__(self, snapshot_name: str, pv_names: list[str], on_iteration: Callable[[dict], None]):
        self.snapshot_name = snapshot_name
        self.pv_names = list(pv_names)
        self._emit = on_iteration
        self._iteration: int | None = None
        self._header_ts: int | None = None
        self._has_header = False
        self._results: dict[str, list] = {}
        self.delivered = 0
        self.incomplete = 0

    def _open(self, iteration: int, header_ts: int | None, has_header: bool) -> None:
        self._iteration, self._header_ts, self._has_header = iteration, header_ts, has_header
        self._results = {name: [] for name in self.pv_names}

    def _close(self, tail_ts: int | None, complete: bool) -> None:
        data: dict[str, Any] = {"iteration": self._iteration, "header_timestamp": self._header_ts,
                                "tail_timestamp": tail_ts, "timestamp": tail_ts}
        data.update(self._results)
        if not complete:
            data["incomplete"] = True
            self.incomplete += 1
            log.warning("snapshot %s iteration %s delivered incomplete", self.snapshot_name, self._iteration)
        self.delivered += 1
        self._iteration = None
        self._results = {}
        self._emit(data)

    def feed(self, rec: Any) -> None:
        if not isinstance(rec, dict):
            return
        kind = rec.get("message_type")
        it = rec.get("iter_index")
        if kind is None or not isinstance(it, int):
            return
        if kind == replies.HEADER:
            if self._iteration is not None:
                self._close(None, complete=False)
            self._open(it, rec.get("timestamp"), True)
        elif kind == replies.DATA:
            if self._iteration is None or it > self._iteration:
                if self._iteration is not None:
                    self._close(None, complete=False)
                self._open(it, None, False)  # its Header was lost
            elif it < self._iteration:
                return  # a straggler of an iteration already delivered
            for name, value in _pv_entries(rec):
                self._results.setdefault(name, []).append(value)
        elif kind == replies.TAIL:
            if self._iteration is None or it != self._iteration:
                return
            self._close(rec.get("timestamp"), complete=self._has_header and rec.get("error", 0) == 0)
