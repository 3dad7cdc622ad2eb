"""The disclosure statements (released cells, ledger, stored answers) on SQLite and on a real
PostgreSQL server: the same literal statements must behave the same on both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import BudgetExhausted
from gateway.state.budgets import MICRO, BudgetCharge
from gateway.state.postgres import PostgresStateStore
from gateway.state.store import SqliteStateStore, StateStore


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        store: StateStore = SqliteStateStore(tmp_path / "state.db")
    else:
        store = PostgresStateStore(str(request.getfixturevalue("postgres_url")))
    yield store
    store.close()


def test_released_cells_are_kept_once_and_found_by_size(state: StateStore) -> None:
    box = [["gend", ["1"]], ["year", ["2024"]]]
    cells = [("k1", box, 50), ("k2", [["gend", ["2"]]], 80)]
    assert state.record_released("v1", "settlements", cells, org="ins-a", release_id="rel-1",
                                 now_ns=10) == 2
    # The same box again keeps its first release.
    assert state.record_released("v1", "settlements", cells[:1], org="ins-b",
                                 release_id="rel-2", now_ns=20) == 0
    near = state.released_near("v1", "settlements", [(45, 55), (52, 60)])
    assert [(r.box, r.n_persons, r.org, r.release_id) for r in near] == [
        (box, 50, "ins-a", "rel-1")]
    assert state.released_near("v2", "settlements", [(0, 100)]) == []
    assert state.released_count("v1", "settlements") == 2
    assert [(r.release_id, at) for r, at in
            state.released_since("v1", "settlements", 10)] == [("rel-1", 10), ("rel-1", 10)]


def test_the_ledger_charges_once_per_new_answer_and_refuses_beyond_the_cap(
    state: StateStore
) -> None:
    charges = [BudgetCharge("grant:g", "2026-11", MICRO, 2 * MICRO),
               BudgetCharge("dataset:v1:person_years", "all", MICRO, 10 * MICRO)]
    first = state.spend_and_store({f"a{i}": i for i in range(300)}, charges, now_ns=1)
    assert first.charged_micro == MICRO
    assert first.remaining_micro == {"grant:g": MICRO, "dataset:v1:person_years": 9 * MICRO}
    again = state.spend_and_store({"a7": -5}, charges, now_ns=2)
    assert (again.answers, again.charged_micro) == ({"a7": 7}, 0)
    state.spend_and_store({"b": 1}, charges, now_ns=3)
    with pytest.raises(BudgetExhausted):
        state.spend_and_store({"c": 1}, charges, now_ns=4)
    assert state.stored_answers(["b", "c"]) == {"b": 1}
    assert state.budget_spent("grant:g", "2026-11") == 2 * MICRO
    assert state.budget_spent("dataset:v1:person_years", "all") == 2 * MICRO
