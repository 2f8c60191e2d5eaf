"""The contract every EPICS adapter (PVA, CA) fulfils for the gateway.

Values cross this boundary as *value trees*: plain dicts mirroring the EPICS
structure, leaves being int/float/bool/str, lists, or numpy arrays. Nothing
here knows about Kafka or serialisation.
"""
from __future__ import annotations

import ctypes
import sys
import threading
from typing import Any, Callable, Protocol

from k2eg.protocol.errors import ErrorCode, ProtocolError

ValueTree = dict[str, Any]
EventCallback = Callable[[ValueTree], None]


class PVError(ProtocolError):
    """An EPICS operation failed; code is EPICS_FAILED or TIMEOUT."""


def connect_timeout(name: str, seconds: float) -> PVError:
    return PVError(ErrorCode.TIMEOUT, f"PV '{name}' did not connect within {seconds:g} s")


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
    """One per protocol; thread-safe; methods block up to ``timeout``."""

    protocol: str  # "pva" or "ca"

    def get(self, name: str, timeout: float) -> ValueTree: ...

    def put(self, name: str, value: ValueTree, timeout: float) -> None: ...

    def info(self, name: str, timeout: float) -> dict[str, Any]: ...

    def monitor(self, name: str, on_event: EventCallback) -> Subscription: ...

    def close(self) -> None: ...
