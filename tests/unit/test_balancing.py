"""Connections spread over the workers by load (gateway.cli.balancing): the choice, the shared
table of counts, and two workers' event loops (threads here, each with its own listener in one
SO_REUSEPORT group, as ``gateway serve --workers 2`` runs them in processes) handing real TCP
connections over."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.cli import balancing
from gateway.cli.balancing import BalancingLoop, LoadTable, least_loaded
from gateway.cli.listeners import ReusePortListener, WorkerGroup, WorkerListener


@pytest.mark.parametrize(("loads", "me", "expected"), [
    ([0, 0], 0, 0),  # a tie stays where it arrived
    ([1, 0], 0, 1),
    ([3, 3, 2], 1, 2),
    ([2, 5, 2], 1, 0),  # the first of the fewest
    ([4, 4, 4, 4], 3, 3),
])
def test_a_connection_goes_to_the_worker_holding_the_fewest(
        loads: list[int], me: int, expected: int) -> None:
    assert least_loaded(loads, me) == expected


def _two_workers_tables(group: WorkerGroup) -> tuple[LoadTable, LoadTable]:
    first, second = LoadTable.join(group), LoadTable.join(group)
    assert first is not None
    assert second is not None
    return first, second


def test_each_worker_takes_a_slot_of_its_own_and_a_dead_ones_is_taken_afresh(
        tmp_path: Path) -> None:
    group = WorkerGroup(tmp_path, 2)
    first, second = _two_workers_tables(group)
    assert {first.slot, second.slot} == {0, 1}
    assert LoadTable.join(group) is None  # both slots held
    first.assign()
    first.assign()
    assert second.loads()[first.slot] == 1
    assert second.loads()[second.slot] == 1
    first.close()  # its worker died: its connections with it
    again = LoadTable.join(group)
    assert again is not None
    assert again.slot == first.slot
    assert again.loads()[again.slot] == 0
    again.close()
    second.close()


def test_counts_follow_assignments_failed_hand_overs_and_closed_connections(
        tmp_path: Path) -> None:
    here, there = _two_workers_tables(WorkerGroup(tmp_path, 2))
    targets = [here.assign() for _ in range(6)]
    assert targets == [here.slot, there.slot] * 3
    here.take_back(there.slot)  # the last hand-over could not be delivered
    assert here.loads()[here.slot] == 4
    assert here.loads()[there.slot] == 2
    here.release(3)
    assert here.loads()[here.slot] == 1
    assert here.assign() == here.slot  # 1 against 2: stays
    here.close()
    there.close()


class _Who(asyncio.Protocol):
    """Answers every byte with the name of the worker that serves the connection."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert hasattr(transport, "write")  # uvloop's TCPTransport is no asyncio.Transport
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self.name * len(data))


@contextmanager
def _workers(group: WorkerGroup, names: list[bytes]) -> Iterator[tuple[str, int]]:
    """One event-loop thread per name, each serving a listener of its own in one group; yields
    the address. What each worker gets is what a spawned worker unpickles."""
    parent = ReusePortListener("127.0.0.1", 0, group)
    loops: list[BalancingLoop] = []
    threads: list[threading.Thread] = []
    ready = threading.Barrier(len(names) + 1)

    def run(name: bytes) -> None:
        listener = pickle.loads(pickle.dumps(parent))  # noqa: S301 - our own bytes
        assert isinstance(listener, WorkerListener)
        loop = BalancingLoop()
        loops.append(loop)
        server = loop.run_until_complete(
            loop.create_server(lambda: _Who(name), sock=listener, backlog=128))
        ready.wait()
        loop.run_forever()
        server.close()
        loop.close()

    try:
        for name in names:
            threads.append(threading.Thread(target=run, args=(name,), daemon=True))
            threads[-1].start()
        ready.wait(timeout=10)
        yield parent.address
    finally:
        for loop in loops:
            loop.call_soon_threadsafe(loop.stop)
        for thread in threads:
            thread.join(timeout=10)
        parent.close()


def _who(conn: socket.socket) -> bytes:
    conn.sendall(b"?")
    return conn.recv(16)


def test_sixteen_connections_over_two_workers_are_held_eight_each(tmp_path: Path) -> None:
    """The kernel's hash alone gives 8/8 one time in five; handed over, every time."""
    with _workers(WorkerGroup(tmp_path, 2), [b"a", b"b"]) as address:
        conns = [socket.create_connection(address, timeout=5) for _ in range(16)]
        try:
            held = Counter(_who(c) for c in conns)
            assert held == {b"a": 8, b"b": 8}
            # Connections still work once handed over (each asks again).
            assert Counter(_who(c) for c in conns) == held
        finally:
            for c in conns:
                c.close()


def test_connections_opened_at_once_are_balanced_too(tmp_path: Path) -> None:
    with _workers(WorkerGroup(tmp_path, 2), [b"a", b"b"]) as address:
        conns: list[socket.socket] = []
        lock = threading.Lock()

        def connect() -> None:
            c = socket.create_connection(address, timeout=5)
            with lock:
                conns.append(c)

        openers = [threading.Thread(target=connect) for _ in range(24)]
        for t in openers:
            t.start()
        for t in openers:
            t.join()
        try:
            assert Counter(_who(c) for c in conns) == {b"a": 12, b"b": 12}
        finally:
            for c in conns:
                c.close()


def test_closed_connections_are_uncounted_at_once_and_new_ones_fill_the_emptier_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No sweep during the test: only the close itself can uncount.
    monkeypatch.setattr(balancing, "SWEEP_S", 60.0)
    group = WorkerGroup(tmp_path, 2)
    with _workers(group, [b"a", b"b"]) as address:
        conns = [socket.create_connection(address, timeout=5) for _ in range(8)]
        try:
            served = [(_who(c), c) for c in conns]
            assert LoadTable.peek(group) == [4, 4]
            for name, c in served:
                if name == b"a":
                    c.close()
            deadline = time.monotonic() + 5
            while sorted(LoadTable.peek(group)) != [0, 4] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sorted(LoadTable.peek(group)) == [0, 4]
            fresh = [socket.create_connection(address, timeout=5) for _ in range(4)]
            conns += fresh
            assert Counter(_who(c) for c in fresh) == {b"a": 4}
            assert LoadTable.peek(group) == [4, 4]
        finally:
            for c in conns:
                c.close()


def test_a_client_that_reconnects_at_once_is_balanced_again(tmp_path: Path) -> None:
    """A benchmark's warm-up closes its connections and its run opens as many right away:
    counts still holding the old ones would send the new ones to whichever worker had
    uncounted first."""
    with _workers(WorkerGroup(tmp_path, 2), [b"a", b"b"]) as address:
        for _ in range(5):
            conns = [socket.create_connection(address, timeout=5) for _ in range(16)]
            try:
                assert Counter(_who(c) for c in conns) == {b"a": 8, b"b": 8}
            finally:
                for c in conns:
                    c.close()
            time.sleep(0.05)


def test_a_hand_over_to_a_worker_that_is_not_there_is_served_where_it_arrived(
        tmp_path: Path) -> None:
    group = WorkerGroup(tmp_path, 2)  # room for two, one running: slot 1 never answers
    with _workers(group, [b"a"]) as address:
        conns = [socket.create_connection(address, timeout=5) for _ in range(5)]
        try:
            assert Counter(_who(c) for c in conns) == {b"a": 5}
            assert LoadTable.peek(group) == [5, 0]
        finally:
            for c in conns:
                c.close()
