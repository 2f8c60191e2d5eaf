"""EventQueue and LoopInbox: the bounded, thread-safe hand-off from the transport's threads to the event loop."""
from __future__ import annotations

import asyncio
import threading

import pytest

from k2eg.aio import EventQueue, LoopInbox


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_events_keep_their_order_within_the_bound():
    async def main():
        q = EventQueue(LoopInbox(asyncio.get_running_loop()), maxlen=10)
        for i in range(10):
            q.push("a" if i % 2 else "b", i)
        return [tuple(c) for c in await q.take()], q.dropped

    items, dropped = run(main())
    assert items == [("a" if i % 2 else "b", i) for i in range(10)] and dropped == 0


def test_beyond_the_bound_the_newest_value_of_a_key_replaces_its_queued_one():
    async def main():
        q = EventQueue(LoopInbox(asyncio.get_running_loop()), maxlen=3)
        for i in range(3):
            q.push("fast", i)           # fills the queue
        for i in range(3, 100):
            q.push("fast", i)           # each replaces the newest queued "fast" value
        q.push("slow", "only")          # a key with nothing queued is never lost
        q.push("slow", "newer")         # ... and then coalesces too
        return [tuple(c) for c in await q.take()], q.dropped

    items, dropped = run(main())
    assert items == [("fast", 0), ("fast", 1), ("fast", 99), ("slow", "newer")]
    assert dropped == 97 + 1


def test_the_queue_is_bounded_by_maxlen_plus_the_number_of_keys():
    async def main():
        q = EventQueue(LoopInbox(asyncio.get_running_loop()), maxlen=5)
        for i in range(10_000):
            q.push(i % 7, i)
        items = await q.take()
        return len(items), {c[0]: c[1] for c in items}

    n, last = run(main())
    assert n <= 5 + 7
    assert last == {k: max(i for i in range(10_000) if i % 7 == k) for k in range(7)}  # every key's newest


def test_a_waiting_consumer_is_woken_from_another_thread_and_finish_ends_it():
    async def main():
        q = EventQueue(LoopInbox(asyncio.get_running_loop()), maxlen=100)
        got = []

        def producer():
            for i in range(1000):
                q.push("k", i)
            q.finish(EOFError())

        threading.Thread(target=producer).start()
        with pytest.raises(EOFError):
            while True:
                got.extend(c[1] for c in await q.take())
        return got

    got = run(main())
    assert got == sorted(got) and got[-1] == 999  # in order, newest always delivered


def test_inbox_runs_calls_in_order_and_survives_a_failing_call():
    async def main():
        loop = asyncio.get_running_loop()
        inbox = LoopInbox(loop)
        seen, done = [], loop.create_future()

        def boom():
            raise RuntimeError("user code")

        def worker():
            for i in range(500):
                inbox.put(seen.append, i)
                if i == 100:
                    inbox.put(boom)
            inbox.put(lambda: done.set_result(None))

        threading.Thread(target=worker).start()
        await done
        return seen

    assert run(main()) == list(range(500))


def test_an_inbox_whose_loop_is_closed_drops_calls_quietly():
    loop = asyncio.new_event_loop()
    inbox = LoopInbox(loop)
    loop.close()
    inbox.put(print, "never")  # no exception on the transport's thread


def test_queue_size_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        EventQueue(None, maxlen=0)  # type: ignore[arg-type]
