"""Aggregate queries end to end over HTTP vs the same SQL straight on DuckDB, in one run.

    python bench/aggregate_vs_duckdb.py --persons 1000000 [--repeat 15]

Builds (or reuses) a demo city under bench/out/, starts ``gateway serve`` as a real uvicorn
process, and for each query rotates: one HTTP request (token, policy, DuckDB, suppression,
durable audit append), one direct execution of the plain SQL computing the same released
figures (``compile_aggregate(..., contributions=False)``: ``COUNT(DISTINCT)``, sums, means;
no per-person stage) and one direct execution of the gateway's own statement (with the
per-person top-2 contributions that dominance and p% need), on a read-only DuckDB connection
with the same thread count. Medians, the ratio HTTP / plain SQL and the added milliseconds go
to bench/out/aggregate.json, and a chart to bench/out/aggregate.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving import plot_side_by_side, running_demo  # noqa: E402
from gateway.catalog import default_catalog  # noqa: E402
from gateway.cli.clients import fetch_token  # noqa: E402
from gateway.query.compiler import compile_aggregate  # noqa: E402
from gateway.query.spec import AggregateQuery  # noqa: E402
from gateway.query.store import StoreLayout  # noqa: E402

QUERIES: dict[str, dict[str, Any]] = {
    "tiny: one prefecture, one age band, one year": {
        "purpose": "hmb_pricing", "dataset": "person_years", "dimensions": ["gend"],
        "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "exposure"}],
        "filters": {"year": [2024], "insu_admdvs": ["420500"], "age_band": ["80+"]},
    },
    "small: inpatient persons by sex, one year": {
        "purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
        "measures": [{"fn": "count_persons"}, {"fn": "count"}],
        "filters": {"year": [2024], "med_type": ["21"]},
    },
    "medium: person-years by age band, sex, year": {
        "purpose": "hmb_pricing", "dataset": "person_years",
        "dimensions": ["age_band", "gend", "year"],
        "measures": [{"fn": "sum", "field": "exposure"}, {"fn": "mean", "field": "psn_part_amt"},
                     {"fn": "sum", "field": "medfee_sumamt"}],
    },
    "large: settlements by 5 dimensions, distinct persons": {
        "purpose": "hmb_pricing", "dataset": "settlements",
        "dimensions": ["age_band", "gend", "insu_admdvs", "hosp_lv", "med_type"],
        "measures": [{"fn": "count_persons"}, {"fn": "count"},
                     {"fn": "sum", "field": "psn_part_amt"},
                     {"fn": "mean", "field": "medfee_sumamt"}],
    },
    "large: all settlements by year and medical type": {
        "purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["year", "med_type"],
        "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "fulamt_ownpay_amt"},
                     {"fn": "sum", "field": "inscp_scp_amt"}],
    },
}




def plot(report: dict[str, Any], path: Path) -> None:
    plot_side_by_side(
        report["results"], path, name_key="query", log_scale=True,
        duckdb_label="plain SQL on DuckDB, same released figures",
        http_label="gateway over HTTP (policy, suppression, durable audit)",
        title=f"Aggregate queries on {report['persons']:,} persons ({report['machine']})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--persons", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "city")
    parser.add_argument("--replot", type=Path, help="only redraw the chart from a results file")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return

    with running_demo(args.workdir, args.persons, args.seed) as (credentials, setup_s):
        base_url = credentials["base_url"]
        token = fetch_token(args.workdir / "credentials.json", "insurer")
        layout = StoreLayout(args.workdir / "store")
        version = layout.current_version()
        assert version is not None
        direct = duckdb.connect(str(layout.version_path(version)), read_only=True)
        catalog = default_catalog()
        results: list[dict[str, Any]] = []
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                          timeout=120) as client:
            for name, body in QUERIES.items():
                query = AggregateQuery.model_validate(body)
                sql = compile_aggregate(query, catalog, contributions=False).sql
                table = catalog.datasets[query.dataset].table
                types = dict(direct.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = ?", [table]).fetchall())
                gateway_sql = compile_aggregate(query, catalog, column_types=types).sql
                http_times: list[float] = []
                duck_times: list[float] = []
                gateway_sql_times: list[float] = []
                order = ["http", "duckdb", "gateway_sql"]
                for i in range(args.repeat + 2):
                    # Rotate which side goes first so none always meets a warmer cache.
                    sides = order[i % 3:] + order[:i % 3]
                    took: dict[str, float] = {}
                    for side in sides:
                        t0 = time.perf_counter()
                        if side == "http":
                            response = client.post("/v1/query/aggregate", json=body)
                            if response.status_code == 401:  # the token expired: renew
                                client.headers["Authorization"] = "Bearer " + fetch_token(
                                    args.workdir / "credentials.json", "insurer")
                                t0 = time.perf_counter()
                                response = client.post("/v1/query/aggregate", json=body)
                            if response.status_code != 200:
                                raise SystemExit(f"{name}: HTTP {response.status_code}")
                        else:
                            direct.execute(sql if side == "duckdb" else gateway_sql).fetchall()
                        took[side] = time.perf_counter() - t0
                    if i >= 2:  # two warm-up rounds
                        http_times.append(took["http"])
                        duck_times.append(took["duckdb"])
                        gateway_sql_times.append(took["gateway_sql"])
                    print(f"\r{name}: {i + 1}/{args.repeat + 2}", end="", file=sys.stderr)
                print(file=sys.stderr)
                http_med = statistics.median(http_times)
                duck_med = statistics.median(duck_times)
                results.append({
                    "query": name,
                    "duckdb_ms": round(duck_med * 1000, 2),
                    "http_ms": round(http_med * 1000, 2),
                    "ratio": round(http_med / duck_med, 3),
                    "added_ms": round((http_med - duck_med) * 1000, 2),
                    "gateway_sql_ms": round(statistics.median(gateway_sql_times) * 1000, 2),
                    "per_person_stage": gateway_sql != sql,
                    "rows": len(response.json()["rows"]),
                    "suppressed": response.json()["suppressed_count"],
                })

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "persons": args.persons,
        "repeat": args.repeat,
        "setup_seconds": round(setup_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "results": results,
    }
    (out / "aggregate.json").write_text(json.dumps(report, ensure_ascii=False, indent=2))
    print("| query | plain SQL direct (ms) | gateway SQL direct (ms) | HTTP end to end (ms) "
          "| ratio HTTP / plain | added (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['query']} | {r['duckdb_ms']} | {r['gateway_sql_ms']} | {r['http_ms']} | "
              f"{r['ratio']} | {r['added_ms']} |")
    plot(report, out / "aggregate.png")


if __name__ == "__main__":
    main()
