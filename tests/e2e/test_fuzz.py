"""Thousands of generated bad commands against the running gateway.

The property: the gateway never dies on a command, and every command whose
reply address is readable gets exactly one error reply that says what is
wrong. Commands are fired without waiting (a real client flood looks like
this); replies are counted by ``reply_id`` afterwards.
"""
from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_gateway_commands import WAIT, Wire, fresh_topic, wire  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("K2EG_FUZZ_EXAMPLES", "3000"))
KNOWN = ("get", "put", "info", "monitor", "multi-monitor", "snapshot", "repeating_snapshot",
         "repeating_snapshot_trigger", "repeating_snapshot_stop", "status")
URI = re.compile(r"^(pva?|ca)://([A-Za-z0-9\-_:]+(?:\.[A-Za-z0-9\-_]+)*)$", re.IGNORECASE)
GOOD_PV = "pva://variable:a"

# Templates are valid commands (reply address added per example); each example breaks one field the
# command validates, so every generated command is wrong in a way the gateway must name.
TEMPLATES: dict[str, dict] = {
    "get": {"command": "get", "pv_name": GOOD_PV},
    "info": {"command": "info", "pv_name": GOOD_PV},
    "put": {"command": "put", "pv_name": GOOD_PV, "value": base64.b64encode(msgpack.packb({"value": 1.5})).decode()},
    "monitor": {"command": "monitor", "pv_name": GOOD_PV, "monitor_dest_topic": "fuzz-dest"},
    "multi-monitor": {"command": "multi-monitor", "pv_name_list": [GOOD_PV]},
    "snapshot": {"command": "snapshot", "pv_name_list": [GOOD_PV], "time_window_msec": 100},
    "repeating_snapshot": {"command": "repeating_snapshot", "snapshot_name": "fuzz", "pv_name_list": [GOOD_PV],
                           "time_window_msec": 100, "repeat_delay_msec": 0, "sub_push_delay_msec": 0,
                           "triggered": True, "type": "normal", "pv_field_filter_list": ["value"]},
    "repeating_snapshot_trigger": {"command": "repeating_snapshot_trigger", "snapshot_name": "fuzz", "tags": {}},
    "repeating_snapshot_stop": {"command": "repeating_snapshot_stop", "snapshot_name": "fuzz"},
}

# ---------------------------------------------------------------- strategies of wrong values
INT64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
huge = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "::", "\\u0000", "💥"]),
                 st.integers(5_000, 25_000))  # three of them (a pv_name_list) < 1 MB as JSON ("💥" is 12
                                              # bytes escaped): Kafka's default record limit
not_uri = (st.text(max_size=60) | huge | st.sampled_from(["pva://", "ca://a b", "xyz://a", "pva://a..b", "pva:/a"])
           ).filter(lambda s: not URI.match(s))
not_string = st.integers() | st.floats(allow_nan=False) | st.booleans() | st.lists(json_scalars, max_size=3) \
    | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
deep = st.builds(lambda depth, leaf: json.loads("[" * depth + json.dumps(leaf) + "]" * depth),
                 st.integers(1, 400), json_scalars)
wrong_pv = st.none() | not_string | not_uri | deep
bad_base64 = st.text(min_size=1, max_size=40).filter(lambda s: _not_b64(s)) | st.sampled_from(["====", "a", "ab=c"])
not_map_msgpack = st.builds(lambda v: base64.b64encode(msgpack.packb(v)).decode(),
                            INT64 | st.text(max_size=20) | st.lists(INT64, max_size=5)
                            | st.booleans() | st.none() | st.just({}))
garbage_msgpack = st.binary(min_size=1, max_size=64).filter(lambda b: not _is_map(b)).map(
    lambda b: base64.b64encode(b).decode())
wrong_int = not_string.filter(lambda v: not isinstance(v, int) and not (isinstance(v, float) and v.is_integer())) \
    | st.integers(max_value=-1) | st.integers(min_value=86_400_001) | st.text(max_size=10)
wrong_name = st.none() | not_string | st.just("") | huge \
    | st.text(min_size=1, max_size=30).filter(lambda s: not re.fullmatch(r"[A-Za-z0-9_\-]+", s))
wrong_topic = not_string | huge | st.text(min_size=1, max_size=30).filter(lambda s: not re.fullmatch(r"[A-Za-z0-9._-]+", s))

FIELD_BREAKERS = {
    "pv_name": wrong_pv,
    "pv_name_list": st.none() | st.just([]) | not_uri | st.integers() | deep
    | st.lists(wrong_pv, min_size=1, max_size=3).map(lambda xs: [GOOD_PV, *xs]),
    "value": st.none() | not_string | bad_base64 | not_map_msgpack | garbage_msgpack,
    "monitor_dest_topic": wrong_topic,
    "time_window_msec": wrong_int,
    "repeat_delay_msec": wrong_int,
    "sub_push_delay_msec": wrong_int,
    "triggered": st.integers() | st.text(max_size=5) | st.lists(st.booleans(), max_size=2),
    "type": not_string | st.text(max_size=20).filter(lambda s: s.lower() not in ("normal", "timedbuffered")),
    "pv_field_filter_list": st.text(max_size=5) | st.integers() | st.lists(not_string, min_size=1, max_size=3),
    "snapshot_name": wrong_name,
    "tags": not_string.filter(lambda v: not isinstance(v, dict)) | st.dictionaries(
        st.text(max_size=5), st.integers() | st.none() | st.lists(st.text(), max_size=2), min_size=1, max_size=3),
    "command": st.none() | not_string | huge | st.text(max_size=30).filter(lambda s: s.lower() not in KNOWN),
    "serialization": not_string | st.text(max_size=20).filter(
        lambda s: s.lower() not in ("msgpack", "json", "msgpack-compact")),
}


def _not_b64(s: str) -> bool:
    try:
        base64.b64decode(s, validate=True)
    except Exception:
        return True
    return False


def _is_map(b: bytes) -> bool:
    try:
        return isinstance(msgpack.unpackb(b, strict_map_key=False), dict)
    except Exception:
        return False


@st.composite
def near_valid(draw, reply_topic: str) -> tuple[bytes, str]:
    """A valid command with one validated field broken (wrong type, bad content, huge, deep, null)."""
    template = dict(TEMPLATES[draw(st.sampled_from(sorted(TEMPLATES)))])
    fields = [f for f in template if f in FIELD_BREAKERS] + ["command", "serialization"]
    field = draw(st.sampled_from(fields))
    template[field] = draw(FIELD_BREAKERS[field])
    rid = uuid.uuid4().hex
    template.update(reply_topic=reply_topic, reply_id=rid)
    return json.dumps(template).encode(), rid


@st.composite
def random_object(draw, reply_topic: str) -> tuple[bytes, str]:
    """Random JSON fields around a reply address; the command name, if any, is not a known one."""
    doc = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=6))
    for k in ("command", "reply_topic", "reply_id", "serialization"):
        doc.pop(k, None)
    command = draw(st.none() | FIELD_BREAKERS["command"])
    if command is not None:
        doc["command"] = command
    rid = uuid.uuid4().hex
    doc.update(reply_topic=reply_topic, reply_id=rid)
    items = list(doc.items())
    order = draw(st.permutations(range(len(items))))
    return json.dumps(dict(items[i] for i in order)).encode(), rid


@st.composite
def no_reply_address(draw) -> tuple[bytes, None]:
    """Raw bytes, non-objects, truncated JSON, unreadable reply topics: nobody to answer, only logged."""
    kind = draw(st.sampled_from(["bytes", "scalar", "truncated", "bad_topic", "too_deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300)), None
    if kind == "scalar":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode(), None
    if kind == "truncated":
        text = json.dumps({"command": "get", "pv_name": GOOD_PV, "reply_topic": "x", "reply_id": "y"})
        return text[:draw(st.integers(0, len(text) - 1))].encode(), None
    if kind == "bad_topic":
        doc = dict(TEMPLATES["get"], reply_topic=draw(wrong_topic | st.just("")), reply_id="nobody")
        return json.dumps(doc).encode(), None
    depth = draw(st.integers(2_000, 50_000))  # deeper than any JSON parser's recursion limit
    return ("[" * depth + "]" * depth).encode(), None


def test_gateway_survives_a_flood_of_bad_commands(stack, wire: Wire):
    reply_topic = fresh_topic("fuzz-reply")
    expected: dict[str, bytes] = {}
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    # near-valid twice: they reach the per-command validation, the part with the most paths
    @given(case=st.one_of(near_valid(reply_topic), near_valid(reply_topic), random_object(reply_topic),
                          no_reply_address()))
    def throw(case: tuple[bytes, str | None]) -> None:
        nonlocal sent
        payload, rid = case
        if rid is not None:
            expected[rid] = payload
        wire.producer.produce(wire.cmd_topic, payload)
        wire.producer.poll(0)
        sent += 1

    before = wire.status()["commands"]
    log_start = stack.gateway_log.stat().st_size
    with wire.reader(reply_topic) as replies:
        throw()
        wire.producer.flush(30)
        assert len(expected) > EXAMPLES // 2, "the generators should mostly make answerable commands"

        def answered(recs) -> bool:
            return len({r.value.get("reply_id") for r in recs if isinstance(r.value, dict)} & expected.keys()) \
                == len(expected)
        try:
            replies.wait(answered, timeout=max(WAIT, EXAMPLES / 20), what="replies to every answerable command")
        except AssertionError:
            seen = {r.value.get("reply_id") for r in replies.records if isinstance(r.value, dict)}
            missing = [expected[rid][:300] for rid in expected if rid not in seen]
            raise AssertionError(f"{len(missing)} of {len(expected)} commands got no reply, e.g. {missing[:5]}")
        time.sleep(1.0)  # a duplicate reply would arrive right behind the first
        replies.poll()
        recs = replies.records

    by_id: dict[str, list] = {}
    for r in recs:
        by_id.setdefault(r.value.get("reply_id"), []).append(r.value)
    wrong = [(expected[rid][:200], got) for rid, got in by_id.items() if rid in expected and (
        len(got) != 1 or got[0].get("error", 0) == 0 or not isinstance(got[0].get("message"), str)
        or not got[0]["message"])]
    assert not wrong, f"{len(wrong)} commands were not answered by exactly one error with a message: {wrong[:5]}"
    assert not set(by_id) - set(expected), "replies nobody asked for"

    assert stack.gateway_pid is not None, "the gateway died"
    os.kill(stack.gateway_pid, 0)
    good = wire.request({"command": "get", "pv_name": GOOD_PV})
    assert good.value["error"] == 0 and "variable:a" in good.value
    # Commands without a reply address are counted by the worker that gives up on them, which may
    # still be busy with the last few when the status command is answered: ask until counted.
    deadline = time.monotonic() + WAIT
    while True:
        after = wire.status()["commands"]
        if after["unanswerable"] - before["unanswerable"] >= sent - len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after["received"] - before["received"] >= sent
    assert after["unanswerable"] - before["unanswerable"] >= sent - len(expected)
    with open(stack.gateway_log, "rb") as f:
        f.seek(log_start)
        assert b"Traceback" not in f.read(), "the gateway logged an internal error during the flood"
