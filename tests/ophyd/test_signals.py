"""k2eg.ophyd signals against the real stack: read, describe, set, subscribe, trigger, and their errors."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("ophyd_async", reason="k2eg[bluesky] is not installed")

from ophyd_async.core import Array1D, NotConnectedError, StrictEnum, SubsetEnum, observe_value  # noqa: E402

from k2eg.aio import AsyncClient  # noqa: E402
from k2eg.ophyd import k2eg_signal_r, k2eg_signal_rw, k2eg_signal_x  # noqa: E402

pytestmark = pytest.mark.e2e

T = 20


class Mode(StrictEnum):
    OFF = "Off"
    ON = "On"
    STANDBY = "Standby"
    FAULT = "Fault"


def run(stack, app_name, body, bound: float = 120):
    """``body(client)`` on a client opened in a fresh loop."""

    async def main():
        async with AsyncClient(stack.environment, app_name) as client:
            return await body(client)

    return asyncio.run(asyncio.wait_for(main(), bound))


def stamp(tree: dict) -> float:
    return tree["timeStamp"]["secondsPastEpoch"] + tree["timeStamp"]["nanoseconds"] * 1e-9


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_read_carries_the_epics_timestamp_and_describe_the_pv_metadata(stack, app_name, k, proto):
    uri = f"{proto}://channel:alarm"

    async def body(client):
        sig = k2eg_signal_r(float, uri, "temp", client=client)
        await sig.connect(timeout=T)
        return await sig.read(), await sig.describe()

    reading, described = run(stack, app_name, body)
    tree = k.get(uri, T)
    assert reading["temp"] == {"value": tree["value"], "timestamp": pytest.approx(stamp(tree), abs=1e-6),
                               "alarm_severity": 0}
    key = described["temp"]
    assert key["source"] == uri and key["dtype"] == "number" and key["shape"] == []
    assert key["units"] == "degC" and key["precision"] == 1
    assert key["limits"]["control"] == {"low": -1000.0, "high": 1000.0}
    assert key["limits"]["display"] == {"low": 0.0, "high": 100.0}
    assert key["limits"]["alarm"] == {"low": 5.0, "high": 90.0}
    assert key["limits"]["warning"] == {"low": 10.0, "high": 80.0}


def test_datatypes_int_str_array_and_inferred(stack, app_name, k):
    async def body(client):
        long = k2eg_signal_r(int, "pva://channel:long", "long", client=client)
        text = k2eg_signal_r(str, "ca://channel:string", "text", client=client)
        wave = k2eg_signal_r(Array1D[np.float64], "ca://channel:waveform", "wave", client=client)
        short = k2eg_signal_r(Array1D[np.int16], "pva://channel:short", "short", client=client)
        guess = k2eg_signal_r(None, "pva://variable:a", "guess", client=client)
        for s in (long, text, wave, short, guess):
            await s.connect(timeout=T)
        return ([await s.get_value() for s in (long, text, wave, short, guess)],
                await wave.describe(), await text.describe(), await long.describe())

    (long, text, wave, short, guess), wave_key, text_key, long_key = run(stack, app_name, body)
    assert long == k.get("pva://channel:long", T)["value"] and isinstance(long, int)
    assert text == "hello k2eg"
    assert wave.dtype == np.float64 and wave.tolist() == [i + 0.5 for i in range(16)]
    assert short.dtype == np.int16 and short.tolist() == [-3, -2, -1, 0, 1, 2, 32767, -32768]
    assert isinstance(guess, float)
    assert wave_key["wave"]["shape"] == [16] and wave_key["wave"]["dtype"] == "array"
    assert wave_key["wave"]["units"] == "V" and wave_key["wave"]["precision"] == 2
    assert "units" not in text_key["text"] and text_key["text"]["dtype"] == "string"
    assert long_key["long"]["units"] == "counts" and "precision" not in long_key["long"]


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_enum_read_set_and_choices(stack, app_name, k, proto):
    uri = f"{proto}://channel:enum"

    async def body(client):
        mode = k2eg_signal_rw(Mode, uri, name="mode", client=client)
        text = k2eg_signal_r(str, uri, "text", client=client)
        await mode.connect(timeout=T)
        await text.connect(timeout=T)
        first = await mode.get_value()
        await mode.set(Mode.STANDBY)
        after = await mode.get_value(), await text.get_value()
        described = (await mode.describe())["mode"]
        await mode.set(first)
        return first, after, described

    first, after, described = run(stack, app_name, body)
    assert first is Mode.OFF and after == (Mode.STANDBY, "Standby")
    assert described["choices"] == ["Off", "On", "Standby", "Fault"] and described["dtype"] == "string"
    assert k.get(uri, T)["value"]["index"] == 0


def test_set_waits_for_the_put_and_get_setpoint(stack, app_name):
    """The setpoint's forward link processes readback and detector before the put completes."""

    async def body(client):
        motor = k2eg_signal_rw(float, "pva://sim:motor:readback", "ca://sim:motor:setpoint", "m", client=client)
        det = k2eg_signal_r(float, "pva://sim:detector", "det", client=client)
        await motor.connect(timeout=T)
        await det.connect(timeout=T)
        out = []
        for target in (1.0, 3.0):
            await motor.set(target)
            where = await motor.locate()
            out.append((where["readback"], where["setpoint"], await det.read()))
        await motor.set(0.0)
        return out

    (at1, sp1, r1), (at3, sp3, r3) = run(stack, app_name, body)
    assert at1 == sp1 == 1.0 and at3 == sp3 == 3.0
    assert r1["det"]["value"] == pytest.approx(1000.0) and r1["det"]["alarm_severity"] == 1  # HIGH: MINOR
    assert r3["det"]["value"] == pytest.approx(1000 * np.exp(-0.5)) and r3["det"]["alarm_severity"] == 0


def test_subscribe_gives_the_current_value_then_updates(stack, app_name):
    async def body(client):
        sp = k2eg_signal_rw(float, "pva://sim:motor:setpoint", name="sp", client=client)
        rb = k2eg_signal_r(float, "ca://sim:motor:readback", "rb", client=client)
        await sp.connect(timeout=T)
        await rb.connect(timeout=T)
        initial = await rb.get_value()
        readings = []
        rb.subscribe_reading(readings.append)
        seen = []
        async for value in observe_value(rb, timeout=T):
            seen.append(value)
            if len(seen) == 1:
                await sp.set(initial + 2.5)
            elif value == initial + 2.5:
                break
        await sp.set(initial)
        rb.clear_sub(readings.append)
        return initial, seen, readings

    initial, seen, readings = run(stack, app_name, body)
    assert seen[0] == initial and seen[-1] == initial + 2.5
    assert readings[0]["rb"]["value"] == initial and any(r["rb"]["value"] == initial + 2.5 for r in readings)
    assert all(r["rb"]["timestamp"] > 1.6e9 for r in readings)


def test_signal_x_writes_back_the_value_it_connected_with(stack, app_name, k):
    k.put("pva://channel:long", 7, T)
    try:
        async def body(client):
            x = k2eg_signal_x("pva://channel:long", "x", client=client)
            await x.connect(timeout=T)
            await client.put("pva://channel:long", 99, T)
            await x.trigger()
            return (await client.get("pva://channel:long", T))["value"]

        assert run(stack, app_name, body) == 7
    finally:
        k.put("pva://channel:long", 42, T)


def test_connect_errors_name_the_pv(stack, app_name):
    class Wrong(SubsetEnum):
        NOPE = "Nope"

    async def body(client):
        outcomes = []
        for sig in (k2eg_signal_r(float, "pva://no:such:pv", client=client),
                    k2eg_signal_r(str, "pva://variable:a", client=client),
                    k2eg_signal_r(Wrong, "pva://channel:enum", client=client)):
            try:
                await sig.connect(timeout=T)
            except Exception as e:
                outcomes.append(e)
        return outcomes

    missing, wrong_type, wrong_choices = run(stack, app_name, body)
    assert isinstance(missing, NotConnectedError) and "no:such:pv" in str(missing)
    assert "variable:a" in str(wrong_type) and "float" in str(wrong_type)
    assert "channel:enum" in str(wrong_choices) and "Nope" in str(wrong_choices)


def test_a_signal_needs_a_client_or_environment_and_app_name():
    with pytest.raises(ValueError, match="environment= and app_name="):
        k2eg_signal_r(float, "pva://variable:a")
    with pytest.raises(ValueError):
        k2eg_signal_r(float, "variable:a", environment="local", app_name="x")
