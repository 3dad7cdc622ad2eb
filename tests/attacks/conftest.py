"""A small purpose-built city with one planted person, and gateways serving it.

The planted person (the *target*) lives in the county with the fewest persons settling in
2024 and has one 2024 settlement rewritten to a huge, recognisable claim:
``psn_part_amt`` = 654,321.00 元, of which 600,000 元 全自费 (``fulamt_ownpay_amt``, which
pricing pays from). Every attack in this folder tries to learn the target's 2024
``psn_part_amt`` (or the claim itself) and must fail.

Each test states what the attacker learned with :func:`learned`; when ``ATTACK_REPORT`` names
a file, the statements are appended there as JSON lines (``bench/dp_vs_smartnoise.py`` turns
them into the outcome table).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from gateway.ingest.pipeline import ingest
from gateway.query.store import StoreLayout
from gateway.synth import CityFiles
from tests.conftest import PRICING_GRANT, PSEUDONYM_KEY, Env, make_env

PLANTED_CLAIM = Decimal("654321.00")
YEAR = 2024

NOISY_GRANT: dict[str, Any] = {
    **PRICING_GRANT,
    "noise": {"mechanism": "laplace", "epsilon": 1.0, "max_records": 20,
              "bounds": {"psn_part_amt": [0, 20000], "medfee_sumamt": [0, 50000]}},
    "budget": {"epsilon": 5.0, "period": "month"},
}


@dataclass(frozen=True)
class Target:
    """What the agency knows about the planted person (the test's ground truth)."""

    store_dir: Path
    county: str
    age_band: str
    gend: str
    part_2024: Decimal  # the target's whole 2024 psn_part_amt, planted claim included
    big_county: str  # the county with the most persons in 2024
    counties: tuple[str, ...]  # every county with a 2024 settlement

    def truth(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        layout = StoreLayout(self.store_dir)
        version = layout.current_version()
        assert version is not None
        with duckdb.connect(str(layout.version_path(version)), read_only=True) as con:
            return con.execute(sql, params or []).fetchall()


def _plant(city: CityFiles, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    persons, settlements = out / "persons.parquet", out / "settlements.parquet"
    with duckdb.connect() as con:
        # Paths are the test's own temporary files, not input.
        con.execute(f"CREATE VIEW p AS SELECT * FROM read_parquet('{city.persons}')")  # noqa: S608
        con.execute(f"CREATE VIEW s AS SELECT * FROM read_parquet('{city.settlements}')")  # noqa: S608
        # The smallest county in 2024; in it, the person with the most 2024 settlements.
        (psn_no,) = con.execute(
            "WITH c AS (SELECT p.insu_admdvs, count(DISTINCT p.psn_no) n FROM s JOIN p "
            "USING (psn_no) WHERE year(s.setl_time) = ? GROUP BY 1 ORDER BY n, 1 LIMIT 1) "
            "SELECT s.psn_no FROM s JOIN p USING (psn_no) JOIN c USING (insu_admdvs) "
            "WHERE year(s.setl_time) = ? GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1",
            [YEAR, YEAR]).fetchone() or ("",)
        (setl_id,) = con.execute(
            "SELECT min(setl_id) FROM s WHERE psn_no = ? AND year(setl_time) = ?",
            [psn_no, YEAR]).fetchone() or ("",)
        con.execute(f"COPY (SELECT * FROM p) TO '{persons}' (FORMAT parquet)")  # noqa: S608
        planted = (
            "COPY (SELECT * REPLACE ("  # noqa: S608
            "CASE WHEN setl_id = $1 THEN 700000.0 ELSE medfee_sumamt END AS medfee_sumamt, "
            "CASE WHEN setl_id = $1 THEN 654321.0 ELSE psn_part_amt END AS psn_part_amt, "
            "CASE WHEN setl_id = $1 THEN 600000.0 ELSE fulamt_ownpay_amt END "
            "AS fulamt_ownpay_amt) "
            f"FROM s) TO '{settlements}' (FORMAT parquet)"
        )
        con.execute(planted, [setl_id])
    return persons, settlements


@pytest.fixture(scope="session")
def target(city: CityFiles, tmp_path_factory: pytest.TempPathFactory) -> Target:
    root = tmp_path_factory.mktemp("attack_city")
    persons, settlements = _plant(city, root / "raw")
    store_dir = root / "store"
    ingest(persons, settlements, store_dir=store_dir, key=PSEUDONYM_KEY)
    probe = Target(store_dir, "", "", "", Decimal(0), "", ())
    (psn_id, county, age_band, gend) = probe.truth(
        "SELECT psn_id, insu_admdvs, age_band, gend FROM settlements "
        "WHERE year = ? AND psn_part_amt = ?", [YEAR, PLANTED_CLAIM])[0]
    ((part,),) = probe.truth(
        "SELECT sum(psn_part_amt) FROM settlements WHERE psn_id = ? AND year = ?",
        [psn_id, YEAR])
    by_size = probe.truth(
        "SELECT insu_admdvs FROM settlements WHERE year = ? GROUP BY 1 "
        "ORDER BY count(DISTINCT psn_id) DESC, 1", [YEAR])
    return Target(store_dir, str(county), str(age_band), str(gend), Decimal(part),
                  str(by_size[0][0]), tuple(sorted(str(r[0]) for r in by_size)))


@pytest.fixture
def attack_env(tmp_path: Path, target: Target, signing_key_file: Path) -> Iterator[Env]:
    """A gateway over the planted city; insurer ``ins-a`` holds the pricing grant."""
    env = make_env(tmp_path, target.store_dir, signing_key_file)
    with env.client:
        yield env
    env.gateway.audit.close()


@pytest.fixture
def noisy_env(tmp_path: Path, target: Target, signing_key_file: Path) -> Iterator[Env]:
    """The same, but the grant asks for Laplace noise (ε = 1 per query, 5 per month)."""
    env = make_env(tmp_path, target.store_dir, signing_key_file, grant=NOISY_GRANT)
    with env.client:
        yield env
    env.gateway.audit.close()


def grant_insurer_b(env: Env, grant: dict[str, Any] | None = None) -> None:
    body = {**(grant or PRICING_GRANT), "insurer": "ins-b"}
    response = env.client.post("/v1/grants", json=body, headers=env.headers("admin"))
    assert response.status_code == 201, response.text


def learned(attack: str, *, value: Any, planted: Any, outcome: str) -> None:
    """State what the attacker learned (and record it for the outcome table)."""
    line = {"attack": attack, "learned": None if value is None else str(value),
            "planted": str(planted), "outcome": outcome}
    print(json.dumps(line, ensure_ascii=False))  # the test's statement (pytest -s shows it)
    path = os.environ.get("ATTACK_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
