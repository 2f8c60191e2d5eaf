"""What scripts written for the 0.3.0 client do with recurring snapshots, run by the published client.

- they stop a recurring snapshot before starting it (the C++ gateway answers 0, "already stopped");
- they join a snapshot's topic only after the start reply, from its newest offset, so a Header
  published when the window opens would be lost to them with its whole iteration;
- the package page's example starts a scheduled snapshot (``triggered=False``) and triggers it.
"""

import pytest

from .conftest import scenario_pair

pytestmark = pytest.mark.e2e

legacy, ours = scenario_pair("snap_stop_first,snap_first_iteration,snap_package_example", "habits")


def test_legacy_stop_before_start_is_no_error(legacy):
    assert legacy["snap_stop_first"] == {"stop_before_start": None, "started": 0, "iterations": True}


def test_legacy_client_sees_the_first_iteration_of_a_long_pushed_window(legacy):
    s = legacy["snap_first_iteration"]
    assert s["iteration"] == 1 and s["values"] >= 2, s       # 10 Hz counter, 5 s window


def test_legacy_package_page_example_triggers_a_scheduled_snapshot(legacy):
    s = legacy["snap_package_example"]
    assert s["trigger_error"] is None and s["trigger_reply"] == 0 and s["iter_index"] == 1
    assert s["stop_reply"] == 0 and s["calls"] and s["values"]


def test_our_client_does_the_same(legacy, ours):
    for step in ("snap_stop_first", "snap_package_example"):
        assert ours[step] == legacy[step], step
    assert ours["snap_first_iteration"]["iteration"] == 1 and ours["snap_first_iteration"]["values"] >= 2
