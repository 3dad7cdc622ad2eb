# ruff: noqa: F811  (the backend fixtures are imported from test_audit and used by name)
"""The audit log's newer duties, on every backend: appends awaited from an event loop,
checkpoints that survive a restart, and personal data kept beside the leaf and erasable."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import psycopg
import pytest

from gateway.audit import AuditEntry, export_bundle, verify_bundle
from gateway.audit.checkpoint import parse_and_verify_checkpoint
from gateway.audit.entry import SALT_SIZE, entry_from_stored, split_entry
from gateway.audit.log import StoredCheckpoint
from gateway.audit.merkle import verify_consistency, verify_inclusion
from gateway.errors import AuditIntegrityError, AuditUnavailable, BadRequest
from tests.unit.test_audit import (  # noqa: F401  (fixtures)
    ORIGIN,
    GatedLog,
    LogFactory,
    _Gate,
    backend,
    make_entry,
    make_log,
    make_sqlite_log,
    public_raw,
    raw_db,
    reference_chain,
    signing_key,
    wait_until,
)

# -- appends awaited from an event loop -------------------------------------------------------


def test_async_appends_are_contiguous_chained_and_verify(make_log: LogFactory) -> None:
    log = make_log()
    entries = [make_entry(i) for i in range(600)]

    async def run() -> list[int]:
        # Far more waiters than threads could hold: they share batches.
        return list(await asyncio.gather(*(log.append_async(e) for e in entries)))

    indexes = asyncio.run(run())
    assert sorted(indexes) == list(range(600))
    assert log.stats()["batches"] < 600
    rows = list(log.iter_rows())
    assert [r.entry() for r in rows] == [entries[indexes.index(i)] for i in range(600)]
    assert log.head() == (600, reference_chain([r.entry_json.encode() for r in rows])[-1])
    assert log.verify() == 600


def test_async_and_thread_callers_share_the_log(make_log: LogFactory) -> None:
    log = make_log()

    async def run() -> list[int]:
        thread_side = asyncio.to_thread(lambda: [log.append(make_entry(i)) for i in range(50)])
        loop_side = asyncio.gather(*(log.append_async(make_entry(100 + i)) for i in range(50)))
        done = await asyncio.gather(thread_side, loop_side)
        return [*done[0], *done[1]]

    assert sorted(asyncio.run(run())) == list(range(100))
    assert log.verify() == 100


def test_async_append_failure_is_unavailable_and_nothing_half_written(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log()
    log.append(make_entry(0))
    db = raw_db(tmp_path / "audit.db")
    db.execute(
        "CREATE TRIGGER fail BEFORE INSERT ON audit_entries"
        " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )

    async def run() -> list[BaseException | int]:
        return list(await asyncio.gather(*(log.append_async(make_entry(i)) for i in range(20)),
                                         return_exceptions=True))

    outcomes = asyncio.run(run())
    assert all(isinstance(o, AuditUnavailable) for o in outcomes)
    assert all(isinstance(o.__cause__, sqlite3.IntegrityError) for o in outcomes
               if isinstance(o, AuditUnavailable))
    db.execute("DROP TRIGGER fail")
    db.close()
    assert asyncio.run(log.append_async(make_entry(1))) == 1
    assert log.verify() == 2


def test_async_append_to_a_full_queue_is_refused_not_dropped(make_log: LogFactory) -> None:
    log = make_log(cls=GatedLog, max_queue=2, max_batch=1)
    assert isinstance(log, _Gate)

    async def run() -> tuple[list[int], BaseException]:
        first = asyncio.ensure_future(log.append_async(make_entry(0)))
        await asyncio.to_thread(wait_until, log.entered.is_set)  # batch one held at the gate
        queued = [asyncio.ensure_future(log.append_async(make_entry(i))) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(AuditUnavailable, match="queue is full") as refused:
            await log.append_async(make_entry(3))
        log.gate.set()
        return list(await asyncio.gather(first, *queued)), refused.value

    indexes, _ = asyncio.run(run())
    assert sorted(indexes) == [0, 1, 2]
    assert log.size() == 3


def test_a_cancelled_waiter_still_gets_its_entry_written(make_log: LogFactory) -> None:
    log = make_log(cls=GatedLog)
    assert isinstance(log, _Gate)

    async def run() -> None:
        task = asyncio.ensure_future(log.append_async(make_entry(0)))
        await asyncio.to_thread(wait_until, log.entered.is_set)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        log.gate.set()

    asyncio.run(run())
    wait_until(lambda: log.size() == 1)  # never dropped
    assert log.verify() == 1


# -- checkpoints survive a restart ------------------------------------------------------------


def test_checkpoints_are_stored_and_a_restarted_log_extends_them(make_log: LogFactory) -> None:
    key = signing_key()
    log = make_log()
    for i in range(5):
        log.append(make_entry(i))
    first = log.checkpoint(key, origin=ORIGIN)
    log.close()

    log = make_log()  # a restart: a new process opening the same store
    stored = log.last_checkpoint()
    assert stored is not None
    assert stored.note == first
    assert stored.size == 5
    assert log.checkpoint(key, origin=ORIGIN) == first  # same size: the same note again
    for i in range(5, 9):
        log.append(make_entry(i))
    second = log.checkpoint(key, origin=ORIGIN)
    old = parse_and_verify_checkpoint(first, key.public_key(), None, ORIGIN)
    new = parse_and_verify_checkpoint(second, key.public_key(), None, ORIGIN)
    assert new.size == 9
    verify_consistency(old.size, new.size, old.root, new.root,
                       log.consistency_proof(old.size, new.size))


def test_logs_sharing_a_store_never_hand_out_a_smaller_checkpoint(make_log: LogFactory) -> None:
    key = signing_key()
    first, second = make_log(), make_log()  # two gateway processes on one store
    for i in range(6):
        first.append(make_entry(i))
    small = first.checkpoint(key, origin=ORIGIN)
    for i in range(6, 10):
        second.append(make_entry(i))
    big = second.checkpoint(key, origin=ORIGIN)
    assert first.checkpoint(key, origin=ORIGIN) == big  # read from the store, not remembered
    # A process that signed for size 6 while another stored 10 gets the larger one back.
    stale = StoredCheckpoint(6, parse_and_verify_checkpoint(small, key.public_key()).root, small)
    assert first._store_checkpoint(stale).note == big
    last = first.last_checkpoint()
    assert last is not None
    assert last.size == 10


def test_a_restarted_log_never_signs_a_smaller_tree(
    make_log: LogFactory, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    key = signing_key()
    log = make_log()
    for i in range(8):
        log.append(make_entry(i))
    log.checkpoint(key, origin=ORIGIN)
    log.close()
    _truncate(backend, tmp_path, 6, request)  # the store cut back behind the gateway's back
    log = make_log()
    with pytest.raises(AuditIntegrityError, match="shrank: 6 entries, the last checkpoint has 8"):
        log.checkpoint(key, origin=ORIGIN)


def test_a_restarted_log_never_signs_a_forked_tree(
    make_log: LogFactory, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    key = signing_key()
    log = make_log()
    for i in range(6):
        log.append(make_entry(i))
    log.checkpoint(key, origin=ORIGIN)
    log.close()
    # The history rewritten from entry 4 on, consistently rehashed, then extended: the tree
    # alone looks fine; only the stored checkpoint shows the fork.
    _truncate(backend, tmp_path, 4, request)
    log = make_log()
    for i in range(4, 9):
        log.append(make_entry(i, decision="deny", status=403))
    assert log.verify() == 9
    with pytest.raises(AuditIntegrityError, match="consistency proof 6 -> 9"):
        log.checkpoint(key, origin=ORIGIN)


def test_stored_checkpoints_cannot_be_changed(make_sqlite_log: LogFactory, tmp_path: Path) -> None:
    log = make_sqlite_log()
    log.append(make_entry(0))
    log.checkpoint(signing_key(), origin=ORIGIN)
    db = raw_db(tmp_path / "audit.db")
    for statement in ("UPDATE audit_checkpoints SET size = 7", "DELETE FROM audit_checkpoints"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(statement)
    db.close()


def _truncate(backend: str, tmp_path: Path, keep: int, request: pytest.FixtureRequest) -> None:
    """Delete entries from ``keep`` on (and their subtrees and personal parts) with the
    append-only guards out of the way: what someone with write access to the store can do."""
    deletes = (
        "DELETE FROM audit_personal WHERE idx >= {keep}",
        "DELETE FROM audit_entries WHERE idx >= {keep}",
        "DELETE FROM audit_subtrees WHERE ((idx + 1) << level) > {keep}",
    )
    if backend == "sqlite":
        db = raw_db(tmp_path / "audit.db")
        for trigger in ("audit_entries_no_delete", "audit_subtrees_no_delete",
                        "audit_personal_erase_only"):
            db.execute(f"DROP TRIGGER {trigger}")
        for statement in deletes:
            db.execute(statement.format(keep=int(keep)))
        db.close()
        return
    url = request.getfixturevalue("postgres_url")
    with psycopg.connect(url, autocommit=True, options="-c search_path=audit_db") as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off (superuser)
        for statement in deletes:
            conn.execute(statement.format(keep=int(keep)))


# -- personal data beside the leaf, erasable ----------------------------------------------------


def _person(i: int) -> AuditEntry:
    return make_entry(i, action="persons.enrollment", subject_pseudonym=f"psn-{i % 3}",
                      consent_id=f"cst-{i % 3}")


def test_the_leaf_commits_to_the_personal_part_without_holding_it() -> None:
    entry = _person(1)
    leaf, personal = split_entry(entry, bytes(SALT_SIZE))
    assert personal is not None
    _salt, data = personal
    assert b"psn-1" not in leaf
    assert b"cst-1" not in leaf
    assert json.loads(data) == {"consent_id": "cst-1", "subject_pseudonym": "psn-1"}
    assert json.loads(leaf)["personal"].startswith("sha256:")
    assert entry_from_stored(leaf, data) == entry
    erased = entry_from_stored(leaf, None)
    assert (erased.subject_pseudonym, erased.consent_id) == (None, None)
    # A fresh salt per entry: the same person gives unlinkable commitments.
    assert split_entry(entry)[0] != split_entry(entry)[0]


def test_chosen_salts_warn_every_time(make_log: LogFactory) -> None:
    with pytest.warns(UserWarning, match="chosen .* salts"):
        make_log(unsafe_salt=lambda: bytes(SALT_SIZE))


def test_erasure_keeps_the_tree_proofs_and_search_of_others(make_log: LogFactory) -> None:
    log = make_log()
    for i in range(12):
        log.append(_person(i) if i % 2 else make_entry(i))
    root = log.root()
    leaves = [log.leaf_hash(i) for i in range(12)]
    assert [i for i, _ in log.search(subject_pseudonym="psn-1")] == [1, 7]
    assert [i for i, _ in log.search(consent_id="cst-0")] == [3, 9]

    assert log.erase_subject("psn-1") == [1, 7]
    assert log.erase_subject("psn-1") == []  # nothing left to erase
    assert log.search(subject_pseudonym="psn-1") == []
    assert [i for i, _ in log.search(subject_pseudonym="psn-0")] == [3, 9]  # others unchanged
    assert log.get(1).subject_pseudonym is None
    assert log.get(1).consent_id is None
    assert log.get(1).action == "persons.enrollment"  # the rest of the entry stays
    assert log.get(3).subject_pseudonym == "psn-0"
    assert log.root() == root
    assert [log.leaf_hash(i) for i in range(12)] == leaves
    assert log.verify() == 12
    leaf, proof_root, proof = log.inclusion(7, 12)
    verify_inclusion(leaf, 7, 12, proof, proof_root)
    with pytest.raises(BadRequest):
        log.erase_subject("")


def test_bundles_with_and_without_personal_parts_verify_after_erasure(
    make_log: LogFactory, tmp_path: Path
) -> None:
    log = make_log()
    for i in range(6):
        log.append(_person(i))
    key = signing_key()
    full = tmp_path / "full.json"
    export_bundle(log, full, key, origin=ORIGIN, with_personal=True)
    bare = tmp_path / "bare.json"
    export_bundle(log, bare, key, origin=ORIGIN)
    assert verify_bundle(full, public_raw(key)) == 6
    assert verify_bundle(bare, public_raw(key)) == 6
    assert "psn-" in full.read_text("utf-8")
    assert "psn-" not in bare.read_text("utf-8")  # no personal data leaves by default

    log.erase_subject("psn-2")
    after = tmp_path / "after.json"
    export_bundle(log, after, key, origin=ORIGIN, with_personal=True)
    assert verify_bundle(after, public_raw(key), previous_checkpoint=_note(full)) == 6
    carried = [e for e in json.loads(after.read_text("utf-8"))["entries"] if "personal" in e]
    assert [e["index"] for e in carried] == [0, 1, 3, 4]

    # A personal part changed in the bundle no longer opens its commitment.
    tampered = json.loads(full.read_text("utf-8"))
    tampered["entries"][1]["personal"]["data"]["subject_pseudonym"] = "psn-9"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tampered, ensure_ascii=False), "utf-8")
    with pytest.raises(AuditIntegrityError, match="entry 1: personal part does not open"):
        verify_bundle(bad, public_raw(key))


def _note(bundle: Path) -> str:
    return str(json.loads(bundle.read_text("utf-8"))["checkpoint"])


def test_verify_catches_a_swapped_personal_part(
    make_sqlite_log: LogFactory, tmp_path: Path
) -> None:
    log = make_sqlite_log()
    for i in range(4):
        log.append(_person(i))
    assert log.verify() == 4
    db = raw_db(tmp_path / "audit.db")
    db.execute("DROP TRIGGER audit_personal_no_update")
    db.execute("""UPDATE audit_personal SET personal_json = '{"consent_id":"cst-1",'
                  || '"subject_pseudonym":"someone-else"}' WHERE idx = 1""")
    db.close()
    with pytest.raises(AuditIntegrityError, match="entry 1: stored personal part does not open"):
        log.verify()


def test_personal_parts_change_only_by_erasure(make_sqlite_log: LogFactory, tmp_path: Path) -> None:
    log = make_sqlite_log()
    log.append(_person(0))
    db = raw_db(tmp_path / "audit.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit_personal SET personal_json = '{}'")
    with pytest.raises(sqlite3.IntegrityError, match="only through an erasure"):
        db.execute("DELETE FROM audit_personal")
    with pytest.raises(sqlite3.IntegrityError, match="only with its entry"):
        db.execute("INSERT INTO audit_personal (idx, salt, personal_json) VALUES (5, ?, '{}')",
                   (bytes(SALT_SIZE),))
    db.close()
    log.erase_subject("psn-0")
    db = raw_db(tmp_path / "audit.db")
    with pytest.raises(sqlite3.IntegrityError, match="only with its entry"):  # never comes back
        db.execute("INSERT INTO audit_personal (idx, salt, personal_json) VALUES (0, ?, '{}')",
                   (bytes(SALT_SIZE),))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM audit_erasures")
    db.close()


# -- a store made before schema 3 ----------------------------------------------------------------

# The schema-2 entry table (gateway/audit/store.py before personal parts): its generated
# columns included subject_pseudonym and consent_id, read from leaves that held them inline.
_SCHEMA_2_ENTRIES = """
    CREATE TABLE audit_entries (
        idx INTEGER PRIMARY KEY CHECK (idx >= 0),
        ts TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.ts')) STORED,
        actor TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.actor')) STORED,
        role TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.role')) STORED,
        org TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.org')) STORED,
        action TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.action')) STORED,
        purpose TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.purpose')) STORED,
        decision TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.decision')) STORED,
        status INTEGER GENERATED ALWAYS AS (json_extract(entry_json, '$.status')) STORED,
        subject_pseudonym TEXT
            GENERATED ALWAYS AS (json_extract(entry_json, '$.subject_pseudonym')) STORED,
        consent_id TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.consent_id')) STORED,
        entry_json TEXT NOT NULL,
        leaf_hash BLOB NOT NULL CHECK (length(leaf_hash) = 32),
        chain_hash BLOB NOT NULL CHECK (length(chain_hash) = 32)
    ) STRICT
"""
_SCHEMA_2_SUBTREES = """
    CREATE TABLE audit_subtrees (
        level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
        PRIMARY KEY (level, idx)
    ) STRICT, WITHOUT ROWID
"""


def test_a_schema_2_store_keeps_its_inline_entries_searchable(make_sqlite_log: LogFactory,
                                                               tmp_path: Path) -> None:
    from gateway.audit import canonical_json, merkle
    from gateway.audit.entry import GENESIS, chain_hash, leaf_hash

    old = [_person(i) for i in range(5)]
    db = raw_db(tmp_path / "audit.db")
    db.execute(_SCHEMA_2_ENTRIES)
    db.execute(_SCHEMA_2_SUBTREES)
    prev, leaves = GENESIS, []
    for i, entry in enumerate(old):  # leaves as schema 2 wrote them: personal members inline
        data = canonical_json(entry.model_dump(mode="json"))
        leaf = leaf_hash(data)
        prev = chain_hash(prev, leaf)
        leaves.append(leaf)
        db.execute("INSERT INTO audit_entries (idx, entry_json, leaf_hash, chain_hash)"
                   " VALUES (?, ?, ?, ?)", (i, data.decode(), leaf, prev))
    for (level, idx), h in merkle.extend(0, [], leaves)[1]:
        db.execute("INSERT INTO audit_subtrees VALUES (?, ?, ?)", (level, idx, h))
    db.execute("PRAGMA user_version = 2")
    db.close()

    log = make_sqlite_log()
    assert [log.get(i) for i in range(5)] == old
    log.append(_person(7))  # psn-1 again, now with its personal part beside the leaf
    assert [i for i, _ in log.search(subject_pseudonym="psn-1")] == [1, 4, 5]
    assert [i for i, _ in log.search(consent_id="cst-1")] == [1, 4, 5]
    assert log.erase_subject("psn-1") == [5]  # inline leaves cannot be erased; new ones can
    assert [i for i, _ in log.search(subject_pseudonym="psn-1")] == [1, 4]
    assert log.verify() == 6
