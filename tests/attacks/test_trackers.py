"""Trackers and differencing: two large answers that differ by the planted person.

Without the difference check each pair below gives the target's 2024 personal burden (or the
sum of two persons' in the smallest county) exactly by subtraction; with it, whichever cell
comes second is suppressed with reason ``difference``, so the attacker learns nothing.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tests.attacks.conftest import PLANTED_CLAIM, YEAR, Target, grant_insurer_b, learned
from tests.conftest import Env

Q: dict[str, Any] = {"purpose": "hmb_pricing", "dataset": "settlements",
                     "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "psn_part_amt"}]}


def total(env: Env, filters: dict[str, Any], role: str = "insurer") -> dict[str, Any]:
    response = env.aggregate(role, {**Q, "filters": {"year": [YEAR], **filters}})
    assert response.status_code == 200, response.text
    return dict(response.json())


def value(body: dict[str, Any]) -> Decimal | None:
    """The released sum of a no-dimension answer (None when suppressed)."""
    sum_ = body["rows"][0][1]
    return None if sum_ is None else Decimal(str(sum_))


def difference(first: dict[str, Any], second: dict[str, Any]) -> Decimal | None:
    a, b = value(first), value(second)
    return None if a is None or b is None else abs(a - b)


def target_persons_part(target: Target) -> Decimal:
    """Everything the subtraction could reveal: the 2024 burden of the target's county."""
    ((part,),) = target.truth(
        "SELECT sum(psn_part_amt) FROM settlements WHERE year = ? AND insu_admdvs = ?",
        [YEAR, target.county])
    return Decimal(part)


def test_the_planted_county_is_a_real_tracker_target(target: Target) -> None:
    # Guard for the tests below: one filter value apart is 1 … k−1 persons (k = 10), so a
    # plain threshold interface would hand out their burden by subtraction.
    ((persons,),) = target.truth(
        "SELECT count(DISTINCT psn_id) FROM settlements WHERE year = ? AND insu_admdvs = ?",
        [YEAR, target.county])
    assert 1 <= persons <= 9
    assert target.part_2024 >= PLANTED_CLAIM


def test_tracker_with_or_is_refused_and_its_in_list_form_is_caught(
    attack_env: Env, target: Target
) -> None:
    # The tracker: SUM(… WHERE <target> OR region = R03) − SUM(… WHERE region = R03).
    sql = ("SELECT count_persons(), SUM(psn_part_amt) FROM settlements WHERE year = 2024 AND "  # noqa: S608
           f"(insu_admdvs = '{target.county}' OR insu_admdvs = '{target.big_county}')")
    response = attack_env.client.post("/v1/query/sql", json={"purpose": "hmb_pricing",
                                                             "sql": sql},
                                      headers=attack_env.headers("insurer"))
    assert response.status_code == 400
    assert "OR" in response.json()["error"]["message"]
    # The same question as an IN list, then the tracker's second half.
    with_target = total(attack_env, {"insu_admdvs": [target.big_county, target.county]})
    without = total(attack_env, {"insu_admdvs": [target.big_county]})
    assert value(with_target) is not None  # the first, large answer is released
    got = difference(with_target, without)
    learned("tracker (OR refused; IN-list form)", value=got, planted=target_persons_part(target),
            outcome="second answer suppressed: difference")
    assert got is None
    assert without["suppressed"][0]["reason"] == "difference"
    assert "release rel-" in without["suppressed"][0]["detail"]
    assert str(PLANTED_CLAIM.normalize()) not in str(without)


def test_tracker_with_complementary_in_lists_is_caught(attack_env: Env, target: Target) -> None:
    # Every county but the target's, then no county filter at all: large, and one county apart.
    others = [c for c in target.counties if c != target.county]
    everyone = total(attack_env, {})
    complement = total(attack_env, {"insu_admdvs": others})
    assert value(everyone) is not None
    got = difference(everyone, complement)
    learned("tracker (complementary IN lists)", value=got, planted=target_persons_part(target),
            outcome="second answer suppressed: difference")
    assert got is None
    assert complement["suppressed"][0]["reason"] == "difference"


@pytest.mark.parametrize("order", ["with first", "without first"])
def test_differencing_with_and_without_one_filter_value(
    attack_env: Env, target: Target, order: str
) -> None:
    ages = ["60-69", "70-79", "80+", target.age_band]
    with_value = {"insu_admdvs": [target.big_county, target.county], "age_band": ages}
    without_value = {"insu_admdvs": [target.big_county], "age_band": ages}
    asks = [with_value, without_value] if order == "with first" else [without_value, with_value]
    first, second = (total(attack_env, f) for f in asks)
    got = difference(first, second)
    learned(f"differencing, one filter value ({order})", value=got,
            planted=target_persons_part(target), outcome="second answer suppressed: difference")
    assert got is None
    assert value(first) is not None
    assert second["suppressed"][0]["reason"] == "difference"
    # Deterministic: the same question again gets the same refusal, and the first answer
    # asked again is still released unchanged.
    assert total(attack_env, asks[1])["suppressed"] == second["suppressed"]
    assert total(attack_env, asks[0])["rows"] == first["rows"]


def test_differencing_through_a_grouped_answer(attack_env: Env, target: Target) -> None:
    # The county cell of a grouped answer versus a one-county-smaller total.
    grouped = attack_env.aggregate("insurer", {
        **Q, "dimensions": ["gend"],
        "filters": {"year": [YEAR], "insu_admdvs": [target.big_county, target.county]}})
    assert grouped.status_code == 200
    smaller = attack_env.aggregate("insurer", {
        **Q, "dimensions": ["gend"],
        "filters": {"year": [YEAR], "insu_admdvs": [target.big_county]}}).json()
    cell = next(r for r in smaller["rows"] if r[0] == target.gend)
    mine = next(r for r in grouped.json()["rows"] if r[0] == target.gend)
    got = None if cell[2] is None or mine[2] is None else abs(
        Decimal(str(mine[2])) - Decimal(str(cell[2])))
    learned("differencing, grouped cells", value=got, planted=target.part_2024,
            outcome="target's sex cell suppressed: difference (others secondary)")
    assert got is None
    reasons = {c["reason"] for c in smaller["suppressed"]}
    assert "difference" in reasons


def test_spreading_queries_over_two_insurers(attack_env: Env, target: Target) -> None:
    grant_insurer_b(attack_env)
    with_target = total(attack_env, {"insu_admdvs": [target.big_county, target.county]},
                        role="insurer")
    without = total(attack_env, {"insu_admdvs": [target.big_county]}, role="insurer_b")
    got = difference(with_target, without)
    learned("two colluding insurers", value=got, planted=target_persons_part(target),
            outcome="insurer B's answer suppressed: difference with insurer A's release")
    assert got is None
    suppressed = without["suppressed"][0]
    assert suppressed["reason"] == "difference"
    # B is told that an earlier release is close, not whose or which (no leak of A's queries).
    assert "another party" in suppressed["detail"]
    assert "rel-" not in suppressed["detail"]


def test_inclusion_exclusion_over_two_large_margins_is_caught(
    attack_env: Env, target: Target
) -> None:
    # A small (county, age band) group whose county and age band are both large: no two of
    # the four answers below differ by fewer than k persons, yet
    #   all − (county ≠ c) − (age ≠ a) + (county ≠ c ∧ age ≠ a)  =  the group's burden.
    county, age, persons = target.truth(
        "WITH g AS (SELECT insu_admdvs c, age_band a, count(DISTINCT psn_id) n "
        "FROM settlements WHERE year = ? GROUP BY ALL), "
        "cn AS (SELECT insu_admdvs c, count(DISTINCT psn_id) n FROM settlements "
        "WHERE year = ? GROUP BY ALL), "
        "an AS (SELECT age_band a, count(DISTINCT psn_id) n FROM settlements "
        "WHERE year = ? GROUP BY ALL) "
        "SELECT g.c, g.a, g.n FROM g JOIN cn USING (c) JOIN an USING (a) "
        "WHERE g.n BETWEEN 1 AND 9 AND cn.n >= 40 AND an.n >= 40 ORDER BY g.n, g.c, g.a "
        "LIMIT 1", [YEAR, YEAR, YEAR])[0]
    ((truth,),) = target.truth(
        "SELECT sum(psn_part_amt) FROM settlements WHERE year = ? AND insu_admdvs = ? "
        "AND age_band = ?", [YEAR, county, age])
    other_counties = [c for c in target.counties if c != county]
    other_ages = [a for a in ["0-17", "18-29", "30-39", "40-49", "50-59", "60-69", "70-79",
                              "80+"] if a != age]
    answers = [total(attack_env, f) for f in (
        {}, {"insu_admdvs": other_counties}, {"age_band": other_ages},
        {"insu_admdvs": other_counties, "age_band": other_ages})]
    values = [value(a) for a in answers]
    got = (None if None in values else
           values[0] - values[1] - values[2] + values[3])  # type: ignore[operator]
    learned("inclusion–exclusion over two large margins", value=got, planted=truth,
            outcome=f"last answer suppressed: difference (derived boxes); group of {persons}")
    assert got is None
    assert values[:3] == [v for v in values[:3] if v is not None]  # the first three released
    assert answers[3]["suppressed"][0]["reason"] == "difference"
    assert "together with other releases" in answers[3]["suppressed"][0]["detail"]
