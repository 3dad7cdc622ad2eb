"""``POST /v1/pricing/simulate`` under a grant that asks for noise, a budget or rounding: the
same grant options and policy obligations as aggregates (docs/pricing.md, "Noise, budget and
rounding"). Figures are checked against an independent computation on the DuckDB file."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PRICING_GRANT, Env, LoadedStore, make_env
from tests.http.test_pricing_api import BASIC, URL, _expected

PAYOUT_BOUND = 50_000
EPSILON = 0.1  # per query


def _grant(epsilon: float, budget: float, **more: Any) -> dict[str, Any]:
    return {**PRICING_GRANT,
            "noise": {"mechanism": "laplace", "epsilon": epsilon,
                      "bounds": {"payout": [0, PAYOUT_BOUND]}},
            "budget": {"epsilon": budget, "period": "day"}, **more}


@pytest.fixture
def make(tmp_path: Path, loaded_store: LoadedStore, signing_key_file: Path
         ) -> Iterator[Any]:
    envs: list[Env] = []

    def build(grant: dict[str, Any]) -> Env:
        env = make_env(tmp_path / f"e{len(envs)}", loaded_store.store_dir, signing_key_file,
                       grant=grant)
        env.client.__enter__()
        envs.append(env)
        return env

    yield build
    for env in envs:
        env.client.__exit__(None, None, None)
        env.gateway.audit.close()


def _clipped_truth(loaded_store: LoadedStore, product: dict[str, Any], bound: float,
                   where: str = "WHERE year = 2024") -> tuple[int, float, int, float]:
    """person-years, exposure, claimant person-years and the payout clipped per person-year."""
    _, overall = _expected(loaded_store, [], where, product)
    clipped = [min(p, bound) for _, p in overall.pays]
    return overall.rows, overall.exposure, len(clipped), sum(clipped)


def test_noisy_figures_are_calibrated_around_the_clipped_truth(
    make: Any, loaded_store: LoadedStore
) -> None:
    """Many independent noisy answers, checked against exact figures computed here from the
    raw rows. Discrete Laplace, ε = 0.1 a query shared by 4 series (person-years, exposure,
    claimants, payout; no attachment point under the 50,000 元 clip): person-years have
    scale b = 1 / 0.025 = 40, exposure 100 / 0.025 hundredths = 40 person-years, the payout
    5,000,000 cents / 0.025 = 2,000,000 元; a standard deviation is b√2.

    * Counts and bounded sums: one request by year × age band × sex × 险种 — disjoint cells,
      each noised on its own. Tolerances: mean error within 5 b√2/√n (5 standard errors),
      spread within 4.5 standard errors of b√2 (the sample standard deviation's: see below).
    * The payout: 150 requests for one cell, each product differing only in a cap no payout
      reaches — equal exact figures, but a fresh answer each (stored answers are keyed by
      the product's terms). The payout is often clamped at 0, which a median ignores: as many
      answers above the truth as below (within 4 √n / 2), and the mean excess of those above
      within 40 % of b (about 3.5 standard errors).
    """
    env = make(_grant(EPSILON, 100.0))
    headers = env.headers("insurer")
    dims = ["year", "age_band", "gend", "insutype"]
    response = env.client.post(URL, json={"products": [BASIC], "dimensions": dims,
                                          "attachment_points": [100_000]}, headers=headers)
    assert response.status_code == 200, response.text
    cells, _ = _expected(loaded_store, dims, "", BASIC)
    errors: dict[str, list[float]] = {"person_years": [], "exposure": []}
    for got in response.json()["products"][0]["cells"]:
        if got["person_years"] is None:
            continue  # withheld (primary, secondary or difference)
        want = cells[tuple(got[d] for d in dims)]
        errors["person_years"].append(got["person_years"] - want.rows)
        errors["exposure"].append(got["exposure"] - want.exposure)
    sd = 40 * 2 ** 0.5
    for name, found in errors.items():
        n = len(found)
        assert n >= 60, name
        assert abs(statistics.fmean(found)) < 5 * sd / n ** 0.5, name
        # The standard error of a sample's standard deviation, relative: √((κ - 1) / 4n),
        # κ = 6 for a Laplace; 4.5 of them (n = 60: ±65 %; a wrong scale by 2× still fails).
        # A fixed ±35 % was 2.4 standard errors at n = 60: it failed about one run in 30.
        spread = 4.5 * ((6 - 1) / (4 * n)) ** 0.5
        assert (1 - spread) * sd < statistics.pstdev(found) < (1 + spread) * sd, name

    _, overall = _expected(loaded_store, [], "WHERE year = 2024", BASIC)
    clipped = sum(min(pay, PAYOUT_BOUND) for _, pay in overall.pays)
    payout: list[float] = []
    for i in range(150):
        product = {**BASIC, "cap": 3_000_000 + i}
        response = env.client.post(URL, json={"products": [product], "year": 2024,
                                              "attachment_points": [100_000]}, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["disclosure"]["budget"]["epsilon_charged"] == EPSILON
        got = body["products"][0]["overall"]
        assert got["suppressed"] is None
        payout.append(got["total_payout"] - clipped)
        # ratios come from the noisy bases, never noised on their own
        assert got["pure_premium"] == pytest.approx(got["total_payout"] / got["exposure"],
                                                    rel=1e-6, abs=0.01)
        if got["claimants"]:
            assert got["mean_payout_per_claimant"] == pytest.approx(
                got["total_payout"] / got["claimants"], rel=1e-6, abs=0.01)
    above = [e for e in payout if e > 0]
    assert abs(len(above) - len(payout) / 2) < 4 * len(payout) ** 0.5 / 2
    assert 0.6 * 2_000_000 < statistics.fmean(above) < 1.4 * 2_000_000


def test_budget_charged_once_repeat_free_then_429(make: Any, loaded_store: LoadedStore
                                                   ) -> None:
    env = make(_grant(1.0, 2.0))
    headers = env.headers("insurer")
    body = {"products": [BASIC], "dimensions": ["gend"], "year": 2024}
    first = env.client.post(URL, json=body, headers=headers)
    assert first.status_code == 200, first.text
    got = first.json()
    budget = got["disclosure"]["budget"]
    assert (budget["epsilon_charged"], budget["grant_remaining"]) == (1.0, 1.0)
    noise = got["disclosure"]["noise"]
    assert noise["payout_bounds"] == {"基础版": PAYOUT_BOUND}
    assert noise["exposure_bounds"] == [0, 1]
    assert env.gateway.audit.get(got["audit_id"]).budget_spent == 1.0
    product = got["products"][0]
    # noisy, yet the overall row is the sum of the cells (one stored table; amounts are
    # clamped at 0 each on their own, so compare what is far from 0)
    for name in ("person_years", "exposure"):
        assert product["overall"][name] == pytest.approx(
            sum(c[name] for c in product["cells"]), abs=0.02)
    rows, _, _, payout = _clipped_truth(loaded_store, BASIC, PAYOUT_BOUND)
    assert product["overall"]["total_payout"] != pytest.approx(payout, abs=0.01)
    checks = {c["name"]: c["message"] for c in product["limits"]}
    assert checks["loss_ratio"].endswith("(computed on noisy figures)")
    assert "noisy" not in checks["deductible"]

    # The same question again, and rephrased (another name and premium, the filter as a
    # list): the same stored figures, free.
    again = env.client.post(URL, json=body, headers=headers).json()
    rephrased = env.client.post(URL, json={
        "products": [{**BASIC, "name": "同一产品", "premium": 80}], "dimensions": ["gend"],
        "filters": {"year": ["2024"]}}, headers=headers).json()
    for repeat in (again, rephrased):
        assert repeat["disclosure"]["budget"]["epsilon_charged"] == 0.0
        assert repeat["disclosure"]["budget"]["grant_remaining"] == 1.0
        for a, b in zip(repeat["products"][0]["cells"], product["cells"], strict=True):
            for name in ("person_years", "exposure", "claimants", "total_payout", "tail"):
                assert a[name] == b[name]
    assert again["products"] == got["products"]
    # A sub-total of the stored table (no dimension: the overall row) is free and equal.
    total = env.client.post(URL, json={"products": [BASIC], "year": 2024},
                            headers=headers).json()
    assert total["disclosure"]["budget"]["epsilon_charged"] == 0.0
    assert total["products"][0]["overall"]["total_payout"] == product["overall"]["total_payout"]

    second = env.client.post(URL, json={**body, "year": 2023}, headers=headers).json()
    assert second["disclosure"]["budget"]["grant_remaining"] == 0.0
    size = env.gateway.audit.size()
    refused = env.client.post(URL, json={**body, "year": 2022}, headers=headers)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "budget_exhausted"
    assert error["remaining"] == 0.0
    assert env.gateway.audit.size() == size + 1  # one audit entry for the refusal
    entry = env.gateway.audit.get(int(refused.headers["Audit-Index"]))
    assert (entry.action, entry.status, entry.decision, entry.error_code) == (
        "pricing.simulate", 429, "deny", "budget_exhausted")
    assert "ε 0 remaining, this release needs ε 1" in entry.reasons[0]
    # What was answered before is still answered, free.
    after = env.client.post(URL, json=body, headers=headers).json()
    assert after["products"] == got["products"]
    assert rows > 0


def test_pricing_and_aggregates_share_one_stored_answer(make: Any) -> None:
    """Person-years and exposure are the same bases whichever endpoint asks: one answer."""
    grant = _grant(1.0, 5.0)
    grant["noise"]["bounds"]["exposure"] = [0, 1]
    env = make(grant)
    headers = env.headers("insurer")
    priced = env.client.post(URL, json={"products": [BASIC], "year": 2024},
                             headers=headers).json()["products"][0]["overall"]
    asked = env.client.post("/v1/query/aggregate", json={
        "purpose": "hmb_pricing", "dataset": "person_years",
        "measures": [{"fn": "count"}, {"fn": "sum", "field": "exposure"}],
        "filters": {"year": [2024]}}, headers=headers).json()
    assert asked["rows"][0] == [priced["person_years"], priced["exposure"]]


def test_rounding_without_noise_rounds_released_counts(env: Env, make: Any) -> None:
    rounded = make({**PRICING_GRANT, "rounding": 5})
    body = {"products": [BASIC], "dimensions": ["insutype"], "year": 2024}
    got = rounded.client.post(URL, json=body, headers=rounded.headers("insurer")).json()
    plain = env.client.post(URL, json=body, headers=env.headers("insurer")).json()
    assert got["disclosure"]["rounding"] == 5
    assert got["disclosure"]["noise"] is None
    assert got["disclosure"]["budget"] is None
    for a, b in zip(got["products"][0]["cells"], plain["products"][0]["cells"], strict=True):
        assert a["person_years"] % 5 == 0
        assert a["claimants"] % 5 == 0
        assert abs(a["person_years"] - b["person_years"]) <= 2
        assert abs(a["claimants"] - b["claimants"]) <= 2
        assert a["total_payout"] == b["total_payout"]  # sums are not rounded
        # the frequency is of the rounded count (the exact one would undo the rounding)
        assert a["claim_frequency"] == pytest.approx(a["claimants"] / a["exposure"],
                                                     abs=1e-6)
    assert plain["disclosure"]["noise"] is None
    assert env.gateway.audit.get(plain["audit_id"]).budget_spent is None


def test_a_payout_bound_needs_the_person_years_dataset(env: Env) -> None:
    grant = {**_grant(1.0, 2.0), "insurer": "ins-b", "datasets": ["settlements"]}
    response = env.client.post("/v1/grants", json=grant, headers=env.headers("admin"))
    assert response.status_code == 422
    assert "payout" in str(response.json()["error"])


def test_gaussian_noise_with_rounding(make: Any, loaded_store: LoadedStore) -> None:
    """The grant's other mechanism and rounding: discrete Gaussian (ρ-zCDP from ε, δ), and
    released counts on multiples of 5 after noise."""
    grant = _grant(1.0, 2.0, rounding=5)
    grant["noise"] = {**grant["noise"], "mechanism": "gaussian", "delta": 1e-6}
    env = make(grant)
    response = env.client.post(URL, json={"products": [BASIC], "dimensions": ["gend"],
                                          "year": 2024}, headers=env.headers("insurer"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["disclosure"]["noise"]["mechanism"] == "gaussian"
    assert body["disclosure"]["budget"]["epsilon_charged"] == 1.0
    assert any("rounded to multiples of 5" in n for n in body["notes"])
    product = body["products"][0]
    for cell in [*product["cells"], product["overall"]]:
        assert cell["person_years"] % 5 == 0
        if cell["claimants"] is not None:
            assert cell["claimants"] % 5 == 0
    rows, _, _, payout = _clipped_truth(loaded_store, BASIC, PAYOUT_BOUND)
    assert product["overall"]["total_payout"] != pytest.approx(payout, abs=0.01)
    assert abs(product["overall"]["person_years"] - rows) < 200
