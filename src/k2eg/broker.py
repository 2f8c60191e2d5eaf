"""Repeating-snapshot settings, importable from ``k2eg.broker`` as in 0.3.0."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from k2eg.protocol.uri import SNAPSHOT_NAME


class SnapshotType(Enum):
    """NORMAL: the latest value of each PV per iteration. TIMED_BUFFERED: every value in the window."""

    NORMAL = "normal"
    TIMED_BUFFERED = "timedbuffered"


@dataclass
class SnapshotProperties:
    snapshot_name: str = None  # type: ignore[assignment]
    time_window: int = 1000            # ms
    repeat_delay: int = 0              # ms between iterations
    sub_push_delay_msec: int = 0       # ms between partial pushes of a timed-buffered window
    respect_push_order: bool = True    # accepted for 0.3.0 scripts; the gateway always keeps order
    triggered: bool = False
    type: SnapshotType = SnapshotType.NORMAL
    pv_uri_list: list[str] = None  # type: ignore[assignment]
    pv_field_filter_list: list[str] = None  # type: ignore[assignment]

    def validate(self) -> None:
        """Raise ValueError naming the first invalid property."""
        if not self.snapshot_name or not isinstance(self.snapshot_name, str):
            raise ValueError("snapshot_name must be a non-empty string.")
        if not SNAPSHOT_NAME.match(self.snapshot_name):
            raise ValueError(f"Invalid snapshot name '{self.snapshot_name}'. Only alphanumeric characters, "
                             "dashes, and underscores are allowed.")
        if not self.pv_uri_list or not isinstance(self.pv_uri_list, list):
            raise ValueError("pv_uri_list must be a non-empty list of PV URIs.")
        if not all(isinstance(pv, str) for pv in self.pv_uri_list):
            raise ValueError("All PV URIs in pv_uri_list must be strings.")
        for name in ("time_window", "repeat_delay", "sub_push_delay_msec"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer.")
        if not isinstance(self.triggered, bool):
            raise ValueError("triggered must be a boolean value.")
        try:
            SnapshotType(self.type)
        except ValueError:
            raise ValueError(f"type must be a SnapshotType, got {self.type!r}") from None
