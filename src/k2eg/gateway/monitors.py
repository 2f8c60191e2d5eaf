"""One EPICS subscription per PV, fanned out to every destination topic and tap.

Kafka destinations and snapshot taps share the same subscription, so a
snapshot never steals events from a monitor and vice versa (PROTOCOL 6, 7).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from k2eg.protocol import replies
from k2eg.protocol.codec import encode
from k2eg.protocol.commands import Serialization
from k2eg.protocol.uri import PVUri

from .epics.base import Provider, Subscription

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
    # Orders an event's fan-out against a joining destination's re-publish, so a
    # destination never sees a value twice or an older value after a newer one.
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def connected(self) -> bool:
        last = self.last
        return last is not None and not _is_disconnected(last)

    @property
    def idle(self) -> bool:
        return not self.destinations and not self.taps


def _is_disconnected(tree: dict) -> bool:
    alarm = tree.get("alarm") if isinstance(tree, dict) else None
    return isinstance(alarm, dict) and alarm.get("message") == "disconnected" and alarm.get("severity") == 3


class MonitorHub:
    def __init__(self, providers: dict[str, Provider], publish: Publish, on_change: Callable[[], None] | None = None):
        self._providers = providers
        self._publish = publish
        self._on_change = on_change  # a PV subscribed or dropped (the gateway trims freed memory after)
        self._channels: dict[PVUri, Channel] = {}
        self._lock = threading.RLock()
        self.opened: dict[PVUri, int] = {}  # EPICS subscriptions ever opened per PV (status, tests)

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

    def add_destination(self, pv: PVUri, topic: str, ser: Serialization) -> Channel:
        """Route ``pv``'s events to ``topic``; a known value is re-published at once."""
        with self._lock:
            ch = self._channel(pv)
            with ch.lock:
                ch.destinations[topic] = ser
                last = ch.last
                if last is not None:
                    try:
                        data = encode(replies.event(pv.name, last), ser, pv.name)
                    except Exception as e:  # same rule as for events: log, keep the subscription
                        log.error("cannot encode event of %s as %s: %s", pv, ser.value, e)
                    else:
                        self._publish(topic, pv.name, data, ser)
        return ch

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
        name = ch.pv.name
        with ch.lock:  # destinations change only under it: no copy needed
            ch.last = tree
            ch.events += 1
            encoded: dict[Serialization, bytes | None] = {}
            for topic, ser in ch.destinations.items():
                if ser not in encoded:
                    try:
                        encoded[ser] = encode(replies.event(name, tree), ser, name)
                    except Exception as e:  # a value we cannot encode must not kill the callback thread
                        log.error("cannot encode event of %s as %s: %s", ch.pv, ser.value, e)
                        encoded[ser] = None
                data = encoded[ser]
                if data is not None:
                    self._publish(topic, name, data, ser)
        if not ch.first_value.is_set():
            ch.first_value.set()
        if not ch.taps:
            return
        for tap in list(ch.taps):
            try:
                tap(ch, tree)
            except Exception:
                log.exception("snapshot tap of %s failed", ch.pv)

    # ------------------------------------------------------------- introspection
    def channels(self) -> list[Channel]:
        with self._lock:
            return list(self._channels.values())

    def get(self, pv: PVUri) -> Channel | None:
        return self._channels.get(pv)

    def close(self) -> None:
        with self._lock:
            chans = list(self._channels.values())
            self._channels.clear()
        for ch in chans:
            if ch.subscription is not None:
                try:
                    ch.subscription.close()
                except Exception as e:
                    log.warning("closing subscription of %s: %s", ch.pv, e)
