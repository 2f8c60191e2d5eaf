"""One-shot and repeating snapshots on top of the shared monitor hub (PROTOCOL section 7).

Every snapshot reads its PVs through taps on the hub's channels: one EPICS
subscription per PV, shared with monitors and other snapshots, never taken
away from them.

One-shot ``snapshot``
    One record per requested PV, carrying the PV's *first* value: at once
    when a running subscription already holds it, otherwise as soon as it
    arrives. The command completes (record ``error == 1``) as soon as every PV
    has its record; at the latest when ``time_window_msec`` has elapsed, PVs
    still silent are read with a get (in parallel, all within one connection
    timeout), and a PV that cannot be read gets a record whose value is an
    INVALID alarm saying why (``unreadable``). It is an ``error == 0`` record
    because the 0.3.0 client ends the snapshot at the first non-zero error.

Repeating ``repeating_snapshot``
    Iterations (Header, Data..., Tail) on the snapshot's own topic, numbered
    from 1. A window of ``time_window_msec`` opens when the iteration starts;
    the next one starts ``repeat_delay_msec`` after the previous window
    closed (``triggered``: when a ``repeating_snapshot_trigger`` arrives).
    A trigger of a scheduled snapshot closes the open window now (in a
    ``repeat_delay_msec`` pause: opens one and closes it now) and answers
    with that iteration; the schedule goes on from that close. A stop closes
    an open window at once (a triggered snapshot's too), publishes it as the
    final iteration and only then replies, with ``iter_index`` = that
    iteration; a stop of a snapshot that is not running answers 0.

    The Header goes out with the iteration's first Data record (else just
    before its Tail), not when the window opens: a 0.3.0 client joins the
    topic only after the start reply, so it would lose an early Header and
    with it the whole iteration (the C++ gateway does the same).

    *timedbuffered*: every update that arrived while the window was open, in
    arrival order, pushed every ``sub_push_delay_msec`` (else at the close).
    With ``repeat_delay_msec == 0`` windows are back to back, so each update
    lands in exactly one iteration. At most ``max_buffered`` values wait for
    a push; later ones are left out and counted in the Tail's ``truncated``.

    *normal* -- the "same instant": an iteration is the state of its PVs at
    one instant ``T``, the moment its window closes, measured on the EPICS
    time line (the ``timeStamp`` of each value, which IOCs set when a record
    is processed). For every PV the iteration holds the newest value stamped
    no later than ``T``. The gateway waits ``SETTLE_S`` after ``T`` for such
    values still in flight, so network and callback latency does not decide
    which value is taken. If ``T`` falls inside a burst of updates -- stamps
    closer than ``BURST_GAP_S`` to each other, as the records of one IOC scan
    pass are -- ``T`` moves back to just before the burst (by at most
    ``MAX_SHIFT_S``), so the records processed by one scan pass are always
    all in the iteration or all out of it: PVs scanned together come from the
    same scan tick. Each Data record's ``timestamp`` is ``T`` in ms. A value
    without a timeStamp, or a PV whose stamps all lie after ``T`` (an IOC
    clock running ahead of the gateway's), contributes the value that had
    arrived when the window closed.

Threads: one per running repeating snapshot (at most ``max_repeating``),
plus a small pool for one-shot gets. Trigger and stop never block a command
worker: the snapshot's thread answers them once the iteration is out. A
failing iteration is logged and published as a Tail with an error; the
thread only gives up after ``MAX_FAILURES`` failures in a row, and then
answers everything still pending.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

from k2eg.protocol import commands as C
from k2eg.protocol import replies
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import PVUri, snapshot_topic

from .kafka import too_large
from .monitors import Channel, MonitorHub
from .options import SPECS
from .state import SnapshotState, StateStore, snapshot_key

log = logging.getLogger("k2eg.gateway.snapshots")

SETTLE_S = 0.1          # wait after a normal window closes for values stamped before it
BURST_GAP_S = 0.005     # stamps closer than this belong to one burst (one scan pass)
MAX_SHIFT_S = 0.05      # the instant moves back at most this far to avoid cutting a burst
HISTORY = 16            # values kept per PV to choose from
MAX_FAILURES = 5        # consecutive failed iterations before a snapshot gives up
MAX_PENDING = 1000      # queued triggers/stops per snapshot
DELIVERY_WAIT_S = 5.0  # a one-shot snapshot's completion waits this long at most for Kafka's verdicts
# timedbuffered: values held until the next push; the default of --snapshot-max-buffered
MAX_BUFFERED: int = next(s.default for s in SPECS if s.name == "snapshot-max-buffered")
COMM_ALARM = 9          # alarm status of a PV the gateway could not talk to (as for a lost connection)


def now_ms() -> int:
    return int(time.time() * 1000)


def unreadable(reason: str) -> dict:
    """The record value of a PV that could not be read: an INVALID alarm saying why, no ``value``."""
    return {"alarm": {"severity": 3, "status": COMM_ALARM, "message": reason}}


def filtered(tree: Any, keep: tuple[str, ...]) -> Any:
    """Only the top-level fields in ``keep`` (all when ``keep`` is empty)."""
    return {k: v for k, v in tree.items() if k in keep} if keep and isinstance(tree, dict) else tree


def stamp(tree: Any) -> float | None:
    """The EPICS timeStamp of a value tree as POSIX seconds, or None when it has none."""
    ts = tree.get("timeStamp") if isinstance(tree, dict) else None
    if not isinstance(ts, dict):
        return None
    s, ns = ts.get("secondsPastEpoch"), ts.get("nanoseconds") or 0
    if isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0 or not isinstance(ns, (int, float)):
        return None
    return s + ns * 1e-9


def coherent(history: Mapping[Hashable, Sequence[tuple[float | None, Any]]], arrived: Mapping[Hashable, Any],
             instant: float, gap: float = BURST_GAP_S, max_shift: float = MAX_SHIFT_S) -> tuple[float, dict]:
    """The values of a normal iteration at ``instant`` (see the module docstring).

    ``history``: per PV, (stamp, value) in arrival order; ``arrived``: per PV,
    the value that had arrived at ``instant``. Returns the instant actually
    used (moved back before a burst it would cut) and the chosen values.
    """
    lo_limit = instant - max_shift - gap
    stamps = sorted(s for entries in history.values() for s, _ in entries
                    if s is not None and lo_limit <= s <= instant + gap)
    below = [s for s in stamps if s <= instant]
    above = [s for s in stamps if s > instant]
    used = instant
    if below and above and above[0] - below[-1] <= gap:
        start = below[-1]
        for s in reversed(below[:-1]):
            if start - s > gap:
                break
            start = s
        if instant - start <= max_shift:
            used = start - 1e-6
    values: dict = {}
    for key in set(history) | set(arrived):
        best, best_stamp = None, None
        for s, tree in history.get(key, ()):
            if s is not None and s <= used and (best_stamp is None or s >= best_stamp):
                best, best_stamp = tree, s
        if best_stamp is None:
            if key not in arrived:
                continue
            best = arrived[key]
        values[key] = best
    return used, values


# ----------------------------------------------------------------------------- one-shot

class OneShot:
    """Publishes each PV's first value, reads the silent ones at the window's end, then completes.

    Values are handed to the thread that runs the snapshot (a command worker), which alone
    publishes: a tap runs on an EPICS callback thread, and a publish may wait for Kafka
    (up to ``REPLY_BLOCK_S``) -- every monitor of that provider would wait with it.

    A record the broker refuses for its size is replaced by an error record for its PV
    before completion, so the caller still learns about every PV it asked for; that is
    why completion waits for Kafka's delivery reports.
    """

    def __init__(self, cmd: C.Snapshot, hub: MonitorHub, publish: Callable[..., None],
                 read: Callable[[PVUri], dict], pool: ThreadPoolExecutor | None = None, read_timeout: float = 5.0):
        self.cmd, self.hub, self.publish, self.read, self.pool = cmd, hub, publish, read, pool
        self.read_timeout = read_timeout
        # Guards ``taken``, ``arrived`` and ``closed``; never held while publishing.
        self.cond = threading.Condition()
        self.taken: set[PVUri] = set()           # PVs whose record is published or waiting in ``arrived``
        self.arrived: dict[PVUri, Any] = {}      # first values not yet published
        self.closed = False
        # Delivery reports come on the producer's poll thread, which must never wait for
        # the publishing thread (that one may wait for the poll thread to free queue space).
        self.reports = threading.Condition()
        self.unsettled = 0
        self.refused: dict[PVUri, str] = {}

    def _send(self, pv: PVUri, tree: Any) -> None:
        with self.reports:
            self.unsettled += 1
        try:
            self.publish(replies.value(self.cmd.reply_id, pv.name, tree), pv.name,
                         lambda size, why: self._refused(pv, size, why), self._settled)
        except BaseException:
            self._settled()  # no report will come for it
            raise

    def _refused(self, pv: PVUri, size: int, why: str) -> None:
        with self.reports:
            self.refused[pv] = too_large(size, self.cmd.reply_topic, why)

    def _settled(self) -> None:
        with self.reports:
            self.unsettled -= 1
            self.reports.notify_all()

    def _offer(self, pv: PVUri, tree: Any) -> None:
        """Hand ``pv``'s value to the publishing thread unless it already has one. Never waits for Kafka."""
        with self.cond:
            if self.closed or pv in self.taken:
                return
            self.taken.add(pv)
            self.arrived[pv] = tree
            self.cond.notify_all()

    def _publish_arrived(self) -> None:
        with self.cond:
            batch, self.arrived = self.arrived, {}
        for pv, tree in batch.items():
            try:
                self._send(pv, tree)
            except Exception as e:  # a value we cannot encode still gets its record
                log.exception("snapshot %s: cannot publish the value of %s", self.cmd.reply_id, pv)
                self._send(pv, unreadable(f"cannot encode the value: {type(e).__name__}: {e}"))

    def _publish_until(self, deadline: float) -> None:
        """Publish values as they are handed over, until every PV has its record or ``deadline`` (monotonic)."""
        while True:
            self._publish_arrived()
            with self.cond:
                if self.arrived:
                    continue
                left = deadline - time.monotonic()
                if len(self.taken) == len(self.cmd.pvs) or left <= 0:
                    return
                self.cond.wait(left)

    def _silent(self) -> list[PVUri]:
        with self.cond:
            return [pv for pv in self.cmd.pvs if pv not in self.taken]

    def _replace_refused(self) -> None:
        """Kafka's verdicts on the records sent; each one refused for its size becomes an error record."""
        with self.reports:
            if not self.reports.wait_for(lambda: self.unsettled <= 0, DELIVERY_WAIT_S):
                log.warning("snapshot %s: %d records still unconfirmed by Kafka at completion",
                            self.cmd.reply_id, self.unsettled)
            refused, self.refused = self.refused, {}
        for pv, why in refused.items():
            self.publish(replies.value(self.cmd.reply_id, pv.name, unreadable(why)), pv.name)

    def _tap(self, ch: Channel, tree: dict) -> None:
        self._offer(ch.pv, tree)

    def _read(self, pv: PVUri) -> None:
        with self.cond:
            if pv in self.taken or self.closed:
                return
        try:
            tree = self.read(pv)
        except ProtocolError as e:
            tree = unreadable(e.message)
        except Exception as e:  # a provider bug: still a record, never a lost PV
            log.exception("snapshot get of %s failed", pv)
            tree = unreadable(f"get failed: {type(e).__name__}: {e}")
        self._offer(pv, tree)

    def run(self) -> None:
        deadline = time.monotonic() + self.cmd.time_window_msec / 1000
        try:
            for pv in self.cmd.pvs:
                ch = self.hub.add_tap(pv, self._tap)
                last = ch.last
                if last is not None:       # a running subscription already knows the current value
                    self._offer(pv, last)
            self._publish_until(deadline)
            silent = self._silent()
            if silent and self.pool is None:
                for pv in silent:
                    self._read(pv)
            elif silent:
                # Gets run in parallel while monitors keep delivering: whichever answers first is taken.
                # One deadline for all, so many unreachable PVs cost one connection timeout, not one each.
                futures = [self.pool.submit(self._read, pv) for pv in silent]
                self._publish_until(time.monotonic() + self.read_timeout + 0.5)
                for f in futures:
                    f.cancel()
            for pv in self._silent():
                self._offer(pv, unreadable(f"PV '{pv.name}' sent no value within the "
                                           f"{self.cmd.time_window_msec} ms window and could not be read "
                                           f"within {self.read_timeout:g} s"))
        finally:
            with self.cond:
                self.closed = True
            for pv in self.cmd.pvs:
                self.hub.remove_tap(pv, self._tap)
        self._publish_arrived()
        self._replace_refused()
        self.publish(replies.snapshot_complete(self.cmd.reply_id), None)


# ----------------------------------------------------------------------------- repeating

class NotRunning(ProtocolError):
    """No snapshot of that name is running (never started, stopped, or ended)."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.BAD_REQUEST, message)


@dataclass
class Request:
    """A trigger or stop waiting for the snapshot's thread; ``answer`` replies to its sender."""

    kind: str                                   # "trigger" or "stop"
    answer: Callable[[int | None, str | None], None] = lambda iteration, error: None
    tags: dict = field(default_factory=dict)
    answered: bool = False

    def finish(self, iteration: int | None, error: str | None = None) -> None:
        if self.answered:
            return
        self.answered = True
        try:
            self.answer(iteration, error)
        except Exception:
            log.exception("answering a snapshot %s failed", self.kind)


class Repeating:
    """A named snapshot running iterations on its own thread until stopped."""

    def __init__(self, cmd: C.RepeatingSnapshot, hub: MonitorHub,
                 publish: Callable[[str, str, dict, str | None], None],
                 on_end: Callable[["Repeating"], None] = lambda snap: None, settle: float = SETTLE_S,
                 first_iteration: int = 0, warmup: float = 0.0, max_buffered: int = MAX_BUFFERED):
        self.cmd = cmd
        self.name = cmd.snapshot_name
        self.topic = snapshot_topic(cmd.snapshot_name)
        self.hub = hub
        self._publish = publish
        self._on_end = on_end
        self.settle = settle
        self.timed = cmd.kind is C.SnapshotKind.TIMED_BUFFERED
        self.iteration = first_iteration   # last iteration started (a resumed snapshot continues its numbering)
        self.published = first_iteration   # last iteration whose Tail went out without error
        self.warmup = warmup        # resumed: wait this long for values before the first iteration
        self.failures = 0
        self.max_buffered = max_buffered
        self.lock = threading.Lock()            # values fed by the hub
        self.latest: dict[PVUri, dict] = {}
        self.history: dict[PVUri, deque] = {pv: deque(maxlen=HISTORY) for pv in cmd.pvs}
        self.buffer: list[tuple[PVUri, dict]] = []
        self.left_out = 0                       # timedbuffered: values of the open window beyond max_buffered
        self.window_open = False
        self.cv = threading.Condition()         # ``requests`` and ``closing``: read and changed only under it
        self.requests: deque[Request] = deque()
        self.closing = False
        self.stopped = threading.Event()
        self.channels: list[Channel] = []
        self.header: dict | None = None         # the open iteration's Header, until it goes out
        self.thread = threading.Thread(target=self._loop, name=f"k2eg-snap-{self.name}"[:60], daemon=True)

    # -- fed by the hub (EPICS callback threads)
    def _tap(self, ch: Channel, tree: dict) -> None:
        with self.lock:
            self.latest[ch.pv] = tree
            self.history[ch.pv].append((stamp(tree), tree))
            if self.window_open:
                if len(self.buffer) < self.max_buffered:
                    self.buffer.append((ch.pv, tree))
                else:
                    self.left_out += 1

    def attach(self) -> None:
        for pv in self.cmd.pvs:
            ch = self.hub.add_tap(pv, self._tap)
            self.channels.append(ch)
            last = ch.last
            if last is not None:
                with self.lock:
                    if pv not in self.latest:
                        self.latest[pv] = last
                        self.history[pv].append((stamp(last), last))

    def wait_connected(self, timeout: float) -> list[PVUri]:
        """Wait (one timeout for all) until every PV has a value; return those that have none."""
        deadline = time.monotonic() + timeout
        for ch in self.channels:
            ch.first_value.wait(max(0.0, deadline - time.monotonic()))
        with self.lock:
            for pv, ch in zip(self.cmd.pvs, self.channels):
                last = ch.last
                if pv not in self.latest and last is not None:   # its tap call may still be on its way
                    self.latest[pv] = last
                    self.history[pv].append((stamp(last), last))
            return [pv for pv in self.cmd.pvs if pv not in self.latest]

    def start(self) -> None:
        self.thread.start()

    # -- requests (command workers)
    def submit(self, req: Request) -> None:
        with self.cv:
            if self.stopped.is_set():
                raise NotRunning(f"no running snapshot named '{self.name}'")
            if len(self.requests) >= MAX_PENDING:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"snapshot '{self.name}' already has {MAX_PENDING} "
                                                           "requests waiting")
            self.requests.append(req)
            self.cv.notify_all()

    @property
    def stopping(self) -> bool:
        with self.cv:
            return self._stop_pending()

    def close(self) -> None:
        """Gateway shutdown: end the thread soon, without a final iteration."""
        with self.cv:
            self.closing = True
            self.cv.notify_all()

    def _stop_pending(self) -> bool:
        """Caller holds ``cv``."""
        return any(r.kind == "stop" for r in self.requests)

    def _interrupt(self) -> bool:
        """Whether an open window must close now (caller holds ``cv``): shutdown, a stop, or a trigger
        of a scheduled snapshot (a triggered one serves its triggers one window each)."""
        return (self.closing or self._stop_pending()
                or not self.cmd.triggered and any(r.kind == "trigger" for r in self.requests))

    def _take_triggers(self) -> list[Request]:
        """Scheduled snapshot: the triggers queued ahead of any stop, served by the window closing now."""
        with self.cv:
            taken = []
            while self.requests and self.requests[0].kind == "trigger":
                taken.append(self.requests.popleft())
            return taken

    def _sleep_until(self, when: float) -> bool:
        """Sleep until monotonic ``when``; False if interrupted first."""
        with self.cv:
            while not self._interrupt():
                left = when - time.monotonic()
                if left <= 0:
                    return True
                self.cv.wait(left)
        return False

    # -- publishing
    def _emit(self, record: dict, value_key: str | None = None) -> None:
        self._publish(self.topic, self.name, record, value_key)

    def _emit_header(self) -> None:
        """The open iteration's Header, once: it goes out with the iteration's first Data (else its Tail),
        as the C++ gateway's does, so a 0.3.0 client joining the topic after the start reply (from its
        newest offset, on an empty topic from the start) still sees the first iteration whole."""
        header, self.header = self.header, None
        if header is not None:
            self._emit(header)

    def _emit_data(self, pv: PVUri, tree: Any, ts: int, iteration: int) -> None:
        self._emit_header()
        record = replies.snapshot_data(pv.name, filtered(tree, self.cmd.field_filter), ts, iteration)
        try:
            self._emit(record, pv.name)
        except Exception as e:  # one value we cannot encode does not lose the iteration
            log.exception("snapshot %s: cannot publish the value of %s", self.name, pv)
            self._emit(replies.snapshot_data(pv.name, unreadable(f"cannot encode the value: {type(e).__name__}: {e}"),
                                             ts, iteration), pv.name)

    def _flush(self, ts: int, iteration: int) -> None:
        with self.lock:
            items, self.buffer = self.buffer, []
        for pv, tree in items:
            self._emit_data(pv, tree, ts, iteration)

    # -- one iteration
    def _iterate(self, tags: dict | None, start: float, served: list[Request]) -> float:
        """Header, the window, Data, Tail; returns the monotonic time the window closed.

        Triggers of a scheduled snapshot that close the window are appended to ``served``.
        """
        self.iteration += 1
        it = self.iteration
        self.header = replies.snapshot_header(self.name, now_ms() - int((time.monotonic() - start) * 1000), it)
        if tags:
            self.header["tags"] = dict(tags)
        if self.timed:
            with self.lock:
                if not self.window_open:       # back-to-back windows keep the values since the last close
                    self.buffer, self.left_out = [], 0
                    self.window_open = True
        end = start + self.cmd.time_window_msec / 1000
        push = self.cmd.sub_push_delay_msec / 1000 if self.timed else 0
        while True:
            until = end
            if push > 0:
                until = min(end, time.monotonic() + push)
            if not self._sleep_until(until) or time.monotonic() >= end:
                break
            self._flush(now_ms(), it)
        closed = time.monotonic()
        instant = time.time()
        extra: dict[str, Any] = {}
        if not self.cmd.triggered:
            served += self._take_triggers()
            trigger_tags = {k: v for req in served for k, v in req.tags.items()}
            if trigger_tags:
                (self.header if self.header is not None else extra)["tags"] = trigger_tags
        if self.timed:
            # Back to back unless a pause follows, the snapshot waits for triggers, or it is ending.
            keep_open = self.cmd.repeat_delay_msec == 0 and not self.cmd.triggered and not self._ending()
            with self.lock:
                items, self.buffer = self.buffer, []
                left_out, self.left_out = self.left_out, 0
                self.window_open = keep_open
            ts = now_ms()
            for pv, tree in items:
                self._emit_data(pv, tree, ts, it)
            if left_out:
                extra["truncated"] = left_out
                log.warning("snapshot %s iteration %d: %d values beyond the %d buffered were left out",
                            self.name, it, left_out, self.max_buffered)
        else:
            with self.lock:
                arrived = dict(self.latest)
            if self.settle > 0 and not self.closing:
                time.sleep(self.settle)      # values stamped before the instant may still be in flight
            with self.lock:
                history = {pv: list(h) for pv, h in self.history.items()}
            used, values = coherent(history, arrived, instant)
            ts = int(used * 1000)
            for pv in self.cmd.pvs:
                if pv in values:
                    self._emit_data(pv, values[pv], ts, it)
        self._emit_header()
        self._emit(replies.snapshot_tail(self.name, now_ms(), it, **extra))
        self.published = it
        return closed

    def _guarded(self, req: Request | None, start: float) -> float:
        """Run one iteration; a failure is logged, published as an error Tail and answered, never fatal."""
        served = [req] if req is not None else []
        try:
            closed = self._iterate(req.tags if req else None, start, served)
        except Exception as e:
            self.failures += 1
            log.exception("snapshot %s: iteration %d failed (%d in a row)", self.name, self.iteration, self.failures)
            message = f"iteration {self.iteration} failed: {type(e).__name__}: {e}"
            try:
                self._emit(replies.snapshot_tail(self.name, now_ms(), self.iteration, int(ErrorCode.EPICS_FAILED),
                                                 message=message))
            except Exception:
                log.exception("snapshot %s: cannot publish the error Tail", self.name)
            with self.lock:
                self.window_open = False
                self.buffer, self.left_out = [], 0
            for r in served:
                r.finish(None, message)
            if self.failures < MAX_FAILURES:
                self._sleep_until(time.monotonic() + 1.0)
            return time.monotonic()
        self.failures = 0
        for r in served:
            r.finish(self.iteration)
        return closed

    # -- the thread
    def _next_request(self) -> Request | None:
        with self.cv:
            while not self.requests and not self.closing:
                self.cv.wait()
            if self.closing:
                return None
            if self.requests[0].kind == "stop":
                return self.requests[0]          # left queued: _end answers every stop
            return self.requests.popleft()

    def _ending(self) -> bool:
        with self.cv:
            return self.closing or self._stop_pending()

    def _loop(self) -> None:
        try:
            if self.warmup > 0:
                self.wait_connected(self.warmup)
            if self.cmd.triggered:
                while self.failures < MAX_FAILURES:
                    req = self._next_request()
                    if req is None or req.kind == "stop":
                        return
                    self._guarded(req, time.monotonic())
            else:
                start = time.monotonic()
                while self.failures < MAX_FAILURES:
                    if not self._sleep_until(start):
                        if self._ending():
                            break
                        start = time.monotonic()   # a trigger in the pause: its window opens (and closes) now
                    closed = self._guarded(None, start)
                    # The next window is timed from this one's close, not from the end of publishing.
                    start = closed + self.cmd.repeat_delay_msec / 1000
            if self.failures >= MAX_FAILURES:
                log.error("snapshot %s stopped after %d failed iterations in a row", self.name, self.failures)
        except BaseException:
            log.exception("snapshot %s: thread failed", self.name)
        finally:
            self._end()

    def _end(self) -> None:
        with self.cv:
            self.stopped.set()
            pending, self.requests = list(self.requests), deque()
        for ch in self.channels:
            self.hub.remove_tap(ch.pv, self._tap)
        try:
            self._on_end(self)
        except Exception:
            log.exception("snapshot %s: end callback failed", self.name)
        why = ("the gateway is shutting down" if self.closing
               else f"the snapshot gave up after {self.failures} failed iterations" if self.failures >= MAX_FAILURES
               else "the snapshot was stopped first")
        for req in pending:
            if req.kind == "stop" and self.failures < MAX_FAILURES:
                req.finish(self.published)
            else:
                req.finish(None, f"snapshot '{self.name}' ended before this {req.kind} was served: {why}")


class SnapshotManager:
    """The gateway's snapshot commands."""

    def __init__(self, hub: MonitorHub, reply: Callable, publish_record: Callable, read: Callable[[PVUri], dict],
                 ensure_topics: Callable[[list[str]], Any], connect_timeout: float | None = None,
                 max_repeating: int = 256, read_workers: int = 16, settle: float = SETTLE_S,
                 state: StateStore | None = None, max_buffered: int = MAX_BUFFERED):
        self.hub = hub
        self.reply = reply                  # (cmd, record, key) -> None
        self.publish_record = publish_record  # (topic, key, record, ser, value_key[, on_too_large, on_settled])
        self.read = read
        self.ensure_topics = ensure_topics
        if connect_timeout is None:         # the gateway's --pv-connection-timeout, as its read() uses it
            connect_timeout = getattr(getattr(read, "__self__", None), "timeout", None) or 5.0
        self.connect_timeout = float(connect_timeout)
        self.max_repeating = max_repeating
        self.settle = settle
        self.readers = ThreadPoolExecutor(read_workers, thread_name_prefix="k2eg-snap-read")
        self.running: dict[str, Repeating] = {}
        self.lock = threading.Lock()
        self.iterations = 0
        self.on_iteration: Callable[[float], None] | None = None   # seconds from Header to Tail (metrics)
        self.state = state                  # where running snapshots are kept across restarts, if anywhere
        self.max_buffered = max_buffered

    # -- one-shot
    def one_shot(self, cmd: C.Snapshot) -> None:
        self.ensure_topics([cmd.reply_topic])

        def publish(record: dict, value_key: str | None, refused: Callable | None = None,
                    settled: Callable | None = None) -> None:
            self.publish_record(cmd.reply_topic, replies.SNAPSHOT_KEY, record, cmd.serialization, value_key,
                                refused, settled)

        OneShot(cmd, self.hub, publish, self.read, self.readers, self.connect_timeout).run()

    # -- repeating
    def _reply(self, cmd: C.Command, record: dict) -> None:
        self.reply(cmd, record, replies.REPEATING_REPLY_KEY)

    def _ended(self, snap: Repeating) -> None:
        with self.lock:
            if self.running.get(snap.name) is snap:
                del self.running[snap.name]
                # Under the lock, so a new start of the same name writes its record after this tombstone.
                # A gateway shutdown is not an end: the snapshot resumes at the next start.
                if not snap.closing:
                    self._store(removed=[snapshot_key(snap.name)])

    def _store(self, **change: Any) -> None:
        """Record a change in the state topic; a failure costs the restart, never the command."""
        if self.state is None:
            return
        try:
            self.state.write(**change)
        except Exception:
            log.exception("cannot record snapshot state")

    def _publisher(self, cmd: C.RepeatingSnapshot) -> Callable[[str, str, dict, str | None], None]:
        began = time.time()   # one snapshot publishes from its own thread: no lock needed

        def publish(t: str, key: str, record: dict, value_key: str | None) -> None:
            nonlocal began
            kind = record.get("message_type")
            if kind == replies.HEADER:   # it carries the window's opening time, and may go out later
                began = record["timestamp"] / 1000
            self.publish_record(t, key, record, cmd.serialization, value_key)
            if kind == replies.TAIL:
                self.iterations += 1
                if self.on_iteration is not None:
                    self.on_iteration(max(0.0, time.time() - began))
        return publish

    def start(self, cmd: C.RepeatingSnapshot) -> None:
        topic = snapshot_topic(cmd.snapshot_name)
        with self.lock:
            existing = self.running.get(cmd.snapshot_name)
        if existing is not None and existing.stopping and existing.thread.is_alive():
            existing.thread.join(cmd.time_window_msec / 1000 + 5)   # a stop is closing it: start afresh
        with self.lock:
            existing = self.running.get(cmd.snapshot_name)
            if existing is not None and not existing.stopped.is_set():
                self._reply(cmd, replies.ok(cmd.reply_id, f"snapshot {cmd.snapshot_name} is already running "
                                                          f"(iteration {existing.iteration})",
                                            publishing_topic=existing.topic))
                return
            if len(self.running) >= self.max_repeating:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{len(self.running)} repeating snapshots are running, "
                                                           f"the most this gateway allows; stop one first")
            snap = Repeating(cmd, self.hub, self._publisher(cmd), self._ended, self.settle,
                             max_buffered=self.max_buffered)
            self.running[cmd.snapshot_name] = snap
        try:
            self.ensure_topics([topic])
            snap.attach()
            missing = snap.wait_connected(self.connect_timeout)
        except BaseException:
            snap.close()
            snap._end()
            raise
        self._store(items=[SnapshotState(cmd)])
        snap.start()
        message = f"snapshot {cmd.snapshot_name} started"
        if missing:
            names = ", ".join(pv.uri for pv in missing[:20]) + (", ..." if len(missing) > 20 else "")
            message += (f"; {len(missing)} of {len(cmd.pvs)} PVs sent no value within {self.connect_timeout:g} s "
                        f"and join when they connect: {names}")
        self._reply(cmd, replies.ok(cmd.reply_id, message, publishing_topic=topic))

    def resume(self, cmd: C.RepeatingSnapshot, last_iteration: int = 0) -> None:
        """Restart a snapshot kept in the state topic: no reply, numbering continues after ``last_iteration``,
        PVs are waited for on the snapshot's own thread so resuming many does not hold up the gateway."""
        with self.lock:
            if cmd.snapshot_name in self.running:
                return
            snap = Repeating(cmd, self.hub, self._publisher(cmd), self._ended, self.settle,
                             first_iteration=last_iteration, warmup=self.connect_timeout,
                             max_buffered=self.max_buffered)
            self.running[cmd.snapshot_name] = snap
        try:
            self.ensure_topics([snap.topic])
            snap.attach()
        except BaseException:
            snap.close()
            snap._end()
            raise
        snap.start()

    def _find(self, name: str) -> Repeating:
        with self.lock:
            snap = self.running.get(name)
        if snap is None or snap.stopped.is_set():
            raise NotRunning(f"no running snapshot named '{name}'")
        return snap

    def _answer(self, cmd: C.SnapshotTrigger | C.SnapshotStop, done: str) -> Callable[[int | None, str | None], None]:
        """The reply to a trigger or stop, sent by the snapshot's thread once its iteration is out."""
        def answer(iteration: int | None, error: str | None) -> None:
            if error is not None:
                self._reply(cmd, replies.error(cmd.reply_id, ErrorCode.EPICS_FAILED, error))
            else:
                self._reply(cmd, replies.ok(cmd.reply_id, f"snapshot {cmd.snapshot_name} {done} {iteration}",
                                            iter_index=iteration))
        return answer

    def trigger(self, cmd: C.SnapshotTrigger) -> None:
        """Triggered snapshot: one window per trigger. Scheduled: the open window closes now and is published
        as an extra iteration (in a repeat_delay pause, a window opens and closes now); the schedule goes on."""
        self._find(cmd.snapshot_name).submit(Request("trigger", self._answer(cmd, "published iteration"),
                                                     dict(cmd.tags)))

    def stop(self, cmd: C.SnapshotStop) -> None:
        """A snapshot that is not running is already stopped: error 0 (compat: scripts stop before they start)."""
        try:
            self._find(cmd.snapshot_name).submit(Request("stop", self._answer(cmd, "stopped after iteration")))
        except NotRunning:
            self._reply(cmd, replies.ok(cmd.reply_id, f"snapshot {cmd.snapshot_name} is not running: "
                                                      "already stopped"))

    def close(self) -> None:
        with self.lock:
            snaps = list(self.running.values())
        for s in snaps:
            s.close()
        self.readers.shutdown(wait=False, cancel_futures=True)
