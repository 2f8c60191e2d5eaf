"""Operations: Prometheus metrics during real traffic, put access rules, read-only (a second gateway)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from k2eg import OperationError
from k2eg.dml import dml
from k2eg.stack.ports import free_port

from ..stacks import extra_gateway

pytestmark = pytest.mark.e2e

RULES = """
DENY  variable:b            # nobody writes b through this gateway, nor any field of it
DENY  variable:a\\.DESC     # a field rule, before its record's rule: the exception
ALLOW variable:a   ops-.*   # only ops-* apps write a
ALLOW .*           ops-.*   # everything else, for ops-*: must not open variable:b's fields
"""


@pytest.fixture(scope="module")
def ops_gateway(stack, tmp_path_factory):
    """A gateway with metrics and access rules on its own command topic, beside the session one."""
    d = tmp_path_factory.mktemp("ops")
    (d / "rules.acl").write_text(RULES)
    (d / "ops.ini").write_text(f"[DEFAULT]\nkafka_broker_url={stack.bootstrap}\nk2eg_cmd_topic=k2eg-cmd-ops\n")
    port = free_port()
    with extra_gateway(stack.bootstrap, "k2eg-cmd-ops", "--metric-enable", "true", "--metric-server-http-port",
                       str(port), "--access-rules", str(d / "rules.acl"), env=stack.client_env(),
                       group="k2eg-ops") as gw:
        yield {"dir": d, "port": port, **gw}


@pytest.fixture
def ops_client(ops_gateway, monkeypatch):
    def make(app):
        monkeypatch.setenv("K2EG_PYTHON_CONFIGURATION_PATH_FOLDER", str(ops_gateway["dir"]))
        return dml("ops", app)
    return make


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_with_real_traffic(ops_gateway, ops_client):
    port = ops_gateway["port"]
    assert scrape(port, "/healthz").strip() == "ok" and scrape(port, "/readyz").strip() == "ready"
    before = scrape(port)
    with ops_client("ops-metrics") as k:
        for _ in range(5):
            k.get("pva://variable:a", timeout=10)
        got = threading.Event()
        k.monitor("pva://channel:counter", lambda n, v: got.set(), timeout=10)
        assert got.wait(10)
        time.sleep(1)  # let ~10 monitor events through
    after = scrape(port)
    assert metric(after, 'k2eg_commands_total{outcome="received"}') >= \
        metric(before, 'k2eg_commands_total{outcome="received"}') + 6
    assert metric(after, 'k2eg_epics_operations_total{kind="get",outcome="ok"}') >= 5
    assert metric(after, "k2eg_events_published_total") > metric(before, "k2eg_events_published_total") + 5
    assert metric(after, "k2eg_bytes_published_total") > metric(before, "k2eg_bytes_published_total")
    assert metric(after, "k2eg_pvs_total") >= 1 and metric(after, "k2eg_produce_latency_seconds_count") > 0


def test_snapshot_iterations_are_counted_and_timed(ops_gateway, ops_client):
    from k2eg.broker import SnapshotProperties

    port = ops_gateway["port"]
    before = scrape(port)
    iterations = []
    with ops_client("ops-snap") as k:
        k.snapshot_recurring(SnapshotProperties(snapshot_name="ops_metrics_snap", time_window=200,
                                                pv_uri_list=["pva://channel:counter", "ca://bulk:001"]),
                             lambda _name, data: iterations.append(data), timeout=10)
        deadline = time.monotonic() + 15
        while len(iterations) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        k.snapshot_stop("ops_metrics_snap", timeout=10)
    after = scrape(port)
    assert len(iterations) >= 3
    done = metric(after, "k2eg_snapshot_iterations_total") - metric(before, "k2eg_snapshot_iterations_total")
    timed = (metric(after, "k2eg_snapshot_iteration_seconds_count")
             - metric(before, "k2eg_snapshot_iteration_seconds_count"))
    assert done >= 3 and timed == done


def test_denied_put_names_the_rule_and_leaves_the_pv_unchanged(ops_gateway, ops_client, k):
    before = k.get("ca://variable:b", timeout=10)["value"]
    with ops_client("ops-writer") as w:
        with pytest.raises(OperationError) as e:
            w.put("ca://variable:b", before + 1, timeout=10)
        assert e.value.error == -4 and "rules.acl:2" in e.value.args[0]
        w.put("ca://variable:a", 1.25, timeout=10)          # allowed for ops-*
    with ops_client("physicist") as p:
        with pytest.raises(OperationError, match="no rule"):
            p.put("ca://variable:a", 2.0, timeout=10)
    assert k.get("ca://variable:b", timeout=10)["value"] == before
    assert k.get("ca://variable:a", timeout=10)["value"] == 1.25
    log = "".join(ops_gateway["log"])
    assert "denied" in log and "ops-writer" in log and "variable:b" in log
    assert metric(scrape(ops_gateway["port"]), "k2eg_puts_denied_total") >= 2


@pytest.mark.parametrize("uri, value", [("ca://variable:b.VAL", 7.5), ("pva://variable:b.VAL", 7.5),
                                        ("ca://variable:b.PROC", 1), ("ca://variable:b.DESC", "walked around"),
                                        ("pva://variable:b", 7.5)])
def test_a_rule_about_a_record_governs_its_fields_over_ca_and_pva(ops_gateway, ops_client, k, uri, value):
    before = k.get("ca://variable:b", timeout=10)["value"], k.get("ca://variable:b.DESC", timeout=10)["value"]
    with ops_client("ops-walker") as w:
        with pytest.raises(OperationError) as e:
            w.put(uri, value, timeout=10)
    assert e.value.error == -4 and "rules.acl:2" in e.value.args[0], e.value.args
    after = k.get("ca://variable:b", timeout=10)["value"], k.get("ca://variable:b.DESC", timeout=10)["value"]
    assert after == before


def test_a_field_rule_before_its_record_rule_denies_that_field_only(ops_gateway, ops_client, k):
    with ops_client("ops-fields") as w:
        with pytest.raises(OperationError) as e:
            w.put("ca://variable:a.DESC", "not mine", timeout=10)
        assert e.value.error == -4 and "rules.acl:3" in e.value.args[0]
        w.put("ca://variable:a.VAL", 0.5, timeout=10)
    assert k.get("ca://variable:a", timeout=10)["value"] == 0.5


def test_unreadable_rules_file_refuses_to_start(stack, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "k2eg.gateway", "--cmd-input-topic", "x", "--sub-server-address", stack.bootstrap,
         "--pub-server-address", stack.bootstrap, "--access-rules", str(tmp_path / "missing.acl")],
        env={**os.environ, **stack.client_env()}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "missing.acl" in proc.stderr
