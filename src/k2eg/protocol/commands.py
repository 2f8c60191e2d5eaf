"""Commands as the gateway receives them: JSON in, a typed command or a precise error out.

Parsing is total: any byte string yields either a command or a
``CommandError`` that still carries whatever reply address could be read, so
the gateway can always tell the sender what was wrong.
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Callable, ClassVar

import msgpack

from .errors import ErrorCode, ProtocolError
from .uri import SNAPSHOT_NAME, PVUri, parse_pv_uri

MAX_COMMAND_BYTES = 1 << 20  # a command is a small JSON object; refuse floods early
MAX_PUT_BYTES = 16 << 20
MAX_PV_LIST = 100_000
MAX_REPLY_ID = 1024  # echoed in every reply: a huge one would make the reply too large for the broker
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")  # Kafka's legal topic names


class Serialization(str, Enum):
    MSGPACK = "msgpack"
    JSON = "json"
    MSGPACK_COMPACT = "msgpack-compact"

    @property
    def header(self) -> bytes:
        """Value of the ``k2eg-ser-type`` header (clients compare it lower-cased)."""
        return {"msgpack": b"Msgpack", "json": b"Json", "msgpack-compact": b"Msgpack-Compact"}[self.value]

    @classmethod
    def parse(cls, text: object) -> "Serialization":
        if not isinstance(text, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'serialization' must be a string")
        try:
            return cls(text.lower())
        except ValueError:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"unknown serialization '{text[:50]}' (use msgpack, json or msgpack-compact)",
            ) from None


class SnapshotKind(str, Enum):
    NORMAL = "normal"
    TIMED_BUFFERED = "timedbuffered"


@dataclass(frozen=True)
class Command:
    """Fields every command may carry."""

    name: ClassVar[str] = ""
    reply_topic: str | None = None
    reply_id: str | None = None
    serialization: Serialization = Serialization.MSGPACK


@dataclass(frozen=True)
class Get(Command):
    name: ClassVar[str] = "get"
    pv: PVUri = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Put(Command):
    name: ClassVar[str] = "put"
    pv: PVUri = None  # type: ignore[assignment]
    value: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Info(Command):
    name: ClassVar[str] = "info"
    pv: PVUri = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Monitor(Command):
    name: ClassVar[str] = "monitor"
    pv: PVUri = None  # type: ignore[assignment]
    destination: str = ""
    max_events_per_second: float | None = None  # ext: rate cap of this destination (None: the gateway's)


@dataclass(frozen=True)
class MultiMonitor(Command):
    name: ClassVar[str] = "multi-monitor"
    pvs: tuple[PVUri, ...] = ()
    max_events_per_second: float | None = None  # ext: as for Monitor, for each PV


@dataclass(frozen=True)
class Snapshot(Command):
    name: ClassVar[str] = "snapshot"
    pvs: tuple[PVUri, ...] = ()
    time_window_msec: int = 1000


@dataclass(frozen=True)
class RepeatingSnapshot(Command):
    name: ClassVar[str] = "repeating_snapshot"
    snapshot_name: str = ""
    pvs: tuple[PVUri, ...] = ()
    time_window_msec: int = 1000
    repeat_delay_msec: int = 0
    sub_push_delay_msec: int = 0
    triggered: bool = False
    kind: SnapshotKind = SnapshotKind.NORMAL
    field_filter: tuple[str, ...] = ()


@dataclass(frozen=True)
class SnapshotTrigger(Command):
    name: ClassVar[str] = "repeating_snapshot_trigger"
    snapshot_name: str = ""
    tags: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotStop(Command):
    name: ClassVar[str] = "repeating_snapshot_stop"
    snapshot_name: str = ""


@dataclass(frozen=True)
class Status(Command):
    """ext: ask every gateway for its state; old clients never send it."""

    name: ClassVar[str] = "status"


class CommandError(ProtocolError):
    """A command that cannot be executed, with the reply address if one was readable."""

    def __init__(self, code: int, message: str, envelope: Command | None = None, command: str | None = None):
        super().__init__(code, message)
        self.envelope = envelope or Command()
        self.command = command


# ---------------------------------------------------------------- field readers

def _missing(key: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"missing required field '{key}'")


def _not_uri(where: str, v: object) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{where} must be a string such as 'pva://NAME', got {_tname(v)}")



def _str(doc: dict, key: str, required: bool = True, default: str | None = None) -> str | None:
    v = doc.get(key)
    if v is None:
        if required:
            raise _missing(key)
        return default
    if not isinstance(v, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must be a string, got {_tname(v)}")
    if required and not v:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must not be empty")
    return v


def _int(doc: dict, key: str, default: int, minimum: int = 0, maximum: int = 86_400_000) -> int:
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must be an integer, got {_tname(v)}")
    if not minimum <= v <= maximum:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must be between {minimum} and {maximum}, got {v}")
    return v


MAX_RATE = 1_000_000.0


def _rate(doc: dict, key: str) -> float | None:
    """An optional events-per-second cap: a number greater than 0."""
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must be a number of events per second, "
                                                   f"got {_tname(v)}")
    if not 0 < v <= MAX_RATE:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must be greater than 0 and at most "
                                                   f"{MAX_RATE:g}, got {v}")
    return float(v)


def _bool(doc: dict, key: str, default: bool) -> bool:
    v = doc.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must be true or false, got {_tname(v)}")
    return v


def topic_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Kafka topic, or None if it can."""
    if not _TOPIC.match(name) or name in (".", ".."):
        if len(name) > 249:
            return f"is {len(name)} characters long, Kafka allows at most 249"
        return "may only hold letters, digits, '.', '_' and '-'"
    return None


def _topic(doc: dict, key: str, required: bool = True) -> str | None:
    name = _str(doc, key, required=required)
    if name:
        why = topic_problem(name)
        if why:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' is not a Kafka topic name: '{name[:60]}' {why}")
    return name


def _pv(doc: dict, key: str = "pv_name") -> PVUri:
    v = doc.get(key)
    if v is None:
        raise _missing(key)
    if not isinstance(v, str):
        raise _not_uri(f"field '{key}'", v)
    return parse_pv_uri(v)


def _pv_list(doc: dict, key: str = "pv_name_list") -> tuple[PVUri, ...]:
    v = doc.get(key)
    if v is None:
        raise _missing(key)
    if not isinstance(v, list):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must be a list of PV URIs, got {_tname(v)}")
    if not v:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must not be empty")
    if len(v) > MAX_PV_LIST:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' holds {len(v)} PVs, more than {MAX_PV_LIST}")
    out: dict[PVUri, None] = {}
    for n, item in enumerate(v):  # duplicates are served once, order kept
        if not isinstance(item, str):
            raise _not_uri(f"field '{key}' item {n}", item)
        out[parse_pv_uri(item)] = None
    return tuple(out)


def _str_list(doc: dict, key: str) -> tuple[str, ...]:
    v = doc.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{key}' must be a list of strings")
    return tuple(v)


def _snapshot_name(doc: dict) -> str:
    name = _str(doc, "snapshot_name")
    assert name is not None
    if len(name) > 200 or not SNAPSHOT_NAME.match(name):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"invalid snapshot_name '{name[:200]}': only letters, digits, '-' and '_' are allowed",
        )
    return name


def decode_put_value(text: object) -> dict:
    """The put value: base64 of a msgpack map (0.3.0's ``to_base_64``)."""
    if not isinstance(text, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'value' must be a base64 string, got {_tname(text)}")
    if len(text) > MAX_PUT_BYTES * 4 // 3 + 4:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'value' is larger than 16 MiB")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'value' is not valid base64") from None
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'value' is not valid msgpack: {e}") from None
    if not isinstance(value, dict):
        # -3 for a non-map value is the C++ gateway's code (PROTOCOL 4).
        raise ProtocolError(ErrorCode.TIMEOUT, f"field 'value' must hold a msgpack map such as {{\"value\": 42}}, got {_tname(value)}")
    if not value:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'value' holds an empty map: name the fields to write, "
                                                   "such as {\"value\": 42}")
    _check_tree(value, "value")
    return value


def _check_tree(obj: Any, what: str, limit: int = 32) -> None:
    """A put value is a tree of maps with string keys, at most ``limit`` levels deep."""
    stack = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field '{what}' is nested deeper than {limit} levels")
        if isinstance(o, dict):
            for k in o:
                if not isinstance(k, str):
                    raise ProtocolError(ErrorCode.BAD_REQUEST,
                                        f"field '{what}' has a map key {str(k)[:50]!r} that is not a string: "
                                        "keys are field names")
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)


def _tname(v: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


# ---------------------------------------------------------------- per-command builders

def _get(doc, env):
    _str(doc, "reply_topic")
    return Get(**env, pv=_pv(doc))


def _info(doc, env):
    _str(doc, "reply_topic")
    return Info(**env, pv=_pv(doc))


def _put(doc, env):
    pv = _pv(doc)
    if "value" not in doc:
        raise _missing("value")
    return Put(**env, pv=pv, value=decode_put_value(doc["value"]))


def _monitor(doc, env):
    pv = _pv(doc)
    dest = _topic(doc, "monitor_dest_topic", required=False) or env["reply_topic"]
    if not dest:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "monitor needs 'monitor_dest_topic' or 'reply_topic'")
    return Monitor(**env, pv=pv, destination=dest, max_events_per_second=_rate(doc, "max_events_per_second"))


def _multi_monitor(doc, env):
    pvs = _pv_list(doc)
    for pv in pvs:
        why = topic_problem(pv.topic)
        if why:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"PV '{pv.name[:60]}' cannot have a monitor topic: "
                                                       f"its topic name {why}")
    return MultiMonitor(**env, pvs=pvs, max_events_per_second=_rate(doc, "max_events_per_second"))


def _snapshot(doc, env):
    _str(doc, "reply_topic")
    return Snapshot(**env, pvs=_pv_list(doc), time_window_msec=_int(doc, "time_window_msec", 1000))


def _repeating(doc, env):
    _str(doc, "reply_topic")
    name = _snapshot_name(doc)
    kind_text = doc.get("type", "normal")
    try:
        kind = SnapshotKind(kind_text.lower()) if isinstance(kind_text, str) else None
    except ValueError:
        kind = None
    if kind is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'type' must be 'normal' or 'timedbuffered', got {str(kind_text)[:50]!r}")
    return RepeatingSnapshot(
        **env, snapshot_name=name, pvs=_pv_list(doc),
        time_window_msec=_int(doc, "time_window_msec", 1000, minimum=1),
        repeat_delay_msec=_int(doc, "repeat_delay_msec", 0),
        sub_push_delay_msec=_int(doc, "sub_push_delay_msec", 0),
        triggered=_bool(doc, "triggered", False), kind=kind,
        field_filter=_str_list(doc, "pv_field_filter_list"),
    )


def _trigger(doc, env):
    _str(doc, "reply_topic")
    tags = doc.get("tags")
    tags = {} if tags is None else tags
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'tags' must be a map of string to string")
    return SnapshotTrigger(**env, snapshot_name=_snapshot_name(doc), tags=tags)


def _stop(doc, env):
    _str(doc, "reply_topic")
    return SnapshotStop(**env, snapshot_name=_snapshot_name(doc))


def _status(doc, env):
    _str(doc, "reply_topic")
    return Status(**env)




BUILDERS: dict[str, Callable[[dict, dict], Command]] = {
    "get": _get, "put": _put, "info": _info, "monitor": _monitor, "multi-monitor": _multi_monitor,
    "snapshot": _snapshot, "repeating_snapshot": _repeating, "repeating_snapshot_trigger": _trigger,
    "repeating_snapshot_stop": _stop, "status": _status,
}


def parse_command(raw: bytes | str | None) -> Command:
    """JSON command -> typed command; raises CommandError naming what is wrong."""
    if raw is None:
        raise CommandError(ErrorCode.BAD_REQUEST, "empty command record")
    if len(raw) > MAX_COMMAND_BYTES:
        raise CommandError(ErrorCode.BAD_REQUEST, f"command is {len(raw)} bytes, more than {MAX_COMMAND_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CommandError(ErrorCode.BAD_REQUEST, f"command is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CommandError(ErrorCode.BAD_REQUEST, f"command must be a JSON object, got {_tname(doc)}")
    env: dict[str, Any] = {}
    # The reply address is read first and leniently: even a broken command deserves an answer.
    rt, rid = doc.get("reply_topic"), doc.get("reply_id")
    env["reply_topic"] = rt if isinstance(rt, str) and rt and topic_problem(rt) is None else None
    env["reply_id"] = rid if isinstance(rid, str) else (str(rid) if isinstance(rid, (int, float)) and not isinstance(rid, bool) else None)
    if env["reply_id"] is not None and len(env["reply_id"]) > MAX_REPLY_ID:
        env["reply_id"] = env["reply_id"][:MAX_REPLY_ID]
        raise CommandError(ErrorCode.BAD_REQUEST, f"field 'reply_id' is longer than {MAX_REPLY_ID} characters",
                           Command(**env))
    envelope = Command(**env)
    name = doc.get("command")
    try:
        if "serialization" in doc:
            env["serialization"] = Serialization.parse(doc["serialization"])
        envelope = Command(**env)
        if rt is not None:
            _topic(doc, "reply_topic")
        if rid is not None and env["reply_id"] is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'reply_id' must be a string, got {_tname(rid)}")
        if not isinstance(name, str):
            raise _missing("command") if name is None else ProtocolError(
                ErrorCode.BAD_REQUEST, f"field 'command' must be a string, got {_tname(name)}")
        builder = BUILDERS.get(name.lower())
        if builder is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown command '{name[:50]}' (known: {', '.join(BUILDERS)})")
        return builder(doc, env)
    except ProtocolError as e:
        raise CommandError(e.code, e.message, envelope, name if isinstance(name, str) else None) from None


# ---------------------------------------------------------------- client side: command -> JSON

def encode_put_value(value: dict) -> str:
    """A put value map as base64 msgpack (what ``decode_put_value`` reads back)."""
    from .codec import _np_default  # numpy arrays are allowed in put values
    return base64.b64encode(msgpack.packb(value, default=_np_default, use_bin_type=True)).decode("ascii")


_WIRE_NAMES = {"pv": "pv_name", "pvs": "pv_name_list", "destination": "monitor_dest_topic",
               "kind": "type", "field_filter": "pv_field_filter_list"}


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """``dataclasses.fields()`` builds its tuple on every call; a client sends thousands of commands a second."""
    return tuple(f.name for f in fields(cls) if f.name != "serialization")


def to_wire(cmd: Command) -> dict:
    """Typed command -> the JSON object the gateway parses (inverse of ``parse_command``)."""
    doc: dict[str, Any] = {"command": cmd.name, "serialization": cmd.serialization.value}
    for name in _field_names(type(cmd)):
        v = getattr(cmd, name)
        if v is None:
            continue
        if isinstance(v, PVUri):
            v = v.uri
        elif isinstance(v, tuple):
            v = [x.uri if isinstance(x, PVUri) else x for x in v]
        elif isinstance(v, Enum):
            v = v.value
        elif name == "value":
            v = encode_put_value(v)
        doc[_WIRE_NAMES.get(name, name)] = v
    return doc


def to_json(cmd: Command) -> bytes:
    return json.dumps(to_wire(cmd), separators=(",", ":")).encode()
