"""One EPICS subscription per PV, fanned out to every destination topic and tap.

Kafka destinations and snapshot taps share the same subscription, so a
snapshot never steals events from a monitor and vice versa (PROTOCOL 6, 7).

Two timed duties share one timer thread (``Deadlines``), started only when
one of them is asked for: the end of a rate-capped destination's interval
(``Throttle``), and the periodic re-publication of quiet PVs' current values
(``refresh_period``). Neither adds work per event for a destination without a cap.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from k2eg.protocol import replies
from k2eg.protocol.codec import encode
from k2eg.protocol.commands import Serialization
from k2eg.protocol.uri import PVUri

from .epics.base import Deadlines, Provider, Subscription, disconnected, is_disconnected

log = logging.getLogger("k2eg.gateway.monitors")

Publish = Callable[[str, str, bytes, Serialization], None]
Tap = Callable[["Channel", dict], None]


class FirstValue:
    """``threading.Event`` for "the PV has a value", made only if someone waits before it has one.

    A threading.Event per PV costs ~1 KB: 10 MB at 10k PVs, for a wait that
    happens only while a monitor or snapshot command is being answered.
    """

    __slots__ = ("_done", "_event")
    _lock = threading.Lock()  # shared: taken once per PV on its first value, and by waiters

    def __init__(self) -> None:
        self._done = False
        self._event: threading.Event | None = None

    def is_set(self) -> bool:
        return self._done

    def set(self) -> None:
        with self._lock:
            self._done = True
            event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)


class Throttle:
    """At most one publication per interval; inside an interval the newest value waits for its end.

    A pure state machine: fed values (``offer``) and the ends of its intervals
    (``tick``), it answers what to publish now and whether an interval end must
    be scheduled. An interval starts with each publication; a value arriving
    while one runs is held, replacing (and counting as skipped) the one held
    before, and goes out when the interval ends, which starts the next one. A
    late tick stretches an interval, so the cap is never exceeded.
    """

    __slots__ = ("interval", "max_rate", "held", "running", "skipped")

    def __init__(self, max_rate: float):
        if not max_rate > 0:
            raise ValueError(f"a rate cap must be greater than 0, got {max_rate}")
        self.max_rate = max_rate
        self.interval = 1.0 / max_rate
        self.held: Any = None
        self.running = False  # an interval runs: its end is scheduled
        self.skipped = 0      # values replaced by a newer one before they could go out

    def offer(self, value: Any) -> tuple[Any, bool]:
        """(``value`` if it goes out now else None, True if an interval end is to be scheduled)."""
        if not self.running:
            self.running = True
            return value, True
        if self.held is not None:
            self.skipped += 1
        self.held = value
        return None, False

    def tick(self) -> tuple[Any, bool]:
        """An interval ended: (the held value to publish or None, True if the next end is to be scheduled)."""
        held, self.held = self.held, None
        self.running = held is not None
        return held, self.running


def combined_cap(*caps: float | None) -> float | None:
    """The tightest of several rate caps (None or 0: no cap)."""
    real = [c for c in caps if c]
    return min(real) if real else None


@dataclass(eq=False, slots=True)
class Channel:
    """A PV the gateway is subscribed to, with everyone who wants its events."""

    pv: PVUri
    destinations: dict[str, Serialization] = field(default_factory=dict)  # topic -> serialisation
    taps: set = field(default_factory=set)
    last: dict | None = None
    events: int = 0
    first_value: FirstValue = field(default_factory=FirstValue)
    subscription: Subscription | None = None
    started: float = field(default_factory=time.monotonic)
    throttles: dict[str, Throttle] | None = None  # topic -> its rate cap, for capped destinations only
    refreshed: int = -1  # ``events`` at the last refresh sweep: unchanged means quiet for a whole period
    # Orders an event's fan-out against a joining destination's re-publish, so a
    # destination never sees a value twice or an older value after a newer one.
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def connected(self) -> bool:
        last = self.last
        return last is not None and not is_disconnected(last)

    @property
    def idle(self) -> bool:
        return not self.destinations and not self.taps

    def skipped(self) -> int:
        """Values its rate caps left out so far (destinations still capped)."""
        throttles = self.throttles
        return sum(t.skipped for t in list(throttles.values())) if throttles else 0


class MonitorHub:
    def __init__(self, providers: dict[str, Provider], publish: Publish, on_change: Callable[[], None] | None = None,
                 refresh_period: float = 0.0):
        """``refresh_period`` > 0: every PV that published nothing for that many seconds publishes its
        current value again to each destination (the ESS forwarder's ``pv-update-period``)."""
        self._providers = providers
        self._publish = publish
        self._on_change = on_change  # a PV subscribed or dropped (the gateway trims freed memory after)
        self._channels: dict[PVUri, Channel] = {}
        self._lock = threading.RLock()
        self.opened: dict[PVUri, int] = {}  # EPICS subscriptions ever opened per PV (status, tests)
        self.skipped_retired = 0  # skipped counts of rate caps no longer in place (the total only grows)
        self.refreshes = 0  # values re-published by the refresh sweep
        self._timer: Deadlines | None = None
        self._timer_lock = threading.Lock()  # a leaf lock: taken under channel locks
        self._closed = False
        self._refresh_period = refresh_period
        if refresh_period > 0:
            self._schedule(refresh_period, self._refresh)

    def _schedule(self, after: float, fn: Callable[[], None]) -> None:
        """``fn`` on the timer thread in ``after`` seconds (never once the hub is closed)."""
        with self._timer_lock:
            if self._closed:
                return
            if self._timer is None:
                self._timer = Deadlines("k2eg-monitor-timer")
            self._timer.add(after, fn)

    # ------------------------------------------------------------- subscribe
    def _channel(self, pv: PVUri) -> Channel:
        """The channel of ``pv``, subscribing on first use (caller holds the lock)."""
        ch = self._channels.get(pv)
        if ch is None:
            ch = Channel(pv)
            ch.subscription = self._providers[pv.protocol].monitor(pv.name, partial(self._on_event, ch))
            self._channels[pv] = ch
            self.opened[pv] = self.opened.get(pv, 0) + 1
            if self._on_change is not None:
                self._on_change()
        return ch

    def has_destination(self, pv: PVUri, topic: str) -> bool:
        ch = self._channels.get(pv)
        return ch is not None and topic in ch.destinations

    def add_destination(self, pv: PVUri, topic: str, ser: Serialization, max_rate: float | None = None) -> Channel:
        """Route ``pv``'s events to ``topic``, at most ``max_rate`` a second; a known value is re-published at once."""
        with self._lock:
            ch = self._channel(pv)
            with ch.lock:
                ch.destinations[topic] = ser
                self._set_cap(ch, topic, max_rate)
                last = ch.last
                if last is not None:
                    self._fan_out(ch, last, {topic: ser})
        return ch

    def _set_cap(self, ch: Channel, topic: str, max_rate: float | None) -> None:
        """Under ch.lock: ``topic``'s cap becomes ``max_rate`` (None: none); a changed cap starts afresh."""
        old = ch.throttles.get(topic) if ch.throttles else None
        if old is not None and old.max_rate == max_rate:
            return
        if old is not None:
            del ch.throttles[topic]
            self.skipped_retired += old.skipped
        if max_rate:
            if ch.throttles is None:
                ch.throttles = {}
            ch.throttles[topic] = Throttle(max_rate)
        elif not ch.throttles:
            ch.throttles = None  # the event path checks one attribute

    def announce_unconnected(self, pv: PVUri, topic: str) -> bool:
        """A disconnected event to ``topic`` for a PV that never sent a value (PROTOCOL 4); False if it has one.

        Under the channel's lock: a value that arrived meanwhile has gone out, and this
        event must not follow it.
        """
        ch = self._channels.get(pv)
        if ch is None:
            return False
        with ch.lock:
            ser = ch.destinations.get(topic)
            if ch.last is not None or ser is None:
                return False
            status = getattr(self._providers[pv.protocol], "disconnected_status", 9)
            self._fan_out(ch, disconnected(None, status), {topic: ser})
        return True

    def add_tap(self, pv: PVUri, tap: Tap) -> Channel:
        with self._lock:
            ch = self._channel(pv)
            ch.taps.add(tap)
            return ch

    def remove_tap(self, pv: PVUri, tap: Tap) -> None:
        with self._lock:
            ch = self._channels.get(pv)
            if ch is not None:
                ch.taps.discard(tap)
                self._drop_if_idle(ch)

    def remove_destination(self, pv: PVUri, topic: str) -> None:
        with self._lock:
            ch = self._channels.get(pv)
            if ch is not None:
                with ch.lock:
                    ch.destinations.pop(topic, None)
                    self._set_cap(ch, topic, None)
                self._drop_if_idle(ch)

    def _drop_if_idle(self, ch: Channel) -> None:
        if ch.idle and self._channels.get(ch.pv) is ch:
            del self._channels[ch.pv]
            if ch.subscription is not None:
                try:
                    ch.subscription.close()
                except Exception as e:
                    log.warning("closing subscription of %s: %s", ch.pv, e)
            if self._on_change is not None:
                self._on_change()

    # ------------------------------------------------------------- events
    def _on_event(self, ch: Channel, tree: dict) -> None:
        """EPICS callback thread: encode once per serialisation, publish to each destination."""
        with ch.lock:  # destinations change only under it: no copy needed
            ch.last = tree
            ch.events += 1
            if ch.throttles:
                self._fan_out_capped(ch, tree)
            else:
                self._fan_out(ch, tree, ch.destinations)
        if not ch.first_value.is_set():
            ch.first_value.set()
        if not ch.taps:
            return
        for tap in list(ch.taps):
            try:
                tap(ch, tree)
            except Exception:
                log.exception("snapshot tap of %s failed", ch.pv)

    def _fan_out(self, ch: Channel, tree: dict, destinations: dict[str, Serialization]) -> None:
        """Under ch.lock: ``tree`` to each of ``destinations``, encoded once per serialisation."""
        name = ch.pv.name
        encoded: dict[Serialization, bytes | None] = {}
        for topic, ser in destinations.items():
            if ser not in encoded:
                try:
                    encoded[ser] = encode(replies.event(name, tree), ser, name)
                except Exception as e:  # a value we cannot encode must not kill the callback thread
                    log.error("cannot encode event of %s as %s: %s", ch.pv, ser.value, e)
                    encoded[ser] = None
            data = encoded[ser]
            if data is not None:
                self._publish(topic, name, data, ser)

    def _fan_out_capped(self, ch: Channel, tree: dict) -> None:
        """Under ch.lock: like ``_fan_out``, each capped destination's throttle deciding for it."""
        now: dict[str, Serialization] = {}
        throttles = ch.throttles
        for topic, ser in ch.destinations.items():
            throttle = throttles.get(topic)
            if throttle is None:
                now[topic] = ser
                continue
            out, schedule = throttle.offer(tree)
            if out is not None:
                now[topic] = ser
            if schedule:
                self._schedule(throttle.interval, partial(self._interval_end, ch, topic, throttle))
        if now:
            self._fan_out(ch, tree, now)

    def _interval_end(self, ch: Channel, topic: str, throttle: Throttle) -> None:
        """Timer thread: a capped destination's interval ended; what it held goes out now."""
        try:
            with ch.lock:
                if not ch.throttles or ch.throttles.get(topic) is not throttle:
                    return  # cap removed or changed since
                out, schedule = throttle.tick()
                if out is not None:
                    self._fan_out(ch, out, {topic: ch.destinations[topic]})
                if schedule:
                    self._schedule(throttle.interval, partial(self._interval_end, ch, topic, throttle))
        except Exception:
            log.exception("rate cap of %s on %s failed", ch.pv, topic)

    def _refresh(self) -> None:
        """Timer thread: each PV quiet for a whole period publishes its current value again; then re-arms."""
        try:
            for ch in self.channels():
                with ch.lock:
                    quiet, ch.refreshed = ch.events == ch.refreshed, ch.events
                    if not quiet or ch.last is None or not ch.destinations:
                        continue
                    if ch.throttles:
                        self._fan_out_capped(ch, ch.last)
                    else:
                        self._fan_out(ch, ch.last, ch.destinations)
                    self.refreshes += 1
        except Exception:
            log.exception("periodic refresh of monitored values failed")
        finally:
            self._schedule(self._refresh_period, self._refresh)

    # ------------------------------------------------------------- introspection
    def channels(self) -> list[Channel]:
        with self._lock:
            return list(self._channels.values())

    def get(self, pv: PVUri) -> Channel | None:
        return self._channels.get(pv)

    def skipped(self) -> int:
        """Values the rate caps have left out since start (the newest of an interval replaced them)."""
        return self.skipped_retired + sum(ch.skipped() for ch in self.channels() if ch.throttles)

    def close(self) -> None:
        with self._lock:
            chans = list(self._channels.values())
            self._channels.clear()
        with self._timer_lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.close()
        for ch in chans:
            if ch.subscription is not None:
                try:
                    ch.subscription.close()
                except Exception as e:
                    log.warning("closing subscription of %s: %s", ch.pv, e)
