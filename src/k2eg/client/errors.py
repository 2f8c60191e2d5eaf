"""Exceptions user code catches; names and attributes as in k2eg 0.3.0."""
from __future__ import annotations

from k2eg.transport import KafkaAuthenticationError


class OperationTimeout(Exception):
    """No reply arrived within the timeout."""


class OperationError(Exception):
    """The gateway answered with a non-zero error code; ``error`` holds it, ``args[0]`` the message."""

    def __init__(self, error: int, message: str | None):
        super().__init__(message)
        self.error = error


class MonitorNotActive(KeyError):
    """``stop_monitor`` of a PV this client does not monitor (a KeyError, as in 0.3.0)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "monitor not active"


class KafkaUnavailable(ConnectionError):
    """Kafka could not be reached or refused what the client needs; the message names broker and file."""


class KafkaAuthenticationFailed(KafkaUnavailable, KafkaAuthenticationError):
    """The broker refused this client's SASL login (``kafka.sasl.*`` keys of the environment file)."""


class ClientClosed(RuntimeError):
    """The client was closed (perhaps from another thread) while an operation waited."""
