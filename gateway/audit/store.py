"""SQLite backend of the audit log.

Two tables: ``audit_entries`` and ``audit_subtrees`` (the hash of every complete RFC 6962
subtree of level >= 1, written in the same transaction as the entries that complete it; level
0 is ``audit_entries.leaf_hash``). The canonical entry JSON, its leaf hash and its chain hash are
the stored facts; the filter columns (``ts``, ``actor``, ``org`` …) are STORED generated columns
extracted from that JSON, so they cannot disagree with what was hashed. Triggers refuse UPDATE
and DELETE (on both tables) and any INSERT of an entry that is not at the next index. They guard
against mistakes through SQL; deliberate tampering with the file is what
:meth:`AuditLog.verify` and signed bundles detect.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Final

from sqlglot import exp

from gateway.audit import merkle
from gateway.audit._sql import SqlAuditLog
from gateway.audit.entry import GENESIS
from gateway.audit.log import BuildRows, Lease, SearchFilter, StoredRow
from gateway.errors import AuditIntegrityError, AuditUnavailable
from gateway.sqlite_wal import WriteTurn, enable_wal

__all__ = ["SqliteAuditLog"]

#: 1: entries only. 2: adds ``audit_subtrees``, filled from the stored leaves when upgrading.
#: 3: personal parts beside the leaf (``audit_personal``, ``audit_erasures``), stored
#: checkpoints (``audit_checkpoints``); fewer indexed columns on ``audit_entries``.
SCHEMA_VERSION: Final = 3

_NO_CHANGE: Final = "BEGIN SELECT RAISE(ABORT, 'audit log is append-only: {} refused'); END"


def _append_only(table: str) -> tuple[str, str]:
    return (
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table} "
        + _NO_CHANGE.format("UPDATE"),
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table} "
        + _NO_CHANGE.format("DELETE"),
    )


_SCHEMA: Final = (
    # Only ts, actor and org are indexed (STORED); the other filter columns are VIRTUAL: the
    # low-cardinality ones (role, action, decision…) gain little from an index and each
    # extracted column costs every insert a JSON parse. A store made by schema 1 or 2 keeps its
    # table, whose leaves may still hold subject_pseudonym and consent_id inline.
    """
    CREATE TABLE IF NOT EXISTS audit_entries (
        idx INTEGER PRIMARY KEY CHECK (idx >= 0),
        ts TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.ts')) STORED,
        actor TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.actor')) STORED,
        org TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.org')) STORED,
        role TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.role')) VIRTUAL,
        action TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.action')) VIRTUAL,
        purpose TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.purpose')) VIRTUAL,
        decision TEXT GENERATED ALWAYS AS (json_extract(entry_json, '$.decision')) VIRTUAL,
        status INTEGER GENERATED ALWAYS AS (json_extract(entry_json, '$.status')) VIRTUAL,
        entry_json TEXT NOT NULL,
        leaf_hash BLOB NOT NULL CHECK (length(leaf_hash) = 32),
        chain_hash BLOB NOT NULL CHECK (length(chain_hash) = 32)
    ) STRICT
    """,
    "CREATE INDEX IF NOT EXISTS audit_entries_ts ON audit_entries (ts)",
    "CREATE INDEX IF NOT EXISTS audit_entries_actor ON audit_entries (actor)",
    "CREATE INDEX IF NOT EXISTS audit_entries_org ON audit_entries (org)",
    *_append_only("audit_entries"),
    # Also stops INSERT OR REPLACE, which would otherwise delete without firing the trigger.
    """
    CREATE TRIGGER IF NOT EXISTS audit_entries_next_index BEFORE INSERT ON audit_entries
    WHEN NEW.idx IS NOT (SELECT coalesce(max(idx), -1) + 1 FROM audit_entries)
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only: INSERT must use the next index'); END
    """,
    """
    CREATE TABLE IF NOT EXISTS audit_subtrees (
        level INTEGER NOT NULL CHECK (level >= 1),
        idx INTEGER NOT NULL CHECK (idx >= 0),
        hash BLOB NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (level, idx)
    ) STRICT, WITHOUT ROWID
    """,
    *_append_only("audit_subtrees"),
    # The erasable personal part of an entry; its leaf holds only the commitment.
    """
    CREATE TABLE IF NOT EXISTS audit_personal (
        idx INTEGER PRIMARY KEY CHECK (idx >= 0),
        salt BLOB NOT NULL CHECK (length(salt) = 16),
        personal_json TEXT NOT NULL,
        subject_pseudonym TEXT
            GENERATED ALWAYS AS (json_extract(personal_json, '$.subject_pseudonym')) STORED,
        consent_id TEXT GENERATED ALWAYS AS (json_extract(personal_json, '$.consent_id')) STORED
    ) STRICT
    """,
    """
    CREATE INDEX IF NOT EXISTS audit_personal_subject ON audit_personal (subject_pseudonym)
    WHERE subject_pseudonym IS NOT NULL
    """,
    """
    CREATE INDEX IF NOT EXISTS audit_personal_consent ON audit_personal (consent_id)
    WHERE consent_id IS NOT NULL
    """,
    # Each erasure is recorded first; only then may the personal part be deleted, and an
    # erased part can never come back.
    """
    CREATE TABLE IF NOT EXISTS audit_erasures (
        idx INTEGER PRIMARY KEY CHECK (idx >= 0),
        erased_at TEXT NOT NULL
    ) STRICT
    """,
    *_append_only("audit_erasures"),
    """
    CREATE TRIGGER IF NOT EXISTS audit_personal_no_update BEFORE UPDATE ON audit_personal
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only: UPDATE refused'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS audit_personal_erase_only BEFORE DELETE ON audit_personal
    WHEN NOT EXISTS (SELECT 1 FROM audit_erasures WHERE idx = OLD.idx)
    BEGIN SELECT RAISE(ABORT, 'audit personal data: DELETE only through an erasure'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS audit_personal_of_new_entry BEFORE INSERT ON audit_personal
    WHEN NOT EXISTS (SELECT 1 FROM audit_entries WHERE idx = NEW.idx)
      OR EXISTS (SELECT 1 FROM audit_erasures WHERE idx = NEW.idx)
    BEGIN SELECT RAISE(ABORT, 'audit personal data: INSERT only with its entry'); END
    """,
    """
    CREATE TABLE IF NOT EXISTS audit_checkpoints (
        size INTEGER PRIMARY KEY CHECK (size >= 0),
        root BLOB NOT NULL CHECK (length(root) = 32),
        note TEXT NOT NULL
    ) STRICT
    """,
    *_append_only("audit_checkpoints"),
    # State derived from the log by its followers (the alert engine): not part of the log,
    # replaced as they go, rebuilt by replaying the log if lost.
    """
    CREATE TABLE IF NOT EXISTS audit_follower_state (
        name TEXT PRIMARY KEY,
        data BLOB NOT NULL
    ) STRICT
    """,
)

_INSERT_COLUMNS: Final = ("idx", "entry_json", "leaf_hash", "chain_hash")
_NODE_COLUMNS: Final = ("level", "idx", "hash")
_PERSONAL_COLUMNS: Final = ("idx", "salt", "personal_json")
#: Rows per INSERT statement at most (4 columns: well under SQLite's 32,766 variables).
_MAX_ROWS_PER_STATEMENT: Final = 4096
# Subtree hashes by (level, idx), the list bound as one JSON parameter: one statement, one
# snapshot, O(log n) primary-key lookups for a proof. Level 0 is the entry's leaf hash.
_NODES: Final = """
    SELECT j.key, e.leaf_hash FROM json_each(?1) AS j
    JOIN audit_entries AS e ON e.idx = json_extract(j.value, '$[1]')
    WHERE json_extract(j.value, '$[0]') = 0
    UNION ALL
    SELECT j.key, s.hash FROM json_each(?1) AS j
    JOIN audit_subtrees AS s
      ON s.level = json_extract(j.value, '$[0]') AND s.idx = json_extract(j.value, '$[1]')
"""
_LEAVES: Final = "SELECT leaf_hash FROM audit_entries ORDER BY idx"
_TAIL: Final = "SELECT idx, chain_hash FROM audit_entries ORDER BY idx DESC LIMIT 1"
_ROW: Final = """
    SELECT e.idx, e.entry_json, e.leaf_hash, e.chain_hash, p.personal_json, p.salt
    FROM audit_entries AS e LEFT JOIN audit_personal AS p ON p.idx = e.idx WHERE e.idx = ?
"""
_SCAN: Final = """
    SELECT e.idx, e.entry_json, e.leaf_hash, e.chain_hash, p.personal_json, p.salt
    FROM audit_entries AS e LEFT JOIN audit_personal AS p ON p.idx = e.idx
    WHERE e.idx >= ? ORDER BY e.idx
"""
_SCAN_CHUNK: Final = 4096
# What verify() reads: the entry text as the bytes stored (UTF-8, what was hashed), and the
# subtree hashes level by level in index order (the primary key's order).
_VERIFY_SCAN: Final = (
    "SELECT idx, CAST(entry_json AS BLOB), leaf_hash, chain_hash FROM audit_entries ORDER BY idx"
)
_LEVEL_SCAN: Final = "SELECT idx, hash FROM audit_subtrees WHERE level = ? ORDER BY idx"
_ABOVE: Final = "SELECT level, idx FROM audit_subtrees WHERE level > ? ORDER BY level, idx LIMIT 1"
_PERSONAL_SCAN: Final = """
    SELECT p.idx, p.salt, CAST(p.personal_json AS BLOB), json_extract(e.entry_json, '$.personal')
    FROM audit_personal AS p LEFT JOIN audit_entries AS e ON e.idx = p.idx ORDER BY p.idx
"""


class SqliteAuditLog(SqlAuditLog):
    """The audit log in a SQLite file (WAL, ``synchronous=FULL``).

    Several processes may append to the same file: each batch re-reads the chain head inside
    its ``BEGIN IMMEDIATE`` transaction. ``busy_timeout`` bounds how long a batch waits for the
    file lock before its callers get :class:`AuditUnavailable`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        max_batch: int = 4096,
        max_delay: float = 0.002,
        max_queue: int = 65536,
        unsafe_salt: Callable[[], bytes] | None = None,
    ) -> None:
        self._path = os.fspath(path)
        if self._path == "" or self._path.startswith((":memory:", "file:")):
            raise ValueError("SqliteAuditLog needs a file path; every connection must see it")
        self._busy_timeout = busy_timeout
        self._write_turn = WriteTurn(self._path, timeout_s=busy_timeout)
        self._pool_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._all_readers: list[sqlite3.Connection] = []
        self._storage_closed = False
        self._admin_lock = threading.Lock()  # checkpoints and erasures: rare, one at a time
        self._admin: sqlite3.Connection | None = None
        self._legacy_inline = False
        try:
            self._writer: sqlite3.Connection | None = self._connect()
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"cannot open audit store: {exc}") from exc
        try:
            self._create_schema(self._writer)
        except BaseException as exc:
            self._writer.close()
            if isinstance(exc, sqlite3.Error):
                raise AuditUnavailable(f"cannot open audit store: {exc}") from exc
            raise
        super().__init__(max_batch=max_batch, max_delay=max_delay, max_queue=max_queue,
                         unsafe_salt=unsafe_salt)

    # -- connections ---------------------------------------------------------------------

    def _connect(self, *, read_only: bool = False) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun explicitly, never implicitly.
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            enable_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            if read_only:
                conn.execute("PRAGMA query_only=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version not in (0, 1, 2, SCHEMA_VERSION):
                raise AuditUnavailable(
                    f"audit store schema version {version}, this gateway knows {SCHEMA_VERSION}"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            if version in (0, 1):
                _fill_subtrees(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # Leaves written before schema 3 hold the personal members inline (not erasable).
            columns = {row[1] for row in conn.execute("PRAGMA table_xinfo(audit_entries)")}
            self._legacy_inline = "subject_pseudonym" in columns
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._pool_lock:
            if self._storage_closed:
                raise AuditUnavailable("audit log is closed")
            conn = self._idle_readers.pop() if self._idle_readers else None
        try:
            if conn is None:
                conn = self._connect(read_only=True)
                with self._pool_lock:
                    self._all_readers.append(conn)
            yield conn
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"audit store cannot be read: {exc}") from exc
        finally:
            if conn is not None:
                with self._pool_lock:
                    self._idle_readers.append(conn)

    # -- hooks ---------------------------------------------------------------------------

    def _try_lease(self, name: str) -> Lease | None:
        # An flock on a file beside the store: the processes of one machine share it.
        fd = os.open(f"{self._path}.{name}.lease", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _FileLease(fd)

    def _append_rows(self, build: BuildRows) -> None:
        if self._writer is None:  # dropped after an earlier failure: start afresh
            self._writer = self._connect()
        conn = self._writer
        with self._write_turn.held():
            self._append_in_turn(conn, build)

    def _append_in_turn(self, conn: sqlite3.Connection, build: BuildRows) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(_TAIL).fetchone()
            size, head = (0, GENESIS) if row is None else (row[0] + 1, row[1])
            batch = build(size, head, lambda ids: _select_nodes(conn, ids))
            _insert(
                conn,
                "audit_entries",
                _INSERT_COLUMNS,
                [(r.index, r.entry_json, r.leaf_hash, r.chain_hash) for r in batch.rows],
            )
            if batch.personal:
                _insert(
                    conn,
                    "audit_personal",
                    _PERSONAL_COLUMNS,
                    [(p.index, p.salt, p.data) for p in batch.personal],
                )
            _insert(
                conn,
                "audit_subtrees",
                _NODE_COLUMNS,
                [(level, idx, h) for (level, idx), h in batch.nodes],
            )
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                # The connection is in an unknown state; SQLite rolls back when it closes.
                conn.close()
                self._writer = None
            raise

    def _read_row(self, index: int) -> StoredRow | None:
        with self._reader() as conn:
            row = conn.execute(_ROW, (index,)).fetchone()
        return None if row is None else StoredRow(*row)

    def _read_nodes(self, ids: Sequence[merkle.NodeID]) -> list[bytes]:
        if not ids:
            return []
        with self._reader() as conn:
            return _select_nodes(conn, ids)

    def _scan_rows(self, start: int) -> Iterator[StoredRow]:
        # One SELECT statement reads one WAL snapshot, however long the iteration takes.
        with self._reader() as conn:
            cursor = conn.execute(_SCAN, (start,))
            try:
                while chunk := cursor.fetchmany(_SCAN_CHUNK):
                    for row in chunk:
                        yield StoredRow(*row)
            finally:
                cursor.close()

    @contextmanager
    def _verify_scan(
        self,
    ) -> Iterator[
        tuple[
            Iterator[tuple[int, bytes, bytes, bytes]],
            Callable[[int], Iterator[tuple[int, bytes]]],
            Callable[[int], tuple[int, int] | None],
        ]
    ]:
        # One read transaction: every statement below reads the same WAL snapshot.
        with self._reader() as conn:
            conn.execute("BEGIN")
            cursors: list[sqlite3.Cursor] = []

            def level(lv: int) -> Iterator[tuple[int, bytes]]:
                cursor = conn.execute(_LEVEL_SCAN, (lv,))
                cursors.append(cursor)
                return cursor

            def above(lv: int) -> tuple[int, int] | None:
                row = conn.execute(_ABOVE, (lv,)).fetchone()
                return None if row is None else (row[0], row[1])

            try:
                rows = conn.execute(_VERIFY_SCAN)
                cursors.append(rows)
                rows.arraysize = _SCAN_CHUNK
                yield rows, level, above
            finally:
                for cursor in cursors:
                    cursor.close()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def _scan_personal(self) -> Iterator[tuple[int, bytes, bytes, str | None]]:
        with self._reader() as conn:
            cursor = conn.execute(_PERSONAL_SCAN)
            try:
                while chunk := cursor.fetchmany(_SCAN_CHUNK):
                    yield from chunk
            finally:
                cursor.close()

    def _search_rows(
        self, where: SearchFilter, limit: int, offset: int
    ) -> list[tuple[int, str, str | None]]:
        params = {k: v for k, v in asdict(where).items() if v is not None}
        sql = _search_sql(tuple(sorted(params)), legacy_inline=self._legacy_inline)
        params.update(limit=limit, offset=offset)
        with self._reader() as conn:
            return [(idx, text, personal) for idx, text, personal in conn.execute(sql, params)]

    # -- checkpoints and erasures: one short write transaction each ------------------------

    @contextmanager
    def _admin_transaction(self) -> Iterator[sqlite3.Connection]:
        with self._admin_lock:
            if self._storage_closed:
                raise AuditUnavailable("audit log is closed")
            try:
                if self._admin is None:
                    self._admin = self._connect()
                conn = self._admin
                with self._write_turn.held():
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield conn
                        conn.execute("COMMIT")
                    finally:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"audit store cannot be written: {exc}") from exc

    def _close_storage(self) -> None:
        with self._pool_lock:
            self._storage_closed = True
            readers, self._all_readers, self._idle_readers = self._all_readers, [], []
        for conn in readers:
            conn.close()
        with self._admin_lock:
            if self._admin is not None:
                self._admin.close()
                self._admin = None
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error):  # keeps the planner's statistics fresh
                self._writer.execute("PRAGMA optimize")
            self._writer.close()
            self._writer = None
        self._write_turn.close()


def _select_nodes(conn: sqlite3.Connection, ids: Sequence[merkle.NodeID]) -> list[bytes]:
    if not ids:
        return []
    if all(level == 0 for level, _ in ids) and len(ids) <= _MAX_LEAVES_BY_KEY:
        # Leaves only (what a cached proof needs): a primary-key lookup per leaf.
        by_idx = dict(conn.execute(_leaves_sql(len(ids)), [idx for _, idx in ids]).fetchall())
        found = {p: by_idx[idx] for p, (_, idx) in enumerate(ids) if idx in by_idx}
    else:
        found = dict(conn.execute(_NODES, (json.dumps([list(i) for i in ids]),)).fetchall())
    out: list[bytes] = []
    for position, (level, idx) in enumerate(ids):
        value = found.get(position)
        if value is None:
            first = idx << level
            raise AuditIntegrityError(
                f"subtree ({level}, {idx}) over entries {first}..{first + (1 << level) - 1}:"
                " missing from the store",
                index=first,
            )
        out.append(bytes(value))
    return out


_MAX_LEAVES_BY_KEY: Final = 64


@functools.lru_cache(maxsize=_MAX_LEAVES_BY_KEY)
def _leaves_sql(count: int) -> str:
    """``SELECT idx, leaf_hash … WHERE idx IN (?, …)`` for ``count`` bound indexes."""
    where = exp.column("idx").isin(*(exp.Placeholder() for _ in range(count)))
    return exp.select("idx", "leaf_hash").from_("audit_entries").where(where).sql("sqlite")


def _fill_subtrees(conn: sqlite3.Connection) -> None:
    """Upgrade from schema 1: store the subtree hashes of the leaves already there."""
    frontier: list[bytes] = []
    size = 0
    cursor = conn.execute(_LEAVES)
    while chunk := cursor.fetchmany(_SCAN_CHUNK):
        frontier, nodes = merkle.extend(size, frontier, [bytes(leaf) for (leaf,) in chunk])
        size += len(chunk)
        _insert(conn, "audit_subtrees", _NODE_COLUMNS, [(lv, i, h) for (lv, i), h in nodes])


def _insert(
    conn: sqlite3.Connection,
    table: str,
    columns: tuple[str, ...],
    rows: Sequence[tuple[object, ...]],
) -> None:
    # A few multi-row INSERTs rather than one per row: each statement is one trip out of the
    # GIL, and under load that trip costs more than the insert itself.
    start = 0
    for count in _chunks(len(rows)):
        params = [value for r in rows[start : start + count] for value in r]
        conn.execute(_insert_sql(table, columns, count), params)
        start += count


def _chunks(n: int) -> list[int]:
    """``n`` as a sum of powers of two, largest first (at most ``_MAX_ROWS_PER_STATEMENT``
    each), so that few statements are prepared."""
    full, rest = divmod(n, _MAX_ROWS_PER_STATEMENT)
    return [_MAX_ROWS_PER_STATEMENT] * full + [
        1 << bit for bit in range(rest.bit_length() - 1, -1, -1) if rest >> bit & 1
    ]


@functools.lru_cache(maxsize=64)
def _insert_sql(table: str, columns: tuple[str, ...], rows: int, dialect: str = "sqlite") -> str:
    """A multi-row INSERT of ``rows`` rows, all values bound, built as a tree."""
    values = exp.values([tuple(exp.Placeholder() for _ in columns) for _ in range(rows)])
    return exp.insert(values, table, columns=list(columns)).sql(dialect=dialect)


# Filter names map to fixed columns and comparisons; values are only ever bound parameters.
_EQUALITY_FILTERS: Final = frozenset({"actor", "org", "purpose", "action", "decision"})
_PERSONAL_FILTERS: Final = frozenset({"subject_pseudonym", "consent_id"})


@functools.lru_cache(maxsize=256)
def _search_sql(names: tuple[str, ...], dialect: str = "sqlite", *,
                legacy_inline: bool = False) -> str:
    """The search statement for this set of filters, built as a tree, never from strings.

    A person or consent filter matches the stored personal parts (so erased entries no longer
    match); in a store upgraded from schema 2 also the leaves that hold those members inline.
    """
    conditions: list[exp.Expression] = []
    for name in names:
        value = exp.Placeholder(this=name)
        if name in _EQUALITY_FILTERS:
            conditions.append(exp.column(name, table="e").eq(value))
        elif name in _PERSONAL_FILTERS:
            matching: exp.Query = (
                exp.select("idx").from_("audit_personal").where(exp.column(name).eq(value))
            )
            if legacy_inline:
                inline = exp.select("idx").from_("audit_entries").where(
                    exp.column(name).eq(value))
                matching = exp.union(matching, inline, distinct=False)
            conditions.append(exp.column("idx", table="e").isin(query=matching))
        elif name == "since":
            conditions.append(exp.GTE(this=exp.column("ts", table="e"), expression=value))
        elif name == "until":
            conditions.append(exp.LT(this=exp.column("ts", table="e"), expression=value))
        else:
            raise ValueError(f"unknown search filter {name!r}")
    query = (
        exp.select("e.idx", "e.entry_json", "p.personal_json")
        .from_("audit_entries AS e")
        .join("audit_personal AS p", on="p.idx = e.idx", join_type="left")
    )
    if conditions:
        query = query.where(exp.and_(*conditions))
    query = (
        query.order_by("e.idx")
        .limit(exp.Placeholder(this="limit"))
        .offset(exp.Placeholder(this="offset"))
    )
    return query.sql(dialect=dialect)


class _FileLease(Lease):
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the flock
