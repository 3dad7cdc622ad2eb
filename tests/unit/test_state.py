"""The state store, one suite for every backend (STYLE.md item 6).

Each test takes the ``backend`` fixture: a picklable :class:`BackendSpec` that :func:`open_store`
turns into a fresh store object, so a test can open a second object on the same database (the
view of another worker process) and spawned processes can open their own. Every test runs on
SQLite and on a real PostgreSQL server (``tests/postgres.py``), each in a fresh database.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.consent import ConsentRecord, ConsentState, jwk_thumbprint, public_jwk
from gateway.errors import (
    BudgetExhausted,
    Conflict,
    IntegrityViolation,
    NotFound,
    StoreUnavailable,
    ValidationFailed,
)
from gateway.state.budgets import BudgetCharge
from gateway.state.consents import datetime_to_ns
from gateway.state.migrations import MIGRATIONS, Migration, statement_for
from gateway.state.postgres import PostgresStateStore
from gateway.state.store import ClientRecord, GrantRecord, SqliteStateStore, StateStore

BACKENDS = ["sqlite", "postgresql"]
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
NS = 1_000_000_000
T0_NS = datetime_to_ns(T0)
THREADS = 16
PROCESSES = 4


@dataclass(frozen=True)
class BackendSpec:
    """Enough to open the same database again, in this process or a spawned one."""

    kind: str
    location: str


_OPENED: list[StateStore] = []


def open_store(spec: BackendSpec) -> StateStore:
    opened: StateStore
    if spec.kind == "sqlite":
        opened = SqliteStateStore(Path(spec.location))
    elif spec.kind == "postgresql":
        opened = PostgresStateStore(spec.location, max_size=4)
    else:
        raise AssertionError(f"unknown backend {spec.kind}")
    _OPENED.append(opened)
    return opened


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    """Close every store a test opened (PostgreSQL pools) before its database is dropped."""
    yield
    while _OPENED:
        _OPENED.pop().close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendSpec:
    kind = str(request.param)
    if kind == "sqlite":
        return BackendSpec(kind, str(tmp_path / "state.sqlite3"))
    if kind == "postgresql":
        return BackendSpec(kind, str(request.getfixturevalue("postgres_url")))
    raise AssertionError(f"unknown backend {kind}")


@pytest.fixture
def store(backend: BackendSpec) -> StateStore:
    return open_store(backend)


def consent(consent_id: str = "consent-0001", *, subject: str = "psn:aaaa",
            insurer: str = "ins-a", purpose: str = "claims_fast_track",
            hours: int = 24) -> ConsentRecord:
    single_use = purpose == "enrollment_check"
    datatypes = (("enrollment.status",) if single_use
                 else ("settlements.summary", "settlements.amounts"))
    return ConsentRecord(
        consent_id=consent_id,
        subject=subject,
        insurer_org=insurer,
        purpose=purpose,
        datatypes=datatypes,
        period_start=date(2025, 1, 1),
        period_end=date(2025, 12, 31),
        valid_from=T0,
        valid_until=T0 + timedelta(hours=hours),
        created_by="t-admin",
        created_at=T0 - timedelta(minutes=1),
        single_use=single_use,
    )


def _race(calls: list[Callable[[], bool]]) -> list[bool]:
    """Run every call at once from its own thread (released together by a barrier)."""
    barrier = threading.Barrier(len(calls))
    results: list[bool | BaseException] = [False] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [bool(r) for r in results]


# -- other processes: one spawned pool of PROCESSES workers for the whole session ------------
# Spawning and importing costs seconds per process, so the races reuse the same four processes;
# each task opens its own store (its own connection) and closes it before returning.


@dataclass
class Workers:
    pool: ProcessPoolExecutor
    manager: Any

    def race(self, fn: Callable[..., Any], spec: BackendSpec, *args: Any) -> list[Any]:
        """``fn(store, *args)`` in every worker process at once (released by one barrier)."""
        barrier = self.manager.Barrier(PROCESSES)
        futures = [self.pool.submit(_in_worker, fn, spec, barrier, *args)
                   for _ in range(PROCESSES)]
        return [f.result(timeout=120) for f in futures]

    def run(self, fn: Callable[..., Any], spec: BackendSpec, *args: Any) -> Any:
        return self.pool.submit(_in_worker, fn, spec, None, *args).result(timeout=120)


def _in_worker(fn: Callable[..., Any], spec: BackendSpec, barrier: Any, *args: Any) -> Any:
    if barrier is not None:
        barrier.wait(timeout=60)
    own = open_store(spec)
    try:
        return fn(own, *args)
    finally:
        _OPENED.remove(own)
        own.close()


@pytest.fixture(scope="session")
def workers() -> Iterator[Workers]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(PROCESSES, mp_context=ctx) as pool:
        yield Workers(pool, manager)


def _consume(own: StateStore, jti: str) -> bool:
    return own.consume_consent_jti(jti, "consent-0001", T0_NS + 600 * NS, T0_NS)


def _revoke(own: StateStore, consent_id: str) -> None:
    own.revoke_consent(consent_id, "psn:aaaa", T0_NS + 5 * NS)


# -- consents ---------------------------------------------------------------------------------


def test_consent_round_trip(store: StateStore) -> None:
    record = consent()
    stored = store.add_consent(record)
    got = store.get_consent(record.consent_id)
    assert got == stored
    assert got is not None
    assert got.record == record
    assert got.valid_from_ns == T0_NS
    assert got.valid_until_ns == T0_NS + 24 * 3600 * NS
    assert (got.revoked_at_ns, got.revoked_by) == (None, None)
    assert store.version("consents") == 1


def test_get_unknown_consent_is_none(store: StateStore) -> None:
    assert store.get_consent("consent-none") is None


def test_add_consent_twice_conflicts(store: StateStore) -> None:
    store.add_consent(consent())
    with pytest.raises(Conflict):
        store.add_consent(consent(subject="psn:other"))
    got = store.get_consent("consent-0001")
    assert got is not None
    assert got.record.subject == "psn:aaaa"
    assert store.version("consents") == 1


def test_add_consent_refuses_a_revoked_record(store: StateStore) -> None:
    record = consent().model_copy(update={"state": ConsentState.REVOKED})
    with pytest.raises(ValidationFailed):
        store.add_consent(record)
    assert store.get_consent("consent-0001") is None


def test_revoke_consent_records_who_and_when(store: StateStore) -> None:
    store.add_consent(consent())
    revoked = store.revoke_consent("consent-0001", "psn:aaaa", T0_NS + 7)
    assert revoked.record.state is ConsentState.REVOKED
    assert (revoked.revoked_at_ns, revoked.revoked_by) == (T0_NS + 7, "psn:aaaa")
    assert store.get_consent("consent-0001") == revoked
    assert store.version("consents") == 2
    assert not store.is_consent_live("consent-0001", T0_NS + 8)
    assert revoked.state_at(T0_NS + 8) is ConsentState.REVOKED


def test_revoke_twice_conflicts(store: StateStore) -> None:
    store.add_consent(consent())
    store.revoke_consent("consent-0001", "t-admin", T0_NS)
    with pytest.raises(Conflict):
        store.revoke_consent("consent-0001", "t-admin", T0_NS + 1)
    got = store.get_consent("consent-0001")
    assert got is not None
    assert got.revoked_at_ns == T0_NS
    assert store.version("consents") == 2


def test_revoke_unknown_is_not_found(store: StateStore) -> None:
    with pytest.raises(NotFound):
        store.revoke_consent("consent-none", "t-admin", T0_NS)
    assert store.version("consents") == 0


def test_consent_is_live_only_inside_its_validity(store: StateStore) -> None:
    stored = store.add_consent(consent(hours=1))
    end = T0_NS + 3600 * NS
    assert not store.is_consent_live("consent-0001", T0_NS - 1)
    assert store.is_consent_live("consent-0001", T0_NS)
    assert store.is_consent_live("consent-0001", end - 1)
    assert not store.is_consent_live("consent-0001", end)
    assert not store.is_consent_live("consent-none", T0_NS)
    assert stored.state_at(end - 1) is ConsentState.ACTIVE
    assert stored.state_at(end) is ConsentState.EXPIRED
    assert [stored.live_at(t) for t in (T0_NS - 1, T0_NS, end)] == [False, True, False]


def test_revocation_is_seen_by_another_store_on_its_next_call(backend: BackendSpec) -> None:
    worker_a, worker_b = open_store(backend), open_store(backend)
    worker_a.add_consent(consent())
    now = T0_NS + 10 * NS
    assert worker_b.is_consent_live("consent-0001", now)  # b's connection is open and warm
    seen = worker_b.version("consents")
    worker_a.revoke_consent("consent-0001", "psn:aaaa", now)
    assert not worker_b.is_consent_live("consent-0001", now)
    assert worker_b.version("consents") == seen + 1
    got = worker_b.get_consent("consent-0001")
    assert got is not None
    assert got.record.state is ConsentState.REVOKED


def test_revocation_in_another_process_is_seen_on_the_next_call(
    backend: BackendSpec, workers: Workers,
) -> None:
    here = open_store(backend)
    here.add_consent(consent())
    assert here.is_consent_live("consent-0001", T0_NS + 10 * NS)
    workers.run(_revoke, backend, "consent-0001")
    assert not here.is_consent_live("consent-0001", T0_NS + 10 * NS)


def test_list_consents_filters(store: StateStore) -> None:
    store.add_consent(consent("c-1", subject="psn:aaaa", insurer="ins-a"))
    store.add_consent(consent("c-2", subject="psn:aaaa", insurer="ins-b", hours=1))
    store.add_consent(consent("c-3", subject="psn:bbbb", insurer="ins-a"))
    store.add_consent(consent("c-4", subject="psn:aaaa", insurer="ins-a",
                              purpose="enrollment_check"))
    store.revoke_consent("c-4", "psn:aaaa", T0_NS + 1)

    def ids(**kwargs: Any) -> list[str]:
        return [c.consent_id for c in store.list_consents(**kwargs)]

    assert ids() == ["c-1", "c-2", "c-3", "c-4"]
    assert ids(subject="psn:aaaa") == ["c-1", "c-2", "c-4"]
    assert ids(insurer="ins-a") == ["c-1", "c-3", "c-4"]
    assert ids(subject="psn:aaaa", insurer="ins-a") == ["c-1", "c-4"]
    later = T0_NS + 2 * 3600 * NS
    assert ids(subject="psn:aaaa", live_only=True, now_ns=T0_NS + 2) == ["c-1", "c-2"]
    assert ids(subject="psn:aaaa", live_only=True, now_ns=later) == ["c-1"]
    assert ids(insurer="ins-a", live_only=True, now_ns=later) == ["c-1", "c-3"]
    assert ids(live_only=True, now_ns=T0_NS - 1) == []
    assert ids(subject="psn:nobody") == []
    with pytest.raises(ValidationFailed):
        store.list_consents(live_only=True)


# -- single-use consents by jti ---------------------------------------------------------------


def test_consume_consent_jti_once(store: StateStore) -> None:
    expires = T0_NS + 600 * NS
    assert store.consume_consent_jti("jti-1", "consent-0001", expires, T0_NS)
    assert not store.consume_consent_jti("jti-1", "consent-0001", expires, T0_NS + 1)
    assert not store.consume_consent_jti("jti-1", "consent-0002", expires, T0_NS + 1)
    assert store.consume_consent_jti("jti-2", "consent-0001", expires, T0_NS + 1)


def test_consume_consent_jti_from_16_threads_one_wins(store: StateStore) -> None:
    expires = T0_NS + 600 * NS
    results = _race([
        lambda: store.consume_consent_jti("jti-race", "consent-0001", expires, T0_NS)
    ] * THREADS)
    assert results.count(True) == 1


def test_consume_consent_jti_from_16_threads_with_own_stores_one_wins(
    backend: BackendSpec,
) -> None:
    stores = [open_store(backend) for _ in range(THREADS)]
    expires = T0_NS + 600 * NS
    results = _race([
        functools.partial(s.consume_consent_jti, "jti-race", "consent-0001", expires, T0_NS)
        for s in stores
    ])
    assert results.count(True) == 1


def test_consume_consent_jti_from_4_processes_one_wins(
    backend: BackendSpec, workers: Workers,
) -> None:
    open_store(backend)  # the schema exists before the race
    outcomes = workers.race(_consume, backend, "jti-p")
    assert outcomes.count(True) == 1
    assert outcomes.count(False) == PROCESSES - 1


def _rows(store: StateStore, table: str) -> int:
    statements = {
        "consumed_consent_jti": "SELECT COUNT(*) FROM consumed_consent_jti",
        "dpop_jti": "SELECT COUNT(*) FROM dpop_jti",
    }
    with store._tx() as cur:
        cur.execute(statements[table])
        return int(cur.fetchone()[0])


def test_consumed_consent_jti_is_purged_and_reusable_only_after_expiry(
    store: StateStore,
) -> None:
    expires = T0_NS + 600 * NS
    assert store.consume_consent_jti("jti-1", "consent-0001", expires, T0_NS)
    assert not store.consume_consent_jti("jti-1", "consent-0001", expires, expires - 1)
    assert not store.consume_consent_jti("jti-1", "consent-0001", expires, expires)
    # Another jti consumed after the expiry purges the first.
    assert store.consume_consent_jti("jti-2", "consent-0001", expires + NS, expires + 1)
    assert _rows(store, "consumed_consent_jti") == 1
    assert store.consume_consent_jti("jti-1", "consent-0001", expires + NS, expires + 1)


def test_consume_consent_jti_refuses_empty_ids(store: StateStore) -> None:
    with pytest.raises(ValidationFailed):
        store.consume_consent_jti("", "consent-0001", T0_NS, T0_NS)


# -- DPoP proofs by jti -----------------------------------------------------------------------


def test_dpop_jti_replay_is_refused(store: StateStore) -> None:
    expires = T0_NS + 65 * NS
    assert store.spend_dpop_jti("t-insurer", "proof-1", expires, T0_NS)
    assert not store.spend_dpop_jti("t-insurer", "proof-1", expires, T0_NS + NS)
    # The same jti from another client is that client's own proof.
    assert store.spend_dpop_jti("t-insurer-b", "proof-1", expires, T0_NS + NS)
    # Nor does it collide with a consent jti or a client-assertion jti of the same value.
    assert store.consume_consent_jti("proof-1", "consent-0001", expires, T0_NS)
    assert store.spend_jti("proof-1", "t-insurer", expires, T0_NS)


def test_dpop_jti_is_purged_and_reusable_only_after_expiry(store: StateStore) -> None:
    expires = T0_NS + 65 * NS
    assert store.spend_dpop_jti("t-insurer", "proof-1", expires, T0_NS)
    assert not store.spend_dpop_jti("t-insurer", "proof-1", expires, expires)
    assert store.spend_dpop_jti("t-insurer", "proof-2", expires + NS, expires + 1)
    assert _rows(store, "dpop_jti") == 1
    assert store.spend_dpop_jti("t-insurer", "proof-1", expires + NS, expires + 1)


def test_dpop_jti_from_16_threads_one_wins(store: StateStore) -> None:
    expires = T0_NS + 65 * NS
    results = _race([
        lambda: store.spend_dpop_jti("t-insurer", "proof-race", expires, T0_NS)
    ] * THREADS)
    assert results.count(True) == 1


def test_replay_store_under_concurrent_purges(backend: BackendSpec) -> None:
    stores = [open_store(backend) for _ in range(THREADS)]
    for i in range(200):  # remembered proofs that expire at T0 + 1 s
        assert stores[0].spend_dpop_jti("t-insurer", f"old-{i}", T0_NS + NS, T0_NS)
    later = T0_NS + 2 * NS  # every racer purges, and every racer inserts fresh proofs

    def spend_many(s: StateStore, worker: int) -> bool:
        return all(s.spend_dpop_jti("t-insurer", f"new-{worker}-{i}", later + 60 * NS, later)
                   for i in range(20))

    assert _race([functools.partial(spend_many, s, w) for w, s in enumerate(stores)]) == [
        True] * THREADS
    assert _rows(stores[0], "dpop_jti") == 20 * THREADS


def test_an_expired_key_raced_by_16_stores_is_taken_once(backend: BackendSpec) -> None:
    stores = [open_store(backend) for _ in range(THREADS)]
    assert stores[0].consume_consent_jti("jti-again", "consent-0001", T0_NS + NS, T0_NS)
    later = T0_NS + 2 * NS  # expired: purged by whoever purges, then reusable exactly once
    results = _race([
        functools.partial(s.consume_consent_jti, "jti-again", "consent-0001",
                          later + 600 * NS, later)
        for s in stores
    ])
    assert results.count(True) == 1


# -- consent keys -----------------------------------------------------------------------------


def _jwk(seed: int) -> tuple[str, dict[str, str]]:
    jwk = public_jwk(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32).public_key())
    return jwk_thumbprint(jwk), jwk


def test_consent_key_moves_forward_and_is_listed(store: StateStore) -> None:
    kid, jwk = _jwk(1)
    ref = "file:/etc/gateway/consent-keys/k1.pem"
    assert store.save_consent_key(kid, "pending", jwk, private_key_ref=ref, now_ns=1) is None
    assert store.save_consent_key(kid, "active", jwk, now_ns=2) == "pending"
    assert store.save_consent_key(kid, "retired", jwk, now_ns=3) == "active"
    keys = store.consent_keys()
    assert len(keys) == 1
    key = keys[0]
    assert (key.kid, key.state, key.public_jwk, key.private_key_ref) == (kid, "retired", jwk, ref)
    assert (key.created_at_ns, key.updated_at_ns) == (1, 3)
    assert store.version("consent_keys") == 3


def test_consent_key_never_moves_back(store: StateStore) -> None:
    kid, jwk = _jwk(2)
    store.save_consent_key(kid, "active", jwk, now_ns=1)
    store.save_consent_key(kid, "retired", jwk, now_ns=2)
    for state in ("pending", "active"):
        with pytest.raises(Conflict):
            store.save_consent_key(kid, state, jwk, now_ns=3)
    assert store.consent_keys()[0].state == "retired"


def test_resaving_a_key_state_changes_nothing(store: StateStore) -> None:
    kid, jwk = _jwk(3)
    store.save_consent_key(kid, "pending", jwk, now_ns=1)
    assert store.save_consent_key(kid, "pending", jwk, now_ns=2) == "pending"
    assert store.version("consent_keys") == 1
    assert store.consent_keys()[0].updated_at_ns == 1


def test_consent_keys_are_listed_oldest_first(store: StateStore) -> None:
    (kid_a, jwk_a), (kid_b, jwk_b) = _jwk(4), _jwk(5)
    store.save_consent_key(kid_b, "pending", jwk_b, now_ns=10)
    store.save_consent_key(kid_a, "active", jwk_a, now_ns=20)
    assert [k.kid for k in store.consent_keys()] == [kid_b, kid_a]


@pytest.mark.parametrize(
    ("change", "ref"),
    [
        pytest.param({"d": "AAAA"}, None, id="private-member-d"),
        pytest.param({"x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}, None,
                     id="kid-not-thumbprint"),
        pytest.param({"kty": "RSA"}, None, id="not-okp-or-ec"),
        pytest.param({}, "-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n-----END PRIVATE KEY-----",
                     id="pem-as-reference"),
        pytest.param({}, "", id="empty-reference"),
    ],
)
def test_consent_key_refusals(store: StateStore, change: dict[str, str], ref: str | None) -> None:
    kid, jwk = _jwk(6)
    with pytest.raises(ValidationFailed):
        store.save_consent_key(kid, "pending", {**jwk, **change}, private_key_ref=ref, now_ns=1)
    assert store.consent_keys() == []
    assert store.version("consent_keys") == 0


def test_consent_key_state_must_be_known(store: StateStore) -> None:
    kid, jwk = _jwk(7)
    with pytest.raises(ValidationFailed):
        store.save_consent_key(kid, "compromised", jwk, now_ns=1)  # type: ignore[arg-type]


# -- the behaviours that were there before ----------------------------------------------------


def test_clients_round_trip(store: StateStore) -> None:
    client = ClientRecord("t-insurer", "insurer", "ins-a", "PEM", "EdDSA")
    store.add_client(client)
    assert store.get_client("t-insurer") == client
    assert store.get_client("t-none") is None
    with pytest.raises(Conflict):
        store.add_client(client)


def test_spend_jti_refuses_replay_until_expiry(store: StateStore) -> None:
    assert store.spend_jti("a-1", "t-insurer", 100, 0)
    assert not store.spend_jti("a-1", "t-insurer", 100, 50)
    assert store.spend_jti("a-1", "t-other", 100, 50)
    assert not store.spend_jti("a-1", "t-insurer", 100, 100)
    assert store.spend_jti("a-1", "t-insurer", 300, 101)


def test_grants_round_trip_revoke_and_versions(store: StateStore) -> None:
    grant = GrantRecord("g-1", "ins-a", "hmb_pricing", {"datasets": ["settlements"]},
                        0, 10, None, "t-admin", 1)
    store.add_grant(grant)
    store.add_grant(GrantRecord("g-2", "ins-b", "hmb_pricing", {}, 0, 10, None, "t-admin", 2))
    with pytest.raises(Conflict):
        store.add_grant(grant)
    assert store.get_grant("g-1") == grant
    assert [g.grant_id for g in store.list_grants()] == ["g-1", "g-2"]
    assert [g.grant_id for g in store.list_grants("ins-b")] == ["g-2"]
    assert store.version("grants") == 2
    revoked = store.revoke_grant("g-1", 5)
    assert revoked.revoked_at_ns == 5
    assert store.version("grants") == 3
    with pytest.raises(Conflict):
        store.revoke_grant("g-1", 6)
    with pytest.raises(NotFound):
        store.revoke_grant("g-none", 6)
    assert store.version("consents") == 0  # counters are independent


def test_reopening_keeps_everything(backend: BackendSpec) -> None:
    first = open_store(backend)
    first.add_consent(consent())
    first.add_grant(GrantRecord("g-1", "ins-a", "hmb_pricing", {}, 0, 10, None, "t-admin", 1))
    again = open_store(backend)  # the schema statements run again, harmlessly
    assert again.get_consent("consent-0001") is not None
    assert again.get_grant("g-1") is not None
    assert again.version("consents") == 1


def test_store_is_ready(store: StateStore) -> None:
    assert store.ready()


# -- migrations -------------------------------------------------------------------------------


def _migration_rows(store: StateStore) -> list[tuple[int, str]]:
    with store._tx() as cur:
        cur.execute("SELECT version, name FROM schema_migrations ORDER BY version")
        return [(int(r[0]), str(r[1])) for r in cur.fetchall()]


def test_a_fresh_database_gets_every_migration_once(backend: BackendSpec) -> None:
    first = open_store(backend)
    want = [(m.version, m.name) for m in MIGRATIONS]
    assert _migration_rows(first) == want
    assert first.schema_version() == MIGRATIONS[-1].version
    open_store(backend)  # a second process starting later applies nothing
    assert _migration_rows(first) == want


def test_a_per_dialect_statement_runs_in_its_dialect(store: StateStore) -> None:
    extra = Migration(1000, "binary column", (
        {"sqlite": "CREATE TABLE t_bin (k TEXT PRIMARY KEY, b BLOB NOT NULL)",
         "postgresql": "CREATE TABLE t_bin (k TEXT PRIMARY KEY, b BYTEA NOT NULL)"},
    ))
    assert store._migrate((*MIGRATIONS, extra)) == 1000
    with store._tx(write=True) as cur:
        cur.execute("INSERT INTO t_bin (k, b) VALUES (?, ?)", ("x", b"\x00\xff"))
    with store._tx() as cur:
        cur.execute("SELECT b FROM t_bin WHERE k = ?", ("x",))
        assert bytes(cur.fetchone()[0]) == b"\x00\xff"
    with pytest.raises(ValueError, match="spelling"):
        statement_for({"sqlite": "CREATE TABLE t (b BLOB)"}, "postgresql")


def _as_before_migration_4(store: StateStore) -> None:
    """Put the replay tables back as migrations 1–3 left them (ids keyed by jti alone)."""
    old_tables = ("consumed_consent_jti", "dpop_jti", "spent_jti")
    old_schema = [statement_for(st, "sqlite") for st in MIGRATIONS[0].statements
                  if any(f" {t} " in statement_for(st, "sqlite") for t in old_tables)]
    assert len(old_schema) == 6  # three tables, each with its expiry index
    with store._tx(write=True) as cur:
        for statement in ("DROP TABLE consumed_consent_jti", "DROP TABLE dpop_jti",
                          "DROP TABLE spent_jti", "DROP TABLE replay_rekeyed"):
            cur.execute(statement)
        for statement in old_schema:
            cur.execute(statement)
        cur.execute("DELETE FROM schema_migrations WHERE version = 4")


def test_migration_4_rekeys_the_replay_ids_by_expiry_and_keeps_what_it_can(
    store: StateStore,
) -> None:
    """Consent and client-assertion ids carry over (their expiry came from the token, as it
    still does: a replay after the upgrade is refused); DPoP ids were keyed by when they were
    spent, so they are dropped and the latest iat they can have covered is kept instead."""
    _as_before_migration_4(store)
    consent_expires, assertion_expires = T0_NS + 600 * NS, T0_NS + 65 * NS
    spent_at = T0_NS + 30 * NS
    with store._tx(write=True) as cur:
        cur.execute("INSERT INTO consumed_consent_jti (jti, consent_id, expires_ns) "
                    "VALUES (?, ?, ?)", ("jti-old", "consent-0001", consent_expires))
        cur.execute("INSERT INTO spent_jti (jti, client_id, expires_ns) VALUES (?, ?, ?)",
                    ("t-insurer:assertion-old", "t-insurer", assertion_expires))
        for k, at in enumerate((T0_NS, spent_at)):
            cur.execute("INSERT INTO dpop_jti (client_id, jti, expires_ns) VALUES (?, ?, ?)",
                        ("t-insurer", f"proof-old-{k}", at + 70 * NS))
    assert store._migrate() == 4
    assert not store.consume_consent_jti("jti-old", "consent-0001", consent_expires,
                                         T0_NS + 60 * NS)
    assert not store.spend_jti("assertion-old", "t-insurer", assertion_expires,
                               T0_NS + 40 * NS)
    assert _rows(store, "dpop_jti") == 0
    # The last proof spent (at T0 + 30 s) may carry an iat up to 5 s ahead of that.
    assert store.dpop_rekeyed_iat_bound() == spent_at // NS + 5
    # Expired ids go in one range delete, live ones stay.
    assert store.consume_consent_jti("jti-new", "consent-0002", T0_NS + 900 * NS,
                                     consent_expires + 1)
    assert _rows(store, "consumed_consent_jti") == 1


def test_a_database_without_old_proofs_has_no_iat_bound(store: StateStore) -> None:
    assert store.dpop_rekeyed_iat_bound() is None


def test_a_replay_id_is_keyed_by_the_expiry_its_token_gives(store: StateStore) -> None:
    """The contract that lets the replay tables lead with the expiry: a replay of the same
    token gives the same expiry, so it meets its first spend whenever it comes; the caller
    must never pass a moment from its own clock."""
    expires = T0_NS + 65 * NS
    assert store.spend_dpop_jti("t-insurer", "proof-1", expires, T0_NS)
    assert not store.spend_dpop_jti("t-insurer", "proof-1", expires, T0_NS + 50 * NS)
    # The same id under another expiry is, to the store, another proof.
    assert store.spend_dpop_jti("t-insurer", "proof-1", expires + NS, T0_NS + 50 * NS)


def test_a_failing_migration_leaves_no_trace(store: StateStore) -> None:
    broken = Migration(1001, "broken", ("CREATE TABLE t_half (k TEXT)", "NOT SQL AT ALL"))
    with pytest.raises(StoreUnavailable):
        store._migrate((*MIGRATIONS, broken))
    assert store.schema_version() == MIGRATIONS[-1].version
    with pytest.raises(StoreUnavailable), store._tx() as cur:
        cur.execute("SELECT COUNT(*) FROM t_half")  # rolled back with the migration


def _schema_version(own: StateStore) -> int:
    return own.schema_version()


def test_workers_starting_together_migrate_once(backend: BackendSpec, workers: Workers) -> None:
    # Each worker opens the fresh database at the same moment: all migrate, each step once.
    assert workers.race(_schema_version, backend) == [MIGRATIONS[-1].version] * PROCESSES
    assert _migration_rows(open_store(backend)) == [(m.version, m.name) for m in MIGRATIONS]


# -- portability of statements and errors -----------------------------------------------------


def test_placeholders_are_translated_outside_literals_only(store: StateStore) -> None:
    with store._tx() as cur:
        cur.execute("SELECT 'a?%', ?, 'b''?'", (5,))
        assert tuple(cur.fetchone()) == ("a?%", 5, "b'?")


def test_a_constraint_violation_is_an_integrity_violation(store: StateStore) -> None:
    with pytest.raises(IntegrityViolation), store._tx(write=True) as cur:
        cur.execute("INSERT INTO clients (client_id) VALUES (?)", ("t-half",))
    assert store.get_client("t-half") is None
    store.add_client(ClientRecord("t-whole", "admin", None, "PEM", "EdDSA"))  # usable again


def test_an_unreachable_store_is_unavailable(backend: BackendSpec, tmp_path: Path) -> None:
    if backend.kind == "sqlite":
        (tmp_path / "a-directory").mkdir()
        with pytest.raises(StoreUnavailable):
            SqliteStateStore(tmp_path / "a-directory")
        return
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreUnavailable):
        PostgresStateStore(f"postgresql://gateway@127.0.0.1:{port}/gateway", timeout=1)


def test_a_lost_postgres_connection_fails_closed_then_recovers(postgres_url: str) -> None:
    state = PostgresStateStore(postgres_url, min_size=1, max_size=1)
    _OPENED.append(state)
    state.add_consent(consent())
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(StoreUnavailable):
        state.is_consent_live("consent-0001", T0_NS)
    assert state.is_consent_live("consent-0001", T0_NS)  # the pool replaced the connection


# -- concurrent writers -----------------------------------------------------------------------


def test_revoking_a_grant_from_16_stores_at_once_succeeds_once(backend: BackendSpec) -> None:
    stores = [open_store(backend) for _ in range(THREADS)]
    stores[0].add_grant(GrantRecord("g-1", "ins-a", "hmb_pricing", {}, 0, 10, None, "t", 1))

    def revoke(s: StateStore) -> bool:
        try:
            s.revoke_grant("g-1", 5)
        except Conflict:
            return False
        return True

    results = _race([functools.partial(revoke, s) for s in stores])
    assert results.count(True) == 1
    assert stores[0].version("grants") == 2


def _add_grants(own: StateStore) -> None:
    worker = os.getpid()
    for i in range(10):
        own.add_grant(GrantRecord(f"g-{worker}-{i}", "ins-a", "hmb_pricing", {}, 0, 10, None,
                                  "t", i))


def _save_key(own: StateStore) -> str | None:
    kid, jwk = _jwk(9)
    return own.save_consent_key(kid, "pending", jwk, now_ns=1)


def test_change_counters_count_every_write_from_4_processes(
    backend: BackendSpec, workers: Workers,
) -> None:
    open_store(backend)
    workers.race(_add_grants, backend)
    state = open_store(backend)
    assert state.version("grants") == 10 * PROCESSES
    assert len(state.list_grants()) == 10 * PROCESSES


def test_workers_registering_one_consent_key_at_once_insert_it_once(
    backend: BackendSpec, workers: Workers,
) -> None:
    open_store(backend)
    outcomes = workers.race(_save_key, backend)
    assert sorted(outcomes, key=str) == [None] + ["pending"] * (PROCESSES - 1)
    assert open_store(backend).version("consent_keys") == 1


# -- privacy budgets: concurrent charges never overspend ---------------------------------------


def _charge(own: StateStore, key: str) -> bool:
    charge = BudgetCharge("ins-a/hmb_pricing", "2026-03", 250_000, 3 * 250_000)
    try:
        own.spend_and_store({key: 1}, [charge], now_ns=T0_NS)
    except BudgetExhausted:
        return False
    return True


def test_budget_charges_from_16_stores_at_once_never_overspend(backend: BackendSpec) -> None:
    stores = [open_store(backend) for _ in range(THREADS)]
    results = _race([functools.partial(_charge, s, f"answer-{i}") for i, s in enumerate(stores)])
    assert results.count(True) == 3
    assert stores[0].budget_spent("ins-a/hmb_pricing", "2026-03") == 3 * 250_000


def test_budget_charges_from_4_processes_at_once_never_overspend(
    backend: BackendSpec, workers: Workers,
) -> None:
    state = open_store(backend)
    assert _charge(state, "answer-first")  # 2 of the 3 charges left for 4 racers
    outcomes = workers.race(_charge_own_key, backend)
    assert outcomes.count(True) == 2
    assert state.budget_spent("ins-a/hmb_pricing", "2026-03") == 3 * 250_000


def _charge_own_key(own: StateStore) -> bool:
    return _charge(own, f"answer-{os.getpid()}")


# -- exclusive sections: one holder at a time across processes -------------------------------


def _hold_exclusive(own: StateStore) -> tuple[int, int]:
    with own.exclusive("test-section"):
        entered = time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process here
        time.sleep(0.05)
        return entered, time.monotonic_ns()


def test_exclusive_sections_from_4_processes_never_overlap(
    backend: BackendSpec, workers: Workers,
) -> None:
    open_store(backend)
    spans = sorted(workers.race(_hold_exclusive, backend))
    assert len(spans) == PROCESSES
    for (_, left_end), (right_start, _) in itertools.pairwise(spans):
        assert left_end <= right_start


def test_an_exclusive_section_is_released_when_its_holder_fails(backend: BackendSpec) -> None:
    state = open_store(backend)
    with pytest.raises(RuntimeError), state.exclusive("test-section"):
        raise RuntimeError("the work inside failed")
    other = open_store(backend)
    assert _hold_exclusive(other)[1] > 0  # would block forever if the lock were kept


# -- grant rate limits (GCRA): exact across threads and processes, refilled by the clock -------
# Every take passes its own `now_ns`: the tests move that clock, never the store.

RATE_KEY = "grant:g-rate"


def _takes(store: StateStore, per_minute: int, now_ns: int, n: int) -> list[bool]:
    return [store.take_rate(RATE_KEY, per_minute, now_ns).allowed for _ in range(n)]


def test_a_rate_limit_allows_its_limit_at_once_then_says_when_to_retry(
    store: StateStore,
) -> None:
    assert _takes(store, 6, T0_NS, 9) == [True] * 6 + [False] * 3
    refused = store.take_rate(RATE_KEY, 6, T0_NS)
    # 6 per minute: one request back every 10 s.
    assert (refused.allowed, refused.retry_after_ns, refused.retry_after_s) == (False, 10 * NS, 10)
    assert store.take_rate("grant:g-other", 6, T0_NS).allowed  # every key has its own allowance
    once = store.take_rate("grant:g-once", 1, T0_NS)
    assert (once.allowed, once.retry_after_s) == (True, 0)
    assert store.take_rate("grant:g-once", 1, T0_NS).retry_after_s == 60


def test_the_allowance_refills_as_the_injected_clock_advances(store: StateStore) -> None:
    assert _takes(store, 6, T0_NS, 6) == [True] * 6
    assert _takes(store, 6, T0_NS + 10 * NS - 1, 3) == [False] * 3  # refusals cost nothing
    assert _takes(store, 6, T0_NS + 10 * NS, 2) == [True, False]  # one interval, one request
    later = T0_NS + 10 * NS + 60 * NS  # a quiet minute: the whole allowance, and no more
    assert _takes(store, 6, later, 8) == [True] * 6 + [False] * 2
    assert store.take_rate(RATE_KEY, 6, later).retry_after_ns == 10 * NS


def test_a_refusal_with_an_older_clock_than_the_last_take_waits_one_interval_at_most(
    store: StateStore,
) -> None:
    # Worker A read its clock 2 s after worker B but took first (B waited for the write
    # lock): B's refusal must not ask for more than one interval (a Retry-After of 12 s).
    assert _takes(store, 6, T0_NS + 2 * NS, 6) == [True] * 6
    refused = store.take_rate(RATE_KEY, 6, T0_NS)
    assert (refused.allowed, refused.retry_after_ns, refused.retry_after_s) == (False, 10 * NS, 10)


def test_a_rate_limit_of_zero_is_refused(store: StateStore) -> None:
    with pytest.raises(ValidationFailed):
        store.take_rate(RATE_KEY, 0, T0_NS)


def test_a_take_the_store_cannot_make_is_unavailable(store: StateStore) -> None:
    with store._tx(write=True) as cur:
        cur.execute("DROP TABLE rate_limits")  # a real failure of the store, not a stand-in
    with pytest.raises(StoreUnavailable):
        store.take_rate(RATE_KEY, 6, T0_NS)


def _reference_bucket(per_minute: int, arrivals: list[int]) -> list[bool]:
    """The promise, literally: a bucket of ``per_minute`` tokens, one token back every
    ⌈60 s / per_minute⌉, counted in exact fractions; a request takes a whole token or is
    refused."""
    interval = -(-60 * NS // per_minute)
    tokens, last, out = Fraction(per_minute), arrivals[0], []
    for at in arrivals:
        tokens = min(Fraction(per_minute), tokens + Fraction(at - last, interval))
        last = at
        out.append(tokens >= 1)
        if tokens >= 1:
            tokens -= 1
    return out


@pytest.mark.parametrize("per_minute", [1, 7, 60])
def test_the_store_agrees_with_a_literal_token_bucket(store: StateStore, per_minute: int) -> None:
    rng = random.Random(per_minute)
    interval = 60 * NS // per_minute
    arrivals, at = [], T0_NS
    for _ in range(400):  # bursts, near-interval gaps and quiet spells, in time order
        at += rng.choice([0] * 8 + [1, interval // 3, interval - 1, interval, 3 * interval])
        arrivals.append(at)
    got = [store.take_rate(RATE_KEY, per_minute, now).allowed for now in arrivals]
    assert got == _reference_bucket(per_minute, arrivals)
    assert 0 < got.count(True) < len(got)


def _hammer(store: StateStore, per_minute: int, now_ns: int, allowed: list[int]) -> bool:
    allowed.append(_takes(store, per_minute, now_ns, 10).count(True))
    return True


def test_16_threads_hammering_one_key_never_exceed_the_limit(backend: BackendSpec) -> None:
    stores = [open_store(backend) for _ in range(THREADS)]
    allowed: list[int] = []
    _race([functools.partial(_hammer, s, 25, T0_NS, allowed) for s in stores])
    assert sum(allowed) == 25  # of 160
    again: list[int] = []
    _race([functools.partial(_hammer, s, 25, T0_NS + 60 * NS // 25, again) for s in stores])
    assert sum(again) == 1


def _hammer_from_4_threads(own: StateStore, per_minute: int, now_ns: int) -> int:
    allowed: list[int] = []
    _race([functools.partial(_hammer, own, per_minute, now_ns, allowed)] * 4)
    return sum(allowed)


def test_4_processes_of_4_threads_hammering_one_key_never_exceed_the_limit(
    backend: BackendSpec, workers: Workers,
) -> None:
    open_store(backend)  # the schema exists before the race
    assert sum(workers.race(_hammer_from_4_threads, backend, 25, T0_NS)) == 25  # of 160
    step = T0_NS + 60 * NS // 25  # one interval later: exactly one more, to one of them
    assert sum(workers.race(_hammer_from_4_threads, backend, 25, step)) == 1
    full = step + 60 * NS
    assert sum(workers.race(_hammer_from_4_threads, backend, 25, full)) == 25


def test_a_postgres_take_does_not_queue_behind_the_write_lock(postgres_url: str) -> None:
    state = PostgresStateStore(postgres_url, max_size=2, timeout=2)
    _OPENED.append(state)
    with state._tx(write=True):  # another writer holds the global lock (a budget charge)
        assert state.take_rate(RATE_KEY, 6, T0_NS).allowed


def test_replay_batcher_spends_each_consent_once_on_either_backend(store: StateStore) -> None:
    """The person endpoints' group commit: on SQLite the loop writes each turn's batch
    itself, on PostgreSQL a writer thread does; either way a consent is used once and a
    replayed proof is refused."""
    import asyncio

    from gateway.service.consents import ReplayBatcher
    from gateway.state.consents import ReplaySpend

    batcher = ReplayBatcher(store)
    far = 2**62

    async def race() -> list[tuple[bool, bool]]:
        return list(await asyncio.gather(*(
            batcher.spend_async(ReplaySpend("c-1", f"proof-{n}-{k}-xxxxxxxx", far, f"jti-{k}",
                                            f"cst-{k}", far), 0)
            for n in range(6) for k in range(15))))

    results = asyncio.run(race())
    assert len(results) == 90
    assert all(dpop for dpop, _ in results)
    assert sum(consent for _, consent in results) == 15
    replayed = asyncio.run(batcher.spend_async(ReplaySpend("c-1", "proof-0-0-xxxxxxxx", far), 0))
    assert replayed == (False, False)


def test_a_purge_forgets_a_bounded_number_of_expired_replay_ids(
    store: StateStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog of expired ids (after downtime) goes a bounded number per purge, oldest
    first, never in one long delete on the request path; unexpired ids stay and still catch
    replays."""
    from gateway.state import consents as state_consents
    from gateway.state.consents import ReplaySpend

    monkeypatch.setattr(state_consents, "PURGE_LIMIT", 100)

    def rows() -> tuple[int, int]:
        with store._tx() as cur:
            cur.execute("SELECT count(*) FROM dpop_jti")
            dpop = int(cur.fetchone()[0])
            cur.execute("SELECT count(*) FROM consumed_consent_jti")
            return dpop, int(cur.fetchone()[0])

    old = [ReplaySpend("c-1", f"old-proof-{k:04d}", 1_000 + k, f"old-jti-{k}", f"cst-{k}",
                       1_000 + k) for k in range(250)]
    store.spend_replay_ids(old, 0, purge=False)
    live = ReplaySpend("c-1", "live-proof-0000", 10**15, "live-jti", "cst-live", 10**15)
    assert store.spend_replay_ids([live], 5_000) == [(True, True)]
    assert rows() == (151, 151)
    with store._tx() as cur:  # the oldest went first
        cur.execute("SELECT min(expires_ns) FROM dpop_jti")
        assert cur.fetchone()[0] == 1_100
    assert store.spend_replay_ids([], 5_000) == []
    assert store.spend_replay_ids([], 5_000) == []
    assert rows() == (1, 1)
    assert store.spend_replay_ids([live], 5_000) == [(False, False)]


def test_one_read_gives_the_change_counters_and_the_consent(store: StateStore) -> None:
    """The per-request read of a consented call: both counters and the consent's status in
    one statement; an unknown consent is None, a revoked or expired one is not live, and a
    grant change shows in the counter."""
    unknown = store.consent_status_and_versions("nope", T0_NS, "consent_keys", "grants")
    keys, grants, status = unknown
    assert status is None
    store.add_consent(consent("c-live", subject="psn:live", insurer="ins-a"))
    assert store.consent_status_and_versions("c-live", T0_NS, "consent_keys", "grants") == (
        keys, grants, ("psn:live", "ins-a", True))
    expired = T0_NS + 25 * 3600 * NS
    assert store.consent_status_and_versions("c-live", expired, "consent_keys", "grants")[2] \
        == ("psn:live", "ins-a", False)
    store.revoke_consent("c-live", "t-admin", T0_NS + NS)
    assert store.consent_status_and_versions("c-live", T0_NS + 2 * NS, "consent_keys",
                                             "grants")[2] == ("psn:live", "ins-a", False)
    store.add_grant(GrantRecord("g-9", "ins-a", "hmb_pricing", {}, 0, 10, None, "t-admin", 1))
    assert store.consent_status_and_versions("c-live", T0_NS, "consent_keys", "grants")[:2] \
        == (keys, grants + 1)
