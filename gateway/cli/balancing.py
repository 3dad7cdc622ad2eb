"""Connections spread over the workers of ``gateway serve --workers N`` by how many each holds,
not by a hash.

Each worker accepts on a listener of its own (gateway.cli.listeners), and Linux picks the
listener of a new connection by a hash of its addresses: 16 keep-alive connections over two
workers land 8/8 one time in five and 5/11 or worse one time in five; with 11 of them a worker
is the bottleneck while the other idles (docs/benchmarks.md). So a worker that accepts a
connection while another worker holds fewer hands the connection over: the socket itself is
sent (``SCM_RIGHTS``) to that worker's inbox, a Unix datagram socket in the group's private
directory, and the receiver serves it as if it had accepted it. Envoy's listeners do the same
across their threads (``connection_balance_config: exact_balance``).

Who holds how many is a small table in the same directory: one count per worker slot, changed
under an exclusive ``flock``, so two workers deciding at once see each other's choice. A worker
claims a slot for its life (another ``flock``: a restarted worker takes the dead one's slot and
starts from zero), counts a connection when it is given to it and uncounts it when it closes
(its protocol's ``connection_lost``; a sweep of its transports every half second and before
every decision catches one whose protocol was switched). A hand-over
that cannot be delivered (the other worker gone, its inbox full) leaves the connection where it
was accepted: balance is a preference, never a reason to drop a connection.

uvicorn is kept as it is. Its server calls ``loop.create_server(protocol_factory, sock=...)``
with each listener; the event loop here (uvicorn's ``loop`` setting takes the import path of a
loop class: ``gateway.cli.balancing:BalancingLoop``) is
uvloop's, except that for a :class:`~gateway.cli.listeners.WorkerListener` it accepts and hands
over itself and gives every connection it keeps to uvicorn's own protocol factory.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import socket
import ssl as ssl_module
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvloop

from gateway.cli.listeners import WorkerGroup, WorkerListener

__all__ = ["BalancingLoop", "ConnectionBalancer", "LoadTable", "least_loaded"]

log = logging.getLogger(__name__)

SWEEP_S = 0.5  # how often a worker looks for closed connections that went unannounced
ACCEPT_BATCH = 64  # connections accepted per wake-up, as asyncio's own accept loop does
ACCEPT_PAUSE_S = 1.0  # after running out of file descriptors (EMFILE), like asyncio
_COUNT = struct.Struct("<q")


def least_loaded(loads: Sequence[int], me: int) -> int:
    """The slot that should hold a new connection which arrived at slot ``me``: ``me`` unless
    another holds fewer (ties stay, so a balanced group hands nothing over)."""
    fewest = min(range(len(loads)), key=loads.__getitem__)
    return me if loads[me] <= loads[fewest] else fewest


class LoadTable:
    """How many connections each worker slot holds, in a file of the group's directory; one
    worker's view of it, holding ``slot`` (see :meth:`join`)."""

    def __init__(self, group: WorkerGroup, slot: int, fd: int, slot_fd: int) -> None:
        self.group = group
        self.slot = slot
        self._fd = fd
        self._slot_fd = slot_fd

    @classmethod
    def join(cls, group: WorkerGroup) -> LoadTable | None:
        """Take a slot no live worker holds, for this process's life, with its count reset
        (the connections of a dead holder died with it); None when all are held."""
        for slot in range(group.workers):
            slot_fd = os.open(group.directory / f"slot-{slot}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(slot_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(slot_fd)
                continue
            fd = os.open(group.directory / "loads", os.O_RDWR | os.O_CREAT, 0o600)
            table = cls(group, slot, fd, slot_fd)
            with table._changing() as loads:
                loads[slot] = 0
            return table
        return None

    @staticmethod
    def peek(group: WorkerGroup) -> list[int]:
        """The counts as they stand, without holding a slot (for tests and operators)."""
        fd = os.open(group.directory / "loads", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return _counts(os.pread(fd, group.workers * _COUNT.size, 0), group.workers)
        finally:
            os.close(fd)  # and its lock

    def inbox(self, slot: int) -> Path:
        """Where the worker holding ``slot`` receives connections handed over to it."""
        return self.group.directory / f"inbox-{slot}"

    def loads(self) -> list[int]:
        with self._changing() as loads:
            return list(loads)

    def assign(self) -> int:
        """Count a connection that arrived at this worker to the slot that should hold it."""
        with self._changing() as loads:
            target = least_loaded(loads, self.slot)
            loads[target] += 1
        return target

    def take_back(self, target: int) -> None:
        """A hand-over to ``target`` failed: the connection stays here."""
        with self._changing() as loads:
            loads[target] -= 1
            loads[self.slot] += 1

    def release(self, count: int) -> None:
        """``count`` connections of this worker closed."""
        with self._changing() as loads:
            loads[self.slot] = max(0, loads[self.slot] - count)

    def close(self) -> None:
        """Give the slot up (a worker that starts later takes it and resets its count)."""
        if self._fd >= 0:
            os.close(self._fd)
            os.close(self._slot_fd)
            self._fd = -1

    @contextmanager
    def _changing(self) -> Iterator[list[int]]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            workers = self.group.workers
            before = _counts(os.pread(self._fd, workers * _COUNT.size, 0), workers)
            loads = list(before)
            yield loads
            if loads != before:
                os.pwrite(self._fd, b"".join(_COUNT.pack(v) for v in loads), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


def _counts(raw: bytes, workers: int) -> list[int]:
    """The table's bytes as counts (a new table is all zeros)."""
    return [value for (value,) in _COUNT.iter_unpack(raw.ljust(workers * _COUNT.size, b"\0"))]


class ConnectionBalancer:
    """One worker's accepting: its listener, its inbox, its share of the load table."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: WorkerListener,
                 protocol_factory: Callable[[], asyncio.BaseProtocol], *,
                 ssl: ssl_module.SSLContext | None = None, backlog: int = 2048) -> None:
        self._loop = loop
        self._listener = listener
        self._factory = protocol_factory
        self._ssl = ssl
        self._backlog = backlog
        self._member: tuple[LoadTable, socket.socket] | None = None  # table, inbox
        self._held: set[asyncio.BaseTransport] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.closed = False

    @property
    def slot(self) -> int | None:
        return None if self._member is None else self._member[0].slot

    def start(self) -> None:
        """Listen, and join the group's balancing when it has a free slot (else accept alone)."""
        self._listener.listen(self._backlog)
        self._listener.setblocking(False)
        group = self._listener.group
        if group is not None:
            table = LoadTable.join(group)
            if table is None:
                log.warning("every balancing slot is held: this worker keeps what it accepts")
            else:
                inbox = self._open_inbox(table.inbox(table.slot))
                self._member = (table, inbox)
                self._loop.add_reader(inbox.fileno(), self._receive, inbox)
        self._loop.add_reader(self._listener.fileno(), self._accept)
        self._sweep_timer = self._loop.call_later(SWEEP_S, self._sweep)

    def close(self) -> None:
        """Stop accepting and receiving; connections already served go on (uvicorn shuts
        them down)."""
        if self.closed:
            return
        self.closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        if self._member is not None:
            table, inbox = self._member
            self._loop.remove_reader(inbox.fileno())
            inbox.close()
            table.inbox(table.slot).unlink(missing_ok=True)
            table.close()

    @staticmethod
    def _open_inbox(path: Path) -> socket.socket:
        path.unlink(missing_ok=True)  # a dead worker's
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.bind(str(path))
        inbox.setblocking(False)
        return inbox

    def _accept(self) -> None:
        self._sweep_closed()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or buffers: wait, as asyncio does
                log.warning("accept failed (%s): pausing %.0f s", exc.strerror, ACCEPT_PAUSE_S)
                self._loop.remove_reader(self._listener.fileno())
                self._loop.call_later(ACCEPT_PAUSE_S, self._resume_accepting)
                return
            self._place(conn)

    def _resume_accepting(self) -> None:
        if not self.closed:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _place(self, conn: socket.socket) -> None:
        if self._member is None:
            self._serve(conn)
            return
        table, inbox = self._member
        target = table.assign()
        if target != table.slot:
            # socket.send_fds would drop the address (CPython 3.11 passes only the fds).
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))]
            try:
                inbox.sendmsg([b"c"], rights, 0, str(table.inbox(target)))
            except OSError:  # gone, restarting, or its inbox is full: served here
                table.take_back(target)
            else:
                conn.close()  # the other worker's copy keeps the connection open
                return
        self._serve(conn)

    def _receive(self, inbox: socket.socket) -> None:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(inbox, 16, 16)
            except (BlockingIOError, InterruptedError):
                return
            for fd in fds:
                try:
                    conn = socket.socket(fileno=fd)
                except OSError:
                    os.close(fd)
                    continue
                if conn.type != socket.SOCK_STREAM or conn.family == socket.AF_UNIX:
                    conn.close()  # only TCP connections are handed over
                    continue
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = self._loop.create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            transport, protocol = await self._loop.connect_accepted_socket(
                self._factory, conn, ssl=self._ssl)
        except (OSError, ssl_module.SSLError):  # the peer left before it was served
            conn.close()
            if self._member is not None:
                self._member[0].release(1)
            return
        self._held.add(transport)
        # Uncounted the moment it closes: a client that reconnects at once (a benchmark's
        # warm-up, then its run) must meet counts without its old connections.
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            try:
                lost(exc)
            finally:
                self._forget(transport)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        if transport.is_closing():  # closed before the hook was in place
            self._forget(transport)

    def _forget(self, transport: asyncio.BaseTransport) -> None:
        if transport in self._held:
            self._held.discard(transport)
            if self._member is not None:
                self._member[0].release(1)

    def _sweep(self) -> None:
        self._sweep_closed()
        self._sweep_timer = self._loop.call_later(SWEEP_S, self._sweep)

    def _sweep_closed(self) -> None:
        """Uncount what closed without a word to its first protocol (a protocol switched
        mid-connection, e.g. an upgrade)."""
        for transport in [t for t in self._held if t.is_closing()]:
            self._forget(transport)


class BalancedServer(asyncio.AbstractServer):
    """What ``create_server`` returns for a worker listener: uvicorn closes it at shutdown."""

    def __init__(self, loop: asyncio.AbstractEventLoop, balancer: ConnectionBalancer) -> None:
        self._loop = loop
        self.balancer = balancer
        self._closed = loop.create_future()

    def close(self) -> None:
        self.balancer.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self.balancer.closed

    async def start_serving(self) -> None:
        return None  # serving since create_server

    async def serve_forever(self) -> None:
        await self._closed

    async def wait_closed(self) -> None:
        return None


class BalancingLoop(uvloop.Loop):
    """uvloop's event loop; a worker listener is accepted on by a :class:`ConnectionBalancer`."""

    # The stubs promise asyncio's Server class; uvicorn uses only close() and wait_closed().
    async def create_server(  # type: ignore[override]
            self, protocol_factory: Callable[[], asyncio.BaseProtocol],
            host: Any = None, port: Any = None, *, sock: socket.socket | None = None,
            **options: Any) -> asyncio.AbstractServer:
        if isinstance(sock, WorkerListener):
            balancer = ConnectionBalancer(self, sock, protocol_factory, ssl=options.get("ssl"),
                                          backlog=options.get("backlog") or 2048)
            balancer.start()
            return BalancedServer(self, balancer)
        server: asyncio.AbstractServer = await super().create_server(
            protocol_factory, host, port, sock=sock, **options)
        return server
