"""The command line as an operator uses it: demo, token, audit export and offline verify."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Env

CLI = [sys.executable, "-m", "gateway.cli.main"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, check=False)


def _exported(env: Env, tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    for body in ({"dimensions": ["gend"]}, {"dimensions": ["dise_codg"]}):
        env.aggregate("insurer", {"purpose": "hmb_pricing", "dataset": "settlements",
                                  "measures": [{"fn": "count"}], **body})
    bundle = tmp_path / "audit-bundle.json"
    result = _run("audit", "export", str(bundle), "--workdir", str(env.settings.workdir))
    assert result.returncode == 0, result.stderr
    public = bundle.with_suffix(".pub.pem")
    return bundle, public, json.loads(bundle.read_text("utf-8"))


def test_exported_log_verifies_offline(env: Env, tmp_path: Path) -> None:
    bundle, public, data = _exported(env, tmp_path)
    assert len(data["entries"]) >= 5
    result = _run("audit", "verify", str(bundle), "--public-key", str(public))
    assert result.returncode == 0, result.stderr
    assert f"{len(data['entries'])} entries verified" in result.stdout


@pytest.mark.parametrize("tampering", ["changed", "removed", "reordered"])
def test_offline_verify_catches_tampering(env: Env, tmp_path: Path, tampering: str) -> None:
    bundle, public, data = _exported(env, tmp_path)
    entries = data["entries"]
    if tampering == "changed":
        denied = next(e for e in entries if e["entry"]["decision"] == "deny"
                      and e["entry"]["action"] == "query.aggregate")
        denied["entry"]["decision"] = "allow"
    elif tampering == "removed":
        del entries[2]
    else:
        entries[1], entries[2] = entries[2], entries[1]
    bundle.write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    result = _run("audit", "verify", str(bundle), "--public-key", str(public))
    assert result.returncode == 9, (result.stdout, result.stderr)
    assert "audit_integrity" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_errors_map_to_exit_codes(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.parquet"
    result = _run("ingest", str(missing), str(missing), "--workdir", str(tmp_path / "w"))
    assert result.returncode == 2
    assert "ingest_rejected" in result.stderr
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_demo_serves_what_its_credentials_file_promises(tmp_path: Path) -> None:
    port = _free_port()
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*CLI, "demo", "--persons", "2000", "--seed", "3", "--port", str(port),
         "--workdir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail("demo never became ready")
        creds = json.loads((workdir / "credentials.json").read_text("utf-8"))
        assert creds["base_url"] == base
        assert set(creds["clients"]) >= {"admin", "insurer", "auditor"}
        for client in creds["clients"].values():
            assert Path(client["private_key_path"]).is_file()
            assert client["alg"] in ("EdDSA", "ES256")
        token = _run("token", "get", "insurer", "--credentials",
                     str(workdir / "credentials.json")).stdout.strip()
        response = httpx.post(base + "/v1/query/aggregate",
                              headers={"Authorization": f"Bearer {token}"},
                              json={"purpose": "hmb_pricing", "dataset": "person_years",
                                    "dimensions": ["age_band"],
                                    "measures": [{"fn": "sum", "field": "exposure"}]})
        assert response.status_code == 200, response.text
        assert len(response.json()["rows"]) == 8
        assert int(response.headers["Audit-Index"]) >= 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
