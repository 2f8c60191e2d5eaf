"""Client-side load, written against the 0.3.0 API so either client can run it.

Run as a file by our venv's python or by the published k2eg==0.3.0 venv's
python; it imports only ``k2eg.dml``. Prints one JSON line.

usage: client_worker.py get ENV APP PV_URI THREADS SECONDS
       client_worker.py monitor ENV APP PV_URI SECONDS   (prints "ready" once a marker event arrived,
                                                          then counts events whose value is >= 0)
       client_worker.py snapshot ENV APP PV_LIST_FILE WINDOW_MS RUNS   (our client only)
"""
import json
import os
import sys
import threading
import time
import traceback

from k2eg.dml import dml


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else None


def get(k, uri, threads, seconds):
    for _ in range(5):
        k.get(uri, 10)  # connect the gateway to the PV, warm every path
    lat, errors = [], []
    start = threading.Barrier(threads + 1)
    end = [0.0]

    def loop():
        mine = []
        start.wait()
        while time.monotonic() < end[0]:
            t = time.perf_counter()
            try:
                k.get(uri, 10)
                mine.append((time.perf_counter() - t) * 1000)
            except Exception as e:  # count and go on: a benchmark reports, it does not stop
                errors.append(type(e).__name__)
        lat.extend(mine)

    ts = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    end[0] = time.monotonic() + seconds
    t0 = time.monotonic()
    c0 = os.times()
    start.wait()
    for t in ts:
        t.join(seconds + 30)
    return get_result(lat, errors, t0, c0)


def get_result(lat, errors, t0, c0):
    """One get-load figure (also bench/aio_worker.py's): rate, latency percentiles, errors, CPU."""
    dt = time.monotonic() - t0
    cpu = os.times()
    return {"gets": len(lat), "seconds": dt, "gets_per_s": len(lat) / dt, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "client_cpu_s": cpu.user + cpu.system,
            "window_cpu_s": cpu.user + cpu.system - c0.user - c0.system}


def count_event(state):
    """One benchmark event (also bench/aio_worker.py's): count, first/last time, a sample every 2000."""
    now = time.time()
    state["n"] += 1
    if state["first"] is None:
        state["first"] = now
    state["last"] = now
    if state["n"] % 2000 == 0:
        state["samples"].append((now, state["n"]))


def monitor(k, uri, seconds):
    ready = threading.Event()
    lock = threading.Lock()
    state = {"n": 0, "first": None, "last": None, "samples": []}

    def handler(name, value):
        v = value.get("value") if isinstance(value, dict) else None
        if v is None:
            return
        if v < 0:
            ready.set()
            return
        if not ready.is_set():  # the gateway's own event, before the benchmark's
            return
        with lock:  # 0.3.0 runs handlers on a thread pool
            count_event(state)

    k.monitor(uri, handler, 30)
    if not ready.wait(60):
        raise SystemExit("no marker event within 60 s")
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # until the deadline, or 2 s without events once they flowed
        time.sleep(0.2)
        with lock:
            if state["last"] is not None and time.time() - state["last"] > 2:
                break
    cpu = os.times()
    with lock:
        return dict(state, client_cpu_s=cpu.user + cpu.system)


def snapshot(k, uris, window_ms, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        snap = k.snapshot_sync(uris, timeout=60, time_window_msec=window_ms)
        out.append({"ms": (time.perf_counter() - t) * 1000,
                    "pvs_with_value": sum(1 for key, v in snap.items()
                                              if key != "error" and v and isinstance(v[-1], dict) and "value" in v[-1])})
        time.sleep(1)
    return {"runs": out, "window_ms": window_ms, "pvs": len(uris)}


if __name__ == "__main__":
    mode, env, app, uri = sys.argv[1:5]
    k = dml(env, app)
    out, status = {}, 0
    try:
        if mode == "get":
            out = get(k, uri, int(sys.argv[5]), float(sys.argv[6]))
        elif mode == "monitor":
            out = monitor(k, uri, float(sys.argv[5]))
        else:
            out = snapshot(k, open(uri).read().split(), int(sys.argv[5]), int(sys.argv[6]))
    except BaseException:  # the runner shows stderr when the exit status is not 0
        traceback.print_exc()
        status = 1
    finally:
        print(json.dumps(out), flush=True)
        os._exit(status)  # 0.3.0's consumer thread is not a daemon and close() can hang
