"""Throughput of the production topology: SQLite vs PostgreSQL state, 2 vs 4 workers, in one run.

    python bench/topology.py [--persons 5000] [--seconds 6] [--checks 200] [--rounds 2]

Builds (or reuses) a demo city under bench/out/topology/, starts a throwaway PostgreSQL server
(tools/postgres.sh), and for each state backend and worker count starts
``gateway serve --workers N`` and drives it from a separate load process (``_load``, threads
with keep-alive connections, spread over the workers by the kernel):

* aggregate: ``POST /v1/query/aggregate`` for ``--seconds`` (token, policy, DuckDB,
  suppression, durable audit append);
* enrollment: ``--checks`` consented enrollment checks (``POST /v1/persons/enrollment``), each
  with its own single-use consent token (issued through ``POST /v1/consents`` before the clock
  starts) and a fresh DPoP proof: two replay-store writes, a consent read and an audit append
  per request.

Each configuration gets fresh state (a copy of the pristine SQLite file, or a new PostgreSQL
database holding the state and the audit log) and runs once per round, every other round in
reverse order. The load generator shares the machine's cores with the workers and the
database, so read the figures as ratios within one run. Results: bench/out/topology.json, chart
bench/out/topology.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving import free_port, wait_ready  # noqa: E402

OUT = ROOT / "bench" / "out"
WORKDIR = OUT / "topology"
QUERY = {"purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
         "measures": [{"fn": "count"}, {"fn": "sum", "field": "psn_part_amt"}],
         "filters": {"med_type": ["11"]}}
ENROLLMENT = "/v1/persons/enrollment"
ENROLLMENT_TYPES = ["enrollment.status", "enrollment.insutype", "enrollment.admdvs"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)



# -- the load process ---------------------------------------------------------------------------


def _token(base: str, client: dict[str, Any]) -> str:
    from gateway.cli.clients import request_token

    return request_token(base, client["client_id"], Path(client["private_key_path"]),
                         client["alg"])


def _dpop_proof(key: Any, jwk: dict[str, str], access_token: str, htu: str) -> str:
    import jwt

    from gateway.consent import access_token_hash

    claims = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": htu,
              "iat": int(time.time()), "ath": access_token_hash(access_token)}
    return jwt.encode(claims, key, algorithm="EdDSA",
                      headers={"typ": "dpop+jwt", "jwk": jwk})


def _issue_consents(base: str, creds: dict[str, Any], certnos: list[str], count: int,
                    threads: int) -> list[str]:
    """``count`` single-use enrollment consents bound to the insurer's DPoP key."""
    admin = _token(base, creds["clients"]["admin"])
    insurer = creds["clients"]["insurer"]
    tokens: list[str] = []
    lock = threading.Lock()

    def issue(part: range) -> None:
        with httpx.Client(base_url=base, timeout=60,
                          headers={"Authorization": f"Bearer {admin}"}) as http:
            for i in part:
                body = {"insurer": insurer["org"], "purpose": "enrollment_check",
                        "datatypes": ENROLLMENT_TYPES,
                        "period": {"start": "2020-01-01", "end": "2030-12-31"},
                        "valid_until": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
                        "dpop_jkt": insurer["dpop_jkt"], "certno": certnos[i % len(certnos)]}
                response = http.post("/v1/consents", json=body)
                if response.status_code != 201:
                    raise SystemExit(f"consent refused: {response.status_code} {response.text}")
                with lock:
                    tokens.append(response.json()["token"])

    workers = [threading.Thread(target=issue, args=(range(t, count, threads),))
               for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return tokens


def load(args: argparse.Namespace) -> None:
    """Runs in its own process; prints one JSON line with the result."""
    from gateway.auth.keys import load_private_key
    from gateway.consent import public_jwk

    creds = json.loads(Path(args.credentials).read_text("utf-8"))
    base = args.base
    insurer = creds["clients"]["insurer"]
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def count(status: int) -> None:
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    if args.workload == "aggregate":
        access = _token(base, insurer)
        stop_at = time.perf_counter() + args.seconds

        def run_aggregate() -> None:
            with httpx.Client(base_url=base, timeout=60,
                              headers={"Authorization": f"Bearer {access}"}) as http:
                while time.perf_counter() < stop_at:
                    count(http.post("/v1/query/aggregate", json=QUERY).status_code)

        started = time.perf_counter()
        threads = [threading.Thread(target=run_aggregate) for _ in range(args.threads)]
    else:
        consents = _issue_consents(base, creds, enrolled_certnos(), args.checks, args.threads)
        access = _token(base, insurer)
        key = load_private_key(Path(insurer["dpop_key_path"]))
        jwk = public_jwk(key.public_key())
        htu = base + ENROLLMENT
        queue = list(consents)

        def run_enrollment() -> None:
            with httpx.Client(base_url=base, timeout=60) as http:
                while True:
                    with lock:
                        if not queue:
                            return
                        consent = queue.pop()
                    headers = {"Authorization": f"Bearer {access}", "Consent": consent,
                               "DPoP": _dpop_proof(key, jwk, access, htu)}
                    count(http.post(ENROLLMENT, json={}, headers=headers).status_code)

        started = time.perf_counter()
        threads = [threading.Thread(target=run_enrollment) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    print(json.dumps({"ok": ok, "statuses": statuses, "seconds": elapsed,
                      "per_s": ok / elapsed}))


# -- the driver -----------------------------------------------------------------------------------


def enrolled_certnos(limit: int = 500) -> list[str]:
    """身份证号 of enrolled synthetic persons, read by the load process itself (never passed on
    a command line)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(WORKDIR / "raw" / "persons.parquet",
                          columns=["certno", "insu_end_date"])
    enrolled = table.filter(pc.is_null(table.column("insu_end_date")))
    return [str(c) for c in enrolled.column("certno").to_pylist()[:limit]]


def start_postgres() -> tuple[str, str]:
    data = tempfile.mkdtemp(prefix="gateway-bench-pg-")
    url = subprocess.run(["bash", str(ROOT / "tools" / "postgres.sh"), "start", data,
                          str(free_port())], check=True, capture_output=True,
                         text=True).stdout.strip()
    return data, url


def fresh_state(kind: str, pristine: Path, server: str) -> str | None:
    """Fresh state for one configuration; the state URL (None for SQLite)."""
    from gateway.state.postgres import PostgresStateStore
    from gateway.state.store import SqliteStateStore

    state_file = WORKDIR / "state.sqlite"
    copy_sqlite(pristine, state_file)
    if kind == "sqlite":
        return None
    import psycopg

    name = "bench_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{server.rpartition('/')[0]}/{name}"
    source = SqliteStateStore(state_file)
    target = PostgresStateStore(url)
    try:  # the same clients and grants as the SQLite file
        for client_id in ("demo-admin", "demo-insurer", "demo-insurer-b", "demo-auditor"):
            record = source.get_client(client_id)
            if record is not None:
                target.add_client(record)
        for grant in source.list_grants():
            target.add_grant(grant)
    finally:
        target.close()
    return url


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a WAL-mode database (the main file alone may lack recent
    commits)."""
    import sqlite3

    for suffix in ("", "-wal", "-shm"):
        Path(str(target) + suffix).unlink(missing_ok=True)
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def serve(port: int, workers: int, state_url: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    if state_url:  # the whole state on PostgreSQL: grants, consents, replay, audit log
        env["GATEWAY_STATE_URL"] = env["GATEWAY_AUDIT_URL"] = state_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--workdir", str(WORKDIR),
         "--port", str(port), "--workers", str(workers)], env=env,
        stdout=subprocess.DEVNULL, stderr=(WORKDIR / "serve.log").open("ab"))
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, 180, workers=workers)
    except SystemExit:
        proc.kill()
        raise SystemExit("gateway did not become ready; see "
                         + str(WORKDIR / "serve.log")) from None
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_load(workload: str, port: int, args: argparse.Namespace) -> Any:
    command = [sys.executable, __file__, "_load", "--workload", workload,
               "--base", f"http://127.0.0.1:{port}",
               "--credentials", str(WORKDIR / "credentials.json"),
               "--seconds", str(args.seconds), "--checks", str(args.checks),
               "--threads", str(args.threads)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"load process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean throughput per configuration over the rounds, and its ratio to SQLite with two
    workers (the embedded default) for the same workload."""
    rows: list[dict[str, Any]] = []
    for workload in ("aggregate", "enrollment"):
        base = None
        for kind in ("sqlite", "postgresql"):
            for workers in (2, 4):
                runs = [r["per_s"] for r in results if (r["workload"], r["state"],
                                                         r["workers"]) == (workload, kind,
                                                                           workers)]
                mean = sum(runs) / len(runs)
                base = base or mean
                rows.append({"workload": workload, "state": kind, "workers": workers,
                             "per_s": mean, "rounds": [round(x, 1) for x in runs],
                             "vs_sqlite_2": mean / base})
    return rows


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, workload, title in ((axes[0], "aggregate", "aggregate query"),
                                (axes[1], "enrollment", "consented enrollment check")):
        rows = [r for r in results if r["workload"] == workload]
        labels = [f"{r['state']}\n{r['workers']} workers" for r in rows]
        values = [r["per_s"] for r in rows]
        colors = ["#4C72B0" if r["state"] == "sqlite" else "#DD8452" for r in rows]
        ax.bar(labels, values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        ax.set_title(title)
        for i, r in enumerate(rows):
            ax.plot([i] * len(r["rounds"]), r["rounds"], "k.", alpha=0.6)
        ax.set_ylabel("requests/s (200 OK), mean of rounds")
    fig.suptitle("State backend and worker count, one run on this machine (dots: rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "_load"])
    parser.add_argument("--persons", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workload", choices=["aggregate", "enrollment"])
    parser.add_argument("--base")
    parser.add_argument("--credentials")
    args = parser.parse_args()
    if args.mode == "_load":
        load(args)
        return

    started = time.perf_counter()
    port = free_port()
    say(f"[setup] demo city of {args.persons:,} persons under {WORKDIR}")
    from gateway.cli.demo import prepare_demo

    prepare_demo(persons=args.persons, seed=7, port=port, workdir=WORKDIR)
    pristine = WORKDIR / "state.pristine.sqlite"
    copy_sqlite(WORKDIR / "state.sqlite", pristine)
    say("[setup] starting PostgreSQL (tools/postgres.sh)")
    pg_dir, server = start_postgres()
    results: list[dict[str, Any]] = []
    configs = [(kind, workers) for kind in ("sqlite", "postgresql") for workers in (2, 4)]
    try:
        for round_no in range(1, args.rounds + 1):
            # Every other round in reverse order, so a drift in the machine's load (other
            # processes share these cores) weighs on every configuration alike.
            for kind, workers in configs if round_no % 2 else configs[::-1]:
                state_url = fresh_state(kind, pristine, server)
                say(f"[round {round_no}: {kind}, {workers} workers] "
                    f"gateway serve --workers {workers}")
                proc = serve(port, workers, state_url)
                try:
                    for workload in ("aggregate", "enrollment"):
                        result = run_load(workload, port, args)
                        results.append({"round": round_no, "state": kind, "workers": workers,
                                        "workload": workload, **result})
                        say(f"    {workload:10s} {result['per_s']:8.1f} req/s "
                            f"({result['ok']} OK in {result['seconds']:.1f} s, "
                            f"statuses {result['statuses']})")
                finally:
                    stop(proc)
    finally:
        subprocess.run(["bash", str(ROOT / "tools" / "postgres.sh"), "stop", pg_dir],
                       check=False, capture_output=True)
        shutil.rmtree(pg_dir, ignore_errors=True)
        copy_sqlite(pristine, WORKDIR / "state.sqlite")
    summary = summarize(results)
    for row in summary:
        say(f"{row['workload']:10s} {row['state']:10s} {row['workers']} workers: "
            f"{row['per_s']:7.1f} req/s (rounds {row['rounds']}), "
            f"{row['vs_sqlite_2']:.2f}x sqlite/2 workers")
    OUT.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "persons": args.persons, "seconds": args.seconds, "checks": args.checks,
        "threads": args.threads, "rounds": args.rounds, "summary": summary,
        "results": results,
        "note": "load generator, workers and PostgreSQL share the same cores; compare "
                "ratios within this run",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (OUT / "topology.json").write_text(json.dumps(report, indent=2), "utf-8")
    chart(summary, OUT / "topology.png")
    say(f"wrote {OUT / 'topology.json'} and {OUT / 'topology.png'} "
        f"in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
