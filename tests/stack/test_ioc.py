"""The demo IOC: starts, answers CA and PVA on its own ports, restarts on the same ports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from k2eg.stack.ioc import DemoIOC, bulk_names

pytestmark = pytest.mark.timeout(180)

RECORDS = ["variable:a", "variable:b", "variable:sum", "channel:ramp:ramp", "channel:counter", "channel:enum",
           "channel:waveform", "channel:short", "channel:string", "channel:alarm", "channel:long"]
PVA_ONLY = ["pva:table", "pva:image", "pva:struct", "pva:counter"]

# A separate client process, configured only by client_env(): what the gateway gets.
CA_CLIENT = """
import json, sys, epics
out = {}
for name in sys.argv[1:]:
    pv = epics.PV(name, form='time')
    v = pv.get(timeout=10, use_monitor=False)
    out[name] = {"value": v.tolist() if hasattr(v, "tolist") else v, "severity": pv.severity}
print(json.dumps(out))
"""


def _pva(ioc: DemoIOC):
    from p4p.client.thread import Context

    return Context("pva", conf=ioc.client_env(), useenv=False, nt=False)


def _ca_get(ioc: DemoIOC, *names: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env.update(ioc.client_env())
    out = subprocess.run([sys.executable, "-c", CA_CLIENT, *names], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    with DemoIOC(tmp_path_factory.mktemp("ioc"), bulk=5) as ioc:
        yield ioc


def test_client_env_points_at_loopback_ports(ioc):
    env = ioc.client_env()
    p = ioc.ports
    assert env["EPICS_CA_ADDR_LIST"] == f"127.0.0.1:{p.ca_server}"
    assert env["EPICS_CA_AUTO_ADDR_LIST"] == "NO"
    assert env["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"
    assert env["EPICS_PVA_ADDR_LIST"].split() == [f"127.0.0.1:{p.qsrv_broadcast}", f"127.0.0.1:{p.pva_broadcast}"]
    assert len({p.ca_server, p.ca_repeater, p.qsrv_server, p.qsrv_broadcast, p.pva_server, p.pva_broadcast}) == 6


def test_every_pv_answers_over_pva_without_alarm(ioc):
    ctx = _pva(ioc)
    try:
        for name in RECORDS + PVA_ONLY + bulk_names(5):
            v = ctx.get(name, timeout=5)
            assert v["alarm.severity"] == 0, name
    finally:
        ctx.close()


def test_records_answer_over_ca_from_another_process(ioc):
    got = _ca_get(ioc, "variable:a", "channel:short", "channel:string", "variable:a.EGU", "bulk:004")
    assert got["variable:a"] == {"value": 1.5, "severity": 0}
    assert got["channel:short"]["value"] == [-3, -2, -1, 0, 1, 2, 32767, -32768]
    assert got["channel:string"]["value"] == "hello k2eg"
    assert got["variable:a.EGU"]["value"] == "mm"
    assert got["bulk:004"]["severity"] == 0


def test_counters_count(ioc):
    ctx = _pva(ioc)
    try:
        first = {n: ctx.get(n, timeout=5)["value"] for n in ("channel:counter", "pva:counter", "bulk:000")}
        time.sleep(1.5)
        later = {n: ctx.get(n, timeout=5)["value"] for n in first}
    finally:
        ctx.close()
    assert all(later[n] > first[n] for n in first), (first, later)


def test_pva_server_accepts_puts(ioc):
    ctx = _pva(ioc)
    try:
        ctx.put("pva:struct", {"a.b": 5})
        assert ctx.get("pva:struct", timeout=5)["a.b"] == 5
    finally:
        ctx.close()


def test_bulk_names():
    assert bulk_names(3) == ["bulk:000", "bulk:001", "bulk:002"]
    assert bulk_names(1001)[-1] == "bulk:1000"
    assert bulk_names(0) == []


def test_restart_reuses_ports_and_serves_again(tmp_path):
    ioc = DemoIOC(tmp_path / "ioc")
    try:
        ioc.start()
        ports, env, pid = ioc.ports, ioc.client_env(), ioc.pid
        ioc.stop()
        assert not ioc.running
        with pytest.raises(ProcessLookupError):  # really gone, not just disowned
            os.kill(pid, 0)
        ioc.start()
        assert ioc.ports == ports and ioc.client_env() == env and ioc.pid != pid
        ctx = _pva(ioc)
        try:
            assert ctx.get("variable:a", timeout=5)["value"] == 1.5  # initial values again
            assert ctx.get("pva:counter", timeout=5)["alarm.severity"] == 0
        finally:
            ctx.close()
        assert _ca_get(ioc, "channel:long")["channel:long"]["value"] == 42
    finally:
        ioc.stop()
    assert not ioc.running


def test_two_iocs_coexist(tmp_path):
    with DemoIOC(tmp_path / "a") as a, DemoIOC(tmp_path / "b") as b:
        assert a.ports != b.ports
        ca, cb = _pva(a), _pva(b)
        try:
            ca.put("variable:a", 11.0)
            assert ca.get("variable:a", timeout=5)["value"] == 11.0
            assert cb.get("variable:a", timeout=5)["value"] == 1.5  # b is not a's shadow
        finally:
            ca.close()
            cb.close()


def test_start_failure_is_reported_with_the_log(tmp_path, monkeypatch):
    ioc = DemoIOC(tmp_path / "ioc")
    monkeypatch.setattr("k2eg.stack.ioc.DEMO_DB", tmp_path / "missing.db")
    with pytest.raises(RuntimeError) as err:
        ioc.start(timeout=30)
    assert "exited" in str(err.value)
    assert not ioc.running
