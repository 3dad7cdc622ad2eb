"""One grant rate-limit take: the shared limit as the gateway keeps it (one GCRA upsert in the
state store, ``StateStore.take_rate``) side by side with the per-worker token bucket it
replaced, in one run.

    python bench/rate_limit.py [--n 20000] [--rounds 5] [--postgres-url URL]

Modes, measured in interleaved rounds so that other load on the machine falls on all alike
(compare the ratios, not the absolute times, on a busy machine):

* ``in_process``: the removed in-process token bucket (a dict and a lock), kept here only as
  the baseline;
* ``sqlite``: ``take_rate`` on SQLite as shipped (a counter commit: ``synchronous=NORMAL``);
* ``sqlite_durable``: the same statement in an ordinary durable write transaction
  (``synchronous=FULL``: the WAL synced before COMMIT returns), what the counter commit saves;
* ``postgresql`` and ``postgresql_durable`` with ``--postgres-url`` (``synchronous_commit=off``
  for the take's transaction, or not).

Each take is allowed (the clock advances one interval per take); ``*_refused`` is a take past
the limit (the upsert changes nothing, then one read for ``Retry-After``). Also: takes/s from 4
threads on one key (SQLite). Writes bench/out/rate_limit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.state.postgres import PostgresStateStore  # noqa: E402
from gateway.state.ratelimits import MINUTE_NS  # noqa: E402
from gateway.state.store import Cursor, SqliteStateStore, StateStore  # noqa: E402

PER_MINUTE = 600
INTERVAL = MINUTE_NS // PER_MINUTE


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class InProcessBucket:
    """The per-worker limiter the gateway had (gateway/service/gateway.py before the shared
    limit), for the baseline only."""

    buckets: dict[str, _Bucket] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: str, per_minute: int, now: float) -> bool:
        with self.lock:
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = _Bucket(tokens=float(per_minute), updated=now)
            bucket.tokens = min(
                float(per_minute), bucket.tokens + (now - bucket.updated) * per_minute / 60.0)
            bucket.updated = now
            if bucket.tokens < 1.0:
                return False
            bucket.tokens -= 1.0
            return True


class DurableSqlite(SqliteStateStore):
    """The take in an ordinary write transaction (synchronous=FULL), for comparison."""

    def _counter_tx(self) -> Any:
        return self._tx(write=True)


class DurablePostgres(PostgresStateStore):
    """The take without ``synchronous_commit=off``, for comparison."""

    @contextmanager
    def _counter_tx(self) -> Iterator[Cursor]:
        with self._transaction(lock=False) as cur:
            yield cur


def _timed(take: Callable[[int], object], n: int) -> list[int]:
    out = []
    now = time.time_ns()
    for i in range(n):
        t0 = time.perf_counter_ns()
        take(now + i * INTERVAL)
        out.append(time.perf_counter_ns() - t0)
    return out


def _modes(stores: dict[str, StateStore]) -> dict[str, Callable[[int], object]]:
    bucket = InProcessBucket()
    modes: dict[str, Callable[[int], object]] = {
        "in_process": lambda now: bucket.take("grant:bench", PER_MINUTE, now / 1e9)}
    for name, store in stores.items():
        key = f"grant:bench-{uuid.uuid4().hex[:8]}"
        modes[name] = lambda now, s=store, k=key: s.take_rate(k, PER_MINUTE, now)
    for name in ("sqlite", "postgresql"):
        if name in stores:
            full = f"grant:full-{uuid.uuid4().hex[:8]}"
            stores[name].take_rate(full, 1, 0)  # spent: every later take at 0 is refused
            modes[f"{name}_refused"] = lambda _, s=stores[name], k=full: s.take_rate(k, 1, 0)
    return modes


def _threaded(store: StateStore, threads: int, per_thread: int) -> float:
    key = f"grant:threads-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(threads + 1)
    now = time.time_ns()

    def run(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            store.take_rate(key, PER_MINUTE, now + (i * threads + t) * INTERVAL)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return threads * per_thread / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="takes per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres-url", help="a database to add the rate_limits table to")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-rate-"))
    stores: dict[str, StateStore] = {
        "sqlite": SqliteStateStore(tmp / "state.sqlite"),
        "sqlite_durable": DurableSqlite(tmp / "state.sqlite"),
    }
    if args.postgres_url:
        stores["postgresql"] = PostgresStateStore(args.postgres_url)
        stores["postgresql_durable"] = DurablePostgres(args.postgres_url)
    modes = _modes(stores)
    samples: dict[str, list[int]] = {name: [] for name in modes}
    for take in modes.values():  # warm up: connections, statement caches
        _timed(take, 200)
    for _ in range(args.rounds):
        for name, take in modes.items():
            n = args.n if not name.startswith("postgresql") else max(1, args.n // 10)
            samples[name] += _timed(take, n)
    results: dict[str, Any] = {}
    base = statistics.fmean(samples["in_process"])
    for name, got in samples.items():
        got.sort()
        results[name] = {
            "n": len(got),
            "mean_us": round(statistics.fmean(got) / 1000, 2),
            "p50_us": round(got[len(got) // 2] / 1000, 2),
            "p99_us": round(got[int(len(got) * 0.99)] / 1000, 2),
            "x_in_process_mean": round(statistics.fmean(got) / base, 1),
        }
    threads = {f"sqlite_{t}_threads_takes_per_s": round(_threaded(stores["sqlite"], t, 2000))
               for t in (1, 4)}
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "per_minute": PER_MINUTE, "rounds": args.rounds, "modes": results, **threads,
    }
    for store in stores.values():
        store.close()
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "rate_limit.json").write_text(json.dumps(out, indent=2))
    print(f"{'mode':<22}{'mean µs':>10}{'p50 µs':>10}{'p99 µs':>10}{'× bucket':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['mean_us']:>10}{r['p50_us']:>10}{r['p99_us']:>10}"
              f"{r['x_in_process_mean']:>10}")
    for name, rate in threads.items():
        print(f"{name}: {rate:,}")


if __name__ == "__main__":
    main()
