"""Several gateway workers over a real socket, sharing state: ``gateway serve --workers 4``
(uvicorn processes, each accepting on a listener of its own in one SO_REUSEPORT group and
handing new connections to the worker holding the fewest) on
PostgreSQL (state and audit log in one database) and on the SQLite files.

Every request goes over its own TCP connection, and the test finds which worker process
accepted it (the server side of the connection in ``/proc``), so "every worker" is checked,
not hoped for: a revoked grant is refused by the very next request through each of the four
workers, a single-use consent fired at all of them at once is accepted once, a grant's rate
limit counts the requests of all of them together, and the audit log they all appended to
verifies as one chain and one Merkle tree.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.audit.backends import open_audit_log
from gateway.cli.clients import register_client, request_token
from gateway.settings import Settings
from gateway.state.postgres import PostgresStateStore
from gateway.synth import CityFiles
from tests.conftest import CLIENTS, PRICING_GRANT, LoadedStore, make_env
from tests.http.persons import ENROLLMENT, Insurer, consent_body, sample_persons

# Starting four workers per backend takes most of the time; they still run in CI (`make test`).
pytestmark = pytest.mark.slow

WORKERS = 4
QUERY = {"purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
         "measures": [{"fn": "count"}]}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _children(pid: int) -> set[int]:
    """Worker processes of the server ``pid`` (not multiprocessing's resource tracker)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmdline:
                found.add(int(child))
    return found


def _socket_inode(server_port: int, client_port: int) -> str | None:
    """Inode of the server side of 127.0.0.1:client_port -> 127.0.0.1:server_port."""
    want_local = f"0100007F:{server_port:04X}"
    want_remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1] == want_local and parts[2] == want_remote:
            return parts[9]
    return None


def _owner(inode: str, pids: set[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    if os.readlink(fd) == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


@dataclass
class Answer:
    status: int
    body: Any
    worker: int | None
    audit_index: int | None
    retry_after: str | None = None


@dataclass
class Cluster:
    """A ``gateway serve --workers 4`` process and what it was set up with."""

    workdir: Path
    port: int
    proc: subprocess.Popen[bytes]
    credentials: dict[str, dict[str, Any]]
    state_url: str | None
    audit_indexes: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> set[int]:
        return _children(self.proc.pid)

    def token(self, role: str) -> str:
        c = self.credentials[role]
        return request_token(self.base, c["client_id"], Path(c["private_key_path"]), c["alg"])

    def request(self, method: str, path: str, *, token: str | None = None,
                body: Any = None, headers: dict[str, str] | None = None) -> Answer:
        """One request on a new connection; records which worker process accepted it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.connect()
            client_port = conn.sock.getsockname()[1]
            sent = {"Content-Type": "application/json", **(headers or {})}
            if token:
                sent["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers=sent)
            response = conn.getresponse()
            raw = response.read()
            inode = _socket_inode(self.port, client_port)  # still open: keep-alive
            worker = _owner(inode, self.workers()) if inode else None
            index = response.getheader("Audit-Index")
            if index is not None:
                with self.lock:
                    self.audit_indexes.append(int(index))
            return Answer(response.status, json.loads(raw) if raw else None, worker,
                          None if index is None else int(index),
                          response.getheader("Retry-After"))
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _fresh_database(server: str) -> str:
    name = "mw_" + uuid.uuid4().hex[:16]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server.rpartition('/')[0]}/{name}"


def _gateway_env(url: str | None) -> dict[str, str]:
    """The environment of a gateway process: state and audit log at ``url``, or the SQLite
    files of the work directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    if url:
        env["GATEWAY_STATE_URL"] = env["GATEWAY_AUDIT_URL"] = url
    return env


def _start(workdir: Path, port: int, state_url: str | None) -> subprocess.Popen[bytes]:
    env = _gateway_env(state_url)
    log = (workdir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--workdir", str(workdir),
         "--port", str(port), "--workers", str(WORKERS)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("gateway exited: " + (workdir / "serve.log").read_text()[-2000:])
        # Each worker listens once it has built its gateway.
        if len(_children(proc.pid)) >= WORKERS and len(_listeners(port)) >= WORKERS:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return proc
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("gateway workers did not start")


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            loaded_store: LoadedStore, signing_key_file: Path) -> Iterator[Cluster]:
    kind = str(request.param)
    tmp = tmp_path_factory.mktemp(f"workers-{kind}")
    # make_env lays out keys, the loaded store and client keys (registered in SQLite state).
    env = make_env(tmp, loaded_store.store_dir, signing_key_file, grant=None)
    env.gateway.audit.close()
    state_url: str | None = None
    if kind == "postgresql":
        server = str(request.getfixturevalue("postgres_server"))
        state_url = _fresh_database(server)
        shared = PostgresStateStore(state_url)
        try:
            for client_id, *_ in CLIENTS.values():
                record = env.gateway.state.get_client(client_id)
                assert record is not None
                shared.add_client(record)
        finally:
            shared.close()
    port = _free_port()
    proc = _start(env.settings.workdir, port, state_url)
    running = Cluster(env.settings.workdir, port, proc, env.credentials, state_url)
    try:
        yield running
    finally:
        running.stop()
        if state_url:
            with psycopg.connect(state_url.rpartition("/")[0] + "/gateway",
                                 autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{state_url.rpartition("/")[2]}" '
                             "WITH (FORCE)")


def _fan_out(cluster: Cluster, calls: int, send: Any) -> list[Answer]:
    """``send(i)`` from ``calls`` threads at once, each on its own connection."""
    barrier = threading.Barrier(calls)
    answers: list[Answer | BaseException] = [RuntimeError("not run")] * calls

    def run(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = send(i)
        except BaseException as exc:  # re-raised in the test's thread
            answers[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for a in answers:
        if isinstance(a, BaseException):
            raise a
    return [a for a in answers if isinstance(a, Answer)]


def _until_every_worker(cluster: Cluster, send: Any, *, limit: int = 200) -> list[Answer]:
    """Sequential requests until each of the four workers has answered at least one."""
    answers: list[Answer] = []
    seen: set[int] = set()
    while len(seen) < WORKERS and len(answers) < limit:
        answer = send()
        answers.append(answer)
        if answer.worker is not None:
            seen.add(answer.worker)
    assert seen == cluster.workers(), f"only {len(seen)} of {WORKERS} workers answered"
    return answers


def _listeners(port: int) -> list[str]:
    """Inodes of the sockets listening on 127.0.0.1:port."""
    local = f"0100007F:{port:04X}"
    return [parts[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if (parts := line.split())[1] == local and parts[3] == "0A"]


def test_four_workers_accept_on_listeners_of_their_own(cluster: Cluster) -> None:
    workers = cluster.workers()
    assert len(workers) == WORKERS
    # One listener per worker (gateway.cli.listeners), not one socket shared by all.
    owners = [_owner(inode, workers) for inode in _listeners(cluster.port)]
    assert len(owners) == WORKERS
    assert set(owners) == workers
    answers = _until_every_worker(cluster, lambda: cluster.request("GET", "/readyz"))
    assert {a.status for a in answers} == {200}


def test_connections_opened_at_once_are_held_evenly_by_the_workers(cluster: Cluster) -> None:
    """A burst of 40 keep-alive connections: with one shared socket, the worker awake took
    most of them; with a listener each, the kernel's hash gave every worker some, unevenly;
    handed over to the worker holding the fewest (gateway.cli.balancing), 10 each."""
    time.sleep(0.2)  # the workers have seen earlier tests' connections close (uncounted then)
    conns = [http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=30)
             for _ in range(40)]
    try:
        for conn in conns:
            conn.connect()
        for conn in conns:
            conn.request("GET", "/healthz")
            assert conn.getresponse().read()
        workers = cluster.workers()
        held = [_owner(inode, workers) for conn in conns
                if (inode := _socket_inode(cluster.port, conn.sock.getsockname()[1]))]
        assert len(held) == 40
        assert sorted(held.count(w) for w in workers) == [10] * WORKERS, held
    finally:
        for conn in conns:
            conn.close()


def test_grant_revocation_holds_in_every_worker_from_the_next_request(cluster: Cluster) -> None:
    admin = cluster.token("admin")
    grant = {**PRICING_GRANT, "insurer": "ins-b"}
    created = cluster.request("POST", "/v1/grants", token=admin, body=grant)
    assert created.status == 201, created.body
    insurer_b = cluster.token("insurer_b")

    def query() -> Answer:
        return cluster.request("POST", "/v1/query/aggregate", token=insurer_b, body=QUERY)

    # Every worker has served the grant (and cached its policy data) before the revocation.
    before = _until_every_worker(cluster, query)
    assert {a.status for a in before} == {200}
    revoked = cluster.request("DELETE", f"/v1/grants/{created.body['grant_id']}", token=admin)
    assert revoked.status == 200, revoked.body
    # From the very next request on, every worker refuses.
    after = _until_every_worker(cluster, query)
    assert [a.status for a in after] == [403] * len(after)
    assert {a.body["error"]["code"] for a in after} == {"policy_denied"}
    concurrent = _fan_out(cluster, 16, lambda _: query())
    assert [a.status for a in concurrent] == [403] * 16


def test_a_single_use_consent_fired_at_every_worker_is_used_once(
    cluster: Cluster, city: CityFiles
) -> None:
    admin = cluster.token("admin")
    person = sample_persons(city, 1)[0]
    dpop = Insurer()
    issued = cluster.request("POST", "/v1/consents", token=admin,
                             body=consent_body(person, dpop))
    assert issued.status == 201, issued.body
    token = cluster.token("insurer")
    htu = cluster.base + ENROLLMENT
    proofs = [dpop.proof(token, htu=htu) for _ in range(16)]  # a fresh DPoP jti each

    answers = _fan_out(cluster, 16, lambda i: cluster.request(
        "POST", ENROLLMENT, token=token, body={},
        headers={"Consent": issued.body["token"], "DPoP": proofs[i]}))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] + [403] * 15, [a.body for a in answers]
    refused = {a.body["error"]["code"] for a in answers if a.status == 403}
    assert refused == {"consent_used"}
    assert len({a.worker for a in answers}) > 1  # the race really spanned processes
    # A replayed DPoP proof is refused too, by whichever worker gets it.
    replay = cluster.request("POST", ENROLLMENT, token=token, body={},
                             headers={"Consent": issued.body["token"], "DPoP": proofs[0]})
    assert replay.status in (400, 401, 403)


def test_a_grant_rate_limit_counts_the_requests_of_every_worker(cluster: Cluster) -> None:
    # An insurer of its own, so that no other test's grant is chosen for its queries.
    key_path = cluster.workdir / "clients" / "t-insurer-rl.pem"
    register_client(Settings(workdir=cluster.workdir, state_url=cluster.state_url),
                    client_id="t-insurer-rl", role="insurer", org="ins-rl", alg="EdDSA",
                    key_path=key_path)
    limit = 4  # one request back every 15 s: far longer than the test's requests take
    grant = {**PRICING_GRANT, "insurer": "ins-rl", "rate_limit_per_minute": limit}
    created = cluster.request("POST", "/v1/grants", token=cluster.token("admin"), body=grant)
    assert created.status == 201, created.body
    token = request_token(cluster.base, "t-insurer-rl", key_path, "EdDSA")

    def query() -> Answer:
        return cluster.request("POST", "/v1/query/aggregate", token=token, body=QUERY)

    started = time.monotonic()
    answers = _fan_out(cluster, 3 * limit, lambda _: query())
    # Then one more through each worker: every one of them has seen the allowance spent.
    after = _until_every_worker(cluster, query)
    assert time.monotonic() - started < 15, "too slow to test a 15 s interval"
    assert sorted(a.status for a in answers) == [200] * limit + [429] * (2 * limit)
    assert len({a.worker for a in answers}) > 1  # per-worker buckets would have allowed more
    assert {a.status for a in after} == {429}
    refused = [a for a in answers + after if a.status == 429]
    assert {a.body["error"]["code"] for a in refused} == {"rate_limited"}
    assert all(a.retry_after is not None and 1 <= int(a.retry_after) <= 15 for a in refused)
    assert all(a.audit_index is not None for a in answers + after)


def test_audit_log_of_all_workers_verifies_as_one_tree(cluster: Cluster) -> None:
    # Concurrent appends from every worker, then stop them all and check the log offline.
    insurer = cluster.token("insurer")
    admin = cluster.token("admin")
    grant = cluster.request("POST", "/v1/grants", token=admin, body=PRICING_GRANT)
    assert grant.status == 201, grant.body
    answers = _fan_out(cluster, 32, lambda _: cluster.request(
        "POST", "/v1/query/aggregate", token=insurer, body=QUERY))
    assert {a.status for a in answers} == {200}
    assert len({a.worker for a in answers}) > 1
    cluster.stop()
    indexes = sorted(cluster.audit_indexes)
    assert len(indexes) == len(set(indexes))  # no two answers share an audit entry
    with open_audit_log(cluster.state_url, cluster.workdir / "audit.sqlite") as log:
        size = log.verify()
        assert size >= len(indexes)
        assert indexes[-1] < size
        for answer in answers:
            assert answer.audit_index is not None
            assert log.get(answer.audit_index).action == "query.aggregate"
    bundle = cluster.workdir / "audit-bundle.json"
    cli = [sys.executable, "-m", "gateway.cli.main", "audit"]
    subprocess.run([*cli, "export", str(bundle), "--workdir", str(cluster.workdir)],
                   check=True, capture_output=True, env=_gateway_env(cluster.state_url))
    verified = subprocess.run(
        [*cli, "verify", str(bundle), "--public-key", str(bundle.with_suffix(".pub.pem"))],
        check=True, capture_output=True, text=True)
    assert verified.stdout.startswith(f"OK: {size} entries verified")
