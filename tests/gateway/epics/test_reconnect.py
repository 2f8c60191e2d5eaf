"""Both providers across an IOC restart on the same ports: disconnect events, the reconnect probes, values again.

An IOC of its own (it is stopped and restarted), so the other modules' IOC is never disturbed.
"""
from __future__ import annotations

import time

import pytest

from .conftest import Recorder

INVALID = 3


@pytest.fixture(scope="module")
def ioc(demo_ioc):
    """The module's own demo IOC (conftest's fixture is per module): these tests stop and restart it."""
    return demo_ioc


@pytest.fixture(scope="module")
def providers(ca, pva):
    return {"ca": ca, "pva": pva}


def _since(rec: Recorder, n: int, predicate) -> int:
    return sum(1 for e in rec.snapshot()[n:] if predicate(e))


def _down(e) -> bool:
    return e["alarm"]["severity"] == INVALID and e["alarm"]["message"] == "disconnected"


def _live(e) -> bool:
    return e["alarm"]["severity"] != INVALID


def _wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_restart_brings_monitors_back(ioc, providers):
    ca, pva = providers["ca"], providers["pva"]
    recs = {"ca": Recorder(), "pva": Recorder()}
    subs = {p: providers[p].monitor("channel:counter", recs[p]) for p in recs}
    for p, rec in recs.items():
        assert rec.wait_for(lambda ev: any(_live(e) for e in ev), 20), p
    ch = ca._channels["channel:counter"]
    host, gen = ch.host, ch.gen
    assert host.endswith(f":{ioc.ports.ca_server}")

    mark = {p: len(r.snapshot()) for p, r in recs.items()}
    ioc.stop()
    for p, rec in recs.items():
        assert rec.wait_for(lambda ev: _since(rec, mark[p], _down) >= 1, 20), f"{p}: no disconnect event"
    # while the server is gone CA keeps a probe searching for it, PVA probes the lost PV
    assert _wait(lambda: host in ca._probes, 5)
    assert ch in ca._lost.get(host, ())
    assert pva._lost == {"channel:counter": 1}
    with pytest.raises(Exception, match="did not connect|connected but"):
        ca.get("channel:counter", 0.5)

    ioc.start()
    mark = {p: len(r.snapshot()) for p, r in recs.items()}
    for p, rec in recs.items():
        assert rec.wait_for(lambda ev: _since(rec, mark[p], _live) >= 5, 60), f"{p}: values did not come back"
    # CA came back on a renewed chid (gen + 1), or on its own if libca's search beat the probe; nothing is left pending
    assert ch.gen in (gen, gen + 1) and ch.chid is not None
    assert _wait(lambda: not ca._probes and not ca._lost.get(host), 5)
    assert not pva._lost
    assert ca.get("channel:counter", 5)["value"] > 0
    for sub in subs.values():  # closing after a renewal must not touch the dead evid
        sub.close()
    n = {p: len(r.snapshot()) for p, r in recs.items()}
    time.sleep(0.5)
    assert {p: len(r.snapshot()) for p, r in recs.items()} == n, "events after close"


@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_close_during_outage_and_resubscribe_after(ioc, providers, proto):
    """A subscription closed while its server is away is not waited for; a new one after the restart works."""
    provider = providers[proto]
    rec = Recorder()
    sub = provider.monitor("channel:ramp:ramp", rec)
    assert rec.wait_for(lambda ev: any(_live(e) for e in ev), 20)
    ioc.stop()
    assert rec.wait_for(lambda ev: any(_down(e) for e in ev), 20)
    sub.close()
    assert not (provider._lost.get("channel:ramp:ramp") if proto == "pva" else None)
    ioc.start()
    again = Recorder()
    sub2 = provider.monitor("channel:ramp:ramp", again)
    assert again.wait_for(lambda ev: sum(1 for e in ev if _live(e)) >= 2, 60)
    sub2.close()
    n = len(rec.snapshot())
    time.sleep(1.5)
    assert len(rec.snapshot()) == n, "a closed subscription got events after the restart"
