"""Which command offsets the gateway may commit: only those of commands it has handled.

The command consumer reads each partition in offset order; workers and EPICS
callbacks finish the commands in any order. A partition's commit point is one
past the highest offset below which every command read has been handled (its
reply produced or its failure reported). So whatever a stopping or crashing
gateway had not finished stays uncommitted, and the next gateway of its group
runs it: commands are handled at least once.

Pure bookkeeping, driven by the consumer thread (``read``, ``settle``,
``forget``). ``done`` is the only call from other threads: a deque append, so
handling a command takes no lock.
"""
from __future__ import annotations

from collections import deque

Position = tuple[int, int]  # (partition, offset) of a command in the command topic


class CommitTracker:
    def __init__(self) -> None:
        self._read: dict[int, deque[int]] = {}   # partition -> offsets read and not yet committable, in order
        self._finished: dict[int, set[int]] = {}  # partition -> offsets handled but behind an unfinished one
        self._handled: deque[Position] = deque()
        # Any thread: the command at this position has been handled (exactly once per position read).
        self.done = self._handled.append

    def read(self, partition: int, offset: int) -> Position:
        """Consumer thread: a command was read; returns its position, to hand to ``done`` once handled."""
        q = self._read.get(partition)
        if q is None:
            q = self._read[partition] = deque()
            self._finished[partition] = set()
        q.append(offset)
        return partition, offset

    def settle(self) -> dict[int, int]:
        """Consumer thread: take in what was handled; the partitions whose commit point moved, with the
        offset to commit (the next one to read)."""
        touched: set[int] = set()
        handled = self._handled
        while handled:
            partition, offset = handled.popleft()
            q = self._read.get(partition)
            if q and offset >= q[0]:   # else: forgotten (revoked) or a stale report
                self._finished[partition].add(offset)
                touched.add(partition)
        moved: dict[int, int] = {}
        for partition in touched:
            q, finished = self._read[partition], self._finished[partition]
            last = None
            while q and q[0] in finished:
                last = q.popleft()
                finished.discard(last)
            if last is not None:
                moved[partition] = last + 1
        return moved

    def forget(self, partitions: list[int] | None = None) -> None:
        """Consumer thread: these partitions (all when None) are no longer ours; later reports about them are
        ignored."""
        for p in list(self._read) if partitions is None else partitions:
            self._read.pop(p, None)
            self._finished.pop(p, None)

    def unfinished(self) -> int:
        """Commands read and not yet handled (after the last ``settle``)."""
        return sum(len(q) - len(self._finished[p]) for p, q in self._read.items())

    def uncommitted(self) -> int:
        """Commands read whose offsets cannot be committed yet (handled ones behind an unfinished one included):
        what a crash now would run again. Bounded by the consumer, which stops reading beyond a limit."""
        return sum(len(q) for q in self._read.values())

    def oldest(self) -> Position | None:
        """The earliest unfinished command (the one holding the commit point back), for log lines."""
        firsts = [(p, q[0]) for p, q in self._read.items() if q]
        return min(firsts, key=lambda x: x[1]) if firsts else None
