"""Durable state: registered clients, grants, spent client-assertion ids, and (through
:class:`gateway.state.consents.ConsentStatements`) consents, consumed consent and DPoP ``jti``
and the consent key registry; (through :class:`gateway.state.ratelimits.RateLimitStatements`)
the grants' shared rate limits.

The algorithm lives once in :class:`StateStore`, as literal statements in SQLite's ``?``
parameter style; a backend opens transactions and hands out a :class:`Cursor` that adapts the
statements to its driver (:class:`SqliteStateStore` here, ``PostgresStateStore`` in
:mod:`gateway.state.postgres`). The schema is versioned in :mod:`gateway.state.migrations`.

Concurrency contract, the same on both backends: a ``write`` transaction excludes every other
write transaction on the database (SQLite's ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock),
so a read-then-write inside one is atomic across threads and processes; reads see what was
committed before they started. Single statements that are their own arbiter (the replay store's
insert, a rate-limit take) may skip that lock where the backend allows it. Driver errors
surface as :class:`StoreUnavailable` (fail closed: 503), constraint violations as
:class:`IntegrityViolation` (409).
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.errors import (
    Conflict,
    IntegrityViolation,
    NotFound,
    StoreUnavailable,
    ValidationFailed,
)
from gateway.sqlite_wal import WriteTurn, enable_wal
from gateway.state.budgets import DisclosureStatements
from gateway.state.consents import (
    ConsentStatements,
    StoredConsent,
    StoredConsentKey,
)
from gateway.state.migrations import (
    MIGRATIONS,
    SCHEMA_MIGRATIONS,
    Dialect,
    Migration,
    statement_for,
)
from gateway.state.ratelimits import RateLimitStatements

__all__ = [
    "ClientRecord",
    "Cursor",
    "GrantRecord",
    "SqliteStateStore",
    "StateStore",
    "StoredConsent",
    "StoredConsentKey",
    "open_state_store",
]


class Cursor(Protocol):
    """What the statements use of a DB-API cursor; ``execute`` takes ``?`` placeholders."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    role: str
    org: str | None
    public_key_pem: str
    alg: str
    disabled: bool = False


@dataclass(frozen=True)
class GrantRecord:
    grant_id: str
    insurer: str
    purpose: str
    body: dict[str, Any]
    valid_from_ns: int
    valid_until_ns: int
    revoked_at_ns: int | None
    created_by: str
    created_at_ns: int


class StateStore(ConsentStatements, DisclosureStatements, RateLimitStatements, ABC):
    """State operations over a DB-API connection; subclasses open it."""

    @abstractmethod
    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """Held by one holder at a time across every process sharing this store, for work
        that reads, decides outside the store, then writes (the difference check: a release
        must see every earlier release). Backend errors surface as StoreUnavailable."""

    @abstractmethod
    def _tx(self, *, write: bool = False, wait: bool = True) -> AbstractContextManager[Any]:
        """A :class:`Cursor` inside one transaction (the database's write lock when
        ``write``), committed on success, rolled back on error; backend errors surface as
        StoreUnavailable, constraint violations as IntegrityViolation. ``wait=False``: a
        SQLite writer raises :class:`~gateway.sqlite_wal.WriteTurnBusy` instead of waiting
        for another writer's turn (a database server's lock is always waited for)."""

    # -- schema ------------------------------------------------------------------------
    dialect: Dialect

    def _migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> int:
        """Apply the migrations this database lacks, under the write lock (several workers may
        start at once; each migration runs once). Returns the schema version."""
        with self._tx(write=True) as cur:
            cur.execute(SCHEMA_MIGRATIONS)
            cur.execute("SELECT version FROM schema_migrations")
            done = {int(r[0]) for r in cur.fetchall()}
            for migration in migrations:
                if migration.version in done:
                    continue
                for statement in migration.statements:
                    cur.execute(statement_for(statement, self.dialect))
                cur.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at_ns) "
                    "VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time_ns()),
                )
                done.add(migration.version)
        return max(done, default=0)

    def schema_version(self) -> int:
        with self._tx() as cur:
            cur.execute("SELECT MAX(version) FROM schema_migrations")
            row = cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def ready(self) -> bool:
        try:
            self.version("grants")
        except StoreUnavailable:
            return False
        return True

    def close(self) -> None:
        """Release connections (a no-op where there is nothing to release)."""

    # -- clients -----------------------------------------------------------------------
    def add_client(self, client: ClientRecord) -> None:
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO clients (client_id, role, org, public_key_pem, alg, "
                "created_at_ns, disabled) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (client_id) DO NOTHING",
                (client.client_id, client.role, client.org, client.public_key_pem,
                 client.alg, time.time_ns(), int(client.disabled)),
            )
            if cur.rowcount != 1:
                raise Conflict(f"client {client.client_id} already exists")

    def get_client(self, client_id: str) -> ClientRecord | None:
        with self._tx() as cur:
            cur.execute(
                "SELECT client_id, role, org, public_key_pem, alg, disabled FROM clients "
                "WHERE client_id = ?",
                (client_id,),
            )
            row = cur.fetchone()
        if row is None:
            return None
        return ClientRecord(row[0], row[1], row[2], row[3], row[4], bool(row[5]))

    # -- single-use assertion ids ------------------------------------------------------
    def spend_jti(self, jti: str, client_id: str, expires_ns: int, now_ns: int) -> bool:
        """Record ``jti`` as used; False if it was already used and has not expired.
        ``expires_ns`` comes from the assertion (its ``exp``): ids are keyed by it first."""
        return self._remember_once(
            "DELETE FROM spent_jti WHERE expires_ns < ?",
            "INSERT INTO spent_jti (expires_ns, jti, client_id) VALUES (?, ?, ?) "
            "ON CONFLICT (expires_ns, jti) DO NOTHING",
            (expires_ns, f"{client_id}:{jti}", client_id), now_ns)

    # -- grants ------------------------------------------------------------------------
    def add_grant(self, grant: GrantRecord) -> None:
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO grants (grant_id, insurer, purpose, body, valid_from_ns, "
                "valid_until_ns, revoked_at_ns, created_by, created_at_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (grant_id) DO NOTHING",
                (grant.grant_id, grant.insurer, grant.purpose,
                 json.dumps(grant.body, ensure_ascii=False, sort_keys=True),
                 grant.valid_from_ns, grant.valid_until_ns, grant.revoked_at_ns,
                 grant.created_by, grant.created_at_ns),
            )
            if cur.rowcount != 1:
                raise Conflict(f"grant {grant.grant_id} already exists")
            self._bump(cur, "grants")

    def revoke_grant(self, grant_id: str, now_ns: int) -> GrantRecord:
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE grants SET revoked_at_ns = ? WHERE grant_id = ? AND revoked_at_ns IS NULL",
                (now_ns, grant_id),
            )
            if cur.rowcount != 1:
                cur.execute("SELECT 1 FROM grants WHERE grant_id = ?", (grant_id,))
                if cur.fetchone() is None:
                    raise NotFound(f"grant {grant_id} does not exist")
                raise Conflict(f"grant {grant_id} is already revoked")
            self._bump(cur, "grants")
        found = self.get_grant(grant_id)
        assert found is not None  # noqa: S101 - just updated inside the transaction
        return found

    def get_grant(self, grant_id: str) -> GrantRecord | None:
        rows = self._grants("WHERE grant_id = ?", (grant_id,))
        return rows[0] if rows else None

    def list_grants(self, insurer: str | None = None) -> list[GrantRecord]:
        if insurer is None:
            return self._grants("", ())
        return self._grants("WHERE insurer = ?", (insurer,))

    def _grants(self, where: str, params: tuple[Any, ...]) -> list[GrantRecord]:
        with self._tx() as cur:
            # `where` is one of two fixed clauses; values are bound parameters.
            cur.execute(
                "SELECT grant_id, insurer, purpose, body, valid_from_ns, valid_until_ns, "  # noqa: S608
                "revoked_at_ns, created_by, created_at_ns FROM grants "
                + where
                + " ORDER BY created_at_ns, grant_id",
                params,
            )
            rows = cur.fetchall()
        return [
            GrantRecord(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7], r[8])
            for r in rows
        ]

    # -- change counters (a change holds from the next request, in every process) -------
    def version(self, name: str) -> int:
        row = self._fetch_one("SELECT version FROM state_versions WHERE name = ?", (name,))
        return int(row[0]) if row else 0

    @staticmethod
    def _bump(cur: Any, name: str) -> None:
        cur.execute(
            "INSERT INTO state_versions (name, version) VALUES (?, 1) "
            "ON CONFLICT (name) DO UPDATE SET version = state_versions.version + 1",
            (name,),
        )


class _SqliteCursor:
    """sqlite3 already speaks ``?``; this only maps its errors to the gateway's."""

    __slots__ = ("_cur",)

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self._cur = cur

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            self._cur.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise IntegrityViolation("state change refused by a constraint") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailable("state store unavailable") from exc

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()


class SqliteStateStore(StateStore):
    """The embedded default: one SQLite file in WAL mode, a connection per thread."""

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_turn = WriteTurn(path)
        self._migrate()

    def _conn(self, *, durable: bool = True) -> sqlite3.Connection:
        # Two connections per thread: durable commits (synchronous=FULL: the WAL is synced
        # before COMMIT returns) and counter commits (NORMAL: synced at the next checkpoint or
        # durable commit). Both see and lock the same database.
        name = "conn" if durable else "counter_conn"
        conn: sqlite3.Connection | None = getattr(self._local, name, None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
                enable_wal(conn)
                conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=5000")
            except sqlite3.Error as exc:
                raise StoreUnavailable("state store cannot be opened") from exc
            setattr(self._local, name, conn)
        return conn

    def close(self) -> None:
        self._write_turn.close()

    def _fetch_one(self, sql: str, params: tuple[Any, ...]) -> Any:
        # Autocommit: one statement, one read snapshot; no BEGIN / COMMIT round.
        try:
            return self._conn().execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable("state store unavailable") from exc

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        # flock on a file beside the database: every process on this host that opens the
        # store takes the same lock; it is released when the file is closed, even on a crash.
        lock_path = self.path.with_name(f"{self.path.name}.{name}.lock")
        try:
            handle = open(lock_path, "a+b")  # noqa: SIM115 (closed in finally)
        except OSError as exc:
            raise StoreUnavailable("state store lock cannot be opened") from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield
        finally:
            handle.close()

    def _counter_tx(self) -> AbstractContextManager[Cursor]:
        return self._tx(write=True, durable=False)

    @contextmanager
    def _tx(self, *, write: bool = False, wait: bool = True,
            durable: bool = True) -> Iterator[Cursor]:
        if not write:
            with self._tx_on_connection("BEGIN", durable) as cur:
                yield cur
            return
        # Writers take turns before asking SQLite (whose busy handler sleeps milliseconds).
        with ExitStack() as turn:
            try:
                turn.enter_context(self._write_turn.held(wait=wait))
            except (OSError, sqlite3.Error) as exc:
                raise StoreUnavailable("state store unavailable") from exc
            with self._tx_on_connection("BEGIN IMMEDIATE", durable) as cur:
                yield cur

    @contextmanager
    def _tx_on_connection(self, begin: str, durable: bool) -> Iterator[Cursor]:
        try:
            conn = self._conn(durable=durable)
            cur = conn.cursor()
            cur.execute(begin)
        except sqlite3.Error as exc:
            raise StoreUnavailable("state store unavailable") from exc
        try:
            yield _SqliteCursor(cur)
        except BaseException:
            conn.rollback()
            raise
        try:
            conn.commit()
        except sqlite3.Error as exc:
            conn.rollback()
            raise StoreUnavailable("state store unavailable") from exc


def open_state_store(url: str | None, sqlite_path: Path) -> StateStore:
    """The state store a deployment configured: PostgreSQL for a ``postgresql://`` URL, else
    the SQLite file ``sqlite_path``."""
    if url is None:
        return SqliteStateStore(sqlite_path)
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.state.postgres import PostgresStateStore

        return PostgresStateStore(url)
    raise ValidationFailed("state_url must be a postgresql:// URL")
