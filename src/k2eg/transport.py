"""Kafka plumbing shared by client and gateway: topic creation, configs, the start-up check.

Neither side relies on broker auto-creation (PROTOCOL section 1): a topic
somebody will read is created before anybody writes to it.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

log = logging.getLogger("k2eg.transport")

CREATE_CHUNK = 500  # topics per CreateTopics request: the broker refuses one of 10,000 as "excessively large"


class KafkaAccessError(ConnectionError):
    """Kafka cannot be used with these settings; the message says why (unreachable, refused login, TLS)."""


class KafkaAuthenticationError(KafkaAccessError):
    """The broker refused the SASL login: wrong user name, password or mechanism."""


class KafkaWatch:
    """``error_cb`` and ``logger`` for librdkafka that remember why it cannot talk to the broker.

    librdkafka retries a refused login for ever and reports it only as a log
    line and an ``_AUTHENTICATION`` error event, while metadata requests just
    time out; this keeps both so a start-up can fail with the real reason.
    """

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger
        self.auth_error: str | None = None
        self.last_problem = ""

    def error_cb(self, err: KafkaError) -> None:
        if err.code() == KafkaError._AUTHENTICATION:
            self.auth_error = err.str()
        if err.code() != KafkaError._ALL_BROKERS_DOWN or not self.last_problem:  # keep the cause, not the summary
            self.last_problem = err.str()

    def log(self, level: int, fmt: str, *args: Any) -> None:
        """Also a ``logging.Logger`` stand-in (librdkafka calls ``log`` only)."""
        text = self.note(level, fmt, *args)
        if self.logger is not None:
            self.logger.log(level, "%s", text)

    def note(self, level: int, fmt: str, *args: Any) -> str:
        """Remember a librdkafka log line if it explains a failure; return it formatted."""
        try:
            text = fmt % args
        except Exception:
            text = f"{fmt} {args}"
        detail = text.split("]: ", 1)[-1]  # drop librdkafka's "[thrd:...]" prefix
        if "SASL authentication error" in text or "Authentication failed" in text:
            self.auth_error = detail
        if level >= logging.WARNING:
            self.last_problem = detail
        elif "Disconnected" in text and "APIVERSION_QUERY" in text:  # logged at INFO, yet the only clue
            self.last_problem = (f"{detail}; the broker hangs up before the first request: does it want TLS "
                                 "or a SASL login (security.protocol)?")
        return text


def await_metadata(admin: AdminClient, watch: KafkaWatch, timeout: float, *clients: Any) -> ClusterMetadata:
    """Cluster metadata once the broker answers; KafkaAuthenticationError at the first refused login,
    KafkaAccessError (with librdkafka's last complaint) after ``timeout``.

    ``clients`` (producers, consumers sharing ``watch``) are polled too, so
    their error events reach ``watch`` while we wait.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            # all topics: naming one would let the broker auto-create it with its defaults
            return admin.list_topics(timeout=max(0.1, min(0.5, deadline - time.monotonic())))
        except KafkaException as e:
            for c in (admin, *clients):
                c.poll(0)  # serves error_cb and the log queue
            if watch.auth_error:
                raise KafkaAuthenticationError(f"Kafka refused the login (authentication failed): "
                                               f"{watch.auth_error}") from None
            if time.monotonic() >= deadline:
                why = watch.last_problem or e.args[0].str()
                raise KafkaAccessError(f"no Kafka broker answered within {timeout:g} s: {why}") from None


# Settings that decide whether a connection and its login succeed; the rest (producer or consumer
# tuning) would only make the check's admin client warn that it ignores them.
_CONNECTION_PREFIXES = ("bootstrap.", "metadata.broker.list", "security.", "sasl.", "ssl.", "ssl_", "enable.ssl.",
                        "enable.sasl.", "client.", "socket.", "broker.", "api.version", "reconnect.", "connections.",
                        "resolve.", "https.")


def check_credentials(*configs: dict, timeout: float = 30.0) -> None:
    """Fail fast at start-up when Kafka cannot be used with any of ``configs`` (librdkafka settings).

    Without it a wrong password or an unreachable broker shows up only as
    endless retries in the log of a process that looks healthy. Raises
    KafkaAuthenticationError for a refused login, KafkaAccessError otherwise.
    """
    seen: list[dict] = []
    for config in configs:
        config = {k: v for k, v in config.items() if k.startswith(_CONNECTION_PREFIXES)}
        if config in seen:  # producer and consumer usually share broker and login: check once
            continue
        seen.append(config)
        watch = KafkaWatch()
        where = config.get("bootstrap.servers", "?")
        try:
            admin = AdminClient({**config, "error_cb": watch.error_cb, "logger": watch})
        except KafkaException as e:
            raise KafkaAccessError(f"invalid Kafka settings for {where}: {e.args[0].str()}") from None
        try:
            await_metadata(admin, watch, timeout)
        except KafkaAccessError as e:
            user = config.get("sasl.username")
            who = f" as user '{user}' ({config.get('sasl.mechanism', 'GSSAPI')})" if user else ""
            raise type(e)(f"Kafka at {where}{who}: {e}") from None


class TopicAdmin:
    """Creates topics once; remembers which ones exist and which it created."""

    def __init__(self, config: dict):
        # Metadata requests for named topics must not create them (PROTOCOL 1).
        self._admin = AdminClient({**config, "allow.auto.create.topics": False})
        self._known: set[str] = set()
        self.created: set[str] = set()
        self._lock = threading.Lock()

    def missing(self, topics: Iterable[str]) -> list[str]:
        """Those of ``topics`` not known to exist: ``ensure`` would ask the broker about them.

        No lock: a set's membership test is atomic, and this runs for every reply.
        """
        known = self._known
        return [t for t in dict.fromkeys(topics) if t not in known]

    def ensure(self, topics: Iterable[str], timeout: float = 10.0, config: dict[str, str] | None = None) -> list[str]:
        """Make sure ``topics`` exist (new ones with topic ``config``); return those this call created.

        Returns once the broker serves the new topics, not merely once the controller
        accepted them: a broker takes ~15 s to open 10,000 new partitions, and producers
        writing to topics it does not serve yet retry metadata for them all the while.
        """
        missing = self.missing(topics)
        if not missing:
            return []
        made = []
        for start in range(0, len(missing), CREATE_CHUNK):
            chunk = missing[start:start + CREATE_CHUNK]
            futures = self._admin.create_topics(
                [NewTopic(t, num_partitions=1, replication_factor=-1, config=dict(config or {})) for t in chunk],
                operation_timeout=timeout, request_timeout=timeout)
            for topic, fut in futures.items():
                try:
                    fut.result(timeout)
                    made.append(topic)
                except KafkaException as e:
                    if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
            self._await_served(chunk, timeout)
        with self._lock:
            self._known.update(missing)
            self.created.update(made)
        if made:
            log.debug("created topics %s", made)
        return made

    def _await_served(self, topics: list[str], timeout: float) -> None:
        """Wait until the broker's metadata lists ``topics`` with a leader; after ``timeout``, go on (logged)."""
        waiting, deadline, pause = set(topics), time.monotonic() + timeout, 0.02
        while True:
            try:
                if len(waiting) == 1:
                    md = self._admin.list_topics(next(iter(waiting)), timeout=max(0.1, deadline - time.monotonic()))
                else:
                    md = self._admin.list_topics(timeout=max(0.1, deadline - time.monotonic()))
                waiting = {t for t in waiting if t not in md.topics or md.topics[t].error is not None
                           or any(p.leader < 0 for p in md.topics[t].partitions.values())}
            except KafkaException as e:
                log.debug("topic metadata: %s", e)
            if not waiting:
                return
            if time.monotonic() + pause > deadline:
                log.warning("%d new topic(s) not served by the broker after %g s, e.g. %s", len(waiting), timeout,
                            next(iter(waiting)))
                return
            time.sleep(pause)
            pause = min(0.5, pause * 2)

    def exists(self, topic: str, timeout: float = 10.0) -> bool:
        """Whether the broker knows ``topic`` now (asking does not create it)."""
        md = self._admin.list_topics(topic, timeout=timeout)
        t = md.topics.get(topic)
        found = t is not None and t.error is None
        if found:
            with self._lock:
                self._known.add(topic)
        return found

    def delete(self, topic: str, timeout: float = 10.0) -> None:
        """Delete ``topic``; one already gone counts as deleted."""
        fut = self._admin.delete_topics([topic], operation_timeout=timeout)[topic]
        try:
            fut.result(timeout)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
        with self._lock:
            self._known.discard(topic)
            self.created.discard(topic)

    def forget(self, topic: str) -> None:
        with self._lock:
            self._known.discard(topic)

    @property
    def client(self) -> AdminClient:
        return self._admin
