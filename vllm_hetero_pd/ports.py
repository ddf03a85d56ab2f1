"""Free loopback TCP ports for local servers (launcher, router benchmark, tests).

A leaf (standard library only) so that ``launch`` and ``router`` can both use it without either
importing the other.
"""

from __future__ import annotations

import random
import socket
from contextlib import closing

# Below Linux's default ephemeral range (32768-60999): a port handed out here cannot be taken in
# the meantime by another process's ephemeral bind (vLLM's engines open many ZMQ sockets), which
# made a side channel occasionally fail with "Address already in use".
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()  # never hand a port out twice: its server may not have bound it yet


class NoFreePortError(RuntimeError):
    """Every port in ``PORT_RANGE`` is taken or was already handed out by this process."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports, free right now, outside the ephemeral range."""
    low, high = PORT_RANGE
    start = random.randrange(low, high)
    ports: list[int] = []
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if port in _handed_out or not is_free(port):
            continue
        ports.append(port)
        _handed_out.add(port)
        if len(ports) == count:
            return ports
    raise NoFreePortError(f"no {count} free ports in {low}-{high}")


def free_port() -> int:
    """One port from ``free_ports``."""
    return free_ports(1)[0]


def is_free(port: int) -> bool:
    """Whether nothing on this host holds ``port`` on the loopback address right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        # as the servers bind (uvicorn, the side channel): a port in TIME_WAIT after a restart is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
