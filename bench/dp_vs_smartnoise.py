"""A DP count/sum query: the gateway's noise path vs SmartNoise SQL vs raw DuckDB, same data;
then the attack suite's outcome table.

    python bench/dp_vs_smartnoise.py [--store bench/out/city/store] [--repeat 15]

The question (person-years of 2024 by sex and age band: count and sum of 个人负担) runs
* **raw**: the plain GROUP BY straight on DuckDB (no bounds, no noise);
* **gateway DP**: the bounded statement (per person-year clamps, record fingerprint), discrete
  Laplace from OpenDP (calibrated once per template), the budget charge and answer store in
  SQLite — fresh answers every time, so nothing comes from the store;
* **plain gateway SQL**: what the gateway runs for the same question without noise (its
  person count is a ``COUNT(DISTINCT psn_id)``; the bounded statement knows that within one
  year a person-year row is a person and counts rows);
* **gateway release**: the whole disclosure path (`DisclosureControl.release`: difference
  check, primary and complementary suppression, noise, ledger, released-cell record) on a
  fresh state each time (a first ask);
* **SmartNoise SQL** 1.0.10 (`snsql`), ε = 1, δ = 1e-6, row privacy (one row = one
  person-year, as in the gateway), keys not censored (they are public), over the same DuckDB
  file through its Postgres dialect. Its pins (opendp 0.14) clash with ours (0.16), so it lives
  in its own venv, bench/out/snsql-venv, created here on first use.

Each side's medians are taken in one process with its own raw baseline, alternating runs, so
the ratio holds under the machine's load; two cores, DuckDB threads = 2 everywhere.
Results: bench/out/dp_vs_smartnoise.json, and the attack table in bench/out/attacks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import duckdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.catalog import default_catalog  # noqa: E402
from gateway.disclosure.control import DisclosureControl  # noqa: E402
from gateway.disclosure.noise import NoiseSpec, Sampler, noisy_plan, to_units  # noqa: E402
from gateway.policy import Obligations  # noqa: E402
from gateway.query.compiler import compile_aggregate  # noqa: E402
from gateway.query.spec import AggregateQuery  # noqa: E402
from gateway.query.store import QueryStore, StoreLayout  # noqa: E402
from gateway.state.budgets import MICRO, BudgetCharge  # noqa: E402
from gateway.state.store import SqliteStateStore  # noqa: E402

OUT = ROOT / "bench" / "out"
SNSQL_VENV = OUT / "snsql-venv"
# The raw question, as an analyst would write it (fixed text, no input).
RAW_SQL = ("SELECT gend, age_band, COUNT(*) AS n, SUM(psn_part_amt) AS s FROM person_years "
           "WHERE year IN (2024) GROUP BY gend, age_band ORDER BY gend, age_band")
QUERY = AggregateQuery(
    purpose="hmb_pricing", dataset="person_years", dimensions=["gend", "age_band"],
    measures=[{"fn": "count"}, {"fn": "sum", "field": "psn_part_amt"}],
    filters={"year": [2024]})
NOISE = {"mechanism": "laplace", "epsilon": 1.0, "max_records": 20,
         "bounds": {"psn_part_amt": [0, 20000]}}

SNSQL_SCRIPT = textwrap.dedent('''
    import json, statistics, sys, time
    import duckdb, snsql
    from snsql import Privacy
    path, repeat, raw_sql = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class Cursor:
        def __init__(self, con):
            self.cur = con.cursor()
        def execute(self, sql):
            self.cur.execute(sql)
            self.description = self.cur.description
        def __iter__(self):
            return iter(self.cur.fetchall())

    class Connection:  # the DB-API surface snsql's Postgres reader uses, over DuckDB
        def __init__(self, con):
            self.con = con
        def cursor(self):
            return Cursor(self.con)
        def commit(self):
            pass
        def rollback(self):
            pass

    con = duckdb.connect(path, read_only=True)
    con.execute("SET threads = 2")
    rows = con.execute("SELECT count(*) FROM person_years").fetchone()[0]
    meta = {"city": {"main": {"person_years": {
        "row_privacy": True, "censor_dims": False, "rows": rows,
        "psn_id": {"type": "int"}, "gend": {"type": "string"},
        "age_band": {"type": "string"}, "year": {"type": "int"},
        "psn_part_amt": {"type": "float", "lower": 0, "upper": 20000}}}}}
    reader = snsql.from_connection(Connection(con), privacy=Privacy(epsilon=1.0, delta=1e-6),
                                   metadata=meta, engine="postgres")
    query = ('SELECT gend, age_band, COUNT(*) AS n, SUM(psn_part_amt) AS s '
             'FROM main.person_years WHERE "year" = 2024 GROUP BY gend, age_band')
    reader.execute(query); con.execute(raw_sql).fetchall()  # warm up
    raw, dp = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        con.execute(raw_sql).fetchall()
        raw.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = reader.execute(query)
        dp.append(time.perf_counter() - t)
    print(json.dumps({"raw_ms": 1000 * statistics.median(raw),
                      "snsql_ms": 1000 * statistics.median(dp), "cells": len(out) - 1}))
''')


def _median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 2)


def gateway_side(store_dir: Path, repeat: int) -> dict[str, Any]:
    layout = StoreLayout(store_dir)
    version = layout.current_version()
    if version is None:
        raise SystemExit(f"no data version under {store_dir} (run bench/aggregate_vs_duckdb.py "
                         "first, or pass --store)")
    catalog = default_catalog()
    spec = NoiseSpec.from_obligation(NOISE)
    con = duckdb.connect(str(layout.version_path(version)), read_only=True)
    con.execute("SET threads = 2")
    calibrate = time.perf_counter()
    plan = noisy_plan(QUERY, catalog, spec)
    sampler = Sampler()
    for j, _ in enumerate(plan.series):
        sampler.measurement(spec.mechanism, plan.scales[j])
    calibrate_ms = 1000 * (time.perf_counter() - calibrate)
    store = QueryStore(layout, threads=2)
    compiled = compile_aggregate(QUERY, catalog, contributions=False)
    (OUT / "bench-ledger.db").unlink(missing_ok=True)
    obligations = Obligations(min_cell_size=10, max_rows=10_000, noise=NOISE, disclosure={
        "difference_k": 10, "rounding": 1, "dataset_epsilon_cap": 1e6,
        "budget": {"epsilon": 1e6, "period": "grant"}})
    raw, bounded, dp, release, noise_only, plain = [], [], [], [], [], []
    control = DisclosureControl(catalog=catalog, state=SqliteStateStore(OUT / "bench-ledger.db"),
                                store=store, clock=time.time)
    control.sampler = sampler
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:  # the state's file system
        ledger = SqliteStateStore(Path(tmp) / "ledger.db")
        con.execute(RAW_SQL).fetchall()
        con.execute(plan.sql).fetchall()
        for i in range(repeat):
            t = time.perf_counter()
            con.execute(RAW_SQL).fetchall()
            raw.append(time.perf_counter() - t)

            t = time.perf_counter()
            rows = con.execute(plan.sql).fetchall()
            bounded.append(time.perf_counter() - t)

            t = time.perf_counter()
            rows = con.execute(plan.sql).fetchall()
            t_noise = time.perf_counter()
            fresh: dict[str, int] = {}
            for j, series in enumerate(plan.series):
                exact = [to_units(r[2 + 3 + j], series.kind) for r in rows]
                for r, v in zip(rows, sampler.add(spec.mechanism, plan.scales[j], exact),
                                strict=True):
                    fresh[f"{i}:{series.name}:{r[0]}:{r[1]}"] = v
            ledger.spend_and_store(fresh, [BudgetCharge("grant:bench", "all", MICRO,
                                                        10**12)], now_ns=i)
            end = time.perf_counter()
            dp.append(end - t)
            noise_only.append(end - t_noise)

            t = time.perf_counter()
            con.execute(compiled.sql).fetchall()
            plain.append(time.perf_counter() - t)

            # A first ask each time: a fresh state (nothing released, nothing stored).
            state = SqliteStateStore(Path(tmp) / f"state-{i}.db")
            control.state = state
            control._known_cache.clear()
            t = time.perf_counter()
            control.release(QUERY, compiled, obligations, org="ins-bench", grant_id="g-bench",
                            dominance_k=0.9, p_percent=0.1)
            release.append(time.perf_counter() - t)
            state.close()
    raw_ms = _median_ms(raw)
    return {
        "cells": len(rows),
        "raw_ms": raw_ms,
        "plain_gateway_sql_ms": _median_ms(plain),
        "bounded_sql_ms": _median_ms(bounded),
        "dp_ms": _median_ms(dp),
        "noise_and_ledger_ms": _median_ms(noise_only),
        "release_ms": _median_ms(release),
        "calibration_once_ms": round(calibrate_ms, 2),
        "dp_ratio": round(_median_ms(dp) / raw_ms, 3),
        "release_ratio": round(_median_ms(release) / raw_ms, 3),
        "dp_added_ms": round(_median_ms(dp) - raw_ms, 2),
        "scales": plan.published()["scales"],
    }


def smartnoise_side(store_dir: Path, repeat: int) -> dict[str, Any]:
    python = SNSQL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(SNSQL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "smartnoise-sql==1.0.10", f"duckdb=={duckdb.__version__}"], check=True)
    layout = StoreLayout(store_dir)
    path = layout.version_path(layout.current_version() or "")
    done = subprocess.run([str(python), "-c", SNSQL_SCRIPT, str(path), str(repeat), RAW_SQL],
                          check=True, capture_output=True, text=True)
    got: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    got["snsql_ratio"] = round(got["snsql_ms"] / got["raw_ms"], 3)
    got["raw_ms"] = round(got["raw_ms"], 2)
    got["snsql_ms"] = round(got["snsql_ms"], 2)
    return got


def attack_table() -> list[dict[str, Any]]:
    report = OUT / "attacks.jsonl"
    report.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "pytest", "tests/attacks", "-q", "-p", "no:warnings",
                    "-p", "no:cacheprovider"], cwd=ROOT, check=True,
                   env={**os.environ, "ATTACK_REPORT": str(report)})
    return [json.loads(line) for line in report.read_text("utf-8").splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=OUT / "city" / "store")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--skip-attacks", action="store_true")
    args = parser.parse_args()
    result = {"gateway": gateway_side(args.store, args.repeat),
              "smartnoise": smartnoise_side(args.store, args.repeat),
              "query": RAW_SQL, "noise": NOISE}
    (OUT / "dp_vs_smartnoise.json").write_text(json.dumps(result, indent=2), "utf-8")
    print(json.dumps(result, indent=2))
    if not args.skip_attacks:
        rows = attack_table()
        (OUT / "attacks.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False),
                                          "utf-8")
        print("| attack | what the attacker learned | planted | outcome |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['attack']} | {r['learned']} | {r['planted']} | {r['outcome']} |")


if __name__ == "__main__":
    main()
