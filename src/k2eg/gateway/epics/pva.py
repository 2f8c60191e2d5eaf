"""PV Access adapter on p4p.

One raw p4p client ``Context`` per provider, with ``nt=False`` so values
arrive as p4p ``Value``s and are turned into value trees here:

- union-free structures go through ``Value.todict()`` (one C call, the
  fastest full conversion measured);
- discriminated unions become ``{selected_member: value}`` (``todict()``
  would drop the member name), an empty union becomes ``None``; variant
  (``any``) fields carry no member name and stay plain values;
- monitor updates re-convert only the top-level fields pvxs marks as
  changed and share the unchanged sub-trees with the previous event, and
  metadata sub-trees (display, control, valueAlarm, ...) equal to another
  PV's are shared with it (``base.share``), so **trees must be treated as
  read-only**. Conversion plans are shared by every PV of one type.

Monitors do not use p4p's threaded ``Subscription``: that one loses its
only wakeup when the first update arrives before ``Context.monitor()``
returns, and with several workers can deliver one PV's updates out of
order. Here the wakeup only queues the subscription for one dispatcher
thread per provider, which drains it in order, and a wakeup that races
the subscription's creation is replayed. While monitored PVs are
disconnected, a probe Context looks for them and tells the main one to
search at once when they answer (see PROBE_PERIOD).
"""
from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from p4p import Value
from p4p.client.raw import Context, Disconnected, Finished, RemoteError

from k2eg.protocol.errors import ErrorCode

from .base import (Deadlines, EventCallback, GetDone, PVError, ValueTree, connect_timeout, disconnected,
                   pin_thread_state, share)

__all__ = ["PVAProvider", "PVASubscription", "value_tree", "structure_of"]

_log = logging.getLogger(__name__)

# NT alarm status "CLIENT": the client, not the server, says the PV is gone.
DISCONNECTED_STATUS = 7
_BATCH = 16  # updates drained per turn before other subscriptions get theirs
# pvxs' default monitor queue (4) squashed ~4% of 10 Hz updates when the dispatcher
# fell ~0.5 s behind on a loaded machine (soak, issue 7); entries cost memory only
# while the dispatcher lags.
MONITOR_QUEUE_SIZE = 64
# pvxs' search backoff brought a monitor back 0.3-5.5 s after its IOC answered
# again (measured), and its hurryUp() is honoured at most once per 30 s, so
# calling it blindly during an outage only spends it. While monitored PVs are
# disconnected a probe Context (whose fresh channels search at once) tries one
# of them this often; when the probe gets an answer the main Context is told
# to hurry.
PROBE_PERIOD = 1.0
HURRY_HOLDOFF = 30.0  # pvxs ignores hurryUp() this long after the last one: no point probing meanwhile
# A name read once stays in pvxs' channel cache (and searches while not found) until cleared; pvxs
# itself drops channels no operation used for two of its 10 s sweeps. The provider forgets names
# (channel and conversion plan) nothing used for this long; a monitor keeps its own.
IDLE_TIMEOUT = 300.0

_CODE_NAMES = {
    "?": "boolean", "s": "string", "b": "int8", "B": "uint8", "h": "int16", "H": "uint16",
    "i": "int32", "I": "uint32", "l": "int64", "L": "uint64", "f": "float", "d": "double",
    "v": "any",
}


# -- Value -> value tree -----------------------------------------------------
def _has_union(spec) -> bool:
    if not isinstance(spec, tuple):
        return False
    if spec[0] in ("U", "aU"):
        return True
    return any(_has_union(sub) for _, sub in spec[2])


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _leaf(v: Value, path: str) -> Any:
    x = v[path] if path else v
    return x.todict() if isinstance(x, Value) else x  # a variant may hold a structure


def _plain_struct(v: Value, path: str) -> Any:
    return v.todict(path) if path else v.todict()


def _plain_struct_array(v: Value, path: str) -> Any:
    return [e.todict() for e in v[path]]


def _compile(spec) -> Callable[[Value, str], Any]:
    """A converter ``f(value, path)`` for one field type, so no spec is walked per update."""
    if not isinstance(spec, tuple):
        return _leaf
    code, _id, members = spec
    if code in ("S", "aS") and not _has_union(spec):
        return _plain_struct if code == "S" else _plain_struct_array
    if code == "S":
        subs = [(name, _compile(sub)) for name, sub in members]
        return lambda v, p: {name: f(v, _join(p, name)) for name, f in subs}
    if code == "aS":
        subs = [(name, _compile(sub)) for name, sub in members]
        return lambda v, p: [{name: f(e, name) for name, f in subs} for e in v[p]]
    union = _Union(members)
    if code == "U":
        return union
    return lambda v, p: [union(v, f"{p}[{i}]") for i in range(len(v[p]))]


# numpy dtype.char -> p4p array code ('q'/'Q' are int64 on LP64)
_NP_CODES = {"?": "?", "b": "b", "B": "B", "h": "h", "H": "H", "i": "i", "I": "I",
             "l": "l", "L": "L", "q": "l", "Q": "L", "f": "f", "d": "d"}


def _kind_of_spec(spec) -> str:
    if isinstance(spec, tuple):
        return spec[0]
    if spec in ("b", "B", "h", "H", "i", "I", "l", "L"):
        return "int"
    if spec in ("f", "d"):
        return "float"
    return spec


def _kind_of_value(x: Any) -> str:
    if isinstance(x, Value):
        return "S"
    if isinstance(x, bool):
        return "?"
    if isinstance(x, int):
        return "int"
    if isinstance(x, float):
        return "float"
    if isinstance(x, str):
        return "s"
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        return "a" + _NP_CODES.get(dtype.char, dtype.char)
    return "as" if isinstance(x, list) and x and isinstance(x[0], str) else "?list"


class _Union:
    """``{member: value}`` for a discriminated union; empty union -> None.

    p4p tells the selected member only by which ``path->member`` resolves, so
    the member is guessed from the value's Python type and confirmed with one
    lookup; the others are tried only when the guess fails.
    """

    def __init__(self, members):
        self.members = [(name, _compile(sub)) for name, sub in members]
        self.by_kind: dict[str, list] = {}
        for (name, sub), member in zip(members, self.members):
            self.by_kind.setdefault(_kind_of_spec(sub), []).append(member)

    def __call__(self, v: Value, path: str) -> Any:
        x = v[path] if path else v
        if x is None:
            return None
        first = self.by_kind.get(_kind_of_value(x), [])
        for name, f in (*first, *self.members):
            sel = f"{path}->{name}"
            try:
                v[sel]
            except KeyError:
                continue
            return {name: x.todict() if f is _plain_struct and isinstance(x, Value) else f(v, sel)}
        return None


# Top-level fields new with (nearly) every update: not worth looking up in the shared pool.
_PER_UPDATE = frozenset(("value", "alarm", "timeStamp"))


class _Plan:
    """How to convert Values of one structure type; built once per type seen (see _plan_of)."""

    __slots__ = ("fields", "union_fields", "tops")

    def __init__(self, spec):
        self.fields = {name: _compile(sub) for name, sub in spec[2]}
        self.union_fields = [(name, self.fields[name]) for name, sub in spec[2] if _has_union(sub)]
        self.tops: dict[str, str] = {}  # changed-field name -> its top-level field

    def full(self, v: Value, shared: bool = False) -> ValueTree:
        """todict() in one C call, then the union fields redone (todict drops member names).

        ``shared``: metadata sub-trees come from the pool (monitors keep trees; a get's is short-lived).
        """
        tree = v.todict()
        for name, f in self.union_fields:
            tree[name] = f(v, name)
        if shared:  # a new dict: interned keys, metadata from the pool
            tree = {sys.intern(name): share(x) if name not in _PER_UPDATE and (type(x) is dict or type(x) is list)
                    else x for name, x in tree.items()}
        return tree

    def update(self, v: Value, prev: ValueTree) -> ValueTree:
        """Only the top-level fields marked changed are converted again (metadata shared as in full)."""
        tops = self.tops
        changed = set()
        for n in v.changedSet():
            t = tops.get(n)
            if t is None:
                t = tops[n] = n.split(".", 1)[0].split("->", 1)[0].split("[", 1)[0]
            changed.add(t)
        if len(changed) * 2 > len(self.fields) or not changed.issubset(self.fields):
            return self.full(v, shared=True)
        tree = prev.copy()
        fields = self.fields
        for name in changed:
            x = fields[name](v, name)
            if name not in _PER_UPDATE and (type(x) is dict or type(x) is list):
                x = share(x)
            tree[name] = x
        return tree


_PLANS_BY_TYPE: dict[str, _Plan] = {}  # repr of a type's aspy() -> its plan; a plan is immutable but for its tops cache


def _plan_of(v: Value) -> _Plan:
    """The plan shared by every PV of ``v``'s type: one per subscription cost ~1 KB per PV at 10k PVs."""
    spec = v.type().aspy()
    key = repr(spec)
    plan = _PLANS_BY_TYPE.get(key)
    if plan is None:
        plan = _PLANS_BY_TYPE[key] = _Plan(spec)  # a race builds two equal plans: harmless
    return plan


def value_tree(v: Value) -> ValueTree:
    """Full conversion of one Value of a type not seen before."""
    return _plan_of(v).full(v)


def structure_of(spec) -> Any:
    """Type description for ``info``: leaves as type names, structures as dicts."""
    if not isinstance(spec, tuple):
        if spec.startswith("a"):
            return _CODE_NAMES.get(spec[1:], spec) + "[]"
        return _CODE_NAMES.get(spec, spec)
    code, _id, members = spec
    if code == "S":
        return {name: structure_of(sub) for name, sub in members}
    if code == "aS":
        return [{name: structure_of(sub) for name, sub in members}]
    inner = ",".join(f"{name}:{_type_text(sub)}" for name, sub in members)
    return f"union{{{inner}}}" + ("[]" if code == "aU" else "")


def _type_text(spec) -> str:
    return _describe(structure_of(spec))


def _describe(desc) -> str:
    if isinstance(desc, str):
        return desc
    if isinstance(desc, list):
        return "structure[]"
    return "structure{" + ",".join(f"{k}:{_describe(v)}" for k, v in desc.items()) + "}"


# -- value map -> Value (put) ------------------------------------------------
class _PutRefused(ValueError):
    """Raised inside the put builder; p4p hands it back to the completion handler."""


def _assign(V: Value, prefix: str, members, mapping: dict) -> None:
    fields = {name: sub for name, sub in members}
    for key, x in mapping.items():
        path = prefix + key
        if key not in fields:
            raise _PutRefused(f"no field '{path}' (fields: {', '.join(fields)})")
        spec = fields[key]
        code = spec[0] if isinstance(spec, tuple) else None
        try:
            if code == "S":
                sub = {n: s for n, s in spec[2]}
                if "index" in sub and "choices" in sub and not isinstance(x, dict):
                    V[path + ".index"] = _enum_index(V, path, x)
                elif isinstance(x, dict):
                    _assign(V, path + ".", spec[2], x)
                else:
                    raise _PutRefused(f"field '{path}' is a structure: send a map of its fields")
            elif code == "U" and isinstance(x, dict):
                if len(x) != 1:
                    raise _PutRefused(f"union field '{path}' takes a one-key map {{member: value}}")
                (member, inner), = x.items()
                names = [n for n, _ in spec[2]]
                if member not in names:
                    raise _PutRefused(f"union '{path}' has no member '{member}' (members: {', '.join(names)})")
                V[path] = (member, inner)
            else:
                V[path] = x
        except _PutRefused:
            raise
        except Exception as e:  # p4p conversion errors: say which field and value
            raise _PutRefused(f"cannot store {x!r} in field '{path}': {e}") from None


def _enum_index(V: Value, path: str, x: Any) -> int:
    choices = list(V[path + ".choices"])
    if isinstance(x, str):
        if x in choices:
            return choices.index(x)
        try:
            x = int(x)
        except ValueError:
            raise _PutRefused(f"'{x}' is not one of the choices {choices}") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or int(x) != x:
        raise _PutRefused(f"enum value must be a choice string or an index, got {x!r}")
    if choices and not 0 <= int(x) < len(choices):
        raise _PutRefused(f"index {int(x)} out of range for choices {choices}")
    return int(x)


# -- monitors ------------------------------------------------------------------
class _Dispatcher:
    """One thread draining subscription queues: one PV's updates are never concurrent."""

    def __init__(self, name: str):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, sub: "PVASubscription") -> None:
        self._q.put(sub)

    def _run(self) -> None:
        while True:
            sub = self._q.get()
            if sub is None:
                return
            try:
                if sub._drain():
                    self._q.put(sub)  # more queued: let the others have a turn first
            except Exception:
                _log.exception("PVA monitor dispatch failed for %s", getattr(sub, "name", sub))

    def stop(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class PVASubscription:
    """A PVA monitor; ``on_event`` runs on the provider's dispatcher thread."""

    __slots__ = ("name", "_on_event", "_provider", "_dispatch", "_lock", "_S", "_woken_early", "_closed", "_plan",
                 "_last", "_connected", "_waited", "__weakref__")

    def __init__(self, provider: "PVAProvider", name: str, on_event: EventCallback):
        self.name = name
        self._on_event = on_event
        self._provider = provider
        self._dispatch = provider._dispatcher
        self._lock = threading.Lock()
        self._S = None
        self._woken_early = False
        self._closed = False
        self._plan: _Plan | None = None
        self._last: ValueTree | None = None
        self._connected = False
        self._waited = False  # counted in the provider's lost PVs (under its _lock)

    def _start(self, ctx: Context, request) -> None:
        S = ctx.monitor(self.name, self._wakeup, request)
        with self._lock:
            if self._closed:
                S.close()
                return
            self._S = S
            replay, self._woken_early = self._woken_early, False
        if replay:
            self._dispatch.submit(self)

    def _wakeup(self) -> None:
        # pvxs worker thread: never block here, just hand over.
        pin_thread_state()
        self._dispatch.submit(self)

    def _drain(self) -> bool:
        """Deliver up to _BATCH queued updates; True if more are waiting."""
        with self._lock:
            S = self._S
            if S is None:
                if not self._closed:
                    self._woken_early = True  # update raced monitor() returning
                return False
        for _ in range(_BATCH):
            if self._closed:
                return False
            try:
                E = S.pop()
            except Exception as e:  # some p4p versions raise what others return
                E = e
            if E is None:
                return False
            if isinstance(E, Value):
                self._deliver_value(E)
            elif isinstance(E, Disconnected):
                self._deliver_disconnect()
            elif isinstance(E, Finished):
                _log.info("PVA monitor of %s finished by the server", self.name)
                self._deliver_disconnect("finished by server")
                return False
            elif isinstance(E, RemoteError):
                _log.warning("PVA monitor of %s: server error: %s", self.name, E)
            else:
                _log.warning("PVA monitor of %s: %r", self.name, E)
        return True

    def _deliver_value(self, v: Value) -> None:
        try:
            if self._plan is None or self._last is None:
                self._plan = _plan_of(v)
                tree = self._plan.full(v, shared=True)
            else:
                tree = self._plan.update(v, self._last)
        except Exception:
            _log.exception("PVA monitor of %s: cannot convert update", self.name)
            return
        self._last = tree
        if not self._connected:
            self._connected = True
            self._provider._up(self)
        self._call(tree)

    def _deliver_disconnect(self, why: str = "disconnected") -> None:
        was, self._connected = self._connected, False
        last, self._last, self._plan = self._last, None, None  # reconnect may bring a new type
        if was:
            self._provider._down(self)
        if not was or last is None:
            return
        self._call(disconnected(last, DISCONNECTED_STATUS, why))

    def _call(self, tree: ValueTree) -> None:
        try:
            self._on_event(tree)
        except Exception:
            _log.exception("monitor callback for pva://%s failed", self.name)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            S, self._S = self._S, None
        if S is not None:
            S.close()
        self._provider._forget(self)


# -- gets nobody waits for ----------------------------------------------------
class _AsyncGet:
    """One get in flight: the first of its value and its deadline answers, once.

    The operation's callback holds this object and this object the operation,
    so both ends drop ``op`` (the cycle would keep every finished operation).
    A finished operation is closed by the next ``get_async`` (``_close_spent``).
    """

    __slots__ = ("provider", "name", "timeout", "done", "op", "ticket", "settled", "_claims")

    def __init__(self, provider: PVAProvider, name: str, timeout: float, done: GetDone):
        self.provider, self.name, self.timeout, self.done = provider, name, timeout, done
        self.settled = False
        self._claims = itertools.count()
        self.op = None
        provider._use(name)
        self.ticket = provider._deadlines.add(timeout, self.expired)
        try:
            self.op = provider._ctx.get(name, self.completed)
        except Exception:
            if self._claim():  # else the deadline has answered already
                provider._deadlines.cancel(self.ticket)
                provider._used(name)
                raise
        if self.settled:  # answered before ctx.get() returned (the GIL is let go inside)
            self.op = None

    def _claim(self) -> bool:
        self.settled = True
        return next(self._claims) == 0  # atomic under the GIL: only the first caller gets 0

    def completed(self, v: Value | Exception) -> None:
        """pvxs thread."""
        pin_thread_state()
        op, self.op = self.op, None
        if op is not None:  # freed here, it would be cancelled on pvxs' own thread, which pvxs logs as an error
            self.provider._spent.append(op)
        if not self._claim():
            return
        self.provider._deadlines.cancel(self.ticket)
        try:
            if isinstance(v, Exception):
                raise PVError(ErrorCode.EPICS_FAILED, f"PV '{self.name}': get failed: {_why(v)}")
            tree, error = self.provider._tree(self.name, v), None
        except PVError as e:
            tree, error = None, e
        self._answer(tree, error)

    def expired(self) -> None:
        """Deadline thread: no answer within the timeout; pvxs would go on searching."""
        if not self._claim():
            return
        op, self.op = self.op, None
        if op is not None:
            op.close()
        self._answer(None, connect_timeout(self.name, self.timeout))

    def _answer(self, tree: ValueTree | None, error: Exception | None) -> None:
        self.provider._used(self.name)
        try:
            self.done(tree, error)
        except Exception:
            _log.exception("answering the get of pva://%s failed", self.name)


# -- provider ------------------------------------------------------------------
class PVAProvider:
    """PVA gets, puts, info and monitors over one p4p client Context."""

    protocol = "pva"
    disconnected_status = DISCONNECTED_STATUS

    def __init__(self, conf: dict[str, str] | None = None, monitor_queue_size: int | None = MONITOR_QUEUE_SIZE,
                 idle_timeout: float = IDLE_TIMEOUT):
        """``conf`` overrides EPICS_PVA_* from the environment (tests, embedding); ``idle_timeout``: a
        name no get, put or info used for this many seconds is forgotten (unless monitored)."""
        self._idle_timeout = idle_timeout
        self._names: dict[str, list] = {}  # name -> [operations in flight, when the last one ended], under _lock
        self._ctx = Context("pva", conf=conf, useenv=True, nt=False)
        self._probe_conf = self._ctx._ctxt.conf()  # the probe must search where the main Context does
        self._dispatcher = _Dispatcher("pva-monitor-dispatch")
        self._lost: dict[str, int] = {}  # name -> disconnected subscriptions of it, under _lock
        self._probe_ctx: Context | None = None  # reconnect thread only
        self._stop = threading.Event()
        self._reconnect = threading.Thread(target=self._reconnect_loop, name="pva-reconnect", daemon=True)
        self._reconnect.start()
        self._subs: set[PVASubscription] = set()
        self._plans: dict[str, tuple[str, _Plan]] = {}
        self._deadlines = Deadlines("pva-get-deadlines")
        self._spent: list = []  # finished get operations, closed by the next get_async
        self._lock = threading.Lock()
        self._closed = False
        # pvxs coalesces a monitor's updates beyond its queue; a longer queue
        # trades memory for fewer squashed updates under bursts.
        self._monitor_request = (Context.makeRequest(f"field()record[queueSize={int(monitor_queue_size)}]")
                                 if monitor_queue_size else None)

    # channels in use -------------------------------------------------------------
    def _use(self, name: str) -> None:
        with self._lock:
            entry = self._names.get(name)
            if entry is None:
                entry = self._names[name] = [0, 0.0]
            entry[0] += 1

    def _used(self, name: str) -> None:
        with self._lock:
            entry = self._names.get(name)
            if entry is not None:
                entry[0] -= 1
                entry[1] = time.monotonic()

    @contextmanager
    def _using(self, name: str) -> Iterator[None]:
        self._use(name)
        try:
            yield
        finally:
            self._used(name)

    def channel_count(self) -> int:
        """Names with a channel: read, written or described lately, or monitored."""
        with self._lock:
            return len(self._names.keys() | {sub.name for sub in self._subs})

    def _release_idle(self) -> None:
        """Reconnect thread: forget names nothing used for ``idle_timeout`` and no monitor uses."""
        now = time.monotonic()
        with self._lock:
            idle = [n for n, (busy, last) in self._names.items() if not busy and now - last >= self._idle_timeout]
            if idle:
                monitored = {sub.name for sub in self._subs}
                idle = [n for n in idle if n not in monitored]
                for n in idle:
                    del self._names[n]
        for n in idle:
            self._plans.pop(n, None)
            self._ctx.disconnect(n)  # pvxs closes the channel once no operation holds it
        if idle:
            _log.info("PVA: %d channels unused for %g s cleared (%s%s)", len(idle), self._idle_timeout,
                      ", ".join(idle[:5]), ", ..." if len(idle) > 5 else "")

    # operations ---------------------------------------------------------------
    def _get_value(self, name: str, timeout: float) -> Value:
        with self._using(name):
            return self._get_value_of(name, timeout)

    def _get_value_of(self, name: str, timeout: float) -> Value:
        self._check_open()
        done = threading.Lock()  # a one-shot latch: an Event builds a Condition per get (py-spy, 32 threads)
        done.acquire()
        box: list = []

        def on_done(v):
            box.append(v)
            done.release()

        op = self._ctx.get(name, on_done)
        try:
            if not done.acquire(timeout=timeout):
                raise connect_timeout(name, timeout)
        finally:
            op.close()
        v = box[0]
        if isinstance(v, Exception):
            raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': get failed: {_why(v)}")
        return v

    def get(self, name: str, timeout: float) -> ValueTree:
        return self._tree(name, self._get_value(name, timeout))

    def get_async(self, name: str, timeout: float, done: GetDone) -> None:
        """A get no thread waits for: ``done`` runs on the pvxs thread, or after ``timeout`` on the
        deadline thread. A thread waiting per get, and waking it, cost the gateway a fifth of its
        CPU per get at 7k gets/s (bench/EXPERIMENTS.md row 37)."""
        self._check_open()
        self._close_spent()
        _AsyncGet(self, name, timeout, done)

    def _close_spent(self) -> None:
        """Close finished get operations, off the pvxs thread (each close waits for that thread)."""
        if self._spent:
            spent, self._spent = self._spent, []
            for op in spent:
                op.close()

    def _tree(self, name: str, v: Value) -> ValueTree:
        try:
            return self._convert(name, v)
        except Exception as e:
            raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': cannot convert value: {e}") from e

    def _convert(self, name: str, v: Value) -> ValueTree:
        """Plans are cached per PV (aspy() + compiling cost ~4x the conversion); same type id, same plan."""
        type_id = v.getID()
        cached = self._plans.get(name)
        if cached is not None and cached[0] == type_id:
            try:
                return cached[1].full(v)
            except Exception:
                pass  # the PV changed its structure under the same id: rebuild
        plan = _plan_of(v)
        self._plans[name] = (type_id, plan)
        return plan.full(v)

    def put(self, name: str, value: ValueTree, timeout: float) -> None:
        self._check_open()
        if not isinstance(value, dict):
            raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': put value must be a map of fields, "
                                                  f"got {type(value).__name__}")
        done = threading.Event()
        box: list = []
        state = {"connected": False, "refused": None}

        def build(V: Value) -> None:
            state["connected"] = True
            try:
                _assign(V, "", V.type().aspy()[2], value)
            except _PutRefused as e:
                state["refused"] = str(e)
                raise

        def on_done(result):
            box.append(result)
            done.set()

        with self._using(name):
            op = self._ctx.put(name, on_done, builder=build, request="field()record[block=true]", get=True)
            try:
                if not done.wait(timeout):
                    if state["connected"]:
                        raise PVError(ErrorCode.TIMEOUT, f"PV '{name}': put did not complete within {timeout:g} s")
                    raise connect_timeout(name, timeout)
            finally:
                op.close()
        result = box[0]
        if isinstance(result, Exception):
            why = state["refused"] or _why(result)
            raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': put failed: {why}")

    def info(self, name: str, timeout: float) -> dict[str, Any]:
        v = self._get_value(name, timeout)
        spec = v.type().aspy()
        return {
            "protocol": "pva",
            "name": name,
            "connected": True,
            "type": v.getID(),
            "structure": structure_of(spec),
        }

    def monitor(self, name: str, on_event: EventCallback) -> PVASubscription:
        self._check_open()
        sub = PVASubscription(self, name, on_event)
        with self._lock:
            self._subs.add(sub)
        sub._start(self._ctx, self._monitor_request)
        return sub

    def _forget(self, sub: PVASubscription) -> None:
        with self._lock:
            self._subs.discard(sub)
        self._up(sub)  # a closed subscription is no longer waited for

    # reconnection ---------------------------------------------------------------
    def _down(self, sub: PVASubscription) -> None:
        with self._lock:
            if not sub._waited and sub in self._subs:
                sub._waited = True
                self._lost[sub.name] = self._lost.get(sub.name, 0) + 1

    def _up(self, sub: PVASubscription) -> None:
        with self._lock:
            if sub._waited:
                sub._waited = False
                left = self._lost.get(sub.name, 0) - 1
                if left > 0:
                    self._lost[sub.name] = left
                else:
                    self._lost.pop(sub.name, None)

    def _reconnect_loop(self) -> None:
        turn, quiet_until = 0, 0.0
        while not self._stop.wait(PROBE_PERIOD):
            try:
                self._release_idle()
            except Exception:
                _log.exception("PVA idle channel release failed")
            with self._lock:
                names = sorted(self._lost)
            if not names or time.monotonic() < quiet_until:
                continue
            turn += 1
            name = names[turn % len(names)]  # rotate: one PV may be gone for good
            try:
                if self._probe(name):
                    _log.info("PVA server of %s answers again: searching for %d lost PVs now", name, len(names))
                    self._ctx._ctxt.hurryUp()  # p4p's raw Context does not wrap pvxs' hurryUp()
                    quiet_until = time.monotonic() + HURRY_HOLDOFF
            except Exception:
                _log.exception("PVA reconnect probe failed")

    def _probe(self, name: str) -> bool:
        """One get in the probe Context; its channel is dropped after, so the next probe searches afresh."""
        if self._probe_ctx is None:
            self._probe_ctx = Context("pva", conf=self._probe_conf, useenv=False, nt=False)
        done = threading.Event()
        box: list = []
        op = self._probe_ctx.get(name, lambda v: (box.append(v), done.set()))
        try:
            done.wait(PROBE_PERIOD * 0.8)
        finally:
            op.close()
            self._probe_ctx.disconnect(name)
        return bool(box) and isinstance(box[0], Value)

    def close(self) -> None:
        """Subscriptions first, then the dispatcher, then the Context (p4p can hang otherwise)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subs, self._subs = list(self._subs), set()
        for sub in subs:
            sub.close()
        self._stop.set()
        self._reconnect.join(5.0)
        self._dispatcher.stop()
        self._deadlines.close()
        self._close_spent()
        if self._probe_ctx is not None:
            self._probe_ctx.close()
        self._ctx.close()

    def _check_open(self) -> None:
        if self._closed:
            raise PVError(ErrorCode.EPICS_FAILED, "PVA provider is closed")


def _why(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, ValueError) and e.args and isinstance(e.args[0], BaseException):
        text = str(e.args[0])  # p4p re-wraps builder exceptions as type(e)(e)
    return text or type(e).__name__
