"""Channel Access adapter on the libca that pyepics ships.

pyepics' ``PV``/``ca.get``/``ca.put``/``ca.connect_channel`` wait by
spinning ``ca_pend_event`` loops; with many gateway threads waiting that
burns a core, and its channel cache shares one channel between every user of
a name. This adapter takes only libca itself (loaded and initialised by
pyepics) and pyepics' DBR definitions, and talks to libca through its own
typed entry points and callbacks: waiting threads sleep on events, and
monitor updates are decoded straight from the DBR buffer.

Each provider owns a preemptive-callback CA context created from the process
environment when the provider is built (libca reads EPICS_CA_* then), so a
gateway or a test sets the environment first; channels are cached per name
within the provider, and cleared once nothing used them for ``idle_timeout``
(a monitor keeps its own).

A CA value tree uses the PVA NTScalar field names: ``value, alarm,
timeStamp`` from the DBR_TIME_* monitor, ``display, control, valueAlarm``
from one DBR_CTRL_* read per (re)connection plus one read of the record's
``.DESC``. Enums are ``value{index, choices}``. ``secondsPastEpoch`` is POSIX
time, as over PVA. Metadata sub-trees are shared between events and, when
equal, between PVs, and alarm sub-trees between events: treat trees as
read-only.

Reconnection: libca's search backoff grows with an outage, so a restarted
IOC's channels could wait many seconds for their next search. The janitor
keeps one probe channel per lost server (re-created every PROBE_PERIOD, so its
search is always a fresh one); once it connects, the server's disconnected
channels get fresh chids and their subscriptions are made again.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import struct
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
from epics import ca, dbr

from k2eg.protocol.errors import ErrorCode

from .base import EventCallback, PVError, ValueTree, connect_timeout, disconnected, pin_thread_state, share

__all__ = ["CAProvider", "CASubscription"]

_log = logging.getLogger(__name__)

EPICS_EPOCH = 631152000  # 1990-01-01 in POSIX seconds
DISCONNECTED_STATUS = 9  # COMM
DESC_TIMEOUT = 1.0  # a server without records (no .DESC) delays readiness at most this long
# A lost server is searched for this often. libca's own search backoff for a
# disconnected channel grows with the outage (back 0-4 s after a 4 s outage,
# >12 s after a 30 s one, measured); a fresh probe channel per lost server
# searches at once, and when it connects its server's channels are renewed.
PROBE_PERIOD = 1.0
RENEW_WAIT = 2.0  # longest a renewal waits for subscription calls in flight on the old channel
# Every name ever read would otherwise keep a channel (and a misspelled one its search traffic) for
# the life of the process: channels nothing used for this long are cleared; a monitor keeps its own.
IDLE_TIMEOUT = 300.0

# epicsAlarmConditionStrings; message "" for NO_ALARM like QSRV.
ALARM_STATUS = (
    "", "READ", "WRITE", "HIHI", "HIGH", "LOLO", "LOW", "STATE", "COS", "COMM",
    "TIMEOUT", "HWLIMIT", "CALC", "SCAN", "LINK", "SOFT", "BAD_SUB", "UDF",
    "DISABLE", "SIMM", "READ_ACCESS", "WRITE_ACCESS",
)
FORM_CHOICES = ["Default", "String", "Binary", "Decimal", "Hex", "Exponential", "Engineering"]

# native DBR type -> (element size, struct code, numpy dtype, type name)
_NATIVE = {
    dbr.STRING: (40, None, None, "string"),
    dbr.SHORT: (2, "h", np.int16, "int16"),
    dbr.FLOAT: (4, "f", np.float32, "float"),
    dbr.ENUM: (2, "H", np.uint16, "enum"),
    dbr.CHAR: (1, "B", np.uint8, "uint8"),
    dbr.LONG: (4, "i", np.int32, "int32"),
    dbr.DOUBLE: (8, "d", np.float64, "double"),
}
_DBR_NAMES = {dbr.STRING: "DBR_STRING", dbr.SHORT: "DBR_SHORT", dbr.FLOAT: "DBR_FLOAT", dbr.ENUM: "DBR_ENUM",
              dbr.CHAR: "DBR_CHAR", dbr.LONG: "DBR_LONG", dbr.DOUBLE: "DBR_DOUBLE"}
_TIME_HEADER = struct.Struct("=hhII")  # status, severity, secs, nsec of every DBR_TIME_*
_SCALAR = {t: struct.Struct("=" + code) for t, (_, code, _, _) in _NATIVE.items() if code}
_TIME_SCALAR: dict[int, tuple[int, struct.Struct, bool]] = {}  # DBR_TIME_* -> (size, header+value, enum?)
_ALARMS: dict[int, dict] = {}  # severity << 16 | status -> its (shared, read-only) alarm sub-tree
_CTRL_FIELDS = ("upper_disp_limit", "lower_disp_limit", "upper_alarm_limit", "upper_warning_limit",
                "lower_warning_limit", "lower_alarm_limit", "upper_ctrl_limit", "lower_ctrl_limit")

_EVENT_FN = ctypes.CFUNCTYPE(None, dbr.event_handler_args)
_CONN_FN = ctypes.CFUNCTYPE(None, dbr.connection_args)
_PRINTF_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _LibCA:
    """Typed libca entry points; ``lib[name]`` gives fresh function objects, pyepics' stay untouched."""

    def __init__(self):
        if ca.libca is None:
            ca.initialize_libca()  # also loads dbr.value_offset
        lib = ca.libca
        vp, py = ctypes.c_void_p, ctypes.py_object

        def fn(name, restype, *argtypes):
            f = lib[name]
            f.restype = restype
            f.argtypes = list(argtypes)
            return f

        self.context_create = fn("ca_context_create", ctypes.c_int, ctypes.c_int)
        self.current_context = fn("ca_current_context", vp)
        self.attach_context = fn("ca_attach_context", ctypes.c_int, vp)
        self.detach_context = fn("ca_detach_context", None)
        self.context_destroy = fn("ca_context_destroy", None)
        self.create_channel = fn("ca_create_channel", ctypes.c_int,
                                 ctypes.c_char_p, _CONN_FN, py, ctypes.c_uint, ctypes.POINTER(vp))
        self.clear_channel = fn("ca_clear_channel", ctypes.c_int, vp)
        # restype py_object would make ctypes drop a reference per call: cast instead.
        self._puser = fn("ca_puser", vp, vp)
        self.field_type = fn("ca_field_type", ctypes.c_short, vp)
        self.element_count = fn("ca_element_count", ctypes.c_ulong, vp)
        self.host_name = fn("ca_host_name", ctypes.c_char_p, vp)
        self.read_access = fn("ca_read_access", ctypes.c_uint, vp)
        self.write_access = fn("ca_write_access", ctypes.c_uint, vp)
        self.array_get_callback = fn("ca_array_get_callback", ctypes.c_int,
                                     ctypes.c_long, ctypes.c_ulong, vp, _EVENT_FN, py)
        self.array_put_callback = fn("ca_array_put_callback", ctypes.c_int,
                                     ctypes.c_long, ctypes.c_ulong, vp, vp, _EVENT_FN, py)
        self.create_subscription = fn("ca_create_subscription", ctypes.c_int,
                                      ctypes.c_long, ctypes.c_ulong, vp, ctypes.c_long, _EVENT_FN, py,
                                      ctypes.POINTER(vp))
        self.clear_subscription = fn("ca_clear_subscription", ctypes.c_int, vp)
        self.flush_io = fn("ca_flush_io", ctypes.c_int)
        self.message = fn("ca_message", ctypes.c_char_p, ctypes.c_long)
        self.replace_printf_handler = fn("ca_replace_printf_handler", ctypes.c_int, _PRINTF_FN)

        for ntype, (size, code, _, _) in _NATIVE.items():
            if code:  # the whole scalar DBR_TIME_* buffer in one unpack
                ftype = ntype + dbr.TIME_STRING
                off = dbr.value_offset[ftype]
                layout = struct.Struct(f"{_TIME_HEADER.format}{off - _TIME_HEADER.size}x{code}")
                _TIME_SCALAR[ftype] = (off + size, layout, ntype == dbr.ENUM)

    def puser(self, chid: int) -> Any:
        return ctypes.cast(self._puser(chid), ctypes.py_object).value


_lib: _LibCA | None = None
_lib_lock = threading.Lock()
_providers: "weakref.WeakSet[CAProvider]" = weakref.WeakSet()


def _libca() -> _LibCA:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _LibCA()
            # Registered after pyepics' own handler, so it runs first: libca
            # threads must not call into an interpreter that is shutting down.
            atexit.register(_close_providers)
        return _lib


def _close_providers() -> None:
    for provider in list(_providers):
        try:
            provider.close()
        except Exception:
            _log.exception("closing a CA provider at exit failed")


def _message(status: int) -> str:
    try:
        return _lib.message(status).decode()
    except Exception:
        return f"CA status {status}"


# -- libca callbacks (libca threads; usr/puser is the Python object given) -----
def _on_connection(args) -> None:
    pin_thread_state()
    try:
        _lib.puser(args.chid)._connection(args.op == dbr.OP_CONN_UP, args.chid)
    except Exception:
        _log.exception("CA connection callback failed")


def _on_get(args) -> None:
    pin_thread_state()
    req = args.usr
    try:
        req.complete(args)
    except Exception as e:  # never let an exception escape into libca
        _log.exception("CA get callback failed")
        req.fail(f"cannot decode reply: {e}")


def _on_put(args) -> None:
    pin_thread_state()
    req = args.usr
    req.status = args.status
    req.done.set()
    req.inflight.discard(req)


def _on_event(args) -> None:
    pin_thread_state()
    sub = args.usr
    try:
        sub._event(args)
    except Exception:
        _log.exception("CA monitor callback failed for %s", getattr(sub, "name", "?"))


def _on_printf(fmt: bytes, _args) -> int:
    # libca's console messages ("Virtual circuit disconnect", ...): the
    # events already say it; keep them for debugging only.
    _log.debug("libca: %s", (fmt or b"").decode(errors="replace").strip())
    return 0


_CONN_CB = _CONN_FN(_on_connection)
_PRINTF_CB = _PRINTF_FN(_on_printf)
_GET_CB = _EVENT_FN(_on_get)
_PUT_CB = _EVENT_FN(_on_put)
_EVENT_CB = _EVENT_FN(_on_event)


# -- requests ----------------------------------------------------------------
class _Request:
    """One get in flight; held in the provider's in-flight set while libca holds a pointer to it."""

    __slots__ = ("channel", "kind", "done", "result", "error", "__weakref__")

    def __init__(self, channel: "_Channel", kind: str):
        self.channel = channel
        self.kind = kind  # "time", "ctrl" or "desc"
        self.done = threading.Event()
        self.result: Any = None
        self.error: str | None = None
        channel.provider._inflight.add(self)

    def complete(self, args) -> None:
        ch = self.channel
        if args.status != dbr.ECA_NORMAL:
            self.fail(_message(args.status))
            return
        if self.kind == "time":
            self.result = ch.decode(args)
        elif self.kind == "ctrl":
            ch.provider._ctrl_done(ch, args)
        else:
            ch.provider._desc_finished(ch, _string_at(args.raw_dbr))
        self._finish()

    def fail(self, why: str) -> None:
        self.error = why
        ch = self.channel
        if self.kind == "ctrl":
            ch.provider._ctrl_failed(ch, why)
        elif self.kind == "desc":
            ch.provider._desc_finished(ch, "")
        self._finish()

    def _finish(self) -> None:
        self.done.set()
        self.channel.provider._inflight.discard(self)


class _PutRequest:
    __slots__ = ("done", "status", "data", "inflight", "__weakref__")

    def __init__(self, data, inflight: set):
        self.done = threading.Event()
        self.status: int | None = None
        self.data = data  # the buffer stays alive until libca answers
        self.inflight = inflight
        inflight.add(self)


def _string_at(address: int, offset: int = 0) -> str:
    return ctypes.string_at(address + offset, 40).split(b"\0", 1)[0].decode("utf-8", "replace")


# -- channels ----------------------------------------------------------------
class _Channel:
    """One CA channel: connection state, cached metadata, subscriptions."""

    def __init__(self, provider: "CAProvider", name: str):
        self.provider = provider
        self.name = name
        self.chid: int | None = None
        self.connected = threading.Event()
        self.ready = threading.Event()  # connected and metadata read
        self.ftype = -1
        self.count = 1
        self.meta: dict[str, Any] = {}  # display/control/valueAlarm sub-trees
        self.choices: list[str] = []
        self.description = ""
        self.ctrl_pending = False
        self.desc_pending = False
        self.desc: _DescLink | None = None
        self.subs: list[CASubscription] = []
        self.lock = threading.RLock()
        self.host = ""  # "host:port" of the server, kept across a disconnection
        # Renewal (a fresh chid after its server came back), under the provider's _work_lock:
        self.renewing = False
        self.gen = 0  # bumped per renewal: evids of an older generation died with their chid
        self.busy = 0  # subscription calls in flight on the current chid
        # Idle release, under the provider's _lock: operations holding it, and when the last one ended.
        self.users = 0
        self.used = time.monotonic()

    def _connection(self, up: bool, chid: int) -> None:
        self.provider._connection(self, up, chid)

    def decode(self, args) -> ValueTree:
        """A DBR_TIME_* buffer as a value tree (runs on libca threads)."""
        ftype = args.type
        if self.count == 1:
            scalar = _TIME_SCALAR.get(ftype)
            if scalar is not None:  # the common case, in one unpack
                size, layout, enum = scalar
                status, severity, secs, nsec, value = layout.unpack(ctypes.string_at(args.raw_dbr, size))
                if enum:
                    value = {"index": value, "choices": self.choices}
                return self._tree(value, status, severity, secs, nsec)
        count = args.count
        ntype = dbr.native_type(ftype)
        size = _NATIVE[ntype][0]
        off = dbr.value_offset[ftype]
        buf = ctypes.string_at(args.raw_dbr, off + max(count, 1) * size)
        status, severity, secs, nsec = _TIME_HEADER.unpack_from(buf)
        if ntype == dbr.STRING:
            strings = [buf[o:o + 40].split(b"\0", 1)[0].decode("utf-8", "replace")
                       for o in range(off, off + count * 40, 40)]
            value: Any = strings if self.count > 1 else (strings[0] if strings else "")
        elif self.count > 1:
            value = np.frombuffer(buf, _NATIVE[ntype][2], count, off)
        else:
            value = _SCALAR[ntype].unpack_from(buf, off)[0]
            if ntype == dbr.ENUM:
                value = {"index": value, "choices": self.choices}
        return self._tree(value, status, severity, secs, nsec)

    def _tree(self, value: Any, status: int, severity: int, secs: int, nsec: int) -> ValueTree:
        key = severity << 16 | (status & 0xFFFF)
        alarm = _ALARMS.get(key)
        if alarm is None:
            alarm = _ALARMS[key] = {
                "severity": severity, "status": status,
                "message": ALARM_STATUS[status] if 0 <= status < len(ALARM_STATUS) else str(status)}
        tree = {
            "value": value,
            "alarm": alarm,
            "timeStamp": {"secondsPastEpoch": secs + EPICS_EPOCH, "nanoseconds": nsec, "userTag": 0},
        }
        tree.update(self.meta)
        return tree

    def time_type(self) -> int:
        return self.ftype + dbr.TIME_STRING


class _DescLink:
    """The short-lived ``<record>.DESC`` channel that fills display.description."""

    def __init__(self, channel: _Channel):
        self.channel = channel
        self.chid: int | None = None
        self.deadline = time.monotonic() + DESC_TIMEOUT

    def _connection(self, up: bool, chid: int) -> None:
        if up:
            self.channel.provider._desc_connected(self, chid)


class _Probe:
    """A throwaway channel looking for a lost server; re-created every PROBE_PERIOD so its search is a fresh one."""

    def __init__(self, name: str):
        self.name = name
        self.chid: int | None = None
        self.up = False
        self.born = time.monotonic()
        self.turn = 0  # which lost channel's name it searches: one PV may be gone for good

    def _connection(self, up: bool, chid: int) -> None:
        if up:
            self.up = True


class CASubscription:
    """A CA monitor; ``on_event`` runs on the libca thread of the PV's server circuit."""

    def __init__(self, channel: _Channel, on_event: EventCallback):
        self.name = channel.name
        self._channel = channel
        self._on_event = on_event
        self._lock = threading.RLock()  # RLock: on_event may close its own subscription
        self._closed = False
        self._subscribing = False
        self._evid: int | None = None
        self._gen = 0  # channel generation of _evid
        self._last: ValueTree | None = None

    def _subscribe(self) -> None:
        """Once the channel is ready; libca itself keeps the subscription across reconnects."""
        with self._lock:
            if self._evid is not None or self._subscribing or self._closed:
                return
            self._subscribing = True
        ch = self._channel
        work = ch.provider._work_lock
        with work:
            gen, renewing = ch.gen, ch.renewing
            if not renewing:
                ch.busy += 1
        if renewing:  # the new chid subscribes once ready
            with self._lock:
                self._subscribing = False
            return
        try:
            evid = ctypes.c_void_p()
            ret = _lib.create_subscription(ch.time_type(), 0, ch.chid, dbr.DBE_VALUE | dbr.DBE_ALARM,
                                           _EVENT_CB, self, ctypes.byref(evid))
            with self._lock:
                self._subscribing = False
                if ret != dbr.ECA_NORMAL:
                    _log.error("CA subscription to %s failed: %s", self.name, _message(ret))
                    return
                closed = self._closed
                if not closed:
                    self._evid, self._gen = evid.value, gen
            if closed:  # closed while we were subscribing
                _lib.clear_subscription(evid.value)
            _lib.flush_io()
        finally:
            with work:
                ch.busy -= 1

    def _event(self, args) -> None:
        if self._closed:
            return
        if args.status != dbr.ECA_NORMAL:
            _log.warning("CA monitor of %s: %s", self.name, _message(args.status))
            return
        tree = self._channel.decode(args)
        with self._lock:
            if self._closed:
                return
            self._last = tree
            self._call(tree)

    def _disconnected(self) -> None:
        with self._lock:
            last, self._last = self._last, None
            if last is None or self._closed:
                return
            self._call(disconnected(last, DISCONNECTED_STATUS))

    def _call(self, tree: ValueTree) -> None:
        try:
            self._on_event(tree)
        except Exception:
            _log.exception("monitor callback for ca://%s failed", self.name)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            evid, self._evid = self._evid, None
        self._channel.provider._unsubscribe(self, evid)


# -- provider ----------------------------------------------------------------
class CAProvider:
    """CA gets, puts, info and monitors; channels cached per name in one CA context per provider.

    Lock rule: ``ch.lock`` is taken on libca callback threads, and
    ``ca_clear_*`` waits for running callbacks, so no thread calls
    ``ca_clear_*`` or blocks while holding it.
    """

    protocol = "ca"
    disconnected_status = DISCONNECTED_STATUS

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT):
        """``idle_timeout``: a channel no get, put, info or monitor used for this many seconds is cleared."""
        self._idle_timeout = idle_timeout
        self._next_sweep = time.monotonic()
        self._lib = _libca()
        self._ctx = self._create_context()
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self._inflight: set = set()  # requests libca still holds a pointer to
        self._desc_work: set[_Channel] = set()  # channels with a DESC channel open
        self._lost: dict[str, set[_Channel]] = {}  # server "host:port" -> its disconnected channels
        self._probes: dict[str, _Probe] = {}  # janitor thread only
        self._work_lock = threading.Lock()  # leaf lock, also taken on libca threads
        self._closed = False
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._janitor_loop, name="ca-janitor", daemon=True)
        self._janitor.start()
        _providers.add(self)

    # context handling ------------------------------------------------------
    def _create_context(self) -> int:
        """A fresh preemptive context configured from EPICS_CA_* as they are now."""
        lib = self._lib
        previous = lib.current_context()
        if previous:
            lib.detach_context()
        try:
            ret = lib.context_create(1)
            if ret != dbr.ECA_NORMAL:
                raise PVError(ErrorCode.EPICS_FAILED, f"cannot create a CA context: {_message(ret)}")
            ctx = lib.current_context()
            lib.replace_printf_handler(_PRINTF_CB)
            # libca reads the address list and repeater port when the first
            # channel is created, not with the context: create one now, while
            # the environment is the one this provider was built under.
            chid = ctypes.c_void_p()
            if lib.create_channel(b"k2eg:ca:address-list-probe", _CONN_FN(), None, 0, ctypes.byref(chid)) == dbr.ECA_NORMAL:
                lib.clear_channel(chid.value)
            lib.detach_context()
        finally:
            if previous:
                lib.attach_context(previous)
        return ctx

    @contextmanager
    def _attached(self) -> Iterator[None]:
        """libca calls go to this provider's context; the thread is left as it was."""
        lib = self._lib
        previous = lib.current_context()
        if previous == self._ctx:
            yield
            return
        if previous:
            lib.detach_context()
        lib.attach_context(self._ctx)
        try:
            yield
        finally:
            lib.detach_context()
            if previous:
                lib.attach_context(previous)

    # channels ----------------------------------------------------------------
    @contextmanager
    def _using(self, name: str) -> Iterator[_Channel]:
        """The channel of ``name``, never cleared as idle while the caller holds it."""
        with self._attached():
            ch = self._channel(name)
        try:
            yield ch
        finally:
            with self._lock:
                ch.users -= 1
                ch.used = time.monotonic()

    def _channel(self, name: str) -> _Channel:
        """Under _attached(); counted as a user of the channel (``_using`` gives it back)."""
        with self._lock:
            if self._closed:
                raise PVError(ErrorCode.EPICS_FAILED, "CA provider is closed")
            ch = self._channels.get(name)
            if ch is not None:
                ch.users += 1
                return ch
            ch = self._channels[name] = _Channel(self, name)
            ch.users += 1
            chid = ctypes.c_void_p()
            ret = self._lib.create_channel(name.encode(), _CONN_CB, ch, 0, ctypes.byref(chid))
            if ret != dbr.ECA_NORMAL:
                del self._channels[name]
                raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': cannot create channel: {_message(ret)}")
            with ch.lock:
                if ch.chid is None:
                    ch.chid = chid.value
        self._lib.flush_io()
        return ch

    def _connection(self, ch: _Channel, up: bool, chid: int) -> None:
        with ch.lock:
            if ch.chid is None:  # connected before ca_create_channel returned
                ch.chid = chid
            if up:
                start, gone = self._connected(ch), []
            else:
                ch.connected.clear()
                ch.ready.clear()
                start, gone = [], list(ch.subs)
            if ch.host:
                with self._work_lock:
                    lost = self._lost.setdefault(ch.host, set())
                    if up:
                        lost.discard(ch)
                    else:
                        lost.add(ch)
        for sub in gone:  # outside ch.lock: on_event is user code
            sub._disconnected()
        self._start(start)

    def _connected(self, ch: _Channel) -> list[CASubscription]:
        lib = self._lib
        ch.ftype = lib.field_type(ch.chid)
        ch.count = lib.element_count(ch.chid)
        ch.host = (lib.host_name(ch.chid) or b"").decode(errors="replace")
        ch.connected.set()
        # Metadata: one CTRL read (DBR_CTRL_STRING has none) and the record's DESC.
        ch.ctrl_pending = ch.ftype != dbr.STRING
        if ch.ctrl_pending:
            req = _Request(ch, "ctrl")
            ret = lib.array_get_callback(ch.ftype + dbr.CTRL_STRING, 1, ch.chid, _GET_CB, req)
            if ret != dbr.ECA_NORMAL:
                self._inflight.discard(req)
                ch.ctrl_pending = False
                _log.warning("CA control read of %s failed: %s", ch.name, _message(ret))
        if ch.desc is None:
            link = ch.desc = _DescLink(ch)
            ch.desc_pending = True
            chid = ctypes.c_void_p()
            desc_name = ch.name.split(".", 1)[0] + ".DESC"
            if lib.create_channel(desc_name.encode(), _CONN_CB, link, 0, ctypes.byref(chid)) == dbr.ECA_NORMAL:
                link.chid = link.chid or chid.value
            else:
                ch.desc, ch.desc_pending = None, False
            with self._work_lock:
                self._desc_work.add(ch)
        lib.flush_io()
        return self._maybe_ready(ch)

    def _desc_connected(self, link: _DescLink, chid: int) -> None:
        ch = link.channel
        with ch.lock:
            link.chid = link.chid or chid
            if not ch.desc_pending or ch.desc is not link:
                return
            req = _Request(ch, "desc")
            ret = self._lib.array_get_callback(dbr.STRING, 1, link.chid, _GET_CB, req)
            self._lib.flush_io()
        if ret != dbr.ECA_NORMAL:
            self._inflight.discard(req)
            self._desc_finished(ch, "")

    def _ctrl_done(self, ch: _Channel, args) -> None:
        st = ctypes.cast(args.raw_dbr, ctypes.POINTER(dbr.Map[args.type])).contents
        if dbr.native_type(args.type) == dbr.ENUM:
            choices = [bytes(st.strs[i].value).decode("utf-8", "replace") for i in range(st.no_str)]
            meta = None
        else:
            choices = None
            lim = {f: getattr(st, f) for f in _CTRL_FIELDS}
            meta = {
                "display": {
                    "limitLow": lim["lower_disp_limit"], "limitHigh": lim["upper_disp_limit"],
                    "description": "",
                    "units": bytes(st.units).split(b"\0", 1)[0].decode("utf-8", "replace"),
                    "precision": getattr(st, "precision", 0),
                    "form": {"index": 0, "choices": FORM_CHOICES},
                },
                "control": {"limitLow": lim["lower_ctrl_limit"], "limitHigh": lim["upper_ctrl_limit"],
                            "minStep": 0.0},
                "valueAlarm": {
                    "lowAlarmLimit": lim["lower_alarm_limit"], "lowWarningLimit": lim["lower_warning_limit"],
                    "highWarningLimit": lim["upper_warning_limit"], "highAlarmLimit": lim["upper_alarm_limit"],
                },
            }
        with ch.lock:
            if choices is not None:
                ch.choices = share(choices)
                ch.meta = share({"display": {"description": ch.description}})
            else:
                meta["display"]["description"] = ch.description
                ch.meta = share(meta)
            ch.ctrl_pending = False
            start = self._maybe_ready(ch)
        self._start(start)

    def _ctrl_failed(self, ch: _Channel, why: str) -> None:
        _log.warning("CA control read of %s failed: %s", ch.name, why)
        with ch.lock:
            ch.ctrl_pending = False
            start = self._maybe_ready(ch)
        self._start(start)

    def _desc_finished(self, ch: _Channel, text: str) -> None:
        with ch.lock:
            if not ch.desc_pending:
                return
            ch.desc_pending = False
            ch.description = text
            if "display" in ch.meta:  # new dicts: events already out keep theirs
                ch.meta = share(dict(ch.meta, display=dict(ch.meta["display"], description=text)))
            start = self._maybe_ready(ch)
        self._start(start)

    @staticmethod
    def _maybe_ready(ch: _Channel) -> list[CASubscription]:
        """Under ch.lock: ready once an event can carry full metadata; returns subscriptions to start."""
        if not ch.connected.is_set() or ch.ctrl_pending or ch.desc_pending or ch.renewing:
            return []
        if ch.ftype == dbr.STRING:
            ch.meta = share({"display": {"description": ch.description, "units": ""}})
        ch.ready.set()
        return [sub for sub in ch.subs if sub._evid is None]

    @staticmethod
    def _start(subs: list[CASubscription]) -> None:
        for sub in subs:
            sub._subscribe()

    def _janitor_loop(self) -> None:
        """Gives up on DESC reads that cannot connect; clears DESC channels once read."""
        while not self._stop.wait(0.2):
            try:
                self._nudge_lost()
            except Exception:
                _log.exception("CA reconnect nudge failed")
            try:
                self._release_idle()
            except Exception:
                _log.exception("CA idle channel release failed")
            try:
                with self._work_lock:
                    work = list(self._desc_work)
                if not work:
                    continue
                now = time.monotonic()
                with self._attached():
                    for ch in work:
                        link = ch.desc
                        if ch.desc_pending and link is not None and now > link.deadline:
                            _log.debug("CA: no DESC for %s", ch.name)
                            self._desc_finished(ch, "")
                        with ch.lock:
                            if ch.desc_pending:
                                continue
                            ch.desc = None
                        with self._work_lock:
                            self._desc_work.discard(ch)
                        if link is not None and link.chid is not None:
                            self._lib.clear_channel(link.chid)
                    self._lib.flush_io()
            except Exception:
                _log.exception("CA janitor failed")

    # reconnection ----------------------------------------------------------------
    def _nudge_lost(self) -> None:
        """Janitor: one probe per lost server; once a probe connects, that server's channels search afresh."""
        with self._work_lock:
            for host in [h for h, chans in self._lost.items() if not chans]:
                del self._lost[host]
            lost = {h: sorted(chans, key=lambda c: c.name) for h, chans in self._lost.items()}
        if not lost and not self._probes:
            return
        now = time.monotonic()
        with self._attached():
            for host in [h for h in self._probes if h not in lost]:
                self._drop_probe(host)
            for host, chans in lost.items():
                probe = self._probes.get(host)
                if probe is not None and probe.up:
                    _log.info("CA server %s answers again: renewing %d channels", host, len(chans))
                    self._drop_probe(host)
                    for ch in chans:
                        self._renew(ch)
                elif probe is None or now - probe.born >= PROBE_PERIOD:
                    turn = 0 if probe is None else probe.turn + 1
                    self._drop_probe(host)
                    probe = self._probes[host] = _Probe(chans[turn % len(chans)].name)
                    probe.turn = turn
                    chid = ctypes.c_void_p()
                    if self._lib.create_channel(probe.name.encode(), _CONN_CB, probe, 0,
                                                ctypes.byref(chid)) == dbr.ECA_NORMAL:
                        probe.chid = chid.value
            self._lib.flush_io()

    def _drop_probe(self, host: str) -> None:
        probe = self._probes.pop(host, None)
        if probe is not None and probe.chid is not None:
            self._lib.clear_channel(probe.chid)

    def _renew(self, ch: _Channel) -> None:
        """Janitor, attached: replace a disconnected channel's chid by a fresh one (whose search starts now).

        Its subscriptions die with the old chid and are made again once the new one is ready.
        """
        with ch.lock:
            if ch.connected.is_set() or ch.chid is None or self._closed:
                return
            with self._work_lock:
                ch.renewing = True  # no new subscriptions, no readiness until the new chid
                ch.gen += 1  # _unsubscribe leaves older evids alone from now on
                self._lost.get(ch.host, set()).discard(ch)
            subs = list(ch.subs)
        deadline = time.monotonic() + RENEW_WAIT
        while ch.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        if ch.busy:  # a subscription call is stuck on the old chid: try again later
            with self._work_lock:
                ch.renewing = False
            return
        old = ch.chid
        self._lib.clear_channel(old)  # waits for callbacks in flight; no old callback comes after it
        for sub in subs:
            with sub._lock:
                sub._evid = None
        with ch.lock:
            ch.chid = None
            ch.connected.clear()
            ch.ready.clear()
            with self._work_lock:
                ch.renewing = False
        chid = ctypes.c_void_p()
        ret = self._lib.create_channel(ch.name.encode(), _CONN_CB, ch, 0, ctypes.byref(chid))
        if ret != dbr.ECA_NORMAL:
            _log.error("CA: cannot re-create channel %s: %s", ch.name, _message(ret))
            return
        with ch.lock:
            if ch.chid is None:  # not connected before ca_create_channel returned
                ch.chid = chid.value

    # operations ----------------------------------------------------------------
    @staticmethod
    def _wait_ready(ch: _Channel, timeout: float) -> float:
        """The deadline of an operation of ``timeout`` once ``ch`` is ready for it."""
        deadline = time.monotonic() + timeout
        if not ch.ready.wait(timeout):
            if ch.connected.is_set():
                raise PVError(ErrorCode.TIMEOUT,
                              f"PV '{ch.name}' connected but its metadata did not arrive within {timeout:g} s")
            raise connect_timeout(ch.name, timeout)
        return deadline

    def get(self, name: str, timeout: float) -> ValueTree:
        with self._using(name) as ch:
            return self._read(ch, timeout)

    def _read(self, ch: _Channel, timeout: float) -> ValueTree:
        name = ch.name
        deadline = self._wait_ready(ch, timeout)
        req = _Request(ch, "time")
        self._issue(name, "get", req, deadline, timeout,
                    lambda: self._lib.array_get_callback(ch.time_type(), 0, ch.chid, _GET_CB, req))
        if req.error is not None:
            raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': get failed: {req.error}")
        return req.result

    def _issue(self, name: str, what: str, req: Any, deadline: float, timeout: float, call) -> None:
        """Start a callback get/put, flush it, and wait for its callback until ``deadline``."""
        with self._attached():
            ret = call()
            if ret != dbr.ECA_NORMAL:
                self._inflight.discard(req)
                raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': {what} failed: {_message(ret)}")
            self._lib.flush_io()
        if not req.done.wait(max(0.0, deadline - time.monotonic())):
            raise PVError(ErrorCode.TIMEOUT, f"PV '{name}': {what} did not complete within {timeout:g} s")

    def put(self, name: str, value: ValueTree, timeout: float) -> None:
        if not isinstance(value, dict) or "value" not in value:
            raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': a CA put needs a map with a 'value' field")
        extra = sorted(set(value) - {"value"})
        if extra:
            raise PVError(ErrorCode.EPICS_FAILED,
                          f"PV '{name}': CA can only write 'value', not {', '.join(map(repr, extra))}")
        with self._using(name) as ch:
            deadline = self._wait_ready(ch, timeout)
            try:
                ftype, count, data = _put_buffer(ch, value["value"])
            except (TypeError, ValueError, OverflowError) as e:
                raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': cannot put {value['value']!r}: {e}") from None
            req = _PutRequest(data, self._inflight)
            self._issue(name, "put", req, deadline, timeout,
                        lambda: self._lib.array_put_callback(ftype, count, ch.chid, ctypes.addressof(data), _PUT_CB,
                                                             req))
        if req.status != dbr.ECA_NORMAL:
            raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': put failed: {_message(req.status)}")

    def info(self, name: str, timeout: float) -> dict[str, Any]:
        with self._using(name) as ch:
            return self._info_of(ch, self._read(ch, timeout))

    def _info_of(self, ch: _Channel, tree: ValueTree) -> dict[str, Any]:
        name = ch.name
        with self._attached():
            host = self._lib.host_name(ch.chid)
            read = bool(self._lib.read_access(ch.chid))
            write = bool(self._lib.write_access(ch.chid))
        return {
            "protocol": "ca",
            "name": name,
            "connected": ch.connected.is_set(),
            "type": _DBR_NAMES.get(ch.ftype, str(ch.ftype)),
            "count": ch.count,
            "host": (host or b"").decode(),
            "access": {"read": read, "write": write},
            "structure": _describe(tree, ch),
        }

    def monitor(self, name: str, on_event: EventCallback) -> CASubscription:
        with self._using(name) as ch, self._attached():
            sub = CASubscription(ch, on_event)
            with ch.lock:
                ch.subs.append(sub)
                ready = ch.ready.is_set()
            if ready:
                sub._subscribe()
        return sub

    # idle channels -------------------------------------------------------------
    def channel_count(self) -> int:
        """CA channels open (each searching while its PV is not found)."""
        return len(self._channels)

    def _release_idle(self) -> None:
        """Janitor: clear channels no operation holds, no monitor uses, and nothing used for ``idle_timeout``."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(max(self._idle_timeout / 4, 0.2), 5.0)
        with self._lock:
            if self._closed:
                return
            idle = [ch for ch in self._channels.values()
                    if not ch.users and not ch.subs and now - ch.used >= self._idle_timeout]
            for ch in idle:  # from here on nobody can take it: a new user makes a new channel
                del self._channels[ch.name]
        if not idle:
            return
        with self._attached():
            for ch in idle:
                with ch.lock:
                    link, ch.desc = ch.desc, None
                    chid = ch.chid
                for c in (link.chid if link else None, chid):
                    if c is not None:
                        self._lib.clear_channel(c)  # no callback of it comes after this returns
                with self._work_lock:
                    self._desc_work.discard(ch)
                    self._lost.get(ch.host, set()).discard(ch)
                for req in [r for r in list(self._inflight) if getattr(r, "channel", None) is ch]:
                    self._inflight.discard(req)  # cleared with the channel: its callback never comes
            self._lib.flush_io()
        _log.info("CA: %d channels unused for %g s cleared (%s%s)", len(idle), self._idle_timeout,
                  ", ".join(ch.name for ch in idle[:5]), ", ..." if len(idle) > 5 else "")

    def _unsubscribe(self, sub: CASubscription, evid: int | None) -> None:
        ch = sub._channel
        with ch.lock:
            if sub in ch.subs:
                ch.subs.remove(sub)
        ch.used = time.monotonic()  # idle from now on
        if evid is None or self._closed:
            return
        with self._work_lock:
            if sub._gen != ch.gen:  # its chid was renewed: libca dropped the evid with it
                return
            ch.busy += 1
        try:
            with self._attached():
                self._lib.clear_subscription(evid)
                self._lib.flush_io()
        finally:
            with self._work_lock:
                ch.busy -= 1

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
        self._stop.set()
        self._janitor.join(5.0)
        lib = self._lib
        probes, self._probes = list(self._probes.values()), {}
        previous = lib.current_context()
        if previous:
            lib.detach_context()
        lib.attach_context(self._ctx)
        try:
            for ch in channels:
                with ch.lock:
                    subs, ch.subs = list(ch.subs), []
                    link, ch.desc = ch.desc, None
                for sub in subs:
                    with sub._lock:
                        sub._closed = True
                        evid, sub._evid = sub._evid, None
                    if evid is not None:
                        lib.clear_subscription(evid)
                for chid in (link.chid if link else None, ch.chid):
                    if chid is not None:
                        lib.clear_channel(chid)
            for probe in probes:
                if probe.chid is not None:
                    lib.clear_channel(probe.chid)
            lib.flush_io()
            lib.context_destroy()  # waits for libca's threads; detaches this one
        finally:
            if lib.current_context():
                lib.detach_context()
            if previous and previous != self._ctx:
                lib.attach_context(previous)


# -- put buffers ---------------------------------------------------------------
def _put_buffer(ch: _Channel, value: Any) -> tuple[int, int, Any]:
    """DBR type, count and ctypes buffer for ``value``; the server converts to the field's type."""
    native = ch.ftype
    if isinstance(value, dict):
        raise TypeError("a map cannot be written to a CA channel")
    if native == dbr.ENUM and isinstance(value, str) and ch.choices:
        if value in ch.choices:
            value = ch.choices.index(value)
        else:
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"'{value}' is not one of the choices {ch.choices}") from None
    if native == dbr.CHAR and ch.count > 1 and isinstance(value, (str, bytes)):
        raw = value.encode() if isinstance(value, str) else value
        value = np.frombuffer(raw + b"\0", np.uint8)[: ch.count]
    if isinstance(value, (str, bytes)):
        data = (dbr.string_t * 1)()
        data[0].value = _encode40(value)
        return dbr.STRING, 1, data
    if isinstance(value, (bool, int, float, np.generic)):
        if isinstance(value, (bool, np.bool_, int, np.integer)) and -2**31 <= int(value) < 2**31:
            return dbr.LONG, 1, (ctypes.c_int32 * 1)(int(value))
        return dbr.DOUBLE, 1, (ctypes.c_double * 1)(float(value))
    if not isinstance(value, np.ndarray):
        items = list(value)
        if items and all(isinstance(x, (str, bytes)) for x in items):
            data = (dbr.string_t * len(items))()
            for i, x in enumerate(items):
                data[i].value = _encode40(x)
            return dbr.STRING, len(items), data
        value = np.asarray(items)
    arr = value.ravel()
    if arr.size == 0:
        raise ValueError("cannot put an empty array")
    if arr.dtype.kind in "biu":
        lo, hi = int(arr.min()), int(arr.max())
        if native == dbr.CHAR and 0 <= lo and hi < 256:
            ftype, ctype, arr = dbr.CHAR, ctypes.c_uint8, arr.astype(np.uint8)
        elif -2**15 <= lo and hi < 2**15 and arr.dtype.itemsize <= 2:
            ftype, ctype, arr = dbr.SHORT, ctypes.c_int16, arr.astype(np.int16)
        elif -2**31 <= lo and hi < 2**31:
            ftype, ctype, arr = dbr.LONG, ctypes.c_int32, arr.astype(np.int32)
        else:
            ftype, ctype, arr = dbr.DOUBLE, ctypes.c_double, arr.astype(np.float64)
    elif arr.dtype.kind == "f":
        ftype, ctype, arr = dbr.DOUBLE, ctypes.c_double, arr.astype(np.float64)
    else:
        raise TypeError(f"cannot write an array of {arr.dtype} over CA")
    data = (ctype * arr.size).from_buffer_copy(np.ascontiguousarray(arr).tobytes())
    return ftype, arr.size, data


def _encode40(x: str | bytes) -> bytes:
    raw = x.encode() if isinstance(x, str) else x
    if len(raw) >= 40:
        raise ValueError(f"CA strings hold at most 39 bytes, got {len(raw)}")
    return raw


def _describe(tree: ValueTree, ch: _Channel) -> dict[str, Any]:
    """Field -> type name of a CA value tree, in the PVA adapter's notation."""
    if ch.ftype == dbr.ENUM:
        value: Any = {"index": "uint16", "choices": "string[]"}
    else:
        value = _NATIVE.get(ch.ftype, (0, None, None, "unknown"))[3] + ("[]" if ch.count > 1 else "")

    def leaf(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: leaf(v) for k, v in x.items()}
        if isinstance(x, bool):
            return "boolean"
        if isinstance(x, int):
            return "int32"
        if isinstance(x, float):
            return "double"
        if isinstance(x, list):
            return "string[]"
        return "string"

    out = {k: leaf(v) for k, v in tree.items() if k != "value"}
    out["timeStamp"]["secondsPastEpoch"] = "int64"
    return {"value": value, **out}
