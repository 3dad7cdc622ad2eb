"""RFC 6962 Merkle tree over the audit leaves: roots, proofs and their verifiers. Pure, no I/O.

The tree is RFC 6962 §2.1 (RFC 9162 §2.1) with SHA-256::

    MTH({})       = SHA-256("")
    MTH({d0})     = SHA-256(0x00 || d0)                       a leaf hash
    MTH(D[0:n])   = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   k = largest power of 2 < n

The functions here take *leaf hashes* (what the log stores), never entry bytes.

Proofs cost O(log n) hash reads: every hash a proof needs is either a **complete subtree**
(``2**level`` leaves starting at ``index * 2**level``, a :data:`NodeID` ``(level, index)``) or
the hash of a right-edge range, which is folded from at most ``log2 n`` complete subtrees. A
store keeps every complete subtree's hash (:func:`extend` says which ones an append completes),
and :func:`inclusion_plan` / :func:`consistency_plan` say which to read. :class:`MemoryTree`
is the same source held in memory.

Verifiers follow RFC 9162 §2.1.3.2 and §2.1.4.2: they check the shape first (index below size,
proof length equal to the one the sizes imply, 32-byte hashes), compare with
:func:`hmac.compare_digest`, and return ``None`` or raise :class:`AuditIntegrityError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Final, Protocol, runtime_checkable

from gateway.audit.entry import HASH_SIZE, LEAF_PREFIX
from gateway.errors import AuditIntegrityError

__all__ = [
    "EMPTY_ROOT",
    "LEAF_PREFIX",
    "NODE_PREFIX",
    "HashSource",
    "MemoryTree",
    "NodeID",
    "consistency_plan",
    "consistency_proof",
    "consistency_proof_size",
    "extend",
    "frontier_nodes",
    "hash_children",
    "inclusion_plan",
    "inclusion_proof",
    "inclusion_proof_size",
    "inclusion_with_root",
    "range_nodes",
    "root",
    "root_from_frontier",
    "root_from_inclusion_proof",
    "root_from_source",
    "verify_consistency",
    "verify_inclusion",
]

#: RFC 6962 §2.1: interior nodes are hashed with a 0x01 prefix (leaves with 0x00).
NODE_PREFIX: Final = b"\x01"
#: RFC 6962 §2.1: the hash of an empty tree is SHA-256 of the empty string.
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

#: ``(level, index)``: the complete subtree of ``2**level`` leaves from ``index << level``.
NodeID = tuple[int, int]


def hash_children(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


@runtime_checkable
class HashSource(Protocol):
    """Where proofs read complete-subtree hashes from: a store, or :class:`MemoryTree`."""

    def get_nodes(self, ids: Sequence[NodeID]) -> list[bytes]:
        """The hash of each complete subtree in ``ids``, in the same order."""
        ...


class MemoryTree:
    """Every complete subtree of a list of leaf hashes, built once in O(n).

    >>> MemoryTree([bytes(32)] * 3).get_nodes([(1, 0)]) == [hash_children(bytes(32), bytes(32))]
    True
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        _check_hashes(leaves, "leaf")
        self.levels: list[list[bytes]] = [list(leaves)]
        while len(self.levels[-1]) > 1:
            below = self.levels[-1]
            self.levels.append(
                [hash_children(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
            )

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def get_nodes(self, ids: Sequence[NodeID]) -> list[bytes]:
        out = []
        for level, index in ids:
            if level >= len(self.levels) or not 0 <= index < len(self.levels[level]):
                raise KeyError(f"no complete subtree ({level}, {index}) in a tree of {self.size}")
            out.append(self.levels[level][index])
        return out


# -- the shape of the tree ---------------------------------------------------------------------


def range_nodes(start: int, end: int) -> list[NodeID]:
    """The complete subtrees whose right fold is MTH(D[start:end]), left to right.

    Only defined for the ranges RFC 6962 recursion produces: ``start`` a multiple of a power
    of two that is at least ``end - start`` (so ``[0, n)`` and every subtree of it).

    >>> range_nodes(0, 7)
    [(2, 0), (1, 2), (0, 6)]
    """
    width = end - start
    if width <= 0 or start < 0 or start % (1 << (width - 1).bit_length()):
        raise ValueError(f"[{start}, {end}) is not a subtree range")
    nodes = []
    pos = start
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            nodes.append((level, pos >> level))
            pos += 1 << level
    return nodes


def frontier_nodes(size: int) -> list[NodeID]:
    """The complete subtrees covering ``[0, size)``, left to right (the compact range)."""
    return range_nodes(0, size) if size else []


def _fold(hashes: Sequence[bytes]) -> bytes:
    # MTH of a right-edge range from its complete subtrees: fold from the right.
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = hash_children(h, acc)
    return acc


def _split(n: int) -> int:
    # The largest power of two strictly smaller than n (n >= 2): RFC 6962's k.
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_plan(index: int, size: int) -> list[list[NodeID]]:
    """For each hash of the inclusion proof of leaf ``index`` in a tree of ``size``, the
    complete subtrees to fold into it (RFC 6962 §2.1.1 PATH, bottom first)."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} not in a tree of size {size}")
    plan: list[list[NodeID]] = []
    start, end, m = 0, size, index
    while end - start > 1:
        k = _split(end - start)
        if m < k:
            plan.append(range_nodes(start + k, end))
            end = start + k
        else:
            plan.append(range_nodes(start, start + k))
            start, m = start + k, m - k
    plan.reverse()
    return plan


def consistency_plan(first: int, second: int) -> list[list[NodeID]]:
    """For each hash of the consistency proof from ``first`` to ``second`` leaves, the complete
    subtrees to fold into it (RFC 6962 §2.1.2 SUBPROOF, bottom first)."""
    if not 0 <= first <= second:
        raise ValueError(f"no consistency proof from size {first} to {second}")
    if first in (0, second):
        return []
    plan: list[list[NodeID]] = []
    start, end, m, complete = 0, second, first, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            plan.append(range_nodes(start + k, end))
            end = start + k
        else:
            plan.append(range_nodes(start, start + k))
            start, m, complete = start + k, m - k, False
    if not complete:
        plan.append(range_nodes(start, end))
    plan.reverse()
    return plan


def _resolve(plan: list[list[NodeID]], source: HashSource | Sequence[bytes]) -> list[bytes]:
    if not isinstance(source, HashSource):
        source = MemoryTree(source)
    ids = [node for part in plan for node in part]
    hashes = iter(source.get_nodes(ids))
    return [_fold([next(hashes) for _ in part]) for part in plan]


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over ``leaves`` (leaf hashes), in O(n) hashes and O(log n) memory.

    >>> root([]).hex()[:16]
    'e3b0c44298fc1c14'
    """
    _check_hashes(leaves, "leaf")
    frontier, _ = extend(0, [], leaves)
    return root_from_frontier(frontier)


def root_from_frontier(frontier: Sequence[bytes]) -> bytes:
    """MTH of a tree given its frontier (the hashes of :func:`frontier_nodes`, left to right)."""
    return _fold(frontier) if frontier else EMPTY_ROOT


def root_from_source(size: int, source: HashSource | Sequence[bytes]) -> bytes:
    """MTH of the first ``size`` leaves, from at most log2(size) stored subtree hashes."""
    if size < 0:
        raise ValueError(f"size {size} is negative")
    if size == 0:
        return EMPTY_ROOT
    return _resolve([frontier_nodes(size)], source)[0]


def inclusion_proof(index: int, size: int, source: HashSource | Sequence[bytes]) -> list[bytes]:
    """The RFC 6962 inclusion proof of leaf ``index`` in the tree of the first ``size`` leaves.
    ``source`` is a :class:`HashSource` or the leaf hashes themselves."""
    return _resolve(inclusion_plan(index, size), source)


def inclusion_with_root(
    index: int, size: int, source: HashSource | Sequence[bytes]
) -> tuple[bytes, bytes, list[bytes]]:
    """``(leaf hash, root, inclusion proof)`` of leaf ``index`` in the tree of ``size``, read
    from ``source`` in one call (one statement for a store)."""
    plan = [[(0, index)], frontier_nodes(size), *inclusion_plan(index, size)]
    leaf, root_hash, *proof = _resolve(plan, source)
    return leaf, root_hash, proof


def consistency_proof(first: int, second: int, source: HashSource | Sequence[bytes]) -> list[bytes]:
    """The RFC 6962 consistency proof between the trees of ``first`` and ``second`` leaves."""
    return _resolve(consistency_plan(first, second), source)


def extend(
    size: int, frontier: Sequence[bytes], leaves: Sequence[bytes]
) -> tuple[list[bytes], list[tuple[NodeID, bytes]]]:
    """Append ``leaves`` to a tree of ``size`` leaves given by its ``frontier`` (the hashes of
    :func:`frontier_nodes`). Returns the new frontier and every complete subtree of level >= 1
    that the new leaves complete, as ``((level, index), hash)`` in the order completed."""
    if len(frontier) != size.bit_count():
        raise ValueError(f"frontier has {len(frontier)} hashes, want {size.bit_count()}")
    stack = list(frontier)
    completed: list[tuple[NodeID, bytes]] = []
    for leaf in leaves:
        node = leaf
        level = 0
        # Each trailing 1 bit of the size is a complete subtree that merges with the new leaf.
        while size >> level & 1:
            node = hash_children(stack.pop(), node)
            level += 1
            completed.append(((level, size >> level), node))
        stack.append(node)
        size += 1
    return stack, completed


# -- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) -------------------------------------------


def inclusion_proof_size(index: int, size: int) -> int:
    """The number of hashes in the inclusion proof of ``index`` in a tree of ``size``."""
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def consistency_proof_size(first: int, second: int) -> int:
    """The number of hashes in the consistency proof from ``first`` to ``second`` leaves."""
    if first in (0, second):
        return 0
    shift = (first & -first).bit_length() - 1  # trailing zero bits of first
    inner = ((first - 1) ^ (second - 1)).bit_length() - shift
    border = ((first - 1) >> (inner + shift)).bit_count()
    seed = 0 if first == 1 << shift else 1
    return seed + inner + border


def _check_hashes(hashes: Sequence[bytes], what: str) -> None:
    for i, h in enumerate(hashes):
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            got = len(h) if isinstance(h, bytes) else type(h).__name__
            raise ValueError(f"{what} hash {i}: got {got} bytes, want {HASH_SIZE}")


def _check_shape(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise AuditIntegrityError(f"{name}: got {len(value)} bytes, want {HASH_SIZE}")


def _check_proof(proof: Sequence[bytes], want: int, what: str) -> None:
    if len(proof) != want:
        raise AuditIntegrityError(f"{what}: got {len(proof)} hashes, want {want}")
    for i, h in enumerate(proof):
        _check_shape(f"{what}[{i}]", h)


def root_from_inclusion_proof(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]
) -> bytes:
    """The root that ``proof`` implies for ``leaf_hash`` at ``index`` in a tree of ``size``;
    raises :class:`AuditIntegrityError` if the shape is wrong."""
    if index < 0 or size < 0 or index >= size:
        raise AuditIntegrityError(f"inclusion proof: index {index}, want below tree size {size}")
    _check_shape("leaf hash", leaf_hash)
    _check_proof(proof, inclusion_proof_size(index, size), "inclusion proof")
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if fn & 1 or fn == sn:
            r = hash_children(p, r)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = hash_children(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:  # unreachable once the length is checked; kept as RFC 9162 states it
        raise AuditIntegrityError("inclusion proof: too short for the tree size")
    return r


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` with ``root``;
    return ``None`` or raise :class:`AuditIntegrityError`."""
    _check_shape("root", root)
    calculated = root_from_inclusion_proof(leaf_hash, index, size, proof)
    if not hmac.compare_digest(calculated, root):
        raise AuditIntegrityError(
            f"inclusion proof of entry {index} in tree size {size}: root mismatch",
            index=index,
            expected=root.hex(),
            calculated=calculated.hex(),
        )


def verify_consistency(
    first: int, second: int, root_first: bytes, root_second: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``second`` leaves with ``root_second`` extends the tree of
    ``first`` leaves with ``root_first``; return ``None`` or raise
    :class:`AuditIntegrityError`."""
    if first < 0 or second < first:
        raise AuditIntegrityError(
            f"consistency proof: sizes {first} -> {second}, want 0 <= first <= second"
        )
    _check_shape("first root", root_first)
    _check_shape("second root", root_second)
    _check_proof(proof, consistency_proof_size(first, second), "consistency proof")
    if first == second:
        if not hmac.compare_digest(root_first, root_second):
            raise AuditIntegrityError(
                f"consistency: two different roots for tree size {first}",
                expected=root_first.hex(),
                calculated=root_second.hex(),
            )
        return
    if first == 0:
        return  # the empty tree is a prefix of every tree
    # RFC 9162 §2.1.4.2: a power-of-two first tree is itself the first node of the path.
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, root_first)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:  # unreachable once the length is checked
            raise AuditIntegrityError("consistency proof: too long for the tree sizes")
        if fn & 1 or fn == sn:
            fr = hash_children(c, fr)
            sr = hash_children(c, sr)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = hash_children(sr, c)
        fn >>= 1
        sn >>= 1
    ok_first = hmac.compare_digest(fr, root_first)
    ok_second = hmac.compare_digest(sr, root_second)
    if not ok_first:
        raise AuditIntegrityError(
            f"consistency proof {first} -> {second}: first root mismatch",
            expected=root_first.hex(),
            calculated=fr.hex(),
        )
    if not ok_second or sn != 0:
        raise AuditIntegrityError(
            f"consistency proof {first} -> {second}: second root mismatch",
            expected=root_second.hex(),
            calculated=sr.hex(),
        )
