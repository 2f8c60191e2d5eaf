"""Client-side load through k2eg.aio, the asyncio twin of client_worker.py (same arguments, same JSON).

usage: aio_worker.py get ENV APP PV_URI TASKS SECONDS   (TASKS concurrent coroutines on one client)
       aio_worker.py monitor ENV APP PV_URI SECONDS [QUEUE_SIZE]   (prints "ready" once a marker
                                                    event arrived, then counts events whose value is >= 0)
"""
import asyncio
import json
import os
import sys
import time
import traceback

from client_worker import count_event, get_result  # run as a file: bench/ is on the path

from k2eg.aio import AsyncClient


async def get(k, uri, tasks, seconds):
    for _ in range(5):
        await k.get(uri, 10)  # connect the gateway to the PV, warm every path
    lat, errors = [], []
    go = asyncio.Event()
    end = [0.0]

    async def loop():
        await go.wait()
        while time.monotonic() < end[0]:
            t = time.perf_counter()
            try:
                await k.get(uri, 10)
                lat.append((time.perf_counter() - t) * 1000)
            except Exception as e:  # count and go on: a benchmark reports, it does not stop
                errors.append(type(e).__name__)

    workers = [asyncio.create_task(loop()) for _ in range(tasks)]
    await asyncio.sleep(0)
    end[0] = time.monotonic() + seconds
    t0 = time.monotonic()
    c0 = os.times()
    go.set()
    await asyncio.gather(*workers)
    return get_result(lat, errors, t0, c0)


async def monitor(k, uri, seconds, queue_size):
    state = {"n": 0, "first": None, "last": None, "samples": []}
    ready = False
    m = k.monitor(uri, 30, queue_size=queue_size)

    async def watchdog():  # until the deadline, or 2 s without events once they flowed
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(0.2)
            if state["last"] is not None and time.time() - state["last"] > 2:
                break
        m.close()

    dog = None
    async for _, value in m:
        v = value.get("value") if isinstance(value, dict) else None
        if v is None:
            continue
        if v < 0:
            if not ready:
                ready = True
                print("ready", flush=True)
                dog = asyncio.create_task(watchdog())
            continue
        if not ready:  # the gateway's own event, before the benchmark's
            continue
        count_event(state)
    if dog is not None:
        await dog
    cpu = os.times()
    return dict(state, client_cpu_s=cpu.user + cpu.system, dropped=m.dropped, queue_size=queue_size)


async def main(argv):
    mode, env, app, uri = argv[:4]
    async with AsyncClient(env, app) as k:
        if mode == "get":
            return await get(k, uri, int(argv[4]), float(argv[5]))
        return await monitor(k, uri, float(argv[4]), int(argv[5]) if len(argv) > 5 else 1000)


if __name__ == "__main__":
    out, status = {}, 0
    try:
        out = asyncio.run(main(sys.argv[1:]))
    except BaseException:  # the runner shows stderr when the exit status is not 0
        traceback.print_exc()
        status = 1
    finally:
        print(json.dumps(out), flush=True)
        os._exit(status)
