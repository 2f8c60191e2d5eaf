"""Monitor expiry bookkeeping and the consumer-group reading, without Kafka (a fake admin answers)."""
from __future__ import annotations

import re
from concurrent.futures import Future
from typing import Callable

import pytest
from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException, TopicPartition
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


def test_a_purge_waits_for_in_flight_records_to_settle_and_a_new_monitor_cancels_it():
    clock = Clock()
    d = E.Destinations(clock)
    d.purge_later("t")
    d.purge_later("u")
    assert d.purging() == ["t", "u"] and d.purges_due() == []
    clock.t += E.PURGE_SETTLE_S
    assert d.purges_due() == ["t", "u"]
    d.add("u", A)   # a monitor command takes the topic back before it is deleted
    assert d.purges_due() == ["t"] and d.purging() == ["t"]
    assert d.purge_step("u", exists=True) is E.PurgeStep.DONE   # no longer to be purged: never deleted


def test_a_purged_topic_that_comes_back_is_deleted_again_a_few_times_then_left():
    clock = Clock()
    d = E.Destinations(clock)
    d.purge_later("t")
    clock.t += E.PURGE_SETTLE_S
    for _ in range(E.PURGE_DELETES):
        assert d.purge_step("t", exists=True) is E.PurgeStep.DELETE
        assert d.purges_due() == []          # looked at again only once records in flight settled
        clock.t += E.PURGE_SETTLE_S
        assert d.purges_due() == ["t"]
    assert d.purge_step("t", exists=True) is E.PurgeStep.LEAVE
    assert d.purging() == []
    d.purge_later("gone")
    assert d.purge_step("gone", exists=False) is E.PurgeStep.DONE and d.purging() == []


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


def unconsumed_for_long(*topics: str) -> E.Destinations:
    """Destinations that no check found consumed for far longer than the test checkers' timeout (10 s)."""
    clock = Clock()
    dests = E.Destinations(clock)
    for t in topics:
        dests.add(t, A)
    dests.observe([])
    clock.t += 100
    return dests


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
    dests = unconsumed_for_long("t")
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
    c = E.ExpiryChecker(FakeAdmin([]), dests, 10, failing_on("bad", seen))
    assert c.check() == ["good"] and seen == ["bad", "good"]


def failing_on(bad: str, seen: list) -> Callable[[str], None]:
    """An expire or purge callback that records its topics and raises for ``bad``."""
    def call(topic):
        seen.append(topic)
        if topic == bad:
            raise RuntimeError("boom")
    return call


@pytest.mark.parametrize("monitors", [False, True])
def test_checker_purges_what_is_due_with_or_without_monitors_and_survives_a_failing_purge(monitors):
    """Purges depend neither on monitors being left nor on Kafka listing the consumer groups."""
    clock = Clock()
    dests = E.Destinations(clock)
    if monitors:
        dests.add("still-fed", A)
    for t in ("bad", "good", "later"):
        dests.purge_later(t, settle=1 if t != "later" else 100)
    clock.t += 1
    seen = []
    E.ExpiryChecker(FakeAdmin([], fail=True), dests, 10, [].append, purge=failing_on("bad", seen)).check()
    assert seen == ["bad", "good"] and dests.topics() == (["still-fed"] if monitors else [])


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


def purge_due(g) -> None:
    """The next expiry round that finds purges due (records in flight have settled)."""
    g.clock.t += E.PURGE_SETTLE_S
    for topic in g.destinations.purges_due():
        g.purge(topic)


def test_only_a_topic_created_for_the_monitor_is_deleted_never_a_reply_topic(gw):
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"},
        {"command": "monitor", "pv_name": "pva://good:b", "reply_topic": "r2"})
    gw.io.ensure_topics(["existing"])
    assert gw.destinations.get("mine").created and not gw.destinations.get("r2").created
    assert [(s.command.destination, s.created_topic, s.command.reply_id) for s in gw.state.items] == [
        ("mine", True, None), ("r2", False, None)]
    expire_all(gw)
    assert gw.io.admin.deleted == [] and gw.status()["topics_purging"] == ["mine"]   # records may be in flight
    purge_due(gw)
    assert gw.io.admin.deleted == ["mine"]
    assert gw.hub.channels() == [] and gw.destinations.topics() == []
    assert sorted(gw.state.removed) == sorted([S.monitor_key(parse_pv_uri("pva://good:a"), "mine"),
                                               S.monitor_key(parse_pv_uri("pva://good:b"), "r2")])


def test_no_purge_option_keeps_even_a_created_topic(gw):
    gw.opts.values["nc_purge_queue_on_exp_timeout"] = False
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"})
    expire_all(gw)
    purge_due(gw)
    assert gw.io.admin.deleted == [] and gw.hub.channels() == [] and gw.status()["topics_purging"] == []


def test_a_pv_that_never_connects_is_kept_recorded_and_still_expires(gw):
    """PROTOCOL 4: accepted and kept (an IOC may be rebooting); consumer-activity expiry still ends it."""
    run(gw, {"command": "monitor", "pv_name": "pva://bad:a", "monitor_dest_topic": "t", "reply_topic": "r"})
    assert gw.destinations.topics() == ["t"] and [i.command.pv.name for i in gw.state.items] == ["bad:a"]
    expire_all(gw)
    assert gw.hub.channels() == [] and gw.destinations.topics() == [] and len(gw.state.removed) == 1


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


def test_an_expired_topic_re_created_by_a_producer_is_deleted_again_until_it_stays_gone(gw):
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"})
    expire_all(gw)
    purge_due(gw)
    gw.io.admin.created.add("mine")   # a record in flight failed; librdkafka's metadata request re-created it
    purge_due(gw)
    assert gw.io.admin.deleted == ["mine", "mine"] and gw.status()["topics_purging"] == ["mine"]
    purge_due(gw)                     # gone this time: done with
    assert gw.io.admin.deleted == ["mine", "mine"] and gw.status()["topics_purging"] == []


def test_a_topic_that_keeps_coming_back_is_left_in_place_with_a_warning(gw, caplog):
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"})
    expire_all(gw)
    for _ in range(E.PURGE_DELETES + 1):
        purge_due(gw)
        gw.io.admin.created.add("mine")
    assert gw.io.admin.deleted == ["mine"] * E.PURGE_DELETES and gw.status()["topics_purging"] == []
    assert "came back after 3 deletions" in caplog.text


def test_a_monitor_command_between_expiry_and_purge_keeps_the_topic(gw):
    monitor = {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"}
    run(gw, monitor)
    expire_all(gw)
    gw.workers = type(gw.workers)(2, "k2eg-cmd")   # run() shut the first ones down
    run(gw, monitor)
    purge_due(gw)
    assert gw.io.admin.deleted == [] and "mine" in gw.destinations.topics()


def test_a_purge_that_cannot_ask_kafka_waits_for_the_next_round(gw):
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"})
    expire_all(gw)

    def unreachable(topic, timeout=10.0):
        raise RuntimeError("Kafka unreachable")

    gw.io.admin.exists = unreachable
    purge_due(gw)
    assert gw.io.admin.deleted == [] and gw.status()["topics_purging"] == ["mine"]
    del gw.io.admin.exists
    purge_due(gw)
    assert gw.io.admin.deleted == ["mine"]


class PartlyFailingAdmin(FakeAdmin):
    """Lists every group, but describing ``bad`` fails with ``code``; or the listing reports an error."""

    def __init__(self, groups, bad: str = "", code: int = KafkaError._TIMED_OUT, list_error: bool = False):
        super().__init__(groups)
        self.bad, self.code, self.list_error = bad, code, list_error

    def list_consumer_groups(self, request_timeout):
        result = super().list_consumer_groups(request_timeout).result()
        result.errors = [KafkaError(KafkaError._TIMED_OUT, "broker 2 did not answer")] if self.list_error else []
        return done(result)

    def describe_consumer_groups(self, ids, request_timeout):
        out = super().describe_consumer_groups(ids, request_timeout)
        if self.bad in out:
            f = Future()
            f.set_exception(KafkaException(KafkaError(self.code, "describe failed")))
            out[self.bad] = f
        return out


@pytest.mark.parametrize("code", [KafkaError._TIMED_OUT, KafkaError.GROUP_AUTHORIZATION_FAILED,
                                  KafkaError.COORDINATOR_NOT_AVAILABLE])
def test_a_group_that_cannot_be_described_keeps_every_monitor(code):
    """Unknown is not unused: the group Kafka did not describe may be the one reading the topic."""
    dests = unconsumed_for_long("read-by-them")
    expired: list[str] = []
    admin = PartlyFailingAdmin([group("them", ["read-by-them"]), group("other", ["x"])], bad="them", code=code)
    assert checker(admin, dests, expired).check() == [] and expired == []
    assert dests.topics() == ["read-by-them"]


def test_a_partial_listing_keeps_every_monitor():
    expired: list[str] = []
    assert checker(PartlyFailingAdmin([], list_error=True), unconsumed_for_long("t"), expired).check() == []
    assert expired == []


def test_a_group_gone_between_list_and_describe_counts_as_reading_nothing():
    admin = PartlyFailingAdmin([group("gone", ["t"])], bad="gone", code=KafkaError.GROUP_ID_NOT_FOUND)
    assert checker(admin, unconsumed_for_long("t"), []).check() == ["t"]


def test_each_round_recreates_what_was_deleted_from_outside_and_survives_its_failure():
    calls = []

    def recreate():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Kafka away")

    c = E.ExpiryChecker(FakeAdmin([]), E.Destinations(Clock()), 10, lambda t: None, recreate=recreate)
    c.check()
    c.check()
    assert len(calls) == 2


def test_a_monitor_destination_deleted_from_outside_is_created_again(gw):
    run(gw, {"command": "monitor", "pv_name": "pva://good:a", "monitor_dest_topic": "mine", "reply_topic": "r1"})
    gw.io.admin.created.discard("mine")   # deleted from outside; a failed delivery made the admin forget it
    gw.recreate_destinations()
    assert "mine" in gw.io.admin.created and gw.io.log[-1] == ("ensure", ("mine",))
    gw.recreate_destinations()            # nothing forgotten: nothing asked
    assert gw.io.log[-1] == ("ensure", ("mine",)) and len([e for e in gw.io.log if e == ("ensure", ("mine",))]) == 2
