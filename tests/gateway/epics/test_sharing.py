"""Per-event cost and per-PV memory: shared sub-trees and plans, the CA scalar fast path, pinned thread states."""
from __future__ import annotations

import ctypes
import math
import struct
import threading

import numpy as np
import pytest
from epics import dbr

from k2eg.gateway.epics import base
from k2eg.gateway.epics import ca as camod
from k2eg.gateway.epics.base import share

from .conftest import BULK

pytestmark = pytest.mark.timeout(180)


# -- base.share (pure) ---------------------------------------------------------
def test_equal_subtrees_become_one_object():
    a = share({"limitLow": 0.0, "limitHigh": 10.0, "form": {"index": 0, "choices": ["Default", "String"]}})
    b = share({"limitLow": 0.0, "limitHigh": 10.0, "form": {"index": 0, "choices": ["Default", "String"]}})
    assert a is b
    assert a == {"limitLow": 0.0, "limitHigh": 10.0, "form": {"index": 0, "choices": ["Default", "String"]}}


def test_unequal_parents_still_share_equal_children():
    a = share({"description": "PV one", "form": {"index": 0, "choices": ["x", "y"]}})
    b = share({"description": "PV two", "form": {"index": 0, "choices": ["x", "y"]}})
    assert a is not b and a["description"] == "PV one" and b["description"] == "PV two"
    assert a["form"] is b["form"]


def test_nan_limits_are_shared():
    a = share({"lowAlarmLimit": math.nan, "active": False})
    b = share({"lowAlarmLimit": math.nan, "active": False})
    assert a is b and math.isnan(a["lowAlarmLimit"])


@pytest.mark.parametrize("x, y", [({"v": 0}, {"v": 0.0}), ({"v": 0.0}, {"v": -0.0}), ({"v": 1}, {"v": True}),
                                  ({"v": ["a"]}, {"v": ("a",)})])
def test_equal_but_differently_typed_values_are_not_swapped(x, y):
    """0 == 0.0 == False and 0.0 == -0.0 in Python, but they encode differently."""
    sx, sy = share(x), share(y)
    assert sx is not sy
    assert type(sy["v"]) is type(y["v"]) and repr(sy["v"]) == repr(y["v"])


def test_arrays_and_long_lists_pass_through():
    arr = np.arange(4.0)
    t = share({"value": arr})
    assert t["value"] is arr
    long = [str(i) for i in range(base._POOL_MAX_ITEMS + 1)]
    assert share(long) is long


def test_input_is_not_modified():
    inner = {"index": 0, "choices": ["a"]}
    x = {"form": inner}
    share({"form": {"index": 0, "choices": ["a"]}})
    share(x)
    assert x["form"] is inner


# -- CA: the one-unpack scalar path gives what the general path gives ----------------
def _time_buffer(ntype: int, value) -> tuple[ctypes.Array, int]:
    ftype = ntype + dbr.TIME_STRING
    off = dbr.value_offset[ftype]
    size, code = camod._NATIVE[ntype][0], camod._NATIVE[ntype][1]
    buf = ctypes.create_string_buffer(off + size)
    camod._TIME_HEADER.pack_into(buf, 0, 3, 2, 1_000_000, 123)  # status HIHI, severity MAJOR
    struct.pack_into("=" + code, buf, off, value)
    return buf, ftype


@pytest.mark.parametrize("ntype, value", [(dbr.DOUBLE, 2.5), (dbr.FLOAT, -1.5), (dbr.LONG, -7), (dbr.SHORT, -3),
                                          (dbr.CHAR, 200), (dbr.ENUM, 1)])
def test_ca_scalar_fast_path_matches_general_decode(monkeypatch, ntype, value):
    camod._libca()  # value offsets and the fast-path layouts
    ch = camod._Channel(camod.CAProvider.__new__(camod.CAProvider), "x")
    ch.ftype, ch.count, ch.choices = ntype, 1, ["zero", "one"]
    ch.meta = share({"display": {"description": "d", "units": "u"}})
    buf, ftype = _time_buffer(ntype, value)
    args = dbr.event_handler_args()
    args.type, args.count, args.raw_dbr, args.status = ftype, 1, ctypes.addressof(buf), dbr.ECA_NORMAL
    assert ftype in camod._TIME_SCALAR
    fast = ch.decode(args)
    monkeypatch.setattr(camod, "_TIME_SCALAR", {})
    general = ch.decode(args)
    assert fast == general
    assert [type(x) for x in fast.values()] == [type(x) for x in general.values()]
    assert fast["alarm"] == {"severity": 2, "status": 3, "message": "HIHI"}
    assert fast["timeStamp"] == {"secondsPastEpoch": 1_000_000 + camod.EPICS_EPOCH, "nanoseconds": 123,
                                 "userTag": 0}
    expected = {"index": value, "choices": ["zero", "one"]} if ntype == dbr.ENUM else value
    assert fast["value"] == expected


# -- real IOC ------------------------------------------------------------------------------
def test_ca_callbacks_keep_their_thread_state(ca, recorder):
    """A libca thread's Python state outlives one callback (else each callback pays ~8 us to build one)."""
    tls = threading.local()
    seen: list = []

    def on_event(tree):
        seen.append(getattr(tls, "mark", None))
        tls.mark = len(seen)

    sub = ca.monitor("channel:counter", on_event)  # 10 Hz
    try:
        rec = recorder()
        sub2 = ca.monitor("channel:counter", rec)
        assert rec.wait_count(5, 15)
        sub2.close()
    finally:
        sub.close()
    assert len(seen) >= 3
    assert any(mark is not None for mark in seen[1:]), seen


def test_pva_wakeups_keep_their_thread_state(pva, recorder, monkeypatch):
    from k2eg.gateway.epics import pva as pvamod

    tls = threading.local()
    seen: list = []
    wakeup = pvamod.PVASubscription._wakeup

    def counted(self):
        wakeup(self)
        seen.append(getattr(tls, "mark", None))
        tls.mark = len(seen)

    monkeypatch.setattr(pvamod.PVASubscription, "_wakeup", counted)
    rec = recorder()
    sub = pva.monitor("channel:counter", rec)
    try:
        assert rec.wait_count(5, 15)
    finally:
        sub.close()
    assert any(mark is not None for mark in seen[1:]), seen


def test_ca_metadata_and_alarms_shared_between_pvs(ca, recorder):
    recs = {n: recorder() for n in ("bulk:000", f"bulk:{BULK - 1:03d}")}
    subs = [ca.monitor(n, r) for n, r in recs.items()]
    try:
        assert all(r.wait_count(2, 15) for r in recs.values())
    finally:
        for s in subs:
            s.close()
    (a1, a2), (b1, _) = [r.snapshot()[:2] for r in recs.values()]
    assert a1["valueAlarm"] is b1["valueAlarm"] and a1["control"] is b1["control"]
    assert a1["display"]["form"] is b1["display"]["form"]
    assert a1["display"]["description"] != b1["display"]["description"]  # each PV keeps its own DESC
    assert a1["alarm"] is a2["alarm"] is b1["alarm"]
    assert a1["timeStamp"] is not a2["timeStamp"]


def test_pva_plan_and_metadata_shared_between_pvs(pva, recorder):
    names = ("bulk:000", f"bulk:{BULK - 1:03d}")
    recs = {n: recorder() for n in names}
    subs = [pva.monitor(n, r) for n, r in recs.items()]
    try:
        assert all(r.wait_count(2, 15) for r in recs.values())
        assert subs[0]._plan is subs[1]._plan
    finally:
        for s in subs:
            s.close()
    (a1, a2), (b1, _) = [r.snapshot()[:2] for r in recs.values()]
    assert a1["valueAlarm"] is b1["valueAlarm"] and a1["control"] is b1["control"]
    assert a1["display"]["form"] is b1["display"]["form"]
    assert a1["display"]["description"] != b1["display"]["description"]
    assert a2["valueAlarm"] is a1["valueAlarm"]  # unchanged between updates too
    # what is shared is what a plain conversion gives
    got = pva.get(names[0], 5)
    for key in ("display", "control", "valueAlarm"):
        assert repr(got[key]) == repr(a1[key])
    assert list(got) == list(a1)


# -- MonitorHub's per-PV "has a value" flag ----------------------------------------------------
def test_first_value_wakes_a_waiter_and_times_out_without_a_value():
    from k2eg.gateway.monitors import FirstValue

    fv = FirstValue()
    assert not fv.is_set() and fv.wait(0.05) is False
    woke: list = []
    waiter = threading.Thread(target=lambda: woke.append(fv.wait(30)))
    waiter.start()
    fv.set()
    waiter.join(30)
    assert woke == [True] and fv.is_set() and fv.wait(0) is True
    assert FirstValue().wait(0) is False
