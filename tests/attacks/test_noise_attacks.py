"""Attacks on noisy answers: averaging repeats (aggregates and pricing), rephrasing, and a
Dinur–Nissim linear system.

The grant (``NOISY_GRANT``) asks for discrete Laplace noise, ε = 1 per query, a budget of 5 ε
a month, and bounds each person-year's ``psn_part_amt`` at 20,000 元: the planted 654,321 元
claim can move any answer by at most 20,000 元 plus noise.
"""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from tests.attacks.conftest import NOISY_GRANT, PLANTED_CLAIM, YEAR, Target, learned
from tests.conftest import Env, make_env
from tests.http.test_pricing_api import _payout

Q: dict[str, Any] = {"purpose": "hmb_pricing", "dataset": "person_years",
                     "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "psn_part_amt"}]}
AGES = ["0-17", "18-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+"]


def post(env: Env, headers: dict[str, str], body: dict[str, Any]) -> Any:
    return env.client.post("/v1/query/aggregate", json=body, headers=headers)


def test_averaging_200_repeats_gains_nothing(noisy_env: Env, target: Target) -> None:
    headers = noisy_env.headers("insurer")
    body = {**Q, "filters": {"year": [YEAR], "insu_admdvs": [target.county, target.big_county]}}
    answers, charged, remaining = [], [], []
    for _ in range(200):
        response = post(noisy_env, headers, body)
        assert response.status_code == 200, response.text
        got = response.json()
        answers.append(Decimal(str(got["rows"][0][1])))
        charged.append(got["disclosure"]["budget"]["epsilon_charged"])
        remaining.append(got["disclosure"]["budget"]["grant_remaining"])
    average = sum(answers, Decimal(0)) / len(answers)
    ((exact,),) = target.truth(
        "SELECT sum(psn_part_amt) FROM person_years WHERE year = ? AND insu_admdvs IN (?, ?)",
        [YEAR, target.county, target.big_county])
    learned("averaging 200 repeats of a noisy query", value=average, planted=Decimal(exact),
            outcome="200 identical stored answers; ε charged once")
    assert len(set(answers)) == 1  # one stored answer: nothing to average
    assert charged[0] == 1.0
    assert set(charged[1:]) == {0.0}
    assert set(remaining) == {4.0}
    # The planted claim is clamped at 20,000 元 per person-year before noise: the answer
    # cannot carry it (the unclamped total is 634,321 元 above what any answer can show).
    assert abs(average - Decimal(exact)) > 100_000


def test_rephrasing_does_not_dodge_the_answer_store(noisy_env: Env, target: Target) -> None:
    headers = noisy_env.headers("insurer")
    counties = [target.county, target.big_county]
    first = post(noisy_env, headers, {**Q, "filters": {"year": [YEAR],
                                                        "insu_admdvs": counties}}).json()
    # The same persons, spelt differently: every age band and sex listed, counties reversed,
    # measures reordered and relabelled; and once more as SQL.
    rephrased = post(noisy_env, headers, {
        **Q, "measures": [{"fn": "sum", "field": "psn_part_amt", "label": "burden"},
                          {"fn": "count_persons", "label": "persons"}],
        "filters": {"year": [YEAR], "insu_admdvs": counties[::-1], "age_band": AGES,
                    "gend": ["2", "1"]}}).json()
    # The attacker's SQL, sent to the gateway (which parses it; never run as written).
    sql = ("SELECT SUM(psn_part_amt) AS b, count_persons() AS n FROM person_years "  # noqa: S608
           f"WHERE gend IN ('1', '2') AND insu_admdvs IN ('{counties[1]}', '{counties[0]}') "
           "AND year = 2024")
    as_sql = noisy_env.client.post("/v1/query/sql", json={"purpose": "hmb_pricing", "sql": sql},
                                   headers=headers).json()
    got = {(first["rows"][0][1], first["rows"][0][0]),
           (rephrased["rows"][0][0], rephrased["rows"][0][1]),
           (as_sql["rows"][0][0], as_sql["rows"][0][1])}
    learned("rephrasing to dodge the answer store", value=sorted(got), planted=target.part_2024,
            outcome="the same stored answer for every phrasing; ε charged once")
    assert len(got) == 1
    assert first["disclosure"]["budget"]["epsilon_charged"] == 1.0
    assert rephrased["disclosure"]["budget"]["epsilon_charged"] == 0.0
    assert as_sql["disclosure"]["budget"]["epsilon_charged"] == 0.0


def test_dinur_nissim_linear_system_is_starved_by_the_budget(
    noisy_env: Env, target: Target
) -> None:
    # Unknowns: the 2024 burden of every (county, age band, sex) atom — a few hundred persons'
    # worth of small cells; the target is alone in theirs or nearly so.
    atoms = [(c, a, g) for c in target.counties for a in AGES for g in ("1", "2")]
    index = {atom: i for i, atom in enumerate(atoms)}
    rng = random.Random(5)  # the attacker's choice of queries, not noise
    headers = noisy_env.headers("insurer")
    rows: list[list[float]] = []
    answers: list[float] = []
    refused = None
    for _ in range(400):
        counties = sorted(c for c in target.counties if rng.random() < 0.5) or [target.county]
        ages = sorted(a for a in AGES if rng.random() < 0.5) or [target.age_band]
        sexes = sorted(g for g in ("1", "2") if rng.random() < 0.5) or [target.gend]
        response = post(noisy_env, headers, {**Q, "filters": {
            "year": [YEAR], "insu_admdvs": counties, "age_band": ages, "gend": sexes}})
        if response.status_code == 429:
            refused = response.json()["error"]
            break
        assert response.status_code == 200, response.text
        released = response.json()["rows"][0][1]
        if released is None:
            continue
        row = [0.0] * len(atoms)
        for atom in ((c, a, g) for c in counties for a in ages for g in sexes):
            row[index[atom]] = 1.0
        rows.append(row)
        answers.append(float(released))
    assert refused is not None
    assert refused["code"] == "budget_exhausted"
    assert refused["remaining"] < 1.0  # what is left cannot pay for one more query
    a = np.array(rows)
    solution, *_ = np.linalg.lstsq(a, np.array(answers), rcond=None)
    t = index[(target.county, target.age_band, target.gend)]
    estimate = Decimal(str(round(float(solution[t]), 2)))
    unit = np.zeros(len(atoms))
    unit[t] = 1.0
    determined = np.linalg.matrix_rank(np.vstack([a, unit])) == np.linalg.matrix_rank(a)
    learned("Dinur–Nissim linear system (400 random subset queries planned)", value=estimate,
            planted=target.part_2024,
            outcome=f"{len(answers)} noisy answers before 429; target's unknown not determined")
    assert len(answers) <= 5
    assert not determined
    assert abs(estimate - target.part_2024) > 100_000


def test_averaging_200_noisy_pricing_repeats_gains_nothing(
    tmp_path: Path, target: Target, signing_key_file: Path
) -> None:
    """The pricing endpoint under noise: the attacker prices a product over the target's
    county (and the largest, so the cell is not small) 200 times and averages the total
    payout, then — knowing every other person's payout exactly, the strongest case —
    subtracts theirs. The grant clips each person-year's payout at 20,000 元 and spends ε = 5
    a query (payout scale 20,000 元 / (5 / 5 series) = 20,000 元)."""
    grant = {**NOISY_GRANT,
             "noise": {**NOISY_GRANT["noise"], "epsilon": 5.0,
                       "bounds": {**NOISY_GRANT["noise"]["bounds"], "payout": [0, 20_000]}},
             "budget": {"epsilon": 10.0, "period": "month"}}
    product = {"name": "零免赔", "deductible": 0, "ratio_in_list": 0.8,
               "ratio_out_of_list": 0.5, "cap": 3_000_000, "premium": 99}
    env = make_env(tmp_path, target.store_dir, signing_key_file, grant=grant)
    with env.client:
        headers = env.headers("insurer")
        body = {"products": [product], "filters": {
            "year": [str(YEAR)], "insu_admdvs": [target.county, target.big_county]}}
        answers, charged = [], []
        for _ in range(200):
            response = env.client.post("/v1/pricing/simulate", json=body, headers=headers)
            assert response.status_code == 200, response.text
            got = response.json()
            overall = got["products"][0]["overall"]
            assert overall["suppressed"] is None, overall
            answers.append(Decimal(str(overall["total_payout"])))
            charged.append(got["disclosure"]["budget"]["epsilon_charged"])
    env.gateway.audit.close()
    ((psn_id,),) = target.truth("SELECT psn_id FROM settlements WHERE year = ? AND "
                                "psn_part_amt = ?", [YEAR, PLANTED_CLAIM])
    rows = target.truth(
        "SELECT psn_id, inscp_scp_amt, hifp_pay, hifmi_pay, fulamt_ownpay_amt, overlmt_selfpay "
        "FROM person_years WHERE year = ? AND insu_admdvs IN (?, ?)",
        [YEAR, target.county, target.big_county])
    names = ("inscp_scp_amt", "hifp_pay", "hifmi_pay", "fulamt_ownpay_amt", "overlmt_selfpay")
    planted = Decimal(0)
    others = Decimal(0)
    for row in rows:
        pay = Decimal(str(round(_payout(
            {n: float(v or 0) for n, v in zip(names, row[1:], strict=True)}, product), 2)))
        if row[0] == psn_id:
            planted += pay
        else:
            others += min(pay, Decimal(20_000))
    average = sum(answers, Decimal(0)) / len(answers)
    estimate = average - others
    learned("averaging 200 repeats of a noisy pricing query", value=round(estimate, 2),
            planted=planted, outcome="200 identical stored answers; ε charged once; the "
            "target's payout clipped at 20,000 元 before noise")
    assert len(set(answers)) == 1  # one stored answer: nothing to average
    assert charged[0] == 5.0
    assert set(charged[1:]) == {0.0}
    assert planted > 250_000  # the planted 全自费 makes the target's payout recognisable
    assert abs(estimate - planted) > 100_000
