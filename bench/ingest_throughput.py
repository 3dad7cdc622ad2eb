"""Generator and de-identifying ingest throughput on one city.

    python bench/ingest_throughput.py --persons 1000000 [--runs 3]

Generates the city once (timed), then loads it ``--runs`` times into fresh stores and reports
the median settlement rows/s with the time of each step. Results go to bench/out/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.ingest.pipeline import ingest  # noqa: E402
from gateway.synth import generate_city  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--persons", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=out))
    try:
        t0 = time.perf_counter()
        city = generate_city(work / "raw", persons=args.persons, seed=args.seed, progress=True)
        generate_s = time.perf_counter() - t0
        runs = []
        for run in range(args.runs):
            steps: list[tuple[str, float]] = []
            started = time.perf_counter()

            def progress(step: str, started: float = started, run: int = run,
                         steps: list[tuple[str, float]] = steps) -> None:
                steps.append((step, time.perf_counter() - started))
                print(f"  run {run + 1}: {steps[-1][1]:6.2f} s  {step}", file=sys.stderr)

            report = ingest(city.persons, city.settlements, store_dir=work / f"store{run}",
                            key=bytes(range(32)), progress=progress)
            runs.append({"seconds": round(report.seconds, 2),
                         "settlement_rows_per_s": round(report.settlement_rows_per_s),
                         "steps": [(s, round(t, 2)) for s, t in steps]})
            shutil.rmtree(work / f"store{run}")
        result = {
            "persons": city.person_count,
            "settlements": city.settlement_count,
            "generate_seconds": round(generate_s, 1),
            "ingest_runs": runs,
            "median_settlement_rows_per_s": statistics.median(
                r["settlement_rows_per_s"] for r in runs),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"Python {platform.python_version()}",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "ingest_runs"}, indent=2))


if __name__ == "__main__":
    main()
