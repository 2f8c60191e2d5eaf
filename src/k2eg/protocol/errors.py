"""Error codes on the wire and the one exception that carries them.

Codes are the C++ gateway's where it has them, so existing dashboards and
clients keep their meaning.
"""
from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    OK = 0
    SNAPSHOT_COMPLETE = 1   # completion record of a one-shot snapshot
    BAD_REQUEST = -1        # malformed command, field or PV name
    EPICS_FAILED = -2       # EPICS refused or cancelled the operation
    TIMEOUT = -3            # PV did not connect / answer in time; put of a non-map value
    DENIED = -4             # ext: refused by the gateway's access rules


class ProtocolError(Exception):
    """An error a peer caused; its message goes verbatim into an error reply."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = int(code)
        self.message = message
