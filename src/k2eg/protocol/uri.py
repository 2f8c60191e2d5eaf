"""PV URIs and the Kafka topic names derived from them (PROTOCOL section 2).

The name after ``://`` is kept byte-for-byte: it is both the EPICS channel
name (including any ``.FIELD`` suffix) and the key under which the value
travels, because 0.3.0 clients look replies up by exactly that string.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ProtocolError, ErrorCode

# The 0.3.0 client's accepted grammar; the protocol prefix is case-insensitive.
_URI = re.compile(r"^(pva?|ca)://([A-Za-z0-9\-_:]+(?:\.[A-Za-z0-9\-_]+)*)$", re.IGNORECASE)
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SNAPSHOT_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9-]")
SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True, slots=True)
class PVUri:
    protocol: str  # "pva" or "ca", lower case
    name: str      # channel name as written by the client, with any .FIELD
    text: str = field(default="", compare=False)  # the URI exactly as sent (reply key)

    @property
    def uri(self) -> str:
        return self.text or f"{self.protocol}://{self.name}"

    @property
    def topic(self) -> str:
        return pv_topic(self.name)

    @property
    def record(self) -> str:
        """The record part of the name, without a .FIELD suffix."""
        return self.name.split(".", 1)[0]

    def __str__(self) -> str:
        return self.uri


def parse_pv_uri(text: object) -> PVUri:
    """Parse ``pva://NAME`` / ``ca://NAME``; the error says what is wrong."""
    if not isinstance(text, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"PV URI must be a string, got {type(text).__name__}")
    m = _URI.match(text)
    if m is None:
        if "://" not in text:
            why = "missing protocol prefix 'pva://' or 'ca://'"
        elif text.split("://", 1)[0].lower() not in ("pva", "pv", "ca"):
            why = f"unknown protocol '{text.split('://', 1)[0]}' (use pva or ca)"
        else:
            why = "the PV name may only hold letters, digits, '-', '_', ':' and '.FIELD' suffixes"
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"invalid PV URI '{text[:200]}': {why}")
    proto = m.group(1).lower()
    return PVUri("pva" if proto == "pv" else proto, m.group(2), text)


def pv_topic(name: str) -> str:
    """Kafka topic of a PV's monitor stream (0.3.0 rule: ':' becomes '_')."""
    return _TOPIC_UNSAFE.sub("_", name)


def snapshot_topic(snapshot_name: str) -> str:
    """Kafka topic of a repeating snapshot's stream."""
    return _SNAPSHOT_TOPIC_UNSAFE.sub("_", snapshot_name.lower())


def reply_topic(app_name: str) -> str:
    return f"{app_name}-reply"


def gateway_status_topic(cmd_topic: str) -> str:
    """ext: where every gateway reading ``cmd_topic`` announces itself, so ``k2eg status`` finds them all."""
    return f"{cmd_topic}-gateway-status"
