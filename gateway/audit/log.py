"""The append-only, hash-chained audit log: the algorithm, once, over a few storage hooks.

:class:`AuditLog` owns sequencing, hashing and verification; a backend (``SqliteAuditLog``
now, PostgreSQL later) only fills the ``_``-prefixed hooks. Appending works by group commit:
callers from any thread enqueue their entry and block, and a single sequencer thread takes up
to ``max_batch`` entries at a time, chains them onto the head *read inside the write
transaction* (so several processes sharing one store still build one chain), makes the batch
durable in one transaction and only then wakes the callers.

The same transaction stores the hash of every complete subtree of the RFC 6962 Merkle tree that
the batch completes (:func:`gateway.audit.merkle.extend`), so roots and proofs read O(log n)
stored hashes (:meth:`AuditLog.root`, :meth:`AuditLog.inclusion_proof`,
:meth:`AuditLog.consistency_proof`) and :meth:`AuditLog.checkpoint` signs the current tree.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Final, NoReturn, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import merkle
from gateway.audit._sequencer import BatchQueue, Pending, QueueClosedError, QueueFullError
from gateway.audit.checkpoint import sign_checkpoint
from gateway.audit.entry import (
    GENESIS,
    AuditEntry,
    chain_hash,
    entry_bytes,
    leaf_hash,
    ts_bound,
)
from gateway.errors import AuditIntegrityError, AuditUnavailable, BadRequest, NotFound

__all__ = ["AuditLog", "Batch", "BuildRows", "ReadNodes", "SearchFilter", "StoredRow"]

_log = logging.getLogger(__name__)

MAX_SEARCH_LIMIT: Final = 1000


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


@dataclass(frozen=True, slots=True)
class Batch:
    """What one write transaction inserts: the rows, and the hashes of the complete Merkle
    subtrees of level >= 1 that those rows complete, as ``((level, index), hash)``."""

    rows: Sequence[StoredRow]
    nodes: Sequence[tuple[merkle.NodeID, bytes]]


#: Reads complete-subtree hashes ``(level, index)``; level 0 is a leaf hash. Raises
#: :class:`AuditIntegrityError` if one is missing.
ReadNodes = Callable[[Sequence[merkle.NodeID]], list[bytes]]

#: Given the store's current (size, chain head) and a reader of stored subtree hashes inside the
#: same transaction, the batch to insert. Called by a backend inside its write transaction.
BuildRows = Callable[[int, bytes, ReadNodes], Batch]


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
        # The Merkle frontier after this process's last commit: (size, chain head, hashes).
        self._frontier: tuple[int, bytes, list[bytes]] | None = None
        # The last checkpoint signed: (size, root, note, monotonic time). Never an inconsistent one.
        self._checkpoint_lock = threading.Lock()
        self._last_checkpoint: tuple[int, bytes, str, float] | None = None
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
        current size and chain head, call ``build(size, head, read_nodes)`` with a reader of
        subtree hashes in that transaction, insert the rows and subtree hashes of the
        :class:`Batch` it returns and commit durably. On any failure roll back completely and
        re-raise."""

    @abstractmethod
    def _read_nodes(self, ids: Sequence[merkle.NodeID]) -> list[bytes]:
        """The stored hash of each complete subtree ``(level, index)`` in ``ids``, in order, all
        from one snapshot; level 0 is the leaf hash of entry ``index``. Raises
        :class:`AuditIntegrityError` naming the first one missing."""

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
        frontier: list[bytes] = []

        def build(size: int, head: bytes, read_nodes: ReadNodes) -> Batch:
            self._check_tail(size, head)
            built.clear()
            prev = head
            for offset, pending in enumerate(batch):
                prev = chain_hash(prev, pending.leaf)
                built.append(StoredRow(size + offset, pending.text, pending.leaf, prev))
            cached = self._frontier
            if cached is not None and cached[0] == size and hmac.compare_digest(cached[1], head):
                old = cached[2]
            else:  # first batch, or another process appended since: read it in this transaction
                old = read_nodes(merkle.frontier_nodes(size))
            new, nodes = merkle.extend(size, old, [p.leaf for p in batch])
            frontier[:] = new
            return Batch(built, nodes)

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
        self._frontier = (last.index + 1, last.chain_hash, frontier)
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

    # -- the Merkle tree -----------------------------------------------------------------

    def _tree_size(self, name: str, size: int | None, current: int) -> int:
        if size is None:
            return current
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"{name} must be a non-negative integer, got {size!r}")
        if size > current:
            raise BadRequest(f"{name} {size}, want at most the current tree size {current}")
        return size

    def root(self, size: int | None = None) -> bytes:
        """The RFC 6962 root of the first ``size`` entries (all of them by default), from at
        most log2(size) stored subtree hashes. ``BadRequest`` if ``size`` exceeds the log."""
        size = self._tree_size("tree_size", size, self.size())
        return merkle.root_from_source(size, _StoreNodes(self))

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """The RFC 6962 inclusion proof (32-byte hashes, bottom first) of entry ``index`` in the
        tree of the first ``size`` entries: O(log n) stored hashes, read in one snapshot."""
        size = self._tree_size("tree_size", size, self.size())
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise BadRequest(f"index {index!r}, want 0 <= index < tree_size {size}")
        return merkle.inclusion_proof(index, size, _StoreNodes(self))

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The RFC 6962 consistency proof (32-byte hashes) that the tree of ``second`` entries
        extends the tree of ``first`` entries."""
        second = self._tree_size("second", second, self.size())
        first = self._tree_size("first", first, second)
        return merkle.consistency_proof(first, second, _StoreNodes(self))

    def leaf_hash(self, index: int) -> bytes:
        """The stored leaf hash of entry ``index``; :class:`NotFound` if there is none."""
        row = self._read_row(index) if index >= 0 else None
        if row is None:
            raise NotFound(f"no audit entry {index}")
        return row.leaf_hash

    def checkpoint(
        self,
        key: Ed25519PrivateKey,
        *,
        origin: str,
        key_name: str | None = None,
        max_age: float = 0.0,
    ) -> str:
        """A signed C2SP checkpoint (a signed note, as text) of the current tree.

        Before signing, the new tree is proved consistent with the last checkpoint this log
        signed (from the stored hashes); a store that shrank or whose hashes changed raises
        :class:`AuditIntegrityError` and nothing is signed, so two inconsistent checkpoints are
        never issued. If the last checkpoint is for the current size, or younger than
        ``max_age`` seconds, it is returned again instead of signing a new one.
        """
        with self._checkpoint_lock:
            size = self.size()
            last = self._last_checkpoint
            now = time.monotonic()
            if last is not None and (last[0] == size or now - last[3] < max_age):
                return last[2]
            source = _StoreNodes(self)
            root = merkle.root_from_source(size, source)
            if last is not None:
                last_size, last_root = last[0], last[1]
                if size < last_size:
                    raise AuditIntegrityError(
                        f"audit store shrank: {size} entries, the last checkpoint has {last_size}",
                        index=size,
                    )
                proof = merkle.consistency_proof(last_size, size, source)
                merkle.verify_consistency(last_size, size, last_root, root, proof)
            note = sign_checkpoint(origin, size, root, key, key_name)
            self._last_checkpoint = (size, root, note, now)
            return note

    # -- verification --------------------------------------------------------------------

    def verify(self) -> int:
        """Recompute every leaf, the chain and every stored Merkle subtree hash from the store;
        return the verified size or raise :class:`AuditIntegrityError` naming the first entry
        (or subtree) that does not match.

        One streaming pass over one snapshot: the rows in index order, and beside them the
        stored subtree hashes of each level in index order. Each subtree completed by a leaf is
        recomputed on a stack (the Merkle frontier) and compared with the next stored hash of its
        level, so every stored subtree is checked, and one that should not exist is refused."""
        sha256 = hashlib.sha256
        compare = hmac.compare_digest
        leaf_prefix = merkle.LEAF_PREFIX
        node_prefix = merkle.NODE_PREFIX
        prev = GENESIS
        expected = 0
        stack: list[bytes] = []
        with self._verify_scan() as (rows, stored_level, stored_above):
            levels: list[Iterator[tuple[int, bytes]]] = []
            for index, data, stored_leaf, stored_chain in rows:
                if index != expected:
                    raise AuditIntegrityError(
                        f"entry {expected}: missing, next stored index is {index}",
                        index=expected,
                    )
                leaf = sha256(leaf_prefix + data).digest()
                if not compare(leaf, stored_leaf):
                    raise AuditIntegrityError(
                        f"entry {expected}: leaf hash mismatch (entry changed)",
                        index=expected,
                        expected=bytes(stored_leaf).hex(),
                        calculated=leaf.hex(),
                    )
                prev = sha256(prev + leaf).digest()
                if not compare(prev, stored_chain):
                    raise AuditIntegrityError(
                        f"entry {expected}: chain hash mismatch",
                        index=expected,
                        expected=bytes(stored_chain).hex(),
                        calculated=prev.hex(),
                    )
                # Each trailing 1 bit of the size is a complete subtree that merges with the leaf.
                node = leaf
                level = 0
                n = expected
                while n & 1:
                    node = sha256(node_prefix + stack.pop() + node).digest()
                    n >>= 1
                    if level == len(levels):
                        levels.append(stored_level(level + 1))
                    got = next(levels[level], None)
                    level += 1
                    if got is None or got[0] != n or not compare(node, got[1]):
                        _subtree_error(level, n, node, got)
                stack.append(node)
                expected += 1
            # Stored subtrees that no entry completes: more of a level, or a higher level.
            for level, rest in enumerate(levels, start=1):
                extra = next(rest, None)
                if extra is not None:
                    _subtree_error(level, extra[0], None, extra)
            above = stored_above(len(levels))
            if above is not None:
                _subtree_error(above[0], above[1], None, (above[1], b""))
        return expected

    @abstractmethod
    def _verify_scan(
        self,
    ) -> AbstractContextManager[
        tuple[
            Iterator[tuple[int, bytes, bytes, bytes]],
            Callable[[int], Iterator[tuple[int, bytes]]],
            Callable[[int], tuple[int, int] | None],
        ]
    ]:
        """For :meth:`verify`, from one consistent snapshot: the rows ``(index, entry bytes as
        stored, leaf hash, chain hash)`` in index order; a function giving the stored subtrees
        ``(index, hash)`` of one level (>= 1) in index order; and one giving the first stored
        subtree ``(level, index)`` above a level, or ``None``."""


def _subtree_error(
    level: int, index: int, calculated: bytes | None, got: tuple[int, bytes] | None
) -> NoReturn:
    if (got is not None and got[0] < index) or calculated is None:
        # A stored subtree that no entry completed (or one out of order).
        index = got[0] if got is not None else index
        first = index << level
        raise AuditIntegrityError(
            f"subtree ({level}, {index}) over entries {first}..{first + (1 << level) - 1}:"
            " stored but not part of the log",
            index=first,
        )
    first = index << level
    span = f"subtree ({level}, {index}) over entries {first}..{first + (1 << level) - 1}"
    if got is None or got[0] != index:
        raise AuditIntegrityError(f"{span}: missing from the store", index=first)
    raise AuditIntegrityError(
        f"{span}: stored hash mismatch",
        index=first,
        expected=bytes(got[1]).hex(),
        calculated=calculated.hex(),
    )


class _StoreNodes:
    """The log's stored subtree hashes as a :class:`merkle.HashSource`."""

    __slots__ = ("_log",)

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    def get_nodes(self, ids: Sequence[merkle.NodeID]) -> list[bytes]:
        return self._log._read_nodes(ids)


def _ts_bound(name: str, value: str | datetime | None) -> str | None:
    try:
        return ts_bound(name, value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
