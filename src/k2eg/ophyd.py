"""ophyd-async signals whose values come through k2eg (Kafka) instead of straight from EPICS.

``K2egSignalBackend`` is an ophyd-async ``SignalBackend`` on ``k2eg.aio``: reads are k2eg
gets, subscriptions k2eg monitors, puts wait for the gateway's reply. The PV's value tree
(the same for ``ca://`` and ``pva://``) gives readings (EPICS timestamp, alarm severity)
and describe() metadata (units, precision, limits, enum choices).

Needs ``pip install 'k2eg[bluesky]'`` (ophyd-async, bluesky; Python >= 3.11).
"""
from __future__ import annotations

import asyncio
import logging
import math
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Callable, get_args, get_origin

import numpy as np

try:
    from bluesky.protocols import Reading
    from event_model import DataKey
    from ophyd_async.core import (DEFAULT_TIMEOUT, NotConnectedError, SignalBackend, SignalDatatypeT, SignalR,
                                  SignalRW, SignalX, StrictEnum, SubsetEnum, get_enum_cls, make_datakey)
except ImportError as _missing:  # one sentence, not a traceback into ophyd's imports
    raise ImportError(f"k2eg.ophyd needs ophyd-async and bluesky ({_missing}): "
                      "pip install 'k2eg[bluesky]' (Python >= 3.11)") from None

from k2eg.aio import AsyncClient, Monitor
from k2eg.client.errors import OperationError, OperationTimeout
from k2eg.dml import parse_pv

__all__ = ["K2egSignalBackend", "k2eg_signal_r", "k2eg_signal_rw", "k2eg_signal_x", "shared_client",
           "close_shared_clients", "reading_of", "metadata_of"]

log = logging.getLogger("k2eg.ophyd")

_FLOAT = (float, np.floating)
_INT = (int, np.integer)


# ----------------------------------------------------------------------------- value trees -> ophyd

def reading_of(tree: dict, value: Any) -> Reading:
    """An ophyd-async Reading: the EPICS timestamp (POSIX seconds) and severity (INVALID -> -1, as ophyd's)."""
    ts = tree.get("timeStamp") or {}
    severity = (tree.get("alarm") or {}).get("severity", 0)
    return {"value": value, "timestamp": ts.get("secondsPastEpoch", 0) + ts.get("nanoseconds", 0) * 1e-9,
            "alarm_severity": -1 if severity > 2 else severity}


def _limits(tree: dict) -> dict:
    def pair(section: str, low: str = "limitLow", high: str = "limitHigh") -> dict | None:
        part = tree.get(section) or {}
        lo, hi = part.get(low), part.get(high)
        if lo is None and hi is None:
            return None
        lo = None if lo is None or (isinstance(lo, float) and math.isnan(lo)) else lo
        hi = None if hi is None or (isinstance(hi, float) and math.isnan(hi)) else hi
        if (lo is None and hi is None) or lo == hi == 0:  # unset limits, as EPICS reports them
            return None
        return {"low": lo, "high": hi}

    out = {}
    for key, found in (("control", pair("control")), ("display", pair("display")),
                       ("alarm", pair("valueAlarm", "lowAlarmLimit", "highAlarmLimit")),
                       ("warning", pair("valueAlarm", "lowWarningLimit", "highWarningLimit"))):
        if found:
            out[key] = found
    return out


def metadata_of(tree: dict, datatype: type) -> dict:
    """describe() metadata from the PV's own fields: units and limits of numbers, precision of floats, choices."""
    display = tree.get("display") or {}
    value = tree.get("value")
    meta: dict[str, Any] = {}
    kind = {int: "i", float: "f"}.get(datatype) or getattr(_array_dtype(datatype), "kind", "")
    numeric = kind in ("i", "u", "f")
    if numeric and isinstance(display.get("units"), str):
        meta["units"] = display["units"]
    if kind == "f" and isinstance(display.get("precision"), int):
        meta["precision"] = display["precision"]
    if numeric and (limits := _limits(tree)):
        meta["limits"] = limits
    if isinstance(value, dict) and "choices" in value and (datatype is str or get_enum_cls(datatype)):
        meta["choices"] = list(value["choices"])
    return meta


def _array_dtype(datatype: Any) -> np.dtype | None:
    """``Array1D[np.float64]`` -> float64; None for other datatypes."""
    if get_origin(datatype) is np.ndarray and len(get_args(datatype)) == 2:
        return np.dtype(get_args(get_args(datatype)[1])[0])
    return None


def _infer(value: Any) -> type:
    if isinstance(value, dict) and "choices" in value:
        return str
    if isinstance(value, bool):
        return bool
    if isinstance(value, _INT):
        return int
    if isinstance(value, _FLOAT):
        return float
    if isinstance(value, str):
        return str
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        return Sequence[str] if arr.dtype.kind in "US" else np.ndarray
    raise TypeError(f"no ophyd-async datatype for a PV value of type {type(value).__name__}")


class Converter:
    """Values of one PV to and from one ophyd-async datatype, checked against the PV's first value."""

    def __init__(self, datatype: type | None, uri: str, tree: dict):
        value = tree.get("value")
        if value is None:
            raise TypeError(f"{uri} has no 'value' field; k2eg signals need a scalar, enum or array PV")
        self.datatype = datatype or _infer(value)
        self.uri = uri
        self.enum = get_enum_cls(self.datatype)
        self.array = _array_dtype(self.datatype)
        is_enum = isinstance(value, dict) and "choices" in value
        dt = self.datatype
        if self.enum is not None:
            if is_enum:
                self._check_choices(list(value["choices"]))
            elif not isinstance(value, str):
                raise self._mismatch(value)
        elif is_enum:
            if dt is bool and len(value["choices"]) != 2:
                raise TypeError(f"{uri} has {len(value['choices'])} choices, cannot be a bool")
            if dt not in (str, bool, int):
                raise self._mismatch(value)
        elif dt is float and not isinstance(value, (_FLOAT, _INT)) or dt is int and not (
                isinstance(value, _INT) or isinstance(value, _FLOAT) and (tree.get("display") or {}).get("precision") == 0):
            raise self._mismatch(value)
        elif dt is str and not isinstance(value, str) or dt is bool and not isinstance(value, (bool, _INT)):
            raise self._mismatch(value)
        elif (self.array is not None or dt is np.ndarray or get_origin(dt) is Sequence) and \
                not isinstance(value, (list, tuple, np.ndarray)):
            raise self._mismatch(value)

    def _mismatch(self, value: Any) -> TypeError:
        shown = getattr(self.datatype, "__name__", str(self.datatype))
        return TypeError(f"{self.uri} holds a {type(value).__name__} ({value!r:.60}), not a {shown}")

    def _check_choices(self, choices: list[str]) -> None:
        wanted = [e.value for e in self.enum]
        ok = set(wanted) <= set(choices) if issubclass(self.enum, SubsetEnum) else (
            set(wanted) == set(choices) if issubclass(self.enum, StrictEnum) else set(choices) <= set(wanted))
        if not ok:
            raise TypeError(f"{self.uri} has choices {choices}, which {self.enum.__name__} {wanted} does not match")

    def value(self, raw: Any) -> Any:
        dt = self.datatype
        if isinstance(raw, dict) and "choices" in raw:
            index = raw.get("index", 0)
            text = raw["choices"][index] if 0 <= index < len(raw["choices"]) else str(index)
            if self.enum is not None:
                try:
                    return self.enum(text)
                except ValueError:
                    return text  # a SubsetEnum may meet a choice it does not name
            return bool(index) if dt is bool else index if dt is int else text
        if self.enum is not None:
            return self.enum(raw)
        if self.array is not None:
            return np.asarray(raw, dtype=self.array)
        if dt is np.ndarray:
            return np.asarray(raw)
        if get_origin(dt) is Sequence:
            return [str(x) for x in raw]
        return dt(raw)

    def write(self, value: Any) -> Any:
        """What ``put`` sends: enums as their choice string (the gateway maps it to the index)."""
        return value.value if self.enum is not None and hasattr(value, "value") else value


# ----------------------------------------------------------------------------- shared clients

_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], AsyncClient]]" = \
    weakref.WeakKeyDictionary()


async def shared_client(environment: str, app_name: str) -> AsyncClient:
    """One open client per environment, app name and event loop, for signals that name no client."""
    mine = _clients.setdefault(asyncio.get_running_loop(), {})
    client = mine.get((environment, app_name))
    if client is None:
        client = mine[(environment, app_name)] = AsyncClient(environment, app_name)
    try:
        return await client.open()
    except BaseException:
        mine.pop((environment, app_name), None)
        raise


async def close_shared_clients() -> None:
    """Close the clients ``shared_client`` opened on the running loop."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.close()


# ----------------------------------------------------------------------------- backend

class K2egSignalBackend(SignalBackend[SignalDatatypeT]):
    """A signal read from ``read_uri`` and written to ``write_uri`` through k2eg.

    ``client``: an ``AsyncClient`` to share (opened here if it is not yet), else one shared
    client per (``environment``, ``app_name``, event loop).
    """

    def __init__(self, datatype: type[SignalDatatypeT] | None, read_uri: str, write_uri: str | None = None, *,
                 client: AsyncClient | None = None, environment: str | None = None, app_name: str | None = None):
        parse_pv(read_uri)
        parse_pv(write_uri or read_uri)
        if client is None and not (environment and app_name):
            raise ValueError("a k2eg signal needs client=AsyncClient(...) or both environment= and app_name=")
        self.read_uri = read_uri
        self.write_uri = write_uri or read_uri
        self._client = client
        self._environment, self._app_name = environment, app_name
        self._converter: Converter | None = None
        self._initial: Any = None
        self._monitor: Monitor | None = None
        self._reader: asyncio.Task | None = None
        super().__init__(datatype)

    def source(self, name: str, read: bool) -> str:
        return self.read_uri if read else self.write_uri

    @property
    def client(self) -> AsyncClient:
        if self._client is None or self._converter is None:
            raise NotConnectedError(f"{self.read_uri}: connect() the signal first")
        return self._client

    @property
    def converter(self) -> Converter:
        self.client  # noqa: B018 - raises when not connected
        return self._converter  # type: ignore[return-value]

    async def connect(self, timeout: float) -> None:
        if self._client is None or self._client._transport is None:
            self._client = (await self._client.open() if self._client is not None
                            else await shared_client(self._environment, self._app_name))  # type: ignore[arg-type]
        client = self._client
        uris = dict.fromkeys([self.read_uri, self.write_uri])
        try:
            trees = await asyncio.wait_for(asyncio.gather(*(client.get(u) for u in uris)), timeout)
        except (asyncio.TimeoutError, OperationError, OperationTimeout) as e:
            raise NotConnectedError(f"{self.read_uri}: {str(e) or f'no reply within {timeout:g} s'}") from e
        converters = [Converter(self.datatype, u, t) for u, t in zip(uris, trees)]
        self._converter = converters[0]
        self._initial = trees[-1].get("value")

    async def put(self, value: SignalDatatypeT | None, wait: bool = True) -> None:
        """Waits for the gateway's reply (the IOC's put completion) whatever ``wait`` says.

        ``wait`` only exists for ophyd-async < 0.14, whose backends took it.
        """
        if value is None:  # a SignalX trigger: write back what the PV held at connect, as ophyd's EPICS does
            raw = self._initial
            write = raw["choices"][raw["index"]] if isinstance(raw, dict) and "choices" in raw else raw
        else:
            write = self.converter.write(value)
        await self.client.put(self.write_uri, write)

    async def get_datakey(self, source: str) -> DataKey:
        tree = await self.client.get(self.read_uri)
        c = self.converter
        return make_datakey(c.datatype, c.value(tree["value"]), source, metadata_of(tree, c.datatype))

    async def get_reading(self) -> Reading[SignalDatatypeT]:
        tree = await self.client.get(self.read_uri)
        return reading_of(tree, self.converter.value(tree["value"]))

    async def get_value(self) -> SignalDatatypeT:
        return self.converter.value((await self.client.get(self.read_uri))["value"])

    async def get_setpoint(self) -> SignalDatatypeT:
        return self.converter.value((await self.client.get(self.write_uri))["value"])

    def set_callback(self, callback: Callable[[Reading[SignalDatatypeT]], None] | None) -> None:
        """Readings of a k2eg monitor: the current value first, then every update (or the newest of
        a burst the loop was too busy for: k2eg.aio's queue bound)."""
        if callback is not None and self._monitor is not None:
            raise RuntimeError(f"{self.read_uri}: cannot set a callback when one is already set")
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if callback is None:
            return
        monitor = self._monitor = self.client.monitor(self.read_uri)
        convert = self.converter.value

        async def read() -> None:
            try:
                async for _, tree in monitor:
                    if isinstance(tree, dict) and "value" in tree:
                        callback(reading_of(tree, convert(tree["value"])))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("monitor of %s ended", self.read_uri)

        self._reader = asyncio.get_running_loop().create_task(read(), name=f"k2eg monitor {self.read_uri}")


# ----------------------------------------------------------------------------- factories

def k2eg_signal_r(datatype: type[SignalDatatypeT], read_uri: str, name: str = "", *,
                  client: AsyncClient | None = None, environment: str | None = None, app_name: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> SignalR[SignalDatatypeT]:
    """A read-only signal of ``read_uri`` (``pva://`` or ``ca://``)."""
    backend = K2egSignalBackend(datatype, read_uri, client=client, environment=environment, app_name=app_name)
    return SignalR(backend, name=name, timeout=timeout)


def k2eg_signal_rw(datatype: type[SignalDatatypeT], read_uri: str, write_uri: str | None = None, name: str = "", *,
                   client: AsyncClient | None = None, environment: str | None = None, app_name: str | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> SignalRW[SignalDatatypeT]:
    """A signal read from ``read_uri`` and set through ``write_uri`` (default: the same PV)."""
    backend = K2egSignalBackend(datatype, read_uri, write_uri, client=client, environment=environment,
                                app_name=app_name)
    return SignalRW(backend, name=name, timeout=timeout)


def k2eg_signal_x(write_uri: str, name: str = "", *, client: AsyncClient | None = None,
                  environment: str | None = None, app_name: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> SignalX:
    """A signal whose trigger() writes ``write_uri`` the value it held at connect (ophyd's EPICS SignalX)."""
    backend = K2egSignalBackend(None, write_uri, client=client, environment=environment, app_name=app_name)
    with warnings.catch_warnings():  # ophyd-async >= 0.19 deprecates SignalX for TriggerableCommand
        warnings.simplefilter("ignore", DeprecationWarning)
        return SignalX(backend, name=name, timeout=timeout)
