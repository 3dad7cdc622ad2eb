"""Tests of the audit log: hashing, the SQLite store, the export bundle and its verifier.

The store tests run once per backend (``backend`` fixture); a PostgreSQL backend joins by adding
its name there. The tampering cases are data files in ``tests/vectors/audit/``; run this module
as a script to regenerate them (``.venv/bin/python tests/unit/test_audit.py``), and
``test_vectors_are_current`` keeps the committed files equal to what the code produces.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from gateway.audit import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_V1,
    GENESIS,
    LEAF_PREFIX,
    AuditEntry,
    AuditLog,
    SqliteAuditLog,
    canonical_json,
    chain_hash,
    checkpoint_message,
    entry_bytes,
    export_bundle,
    leaf_hash,
    merkle,
    parse_and_verify_checkpoint,
    sha256_tag,
    sign_checkpoint,
    verify_bundle,
    verify_bundle_checkpoint,
)
from gateway.audit.entry import PERSONAL_FIELDS, entry_from_stored
from gateway.audit.log import BuildRows
from gateway.audit.postgres import PostgresAuditLog
from gateway.errors import AuditIntegrityError, AuditUnavailable, BadRequest, NotFound

REPO = Path(__file__).resolve().parents[2]
VECTOR_DIR = REPO / "tests" / "vectors" / "audit"

# RFC 8032 §7.1 TEST 1 and TEST 2 secret keys: published, so no key file is committed and the
# derived public keys can be checked against the RFC.
SIGNING_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
SIGNING_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
OTHER_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
ORIGIN = "yibao-gateway.test/audit"


def signing_key(seed: bytes = SIGNING_SEED) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def make_entry(i: int = 0, **overrides: Any) -> AuditEntry:
    fields: dict[str, Any] = {
        "ts": f"2026-11-22T07:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1_000_000:06d}Z",
        "actor": f"insurer-{i % 3}",
        "role": "insurer",
        "org": "pingan" if i % 2 else "cpic",
        "action": "query.aggregate",
        "purpose": "pricing",
        "decision": "allow",
        "reasons": [],
        "status": 200,
        "policy_version": "policies@1",
        "grant_id": "grant-1",
        "request": {"dataset": "settlements", "dimensions": ["insu_admdvs"], "n": i},
        "fields": ["insu_admdvs", "hifp_pay"],
        "field_justifications": {"hifp_pay": "赔付测算"},
        "cells_released": 10 + i % 7,
        "cells_suppressed": i % 3,
        "data_version": "2026-10",
        "response_hash": sha256_tag(f"response {i}".encode()),
    }
    fields.update(overrides)
    return AuditEntry(**fields)


# -- reference implementation: slow and literal, checks the real one -----------------------


def reference_leaf(data: bytes) -> bytes:
    return hashlib.sha256(bytes([0]) + data).digest()


def reference_chain(entries_json: list[bytes]) -> list[bytes]:
    chain = []
    prev = b"\x00" * 32
    for data in entries_json:
        prev = hashlib.sha256(prev + reference_leaf(data)).digest()
        chain.append(prev)
    return chain


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


LogFactory = Callable[..., AuditLog]


def _factory(backend: str, tmp_path: Path, request: pytest.FixtureRequest
             ) -> Iterator[LogFactory]:
    """Opens logs on one store per ``name`` (a file for SQLite, a schema for PostgreSQL, in a
    fresh database per test); the same name again is the same store, as after a restart."""
    opened: list[AuditLog] = []
    url = str(request.getfixturevalue("postgres_url")) if backend == "postgres" else ""

    def factory(name: str = "audit.db", cls: type[AuditLog] | None = None, **kw: Any
                ) -> AuditLog:
        log: AuditLog
        if backend == "sqlite":
            log = (cls or SqliteAuditLog)(tmp_path / name, **kw)  # type: ignore[call-arg,arg-type]
        else:
            pg_cls = PgGatedLog if cls is GatedLog else PostgresAuditLog
            schema = re.sub(r"[^a-z0-9_]", "_", name.lower())
            log = pg_cls(url, schema=schema, **kw)
        opened.append(log)
        return log

    yield factory
    for log in opened:
        log.close()


@pytest.fixture
def make_log(backend: str, tmp_path: Path, request: pytest.FixtureRequest
             ) -> Iterator[LogFactory]:
    """Logs on every backend: the same tests run on SQLite and on a real PostgreSQL."""
    yield from _factory(backend, tmp_path, request)


@pytest.fixture
def make_sqlite_log(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LogFactory]:
    """SQLite logs, for tests that tamper with the file (``test_audit_postgres`` does the
    same to a PostgreSQL store)."""
    yield from _factory("sqlite", tmp_path, request)


def raw_db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


class _Gate:
    """Holds every batch at a gate, so a test can decide when the store is written."""

    gate: threading.Event
    entered: threading.Event

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        super().__init__(*args, **kwargs)

    def _append_rows(self, build: BuildRows) -> None:
        self.entered.set()
        self.gate.wait()
        super()._append_rows(build)  # type: ignore[misc]


class GatedLog(_Gate, SqliteAuditLog):
    """A SQLite log whose batches wait at a gate."""


class PgGatedLog(_Gate, PostgresAuditLog):
    """A PostgreSQL log whose batches wait at a gate."""


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def start_held(log: Any, target: Callable[[int], None], n: int) -> list[threading.Thread]:
    """Start ``n`` appending threads: the first one's batch is held at the gate, the others
    are queued behind it."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    threads[0].start()
    wait_until(log.entered.is_set)
    for t in threads[1:]:
        t.start()
    wait_until(lambda: log.stats()["queued"] == n - 1)
    return threads


def run_threads(n: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- hashing and canonical JSON --------------------------------------------------------------


def test_leaf_hash_of_empty_leaf_is_rfc6962_value() -> None:
    # SHA-256(0x00): the RFC 6962 hash of an empty leaf, as in the CT test data.
    want = "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert leaf_hash(b"").hex() == want
    assert hashlib.sha256(b"\x00").hexdigest() == want
    assert LEAF_PREFIX == b"\x00"


def test_hashes_match_reference_implementation() -> None:
    rng = random.Random(6962)
    blobs = [rng.randbytes(rng.randrange(0, 300)) for _ in range(200)]
    prev = GENESIS
    for data, want in zip(blobs, reference_chain(blobs), strict=True):
        assert leaf_hash(data) == reference_leaf(data)
        prev = chain_hash(prev, leaf_hash(data))
        assert prev == want


def test_chain_hash_checks_lengths() -> None:
    with pytest.raises(ValueError, match="32-byte"):
        chain_hash(b"short", GENESIS)


def test_canonical_json_sorts_keys_and_keeps_unicode() -> None:
    obj = {"b": 1, "a": {"d": "医保局", "c": [1, 2.5, None, True]}, "A": "x", "é": 0, "z": -0.0}
    assert (
        canonical_json(obj)
        == '{"A":"x","a":{"c":[1,2.5,null,true],"d":"医保局"},"b":1,"z":-0.0,"é":0}'.encode()
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"k": [math.nan]}])
def test_canonical_json_refuses_nan_and_infinity(bad: Any) -> None:
    with pytest.raises(ValueError, match="JSON"):
        canonical_json(bad)


@pytest.mark.parametrize("bad", [{"s": "\ud800"}, {1: "a", "b": 2}, {"t": {1, 2}}])
def test_canonical_json_refuses_what_has_no_canonical_form(bad: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several causes, one contract
        canonical_json(bad)


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randrange(-(2**70), 2**70)
    if kind == 2:
        return rng.uniform(-1e20, 1e20) * rng.choice([1, 1e-30, 1e250])
    if kind == 3:
        return "".join(rng.choice('aZ9 "\\\n\t医保商€😀\x00\x1f') for _ in range(rng.randrange(8)))
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        "".join(rng.choice("abc医😀") for _ in range(rng.randrange(1, 4))): _random_json(
            rng, depth + 1
        )
        for _ in range(rng.randrange(4))
    }


def test_canonical_json_round_trips_to_the_same_bytes() -> None:
    # What the verifier relies on: parse the canonical bytes, serialize again, same bytes.
    rng = random.Random(8785)
    for _ in range(2000):
        data = canonical_json(_random_json(rng))
        assert canonical_json(json.loads(data)) == data


# -- entries ---------------------------------------------------------------------------------


def test_entry_bytes_are_canonical_json_of_every_member() -> None:
    entry = make_entry(1)
    data = entry_bytes(entry)
    parsed = json.loads(data)
    # Personal members sit outside the leaf, which holds their commitment (here: none).
    assert set(parsed) == set(AuditEntry.model_fields) - set(PERSONAL_FIELDS) | {"personal"}
    assert parsed["personal"] is None
    assert canonical_json(parsed) == data
    assert entry_from_stored(data, None) == entry


def test_entry_fills_and_checks_request_hash() -> None:
    entry = make_entry(request={"purpose": "惠民保定价", "dataset": "settlements"})
    assert entry.request_hash == sha256_tag(
        '{"dataset":"settlements","purpose":"惠民保定价"}'.encode()
    )
    with pytest.raises(ValidationError, match="request_hash does not match"):
        make_entry(request={"a": 1}, request_hash=sha256_tag(b"other"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ts": "2026-11-22T07:29:05Z"}, "microseconds"),
        ({"ts": "2026-11-22 07:29:05.123456+08:00"}, "microseconds"),
        ({"role": "root"}, "role must be one of"),
        ({"decision": "maybe"}, "decision must be one of"),
        ({"status": 42}, "greater than or equal"),
        ({"cells_released": -1}, "greater than or equal"),
        ({"budget_spent": math.nan}, "finite"),
        ({"response_hash": "md5:abc"}, "sha256"),
        ({"subject_pseudonym": "11010519491231002X"}, "raw identifier"),
        ({"subject_pseudonym": "13800138000"}, "raw identifier"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_entry_refuses_bad_members(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_entry(**override)


def test_entry_is_frozen() -> None:
    with pytest.raises(ValidationError):
        make_entry().actor = "someone-else"  # type: ignore[misc]


# -- the store -------------------------------------------------------------------------------


def test_empty_log(make_log: LogFactory) -> None:
    log = make_log()
    assert log.size() == 0
    assert log.head() == (0, GENESIS)
    assert log.verify() == 0
    with pytest.raises(NotFound):
        log.get(0)
    with pytest.raises(NotFound):
        log.get(-1)


def test_append_and_get(make_log: LogFactory) -> None:
    log = make_log()
    entries = [make_entry(i) for i in range(5)]
    assert [log.append(e) for e in entries] == [0, 1, 2, 3, 4]
    assert [log.get(i) for i in range(5)] == entries
    chain = reference_chain([entry_bytes(e) for e in entries])
    assert log.head() == (5, chain[-1])
    rows = list(log.iter_rows())
    assert [r.chain_hash for r in rows] == chain
    assert [r.entry_json.encode() for r in rows] == [entry_bytes(e) for e in entries]


def test_concurrent_appends_are_contiguous_and_chained(make_log: LogFactory) -> None:
    log = make_log()
    got: list[list[int]] = [[] for _ in range(8)]

    def worker(t: int) -> None:
        for i in range(200):
            got[t].append(log.append(make_entry(t * 1000 + i, actor=f"insurer-{t}")))

    run_threads(8, worker)
    indexes = sorted(i for per_thread in got for i in per_thread)
    assert indexes == list(range(1600))
    for t, per_thread in enumerate(got):
        assert per_thread == sorted(per_thread)  # one thread's entries keep their order
        assert all(log.get(i).actor == f"insurer-{t}" for i in per_thread[:5])
    assert log.verify() == 1600
    rows = list(log.iter_rows())
    assert [r.chain_hash for r in rows] == reference_chain([r.entry_json.encode() for r in rows])
    assert log.head() == (1600, rows[-1].chain_hash)
    assert log.stats()["entries"] == 1600


def test_entries_are_durable_after_close_and_reopen(make_log: LogFactory) -> None:
    log = make_log()
    entries = [make_entry(i) for i in range(20)]
    for e in entries:
        log.append(e)
    head = log.head()
    log.close()
    log.close()  # idempotent
    reopened = make_log()
    assert reopened.head() == head
    assert reopened.verify() == 20
    assert [reopened.get(i) for i in range(20)] == entries
    assert reopened.append(make_entry(20)) == 20


def test_close_drains_queued_entries(make_log: LogFactory) -> None:
    log = make_log(cls=GatedLog)
    assert isinstance(log, _Gate)
    results: list[int] = []

    def worker(i: int) -> None:
        results.append(log.append(make_entry(i)))

    threads = start_held(log, worker, 5)
    closer = threading.Thread(target=log.close)
    closer.start()
    log.gate.set()
    closer.join()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3, 4]
    with pytest.raises(AuditUnavailable, match="closed"):
        log.append(make_entry())


def test_store_failure_mid_batch_fails_every_waiter_and_rolls_back(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log(cls=GatedLog)
    assert isinstance(log, _Gate)
    log.gate.set()
    assert log.append(make_entry(0)) == 0
    log.gate.clear()
    log.entered.clear()
    # Index 3 fails after index 2 was inserted in the same transaction.
    db = raw_db(tmp_path / "audit.db")
    db.execute(
        "CREATE TRIGGER fail_at_3 BEFORE INSERT ON audit_entries WHEN NEW.idx = 3"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    outcomes: dict[int, object] = {}

    def worker(i: int) -> None:
        try:
            outcomes[i] = log.append(make_entry(i + 1))
        except AuditUnavailable as exc:
            outcomes[i] = exc

    # Batch one is entry 1 alone (held at the gate); batch two is the five queued behind it,
    # indexes 2..6, and fails at index 3.
    threads = start_held(log, worker, 6)
    log.gate.set()
    for t in threads:
        t.join()
    assert outcomes[0] == 1
    failed = [outcomes[i] for i in range(1, 6)]
    assert all(
        isinstance(e, AuditUnavailable) and isinstance(e.__cause__, sqlite3.IntegrityError)
        for e in failed
    )
    assert log.size() == 2  # index 2 was rolled back with the rest of its batch
    assert log.verify() == 2
    db.execute("DROP TRIGGER fail_at_3")
    db.close()
    assert log.append(make_entry(99)) == 2
    assert log.verify() == 3


def test_locked_store_fails_waiters_then_recovers(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log(busy_timeout=0.05)
    log.append(make_entry(0))
    blocker = raw_db(tmp_path / "audit.db")
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            log.append(make_entry(i))
        except AuditUnavailable as exc:
            errors.append(exc)

    run_threads(4, worker)
    assert len(errors) == 4
    assert all("locked" in str(e.__cause__) for e in errors)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert log.size() == 1
    assert log.append(make_entry(1)) == 1
    assert log.verify() == 2


def test_full_queue_refuses_rather_than_drops(make_log: LogFactory) -> None:
    log = make_log(cls=GatedLog, max_queue=2, max_batch=1)
    assert isinstance(log, _Gate)
    results: list[int] = []

    def worker(i: int) -> None:
        results.append(log.append(make_entry(i)))

    # One batch is held at the gate and two entries fill the queue.
    threads = start_held(log, worker, 3)
    with pytest.raises(AuditUnavailable, match="queue is full"):
        log.append(make_entry(3))
    log.gate.set()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2]
    assert log.size() == 3


def test_rows_cannot_be_changed_through_sql(make_sqlite_log: LogFactory, tmp_path: Path) -> None:
    log = make_sqlite_log()
    for i in range(3):
        log.append(make_entry(i))
    db = raw_db(tmp_path / "audit.db")
    entry_json = db.execute("SELECT entry_json FROM audit_entries WHERE idx = 0").fetchone()[0]
    leaf = b"\x01" * 32
    with pytest.raises(sqlite3.IntegrityError, match="UPDATE refused"):
        db.execute("UPDATE audit_entries SET entry_json = '{}' WHERE idx = 1")
    with pytest.raises(sqlite3.IntegrityError, match="DELETE refused"):
        db.execute("DELETE FROM audit_entries WHERE idx = 2")
    with pytest.raises(sqlite3.IntegrityError, match="DELETE refused"):
        db.execute("DELETE FROM audit_entries")
    with pytest.raises(sqlite3.IntegrityError, match="next index"):
        db.execute(
            "INSERT OR REPLACE INTO audit_entries (idx, entry_json, leaf_hash, chain_hash)"
            " VALUES (1, ?, ?, ?)",
            (entry_json, leaf, leaf),
        )
    with pytest.raises(sqlite3.IntegrityError, match="next index"):
        db.execute(
            "INSERT INTO audit_entries (idx, entry_json, leaf_hash, chain_hash)"
            " VALUES (7, ?, ?, ?)",
            (entry_json, leaf, leaf),
        )
    db.close()
    assert log.verify() == 3


def _tamper(path: Path, *statements: str) -> None:
    db = raw_db(path)
    db.execute("DROP TRIGGER audit_entries_no_update")
    db.execute("DROP TRIGGER audit_entries_no_delete")
    for sql in statements:
        db.execute(sql)
    db.close()


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (
            "UPDATE audit_entries SET entry_json = replace(entry_json, 'insurer-2', 'insurer-9')"
            " WHERE idx = 5",
            "entry 5: leaf hash mismatch",
        ),
        ("UPDATE audit_entries SET chain_hash = zeroblob(32) WHERE idx = 6", "entry 6: chain hash"),
        ("DELETE FROM audit_entries WHERE idx = 4", "entry 4: missing, next stored index is 5"),
        (
            "UPDATE audit_entries"
            " SET leaf_hash = (SELECT leaf_hash FROM audit_entries WHERE idx = 3) WHERE idx = 2",
            "entry 2: leaf hash mismatch",
        ),
    ],
)
def test_verify_finds_first_tampered_entry(
    make_sqlite_log: LogFactory, tmp_path: Path, statement: str, message: str
) -> None:
    log = make_sqlite_log()
    for i in range(10):
        log.append(make_entry(i))
    _tamper(tmp_path / "audit.db", statement)
    with pytest.raises(AuditIntegrityError, match=message) as info:
        log.verify()
    assert info.value.index == int(message.split()[1].rstrip(":"))


def test_store_that_shrank_under_the_log_is_refused(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log()
    for i in range(5):
        log.append(make_entry(i))
    _tamper(tmp_path / "audit.db", "DELETE FROM audit_entries WHERE idx >= 3")
    with pytest.raises(AuditUnavailable) as info:
        log.append(make_entry(5))
    assert isinstance(info.value.__cause__, AuditIntegrityError)
    assert "shrank" in str(info.value.__cause__)
    assert log.size() == 3


def test_two_logs_on_one_file_build_one_chain(make_log: LogFactory) -> None:
    first, second = make_log(), make_log()

    def worker(t: int) -> None:
        log = first if t % 2 else second
        for i in range(50):
            log.append(make_entry(t * 100 + i))

    run_threads(4, worker)
    assert first.verify() == second.verify() == 200


_CHILD = """
import sys
from gateway.audit import AuditEntry, SqliteAuditLog
with SqliteAuditLog(sys.argv[1]) as log:
    for i in range(100):
        log.append(AuditEntry(ts="2026-11-22T07:29:05.000000Z", actor=sys.argv[2],
                              role="insurer", action="query.aggregate",
                              decision="allow", status=200))
"""


def test_processes_appending_to_one_file_build_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    SqliteAuditLog(path).close()  # create the schema once
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(path), f"proc-{n}"], cwd=REPO)
        for n in range(3)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    with SqliteAuditLog(path) as log:
        assert log.verify() == 300
        assert {log.get(i).actor for i in range(300)} == {"proc-0", "proc-1", "proc-2"}


def test_search_filters(make_log: LogFactory) -> None:
    log = make_log()
    people = ["p-aaaa", "p-bbbb", None]
    for i in range(30):
        log.append(
            make_entry(
                i,
                decision="deny" if i % 5 == 0 else "allow",
                status=403 if i % 5 == 0 else 200,
                subject_pseudonym=people[i % 3],
                consent_id="consent-1" if i % 3 == 0 else None,
                purpose="惠民保定价" if i % 4 == 0 else "pricing",
            )
        )

    def idx(**kw: Any) -> list[int]:
        return [i for i, _ in log.search(**kw)]

    assert idx(limit=1000) == list(range(30))
    assert idx(actor="insurer-1") == [i for i in range(30) if i % 3 == 1]
    assert idx(org="pingan", decision="deny") == [5, 15, 25]
    assert idx(subject_pseudonym="p-bbbb") == [i for i in range(30) if i % 3 == 1]
    assert idx(consent_id="consent-1", purpose="惠民保定价") == [0, 12, 24]
    assert idx(action="oauth.token") == []
    assert idx(since="2026-11-22T07:00:10.000010Z", until="2026-11-22T07:00:13.000000Z") == [
        10,
        11,
        12,
    ]
    assert idx(since="2026-11-22", until="2026-11-23", limit=5, offset=3) == [3, 4, 5, 6, 7]
    assert idx(until="2026-11-22") == []
    assert idx(since="2026-11-22T15:00:28+08:00") == [28, 29]  # any zone, normalized to UTC
    assert idx(since=datetime(2026, 11, 22, 7, 0, 29, tzinfo=UTC)) == [29]
    ((index, entry),) = log.search(decision="deny", actor="insurer-2", org="pingan")
    assert (index, entry.status) == (5, 403)


@pytest.mark.parametrize(
    "kw",
    [
        {"limit": 0},
        {"limit": 1001},
        {"offset": -1},
        {"since": "yesterday"},
        {"until": "2026-11-22T07:29"},
        {"until": datetime(2026, 11, 22)},
    ],
)
def test_search_refuses_bad_bounds(make_log: LogFactory, kw: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        make_log().search(**kw)


def test_search_values_are_bound_not_spliced(make_log: LogFactory) -> None:
    log = make_log()
    log.append(make_entry(0))
    assert log.search(actor="x' OR '1'='1") == []
    assert log.search(org="cpic' --") == []


def test_unusable_store_is_reported_unavailable(tmp_path: Path) -> None:
    with pytest.raises(AuditUnavailable, match="cannot open"):
        SqliteAuditLog(tmp_path)  # a directory
    path = tmp_path / "future.db"
    db = raw_db(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(AuditUnavailable, match="schema version 99"):
        SqliteAuditLog(path)
    with pytest.raises(ValueError, match="file path"):
        SqliteAuditLog(":memory:")


def test_reads_after_close_are_refused(make_log: LogFactory) -> None:
    log = make_log()
    log.close()
    with pytest.raises(AuditUnavailable):
        log.size()


# -- the Merkle tree in the store ---------------------------------------------------------------


def test_store_roots_and_proofs_match_the_tree_of_its_leaves(make_log: LogFactory) -> None:
    log = make_log()
    assert log.root() == merkle.EMPTY_ROOT
    got: list[int] = []

    def worker(t: int) -> None:  # concurrent appends: batches of varied sizes
        for i in range(25):
            got.append(log.append(make_entry(t * 100 + i)))

    run_threads(3, worker)
    leaves = [r.leaf_hash for r in log.iter_rows()]
    assert len(leaves) == 75
    assert log.verify() == 75
    for size in range(76):
        root = log.root(size)
        assert root == merkle.root(leaves[:size])
        for first in range(size + 1):
            proof = log.consistency_proof(first, size)
            merkle.verify_consistency(first, size, merkle.root(leaves[:first]), root, proof)
    for index in range(75):
        proof = log.inclusion_proof(index, 75)
        assert proof == merkle.inclusion_proof(index, 75, leaves)
        merkle.verify_inclusion(log.leaf_hash(index), index, 75, proof, log.root())
    # The endpoint's one-read form, for every leaf of every size, with the proof cache warm
    # (levels >= 2 cached, level 1 hashed from leaves) and then cold in a fresh log.
    for fresh in (False, True):
        reader = make_log() if fresh else log
        for size in (1, 2, 3, 5, 8, 13, 31, 32, 33, 64, 75):
            for index in range(size):
                assert reader.inclusion(index, size) == (
                    leaves[index], merkle.root(leaves[:size]),
                    merkle.inclusion_proof(index, size, leaves))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda log: log.inclusion_proof(3, 3), "index 3, want 0 <= index < tree_size 3"),
        (lambda log: log.inclusion_proof(-1, 3), "index -1, want"),
        (
            lambda log: log.inclusion_proof(0, 4),
            "tree_size 4, want at most the current tree size 3",
        ),
        (lambda log: log.inclusion_proof(0, -1), "tree_size must be a non-negative integer"),
        (lambda log: log.consistency_proof(3, 2), "first 3, want at most the current tree size 2"),
        (lambda log: log.consistency_proof(1, 9), "second 9, want at most the current tree size 3"),
        (lambda log: log.root(4), "tree_size 4, want at most the current tree size 3"),
    ],
)
def test_proof_arguments_are_refused_with_got_and_want(
    make_log: LogFactory, call: Callable[[AuditLog], object], message: str
) -> None:
    log = make_log()
    for i in range(3):
        log.append(make_entry(i))
    with pytest.raises(BadRequest, match=message):
        call(log)


def _tamper_subtree(path: Path, level: int, idx: int) -> None:
    db = raw_db(path)
    db.execute("DROP TRIGGER IF EXISTS audit_subtrees_no_update")
    db.execute(
        "UPDATE audit_subtrees SET hash = zeroblob(32) WHERE level = ? AND idx = ?", (level, idx)
    )
    db.close()


def test_verify_and_export_find_a_tampered_subtree_hash(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log()
    for i in range(10):
        log.append(make_entry(i))
    _tamper_subtree(tmp_path / "audit.db", 2, 1)
    with pytest.raises(AuditIntegrityError, match=r"subtree \(2, 1\) over entries 4..7") as info:
        log.verify()
    assert info.value.index == 4
    # The export compares the root the stored subtrees give with the recomputed one.
    _tamper_subtree(tmp_path / "audit.db", 3, 0)
    with pytest.raises(AuditIntegrityError, match="stored Merkle subtree hashes do not match"):
        export_bundle(log, tmp_path / "b.json", signing_key(), origin=ORIGIN)
    assert not (tmp_path / "b.json").exists()


def test_subtree_rows_cannot_be_changed_through_sql(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log()
    for i in range(4):
        log.append(make_entry(i))
    db = raw_db(tmp_path / "audit.db")
    with pytest.raises(sqlite3.IntegrityError, match="UPDATE refused"):
        db.execute("UPDATE audit_subtrees SET hash = zeroblob(32)")
    with pytest.raises(sqlite3.IntegrityError, match="DELETE refused"):
        db.execute("DELETE FROM audit_subtrees")
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute("INSERT INTO audit_subtrees VALUES (1, 0, zeroblob(32))")
    db.close()
    assert log.verify() == 4


def test_a_schema_1_store_gets_its_subtrees_on_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with SqliteAuditLog(path) as log:
        for i in range(21):
            log.append(make_entry(i))
        want = log.root()
    db = raw_db(path)  # what a schema-1 store looks like: no subtree table
    db.execute("DROP TABLE audit_subtrees")
    db.execute("PRAGMA user_version = 1")
    db.close()
    with SqliteAuditLog(path) as log:
        assert log.root() == want
        assert log.verify() == 21
        log.append(make_entry(21))
        assert log.verify() == 22


def test_a_missing_subtree_is_an_integrity_error(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log()
    for i in range(8):
        log.append(make_entry(i))
    db = raw_db(tmp_path / "audit.db")
    db.execute("DROP TRIGGER audit_subtrees_no_delete")
    db.execute("DELETE FROM audit_subtrees WHERE level = 3")
    db.close()
    with pytest.raises(AuditIntegrityError, match=r"subtree \(3, 0\).*missing"):
        log.root()


def test_checkpoints_are_signed_and_pairwise_consistent(make_log: LogFactory) -> None:
    log = make_log()
    key = signing_key()
    notes = [log.checkpoint(key, origin=ORIGIN)]
    for i in range(40):
        log.append(make_entry(i))
        if i % 7 == 0:
            notes.append(log.checkpoint(key, origin=ORIGIN))
    notes.append(log.checkpoint(key, origin=ORIGIN))
    assert log.checkpoint(key, origin=ORIGIN) == notes[-1]  # same size: the same note
    seen = [parse_and_verify_checkpoint(n, key.public_key(), None, ORIGIN) for n in notes]
    assert [c.size for c in seen] == [0, 1, 8, 15, 22, 29, 36, 40]
    for a in seen:
        for b in seen:
            if a.size <= b.size:
                proof = log.consistency_proof(a.size, b.size)
                merkle.verify_consistency(a.size, b.size, a.root, b.root, proof)


def test_checkpoint_max_age_reuses_the_last_note(make_log: LogFactory) -> None:
    log = make_log()
    key = signing_key()
    log.append(make_entry(0))
    first = log.checkpoint(key, origin=ORIGIN, max_age=60)
    log.append(make_entry(1))
    assert log.checkpoint(key, origin=ORIGIN, max_age=60) == first
    assert log.checkpoint(key, origin=ORIGIN) != first


def test_no_checkpoint_is_signed_over_a_forked_store(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log()
    key = signing_key()
    for i in range(6):
        log.append(make_entry(i))
    log.checkpoint(key, origin=ORIGIN)
    log.append(make_entry(6))
    _tamper_subtree(tmp_path / "audit.db", 2, 0)  # a subtree the last checkpoint covers
    with pytest.raises(AuditIntegrityError, match="consistency proof 6 -> 7"):
        log.checkpoint(key, origin=ORIGIN)


# -- bundles ---------------------------------------------------------------------------------


def test_export_and_verify_round_trip(make_log: LogFactory, tmp_path: Path) -> None:
    log = make_log()
    for i in range(25):
        log.append(make_entry(i, purpose="惠民保定价"))
    key = signing_key()
    out = tmp_path / "bundle.json"
    export_bundle(log, out, key, origin=ORIGIN)
    assert verify_bundle(out, key.public_key()) == 25
    assert verify_bundle(out, public_raw(key)) == 25
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert verify_bundle(out, pem) == 25
    bundle = json.loads(out.read_text(encoding="utf-8"))
    assert bundle["format"] == BUNDLE_FORMAT
    leaves = [r.leaf_hash for r in log.iter_rows()]
    assert bundle["head"] == {
        "size": 25,
        "chain_hash": log.head()[1].hex(),
        "root": merkle.root(leaves).hex(),
    }
    checkpoint = parse_and_verify_checkpoint(bundle["checkpoint"], key.public_key(), None, ORIGIN)
    assert (checkpoint.size, checkpoint.root) == (25, log.root())
    assert base64.b64decode(bundle["public_key"]) == public_raw(key)
    assert [e["entry"] for e in bundle["entries"]] == [
        json.loads(row.entry_json) for row in log.iter_rows()
    ]
    assert [entry_from_stored(json.dumps(e["entry"]), None) for e in bundle["entries"]] == [
        log.get(i) for i in range(25)
    ]
    assert not list(tmp_path.glob(".bundle.json.*"))  # no temporary file left


def test_empty_log_bundle_verifies(make_log: LogFactory, tmp_path: Path) -> None:
    out = tmp_path / "empty.json"
    export_bundle(make_log(), out, signing_key(), origin=ORIGIN)
    assert verify_bundle(out, public_raw(signing_key())) == 0


def test_export_refuses_to_sign_a_tampered_store(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log()
    for i in range(4):
        log.append(make_entry(i))
    _tamper(
        tmp_path / "audit.db",
        "UPDATE audit_entries SET entry_json = replace(entry_json, 'cpic', 'evil') WHERE idx = 2",
    )
    out = tmp_path / "bundle.json"
    with pytest.raises(AuditIntegrityError, match="entry 2"):
        export_bundle(log, out, signing_key(), origin=ORIGIN)
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.json.*"))


def test_checkpoint_message_refuses_multiline_origin() -> None:
    assert checkpoint_message("o", 3, GENESIS) == f"o\n3\n{'00' * 32}\n".encode()
    with pytest.raises(ValueError, match="single line"):
        checkpoint_message("a\nb", 0, GENESIS)


def test_verify_refuses_a_bad_public_key_argument() -> None:
    with pytest.raises(BadRequest, match="public key"):
        verify_bundle(VECTOR_DIR / "valid-bundle.json", b"\x00" * 31)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "top level is not an object"),
        ('{"format": "x", "format": "y"}', "duplicate key"),
        ('{"n": NaN}', "NaN is not JSON"),
    ],
)
def test_verify_refuses_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "b.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AuditIntegrityError, match=message):
        verify_bundle(path, public_raw(signing_key()))


def test_verify_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(AuditIntegrityError, match="cannot read"):
        verify_bundle(tmp_path / "absent.json", public_raw(signing_key()))


# -- test vectors ----------------------------------------------------------------------------


def _vector_entries() -> list[AuditEntry]:
    base = {"ts": "2026-11-22T07:29:05.123456Z", "policy_version": "policies@2026-11-01"}
    return [
        AuditEntry(
            **base,
            actor="insurer-pingan",
            role="anonymous",
            action="oauth.token",
            decision="allow",
            status=200,
        ),
        AuditEntry(
            **base,
            actor="insurer-pingan",
            role="insurer",
            org="中国平安",
            action="catalog.read",
            decision="allow",
            status=200,
            response_hash=sha256_tag(b"catalog"),
        ),
        AuditEntry(
            **base,
            actor="insurer-pingan",
            role="insurer",
            org="中国平安",
            action="query.aggregate",
            purpose="惠民保定价",
            decision="allow",
            status=200,
            grant_id="grant-7",
            data_version="2026-10",
            request={
                "purpose": "惠民保定价",
                "dataset": "settlements",
                "dimensions": ["insu_admdvs", "age_band"],
                "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "hifp_pay"}],
            },
            fields=["age_band", "hifp_pay", "insu_admdvs"],
            field_justifications={
                "age_band": "年龄分组定价",
                "hifp_pay": "统筹基金支付测算",
                "insu_admdvs": "参保地分区",
            },
            cells_released=38,
            cells_suppressed=4,
            budget_spent=0.25,
            response_hash=sha256_tag(b"aggregate"),
        ),
        AuditEntry(
            **base,
            actor="insurer-pingan",
            role="insurer",
            org="中国平安",
            action="query.aggregate",
            purpose="惠民保定价",
            decision="deny",
            status=403,
            reasons=["measure min is never allowed"],
            error_code="policy_denied",
            request={
                "purpose": "惠民保定价",
                "dataset": "settlements",
                "measures": [{"fn": "min", "field": "hifp_pay"}],
            },
        ),
        AuditEntry(
            **base,
            actor="insurer-pingan",
            role="insurer",
            org="中国平安",
            action="persons.enrollment",
            purpose="投保身份校验",
            decision="allow",
            status=200,
            subject_pseudonym="psn:3f9a6c0e1b7d4a52",
            consent_id="consent-0001",
            fields=["insutype", "insu_admdvs"],
            response_hash=sha256_tag(b"enrollment"),
        ),
    ]


def _wrap(
    description: str,
    expected_error: str,
    bundle: dict[str, Any],
    previous_checkpoint: str | None = None,
) -> dict[str, Any]:
    vector = {"description": description, "expected_error": expected_error, "bundle": bundle}
    if previous_checkpoint is not None:
        vector["previous_checkpoint"] = previous_checkpoint
    return vector


def _forked_entries() -> list[AuditEntry]:
    """The vector entries with entry 3 (the denied query) rewritten as allowed."""
    entries = _vector_entries()
    entries[3] = entries[3].model_copy(
        update={"decision": "allow", "status": 200, "reasons": [], "error_code": None}
    )
    return entries


def _rehash(bundle: dict[str, Any]) -> None:
    """Recompute every leaf, chain and the head, as an attacker without the key would."""
    prev = GENESIS
    leaves = []
    for item in bundle["entries"]:
        leaf = leaf_hash(canonical_json(item["entry"]))
        prev = chain_hash(prev, leaf)
        item["leaf_hash"], item["chain_hash"] = leaf.hex(), prev.hex()
        leaves.append(leaf)
    bundle["head"] = {
        "size": len(bundle["entries"]),
        "chain_hash": prev.hex(),
        "root": merkle.root(leaves).hex(),
    }


def _sign(bundle: dict[str, Any], key: Ed25519PrivateKey) -> None:
    head = bundle["head"]
    message = checkpoint_message(bundle["origin"], head["size"], bytes.fromhex(head["chain_hash"]))
    bundle["signature"] = base64.b64encode(key.sign(message)).decode()
    bundle["public_key"] = base64.b64encode(public_raw(key)).decode()


def _fixed_salt_log(path: Path) -> SqliteAuditLog:
    """A log whose personal-part salts are fixed, so the vectors are reproducible (the log
    warns that such salts are unsafe: expected here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return SqliteAuditLog(path, unsafe_salt=lambda: bytes(range(16)))


def build_vectors(out_dir: Path) -> None:
    """Write ``valid-bundle.json`` (a real export) and the tampered copies to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        # A fixed salt for personal parts, so that the vectors are reproducible.
        _fixed_salt_log(Path(tmp) / "audit.db") as log,
    ):
        for entry in _vector_entries():
            log.append(entry)
        export_bundle(log, out_dir / "valid-bundle.json", signing_key(), origin=ORIGIN)
    valid = json.loads((out_dir / "valid-bundle.json").read_text(encoding="utf-8"))
    vectors: dict[str, dict[str, Any]] = {}

    b = copy.deepcopy(valid)
    b["entries"][2]["entry"]["cells_suppressed"] = 0
    vectors["changed-entry"] = _wrap(
        "entry 2 edited (cells_suppressed 4 -> 0), stored hashes left as they were",
        "entry 2: leaf hash mismatch",
        b,
    )

    b = copy.deepcopy(valid)
    b["entries"][2]["entry"]["cells_suppressed"] = 0
    _rehash(b)
    vectors["changed-entry-rehashed"] = _wrap(
        "entry 2 edited and every leaf, chain and the head recomputed; old signature kept",
        "signature does not verify",
        b,
    )

    b = copy.deepcopy(valid)
    del b["entries"][3]
    vectors["removed-entry"] = _wrap(
        "entry 3 (the denied query) removed, the rest and the head left as they were",
        "entries[3]: index 4, want 3",
        b,
    )

    b = copy.deepcopy(valid)
    del b["entries"][3]
    b["entries"][3]["index"] = 3
    b["head"]["size"] = 4
    vectors["removed-entry-renumbered"] = _wrap(
        "entry 3 removed, later indexes and the head size renumbered to hide the gap",
        "entry 3: chain hash mismatch",
        b,
    )

    b = copy.deepcopy(valid)
    b["entries"][1], b["entries"][2] = b["entries"][2], b["entries"][1]
    vectors["reordered-entries"] = _wrap(
        "entries 1 and 2 swapped with their index members", "entries[1]: index 2, want 1", b
    )

    b = copy.deepcopy(valid)
    b["entries"][1], b["entries"][2] = b["entries"][2], b["entries"][1]
    b["entries"][1]["index"], b["entries"][2]["index"] = 1, 2
    vectors["reordered-entries-renumbered"] = _wrap(
        "entries 1 and 2 swapped and renumbered, so the indexes look contiguous",
        "entry 1: chain hash mismatch",
        b,
    )

    b = copy.deepcopy(valid)
    del b["entries"][3:]
    vectors["truncated-log"] = _wrap(
        "the last two entries cut, the head (size 5) left as it was",
        "head: size 5, but the bundle has 3 entries",
        b,
    )

    b = copy.deepcopy(valid)
    del b["entries"][3:]
    _rehash(b)
    vectors["truncated-log-new-head"] = _wrap(
        "the last two entries cut and the head moved back to entry 2; old signature kept",
        "signature does not verify",
        b,
    )

    b = copy.deepcopy(valid)
    b["head"]["chain_hash"] = b["entries"][3]["chain_hash"]
    vectors["head-mismatch"] = _wrap(
        "head chain_hash replaced by that of entry 3",
        "head: chain_hash does not match the last entry",
        b,
    )

    b = copy.deepcopy(valid)
    sig = bytearray(base64.b64decode(b["signature"]))
    sig[0] ^= 0x01
    b["signature"] = base64.b64encode(bytes(sig)).decode()
    vectors["bad-signature"] = _wrap(
        "one bit of the signature flipped", "signature does not verify", b
    )

    b = copy.deepcopy(valid)
    _sign(b, signing_key(OTHER_SEED))
    vectors["wrong-key"] = _wrap(
        "bundle re-signed by another key (RFC 8032 TEST 2), whose public key it carries;"
        " verified against the expected key (RFC 8032 TEST 1)",
        "signature does not verify with the given public key",
        b,
    )

    b = copy.deepcopy(valid)
    b["format"] = "yibao-gateway-audit-bundle/v0"
    vectors["wrong-format"] = _wrap(
        "unknown format string", "bundle: format 'yibao-gateway-audit-bundle/v0', want one of", b
    )

    # -- the Merkle root and the checkpoint (format v2) --
    leaves = [bytes.fromhex(item["leaf_hash"]) for item in valid["entries"]]
    forked = _forked_entries()
    forked_leaves = [leaf_hash(entry_bytes(e, bytes(range(16)))) for e in forked]

    b = copy.deepcopy(valid)
    b["head"]["root"] = merkle.root(forked_leaves).hex()
    vectors["root-mismatch"] = _wrap(
        "head root replaced by the root of a forked history of the same size",
        "head: root does not match the entries",
        b,
    )

    b = copy.deepcopy(valid)
    b["checkpoint"] = sign_checkpoint(ORIGIN, 5, merkle.root(forked_leaves), signing_key())
    vectors["forked-checkpoint"] = _wrap(
        "the checkpoint replaced by one the log key signed for a forked history of the same size"
        " (entry 3, the denied query, rewritten as allowed)",
        "checkpoint: root does not match the entries (forked or rewritten log)",
        b,
    )

    b = copy.deepcopy(valid)
    b["checkpoint"] = sign_checkpoint(ORIGIN, 5, merkle.root(leaves), signing_key(OTHER_SEED))
    vectors["checkpoint-wrong-key"] = _wrap(
        "the checkpoint re-signed by another key (RFC 8032 TEST 2) under the log's key name",
        f"checkpoint: no signature by key '{ORIGIN}'",
        b,
    )

    b = copy.deepcopy(valid)
    note = b["checkpoint"]
    blob = bytearray(base64.b64decode(note.rsplit(" ", 1)[1]))
    blob[10] ^= 0x01
    b["checkpoint"] = note.rsplit(" ", 1)[0] + " " + base64.b64encode(bytes(blob)).decode() + "\n"
    vectors["checkpoint-bad-signature"] = _wrap(
        "one bit of the checkpoint's Ed25519 signature flipped",
        f"checkpoint: signature by {ORIGIN} does not verify",
        b,
    )

    b = copy.deepcopy(valid)
    b["checkpoint"] = sign_checkpoint(ORIGIN, 4, merkle.root(leaves[:4]), signing_key())
    vectors["checkpoint-wrong-size"] = _wrap(
        "the checkpoint replaced by an older genuine one (size 4)",
        "checkpoint: tree size 4, want 5",
        b,
    )

    # A history rewritten and re-exported with the real key is internally consistent; only a
    # checkpoint the auditor saved earlier catches it.
    with (
        tempfile.TemporaryDirectory() as tmp,
        _fixed_salt_log(Path(tmp) / "audit.db") as log,
    ):
        for entry in forked:
            log.append(entry)
        export_bundle(log, Path(tmp) / "forked.json", signing_key(), origin=ORIGIN)
        b = json.loads((Path(tmp) / "forked.json").read_text(encoding="utf-8"))
    vectors["rewritten-history"] = _wrap(
        "the log rewritten from entry 3 (denied query made allowed) and re-exported with the"
        " log's own key; the auditor's checkpoint saved at size 4 shows the fork",
        "previous checkpoint: the bundle's first 4 entries do not have its root",
        b,
        previous_checkpoint=sign_checkpoint(ORIGIN, 4, merkle.root(leaves[:4]), signing_key()),
    )

    b = copy.deepcopy(valid)
    del b["entries"][3:]
    _rehash(b)
    _sign(b, signing_key())
    b["checkpoint"] = sign_checkpoint(ORIGIN, 3, merkle.root(leaves[:3]), signing_key())
    vectors["truncated-below-previous-checkpoint"] = _wrap(
        "the log cut back to 3 entries and re-signed with the log's key; the auditor saved the"
        " checkpoint at size 5",
        "previous checkpoint: tree size 5, but the bundle has 3 entries",
        b,
        previous_checkpoint=valid["checkpoint"],
    )

    b = copy.deepcopy(valid)
    vectors["previous-checkpoint-wrong-key"] = _wrap(
        "a valid bundle, but the saved previous checkpoint was signed by another key",
        "previous checkpoint: no signature by key",
        b,
        previous_checkpoint=sign_checkpoint(
            ORIGIN, 4, merkle.root(leaves[:4]), signing_key(OTHER_SEED)
        ),
    )

    # Format v1 (no root, no checkpoint) stays readable.
    v1 = copy.deepcopy(valid)
    v1["format"] = BUNDLE_FORMAT_V1
    del v1["checkpoint"]
    del v1["head"]["root"]
    text = json.dumps(v1, ensure_ascii=False, indent=1) + "\n"
    (out_dir / "valid-bundle-v1.json").write_text(text, encoding="utf-8")

    b = copy.deepcopy(valid)
    b["entries"][1]["leaf_hash"] = b["entries"][1]["leaf_hash"].upper()
    vectors["uppercase-hash"] = _wrap(
        "a stored hash in uppercase hex: refused as malformed before any hashing",
        "entries[1]: leaf_hash: want 64 lowercase hex digits",
        b,
    )

    for name, vector in vectors.items():
        text = json.dumps(vector, ensure_ascii=False, indent=1) + "\n"
        (out_dir / f"{name}.json").write_text(text, encoding="utf-8")


_VALID_VECTORS = ("valid-bundle.json", "valid-bundle-v1.json")


def _tampered_vectors() -> list[Path]:
    return sorted(p for p in VECTOR_DIR.glob("*.json") if p.name not in _VALID_VECTORS)


def test_fixed_keys_are_the_rfc8032_keys() -> None:
    assert public_raw(signing_key()) == SIGNING_PUBLIC
    other = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
    assert public_raw(signing_key(OTHER_SEED)).hex() == other


def test_valid_vector_verifies() -> None:
    assert verify_bundle(VECTOR_DIR / "valid-bundle.json", SIGNING_PUBLIC) == 5


def test_v1_bundle_is_still_verified() -> None:
    path = VECTOR_DIR / "valid-bundle-v1.json"
    assert json.loads(path.read_text(encoding="utf-8"))["format"] == BUNDLE_FORMAT_V1
    verified = verify_bundle_checkpoint(path, SIGNING_PUBLIC)
    assert (verified.size, verified.checkpoint) == (5, None)
    # A v1 bundle carries no root, but one saved earlier is still checked against its entries.
    current = json.loads((VECTOR_DIR / "valid-bundle.json").read_text(encoding="utf-8"))
    assert verify_bundle(path, SIGNING_PUBLIC, previous_checkpoint=current["checkpoint"]) == 5


def test_valid_vector_extends_its_own_earlier_checkpoints() -> None:
    path = VECTOR_DIR / "valid-bundle.json"
    bundle = json.loads(path.read_text(encoding="utf-8"))
    leaves = [bytes.fromhex(item["leaf_hash"]) for item in bundle["entries"]]
    for size in range(6):
        earlier = sign_checkpoint(ORIGIN, size, merkle.root(leaves[:size]), signing_key())
        assert verify_bundle(path, SIGNING_PUBLIC, previous_checkpoint=earlier) == 5
    verified = verify_bundle_checkpoint(path, SIGNING_PUBLIC)
    assert verified.checkpoint == bundle["checkpoint"]
    assert verified.root == merkle.root(leaves)


def test_tampered_vectors_exist() -> None:
    names = {p.stem for p in _tampered_vectors()}
    assert {
        "changed-entry",
        "removed-entry",
        "reordered-entries",
        "truncated-log",
        "wrong-key",
        "bad-signature",
        "forked-checkpoint",
        "rewritten-history",
    } <= names


@pytest.mark.parametrize("vector", _tampered_vectors(), ids=lambda p: p.stem)
def test_tampered_vector_is_refused(vector: Path, tmp_path: Path) -> None:
    data = json.loads(vector.read_text(encoding="utf-8"))
    assert {"description", "expected_error", "bundle"} <= set(data)
    assert set(data) <= {"description", "expected_error", "bundle", "previous_checkpoint"}
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(data["bundle"], ensure_ascii=False), encoding="utf-8")
    previous = data.get("previous_checkpoint")
    with pytest.raises(AuditIntegrityError) as info:
        verify_bundle(path, SIGNING_PUBLIC, previous_checkpoint=previous)
    assert data["expected_error"] in info.value.message
    if previous is not None:  # the bundle alone verifies: only the saved checkpoint catches it
        verify_bundle(path, SIGNING_PUBLIC)


def test_vectors_are_current(tmp_path: Path) -> None:
    build_vectors(tmp_path)
    built = sorted(p.name for p in tmp_path.glob("*.json"))
    committed = sorted(p.name for p in VECTOR_DIR.glob("*.json"))
    assert built == committed
    for name in built:
        assert (tmp_path / name).read_bytes() == (VECTOR_DIR / name).read_bytes(), name


if __name__ == "__main__":
    build_vectors(VECTOR_DIR)
    print(f"wrote test vectors to {VECTOR_DIR}")
