"""In-process policy decision latency (embedded regorus), VM vs interpreter, in one run.

    python bench/policy_decision.py [--grants 100] [--n 20000]

A realistic aggregate-query input against a data document with ``--grants`` grants; prints
p50/p99 per mode and the ratio. Results go to bench/out/policy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.catalog import default_catalog  # noqa: E402
from gateway.policy import RegorusEngine  # noqa: E402
from gateway.service.grants import GrantRequest, new_grant_record, policy_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grants", type=int, default=100)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    catalog = default_catalog()
    now = datetime.now(UTC)
    grants = [
        new_grant_record(GrantRequest.model_validate({
            "insurer": f"ins-{i:03d}", "purpose": "hmb_pricing",
            "datasets": ["settlements", "person_years"],
            "dimensions": ["age_band", "gend", "insu_admdvs", "year"],
            "measures": ["medfee_sumamt", "psn_part_amt", "exposure"],
        }), catalog, created_by="bench", now=now)
        for i in range(args.grants)
    ]
    data = policy_data(catalog, grants)
    policy_input = {
        "subject": {"client_id": "c-bench", "role": "insurer", "org": "ins-042"},
        "action": "query.aggregate", "purpose": "hmb_pricing",
        "resource": {"dataset": "settlements", "dimensions": ["age_band", "gend"],
                     "measures": [{"fn": "count_persons"},
                                  {"fn": "sum", "field": "psn_part_amt"}],
                     "filters": {"year": ["2024"]},
                     "fields": ["age_band", "gend", "psn_part_amt", "year"]},
        "time_ns": time.time_ns(),
    }
    results = {}
    for mode in ("compiled", "interpreter"):
        engine = RegorusEngine(mode=mode)
        engine.set_data(data)
        assert engine.decide(policy_input).allow
        samples = []
        for _ in range(args.n):
            t0 = time.perf_counter_ns()
            engine.decide(policy_input)
            samples.append(time.perf_counter_ns() - t0)
        samples.sort()
        results[mode] = {"p50_us": round(statistics.median(samples) / 1000, 1),
                         "p99_us": round(samples[int(len(samples) * 0.99)] / 1000, 1)}
        print(f"{mode:12s} p50 {results[mode]['p50_us']:7.1f} µs  "
              f"p99 {results[mode]['p99_us']:7.1f} µs")
    ratio = results["interpreter"]["p50_us"] / results["compiled"]["p50_us"]
    print(f"interpreter / compiled p50: {ratio:.2f}")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy.json").write_text(json.dumps({"grants": args.grants, **results}, indent=2))


if __name__ == "__main__":
    main()
