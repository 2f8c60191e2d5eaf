"""CAProvider against a real demo IOC."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from k2eg.gateway.epics.base import PVError
from k2eg.gateway.epics.ca import CAProvider
from k2eg.protocol.errors import ErrorCode
from k2eg.stack.ioc import DemoIOC

from .conftest import BULK, check_idle_release, client_env

pytestmark = pytest.mark.timeout(180)

RECORDS = ["variable:a", "variable:b", "variable:sum", "channel:ramp:ramp", "channel:counter", "channel:enum",
           "channel:waveform", "channel:short", "channel:string", "channel:alarm", "channel:long",
           "bulk:000", f"bulk:{BULK - 1:03d}"]


@pytest.mark.parametrize("name", RECORDS)
def test_get_every_record(ca, name):
    tree = ca.get(name, 5)
    assert "value" in tree
    assert tree["alarm"] == {"severity": 0, "status": 0, "message": ""}
    assert tree["timeStamp"]["secondsPastEpoch"] > 1_600_000_000  # POSIX seconds, not EPICS epoch
    assert tree["display"]["description"]  # every demo record has a DESC


def test_scalar_tree_uses_ntscalar_names(ca):
    t = ca.get("variable:a", 5)
    assert isinstance(t["value"], float)
    assert t["display"] == {"limitLow": -100.0, "limitHigh": 100.0, "description": "Setpoint A", "units": "mm",
                            "precision": 3, "form": t["display"]["form"]}
    assert t["control"] == {"limitLow": -100.0, "limitHigh": 100.0, "minStep": 0.0}
    assert set(t["valueAlarm"]) == {"lowAlarmLimit", "lowWarningLimit", "highWarningLimit", "highAlarmLimit"}
    assert set(t["timeStamp"]) == {"secondsPastEpoch", "nanoseconds", "userTag"}


def test_alarm_limits(ca):
    va = ca.get("channel:alarm", 5)["valueAlarm"]
    assert (va["lowAlarmLimit"], va["lowWarningLimit"], va["highWarningLimit"], va["highAlarmLimit"]) == \
        (5.0, 10.0, 80.0, 90.0)


def test_enum_tree(ca):
    v = ca.get("channel:enum", 5)["value"]
    assert v["choices"] == ["Off", "On", "Standby", "Fault"]
    assert isinstance(v["index"], int)


def test_long_and_string_values(ca):
    assert isinstance(ca.get("channel:long", 5)["value"], int)
    assert isinstance(ca.get("channel:string", 5)["value"], str)


@pytest.mark.parametrize("name, expected", [
    ("variable:a.EGU", "mm"),
    ("variable:a.HOPR", 100.0),
    ("variable:a.DRVL", -100.0),
    ("variable:a.DESC", "Setpoint A"),
    ("channel:enum.ONST", "On"),
])
def test_field_names_are_channels(ca, name, expected):
    assert ca.get(name, 5)["value"] == expected


def test_signed_short_array_stays_signed(ca):
    v = ca.get("channel:short", 5)["value"]
    assert v.dtype == np.int16
    assert v.tolist() == [-3, -2, -1, 0, 1, 2, 32767, -32768]


def test_waveform_value(ca):
    v = ca.get("channel:waveform", 5)["value"]
    assert v.dtype == np.float64 and v.size == 16


def test_timestamps_agree_with_pva(demo_ioc, ca):
    from k2eg.gateway.epics.pva import PVAProvider

    with client_env(demo_ioc):
        pva = PVAProvider()
    try:
        assert ca.get("channel:long", 5)["timeStamp"] == pva.get("channel:long", 5)["timeStamp"]
    finally:
        pva.close()


# -- puts ---------------------------------------------------------------------
def test_put_scalar(ca):
    old = ca.get("variable:b", 5)["value"]
    try:
        ca.put("variable:b", {"value": 12.5}, 5)
        assert ca.get("variable:b", 5)["value"] == 12.5
        ca.put("variable:b", {"value": 7}, 5)  # an int into a double record
        assert ca.get("variable:b", 5)["value"] == 7.0
    finally:
        ca.put("variable:b", {"value": old}, 5)


def test_put_long(ca):
    try:
        ca.put("channel:long", {"value": -123456}, 5)
        assert ca.get("channel:long", 5)["value"] == -123456
    finally:
        ca.put("channel:long", {"value": 42}, 5)


def test_put_array(ca):
    old = ca.get("channel:waveform", 5)["value"].tolist()
    try:
        ca.put("channel:waveform", {"value": [1.0, 2.0, 3.0]}, 5)
        assert ca.get("channel:waveform", 5)["value"].tolist() == [1.0, 2.0, 3.0]
        ca.put("channel:waveform", {"value": np.arange(16, dtype=np.float32)}, 5)
        assert ca.get("channel:waveform", 5)["value"].tolist() == list(range(16))
    finally:
        ca.put("channel:waveform", {"value": old}, 5)


def test_put_negative_shorts(ca):
    old = ca.get("channel:short", 5)["value"].tolist()
    try:
        ca.put("channel:short", {"value": [-7, 7, -32768]}, 5)
        assert ca.get("channel:short", 5)["value"].tolist() == [-7, 7, -32768]
    finally:
        ca.put("channel:short", {"value": old}, 5)


def test_put_string(ca):
    try:
        ca.put("channel:string", {"value": "written over ca"}, 5)
        assert ca.get("channel:string", 5)["value"] == "written over ca"
    finally:
        ca.put("channel:string", {"value": "hello k2eg"}, 5)


def test_put_field(ca):
    try:
        ca.put("variable:a.EGU", {"value": "cm"}, 5)
        assert ca.get("variable:a.EGU", 5)["value"] == "cm"
    finally:
        ca.put("variable:a.EGU", {"value": "mm"}, 5)


def test_put_enum_by_string_and_index(ca):
    try:
        ca.put("channel:enum", {"value": "Standby"}, 5)
        assert ca.get("channel:enum", 5)["value"]["index"] == 2
        ca.put("channel:enum", {"value": 3}, 5)
        assert ca.get("channel:enum", 5)["value"]["index"] == 3
    finally:
        ca.put("channel:enum", {"value": "Off"}, 5)


def test_put_reaches_alarm_severity(ca):
    try:
        ca.put("channel:alarm", {"value": 95.0}, 5)
        assert ca.get("channel:alarm", 5)["alarm"] == {"severity": 2, "status": 3, "message": "HIHI"}
    finally:
        ca.put("channel:alarm", {"value": 50.0}, 5)


@pytest.mark.parametrize("name, value, words", [
    ("variable:a", {"value": "not a number"}, ["variable:a"]),
    ("channel:enum", {"value": "Nope"}, ["channel:enum", "Nope", "choices"]),
    ("variable:a", {"alarm": {"severity": 1}}, ["variable:a", "value"]),
    ("variable:a", {"value": 1, "alarm": {}}, ["variable:a", "alarm"]),
    ("channel:string", {"value": "x" * 60}, ["channel:string", "39"]),
    ("variable:a", {"value": {"nested": 1}}, ["variable:a", "map"]),
])
def test_put_errors_name_the_pv_and_the_problem(ca, name, value, words):
    with pytest.raises(PVError) as err:
        ca.put(name, value, 5)
    assert err.value.code == ErrorCode.EPICS_FAILED
    for w in words:
        assert w in err.value.message


# -- unknown PVs ----------------------------------------------------------------
@pytest.mark.parametrize("op", ["get", "put", "info"])
def test_unknown_pv_times_out(ca, op):
    args = {"get": (), "put": ({"value": 1},), "info": ()}[op]
    with pytest.raises(PVError) as err:
        getattr(ca, op)("no:such:pv", *args, 1.0)
    assert err.value.code == ErrorCode.TIMEOUT
    assert "no:such:pv" in err.value.message


def test_pva_only_pv_is_unknown_over_ca(ca):
    with pytest.raises(PVError) as err:
        ca.get("pva:table", 1.0)
    assert err.value.code == ErrorCode.TIMEOUT


def test_info(ca):
    i = ca.info("variable:a", 5)
    assert i["protocol"] == "ca" and i["connected"] is True
    assert i["type"] == "DBR_DOUBLE" and i["count"] == 1
    assert i["access"] == {"read": True, "write": True}
    assert i["structure"]["value"] == "double"
    assert i["structure"]["display"]["units"] == "string"
    assert ca.info("channel:short", 5)["structure"]["value"] == "int16[]"
    assert ca.info("channel:enum", 5)["structure"]["value"] == {"index": "uint16", "choices": "string[]"}


# -- monitors --------------------------------------------------------------------
def test_monitor_delivers_in_order(ca, recorder):
    rec = recorder()
    sub = ca.monitor("channel:counter", rec)
    try:
        assert rec.wait_count(20, timeout=20)  # ~2 s at 10 Hz
    finally:
        sub.close()
    values = [e["value"] for e in rec.snapshot()]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert all(e["display"]["description"] == "Counter, +1 every 0.1 s" for e in rec.snapshot())


def test_monitor_first_event_is_current_value(ca, recorder):
    rec = recorder()
    sub = ca.monitor("variable:a", rec)
    try:
        assert rec.wait_count(1)
        first = rec.snapshot()[0]
        assert first["value"] == ca.get("variable:a", 5)["value"]
        assert first["display"]["units"] == "mm"
    finally:
        sub.close()


def test_monitor_enum_and_array(ca, recorder):
    rec_enum, rec_short = recorder(), recorder()
    subs = [ca.monitor("channel:enum", rec_enum), ca.monitor("channel:short", rec_short)]
    try:
        assert rec_enum.wait_count(1) and rec_short.wait_count(1)
        assert rec_enum.snapshot()[0]["value"]["choices"] == ["Off", "On", "Standby", "Fault"]
        assert rec_short.snapshot()[0]["value"].dtype == np.int16
        ca.put("channel:enum", {"value": "On"}, 5)
        assert rec_enum.wait_for(lambda ev: ev[-1]["value"]["index"] == 1)
    finally:
        for s in subs:
            s.close()
        ca.put("channel:enum", {"value": "Off"}, 5)


def test_monitor_many_pvs_each_deliver(ca, recorder):
    recs = {f"bulk:{i:03d}": recorder() for i in range(BULK)}
    subs = [ca.monitor(name, rec) for name, rec in recs.items()]
    try:
        silent = [name for name, rec in recs.items() if not rec.wait_count(2, timeout=15)]
    finally:
        for s in subs:
            s.close()
    assert silent == []


def test_two_monitors_of_one_pv(ca, recorder):
    a, b = recorder(), recorder()
    sa = ca.monitor("channel:counter", a)
    sb = ca.monitor("channel:counter", b)
    try:
        assert a.wait_count(3) and b.wait_count(3)
        sa.close()
        n = len(a.snapshot())
        assert b.wait_count(len(b.snapshot()) + 3)  # the other one keeps going
        assert len(a.snapshot()) <= n + 1
    finally:
        sa.close()
        sb.close()


def test_monitor_close_from_its_own_callback(ca, recorder):
    rec = recorder()
    holder: dict = {}

    def once(tree):
        rec(tree)
        holder["sub"].close()

    holder["sub"] = ca.monitor("channel:counter", once)
    assert rec.wait_count(1)
    threading.Event().wait(0.5)
    assert len(rec.snapshot()) <= 2


def test_concurrent_gets_and_puts(ca):
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                ca.get(RECORDS[(k + i) % len(RECORDS)], 5)
                ca.put("variable:b", {"value": float(k)}, 5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    ca.put("variable:b", {"value": 2.5}, 5)


def test_provider_leaves_the_callers_ca_context_alone(demo_ioc):
    """A second provider has its own context; closing one does not disturb the other."""
    with client_env(demo_ioc):
        first = CAProvider()
        second = CAProvider()
    try:
        assert first.get("variable:a", 5)["value"] == second.get("variable:a", 5)["value"]
        first.close()
        assert second.get("channel:long", 5)["value"] == 42
    finally:
        first.close()
        second.close()


def test_channels_nothing_uses_are_cleared_and_a_monitor_keeps_its_own(demo_ioc, recorder):
    """A misspelled name searches no longer than the idle timeout; a monitored PV's channel stays."""
    with client_env(demo_ioc):
        provider = CAProvider(idle_timeout=2.0)

    def open_missing() -> int:
        with pytest.raises(PVError):
            provider.get("no:such:record", 0.5)
        return 2

    try:
        check_idle_release(provider, recorder(), open_missing)
    finally:
        provider.close()


# -- IOC restart -------------------------------------------------------------------
def test_ioc_restart_marks_disconnect_then_resumes(tmp_path, recorder):
    ioc = DemoIOC(tmp_path / "ioc").start()
    try:
        with client_env(ioc):
            provider = CAProvider()
        try:
            rec = recorder()
            sub = provider.monitor("channel:counter", rec)
            assert rec.wait_count(2)
            ioc.stop()
            assert rec.wait_for(lambda ev: ev[-1]["alarm"]["severity"] == 3, timeout=15)
            gone = rec.snapshot()[-1]
            assert gone["alarm"] == {"severity": 3, "status": 9, "message": "disconnected"}
            assert gone["value"] == rec.snapshot()[-2]["value"]  # last known value kept
            with pytest.raises(PVError) as err:
                provider.get("channel:counter", 0.5)
            assert err.value.code == ErrorCode.TIMEOUT
            ioc.start()
            n = len(rec.snapshot())
            # CA re-searches with back-off (no repeater here): allow it time.
            assert rec.wait_for(lambda ev: len(ev) > n + 1 and ev[-1]["alarm"]["severity"] == 0, timeout=60)
            after = rec.snapshot()[-1]
            assert after["display"]["description"] == "Counter, +1 every 0.1 s"
            assert provider.get("channel:counter", 30)["alarm"]["severity"] == 0
            sub.close()
        finally:
            provider.close()
    finally:
        ioc.stop()
