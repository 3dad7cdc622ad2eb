"""Attacks within what one table and its margins show: totals, and one huge claim."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from tests.attacks.conftest import PLANTED_CLAIM, YEAR, Target, learned
from tests.conftest import Env

Q: dict[str, Any] = {"purpose": "hmb_pricing", "dataset": "settlements",
                     "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "psn_part_amt"}]}


def ask(env: Env, dims: list[str], filters: dict[str, Any]) -> dict[str, Any]:
    response = env.aggregate("insurer", {**Q, "dimensions": dims,
                                         "filters": {"year": [YEAR], **filters}})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_suppressed_cell_is_not_recovered_from_row_and_column_totals(
    attack_env: Env, target: Target
) -> None:
    table = ask(attack_env, ["insu_admdvs", "gend"], {})
    cells = {(r[0], r[1]): r[3] for r in table["rows"]}
    assert cells[(target.county, target.gend)] is None  # the target's cell is withheld
    rows = {r[0]: r[2] for r in ask(attack_env, ["insu_admdvs"], {})["rows"]}
    columns = {r[0]: r[2] for r in ask(attack_env, ["gend"], {})["rows"]}
    grand = ask(attack_env, [], {})["rows"][0][1]

    # Every subtraction the attacker can make that would isolate the target's cell.
    guesses: list[Decimal] = []
    col_rest = [v for (c, g), v in cells.items() if g == target.gend and c != target.county]
    if columns.get(target.gend) is not None and None not in col_rest:
        guesses.append(Decimal(str(columns[target.gend])) - sum(Decimal(str(v))
                                                                for v in col_rest))
    row_rest = [v for (c, g), v in cells.items() if c == target.county and g != target.gend]
    if rows.get(target.county) is not None and None not in row_rest:
        guesses.append(Decimal(str(rows[target.county])) - sum(Decimal(str(v))
                                                               for v in row_rest))
    released = [v for k, v in cells.items() if k != (target.county, target.gend)]
    if grand is not None and None not in released:
        guesses.append(Decimal(str(grand)) - sum(Decimal(str(v)) for v in released))
    ((truth,),) = target.truth(
        "SELECT sum(psn_part_amt) FROM settlements WHERE year = ? AND insu_admdvs = ? "
        "AND gend = ?", [YEAR, target.county, target.gend])
    learned("suppressed cell from row and column totals", value=guesses or None,
            planted=truth, outcome="no subtraction isolates the cell (secondary suppression)")
    assert all(abs(g - Decimal(truth)) > 1 for g in guesses)
    reasons = {c["reason"] for c in table["suppressed"]}
    assert {"primary", "secondary"} <= reasons


def test_sum_dominated_by_one_huge_claim_is_withheld(attack_env: Env, target: Target) -> None:
    # The target's county and the next-smallest one: ≥ 10 persons, one claim of 654,321 元.
    by_size = target.truth(
        "SELECT insu_admdvs FROM settlements WHERE year = ? GROUP BY 1 "
        "ORDER BY count(DISTINCT psn_id), 1 LIMIT 2", [YEAR])
    counties = sorted({str(r[0]) for r in by_size} | {target.county})
    body = ask(attack_env, [], {"insu_admdvs": counties})
    persons, part = body["rows"][0]
    learned("sum dominated by one huge claim", value=part, planted=PLANTED_CLAIM,
            outcome="sum withheld (dominance); the person count stays")
    assert persons >= 10  # not a small cell: only the magnitude rule protects it
    assert part is None
    assert body["suppressed"][0]["reason"] in ("dominance", "p_percent")
    assert body["suppressed"][0]["measures"] == ["sum_psn_part_amt"]
