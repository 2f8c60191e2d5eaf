"""A real bluesky RunEngine runs count and scan over k2eg signals, through the gateway and Kafka.

The demo IOC's sim:motor:setpoint forward-links sim:motor:readback and sim:detector
(1000 * exp(-(x - 1)^2 / 8) counts, MINOR alarm above 900), so every event can be
checked against the position the plan moved to.
"""
from __future__ import annotations

import math
import time

import pytest

pytest.importorskip("ophyd_async", reason="k2eg[bluesky] is not installed")

import bluesky.plan_stubs as bps  # noqa: E402
import bluesky.plans as bp  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky.run_engine import call_in_bluesky_event_loop  # noqa: E402
from ophyd_async.core import (AsyncStatus, StandardReadable, StandardReadableFormat, init_devices,  # noqa: E402
                              wait_for_value)

from k2eg import ophyd as k2eg_ophyd  # noqa: E402
from k2eg.ophyd import close_shared_clients, k2eg_signal_r, k2eg_signal_rw  # noqa: E402

pytestmark = pytest.mark.e2e


class Stage(StandardReadable):
    """A setpoint/readback pair: set() returns once the gateway confirmed the put and the
    readback's monitor (its own Kafka topic, so not ordered with the put's reply) caught up."""

    def __init__(self, environment: str, app_name: str, name: str = ""):
        self.setpoint = k2eg_signal_rw(float, "ca://sim:motor:setpoint", environment=environment,
                                       app_name=app_name)
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.readback = k2eg_signal_r(float, "pva://sim:motor:readback", environment=environment,
                                          app_name=app_name)
        super().__init__(name=name)

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        await self.setpoint.set(value)
        await wait_for_value(self.readback, lambda v: abs(v - value) < 1e-9, timeout=10)


class Detector(StandardReadable):
    """Read with a get at each point (uncached): the put that moved the stage completed once the
    IOC processed the detector, so a get sees the new value; a monitor may still be on its way."""

    def __init__(self, environment: str, app_name: str, name: str = ""):
        with self.add_children_as_readables(StandardReadableFormat.HINTED_UNCACHED_SIGNAL):
            self.counts = k2eg_signal_r(float, "pva://sim:detector", environment=environment, app_name=app_name)
        super().__init__(name=name)


def peak(x: float) -> float:
    return 1000 * math.exp(-(x - 1) ** 2 / 8)


@pytest.fixture
def run_engine(stack):
    RE = RunEngine({})
    yield RE
    call_in_bluesky_event_loop(close_shared_clients())
    assert len(k2eg_ophyd._clients) == 0


def documents(RE, plan) -> dict[str, list]:
    docs: dict[str, list] = {}
    token = RE.subscribe(lambda name, doc: docs.setdefault(name, []).append(doc))
    try:
        RE(plan)
    finally:
        RE.unsubscribe(token)
    return docs


def test_count_and_scan_over_k2eg_signals(stack, app_name, run_engine):
    RE = run_engine
    with init_devices():
        stage = Stage(stack.environment, app_name)
        det = Detector(stack.environment, app_name)
    assert stage.name == "stage" and det.name == "det"

    t0 = time.time()
    RE(bps.mv(stage, 0.0))
    counted = documents(RE, bp.count([det], num=3))
    assert counted["stop"][0]["exit_status"] == "success"
    (descriptor,) = counted["descriptor"]
    key = descriptor["data_keys"]["det-counts"]
    assert key["source"] == "pva://sim:detector" and key["dtype"] == "number" and key["shape"] == []
    assert key["units"] == "counts" and key["precision"] == 2
    assert key["limits"]["display"] == {"low": 0.0, "high": 1000.0}
    events = counted["event"]
    assert [e["seq_num"] for e in events] == [1, 2, 3]
    assert all(e["data"]["det-counts"] == pytest.approx(peak(0.0)) for e in events)
    # The EPICS timestamp of the detector's last processing (the mv above), not the read time.
    stamps = {e["timestamps"]["det-counts"] for e in events}
    assert len(stamps) == 1 and t0 - 1 <= stamps.pop() <= time.time()

    points = [-2.0, -0.5, 1.0, 2.5, 4.0]
    scanned = documents(RE, bp.scan([det], stage, points[0], points[-1], len(points)))
    assert scanned["stop"][0]["exit_status"] == "success"
    assert list(scanned["start"][0]["motors"]) == ["stage"]
    (descriptor,) = scanned["descriptor"]
    keys = descriptor["data_keys"]
    assert keys["stage-readback"]["source"] == "pva://sim:motor:readback"
    assert keys["stage-readback"]["units"] == "mm" and keys["stage-readback"]["precision"] == 3
    assert keys["stage-readback"]["limits"]["display"] == {"low": -10.0, "high": 10.0}
    assert keys["det-counts"]["units"] == "counts"
    events = scanned["event"]
    assert [e["data"]["stage-readback"] for e in events] == pytest.approx(points)
    assert [e["data"]["det-counts"] for e in events] == pytest.approx([peak(x) for x in points])
    times = [e["timestamps"]["stage-readback"] for e in events]
    assert times == sorted(times) and len(set(times)) == len(points)  # one IOC processing per point
    for e in events:  # readback and detector processed in one chain: the same EPICS instant
        assert e["timestamps"]["det-counts"] == pytest.approx(e["timestamps"]["stage-readback"], abs=0.05)
    RE(bps.mv(stage, 0.0))
