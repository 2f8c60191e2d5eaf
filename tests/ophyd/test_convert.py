"""k2eg.ophyd's pure part: value trees to ophyd-async values, readings and describe() metadata."""
from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("ophyd_async", reason="k2eg[bluesky] is not installed")

from ophyd_async.core import Array1D, StrictEnum, SubsetEnum  # noqa: E402

from k2eg.ophyd import Converter, metadata_of, reading_of  # noqa: E402

NAN = math.nan


def tree(value, **extra) -> dict:
    return {"value": value, "alarm": {"severity": 0}, "timeStamp": {"secondsPastEpoch": 10, "nanoseconds": 5e8},
            **extra}


class Mode(StrictEnum):
    OFF = "Off"
    ON = "On"


def test_reading_takes_the_epics_timestamp_and_maps_invalid_to_minus_one():
    t = tree(1.0, alarm={"severity": 3})
    assert reading_of(t, 1.0) == {"value": 1.0, "timestamp": 10.5, "alarm_severity": -1}
    assert reading_of(tree(1.0, alarm={"severity": 2}), 1.0)["alarm_severity"] == 2


def test_limits_skip_nan_and_all_zero_pairs_and_units_precision_follow_the_datatype():
    t = tree(1.0, display={"units": "mm", "precision": 3, "limitLow": 0.0, "limitHigh": 0.0},
             control={"limitLow": -5.0, "limitHigh": 5.0},
             valueAlarm={"lowAlarmLimit": NAN, "highAlarmLimit": 9.0, "lowWarningLimit": NAN,
                         "highWarningLimit": NAN})
    assert metadata_of(t, float) == {"units": "mm", "precision": 3,
                                     "limits": {"control": {"low": -5.0, "high": 5.0},
                                                "alarm": {"low": None, "high": 9.0}}}
    assert metadata_of(t, int) == {"units": "mm", "limits": {"control": {"low": -5.0, "high": 5.0},
                                                              "alarm": {"low": None, "high": 9.0}}}
    assert metadata_of(tree("x", display={"units": "", "precision": 0}), str) == {}
    assert metadata_of(tree([1.0], display={"precision": 2}), Array1D[np.float64]) == {"precision": 2}


def test_enums_strings_bools_and_ints_from_an_enum_pv():
    t = tree({"index": 1, "choices": ["Off", "On"]})
    assert Converter(Mode, "pva://e", t).value(t["value"]) is Mode.ON
    assert Converter(str, "pva://e", t).value(t["value"]) == "On"
    assert Converter(bool, "pva://e", t).value(t["value"]) is True
    assert Converter(None, "pva://e", t).value(t["value"]) == "On"
    assert metadata_of(t, Mode) == {"choices": ["Off", "On"]}
    assert Converter(Mode, "pva://e", t).write(Mode.OFF) == "Off"


def test_enum_choices_are_checked():
    class Partial(SubsetEnum):
        ON = "On"

    t = tree({"index": 0, "choices": ["Off", "On", "Fault"]})
    Converter(Partial, "ca://e", t)  # a subset is enough
    with pytest.raises(TypeError, match="ca://e has choices"):
        Converter(Mode, "ca://e", t)  # strict: must be equal
    with pytest.raises(TypeError, match="cannot be a bool"):
        Converter(bool, "ca://e", t)


def test_numbers_and_arrays():
    assert Converter(int, "u", tree(3.0, display={"precision": 0})).value(3.0) == 3
    with pytest.raises(TypeError, match="u holds a float"):
        Converter(int, "u", tree(3.5, display={"precision": 2}))
    with pytest.raises(TypeError, match="not a str"):
        Converter(str, "u", tree(1.5))
    arr = Converter(Array1D[np.int16], "u", tree([1, -2])).value([1, -2])
    assert arr.dtype == np.int16 and arr.tolist() == [1, -2]
    assert Converter(None, "u", tree([1.0, 2.0])).datatype is np.ndarray
    with pytest.raises(TypeError, match="no 'value' field"):
        Converter(float, "u", {"alarm": {}})
