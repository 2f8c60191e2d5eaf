"""The ``k2eg`` command against a stand-in client: arguments, output modes, exit codes, the shell.

The real client and gateway are covered by test_cli_e2e.py; here every path,
including the failure ones, runs without Kafka.
"""
import json
import sys
import threading

import pytest
from click.testing import CliRunner

from k2eg.cli import commands
from k2eg.cli.main import CliState, cli
from k2eg.client.errors import MonitorNotActive, OperationError, OperationTimeout

TREE = {
    "value": 1.5,
    "alarm": {"severity": 0, "status": 0, "message": ""},
    "timeStamp": {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 5, "userTag": 0},
    "display": {"units": "mm", "limitLow": float("nan")},
}


class FakeClient:
    """Answers like ``dml``; PV names starting with remote:/slow:/bad: fail the way the gateway would."""

    instances: list["FakeClient"] = []
    events_per_pv = 5

    def __init__(self, environment, app_name):
        self.environment, self.app_name = environment, app_name
        self.calls: list[tuple] = []
        self.monitors: dict[str, object] = {}
        self.closed = False
        FakeClient.instances.append(self)

    @staticmethod
    def _name(uri):
        return uri.split("://", 1)[1]

    def _fail(self, uri):
        name = self._name(uri)
        if name.startswith("remote:"):
            raise OperationError(-3, f"PV '{name}' did not connect within 2 s")
        if name.startswith("slow:"):
            raise OperationTimeout(f"Timeout during get operation for {name}")
        if name.startswith("bad:"):
            raise ValueError(f"invalid value for {name}")

    def get(self, uri, timeout=None):
        self.calls.append(("get", uri, timeout))
        self._fail(uri)
        return dict(TREE)

    def put(self, uri, value, timeout=None):
        self.calls.append(("put", uri, value, timeout))
        self._fail(uri)
        return {"error": 0}

    def info(self, uri, timeout=None):
        self.calls.append(("info", uri, timeout))
        self._fail(uri)
        return {"protocol": "pva", "name": self._name(uri), "connected": True, "structure": {"value": "double"}}

    def _start(self, uris, handler):
        for uri in uris:
            self._fail(uri)
        for uri in uris:
            self.monitors[self._name(uri)] = handler

        def feed():
            for i in range(self.events_per_pv):
                for uri in uris:
                    handler(self._name(uri), {**TREE, "value": float(i)})

        threading.Thread(target=feed, daemon=True).start()

    def monitor(self, uri, handler, timeout=None):
        self.calls.append(("monitor", uri, timeout))
        self._start([uri], handler)

    def monitor_many(self, uris, handler, timeout=None):
        self.calls.append(("monitor_many", tuple(uris), timeout))
        self._start(uris, handler)

    def stop_monitor(self, name):
        self.calls.append(("stop_monitor", name))
        name = self._name(name) if "://" in name else name
        if name not in self.monitors:
            raise MonitorNotActive(name)
        del self.monitors[name]

    def snapshot_sync(self, uris, timeout=10.0, time_window_msec=1000):
        self.calls.append(("snapshot_sync", tuple(uris), timeout, time_window_msec))
        for uri in uris:
            self._fail(uri)
        out = {self._name(u): [{**TREE, "value": float(i)} for i in range(3)] for u in uris}
        out["error"] = 0
        return out

    def close(self):
        self.closed = True


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    FakeClient.instances.clear()
    monkeypatch.delenv("K2EG_CLI_DEFAULT_ENVIRONMENT", raising=False)
    monkeypatch.delenv("K2EG_CLI_DEFAULT_APP_NAME", raising=False)
    monkeypatch.setattr("k2eg.cli.repl.HISTORY", tmp_path / "history")


def run(*args, input=None, env=None):
    state = CliState(client_factory=FakeClient)
    result = CliRunner().invoke(cli, list(args), obj=state, input=input, env=env, prog_name="k2eg")
    # A user error is a message and an exit code, never a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result


def k2eg(*args, **kw):
    return run("-e", "test", "-a", "cli-test", *args, **kw)


def client() -> FakeClient:
    assert len(FakeClient.instances) == 1
    return FakeClient.instances[0]


# ----------------------------------------------------------------------------- global options

def test_environment_and_app_name_come_from_the_environment_variables():
    r = run("get", "pva://variable:a", env={"K2EG_CLI_DEFAULT_ENVIRONMENT": "envx",
                                            "K2EG_CLI_DEFAULT_APP_NAME": "appx"})
    assert r.exit_code == 0
    assert (client().environment, client().app_name) == ("envx", "appx")


@pytest.mark.parametrize("args,missing", [
    (["get", "pva://variable:a"], "--environment"),
    (["-e", "test", "get", "pva://variable:a"], "--app-name"),
])
def test_a_pv_command_without_environment_or_app_is_a_usage_error(args, missing):
    r = run(*args)
    assert r.exit_code == 2 and missing in r.stderr
    assert not FakeClient.instances


def test_help_and_version_need_no_environment():
    assert run("--help").exit_code == 0
    r = run("--version")
    assert r.exit_code == 0 and "k2eg" in r.stdout


def test_log_level_accepts_names_in_any_case_and_numbers():
    assert k2eg("-l", "debug", "get", "pva://variable:a").exit_code == 0
    assert k2eg("-l", "10", "get", "pva://variable:a").exit_code == 0
    r = k2eg("-l", "loud", "get", "pva://variable:a")
    assert r.exit_code == 2 and "not a log level" in r.stderr


def test_unreachable_kafka_is_exit_1_naming_the_environment():
    def unreachable(env, app):
        raise TimeoutError()

    r = CliRunner().invoke(cli, ["-e", "test", "-a", "x", "get", "pva://variable:a"],
                           obj=CliState(client_factory=unreachable))
    assert r.exit_code == 1 and "cannot connect to Kafka" in r.stderr and "'test'" in r.stderr


def test_unknown_environment_is_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(tmp_path))
    r = CliRunner().invoke(cli, ["-e", "nope", "-a", "x", "get", "pva://variable:a"])
    assert r.exit_code == 2 and "environment 'nope' not found" in r.stderr


def test_the_client_is_closed_at_the_end():
    k2eg("get", "pva://variable:a")
    assert client().closed


# ----------------------------------------------------------------------------- get

def test_get_prints_a_field_table_by_default():
    r = k2eg("get", "pva://variable:a")
    assert r.exit_code == 0
    for text in ("pva://variable:a", "field", "value", "1.5", "alarm.severity", "0 (NO_ALARM)", "display.units"):
        assert text in r.stdout
    assert client().calls == [("get", "pva://variable:a", 10.0)]


def test_get_json_is_exact_and_strict():
    r = k2eg("get", "pva://variable:a", "--json", "--timeout", "3")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {**TREE, "display": {"units": "mm", "limitLow": "NaN"}}
    assert client().calls == [("get", "pva://variable:a", 3.0)]


def test_get_filter_keeps_top_level_fields():
    r = k2eg("get", "pva://variable:a", "--json", "--filter", "value", "--filter", "alarm")
    assert json.loads(r.stdout) == {"value": 1.5, "alarm": TREE["alarm"]}
    r = k2eg("get", "pva://variable:a", "--json", "--filter", "value,timeStamp")
    assert set(json.loads(r.stdout)) == {"value", "timeStamp"}


def test_get_filter_typo_is_exit_2_naming_the_fields():
    r = k2eg("get", "pva://variable:a", "--filter", "valeu")
    assert r.exit_code == 2 and "'valeu'" in r.stderr and "value, alarm" in r.stderr


def test_get_nttable_prints_its_columns(monkeypatch):
    table = {"labels": ["name", "x"], "value": {"name": ["alpha", "beta"], "x": [1.5, -2.25]}}
    monkeypatch.setattr(FakeClient, "get", lambda self, uri, timeout=None: table)
    r = k2eg("get", "pva://pva:table")
    assert r.exit_code == 0 and "alpha" in r.stdout and "-2.25" in r.stdout and "labels" in r.stdout


# ----------------------------------------------------------------------------- errors

def test_remote_error_is_exit_1_with_code_and_message_on_stderr():
    r = k2eg("get", "pva://remote:pv")
    assert r.exit_code == 1
    assert r.stderr.strip() == "Remote error -3: PV 'remote:pv' did not connect within 2 s"
    assert r.stdout == ""


def test_timeout_is_exit_2():
    r = k2eg("get", "pva://slow:pv")
    assert r.exit_code == 2 and r.stderr.startswith("Timeout")


def test_value_error_from_the_client_is_exit_2():
    r = k2eg("put", "pva://bad:pv", "1")
    assert r.exit_code == 2 and "invalid value for bad:pv" in r.stderr


@pytest.mark.parametrize("command", [["get"], ["put"], ["info"], ["monitor"], ["snapshot"]])
def test_malformed_uri_is_exit_2_before_any_connection(command):
    extra = ["1"] if command == ["put"] else []
    r = k2eg(*command, "variable:a", *extra)
    assert r.exit_code == 2 and "invalid PV URI 'variable:a'" in r.stderr
    assert not FakeClient.instances


# ----------------------------------------------------------------------------- put

@pytest.mark.parametrize("text,value", [
    ("2.5", 2.5), ("-3", -3), ("-1.5e3", -1500.0), ("[1, 2, 3]", [1, 2, 3]), ("Standby", "Standby"),
    ('"42"', "42"),
])
def test_put_parses_json_or_takes_the_text(text, value):
    r = k2eg("put", "pva://variable:a", text)
    assert r.exit_code == 0, r.output
    (call,) = client().calls
    assert call[:3] == ("put", "pva://variable:a", value) and type(call[2]) is type(value)
    assert "pva://variable:a" in r.stdout


def test_put_into_another_field():
    r = k2eg("put", "pva://pva:struct", '{"b": 3}', "--field", "a")
    assert r.exit_code == 0
    (call,) = client().calls
    assert call[2].to_dict() == {"a": {"b": 3}}


def test_put_null_is_refused():
    r = k2eg("put", "pva://variable:a", "null")
    assert r.exit_code == 2 and "null" in r.stderr


# ----------------------------------------------------------------------------- monitor

def test_monitor_count_prints_that_many_json_lines_then_stops_the_monitor():
    r = k2eg("monitor", "pva://channel:counter", "--count", "3", "--json")
    assert r.exit_code == 0
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["channel:counter"]["value"] for x in lines] == [0.0, 1.0, 2.0]
    c = client()
    assert c.calls[0][0] == "monitor" and ("stop_monitor", "pva://channel:counter") in c.calls
    assert not c.monitors and c.closed


def test_monitor_of_several_pvs_uses_monitor_many_and_counts_events_in_total():
    r = k2eg("monitor", "pva://a", "ca://b", "--count", "4", "--filter", "value")
    assert r.exit_code == 0
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 4 and all(list(x.values())[0].keys() == {"value"} for x in lines)
    assert {name for x in lines for name in x} == {"a", "b"}
    assert client().calls[0] == ("monitor_many", ("pva://a", "ca://b"), 10.0)
    assert not client().monitors


def test_monitor_is_json_when_stdout_is_not_a_terminal():
    r = k2eg("monitor", "pva://channel:counter", "--count", "1")
    assert json.loads(r.stdout) == {"channel:counter": {**TREE, "value": 0.0,
                                                        "display": {"units": "mm", "limitLow": "NaN"}}}


def test_monitor_duration_ends_without_events(monkeypatch):
    monkeypatch.setattr(FakeClient, "events_per_pv", 0)
    r = k2eg("monitor", "pva://quiet", "--duration", "0.3")
    assert r.exit_code == 0 and r.stdout == ""
    assert ("stop_monitor", "pva://quiet") in client().calls


def test_monitor_ctrl_c_stops_cleanly(monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_pump", interrupted)
    r = k2eg("monitor", "pva://channel:counter")
    assert r.exit_code == 0
    assert ("stop_monitor", "pva://channel:counter") in client().calls and client().closed


def test_monitor_remote_error_stops_nothing_and_exits_1():
    r = k2eg("monitor", "pva://remote:pv", "--count", "1")
    assert r.exit_code == 1 and "Remote error -3" in r.stderr


def test_monitor_table_on_a_terminal(monkeypatch):
    monkeypatch.setattr(commands, "_stdout_is_tty", lambda: True)
    r = k2eg("monitor", "pva://a", "pva://b", "--count", "10")
    assert r.exit_code == 0
    for text in ("PV", "severity", "updates", "NO_ALARM", "4.0", "stops after 10 events"):
        assert text in r.stdout
    assert "{" not in r.stdout


# ----------------------------------------------------------------------------- snapshot and info

def test_snapshot_table_lists_each_pv_with_latest_value_and_count():
    r = k2eg("snapshot", "pva://a", "ca://b", "--window", "500")
    assert r.exit_code == 0
    assert "latest value" in r.stdout and "2.0" in r.stdout
    assert client().calls == [("snapshot_sync", ("pva://a", "ca://b"), 10.5, 500)]


def test_snapshot_json_has_only_the_pvs():
    r = k2eg("snapshot", "pva://a", "--json", "--timeout", "4")
    data = json.loads(r.stdout)
    assert set(data) == {"a"} and [v["value"] for v in data["a"]] == [0.0, 1.0, 2.0]
    assert client().calls[0][2] == 4.0


def test_info_table_and_json():
    r = k2eg("info", "pva://variable:a")
    assert r.exit_code == 0 and "structure.value" in r.stdout and "double" in r.stdout
    r = k2eg("info", "pva://variable:a", "--json")
    assert json.loads(r.stdout)["name"] == "variable:a"


# ----------------------------------------------------------------------------- stack

def test_stack_needs_no_environment():
    r = run("stack", "--help")
    assert r.exit_code == 0 and "Usage: k2eg stack" in r.stdout
    assert not FakeClient.instances


def test_stack_unavailable_is_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "k2eg.stack.__main__", None)  # import now fails
    r = run("stack", "run")
    assert r.exit_code == 1 and "local stack command is not available" in r.stderr


# ----------------------------------------------------------------------------- shell

def test_shell_runs_commands_with_one_client_and_survives_errors():
    script = "\n".join([
        "get pva://variable:a --json --filter value",
        "# a comment",
        "get variable:a",
        "nosuchcommand",
        "put pva://variable:a 3",
        "help",
        "help get",
        "exit",
        "get pva://never:run",
    ]) + "\n"
    r = k2eg(input=script)
    assert r.exit_code == 0
    assert '"value": 1.5' in r.stdout
    assert "invalid PV URI 'variable:a'" in r.stderr and "No such command 'nosuchcommand'" in r.stderr
    assert "Put value=3 to pva://variable:a" in r.stdout
    assert "Usage: k2eg get" in r.stdout and "Commands:" in r.stdout
    c = client()
    assert [x[0] for x in c.calls] == ["get", "put"] and c.closed


def test_piped_shell_exits_with_the_last_commands_status():
    assert k2eg(input="get pva://remote:pv\n").exit_code == 1
    assert k2eg(input="get variable:a\nget pva://variable:a\n").exit_code == 0


def test_shell_command_is_the_same_shell():
    r = k2eg("shell", input="get pva://variable:a --json\n")
    assert r.exit_code == 0 and json.loads(r.stdout)["value"] == 1.5
    r = k2eg("repl", input="shell\n")
    assert "already in the k2eg shell" in r.stderr
