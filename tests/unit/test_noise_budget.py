"""Noise (bounded SQL, calibration, sampling), rounding, the budget ledger and the options the
policy hands over."""

from __future__ import annotations

import statistics
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from gateway.catalog import default_catalog
from gateway.disclosure.control import DisclosureOptions, budget_period
from gateway.disclosure.noise import NoiseSpec, Sampler, noisy_plan, round_count
from gateway.errors import BudgetExhausted, PolicyEngineError, ValidationFailed
from gateway.policy import Obligations
from gateway.query.spec import AggregateQuery
from gateway.service.grants import GrantRequest, validate_grant
from gateway.state.budgets import MICRO, BudgetCharge
from gateway.state.store import SqliteStateStore

CATALOG = default_catalog()
SPEC = NoiseSpec.from_obligation({"mechanism": "laplace", "epsilon": 1.0, "max_records": 2,
                                  "bounds": {"psn_part_amt": [0, 100]}})


def query(dataset: str, dims: list[str], measures: list[dict[str, Any]],
          filters: dict[str, list[Any]] | None = None) -> AggregateQuery:
    return AggregateQuery(purpose="hmb_pricing", dataset=dataset, dimensions=dims,
                          measures=measures, filters=filters or {})


# -- bounded SQL -------------------------------------------------------------------------------

SETTLEMENTS = [  # psn_id, year, med_type, gend, psn_part_amt
    (1, 2024, "11", "1", Decimal("70.00")), (1, 2024, "11", "1", Decimal("60.00")),
    (1, 2024, "11", "1", Decimal("1.00")), (1, 2024, "21", "1", Decimal("500.00")),
    (1, 2023, "11", "1", Decimal("30.00")), (2, 2024, "11", "2", Decimal("5.00")),
    (3, 2024, "21", "2", Decimal("-4.00")),
]


@pytest.fixture
def con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("CREATE TABLE settlements (psn_id BIGINT, year BIGINT, med_type VARCHAR, "
                "gend VARCHAR, psn_part_amt DECIMAL(18,2))")
    con.executemany("INSERT INTO settlements VALUES (?, ?, ?, ?, ?)", SETTLEMENTS)
    return con


def test_settlements_are_bounded_per_person_year_and_cell(con: duckdb.DuckDBPyConnection) -> None:
    q = query("settlements", ["med_type"], [{"fn": "count"}, {"fn": "sum",
                                                               "field": "psn_part_amt"}])
    plan = noisy_plan(q, CATALOG, SPEC)
    rows = {r[0]: r for r in con.execute(plan.sql).fetchall()}
    # med_type 11: person 1 in 2024 has 3 records (counted 2), 131.00 (clamped to 100);
    # person 1 in 2023: 1 record, 30; person 2: 1 record, 5.
    assert rows["11"][1] == 2  # distinct persons, exact (for suppression only)
    assert rows["11"][4:6] == (2 + 1 + 1, Decimal("135.00"))
    # med_type 21: 500 clamped to 100. Amounts are never negative after ingest, so the lower
    # bound is checked rather than clamped: the planted -4.00 fails the check (fail closed).
    assert rows["21"][4:6] == (2, Decimal("96.00"))
    assert plan.lower_bounds_hold(rows["11"])
    assert not plan.lower_bounds_hold(rows["21"])
    # One person-year reaches both med_type cells: the sensitivity counts both.
    assert plan.cells_per_person_year == 4  # the catalog's four 医疗类别
    assert plan.scales == (2 * 4 / 0.5, 100 * 100 * 4 / 0.5)


def test_person_years_rows_are_clamped_one_by_one() -> None:
    q = query("person_years", ["gend"], [{"fn": "mean", "field": "psn_part_amt"}])
    plan = noisy_plan(q, CATALOG, SPEC)
    assert plan.cells_per_person_year == 1
    assert [s.name for s in plan.series] == ["_nsum_psn_part_amt", "_ncnt_psn_part_amt"]
    assert "LEAST(psn_part_amt, 100)" in plan.sql
    assert "MIN(psn_part_amt)" in plan.sql  # the lower bound, checked
    assert "COUNT(DISTINCT" in plan.sql  # several years: persons counted distinct
    positive = NoiseSpec.from_obligation({"mechanism": "laplace", "epsilon": 1.0,
                                          "bounds": {"psn_part_amt": [10, 100]}})
    one_year = query("person_years", ["gend"], [{"fn": "sum", "field": "psn_part_amt"}],
                     {"year": [2024]})
    plan = noisy_plan(one_year, CATALOG, positive)
    assert "LEAST(GREATEST(psn_part_amt, 10), 100)" in plan.sql
    assert "COUNT(DISTINCT" not in plan.sql  # one year: a row is a person


def test_a_sum_without_published_bounds_is_refused() -> None:
    q = query("person_years", [], [{"fn": "sum", "field": "hifp_pay"}])
    with pytest.raises(Exception, match="no noise bounds for hifp_pay"):
        noisy_plan(q, CATALOG, SPEC)


def test_gaussian_scale_meets_the_epsilon_delta_it_charges() -> None:
    spec = NoiseSpec.from_obligation({"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-6,
                                      "bounds": {}})
    plan = noisy_plan(query("person_years", [], [{"fn": "count_persons"}]), CATALOG, spec)
    sigma = plan.scales[0]
    rho = 1 / (2 * sigma**2)
    import math
    assert rho + 2 * math.sqrt(rho * math.log(1e6)) == pytest.approx(1.0)


# -- sampling and rounding ----------------------------------------------------------------------


def test_discrete_laplace_samples_are_integers_with_the_calibrated_spread() -> None:
    sampler = Sampler()
    values = sampler.add("laplace", 10.0, [1000] * 4000)
    assert all(isinstance(v, int) for v in values)
    noise = [v - 1000 for v in values]
    # Var of a discrete Laplace with scale b is close to 2b² (= 200 here).
    assert 100 < statistics.pvariance(noise) < 400
    assert sampler.measurement("laplace", 10.0) is sampler.measurement("laplace", 10.0)


def test_round_count() -> None:
    assert [round_count(v, 5) for v in (0, 2, 3, 7, 8, -6)] == [0, 0, 5, 5, 10, 0]
    assert round_count(7, 1) == 7


# -- the ledger ---------------------------------------------------------------------------------


def test_budget_charges_are_atomic_and_answers_are_stored_once(tmp_path: Path) -> None:
    state = SqliteStateStore(tmp_path / "state.db")
    charge = [BudgetCharge("grant:g", "2026-11", 2 * MICRO, 5 * MICRO)]
    first = state.spend_and_store({"a": 1}, charge, now_ns=1)
    again = state.spend_and_store({"a": 99}, charge, now_ns=2)
    assert (first.answers, again.answers) == ({"a": 1}, {"a": 1})
    assert (first.charged_micro, again.charged_micro) == (2 * MICRO, 0)
    state.spend_and_store({"b": 2}, charge, now_ns=3)
    with pytest.raises(BudgetExhausted) as refused:
        state.spend_and_store({"c": 3}, charge, now_ns=4)
    assert refused.value.status == 429
    assert refused.value.details == {"remaining": 1.0, "scope": "grant:g"}
    assert state.stored_answers(["c"]) == {}  # nothing written by the refused call
    assert state.budget_spent("grant:g", "2026-11") == 4 * MICRO


def test_concurrent_spenders_never_overspend(tmp_path: Path) -> None:
    state = SqliteStateStore(tmp_path / "state.db")
    outcomes: list[bool] = []

    def spend(i: int) -> None:
        try:
            state.spend_and_store({f"k{i}": i}, [BudgetCharge("grant:g", "p", MICRO,
                                                               5 * MICRO)], now_ns=i)
            outcomes.append(True)
        except BudgetExhausted:
            outcomes.append(False)

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(True) == 5
    assert state.budget_spent("grant:g", "p") == 5 * MICRO


def test_budget_periods_follow_china_time() -> None:
    # 2026-11-30 20:00 UTC is already December 1st in China.
    moment = datetime(2026, 11, 30, 20, tzinfo=UTC).timestamp()
    assert budget_period("month", moment, "g") == "2026-12"
    assert budget_period("day", moment, "g") == "2026-12-01"
    assert budget_period("year", moment, "g") == "2026"


# -- obligations and grants ---------------------------------------------------------------------


def test_options_come_from_the_obligations() -> None:
    options = DisclosureOptions.from_obligations(Obligations(
        min_cell_size=10, max_rows=10, noise={"mechanism": "laplace", "epsilon": 0.5,
                                              "bounds": {}},
        disclosure={"difference_k": 15, "rounding": 5, "dataset_epsilon_cap": 20,
                     "budget": {"epsilon": 3, "period": "day"}}))
    assert (options.difference_k, options.rounding, options.budget_epsilon,
            options.budget_period) == (15, 5, 3.0, "day")
    # A policy that says nothing about the difference check: k = the minimum cell size.
    assert DisclosureOptions.from_obligations(Obligations(10, 10)).difference_k == 10


@pytest.mark.parametrize("disclosure", [
    {"difference_k": "10"}, {"rounding": 0}, {"budget": {"epsilon": -1}},
    {"budget": None, "dataset_epsilon_cap": 20},
])
def test_odd_obligations_fail_closed(disclosure: dict[str, Any]) -> None:
    with pytest.raises(PolicyEngineError):
        DisclosureOptions.from_obligations(Obligations(
            10, 10, noise={"mechanism": "laplace", "epsilon": 1, "bounds": {}},
            disclosure=disclosure))


def test_grants_with_noise_need_a_budget_and_bounds_on_granted_measures() -> None:
    base = {"insurer": "ins-a", "purpose": "hmb_pricing", "datasets": ["person_years"],
            "dimensions": ["gend"], "measures": ["psn_part_amt"]}
    now = datetime.now(tz=UTC)
    with pytest.raises(ValidationFailed) as refused:
        validate_grant(GrantRequest.model_validate({
            **base, "noise": {"epsilon": 1, "bounds": {"hifp_pay": [0, 10]}}}), CATALOG, now)
    assert refused.value.details["problems"] == [
        "noise bounds name hifp_pay, which is not a granted measure", "noise needs a budget"]
    validate_grant(GrantRequest.model_validate({
        **base, "noise": {"epsilon": 1, "bounds": {"psn_part_amt": [0, 10]}},
        "budget": {"epsilon": 5}}), CATALOG, now)
