"""POST /v1/pricing/simulate over HTTP vs the plain DuckDB SQL computing the same payouts.

    python bench/pricing_vs_duckdb.py --persons 1000000 [--repeat 9]

Builds (or reuses) the demo city under bench/out/city, starts ``gateway serve`` as a real
uvicorn process, and for each request alternates: one HTTP call (token check, policy decision,
the pricing statement on the read-only store fetched through Arrow, the per-cell figures,
primary / few-claimant / dominance / complementary suppression, the 云南 limit checks, a
durable audit append) and one direct run of the plain SQL a DuckDB user would write for the
same figures: the same payout expression per person-year (``gateway.pricing.sql.payout_sql``),
then per cell and overall distinct persons, person-years, exposure, claimants, total payout and
the amount above each attachment point. Medians, ratios and the added milliseconds go to
bench/out/pricing.json, a chart to bench/out/pricing.png.
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
from sqlglot import exp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving import plot_side_by_side, running_demo  # noqa: E402
from gateway.catalog import default_catalog  # noqa: E402
from gateway.cli.clients import fetch_token  # noqa: E402
from gateway.pricing.request import PricingRequest  # noqa: E402
from gateway.pricing.sql import payout_rows  # noqa: E402
from gateway.query.store import StoreLayout  # noqa: E402

BASIC = {"name": "基础版", "deductible": 15_000, "ratio_in_list": 0.8, "ratio_out_of_list": 0.5,
         "cap": 3_000_000, "premium": 99}
UPGRADED = {"name": "升级版", "deductible": 10_000, "ratio_in_list": 0.9,
            "ratio_out_of_list": 0.6, "cap": 4_000_000, "target_loss_ratio": 0.85,
            "tier": "upgraded"}
LEAN = {"name": "基础版B", "deductible": 15_000, "ratio_in_list": 0.6, "ratio_out_of_list": 0.3,
        "cap": 2_000_000, "target_loss_ratio": 0.85}

REQUESTS: dict[str, dict[str, Any]] = {
    "one year, whole city, 3 products": {"products": [BASIC, UPGRADED, LEAN], "year": 2024},
    "one year by age band and sex, 2 products": {
        "products": [BASIC, UPGRADED], "dimensions": ["age_band", "gend"], "year": 2024},
    "4 years by age band and year, 2 products": {
        "products": [BASIC, UPGRADED], "dimensions": ["age_band", "year"]},
    "4 years by city (insu_admdvs), 2 products": {
        "products": [BASIC, UPGRADED], "dimensions": ["insu_admdvs"]},
}


def plain_sql(body: dict[str, Any]) -> str:
    """The same payouts and figures, written plainly: COUNT(DISTINCT) for persons, no
    per-person stage, no disclosure inputs."""
    request = PricingRequest.model_validate(body)
    dataset = default_catalog().datasets["person_years"]
    filters = request.policy_filters()
    rows = payout_rows(dataset, request.dimensions, filters, request.products)
    dims = [exp.column(d) for d in request.dimensions]
    zero = exp.Literal.number(0)
    selects: list[exp.Expr] = [
        *[d.copy() for d in dims],
        exp.Count(this=exp.Distinct(expressions=[exp.column("_psn")])).as_("persons"),
        exp.Count(this=exp.Star()).as_("person_years"),
        exp.Sum(this=exp.column("_exposure")).as_("exposure"),
    ]
    for j in range(len(request.products)):
        pay = exp.column(f"_pay_{j}")
        selects += [
            exp.Sum(this=exp.If(this=exp.GT(this=pay.copy(), expression=zero.copy()),
                                true=exp.Literal.number(1), false=zero.copy())),
            exp.Sum(this=pay.copy()),
        ]
        for a in request.points():
            selects.append(exp.Sum(this=exp.Anonymous(this="GREATEST", expressions=[
                exp.Sub(this=pay.copy(), expression=exp.Literal.number(a)), zero.copy()])))
    tree = exp.select(*selects).from_(rows.subquery("_pay"))
    if dims:
        tree = tree.group_by(exp.GroupingSets(expressions=[
            exp.Tuple(expressions=[d.copy() for d in dims]), exp.Tuple(expressions=[])]))
    return tree.sql(dialect="duckdb")


def plot(report: dict[str, Any], path: Path) -> None:
    plot_side_by_side(
        report["results"], path, name_key="request",
        duckdb_label="plain DuckDB SQL, same payouts",
        http_label="POST /v1/pricing/simulate (policy, disclosure, limits, durable audit)",
        title=f"Pricing simulation on {report['persons']:,} persons, 4 years "
              f"({report['machine']})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--persons", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "city")
    parser.add_argument("--replot", type=Path, help="only redraw the chart from a results file")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return

    results: list[dict[str, Any]] = []
    with running_demo(args.workdir, args.persons, args.seed) as (credentials, setup_s):
        base_url = credentials["base_url"]
        token = fetch_token(args.workdir / "credentials.json", "insurer")
        layout = StoreLayout(args.workdir / "store")
        version = layout.current_version()
        if version is None:
            raise SystemExit("no data version loaded")
        direct = duckdb.connect(str(layout.version_path(version)), read_only=True)
        direct.execute("SET enable_progress_bar = false")
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"},
                          timeout=300) as client:
            for name, body in REQUESTS.items():
                sql = plain_sql(body)
                http_times: list[float] = []
                duck_times: list[float] = []
                answer: dict[str, Any] = {}
                for i in range(args.repeat + 2):
                    # Alternate which side goes first so neither always meets a warmer cache.
                    sides = ["http", "duckdb"] if i % 2 == 0 else ["duckdb", "http"]
                    took: dict[str, float] = {}
                    for side in sides:
                        t0 = time.perf_counter()
                        if side == "http":
                            response = client.post("/v1/pricing/simulate", json=body)
                            if response.status_code == 401:  # the token expired: renew
                                client.headers["Authorization"] = "Bearer " + fetch_token(
                                    args.workdir / "credentials.json", "insurer")
                                t0 = time.perf_counter()
                                response = client.post("/v1/pricing/simulate", json=body)
                            if response.status_code != 200:
                                raise SystemExit(f"{name}: HTTP {response.status_code} "
                                                 f"{response.text[:300]}")
                            answer = response.json()
                        else:
                            direct.execute(sql).fetchall()
                        took[side] = time.perf_counter() - t0
                    if i >= 2:  # two warm-up rounds
                        http_times.append(took["http"])
                        duck_times.append(took["duckdb"])
                    print(f"\r{name}: round {i + 1}/{args.repeat + 2}, last http "
                          f"{took['http'] * 1000:.0f} ms, duckdb {took['duckdb'] * 1000:.0f} ms",
                          end="", file=sys.stderr, flush=True)
                print(file=sys.stderr)
                http_med = statistics.median(http_times)
                duck_med = statistics.median(duck_times)
                cells = answer["products"][0]["cells"]
                results.append({
                    "request": name,
                    "duckdb_ms": round(duck_med * 1000, 1),
                    "http_ms": round(http_med * 1000, 1),
                    "ratio": round(http_med / duck_med, 3),
                    "added_ms": round((http_med - duck_med) * 1000, 1),
                    "cells": len(cells),
                    "cells_suppressed": sum(c["suppressed"] is not None for c in cells),
                })

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "persons": args.persons,
        "repeat": args.repeat,
        "setup_seconds": round(setup_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_average": os.getloadavg(),
        "results": results,
    }
    (out / "pricing.json").write_text(json.dumps(report, ensure_ascii=False, indent=2))
    print("| request | plain DuckDB (ms) | HTTP end to end (ms) | ratio | added (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['request']} | {r['duckdb_ms']} | {r['http_ms']} | {r['ratio']} | "
              f"{r['added_ms']} |")
    plot(report, out / "pricing.png")


if __name__ == "__main__":
    main()
