"""kill -9 under concurrent load: every request that got a response has its audit entry, and
the log verifies after restart."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.audit import SqliteAuditLog
from gateway.cli.clients import request_token
from tests.conftest import LoadedStore, make_env
from tests.http.test_cli import _free_port

QUERY = {"purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
         "measures": [{"fn": "count"}, {"fn": "sum", "field": "psn_part_amt"}]}


def _serve(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--workdir", str(workdir),
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("gateway did not start")


@pytest.mark.slow
def test_kill_9_under_load_loses_no_answered_entry(
    tmp_path: Path, loaded_store: LoadedStore, signing_key_file: Path
) -> None:
    env = make_env(tmp_path, loaded_store.store_dir, signing_key_file)
    env.gateway.audit.close()
    workdir = env.settings.workdir
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    insurer = env.credentials["insurer"]
    proc = _serve(workdir, port)
    answered: list[tuple[int, bytes]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        token = request_token(base, insurer["client_id"], Path(insurer["private_key_path"]),
                              insurer["alg"])
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"},
                          timeout=10) as http:
            for _ in range(400):  # bounded even if the kill never comes
                if stop.is_set():
                    return
                try:
                    response = http.post("/v1/query/aggregate", json=QUERY)
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    with lock:
                        answered.append((int(response.headers["Audit-Index"]),
                                         response.content))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(answered) < 60:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(answered) >= 60, "the load did not get going before the kill"

    with SqliteAuditLog(env.settings.audit_path) as log:
        size = log.verify()
        for index, content in answered:
            assert index < size, f"answered entry {index} missing after kill -9"
            entry = log.get(index)
            assert (entry.action, entry.decision, entry.actor) == (
                "query.aggregate", "allow", insurer["client_id"])
            body: dict[str, Any] = orjson.loads(content)
            body.pop("audit_id")
            assert entry.response_hash == "sha256:" + hashlib.sha256(
                orjson.dumps(body)).hexdigest()

    # After restart the log goes on from where it was and still verifies.
    proc = _serve(workdir, port)
    try:
        token = request_token(base, insurer["client_id"], Path(insurer["private_key_path"]),
                              insurer["alg"])
        response = httpx.post(base + "/v1/query/aggregate", json=QUERY,
                              headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert int(response.headers["Audit-Index"]) >= size
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with SqliteAuditLog(env.settings.audit_path) as log:
        assert log.verify() > size
