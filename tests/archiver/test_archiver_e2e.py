"""The archiver in the real stack: Kafka, the demo IOC, the gateway and k2eg-archiver (embedded store)."""
from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid

import pytest

from k2eg.archiver.wire import ns_to_datetime
from k2eg.broker import SnapshotProperties
from k2eg.protocol.codec import json_safe
from k2eg.dml import dml
from k2eg.snapshot_data import Recorder

from ..stacks import own_stack

pytestmark = pytest.mark.e2e

COUNTER = "pva://channel:counter"        # +1 every 0.1 s


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with own_stack(tmp_path_factory, "archive", archiver=True, archiver_args=["--flush-interval", "0.5"]) as s:
        yield s


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def backend(request, stack):
    """The stack's archiver on this backend (restarted when it changes; the postgres one in a group of its own,
    so it archives the topics from their start)."""
    if not hasattr(stack, "archiver_args"):
        stack.archiver_args = {"embedded": list(stack.archiver.args)}
    if request.param not in stack.archiver_args:
        from .backends import cluster
        stack.archiver_args["postgres"] = [*stack.archiver.args, "--backend", "postgres",
                                           "--dsn", cluster().create_database(), "--group-id", "k2eg-archiver-pg"]
    if stack.archiver.args != stack.archiver_args[request.param]:
        stack.stop_archiver()
        stack.archiver.args = stack.archiver_args[request.param]
        stack.start_archiver()
    return request.param


@pytest.fixture
def k(stack):
    with dml(stack.environment, f"arch-{uuid.uuid4().hex[:8]}") as client:
        yield client


def same(a, b) -> bool:
    """Equal value trees, NaN equal to NaN (limits of records without any are NaN)."""
    return json_safe(a) == json_safe(b)


def ts_ns(tree: dict) -> int:
    ts = tree["timeStamp"]
    return ts["secondsPastEpoch"] * 10**9 + ts["nanoseconds"]


def wait_for(cond, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


class Seen:
    """The distinct events a monitor of the same PV delivered.

    A monitor command for a PV already monitored makes the gateway publish its current value again
    (PROTOCOL 5); the archive lists such a repeat once, so the monitor's copy is kept once here too.
    """

    def __init__(self):
        self.values: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, _name, tree):
        with self.lock:
            if self.values and ts_ns(self.values[-1]) == ts_ns(tree) and same(self.values[-1], tree):
                return
            self.values.append(tree)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.values)


def test_history_holds_every_value_once_across_a_kill_9(stack, backend, k):
    assert COUNTER in k.archive_add([COUNTER])["pvs"]        # the archiver also asks the gateway to monitor it
    seen = Seen()
    k.monitor(COUNTER, seen)
    wait_for(lambda: len(seen.snapshot()) >= 20, 30, "20 monitor events")
    first = seen.snapshot()[0]
    wait_for(lambda: k.history(COUNTER, ns_to_datetime(ts_ns(first)), time.time() + 10), 30,
             "the archive to record the counter")
    stack.archiver.kill()                                     # kill -9: nothing flushed or committed
    time.sleep(2)                                             # events pile up in Kafka meanwhile
    stack.start_archiver()
    n = len(seen.snapshot())
    wait_for(lambda: len(seen.snapshot()) >= n + 20, 30, "20 more monitor events")
    k.stop_monitor("channel:counter")
    live = seen.snapshot()
    last = ts_ns(live[-1])

    def archived():
        h = k.history(COUNTER, ns_to_datetime(ts_ns(live[0])).isoformat(), last / 1e9 + 1e-6)
        return h if h and ts_ns(h[-1]) >= last else None
    hist = wait_for(archived, 30, "the archive to catch up with the monitor")
    values = [t["value"] for t in hist]
    assert all(b - a == 1 for a, b in zip(values, values[1:])), values      # none missing, none doubled
    assert [ts_ns(t) for t in hist] == sorted(ts_ns(t) for t in hist)
    assert same(hist, live)                                   # whole trees: value, alarm, timeStamp, display ...

    # values_at agrees with what the monitor saw: at an event's own stamp, and just before it
    for i in (1, len(live) // 2, len(live) - 1):
        t = ts_ns(live[i])
        assert k.values_at([COUNTER], ns_to_datetime(t + 999))[COUNTER]["value"] == live[i]["value"]
        assert same(k.values_at([COUNTER], ns_to_datetime(t - 1000))[COUNTER], live[i - 1])
    assert k.values_at([COUNTER, "pva://no:such:pv"], ts_ns(live[0]) / 1e9)["pva://no:such:pv"] is None

    import pandas as pd       # a pandas Timestamp keeps the ns of the time stamps
    frame = k.history(COUNTER, pd.Timestamp(ts_ns(live[0]), unit="ns", tz="UTC"),
                      pd.Timestamp(last, unit="ns", tz="UTC"), as_frame=True)
    assert list(frame["value"]) == values and str(frame["time"].dt.tz) == "UTC"

    # the Archiver Appliance's getData.json answers the same range
    url = (f"http://127.0.0.1:{stack.archiver.http_port}/retrieval/data/getData.json?pv=channel:counter"
           f"&from={ns_to_datetime(ts_ns(live[0])).isoformat().replace('+00:00', 'Z')}"
           f"&to={ns_to_datetime(last).isoformat().replace('+00:00', 'Z')}")
    with urllib.request.urlopen(url, timeout=10) as r:
        (doc,) = json.load(r)
    assert doc["meta"]["name"] == "channel:counter"
    assert [d["val"] for d in doc["data"]] == values[:len(doc["data"])] and len(doc["data"]) >= len(values) - 1
    assert [(d["secs"], d["nanos"]) for d in doc["data"]] == [divmod(ts_ns(t), 10**9) for t in hist[:len(doc["data"])]]
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.archiver.http_port}/retrieval/data/getDataAtTime?at="
        f"{ns_to_datetime(ts_ns(live[5]) + 999).isoformat().replace('+00:00', 'Z')}",
        data=json.dumps(["channel:counter"]).encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        at = json.load(r)
    assert at["channel:counter"]["val"] == live[5]["value"]


def test_a_snapshot_iteration_comes_back_equal_to_the_live_one(stack, backend, k):
    name = f"arch_{uuid.uuid4().hex[:6]}"
    k.archive_add(snapshots=[name])
    rec = Recorder()
    k.snapshot_recurring(SnapshotProperties(snapshot_name=name, time_window=200, repeat_delay=100,
                                            pv_uri_list=["pva://channel:counter", "ca://variable:a"]), rec)
    wait_for(lambda: len(rec) >= 4, 30, "4 live iterations")
    k.snapshot_stop(name)
    live = rec.iterations
    newest = wait_for(lambda: (lambda s: s if s and s["iteration"] == live[-1]["iteration"] else None)(
        k.snapshot_at(name, time.time() + 5)), 30, "the archive to hold the last iteration")
    assert same(newest, live[-1])
    archived = k.snapshot_iterations(name)
    by_number = {it["iteration"]: it for it in archived}
    for it in live:
        assert same(by_number[it["iteration"]], it)
    middle = live[len(live) // 2]
    assert same(k.snapshot_at(name, middle["tail_timestamp"] / 1000), middle)
    assert k.snapshot_at(name, "2000-01-01T00:00:00Z") is None
    assert name in k.archive_list()["snapshots"]


def test_bad_queries_get_clear_errors(k):
    from k2eg.client.errors import OperationError
    with pytest.raises(ValueError, match="ISO 8601"):
        k.history(COUNTER, "yesterday-ish", "now")
    with pytest.raises(OperationError, match="end_ns"):
        k.history(COUNTER, 10, 5)
    with pytest.raises(OperationError, match="snapshot name"):
        k._archive("snapshot_at", 10, snapshot_name="bad name", at_ns=1)


def read_topic(stack, topic: str, n: int, timeout: float = 30) -> list:
    """The first ``n`` records of a topic, decoded."""
    from confluent_kafka import Consumer, TopicPartition

    from k2eg.protocol.codec import HEADER, decode
    c = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": f"t-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False})
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        out: list = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            for m in c.consume(500, 0.5):
                if m.error() is None:
                    out.append(decode(m.value(), dict(m.headers() or []).get(HEADER)))
        return out
    finally:
        c.close()


def test_cli_and_replay(stack, k, tmp_path):
    from click.testing import CliRunner

    from k2eg.cli.main import cli
    from k2eg.protocol.snapshots import IterationAssembler

    def run(*args):
        r = CliRunner().invoke(cli, ["-e", stack.environment, "-a", f"cli-{uuid.uuid4().hex[:6]}", *args])
        assert r.exit_code == 0, r.output
        return r.output

    name = f"replay_{uuid.uuid4().hex[:6]}"
    assert name in json.loads(run("archive", "add", "--snapshot", name))["snapshots"]
    rec = Recorder()
    k.snapshot_recurring(SnapshotProperties(snapshot_name=name, time_window=200, repeat_delay=100,
                                            pv_uri_list=["pva://channel:counter", "ca://variable:b"]), rec)
    wait_for(lambda: len(rec) >= 3, 30, "3 live iterations")
    k.snapshot_stop(name)
    live = rec.iterations
    wait_for(lambda: len(k.snapshot_iterations(name)) == len(live), 30, "the archive to hold every iteration")

    # replay: the same iterations reach a snapshot handler (the client's assembler) from another topic
    topic = f"replayed-{name}"
    run("replay", "--snapshot", name, "--topic", topic, "--speed", "0")
    records = read_topic(stack, topic, sum(2 + sum(len(v) for p, v in it.items() if p in ("channel:counter",
                                                                                            "variable:b"))
                                           for it in live))
    got = []
    asm = IterationAssembler(name, ["channel:counter", "variable:b"], got.append)
    for r in records:
        asm.feed(r)
    assert len(got) == len(live) and all(same(a, b) for a, b in zip(got, live))

    # history / at / list from the command line
    run("archive", "add", COUNTER)
    seen = Seen()
    k.monitor(COUNTER, seen)
    wait_for(lambda: len(seen.snapshot()) >= 5, 30, "5 monitor events")
    k.stop_monitor("channel:counter")
    t = ts_ns(seen.snapshot()[-1])
    when = ns_to_datetime(t + 999).isoformat()
    wait_for(lambda: k.values_at([COUNTER], when)[COUNTER] is not None and
             ts_ns(k.values_at([COUNTER], when)[COUNTER]) == t, 30, "the archive to hold the last event")
    out = run("at", COUNTER, "--time", when, "--json")
    assert json.loads(out)[COUNTER]["value"] == seen.snapshot()[-1]["value"]
    csv = tmp_path / "h.csv"
    run("history", COUNTER, "--from", ns_to_datetime(ts_ns(seen.snapshot()[0])).isoformat(), "--to", when,
        "--csv", str(csv))
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("pv,time,value") and len(lines) - 1 >= len(seen.snapshot())
    assert COUNTER in json.loads(run("archive", "list"))["pvs"]


def test_two_archivers_split_the_topics_as_one_group(stack, backend, k):
    """A second archiver in the same group (same store, its own writer id) takes part of the topics; the
    history stays whole and single."""
    import re

    from k2eg.stack.archiver import ArchiverProcess
    uris = [COUNTER, "pva://channel:ramp:ramp", "ca://variable:sum", "pva://channel:waveform"]
    k.archive_add(uris)
    second = ArchiverProcess(stack.state_dir / f"second-{backend}",
                             [*stack.archiver.args, "--writer-id", "second",
                              "--path", str(stack.archiver.work_dir / "archive")])
    try:
        second.start(stack.bootstrap, stack.cmd_topic, dict(__import__("os").environ))

        def assigned(proc):
            counts = re.findall(r"archiving (\d+) partitions", proc.log_path.read_text())
            return int(counts[-1]) if counts else 0
        wait_for(lambda: assigned(second) > 0, 60, "the second archiver to get partitions")
        seen = Seen()
        k.monitor(COUNTER, seen)
        wait_for(lambda: len(seen.snapshot()) >= 30, 30, "30 monitor events")
        k.stop_monitor("channel:counter")
        live = seen.snapshot()

        def archived():
            h = k.history(COUNTER, ns_to_datetime(ts_ns(live[0])), ns_to_datetime(ts_ns(live[-1]) + 999))
            return h if len(h) >= len(live) else None
        hist = wait_for(archived, 30, "the archive to catch up")
        assert [t["value"] for t in hist] == [t["value"] for t in live]
        waveform = k.values_at(["pva://channel:waveform"], time.time() + 1)["pva://channel:waveform"]
        assert waveform is not None and len(waveform["value"]) > 1       # an array kept whole
    finally:
        second.stop()
