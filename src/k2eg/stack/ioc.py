"""The demo IOC: real CA + PVA servers on private loopback ports.

A pythonSoftIOC process serves the records of ``demo.db`` over CA and over
PVA (QSRV); the same process runs a p4p server for the PVA-only structures
(``pva:*``, see ``pva_server.py``) on a second pair of PVA ports. One process
keeps start/stop simple for fault tests: stopping it drops every demo PV.

``iocInit`` works once per process, so the IOC always runs as a subprocess.
Ports are picked once per ``DemoIOC`` and reused on every restart, so clients
that keep their configuration reconnect to the restarted IOC.
"""
from __future__ import annotations

import argparse
import atexit
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from k2eg.stack.ports import free_ports

DEMO_DB = Path(__file__).with_name("demo.db")
READY_FILE = "ioc.ready"
LOG_FILE = "ioc.log"
BULK_PREFIX = "bulk:"

# Probed after start: one QSRV record and one p4p PV, so both PVA servers answer.
_PROBE_CA = "variable:a"
_PROBE_PVA = ("variable:a", "pva:counter")


@dataclass(frozen=True)
class IOCPorts:
    ca_server: int      # CA TCP + UDP name server
    ca_repeater: int
    qsrv_server: int    # PVA TCP of QSRV (records)
    qsrv_broadcast: int  # PVA UDP search port of QSRV
    pva_server: int     # PVA TCP of the p4p server (pva:* structures)
    pva_broadcast: int  # PVA UDP search port of the p4p server

    @classmethod
    def allocate(cls) -> "IOCPorts":
        """Six distinct loopback ports; the UDP ones are checked for UDP too."""
        for _ in range(20):
            ports = free_ports(6)
            if all(_udp_free(p) for p in ports):
                return cls(*ports)
        raise RuntimeError("could not find 6 free TCP+UDP ports on 127.0.0.1")


def _udp_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def loopback_server_env(ca_port: int, pvas_port: int, pvas_broadcast: int,
                        ca_repeater: int | None = None) -> dict[str, str]:
    """EPICS_* for an IOC process serving CA and PVA on these ports of 127.0.0.1 only (beacons included)."""
    env = {
        "EPICS_CA_SERVER_PORT": str(ca_port),
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_ADDR_LIST": f"127.0.0.1:{ca_port}",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVAS_SERVER_PORT": str(pvas_port),
        "EPICS_PVAS_BROADCAST_PORT": str(pvas_broadcast),
        "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_ADDR_LIST": "127.0.0.1",
        "EPICS_PVA_AUTO_ADDR_LIST": "NO",
        "EPICS_PVA_BROADCAST_PORT": str(pvas_broadcast),
    }
    if ca_repeater is not None:
        env["EPICS_CA_REPEATER_PORT"] = str(ca_repeater)
    return env


def bulk_names(bulk: int) -> list[str]:
    """``bulk:000`` ... zero-padded to at least 3 digits so names sort naturally."""
    width = max(3, len(str(max(bulk - 1, 0))))
    return [f"{BULK_PREFIX}{i:0{width}d}" for i in range(bulk)]


def _bulk_db(bulk: int) -> str:
    # Each record counts up once per second, starting at its own index so
    # snapshots can tell the PVs apart.
    return "".join(
        f'record(calc, "{name}") {{\n'
        f'    field(DESC, "Bulk counter {i}")\n'
        f'    field(SCAN, "1 second")\n'
        f'    field(INPA, "{name} NPP")\n'
        f'    field(CALC, "A+1")\n'
        f'    field(VAL,  "{i}")\n'
        f'    field(PINI, "YES")\n'
        f'}}\n'
        for i, name in enumerate(bulk_names(bulk))
    )


class DemoIOC:
    """A demo IOC subprocess; ``start()`` returns once its PVs answer."""

    def __init__(self, work_dir: Path, bulk: int = 0):
        self.work_dir = Path(work_dir)
        self.bulk = int(bulk)
        self.ports = IOCPorts.allocate()
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- environment -------------------------------------------------------
    def server_env(self) -> dict[str, str]:
        """What the IOC process itself needs: servers bound to loopback only."""
        p = self.ports
        return loopback_server_env(p.ca_server, p.qsrv_server, p.qsrv_broadcast, p.ca_repeater)

    def client_env(self) -> dict[str, str]:
        """EPICS_* a client process needs to find CA and both PVA servers."""
        p = self.ports
        return {
            "EPICS_CA_ADDR_LIST": f"127.0.0.1:{p.ca_server}",
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_SERVER_PORT": str(p.ca_server),
            "EPICS_CA_REPEATER_PORT": str(p.ca_repeater),
            "EPICS_PVA_ADDR_LIST": f"127.0.0.1:{p.qsrv_broadcast} 127.0.0.1:{p.pva_broadcast}",
            "EPICS_PVA_AUTO_ADDR_LIST": "NO",
            "EPICS_PVA_BROADCAST_PORT": str(p.qsrv_broadcast),
            "EPICS_PVA_SERVER_PORT": str(p.qsrv_server),
        }

    # -- lifecycle ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30) -> "DemoIOC":
        if self.running:
            return self
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ready = self.work_dir / READY_FILE
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "k2eg.stack.ioc",
               "--db", str(DEMO_DB),
               "--ready-file", str(ready),
               "--pva-port", str(self.ports.pva_server),
               "--pva-broadcast-port", str(self.ports.pva_broadcast),
               "--parent-pid", str(os.getpid())]
        if self.bulk > 0:
            bulk_db = self.work_dir / "bulk.db"
            bulk_db.write_text(_bulk_db(self.bulk))
            cmd += ["--db", str(bulk_db)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        env.update(self.server_env())
        self._log = open(self.work_dir / LOG_FILE, "ab")
        self._proc = subprocess.Popen(
            cmd, env=env, cwd=self.work_dir, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not ready.exists():
                if self._proc.poll() is not None:
                    raise RuntimeError(f"demo IOC exited with {self._proc.returncode} during start; "
                                       f"see {self.work_dir / LOG_FILE}:\n{self._tail_log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"demo IOC not ready within {timeout:g} s; see {self.work_dir / LOG_FILE}")
                time.sleep(0.02)
            self._probe(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _probe(self, deadline: float) -> None:
        """The ready file says the servers started; a search and a get say clients get answers."""
        while not _ca_search("127.0.0.1", self.ports.ca_server, _PROBE_CA, 0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo IOC does not answer CA searches on port {self.ports.ca_server}")
        from p4p.client.thread import Context
        ctx = Context("pva", conf=self.client_env(), useenv=False, nt=False)
        try:
            for name in _PROBE_PVA:
                try:
                    ctx.get(name, timeout=max(0.1, deadline - time.monotonic()))
                except Exception as e:
                    raise TimeoutError(f"demo IOC does not answer a PVA get of {name}: {e!r}") from e
        finally:
            ctx.close()

    def _tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.work_dir / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        (self.work_dir / READY_FILE).unlink(missing_ok=True)

    def kill(self) -> None:
        """Die like a crashed IOC: no clean shutdown of the servers."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def __enter__(self) -> "DemoIOC":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _ca_search(host: str, port: int, name: str, timeout: float) -> bool:
    """One UDP CA search (protocol 4.13): True when the server claims ``name``."""
    payload = name.encode() + b"\0"
    payload += b"\0" * (-len(payload) % 8)
    cid = 0x4B324547
    msg = struct.pack(">HHHHII", 0, 0, 0, 13, 0, 0)                                  # CA_PROTO_VERSION
    msg += struct.pack(">HHHHII", 6, len(payload), 10, 13, cid, cid) + payload         # CA_PROTO_SEARCH, DO_REPLY
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(msg, (host, port))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data, _ = s.recvfrom(4096)
            except (socket.timeout, ConnectionRefusedError):
                return False
            for off in range(0, len(data) - 15, 16):
                cmd, _, _, _, _, p2 = struct.unpack_from(">HHHHII", data, off)
                if cmd == 6 and p2 == cid:
                    return True
        return False
    finally:
        s.close()


# -- the IOC process ---------------------------------------------------------
def _exit_with_parent(parent: int) -> None:
    """The IOC runs in its own session (a Ctrl-C of the tests must not kill it
    mid-test); this keeps a crashed test run from leaving it behind."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _serve(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="k2eg.stack.ioc", description="demo IOC process (started by DemoIOC)")
    ap.add_argument("--db", action="append", required=True)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--pva-port", type=int, required=True)
    ap.add_argument("--pva-broadcast-port", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, default=0)
    args = ap.parse_args(argv)
    # It stands in for an IOC on a host of its own, here sharing the machine with Kafka and the
    # gateway: at SCHED_FIFO its threads would take CPU from them that a real IOC does not.
    from k2eg.scheduling import epics_scheduling
    print(epics_scheduling(realtime=False)[1], flush=True)
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()

    from softioc import asyncio_dispatcher, softioc

    from k2eg.stack.pva_server import DemoPVAServer, server_conf

    for db in args.db:
        softioc.dbLoadDatabase(db)
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    pva = DemoPVAServer(server_conf(args.pva_port, args.pva_broadcast_port))
    # non_interactive_ioc() runs atexit handlers before epicsExit: stop p4p first.
    atexit.register(pva.stop)
    Path(args.ready_file).write_text(str(os.getpid()))
    print("k2eg demo IOC ready", flush=True)
    softioc.non_interactive_ioc()


if __name__ == "__main__":
    _serve(sys.argv[1:])
