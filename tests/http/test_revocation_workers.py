"""A revocation holds on the very next request in every worker process: two gateway server
processes over real sockets on the same state; revoke through one, use through the other."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.synth import CityFiles
from tests.conftest import BASE_URL, Env
from tests.http.persons import SETTLEMENTS, Insurer, consent_body, give_consent, sample_persons


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--workdir", str(workdir),
         "--port", str(port), "--base-url", BASE_URL],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def two_workers(env: Env) -> Iterator[tuple[str, str]]:
    procs = [_serve(env.settings.workdir) for _ in range(2)]
    try:
        for proc, url in procs:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "worker never came up"
                time.sleep(0.2)
        yield procs[0][1], procs[1][1]
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=30)


def test_revocation_through_one_worker_holds_in_the_other(env: Env, city: CityFiles,
                                                          two_workers: tuple[str, str]) -> None:
    worker_a, worker_b = two_workers
    person = sample_persons(city, 1)[0]
    insurer = Insurer()
    issued = give_consent(env, consent_body(person, insurer, purpose="claims_fast_track"))
    access = env.token("insurer")
    admin = env.headers("admin")
    body = {"datatypes": ["settlements.summary"],
            "period": {"start": "2021-01-01", "end": "2030-12-31"}}

    def read(url: str) -> httpx.Response:
        return httpx.post(url + SETTLEMENTS, json=body, timeout=30, headers={
            "Authorization": f"Bearer {access}", "Consent": issued["token"],
            "DPoP": insurer.proof(access, path=SETTLEMENTS)})

    assert read(worker_a).status_code == 200
    assert read(worker_b).status_code == 200
    revoked = httpx.delete(f"{worker_b}/v1/consents/{issued['consent_id']}", headers=admin,
                           timeout=30)
    assert revoked.status_code == 200, revoked.text
    refused = read(worker_a)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "consent_revoked"
    assert read(worker_b).json()["error"]["code"] == "consent_revoked"
