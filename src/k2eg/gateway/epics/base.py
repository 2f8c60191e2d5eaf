"""The contract every EPICS adapter (PVA, CA) fulfils for the gateway.

Values cross this boundary as *value trees*: plain dicts mirroring the EPICS
structure, leaves being int/float/bool/str, lists, or numpy arrays. Nothing
here knows about Kafka or serialisation.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from k2eg.protocol.errors import ErrorCode, ProtocolError

ValueTree = dict[str, Any]
EventCallback = Callable[[ValueTree], None]


class PVError(ProtocolError):
    """An EPICS operation failed; code is EPICS_FAILED or TIMEOUT."""


def connect_timeout(name: str, seconds: float) -> PVError:
    return PVError(ErrorCode.TIMEOUT, f"PV '{name}' did not connect within {seconds:g} s")


class Subscription(Protocol):
    def close(self) -> None: ...


class Provider(Protocol):
    """One per protocol; thread-safe; methods block up to ``timeout``."""

    protocol: str  # "pva" or "ca"

    def get(self, name: str, timeout: float) -> ValueTree: ...

    def put(self, name: str, value: ValueTree, timeout: float) -> None: ...

    def info(self, name: str, timeout: float) -> dict[str, Any]: ...

    def monitor(self, name: str, on_event: EventCallback) -> Subscription: ...

    def close(self) -> None: ...
