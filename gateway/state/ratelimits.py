"""Grant rate limits, shared by every worker process and replica through the state store.

The algorithm is **GCRA**, the generic cell rate algorithm (ITU-T I.371, "virtual scheduling"):
one row per key holds the theoretical arrival time ``tat_ns`` of the next request. A limit of
``L`` per minute has the emission interval ``T = ⌈60 s / L⌉`` and the burst tolerance
``τ = (L − 1)·T``. A request at ``now`` is allowed when ``tat − now ≤ τ``, and then
``tat ← max(tat, now) + T``; a refused request changes nothing. It is the token bucket the
gateway always had — ``L`` requests at once from a full allowance, one more every ``T``, the
whole allowance back after a quiet minute — kept in one integer per key instead of in each
worker's memory.

A take is one statement, ``INSERT … ON CONFLICT (rate_key) DO UPDATE SET … WHERE …``, whose row
count is the answer, the same text on SQLite and PostgreSQL: the first request of a key
inserts, later ones update the row only where the condition holds. Both databases evaluate the
condition on the newest committed row under its write lock (SQLite's one writer; PostgreSQL's
row lock, which ``ON CONFLICT DO UPDATE`` takes and then re-reads the row), so concurrent takes
from any number of processes are serialized per key and never allow more than the limit.

``T`` is rounded up, so the long-run rate is at most ``L`` per minute, never above it. The clock
is the caller's (each worker's wall clock; tests inject theirs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final

from gateway.errors import ValidationFailed

__all__ = ["MINUTE_NS", "RATE_LIMIT_SCHEMA", "RateLimitStatements", "RateTake"]

MINUTE_NS: Final = 60_000_000_000

RATE_LIMIT_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS rate_limits (
        rate_key TEXT PRIMARY KEY,
        tat_ns BIGINT NOT NULL)""",
)

# Parameters: key, now + T (a new key's first take), now, now, T, now, τ.
_TAKE: Final = (
    "INSERT INTO rate_limits (rate_key, tat_ns) VALUES (?, ?) "
    "ON CONFLICT (rate_key) DO UPDATE SET "
    "tat_ns = CASE WHEN rate_limits.tat_ns > ? THEN rate_limits.tat_ns ELSE ? END + ? "
    "WHERE rate_limits.tat_ns - ? <= ?"
)
_TAT: Final = "SELECT tat_ns FROM rate_limits WHERE rate_key = ?"


@dataclass(frozen=True)
class RateTake:
    """The answer of one take: allowed, or refused until ``retry_after_ns`` from now."""

    allowed: bool
    retry_after_ns: int = 0

    @property
    def retry_after_s(self) -> int:
        """Whole seconds to wait (``Retry-After``), at least 1 for a refusal.

        >>> RateTake(False, 1).retry_after_s, RateTake(False, 2_000_000_001).retry_after_s
        (1, 3)
        """
        return max(1, -(-self.retry_after_ns // 1_000_000_000)) if not self.allowed else 0


class RateLimitStatements(ABC):
    """The rate-limit statement over a backend's counter transaction."""

    @abstractmethod
    def _counter_tx(self) -> AbstractContextManager[Any]:
        """A cursor in one write transaction for counters: atomic and isolated like every
        write, but its commit need not reach the disk before it returns (SQLite
        ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit=off``). A crash of the machine
        or the database server may forget the last takes (a fraction of a second), never
        reorder or half-apply them."""

    def take_rate(self, key: str, per_minute: int, now_ns: int) -> RateTake:
        """Take one request from ``key``'s allowance of ``per_minute`` (GCRA, see the module);
        exact across threads and processes. Store errors raise StoreUnavailable."""
        if per_minute < 1:
            raise ValidationFailed("a rate limit allows at least 1 request per minute")
        interval = -(-MINUTE_NS // per_minute)
        tolerance = (per_minute - 1) * interval
        with self._counter_tx() as cur:
            cur.execute(_TAKE, (key, now_ns + interval, now_ns, now_ns, interval, now_ns,
                                tolerance))
            if cur.rowcount == 1:
                return RateTake(True)
            cur.execute(_TAT, (key,))
            row = cur.fetchone()  # there: a refusal needs a row (rows are never deleted)
        wait = int(row[0]) - tolerance - now_ns if row is not None else interval
        # A clock read before a take that another worker made with a later one overstates the
        # wait; the last take's slot reopens within one interval of the real now.
        return RateTake(False, min(wait, interval))
