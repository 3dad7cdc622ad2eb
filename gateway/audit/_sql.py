"""What the SQL backends of the audit log share (internal): the statements for the chain head,
checkpoints, follower state and erasure, written once with ``?`` placeholders. A backend
names its placeholder, opens its connections and keeps its own append and scan paths."""

from __future__ import annotations

from abc import abstractmethod
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from gateway.audit.entry import GENESIS, utc_timestamp
from gateway.audit.log import AuditLog, StoredCheckpoint

__all__ = ["SqlAuditLog"]

_STATEMENTS: dict[str, str] = {
    "tail": "SELECT idx, chain_hash FROM audit_entries ORDER BY idx DESC LIMIT 1",
    "last_checkpoint": "SELECT size, root, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
    "store_checkpoint": "INSERT INTO audit_checkpoints (size, root, note) VALUES (?, ?, ?)",
    "read_state": "SELECT data FROM audit_follower_state WHERE name = ?",
    "write_state": "INSERT INTO audit_follower_state (name, data) VALUES (?, ?)"
                   " ON CONFLICT (name) DO UPDATE SET data = excluded.data",
    "erasable": "SELECT idx FROM audit_personal WHERE subject_pseudonym = ? ORDER BY idx",
    "record_erasures": "INSERT INTO audit_erasures (idx, erased_at)"
                       " SELECT idx, ? FROM audit_personal WHERE subject_pseudonym = ?",
    "erase": "DELETE FROM audit_personal WHERE subject_pseudonym = ?",
}


class SqlAuditLog(AuditLog):
    """An :class:`AuditLog` over a DB-API connection whose ``execute`` returns a cursor."""

    #: The driver's parameter marker (``?`` for sqlite3, ``%s`` for psycopg).
    placeholder: ClassVar[str] = "?"
    #: Run first in the transaction that stores a checkpoint, when the backend's transactions
    #: alone do not keep two processes from storing one at the same time.
    checkpoint_lock: ClassVar[str | None] = None
    _sql: ClassVar[dict[str, str]] = _STATEMENTS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._sql = {name: text.replace("?", cls.placeholder) for name, text in _STATEMENTS.items()}

    @abstractmethod
    def _reader(self) -> AbstractContextManager[Any]:
        """A connection for reading; backend errors surface as AuditUnavailable."""

    @abstractmethod
    def _admin_transaction(self) -> AbstractContextManager[Any]:
        """A connection inside one write transaction, committed on success."""

    def _read_tail(self) -> tuple[int, bytes]:
        with self._reader() as conn:
            row = conn.execute(self._sql["tail"]).fetchone()
        return (0, GENESIS) if row is None else (row[0] + 1, bytes(row[1]))

    def _read_checkpoint(self) -> StoredCheckpoint | None:
        with self._reader() as conn:
            row = conn.execute(self._sql["last_checkpoint"]).fetchone()
        return None if row is None else StoredCheckpoint(row[0], bytes(row[1]), row[2])

    def _store_checkpoint(self, checkpoint: StoredCheckpoint) -> StoredCheckpoint:
        with self._admin_transaction() as conn:
            if self.checkpoint_lock is not None:
                conn.execute(self.checkpoint_lock)
            last = conn.execute(self._sql["last_checkpoint"]).fetchone()
            if last is None or last[0] < checkpoint.size:
                conn.execute(self._sql["store_checkpoint"],
                             (checkpoint.size, checkpoint.root, checkpoint.note))
                return checkpoint
        return StoredCheckpoint(last[0], bytes(last[1]), last[2])

    def _read_state(self, name: str) -> bytes | None:
        with self._reader() as conn:
            row = conn.execute(self._sql["read_state"], (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def _write_state(self, name: str, data: bytes) -> None:
        with self._admin_transaction() as conn:
            conn.execute(self._sql["write_state"], (name, data))

    def _erase_personal(self, subject_pseudonym: str) -> list[int]:
        with self._admin_transaction() as conn:
            indexes = [int(r[0]) for r in conn.execute(self._sql["erasable"],
                                                      (subject_pseudonym,))]
            conn.execute(self._sql["record_erasures"], (utc_timestamp(), subject_pseudonym))
            conn.execute(self._sql["erase"], (subject_pseudonym,))
        return indexes


