"""The ``k2eg`` command against the real local stack (Kafka, demo IOC, gateway)."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from k2eg.cli.main import cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def k2eg(stack, app_name, tmp_path, monkeypatch):
    """Run ``k2eg -e <stack env> -a <app> ARGS...``; a user error must never be a traceback."""
    monkeypatch.setattr("k2eg.cli.repl.HISTORY", tmp_path / "history")

    def run(*args, input=None):
        result = CliRunner().invoke(cli, ["-e", stack.environment, "-a", app_name, *args], input=input,
                                    prog_name="k2eg")
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        return result

    return run


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- get

@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_get_prints_a_table(k2eg, proto):
    r = k2eg("get", f"{proto}://variable:a")
    assert r.exit_code == 0, r.output
    for text in (f"{proto}://variable:a", "value", "alarm.severity", "NO_ALARM", "timeStamp.secondsPastEpoch"):
        assert text in r.stdout


@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_get_json_is_the_value_tree(k2eg, proto):
    r = k2eg("get", f"{proto}://variable:a", "--json")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert isinstance(v["value"], float)
    assert set(v["alarm"]) >= {"severity", "status"}
    assert v["timeStamp"]["secondsPastEpoch"] > 1_600_000_000


def test_get_json_filter_keeps_top_level_fields(k2eg):
    r = k2eg("get", "pva://channel:waveform", "--json", "--filter", "value", "--filter", "alarm")
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert set(v) == {"value", "alarm"} and len(v["value"]) == 16


def test_get_table_abbreviates_the_waveform_and_names_the_enum_choice(k2eg):
    r = k2eg("get", "pva://channel:waveform")
    assert "(16 items)" in r.stdout
    r = k2eg("get", "ca://channel:enum")
    assert r.exit_code == 0 and "(index " in r.stdout and "Off" in r.stdout


def test_get_signed_short_waveform_stays_signed_in_json(k2eg):
    v = json.loads(k2eg("get", "pva://channel:short", "--json").stdout)
    assert v["value"][:3] == [-3, -2, -1]


def test_get_pva_table_shows_its_columns(k2eg):
    v = json.loads(k2eg("get", "pva://pva:table", "--json").stdout)
    r = k2eg("get", "pva://pva:table")
    assert r.exit_code == 0
    for label in v["labels"]:
        assert label in r.stdout


# ----------------------------------------------------------------------------- put

@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_put_then_get(k2eg, proto):
    before = json.loads(k2eg("get", f"{proto}://variable:b", "--json", "--filter", "value").stdout)["value"]
    try:
        r = k2eg("put", f"{proto}://variable:b", "-7.25")
        assert r.exit_code == 0, r.output
        after = json.loads(k2eg("get", f"{proto}://variable:b", "--json", "--filter", "value").stdout)
        assert after == {"value": -7.25}
    finally:
        k2eg("put", f"{proto}://variable:b", json.dumps(before))


def test_put_enum_by_choice_name(k2eg):
    try:
        r = k2eg("put", "pva://channel:enum", "Standby")
        assert r.exit_code == 0, r.output
        v = json.loads(k2eg("get", "pva://channel:enum", "--json").stdout)["value"]
        assert v["choices"][v["index"]] == "Standby"
    finally:
        k2eg("put", "pva://channel:enum", "0")


def test_put_string(k2eg):
    before = json.loads(k2eg("get", "ca://channel:string", "--json").stdout)["value"]
    try:
        assert k2eg("put", "ca://channel:string", "hello from the cli").exit_code == 0
        assert json.loads(k2eg("get", "ca://channel:string", "--json").stdout)["value"] == "hello from the cli"
    finally:
        k2eg("put", "ca://channel:string", json.dumps(before))


# ----------------------------------------------------------------------------- monitor

@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_monitor_count_json(k2eg, proto):
    r = k2eg("monitor", f"{proto}://channel:counter", "--count", "3", "--json")
    assert r.exit_code == 0, r.output
    events = json_lines(r.stdout)
    assert len(events) == 3
    assert all(list(e) == ["channel:counter"] for e in events)
    values = [e["channel:counter"]["value"] for e in events]
    assert values == sorted(values)


def test_monitor_several_pvs_with_filter(k2eg):
    r = k2eg("monitor", "pva://channel:counter", "ca://channel:ramp:ramp", "--count", "5", "--filter", "value")
    assert r.exit_code == 0, r.output
    events = json_lines(r.stdout)
    assert len(events) == 5
    for e in events:
        (name, v), = e.items()
        assert name in ("channel:counter", "channel:ramp:ramp") and set(v) == {"value"}


def test_monitor_again_in_one_shell_session(k2eg):
    """stop_monitor at the end of a monitor lets the next one in the same session start afresh."""
    script = "monitor pva://channel:counter --count 2 --filter value\n" * 2
    r = k2eg(input=script)
    assert r.exit_code == 0, r.output
    assert len(json_lines(r.stdout)) == 4


# ----------------------------------------------------------------------------- snapshot, info

def test_snapshot_table(k2eg):
    r = k2eg("snapshot", "pva://variable:a", "ca://variable:b", "--window", "500")
    assert r.exit_code == 0, r.output
    assert "variable:a" in r.stdout and "variable:b" in r.stdout and "latest value" in r.stdout


def test_snapshot_json(k2eg):
    r = k2eg("snapshot", "pva://variable:a", "pva://channel:counter", "--window", "500", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) == {"variable:a", "channel:counter"}
    assert data["variable:a"] and all(isinstance(v["value"], float) for v in data["variable:a"])


def test_info(k2eg):
    r = k2eg("info", "ca://channel:enum", "--json")
    assert r.exit_code == 0, r.output
    assert isinstance(json.loads(r.stdout), dict)
    assert k2eg("info", "pva://variable:a").exit_code == 0


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_unknown_pv_is_a_remote_error_exit_1(k2eg, proto):
    r = k2eg("get", f"{proto}://no:such:pv", "--timeout", "20")
    assert r.exit_code == 1
    assert r.stderr.startswith("Remote error -3: ") and "no:such:pv" in r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args", [
    ["get", "variable:a"], ["get", "xyz://variable:a"], ["put", "pva://bad name", "1"],
    ["monitor", "pva://channel:counter", "nope"], ["snapshot", "pva://variable:a", "ca:/x"],
])
def test_malformed_uri_is_exit_2(k2eg, args):
    r = k2eg(*args)
    assert r.exit_code == 2 and "invalid PV URI" in r.stderr


def test_environment_and_app_from_variables_in_a_real_process(stack, app_name):
    env = {**os.environ, "K2EG_CLI_DEFAULT_ENVIRONMENT": stack.environment, "K2EG_CLI_DEFAULT_APP_NAME": app_name}
    p = subprocess.run([sys.executable, "-m", "k2eg.cli.main", "get", "pva://variable:a", "--json"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert isinstance(json.loads(p.stdout)["value"], float)
    p = subprocess.run([sys.executable, "-m", "k2eg.cli.main", "get", "pva://no:such:pv"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Remote error -3" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------- status

def test_status_shows_the_gateway_its_monitors_and_their_rates(k2eg, k, monkeypatch):
    import time

    monkeypatch.setenv("COLUMNS", "200")  # the table at a wide terminal's width: no cell cut short

    k.monitor("pva://channel:counter", lambda *_: None)
    k.status()                      # first sample of the rate meter
    time.sleep(1.5)
    r = k2eg("status", "--json")
    assert r.exit_code == 0, r.output
    (live,) = [g for g in json.loads(r.stdout)["gateways"] if g.get("answered")]
    (mon,) = [m for m in live["monitors"] if m["pv"] == "pva://channel:counter"]
    assert mon["connected"] and mon["events_per_s"] > 0     # a 10 Hz PV
    assert live["rates"]["events_published_per_s"] > 0
    table = k2eg("status")
    assert table.exit_code == 0, table.output
    for text in ("gateways", live["gateway"]["id"] + " *", "running", "monitors", "pva://channel:counter",
                 "totals: monitors", "topics created"):
        assert text in table.stdout


def test_gateways_announce_themselves_on_the_status_topic(k):
    gateways = k.gateways()
    assert k.status()["gateway"]["id"] in [g["gateway"]["id"] for g in gateways]
    assert all(g["state"] == "running" and g["last_seen_s"] < 30 for g in gateways)
