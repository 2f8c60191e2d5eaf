"""Flood sources, one process each, driven by words on stdin (``go``, ``stop``; EOF ends them).

``pva N SERVER_PORT BROADCAST_PORT``: a p4p server with N NTScalar double PVs
``flood:pva:<i>``; while running, one thread posts value+1 to each PV in
turn as fast as it can.

``ca N CA_PORT PVAS_PORT PVAS_BCAST``: a pythonSoftIOC with N calc records
``flood:ca:<i>`` that count up in a C-speed loop: each processing forward-
links to a gate whose CA output link puts the record's PROC again (a CA link
is asynchronous, so the loop is not recursion) while ``flood:run`` is 1.

Both print ``ready`` once serving, and on ``stop`` a JSON line with the
number of updates made per PV.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time

from k2eg.stack.ioc import loopback_server_env


def _control(go, stop, counts) -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        word = line.strip()
        if word == "go":
            go()
            print("going", flush=True)
        elif word == "stop":
            stop()
            print(json.dumps({"updates": counts()}), flush=True)
    os._exit(0)  # stdin closed: the orchestrator is done with us


def pva(n: int, port: int, bcast: int) -> None:
    from p4p.nt import NTScalar
    from p4p.server import Server
    from p4p.server.thread import SharedPV

    from k2eg.stack.pva_server import server_conf

    nt = NTScalar("d")
    names = [f"flood:pva:{i}" for i in range(n)]
    pvs = [SharedPV(nt=nt, initial=0.0) for _ in names]
    server = Server(providers=[dict(zip(names, pvs))], conf=server_conf(port, bcast), useenv=False)
    values = [0] * n
    running = threading.Event()

    def post_loop() -> None:
        while running.is_set():
            now = time.time()
            for i, pv in enumerate(pvs):
                values[i] += 1
                pv.post(float(values[i]), timestamp=now)

    thread: list[threading.Thread] = []

    def go() -> None:
        running.set()
        thread[:] = [threading.Thread(target=post_loop, daemon=True)]
        thread[0].start()

    def stop() -> None:
        running.clear()
        for t in thread:
            t.join()

    _control(go, stop, lambda: list(values))  # exits the process at EOF
    server.stop()  # not reached; keeps the Server referenced (a collected Server stops serving)


def ca_db(n: int) -> str:
    out = ['record(bo, "flood:run") {\n  field(ZNAM, "stop")\n  field(ONAM, "run")\n  field(PINI, "YES")\n}\n']
    for i in range(n):
        out.append(
            f'record(calc, "flood:ca:{i}") {{\n  field(INPA, "flood:ca:{i} NPP")\n  field(CALC, "A+1")\n'
            f'  field(FLNK, "flood:ca:{i}:gate")\n}}\n'
            f'record(calcout, "flood:ca:{i}:gate") {{\n  field(INPA, "flood:run NPP")\n  field(CALC, "A")\n'
            f'  field(OOPT, "When Non-zero")\n  field(OUT, "flood:ca:{i}.PROC CA")\n}}\n')
    return "".join(out)


def ca(n: int, ca_port: int, pvas_port: int, pvas_bcast: int, work_dir: str) -> None:
    os.environ.update(loopback_server_env(ca_port, pvas_port, pvas_bcast))
    from softioc import asyncio_dispatcher, imports, softioc

    db = os.path.join(work_dir, "flood-ca.db")
    with open(db, "w") as f:
        f.write(ca_db(n))
    softioc.dbLoadDatabase(db)
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
    dbf = imports.get_DBF_values()
    DBF_LONG, DBF_DOUBLE = dbf["DBF_LONG"], dbf["DBF_DOUBLE"]

    def put(name: str, value: int) -> None:
        buf = ctypes.c_int32(value)
        imports.db_put_field_process(name, DBF_LONG, ctypes.addressof(buf), 1, True)

    def get(name: str) -> float:
        buf = ctypes.c_double()
        imports.db_get_field(name, DBF_DOUBLE, ctypes.addressof(buf), 1)
        return buf.value

    start = [0.0] * n

    def go() -> None:
        start[:] = [get(f"flood:ca:{i}") for i in range(n)]
        put("flood:run", 1)
        for i in range(n):
            put(f"flood:ca:{i}.PROC", 1)

    def stop() -> None:
        put("flood:run", 0)
        time.sleep(0.2)

    threading.Thread(target=_control, args=(go, stop, lambda: [get(f"flood:ca:{i}") - start[i] for i in range(n)]),
                     daemon=True).start()
    softioc.non_interactive_ioc()


if __name__ == "__main__":
    # Flood sources stand in for IOCs on hosts of their own: normal scheduling, like the stack's IOC.
    from bench.util import epics_scheduling
    epics_scheduling(realtime=False)
    kind, *args = sys.argv[1:]
    if kind == "pva":
        pva(*map(int, args))
    else:
        ca(*map(int, args[:4]), args[4])
