"""Republish archived data into a Kafka topic in the original wire format, as if live.

``snapshot_records`` and ``event_records`` turn what the archive answered
into (due time in s from the start, key, record) in publishing order (pure);
``publish`` sends them at the original pace times ``speed`` (0: at once).
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

from k2eg.protocol import replies
from k2eg.protocol.codec import encode, header_value
from k2eg.protocol.commands import Serialization

_META = ("iteration", "header_timestamp", "tail_timestamp", "timestamp", "tags", "incomplete")


def snapshot_records(name: str, iterations: list[dict]) -> Iterator[tuple[float, str, dict, str | None]]:
    """Header, Data (one per value), Tail of each iteration, due at its header/tail time."""
    if not iterations:
        return
    t0 = min(it.get("header_timestamp") or it.get("tail_timestamp") or 0 for it in iterations)
    for it in iterations:
        n = it["iteration"]
        head = it.get("header_timestamp") or it.get("tail_timestamp") or t0
        tail = it.get("tail_timestamp") or head
        header = replies.snapshot_header(name, head, n)
        if it.get("tags"):
            header["tags"] = it["tags"]
        yield (head - t0) / 1000, name, header, None
        for pv, values in it.items():
            if pv in _META:
                continue
            for tree in values:
                yield (head - t0) / 1000, name, replies.snapshot_data(pv, tree, head, n), pv
        yield (tail - t0) / 1000, name, replies.snapshot_tail(name, tail, n), None


def event_records(pv: str, trees: list[dict], times_ns: list[int]) -> Iterator[tuple[float, str, dict, str | None]]:
    """Monitor events ``{pv: tree}`` keyed by the PV name, due at their time stamps."""
    if not trees:
        return
    t0 = times_ns[0]
    for tree, t in zip(trees, times_ns):
        yield (t - t0) / 1e9, pv, replies.event(pv, tree), pv


def publish(producer: Any, topic: str, records: Iterable[tuple[float, str, dict, str | None]],
            speed: float = 1.0, ser: Serialization = Serialization.MSGPACK) -> int:
    """Produce ``records`` to ``topic``; ``speed`` 1 keeps the original pace, 10 is ten times faster, 0 no wait."""
    start = time.monotonic()
    n = 0
    headers = header_value(ser)
    for due, key, rec, value_key in records:
        if speed > 0:
            wait = start + due / speed - time.monotonic()
            if wait > 0:
                producer.poll(0)
                time.sleep(wait)
        data = encode(rec, ser, value_key)
        while True:
            try:
                producer.produce(topic, data, key.encode(), headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        n += 1
    left = producer.flush(30)
    if left:
        raise RuntimeError(f"{left} records not delivered to topic {topic} within 30 s")
    return n
