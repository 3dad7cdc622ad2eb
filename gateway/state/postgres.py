"""PostgreSQL backend of the state store: the statements of :class:`StateStore`, unchanged, over
a psycopg 3 connection pool.

Only three things differ from SQLite, all here:

* placeholders: the statements use ``?``; :func:`to_pyformat` rewrites them once per statement
  text (cached) to psycopg's ``%s``, outside quoted literals and identifiers;
* the write lock: a ``write`` transaction first takes one transaction-scoped advisory lock, so
  write transactions exclude each other as SQLite's ``BEGIN IMMEDIATE`` does, in every process
  and on every replica (a budget charge reads, checks and writes under it). Reads do not take
  it (READ COMMITTED: they see every commit made before each statement, so a revocation holds
  from the next request in every worker). The replay store and the rate limits, on every
  request's path, are their own arbiters and skip the global lock
  (:meth:`PostgresStateStore._remember_once`, :meth:`PostgresStateStore._counter_tx`);
* errors: psycopg's ``IntegrityError`` becomes :class:`IntegrityViolation`, any other driver
  error (server down, pool exhausted, statement timeout) :class:`StoreUnavailable`, so callers
  fail closed with 503.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import psycopg
from psycopg_pool import ConnectionPool

from gateway.errors import IntegrityViolation, StoreUnavailable
from gateway.state.migrations import Dialect
from gateway.state.store import Cursor, StateStore

__all__ = ["PostgresStateStore", "to_pyformat"]

#: The advisory lock key of state write transactions ("gwstate" in ASCII). The audit log, if it
#: shares the database, must use another key.
WRITE_LOCK_KEY: Final = 0x67777374617465
_WRITE_LOCK: Final = "SELECT pg_advisory_xact_lock(?)"
_TRY_LOCK: Final = "SELECT pg_try_advisory_xact_lock(?)"


def _purge_key(statement: str) -> int:
    """A stable advisory lock key per purge statement (one replay table each), apart from
    :data:`WRITE_LOCK_KEY`."""
    digest = hashlib.blake2b(statement.encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big") | (1 << 55)


@functools.lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """Rewrite ``?`` placeholders to ``%s`` and escape a literal ``%``, leaving quoted strings
    and identifiers alone. Statements are literals, so the cache holds them all.

    >>> to_pyformat("SELECT 1 FROM t WHERE a = ? AND b LIKE 'x%?'")
    "SELECT 1 FROM t WHERE a = %s AND b LIKE 'x%%?'"
    """
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if ch == "%":
            out.append("%%")  # psycopg reads % as a placeholder everywhere, even in literals
            continue
        if quote is not None:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append(ch)
    return "".join(out)


class _PgCursor:
    """A psycopg cursor that takes ``?`` statements and raises the gateway's errors."""

    __slots__ = ("_cur",)

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            # Always pass a sequence: psycopg then parses placeholders (and %% escapes).
            self._cur.execute(to_pyformat(sql), tuple(params))
        except psycopg.IntegrityError as exc:
            raise IntegrityViolation("state change refused by a constraint") from exc
        except psycopg.Error as exc:
            raise StoreUnavailable("state store unavailable") from exc

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()


class PostgresStateStore(StateStore):
    """State on a PostgreSQL server, shared by every worker and replica.

    ``max_size`` bounds this process's connections; ``timeout`` bounds the wait for one and
    every statement (a stuck server answers 503, not a hung request).
    """

    dialect: Dialect = "postgresql"

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8,
                 timeout: float = 10.0) -> None:
        millis = int(timeout * 1000)
        self._pool = ConnectionPool(
            url, min_size=min_size, max_size=max_size, timeout=timeout, open=False,
            name="gateway-state",
            kwargs={
                "autocommit": False,
                "connect_timeout": max(1, int(timeout)),
                "application_name": "gateway-state",
                "options": f"-c statement_timeout={millis} -c lock_timeout={millis}",
            },
        )
        try:
            self._pool.open()
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        # A session-level advisory lock on a connection kept for the duration; lock_timeout
        # bounds the wait (then 503), and a dead session releases it.
        try:
            with self._pool.connection() as conn:
                conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                             ("gateway.exclusive." + name,))
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                                 ("gateway.exclusive." + name,))
                    conn.commit()
        except psycopg.Error as exc:
            raise StoreUnavailable("state store unavailable") from exc

    @contextmanager
    def _tx(self, *, write: bool = False, wait: bool = True) -> Iterator[Cursor]:
        with self._transaction(lock=write) as cur:
            yield cur

    @contextmanager
    def _transaction(self, *, lock: bool) -> Iterator[_PgCursor]:
        try:
            # The pool's context commits on success and rolls back on any exception.
            with self._pool.connection() as conn, conn.cursor() as raw:
                cur = _PgCursor(raw)
                if lock:
                    cur.execute(_WRITE_LOCK, (WRITE_LOCK_KEY,))
                yield cur
        except psycopg.Error as exc:
            raise StoreUnavailable("state store unavailable") from exc

    @contextmanager
    def _counter_tx(self) -> Iterator[Cursor]:
        """A rate-limit take without the global write lock: its ``INSERT … ON CONFLICT DO
        UPDATE … WHERE`` locks the key's row and re-reads it, so it is the arbiter by itself.
        The commit does not wait for the WAL flush (``synchronous_commit=off`` for this
        transaction only): a server crash may forget the last takes, never half-apply one."""
        with self._transaction(lock=False) as cur:
            cur.execute("SET LOCAL synchronous_commit = off")
            yield cur

    def _remember_once(self, purge: str, insert: str, params: tuple[Any, ...],
                       now_ns: int) -> bool:
        """The replay store without the global write lock: it is on every request's path (DPoP
        proof, single-use consent, client assertion), and its ``INSERT … ON CONFLICT DO
        NOTHING`` is the arbiter by itself (a concurrent insert of the same key waits for the
        first to commit, then does nothing). Only the purge needs care: two purges locking
        expired rows in different orders could deadlock, so one purger at a time runs it (a
        try-lock per statement); the others skip it, and a key whose old row is being purged
        waits for that purge, so reuse after expiry still works."""
        with self._transaction(lock=False) as cur:
            cur.execute(_TRY_LOCK, (_purge_key(purge),))
            if cur.fetchone()[0]:
                cur.execute(purge, (now_ns,))
            cur.execute(insert, params)
            return bool(cur.rowcount == 1)

    def close(self) -> None:
        self._pool.close()
