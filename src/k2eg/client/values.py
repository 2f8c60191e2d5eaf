"""Turning what users pass to ``put`` into the value map the gateway expects."""
from __future__ import annotations

from typing import Any

import numpy as np


def put_value_map(value: Any) -> dict:
    """A ``Scalar``/``Vector``/``NTTable``/``Generic`` gives its own map; a plain value becomes ``{"value": v}``."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if isinstance(value, np.ndarray):
        return {"value": value.tolist()}
    if isinstance(value, np.generic):
        return {"value": value.item()}
    if isinstance(value, tuple):
        return {"value": list(value)}
    if isinstance(value, (bool, int, float, str, list, dict, bytes)) or value is None:
        if value is None:
            raise ValueError("cannot put None: give a number, string, list, array or a k2eg.serialization value")
        return {"value": value}
    raise ValueError(f"cannot put a {type(value).__name__}: give a number, string, list, numpy array "
                     "or a k2eg.serialization Scalar/Vector/NTTable/Generic")
