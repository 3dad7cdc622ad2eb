"""One policy decision: embedded regorus (VM and interpreter) vs the real OPA server, side by
side in one run, plus where the embedded decision's time goes.

    python bench/policy_decision.py [--grants 100] [--n 20000] [--opa-n 4000]

A realistic aggregate-query input against a data document with ``--grants`` grants. The OPA
server is the binary tools/build-opa.sh builds, started on a free loopback port with decision
logging on (as deployed: the audit records its decision ids) and reached through the
gateway's OpaServerEngine (opa-python-client over HTTP). The engines are measured in
interleaved rounds, so that other load on the machine falls on all of them alike; compare the
ratios, not the absolute figures, on a busy machine. Results go to bench/out/policy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.catalog import default_catalog  # noqa: E402
from gateway.policy import OpaServerEngine, PolicyEngine, RegorusEngine  # noqa: E402
from gateway.policy.data import ENCODER  # noqa: E402
from gateway.policy.decision import decision_from_document  # noqa: E402
from gateway.service.grants import GrantRequest, new_grant_record, policy_data  # noqa: E402


def percentiles(samples: list[int]) -> dict[str, float]:
    samples = sorted(samples)
    return {"p50_us": round(statistics.median(samples) / 1000, 1),
            "p99_us": round(samples[int(len(samples) * 0.99)] / 1000, 1)}


def timed(call: Callable[[], object], n: int,
          clock: Callable[[], int] = time.perf_counter_ns) -> list[int]:
    out = []
    for _ in range(n):
        t0 = clock()
        call()
        out.append(clock() - t0)
    return out


def start_opa() -> tuple[subprocess.Popen[bytes], str]:
    binary = subprocess.run(["bash", str(ROOT / "tools" / "build-opa.sh")], check=True,
                            capture_output=True, text=True).stdout.strip()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [binary, "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error",
         "--skip-version-check", "--set", "decision_logs.console=true"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("opa did not start")


def profile_embedded(engine: RegorusEngine, policy_input: dict[str, Any], n: int
                     ) -> dict[str, float]:
    """p50 of each stage of one compiled decision, measured apart (they add up to about
    the whole)."""
    import orjson

    evaluator: Any = engine._evaluator(engine._state)  # this thread's VM, data loaded
    vm = evaluator._vm
    encoded = ENCODER.encode(policy_input)
    vm.set_input_json(encoded)
    result = vm.execute()
    document = orjson.loads(result)
    stages = {
        "encode_input": lambda: ENCODER.encode(policy_input),
        "set_input": lambda: vm.set_input_json(encoded),
        "rvm_execute": vm.execute,
        "decode_result": lambda: orjson.loads(result),
        "read_decision": lambda: decision_from_document(
            document, policy_version="v", engine="regorus"),
        "whole_decide": lambda: engine.decide(policy_input),
    }
    return {name: percentiles(timed(call, n))["p50_us"] for name, call in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grants", type=int, default=100)
    parser.add_argument("--n", type=int, default=20_000, help="embedded decisions per engine")
    parser.add_argument("--opa-n", type=int, default=4_000, help="OPA server decisions")
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
    process, url = start_opa()
    try:
        engines: dict[str, PolicyEngine] = {
            "regorus_compiled": RegorusEngine(mode="compiled"),
            "regorus_interpreter": RegorusEngine(mode="interpreter"),
            "opa_server": OpaServerEngine(url, timeout=5.0),
        }
        counts = {"regorus_compiled": args.n, "regorus_interpreter": args.n // 4,
                  "opa_server": args.opa_n}
        reference = None
        for name, engine in engines.items():
            engine.set_data(data)
            decision = engine.decide(policy_input)
            assert decision.allow, name
            if reference is None:
                reference = decision.to_json()
            mine = {**decision.to_json(), "engine": None, "decision_id": None}
            assert mine == {**reference, "engine": None, "decision_id": None}, name
            timed(lambda e=engine: e.decide(policy_input), 200)  # warm up
        # For scale: the same decision as one bare httpx POST (keep-alive, no parsing), i.e.
        # what OPA and the loopback cost without opa-python-client and requests.
        raw = httpx.Client(base_url=url, timeout=5.0)
        body = json.dumps({"input": policy_input}).encode()

        def bare() -> object:
            return raw.post("/v1/data/gateway/authz/decision", content=body).content

        calls: dict[str, Callable[[], object]] = {
            name: (lambda e=engine: e.decide(policy_input)) for name, engine in engines.items()
        }
        calls["opa_server_bare_httpx"] = bare
        counts["opa_server_bare_httpx"] = args.opa_n
        timed(bare, 200)
        samples: dict[str, list[int]] = {name: [] for name in calls}
        rounds = 10
        for _ in range(rounds):  # interleaved: the same background load for each engine
            for name, call in calls.items():
                samples[name] += timed(call, counts[name] // rounds)
        raw.close()
        results: dict[str, Any] = {name: percentiles(s) for name, s in samples.items()}
        # The embedded engine's own CPU time per decision (this thread's CPU clock): what a
        # decision costs when the machine is busy and wall time mostly measures waiting.
        # Not comparable for OPA, whose work happens in another process.
        for name in ("regorus_compiled", "regorus_interpreter"):
            cpu = timed(calls[name], counts[name] // 2, clock=time.thread_time_ns)
            results[name]["cpu_p50_us"] = percentiles(cpu)["p50_us"]
        compiled = engines["regorus_compiled"]
        assert isinstance(compiled, RegorusEngine)
        profile = profile_embedded(compiled, policy_input, min(args.n, 5_000))
        assert isinstance(engines["opa_server"], OpaServerEngine)
        engines["opa_server"].close()
    finally:
        process.kill()
        process.wait()
    for name, figures in results.items():
        cpu = f"  (CPU p50 {figures['cpu_p50_us']:.1f} µs)" if "cpu_p50_us" in figures else ""
        print(f"{name:22s} p50 {figures['p50_us']:8.1f} µs  p99 {figures['p99_us']:8.1f} µs{cpu}")
    base = results["regorus_compiled"]["p50_us"]
    ratios = {name: round(figures["p50_us"] / base, 2) for name, figures in results.items()}
    print("p50 / regorus_compiled p50: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print("embedded decision, p50 per stage (µs): "
          + ", ".join(f"{k} {v}" for k, v in profile.items()))
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "policy.json").write_text(json.dumps({
        "grants": args.grants, "results": results, "p50_ratio_to_compiled": ratios,
        "embedded_stages_p50_us": profile,
        "load_average": os.getloadavg(), "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
