"""The command consumer against a real broker: only handled commands are committed, and a stop waits,
bounded, for the commands read (issue 16). The whole gateway under SIGTERM and kill -9:
test_command_chaos.py."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from k2eg.gateway import options as O
from k2eg.gateway.kafka import KafkaIO

pytestmark = pytest.mark.e2e
T = 60  # bound against hangs, never a timing assertion


def committed(bootstrap: str, group: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return c.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    finally:
        c.close()


def consumer_io(stack, topic: str, group: str, drain: float) -> KafkaIO:
    return KafkaIO(O.parse(["--cmd-input-topic", topic, "--sub-server-address", stack.bootstrap,
                            "--pub-server-address", stack.bootstrap, "--sub-group-id", group,
                            "--command-drain-timeout", str(drain)], environ={}))


def read(io: KafkaIO, commands, n: int) -> list:
    """Positions of the next ``n`` commands the consumer hands over."""
    got: list = []
    deadline = time.monotonic() + T
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} commands read"
        got += next(commands)[1]
    return got


@pytest.mark.parametrize("late", [False, True])
def test_a_stop_commits_the_handled_commands_and_leaves_the_rest_to_the_group(stack, late):
    """Ten commands read, the fourth handled only after the stop began: within the drain (``late=False``, 2 s
    into a 30 s drain; the others are handled) or after it (8 s, a 1 s drain; only the first seven are
    handled). The commit covers exactly the commands handled, in order, before the drain ended."""
    topic, group = f"drain-{uuid.uuid4().hex[:8]}", f"drain-{uuid.uuid4().hex[:8]}"
    stack.create_topic(topic)
    io = consumer_io(stack, topic, group, drain=1.0 if late else 30.0)
    drained = threading.Event()
    commands = io.commands(drained=drained.set)
    try:
        while not io.assigned.is_set():
            next(commands)
        p = Producer({"bootstrap.servers": stack.bootstrap})
        for i in range(10):
            p.produce(topic, f"command {i}".encode())
        assert p.flush(T) == 0
        positions = read(io, commands, 10)
        for at in positions[:7] if late else positions:
            if at != positions[3]:
                io.handled(at)
        io.stop_consuming()
        threading.Timer(8.0 if late else 2.0, io.handled, args=(positions[3],)).start()
        for _ in commands:   # the drain, then the consumer closes (and commits)
            pass
        assert drained.is_set()
    finally:
        commands.close()
        io.stop(flush_timeout=0)
    if late:   # 3 still running when the 1 s drain ended, 7 to 9 never finished: the group runs 3 to 9 again
        assert committed(stack.bootstrap, group, topic) == positions[3][1] and io.left_unfinished == 4
    else:      # the drain waited for 3, then everything is committed
        assert committed(stack.bootstrap, group, topic) == positions[9][1] + 1 and io.left_unfinished == 0
