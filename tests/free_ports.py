"""The one way the tests pick a port for a server they start on 127.0.0.1.

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` comes from its ephemeral range,
the range every other process's unnamed sockets are also drawn from: between the test
releasing it and its server binding it (seconds, for a server started by a command), a Ray
daemon or worker of the other pytest-xdist worker can take it. These ports come from below
that range and above Ray's default worker ports (10002-19999), where nothing binds without
being told to; each is checked free, and one process never hands out the same port twice.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19999
_given: set[int] = set()


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 when unreadable)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free on 127.0.0.1 now, outside the ephemeral range and Ray's worker ports."""
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral_start() - 1
    if high - low < 1000:  # a machine whose ephemeral range starts low: the kernel's choice
        low, high = high + 1, 65535
    for _ in range(200):
        port = random.randint(low, high)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {low}-{high}")
