"""Audit log throughput: durable appends/s from many threads (group commit), and the time to
verify the whole log (leaves, chain, stored Merkle subtrees).

    python bench/audit_log.py [--threads 16] [--appends 40000] [--verify-size 1000000]

Writes bench/out/audit.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.audit import AuditEntry, SqliteAuditLog, utc_timestamp  # noqa: E402


def _entry(i: int) -> AuditEntry:
    return AuditEntry(
        ts=utc_timestamp(), actor=f"client-{i % 7}", role="insurer", org="ins-hmb-001",
        action="query.aggregate", purpose="hmb_pricing", decision="allow", status=200,
        request={"purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
                 "measures": [{"fn": "count"}], "filters": {"year": [2024]}},
        fields=["gend", "year"], cells_released=2, data_version="v-bench",
        response_hash="sha256:" + "ab" * 32,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--appends", type=int, default=40_000)
    parser.add_argument("--verify-size", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    result: dict[str, object] = {}
    try:
        per_thread = args.appends // args.threads
        with SqliteAuditLog(work / "append.sqlite") as log:
            def worker() -> None:
                for i in range(per_thread):
                    log.append(_entry(i))

            threads = [threading.Thread(target=worker) for _ in range(args.threads)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.perf_counter() - started
            result["appends"] = per_thread * args.threads
            result["threads"] = args.threads
            result["appends_per_s"] = round(per_thread * args.threads / took)
            print(f"{result['appends_per_s']:,} durable appends/s from {args.threads} threads",
                  file=sys.stderr)
        # A big log for verification, filled the fast way: many callers, large batches.
        with SqliteAuditLog(work / "verify.sqlite", max_batch=4096) as log:
            filler_threads = 64
            per = args.verify_size // filler_threads
            done = [0]

            def filler() -> None:
                for i in range(per):
                    log.append(_entry(i))
                    done[0] += 1

            threads = [threading.Thread(target=filler) for _ in range(filler_threads)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                print(f"\rfilling {done[0]:,}/{per * filler_threads:,}", end="", file=sys.stderr)
                time.sleep(1)
            print(file=sys.stderr)
            started = time.perf_counter()
            size = log.verify()
            result["verify_entries"] = size
            result["verify_seconds"] = round(time.perf_counter() - started, 2)
            print(f"verified {size:,} entries in {result['verify_seconds']} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
