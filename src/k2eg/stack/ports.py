"""Free TCP ports on the loopback interface.

The local stack and the tests run several servers side by side (Kafka, its
controller, CA and PVA of an IOC); fixed ports would make two stacks, or a
stack and a developer's own services, silently collide.
"""
from __future__ import annotations

import socket

__all__ = ["free_port", "free_ports"]


def free_port() -> int:
    """A port nobody listens on right now (there is a small race until the caller binds it)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all sockets stay open until the end so the kernel cannot hand one out twice."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
