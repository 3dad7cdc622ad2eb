"""The listening sockets of ``gateway serve --workers N``: one per worker, all in one
``SO_REUSEPORT`` group, so the kernel spreads new connections over the workers.

uvicorn's multi-process mode binds one socket in the parent and every worker accepts on it.
The kernel then hands a burst of new connections to whichever worker is awake: measured here
with 16 keep-alive connections and 2 workers, one worker usually held 14 to 16 of them and the
other idled (docs/benchmarks.md, "Connections across workers"). With a listener of its own per
worker in one ``SO_REUSEPORT`` group, Linux picks the listener of each new connection by a hash
of its addresses: each worker gets its share, whoever is awake.

uvicorn's supervisor (health checks, restarts, signals) is kept: it hands every worker it
starts the same list of sockets, pickled. What crosses here is :class:`ReusePortListener`,
whose pickled form is the recipe of a listener rather than the parent's socket, so each worker,
restarted ones too, unpickles a socket of its own bound to the same address: a
:class:`WorkerListener`, which also names the worker group it belongs to, so the worker's event
loop can even out the hash's split by handing connections over (gateway.cli.balancing).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ReusePortListener", "WorkerGroup", "WorkerListener", "reuse_port_supported",
           "worker_listener"]


def reuse_port_supported() -> bool:
    """Linux spreads connections over a ``SO_REUSEPORT`` group; elsewhere the option may exist
    with other meanings (the BSDs give all connections to one socket)."""
    import sys

    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _join_group(sock: socket.socket, host: str, port: int) -> None:
    """Bind ``sock`` to ``(host, port)`` in that address's ``SO_REUSEPORT`` group, or close it
    and raise."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise


@dataclass(frozen=True)
class WorkerGroup:
    """What the workers of one server share to balance their connections: a private directory
    (mode 0700, made and removed by the parent) and how many workers there are."""

    directory: Path
    workers: int


class WorkerListener(socket.socket):
    """A worker's listener in the ``SO_REUSEPORT`` group, which knows its worker group."""

    group: WorkerGroup | None = None


def worker_listener(host: str, port: int, group: WorkerGroup | None) -> WorkerListener:
    """What a worker unpickles: its own listener bound to ``(host, port)`` in the group."""
    sock = WorkerListener(_family(host), socket.SOCK_STREAM)
    _join_group(sock, host, port)
    sock.set_inheritable(True)
    sock.group = group
    return sock


class ReusePortListener(socket.socket):
    """The parent's placeholder: bound with ``SO_REUSEPORT`` and never listening, it holds the
    address (a port already taken fails here, before any worker starts; only a process of the
    same user may join the group). Pickled into a worker it becomes a new
    :class:`WorkerListener` bound to the same address, which that worker listens on."""

    def __init__(self, host: str, port: int, group: WorkerGroup | None = None) -> None:
        super().__init__(_family(host), socket.SOCK_STREAM)
        _join_group(self, host, port)
        # Port 0 means "any": the workers join the one the parent got.
        self.address: tuple[str, int] = (host, int(self.getsockname()[1]))
        self.group = group

    def __reduce__(self) -> tuple[Any, ...]:
        return (worker_listener, (*self.address, self.group))
