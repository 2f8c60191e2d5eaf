"""The contract every EPICS adapter (PVA, CA) fulfils for the gateway.

Values cross this boundary as *value trees*: plain dicts mirroring the EPICS
structure, leaves being int/float/bool/str, lists, or numpy arrays. Nothing
here knows about Kafka or serialisation.
"""
from __future__ import annotations

import ctypes
import itertools
import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol

from k2eg.protocol.errors import ErrorCode, ProtocolError

ValueTree = dict[str, Any]
EventCallback = Callable[[ValueTree], None]
GetDone = Callable[[ValueTree | None, Exception | None], None]  # (tree, None) or (None, error)

_log = logging.getLogger(__name__)


class PVError(ProtocolError):
    """An EPICS operation failed; code is EPICS_FAILED or TIMEOUT."""


def connect_timeout(name: str, seconds: float) -> PVError:
    return PVError(ErrorCode.TIMEOUT, f"PV '{name}' did not connect within {seconds:g} s")


INVALID = 3  # alarm severity of a value the gateway cannot vouch for
DISCONNECTED = "disconnected"  # alarm message of the event that says a PV is gone (PROTOCOL 4)


def disconnected(last: ValueTree | None, status: int, why: str = DISCONNECTED) -> ValueTree:
    """The event a monitor's subscribers get while its PV is away: the last value (if it ever had one)
    with an INVALID alarm saying why. ``status`` is the protocol's own (CA COMM, PVA CLIENT)."""
    tree = {} if last is None else dict(last)
    tree["alarm"] = {"severity": INVALID, "status": status, "message": why}
    return tree


def is_disconnected(tree: ValueTree | None) -> bool:
    alarm = tree.get("alarm") if isinstance(tree, dict) else None
    return isinstance(alarm, dict) and alarm.get("message") == DISCONNECTED and alarm.get("severity") == INVALID


# -- callbacks on threads Python did not start (libca, pvxs) ---------------------
_pinned = threading.local()  # per Python thread state: set once the state is pinned


def pin_thread_state() -> None:
    """Keep this foreign thread's Python thread state from one callback to the next.

    ctypes and p4p wrap each callback from a C thread in PyGILState_Ensure/
    Release, which builds and tears down a thread state every time: ~8 us of a
    ~13 us CA monitor callback (measured). One Ensure that is never released
    keeps the state; a thread that exits leaves it behind (a few KB per
    thread: libca starts one per server circuit).
    """
    if not getattr(_pinned, "done", False):
        _pinned.done = True
        ctypes.pythonapi.PyGILState_Ensure()


# -- sharing equal read-only sub-trees ------------------------------------------
_LEAVES = (str, int, float, bool, type(None), bytes)
# Distinct sub-trees remembered (10k PVs with their own display, control and valueAlarm
# fit); beyond, the pool starts over. Bounds what it keeps alive of PVs no longer
# monitored to ~25 MB; trees already out keep what they share.
_POOL_LIMIT = 50_000
_POOL_MAX_ITEMS = 256  # longer lists (waveforms of strings) are not worth hashing
_pool: dict[int, Any] = {}


def _frozen(x: Any) -> Any:
    """A hashable, type-exact image of a sub-tree; TypeError for what is not shared (arrays, long lists)."""
    t = type(x)
    if t is dict:
        return dict, tuple((k, _frozen(v)) for k, v in x.items())
    if t is list:
        if len(x) > _POOL_MAX_ITEMS:
            raise TypeError("too long to share")
        return list, tuple(_frozen(v) for v in x)
    if t is float:
        return t, x.hex()  # NaN equal to NaN, -0.0 not equal to 0.0
    if t in _LEAVES:
        return t, x  # the type keeps 0 and 0.0 (equal, same hash) apart
    raise TypeError(t.__name__)


def _shared_item(k: Any, v: Any) -> tuple[Any, Any]:
    return (sys.intern(k) if type(k) is str else k), (share(v) if type(v) is dict or type(v) is list else v)


def share(x: Any) -> Any:
    """An equal sub-tree already held by another PV or update, else a copy of ``x`` sharing what it can.

    Metadata (display, control, valueAlarm, enum choices) is the same for
    many PVs and rarely changes: one copy per distinct content instead of one
    per PV saves KBs per PV at 10k PVs. A dict that is not shared as a whole
    still shares its equal children and interned keys. Like every value
    tree, the result is read-only.
    """
    if type(x) is dict:
        x = dict(_shared_item(k, v) for k, v in x.items())
    try:
        key = _frozen(x)
        h = hash(key)
    except TypeError:
        return x
    have = _pool.get(h)
    if have is not None and have is not x:
        try:
            if _frozen(have) == key:
                return have
        except TypeError:
            pass
    if len(_pool) >= _POOL_LIMIT:
        _pool.clear()
    _pool[h] = x
    return x


class Subscription(Protocol):
    def close(self) -> None: ...


class Provider(Protocol):
    """One per protocol; thread-safe; methods block up to ``timeout``.

    A provider whose library calls back when a get completes (PVA) also offers
    ``get_async(name, timeout, done: GetDone)``: ``done`` is called once, from a
    library or deadline thread, and must not block. The gateway then needs no
    waiting thread per get.
    """

    protocol: str  # "pva" or "ca"
    disconnected_status: int  # alarm status of its disconnected events (``disconnected``)

    def get(self, name: str, timeout: float) -> ValueTree: ...

    def put(self, name: str, value: ValueTree, timeout: float) -> None: ...

    def info(self, name: str, timeout: float) -> dict[str, Any]: ...

    def monitor(self, name: str, on_event: EventCallback) -> Subscription: ...

    def close(self) -> None: ...


# -- timeouts of operations nobody waits for --------------------------------------
class Deadlines:
    """Calls ``expire()`` of every registration not cancelled within its timeout, from one thread.

    A provider uses one timeout (the gateway's connection timeout), so registrations
    expire in the order they came: one FIFO per distinct timeout, and cancelling
    (the usual end) is a dict removal, not a heap search.
    """

    def __init__(self, name: str):
        self._cond = threading.Condition(threading.Lock())
        self._fifos: dict[float, OrderedDict[int, tuple[float, Callable[[], None]]]] = {}
        self._tickets = itertools.count()
        self._closed = False
        self._wake_at: float | None = None  # when the thread wakes next by itself; None: only when told
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def add(self, timeout: float, expire: Callable[[], None]) -> tuple[float, int]:
        """A ticket for ``cancel``; ``expire`` must not raise and must not block."""
        ticket, at = (timeout, next(self._tickets)), time.monotonic() + timeout
        with self._cond:
            fifo = self._fifos.get(timeout)
            if fifo is None:
                fifo = self._fifos[timeout] = OrderedDict()
            fifo[ticket[1]] = (at, expire)
            # Waking the thread costs a context switch; under a steady flow of gets it
            # already wakes for an earlier deadline, and sees this one then.
            if self._wake_at is None or at < self._wake_at:
                self._wake_at = at
                self._cond.notify()
        return ticket

    def cancel(self, ticket: tuple[float, int]) -> None:
        with self._cond:
            fifo = self._fifos.get(ticket[0])
            if fifo is not None:
                fifo.pop(ticket[1], None)

    def close(self) -> None:
        """Pending registrations never expire."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(5.0)

    def _due(self) -> tuple[list[Callable[[], None]], float | None]:
        """Under the lock: what expired, taken out, and how long until the next deadline."""
        now, due, wait = time.monotonic(), [], None
        for fifo in self._fifos.values():
            while fifo:
                at, expire = next(iter(fifo.values()))
                if at > now:
                    wait = at - now if wait is None else min(wait, at - now)
                    break
                fifo.popitem(last=False)
                due.append(expire)
        return due, wait

    def _loop(self) -> None:
        while True:
            with self._cond:
                due, wait = self._due()
                while not due and not self._closed:
                    self._wake_at = None if wait is None else time.monotonic() + wait
                    self._cond.wait(wait)
                    due, wait = self._due()
                if self._closed:
                    return
            for expire in due:
                try:
                    expire()
                except Exception:
                    _log.exception("expiry of a timed operation failed")
