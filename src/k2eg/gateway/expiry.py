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
like a new one. A check that cannot ask Kafka changes nothing, nor does one
where listing or describing any group failed (a timeout, no permission): a
group Kafka did not describe may be the one reading a topic.

An expired topic the gateway created is deleted a check later, not at once: a
record still in flight for it would fail with "unknown topic", and the
producer's metadata request that follows re-creates the topic on a broker with
``auto.create.topics.enable`` (the default). A later check looks again and
deletes it again if it came back, a few times at most.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Sequence

from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from k2eg.protocol.uri import PVUri

log = logging.getLogger("k2eg.gateway.expiry")

MAX_PERIOD_S = 30.0     # checks happen at least this often...
MIN_PERIOD_S = 0.5      # ...and at most this often, whatever the timeout
DESCRIBE_CHUNK = 100    # groups per describe request
NO_MEMBERS = (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD)
GROUP_GONE = (KafkaError.GROUP_ID_NOT_FOUND,)   # a describe error meaning the group no longer exists
PURGE_SETTLE_S = 2.0    # an expired topic is deleted, and looked at again after a delete, no sooner than this
PURGE_DELETES = 3       # deletions of a topic that keeps coming back before it is left in place (logged)


class UnknownConsumers(RuntimeError):
    """Kafka did not say who consumes what (a timeout, a refused request): unknown is not "unused"."""


def check_period(timeout: float) -> float:
    """A fraction of the timeout, so a destination expires at most a third of it late; bounded both ways."""
    return max(MIN_PERIOD_S, min(timeout / 3, MAX_PERIOD_S))


@dataclass
class Destination:
    """A topic fed by monitors: which PVs go there, whether the gateway created it, since when nobody consumes it."""

    pvs: set[PVUri] = field(default_factory=set)
    created: bool = False
    idle_since: float | None = None   # first check that found no consumer; None while consumed or not yet checked


class PurgeStep(Enum):
    DONE = "done"      # gone, or no longer to be purged
    DELETE = "delete"  # delete it (again) now
    LEAVE = "leave"    # it came back after every deletion: leave it


@dataclass
class Purge:
    """An expired topic to delete: when to look at it next, and how often it was deleted already."""

    due: float
    deletes: int = 0


class Destinations:
    """Every monitor destination topic and since when it has no consumer (pure bookkeeping, thread safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._topics: dict[str, Destination] = {}
        self._purges: dict[str, Purge] = {}
        self.lock = threading.RLock()

    def add(self, topic: str, pv: PVUri, created: bool = False) -> None:
        """A (re)started monitor counts as consumed: its client is about to read it; its topic stays."""
        with self.lock:
            self._purges.pop(topic, None)
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

    def purge_later(self, topic: str, settle: float = PURGE_SETTLE_S) -> None:
        """Delete ``topic`` once ``settle`` seconds have passed (unless a monitor takes it again first)."""
        with self.lock:
            self._purges[topic] = Purge(self._clock() + settle)

    def purging(self) -> list[str]:
        with self.lock:
            return list(self._purges)

    def purges_due(self) -> list[str]:
        with self.lock:
            now = self._clock()
            return [t for t, p in self._purges.items() if p.due <= now]

    def purge_step(self, topic: str, exists: bool, settle: float = PURGE_SETTLE_S) -> PurgeStep:
        """One look at a topic being purged: what to do with it now.

        A topic found gone is done with; one still there is deleted and looked at again
        ``settle`` seconds later, until it was deleted PURGE_DELETES times: then it is left.
        """
        with self.lock:
            p = self._purges.get(topic)
            if p is None or not exists:
                self._purges.pop(topic, None)
                return PurgeStep.DONE
            if p.deletes >= PURGE_DELETES:
                del self._purges[topic]
                return PurgeStep.LEAVE
            p.deletes += 1
            p.due = self._clock() + settle
            return PurgeStep.DELETE


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
                 expire: Callable[[str], None], ignore: Sequence[str] = (), request_timeout: float = 10.0,
                 purge: Callable[[str], None] | None = None, recreate: Callable[[], None] | None = None):
        self.admin = admin
        self.destinations = destinations
        self.timeout = float(timeout)
        self.period = check_period(self.timeout)
        self.expire, self.purge = expire, purge
        self.recreate = recreate   # each round: monitor destinations deleted from outside are created again
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
        if getattr(listed, "errors", None):   # a broker did not list its groups: those may consume anything
            raise UnknownConsumers(f"listing consumer groups failed on part of the cluster: {listed.errors[0]}")
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
                except KafkaException as e:
                    if e.args and isinstance(e.args[0], KafkaError) and e.args[0].code() in GROUP_GONE:
                        log.debug("consumer group %s gone between list and describe", gid)
                        continue   # nothing it consumes counts
                    # A timeout or a refusal: what it consumes is unknown, which is not "nothing".
                    raise UnknownConsumers(f"cannot describe consumer group {gid}: {e}") from None
        return out

    def check(self) -> list[str]:
        """One round: expire what nobody consumed for the timeout (returns those), then purge what is due."""
        done = self._expire_unconsumed() if self.destinations.topics() else []
        for topic in self.destinations.purges_due() if self.purge else ():
            try:
                self.purge(topic)
            except Exception:
                log.exception("purging topic %s failed", topic)
        if self.recreate is not None:
            try:
                self.recreate()
            except Exception:
                log.exception("re-creating monitor destinations failed")
        return done

    def _expire_unconsumed(self) -> list[str]:
        try:
            groups = self._groups()
        except Exception as e:  # Kafka unreachable or refusing: nothing is known, so nothing expires this round
            log.warning("monitor expiry check skipped: cannot tell which consumer groups read what: %s", e)
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
