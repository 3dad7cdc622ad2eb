"""SQLite helpers for every SQLite store of the gateway (state, audit): switching a file to
WAL, and taking turns at writing it across the threads and processes of one machine."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["WriteTurn", "WriteTurnBusy", "WriteTurnTimeout", "enable_wal"]


def enable_wal(conn: sqlite3.Connection, *, within_s: float = 5.0) -> None:
    """Put the connection's file in WAL mode. Workers opening a fresh file at the same moment
    can get "database is locked" here without SQLite's busy handler being called, so retry
    for up to ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


class WriteTurnTimeout(sqlite3.OperationalError):
    """The write turn was not free within the wait bound (the file stays "locked")."""


class WriteTurnBusy(Exception):
    """Asked not to wait (``held(wait=False)``) and another writer holds the turn: nothing was
    done; try again later."""


# Polling steps while another process holds the turn: a commit holds it for a fraction of a
# millisecond, so the wait is at most a few of these (SQLite's own busy handler sleeps 1, 2,
# 5, 10 … ms between tries, which made the tail latency of concurrent writers).
_FIRST_STEP_S = 0.00005
_MAX_STEP_S = 0.0005


class WriteTurn:
    """One writer at a time for a SQLite file, across the threads of this process (a lock)
    and the processes of this machine (``flock`` on ``<file>.write-turn``), taken before
    ``BEGIN IMMEDIATE`` so that SQLite's lock is free when asked for.

    Writers that do not take the turn (another program, an old gateway) still meet SQLite's
    own lock and busy timeout: the turn only shortens waits, it is not what keeps the data
    consistent. The wait is bounded by ``timeout_s`` (:class:`WriteTurnTimeout`).

    >>> import tempfile, pathlib
    >>> turn = WriteTurn(pathlib.Path(tempfile.mkdtemp()) / "x.sqlite")
    >>> with turn.held():
    ...     pass
    >>> turn.close()
    """

    def __init__(self, db_path: str | os.PathLike[str], *, timeout_s: float = 5.0) -> None:
        self._lock_path = os.fspath(db_path) + ".write-turn"
        self._timeout_s = timeout_s
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    @contextmanager
    def held(self, *, wait: bool = True) -> Iterator[None]:
        """The turn for the body of the ``with``; with ``wait=False``, :class:`WriteTurnBusy`
        at once if another thread or process holds it (an event loop must not sleep here)."""
        if not self._thread_lock.acquire(timeout=self._timeout_s if wait else 0):
            if not wait:
                raise WriteTurnBusy
            raise WriteTurnTimeout("database is locked (write turn busy in this process)")
        try:
            fd = self._file()
            self._take_file(fd, wait=wait)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _take_file(self, fd: int, *, wait: bool) -> None:
        step, deadline = _FIRST_STEP_S, None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not wait:
                    raise WriteTurnBusy from None
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._timeout_s
            elif now >= deadline:
                raise WriteTurnTimeout("database is locked (write turn busy in another process)")
            time.sleep(step)
            step = min(step * 2, _MAX_STEP_S)

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
