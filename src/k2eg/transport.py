"""Kafka plumbing shared by client and gateway: topic creation and configs.

Neither side relies on broker auto-creation (PROTOCOL section 1): a topic
somebody will read is created before anybody writes to it.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger("k2eg.transport")

CREATE_CHUNK = 500  # topics per CreateTopics request: the broker refuses one of 10,000 as "excessively large"


class TopicAdmin:
    """Creates topics once; remembers which ones exist and which it created."""

    def __init__(self, config: dict):
        self._admin = AdminClient(config)
        self._known: set[str] = set()
        self.created: set[str] = set()
        self._lock = threading.Lock()

    def ensure(self, topics: Iterable[str], timeout: float = 10.0) -> list[str]:
        """Make sure ``topics`` exist; return those this call created."""
        with self._lock:
            missing = [t for t in dict.fromkeys(topics) if t not in self._known]
        if not missing:
            return []
        made = []
        for start in range(0, len(missing), CREATE_CHUNK):
            futures = self._admin.create_topics(
                [NewTopic(t, num_partitions=1, replication_factor=-1) for t in missing[start:start + CREATE_CHUNK]],
                operation_timeout=timeout, request_timeout=timeout)
            for topic, fut in futures.items():
                try:
                    fut.result(timeout)
                    made.append(topic)
                except KafkaException as e:
                    if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
        with self._lock:
            self._known.update(missing)
            self.created.update(made)
        if made:
            log.debug("created topics %s", made)
        return made

    def delete(self, topic: str, timeout: float = 10.0) -> None:
        fut = self._admin.delete_topics([topic], operation_timeout=timeout)[topic]
        fut.result(timeout)
        with self._lock:
            self._known.discard(topic)
            self.created.discard(topic)

    def forget(self, topic: str) -> None:
        with self._lock:
            self._known.discard(topic)

    @property
    def client(self) -> AdminClient:
        return self._admin
