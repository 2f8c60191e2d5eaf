"""Real-time scheduling (issue 21): a gateway started as root runs no thread at a real-time policy
unless ``--epics-realtime true`` asks, and then its EPICS threads do run SCHED_FIFO.

Runs its own stack: it restarts the gateway with other options and restarts the IOC.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from k2eg.scheduling import CAP_SYS_NICE, realtime_threads, thread_policies

from .stacks import own_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _may_use_realtime() -> bool:
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff >> CAP_SYS_NICE & 1)


if not sys.platform.startswith("linux") or os.geteuid() != 0 or not _may_use_realtime():
    pytest.skip("needs Linux and root with CAP_SYS_NICE: only then does EPICS give its threads real-time priority",
                allow_module_level=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with own_stack(tmp_path_factory, "realtime") as s:
        yield s


def _gateway_reads_both_protocols(stack) -> None:
    """A CA and a PVA get through the gateway: its libca and pvxs threads exist from then on."""
    from k2eg.dml import dml

    with dml(stack.environment, "test-realtime") as k:
        deadline = time.monotonic() + 60
        for uri in ("pva://variable:a", "ca://variable:a"):
            while True:  # right after an IOC restart the first reads may fail until it is found again
                try:
                    k.get(uri, timeout=10)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    threads = thread_policies(pid)
    names = {name for name, _ in threads.values()}
    # Without these the checks below would pass on a gateway that never started EPICS.
    assert "PVXCTCP" in names and any(n.startswith("CAC-") for n in names), names
    return threads


def test_no_gateway_thread_runs_real_time_by_default_also_after_a_reconnect(stack):
    _gateway_reads_both_protocols(stack)
    before = _threads(stack.gateway_pid)
    assert realtime_threads(stack.gateway_pid) == []
    # Threads made later: the IOC restarts, libca opens a new circuit with new threads.
    stack.ioc.stop()
    stack.ioc.start()
    _gateway_reads_both_protocols(stack)
    after = _threads(stack.gateway_pid)
    new = {tid: name for tid, (name, _) in after.items() if tid not in before}
    assert any(name.startswith("CAC-TCP") for name in new.values()), new
    assert realtime_threads(stack.gateway_pid) == []


def test_the_stack_ioc_runs_at_normal_scheduling(stack):
    threads = thread_policies(stack.ioc.pid)
    assert len(threads) > 5  # scan, CA and PVA server threads
    assert realtime_threads(stack.ioc.pid) == []


def test_epics_realtime_gives_the_gateways_epics_threads_sched_fifo(stack):
    stack.stop_gateway()
    stack.gateway_args += ["--epics-realtime", "true"]
    try:
        stack.start_gateway()
        _gateway_reads_both_protocols(stack)
        threads = _threads(stack.gateway_pid)
        fifo = {name for name, policy in threads.values() if policy == os.SCHED_FIFO}
        assert "PVXCTCP" in fifo and any(n.startswith("CAC-") for n in fifo), threads
        assert threads[stack.gateway_pid][1] == os.SCHED_OTHER  # Python's main thread is not an EPICS thread
    finally:
        stack.stop_gateway()
        del stack.gateway_args[-2:]
        stack.start_gateway()


def test_a_gateway_without_the_privilege_says_it_cannot_have_real_time(stack, tmp_path):
    """Asked for real-time priority it may not use, the gateway starts anyway and says why it has none."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to start the gateway without CAP_SYS_NICE")
    cmd = ["setpriv", "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice", "--", *stack.gateway_command(),
           "--epics-realtime", "true", "--cmd-input-topic", "test-realtime-unprivileged",
           "--sub-group-id", "test-realtime-unprivileged"]  # its own group: the stack's gateway does not rebalance
    env = dict(os.environ, **stack.ioc.client_env())
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "k2eg gateway ready" in line:
                break
        text = "".join(lines)
        assert "real-time priority was asked for, but this process has neither CAP_SYS_NICE" in text, text
        assert realtime_threads(proc.pid) == []
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_drop_after_epics_started_says_it_came_too_late():
    """EPICS threads that already run SCHED_FIFO keep it: the drop names them instead of claiming success."""
    code = ("from p4p.client.thread import Context\n"
            "from k2eg.scheduling import epics_scheduling\n"
            "ctx = Context('pva')\n"
            "try:\n    ctx.get('test:realtime:none', timeout=0.2)\nexcept Exception:\n    pass\n"
            "print(epics_scheduling(False))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    env.update(EPICS_PVA_ADDR_LIST="127.0.0.1:1", EPICS_PVA_AUTO_ADDR_LIST="NO")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "real-time scheduling dropped too late: threads already at real-time priority: " in out.stdout
    assert "PVXCTCP" in out.stdout
