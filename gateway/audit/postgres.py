"""PostgreSQL backend of the audit log (psycopg 3).

The same tables as the SQLite store (``audit_entries``, ``audit_subtrees``, ``audit_personal``,
``audit_erasures``, ``audit_checkpoints``, ``audit_follower_state``) in one schema. What the
algorithm in :class:`~gateway.audit.log.AuditLog` needs from a store holds here too:

- **One chain across processes.** Each batch runs in one transaction that first takes a
  transaction-scoped advisory lock on the log, then reads the tail: appenders in any number of
  processes are serialized, and each builds on the head it read under the lock.
- **Durable before the answer.** ``COMMIT`` returns once the WAL is flushed
  (``synchronous_commit`` is forced ``on`` for the writer's session).
- **Append-only.** Row triggers refuse UPDATE and DELETE on every log table, statement triggers
  refuse TRUNCATE, and a statement trigger (with the inserted rows as a transition table)
  refuses an INSERT that is not a contiguous run at the next index. Personal parts are deleted
  only after their erasure is recorded, and never come back. :func:`grant_appender` gives a
  login role only ``SELECT`` and ``INSERT`` (plus the erasure and follower-state rights), so
  the gateway's own role cannot drop the triggers or rewrite rows even by mistake.
- **Subtrees in the same transaction** as the entries that complete them.

Rows go in with ``COPY … FROM STDIN`` (binary), one per table per batch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from gateway.audit import merkle
from gateway.audit._sql import SqlAuditLog
from gateway.audit.entry import GENESIS
from gateway.audit.log import BuildRows, Lease, SearchFilter, StoredRow
from gateway.audit.store import _search_sql
from gateway.errors import AuditIntegrityError, AuditUnavailable

__all__ = ["PostgresAuditLog", "grant_appender"]

SCHEMA_VERSION: Final = 3
_SCAN_CHUNK: Final = 4096
_IDENT_OK: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")

# The DDL is fixed text; the schema name is set through search_path, never spliced.
_DDL: Final = (
    """
    CREATE TABLE IF NOT EXISTS audit_meta (
        key text PRIMARY KEY,
        value text NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS audit_entries (
        idx bigint PRIMARY KEY CHECK (idx >= 0),
        entry_json text NOT NULL,
        leaf_hash bytea NOT NULL CHECK (length(leaf_hash) = 32),
        chain_hash bytea NOT NULL CHECK (length(chain_hash) = 32),
        ts text GENERATED ALWAYS AS (entry_json::jsonb ->> 'ts') STORED,
        actor text GENERATED ALWAYS AS (entry_json::jsonb ->> 'actor') STORED,
        org text GENERATED ALWAYS AS (entry_json::jsonb ->> 'org') STORED,
        role text GENERATED ALWAYS AS (entry_json::jsonb ->> 'role') STORED,
        action text GENERATED ALWAYS AS (entry_json::jsonb ->> 'action') STORED,
        purpose text GENERATED ALWAYS AS (entry_json::jsonb ->> 'purpose') STORED,
        decision text GENERATED ALWAYS AS (entry_json::jsonb ->> 'decision') STORED,
        status integer GENERATED ALWAYS AS ((entry_json::jsonb ->> 'status')::integer) STORED
    )
    """,
    "CREATE INDEX IF NOT EXISTS audit_entries_ts ON audit_entries (ts)",
    "CREATE INDEX IF NOT EXISTS audit_entries_actor ON audit_entries (actor)",
    "CREATE INDEX IF NOT EXISTS audit_entries_org ON audit_entries (org)",
    """
    CREATE TABLE IF NOT EXISTS audit_subtrees (
        level integer NOT NULL CHECK (level >= 1),
        idx bigint NOT NULL CHECK (idx >= 0),
        hash bytea NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (level, idx)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS audit_personal (
        idx bigint PRIMARY KEY CHECK (idx >= 0),
        salt bytea NOT NULL CHECK (length(salt) = 16),
        personal_json text NOT NULL,
        subject_pseudonym text
            GENERATED ALWAYS AS (personal_json::jsonb ->> 'subject_pseudonym') STORED,
        consent_id text GENERATED ALWAYS AS (personal_json::jsonb ->> 'consent_id') STORED
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS audit_personal_subject ON audit_personal (subject_pseudonym)
    WHERE subject_pseudonym IS NOT NULL
    """,
    """
    CREATE INDEX IF NOT EXISTS audit_personal_consent ON audit_personal (consent_id)
    WHERE consent_id IS NOT NULL
    """,
    """
    CREATE TABLE IF NOT EXISTS audit_erasures (
        idx bigint PRIMARY KEY CHECK (idx >= 0),
        erased_at text NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS audit_checkpoints (
        size bigint PRIMARY KEY CHECK (size >= 0),
        root bytea NOT NULL CHECK (length(root) = 32),
        note text NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS audit_follower_state (
        name text PRIMARY KEY,
        data bytea NOT NULL
    )
    """,
    # -- guards ------------------------------------------------------------------------------
    """
    CREATE OR REPLACE FUNCTION audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit log is append-only: % refused on %', TG_OP, TG_TABLE_NAME
            USING ERRCODE = 'integrity_constraint_violation';
    END $$
    """,
    """
    CREATE OR REPLACE FUNCTION audit_next_index() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE lo bigint; hi bigint; n bigint;
    BEGIN
        SELECT min(idx), max(idx), count(*) INTO lo, hi, n FROM inserted;
        IF hi - lo + 1 <> n
           OR (lo > 0 AND NOT EXISTS (SELECT 1 FROM audit_entries WHERE idx = lo - 1))
           OR EXISTS (SELECT 1 FROM audit_entries WHERE idx > hi) THEN
            RAISE EXCEPTION 'audit log is append-only: INSERT must use the next index'
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NULL;
    END $$
    """,
    """
    CREATE OR REPLACE FUNCTION audit_personal_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            IF NOT EXISTS (SELECT 1 FROM audit_erasures WHERE idx = OLD.idx) THEN
                RAISE EXCEPTION 'audit personal data: DELETE only through an erasure'
                    USING ERRCODE = 'integrity_constraint_violation';
            END IF;
            RETURN OLD;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM audit_entries WHERE idx = NEW.idx)
           OR EXISTS (SELECT 1 FROM audit_erasures WHERE idx = NEW.idx) THEN
            RAISE EXCEPTION 'audit personal data: INSERT only with its entry'
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END $$
    """,
)

_APPEND_ONLY_TABLES: Final = ("audit_entries", "audit_subtrees", "audit_erasures",
                              "audit_checkpoints")


def _guard_statements() -> list[sql.Composed]:
    out: list[sql.Composed] = []
    for table in _APPEND_ONLY_TABLES:
        name = sql.Identifier(table)
        out += [
            sql.SQL("CREATE OR REPLACE TRIGGER {} BEFORE UPDATE OR DELETE ON {} "
                    "FOR EACH ROW EXECUTE FUNCTION audit_refuse()").format(
                sql.Identifier(f"{table}_no_change"), name),
            sql.SQL("CREATE OR REPLACE TRIGGER {} BEFORE TRUNCATE ON {} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse()").format(
                sql.Identifier(f"{table}_no_truncate"), name),
        ]
    out += [
        sql.SQL("CREATE OR REPLACE TRIGGER audit_entries_next_index AFTER INSERT ON "
                "audit_entries REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT "
                "EXECUTE FUNCTION audit_next_index()").format(),
        sql.SQL("CREATE OR REPLACE TRIGGER audit_personal_no_update BEFORE UPDATE ON "
                "audit_personal FOR EACH ROW EXECUTE FUNCTION audit_refuse()").format(),
        sql.SQL("CREATE OR REPLACE TRIGGER audit_personal_no_truncate BEFORE TRUNCATE ON "
                "audit_personal FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse()").format(),
        sql.SQL("CREATE OR REPLACE TRIGGER audit_personal_guard BEFORE INSERT OR DELETE ON "
                "audit_personal FOR EACH ROW EXECUTE FUNCTION audit_personal_guard()").format(),
    ]
    return out


_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '.audit', 0))"
_TAIL: Final = "SELECT idx, chain_hash FROM audit_entries ORDER BY idx DESC LIMIT 1"
_NODES: Final = """
    SELECT j.ord, e.leaf_hash
    FROM unnest(%(levels)s::integer[], %(idxs)s::bigint[]) WITH ORDINALITY AS j(level, idx, ord)
    JOIN audit_entries AS e ON e.idx = j.idx
    WHERE j.level = 0
    UNION ALL
    SELECT j.ord, s.hash
    FROM unnest(%(levels)s::integer[], %(idxs)s::bigint[]) WITH ORDINALITY AS j(level, idx, ord)
    JOIN audit_subtrees AS s ON s.level = j.level AND s.idx = j.idx
"""
_ROW: Final = """
    SELECT e.idx, e.entry_json, e.leaf_hash, e.chain_hash, p.personal_json, p.salt
    FROM audit_entries AS e LEFT JOIN audit_personal AS p ON p.idx = e.idx WHERE e.idx = %s
"""
_SCAN: Final = """
    SELECT e.idx, e.entry_json, e.leaf_hash, e.chain_hash, p.personal_json, p.salt
    FROM audit_entries AS e LEFT JOIN audit_personal AS p ON p.idx = e.idx
    WHERE e.idx >= %s ORDER BY e.idx
"""
_VERIFY_SCAN: Final = (
    "SELECT idx, convert_to(entry_json, 'UTF8'), leaf_hash, chain_hash FROM audit_entries"
    " ORDER BY idx"
)
_LEVEL_SCAN: Final = "SELECT idx, hash FROM audit_subtrees WHERE level = %s ORDER BY idx"
_ABOVE: Final = (
    "SELECT level, idx FROM audit_subtrees WHERE level > %s ORDER BY level, idx LIMIT 1"
)
_PERSONAL_SCAN: Final = """
    SELECT p.idx, p.salt, convert_to(p.personal_json, 'UTF8'), e.entry_json::jsonb ->> 'personal'
    FROM audit_personal AS p LEFT JOIN audit_entries AS e ON e.idx = p.idx ORDER BY p.idx
"""


def _check_schema_name(schema: str) -> None:
    if not schema or not set(schema) <= _IDENT_OK or schema[0].isdigit():
        raise ValueError("schema must be a lowercase identifier ([a-z_][a-z0-9_]*)")


class PostgresAuditLog(SqlAuditLog):
    """The audit log in a PostgreSQL database, in schema ``schema`` (created if missing).

    Several processes may append at once: the advisory lock serializes their batches.
    ``lock_timeout`` bounds how long a batch waits for it (then its callers get
    :class:`AuditUnavailable`), ``pool_size`` the readers' connections.
    """

    placeholder = "%s"
    # One checkpoint writer at a time, in any process (READ COMMITTED alone would let two in).
    checkpoint_lock = (
        "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '.checkpoints', 0))"
    )

    def __init__(
        self,
        url: str,
        *,
        schema: str = "audit",
        lock_timeout: float = 5.0,
        pool_size: int = 4,
        max_batch: int = 4096,
        max_delay: float = 0.002,
        max_queue: int = 65536,
        unsafe_salt: Callable[[], bytes] | None = None,
    ) -> None:
        _check_schema_name(schema)
        self._url = url
        self._schema = schema
        self._options = f"-c search_path={schema} -c lock_timeout={int(lock_timeout * 1000)}"
        self._admin_lock = threading.Lock()
        self._closed_storage = False
        try:
            self._writer: psycopg.Connection[Any] | None = self._connect()
            self._create_schema(self._writer)
            self._admin: psycopg.Connection[Any] | None = None
            self._pool = ConnectionPool(
                url, min_size=1, max_size=pool_size, open=True, timeout=lock_timeout,
                kwargs={"autocommit": True, "options": self._options},
            )
        except psycopg.Error as exc:
            raise AuditUnavailable(f"cannot open audit store: {exc}") from exc
        super().__init__(max_batch=max_batch, max_delay=max_delay, max_queue=max_queue,
                         unsafe_salt=unsafe_salt)

    # -- connections ---------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._url, autocommit=True, options=self._options)
        conn.execute("SET synchronous_commit = on")  # durable before the callers are answered
        return conn

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        # A store at this version is used as it is: the gateway's role (see grant_appender)
        # may read and append but not run DDL, which only the owner can.
        with contextlib.suppress(psycopg.errors.UndefinedTable), conn.transaction():
            row = conn.execute("SELECT value FROM audit_meta WHERE key = 'schema_version'"
                               ).fetchone()
            if row is not None and int(row[0]) == SCHEMA_VERSION:
                return
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(self._schema)))
            # One creator at a time (several workers may start together).
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                         (self._schema + ".audit.schema",))
            for statement in _DDL:
                conn.execute(statement)
            for guard in _guard_statements():
                conn.execute(guard)
            row = conn.execute("SELECT value FROM audit_meta WHERE key = 'schema_version'"
                               ).fetchone()
            if row is not None and int(row[0]) != SCHEMA_VERSION:
                raise AuditUnavailable(
                    f"audit store schema version {row[0]}, this gateway knows {SCHEMA_VERSION}")
            conn.execute("INSERT INTO audit_meta (key, value) VALUES ('schema_version', %s) "
                         "ON CONFLICT DO NOTHING", (str(SCHEMA_VERSION),))

    @contextmanager
    def _reader(self) -> Iterator[psycopg.Connection[Any]]:
        if self._closed_storage:
            raise AuditUnavailable("audit log is closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise AuditUnavailable(f"audit store cannot be read: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise AuditUnavailable("audit store: no connection available") from exc
            raise

    # -- hooks ---------------------------------------------------------------------------

    def _try_lease(self, name: str) -> Lease | None:
        # A session advisory lock on a connection of its own: held while the connection
        # lives, so a holder that dies (or loses its connection) gives it up.
        try:
            conn = psycopg.connect(self._url, autocommit=True, options=self._options)
        except psycopg.Error as exc:
            raise AuditUnavailable(f"audit store unreachable: {exc}") from exc
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                               (f"{self._schema}.lease.{name}",)).fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise AuditUnavailable(f"audit store unreachable: {exc}") from exc
        if row is None or row[0] is not True:
            conn.close()
            return None
        return _SessionLease(conn)

    def _append_rows(self, build: BuildRows) -> None:
        if self._writer is None or self._writer.closed:
            self._writer = self._connect()
        conn = self._writer
        try:
            with conn.transaction():
                conn.execute(_LOCK)
                row = conn.execute(_TAIL).fetchone()
                size, head = (0, GENESIS) if row is None else (row[0] + 1, bytes(row[1]))
                batch = build(size, head, lambda ids: _select_nodes(conn, ids))
                with conn.cursor() as cur:
                    with cur.copy("COPY audit_entries (idx, entry_json, leaf_hash, chain_hash)"
                                  " FROM STDIN") as copy:
                        for r in batch.rows:
                            copy.write_row((r.index, r.entry_json, r.leaf_hash, r.chain_hash))
                    if batch.personal:
                        with cur.copy("COPY audit_personal (idx, salt, personal_json)"
                                      " FROM STDIN") as copy:
                            for p in batch.personal:
                                copy.write_row((p.index, p.salt, p.data))
                    if batch.nodes:
                        with cur.copy("COPY audit_subtrees (level, idx, hash) FROM STDIN"
                                      ) as copy:
                            for (level, idx), h in batch.nodes:
                                copy.write_row((level, idx, h))
        except BaseException:
            if conn.broken:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
                self._writer = None
            raise

    def _read_row(self, index: int) -> StoredRow | None:
        with self._reader() as conn:
            row = conn.execute(_ROW, (index,)).fetchone()
        return None if row is None else _stored_row(row)

    def _read_nodes(self, ids: Sequence[merkle.NodeID]) -> list[bytes]:
        if not ids:
            return []
        with self._reader() as conn:
            return _select_nodes(conn, ids)

    def _scan_rows(self, start: int) -> Iterator[StoredRow]:
        # A server-side cursor in one REPEATABLE READ transaction: one snapshot, bounded memory.
        with self._reader() as conn, _snapshot(conn), conn.cursor(name="audit_scan") as cur:
            cur.itersize = _SCAN_CHUNK
            cur.execute(_SCAN, (start,))
            for row in cur:
                yield _stored_row(row)

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
        with self._reader() as conn, _snapshot(conn):
            cursors: list[psycopg.ServerCursor[Any]] = []

            def server_cursor(query: str, params: tuple[Any, ...]) -> Iterator[Any]:
                cur = conn.cursor(name=f"audit_verify_{len(cursors)}")
                cur.itersize = _SCAN_CHUNK
                cursors.append(cur)
                cur.execute(query, params)
                return iter(cur)

            def level(lv: int) -> Iterator[tuple[int, bytes]]:
                return server_cursor(_LEVEL_SCAN, (lv,))

            def above(lv: int) -> tuple[int, int] | None:
                row = conn.execute(_ABOVE, (lv,)).fetchone()
                return None if row is None else (row[0], row[1])

            try:
                yield server_cursor(_VERIFY_SCAN, ()), level, above
            finally:
                for cur in cursors:
                    with contextlib.suppress(psycopg.Error):
                        cur.close()

    def _scan_personal(self) -> Iterator[tuple[int, bytes, bytes, str | None]]:
        with self._reader() as conn, _snapshot(conn), conn.cursor(name="audit_personal") as cur:
            cur.itersize = _SCAN_CHUNK
            cur.execute(_PERSONAL_SCAN)
            for idx, salt, data, commitment in cur:
                yield idx, bytes(salt), bytes(data), commitment

    def _search_rows(
        self, where: SearchFilter, limit: int, offset: int
    ) -> list[tuple[int, str, str | None]]:
        params: dict[str, Any] = {k: v for k, v in asdict(where).items() if v is not None}
        query = _search_sql(tuple(sorted(params)), "postgres")
        params.update(limit=limit, offset=offset)
        with self._reader() as conn:
            rows = conn.execute(query, params).fetchall()
        return [(idx, text, personal) for idx, text, personal in rows]

    @contextmanager
    def _admin_transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self._admin_lock:
            if self._closed_storage:
                raise AuditUnavailable("audit log is closed")
            try:
                if self._admin is None or self._admin.closed:
                    self._admin = self._connect()
                with self._admin.transaction():
                    yield self._admin
            except psycopg.Error as exc:
                raise AuditUnavailable(f"audit store cannot be written: {exc}") from exc

    def _close_storage(self) -> None:
        self._closed_storage = True
        self._pool.close()
        with self._admin_lock:
            for conn in (self._admin, self._writer):
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
            self._admin = self._writer = None


@contextmanager
def _snapshot(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """One REPEATABLE READ transaction (a single snapshot) on an autocommit connection."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK")


def _stored_row(row: Sequence[Any]) -> StoredRow:
    idx, text, leaf, chain, personal, salt = row
    return StoredRow(idx, text, bytes(leaf), bytes(chain), personal,
                     None if salt is None else bytes(salt))


def _select_nodes(conn: psycopg.Connection[Any], ids: Sequence[merkle.NodeID]) -> list[bytes]:
    if not ids:
        return []
    params = {"levels": [lv for lv, _ in ids], "idxs": [i for _, i in ids]}
    found = dict(conn.execute(_NODES, params).fetchall())
    out: list[bytes] = []
    for position, (level, idx) in enumerate(ids, start=1):  # WITH ORDINALITY counts from 1
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


def grant_appender(url: str, role: str, *, schema: str = "audit") -> None:
    """Give login ``role`` what the gateway needs and nothing more: read every audit table,
    insert into the log tables, record erasures and delete erased personal parts, keep the
    followers' state. Not UPDATE, not DELETE of entries, not TRUNCATE, not DDL: run as the
    owner of the schema (the role that created it)."""
    _check_schema_name(schema)
    s, r = sql.Identifier(schema), sql.Identifier(role)
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r))
        conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(s, r))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r))
        for table in ("audit_entries", "audit_subtrees", "audit_personal", "audit_erasures",
                      "audit_checkpoints"):
            conn.execute(sql.SQL("GRANT INSERT ON {}.{} TO {}").format(
                s, sql.Identifier(table), r))
        conn.execute(sql.SQL("GRANT DELETE ON {}.audit_personal TO {}").format(s, r))
        conn.execute(sql.SQL("GRANT INSERT, UPDATE ON {}.audit_follower_state TO {}"
                             ).format(s, r))


class _SessionLease(Lease):
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn: psycopg.Connection[Any] | None = conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # ends the session and its advisory lock
