"""Audit log figures: durable appends/s (group commit), p99 time to a durable index at the
gateway's peak request rate, inclusion proofs/s, and the time to verify the whole log.

    python bench/audit_log.py [--appends 40000] [--verify-size 1000000]
                              [--baseline DIR] [--postgres-url URL]

Appends are measured two ways on the same code: 16 threads each blocking in ``append`` (how
the gateway's worker threads call it), and thousands of coroutines awaiting ``append_async``
in one event loop. ``--baseline DIR`` runs the thread measurement again on another checkout
(e.g. ``git archive HEAD | tar -x -C DIR``) in a subprocess of the same run, for a side-by-side
before/after. Entries are built before the clock starts: an append is serializing, hashing,
sequencing and making durable an entry the caller already has. Every figure is from one run on
a shared 2-core machine; compare the columns as ratios.

Writes bench/out/audit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_CODE = Path(os.environ.get("AUDIT_BENCH_CODE", str(ROOT)))
sys.path.insert(0, str(_CODE))

from gateway.audit import AuditEntry, AuditLog, SqliteAuditLog, utc_timestamp  # noqa: E402

LogFactory = Callable[[Path], AuditLog]


def _entry(i: int) -> AuditEntry:
    return AuditEntry(
        ts=utc_timestamp(), actor=f"client-{i % 7}", role="insurer", org="ins-hmb-001",
        action="query.aggregate", purpose="hmb_pricing", decision="allow", status=200,
        request={"purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
                 "measures": [{"fn": "count"}], "filters": {"year": [2024]}},
        fields=["gend", "year"], cells_released=2, data_version="v-bench",
        response_hash="sha256:" + "ab" * 32,
    )


def _entries(n: int) -> list[AuditEntry]:
    # A few distinct entries reused: building 40,000 pydantic models would measure the GC.
    pool = [_entry(i) for i in range(64)]
    return [pool[i % 64] for i in range(n)]


def bench_threads(make: LogFactory, work: Path, appends: int, threads: int = 16) -> float:
    """Durable appends/s from ``threads`` threads each blocking in ``append``."""
    entries = _entries(appends)
    per = appends // threads
    with make(work / "threads.db") as log:
        def worker(t: int) -> None:
            for e in entries[t * per:(t + 1) * per]:
                log.append(e)

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        started = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return per * threads / (time.perf_counter() - started)


def bench_async(make: LogFactory, work: Path, appends: int,
                concurrency: int = 4096) -> dict[str, float]:
    """Durable appends/s from ``concurrency`` coroutines awaiting ``append_async``, and the
    CPU time per entry of the two threads doing the work (the callers' event loop, the
    sequencer): on a machine shared with other jobs the wall figure depends on how much CPU we
    got, the CPU figures much less, and 1 / the larger one is what two free cores sustain."""
    entries = _entries(appends)
    with make(work / "async.db") as log:
        sequencer = getattr(log, "_thread", None)
        clock = time.pthread_getcpuclockid(sequencer.ident) if sequencer and sequencer.ident \
            else None

        async def run() -> tuple[float, float, float]:
            it = iter(entries)

            async def worker() -> None:
                for e in it:
                    await log.append_async(e)

            seq0 = time.clock_gettime(clock) if clock is not None else 0.0
            cpu0 = time.thread_time()
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall = time.perf_counter() - started
            seq = (time.clock_gettime(clock) - seq0) if clock is not None else float("nan")
            return wall, time.thread_time() - cpu0, seq

        wall, callers, seq = asyncio.run(run())
    per = {"callers": callers / appends * 1e6, "sequencer": seq / appends * 1e6}
    return {"appends_per_s": round(appends / wall),
            "cpu_us_per_entry_callers": round(per["callers"], 1),
            "cpu_us_per_entry_sequencer": round(per["sequencer"], 1),
            "cpu_bound_appends_per_s": round(1e6 / max(per.values()))}


def bench_latency(make: LogFactory, work: Path, rate: int, seconds: float) -> dict[str, float]:
    """Open loop at ``rate`` appends/s: time from a request's arrival to its durable index."""
    entries = _entries(64)
    with make(work / f"latency-{rate}.db") as log:
        async def run() -> list[float]:
            waits: list[float] = []

            async def one(e: AuditEntry, due: float) -> None:
                await log.append_async(e)
                waits.append(time.perf_counter() - due)

            tasks = []
            start = time.perf_counter()
            sent = 0
            total = int(rate * seconds)
            while sent < total:
                now = time.perf_counter()
                due_count = min(total, int((now - start) * rate) + 1)
                while sent < due_count:  # arrivals scheduled by now, stamped at their due time
                    tasks.append(asyncio.ensure_future(
                        one(entries[sent % 64], start + sent / rate)))
                    sent += 1
                await asyncio.sleep(0.0005)
            await asyncio.gather(*tasks)
            return waits

        waits = sorted(asyncio.run(run()))
    def pick(q: float) -> float:
        return round(waits[min(len(waits) - 1, int(q * len(waits)))] * 1000, 2)

    return {"rate_per_s": rate, "p50_ms": pick(0.50), "p99_ms": pick(0.99),
            "max_ms": round(waits[-1] * 1000, 2)}


def fill(log: AuditLog, n: int) -> None:
    entries = _entries(min(n, 4096))
    if not hasattr(log, "append_async"):  # the code before: 64 blocking threads
        def filler(k: int) -> None:
            for i in range(k, n, 64):
                log.append(entries[i % len(entries)])

        pool = [threading.Thread(target=filler, args=(k,)) for k in range(64)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return

    async def run() -> None:
        async def worker(k: int) -> None:
            for i in range(k, n, 2048):
                await log.append_async(entries[i % len(entries)])

        await asyncio.gather(*(worker(k) for k in range(2048)))

    asyncio.run(run())


def bench_proofs(make: LogFactory, work: Path, size: int, seconds: float = 3.0,
                 threads: int = 4) -> float:
    """Inclusion proofs/s as ``GET /v1/audit/proof/inclusion`` builds them (proof, root, leaf
    hash of a random entry in the current tree), from ``threads`` threads."""
    with make(work / "proofs.db") as log:
        fill(log, size)
        stop = time.perf_counter() + seconds
        counts = [0] * threads

        def worker(t: int) -> None:
            rng = random.Random(t)
            n = log.size()
            while time.perf_counter() < stop:
                i = rng.randrange(n)
                if hasattr(log, "inclusion"):
                    log.inclusion(i, n)
                else:  # the code before: three reads
                    log.inclusion_proof(i, n)
                    log.root(n)
                    log.leaf_hash(i)
                counts[t] += 1

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        started = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return sum(counts) / (time.perf_counter() - started)


def bench_verify(make: LogFactory, work: Path, size: int) -> dict[str, float]:
    with make(work / "verify.db") as log:
        started = time.perf_counter()
        fill(log, size)
        filled = time.perf_counter() - started
        started = time.perf_counter()
        cpu = time.thread_time()
        verified = log.verify()
        # verify() runs in this thread; its CPU time is what a free core would take.
        return {"entries": verified, "seconds": round(time.perf_counter() - started, 2),
                "cpu_seconds": round(time.thread_time() - cpu, 2),
                "fill_appends_per_s": round(size / filled)}


def column(make: LogFactory, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["appends_per_s_16_threads"] = round(bench_threads(make, work, args.appends))
    print(f"  16 threads: {out['appends_per_s_16_threads']:,}/s", file=sys.stderr)
    out["async"] = bench_async(make, work, args.appends)
    print(f"  async: {out['async']}", file=sys.stderr)
    out["latency"] = [bench_latency(make, work, rate, args.latency_seconds)
                      for rate in args.rates]
    print(f"  latency: {out['latency']}", file=sys.stderr)
    out["inclusion_proofs_per_s"] = round(bench_proofs(make, work, args.proof_size))
    print(f"  proofs: {out['inclusion_proofs_per_s']:,}/s", file=sys.stderr)
    if args.verify_size:
        out["verify"] = bench_verify(make, work, args.verify_size)
        print(f"  verify: {out['verify']}", file=sys.stderr)
    return out


def baseline(code: Path, appends: int, proof_size: int) -> dict[str, Any]:
    """The thread and proof measurements on another checkout, in a subprocess of this run."""
    env = {**os.environ, "AUDIT_BENCH_CODE": str(code)}
    done = subprocess.run([sys.executable, __file__, "--only-threads", "--appends", str(appends),
                           "--proof-size", str(proof_size)],
                          env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=40_000)
    parser.add_argument("--rates", type=int, nargs="*", default=[1500, 5000])
    parser.add_argument("--latency-seconds", type=float, default=4.0)
    parser.add_argument("--proof-size", type=int, default=100_000)
    parser.add_argument("--verify-size", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=Path, help="checkout of the code before")
    parser.add_argument("--postgres-url", help="also measure PostgresAuditLog there")
    parser.add_argument("--only-threads", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gc.freeze()  # the bench's own objects are not the log's cost
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    try:
        sqlite: LogFactory = SqliteAuditLog
        if args.only_threads:
            print(json.dumps({
                "appends_per_s_16_threads": round(bench_threads(sqlite, work, args.appends)),
                "inclusion_proofs_per_s": round(bench_proofs(sqlite, work, args.proof_size)),
            }))
            return
        result: dict[str, Any] = {"appends": args.appends, "load_average_1m_at_start": load,
                                  "cpus": os.cpu_count()}
        if args.baseline is not None:
            print("baseline (before):", file=sys.stderr)
            result["before_sqlite"] = baseline(args.baseline, args.appends, args.proof_size)
            print(f"  {result['before_sqlite']}", file=sys.stderr)
        print("sqlite:", file=sys.stderr)
        result["sqlite"] = column(sqlite, work, args)
        if args.postgres_url:
            from gateway.audit.postgres import PostgresAuditLog

            url = args.postgres_url
            counter = iter(range(1_000_000))

            def postgres(_: Path) -> AuditLog:
                return PostgresAuditLog(url, schema=f"bench_{next(counter)}")

            print("postgres:", file=sys.stderr)
            pg_args = argparse.Namespace(**{**vars(args), "verify_size": 0})
            result["postgres"] = column(postgres, work, pg_args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
