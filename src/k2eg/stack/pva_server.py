"""PVA-only demo PVs (structures QSRV records cannot express), served by p4p.

Runs inside the demo IOC process next to QSRV, on its own server and
broadcast ports, so one process start/stop covers every demo PV.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from p4p import Type, Value
from p4p.nt import NTNDArray, NTScalar, NTTable
from p4p.nt.common import alarm as _alarm_t, timeStamp as _timestamp_t
from p4p.server import Server
from p4p.server.thread import SharedPV

_log = logging.getLogger(__name__)

TABLE_COLUMNS = [("name", "s"), ("x", "d"), ("n", "i")]

STRUCT_TYPE = Type([
    ("a", ("S", None, [
        ("b", "i"),
        ("c", "d"),
        ("label", "s"),
        ("inner", ("S", None, [("flag", "?"), ("values", "ad")])),
    ])),
    ("u", ("U", None, [("i", "i"), ("s", "s"), ("d", "ad")])),
    ("items", ("aS", None, [("key", "s"), ("weight", "d")])),
    ("alarm", _alarm_t),
    ("timeStamp", _timestamp_t),
], id="k2eg:demo/Struct:1.0")

IMAGE_SHAPE = (16, 16)  # rows, columns (numpy order)


def _stamp(v: Value, now: float | None = None, field: str = "timeStamp") -> None:
    """SharedPV.post() leaves timestamps at 0; every update carries the post time."""
    now = time.time() if now is None else now
    sec = int(now)
    v[field + ".secondsPastEpoch"] = sec
    v[field + ".nanoseconds"] = int((now - sec) * 1e9)


class _PostPut:
    """Accept any put by posting it: the put's changed fields merge into the PV."""

    def put(self, pv: SharedPV, op) -> None:
        v = op.value()
        _stamp(v)
        pv.post(v)
        op.done()


class _CounterPut(_PostPut):
    """A put on pva:counter also moves the ticking counter to the new value."""

    def __init__(self, server: "DemoPVAServer"):
        self._server = server

    def put(self, pv: SharedPV, op) -> None:
        v = op.value()
        with self._server._lock:
            if v.changed("value"):
                self._server._count = float(v["value"])
            _stamp(v)
            pv.post(v)
        op.done()


def _initial_table() -> Value:
    v = NTTable(TABLE_COLUMNS).wrap([
        {"name": "alpha", "x": 1.5, "n": 1},
        {"name": "beta", "x": -2.25, "n": -2},
        {"name": "gamma", "x": 3.0, "n": 3},
    ])
    v["descriptor"] = "demo table"
    _stamp(v)
    return v


def _initial_struct() -> Value:
    v = Value(STRUCT_TYPE, {
        "a": {"b": 1, "c": 2.5, "label": "nested",
              "inner": {"flag": True, "values": np.array([1.0, 2.0, 3.0])}},
        "u": ("i", 7),
        "items": [{"key": "one", "weight": 1.0}, {"key": "two", "weight": 2.0}],
    })
    _stamp(v)
    return v


def _initial_counter() -> Value:
    v = NTScalar("d", display=True, control=True, valueAlarm=True, form=True).wrap(0.0)
    v["display.form.choices"] = ["Default", "String", "Binary", "Decimal", "Hex", "Exponential", "Engineering"]
    v["display.description"] = "Counter, +1 every 0.1 s"
    v["display.limitLow"] = 0.0
    v["display.limitHigh"] = 1e9
    v["display.precision"] = 0
    v["display.units"] = "counts"
    _stamp(v)
    return v


class DemoPVAServer:
    """pva:table, pva:image, pva:struct and pva:counter, with their tickers."""

    def __init__(self, conf: dict[str, str]):
        self._lock = threading.Lock()
        self._count = 0.0
        self._frame = 0
        self._stop = threading.Event()
        self._ndarray = NTNDArray()
        counter = _initial_counter()
        self._counter_type = counter.type()
        self.pvs: dict[str, SharedPV] = {
            "pva:table": SharedPV(handler=_PostPut(), initial=_initial_table()),
            "pva:struct": SharedPV(handler=_PostPut(), initial=_initial_struct()),
            "pva:counter": SharedPV(handler=_CounterPut(self), initial=counter),
            "pva:image": SharedPV(handler=_PostPut(), initial=self._image()),
        }
        self._server = Server(providers=[self.pvs], conf=conf, useenv=False)
        self._threads = [
            threading.Thread(target=self._tick, args=(0.1, self._count_step), name="pva:counter", daemon=True),
            threading.Thread(target=self._tick, args=(1.0, self._image_step), name="pva:image", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _image(self) -> Value:
        rows, cols = IMAGE_SHAPE
        base = np.add.outer(np.arange(rows, dtype=np.uint16) * cols, np.arange(cols, dtype=np.uint16))
        pixels = (base + self._frame) % 4096
        v = self._ndarray.wrap(pixels.astype(np.uint16), attrib={
            "ColorMode": 0,
            "Exposure": 0.01,
            "Camera": "k2eg-demo",
        })
        v["uniqueId"] = self._frame
        now = time.time()
        _stamp(v, now)
        _stamp(v, now, "dataTimeStamp")
        return v

    def _tick(self, period: float, step) -> None:
        # Scheduled on absolute deadlines so the rate does not drift with load.
        deadline = time.monotonic()
        while not self._stop.is_set():
            deadline += period
            delay = deadline - time.monotonic()
            if delay < 0:
                deadline = time.monotonic()
            elif self._stop.wait(delay):
                return
            try:
                step()
            except Exception:  # a demo ticker must never die silently mid-test
                _log.exception("demo PV ticker failed")

    def _count_step(self) -> None:
        pv = self.pvs["pva:counter"]
        with self._lock:
            self._count += 1.0
            v = Value(self._counter_type)  # only the fields set below are posted
            v["value"] = self._count
            _stamp(v)
            pv.post(v)

    def _image_step(self) -> None:
        self._frame += 1
        self.pvs["pva:image"].post(self._image())

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        self._server.stop()
        for pv in self.pvs.values():
            pv.close()


def server_conf(server_port: int, broadcast_port: int) -> dict[str, Any]:
    """Loopback-only configuration so tests never talk to a real facility."""
    return {
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_SERVER_PORT": str(server_port),
        "EPICS_PVAS_BROADCAST_PORT": str(broadcast_port),
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    }
