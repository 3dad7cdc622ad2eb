"""Per-worker listeners of ``gateway serve --workers N`` (gateway.cli.listeners): what a worker
unpickles is a socket of its own in the parent's SO_REUSEPORT group, and Linux spreads new
connections over such sockets (uvicorn's one shared socket did not: see docs/benchmarks.md)."""

from __future__ import annotations

import pickle
import socket
from collections import Counter
from pathlib import Path

import pytest

from gateway.cli.listeners import (
    ReusePortListener,
    WorkerGroup,
    WorkerListener,
    reuse_port_supported,
)


def _in_a_worker(listener: ReusePortListener) -> socket.socket:
    """What a spawned worker unpickles (uvicorn pickles its socket list into each)."""
    made: socket.socket = pickle.loads(pickle.dumps(listener))  # noqa: S301 - our own bytes
    return made


def test_this_platform_spreads_connections() -> None:
    # The gateway runs on Linux (CI too); elsewhere serve falls back to one shared socket.
    assert reuse_port_supported()


def test_a_pickled_listener_is_a_new_socket_on_the_same_address(tmp_path: Path) -> None:
    group = WorkerGroup(tmp_path, 2)
    with ReusePortListener("127.0.0.1", 0, group) as parent:
        host, port = parent.address
        assert port != 0
        assert parent.getsockname() == (host, port)
        child = _in_a_worker(parent)
        try:
            # The worker's event loop balances on it (gateway.cli.balancing).
            assert isinstance(child, WorkerListener)
            assert child.group == group
            assert child.fileno() != parent.fileno()
            assert child.getsockname() == (host, port)
            assert child.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert child.get_inheritable()
        finally:
            child.close()


def test_a_port_taken_by_another_server_fails_in_the_parent() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError, match="Address already in use"):
            ReusePortListener("127.0.0.1", other.getsockname()[1])


def test_the_kernel_spreads_connections_over_the_workers_listeners() -> None:
    with ReusePortListener("127.0.0.1", 0) as parent:
        workers = [_in_a_worker(parent) for _ in range(2)]
        clients: list[socket.socket] = []
        try:
            for w in workers:
                w.listen(256)
                w.setblocking(False)
            for _ in range(200):
                c = socket.create_connection(parent.address, timeout=5)
                clients.append(c)
            accepted: Counter[int] = Counter()
            for i, w in enumerate(workers):
                while True:
                    try:
                        conn, _ = w.accept()
                    except BlockingIOError:
                        break
                    conn.close()
                    accepted[i] += 1
            assert sum(accepted.values()) == 200
            # A hash of each connection's addresses: about half each (P(< 60) ~ 1e-8).
            assert min(accepted[0], accepted[1]) >= 60, accepted
        finally:
            for s in clients + workers:
                s.close()
