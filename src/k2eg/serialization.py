"""Values for ``dml.put``: each becomes the msgpack map the gateway writes to the PV.

Same classes and fields as 0.3.0, plus what its documentation promised:
``Vector([1, 2, 3])`` and ``Scalar(42)`` work positionally, ``NTTable.wrap``
works.
"""
from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Sequence, Tuple, Union

import msgpack

from k2eg.protocol.codec import _np_default


class MessagePackSerializable(ABC):
    @abstractmethod
    def to_dict(self) -> Dict[str, Any]:
        """The map written to the PV, e.g. ``{"value": 42}``."""

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.to_dict(), default=_np_default, use_bin_type=True)

    def to_base_64(self) -> str:
        return base64.b64encode(self.to_msgpack()).decode("utf-8")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class _Keyed(MessagePackSerializable):
    """``Cls(key, payload)``, ``Cls(payload)`` or keywords; a non-string first argument is the payload."""

    _default_payload: Any = None

    def __init__(self, key: Any = "value", payload: Any = None, **kw: Any):
        if "payload" in kw:
            payload = kw.pop("payload")
        if "key" in kw:
            key = kw.pop("key")
        if kw:
            raise TypeError(f"unexpected arguments {', '.join(kw)}")
        if not isinstance(key, str):
            key, payload = "value", key
        self.key = key
        self.payload = self._default_payload() if payload is None and callable(self._default_payload) else payload

    def to_dict(self) -> Dict[str, Any]:
        return {self.key: self.payload}


class Scalar(_Keyed):
    _default_payload = str  # 0.3.0 default: ""


class Vector(_Keyed):
    _default_payload = list


class Generic(_Keyed):
    _default_payload = dict


class NTTable(MessagePackSerializable):
    """An NTTable written column by column: ``{key: {label: [values...]}}``."""

    def __init__(self, key: str = "value", labels: Sequence[str] | None = None, payload: Dict[str, Any] | None = None):
        self.key = key
        self.labels = list(labels or [])
        self.payload = dict(payload or {})

    def set_column(self, label: str, data: List[Any]) -> "NTTable":
        if label not in self.labels:
            raise ValueError(f"Column label '{label}' is not defined (labels: {', '.join(self.labels)})")
        self.payload[label] = list(data)
        return self

    def wrap(self, records: List[Union[Dict[str, Any], List[Any], Tuple[Any, ...]]]) -> "NTTable":
        """Fill every column from rows given as dicts (by label) or sequences (in label order)."""
        columns: Dict[str, List[Any]] = {label: [] for label in self.labels}
        for n, rec in enumerate(records):
            if isinstance(rec, dict):
                missing = [label for label in self.labels if label not in rec]
                if missing:
                    raise ValueError(f"row {n} lacks column(s) {', '.join(missing)}")
                row = [rec[label] for label in self.labels]
            elif isinstance(rec, (list, tuple)):
                if len(rec) != len(self.labels):
                    raise ValueError(f"row {n} has {len(rec)} values for {len(self.labels)} labels")
                row = list(rec)
            else:
                raise TypeError("Record must be dict or sequence")
            for label, v in zip(self.labels, row):
                columns[label].append(v)
        self.payload = columns
        return self

    def to_dict(self) -> Dict[str, Any]:
        return {self.key: self.payload}
