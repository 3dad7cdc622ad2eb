"""Tests of the RFC 6962 Merkle tree (``gateway.audit.merkle``).

Three sources of truth: the published transparency-dev/merkle known answers in
``tests/vectors/merkle/``, tampered copies of them (each names the error it must raise), and a
slow reference implementation below that transcribes RFC 6962 §2.1 literally (MTH, PATH,
PROOF/SUBPROOF) and is checked against the fast code for every tree size up to 300.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import merkle
from gateway.audit.entry import leaf_hash
from gateway.errors import AuditIntegrityError

VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors" / "merkle"
_KNOWN = ("rfc6962-tree.json", "inclusion-proofs.json", "consistency-proofs.json")


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTOR_DIR / name).read_text(encoding="utf-8"))
    return data


def _h(values: list[str]) -> list[bytes]:
    return [bytes.fromhex(v) for v in values]


# -- the reference: RFC 6962 §2.1, literally -------------------------------------------------


def ref_leaf(d: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + d).digest()


def ref_k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaf_hashes: tuple[bytes, ...]) -> bytes:
    n = len(leaf_hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hashes[0]
    k = ref_k(n)
    return hashlib.sha256(b"\x01" + ref_mth(leaf_hashes[:k]) + ref_mth(leaf_hashes[k:])).digest()


def ref_path(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = ref_k(n)
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: tuple[bytes, ...], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = ref_k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    return [] if m in (0, len(d)) else ref_subproof(m, d, True)


# The reference recursion is slow; memoising MTH by the tuple of leaves keeps the sweep fast
# without changing what is computed.
ref_mth = cache(ref_mth)

LEAVES = tuple(leaf_hash(i.to_bytes(4, "big")) for i in range(300))


# -- known answers ---------------------------------------------------------------------------


def test_vector_files_cite_their_source() -> None:
    for name in _KNOWN:
        assert "transparency-dev/merkle" in _load(name)["description"]


def test_prefixes_and_empty_root() -> None:
    assert merkle.LEAF_PREFIX == b"\x00"
    assert merkle.NODE_PREFIX == b"\x01"
    assert hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT
    assert merkle.root([]).hex() == _load("rfc6962-tree.json")["roots"][0]


def test_published_roots_and_subtrees() -> None:
    tree = _load("rfc6962-tree.json")
    leaves = [leaf_hash(bytes.fromhex(x)) for x in tree["leaves"]]
    assert [h.hex() for h in leaves] == tree["node_hashes"][0]
    for size, want in enumerate(tree["roots"]):
        assert merkle.root(leaves[:size]).hex() == want
        assert merkle.root_from_source(size, leaves[:size]).hex() == want
        assert ref_mth(tuple(leaves[:size])).hex() == want
    memory = merkle.MemoryTree(leaves)
    for level, hashes in enumerate(tree["node_hashes"]):
        ids = [(level, i) for i in range(len(hashes))]
        assert [h.hex() for h in memory.get_nodes(ids)] == hashes
    assert tree["roots"][8] == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


def test_published_inclusion_proofs() -> None:
    tree = _load("rfc6962-tree.json")
    leaves = [leaf_hash(bytes.fromhex(x)) for x in tree["leaves"]]
    for case in _load("inclusion-proofs.json")["proofs"]:
        index, size, want = case["index"], case["size"], _h(case["proof"])
        assert merkle.inclusion_proof(index, size, leaves[:size]) == want
        assert ref_path(index, tuple(leaves[:size])) == want
        root = bytes.fromhex(tree["roots"][size])
        merkle.verify_inclusion(leaves[index], index, size, want, root)


def test_published_consistency_proofs() -> None:
    tree = _load("rfc6962-tree.json")
    leaves = [leaf_hash(bytes.fromhex(x)) for x in tree["leaves"]]
    roots = _h(tree["roots"])
    for case in _load("consistency-proofs.json")["proofs"]:
        first, second, want = case["first"], case["second"], _h(case["proof"])
        assert merkle.consistency_proof(first, second, leaves[:second]) == want
        assert ref_proof(first, tuple(leaves[:second])) == want
        merkle.verify_consistency(first, second, roots[first], roots[second], want)


def _verify_case(case: dict[str, Any]) -> None:
    if case["kind"] == "inclusion":
        merkle.verify_inclusion(
            bytes.fromhex(case["leaf_hash"]),
            case["index"],
            case["size"],
            _h(case["proof"]),
            bytes.fromhex(case["root"]),
        )
    else:
        merkle.verify_consistency(
            case["first"],
            case["second"],
            bytes.fromhex(case["root_first"]),
            bytes.fromhex(case["root_second"]),
            _h(case["proof"]),
        )


def _tampered() -> list[Path]:
    return sorted(p for p in VECTOR_DIR.glob("*.json") if p.name not in _KNOWN)


def test_tampered_vectors_exist() -> None:
    names = {p.stem for p in _tampered()}
    assert {"truncated-inclusion-proof", "forked-second-root", "swapped-roots-consistency"} <= names


@pytest.mark.parametrize("vector", _tampered(), ids=lambda p: p.stem)
def test_tampered_vector_is_refused(vector: Path) -> None:
    case = json.loads(vector.read_text(encoding="utf-8"))
    with pytest.raises(AuditIntegrityError) as info:
        _verify_case(case)
    assert case["expected_error"] in info.value.message


# -- the fast code against the reference, every size up to 300 ------------------------------


def test_roots_match_reference_for_every_size() -> None:
    memory = merkle.MemoryTree(LEAVES)
    for size in range(301):
        want = ref_mth(LEAVES[:size])
        assert merkle.root(LEAVES[:size]) == want
        assert merkle.root_from_source(size, memory) == want


def test_inclusion_proofs_match_reference_for_every_size_and_index() -> None:
    memory = merkle.MemoryTree(LEAVES)
    for size in range(1, 301):
        root = ref_mth(LEAVES[:size])
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, memory)
            assert proof == ref_path(index, LEAVES[:size]), (index, size)
            assert len(proof) == merkle.inclusion_proof_size(index, size)
            merkle.verify_inclusion(LEAVES[index], index, size, proof, root)


def test_consistency_proofs_match_reference() -> None:
    memory = merkle.MemoryTree(LEAVES)
    pairs = [(m, n) for n in range(65) for m in range(n + 1)]
    rng = random.Random(6962)
    for _ in range(3000):
        a, b = rng.randrange(301), rng.randrange(301)
        pairs.append((min(a, b), max(a, b)))
    pairs += [(m, 300) for m in range(301)]
    for m, n in pairs:
        proof = merkle.consistency_proof(m, n, memory)
        assert proof == ref_proof(m, LEAVES[:n]), (m, n)
        assert len(proof) == merkle.consistency_proof_size(m, n)
        merkle.verify_consistency(m, n, ref_mth(LEAVES[:m]), ref_mth(LEAVES[:n]), proof)


def test_extend_stores_every_complete_subtree_once() -> None:
    memory = merkle.MemoryTree(LEAVES)
    frontier: list[bytes] = []
    seen: dict[merkle.NodeID, bytes] = {}
    size = 0
    rng = random.Random(1)
    while size < 300:  # batches of varied sizes, as the sequencer makes them
        batch = LEAVES[size : size + rng.randrange(1, 20)]
        frontier, nodes = merkle.extend(size, frontier, batch)
        size += len(batch)
        for node, h in nodes:
            assert node not in seen
            seen[node] = h
        assert merkle.root_from_frontier(frontier) == ref_mth(LEAVES[:size])
        assert frontier == memory.get_nodes(merkle.frontier_nodes(size))
    assert len(seen) == 300 - (300).bit_count()  # every interior complete subtree
    assert list(seen.values()) == memory.get_nodes(list(seen))


# -- verifiers refuse what is wrong ----------------------------------------------------------


def _corrupted(proof: list[bytes], extra: bytes) -> list[list[bytes]]:
    out = [[*proof, extra], [extra, *proof]]
    if proof:
        out.append(proof[:-1])
    for i in range(len(proof)):
        flipped = bytearray(proof[i])
        flipped[0] ^= 8
        out.append([*proof[:i], bytes(flipped), *proof[i + 1 :]])
    return out


def test_inclusion_verifier_refuses_every_corruption() -> None:
    for size in (1, 2, 3, 5, 8, 13, 64, 100):
        leaves = LEAVES[:size]
        root = ref_mth(leaves)
        for index in range(size):
            proof = ref_path(index, leaves)
            for bad in _corrupted(proof, root):
                with pytest.raises(AuditIntegrityError):
                    merkle.verify_inclusion(leaves[index], index, size, bad, root)
            # Wrong index or tree height (the probes of transparency-dev's verify_test.go).
            probes = [(index - 1, size), (index + 1, size), (index ^ 2, size)]
            probes += [(index, size * 2), (index, size // 2)]
            for i, n in probes:
                if (i, n) != (index, size) and 0 <= i < n:
                    with pytest.raises(AuditIntegrityError):
                        merkle.verify_inclusion(leaves[index], i, n, proof, root)
            with pytest.raises(AuditIntegrityError):
                merkle.verify_inclusion(leaves[index], index, size, proof, merkle.EMPTY_ROOT)
            with pytest.raises(AuditIntegrityError):
                merkle.verify_inclusion(bytes(32), index, size, proof, root)


def test_consistency_verifier_refuses_every_corruption() -> None:
    for n in (2, 3, 5, 8, 13, 64, 100):
        for m in range(1, n):
            proof = ref_proof(m, LEAVES[:n])
            root_m, root_n = ref_mth(LEAVES[:m]), ref_mth(LEAVES[:n])
            for bad in _corrupted(proof, root_n):
                with pytest.raises(AuditIntegrityError):
                    merkle.verify_consistency(m, n, root_m, root_n, bad)
            with pytest.raises(AuditIntegrityError):
                merkle.verify_consistency(m, n, root_n, root_m, proof)
            with pytest.raises(AuditIntegrityError):
                merkle.verify_consistency(m, n, root_m, root_n, [])
            for m2, n2 in ((m - 1, n), (m + 1, n), (m ^ 2, n), (m, n * 2), (m, n // 2)):
                if 0 < m2 < n2 and (m2, n2) != (m, n):
                    with pytest.raises(AuditIntegrityError):
                        merkle.verify_consistency(m2, n2, root_m, root_n, proof)


def test_trivial_consistency_cases() -> None:
    root = ref_mth(LEAVES[:3])
    merkle.verify_consistency(0, 0, merkle.EMPTY_ROOT, merkle.EMPTY_ROOT, [])
    merkle.verify_consistency(0, 3, merkle.EMPTY_ROOT, root, [])
    merkle.verify_consistency(3, 3, root, root, [])
    with pytest.raises(AuditIntegrityError, match="got 1 hashes, want 0"):
        merkle.verify_consistency(3, 3, root, root, [root])
    with pytest.raises(AuditIntegrityError, match="got 4 bytes, want 32"):
        merkle.verify_consistency(3, 3, b"abcd", root, [])


def test_shape_is_checked_before_hashing() -> None:
    with pytest.raises(AuditIntegrityError, match="index 0, want below tree size 0"):
        merkle.verify_inclusion(LEAVES[0], 0, 0, [], merkle.EMPTY_ROOT)
    with pytest.raises(AuditIntegrityError, match="leaf hash: got 3 bytes, want 32"):
        merkle.verify_inclusion(b"abc", 0, 1, [], LEAVES[0])
    with pytest.raises(ValueError, match="index 5 not in a tree of size 5"):
        merkle.inclusion_proof(5, 5, LEAVES[:5])
    with pytest.raises(ValueError, match="from size 6 to 5"):
        merkle.consistency_proof(6, 5, LEAVES[:6])
    with pytest.raises(ValueError, match="leaf hash 1: got 2 bytes, want 32"):
        merkle.root([LEAVES[0], b"ab"])
