"""Gateway command handling and monitor fan-out with fake Kafka and EPICS: races and failure paths
that the real stack shows only rarely."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from k2eg.gateway import options as O
from k2eg.gateway.epics.base import PVError, connect_timeout
from k2eg.gateway.monitors import MonitorHub
from k2eg.gateway.service import Gateway, Workers
from k2eg.gateway.state import MonitorState
from k2eg.protocol import commands as C
from k2eg.protocol.codec import decode
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import parse_pv_uri

from .test_expiry import FakeState

OPTS = ["--cmd-input-topic", "cmd", "--sub-server-address", "k", "--pub-server-address", "k",
        "--pv-connection-timeout", "0.3", "--command-workers", "4"]


class FakeSub:
    def __init__(self, cb):
        self.cb = cb
        self.closed = False

    def close(self):
        self.closed = True


class FakeProvider:
    """PVs named 'good*' exist; events are fired by the test through ``fire``."""

    protocol = "pva"

    def __init__(self):
        self.subs: dict[str, list[FakeSub]] = {}
        self.reads: list[str] = []

    def get(self, name, timeout):
        self.reads.append(name)
        if not name.startswith("good"):
            raise connect_timeout(name, timeout)
        return {"value": 1.0}

    def put(self, name, value, timeout):
        self.get(name, timeout)

    def info(self, name, timeout):
        self.get(name, timeout)
        return {"protocol": "pva", "name": name}

    def monitor(self, name, on_event):
        if name.startswith("broken"):
            raise PVError(ErrorCode.EPICS_FAILED, f"PV '{name}': cannot create channel")
        sub = FakeSub(on_event)
        self.subs.setdefault(name, []).append(sub)
        if name.startswith("good"):
            on_event({"value": 0.0})
        return sub

    def fire(self, name, tree):
        for sub in self.subs[name]:
            if not sub.closed:
                sub.cb(tree)

    def close(self):
        pass


class FakeCallingBackProvider(FakeProvider):
    """A provider whose gets call back (as PVA does): the test answers them through ``calls``."""

    def __init__(self, refuse: bool = False):
        super().__init__()
        self.calls: list[tuple] = []  # (name, timeout, done)
        self.refuse = refuse

    def get_async(self, name, timeout, done):
        if self.refuse:
            raise ProtocolError(ErrorCode.EPICS_FAILED, "PVA provider is closed")
        self.calls.append((name, timeout, done))


class FakeAdmin:
    def __init__(self, log):
        self.log = log
        self.created: set[str] = set()   # the topics that exist, in this fake
        self.deleted: list[str] = []

    def ensure(self, topics, timeout=10.0):
        self.log.append(("ensure", tuple(topics)))
        made = [t for t in topics if t not in self.created]
        self.created.update(made)
        return made

    def exists(self, topic, timeout=10.0):
        return topic in self.created

    def missing(self, topics):
        return [t for t in topics if t not in self.created]

    def delete(self, topic, timeout=10.0):
        self.deleted.append(topic)
        self.created.discard(topic)


class FakeIO:
    def __init__(self, refuse: set[str] = frozenset()):
        self.log: list[tuple] = []
        self.admin = FakeAdmin(self.log)
        self.refuse = refuse
        self.dropped = 0
        self.published = 0
        self.command_pauses = 0

    def ensure_topics(self, topics):
        bad = [t for t in topics if t in self.refuse]
        if bad:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"cannot create topic {bad[0]}: refused")
        return self.admin.ensure(topics)

    def publish(self, topic, key, record, ser=C.Serialization.MSGPACK, value_key=None, on_too_large=None):
        self.log.append(("publish", topic, key, record))
        self.too_large = on_too_large  # the last reply's: a test plays the broker refusing it

    def publish_bytes(self, topic, key, data, ser):
        self.log.append(("publish", topic, key, decode(data, ser.header)))

    publish_event = publish_bytes  # monitor events: the same record in this fake

    def replies(self, topic):
        return [e[3] for e in self.log if e[0] == "publish" and e[1] == topic]

    def handled(self, at):
        self.log.append(("handled", at))

    def publishes_at_once(self, topics):
        return set(topics) <= self.admin.created


@pytest.fixture
def gw():
    io, provider = FakeIO(refuse={"refused-topic"}), FakeProvider()
    g = Gateway(O.parse(OPTS, environ={}), io, {"pva": provider, "ca": provider}, state=FakeState())
    yield g
    g.close()


def run(g: Gateway, *docs: Any) -> None:
    """Handle commands and wait until every worker is done."""
    for d in docs:
        g.handle(d if isinstance(d, (bytes, type(None))) else json.dumps(d).encode())
    g.workers.shutdown(wait=True)


def test_reply_topic_is_created_before_the_first_reply(gw):
    run(gw, {"command": "get", "pv_name": "pva://good:a", "reply_topic": "app-reply", "reply_id": "1"})
    first_ensure = gw.io.log.index(("ensure", ("app-reply",)))
    first_publish = next(i for i, e in enumerate(gw.io.log) if e[0] == "publish")
    assert first_ensure < first_publish
    assert gw.io.replies("app-reply") == [{"error": 0, "reply_id": "1", "good:a": {"value": 1.0}}]


def _get(pv: str, reply_id: str, topic: str = "app-reply") -> bytes:
    return json.dumps({"command": "get", "pv_name": pv, "reply_topic": topic, "reply_id": reply_id}).encode()


def test_gets_of_one_pv_read_in_one_poll_share_one_epics_read(gw):
    """Each still gets its own reply (reply_id, topic); other commands of the poll run as usual."""
    gw.handle(_get("pva://good:a", "1"), _get("pva://good:b", "2"), _get("pva://good:a", "3", "other-reply"),
              b"{", _get("ca://good:a", "4"), _get("pva://good:a", "5"))
    gw.workers.shutdown(wait=True)
    assert sorted(gw.providers["pva"].reads) == ["good:a", "good:a", "good:b"]  # pva://good:a once, ca://good:a once
    assert sorted(r["reply_id"] for r in gw.io.replies("app-reply")) == ["1", "2", "4", "5"]
    assert gw.io.replies("other-reply") == [{"error": 0, "reply_id": "3", "good:a": {"value": 1.0}}]
    assert gw.counters == {"received": 6, "bad": 1, "failed": 1, "unanswerable": 1, "reply_topic_refused": 0}  # the "{"
    assert gw.operations == {("get", "ok"): 5}


def test_a_shared_read_that_fails_fails_each_get_with_its_reason(gw):
    gw.handle(*(_get("pva://no:such", str(i)) for i in range(3)))
    gw.workers.shutdown(wait=True)
    assert gw.providers["pva"].reads == ["no:such"]  # one connection timeout, not three in a row
    replies = gw.io.replies("app-reply")
    assert sorted(r["reply_id"] for r in replies) == ["0", "1", "2"]
    assert {r["error"] for r in replies} == {ErrorCode.TIMEOUT} and all("no:such" in r["message"] for r in replies)
    assert gw.operations == {("get", "error"): 3}


@pytest.fixture
def calling_back():
    io, provider = FakeIO(), FakeCallingBackProvider()
    g = Gateway(O.parse([*OPTS, "--command-backlog", "3"], environ={}), io, {"pva": provider, "ca": FakeProvider()})
    yield g
    g.close()


def test_gets_of_a_provider_that_calls_back_are_answered_from_its_callback(calling_back):
    """No worker waits for the read; the callback's thread answers each get of the poll."""
    g, provider = calling_back, calling_back.providers["pva"]
    g.io.admin.created.add("app-reply")
    g.handle(_get("pva://good:a", "1"), _get("pva://good:a", "2"), _get("pva://good:b", "3"))
    assert [(n, t) for n, t, _ in provider.calls] == [("good:a", 0.3), ("good:b", 0.3)] and provider.reads == []
    assert g.status()["command_backlog"]["reading"] == 3 and g.busy()  # the backlog is 3
    answering = threading.Thread(target=provider.calls[0][2], args=({"value": 2.0}, None))
    answering.start()
    answering.join()
    provider.calls[1][2](None, connect_timeout("good:b", 0.3))
    replies = {r["reply_id"]: r for r in g.io.replies("app-reply")}
    assert replies["1"] == {"error": 0, "reply_id": "1", "good:a": {"value": 2.0}} and replies["2"]["good:a"]
    assert replies["3"]["error"] == ErrorCode.TIMEOUT and "good:b" in replies["3"]["message"]
    assert g.status()["command_backlog"]["reading"] == 0 and not g.busy()
    assert g.operations == {("get", "ok"): 2, ("get", "error"): 1}


def test_a_get_whose_reply_topic_is_new_is_read_on_a_worker(calling_back):
    """Creating the topic blocks, which the provider's callback thread must not do."""
    g, provider = calling_back, calling_back.providers["pva"]
    g.handle(_get("pva://good:a", "1"))
    g.workers.shutdown(wait=True)
    assert provider.calls == [] and provider.reads == ["good:a"]
    assert g.io.replies("app-reply") == [{"error": 0, "reply_id": "1", "good:a": {"value": 1.0}}]


def test_a_read_the_provider_refuses_to_start_fails_each_get(calling_back):
    g, provider = calling_back, calling_back.providers["pva"]
    g.io.admin.created.add("app-reply")
    provider.refuse = True
    g.handle(_get("pva://good:a", "1"), _get("pva://good:a", "2"))
    g.workers.shutdown(wait=True)
    replies = g.io.replies("app-reply")
    assert sorted(r["reply_id"] for r in replies) == ["1", "2"]
    assert all(r["error"] == ErrorCode.EPICS_FAILED and "closed" in r["message"] for r in replies)
    assert g.status()["command_backlog"]["reading"] == 0


def test_each_command_is_reported_handled_once_answered_and_only_then(calling_back):
    """Only a handled command's offset may be committed: reported after its reply (or failure), never before,
    including gets answered from the provider's callback."""
    g, provider = calling_back, calling_back.providers["pva"]
    g.io.admin.created.add("app-reply")
    put = {"command": "put", "pv_name": "pva://good:p", "value": C.encode_put_value({"value": 1}),
           "reply_topic": "app-reply", "reply_id": "p"}
    g.handle(_get("pva://good:a", "1"), json.dumps(put).encode(), b"{", _get("pva://good:a", "2"),
             json.dumps({"command": "status", "reply_topic": "app-reply", "reply_id": "s"}).encode(),
             at=[(0, 10), (0, 11), (0, 12), (0, 13), (0, 14)])
    g.workers.shutdown(wait=True)
    handled = [e[1] for e in g.io.log if e[0] == "handled"]
    assert sorted(handled) == [(0, 11), (0, 12), (0, 14)]       # the gets wait for their read
    provider.calls[0][2]({"value": 2.0}, None)
    handled = [e[1] for e in g.io.log if e[0] == "handled"]
    assert sorted(handled) == [(0, 10), (0, 11), (0, 12), (0, 13), (0, 14)] and len(handled) == 5
    for reply_id, at in (("1", (0, 10)), ("p", (0, 11)), ("2", (0, 13)), ("s", (0, 14))):
        replied = next(i for i, e in enumerate(g.io.log) if e[0] == "publish" and e[3]["reply_id"] == reply_id)
        assert replied < g.io.log.index(("handled", at)), reply_id


def test_nothing_is_answered_once_the_stop_has_drained(calling_back):
    """What finishes after the drain stays uncommitted and is answered by the next gateway, so not here too."""
    g, provider = calling_back, calling_back.providers["pva"]
    g.io.admin.created.add("app-reply")
    g.handle(_get("pva://good:a", "1"), at=[(0, 1)])
    g.stop_replying()
    provider.calls[0][2]({"value": 2.0}, None)
    assert g.io.replies("app-reply") == []


def test_a_put_read_again_after_a_crash_is_answered_and_not_applied_again():
    from k2eg.gateway.journal import Entry, put_digest

    from .test_journal import RecordingJournal

    io, provider, journal = FakeIO(), FakeProvider(), RecordingJournal()
    g = Gateway(O.parse(OPTS, environ={}), io, {"pva": provider, "ca": provider}, journal=journal)
    try:
        doc = {"command": "put", "pv_name": "pva://good:p", "value": C.encode_put_value({"value": 1}),
               "reply_topic": "app-reply", "reply_id": "p"}
        journal.ledger.set((0, 5), Entry(put_digest(C.parse_command(json.dumps(doc)))))  # a gateway died meanwhile
        g.handle(json.dumps(doc).encode(), json.dumps({**doc, "reply_id": "q"}).encode(), at=[(0, 5), (0, 6)])
        g.workers.shutdown(wait=True)
    finally:
        g.close()
    replies = {r["reply_id"]: r for r in io.replies("app-reply")}
    assert replies["p"]["error"] == ErrorCode.EPICS_FAILED and "unknown" in replies["p"]["message"]
    assert replies["q"] == {"error": 0, "reply_id": "q", "message": "put of pva://good:p done"}
    assert provider.reads == ["good:p"]                 # the new put only
    assert [w[0] for w in journal.writes] == [(0, 6), (0, 6)]   # started, finished


def test_handle_survives_a_parser_bug(gw, monkeypatch):
    """A bug in parsing must not stop the command loop: logged, counted, nothing raised."""
    monkeypatch.setattr(C, "parse_command", lambda raw: 1 / 0)
    run(gw, {"command": "get"})
    assert gw.counters["bad"] == 1 and gw.counters["unanswerable"] == 1


@pytest.mark.parametrize("raw", [None, b"", b"\xff\xfe", b"[]", b"{", b"null", b"[" * 100_000])
def test_unreadable_commands_are_counted_not_fatal(gw, raw):
    run(gw, raw)
    assert gw.counters == {"received": 1, "bad": 1, "failed": 1, "unanswerable": 1, "reply_topic_refused": 0}
    assert not [e for e in gw.io.log if e[0] == "publish"]


def test_a_destination_the_broker_refuses_is_an_error_reply(gw):
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "refused-topic",
             "reply_topic": "r", "reply_id": "m"})
    (rep,) = gw.io.replies("r")
    assert rep["error"] == -1 and "refused-topic" in rep["message"]
    assert gw.hub.get(parse_pv_uri("pva://good:a")) is None  # nothing left subscribed


def test_multi_monitor_accepts_the_pvs_that_did_not_connect_and_says_which(gw):
    """PROTOCOL 4: kept, announced as disconnected, delivered once they connect."""
    run(gw, {"command": "multi-monitor", "pv_name_list": ["pva://good:a", "pva://bad:a", "pva://bad:b"],
             "reply_topic": "r", "reply_id": "mm"})
    (rep,) = gw.io.replies("r")
    assert rep["error"] == 0 and "2 PVs not connected yet" in rep["message"] and "pva://bad:b" in rep["message"]
    assert "pva://good:a" not in rep["message"]
    assert gw.hub.get(parse_pv_uri("pva://good:a")).destinations == {"good_a": C.Serialization.MSGPACK}
    assert gw.hub.get(parse_pv_uri("pva://bad:a")).destinations == {"bad_a": C.Serialization.MSGPACK}
    assert gw.io.replies("bad_a") == [{"bad:a": {"alarm": {"severity": 3, "status": 9, "message": "disconnected"}}}]
    gw.providers["pva"].fire("bad:b", {"value": 5.0})
    assert gw.io.replies("bad_b")[-1] == {"bad:b": {"value": 5.0}}


def test_a_monitor_of_a_pv_not_up_yet_is_accepted_and_delivered_once_it_connects(gw):
    run(gw, {"command": "monitor", "pv_name": "pva://bad:a", "monitor_dest_topic": "d", "reply_topic": "r",
             "reply_id": "m"})
    (rep,) = gw.io.replies("r")
    assert rep["error"] == 0 and "not connected yet" in rep["message"] and "pva://bad:a" in rep["message"]
    assert gw.io.replies("d") == [{"bad:a": {"alarm": {"severity": 3, "status": 9, "message": "disconnected"}}}]
    assert not gw.status()["monitors"][0]["connected"]
    gw.providers["pva"].fire("bad:a", {"value": 1.0})
    assert gw.io.replies("d")[-1] == {"bad:a": {"value": 1.0}} and gw.status()["monitors"][0]["connected"]
    assert [i.command.pv.uri for i in gw.state.items] == ["pva://bad:a"]


def test_a_monitor_that_finds_no_value_keeps_a_pair_that_was_there_before(gw):
    """Resumed from the state topic while its IOC is away; a client then asks for the same monitor."""
    pv = parse_pv_uri("pva://bad:a")
    gw.resume([MonitorState(C.Monitor(pv=pv, destination="d"), created_topic=True)])
    run(gw, {"command": "monitor", "pv_name": "pva://bad:a", "monitor_dest_topic": "d", "reply_topic": "r",
             "reply_id": "m"})
    assert gw.hub.get(pv).destinations == {"d": C.Serialization.MSGPACK}
    assert gw.destinations.get("d").pvs == {pv} and gw.destinations.get("d").created
    gw.providers["pva"].fire("bad:a", {"value": 1.0})
    assert gw.io.replies("d")[-1] == {"bad:a": {"value": 1.0}}


def test_a_failed_monitor_command_undoes_only_the_pairs_it_added(gw):
    """The provider refuses the third PV: the new pair of the second is undone, the first one's older pair stays."""
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "reply_topic": "r", "monitor_dest_topic": "good_a",
             "reply_id": "first"})
    run_more = {"command": "multi-monitor", "pv_name_list": ["pva://good:a", "pva://good:b", "pva://broken:c"],
                "reply_topic": "r", "reply_id": "mm"}
    gw.workers = Workers(2, "test")
    run(gw, run_more)
    rep = gw.io.replies("r")[-1]
    assert rep["error"] != 0 and "broken:c" in rep["message"]
    assert gw.hub.get(parse_pv_uri("pva://good:a")).destinations == {"good_a": C.Serialization.MSGPACK}
    assert gw.destinations.get("good_a").pvs == {parse_pv_uri("pva://good:a")}
    assert gw.hub.get(parse_pv_uri("pva://good:b")) is None and gw.destinations.get("good_b") is None
    assert gw.providers["pva"].subs["good:b"][0].closed


def test_status_shows_one_subscription_shared_by_destinations(gw):
    run(gw, *[{"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": d, "reply_topic": "r",
               "reply_id": d} for d in ("d1", "d2")], {"command": "status", "reply_topic": "s", "reply_id": "s"})
    status = gw.io.replies("s")[0]["status"]
    (entry,) = status["monitors"]
    assert entry["subscriptions_opened"] == 1 and set(entry["destinations"]) == {"d1", "d2"}
    assert len(gw.providers["pva"].subs["good:a"]) == 1


# ---------------------------------------------------------------------------- MonitorHub
class Recorder:
    def __init__(self):
        self.records: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.hook = None

    def __call__(self, topic, key, data, ser):
        hook, self.hook = self.hook, None
        if hook:
            hook()
        with self.lock:
            self.records.append((topic, decode(data, ser.header)))

    def values(self, topic):
        return [rec[key]["value"] for t, rec in self.records if t == topic for key in rec]


def test_joining_destination_never_gets_an_older_value_after_a_newer_one():
    """The re-publish of the current value and a concurrent event must reach the topic in order."""
    provider, rec = FakeProvider(), Recorder()
    hub = MonitorHub({"pva": provider}, rec)
    pv = parse_pv_uri("pva://good:a")
    hub.add_destination(pv, "first", C.Serialization.MSGPACK)  # current value 0.0
    racer = threading.Thread(target=provider.fire, args=("good:a", {"value": 1.0}))

    def event_during_republish():
        racer.start()
        racer.join(0.5)  # gives an unordered hub the chance to publish 1.0 first

    rec.hook = event_during_republish
    hub.add_destination(pv, "second", C.Serialization.MSGPACK)
    racer.join()
    assert rec.values("second") == [0.0, 1.0]
    assert rec.values("first") == [0.0, 1.0]


def test_event_that_cannot_be_encoded_still_reaches_snapshot_taps():
    provider, rec = FakeProvider(), Recorder()
    hub = MonitorHub({"pva": provider}, rec)
    pv = parse_pv_uri("pva://good:a")
    seen = []
    hub.add_destination(pv, "t", C.Serialization.MSGPACK)
    hub.add_tap(pv, lambda ch, tree: seen.append(tree))
    bad = {"value": object()}
    provider.fire("good:a", bad)
    assert seen == [bad]
    assert hub.get(pv).last is bad


def test_last_destination_removed_closes_the_subscription():
    provider, rec = FakeProvider(), Recorder()
    hub = MonitorHub({"pva": provider}, rec)
    pv = parse_pv_uri("pva://good:a")
    hub.add_destination(pv, "a", C.Serialization.MSGPACK)
    hub.add_destination(pv, "b", C.Serialization.JSON)
    hub.remove_destination(pv, "a")
    assert not provider.subs["good:a"][0].closed
    hub.remove_destination(pv, "b")
    assert provider.subs["good:a"][0].closed and hub.get(pv) is None


def test_hub_says_when_the_set_of_subscriptions_changed():
    """Once per PV subscribed or dropped (the gateway trims freed memory after), not per destination."""
    provider, rec, changes = FakeProvider(), Recorder(), []
    hub = MonitorHub({"pva": provider}, rec, lambda: changes.append(1))
    pv = parse_pv_uri("pva://good:a")
    hub.add_destination(pv, "a", C.Serialization.MSGPACK)
    hub.add_destination(pv, "b", C.Serialization.MSGPACK)
    hub.add_tap(pv, lambda ch, tree: None)
    assert len(changes) == 1
    hub.remove_destination(pv, "a")
    hub.remove_destination(pv, "b")
    assert len(changes) == 1  # the tap still holds it
    hub.remove_tap(pv, next(iter(hub.get(pv).taps)))
    assert len(changes) == 2 and hub.get(pv) is None


def test_busy_once_the_backlog_of_waiting_commands_is_reached():
    io, provider = FakeIO(), FakeProvider()
    g = Gateway(O.parse([*OPTS, "--command-workers", "1", "--command-backlog", "2"], environ={}),
                io, {"pva": provider, "ca": provider})
    release = threading.Event()
    try:
        for _ in range(3):  # one runs (blocked), two wait
            g.workers.submit(release.wait)
        deadline = time.monotonic() + 5
        while g.workers.waiting() != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert g.busy() and g.status()["command_backlog"] == {"waiting": 2, "reading": 0, "limit": 2,
                                                             "reads_paused": 0}
        release.set()
        g.workers.shutdown(wait=True)
        assert not g.busy()
    finally:
        release.set()
        g.close()


def test_a_reply_the_broker_refuses_for_its_size_becomes_an_error_reply(gw):
    """PROTOCOL 4: never silence. The refusal comes later, on the producer's poll thread."""
    gw.handle(_get("pva://good:a", "big"))
    deadline = time.monotonic() + 5
    while not any(e[0] == "publish" for e in gw.io.log) and time.monotonic() < deadline:
        time.sleep(0.01)
    gw.io.too_large(2_000_000, "Broker: Message size too large")
    run(gw)
    replies = [e[3] for e in gw.io.log if e[0] == "publish"]
    assert replies[0]["error"] == 0 and replies[1]["reply_id"] == "big"
    assert replies[1]["error"] == -2 and "2000000 bytes" in replies[1]["message"]
    assert "max.message.bytes" in replies[1]["message"]
    assert gw.io.too_large is None  # the error reply itself is never turned into another one


@pytest.mark.parametrize("doc, why", [
    ({"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "cmd"}, "command topic"),
    ({"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "cmd-gateway-state"}, "state topic"),
    ({"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "cmd-gateway-status"}, "status topic"),
    ({"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "cmd-gateway-puts"},
     "names starting with 'cmd-gateway-'"),
    ({"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "__consumer_offsets"}, "Kafka internal"),
    ({"command": "multi-monitor", "pv_name_list": ["pva://good:a", "pva://__transaction_state"]}, "Kafka internal"),
    ({"command": "repeating_snapshot", "snapshot_name": "CMD", "pv_name_list": ["pva://good:a"]}, "command topic"),
    ({"command": "repeating_snapshot", "snapshot_name": "__consumer_offsets", "pv_name_list": ["pva://good:a"]},
     "Kafka internal"),
])
def test_a_destination_of_the_gateway_or_of_kafka_is_refused_naming_why(gw, doc, why):
    run(gw, {**doc, "reply_topic": "app-reply", "reply_id": "r"})
    [reply] = gw.io.replies("app-reply")
    assert reply["error"] == ErrorCode.BAD_REQUEST and why in reply["message"], reply
    assert not gw.hub.channels() and not [e for e in gw.io.log if e[0] == "ensure" and e[1] != ("app-reply",)]


@pytest.mark.parametrize("topic", ["cmd", "cmd-gateway-state", "__consumer_offsets"])
def test_a_reply_topic_of_the_gateway_or_of_kafka_gets_nothing_and_is_counted(gw, topic):
    gw.io.admin.created.add(topic)   # it exists: the gateway reads it, or Kafka keeps it
    run(gw, {"command": "put", "pv_name": "pva://good:a", "value": "gaF2AQ==", "reply_topic": topic,
             "reply_id": "r"}, _get("pva://good:a", "g", topic))
    assert not [e for e in gw.io.log if e[0] == "publish"] and gw.providers["pva"].reads == []  # nothing ran
    assert gw.counters["unanswerable"] == 2 and gw.counters["reply_topic_refused"] == 2


def test_reply_topics_created_are_capped_and_existing_ones_do_not_count():
    io, provider = FakeIO(), FakeProvider()
    g = Gateway(O.parse([*OPTS, "--max-reply-topics", "2"], environ={}), io, {"pva": provider, "ca": provider})
    io.admin.created.add("theirs-reply")
    try:
        run(g, *(_get("pva://good:a", str(i), f"app{i}-reply") for i in range(3)),
            _get("pva://good:a", "t", "theirs-reply"))
        assert io.replies("app0-reply") and io.replies("app1-reply") and io.replies("theirs-reply")
        assert not io.replies("app2-reply") and "app2-reply" not in io.admin.created
        assert g.counters["reply_topic_refused"] == 1 and g.topic_guard.reply_topics == {"app0-reply", "app1-reply"}
        assert g.counters["failed"] == 0 and g.status()["reply_topics"] == {"created": 2, "limit": 2, "refused": 1}
        assert provider.reads.count("good:a") == 3   # the refused get never read its PV
    finally:
        g.close()


def test_status_lists_are_capped_with_their_totals(gw, monkeypatch):
    from k2eg.gateway import service

    monkeypatch.setattr(service, "STATUS_MONITORS", 2)
    run(gw, *({"command": "monitor", "pv_name": f"pva://good:{i}", "reply_topic": "app-reply", "reply_id": str(i)}
              for i in range(3)))
    gw.io.admin.created.update(f"extra-{i}" for i in range(1500))
    doc = gw.status()
    assert len(doc["monitors"]) == 2 and doc["monitors_total"] == 3
    assert len(doc["topics_created"]) == 1000 and doc["topics_created_total"] == 1501   # + app-reply
    assert doc["topics_purging"] == [] and doc["topics_purging_total"] == 0
    assert doc["snapshots_total"] == 0 and doc["reply_topics"] == {"created": 1, "limit": 1000, "refused": 0}
    summary = gw.status(detail=False)
    assert "monitors" not in summary and summary["snapshots_total"] == 0
