"""PVAProvider against a real demo IOC (QSRV records and p4p structures)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from k2eg.gateway.epics.base import PVError
from k2eg.gateway.epics.pva import PVAProvider
from k2eg.protocol.errors import ErrorCode
from k2eg.stack.ioc import DemoIOC

from .conftest import BULK, check_idle_release, client_env

pytestmark = pytest.mark.timeout(180)

RECORDS = ["variable:a", "variable:b", "variable:sum", "channel:ramp:ramp", "channel:counter", "channel:enum",
           "channel:waveform", "channel:short", "channel:string", "channel:alarm", "channel:long",
           "bulk:000", f"bulk:{BULK - 1:03d}"]
PVA_ONLY = ["pva:table", "pva:image", "pva:struct", "pva:counter"]


@pytest.mark.parametrize("name", RECORDS + PVA_ONLY)
def test_get_every_demo_pv(pva, name):
    tree = pva.get(name, 5)
    assert "value" in tree or name == "pva:struct"  # a custom structure without a value field
    assert tree["alarm"] == {"severity": 0, "status": 0, "message": ""}
    assert tree["timeStamp"]["secondsPastEpoch"] > 1_600_000_000  # POSIX seconds, set by the server


def test_ntscalar_tree(pva):
    t = pva.get("variable:a", 5)
    assert isinstance(t["value"], float)
    assert t["display"]["units"] == "mm"
    assert t["display"]["precision"] == 3
    assert t["display"]["description"] == "Setpoint A"
    assert (t["display"]["limitLow"], t["display"]["limitHigh"]) == (-100.0, 100.0)
    assert (t["control"]["limitLow"], t["control"]["limitHigh"]) == (-100.0, 100.0)
    assert set(t["timeStamp"]) == {"secondsPastEpoch", "nanoseconds", "userTag"}
    assert {"lowAlarmLimit", "highAlarmLimit"} <= set(t["valueAlarm"])


def test_alarm_limits_reach_the_tree(pva):
    va = pva.get("channel:alarm", 5)["valueAlarm"]
    assert (va["lowAlarmLimit"], va["lowWarningLimit"], va["highWarningLimit"], va["highAlarmLimit"]) == \
        (5.0, 10.0, 80.0, 90.0)


def test_enum_tree(pva):
    v = pva.get("channel:enum", 5)["value"]
    assert v["choices"] == ["Off", "On", "Standby", "Fault"]
    assert isinstance(v["index"], int)


def test_table_tree(pva):
    t = pva.get("pva:table", 5)
    assert t["labels"] == ["name", "x", "n"]
    assert set(t["value"]) == {"name", "x", "n"}
    assert len(t["value"]["name"]) == len(t["value"]["x"]) == len(t["value"]["n"])


def test_ndarray_tree(pva):
    t = pva.get("pva:image", 5)
    assert list(t["value"]) == ["ushortValue"]  # union: {selected member: value}
    pixels = t["value"]["ushortValue"]
    assert pixels.dtype == np.uint16 and pixels.size == 256
    assert [d["size"] for d in t["dimension"]] == [16, 16]
    assert {a["name"] for a in t["attribute"]} >= {"ColorMode", "Exposure", "Camera"}
    assert t["codec"]["name"] == ""


def test_union_and_structure_array_tree(pva):
    t = pva.get("pva:struct", 5)
    assert isinstance(t["u"], dict) and len(t["u"]) == 1 and next(iter(t["u"])) in {"i", "s", "d"}
    assert t["items"][0] == {"key": "one", "weight": 1.0}
    assert t["a"]["inner"]["flag"] is True


def test_field_suffix_is_passed_through(pva):
    assert pva.get("variable:a.EGU", 5)["value"] == "mm"


def test_signed_short_array_stays_signed(pva):
    v = pva.get("channel:short", 5)["value"]
    assert v.dtype == np.int16
    assert v.tolist() == [-3, -2, -1, 0, 1, 2, 32767, -32768]


# -- puts ---------------------------------------------------------------------
def test_put_scalar(pva):
    old = pva.get("variable:b", 5)["value"]
    try:
        pva.put("variable:b", {"value": 12.5}, 5)
        assert pva.get("variable:b", 5)["value"] == 12.5
    finally:
        pva.put("variable:b", {"value": old}, 5)


def test_put_array(pva):
    old = pva.get("channel:waveform", 5)["value"].tolist()
    try:
        pva.put("channel:waveform", {"value": [1.0, 2.0, 3.0]}, 5)
        assert pva.get("channel:waveform", 5)["value"].tolist() == [1.0, 2.0, 3.0]
    finally:
        pva.put("channel:waveform", {"value": old}, 5)


def test_put_negative_shorts(pva):
    old = pva.get("channel:short", 5)["value"].tolist()
    try:
        pva.put("channel:short", {"value": [-7, 7, -32768]}, 5)
        assert pva.get("channel:short", 5)["value"].tolist() == [-7, 7, -32768]
    finally:
        pva.put("channel:short", {"value": old}, 5)


def test_put_string(pva):
    try:
        pva.put("channel:string", {"value": "written over pva"}, 5)
        assert pva.get("channel:string", 5)["value"] == "written over pva"
    finally:
        pva.put("channel:string", {"value": "hello k2eg"}, 5)


def test_put_enum_by_string_and_index(pva):
    try:
        pva.put("channel:enum", {"value": "Standby"}, 5)
        assert pva.get("channel:enum", 5)["value"]["index"] == 2
        pva.put("channel:enum", {"value": 1}, 5)
        assert pva.get("channel:enum", 5)["value"]["index"] == 1
    finally:
        pva.put("channel:enum", {"value": 0}, 5)


def test_put_table_columns(pva):
    pva.put("pva:table", {"value": {"name": ["p", "q"], "x": [9.5, -8.5], "n": [4, -5]}}, 5)
    v = pva.get("pva:table", 5)["value"]
    assert v["name"] == ["p", "q"]
    assert v["x"].tolist() == [9.5, -8.5]
    assert v["n"].tolist() == [4, -5]


def test_put_struct_subfield_and_union(pva):
    before = pva.get("pva:struct", 5)
    pva.put("pva:struct", {"a": {"b": 42}, "u": {"s": "chosen"}}, 5)
    after = pva.get("pva:struct", 5)
    assert after["a"]["b"] == 42
    assert after["a"]["c"] == before["a"]["c"]  # untouched sibling field
    assert after["u"] == {"s": "chosen"}


def test_put_reaches_alarm_severity(pva):
    try:
        pva.put("channel:alarm", {"value": 95.0}, 5)
        alarm = pva.get("channel:alarm", 5)["alarm"]
        assert (alarm["severity"], alarm["message"]) == (2, "HIHI")
    finally:
        pva.put("channel:alarm", {"value": 50.0}, 5)


@pytest.mark.parametrize("name, value, words", [
    ("variable:a", {"value": "not a number"}, ["variable:a", "value"]),
    ("channel:enum", {"value": "Nope"}, ["channel:enum", "Nope", "choices"]),
    ("pva:struct", {"no_such_field": 1}, ["pva:struct", "no_such_field"]),
    ("pva:struct", {"u": {"zz": 1}}, ["pva:struct", "zz"]),
    ("variable:a", 42, ["variable:a", "map"]),
])
def test_put_errors_name_the_pv_and_the_problem(pva, name, value, words):
    with pytest.raises(PVError) as err:
        pva.put(name, value, 5)
    assert err.value.code == ErrorCode.EPICS_FAILED
    for w in words:
        assert w in err.value.message


# -- unknown PVs ----------------------------------------------------------------
@pytest.mark.parametrize("op", ["get", "put", "info"])
def test_unknown_pv_times_out(pva, op):
    args = {"get": (), "put": ({"value": 1},), "info": ()}[op]
    with pytest.raises(PVError) as err:
        getattr(pva, op)("no:such:pv", *args, 1.0)
    assert err.value.code == ErrorCode.TIMEOUT
    assert "no:such:pv" in err.value.message


def test_info(pva):
    i = pva.info("variable:a", 5)
    assert i["protocol"] == "pva" and i["connected"] is True
    assert i["type"] == "epics:nt/NTScalar:1.0"
    assert i["structure"]["value"] == "double"
    assert i["structure"]["alarm"]["severity"] == "int32"
    s = pva.info("pva:struct", 5)["structure"]
    assert s["u"] == "union{i:int32,s:string,d:double[]}"
    assert s["items"] == [{"key": "string", "weight": "double"}]


# -- monitors --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["channel:counter", "pva:counter"])
def test_monitor_delivers_in_order(pva, recorder, name):
    rec = recorder()
    sub = pva.monitor(name, rec)
    try:
        assert rec.wait_count(20, timeout=20)  # ~2 s of updates at 10 Hz
    finally:
        sub.close()
    values = [e["value"] for e in rec.snapshot()]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert len(rec.threads) == 1  # one PV's updates never run concurrently


def test_monitor_first_event_is_current_value(pva, recorder):
    rec = recorder()
    sub = pva.monitor("variable:a", rec)  # never changes by itself
    try:
        assert rec.wait_count(1)
        assert rec.snapshot()[0]["value"] == pva.get("variable:a", 5)["value"]
        assert rec.snapshot()[0]["display"]["units"] == "mm"
    finally:
        sub.close()


def test_monitor_sees_puts(pva, recorder):
    rec = recorder()
    sub = pva.monitor("variable:b", rec)
    old = pva.get("variable:b", 5)["value"]
    try:
        assert rec.wait_count(1)
        pva.put("variable:b", {"value": -3.25}, 5)
        assert rec.wait_for(lambda ev: ev[-1]["value"] == -3.25)
        last = rec.snapshot()[-1]
        assert last["display"]["units"] == "mm"  # unchanged fields still in the tree
    finally:
        sub.close()
        pva.put("variable:b", {"value": old}, 5)


def test_monitor_image_updates(pva, recorder):
    rec = recorder()
    sub = pva.monitor("pva:image", rec)
    try:
        assert rec.wait_count(3, timeout=15)
    finally:
        sub.close()
    ids = [e["uniqueId"] for e in rec.snapshot()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(list(e["value"]) == ["ushortValue"] for e in rec.snapshot())


def test_monitor_many_pvs_each_deliver(pva, recorder):
    """The p4p race (first update before monitor() returns) must not silence any PV."""
    recs = {f"bulk:{i:03d}": recorder() for i in range(BULK)}
    subs = [pva.monitor(name, rec) for name, rec in recs.items()]
    try:
        silent = [name for name, rec in recs.items() if not rec.wait_count(2, timeout=15)]
    finally:
        for s in subs:
            s.close()
    assert silent == []


def test_monitor_close_stops_delivery(pva, recorder):
    rec = recorder()
    sub = pva.monitor("channel:counter", rec)
    assert rec.wait_count(2)
    sub.close()
    n = len(rec.snapshot())
    threading.Event().wait(0.5)
    assert len(rec.snapshot()) <= n + 1  # at most one update already being delivered


def test_concurrent_gets_share_the_context(pva):
    names = RECORDS + PVA_ONLY
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                pva.get(names[(k + i) % len(names)], 5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


class _Answers:
    """``done`` of ``get_async``: every call kept, with the thread it came from."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.cond = threading.Condition()

    def __call__(self, tree, error):
        with self.cond:
            self.calls.append((tree, error, threading.current_thread().name))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.calls) >= n, timeout)
            return list(self.calls)


def test_get_async_answers_once_from_another_thread_with_the_same_tree_as_get(pva):
    answers = _Answers()
    pva.get_async("variable:a", 5, answers)
    [(tree, error, thread)] = answers.wait(1)
    assert error is None and thread != threading.current_thread().name
    assert tree.keys() == pva.get("variable:a", 5).keys() and tree["display"]["units"] == "mm"
    threading.Event().wait(0.3)
    assert len(answers.calls) == 1  # the deadline, cancelled, never answers a second time


def test_get_async_of_a_missing_pv_answers_a_timeout_after_the_timeout(pva):
    answers = _Answers()
    pva.get_async("no:such:pv:async", 0.3, answers)
    assert answers.calls == []  # nothing yet: no thread waited, the call returned at once
    [(tree, error, thread)] = answers.wait(1, timeout=10)
    assert tree is None and isinstance(error, PVError) and error.code == ErrorCode.TIMEOUT
    assert "no:such:pv:async" in error.message and thread == "pva-get-deadlines"


def test_names_nothing_uses_are_forgotten_and_a_monitor_keeps_its_own(demo_ioc, recorder):
    with client_env(demo_ioc):
        provider = PVAProvider(idle_timeout=2.0)

    def open_missing() -> int:
        answers = _Answers()
        provider.get_async("no:such:pv:idle", 0.3, answers)
        answers.wait(1, timeout=10)
        with pytest.raises(PVError):
            provider.get("no:such:pv:idle2", 0.3)
        return 3

    try:
        check_idle_release(provider, recorder(), open_missing)
        assert "variable:a" not in provider._plans  # its conversion plan went with it
    finally:
        provider.close()


def test_many_get_async_at_once_are_each_answered_once(pva):
    answers = _Answers()
    names = (RECORDS + PVA_ONLY) * 20
    for name in names:
        pva.get_async(name, 5, answers)
    calls = answers.wait(len(names), timeout=60)
    threading.Event().wait(0.2)
    assert len(answers.calls) == len(names) and all(e is None for _, e, _ in calls)


# -- IOC restart -------------------------------------------------------------------
def test_ioc_restart_marks_disconnect_then_resumes(tmp_path, recorder):
    ioc = DemoIOC(tmp_path / "ioc").start()
    try:
        with client_env(ioc):
            provider = PVAProvider()
        try:
            recs = {name: recorder() for name in ("channel:counter", "pva:counter")}
            subs = [provider.monitor(name, rec) for name, rec in recs.items()]
            for rec in recs.values():
                assert rec.wait_count(2)
            ioc.stop()
            for name, rec in recs.items():
                assert rec.wait_for(lambda ev: ev[-1]["alarm"]["severity"] == 3, timeout=15), name
                gone = rec.snapshot()[-1]
                assert gone["alarm"]["message"] == "disconnected"
                assert gone["value"] == rec.snapshot()[-2]["value"]  # last known value kept
            with pytest.raises(PVError) as err:
                provider.get("channel:counter", 0.5)
            assert err.value.code == ErrorCode.TIMEOUT
            ioc.start()
            for name, rec in recs.items():
                n = len(rec.snapshot())
                assert rec.wait_for(lambda ev: len(ev) > n + 1 and ev[-1]["alarm"]["severity"] == 0, timeout=30), name
            assert provider.get("channel:counter", 10)["alarm"]["severity"] == 0
            for s in subs:
                s.close()
        finally:
            provider.close()
    finally:
        ioc.stop()
