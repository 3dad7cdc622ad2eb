"""The versioned DuckDB query store.

Layout under ``store_dir``::

    versions/<data_version>.duckdb   complete, immutable versions
    CURRENT                          the serving version's name (replaced atomically)
    tmp/                             loads in progress (never served; removed when stale)

A load writes a whole new version under ``tmp/``, closes and fsyncs it, renames it into
``versions/`` and only then swaps ``CURRENT`` with ``os.replace``. A reader that opens
``CURRENT`` therefore sees either the old version or the new one, never a half-written one.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from gateway.errors import QueryTimeout, StoreUnavailable

__all__ = ["QueryStore", "StoreLayout"]


@dataclass(frozen=True)
class StoreLayout:
    root: Path

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def pointer(self) -> Path:
        return self.root / "CURRENT"

    def version_path(self, version: str) -> Path:
        return self.versions / f"{version}.duckdb"

    def current_version(self) -> str | None:
        try:
            name = self.pointer.read_text("utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def publish(self, version: str, built_file: Path) -> None:
        """Move a closed, complete database file into place and point CURRENT at it."""
        self.versions.mkdir(parents=True, exist_ok=True)
        _fsync(built_file)
        final = self.version_path(version)
        os.replace(built_file, final)
        _fsync(self.versions)
        staged = self.root / "CURRENT.tmp"
        staged.write_text(version + "\n", "utf-8")
        _fsync(staged)
        os.replace(staged, self.pointer)
        _fsync(self.root)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (so a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Watchdog:
    """One thread that interrupts statements past their deadline, for every query
    (a ``threading.Timer`` per query started a thread each time: about 1 ms on a busy
    machine). A statement is interrupted only while it is still watched: :meth:`done` waits
    for an interrupt in progress, so a finished cursor is never interrupted afterwards."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also in a forked child, which has the memory but neither the thread nor a usable
        # lock of its parent.
        self._cond = threading.Condition()
        self._due: list[tuple[float, int]] = []  # heap of (deadline, ticket)
        self._watched: dict[int, duckdb.DuckDBPyConnection] = {}
        self._tickets = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, cursor: duckdb.DuckDBPyConnection, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            ticket = next(self._tickets)
            self._watched[ticket] = cursor
            earliest = not self._due or deadline < self._due[0][0]
            heapq.heappush(self._due, (deadline, ticket))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="query-watchdog",
                                                daemon=True)
                self._thread.start()
            elif earliest:
                self._cond.notify()
        return ticket

    def done(self, ticket: int) -> None:
        with self._cond:
            self._watched.pop(ticket, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._due and self._due[0][1] not in self._watched:
                    heapq.heappop(self._due)  # finished in time
                if not self._due:
                    self._cond.wait()
                    continue
                deadline, ticket = self._due[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._due)
                # No name keeps the cursor alive while this thread waits afterwards.
                self._watched.pop(ticket).interrupt()


# One for the process: every store's statements share the thread (started on first use).
_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG._reset)


class QueryStore:
    """Read-only access to the serving version, re-opened when CURRENT changes.

    Each query runs on its own cursor with a time limit enforced by interrupting it.
    """

    def __init__(
        self,
        layout: StoreLayout,
        *,
        timeout_s: float = 30.0,
        memory_limit: str = "4GB",
        threads: int | None = None,
    ) -> None:
        self.layout = layout
        self.timeout_s = timeout_s
        self.memory_limit = memory_limit
        self.threads = threads
        self._lock = threading.Lock()
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._version: str | None = None
        self._pointer_stat: tuple[int, int] | None = None
        # Checked on every request that reads the store: a plain os.stat of a str path.
        self._pointer_path = os.fspath(layout.pointer)
        self._types: dict[tuple[str, str], dict[str, str]] = {}
        self._watchdog = _WATCHDOG

    @property
    def version(self) -> str | None:
        self._refresh()
        return self._version

    def ready(self) -> bool:
        try:
            self._refresh()
        except StoreUnavailable:
            return False
        return self._conn is not None

    def _refresh(self) -> None:
        try:
            st = os.stat(self._pointer_path)
        except FileNotFoundError:
            return
        key = (st.st_mtime_ns, st.st_ino)
        if key == self._pointer_stat and self._conn is not None:
            return
        with self._lock:
            if key == self._pointer_stat and self._conn is not None:
                return
            version = self.layout.current_version()
            if version is None:
                return
            try:
                # Limits are set after connecting: a connect-time config would make every
                # other read-only handle on the same file in this process incompatible.
                conn = duckdb.connect(str(self.layout.version_path(version)), read_only=True)
                conn.execute("SET memory_limit = ?", [self.memory_limit])
                conn.execute("SET enable_progress_bar = false")
                if self.threads:
                    conn.execute("SET threads = ?", [self.threads])
            except duckdb.Error as exc:
                raise StoreUnavailable("query store cannot be opened") from exc
            old = self._conn
            self._conn, self._version, self._pointer_stat = conn, version, key
            # Old cursors keep their own handle; closing the parent after a swap is safe
            # once in-flight queries finish, which DuckDB tracks per cursor.
            del old

    @contextmanager
    def cursor(self) -> Iterator[tuple[duckdb.DuckDBPyConnection, str]]:
        self._refresh()
        conn, version = self._conn, self._version
        if conn is None or version is None:
            raise StoreUnavailable("no data version has been loaded")
        cur = conn.cursor()
        try:
            yield cur, version
        finally:
            cur.close()

    def column_types(self, table: str) -> tuple[dict[str, str], str]:
        """Column name → DuckDB type of one table of the serving version (read once per
        version: versions are immutable), and that version."""
        self._refresh()
        version = self._version
        known = None if version is None else self._types.get((version, table))
        if known is not None and version is not None:
            return known, version  # no cursor to open
        with self.cursor() as (cur, version):
            found = self._types.get((version, table))
            if found is None:
                try:
                    cur.execute("SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name = ?", [table])
                    found = {str(name): str(kind) for name, kind in cur.fetchall()}
                except duckdb.Error as exc:
                    raise StoreUnavailable("query store error") from exc
                if len(self._types) >= 64:
                    self._types.clear()
                self._types[(version, table)] = found
        return found, version

    def fetch_arrow(self, sql: str) -> tuple[pa.Table, str]:
        """Run one read-only statement with the time limit; the result as an Arrow table (no
        Python object per value), and the data version."""
        with self.cursor() as (cur, version):
            ticket = self._watchdog.watch(cur, self.timeout_s)
            try:
                table = cur.sql(sql).to_arrow_table()
            except duckdb.InterruptException as exc:
                raise QueryTimeout("query exceeded its time limit") from exc
            except duckdb.Error as exc:
                raise StoreUnavailable("query store error") from exc
            finally:
                self._watchdog.done(ticket)
        return table, version

    def fetch(
        self, sql: str, params: list[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]], str]:
        """Run one read-only statement with the time limit; returns (columns, rows, version)."""
        with self.cursor() as (cur, version):
            ticket = self._watchdog.watch(cur, self.timeout_s)
            try:
                cur.execute(sql, params or [])
                rows = cur.fetchall()
                columns = [d[0] for d in cur.description or []]
            except duckdb.InterruptException as exc:
                raise QueryTimeout("query exceeded its time limit") from exc
            except duckdb.Error as exc:
                raise StoreUnavailable("query store error") from exc
            finally:
                self._watchdog.done(ticket)
        return columns, rows, version
