"""Versioned schema of the state store, one list for SQLite and PostgreSQL.

Each :class:`Migration` is a list of statements run in one transaction; a statement is portable
SQL, or a mapping ``{dialect: sql}`` where the two dialects cannot share a spelling (``BLOB`` vs
``BYTEA``, ``INTEGER PRIMARY KEY`` vs an identity column). ``schema_migrations`` records what has
run. Several processes may open the same database at once (gateway workers starting together):
a backend runs :func:`pending` and applies them while holding its write lock (SQLite
``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so each migration runs exactly once.

Portable habits: timestamps in nanoseconds are ``BIGINT`` (PostgreSQL's ``INTEGER`` is 32-bit;
SQLite treats both alike); every ``CREATE`` says ``IF NOT EXISTS`` so a database created before
this table existed adopts version 1 unchanged.

>>> [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
True
>>> statement_for({"sqlite": "BLOB", "postgresql": "BYTEA"}, "postgresql")
'BYTEA'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from gateway.state.budgets import BUDGET_SCHEMA
from gateway.state.consents import CONSENT_SCHEMA, REPLAY_REKEY_SCHEMA
from gateway.state.ratelimits import RATE_LIMIT_SCHEMA

__all__ = ["DIALECTS", "MIGRATIONS", "Dialect", "Migration", "Statement", "statement_for"]

Dialect = Literal["sqlite", "postgresql"]
DIALECTS: Final[tuple[Dialect, ...]] = ("sqlite", "postgresql")

#: Portable SQL, or one spelling per dialect.
Statement = str | Mapping[Dialect, str]

#: Created before any migration runs (by the backend, in the migration transaction).
SCHEMA_MIGRATIONS: Final = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at_ns BIGINT NOT NULL)"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: Sequence[Statement]


def statement_for(statement: Statement, dialect: Dialect) -> str:
    """The SQL of ``statement`` in ``dialect``; a per-dialect statement must name both."""
    if isinstance(statement, str):
        return statement
    missing = [d for d in DIALECTS if d not in statement]
    if missing:
        raise ValueError(f"statement lacks a spelling for {missing}")
    return statement[dialect]


_BASE: Final[tuple[Statement, ...]] = (
    """CREATE TABLE IF NOT EXISTS clients (
        client_id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        org TEXT,
        public_key_pem TEXT NOT NULL,
        alg TEXT NOT NULL,
        created_at_ns BIGINT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS grants (
        grant_id TEXT PRIMARY KEY,
        insurer TEXT NOT NULL,
        purpose TEXT NOT NULL,
        body TEXT NOT NULL,
        valid_from_ns BIGINT NOT NULL,
        valid_until_ns BIGINT NOT NULL,
        revoked_at_ns BIGINT,
        created_by TEXT NOT NULL,
        created_at_ns BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS grants_insurer ON grants (insurer, purpose)",
    """CREATE TABLE IF NOT EXISTS spent_jti (
        jti TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        expires_ns BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS spent_jti_expiry ON spent_jti (expires_ns)",
    """CREATE TABLE IF NOT EXISTS state_versions (
        name TEXT PRIMARY KEY,
        version BIGINT NOT NULL)""",
    *CONSENT_SCHEMA,
)

#: Append only: a released migration never changes (a database records that it ran).
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "clients, grants, replay stores, change counters, consents", _BASE),
    Migration(2, "disclosure: released cells, privacy budget ledger, noisy answers",
              BUDGET_SCHEMA),
    Migration(3, "grant rate limits: one GCRA arrival time per key", RATE_LIMIT_SCHEMA),
    Migration(4, "replay ids keyed by expiry first (a purge is a range delete)",
              REPLAY_REKEY_SCHEMA),
)
