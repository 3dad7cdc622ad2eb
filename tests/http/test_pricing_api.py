"""``POST /v1/pricing/simulate`` over HTTP: products side by side, figures against an independent
computation on the DuckDB file, disclosure control, the 云南 limits, refusals and the audit."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from gateway.api.routes import pricing
from tests.conftest import Env, LoadedStore
from tests.http.test_query_stories import _direct

URL = "/v1/pricing/simulate"
MIN = 10  # PRICING_GRANT's min_cell_size

BASIC: dict[str, Any] = {"name": "基础版", "deductible": 15_000, "ratio_in_list": 0.8,
                         "ratio_out_of_list": 0.5, "cap": 3_000_000, "premium": 99,
                         "tier": "basic"}
UPGRADED: dict[str, Any] = {"name": "升级版", "deductible": 10_000, "ratio_in_list": 0.9,
                            "ratio_out_of_list": 0.6, "cap": 4_000_000,
                            "target_loss_ratio": 0.85, "tier": "upgraded"}
POINTS = (10_000.0, 50_000.0, 100_000.0, 500_000.0)
PAYOUT_FIGURES = ("pure_premium", "mean_payout_per_claimant", "total_payout",
                  "implied_premium", "expected_loss_ratio")


def _post(env: Env, body: dict[str, Any], role: str = "insurer") -> Any:
    app = env.client.app
    assert isinstance(app, FastAPI)
    if not any(isinstance(r, APIRoute) and r.path == URL for r in app.routes):
        app.include_router(pricing.router)  # until gateway/api/app.py registers it
    return env.client.post(URL, json=body, headers=env.headers(role))


# -- an independent computation: raw person_years rows, the benefit rule written out -----------
@dataclass
class Expected:
    persons: set[int] = field(default_factory=set)
    rows: int = 0
    exposure: float = 0.0
    pays: list[tuple[int, float]] = field(default_factory=list)  # (person, payout) with payout > 0

    @property
    def total(self) -> float:
        return sum(p for _, p in self.pays)

    def claimant_persons(self, above: float = 0.0) -> int:
        return len({psn for psn, p in self.pays if p > above})

    def tail_share(self, a: float) -> float:
        return sum(p - a for _, p in self.pays if p > a) / self.total


def _payout(row: dict[str, float], product: dict[str, Any]) -> float:
    in_list = max(0.0, row["inscp_scp_amt"] - row["hifp_pay"] - row["hifmi_pay"])
    out = max(0.0, row["fulamt_ownpay_amt"] + row["overlmt_selfpay"])
    d = float(product["deductible"])
    d_in = min(in_list, d)
    d_out = min(out, d - d_in)
    raw = (product["ratio_in_list"] * (in_list - d_in)
           + product["ratio_out_of_list"] * (out - d_out))
    return float(min(float(product["cap"]), raw))


def _expected(loaded_store: LoadedStore, dims: list[str], where: str,
              product: dict[str, Any]) -> tuple[dict[tuple[Any, ...], Expected], Expected]:
    cols = ", ".join([*dims, "psn_id", "exposure", "inscp_scp_amt", "hifp_pay", "hifmi_pay",
                      "fulamt_ownpay_amt", "overlmt_selfpay"])
    rows = _direct(loaded_store, f"SELECT {cols} FROM person_years {where}")  # noqa: S608
    cells: dict[tuple[Any, ...], Expected] = defaultdict(Expected)
    overall = Expected()
    names = ["exposure", "inscp_scp_amt", "hifp_pay", "hifmi_pay", "fulamt_ownpay_amt",
             "overlmt_selfpay"]
    for row in rows:
        key = tuple(row[: len(dims)])
        psn = int(row[len(dims)])
        values = {n: float(v or 0) for n, v in zip(names, row[len(dims) + 1:], strict=True)}
        pay = _payout(values, product)
        for target in (cells[key], overall):
            target.persons.add(psn)
            target.rows += 1
            target.exposure += values["exposure"]
            if pay > 0:
                target.pays.append((psn, pay))
    return dict(cells), overall


def _dominated(e: Expected) -> bool:
    per: dict[int, float] = defaultdict(float)
    for psn, p in e.pays:
        per[psn] += p
    top = [*sorted(per.values(), reverse=True), 0.0, 0.0]
    total = sum(per.values())
    return top[0] + top[1] > 0.9 * total or total - top[0] - top[1] < 0.1 * top[0]


def _check_cell(got: dict[str, Any], want: Expected, product: dict[str, Any]) -> str:
    """Assert one released or suppressed cell against the direct figures; returns its state."""
    if got["suppressed"] == "secondary":
        # Withheld only to protect another cell: nothing it still shows may be wrong.
        assert all(got[f] is None for f in PAYOUT_FIGURES)
        if got["exposure"] is not None:
            assert got["exposure"] == pytest.approx(want.exposure, abs=0.01)
        return "secondary"
    if len(want.persons) < MIN:
        assert got["suppressed"] == "primary"
        assert got["person_years"] is None
        assert got["exposure"] is None
        assert all(got[f] is None for f in PAYOUT_FIGURES)
        return "primary"
    assert got["person_years"] == want.rows
    assert got["exposure"] == pytest.approx(want.exposure, abs=0.01)
    if want.claimant_persons() < MIN:
        assert got["suppressed"] == "few_claimants"
        assert got["claimants"] is None
        assert all(got[f] is None for f in PAYOUT_FIGURES)
        assert all(t["share"] is None for t in got["tail"])
        return "few_claimants"
    assert got["claimants"] == len(want.pays)
    assert got["claim_frequency"] == pytest.approx(len(want.pays) / want.exposure, abs=1e-6)
    if _dominated(want):
        assert got["suppressed"] in ("dominance", "p_percent")
        assert all(got[f] is None for f in PAYOUT_FIGURES)
        return "dominance"
    assert got["suppressed"] is None
    pure = want.total / want.exposure
    assert got["pure_premium"] == pytest.approx(pure, abs=0.01)
    assert got["total_payout"] == pytest.approx(want.total, abs=0.01)
    assert got["mean_payout_per_claimant"] == pytest.approx(want.total / len(want.pays),
                                                            abs=0.01)
    if product.get("premium"):
        assert got["expected_loss_ratio"] == pytest.approx(pure / product["premium"], abs=1e-6)
        assert got["implied_premium"] is None
    else:
        assert got["implied_premium"] == pytest.approx(pure / product["target_loss_ratio"],
                                                       abs=0.01)
    assert [t["attachment"] for t in got["tail"]] == list(POINTS)
    for t in got["tail"]:
        if want.claimant_persons(t["attachment"]) < MIN:
            assert t["share"] is None  # would come close to one person's payout
        else:
            assert t["share"] == pytest.approx(want.tail_share(t["attachment"]), abs=1e-6)
    return "released"


# -- the stories ----------------------------------------------------------------------------
def test_basic_and_upgraded_side_by_side_match_duckdb(env: Env, loaded_store: LoadedStore
                                                      ) -> None:
    response = _post(env, {"products": [BASIC, UPGRADED], "dimensions": ["insutype"],
                           "year": 2024})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["name"] for p in body["products"]] == ["基础版", "升级版"]
    assert body["min_cell_size"] == MIN
    assert body["data_version"]
    assert response.headers["Audit-Index"] == str(body["audit_id"])
    pure: dict[str, list[float]] = {}
    for product, got in zip((BASIC, UPGRADED), body["products"], strict=True):
        cells, overall = _expected(loaded_store, ["insutype"], "WHERE year = 2024", product)
        assert [c["insutype"] for c in got["cells"]] == sorted(k[0] for k in cells)
        states = [_check_cell(c, cells[(c["insutype"],)], product) for c in got["cells"]]
        assert states == ["released", "released"]
        assert _check_cell(got["overall"], overall, product) == "released"
        pure[got["name"]] = [c["pure_premium"] for c in got["cells"]]
    # A lower deductible and higher ratios pay more in every cell.
    assert all(u > b for b, u in zip(pure["基础版"], pure["升级版"], strict=True))
    basic, upgraded = body["products"]
    assert upgraded["overall"]["claimants"] > basic["overall"]["claimants"]


def test_small_and_few_claimant_cells_are_suppressed(env: Env, loaded_store: LoadedStore
                                                     ) -> None:
    dims = ["insu_admdvs", "age_band"]
    response = _post(env, {"products": [BASIC], "dimensions": dims,
                           "filters": {"year": [2024]}})
    assert response.status_code == 200, response.text
    (got,) = response.json()["products"]
    cells, overall = _expected(loaded_store, dims, "WHERE year = 2024", BASIC)
    assert len(got["cells"]) == len(cells)
    states = [_check_cell(c, cells[(c["insu_admdvs"], c["age_band"])], BASIC)
              for c in got["cells"]]
    assert "primary" in states
    assert "few_claimants" in states
    assert _check_cell(got["overall"], overall, BASIC) == "released"
    entry = env.gateway.audit.get(response.json()["audit_id"])
    assert entry.cells_suppressed == sum(s != "released" for s in states)
    assert entry.cells_released == states.count("released")


def test_no_released_figure_reveals_one_persons_payout(env: Env, loaded_store: LoadedStore
                                                       ) -> None:
    """With one claimant above 10万, share × total + 10万 would be their payout: withheld."""
    response = _post(env, {"products": [UPGRADED], "year": 2024})
    assert response.status_code == 200, response.text
    (got,) = response.json()["products"]
    _, overall = _expected(loaded_store, [], "WHERE year = 2024", UPGRADED)
    assert _check_cell(got["overall"], overall, UPGRADED) == "released"
    assert got["cells"] == [{**got["overall"]}]  # no dimensions: the one cell is the total
    for t in got["overall"]["tail"]:
        assert (t["share"] is None) == (overall.claimant_persons(t["attachment"]) < MIN)
    assert any(t["share"] is None for t in got["overall"]["tail"])


def _limit(product_json: dict[str, Any], name: str) -> dict[str, Any]:
    (check,) = [c for c in product_json["limits"] if c["name"] == name]
    assert isinstance(check, dict)
    return check


def test_limit_checks_pass_and_fail_with_their_figures(env: Env) -> None:
    high_deductible = {**BASIC, "name": "高免赔", "deductible": 20_000}
    response = _post(env, {"products": [BASIC, high_deductible, UPGRADED], "year": 2024})
    assert response.status_code == 200, response.text
    basic, high, upgraded = response.json()["products"]
    assert _limit(basic, "deductible")["passed"] is True
    assert _limit(high, "deductible") == {
        "name": "deductible", "passed": False, "figure": 20_000.0, "limit": 15_000.0,
        "binding": True, "message": "起付线 20,000.00 元 exceeds the limit ≤ 15,000.00 元"}
    assert high["limits_passed"] is False
    # The loss ratio is checked with the overall expected loss ratio.
    loss = _limit(basic, "loss_ratio")
    assert loss["figure"] == basic["overall"]["expected_loss_ratio"]
    assert loss["passed"] is (loss["figure"] >= 0.7)
    assert basic["limits_passed"] is loss["passed"]
    # Priced by target: the implied premium is what is checked against 200 元 (升级保障).
    premium = _limit(upgraded, "premium")
    assert premium["figure"] == upgraded["overall"]["implied_premium"]
    assert premium["limit"] == 200.0
    assert premium["passed"] is (premium["figure"] <= 200.0)
    assert _limit(upgraded, "loss_ratio")["figure"] == 0.85


def test_dimension_outside_the_grant_is_refused_and_audited(env: Env) -> None:
    response = _post(env, {"products": [BASIC], "dimensions": ["dise_codg"]})
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "policy_denied"
    assert any("dise_codg" in r for r in error["reasons"]), error["reasons"]
    entry = env.gateway.audit.get(int(response.headers["Audit-Index"]))
    assert (entry.action, entry.decision, entry.status) == ("pricing.simulate", "deny", 403)
    assert "dise_codg" in entry.fields


def test_insurer_without_a_grant_is_refused(env: Env) -> None:
    response = _post(env, {"products": [BASIC]}, role="insurer_b")
    assert response.status_code == 403, response.text
    assert response.json()["error"]["reasons"]
    assert "products" not in response.json()


@pytest.mark.parametrize(
    "change",
    [
        {"products": [{**BASIC, "ratio_in_list": 1.5}]},
        {"products": []},
        {"products": [BASIC, BASIC]},
        {"products": [{**BASIC, "special_drug_cap": 100_000}]},
        {"products": [BASIC], "year": 2024, "filters": {"year": [2024]}},
        {"products": [BASIC], "attachment_points": [-1]},
        {"products": [BASIC], "unknown": 1},
    ],
    ids=["ratio-1.5", "no-product", "same-name", "drug-cap-without-ratio", "year-twice",
         "negative-attachment", "unknown-member"],
)
def test_malformed_requests_are_refused(env: Env, change: dict[str, Any]) -> None:
    response = _post(env, change)
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["code"] in ("bad_request", "validation_failed")


def test_one_audit_entry_records_the_call(env: Env) -> None:
    body = {"products": [BASIC, UPGRADED], "dimensions": ["gend"], "year": 2024}
    before = env.gateway.audit.size()
    response = _post(env, body)
    assert response.status_code == 200, response.text
    result = response.json()
    entry = env.gateway.audit.get(result["audit_id"])
    assert env.gateway.audit.size() == before + 2  # the token call, then this one
    assert (entry.action, entry.decision, entry.status) == ("pricing.simulate", "allow", 200)
    assert entry.actor == "t-insurer"
    assert entry.purpose == "hmb_pricing"
    assert entry.grant_id == env.grant_id
    assert entry.request is not None
    assert entry.request["dimensions"] == ["gend"]
    assert entry.request["products"][0]["name"] == "基础版"
    assert set(entry.fields) == {"gend", "year", "exposure", "inscp_scp_amt", "hifp_pay",
                                 "hifmi_pay", "fulamt_ownpay_amt", "overlmt_selfpay"}
    assert entry.field_justifications["hifp_pay"]
    assert entry.cells_released + entry.cells_suppressed == 4  # 2 products × 2 sexes
    assert entry.data_version == result["data_version"]
    without_id = {k: v for k, v in result.items() if k != "audit_id"}
    digest = "sha256:" + hashlib.sha256(orjson.dumps(without_id)).hexdigest()
    assert entry.response_hash == digest


def test_special_drug_cover_is_noted_not_priced(env: Env) -> None:
    drug = {**BASIC, "special_drug_cap": 1_000_000, "special_drug_ratio": 0.6}
    response = _post(env, {"products": [BASIC, {**drug, "name": "含特药"}], "year": 2024})
    assert response.status_code == 200, response.text
    body = response.json()
    assert any("特药" in n for n in body["notes"])
    plain, with_drug = body["products"]
    assert plain["overall"]["pure_premium"] == with_drug["overall"]["pure_premium"]


def test_a_withheld_payout_is_not_the_overall_minus_the_released_cells(env: Env) -> None:
    body = _post(env, {"products": [BASIC], "dimensions": ["age_band"], "year": 2024}).json()
    cells = body["products"][0]["cells"]
    withheld = [c for c in cells if c["total_payout"] is None]
    # One line (all age bands) with a known total: never exactly one withheld payout.
    assert len(withheld) != 1


# -- the difference check across requests, as for aggregates ----------------------------------


def test_a_pricing_tracker_one_small_group_apart_is_refused(env: Env,
                                                            loaded_store: LoadedStore) -> None:
    # Two overall figures whose persons differ by one small age band of one county and year:
    # the second answer minus the first would be that band's payout.
    small = sorted((n, county, band) for county, band, n in _direct(loaded_store, """
        SELECT insu_admdvs, age_band, COUNT(DISTINCT psn_id) FROM person_years
        WHERE year = 2024 GROUP BY insu_admdvs, age_band""") if 1 <= n < MIN)
    found = [(county, band, n) for n, county, band in small[:1]]
    assert found, "the test city has a small age band in some county"
    county, band, n = found[0]
    bands = sorted({b for c, b in _direct(loaded_store, """
        SELECT DISTINCT insu_admdvs, age_band FROM person_years WHERE year = 2024""")
                    if c == county})
    low = {**BASIC, "name": "低起付线", "deductible": 500}  # many claimants: figures released
    wide = {"products": [low], "filters": {"year": [2024], "insu_admdvs": [county]}}
    narrow = {"products": [low], "filters": {
        "year": [2024], "insu_admdvs": [county], "age_band": [b for b in bands if b != band]}}

    first = _post(env, wide)
    assert first.status_code == 200
    assert first.json()["products"][0]["overall"]["person_years"] is not None
    second = _post(env, narrow)
    assert second.status_code == 200
    overall = second.json()["products"][0]["overall"]
    # What the attacker learned: nothing of the small band (n persons) — no second total.
    assert overall["suppressed"] == "difference", (n, overall)
    assert overall["total_payout"] is None
    assert overall["person_years"] is None
    # Asking again gives the same answer (the check is deterministic).
    again = _post(env, narrow)
    assert again.json()["products"][0]["overall"]["suppressed"] == "difference"
