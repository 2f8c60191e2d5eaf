"""k2eg for asyncio: the ``dml`` operations as awaitables and async iterators.

Built on the same ``ClientTransport`` as ``dml``: its reply thread settles a
command's ``Pending``, whose completion callback hands the reply to the event
loop (``LoopInbox``, one ``call_soon_threadsafe`` per burst of replies); no
thread waits for any single call. Monitor events go from the transport's event
thread straight into a bounded queue per iterator (``EventQueue``), so a slow
consumer of one iterator never holds up another, nor the transport.

Blocking set-up steps (the transport's start-up and close, creating a repeating
snapshot's topic) run once each in a worker thread (``asyncio.to_thread``).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable, Iterable

from k2eg.broker import SnapshotProperties
from k2eg.client.environment import load as load_environment
from k2eg.client.errors import ClientClosed, OperationTimeout
from k2eg.client.transport import ClientTransport, Pending
from k2eg.client.values import put_value_map
from k2eg.dml import (check_app_name, check_snapshot_name, one_shot_result, parse_pv, parse_pvs,
                      repeating_snapshot_command, reply_or_raise)
from k2eg.protocol import commands as C
from k2eg.protocol.snapshots import IterationAssembler, OneShotCollector
from k2eg.protocol.uri import pv_topic, snapshot_topic

__all__ = ["AsyncClient", "Monitor", "RepeatingSnapshot", "EventQueue", "LoopInbox", "QUEUE_SIZE"]

log = logging.getLogger("k2eg.aio")

QUEUE_SIZE = 1000  # events an iterator holds before the newest value of a PV replaces its queued one


class LoopInbox:
    """Calls from the transport's threads, run on the event loop in arrival order.

    One ``call_soon_threadsafe`` (one loop wake-up) per burst instead of per call. What it holds
    is bounded by construction: one entry per settled command and one wake-up per waiting iterator.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._calls: collections.deque = collections.deque()
        self._armed = False

    def put(self, fn: Callable, *args: Any) -> None:
        self._calls.append((fn, args))  # appended before the flag is read: a running drain sees it
        if not self._armed:
            self._armed = True
            try:
                self._loop.call_soon_threadsafe(self._run)
            except RuntimeError:  # the loop is closed: nobody waits for anything any more
                self._calls.clear()

    def _run(self) -> None:
        self._armed = False
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("k2eg.aio: %s failed", getattr(fn, "__name__", fn))


class EventQueue:
    """The bounded hand-off from the transport's event thread to one async iterator.

    Up to ``maxlen`` entries queue in arrival order. Beyond that, an update of a key (PV) that
    already has one queued replaces that queued value in place (the newest wins, like the CA
    server's event queue); an update of a key with nothing queued is still appended. So the
    queue never exceeds ``maxlen`` + number of keys, the last value of every key always
    arrives, and each replaced value is counted in ``dropped``.
    """

    def __init__(self, inbox: LoopInbox, maxlen: int = QUEUE_SIZE):
        if maxlen < 1:
            raise ValueError(f"queue size must be at least 1, not {maxlen}")
        self.maxlen = maxlen
        self.dropped = 0
        self._inbox = inbox
        self._lock = threading.RLock()  # close() may run from __del__ on a thread inside push()
        self._items: collections.deque = collections.deque()
        self._latest: dict[Any, list] = {}   # key -> its newest queued [key, value] cell
        self._waiter: asyncio.Future | None = None
        self._end: BaseException | None = None  # set once no more items come: raised when drained

    def push(self, key: Any, value: Any) -> None:
        """Any thread."""
        with self._lock:
            if self._end is not None:
                return
            cell = self._latest.get(key)
            if cell is not None and len(self._items) >= self.maxlen:
                cell[1] = value
                self.dropped += 1
                return
            cell = [key, value]
            self._items.append(cell)
            self._latest[key] = cell
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._inbox.put(_wake, waiter)

    def finish(self, end: BaseException) -> None:
        """No more items: once drained, ``take`` raises ``end``. Any thread; the first reason stays."""
        with self._lock:
            if self._end is None:
                self._end = end
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._inbox.put(_wake, waiter)

    async def take(self) -> collections.deque:
        """Everything queued, in order, as ``[key, value]`` cells; waits while empty (event loop only)."""
        while True:
            with self._lock:
                if self._items:
                    items, self._items = self._items, collections.deque()
                    self._latest = {}
                    return items
                if self._end is not None:
                    raise self._end
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _settle_future(fut: asyncio.Future, p: Pending) -> None:
    if fut.done():  # cancelled or timed out meanwhile
        return
    if p.error is not None:
        fut.set_exception(p.error)
    else:
        fut.set_result(p.record)


def _expire(fut: asyncio.Future, what: str) -> None:
    if not fut.done():
        fut.set_exception(OperationTimeout(f"Timeout during {what}"))


class _Stream:
    """What ``Monitor`` and ``RepeatingSnapshot`` share: started on first use, closed on leaving."""

    def __init__(self, client: "AsyncClient", queue_size: int):
        self._client = client
        self._queue = EventQueue(client._inbox_or_raise(), queue_size)
        self._buffer: collections.deque = collections.deque()
        self._started = False
        self._closed = False

    @property
    def dropped(self) -> int:
        """Values replaced by a newer one of the same key while this consumer was ``queue_size`` behind."""
        return self._queue.dropped

    async def start(self) -> None:
        if self._started or self._closed:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            self.close()
            raise

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._buffer:
            if not self._started:
                await self.start()
            try:
                self._buffer = await self._queue.take()
            except _Finished:
                raise StopAsyncIteration from None
        return self._item(self._buffer.popleft())

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving; idempotent, any thread (also run when the iterator is garbage)."""
        if self._closed:
            return
        self._closed = True
        self._queue.finish(_Finished())
        if self._started:
            self._stop()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    async def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _item(self, cell: list) -> Any:
        raise NotImplementedError


class _Finished(Exception):
    """The stream ended normally (closed by its user, or its snapshot stopped)."""


class Monitor(_Stream):
    """``async for pv_name, value in client.monitor(uris)``: each PV's current value, then every update.

    Leaving the loop (``break``, an exception, the iterator becoming garbage) or ``close()``
    stops it; ``async with client.monitor(...) as m`` makes that explicit. Other monitors of the
    same PVs on the same client go on; the gateway stops publishing once nobody reads (expiry).
    """

    def __init__(self, client: "AsyncClient", uris: str | Iterable[str], queue_size: int, timeout: float | None):
        self.pvs = (parse_pv(uris),) if isinstance(uris, str) else parse_pvs(list(uris))
        super().__init__(client, queue_size)
        self._timeout = timeout

    @property
    def names(self) -> list[str]:
        return [pv.name for pv in self.pvs]

    async def _start(self) -> None:
        await self._client._start_monitor(self, self._timeout)

    def _stop(self) -> None:
        self._client._stop_monitor(self)

    def _item(self, cell: list) -> tuple[str, dict]:
        return cell[0], cell[1]


class _SnapshotReader:
    """One repeating snapshot's stream as the transport feeds it (no reference to the iterator,
    so an iterator left behind is garbage and closes itself)."""

    def __init__(self, name: str, pv_names: list[str], queue: EventQueue):
        self.name = name
        self.topic = snapshot_topic(name)
        self.queue = queue
        self.assembler = IterationAssembler(name, pv_names, lambda data: queue.push(name, data))

    def feed(self, _topic: str, rec: Any) -> None:
        self.assembler.feed(rec)


class RepeatingSnapshot(_Stream):
    """``async for iteration in client.snapshot_recurring(properties)``: one dict per iteration.

    The dicts are those ``dml``'s handler gets. The loop ends after the final iteration once
    ``snapshot_stop`` of this snapshot returned on the same client; leaving it earlier only
    stops reading (the snapshot goes on at the gateway until ``snapshot_stop``).
    """

    def __init__(self, client: "AsyncClient", properties: SnapshotProperties, queue_size: int,
                 timeout: float | None):
        super().__init__(client, queue_size)
        self.name = properties.snapshot_name
        self._cmd, pvs = repeating_snapshot_command(client._envelope(), properties)
        self._reader = _SnapshotReader(self.name, [pv.name for pv in pvs], self._queue)
        self.reply: dict | None = None
        self._timeout = timeout

    async def _start(self) -> None:
        self.reply = await self._client._start_snapshot(self._reader, self._cmd, self._timeout)

    def _stop(self) -> None:
        self._client._forget_snapshot(self._reader)

    def _item(self, cell: list) -> dict:
        return cell[1]


class AsyncClient:
    """K2EG client for asyncio: ``async with AsyncClient(environment_id, app_name) as k:``.

    Same arguments, operations, return values and exceptions as ``k2eg.dml.dml``; every
    coroutine may run concurrently with any other on the same client, and cancelling one
    leaves nothing behind (its reply, should it still come, is dropped). ``timeout`` (seconds)
    gives ``OperationTimeout`` as in ``dml``; ``asyncio.timeout()`` works as well.
    ``queue_size`` bounds each iterator's queue (see ``EventQueue``).
    """

    def __init__(self, environment_id: str, app_name: str, group_name: str | None = None,
                 serialization: str = "msgpack", startup_timeout: float = 10.0, queue_size: int = QUEUE_SIZE):
        check_app_name(app_name)
        self.environment = load_environment(environment_id)
        self.app_name = app_name
        self.queue_size = queue_size
        self._group_name = group_name
        self._serialization = C.Serialization.parse(serialization)
        self._startup_timeout = startup_timeout
        self._transport: ClientTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: LoopInbox | None = None
        # Monitor routing, between the event thread and the loop. Re-entrant: a monitor that becomes
        # garbage closes itself from __del__, on whichever thread that happens.
        self._route_lock = threading.RLock()
        self._subs: dict[str, tuple[EventQueue, ...]] = {}  # pv name -> the queues of its monitors
        self._last: dict[str, Any] = {}          # pv name -> newest value seen (seeds a joining monitor)
        self._snapshots: dict[str, _SnapshotReader] = {}

    # ------------------------------------------------------------- life cycle
    async def open(self) -> "AsyncClient":
        """Connect (``async with`` does this); bounded by ``startup_timeout`` like ``dml``."""
        if self._transport is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._inbox = LoopInbox(self._loop)
        self._transport = await asyncio.to_thread(ClientTransport, self.environment, self.app_name,
                                                  self._group_name, self._startup_timeout)
        log.info("k2eg asyncio client for environment '%s' (%s), app '%s'", self.environment.name,
                 self.environment.kafka_broker_url, self.app_name)
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.open()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Idempotent; waiting calls get ClientClosed, open iterators raise it once drained."""
        t, self._transport = self._transport, None
        if t is None:
            return
        closed = ClientClosed("the k2eg client was closed")
        with self._route_lock:
            queues = {q for qs in self._subs.values() for q in qs}
            self._subs.clear()
            self._last.clear()
        for q in [*queues, *(r.queue for r in self._snapshots.values())]:
            q.finish(closed)
        self._snapshots.clear()
        await asyncio.to_thread(t.close)

    @property
    def reply_topic(self) -> str:
        return self._t.reply_topic

    @property
    def _t(self) -> ClientTransport:
        if self._transport is None:
            raise ClientClosed("this k2eg client is closed" if self._loop else
                               "this k2eg client is not open: use 'async with AsyncClient(...)' or 'await open()'")
        return self._transport

    def _inbox_or_raise(self) -> LoopInbox:
        self._t  # noqa: B018 - raises ClientClosed when not open
        return self._inbox  # type: ignore[return-value]

    def _envelope(self) -> dict:
        t = self._t
        return {"reply_topic": t.reply_topic, "reply_id": t.reply_id(), "serialization": self._serialization}

    async def _call(self, cmd: C.Command, timeout: float | None, what: str) -> dict:
        t = self._t
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError("this AsyncClient belongs to another event loop")
        fut = loop.create_future()
        inbox = self._inbox
        t.submit(cmd, lambda p: inbox.put(_settle_future, fut, p))
        timer = None if timeout is None else loop.call_later(timeout, _expire, fut, what)
        try:
            return reply_or_raise(await fut, what)
        finally:
            t.forget(cmd.reply_id)
            if timer is not None:
                timer.cancel()

    # ------------------------------------------------------------- operations
    async def get(self, pv_url: str, timeout: float | None = None) -> dict:
        pv = parse_pv(pv_url)
        rec = await self._call(C.Get(**self._envelope(), pv=pv), timeout, f"get operation for {pv.name}")
        return rec[pv.name] if pv.name in rec else rec

    async def put(self, pv_url: str, value: Any, timeout: float | None = None) -> dict:
        pv = parse_pv(pv_url)
        cmd = C.Put(**self._envelope(), pv=pv, value=put_value_map(value))
        return await self._call(cmd, timeout, f"put operation for {pv.name}")

    async def info(self, pv_url: str, timeout: float | None = None) -> dict:
        pv = parse_pv(pv_url)
        rec = await self._call(C.Info(**self._envelope(), pv=pv), timeout, f"info operation for {pv.name}")
        return rec.get(pv.name, rec)

    async def status(self, timeout: float | None = None) -> dict:
        return (await self._call(C.Status(**self._envelope()), timeout, "status"))["status"]

    # ------------------------------------------------------------- monitors
    def monitor(self, uris: str | Iterable[str], timeout: float | None = None,
                queue_size: int | None = None) -> Monitor:
        """An async iterator of ``(pv_name, value)``; see ``Monitor``. Starts on first use."""
        return Monitor(self, uris, queue_size or self.queue_size, timeout)

    def _on_monitor_record(self, _topic: str, rec: Any) -> None:
        """On the transport's event thread."""
        if not isinstance(rec, dict) or not rec:
            return
        name = next(iter(rec))
        value = rec[name]
        with self._route_lock:
            targets = self._subs.get(name)
            if targets is None:
                return
            self._last[name] = value
        for q in targets:
            q.push(name, value)

    async def _start_monitor(self, m: Monitor, timeout: float | None) -> None:
        t = self._t
        q = m._queue
        with self._route_lock:
            new = tuple(pv for pv in m.pvs if pv.name not in self._subs)
            for pv in m.pvs:
                self._subs[pv.name] = (*self._subs.get(pv.name, ()), q)
                if pv.name in self._last:  # joins a running subscription: start from its newest value
                    q.push(pv.name, self._last[pv.name])
        if not new:
            return
        envelope = self._envelope()
        if len(new) == 1:
            cmd: C.Command = C.Monitor(**envelope, pv=new[0], destination=new[0].topic)
        else:
            cmd = C.MultiMonitor(**envelope, pvs=new)
        await self._call(cmd, timeout, f"start monitor operation for {', '.join(pv.name for pv in new)}")
        with self._route_lock:  # read by whoever is still there: m, or a monitor that joined meanwhile
            live = [pv for pv in new if pv.name in self._subs]
        if self._transport is not None:
            for pv in live:
                t.subscribe(pv.topic, self._on_monitor_record)

    def _stop_monitor(self, m: Monitor) -> None:
        with self._route_lock:
            gone = []
            for pv in m.pvs:
                rest = tuple(q for q in self._subs.get(pv.name, ()) if q is not m._queue)
                if rest:
                    self._subs[pv.name] = rest
                elif pv.name in self._subs:
                    del self._subs[pv.name]
                    self._last.pop(pv.name, None)
                    gone.append(pv)
            topics = {pv_topic(name) for name in self._subs}  # e.g. a:b and a_b share a topic
        t = self._transport
        if t is not None:
            for pv in gone:
                if pv.topic not in topics:
                    t.unsubscribe(pv.topic)

    # ------------------------------------------------------------- snapshots
    async def snapshot(self, pv_uri_list: list[str], time_window_msec: int = 1000,
                       timeout: float | None = 10.0) -> dict:
        """One-shot snapshot: ``{pv_name: [values], "error": 0}`` as ``dml.snapshot_sync`` returns."""
        pvs = parse_pvs(pv_uri_list)
        t, loop, inbox = self._t, asyncio.get_running_loop(), self._inbox
        env = self._envelope()
        rid = env["reply_id"]
        fut = loop.create_future()
        what = f"snapshot operation for {pv_uri_list}"
        t.open_stream(rid, OneShotCollector([pv.name for pv in pvs],
                                            lambda result: inbox.put(_settle_future, fut, _Done(result))).feed)
        timer = None if timeout is None else loop.call_later(timeout, _expire, fut, what)
        try:
            t.send(C.Snapshot(**env, pvs=pvs, time_window_msec=time_window_msec))
            return one_shot_result(await fut)
        finally:
            t.close_stream(rid)
            if timer is not None:
                timer.cancel()

    def snapshot_recurring(self, properties: SnapshotProperties, timeout: float | None = None,
                           queue_size: int | None = None) -> RepeatingSnapshot:
        """Start a repeating snapshot on first use; an async iterator of its iterations."""
        return RepeatingSnapshot(self, properties, queue_size or self.queue_size, timeout)

    async def _start_snapshot(self, r: _SnapshotReader, cmd: C.RepeatingSnapshot, timeout: float | None) -> dict:
        t = self._t
        self._snapshots[r.name] = r

        def read_from_start() -> None:  # blocking admin calls: once per snapshot, in a worker thread
            t.admin.ensure([r.topic])
            t.subscribe(r.topic, r.feed)
            t.wait_assigned(r.topic, 30.0)

        await asyncio.to_thread(read_from_start)
        rec = await self._call(cmd, timeout, f"the submission of snapshot {r.name}")
        published = rec.get("publishing_topic")
        if published and published != r.topic:
            t.unsubscribe(r.topic)
            r.topic = published
            t.subscribe(published, r.feed)
        return rec

    def _forget_snapshot(self, r: _SnapshotReader) -> None:
        if self._snapshots.get(r.name) is r:
            del self._snapshots[r.name]
        t = self._transport
        if t is not None:
            t.unsubscribe(r.topic)

    async def snapshot_trigger(self, snapshot_name: str, timeout: float | None = None,
                               tags: dict | None = None) -> dict:
        check_snapshot_name(snapshot_name)
        cmd = C.SnapshotTrigger(**self._envelope(), snapshot_name=snapshot_name, tags=dict(tags or {}))
        return await self._call(cmd, timeout, f"triggering the snapshot {snapshot_name}")

    async def snapshot_stop(self, snapshot_name: str, timeout: float | None = None) -> dict:
        """Stop it; an iterator of it on this client yields the final iteration, then ends."""
        check_snapshot_name(snapshot_name)
        cmd = C.SnapshotStop(**self._envelope(), snapshot_name=snapshot_name)
        r = self._snapshots.get(snapshot_name)
        try:
            rec = await self._call(cmd, timeout, f"stopping the snapshot {snapshot_name}")
            final = rec.get("iter_index")
            if r is not None and isinstance(final, int) and final > 0:
                deadline = time.monotonic() + (5.0 if timeout is None else timeout)
                while (r.assembler.last_iteration or 0) < final and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            return rec
        finally:
            if r is not None:
                r.queue.finish(_Finished())
                self._forget_snapshot(r)


class _Done:
    """A one-shot snapshot's result in the shape ``_settle_future`` reads."""

    __slots__ = ("record", "error")

    def __init__(self, record: dict):
        self.record, self.error = record, None
