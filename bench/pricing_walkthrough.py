"""The actuary's walk-through of docs/pricing.md, run for real against a seeded demo city.

    python bench/pricing_walkthrough.py [--persons 100000] [--seed 7]

Builds (or reuses) the demo city under bench/out/walkthrough (the same generator and ingest as
``make demo``), starts ``gateway serve``, and makes the calls the page shows: a token, the
catalog, one aggregate, two pricing simulations. Every request and response goes to
bench/out/walkthrough.json (the page quotes them); the chart of pure premium and expected loss
ratio by age band goes to docs/img/pricing-age-bands.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving import running_demo  # noqa: E402
from gateway.cli.clients import fetch_token  # noqa: E402

BASIC = {"name": "基础版", "deductible": 15_000, "ratio_in_list": 0.8, "ratio_out_of_list": 0.5,
         "cap": 3_000_000, "premium": 99}
UPGRADED = {"name": "升级版", "deductible": 10_000, "ratio_in_list": 0.9,
            "ratio_out_of_list": 0.6, "cap": 4_000_000, "target_loss_ratio": 0.85,
            "tier": "upgraded"}
LEAN = {"name": "基础版B", "deductible": 15_000, "ratio_in_list": 0.6, "ratio_out_of_list": 0.3,
        "cap": 2_000_000, "target_loss_ratio": 0.85}

AGGREGATE = {
    "purpose": "hmb_pricing", "dataset": "person_years", "dimensions": ["age_band"],
    "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "exposure"},
                 {"fn": "mean", "field": "psn_part_amt"},
                 {"fn": "sum", "field": "fulamt_ownpay_amt"}],
    "filters": {"year": [2024]},
}
BY_AGE = {"products": [BASIC, UPGRADED, LEAN], "dimensions": ["age_band"], "year": 2024}
# After reading the age curve: terms that can meet the premium limits on this experience.
BASIC_C = {"name": "基础版C", "deductible": 15_000, "ratio_in_list": 0.3, "ratio_out_of_list": 0.3,
           "cap": 2_000_000, "target_loss_ratio": 0.95}
UPGRADED_C = {"name": "升级版C", "deductible": 15_000, "ratio_in_list": 0.7,
              "ratio_out_of_list": 0.4, "cap": 4_000_000, "target_loss_ratio": 0.85,
              "tier": "upgraded"}
WHOLE_CITY = {"products": [BASIC, BASIC_C, UPGRADED_C], "year": 2024}


def chart(by_age: dict[str, Any], path: Path) -> None:
    """Pure premium by age band per product, and 基础版's expected loss ratio at 99 元."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["font.sans-serif"] = ["Noto Sans CJK SC", "WenQuanYi Zen Hei",
                                              "SimHei", "DejaVu Sans"]
    products = by_age["products"]
    bands = [c["age_band"] for c in products[0]["cells"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(products)
    for k, product in enumerate(products):
        values = [c["pure_premium"] for c in product["cells"]]
        xs = [i + (k - (len(products) - 1) / 2) * width for i in range(len(bands))]
        left.bar(xs, [v or 0 for v in values], width, label=_ascii(product["name"]))
        for x, v in zip(xs, values, strict=True):
            if v is None:
                left.annotate("withheld", (x, 0), ha="center", va="bottom", fontsize=6,
                              rotation=90)
    left.set_xticks(range(len(bands)), bands, fontsize=8)
    left.set_xlabel("age band (2024)")
    left.set_ylabel("pure premium, yuan per person-year")
    left.set_title("Expected payout per person-year", fontsize=9)
    left.legend(fontsize=7)
    basic = products[0]
    ratios = [c["expected_loss_ratio"] for c in basic["cells"]]
    right.bar(range(len(bands)), [100 * (r or 0) for r in ratios], 0.6, color="tab:blue")
    right.axhline(70, color="tab:red", linestyle="--", linewidth=1)
    right.annotate("Yunnan floor 70%", (len(bands) - 1, 72), ha="right", fontsize=7,
                   color="tab:red")
    right.set_xticks(range(len(bands)), bands, fontsize=8)
    right.set_xlabel("age band (2024)")
    right.set_ylabel("expected loss ratio, %")
    right.set_title(f"{_ascii(basic['name'])} at a flat {basic['premium']:.0f} yuan", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ascii(name: str) -> str:
    # The chart must read without a CJK font installed.
    return {"基础版": "basic", "升级版": "upgraded", "基础版B": "basic B", "基础版C": "basic C",
            "升级版C": "upgraded C"}.get(name, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "walkthrough")
    args = parser.parse_args()
    calls: list[dict[str, Any]] = []
    with running_demo(args.workdir, args.persons, args.seed) as (credentials, _):
        token = fetch_token(args.workdir / "credentials.json", "insurer")
        with httpx.Client(base_url=credentials["base_url"], timeout=300,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            for method, path, body in [("GET", "/v1/catalog", None),
                                       ("POST", "/v1/query/aggregate", AGGREGATE),
                                       ("POST", "/v1/pricing/simulate", BY_AGE),
                                       ("POST", "/v1/pricing/simulate", WHOLE_CITY)]:
                print(f"{method} {path}", file=sys.stderr)
                response = client.request(method, path, json=body)
                calls.append({"method": method, "path": path, "request": body,
                              "status": response.status_code,
                              "audit_index": response.headers.get("Audit-Index"),
                              "response": response.json()})
                if response.status_code != 200:
                    raise SystemExit(f"{path}: HTTP {response.status_code} {response.text}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    record = {"persons": args.persons, "seed": args.seed, "calls": calls}
    (out / "walkthrough.json").write_text(json.dumps(record, ensure_ascii=False, indent=2))
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    chart(calls[2]["response"], img / "pricing-age-bands.png")
    print(f"wrote {out / 'walkthrough.json'} and {img / 'pricing-age-bands.png'}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
