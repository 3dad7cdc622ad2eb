"""What only the PostgreSQL store can show: its guards (triggers, the appender role's
privileges), tampering found by verify, appenders in several processes building one chain,
and failures reported, never half-written. The backend-neutral suites (test_audit,
test_audit_store) run on PostgreSQL too."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.audit.entry import SALT_SIZE, AuditEntry
from gateway.audit.postgres import PostgresAuditLog, grant_appender
from gateway.errors import AuditIntegrityError, AuditUnavailable
from tests.unit.test_audit import ORIGIN, make_entry, signing_key

SCHEMA = "audit"


@pytest.fixture
def log(postgres_url: str) -> Iterator[PostgresAuditLog]:
    with PostgresAuditLog(postgres_url) as opened:
        yield opened


def _owner(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True, options=f"-c search_path={SCHEMA}")


def _person(i: int) -> AuditEntry:
    return make_entry(i, subject_pseudonym=f"psn-{i % 2}", consent_id=f"cst-{i}")


@pytest.mark.parametrize("statement", [
    "UPDATE audit_entries SET entry_json = entry_json WHERE idx = 1",
    "DELETE FROM audit_entries WHERE idx = 2",
    "TRUNCATE audit_entries CASCADE",
    "UPDATE audit_subtrees SET hash = hash",
    "DELETE FROM audit_subtrees",
    "DELETE FROM audit_checkpoints",
    "UPDATE audit_checkpoints SET size = size + 1",
    "DELETE FROM audit_erasures",
    "UPDATE audit_personal SET personal_json = '{}'",
    "DELETE FROM audit_personal",
    "INSERT INTO audit_entries (idx, entry_json, leaf_hash, chain_hash)"
    " SELECT 7, entry_json, leaf_hash, chain_hash FROM audit_entries WHERE idx = 0",
    "INSERT INTO audit_personal (idx, salt, personal_json)"
    " VALUES (99, '\\x00000000000000000000000000000000', '{}')",
])
def test_triggers_keep_every_table_append_only(log: PostgresAuditLog, postgres_url: str,
                                               statement: str) -> None:
    for i in range(4):
        log.append(_person(i))
    log.checkpoint(signing_key(), origin=ORIGIN)
    log.erase_subject("psn-1")
    with _owner(postgres_url) as conn, pytest.raises(psycopg.errors.IntegrityConstraintViolation,
                                                     match=r"append-only|personal data"):
        conn.execute(statement)
    assert log.verify() == 4


def test_the_appender_role_can_append_but_not_rewrite(postgres_url: str) -> None:
    with PostgresAuditLog(postgres_url) as owner_log:  # the owner creates the schema
        owner_log.append(make_entry(0))
    role = "gw_" + uuid.uuid4().hex[:8]
    with _owner(postgres_url) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        grant_appender(postgres_url, role)
        as_app = postgres_url.replace("//gateway@", f"//{role}@")
        with PostgresAuditLog(as_app) as app_log:
            app_log.append(_person(1))
            app_log.checkpoint(signing_key(), origin=ORIGIN)
            app_log.save_state("alerts", b"{}")
            app_log.save_state("alerts", b"{ }")
            assert app_log.erase_subject("psn-1") == [1]
            assert app_log.verify() == 2
        with psycopg.connect(as_app, autocommit=True,
                             options=f"-c search_path={SCHEMA}") as conn:
            for statement in ("UPDATE audit_entries SET entry_json = '{}'",
                              "DELETE FROM audit_entries", "TRUNCATE audit_entries",
                              "DROP TRIGGER audit_entries_no_change ON audit_entries",
                              "ALTER TABLE audit_entries DISABLE TRIGGER ALL"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
    finally:
        with _owner(postgres_url) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize(("statement", "message"), [
    ("UPDATE audit_entries SET entry_json = replace(entry_json, 'pricing', 'other')"
     " WHERE idx = 3", "entry 3: leaf hash mismatch"),
    ("DELETE FROM audit_entries WHERE idx = 2", "entry 2: missing, next stored index is 3"),
    ("UPDATE audit_subtrees SET hash = sha256(hash) WHERE level = 2 AND idx = 0",
     "subtree (2, 0) over entries 0..3: stored hash mismatch"),
    ("UPDATE audit_personal SET personal_json = replace(personal_json, 'psn-1', 'psn-9')",
     "stored personal part does not open the leaf's commitment"),
])
def test_verify_finds_tampering_done_around_the_triggers(
    log: PostgresAuditLog, postgres_url: str, statement: str, message: str
) -> None:
    for i in range(8):
        log.append(_person(i))
    assert log.verify() == 8
    with _owner(postgres_url) as conn:
        conn.execute("SET session_replication_role = replica")  # a superuser skips triggers
        conn.execute(statement)
    with pytest.raises(AuditIntegrityError, match=re.escape(message)):
        log.verify()


def test_a_failed_batch_is_rolled_back_and_every_waiter_told(
    log: PostgresAuditLog, postgres_url: str
) -> None:
    log.append(make_entry(0))
    with _owner(postgres_url) as conn:
        conn.execute("""CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN IF NEW.idx = 3 THEN RAISE EXCEPTION 'injected'; END IF;
                        RETURN NEW; END $$""")
        conn.execute("CREATE TRIGGER fail BEFORE INSERT ON audit_entries"
                      " FOR EACH ROW EXECUTE FUNCTION fail()")

    async def run() -> list[int | BaseException]:
        return list(await asyncio.gather(*(log.append_async(make_entry(i)) for i in range(1, 9)),
                                         return_exceptions=True))

    outcomes = asyncio.run(run())
    failed = [o for o in outcomes if isinstance(o, AuditUnavailable)]
    assert failed
    assert all(isinstance(o.__cause__, psycopg.errors.RaiseException) for o in failed)
    stored = [o for o in outcomes if isinstance(o, int)]
    assert 3 not in stored  # the batch holding index 3 left nothing behind
    assert log.size() == 1 + len(stored)
    assert log.verify() == log.size()
    with _owner(postgres_url) as conn:
        conn.execute("DROP TRIGGER fail ON audit_entries")
    assert log.append(make_entry(50)) == log.size() - 1
    assert log.verify() == log.size()


_APPENDER = """
import sys
from gateway.audit.postgres import PostgresAuditLog
from tests.unit.test_audit import make_entry
with PostgresAuditLog(sys.argv[1]) as log:
    for i in range(int(sys.argv[2])):
        log.append(make_entry(i, actor=sys.argv[3]))
"""


def test_processes_appending_to_one_store_build_one_chain(
    log: PostgresAuditLog, postgres_url: str
) -> None:
    root = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, postgres_url, "150", f"p{k}"],
                              cwd=root) for k in range(3)]
    for k in range(150):
        log.append(make_entry(k, actor="here"))
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert log.size() == 600
    assert log.verify() == 600
    actors = {e.actor for _, e in log.search(limit=1000)}
    assert actors == {"here", "p0", "p1", "p2"}


def test_an_unreachable_server_is_unavailable_not_a_crash() -> None:
    with pytest.raises(AuditUnavailable, match="cannot open audit store"):
        PostgresAuditLog("postgresql://gateway@127.0.0.1:9/gateway?connect_timeout=2")


def test_personal_part_guards(log: PostgresAuditLog, postgres_url: str) -> None:
    log.append(_person(0))
    log.erase_subject("psn-0")
    with _owner(postgres_url) as conn, pytest.raises(
        psycopg.errors.IntegrityConstraintViolation, match="only with its entry"
    ):
        conn.execute("INSERT INTO audit_personal (idx, salt, personal_json) VALUES (0, %s, '{}')",
                     (bytes(SALT_SIZE),))
