"""Durable state: registered clients, grants, spent client-assertion ids, and (through
:class:`gateway.state.consents.ConsentStatements`) consents, consumed consent and DPoP ``jti``
and the consent key registry.

The algorithm lives once in :class:`StateStore`; a backend supplies a DB-API connection and
its parameter style. SQLite is the embedded default (WAL); PostgreSQL comes later through the
same statements.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import Conflict, NotFound, StoreUnavailable
from gateway.state.consents import (
    CONSENT_SCHEMA,
    ConsentStatements,
    StoredConsent,
    StoredConsentKey,
)

__all__ = [
    "ClientRecord",
    "GrantRecord",
    "SqliteStateStore",
    "StateStore",
    "StoredConsent",
    "StoredConsentKey",
]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS clients (
        client_id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        org TEXT,
        public_key_pem TEXT NOT NULL,
        alg TEXT NOT NULL,
        created_at_ns INTEGER NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS grants (
        grant_id TEXT PRIMARY KEY,
        insurer TEXT NOT NULL,
        purpose TEXT NOT NULL,
        body TEXT NOT NULL,
        valid_from_ns INTEGER NOT NULL,
        valid_until_ns INTEGER NOT NULL,
        revoked_at_ns INTEGER,
        created_by TEXT NOT NULL,
        created_at_ns INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS grants_insurer ON grants (insurer, purpose)",
    """CREATE TABLE IF NOT EXISTS spent_jti (
        jti TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        expires_ns INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS spent_jti_expiry ON spent_jti (expires_ns)",
    """CREATE TABLE IF NOT EXISTS state_versions (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL)""",
    *CONSENT_SCHEMA,
)


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


class StateStore(ConsentStatements, ABC):
    """State operations over a DB-API connection; subclasses open it."""

    @abstractmethod
    def _tx(self, *, write: bool = False) -> AbstractContextManager[Any]:
        """A cursor inside one transaction (a write lock when ``write``), committed on
        success, rolled back on error; backend errors surface as StoreUnavailable."""

    # -- clients -----------------------------------------------------------------------
    def add_client(self, client: ClientRecord) -> None:
        with self._tx(write=True) as cur:
            try:
                cur.execute(
                    "INSERT INTO clients (client_id, role, org, public_key_pem, alg, "
                    "created_at_ns, disabled) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (client.client_id, client.role, client.org, client.public_key_pem,
                     client.alg, time.time_ns(), int(client.disabled)),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"client {client.client_id} already exists") from exc

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
        """Record ``jti`` as used; False if it was already used and has not expired."""
        return self._remember_once(
            "DELETE FROM spent_jti WHERE expires_ns < ?",
            "INSERT INTO spent_jti (jti, client_id, expires_ns) VALUES (?, ?, ?) "
            "ON CONFLICT (jti) DO NOTHING",
            (f"{client_id}:{jti}", client_id, expires_ns), now_ns)

    # -- grants ------------------------------------------------------------------------
    def add_grant(self, grant: GrantRecord) -> None:
        with self._tx(write=True) as cur:
            try:
                cur.execute(
                    "INSERT INTO grants (grant_id, insurer, purpose, body, valid_from_ns, "
                    "valid_until_ns, revoked_at_ns, created_by, created_at_ns) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (grant.grant_id, grant.insurer, grant.purpose,
                     json.dumps(grant.body, ensure_ascii=False, sort_keys=True),
                     grant.valid_from_ns, grant.valid_until_ns, grant.revoked_at_ns,
                     grant.created_by, grant.created_at_ns),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"grant {grant.grant_id} already exists") from exc
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
        with self._tx() as cur:
            cur.execute("SELECT version FROM state_versions WHERE name = ?", (name,))
            row = cur.fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _bump(cur: Any, name: str) -> None:
        cur.execute(
            "INSERT INTO state_versions (name, version) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET version = version + 1",
            (name,),
        )


class SqliteStateStore(StateStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._tx(write=True) as cur:
            for statement in _SCHEMA:
                cur.execute(statement)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=5000")
            except sqlite3.Error as exc:
                raise StoreUnavailable("state store cannot be opened") from exc
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[sqlite3.Cursor]:
        try:
            conn = self._conn()
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            raise StoreUnavailable("state store unavailable") from exc
        try:
            yield cur
        except sqlite3.IntegrityError:
            conn.rollback()
            raise
        except sqlite3.Error as exc:
            conn.rollback()
            raise StoreUnavailable("state store unavailable") from exc
        except BaseException:
            conn.rollback()
            raise
        try:
            conn.commit()
        except sqlite3.Error as exc:
            conn.rollback()
            raise StoreUnavailable("state store unavailable") from exc

    def ready(self) -> bool:
        try:
            self.version("grants")
        except StoreUnavailable:
            return False
        return True
