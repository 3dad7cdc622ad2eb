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
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving import free_port, wait_ready  # noqa: E402
from gateway.catalog import default_catalog  # noqa: E402
from gateway.cli.clients import fetch_token  # noqa: E402
from gateway.cli.demo import prepare_demo  # noqa: E402
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
    """Bar chart of the medians, DuckDB direct beside the gateway, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')", file=sys.stderr)
        return
    results = report["results"]
    fig, ax = plt.subplots(figsize=(9, 4))
    names = ["\n".join(textwrap.wrap(r["query"], 22)) for r in results]
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], [r["duckdb_ms"] for r in results], 0.4,
           label="plain SQL on DuckDB, same released figures")
    ax.bar([x + 0.2 for x in xs], [r["http_ms"] for r in results], 0.4,
           label="gateway over HTTP (policy, suppression, durable audit)")
    for x, r in zip(xs, results, strict=True):
        ax.annotate(f"{r['ratio']:.2f}x", (x + 0.2, r["http_ms"]), ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(list(xs), names, fontsize=6)
    ax.set_ylabel("median ms (log)")
    ax.set_yscale("log")
    ax.set_title(f"Aggregate queries on {report['persons']:,} persons ({report['machine']})",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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

    port = free_port()
    started = time.perf_counter()
    credentials = prepare_demo(persons=args.persons, seed=args.seed, port=port,
                               workdir=args.workdir)
    setup_s = time.perf_counter() - started
    base_url = credentials["base_url"]
    env = {**os.environ, "GATEWAY_WORKDIR": str(args.workdir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--workdir", str(args.workdir),
         "--port", str(port)], env=env)
    try:
        wait_ready(base_url, proc)
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
                gateway_sql = compile_aggregate(query, catalog).sql
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
    finally:
        proc.terminate()
        proc.wait(timeout=30)

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
