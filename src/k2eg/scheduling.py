"""Normal scheduling for a process's EPICS threads unless it asks for real-time priority.

Why: EPICS libCom (posix ``osdThread.c``) creates every thread of its own (libca's ``CAC-*``,
pvxs' ``PVXCTCP``/``PVXUDP``, ``timerQueue``, ``taskwd``, an IOC's scan and server threads) with
SCHED_FIFO whenever the process may use it: root with CAP_SYS_NICE, or any user whose
RLIMIT_RTPRIO is above 0. libCom decides once, when it initialises: a probe thread tries
SCHED_FIFO on itself, and if that fails every later epicsThread inherits its creator's normal
policy; if the probe succeeded, a thread whose ``pthread_create`` then fails with EPERM is
created again without SCHED_FIFO. In a gateway those threads run the Python callbacks of every
EPICS update, so as root they starve the normal threads that publish to Kafka (librdkafka, the
broker on the same machine): issue 21 measured 40 % of the PVA flood throughput lost.

How: :func:`drop_realtime`, called on the main thread before any other thread exists and before
an EPICS library initialises, removes CAP_SYS_NICE from the calling thread (effective, permitted
and inheritable sets; the kernel then clears it from the ambient set) and from its bounding set,
and sets RLIMIT_RTPRIO to 0 (sched(7): the limit lets a process without CAP_SYS_NICE use
SCHED_FIFO up to that priority). Linux keeps capabilities per thread and a new thread copies its
creator's, so every thread made afterwards, libca/pvxs threads made on a reconnect included,
lacks it; the bounding set keeps an exec'ed child from getting it back as root; the limit holds
for the whole process and its children. Nothing else in a gateway needs CAP_SYS_NICE. ctypes
calls libc's ``capset``/``prctl``: no dependency for two system calls.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys
import threading

CAP_SETPCAP, CAP_SYS_NICE = 8, 23
_LINUX = sys.platform.startswith("linux")
_CAP_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24
REALTIME_POLICIES = frozenset({os.SCHED_FIFO, os.SCHED_RR} if hasattr(os, "SCHED_FIFO") else ())


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _caps(status: str, field: str) -> int:
    """A capability mask (``CapEff``, ``CapBnd``, ...) from a /proc .../status text."""
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    return 0


def _thread_status(tid: int | None = None) -> str:
    path = "/proc/thread-self/status" if tid is None else f"/proc/self/task/{tid}/status"
    with open(path) as f:
        return f.read()


def realtime_possible() -> bool:
    """Whether the calling thread could give a thread it creates SCHED_FIFO (what libCom probes)."""
    if not _LINUX:
        return False
    if _caps(_thread_status(), "CapEff") >> CAP_SYS_NICE & 1:
        return True
    return resource.getrlimit(resource.RLIMIT_RTPRIO)[0] > 0


def drop_realtime() -> list[str]:
    """Take real-time scheduling away from the calling thread, the threads it creates and its children.

    Returns what it changed (empty: nothing to change). Raises OSError when the kernel refuses.
    """
    if not _LINUX:
        return []
    done = []
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    status = _thread_status()
    bit = 1 << CAP_SYS_NICE
    if _caps(status, "CapBnd") & bit:
        # Needs CAP_SETPCAP, which root has; without it an exec'ed child can only gain
        # CAP_SYS_NICE from a file capability, which our children do not have.
        if _caps(status, "CapEff") >> CAP_SETPCAP & 1:
            if libc.prctl(_PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_SYS_NICE)")
            done.append("bounding set")
    head, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(head), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    if (data[0].effective | data[0].permitted | data[0].inheritable) & bit:
        for field in ("effective", "permitted", "inheritable"):
            setattr(data[0], field, getattr(data[0], field) & ~bit)
        if libc.capset(ctypes.byref(head), data) != 0:
            raise OSError(ctypes.get_errno(), "capset")
        done.append("CAP_SYS_NICE")
    soft, hard = resource.getrlimit(resource.RLIMIT_RTPRIO)
    if soft or hard:
        resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
        done.append("RLIMIT_RTPRIO")
    return done


def python_threads_holding_realtime() -> list[str]:
    """Other Python threads that could still create SCHED_FIFO threads (started before the drop).

    Only Python threads count: libCom's first user and the creators of libca/pvxs contexts are
    Python threads or EPICS threads they made; native pools (OpenBLAS, started by importing numpy)
    keep CAP_SYS_NICE but never create EPICS threads.
    """
    me, out = threading.get_native_id(), []
    for t in threading.enumerate():
        if t.native_id in (None, me):
            continue
        try:
            if _caps(_thread_status(t.native_id), "CapEff") >> CAP_SYS_NICE & 1:
                out.append(t.name)
        except OSError:  # the thread ended meanwhile
            pass
    return out


def epics_scheduling(realtime: bool = False) -> tuple[int, str]:
    """The one call a process running EPICS makes first: a log level and a sentence saying what holds.

    ``realtime`` False (the default of every k2eg process): drop real-time scheduling, see the
    module's docstring. True: leave the process as it is; EPICS threads get SCHED_FIFO if it may.
    Never raises: a refusal is reported, the process goes on.
    """
    if not _LINUX:
        return logging.DEBUG, "EPICS threads run as the operating system schedules them (not Linux)"
    if realtime:
        if realtime_possible():
            return logging.INFO, "EPICS threads run at real-time priority (SCHED_FIFO), as asked"
        return logging.WARNING, ("real-time priority was asked for, but this process has neither CAP_SYS_NICE nor "
                                 "an RLIMIT_RTPRIO above 0: EPICS threads run at normal scheduling")
    try:
        done = drop_realtime()
    except (OSError, ValueError) as e:
        return logging.WARNING, (f"could not drop real-time scheduling ({e}): EPICS threads may run SCHED_FIFO "
                                 "and starve the Kafka threads")
    early = python_threads_holding_realtime() if done else []
    running = realtime_threads(os.getpid())
    if early or running:
        return logging.WARNING, ("real-time scheduling dropped too late: "
                                 + "; ".join(filter(None, [
                                     running and f"threads already at real-time priority: {', '.join(running)}",
                                     early and f"threads started earlier keep CAP_SYS_NICE: {', '.join(early)}"]))
                                 + " (drop before EPICS starts and before any other thread)")
    if done:
        return logging.INFO, f"EPICS threads run at normal scheduling (dropped {', '.join(done)})"
    return logging.DEBUG, "EPICS threads run at normal scheduling (no real-time privilege to drop)"


def thread_policies(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (thread name, scheduling policy) of every thread of process ``pid`` (os.SCHED_*)."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            out[tid] = (comm, os.sched_getscheduler(tid))
        except (OSError, ProcessLookupError):  # the thread ended meanwhile
            pass
    return out


def realtime_threads(pid: int) -> list[str]:
    """Names of the threads of process ``pid`` that run at a real-time policy (SCHED_FIFO, SCHED_RR)."""
    return sorted({name for name, policy in thread_policies(pid).values() if policy in REALTIME_POLICIES})
