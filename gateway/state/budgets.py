"""Durable disclosure state: cells already released (for the difference check), the privacy
budget ledger, and the stored noisy answers.

The statements live once in :class:`DisclosureStatements`, a base of
:class:`gateway.state.store.StateStore` (like :class:`gateway.state.consents.ConsentStatements`):
literal statements with ``?`` placeholders, conflicts through ``ON CONFLICT … DO …``, plain
types, so the same text runs on SQLite and PostgreSQL.

Budgets are kept in integer micro-units (1 ε = 1,000,000) so that sums and caps compare exactly
on every backend. A charge and the answers it pays for are written in one write transaction:
either the release is paid for and its noisy answers stored, or nothing happens; concurrent
requests for the same cells converge on the first stored answer (``ON CONFLICT DO NOTHING``,
then read back), so asking twice at once buys no second sample.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from gateway.errors import BudgetExhausted

__all__ = [
    "BUDGET_SCHEMA",
    "MICRO",
    "BudgetCharge",
    "DisclosureStatements",
    "ReleasedRow",
    "SpendResult",
]

MICRO = 1_000_000

BUDGET_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS released_cells (
        data_version TEXT NOT NULL,
        dataset TEXT NOT NULL,
        box_key TEXT NOT NULL,
        box TEXT NOT NULL,
        n_persons BIGINT NOT NULL,
        org TEXT,
        release_id TEXT NOT NULL,
        created_at_ns BIGINT NOT NULL,
        PRIMARY KEY (data_version, dataset, box_key))""",
    "CREATE INDEX IF NOT EXISTS released_cells_size "
    "ON released_cells (data_version, dataset, n_persons)",
    """CREATE TABLE IF NOT EXISTS privacy_budget (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        spent_micro BIGINT NOT NULL,
        updated_at_ns BIGINT NOT NULL,
        PRIMARY KEY (scope, period))""",
    """CREATE TABLE IF NOT EXISTS noisy_answers (
        answer_key TEXT PRIMARY KEY,
        value BIGINT NOT NULL,
        created_at_ns BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS noisy_tables (
        table_key TEXT NOT NULL,
        dims TEXT NOT NULL,
        cells TEXT NOT NULL,
        created_at_ns BIGINT NOT NULL,
        PRIMARY KEY (table_key, dims))""",
)

# How many keys one IN (…) list binds (SQLite's default limit is far above this).
_CHUNK = 400


@dataclass(frozen=True)
class ReleasedRow:
    box: list[list[Any]]
    n_persons: int
    org: str | None
    release_id: str


@dataclass(frozen=True)
class BudgetCharge:
    """Spend ``amount_micro`` of ``scope`` in ``period``, never beyond ``cap_micro``."""

    scope: str
    period: str
    amount_micro: int
    cap_micro: int


@dataclass(frozen=True)
class SpendResult:
    answers: dict[str, int]  # every requested key -> its stored value
    charged_micro: int  # 0 when every answer was already stored
    remaining_micro: dict[str, int]  # scope -> what is left in its period after this call


def _in_list(n: int) -> str:
    return ", ".join("?" * n)


class DisclosureStatements(ABC):
    """The disclosure statements over a backend's transactions."""

    @abstractmethod
    def _tx(self, *, write: bool = False, wait: bool = True) -> AbstractContextManager[Any]:
        """A cursor inside one transaction (see :class:`gateway.state.store.StateStore`)."""

    # -- released cells (difference check) --------------------------------------------
    def released_near(
        self, data_version: str, dataset: str, ranges: Sequence[tuple[int, int]]
    ) -> list[ReleasedRow]:
        """Released cells of this version whose person count falls in any ``[lo, hi]``,
        sorted by person count then box (the same order in every process)."""
        found: dict[str, ReleasedRow] = {}
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        with self._tx() as cur:
            for lo, hi in merged:
                cur.execute(
                    "SELECT box_key, box, n_persons, org, release_id FROM released_cells "
                    "WHERE data_version = ? AND dataset = ? AND n_persons BETWEEN ? AND ?",
                    (data_version, dataset, lo, hi),
                )
                for key, box, n, org, release_id in cur.fetchall():
                    found[key] = ReleasedRow(json.loads(box), int(n), org, release_id)
        return sorted(found.values(), key=lambda r: (r.n_persons, json.dumps(r.box)))

    def released_since(self, data_version: str, dataset: str,
                       since_ns: int) -> list[tuple[ReleasedRow, int]]:
        """Released cells recorded at or after ``since_ns``, with their record time."""
        with self._tx() as cur:
            cur.execute(
                "SELECT box, n_persons, org, release_id, created_at_ns FROM released_cells "
                "WHERE data_version = ? AND dataset = ? AND created_at_ns >= ?",
                (data_version, dataset, since_ns),
            )
            rows = cur.fetchall()
        return [(ReleasedRow(json.loads(box), int(n), org, rid), int(at))
                for box, n, org, rid, at in rows]

    def released_count(self, data_version: str, dataset: str) -> int:
        with self._tx() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM released_cells WHERE data_version = ? AND dataset = ?",
                (data_version, dataset),
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def record_released(
        self, data_version: str, dataset: str,
        cells: Sequence[tuple[str, list[list[Any]], int]], *, org: str | None,
        release_id: str, now_ns: int,
    ) -> int:
        """Remember what released cells covered (``(box_key, box, n_persons)``); a box already
        remembered keeps its first release. Returns how many were new."""
        added = 0
        with self._tx(write=True) as cur:
            for key, box, n in cells:
                cur.execute(
                    "INSERT INTO released_cells (data_version, dataset, box_key, box, n_persons, "
                    "org, release_id, created_at_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (data_version, dataset, box_key) DO NOTHING",
                    (data_version, dataset, key, json.dumps(box, separators=(",", ":")), n,
                     org, release_id, now_ns),
                )
                added += max(cur.rowcount, 0)
        return added

    # -- budgets and stored answers ---------------------------------------------------
    def budget_spent(self, scope: str, period: str) -> int:
        with self._tx() as cur:
            cur.execute(
                "SELECT spent_micro FROM privacy_budget WHERE scope = ? AND period = ?",
                (scope, period),
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def stored_answers(self, keys: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        with self._tx() as cur:
            self._read_answers(cur, keys, found)
        return found

    @staticmethod
    def _read_answers(cur: Any, keys: Sequence[str], into: dict[str, int]) -> None:
        for i in range(0, len(keys), _CHUNK):
            part = list(keys[i : i + _CHUNK])
            # Only placeholders are pasted; every key is a bound parameter.
            cur.execute(
                "SELECT answer_key, value FROM noisy_answers WHERE answer_key IN ("  # noqa: S608
                + _in_list(len(part)) + ")",
                part,
            )
            for key, value in cur.fetchall():
                into[key] = int(value)

    def store_table(self, table_key: str, dims: Sequence[str], cells: Any, *,
                    now_ns: int) -> None:
        """Remember which stored answers make up one noisy result (its cells by group
        values), so that coarser sub-totals can be summed from them later."""
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO noisy_tables (table_key, dims, cells, created_at_ns) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (table_key, dims) DO NOTHING",
                (table_key, json.dumps(list(dims)), json.dumps(cells, default=str), now_ns),
            )

    def stored_tables(self, table_key: str) -> list[tuple[list[str], Any]]:
        with self._tx() as cur:
            cur.execute("SELECT dims, cells FROM noisy_tables WHERE table_key = ?",
                        (table_key,))
            rows = cur.fetchall()
        return sorted(((json.loads(d), json.loads(c)) for d, c in rows),
                      key=lambda t: (len(t[0]), t[0]))

    def spend_and_store(
        self, fresh: Mapping[str, int], charges: Sequence[BudgetCharge], *, now_ns: int,
        free: Mapping[str, int] | None = None,
    ) -> SpendResult:
        """Atomically: answers already stored are returned as stored; if any key of ``fresh``
        is new, every charge is made (or :class:`BudgetExhausted` is raised and nothing is
        written) and the new answers are stored. ``free`` answers (sums of stored ones) are
        stored without a charge. Averaging gains nothing: a stored answer never changes."""
        free = free or {}
        keys = sorted(set(fresh) | set(free))
        answers: dict[str, int] = {}
        remaining: dict[str, int] = {}
        with self._tx(write=True) as cur:
            self._read_answers(cur, keys, answers)
            missing = [k for k in keys if k not in answers]
            paid = any(k in fresh for k in missing)
            spent_now = 0
            for charge in charges:
                cur.execute(
                    "SELECT spent_micro FROM privacy_budget WHERE scope = ? AND period = ?",
                    (charge.scope, charge.period),
                )
                row = cur.fetchone()
                spent = int(row[0]) if row else 0
                amount = charge.amount_micro if paid else 0
                if spent + amount > charge.cap_micro:
                    left = max(charge.cap_micro - spent, 0) / MICRO
                    # the message is also the audit entry's reason: it says what remains
                    raise BudgetExhausted(
                        f"privacy budget exhausted for {charge.scope} ({charge.period}): "
                        f"ε {left:g} remaining, this release needs ε {amount / MICRO:g}",
                        remaining=left, scope=charge.scope,
                    )
                remaining[charge.scope] = charge.cap_micro - spent - amount
                if amount:
                    cur.execute(
                        "INSERT INTO privacy_budget (scope, period, spent_micro, updated_at_ns) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (scope, period) DO UPDATE SET "
                        "spent_micro = privacy_budget.spent_micro + ?, updated_at_ns = ?",
                        (charge.scope, charge.period, amount, now_ns, amount, now_ns),
                    )
                spent_now = max(spent_now, amount)
            for i in range(0, len(missing), _CHUNK // 3):
                part = missing[i : i + _CHUNK // 3]
                params: list[Any] = []
                for key in part:
                    value = int(fresh[key] if key in fresh else free[key])
                    params += [key, value, now_ns]
                    answers[key] = value
                # One multi-row statement per chunk; only placeholders are pasted.
                cur.execute(
                    "INSERT INTO noisy_answers (answer_key, value, created_at_ns) VALUES "  # noqa: S608
                    + ", ".join(["(?, ?, ?)"] * len(part))
                    + " ON CONFLICT (answer_key) DO NOTHING",
                    params,
                )
        return SpendResult(answers=answers, charged_micro=spent_now, remaining_micro=remaining)
