"""The append-only, hash-chained audit log: the algorithm, once, over a few storage hooks.

:class:`AuditLog` owns sequencing, hashing and verification; a backend (``SqliteAuditLog``
now, PostgreSQL later) only fills the ``_``-prefixed hooks. Appending works by group commit:
callers from any thread enqueue their entry and block, and a single sequencer thread takes up
to ``max_batch`` entries at a time, chains them onto the head *read inside the write
transaction* (so several processes sharing one store still build one chain), makes the batch
durable in one transaction and only then wakes the callers.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Final, Self

from gateway.audit._sequencer import BatchQueue, Pending, QueueClosedError, QueueFullError
from gateway.audit.entry import (
    GENESIS,
    AuditEntry,
    chain_hash,
    entry_bytes,
    leaf_hash,
    utc_timestamp,
)
from gateway.errors import AuditIntegrityError, AuditUnavailable, BadRequest, NotFound

__all__ = ["AuditLog", "BuildRows", "SearchFilter", "StoredRow"]

_log = logging.getLogger(__name__)

MAX_SEARCH_LIMIT: Final = 1000
_DATE_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, slots=True)
class StoredRow:
    """An entry as stored: its index, canonical JSON text, leaf hash and chain hash."""

    index: int
    entry_json: str
    leaf_hash: bytes
    chain_hash: bytes


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """Equality filters (``None`` means any) and a ``[since, until)`` range on ``ts``."""

    actor: str | None = None
    org: str | None = None
    purpose: str | None = None
    action: str | None = None
    decision: str | None = None
    subject_pseudonym: str | None = None
    consent_id: str | None = None
    since: str | None = None
    until: str | None = None


#: Given the store's current (size, chain head), the rows to insert. Called by a backend inside
#: its write transaction.
BuildRows = Callable[[int, bytes], Sequence[StoredRow]]


class AuditLog(ABC):
    """An append-only, tamper-evident log of :class:`AuditEntry`.

    Subclasses prepare their storage and then call ``super().__init__`` last, which starts the
    sequencer thread. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self, *, max_batch: int = 512, max_delay: float = 0.002, max_queue: int = 65536
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay >= 0")
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._queue = BatchQueue(max_queue)
        # What this process last committed: a store that shrank or changed under it is tampered.
        self._last_written: tuple[int, bytes] | None = None
        self._close_lock = threading.Lock()
        self._closed = False
        self._batches = 0
        self._committed = 0
        self._thread = threading.Thread(target=self._run, name="audit-sequencer", daemon=True)
        self._thread.start()

    # -- storage hooks -------------------------------------------------------------------

    @abstractmethod
    def _append_rows(self, build: BuildRows) -> None:
        """In one write transaction that excludes every other writer of the store: read the
        current size and chain head, call ``build(size, head)``, insert the rows it returns and
        commit durably. On any failure roll back completely and re-raise."""

    @abstractmethod
    def _read_tail(self) -> tuple[int, bytes]:
        """The stored size and chain hash of the last entry (GENESIS when empty)."""

    @abstractmethod
    def _read_row(self, index: int) -> StoredRow | None:
        """The row at ``index``, or ``None``."""

    @abstractmethod
    def _scan_rows(self, start: int) -> Iterator[StoredRow]:
        """Rows from ``start`` in index order, all from one consistent snapshot."""

    @abstractmethod
    def _search_rows(self, where: SearchFilter, limit: int, offset: int) -> list[tuple[int, str]]:
        """``(index, entry_json)`` of matching rows in index order."""

    @abstractmethod
    def _close_storage(self) -> None:
        """Release connections; called once, after the sequencer has stopped."""

    # -- appending -----------------------------------------------------------------------

    def append(self, entry: AuditEntry) -> int:
        """Append ``entry`` and return its 0-based index once it is durable.

        Raises :class:`AuditUnavailable` if the queue is full, the log is closed, or the store
        write failed (its transaction rolled back); the request must then not succeed.
        """
        data = entry_bytes(entry)
        # Leaf hashing is per entry, so it is done here and keeps the sequencer's path short.
        pending = Pending(data.decode("utf-8"), leaf_hash(data))
        try:
            self._queue.put(pending)
        except QueueFullError:
            raise AuditUnavailable("audit queue is full; entry refused, not dropped") from None
        except QueueClosedError:
            raise AuditUnavailable("audit log is closed") from None
        pending.wait()
        if pending.error is not None:
            raise AuditUnavailable("audit entry could not be made durable") from pending.error
        return pending.index

    def _run(self) -> None:
        try:
            expect = 1
            while (batch := self._queue.take(self._max_batch, self._max_delay, expect)) is not None:
                self._commit(batch)
                expect = len(batch)
        except BaseException as exc:
            # Never leave a caller blocked: refuse new entries and fail the queued ones.
            self._queue.close()
            for pending in self._queue.drain():
                pending.fail(exc)
            _log.critical("audit sequencer stopped", exc_info=True)
            raise

    def _commit(self, batch: list[Pending]) -> None:
        built: list[StoredRow] = []

        def build(size: int, head: bytes) -> list[StoredRow]:
            self._check_tail(size, head)
            built.clear()
            prev = head
            for offset, pending in enumerate(batch):
                prev = chain_hash(prev, pending.leaf)
                built.append(StoredRow(size + offset, pending.text, pending.leaf, prev))
            return built

        try:
            self._append_rows(build)
        except BaseException as exc:
            for pending in batch:
                pending.fail(exc)
            if not isinstance(exc, Exception):
                raise
            _log.error("audit batch of %d entries not stored", len(batch), exc_info=True)
            return
        last = built[-1]
        self._last_written = (last.index + 1, last.chain_hash)
        self._batches += 1
        self._committed += len(batch)
        for pending, row in zip(batch, built, strict=True):
            pending.resolve(row.index)

    def _check_tail(self, size: int, head: bytes) -> None:
        if self._last_written is None:
            return
        last_size, last_head = self._last_written
        if size < last_size:
            raise AuditIntegrityError(
                f"audit store shrank: it holds {size} entries, this process wrote {last_size}",
                index=size,
            )
        if size == last_size and not hmac.compare_digest(head, last_head):
            raise AuditIntegrityError(
                f"chain head of entry {size - 1} changed since this process wrote it",
                index=size - 1,
                expected=last_head.hex(),
                calculated=head.hex(),
            )

    def close(self) -> None:
        """Stop taking entries, make the queued ones durable, stop the thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.close()
        self._thread.join()
        self._close_storage()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """Entries and batches committed by this process, and entries queued now (metrics)."""
        return {"entries": self._committed, "batches": self._batches, "queued": len(self._queue)}

    # -- reading -------------------------------------------------------------------------

    def size(self) -> int:
        """Number of entries in the store (all processes)."""
        return self._read_tail()[0]

    def head(self) -> tuple[int, bytes]:
        """``(size, chain hash of the last entry)``; ``(0, GENESIS)`` when empty."""
        return self._read_tail()

    def get(self, index: int) -> AuditEntry:
        """The entry at ``index``; :class:`NotFound` if there is none."""
        row = self._read_row(index) if index >= 0 else None
        if row is None:
            raise NotFound(f"no audit entry {index}")
        return AuditEntry.model_validate_json(row.entry_json)

    def iter_rows(self, start: int = 0) -> Iterator[StoredRow]:
        """Stored rows from ``start`` in index order, from one consistent snapshot."""
        return self._scan_rows(start)

    def search(
        self,
        *,
        actor: str | None = None,
        org: str | None = None,
        purpose: str | None = None,
        action: str | None = None,
        decision: str | None = None,
        subject_pseudonym: str | None = None,
        consent_id: str | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[tuple[int, AuditEntry]]:
        """Entries matching every given filter, in log order. ``since`` is inclusive and
        ``until`` exclusive; each is an aware datetime, an RFC 3339 timestamp with a zone, or
        a ``YYYY-MM-DD`` date (its midnight UTC)."""
        if not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_SEARCH_LIMIT}, got {limit}")
        if offset < 0:
            raise BadRequest(f"offset must be >= 0, got {offset}")
        where = SearchFilter(
            actor=actor,
            org=org,
            purpose=purpose,
            action=action,
            decision=decision,
            subject_pseudonym=subject_pseudonym,
            consent_id=consent_id,
            since=_ts_bound("since", since),
            until=_ts_bound("until", until),
        )
        return [
            (index, AuditEntry.model_validate_json(text))
            for index, text in self._search_rows(where, limit, offset)
        ]

    # -- verification --------------------------------------------------------------------

    def verify(self) -> int:
        """Recompute every leaf and the chain from the store; return the verified size or
        raise :class:`AuditIntegrityError` naming the first entry that does not match."""
        prev = GENESIS
        expected = 0
        compare = hmac.compare_digest
        for row in self._scan_rows(0):
            if row.index != expected:
                raise AuditIntegrityError(
                    f"entry {expected}: missing, next stored index is {row.index}",
                    index=expected,
                )
            leaf = leaf_hash(row.entry_json.encode("utf-8"))
            if not compare(leaf, row.leaf_hash):
                raise AuditIntegrityError(
                    f"entry {expected}: leaf hash mismatch (entry changed)",
                    index=expected,
                    expected=row.leaf_hash.hex(),
                    calculated=leaf.hex(),
                )
            prev = chain_hash(prev, leaf)
            if not compare(prev, row.chain_hash):
                raise AuditIntegrityError(
                    f"entry {expected}: chain hash mismatch",
                    index=expected,
                    expected=row.chain_hash.hex(),
                    calculated=prev.hex(),
                )
            expected += 1
        return expected


def _ts_bound(name: str, value: str | datetime | None) -> str | None:
    # Entry timestamps are fixed-width UTC, so a bound in the same form compares correctly as a
    # string; a bare date compares as its midnight.
    if value is None or (isinstance(value, str) and _DATE_RE.fullmatch(value)):
        return value
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(f"{name} must be YYYY-MM-DD or an RFC 3339 timestamp") from None
    if value.tzinfo is None:
        raise BadRequest(f"{name} must carry a time zone (e.g. Z or +08:00)")
    return utc_timestamp(value)
