"""Value trees <-> bytes in the three wire serialisations (PROTOCOL section 5).

The gateway hands every record to ``encode`` and clients hand every record
to ``decode``; nothing else in the code base knows a wire format.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import msgpack
import numpy as np

from .commands import Serialization

HEADER = "k2eg-ser-type"


def _np_default(obj: Any) -> Any:
    # numpy arrays become msgpack arrays (not bin) and keep their sign.
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def json_safe(obj: Any) -> Any:
    """Strict-JSON form of a value tree: NaN/Inf as strings (the C++ gateway's JSON), numpy as lists."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f" and not np.isfinite(obj).all():
            return [json_safe(v) for v in obj.tolist()]
        return obj.tolist()
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).decode("utf-8", "replace")
    return str(obj)


def leaves(tree: Any) -> list:
    """All leaves of a value tree in depth-first order (msgpack-compact)."""
    out: list = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            stack.extend(reversed(node))  # structure arrays are walked, not kept as one leaf
        else:
            out.append(node)
    return out


_packb = msgpack.Packer(default=_np_default, use_bin_type=True, autoreset=True)


def encode(record: dict, ser: Serialization = Serialization.MSGPACK, value_key: str | None = None) -> bytes:
    """Serialise one record; ``value_key`` names the PV entry holding a value tree.

    In msgpack-compact a monitor event ``{name: tree}`` is ``[name, *leaves]``;
    in any other record only the tree under ``value_key`` is flattened.
    """
    if ser is Serialization.MSGPACK:
        return msgpack.packb(record, default=_np_default, use_bin_type=True)
    if ser is Serialization.JSON:
        return json.dumps(json_safe(record), allow_nan=False, separators=(",", ":")).encode()
    if value_key is None or value_key not in record:
        return msgpack.packb(record, default=_np_default, use_bin_type=True)
    if len(record) == 1:
        return msgpack.packb([value_key, *leaves(record[value_key])], default=_np_default, use_bin_type=True)
    flat = dict(record)
    flat[value_key] = leaves(record[value_key])
    return msgpack.packb(flat, default=_np_default, use_bin_type=True)


# Header values as they arrive -> serialisation name: every event carries one, so no decode/lower per event.
_KINDS: dict[Any, str] = {None: "msgpack", **{h: h.decode() for h in (b"msgpack", b"msgpack-compact", b"json")},
                          **{h: h for h in ("msgpack", "msgpack-compact", "json")}}


def decode(data: bytes, header: bytes | str | None) -> Any:
    """Bytes + ``k2eg-ser-type`` header -> Python object; raises ValueError if unreadable.

    A compact event ``[name, *leaves]`` comes back as ``{name: [leaves]}`` so
    every consumer can take the first key as the PV name.
    """
    kind = _KINDS.get(header)
    if kind is None:
        kind = (header.decode() if isinstance(header, bytes) else (header or "msgpack")).lower()
    try:
        if kind == "json":
            return json.loads(data)
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise ValueError(f"undecodable {kind} record: {e}") from None
    if kind == "msgpack-compact" and isinstance(obj, list) and obj and isinstance(obj[0], str):
        return {obj[0]: obj[1:]}
    if kind not in ("msgpack", "msgpack-compact"):
        raise ValueError(f"unknown serialisation header '{kind}'")
    return obj


_HEADERS = {ser: [(HEADER, ser.header)] for ser in Serialization}


def header_value(ser: Serialization) -> list[tuple[str, bytes]]:
    """The record headers of ``ser``: one shared list per serialisation (the publish path is hot); do not mutate."""
    return _HEADERS[ser]
