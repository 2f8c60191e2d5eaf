"""The put journal's records and bookkeeping, and its decisions, without Kafka (the e2e chaos test runs it
against a broker: tests/e2e/test_command_chaos.py)."""
from __future__ import annotations

import socket

import pytest

from k2eg.gateway import journal as J
from k2eg.gateway import options as O
from k2eg.protocol import commands as C
from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import parse_pv_uri

GROUP, TOPIC = "gw-group", "cmd"


def put(value=1.0, reply_id="r1") -> C.Put:
    return C.Put(pv=parse_pv_uri("ca://chaos:put"), value={"value": value}, reply_topic="app-reply",
                 reply_id=reply_id)


def rec(at, entry: J.Entry | None, group=GROUP, topic=TOPIC):
    return J.entry_key(group, topic, at), None if entry is None else J.encode_entry(entry)


def test_entries_and_keys_round_trip():
    for e in (J.Entry("d1"), J.Entry("d2", True, 0, "put of ca://x done"), J.Entry("d3", True, -3, "timeout")):
        assert J.decode_entry(J.encode_entry(e)) == e
    key = J.entry_key(GROUP, TOPIC, (2, 41))
    assert J.position_of(key, GROUP, TOPIC) == (2, 41)
    assert J.position_of(key, "other-group", TOPIC) is None     # another group's puts are not ours
    assert J.position_of(key, GROUP, "other-cmd") is None
    assert J.position_of(b"garbage", GROUP, TOPIC) is None


@pytest.mark.parametrize("value, why", [
    (b"{", "not JSON"), (b'{"version": 9}', "version"), (b'{"version": 1, "state": "half", "digest": "x"}', "state"),
    (b'{"version": 1, "state": "finished", "digest": "x"}', "error code"),
])
def test_unreadable_entries_say_why(value, why):
    with pytest.raises(J.JournalError, match=why):
        J.decode_entry(value)


def test_the_digest_tells_commands_apart():
    assert J.put_digest(put()) == J.put_digest(put())
    assert J.put_digest(put()) != J.put_digest(put(value=2.0))
    assert J.put_digest(put()) != J.put_digest(put(reply_id="r2"))


def test_replay_keeps_what_the_group_may_still_read_and_names_the_committed_rest():
    d = J.put_digest(put())
    records = [rec((0, 3), J.Entry(d)), rec((0, 3), J.Entry(d, True, 0, "done")),  # committed (start 5): stale
               rec((0, 4), J.Entry(d)), rec((0, 4), None),                         # tombstoned: nothing left
               rec((0, 7), J.Entry(d)),                                            # started, never finished
               rec((0, 8), J.Entry(d)), rec((0, 8), J.Entry(d, True, -2, "EPICS said no")),
               rec((1, 0), J.Entry(d)),                                            # a partition not ours
               rec((0, 9), J.Entry(d), group="other"), (b"junk", b"{}")]
    ledger = J.Ledger()
    stale = ledger.replay(records, GROUP, TOPIC, {0: 5})
    assert stale == [(0, 3)]
    assert ledger.get((0, 7), d) == J.Entry(d)
    assert ledger.get((0, 8), d) == J.Entry(d, True, -2, "EPICS said no")
    assert len(ledger) == 2 and ledger.get((1, 0), d) is None
    assert ledger.get((0, 7), "another command's digest") is None   # a reused position answers nothing


def test_replay_does_not_set_back_a_put_this_gateway_finished_meanwhile():
    d = J.put_digest(put())
    ledger = J.Ledger()
    ledger.set((0, 7), J.Entry(d, True, 0, "done"))       # our own, acknowledged after the journal was read
    ledger.set((0, 2), J.Entry(d, True, 0, "done"))       # below the new start: committed meanwhile
    ledger.replay([rec((0, 7), J.Entry(d))], GROUP, TOPIC, {0: 5})
    assert ledger.get((0, 7), d).finished and ledger.get((0, 2), d) is None


def test_commits_and_revocations_bound_the_entries_kept():
    d = J.put_digest(put())
    ledger = J.Ledger()
    for o in (1, 2, 5):
        ledger.set((0, o), J.Entry(d))
    ledger.set((1, 1), J.Entry(d))
    assert ledger.committed(0, 3) == [(0, 1), (0, 2)]
    assert ledger.committed(0, 3) == [] and len(ledger) == 2
    ledger.forget([1])
    assert len(ledger) == 1


class RecordingJournal(J.PutJournal):
    """The journal's decisions with its one Kafka write recorded instead of sent (the broker: e2e tests)."""

    def __init__(self, refuse: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            addr = f"127.0.0.1:{s.getsockname()[1]}"
        super().__init__(O.parse(["--cmd-input-topic", TOPIC, "--sub-server-address", addr, "--pub-server-address",
                                  addr, "--sub-group-id", GROUP, "--pub-impl-kv", "log_level:0"], environ={}))
        self.writes: list[tuple] = []
        self.refuse = refuse

    def _write(self, at, entry, wait=True):
        self.ledger.set(at, entry)
        self.writes.append((at, entry.finished, entry.error, wait))
        return self.refuse


def test_a_new_put_is_journaled_started_then_finished_around_the_write():
    j = RecordingJournal()
    order: list = []
    assert j.apply((0, 1), put(), lambda: order.append(list(j.writes)) or "put done") == "put done"
    assert order == [[((0, 1), False, 0, True)]]               # started, acknowledged, before the write
    assert j.writes[-1] == ((0, 1), True, 0, True)              # finished, acknowledged, before the reply
    assert j.topic == "cmd-gateway-journal"


def test_a_failed_put_is_journaled_with_the_error_it_is_answered_with():
    j = RecordingJournal()

    def refused():
        raise ProtocolError(ErrorCode.TIMEOUT, "PV 'chaos:put' did not connect")

    with pytest.raises(ProtocolError, match="did not connect"):
        j.apply((0, 1), put(), refused)
    with pytest.raises(ProtocolError) as e:
        j.apply((0, 2), put(), lambda: 1 / 0)
    assert e.value.code == ErrorCode.EPICS_FAILED and "ZeroDivisionError" in e.value.message
    assert j.ledger.get((0, 2), J.put_digest(put())).message == e.value.message


def test_a_put_read_again_is_not_applied_again():
    j = RecordingJournal()
    cmd = put()
    j.ledger.set((0, 1), J.Entry(J.put_digest(cmd)))                       # started by a gateway that died
    j.ledger.set((0, 2), J.Entry(J.put_digest(cmd), True, 0, "put of ca://chaos:put done"))
    j.ledger.set((0, 3), J.Entry(J.put_digest(cmd), True, -2, "EPICS said no"))
    applied: list = []

    def apply() -> str:
        applied.append(1)
        return "again"

    with pytest.raises(ProtocolError) as e:
        j.apply((0, 1), cmd, apply)
    assert e.value.code == J.UNKNOWN and "outcome of the put of ca://chaos:put is unknown" in e.value.message
    assert j.apply((0, 2), cmd, apply) == "put of ca://chaos:put done"      # the recorded result, again
    with pytest.raises(ProtocolError, match="EPICS said no"):
        j.apply((0, 3), cmd, apply)
    assert applied == [] and j.writes == [] and (j.unknown, j.answered) == (1, 2)
    assert j.apply((0, 1), put(value=7.0), apply) == "again"                # another command at that position


def test_a_put_the_journal_cannot_record_is_not_applied():
    j = RecordingJournal(refuse="broker away")
    with pytest.raises(ProtocolError, match="not applied: the put journal cmd-gateway-journal cannot be written"):
        j.apply((0, 1), put(), lambda: pytest.fail("applied without a journal record"))
    assert j.ledger.get((0, 1), J.put_digest(put())).finished   # a re-read answers the same error
