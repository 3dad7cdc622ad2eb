"""The benefit rule in SQL (gateway.pricing.sql) against the numpy core it mirrors.

Both forms run on the same amounts: payouts must be equal to the last bit (same operations on
doubles, in the same order), and every figure of the pricing statement — per cell and overall,
with one row per person or several — must equal what the numpy core and a literal per-person
computation give on the rows of each cell.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import duckdb
import numpy as np
import pytest
from sqlglot import exp

from gateway.catalog import default_catalog
from gateway.pricing import Product, insured_selfpay, payouts, summarize
from gateway.pricing.sql import (
    in_list_selfpay_sql,
    one_row_per_person,
    out_of_list_sql,
    payout_sql,
    pricing_statement,
)
from tests.conftest import LoadedStore
from tests.http.test_query_stories import _direct

DATASET = default_catalog().datasets["person_years"]
POINTS = (1_000.0, 20_000.0, 100_000.0)
PRODUCTS = [
    Product(name="a", deductible=15_000, ratio_in_list=0.8, ratio_out_of_list=0.5,
            cap=3_000_000, premium=99),
    Product(name="b", deductible=0, ratio_in_list=0.37, ratio_out_of_list=1.0, cap=25_000,
            target_loss_ratio=0.85),
    Product(name="c", deductible=20_000.5, ratio_in_list=1.0, ratio_out_of_list=0.0,
            cap=2_000_000),
]


def _amounts(seed: int, n: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    in_list = np.round(rng.exponential(8_000, n) * (rng.random(n) < 0.6), 2)
    out = np.round(rng.exponential(5_000, n) * (rng.random(n) < 0.4), 2)
    # boundaries: exactly the deductible, a cent either side, negatives (net refunds), caps
    edges = np.array([15_000, 14_999.99, 15_000.01, -50.0, 0.0, 4_000_000, 20_000.5, 10_000])
    return np.concatenate([in_list, edges, edges[::-1]]), np.concatenate([out, edges, edges])


@pytest.mark.parametrize("seed", [1, 2])
def test_payout_sql_equals_the_numpy_rule_to_the_bit(seed: int) -> None:
    in_list, out = _amounts(seed, 2_000)
    con = duckdb.connect()
    con.execute("CREATE TABLE t (i DOUBLE, o DOUBLE)")
    con.executemany("INSERT INTO t VALUES (?, ?)", list(zip(in_list.tolist(), out.tolist(),
                                                            strict=True)))
    for product in PRODUCTS:
        sql = exp.select(payout_sql(exp.column("i"), exp.column("o"), product)).from_("t")
        got = np.array([r[0] for r in con.execute(sql.sql("duckdb")).fetchall()])
        assert np.array_equal(got, payouts(in_list, out, product)), product.name


def test_self_pay_in_sql_equals_the_numpy_rule() -> None:
    rows = [(30_000.0, 18_000.0, 2_000.0, 5_000.0, 1_000.0), (100.0, 300.0, 0.0, -10.0, 0.0),
            (None, None, None, None, None), (1_234.56, 234.55, 0.01, 0.01, 99.99)]
    con = duckdb.connect()
    con.execute("CREATE TABLE t (inscp_scp_amt DECIMAL(18,2), hifp_pay DECIMAL(18,2), "
                "hifmi_pay DECIMAL(18,2), fulamt_ownpay_amt DECIMAL(18,2), "
                "overlmt_selfpay DECIMAL(18,2))")
    con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", rows)
    sql = exp.select(in_list_selfpay_sql(), out_of_list_sql()).from_("t").sql("duckdb")
    got = np.array(con.execute(sql).fetchall(), dtype=float)
    columns = [np.array([0.0 if r[k] is None else r[k] for r in rows]) for k in range(5)]
    in_list, out = insured_selfpay(*columns)
    assert got[:, 0] == pytest.approx(in_list, abs=1e-9)
    assert got[:, 1] == pytest.approx(out, abs=1e-9)


def _person_years(seed: int) -> tuple[duckdb.DuckDBPyConnection, list[dict[str, Any]]]:
    """40 persons over 3 years; the age band changes for some between years."""
    rnd = random.Random(seed)
    rows = []
    for person in range(40):
        gend = "12"[person % 2]
        for year in (2022, 2023, 2024):
            if rnd.random() < 0.15:
                continue  # not enrolled that year
            big = rnd.random() < 0.1
            rows.append({
                "psn_id": 1_000 + person, "year": year, "gend": gend,
                "age_band": rnd.choice(["60-69", "70-79"]),
                "exposure": rnd.choice([1.0, 0.5, 0.25]),
                "inscp_scp_amt": round(rnd.uniform(0, 300_000 if big else 40_000), 2),
                "hifp_pay": round(rnd.uniform(0, 10_000), 2),
                "hifmi_pay": round(rnd.uniform(0, 2_000), 2),
                "fulamt_ownpay_amt": round(rnd.uniform(0, 30_000), 2),
                "overlmt_selfpay": round(rnd.uniform(0, 3_000), 2),
            })
    con = duckdb.connect()
    con.execute("CREATE TABLE person_years (psn_id BIGINT, year BIGINT, gend VARCHAR, "
                "age_band VARCHAR, exposure DOUBLE, inscp_scp_amt DECIMAL(18,2), "
                "hifp_pay DECIMAL(18,2), hifmi_pay DECIMAL(18,2), "
                "fulamt_ownpay_amt DECIMAL(18,2), overlmt_selfpay DECIMAL(18,2))")
    names = list(rows[0])
    con.executemany("INSERT INTO person_years VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[r[n] for n in names] for r in rows])
    return con, rows


def _expected(rows: list[dict[str, Any]], product: Product) -> dict[str, Any]:
    """The figures of one cell from its person-year rows, by the numpy core and by hand."""
    columns = {n: np.array([float(r[n]) for r in rows]) for n in
               ("exposure", "inscp_scp_amt", "hifp_pay", "hifmi_pay", "fulamt_ownpay_amt",
                "overlmt_selfpay")}
    in_list, out = insured_selfpay(columns["inscp_scp_amt"], columns["hifp_pay"],
                                   columns["hifmi_pay"], columns["fulamt_ownpay_amt"],
                                   columns["overlmt_selfpay"])
    pay = payouts(in_list, out, product)
    summary = summarize(columns["exposure"], pay, POINTS)
    per_person: dict[int, float] = defaultdict(float)
    largest: dict[int, float] = defaultdict(float)
    for r, p in zip(rows, pay, strict=True):
        per_person[r["psn_id"]] += p
        largest[r["psn_id"]] = max(largest[r["psn_id"]], p)
    tops = [*sorted(per_person.values(), reverse=True), 0.0, 0.0]
    return {
        "persons": len(per_person), "person_years": summary.person_years,
        "exposure": summary.exposure, "claimants": summary.claimants,
        "claimant_persons": sum(v > 0 for v in per_person.values()),
        "total": summary.total_payout, "top1": tops[0], "top2": tops[1],
        "tails": [(t.share or 0.0) * summary.total_payout for t in summary.tail],
        "above": [t.claimants_above for t in summary.tail],
        "above_persons": [sum(v > a for v in largest.values()) for a in POINTS],
    }


@pytest.mark.parametrize(("dims", "filters"), [
    (["gend"], {"year": ["2024"]}),            # one row per person: no per-person stage
    (["age_band"], {}),                        # a person in several cells and years
    (["gend", "year"], {}),
    ([], {"gend": ["2"]}),
])
def test_statement_figures_equal_the_numpy_core_per_cell_and_overall(
    dims: list[str], filters: dict[str, list[str]]
) -> None:
    con, rows = _person_years(7)
    tree, _ = pricing_statement(DATASET, dims, filters, PRODUCTS, POINTS)
    result = con.sql(tree.sql("duckdb")).to_arrow_table().to_pylist()
    kept = [r for r in rows if all(str(r[k]) in v for k, v in filters.items())]
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in kept:
        cells[tuple(r[d] for d in dims)].append(r)
    assert result[-1]["_all_cells"] == 1
    got_cells = result[:-1] if dims else []
    if dims:  # every cell once, in dimension order, before the overall row
        assert [tuple(g[d] for d in dims) for g in got_cells] == sorted(cells)
    for got, members in [*[(g, cells[tuple(g[d] for d in dims)]) for g in got_cells],
                         (result[-1], kept)]:
        for j, product in enumerate(PRODUCTS):
            want = _expected(members, product)
            assert got["persons"] == want["persons"]
            assert got["person_years"] == want["person_years"]
            assert got["exposure"] == pytest.approx(want["exposure"])
            assert got[f"claimants_{j}"] == want["claimants"]
            assert got[f"claimant_persons_{j}"] == want["claimant_persons"]
            assert got[f"total_{j}"] == pytest.approx(want["total"], abs=1e-6)
            assert got[f"top1_{j}"] == pytest.approx(want["top1"], abs=1e-6)
            assert got[f"top2_{j}"] == pytest.approx(want["top2"], abs=1e-6)
            for i in range(len(POINTS)):
                assert got[f"tail_{j}_{i}"] == pytest.approx(want["tails"][i], abs=1e-6)
                assert got[f"above_{j}_{i}"] == want["above"][i]
                assert got[f"above_persons_{j}_{i}"] == want["above_persons"][i]


def test_one_year_means_one_row_per_person_in_the_loaded_store(
    loaded_store: LoadedStore
) -> None:
    # The statement skips the per-person stage when one year is selected; that rests on
    # person_years holding one row per person and year.
    assert one_row_per_person({"year": ["2024"]})
    assert not one_row_per_person({"year": ["2023", "2024"]})
    ((rows, keys),) = _direct(loaded_store, "SELECT count(*), count(DISTINCT (psn_id, year)) "
                                            "FROM person_years")
    assert rows == keys
