"""The gateway's command handling: one command in, replies and subscriptions out.

Parsing happens on the consumer thread; anything that may block on EPICS
runs on a bounded worker pool so one slow PV never holds up other commands,
except PVA gets: those are started on the consumer thread and answered from
p4p's callback, which waits for nothing.
No handler may raise past ``handle``: the gateway never dies on a command.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from functools import partial
from typing import Any, Callable, Sequence

from k2eg.protocol import commands as C
from k2eg.protocol import replies
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import PVUri, snapshot_topic

from .epics.base import Provider
from .commits import Position
from .expiry import PURGE_DELETES, Destinations, ExpiryChecker, PurgeStep
from .journal import PutJournal
from .kafka import KafkaIO, too_large
from .memory import Trimmer
from .monitors import MonitorHub, combined_cap
from .access import PutPolicy, TopicGuard, Unanswerable, app_of
from .options import Options
from .snapshots import SnapshotManager
from .state import MonitorState, SnapshotState, State, StateStore, monitor_key
from .status import RateMeter, capped, gateway_identity

log = logging.getLogger("k2eg.gateway")

STATUS_MONITORS = 2000  # monitors listed in a status reply: keeps it far below Kafka's 1 MB record limit


class Workers:
    """Command threads fed by one queue, for calls whose result nobody waits for.

    ThreadPoolExecutor builds a Future (with its Condition) and takes a semaphore
    and two locks per call; with the Event each get waited on, that was ~40% of
    the gateway's Python self-time at 3k gets/s (py-spy; bench/EXPERIMENTS.md row 30).
    """

    def __init__(self, n: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}_{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args: Any) -> None:
        """``fn`` must not raise: nothing would see it."""
        if self._closed:
            raise RuntimeError("workers shut down")
        self._queue.put((fn, args))

    def waiting(self) -> int:
        """Calls not yet started (approximate while threads take them)."""
        return self._queue.qsize()

    def _loop(self) -> None:
        get = self._queue.get
        while (item := get()) is not None:
            item[0](*item[1])

    def shutdown(self, wait: bool = False) -> None:
        """Drop what has not started (``wait``: run it all and join); running calls finish on their own."""
        self._closed = True
        if not wait:
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()


class Gateway:
    def __init__(self, opts: Options, io: KafkaIO, providers: dict[str, Provider], state: StateStore | None = None,
                 journal: PutJournal | None = None):
        self.opts = opts
        self.io = io
        self.providers = providers
        self.timeout = opts.pv_connection_timeout
        self.memory = Trimmer()
        self.hub = MonitorHub(providers, self._publish_bytes, self.memory.changed,
                              refresh_period=opts.monitor_refresh_period)
        self.workers = Workers(opts.command_workers, "k2eg-cmd")
        self.counters: dict[str, int] = {"received": 0, "bad": 0, "failed": 0, "unanswerable": 0,
                                         "reply_topic_refused": 0}
        self.operations: dict[tuple[str, str], int] = {}   # (command, ok|error) -> n, for metrics
        self.puts_denied = 0
        self.policy = PutPolicy.from_options(opts.access_rules, opts.read_only)
        self.topic_guard = TopicGuard.from_options(opts)
        self.started = time.time()
        self.identity = gateway_identity(opts.cmd_input_topic)
        self.rates = RateMeter()
        self._lock = threading.Lock()
        self._gets_reading = 0                  # gets whose read a provider will call back (no worker holds them)
        self.state = state                      # None: nothing survives a restart (unit tests)
        self.journal = journal                  # None: puts are not journaled (unit tests)
        self._replying = True                   # False once the stop's drain is over (``stop_replying``)
        self.destinations = Destinations()      # monitor destination topics, for expiry
        self.expiry: ExpiryChecker | None = None
        self.snapshots = SnapshotManager(self.hub, self.reply, self.io.publish, self.read, self.io.ensure_topics,
                                         state=state, max_buffered=opts.snapshot_max_buffered)
        self.handlers: dict[type, Callable[[Any], None]] = {
            C.Put: self.on_put, C.Info: self.on_info,  # gets: _get_together; a put also gets its position
            C.Monitor: self.on_monitor, C.MultiMonitor: self.on_multi_monitor,
            C.Snapshot: self.snapshots.one_shot, C.RepeatingSnapshot: self.snapshots.start,
            C.SnapshotTrigger: self.snapshots.trigger, C.SnapshotStop: self.snapshots.stop,
            C.Status: self.on_status,
        }

    # ------------------------------------------------------------- plumbing
    def _publish_bytes(self, topic: str, key: str, data: bytes, ser: C.Serialization) -> None:
        """Monitor events: never block the EPICS callback; under overload the newest value per PV wins."""
        self.io.publish_event(topic, key, data, ser)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counters[what] += 1

    def reply(self, cmd: C.Command, record: dict, key: str | None, value_key: str | None = None) -> None:
        """Send ``record`` to the command's reply topic, created if missing; without one, nothing to do."""
        if not cmd.reply_topic or not self._replying:
            return
        self._reply_topic_ready(cmd.reply_topic)
        refused = None if record.get("error") else partial(self._reply_too_large, cmd, key)
        self.io.publish(cmd.reply_topic, key, record, cmd.serialization, value_key, refused)

    def _reply_too_large(self, cmd: C.Command, key: str | None, size: int, why: str) -> None:
        """Poll thread: the broker refused a reply for its size; an error reply says so (never silence)."""
        self._submit(self.fail, cmd, key, ErrorCode.EPICS_FAILED, too_large(size, cmd.reply_topic, why))

    def fail(self, cmd: C.Command, key: str | None, code: int, message: str) -> None:
        """The one exit of every failed command: logged, counted, answered when a reply topic is known."""
        self._count("failed")
        if not cmd.reply_topic:
            self._count("unanswerable")
            log.warning("%s failed without a reply_topic to tell (reply_id %s): %s",
                        cmd.name or "command", _short(cmd.reply_id, 80), _loggable(message))
            return
        log.info("%s failed (reply_id %s): %s", cmd.name or "command", _short(cmd.reply_id, 80), _loggable(message))
        try:
            self.reply(cmd, replies.error(cmd.reply_id, code, message), key)
        except Unanswerable as e:
            self._unanswerable(cmd, e)
        except ProtocolError as e:
            log.error("cannot answer %s on %s: %s", cmd.name or "command", cmd.reply_topic, e.message)

    # ------------------------------------------------------------- entry
    def handle(self, *raws: bytes | None, at: Sequence[Position] | None = None) -> None:
        """Consumer thread: parse and hand off the commands read in one poll. Never raises.

        ``at``: the commands' positions in the command topic; each is reported to ``io.handled``
        once its command is handled (replied to, or its failure reported), so that only then its
        offset is committed. Gets of one PV among them share one EPICS read (``_get_together``).
        """
        gets: dict[tuple[str, str], tuple[list[C.Get], list[Position | None]]] = {}
        for i, raw in enumerate(raws):
            pos = None if at is None else at[i]
            cmd = self._parse(raw, pos)
            if cmd is None:
                continue
            if type(cmd) is C.Get:
                same = gets.get((cmd.pv.protocol, cmd.pv.name))
                if same is None:
                    same = gets[(cmd.pv.protocol, cmd.pv.name)] = ([], [])
                same[0].append(cmd)
                same[1].append(pos)
                continue
            handler = self.handlers.get(type(cmd))
            if handler is None:
                self._submit_at(pos, self.fail, cmd, replies.PARSE_ERROR_KEY, ErrorCode.BAD_REQUEST,
                                f"command '{cmd.name}' is not available on this gateway")
            elif type(cmd) is C.Put:
                self._submit_at(pos, self._run, handler, cmd, pos)
            else:
                self._submit_at(pos, self._run, handler, cmd)
        for same, positions in gets.values():
            self._read_for(same, positions)

    def _parse(self, raw: bytes | None, at: Position | None = None) -> C.Command | None:
        """The command, or None once its parse error is on its way to the sender."""
        self._count("received")
        try:
            return C.parse_command(raw)
        except C.CommandError as e:
            self._count("bad")
            self._submit_at(at, self.fail, e.envelope, replies.PARSE_ERROR_KEY, e.code, e.message)
        except Exception as e:  # a parser bug must not stop the command loop
            self._count("bad")
            log.exception("cannot parse a command of %d bytes", len(raw or b""))
            self._submit_at(at, self.fail, C.Command(), replies.PARSE_ERROR_KEY, ErrorCode.BAD_REQUEST,
                            f"command could not be read: {type(e).__name__}")
        return None

    def _submit(self, fn: Callable, *args: Any) -> None:
        try:
            self.workers.submit(self._safe, fn, *args)
        except RuntimeError:  # pool shut down: we are stopping
            log.warning("gateway stopping: a command was not executed")

    def _submit_at(self, at: Position | None, fn: Callable, *args: Any) -> None:
        """``_submit`` for the command at ``at``: handled once ``fn`` returns (a command not run stays uncommitted)."""
        if at is None:
            self._submit(fn, *args)
        else:
            self._submit(self._handled, at, fn, *args)

    def _handled(self, at: Position, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        finally:
            self.io.handled(at)

    def stop_replying(self) -> None:
        """The stop's drain is over: what finishes later is not answered, as its offset is no longer committed
        and the next gateway of the group runs it and answers (one reply per command after a SIGTERM)."""
        self._replying = False

    def busy(self) -> bool:
        """Enough commands wait, for a worker or for their PV: the command loop stops reading until fewer do."""
        return self.workers.waiting() + self._gets_reading >= self.opts.command_backlog

    def _safe(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("internal error while handling a command")

    @staticmethod
    def _key(cmd: C.Command) -> str:
        """Record key of a command's replies (PROTOCOL 1)."""
        pv = getattr(cmd, "pv", None)
        if pv is not None:
            return pv.uri
        if isinstance(cmd, C.MultiMonitor) and cmd.pvs:
            return cmd.pvs[0].uri
        if isinstance(cmd, (C.RepeatingSnapshot, C.SnapshotTrigger, C.SnapshotStop)):
            return replies.REPEATING_REPLY_KEY
        if isinstance(cmd, C.Snapshot):
            return replies.SNAPSHOT_KEY
        if isinstance(cmd, C.Status):
            return replies.STATUS_KEY
        return replies.PARSE_ERROR_KEY

    def _unanswerable(self, cmd: C.Command, e: Unanswerable) -> None:
        """A command whose reply topic is refused: not run (or its failure not told), logged and counted."""
        self._count("unanswerable")
        self._count("reply_topic_refused")
        log.warning("%s (reply_id %s) not answered: %s", cmd.name or "command", _short(cmd.reply_id, 80),
                    _loggable(e.message))

    def _reply_topic_ready(self, topic: str) -> None:
        """``topic`` may take replies and exists (created within --max-reply-topics); Unanswerable otherwise."""
        if self.io.admin.missing((topic,)) or self.topic_guard.refusal(topic):
            self.topic_guard.ensure_reply_topic(topic, self.io.ensure_topics, self.io.admin.exists)

    def _admit(self, cmd: C.Command) -> None:
        """Before a command runs: its reply topic can be answered on, and it writes to no topic a sender may
        not name (the gateway's own, Kafka's internal ones)."""
        if cmd.reply_topic:
            self._reply_topic_ready(cmd.reply_topic)
        if isinstance(cmd, C.Monitor):
            self.topic_guard.check_destination("monitor_dest_topic", cmd.destination)
        elif isinstance(cmd, C.MultiMonitor):
            for pv in cmd.pvs:
                self.topic_guard.check_destination(f"the monitor topic of {pv.uri}", pv.topic)
        elif isinstance(cmd, C.RepeatingSnapshot):
            self.topic_guard.check_destination(f"snapshot '{cmd.snapshot_name}'s publishing topic",
                                               snapshot_topic(cmd.snapshot_name))

    def _run(self, handler: Callable[..., None], cmd: C.Command, *args: Any) -> None:
        ok = False
        try:
            self._admit(cmd)
            handler(cmd, *args)
            ok = True
        except Unanswerable as e:
            self._unanswerable(cmd, e)
        except ProtocolError as e:
            self.fail(cmd, self._key(cmd), e.code, e.message)
        except Exception as e:  # a bug or library failure: answer, log, keep serving
            log.exception("%s failed unexpectedly", cmd.name)
            self.fail(cmd, self._key(cmd), ErrorCode.EPICS_FAILED, f"{cmd.name} failed: {type(e).__name__}: {e}")
        finally:
            key = (cmd.name, "ok" if ok else "error")
            with self._lock:
                self.operations[key] = self.operations.get(key, 0) + 1

    def _read_for(self, gets: list[C.Get], at: list[Position | None]) -> None:
        """Gets of one PV read in one poll: one EPICS read, issued after all of them arrived, answers
        each (so none gets a value older than its command), or its failure fails each. Under load
        this is what spares the IOC and the gateway one read per get (bench/EXPERIMENTS.md row 32).

        Where the provider calls back (PVA) and the replies cannot block, the read is started
        here and answered from the callback, with no worker in between (row 37).
        """
        pv = gets[0].pv
        get_async = getattr(self.provider(pv), "get_async", None)
        if get_async is None or not self.io.publishes_at_once(cmd.reply_topic for cmd in gets if cmd.reply_topic):
            self._submit(self._get_together, gets, at)
            return
        with self._lock:
            self._gets_reading += len(gets)
        try:
            get_async(pv.name, self.timeout, partial(self._answer_gets, gets, at))
        except Exception as e:
            self._submit(self._answer_gets, gets, at, None, e)

    def _answer_gets(self, gets: list[C.Get], at: list[Position | None], tree: dict | None,
                     error: Exception | None) -> None:
        """The end of an asynchronous read, on the provider's thread: each get answered."""
        with self._lock:
            self._gets_reading -= len(gets)

        def read(_pv: PVUri) -> dict:
            if error is not None:
                raise error
            return tree

        self._answer_each(gets, at, read)

    def _get_together(self, gets: list[C.Get], at: list[Position | None]) -> None:
        """``_read_for`` on a worker: one blocking read for all."""
        self._answer_each(gets, at, _once(self.read))

    def _answer_each(self, gets: list[C.Get], at: list[Position | None], read: Callable[[PVUri], dict]) -> None:
        for cmd, pos in zip(gets, at):
            self._run(self.on_get, cmd, read)   # never raises
            if pos is not None:
                self.io.handled(pos)

    def metrics(self) -> dict:
        """Everything the Prometheus endpoint shows, read at scrape time."""
        channels = self.hub.channels()
        with self._lock:
            commands, operations, denied = dict(self.counters), dict(self.operations), self.puts_denied
        return {
            "commands": commands, "operations": operations, "puts_denied": denied,
            "events_published": self.io.published, "bytes_published": self.io.published_bytes,
            "events_dropped": self.io.dropped, "events_coalesced": self.io.coalesced,
            "delivery_failures": self.io.delivery_failed, "producer_queue_depth": self.io.queue_depth(),
            "producer_pending_events": self.io.pending,
            "pvs_total": len(channels), "pvs_connected": sum(1 for ch in channels if ch.connected),
            "events_rate_capped": self.hub.skipped(), "events_refreshed": self.hub.refreshes,
            "epics_channels": self.channel_counts(),
            "snapshot_iterations": getattr(self.snapshots, "iterations", 0),
            "repeating_snapshots": len(getattr(self.snapshots, "running", {})),
        }

    def channel_counts(self) -> dict[str, int]:
        """EPICS channels open per protocol (idle ones are closed after --channel-idle-timeout)."""
        counts = {}
        for protocol, provider in self.providers.items():
            count = getattr(provider, "channel_count", None)
            if count is not None and protocol not in counts:
                counts[protocol] = count()
        return counts

    def provider(self, pv: PVUri) -> Provider:
        return self.providers[pv.protocol]

    def read(self, pv: PVUri) -> dict:
        return self.provider(pv).get(pv.name, self.timeout)

    # ------------------------------------------------------------- commands
    def on_get(self, cmd: C.Get, read: Callable[[PVUri], dict]) -> None:
        tree = read(cmd.pv)
        self.reply(cmd, replies.value(cmd.reply_id, cmd.pv.name, tree), cmd.pv.uri, cmd.pv.name)

    def on_put(self, cmd: C.Put, at: Position | None = None) -> None:
        """A put, applied at most once: with its position ``at``, through the put journal."""
        app = app_of(cmd.reply_topic)
        try:
            self.policy.check(cmd.pv.name, app)
        except ProtocolError as e:
            with self._lock:
                self.puts_denied += 1
            log.warning("put %s = %s by %s denied: %s", cmd.pv.uri, _short(cmd.value), app or "?", e.message)
            raise
        put = partial(self._put, cmd, app)
        message = put() if self.journal is None or at is None else self.journal.apply(at, cmd, put)
        self.reply(cmd, replies.ok(cmd.reply_id, message), cmd.pv.uri)

    def _put(self, cmd: C.Put, app: str | None) -> str:
        """Write the value to EPICS; the success message of the reply."""
        self.provider(cmd.pv).put(cmd.pv.name, cmd.value, self.timeout)
        log.info("put %s = %s by %s", cmd.pv.uri, _short(cmd.value), app or "?")
        return f"put of {cmd.pv.uri} done"

    def on_info(self, cmd: C.Info) -> None:
        # A description, not a value: msgpack-compact leaves it a map (its leaves alone would mean nothing).
        info = self.provider(cmd.pv).info(cmd.pv.name, self.timeout)
        self.reply(cmd, replies.value(cmd.reply_id, cmd.pv.name, info), cmd.pv.uri)

    def _subscribe(self, cmd: C.Monitor | C.MultiMonitor, pairs: list[tuple[PVUri, str]]) -> list[PVUri]:
        """Subscribe every (pv, topic); return the PVs not connected once one connection timeout passed.

        Those stay subscribed and are delivered once they connect, as camonitor does
        (PROTOCOL 4); a destination whose PV never sent a value gets a disconnected
        event meanwhile. A failure undoes only the pairs this command added: one that
        was there before (another client's, or resumed from the state topic) stays.
        """
        ser = cmd.serialization
        cap = combined_cap(self.opts.monitor_max_events_per_second, cmd.max_events_per_second)
        topics = list(dict.fromkeys(t for _, t in pairs))
        # Under the expiry lock: an expiry in progress may be deleting one of these topics; it finishes first.
        with self.destinations.lock:
            made = set(self.io.ensure_topics(topics))
            chans, added = [], []
            try:
                for pv, topic in pairs:
                    new = not self.hub.has_destination(pv, topic)
                    chans.append((pv, self.hub.add_destination(pv, topic, ser, cap), topic))
                    if new:
                        added.append((pv, topic))
                    # Only a topic created for this monitor may ever be deleted; a reply topic never.
                    self.destinations.add(topic, pv, created=topic in made and topic != cmd.reply_topic)
            except BaseException:
                for pv, topic in added:
                    self.hub.remove_destination(pv, topic)
                    self.destinations.discard(topic, pv)
                raise
        deadline = time.monotonic() + self.timeout  # one timeout for all, not one per PV
        unconnected = []
        for pv, ch, topic in chans:
            if not ch.first_value.wait(max(0.0, deadline - time.monotonic())):
                self.hub.announce_unconnected(pv, topic)
            if not ch.connected:
                unconnected.append(pv)
        self._remember_monitors(pairs, ser, cmd.max_events_per_second)
        self.memory.changed()  # the command's own garbage (topic creation, state records) is freed by now
        return list(dict.fromkeys(unconnected))

    def _remember_monitors(self, pairs: list[tuple[PVUri, str]], ser: C.Serialization,
                           max_rate: float | None = None) -> None:
        """Record active monitors in the state topic; a failure costs the restart, never the command."""
        if self.state is None or not pairs:
            return
        items = []
        for pv, topic in pairs:
            d = self.destinations.get(topic)
            items.append(MonitorState(C.Monitor(pv=pv, destination=topic, serialization=ser,
                                                max_events_per_second=max_rate),
                                      created_topic=d is not None and d.created))
        try:
            self.state.write(items=items)
        except Exception:
            log.exception("cannot record %d monitors in the state topic", len(items))

    def _not_connected_yet(self, pvs: list[PVUri]) -> str:
        names = ", ".join(pv.uri for pv in pvs[:20]) + (", ..." if len(pvs) > 20 else "")
        return (f"; not connected yet (no value within {self.timeout:g} s): {names}; "
                f"its events follow once it connects" if len(pvs) == 1 else
                f"; {len(pvs)} PVs not connected yet (no value within {self.timeout:g} s): {names}; "
                f"their events follow once they connect")

    def on_monitor(self, cmd: C.Monitor) -> None:
        unconnected = self._subscribe(cmd, [(cmd.pv, cmd.destination)])
        message = f"monitor of {cmd.pv.uri} active on {cmd.destination}"
        if unconnected:
            message += self._not_connected_yet(unconnected)
        self.reply(cmd, replies.ok(cmd.reply_id, message), cmd.pv.uri)

    def on_multi_monitor(self, cmd: C.MultiMonitor) -> None:
        unconnected = self._subscribe(cmd, [(pv, pv.topic) for pv in cmd.pvs])
        message = f"monitor of {len(cmd.pvs)} PVs active"
        if unconnected:
            message += self._not_connected_yet(unconnected)
        self.reply(cmd, replies.ok(cmd.reply_id, message), self._key(cmd))

    # ------------------------------------------------------------- restart and expiry
    def resume(self, states: list[State]) -> None:
        """Resume what the state topic kept (before serving): no replies, no waiting for PVs, one
        subscription per PV as for live commands. One that cannot be resumed is logged and skipped."""
        monitors = [s for s in states if isinstance(s, MonitorState)]
        if monitors:
            topics = list(dict.fromkeys(m.command.destination for m in monitors))
            try:
                self.io.ensure_topics(topics)
            except ProtocolError as e:
                log.error("cannot create the destinations of resumed monitors: %s", e.message)
            # Only the recorded flag counts: a topic recreated now may have been somebody's reply topic.
            with self.destinations.lock:
                for m in monitors:
                    cmd = m.command
                    try:
                        self.hub.add_destination(cmd.pv, cmd.destination, cmd.serialization, combined_cap(
                            self.opts.monitor_max_events_per_second, cmd.max_events_per_second))
                    except Exception:
                        log.exception("cannot resume the monitor of %s on %s", cmd.pv, cmd.destination)
                        continue
                    self.destinations.add(cmd.destination, cmd.pv, created=m.created_topic)
        snapshots = [s.command for s in states if isinstance(s, SnapshotState)]
        for cmd in snapshots:
            last = self.state.last_iteration(snapshot_topic(cmd.snapshot_name)) if self.state else 0
            try:
                self.snapshots.resume(cmd, last)
            except Exception:
                log.exception("cannot resume snapshot %s", cmd.snapshot_name)
        if states:
            log.info("resumed %d monitor destinations and %d repeating snapshots", len(monitors), len(snapshots))

    @property
    def expiry_timeout(self) -> float:
        return float(self.opts.nc_monitor_expiration_timeout)

    def start_expiry(self) -> ExpiryChecker:
        """The thread that stops monitors nobody consumes (PROTOCOL 6)."""
        self.expiry = ExpiryChecker(self.io.admin.client, self.destinations, self.expiry_timeout, self.expire,
                                    self.opts.nc_monitor_consumer_filterout_regex, purge=self.purge,
                                    recreate=self.recreate_destinations).start()
        return self.expiry

    def recreate_destinations(self) -> None:
        """Monitor destinations the topic admin forgot (a delivery found one deleted from outside) are
        created again, with the expiry lock held as when a monitor command creates them."""
        with self.destinations.lock:
            gone = self.io.admin.missing(self.destinations.topics())
            if gone:
                try:
                    self.io.ensure_topics(gone)
                    log.warning("monitor destinations deleted from outside created again: %s",
                                ", ".join(gone[:20]) + (", ..." if len(gone) > 20 else ""))
                except ProtocolError as e:
                    log.warning("cannot create deleted monitor destinations again: %s", e.message)

    def expire(self, topic: str) -> None:
        """Stop every monitor feeding ``topic``; delete the topic if it was created for them and purging is on."""
        with self.destinations.lock:
            d = self.destinations.take_expired(topic, self.expiry_timeout)
            if d is None:
                return
            for pv in d.pvs:
                self.hub.remove_destination(pv, topic)
            if self.state is not None:
                try:
                    self.state.write(removed=[monitor_key(pv, topic) for pv in d.pvs])
                except Exception:
                    log.exception("cannot record the expiry of %s in the state topic", topic)
            purge = d.created and self.opts.nc_purge_queue_on_exp_timeout
            if purge:
                self.destinations.purge_later(topic)
        log.info("monitor of %d PVs on %s expired: no consumer for %g s%s", len(d.pvs), topic, self.expiry_timeout,
                 "; its topic is to be deleted" if purge else "")

    def purge(self, topic: str) -> None:
        """Delete an expired monitor's topic, again if a producer's metadata request re-created it.

        Under the expiry lock, as expiry: a monitor command for this topic meanwhile takes it back.
        """
        with self.destinations.lock:
            try:
                exists = self.io.admin.exists(topic)
            except Exception as e:   # Kafka unreachable: look again next round
                log.warning("cannot tell whether expired monitor topic %s exists: %s", topic, e)
                return
            step = self.destinations.purge_step(topic, exists)
            if step is PurgeStep.DELETE:
                try:
                    self.io.admin.delete(topic)
                    log.info("expired monitor topic %s deleted", topic)
                except Exception as e:
                    log.warning("cannot delete expired monitor topic %s: %s", topic, e)
            elif step is PurgeStep.LEAVE:
                log.warning("expired monitor topic %s came back after %d deletions and is left in place: a producer "
                            "that wrote to it re-creates it (broker auto.create.topics.enable=true)", topic,
                            PURGE_DELETES)

    def on_status(self, cmd: C.Status) -> None:
        self.reply(cmd, replies.status(cmd.reply_id, self.status()), replies.STATUS_KEY)

    def status(self, detail: bool = True) -> dict:
        """ext: what this gateway is doing, for operators and tests (one subscription per PV is visible here).

        ``detail=False`` is the beacon's summary: no per-monitor list, so it stays small at 10k PVs.
        """
        with self._lock:
            counters = dict(self.counters)
        channels = self.hub.channels()
        with self.snapshots.lock:
            snaps = list(self.snapshots.running.values())
        counts = {ch.pv.uri: ch.events for ch in channels}
        counts["*published"], counts["*commands"] = self.io.published, counters["received"]
        rates = self.rates.sample(counts)
        doc = {
            "gateway": {**self.identity, "uptime_s": round(time.time() - self.started, 3)},
            "uptime_s": round(time.time() - self.started, 3),
            "pv_connection_timeout_s": self.timeout,
            "commands": counters,
            "subscriptions": {"active": len(channels), "opened": sum(self.hub.opened.values())},
            "pvs": {"total": len(channels), "connected": sum(1 for ch in channels if ch.connected)},
            "rates": {"events_published_per_s": rates.pop("*published"), "commands_per_s": rates.pop("*commands")},
            "monitors_active": sum(1 for ch in channels if ch.destinations),
            "epics_channels": self.channel_counts(),
            "events_rate_capped": self.hub.skipped(), "events_refreshed": self.hub.refreshes,
            "records_lost": self.io.dropped,
            "command_backlog": {"waiting": self.workers.waiting(), "reading": self._gets_reading,
                                "limit": self.opts.command_backlog,
                                "reads_paused": self.io.command_pauses},
        }
        capped(doc, "snapshots", ({"name": sn.name, "type": sn.cmd.kind.value, "pvs": len(sn.cmd.pvs),
                                   "triggered": sn.cmd.triggered, "iteration": sn.iteration,
                                   "published": sn.published, "failures": sn.failures} for sn in snaps))
        guard = self.topic_guard
        doc["reply_topics"] = {"created": len(guard.reply_topics), "limit": guard.max_reply_topics,
                               "refused": counters["reply_topic_refused"]}
        if not detail:
            return doc
        monitors = []
        for ch in channels[:STATUS_MONITORS]:
            with ch.lock:
                dests = {t: s.value for t, s in ch.destinations.items()}
                caps = {t: th.max_rate for t, th in ch.throttles.items()} if ch.throttles else None
            entry = {"pv": ch.pv.uri, "connected": ch.connected, "events": ch.events,
                     "events_per_s": rates.get(ch.pv.uri, 0.0),
                     "destinations": dests, "snapshot_taps": len(ch.taps),
                     "subscriptions_opened": self.hub.opened.get(ch.pv, 0)}
            if caps:
                entry["max_events_per_second"], entry["events_rate_capped"] = caps, ch.skipped()
            monitors.append(entry)
        capped(doc, "monitors", monitors, STATUS_MONITORS, total=len(channels))
        capped(doc, "topics_created", sorted(self.io.admin.created))
        capped(doc, "topics_purging", sorted(self.destinations.purging()))   # expired, to be deleted
        return doc

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self.expiry is not None:
            self.expiry.close()
        self.snapshots.close()
        self.workers.shutdown()
        self.hub.close()
        self.memory.close()


def _once(fn: Callable[[PVUri], dict]) -> Callable[[PVUri], dict]:
    """``fn`` called at most once: later calls get its value or raise its exception again."""
    outcome: list = []

    def call(pv: PVUri) -> dict:
        if not outcome:
            try:
                outcome.append((fn(pv), None))
            except Exception as e:
                outcome.append((None, e))
        value, error = outcome[0]
        if error is not None:
            raise error
        return value

    return call


def _loggable(text: str, limit: int = 500) -> str:
    """One log line per message, whatever the sender put into it (no forged lines)."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
