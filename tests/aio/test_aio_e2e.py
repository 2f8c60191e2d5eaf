"""k2eg.aio against the real stack: every operation, errors, concurrency, cancellation, two clients.

Plain ``asyncio.run`` per test (no plugin); ``T`` only bounds hangs.
"""
from __future__ import annotations

import asyncio
import uuid

import pytest

from k2eg.aio import AsyncClient
from k2eg.broker import SnapshotProperties
from k2eg.client.errors import ClientClosed
from k2eg.dml import OperationError, OperationTimeout

pytestmark = pytest.mark.e2e

T = 20


def run(coro, bound: float = 120):
    return asyncio.run(asyncio.wait_for(coro, bound))


def client(stack, app_name: str, **kw) -> AsyncClient:
    return AsyncClient(stack.environment, app_name, **kw)


async def until(predicate, what: str, timeout: float = T) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------- request / reply

@pytest.mark.parametrize("proto", ["ca", "pva"])
def test_get_put_info_as_dml_does(stack, app_name, k, proto):
    uri = f"{proto}://variable:b"
    before = k.get(uri, T)["value"]

    async def main():
        async with client(stack, app_name) as a:
            got = await a.get(uri, T)
            reply = await a.put(uri, before + 1, T)
            after = await a.get(uri, T)
            info = await a.info(uri, T)
            await a.put(uri, before, T)
            return got, reply, after, info

    got, reply, after, info = run(main())
    assert got["value"] == before and got["display"]["units"] == "mm"
    assert set(got["timeStamp"]) >= {"secondsPastEpoch", "nanoseconds"}
    assert reply["error"] == 0 and after["value"] == before + 1
    assert info == k.info(uri, T)
    assert k.get(uri, T)["value"] == before


def test_status(stack, app_name):
    async def main():
        async with client(stack, app_name) as a:
            return await a.status(T)

    status = run(main())
    assert "gateway" in status and "monitors" in status


def test_errors_are_dmls(stack, app_name):
    async def main():
        async with client(stack, app_name) as a:
            with pytest.raises(OperationError) as unknown:
                await a.get("pva://no:such:pv", T)
            with pytest.raises(OperationTimeout, match="no:such:pv"):
                await a.get("ca://no:such:pv", 0.2)   # the gateway answers after 2 s
            for bad in ("variable:a", "http://variable:a", "pva://bad name"):
                with pytest.raises(ValueError):
                    await a.get(bad, T)
            with pytest.raises(ValueError, match="cannot put None"):
                await a.put("pva://variable:a", None)
            with pytest.raises(ValueError, match="snapshot name"):
                await a.snapshot_trigger("bad name!")
            assert (await a.get("pva://variable:a", T))["value"] is not None  # the late reply was harmless
            return unknown.value

    e = run(main())
    assert e.error != 0 and "no:such:pv" in e.args[0]


def test_a_client_must_be_opened_and_the_app_name_is_checked(stack, app_name):
    with pytest.raises(ValueError, match="app name"):
        AsyncClient(stack.environment, "bad name")

    async def main():
        a = client(stack, app_name)
        with pytest.raises(ClientClosed, match="not open"):
            await a.get("pva://variable:a")

    run(main())


def test_many_concurrent_awaits_on_one_client_each_get_their_own_answer(stack, app_name):
    uris = ["pva://variable:a", "ca://channel:string", "pva://channel:long", "ca://channel:enum"]

    async def main():
        async with client(stack, app_name) as a:
            expected = {u: (await a.get(u, T))["value"] for u in uris}
            results = await asyncio.gather(*[a.get(uris[i % 4], T) for i in range(400)])
            return expected, results, dict(a._t._pending)

    expected, results, pending = run(main())
    assert [r["value"] for r in results] == [expected[uris[i % 4]] for i in range(400)]
    assert pending == {}


# ----------------------------------------------------------------------------- cancellation

def test_cancelled_gets_leave_nothing_pending_and_their_late_replies_are_dropped(stack, app_name):
    """no:such:pv is answered after the gateway's 2 s connection timeout: cancel long before."""

    async def main():
        async with client(stack, app_name) as a:
            tasks = [asyncio.create_task(a.get("pva://no:such:pv")) for _ in range(50)]
            await until(lambda: len(a._t._pending) == 50, "50 commands in flight")
            for t in tasks:
                t.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            left = dict(a._t._pending)
            await asyncio.sleep(3)  # the late error replies arrive and find nobody
            ok = await a.get("pva://variable:a", T)
            return outcomes, left, dict(a._t._pending), ok

    outcomes, left, later, ok = run(main())
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert left == {} and later == {} and ok["value"] is not None


def test_asyncio_wait_for_cancels_cleanly(stack, app_name):
    async def main():
        async with client(stack, app_name) as a:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(a.info("pva://no:such:pv"), 0.2)
            return dict(a._t._pending)

    assert run(main()) == {}


def test_cancelled_one_shot_snapshot_and_monitor_start_leave_nothing_behind(stack, app_name):
    async def main():
        async with client(stack, app_name) as a:
            snap = asyncio.create_task(a.snapshot(["pva://no:such:pv"], time_window_msec=5000, timeout=None))
            await until(lambda: len(a._t._streams) == 1, "the snapshot stream")
            mon = a.monitor("pva://no:such:pv:either")
            start = asyncio.create_task(mon.start())
            await until(lambda: len(a._t._pending) == 1, "the monitor command")
            snap.cancel()
            start.cancel()
            await asyncio.gather(snap, start, return_exceptions=True)
            return dict(a._t._streams), dict(a._t._pending), dict(a._subs), dict(a._t._topics)

    assert run(main()) == ({}, {}, {}, {})


def test_close_wakes_waiting_calls_and_iterators_with_client_closed(stack, app_name):
    async def main():
        a = await client(stack, app_name).open()
        get = asyncio.create_task(a.get("pva://no:such:pv"))
        mon = a.monitor("pva://variable:a")
        await mon.start()

        async def drain():
            async for _ in mon:
                pass

        reader = asyncio.create_task(drain())
        await until(lambda: len(a._t._pending) == 1, "the get in flight")
        await a.close()
        await a.close()  # idempotent
        return await asyncio.gather(get, reader, return_exceptions=True)

    outcomes = run(main())
    assert [type(o) for o in outcomes] == [ClientClosed, ClientClosed]


# ----------------------------------------------------------------------------- monitors

def test_monitor_gives_the_current_value_then_updates_and_leaving_the_loop_stops_it(stack, app_name, k):
    uri = "pva://variable:b"
    start = k.get(uri, T)["value"]

    async def main():
        async with client(stack, app_name) as a:
            seen = []
            async for name, value in a.monitor(uri, T):
                seen.append((name, value["value"]))
                if len(seen) == 1:
                    await a.put(uri, start + 7, T)
                elif value["value"] == start + 7:
                    break
            subs, topics = dict(a._subs), dict(a._t._topics)
            await a.put(uri, start, T)
            return seen, subs, topics

    seen, subs, topics = run(main())
    assert seen[0] == ("variable:b", start) and seen[-1] == ("variable:b", start + 7)
    assert subs == {} and topics == {}  # the break closed the iterator and its subscription


def test_monitor_of_a_list_and_two_monitors_of_one_pv(stack, app_name):
    """A second monitor of a PV already read on this client starts from its newest value too."""

    async def main():
        async with client(stack, app_name) as a:
            async with a.monitor(["ca://channel:counter", "pva://channel:ramp:ramp"]) as both:
                names = set()
                async for name, _ in both:
                    names.add(name)
                    if len(names) == 2:
                        break
                async with a.monitor("ca://channel:counter") as second:
                    name, value = await second.__anext__()
                return names, name, value

    names, name, value = run(main())
    assert names == {"channel:counter", "channel:ramp:ramp"}
    assert name == "channel:counter" and isinstance(value["value"], float)


def test_a_monitor_joining_one_that_closes_before_its_reply_still_gets_values(stack, app_name):
    async def main():
        async with client(stack, app_name) as a:
            first = a.monitor("pva://channel:counter")
            starting = asyncio.create_task(first.start())
            await asyncio.sleep(0)             # its command is out, the reply not yet read
            assert len(a._t._pending) == 1
            second = a.monitor("pva://channel:counter")
            await second.start()               # joins: sends no command of its own
            first.close()
            await starting
            return await asyncio.wait_for(second.__anext__(), T)

    name, value = run(main())
    assert name == "channel:counter" and isinstance(value["value"], float)


def test_a_slow_consumer_does_not_stall_another_and_keeps_the_newest_value(stack, app_name):
    """Two monitors of sim:ticker (10 Hz): one never read while the other takes 30 updates.

    No other test monitors sim:ticker: a monitor command for a PV the gateway already monitors
    re-publishes its current value, which can land behind a newer update (seen under load with
    channel:counter), and a CA and a PVA monitor of one name share a topic.

    The idle one (queue of 3) then holds at most 3 + 1 entries, the last being the newest
    value: older ones were replaced and counted in ``dropped``.
    """

    async def main():
        async with client(stack, app_name) as a:
            async with a.monitor("ca://sim:ticker", queue_size=3) as slow, \
                    a.monitor("ca://sim:ticker") as fast:
                values = []
                async for _, v in fast:
                    values.append(v["value"])
                    if len(values) == 30:
                        break
                await asyncio.sleep(0.3)
                backlog = [v["value"] for _, v in await slow._queue.take()]
                newest = (await a.get("ca://sim:ticker", T))["value"]
                return values, backlog, slow.dropped, newest

    values, backlog, dropped, newest = run(main())
    assert values == sorted(values) and len(set(values)) == 30
    assert len(backlog) <= 4 and dropped >= 30 - 4
    assert values[-1] <= backlog[-1] <= newest


# ----------------------------------------------------------------------------- snapshots

def test_one_shot_snapshot(stack, app_name, k):
    uris = ["ca://variable:a", "pva://variable:b", "pva://channel:enum"]

    async def main():
        async with client(stack, app_name) as a:
            snap = await a.snapshot(uris, time_window_msec=500, timeout=T)
            with pytest.raises(ValueError):
                await a.snapshot([])
            return snap

    snap = run(main())
    assert snap["error"] == 0
    assert snap["variable:a"][-1]["value"] == k.get("ca://variable:a", T)["value"]
    assert snap["channel:enum"][-1]["value"]["choices"][0] == "Off"


def test_triggered_snapshot_iterations_trigger_and_stop_end_the_loop(stack, app_name):
    name = f"aio-trig-{uuid.uuid4().hex[:8]}"
    props = SnapshotProperties(snapshot_name=name, pv_uri_list=["pva://variable:a", "ca://channel:counter"],
                               time_window=100, triggered=True)

    async def main():
        async with client(stack, app_name) as a:
            iterations = []
            snap = a.snapshot_recurring(props, T)
            await snap.start()
            assert snap.reply["error"] == 0

            async def read():
                async for it in snap:
                    iterations.append(it)

            reader = asyncio.create_task(read())
            for i in range(3):
                rec = await a.snapshot_trigger(name, T, tags={"shot": str(i)})
                assert rec["iter_index"] == i + 1
            await until(lambda: len(iterations) == 3, "three iterations")
            stop = await a.snapshot_stop(name, T)
            await asyncio.wait_for(reader, T)  # the loop ends by itself
            return iterations, stop, dict(a._t._topics)

    iterations, stop, topics = run(main())
    assert [it["iteration"] for it in iterations] == [1, 2, 3]
    assert [it["tags"] for it in iterations] == [{"shot": str(i)} for i in range(3)]
    assert all(len(it["variable:a"]) == 1 and len(it["channel:counter"]) == 1 for it in iterations)
    assert stop["iter_index"] == 3 and topics == {}


def test_scheduled_snapshot_yields_until_stopped(stack, app_name):
    name = f"aio-sched-{uuid.uuid4().hex[:8]}"
    props = SnapshotProperties(snapshot_name=name, pv_uri_list=["pva://channel:counter"], time_window=100)

    async def main():
        async with client(stack, app_name) as a:
            got = []
            async for it in a.snapshot_recurring(props, T):
                got.append(it["iteration"])
                if len(got) == 3:   # a trigger of a scheduled snapshot publishes an extra iteration now
                    extra = await a.snapshot_trigger(name, T)
                    stop = await a.snapshot_stop(name, T)
            return got, extra, stop

    got, extra, stop = run(main())
    assert extra["error"] == 0 and extra["iter_index"] > 3
    assert got == list(range(1, stop["iter_index"] + 1)) and stop["iter_index"] > extra["iter_index"]


# ----------------------------------------------------------------------------- two clients

def test_two_clients_in_one_loop(stack, app_name):
    async def main():
        async with client(stack, app_name) as a, client(stack, f"{app_name}-2") as b:
            async def watch(c: AsyncClient) -> list:
                out = []
                async for _, v in c.monitor("pva://channel:counter", T):
                    out.append(v["value"])
                    if len(out) == 5:
                        return out

            watches = [asyncio.create_task(watch(a)), asyncio.create_task(watch(b))]
            gets = await asyncio.gather(*[c.get("ca://variable:a", T) for c in (a, b) for _ in range(20)])
            return [await w for w in watches], gets, dict(a._t._pending), dict(b._t._pending)

    (wa, wb), gets, pa, pb = run(main())
    assert len(wa) == len(wb) == 5 and all(isinstance(v, float) for v in wa + wb)
    assert len({g["value"] for g in gets}) == 1 and pa == pb == {}
