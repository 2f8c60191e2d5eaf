"""The archiver's protocol (pure): times, commands, configuration, chunked answers."""
import datetime as dt

import msgpack
import pytest

from k2eg.archiver import results, wire
from k2eg.archiver.model import Rows


def test_times_in_every_accepted_form():
    ns = wire.to_ns("2024-05-01T03:12:07.5Z")
    assert ns == wire.to_ns(dt.datetime(2024, 5, 1, 3, 12, 7, 500000, tzinfo=dt.timezone.utc))
    assert ns == wire.to_ns("2024-05-01T05:12:07.5+02:00") == wire.to_ns(1714533127.5)
    assert wire.to_ns(1714533127) == 1714533127 * 10**9
    assert wire.ns_to_datetime(ns) == dt.datetime(2024, 5, 1, 3, 12, 7, 500000, tzinfo=dt.timezone.utc)
    pd = pytest.importorskip("pandas")
    assert wire.to_ns(pd.Timestamp(ns + 7, unit="ns", tz="UTC")) == ns + 7
    with pytest.raises(ValueError, match="ISO 8601"):
        wire.to_ns("yesterday")
    with pytest.raises(ValueError, match="got a bool"):
        wire.to_ns(True)


def test_commands_are_checked_with_clear_errors():
    cmd = wire.parse_command(wire.command("history", "me-reply", "r1", pv_name="pva://a:b", start_ns=1, end_ns=2))
    assert (cmd.pvs, cmd.start_ns, cmd.end_ns) == (("a:b",), 1, 2)
    for doc, msg in [(b"[", "not a JSON"), (wire.command("history", "me-reply", "r", pv_name="a", start_ns=1), "end_ns"),
                     (wire.command("history", "me-reply", "r", pv_name="a", start_ns=3, end_ns=1), "before"),
                     (wire.command("nope", "me-reply", "r"), "unknown archive command"),
                     (wire.command("archive_add", "me-reply", "r"), "give 'pvs'"),
                     (wire.command("archive_add", "me-reply", "r", pvs=["a b"]), "no spaces"),
                     (wire.command("values_at", "bad topic!", "r", pv_name_list=["a"], at_ns=1), "reply_topic"),
                     (wire.command("snapshot_at", "me-reply", "r", snapshot_name="x y", at_ns=1), "snapshot name")]:
        with pytest.raises(wire.ArchiveCommandError, match=msg):
            wire.parse_command(doc)


def test_configuration_records_and_topic_matching():
    cfg = wire.ArchiveConfig()
    wire.apply_config_record(cfg, wire.config_key("pv", "bulk:0*"), b"{}")
    wire.apply_config_record(cfg, wire.config_key("pv", "pva://channel:counter"), b"{}")
    wire.apply_config_record(cfg, wire.config_key("snapshot", "Orbit"), b"{}")
    wire.apply_config_record(cfg, b"garbage", b"{}")
    topics = cfg.topics(["bulk_001", "bulk_100", "channel_counter", "orbit", "x-reply", "k2eg-cmd", "__consumer"],
                        excluded={"k2eg-cmd"})
    assert topics == {"bulk_001": None, "channel_counter": None, "orbit": "Orbit"}
    assert cfg.wants_pv("bulk:001") and not cfg.wants_pv("bulk_001") and cfg.wants_pv("channel:counter")
    wire.apply_config_record(cfg, wire.config_key("pv", "bulk:0*"), None)          # a tombstone removes it
    assert cfg.describe() == {"pvs": ["pva://channel:counter"], "snapshots": ["Orbit"]}


def test_a_large_answer_comes_in_parts_that_join_back():
    rows = Rows()
    for i in range(5000):
        rows.add_event("t", 0, i, i, "pv", {"value": [float(i)] * 20 if i % 2 else float(i),
                                             "display": {"units": "mm"}})
    cols = {c: rows.events[c] for c in rows.events}
    parts = [msgpack.unpackb(b, raw=False) for b in wire.event_answers("r", cols, max_bytes=50_000)]
    assert len(parts) > 3 and all(len(msgpack.packb(p)) < 60_000 for p in parts)
    assert [p["last"] for p in parts] == [False] * (len(parts) - 1) + [True]
    joined = results.columns_of(list(reversed(parts)))                       # arrival order does not matter
    assert joined["value"] == cols["value"] and joined["rest"] == cols["rest"]
    assert results.trees(joined)[1] == {"value": [1.0] * 20, "display": {"units": "mm"}}


def test_iterations_split_in_parts_join_back():
    rows = Rows()
    for i in range(300):
        rows.add_event("s", 0, i, 0, f"pv{i % 3}", {"value": "x" * 500}, "snap", 1 + i // 100)
    its = [{"iteration": n, "header_ms": n * 10, "tail_ms": n * 10 + 5, "tags": None, "error": 0,
            "events": {c: v[(n - 1) * 100:n * 100] for c, v in rows.events.items()}} for n in (1, 2, 3)]
    parts = [msgpack.unpackb(b, raw=False) for b in wire.iteration_answers("r", its, max_bytes=20_000)]
    assert len(parts) > 3
    got = results.iterations_of(parts)
    assert [g["iteration"] for g in got] == [1, 2, 3]
    assert all(len(g["pv0"]) + len(g["pv1"]) + len(g["pv2"]) == 100 for g in got)
