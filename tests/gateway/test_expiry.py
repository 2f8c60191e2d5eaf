"""Monitor expiry bookkeeping and the consumer-group reading, without Kafka (a fake admin answers)."""
from __future__ import annotations

import re
from concurrent.futures import Future

import pytest
from confluent_kafka import ConsumerGroupState, TopicPartition
from confluent_kafka.admin import ConsumerGroupDescription, MemberAssignment, MemberDescription

from k2eg.gateway import expiry as E
from k2eg.gateway import state as S
from k2eg.protocol import commands as C
from k2eg.protocol.uri import parse_pv_uri

A, B = parse_pv_uri("ca://a"), parse_pv_uri("pva://b")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def group(gid: str, *assignments: list[str], state=ConsumerGroupState.STABLE) -> ConsumerGroupDescription:
    members = [MemberDescription(f"m{i}", "c", "h", MemberAssignment([TopicPartition(t, 0) for t in topics]))
               for i, topics in enumerate(assignments)]
    return ConsumerGroupDescription(gid, False, members, "range", state, None)


@pytest.mark.parametrize("timeout, period", [(3, 1), (0.3, E.MIN_PERIOD_S), (3600, E.MAX_PERIOD_S), (60, 20)])
def test_check_period_is_a_bounded_fraction_of_the_timeout(timeout, period):
    assert E.check_period(timeout) == period


def test_a_destination_expires_the_timeout_after_the_first_check_that_found_no_consumer():
    clock = Clock()
    d = E.Destinations(clock)
    d.add("t", A)
    clock.t += 100
    assert d.expired(10) == []          # never checked: nothing is known
    d.observe([])
    clock.t += 9
    d.observe([])
    assert d.expired(10) == []
    clock.t += 1
    assert d.expired(10) == ["t"]


def test_a_consumer_or_a_new_monitor_command_renews_a_destination():
    clock = Clock()
    d = E.Destinations(clock)
    d.add("t", A)
    d.add("u", A)
    d.observe([])
    clock.t += 8
    d.observe(["t", "not-a-monitor-topic"])
    d.add("u", B)
    clock.t += 8
    assert d.expired(10) == []
    d.observe([])
    clock.t += 9
    assert d.expired(10) == []
    clock.t += 1
    assert sorted(d.expired(10)) == ["t", "u"]
    assert d.topics() == ["t", "u"]   # expired() only reports


def test_take_expired_refuses_a_destination_renewed_since_the_check():
    clock = Clock()
    d = E.Destinations(clock)
    d.add("t", A, created=True)
    d.observe([])
    clock.t += 10
    assert d.expired(10) == ["t"]
    d.add("t", B)  # a monitor command arrived in between
    assert d.take_expired("t", 10) is None
    d.observe([])
    clock.t += 10
    taken = d.take_expired("t", 10)
    assert taken.pvs == {A, B} and taken.created and d.topics() == []


def test_created_sticks_per_topic_and_discard_of_the_last_pv_forgets_it():
    d = E.Destinations(Clock())
    d.add("t", A, created=True)
    d.add("t", B, created=False)
    assert d.get("t").created
    d.discard("t", A)
    assert d.get("t").pvs == {B}
    d.discard("t", B)
    assert d.get("t") is None


def test_consumed_topics_are_those_assigned_to_members_of_groups_not_filtered_out():
    groups = [group("app-1", ["mon-a", "mon-b"], ["mon-c"]), group("archiver-7", ["mon-d"]),
              group("empty", state=ConsumerGroupState.EMPTY)]
    assert E.consumed_topics(groups, []) == {"mon-a", "mon-b", "mon-c", "mon-d"}
    assert E.consumed_topics(groups, [re.compile("archiver-.*")]) == {"mon-a", "mon-b", "mon-c"}
    assert E.consumed_topics(groups, [re.compile("archiver")]) == {"mon-a", "mon-b", "mon-c", "mon-d"}  # full match


def done(value) -> Future:
    f = Future()
    f.set_result(value)
    return f


class Listing:
    def __init__(self, gid, state, simple=False):
        self.group_id, self.state, self.is_simple_consumer_group = gid, state, simple


class FakeAdmin:
    def __init__(self, groups: list[ConsumerGroupDescription], fail: bool = False):
        self.groups = {g.group_id: g for g in groups}
        self.fail = fail
        self.described: list[str] = []

    def list_consumer_groups(self, request_timeout):
        if self.fail:
            raise RuntimeError("broker down")
        result = type("R", (), {})()
        result.valid = [Listing(g.group_id, g.state) for g in self.groups.values()] + [
            Listing("simple", ConsumerGroupState.EMPTY, simple=True)]
        return done(result)

    def describe_consumer_groups(self, ids, request_timeout):
        self.described += ids
        return {i: done(self.groups[i]) for i in ids}


def checker(admin, dests, expired: list, ignore=()):
    return E.ExpiryChecker(admin, dests, 10, expired.append, ignore)


def test_checker_expires_what_no_active_member_consumes_and_describes_only_groups_with_members():
    clock = Clock()
    dests = E.Destinations(clock)
    dests.add("read", A)
    dests.add("unread", A)
    dests.add("read-by-tool", B)
    admin = FakeAdmin([group("app", ["read"]), group("tool", ["read-by-tool"]),
                       group("gone", ["unread"], state=ConsumerGroupState.EMPTY)])
    expired: list[str] = []
    c = checker(admin, dests, expired, ignore=["tool"])
    assert c.check() == []
    clock.t += 6
    assert c.check() == []
    clock.t += 4
    assert c.check() == ["unread", "read-by-tool"] and expired == ["unread", "read-by-tool"]
    assert admin.described == ["app"] * 3   # not the empty one, not the ignored one, not simple groups


def test_checker_expires_nothing_when_kafka_does_not_answer():
    clock = Clock()
    dests = E.Destinations(clock)
    dests.add("t", A)
    dests.observe([])
    clock.t += 100
    expired: list[str] = []
    assert checker(FakeAdmin([], fail=True), dests, expired).check() == [] and expired == []
    assert dests.topics() == ["t"]


def test_checker_survives_a_failing_expiry_and_goes_on_with_the_others():
    clock = Clock()
    dests = E.Destinations(clock)
    dests.add("bad", A)
    dests.add("good", A)
    dests.observe([])
    clock.t += 100
    seen = []

    def expire(topic):
        seen.append(topic)
        if topic == "bad":
            raise RuntimeError("boom")

    c = E.ExpiryChecker(FakeAdmin([]), dests, 10, expire)
    assert c.check() == ["good"] and seen == ["bad", "good"]


# ----------------------------------------------------------------------------- the gateway's side, with fakes

class FakeState:
    def __init__(self):
        self.items, self.removed = [], []

    def write(self, items=(), removed=()):
        self.items += list(items)
        self.removed += list(removed)


@pytest.fixture
def gw():
    from k2eg.gateway import options as O
    from k2eg.gateway.service import Gateway

    from .test_service import OPTS, FakeIO, FakeProvider

    io, provider = FakeIO(), FakeProvider()
    io.admin.deleted = []
    io.admin.delete = io.admin.deleted.append
    g = Gateway(O.parse([*OPTS, "--nc-monitor-expiration-timeout", "10"], environ={}), io,
                {"pva": provider, "ca": provider}, FakeState())
    clock = Clock()
    g.destinations._clock = clock
    g.clock = clock
    yield g
    g.close()


def run(g, *docs):
    import json
    for d in docs:
        g.handle(json.dumps(d).encode())
    g.workers.shutdown(wait=True)


def expire_all(g) -> None:
    g.destinations.observe([])
    g.clock.t += 10
    for topic in g.destinations.expired(10):
        g.expire(topic)


def test_only_a_topic_created_for_the_monitor_is_deleted_never_a_reply_topic(gw):
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"},
        {"command": "monitor", "pv_name": "pva://good:b", "reply_topic": "r2"})
    gw.io.ensure_topics(["existing"])
    assert gw.destinations.get("mine").created and not gw.destinations.get("r2").created
    assert [(s.command.destination, s.created_topic, s.command.reply_id) for s in gw.state.items] == [
        ("mine", True, None), ("r2", False, None)]
    expire_all(gw)
    assert gw.io.admin.deleted == ["mine"]
    assert gw.hub.channels() == [] and gw.destinations.topics() == []
    assert sorted(gw.state.removed) == sorted([S.monitor_key(parse_pv_uri("pva://good:a"), "mine"),
                                               S.monitor_key(parse_pv_uri("pva://good:b"), "r2")])


def test_no_purge_option_keeps_even_a_created_topic(gw):
    gw.opts.values["nc_purge_queue_on_exp_timeout"] = False
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"})
    expire_all(gw)
    assert gw.io.admin.deleted == [] and gw.hub.channels() == []


def test_a_pv_that_never_connects_is_neither_tracked_nor_kept(gw):
    run(gw, {"command": "monitor", "pv_name": "pva://bad:a", "monitor_dest_topic": "t", "reply_topic": "r"})
    assert gw.destinations.topics() == [] and gw.state.items == []


def test_resume_subscribes_once_per_pv_answers_nobody_and_keeps_the_created_flag(gw):
    states = [S.MonitorState(C.Monitor(pv=parse_pv_uri("pva://good:a"), destination="t1"), created_topic=True),
              S.MonitorState(C.Monitor(pv=parse_pv_uri("pva://good:a"), destination="t2")),
              S.MonitorState(C.Monitor(pv=parse_pv_uri("pva://bad:x"), destination="t2"))]
    gw.resume(states)
    assert {ch.pv.name: gw.hub.opened[ch.pv] for ch in gw.hub.channels()} == {"good:a": 1, "bad:x": 1}
    assert gw.destinations.get("t1").created and gw.destinations.get("t2").created is False
    assert not [e for e in gw.io.log if e[0] == "publish" and e[1] not in ("t1", "t2")]   # no replies
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "t1", "reply_topic": "r"})
    assert gw.hub.opened[parse_pv_uri("pva://good:a")] == 1
