"""Consented enrollment checks (投保身份校验) through HTTP, as deployed: ``gateway serve
--workers 2`` (uvicorn, a listener per worker), every request carrying an access token, a
single-use consent token and a fresh DPoP proof, every one verified, decided by the policy and
audited durably before it answers.

    python bench/enrollment_http.py [--persons 100000] [--duration 10] [--warmup 3]
                                    [--connections 8,16,32] [--repeat 1] [--workdir DIR]
                                    [--before DIR]

``--before DIR`` (a checkout of an earlier commit: ``git worktree add DIR REV``) measures that
checkout's server too, alternating with this one's at each connection count, side by side in
one run. Its state is prepared by this checkout, so the earlier one must share this one's
state schema; across a migration, run each checkout's own benchmark on a ``--workdir`` of its
own, alternating (docs/benchmarks.md, session 7).

``--repeat N`` measures each level N times, each on a fresh server with fresh consents but on
the same state and audit log, as a gateway left running sees them: from about ten minutes in,
the single-use ids of the first runs expire and are purged while later runs are measured. The
goal is about a sustained rate, and one run on two shared cores is noisy, so the summary
gives each level's median and how many runs met both figures.

Load comes from a second process, ``wrk`` (Debian package ``wrk``, closed loop: a fixed number
of connections, each sending its next request when the answer arrives), with a Lua script that
replays pre-built requests: each has its own consent (single use) and its own DPoP proof
(``jti`` spent once), so wrk only sends bytes and the server does all the work. Consents are
recorded through the gateway's own use case (audited) before the clock starts; proofs are
signed just before each run (DPoP ``iat`` must be under 60 s old).

After each run the audit log is counted: every 200 the client saw must be one ``allow`` entry.
Goal (docs/benchmarks.md): >= 1,500 requests/s sustained, p99 <= 25 ms, on this 2-core machine
where the load generator shares the two cores with the two workers. Writes
bench/out/enrollment.json (and a .log of progress) and a chart, bench/out/enrollment.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving import free_port, wait_ready  # noqa: E402
from gateway.auth.keys import load_or_create_private_key, public_key_pem  # noqa: E402
from gateway.auth.tokens import Principal  # noqa: E402
from gateway.cli.clients import register_client  # noqa: E402
from gateway.consent import access_token_hash, jwk_thumbprint, public_jwk  # noqa: E402
from gateway.ingest.pseudonym import load_or_create_key  # noqa: E402
from gateway.service.consents import (  # noqa: E402
    IDENTITY_PUBLIC_KEY_FILE,
    LOOKUP_KEY_FILE,
)
from gateway.settings import Settings  # noqa: E402

PATH = "/v1/persons/enrollment"
GOAL_REQ_PER_S = 1500
GOAL_P99_MS = 25.0
# Proofs are signed before a run and a DPoP proof is fresh for 60 s (gateway.consent.dpop):
# a longer run would end on refusals, counted as requests.
MAX_DURATION_S = 50
OUT = ROOT / "bench" / "out"
INSURER_ORG = "ins-bench"
ADMIN = Principal(client_id="bench-admin", role="admin", org=None,
                  token_id="bench")  # noqa: S106 - an id, not a secret
INSURER = Principal(client_id="bench-insurer", role="insurer", org=INSURER_ORG,
                    token_id="bench")  # noqa: S106 - an id, not a secret

LUA = r"""
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  auth = "Bearer " .. args[2]
  lines = {}
  for line in io.lines(args[1] .. "." .. id) do
    local consent, proof = line:match("([^\t]+)\t([^\t]+)")
    lines[#lines + 1] = {consent, proof}
  end
  i = 0
end
function request()
  i = i + 1
  local pair = lines[((i - 1) % #lines) + 1]
  return wrk.format("POST", "/v1/persons/enrollment", {
    ["Authorization"] = auth, ["Consent"] = pair[1], ["DPoP"] = pair[2],
    ["Content-Type"] = "application/json"}, "{}")
end
function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, non2xx,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""

_LOG: list[str] = []


def say(message: str) -> None:
    line = f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}"
    _LOG.append(line)
    print(line, file=sys.stderr, flush=True)



def prepare(workdir: Path, persons: int, seed: int, base_url: str) -> Settings:
    """A loaded city (with the certno lookup), keys and the two clients."""
    from gateway.ingest.pipeline import ingest
    from gateway.query.store import StoreLayout
    from gateway.synth import generate_city

    settings = Settings(workdir=workdir, base_url=base_url)
    workdir.mkdir(parents=True, exist_ok=True)
    load_or_create_private_key(settings.signing_key_path, "EdDSA")
    key = load_or_create_key(settings.pseudonym_key_path)
    load_or_create_private_key(settings.consent_key_path, "EdDSA")
    load_or_create_key(settings.consent_pairwise_key_path)
    lookup_key = load_or_create_key(settings.keys_dir / LOOKUP_KEY_FILE)
    idp = load_or_create_private_key(workdir / "idp.pem", "EdDSA")
    (settings.keys_dir / IDENTITY_PUBLIC_KEY_FILE).write_text(public_key_pem(idp), "ascii")
    raw = workdir / "raw"
    if not (raw / "persons.parquet").exists():
        say(f"generating a city of {persons:,} persons")
        generate_city(raw, persons=persons, seed=seed, progress=False)
    if StoreLayout(settings.store_dir).current_version() is None:
        say("loading it (with the keyed certno lookup)")
        report = ingest(raw / "persons.parquet", raw / "settlements.parquet",
                        store_dir=settings.store_dir, key=key, lookup_key=lookup_key)
        say(f"  {report.persons:,} persons, {report.settlements:,} settlements")
    from gateway.state.store import open_state_store

    state = open_state_store(settings.state_url, settings.state_path)
    try:
        for principal in (ADMIN, INSURER):
            if state.get_client(principal.client_id) is None:
                register_client(settings, client_id=principal.client_id, role=principal.role,
                                org=principal.org, alg="EdDSA",
                                key_path=workdir / "clients" / f"{principal.client_id}.pem")
    finally:
        state.close()
    return settings


def enrolled_persons(settings: Settings, n: int) -> list[int]:
    """Store pseudonyms of ``n`` enrolled persons (the bench is the agency: it derives them
    from psn_no with the ingest key, as the load did)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gateway.ingest.pseudonym import pseudonym

    key = load_or_create_key(settings.pseudonym_key_path)
    table = pq.read_table(settings.workdir / "raw" / "persons.parquet",
                          columns=["psn_no", "insu_end_date"])
    psn_nos = table.filter(pc.is_null(table.column("insu_end_date"))).column("psn_no")
    values = psn_nos.slice(0, min(n, len(psn_nos))).to_pylist()
    return [pseudonym(key, values[i % len(values)]) for i in range(n)]


def dated_back(now: float, spread_s: float, i: int, count: int) -> float:
    """When item ``i`` of ``count`` (used in that order) is dated: up to ``spread_s`` back,
    the first used the oldest, so ids used later expire later, as if each were made shortly
    before its use (dated alike, a run's ids would all expire in one instant)."""
    return now - spread_s * (count - 1 - i) / max(count, 1)


def issue_consents(settings: Settings, count: int, jkt: str,
                   spread_s: float) -> tuple[list[str], str, float]:
    """``count`` single-use enrollment consents: the records stored in one transaction
    (``add_consents``), each token issued and signed as ``POST /v1/consents`` does. Setup, not
    measured: the API path records consents one by one, audited. Returns the tokens, an
    insurer access token, and consents/s.

    Tokens are dated back over ``spread_s`` (:func:`dated_back`): dated alike, a run's tokens
    expired in one instant ten minutes on, a purge load no steady service makes."""
    from gateway.consent import ConsentRecord, issue_consent_token
    from gateway.service.bootstrap import build_gateway
    from gateway.service.consents import MAX_TOKEN_LIFETIME, subject_from_psn_id

    gateway = build_gateway(settings)
    try:
        config = gateway._consent_config()  # the bench reuses the wiring
        now = time.time()
        now_dt = datetime.fromtimestamp(int(now - spread_s) - 1, tz=UTC)
        records, tokens = [], []
        started = time.perf_counter()
        for i, psn_id in enumerate(enrolled_persons(settings, count)):
            record = ConsentRecord(
                consent_id="cst-" + secrets.token_hex(12), subject=subject_from_psn_id(psn_id),
                insurer_org=INSURER_ORG, purpose="enrollment_check",
                datatypes=("enrollment.admdvs", "enrollment.insutype", "enrollment.status"),
                period_start=datetime(2020, 1, 1).date(), period_end=datetime(2030, 12, 31).date(),
                valid_from=now_dt, valid_until=now_dt + timedelta(days=1),
                created_by=ADMIN.client_id, created_at=now_dt, single_use=True)
            records.append(record)
            tokens.append(issue_consent_token(
                record, key_set=config.key_set, issuer=config.issuer, audience=config.issuer,
                client_id=INSURER_ORG, cnf_jkt=jkt, now=dated_back(now, spread_s, i, count),
                max_lifetime=MAX_TOKEN_LIFETIME,
                pairwise_key=config.pairwise_key))
        gateway.state.add_consents(records)
        rate = count / (time.perf_counter() - started)
        access = gateway.tokens.issue(INSURER)
    finally:
        gateway.audit.close()
    return tokens, access, rate


def write_requests(prefix: Path, tokens: list[str], access: str, dpop_key: Any,
                   base_url: str, threads: int, spread_s: int) -> None:
    """One file per wrk thread: consent token and a fresh DPoP proof per line, dated back over
    ``spread_s`` (:func:`dated_back`)."""
    jwk = public_jwk(dpop_key.public_key())
    ath = access_token_hash(access)
    now = int(time.time())
    count = len(tokens)
    files = [open(f"{prefix}.{t}", "w", encoding="ascii") for t in range(threads)]  # noqa: SIM115
    try:
        for i, token in enumerate(tokens):
            proof = jwt.encode({"jti": secrets.token_urlsafe(12), "htm": "POST",
                                "htu": base_url + PATH,
                                "iat": int(dated_back(now, spread_s, i, count)),
                                "ath": ath},
                               dpop_key, algorithm="EdDSA",
                               headers={"typ": "dpop+jwt", "jwk": jwk})
            files[i % threads].write(f"{token}\t{proof}\n")
    finally:
        for fh in files:
            fh.close()


def count_audited(settings: Settings) -> dict[str, int]:
    with sqlite3.connect(settings.audit_path) as conn:
        rows = conn.execute(
            "SELECT json_extract(entry_json, '$.decision'), count(*) FROM audit_entries "
            "WHERE json_extract(entry_json, '$.action') = 'persons.enrollment' GROUP BY 1"
        ).fetchall()
    return {str(k): int(v) for k, v in rows}


def serve(settings: Settings, port: int, workers: int,
          code: Path | None = None) -> subprocess.Popen[bytes]:
    """``gateway serve`` of this checkout, or of the checkout ``code`` (an earlier commit, for
    a before/after run: its package first on the path)."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    # `python -m` puts its working directory first on the path: run in the checkout served.
    # Its messages go to a file: an unread pipe, once full, would stall a worker that logs.
    with open(settings.workdir / "serve.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", "serve", "--workdir",
             str(settings.workdir), "--port", str(port), "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=code or ROOT)
    try:
        if code is None:
            wait_ready(f"http://127.0.0.1:{port}", proc, 120, workers=workers)
        else:  # an earlier server may share one socket: ready, then time for every worker
            wait_ready(f"http://127.0.0.1:{port}", proc, 120)
            time.sleep(3)
    except SystemExit:
        proc.terminate()
        raise
    return proc


def _workers(server_pid: int) -> set[int]:
    """Process ids of the server's children (its workers and multiprocessing's helper)."""
    return {int(pid) for task in Path(f"/proc/{server_pid}/task").iterdir()
            for pid in (task / "children").read_text().split()}


def _tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its live descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def connections_by_worker(server_pid: int, port: int) -> list[int]:
    """How many of the established connections to ``port`` each worker process of the
    server holds, smallest first (the kernel spreads them: gateway.cli.listeners)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as fh:
        inodes = {parts[9] for line in fh.readlines()[1:]
                  if (parts := line.split())[1] == local and parts[3] == "01"}
    held = []
    for child in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()]
        except OSError:
            continue
        count = sum(1 for link in links if link.startswith("socket:[")
                    and link[8:-1] in inodes)
        if count:
            held.append(count)
    return sorted(held)


def run_wrk(script: Path, prefix: Path, access: str, base_url: str, connections: int,
            duration: int, threads: int, server_pid: int | None = None) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    load = subprocess.Popen(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
         "-s", str(script), base_url, "--", str(prefix), access],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    split: list[int] = []
    if server_pid is not None:  # once the connections are open: which worker holds how many
        time.sleep(min(2.0, duration / 2))
        split = connections_by_worker(server_pid, int(base_url.rsplit(":", 1)[1]))
    stdout, stderr = load.communicate()
    if load.returncode != 0:
        raise SystemExit(f"wrk failed: {stderr.strip()}")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    result["req_per_s"] = result["requests"] / (result["duration_us"] / 1e6)
    if server_pid is not None:
        result["connections_by_worker"] = split
    return result


def _code(run: dict[str, Any]) -> str:
    return str(run.get("code", "this checkout"))


def _met(run: dict[str, Any]) -> bool:
    return bool(run["req_per_s"] >= GOAL_REQ_PER_S and run["p99_us"] / 1000 <= GOAL_P99_MS)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per server and connection count: how many runs, the median rate and p99, the range,
    and how many runs met both figures of the goal."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((_code(run), run["connections"]), []).append(run)
    out = []
    for (code, connections), mine in groups.items():
        rates = [r["req_per_s"] for r in mine]
        p99s = [r["p99_us"] / 1000 for r in mine]
        out.append({"code": code, "connections": connections, "runs": len(mine),
                    "req_per_s_median": round(statistics.median(rates)),
                    "req_per_s_range": [round(min(rates)), round(max(rates))],
                    "p99_ms_median": round(statistics.median(p99s), 1),
                    "p99_ms_range": [round(min(p99s), 1), round(max(p99s), 1)],
                    "met_goal": sum(_met(r) for r in mine)})
    return out


def plot_runs(runs: list[dict[str, Any]], path: Path) -> None:
    """Requests/s and p99 latency by connections, against the goals (1,500/s, 25 ms): a bar
    for each level's median, a dot for each run; with before/after runs, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')", file=sys.stderr)
        return
    levels = sorted({r["connections"] for r in runs})
    codes = list(dict.fromkeys(_code(r) for r in runs))
    width = 0.8 / len(codes)
    colors = {"before": "#b0b0b0"}
    fig, (rate, tail) = plt.subplots(1, 2, figsize=(9, 3.4))
    labelled: set[str] = set()  # one legend entry per series
    for k, code in enumerate(codes):
        for i, level in enumerate(levels):
            mine = [r for r in runs if _code(r) == code and r["connections"] == level]
            if not mine:
                continue
            x = i + (k - (len(codes) - 1) / 2) * width
            bar_label = None if code in labelled else f"{code} (median)"
            dot_label = None if len(mine) < 2 or "dots" in labelled else "each run"
            labelled.add(code)
            if dot_label:
                labelled.add("dots")
            for axis, values, color in (
                    (rate, [r["req_per_s"] for r in mine], colors.get(code, "#4878a8")),
                    (tail, [r["p99_us"] / 1000 for r in mine], colors.get(code, "#55a868"))):
                axis.bar(x, statistics.median(values), width, color=color,
                         label=bar_label)
                if len(values) > 1:
                    axis.scatter([x] * len(values), values, s=9, color="#222222", zorder=3,
                                 label=dot_label)
    for axis in (rate, tail):
        axis.set_xticks(range(len(levels)), [str(c) for c in levels])
    rate.axhline(GOAL_REQ_PER_S, color="#c44e52", linestyle="--", linewidth=1,
                 label=f"goal {GOAL_REQ_PER_S:,}/s")
    rate.set_xlabel("wrk connections")
    rate.set_ylabel("consented checks / s")
    rate.legend(fontsize=7)
    tail.axhline(GOAL_P99_MS, color="#c44e52", linestyle="--", linewidth=1,
                 label=f"goal p99 {GOAL_P99_MS:g} ms")
    tail.set_xlabel("wrk connections")
    tail.set_ylabel("p99 latency (ms)")
    tail.legend(fontsize=7)
    fig.suptitle("POST /v1/persons/enrollment, 2 workers, every check audited durably",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(settings: Settings, args: argparse.Namespace, code: Path | None,
            connections: int, script: Path, dpop_key: Any, jkt: str,
            port: int) -> dict[str, Any]:
    """One run at ``connections``: fresh consents, a fresh server (of ``code``, or this
    checkout), warm-up, the measured run, the bare endpoint on the same server, the audit
    count."""
    base_url = f"http://127.0.0.1:{port}"
    count = args.max_rate * (args.duration + args.warmup)
    say(f"recording {count:,} single-use consents")
    tokens, access, consent_rate = issue_consents(settings, count, jkt,
                                                  spread_s=args.duration + args.warmup)
    warm = args.max_rate * args.warmup
    say(f"  {consent_rate:,.0f} consents/s")
    before = count_audited(settings)
    proc = serve(settings, port, args.workers, code)
    workdir = settings.workdir
    try:
        # Proofs last 60 s: sign them now, just before the run.
        prefix = workdir / "requests"
        if args.warmup:
            write_requests(workdir / "warmup", tokens[:warm], access, dpop_key, base_url,
                           args.threads, spread_s=0)
            say(f"warm-up: {connections} connections, {args.warmup} s (not counted)")
            run_wrk(script, workdir / "warmup", access, base_url, connections,
                    args.warmup, args.threads)
        write_requests(prefix, tokens[warm:], access, dpop_key, base_url, args.threads,
                       spread_s=args.duration // 4)
        say(f"wrk: {connections} connections, {args.duration} s, {args.workers} workers"
            + (f", server of {code}" if code else ""))
        warmed = count_audited(settings).get("allow", 0) - before.get("allow", 0)
        cpu_before = _tree_cpu_s(proc.pid)
        workers_before = _workers(proc.pid)
        result = run_wrk(script, prefix, access, base_url, connections, args.duration,
                         args.threads, server_pid=proc.pid)
        server_cpu = _tree_cpu_s(proc.pid) - cpu_before
        # A worker that died and was restarted during the run makes it not a measurement.
        result["workers_restarted"] = len(workers_before - _workers(proc.pid))
        # Same server, same connections, a bare endpoint: the machine's load today, so the
        # consented figure can be read as a ratio.
        bare = subprocess.run(
            [shutil.which("wrk") or "wrk", f"-t{args.threads}", f"-c{connections}",
             f"-d{max(3, args.duration // 2)}s", base_url + "/healthz"],
            capture_output=True, text=True, check=True).stdout
        bare_rate = float(next(ln for ln in bare.splitlines()
                               if ln.startswith("Requests/sec")).split()[1])
        result["healthz_req_per_s_same_run"] = round(bare_rate)
        result["ratio_to_healthz"] = round(result["req_per_s"] / bare_rate, 4)
        result["server_cpu_ms_per_request"] = round(
            server_cpu * 1000 / max(result["requests"], 1), 3)
        with open("/proc/loadavg", encoding="ascii") as fh:
            result["loadavg_after"] = fh.read().split()[:3]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    after = count_audited(settings)
    allowed = after.get("allow", 0) - before.get("allow", 0) - warmed
    result.update({"connections": connections, "workers": args.workers,
                   "warmup_s": args.warmup,
                   "audited_allow": allowed,
                   "audited_other": (sum(after.values()) - sum(before.values())
                                     - allowed - warmed),
                   "consents_per_s_setup": round(consent_rate)})
    say(f"  {result['req_per_s']:,.0f} req/s, p50 {result['p50_us'] / 1000:.1f} ms, "
        f"p99 {result['p99_us'] / 1000:.1f} ms, non-2xx {result['non_2xx']}, "
        f"server CPU {result['server_cpu_ms_per_request']:.2f} ms/req, "
        f"healthz {result['healthz_req_per_s_same_run']:,} req/s, "
        f"audited allow {allowed:,}, connections by worker "
        f"{result['connections_by_worker']}"
        + (f", WORKERS RESTARTED {result['workers_restarted']}"
           if result["workers_restarted"] else ""))
    return result


def signature_check_us(rounds: int = 3000) -> dict[str, float]:
    """One Ed25519 check of a consent-token-sized message, OpenSSL (``cryptography``) and
    libsodium (what the gateway uses, ``gateway.consent.keys.ed25519_verify``), side by side,
    median of 5 alternating rounds (µs each)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.consent.keys import ed25519_verify

    key = Ed25519PrivateKey.generate()
    public, message = key.public_key(), secrets.token_bytes(700)
    signature = key.sign(message)
    timings: dict[str, list[float]] = {"openssl": [], "libsodium": []}
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            public.verify(signature, message)
        timings["openssl"].append((time.process_time() - started) / rounds * 1e6)
        started = time.process_time()
        for _ in range(rounds):
            ed25519_verify(public, signature, message)
        timings["libsodium"].append((time.process_time() - started) / rounds * 1e6)
    out = {name: round(statistics.median(values), 1) for name, values in timings.items()}
    out["ratio_libsodium_to_openssl"] = round(out["libsodium"] / out["openssl"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3,
                        help="seconds of load before each measured run (not counted)")
    parser.add_argument("--connections", default="8,16,32")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs at each connection count (a fresh server each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--max-rate", type=int, default=2500,
                        help="consents prepared per second of a run (single use)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--before", type=Path, default=None,
                        help="a checkout of an earlier commit (git worktree add DIR REV): its "
                             "server is measured too, alternating with this one's")
    parser.add_argument("--replot", type=Path, help="only redraw the chart from a results file")
    args = parser.parse_args()
    if not 1 <= args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be 1..{MAX_DURATION_S} s: requests are signed before "
                     "a run and a DPoP proof is fresh for 60 s")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.replot is not None:
        plot_runs(json.loads(args.replot.read_text("utf-8"))["runs"],
                  args.replot.with_suffix(".png"))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="enroll-bench-"))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    OUT.mkdir(parents=True, exist_ok=True)
    settings = prepare(workdir.resolve(), args.persons, args.seed, base_url)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    dpop_key = Ed25519PrivateKey.generate()
    jkt = jwk_thumbprint(public_jwk(dpop_key.public_key()))
    script = workdir / "enrollment.lua"
    script.write_text(LUA, "utf-8")
    runs = []
    variants: list[tuple[str, Path | None, Settings]] = [("after", None, settings)]
    if args.before is not None:
        # Side by side in one run, alternating at each level; each server with a state and an
        # audit log of its own (the same city, seed and keys' kinds), so neither inherits the
        # other's leftovers (the earlier one replays its alert state at every start).
        before = prepare((workdir / "before").resolve(), args.persons, args.seed, base_url)
        (workdir / "before" / "enrollment.lua").write_text(LUA, "utf-8")
        variants.insert(0, ("before", args.before.resolve(), before))
    for connections in (int(c) for c in args.connections.split(",")):
        for repeat in range(args.repeat):
            for code, code_dir, where in variants:
                if args.repeat > 1:
                    say(f"run {repeat + 1} of {args.repeat}")
                result = measure(where, args, code_dir, connections,
                                 where.workdir / "enrollment.lua", dpop_key, jkt, port)
                result["repeat"] = repeat
                if args.before is not None:
                    result["code"] = code
                runs.append(result)
    summary = summarise(runs)
    for level in summary:
        say(f"{level['code']}, {level['connections']} connections, {level['runs']} run(s): "
            f"median {level['req_per_s_median']:,} req/s, p99 {level['p99_ms_median']} ms; "
            f"goal met in {level['met_goal']} of {level['runs']}")
    report = {
        "benchmark": "consented enrollment checks over HTTP",
        "signature_check_us": signature_check_us(),
        "when": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "persons": args.persons,
        "load_tool": "wrk 4.1.0 (Debian), closed loop, Lua replay of pre-built requests",
        "server": f"gateway serve --workers {args.workers} (uvicorn), SQLite state and audit",
        "goal": {"req_per_s": GOAL_REQ_PER_S, "p99_ms": GOAL_P99_MS},
        "duration_s": args.duration,
        "summary": summary,
        "runs": runs,
        "note": "load generator and both workers share the machine's 2 cores: compare runs "
                "of one file (before/after, healthz) as ratios",
    }
    (OUT / "enrollment.json").write_text(json.dumps(report, indent=1) + "\n", "utf-8")
    plot_runs(runs, OUT / "enrollment.png")
    (OUT / "enrollment.log").write_text("\n".join(_LOG) + "\n", "utf-8")
    say(f"wrote {OUT / 'enrollment.json'}")


if __name__ == "__main__":
    main()
