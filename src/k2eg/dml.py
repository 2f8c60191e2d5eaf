"""The k2eg client facade: the 0.3.0 API (names, arguments, return shapes) on a sound transport.

Every method is safe to call from many threads at once; each waits only for
its own reply.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Dict

from confluent_kafka import Consumer, TopicPartition

from k2eg.broker import SnapshotProperties, SnapshotType
from k2eg.client.environment import load as load_environment
from k2eg.client.errors import ClientClosed, MonitorNotActive, OperationError, OperationTimeout
from k2eg.client.transport import ClientTransport
from k2eg.client.values import put_value_map
from k2eg.protocol import commands as C
from k2eg.protocol.errors import ProtocolError
from k2eg.protocol.snapshots import IterationAssembler, OneShotCollector
from k2eg.protocol.uri import SNAPSHOT_NAME, gateway_status_topic, parse_pv_uri, pv_topic, snapshot_topic

__all__ = ["dml", "OperationTimeout", "OperationError", "SnapshotProperties", "SnapshotType"]

logger = logging.getLogger(__name__)

GATEWAY_BEACON_S = 10.0  # how often gateways announce themselves (k2eg.gateway.status)


# The rules both clients (this threaded one and k2eg.aio) apply to what users pass and what the gateway answers.

def check_app_name(app_name: Any) -> None:
    if app_name is None:
        raise ValueError("The app name is mandatory")
    if not isinstance(app_name, str) or not app_name or not all(c.isalnum() or c in "._-" for c in app_name):
        raise ValueError(f"invalid app name {app_name!r}: use letters, digits, '.', '_' or '-' (it names a Kafka topic)")


def parse_pv(pv_url: str):
    """``pva://name`` -> a ``PvUri``; ValueError naming the problem."""
    try:
        return parse_pv_uri(pv_url)
    except ProtocolError as e:
        raise ValueError(e.message) from None


def parse_pvs(pv_uri_list: list[str]) -> tuple:
    if not isinstance(pv_uri_list, (list, tuple)) or not pv_uri_list:
        raise ValueError("pv_uri_list must be a non-empty list of PV URIs")
    return tuple(dict.fromkeys(parse_pv(u) for u in pv_uri_list))


def reply_or_raise(rec: dict | None, what: str) -> dict:
    """The gateway's reply, or OperationTimeout (none came) / OperationError (it refused)."""
    if rec is None:
        raise OperationTimeout(f"Timeout during {what}")
    error = rec.get("error", 0)
    if error != 0:
        raise OperationError(error, rec.get("message"))
    return rec


def check_snapshot_name(snapshot_name: str) -> None:
    if not isinstance(snapshot_name, str) or not SNAPSHOT_NAME.match(snapshot_name):
        raise ValueError(f"Invalid snapshot name '{snapshot_name}'. Only alphanumeric characters, "
                         "dashes, and underscores are allowed.")


def repeating_snapshot_command(envelope: dict, properties: SnapshotProperties) -> tuple[C.RepeatingSnapshot, tuple]:
    """The command starting ``properties``' snapshot, and its PVs."""
    properties.validate()
    pvs = parse_pvs(properties.pv_uri_list)
    return C.RepeatingSnapshot(
        **envelope, snapshot_name=properties.snapshot_name, pvs=pvs, time_window_msec=properties.time_window,
        repeat_delay_msec=properties.repeat_delay, sub_push_delay_msec=properties.sub_push_delay_msec,
        triggered=properties.triggered, kind=C.SnapshotKind(SnapshotType(properties.type).value),
        field_filter=tuple(properties.pv_field_filter_list or ())), pvs


def one_shot_result(result: dict) -> dict:
    """A completed one-shot snapshot, or OperationError when the gateway refused the whole command."""
    error = result.get("error", 0)
    if error:
        raise OperationError(error, result.get("message") or f"snapshot refused with error {error}")
    result["error"] = 0
    return result


class dml:  # noqa: N801 - the 0.3.0 name
    """K2EG client: ``dml(environment_id, app_name)``; use as a context manager or call ``close()``."""

    def __init__(self, environment_id: str, app_name: str, group_name: str | None = None,
                 poll_timeout: float = 0.01, serialization: str = "msgpack", startup_timeout: float = 10.0):
        check_app_name(app_name)
        self._transport: ClientTransport | None = None
        self._serialization = C.Serialization.parse(serialization)
        self.environment = load_environment(environment_id)
        self.app_name = app_name
        self._close_lock = threading.Lock()
        # Bounded: an unreachable broker is a KafkaUnavailable naming it and the environment file.
        self._transport = ClientTransport(self.environment, app_name, group_name, startup_timeout)
        self._monitors: dict[str, Callable[[str, dict], None]] = {}     # pv name -> handler
        self._recurring: dict[str, tuple[str, IterationAssembler]] = {}  # snapshot name -> (topic, assembler)
        self._lock = threading.Lock()
        logger.info("k2eg client for environment '%s' (%s), app '%s'", environment_id,
                    self.environment.kafka_broker_url, app_name)

    # ------------------------------------------------------------- helpers
    def __enter__(self) -> "dml":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def reply_topic(self) -> str:
        return self._t.reply_topic

    @property
    def _t(self) -> ClientTransport:
        if self._transport is None:
            raise ClientClosed("this k2eg client is closed")
        return self._transport

    def parse_pv_url(self, pv_url: str) -> tuple[str, str]:
        """``pva://name`` -> ``("pva", "name")``; ValueError naming the problem."""
        pv = parse_pv(pv_url)
        return pv.protocol, pv.name

    _pv = staticmethod(parse_pv)
    _pvs = staticmethod(parse_pvs)

    def _envelope(self) -> dict:
        return {"reply_topic": self._t.reply_topic, "reply_id": self._t.reply_id(), "serialization": self._serialization}

    def _call(self, cmd: C.Command, timeout: float | None, what: str) -> dict:
        return reply_or_raise(self._t.request(cmd, timeout), what)

    # ------------------------------------------------------------- operations
    def wait_for_backends(self, timeout: float = 30.0) -> bool:
        """The reply topic exists and is read (already true once the constructor returns)."""
        return self._t.admin.ensure([self._t.reply_topic], timeout) is not None

    def get(self, pv_url: str, timeout: float | None = None):
        pv = self._pv(pv_url)
        rec = self._call(C.Get(**self._envelope(), pv=pv), timeout, f"get operation for {pv.name}")
        return rec[pv.name] if pv.name in rec else rec

    def put(self, pv_url: str, value: Any, timeout: float | None = None):
        pv = self._pv(pv_url)
        cmd = C.Put(**self._envelope(), pv=pv, value=put_value_map(value))
        return self._call(cmd, timeout, f"put operation for {pv.name}")

    def info(self, pv_url: str, timeout: float | None = None) -> dict:
        """ext: protocol, connection state, native type and structure of a PV."""
        pv = self._pv(pv_url)
        rec = self._call(C.Info(**self._envelope(), pv=pv), timeout, f"info operation for {pv.name}")
        return rec.get(pv.name, rec)

    def status(self, timeout: float | None = None) -> dict:
        """ext: the state of the gateway that consumes the command topic (monitors, snapshots, rates)."""
        return self._call(C.Status(**self._envelope()), timeout, "status")["status"]

    def gateways(self, window_s: float = 3 * GATEWAY_BEACON_S, timeout: float = 10.0) -> list[dict]:
        """ext: every gateway of this environment's command topic that announced itself in the last ``window_s``.

        Read from the gateways' beacon topic, so gateways on standby (or just
        gone) are listed too; each entry gains ``last_seen_s``.
        """
        topic = gateway_status_topic(self.environment.cmd_topic)
        consumer = Consumer(self._t._config({"enable.partition.eof": True}, group_id=f"{self.app_name}-status",
                                            enable_auto_commit=False))
        try:
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            if meta is None or meta.error is not None:  # no gateway ever announced itself here
                return []
            since = int((time.time() - window_s) * 1000)
            start = consumer.offsets_for_times([TopicPartition(topic, 0, since)], timeout=timeout)[0]
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
            if start.offset < 0 or start.offset >= high:
                return []
            consumer.assign([TopicPartition(topic, 0, start.offset)])
            latest: dict[bytes, tuple[float, dict]] = {}
            deadline = time.monotonic() + timeout
            position = start.offset
            while position < high and time.monotonic() < deadline:
                m = consumer.poll(0.5)
                if m is None or m.error() is not None:
                    continue
                position = m.offset() + 1
                try:
                    doc = json.loads(m.value())
                except (TypeError, ValueError):
                    continue
                if isinstance(doc, dict):
                    latest[m.key()] = (m.timestamp()[1] / 1000, doc)
        finally:
            consumer.close()
        now = time.time()
        return [{**doc, "last_seen_s": round(max(0.0, now - seen), 1)} for seen, doc in latest.values()]

    # ------------------------------------------------------------- monitors
    def _on_monitor_record(self, topic: str, rec: Any) -> None:
        if not isinstance(rec, dict) or not rec:
            return
        name = next(iter(rec))
        t = self._transport  # None once closing: drop the event quietly
        if t is not None and name in self._monitors:
            t.call_soon(self._deliver, name, rec[name])

    def _deliver(self, name: str, value: Any) -> None:
        # Looked up on the dispatcher thread, so no call starts after stop_monitor returns.
        handler = self._monitors.get(name)
        if handler is not None:
            handler(name, value)

    def monitor(self, pv_url: str, handler: Callable[[str, dict], None], timeout: float | None = None):
        """Call ``handler(pv_name, value)`` for every update; returns the gateway's reply (None if already active)."""
        pv = self._pv(pv_url)
        with self._lock:
            if pv.name in self._monitors:
                logger.info("Monitor already active for pv %s", pv.name)
                return None
        rec = self._call(C.Monitor(**self._envelope(), pv=pv, destination=pv.topic), timeout,
                         f"start monitor operation for {pv.name}")
        with self._lock:
            self._monitors[pv.name] = handler
        self._t.subscribe(pv.topic, self._on_monitor_record)
        return rec

    def monitor_many(self, pv_uri_list: list[str], handler: Callable[[str, dict], None], timeout: float | None = None):
        pvs = self._pvs(pv_uri_list)
        with self._lock:
            new = tuple(pv for pv in pvs if pv.name not in self._monitors)
        if not new:
            return None
        rec = self._call(C.MultiMonitor(**self._envelope(), pvs=new), timeout,
                         f"start monitor operation for {len(new)} PVs")
        with self._lock:
            for pv in new:
                self._monitors[pv.name] = handler
        for pv in new:
            self._t.subscribe(pv.topic, self._on_monitor_record)
        return rec

    def stop_monitor(self, pv_name: str) -> None:
        """Stop delivering updates of ``pv_name`` (bare name as in 0.3.0, or a URI)."""
        name = self._pv(pv_name).name if "://" in str(pv_name) else pv_name
        with self._lock:
            if name not in self._monitors:
                raise MonitorNotActive(f"no active monitor for PV '{name}' (active: {', '.join(sorted(self._monitors)) or 'none'})")
            del self._monitors[name]
            shared = any(pv_topic(other) == pv_topic(name) for other in self._monitors)  # e.g. a:b and a_b
        if not shared:
            self._t.unsubscribe(pv_topic(name))

    # ------------------------------------------------------------- snapshots
    def snapshot(self, pv_uri_list: list[str], handler: Callable[[str, dict], None],
                 time_window_msec: int = 1000) -> str:
        """One-shot snapshot; ``handler(reply_id, {pv_name: [values]})`` runs once it completes."""
        pvs = self._pvs(pv_uri_list)
        env = self._envelope()
        rid = env["reply_id"]

        def done(result: dict) -> None:
            self._t.close_stream(rid)
            self._t.call_soon(handler, rid, result)

        self._t.open_stream(rid, OneShotCollector([pv.name for pv in pvs], done).feed)
        self._t.send(C.Snapshot(**env, pvs=pvs, time_window_msec=time_window_msec))
        return rid

    def snapshot_sync(self, pv_uri_list: list[str], timeout: float = 10.0, time_window_msec: int = 1000) -> dict:
        result: dict = {}
        finished = threading.Event()

        def handler(_rid: str, data: dict) -> None:
            result.update(data)
            finished.set()

        rid = self.snapshot(pv_uri_list, handler, time_window_msec)
        if not finished.wait(timeout):
            self._t.close_stream(rid)
            raise OperationTimeout(f"Timeout during snapshot operation for {pv_uri_list}")
        return one_shot_result(result)

    def snapshot_recurring(self, properties: SnapshotProperties, handler: Callable[[str, Dict[str, Any]], None],
                           timeout: float | None = None):
        """Start a repeating snapshot; ``handler(snapshot_name, iteration_dict)`` runs once per iteration."""
        cmd, pvs = repeating_snapshot_command(self._envelope(), properties)
        name = properties.snapshot_name
        topic = snapshot_topic(name)
        def deliver(data: dict) -> None:
            t = self._transport  # None once closing: drop the iteration quietly
            if t is not None:
                t.call_soon(handler, name, data)

        assembler = IterationAssembler(name, [pv.name for pv in pvs], deliver)
        with self._lock:
            self._recurring[name] = (topic, assembler)
        # Read the stream before the first iteration can be published.
        self._t.admin.ensure([topic])
        self._t.subscribe(topic, lambda _topic, rec: assembler.feed(rec))
        self._t.wait_assigned(topic, 30.0)
        try:
            rec = self._call(cmd, timeout, f"the submission of snapshot {name}")
        except Exception:
            self._forget_recurring(name)
            raise
        published = rec.get("publishing_topic")
        if published and published != topic:
            self._t.unsubscribe(topic)
            self._t.subscribe(published, lambda _topic, r: assembler.feed(r))
            with self._lock:
                self._recurring[name] = (published, assembler)
        return rec

    def _forget_recurring(self, name: str) -> None:
        with self._lock:
            entry = self._recurring.pop(name, None)
        if entry is not None:
            self._t.unsubscribe(entry[0])

    def snapshot_trigger(self, snapshot_name: str, timeout: float | None = None, tags: dict | None = None):
        """Fire one iteration of a triggered repeating snapshot."""
        self._validate_snapshot_name(snapshot_name)
        cmd = C.SnapshotTrigger(**self._envelope(), snapshot_name=snapshot_name, tags=dict(tags or {}))
        return self._call(cmd, timeout, f"triggering the snapshot {snapshot_name}")

    snapshost_trigger = snapshot_trigger  # 0.3.0's spelling, kept for existing scripts

    def snapshot_stop(self, snapshot_name: str, timeout: float | None = None):
        self._validate_snapshot_name(snapshot_name)
        cmd = C.SnapshotStop(**self._envelope(), snapshot_name=snapshot_name)
        try:
            rec = self._call(cmd, timeout, f"stopping the snapshot {snapshot_name}")
            # The reply names the final iteration: keep reading until its handler call is queued.
            final = rec.get("iter_index")
            with self._lock:
                entry = self._recurring.get(snapshot_name)
            if entry is not None and isinstance(final, int) and final > 0:
                deadline = time.monotonic() + (5.0 if timeout is None else timeout)
                while (entry[1].last_iteration or 0) < final and time.monotonic() < deadline:
                    time.sleep(0.01)
                # Queued is not handled: wait until the dispatcher has run everything before us.
                drained = threading.Event()
                self._t.call_soon(drained.set)
                drained.wait(max(0.0, deadline - time.monotonic()))
            return rec
        finally:
            self._forget_recurring(snapshot_name)

    _validate_snapshot_name = staticmethod(check_snapshot_name)

    # ------------------------------------------------------------- close
    def close(self) -> None:
        """Idempotent, thread-safe, and allowed inside a handler; waiting calls get ClientClosed."""
        lock = getattr(self, "_close_lock", None)
        if lock is None:  # the constructor failed before the transport existed
            return
        with lock:
            t, self._transport = self._transport, None
        if t is not None:
            t.close()

    # ------------------------------------------------------------- archive (ext, k2eg-archiver)
    @property
    def archive_topic(self) -> str:
        """The archiver's command topic for this environment: ``<k2eg_cmd_topic>-archive``."""
        from k2eg.archiver.wire import archive_topic
        return archive_topic(self.environment.cmd_topic)

    def _archive(self, command: str, timeout: float | None, **fields: Any) -> list[dict]:
        """One archive command, its answer records (all parts); errors raise OperationError."""
        from k2eg.archiver import wire
        rid = self._t.reply_id()
        data = wire.command(command, self._t.reply_topic, rid, **fields)
        parts = self._t.request_parts(self.archive_topic, data, command, rid, 30.0 if timeout is None else timeout)
        for rec in parts:
            if rec.get("error", 0) != 0:
                raise OperationError(rec["error"], rec.get("message"))
        if not parts or not any(r.get("last") for r in parts):
            raise OperationTimeout(f"Timeout during archive {command}: no complete answer from an archiver on "
                                   f"topic '{self.archive_topic}' (is k2eg-archiver running?)")
        return parts

    @staticmethod
    def _ns(when: Any, what: str) -> int:
        from k2eg.archiver.wire import to_ns
        return to_ns(when, what)

    def history(self, pv_url: str, start: Any, end: Any, timeout: float | None = None, as_frame: bool = False):
        """ext: every archived value of a PV with ``start <= time <= end`` (EPICS time), in time order.

        Times: datetimes, ISO 8601 strings, or seconds since 1970. Returns value
        trees as a monitor handler got them, or a pandas DataFrame with ``as_frame``.
        """
        from k2eg.archiver import results
        pv = self._pv(pv_url)
        parts = self._archive("history", timeout, pv_name=pv.name, start_ns=self._ns(start, "start"),
                              end_ns=self._ns(end, "end"))
        cols = results.columns_of(parts)
        return results.frame(cols) if as_frame else results.trees(cols)

    def values_at(self, pv_urls: list[str], when: Any, timeout: float | None = None, as_frame: bool = False):
        """ext: for each PV its newest archived value at or before ``when`` (None if there is none), as the
        Archiver Appliance's getDataAtTime; ``{pv_url: tree}``, or a DataFrame with ``as_frame``."""
        from k2eg.archiver import results
        pvs = self._pvs(pv_urls)
        parts = self._archive("values_at", timeout, pv_name_list=[p.name for p in pvs],
                              at_ns=self._ns(when, "when"))
        cols = results.columns_of(parts)
        if as_frame:
            return results.frame(cols)
        found = dict(zip(cols["pv"], results.trees(cols)))
        return {url: found.get(pv.name) for url, pv in zip(dict.fromkeys(pv_urls), pvs)}

    def snapshot_at(self, snapshot_name: str, when: Any, timeout: float | None = None, as_frame: bool = False):
        """ext: the newest archived iteration of a repeating snapshot completed at or before ``when``, shaped as
        ``snapshot_recurring`` handlers receive it (None if there is none)."""
        from k2eg.archiver import results
        self._validate_snapshot_name(snapshot_name)
        its = results.iterations_of(self._archive("snapshot_at", timeout, snapshot_name=snapshot_name,
                                                  at_ns=self._ns(when, "when")))
        if as_frame:
            return results.snapshot_frame(its)
        return its[0] if its else None

    def snapshot_iterations(self, snapshot_name: str, start: Any = None, end: Any = None,
                            timeout: float | None = None, as_frame: bool = False):
        """ext: every archived iteration of a repeating snapshot completed within ``[start, end]`` (None:
        unbounded), oldest first, each shaped as ``snapshot_recurring`` handlers receive it."""
        from k2eg.archiver import results
        self._validate_snapshot_name(snapshot_name)
        fields: dict[str, Any] = {"snapshot_name": snapshot_name}
        if start is not None:
            fields["start_ns"] = self._ns(start, "start")
        if end is not None:
            fields["end_ns"] = self._ns(end, "end")
        its = results.iterations_of(self._archive("snapshot_iterations", timeout, **fields))
        return results.snapshot_frame(its) if as_frame else its

    def archive_add(self, pvs: list[str] = (), snapshots: list[str] = (), timeout: float | None = None) -> dict:
        """ext: archive these PVs (names, fnmatch patterns, or URIs: a URI is also monitored) and snapshots."""
        return self._archive("archive_add", timeout, pvs=list(pvs), snapshots=list(snapshots))[-1]["archive"]

    def archive_remove(self, pvs: list[str] = (), snapshots: list[str] = (), timeout: float | None = None) -> dict:
        """ext: stop archiving these PV entries and snapshots (what is stored stays)."""
        return self._archive("archive_remove", timeout, pvs=list(pvs), snapshots=list(snapshots))[-1]["archive"]

    def archive_list(self, timeout: float | None = None) -> dict:
        """ext: what the archivers archive: ``{"pvs": [...], "snapshots": [...]}``."""
        return self._archive("archive_list", timeout)[-1]["archive"]
