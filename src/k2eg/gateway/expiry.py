"""Monitor expiry (PROTOCOL 6): a destination nobody consumes stops feeding Kafka.

A monitor's destination topic is *consumed* while a consumer group with an
active member has it in that member's assignment. Clients read monitor topics
through a consumer group (subscribe), reply topics by assign without a group,
so a reply topic never counts as consumed -- and is never deleted, since the
gateway only deletes a topic it created for the monitor itself.

Groups whose id fully matches one of ``--nc-monitor-consumer-filterout-regex``
are ignored (tools that read everything, such as mirrors or archivers, would
otherwise keep every monitor alive).

A destination expires once ``--nc-monitor-expiration-timeout`` seconds have
passed since the first check that found it unconsumed (and still finds it so),
so it has had no consumer for at least the timeout and at most one check
period more. A monitor command renews it; a resumed monitor starts unobserved
like a new one. A check that cannot ask Kafka changes nothing.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient

from k2eg.protocol.uri import PVUri

log = logging.getLogger("k2eg.gateway.expiry")

MAX_PERIOD_S = 30.0     # checks happen at least this often...
MIN_PERIOD_S = 0.5      # ...and at most this often, whatever the timeout
DESCRIBE_CHUNK = 100    # groups per describe request
NO_MEMBERS = (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD)


def check_period(timeout: float) -> float:
    """A fraction of the timeout, so a destination expires at most a third of it late; bounded both ways."""
    return max(MIN_PERIOD_S, min(timeout / 3, MAX_PERIOD_S))


@dataclass
class Destination:
    """A topic fed by monitors: which PVs go there, whether the gateway created it, since when nobody consumes it."""

    pvs: set[PVUri] = field(default_factory=set)
    created: bool = False
    idle_since: float | None = None   # first check that found no consumer; None while consumed or not yet checked


class Destinations:
    """Every monitor destination topic and since when it has no consumer (pure bookkeeping, thread safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._topics: dict[str, Destination] = {}
        self.lock = threading.RLock()

    def add(self, topic: str, pv: PVUri, created: bool = False) -> None:
        """A (re)started monitor counts as consumed: its client is about to read it."""
        with self.lock:
            d = self._topics.setdefault(topic, Destination())
            d.pvs.add(pv)
            d.created = d.created or created
            d.idle_since = None

    def discard(self, topic: str, pv: PVUri) -> None:
        with self.lock:
            d = self._topics.get(topic)
            if d is not None:
                d.pvs.discard(pv)
                if not d.pvs:
                    del self._topics[topic]

    def topics(self) -> list[str]:
        with self.lock:
            return list(self._topics)

    def get(self, topic: str) -> Destination | None:
        with self.lock:
            return self._topics.get(topic)

    def observe(self, consumed: Iterable[str]) -> None:
        """One check's answer: the topics in ``consumed`` have a consumer, every other one has none."""
        consumed = set(consumed)
        now = self._clock()
        with self.lock:
            for t, d in self._topics.items():
                if t in consumed:
                    d.idle_since = None
                elif d.idle_since is None:
                    d.idle_since = now

    def _expired(self, d: Destination, timeout: float) -> bool:
        return d.idle_since is not None and self._clock() - d.idle_since >= timeout

    def expired(self, timeout: float) -> list[str]:
        """Topics without a consumer for ``timeout`` seconds."""
        with self.lock:
            return [t for t, d in self._topics.items() if self._expired(d, timeout)]

    def take_expired(self, topic: str, timeout: float) -> Destination | None:
        """Remove and return ``topic`` if it is still expired (a monitor command may have renewed it since)."""
        with self.lock:
            d = self._topics.get(topic)
            if d is None or not self._expired(d, timeout):
                return None
            return self._topics.pop(topic)


def consumed_topics(groups: Iterable, ignore: Sequence[re.Pattern]) -> set[str]:
    """Topics in the assignment of an active member of a group not ignored (``ConsumerGroupDescription``s)."""
    out: set[str] = set()
    for g in groups:
        if any(p.fullmatch(g.group_id) for p in ignore):
            continue
        for m in g.members or ():
            assignment = getattr(m, "assignment", None)
            for tp in getattr(assignment, "topic_partitions", None) or ():
                out.add(tp.topic)
    return out


class ExpiryChecker:
    """The thread that asks Kafka who consumes what and expires the rest."""

    def __init__(self, admin: AdminClient, destinations: Destinations, timeout: float,
                 expire: Callable[[str], None], ignore: Sequence[str] = (), request_timeout: float = 10.0):
        self.admin = admin
        self.destinations = destinations
        self.timeout = float(timeout)
        self.period = check_period(self.timeout)
        self.expire = expire
        self.ignore = [re.compile(r) for r in ignore]
        self.request_timeout = request_timeout
        self.expired = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="k2eg-monitor-expiry", daemon=True)

    def start(self) -> "ExpiryChecker":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.request_timeout + 1)

    def _groups(self) -> list:
        """Descriptions of every consumer group that has members."""
        listed = self.admin.list_consumer_groups(request_timeout=self.request_timeout).result(self.request_timeout)
        ids = [g.group_id for g in listed.valid
               if not g.is_simple_consumer_group and g.state not in NO_MEMBERS
               and not any(p.fullmatch(g.group_id) for p in self.ignore)]
        out = []
        for start in range(0, len(ids), DESCRIBE_CHUNK):
            futures = self.admin.describe_consumer_groups(ids[start:start + DESCRIBE_CHUNK],
                                                          request_timeout=self.request_timeout)
            for gid, fut in futures.items():
                try:
                    out.append(fut.result(self.request_timeout))
                except KafkaException as e:   # gone between list and describe: nothing it consumes counts
                    log.debug("describing consumer group %s: %s", gid, e)
        return out

    def check(self) -> list[str]:
        """One round: refresh what is consumed, expire what has not been for the timeout; returns those."""
        if not self.destinations.topics():
            return []
        try:
            groups = self._groups()
        except Exception as e:  # Kafka unreachable: nothing is known, so nothing expires this round
            log.warning("monitor expiry check skipped: cannot list consumer groups: %s", e)
            return []
        self.destinations.observe(consumed_topics(groups, self.ignore))
        done = []
        for topic in self.destinations.expired(self.timeout):
            try:
                self.expire(topic)
                done.append(topic)
            except Exception:
                log.exception("expiring the monitors of %s failed", topic)
        self.expired += len(done)
        return done

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.check()
