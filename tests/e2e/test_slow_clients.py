"""Slow, frozen and killed clients never slow the others or hurt the gateway (issue 7).

Clients are separate processes running our client (this file run as a script),
so one can be frozen with SIGSTOP or killed with SIGKILL mid-monitor. The live
client's evidence of "full rate" is not a speed: ``channel:counter`` counts +1
per update at 10 Hz, so the live client must see *every* value the PV took
while the other client was frozen, and the gateway's event count for the PV
must have grown by at least as much.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

COUNTER = "pva://channel:counter"
BULK = [f"ca://bulk:{i:03d}" for i in range(100)]  # topics only the frozen client reads
FROZEN_S = 8.0


class ClientProcess:
    """A k2eg client process monitoring ``uris``; collects what it reports (name -> values seen)."""

    def __init__(self, stack, uris: list[str]):
        env = {**os.environ, **stack.client_env(), "PYTHONUNBUFFERED": "1"}
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child must never block on it
        self.proc = subprocess.Popen([sys.executable, __file__, stack.environment, f"slow-{uuid.uuid4().hex[:8]}",
                                      *uris], stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.values: dict[str, list[float]] = {}
        self.ready = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("ready"):
                self.ready.set()
            elif line.startswith("{"):
                with self._lock:
                    for name, vals in json.loads(line).items():
                        self.values.setdefault(name, []).extend(vals)

    def seen(self, name: str) -> list[float]:
        with self._lock:
            return list(self.values.get(name, []))

    def wait_seen(self, name: str, predicate, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.seen(name)):
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]


@pytest.fixture
def clients(stack):
    made: list[ClientProcess] = []

    def make(uris: list[str]) -> ClientProcess:
        c = ClientProcess(stack, uris)
        made.append(c)
        assert c.ready.wait(90), f"client did not start: {c.stderr()}"
        return c

    yield make
    for c in made:
        c.stop()


def gateway_events(k, uri: str) -> int:
    return next(m["events"] for m in k.status()["monitors"] if m["pv"] == uri)


def assert_contiguous(values: list[float], lo: float, hi: float, who: str) -> None:
    missing = sorted(set(range(int(lo), int(hi) + 1)) - {int(v) for v in values})
    assert not missing, f"{who} missed {len(missing)} of {int(hi - lo) + 1} counter values, e.g. {missing[:10]}"


def test_frozen_client_does_not_slow_the_others(stack, k, clients):
    live = clients([COUNTER])
    frozen = clients([COUNTER, *BULK])
    name = COUNTER.split("://", 1)[1]
    for c in (live, frozen):
        assert c.wait_seen(name, lambda v: len(v) >= 5, 60), "no counter values before the freeze"
    assert frozen.wait_seen("bulk:099", bool, 60)

    v_before = k.get(COUNTER, 10)["value"]
    events_before = gateway_events(k, COUNTER)
    frozen.proc.send_signal(signal.SIGSTOP)
    lo = max(live.seen(name)) + 1
    time.sleep(FROZEN_S)
    hi = k.get(COUNTER, 10)["value"]  # what the PV reached while the other client was frozen
    assert hi - lo >= FROZEN_S * 5, f"the counter moved only {hi - lo} while frozen: is the IOC running?"
    assert live.wait_seen(name, lambda v: max(v) >= hi, 30), "the live client stopped receiving"
    assert_contiguous([v for v in live.seen(name) if lo <= v <= hi], lo, hi, "the live client")
    # The live client saw hi through the gateway, so the gateway counted at least up to hi; the
    # first sample may run up to ~1 s (10 values) behind the get before it.
    grown = gateway_events(k, COUNTER) - events_before
    assert grown >= hi - v_before - 10, f"the gateway's event count grew by {grown} while the PV moved {hi - v_before}"

    frozen.proc.send_signal(signal.SIGCONT)  # it catches up from Kafka: nothing was lost for it either
    assert frozen.wait_seen(name, lambda v: max(v) >= hi, 60), f"frozen client did not resume: {frozen.stderr()}"
    assert_contiguous([v for v in frozen.seen(name) if lo <= v <= hi], lo, hi, "the resumed client")


def test_killed_client_leaves_the_gateway_healthy(stack, k, clients):
    live = clients([COUNTER])
    doomed = clients([COUNTER, *BULK[:20]])
    name = COUNTER.split("://", 1)[1]
    assert doomed.wait_seen(name, lambda v: len(v) >= 3, 60)
    gateway = stack.gateway_pid
    doomed.proc.kill()  # SIGKILL mid-monitor: no close, no leave-group
    doomed.proc.wait(10)
    lo = max(live.seen(name)) + 1
    time.sleep(3)
    assert stack.gateway_pid == gateway, "the gateway died"
    hi = k.get(COUNTER, 10)["value"]
    assert live.wait_seen(name, lambda v: max(v) >= hi, 30)
    assert_contiguous([v for v in live.seen(name) if lo <= v <= hi], lo, hi, "the live client")
    status = k.status()
    bulk = {m["pv"]: m for m in status["monitors"] if m["pv"] in BULK[:20]}
    assert all(m["connected"] for m in bulk.values()) and len(bulk) == 20
    again = clients([BULK[0]])  # a new client on a topic the dead one read still gets values
    assert again.wait_seen("bulk:000", bool, 30)


@pytest.mark.soak
def test_soak_short(tmp_path):
    """bench/soak.py for 1 minute: every update of 500 PVs at 10 Hz arrives once (issue 7)."""
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "1"], cwd=root, capture_output=True,
                       text=True, timeout=900)
    print(p.stderr[-3000:])
    assert p.stdout.strip(), f"bench.soak exited {p.returncode} without a report: {p.stderr[-3000:]}"
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["offered"] >= 500 * 10 * 50, report
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["out_of_order"] == 0, report
    assert p.returncode == 0, p.stderr[-3000:]


def _client_main(env_name: str, app: str, uris: list[str]) -> None:
    """Child process: monitor ``uris``, print the values seen every 0.2 s as one JSON line."""
    from k2eg.dml import dml

    pending: dict[str, list] = {}
    lock = threading.Lock()

    def handler(name: str, value: dict) -> None:
        v = value.get("value") if isinstance(value, dict) else None
        if isinstance(v, (int, float)):
            with lock:
                pending.setdefault(name, []).append(v)

    with dml(env_name, app) as k:
        k.monitor_many(uris, handler, 60)
        print("ready", flush=True)
        while True:
            time.sleep(0.2)
            with lock:
                batch = dict(pending)
                pending.clear()
            if batch:
                print(json.dumps(batch), flush=True)


if __name__ == "__main__":
    _client_main(sys.argv[1], sys.argv[2], sys.argv[3:])
