"""The append-only, hash-chained audit log: the algorithm, once, over a few storage hooks.

:class:`AuditLog` owns sequencing, hashing and verification; a backend (``SqliteAuditLog``,
``PostgresAuditLog``) only fills the ``_``-prefixed hooks. Appending works by group commit:
callers enqueue their entry and wait (a thread blocks in :meth:`AuditLog.append`, a coroutine
awaits :meth:`AuditLog.append_async`), and a single sequencer thread takes up to ``max_batch``
entries at a time, chains them onto the head *read inside the write transaction* (so several
processes sharing one store still build one chain), makes the batch durable in one
transaction and only then answers the callers. Each entry's personal members are stored beside
its leaf, which holds only their salted commitment, so they can be erased
(:meth:`AuditLog.erase_subject`) while every hash still verifies.

The same transaction stores the hash of every complete subtree of the RFC 6962 Merkle tree that
the batch completes (:func:`gateway.audit.merkle.extend`), so roots and proofs read O(log n)
stored hashes (:meth:`AuditLog.root`, :meth:`AuditLog.inclusion_proof`,
:meth:`AuditLog.consistency_proof`) and :meth:`AuditLog.checkpoint` signs the current tree.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Final, NoReturn, Self, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import merkle
from gateway.audit._sequencer import (
    BatchQueue,
    Pending,
    QueueClosedError,
    QueueFullError,
    settle,
)
from gateway.audit.checkpoint import sign_checkpoint
from gateway.audit.entry import (
    GENESIS,
    SALT_SIZE,
    AuditEntry,
    check_personal,
    entry_from_stored,
    leaf_hash,
    split_entry,
    ts_bound,
)
from gateway.errors import AuditIntegrityError, AuditUnavailable, BadRequest, NotFound

__all__ = [
    "AuditLog",
    "Batch",
    "BuildRows",
    "Lease",
    "PersonalPart",
    "ReadNodes",
    "SearchFilter",
    "StoredCheckpoint",
    "StoredRow",
]

_log = logging.getLogger(__name__)

MAX_SEARCH_LIMIT: Final = 1000


@dataclass(frozen=True, slots=True)
class StoredRow:
    """An entry as stored: its index, the leaf's canonical JSON text, leaf hash and chain
    hash, and the separately stored personal part (JSON text; ``None`` if there is none or it
    was erased)."""

    index: int
    entry_json: str
    leaf_hash: bytes
    chain_hash: bytes
    personal_json: str | None = None
    personal_salt: bytes | None = None

    def entry(self) -> AuditEntry:
        """The :class:`AuditEntry`, personal members restored where not erased."""
        return entry_from_stored(self.entry_json, self.personal_json)


@dataclass(frozen=True, slots=True)
class PersonalPart:
    """The erasable part of entry ``index``: its salt and the canonical JSON of its personal
    members (``subject_pseudonym``, ``consent_id``)."""

    index: int
    salt: bytes
    data: str


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
    personal: Sequence[PersonalPart] = ()


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A checkpoint the log signed and stored: tree size, root and the signed note."""

    size: int
    root: bytes
    note: str


#: Reads complete-subtree hashes ``(level, index)``; level 0 is a leaf hash. Raises
#: :class:`AuditIntegrityError` if one is missing.
ReadNodes = Callable[[Sequence[merkle.NodeID]], list[bytes]]

#: Given the store's current (size, chain head) and a reader of stored subtree hashes inside the
#: same transaction, the batch to insert. Called by a backend inside its write transaction.
BuildRows = Callable[[int, bytes, ReadNodes], Batch]


class Lease(ABC):
    """A lease of :meth:`AuditLog.try_lease`, held until released."""

    @abstractmethod
    def release(self) -> None:
        """Give the lease up (idempotent)."""


class AuditLog(ABC):
    """An append-only, tamper-evident log of :class:`AuditEntry`.

    Subclasses prepare their storage and then call ``super().__init__`` last, which starts the
    sequencer thread. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        *,
        max_batch: int = 4096,
        max_delay: float = 0.002,
        max_queue: int = 65536,
        unsafe_salt: Callable[[], bytes] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay >= 0")
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._queue = BatchQueue(max_queue)
        # Salts of personal parts. A chosen salt makes commitments guessable after erasure:
        # only for reproducible test vectors, and it says so every time.
        self._salt = _random_salt
        if unsafe_salt is not None:
            warnings.warn("audit log with chosen (not random) personal-part salts: erased "
                          "pseudonyms can be recovered from the commitments; tests only",
                          stacklevel=3)
            self._salt = unsafe_salt
        # What this process last committed: a store that shrank or changed under it is tampered.
        self._last_written: tuple[int, bytes] | None = None
        # The Merkle frontier after this process's last commit: (size, chain head, hashes).
        self._frontier: tuple[int, bytes, list[bytes]] | None = None
        # The last checkpoint signed (by any process, read from the store) and when this process
        # last signed or read it. Never an inconsistent one, never a smaller one.
        self._checkpoint_lock = threading.Lock()
        # Proofs are short, CPU-bound Python: threads building them at once only trade the
        # GIL back and forth (4 threads served 40 % fewer than one), so they take turns.
        self._proof_lock = threading.Lock()
        self._last_checkpoint: tuple[StoredCheckpoint, float] | None = None
        self._close_lock = threading.Lock()
        self._closed = False
        self._batches = 0
        self._committed = 0
        self._pending_frontier: list[bytes] = []
        self._node_cache: dict[merkle.NodeID, bytes] = {}
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
        """The row at ``index`` with its personal part, or ``None``."""

    @abstractmethod
    def _scan_rows(self, start: int) -> Iterator[StoredRow]:
        """Rows from ``start`` in index order, with their personal parts, all from one
        consistent snapshot."""

    @abstractmethod
    def _search_rows(
        self, where: SearchFilter, limit: int, offset: int
    ) -> list[tuple[int, str, str | None]]:
        """``(index, entry_json, personal_json)`` of matching rows in index order; a subject
        or consent filter matches stored (not erased) personal parts."""

    @abstractmethod
    def _close_storage(self) -> None:
        """Release connections; called once, after the sequencer has stopped."""

    @abstractmethod
    def _read_checkpoint(self) -> StoredCheckpoint | None:
        """The stored checkpoint of the largest tree size, or ``None``."""

    @abstractmethod
    def _store_checkpoint(self, checkpoint: StoredCheckpoint) -> StoredCheckpoint:
        """In one transaction that excludes other writers of checkpoints: store
        ``checkpoint`` durably unless one of that size or larger is stored already; return the
        stored checkpoint of the largest size (the given one, or one stored meanwhile by
        another process), so checkpoints handed out never get smaller."""

    @abstractmethod
    def _read_state(self, name: str) -> bytes | None:
        """The state blob saved under ``name`` (not part of the log), or ``None``."""

    @abstractmethod
    def _write_state(self, name: str, data: bytes) -> None:
        """Save (replace) the state blob ``name`` durably."""

    @abstractmethod
    def _try_lease(self, name: str) -> Lease | None:
        """The lease ``name``, held by at most one process sharing this store (it ends when
        released or when its holder dies), or ``None`` while another process holds it."""

    @abstractmethod
    def _erase_personal(self, subject_pseudonym: str) -> list[int]:
        """In one transaction: record an erasure for, then delete, every stored personal part
        naming ``subject_pseudonym``; the indexes of the entries concerned."""

    @abstractmethod
    def _scan_personal(self) -> Iterator[tuple[int, bytes, bytes, str | None]]:
        """``(index, salt, personal JSON bytes as stored, the leaf's commitment)`` of every
        stored personal part in index order, from one snapshot (for :meth:`verify`)."""

    # -- appending -----------------------------------------------------------------------

    def _pending(self, entry: AuditEntry, future: asyncio.Future[int] | None) -> Pending:
        # Serializing and leaf hashing are per entry, so they happen in the caller and keep the
        # sequencer's (GIL-holding) path short.
        data, personal = split_entry(entry, self._salt() if _names_someone(entry) else None)
        text = data.decode("utf-8")
        part = None if personal is None else (personal[0], personal[1].decode("utf-8"))
        return Pending(text, leaf_hash(data), part, future)

    def _put(self, pending: Pending) -> None:
        try:
            self._queue.put(pending)
        except QueueFullError:
            raise AuditUnavailable("audit queue is full; entry refused, not dropped") from None
        except QueueClosedError:
            raise AuditUnavailable("audit log is closed") from None

    def append(self, entry: AuditEntry) -> int:
        """Append ``entry`` and return its 0-based index once it is durable (blocks the
        calling thread).

        Raises :class:`AuditUnavailable` if the queue is full, the log is closed, or the store
        write failed (its transaction rolled back); the request must then not succeed.
        """
        pending = self._pending(entry, None)
        self._put(pending)
        pending.wait()
        if pending.error is not None:
            raise AuditUnavailable("audit entry could not be made durable") from pending.error
        return pending.index

    async def append_async(self, entry: AuditEntry) -> int:
        """:meth:`append` for a coroutine: the event loop keeps serving while the entry waits
        for its batch, so thousands of requests can wait for durability in one thread. The
        entry is written even if the awaiting task is cancelled (never dropped)."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._put(self._pending(entry, future))
        try:
            return await future
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            raise AuditUnavailable("audit entry could not be made durable") from exc

    def _run(self) -> None:
        try:
            expect = 1
            while (batch := self._queue.take(self._max_batch, self._max_delay, expect)) is not None:
                self._commit(batch)
                expect = len(batch)
        except BaseException as exc:
            # Never leave a caller waiting: refuse new entries and fail the queued ones.
            self._queue.close()
            settle(self._queue.drain(), -1, exc)
            _log.critical("audit sequencer stopped", exc_info=True)
            raise

    def _commit(self, batch: list[Pending]) -> None:
        leaves = [p.leaf for p in batch]
        built: list[Batch] = []

        def build(size: int, head: bytes, read_nodes: ReadNodes) -> Batch:
            self._check_tail(size, head)
            rows: list[StoredRow] = []
            personal: list[PersonalPart] = []
            prev = head
            sha256 = hashlib.sha256
            for index, pending in enumerate(batch, start=size):
                prev = sha256(prev + pending.leaf).digest()  # chain_hash, inlined: hot loop
                rows.append(StoredRow(index, pending.text, pending.leaf, prev))
                if pending.personal is not None:
                    personal.append(PersonalPart(index, *pending.personal))
            cached = self._frontier
            if cached is not None and cached[0] == size and hmac.compare_digest(cached[1], head):
                old = cached[2]
            else:  # first batch, or another process appended since: read it in this transaction
                old = read_nodes(merkle.frontier_nodes(size))
            new, nodes = merkle.extend(size, old, leaves)
            built[:] = [Batch(rows, nodes, personal)]
            self._frontier = None  # set again only once this batch is committed
            self._pending_frontier = new
            return built[0]

        try:
            self._append_rows(build)
        except BaseException as exc:
            self._frontier = None
            settle(batch, -1, exc)
            if not isinstance(exc, Exception):
                raise
            _log.error("audit batch of %d entries not stored", len(batch), exc_info=True)
            return
        last = built[0].rows[-1]
        self._last_written = (last.index + 1, last.chain_hash)
        self._frontier = (last.index + 1, last.chain_hash, self._pending_frontier)
        self._batches += 1
        self._committed += len(batch)
        settle(batch, built[0].rows[0].index, None)

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
        return row.entry()

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
            (index, entry_from_stored(text, personal))
            for index, text, personal in self._search_rows(where, limit, offset)
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

    def inclusion(self, index: int, size: int) -> tuple[bytes, bytes, list[bytes]]:
        """``(leaf hash, root, inclusion proof)`` of entry ``index`` in the tree of the first
        ``size`` entries, in one read: what ``GET /v1/audit/proof/inclusion`` serves."""
        size = self._tree_size("tree_size", size, self.size())
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise BadRequest(f"index {index!r}, want 0 <= index < tree_size {size}")
        with self._proof_lock:
            return merkle.inclusion_with_root(index, size, _StoreNodes(self))

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The RFC 6962 consistency proof (32-byte hashes) that the tree of ``second`` entries
        extends the tree of ``first`` entries."""
        second = self._tree_size("second", second, self.size())
        first = self._tree_size("first", first, second)
        with self._proof_lock:
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

        Before signing, the new tree is proved consistent with the last checkpoint stored in
        the log (signed by this process, an earlier run or another process sharing the
        store); a store that shrank or whose hashes changed raises
        :class:`AuditIntegrityError` and nothing is signed, so two inconsistent checkpoints are
        never issued, not even across restarts. Every new checkpoint is stored durably before
        it is returned. If the last checkpoint is for the current size, or this process read or
        signed it less than ``max_age`` seconds ago, it is returned again.
        """
        with self._checkpoint_lock:
            now = time.monotonic()
            cached = self._last_checkpoint
            if cached is not None and now - cached[1] < max_age:
                return cached[0].note
            last = self._read_checkpoint()
            size = self.size()
            if last is not None and last.size == size:
                self._last_checkpoint = (last, now)
                return last.note
            # Straight from the store, not the proof cache: what is signed is what is stored.
            source = _StoreNodes(self, cached=False)
            root = merkle.root_from_source(size, source)
            if last is not None:
                if size < last.size:
                    raise AuditIntegrityError(
                        f"audit store shrank: {size} entries, the last checkpoint has {last.size}",
                        index=size,
                    )
                proof = merkle.consistency_proof(last.size, size, source)
                merkle.verify_consistency(last.size, size, last.root, root, proof)
            note = sign_checkpoint(origin, size, root, key, key_name)
            stored = self._store_checkpoint(StoredCheckpoint(size, root, note))
            if stored.size == size and not hmac.compare_digest(stored.root, root):
                raise AuditIntegrityError(
                    f"two different roots stored for tree size {size}: a fork",
                    expected=stored.root.hex(),
                    calculated=root.hex(),
                )
            self._last_checkpoint = (stored, now)
            return stored.note

    def last_checkpoint(self) -> StoredCheckpoint | None:
        """The stored checkpoint of the largest tree size (``None`` before the first)."""
        return self._read_checkpoint()

    def load_state(self, name: str) -> bytes | None:
        """State derived from the log that a follower saved (e.g. the alert engine's), kept in
        the same store so it moves with the log; ``None`` if none was saved. It is not part of
        the log: it can be rebuilt by replaying the entries."""
        return self._read_state(name)

    def save_state(self, name: str, data: bytes) -> None:
        """Save derived state under ``name`` (see :meth:`load_state`)."""
        self._write_state(name, data)

    def try_lease(self, name: str) -> Lease | None:
        """One follower of the log for all the processes sharing it (e.g. the alert monitor
        of ``gateway serve --workers N``): the lease ``name`` if no other process holds it,
        else ``None``. Release it with :meth:`Lease.release`; a holder that dies releases it.
        """
        return self._try_lease(name)

    # -- personal data -------------------------------------------------------------------

    def erase_subject(self, subject_pseudonym: str) -> list[int]:
        """Erase the personal parts naming ``subject_pseudonym`` (the leaves keep only their
        commitments, so the tree, proofs and bundles still verify); the indexes concerned.
        The caller audits the erasure (``gateway audit erase`` does)."""
        if not subject_pseudonym:
            raise BadRequest("subject pseudonym must not be empty")
        return self._erase_personal(subject_pseudonym)

    # -- verification --------------------------------------------------------------------

    def verify(self) -> int:
        """Recompute every leaf, the chain and every stored Merkle subtree hash from the store;
        return the verified size or raise :class:`AuditIntegrityError` naming the first entry
        (or subtree) that does not match.

        One streaming pass over one snapshot: the rows in index order, and beside them the
        stored subtree hashes of each level in index order. Each subtree completed by a leaf is
        recomputed on a stack (the Merkle frontier) and compared with the next stored hash of its
        level, so every stored subtree is checked, and one that should not exist is refused.
        Then every stored personal part must open its leaf's commitment."""
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
        for index, salt, data, commitment in self._scan_personal():
            if index >= expected:
                break  # appended after the snapshot above; checked by the next verify
            if len(salt) != SALT_SIZE or not check_personal(
                commitment, salt, data
            ):
                raise AuditIntegrityError(
                    f"entry {index}: stored personal part does not open the leaf's commitment",
                    index=index,
                )
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


def _names_someone(entry: AuditEntry) -> bool:
    return entry.subject_pseudonym is not None or entry.consent_id is not None


def _random_salt() -> bytes:
    return os.urandom(SALT_SIZE)


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


#: Stored subtree hashes kept in memory for proofs: levels >= 2 only (a quarter of the nodes,
#: and the ones every proof shares), at most this many.
_NODE_CACHE_MIN_LEVEL: Final = 2
_NODE_CACHE_SIZE: Final = 1 << 18


class _StoreNodes:
    """The log's stored subtree hashes as a :class:`merkle.HashSource`, through the log's
    cache. A complete subtree's hash never changes once stored, so it can be kept; proofs
    then read only the few low-level hashes they need, in one statement. (:meth:`verify`
    reads the store itself, never this cache.)"""

    __slots__ = ("_cached", "_log")

    def __init__(self, log: AuditLog, *, cached: bool = True) -> None:
        self._log = log
        self._cached = cached

    def get_nodes(self, ids: Sequence[merkle.NodeID]) -> list[bytes]:
        if not self._cached:
            return self._log._read_nodes(ids)
        cache = self._log._node_cache
        hashes = [cache.get(i) for i in ids]  # get(): another thread may clear the cache
        missing = [i for i, h in zip(ids, hashes, strict=True) if h is None]
        if not missing:
            return cast(list[bytes], hashes)
        # A level-1 subtree is hashed from its two leaves: then a proof's uncached hashes are
        # all leaves, read by primary key in one statement.
        wanted: list[merkle.NodeID] = []
        for level, idx in missing:
            if level == 1:
                wanted += [(0, 2 * idx), (0, 2 * idx + 1)]
            else:
                wanted.append((level, idx))
        unique = list(dict.fromkeys(wanted))
        read = dict(zip(unique, self._log._read_nodes(unique), strict=True))
        found: dict[merkle.NodeID, bytes] = {}
        for level, idx in missing:
            if level == 1:
                found[(1, idx)] = merkle.hash_children(read[(0, 2 * idx)], read[(0, 2 * idx + 1)])
            else:
                found[(level, idx)] = read[(level, idx)]
        if len(cache) + len(found) > _NODE_CACHE_SIZE:
            cache.clear()  # rare and cheap to refill: simpler than an LRU on a hot path
        for node, value in found.items():
            if node[0] >= _NODE_CACHE_MIN_LEVEL:
                cache[node] = value
        return [h if h is not None else found[i] for i, h in zip(ids, hashes, strict=True)]


def _ts_bound(name: str, value: str | datetime | None) -> str | None:
    try:
        return ts_bound(name, value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
