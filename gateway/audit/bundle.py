"""Export of the audit log as a signed bundle, and the offline verifier of such a bundle.

A bundle is one UTF-8 JSON file::

    {"format": "yibao-gateway-audit-bundle/v2", "origin": "<log name>",
     "entries": [{"index": 0, "entry": {...}, "leaf_hash": "<hex>", "chain_hash": "<hex>"
                  [, "personal": {"salt": "<base64>", "data": {...}}]}, ...],
     "head": {"size": N, "chain_hash": "<hex>", "root": "<hex RFC 6962 Merkle root>"},
     "checkpoint": "<C2SP signed checkpoint note for (origin, N, root)>",
     "signature": "<base64 Ed25519 over checkpoint_message(origin, N, head)>",
     "public_key": "<base64 raw 32-byte Ed25519 key, informational only>"}

Format ``v1`` is the same without ``head.root`` and ``checkpoint``; it is still verified.
``entry`` is the leaf object: personal members are replaced by ``"personal"``, a salted
commitment. An export made ``with_personal`` carries each entry's stored personal part (unless
erased), which the verifier checks against that commitment; without it, the bundle holds no
personal data and still verifies.

The verifier trusts nothing in the file: it checks the shape, recomputes every leaf, the chain
and the Merkle root from the entry objects, and checks the signature and the checkpoint with
the key the *caller* supplies. Given a checkpoint the auditor saved earlier, it also proves the
bundle's tree extends that one, so a rewritten history is caught even if it is internally
consistent and properly signed.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from gateway.audit import merkle
from gateway.audit.checkpoint import Checkpoint, parse_and_verify_checkpoint, sign_checkpoint
from gateway.audit.entry import (
    GENESIS,
    HASH_SIZE,
    SALT_SIZE,
    canonical_json,
    chain_hash,
    check_personal,
    leaf_hash,
)
from gateway.audit.log import AuditLog
from gateway.errors import AuditIntegrityError, BadRequest

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_V1",
    "VerifiedBundle",
    "checkpoint_message",
    "export_bundle",
    "verify_bundle",
    "verify_bundle_checkpoint",
]

BUNDLE_FORMAT: Final = "yibao-gateway-audit-bundle/v2"
BUNDLE_FORMAT_V1: Final = "yibao-gateway-audit-bundle/v1"
_FORMATS: Final = (BUNDLE_FORMAT_V1, BUNDLE_FORMAT)
SIGNATURE_SIZE: Final = 64
PUBLIC_KEY_SIZE: Final = 32

_TOP_KEYS_V1: Final = ("format", "origin", "entries", "head", "signature", "public_key")
_TOP_KEYS: Final = (*_TOP_KEYS_V1, "checkpoint")
_ENTRY_KEYS: Final = ("index", "entry", "leaf_hash", "chain_hash")
_PERSONAL_KEYS: Final = ("salt", "data")
_HEAD_KEYS_V1: Final = ("size", "chain_hash")
_HEAD_KEYS: Final = (*_HEAD_KEYS_V1, "root")
_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")


def checkpoint_message(origin: str, size: int, head: bytes) -> bytes:
    """The bytes that are signed: ``f"{origin}\\n{size}\\n{chain_hash_hex}\\n"``.

    >>> checkpoint_message("demo", 0, bytes(32)).decode().splitlines()[:2]
    ['demo', '0']
    """
    _check_origin(origin)
    if size < 0 or len(head) != HASH_SIZE:
        raise ValueError("checkpoint needs size >= 0 and a 32-byte chain hash")
    return f"{origin}\n{size}\n{head.hex()}\n".encode()


def _check_origin(origin: str) -> None:
    # A newline in the origin would let one signed message be read as another.
    if not origin or origin != origin.strip() or any(c in origin for c in "\r\n"):
        raise ValueError("origin must be a non-empty single line without outer whitespace")


# -- export ------------------------------------------------------------------------------


def export_bundle(
    log: AuditLog,
    out_path: Path,
    signing_key: Ed25519PrivateKey,
    *,
    origin: str,
    key_name: str | None = None,
    with_personal: bool = False,
) -> None:
    """Write every entry of ``log`` (one consistent snapshot) to ``out_path`` as a signed
    bundle with a signed checkpoint (key name: ``key_name``, by default the origin); with
    ``with_personal`` each entry's personal part (where stored, not erased) too. The chain
    and the Merkle tree are recomputed while writing and the root is compared with the one the
    store's subtree hashes give, so a store that does not verify is never signed:
    :class:`AuditIntegrityError` is raised and no file is left behind."""
    _check_origin(origin)
    public_raw = signing_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    out_path = Path(out_path)
    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    prev = GENESIS
    size = 0
    frontier: list[bytes] = []
    try:
        with tmp_path.open("w", encoding="utf-8", newline="\n") as out:
            out.write(f'{{"format":{_dump(BUNDLE_FORMAT)},"origin":{_dump(origin)},"entries":[')
            for row in log.iter_rows():
                if row.index != size:
                    _fail(f"entry {size}: missing, next stored index is {row.index}", size)
                data = row.entry_json.encode("utf-8")
                leaf = leaf_hash(data)
                prev = chain_hash(prev, leaf)
                if not (
                    hmac.compare_digest(leaf, row.leaf_hash)
                    and hmac.compare_digest(prev, row.chain_hash)
                ):
                    _fail(f"entry {size}: stored hashes do not match, log not exported", size)
                if not _is_canonical_object(row.entry_json, data):
                    _fail(f"entry {size}: stored entry is not a canonical JSON object", size)
                personal = ""
                if with_personal and row.personal_json is not None and row.personal_salt:
                    personal = (f',"personal":{{"salt":"{_b64(row.personal_salt)}",'
                                f'"data":{row.personal_json}}}')
                # One entry per line: bundles diff and grep well.
                out.write(
                    f'{"," if size else ""}\n{{"index":{size},"entry":{row.entry_json},'
                    f'"leaf_hash":"{leaf.hex()}","chain_hash":"{prev.hex()}"{personal}}}'
                )
                frontier, _ = merkle.extend(size, frontier, [leaf])
                size += 1
            root = merkle.root_from_frontier(frontier)
            stored_root = log.root(size)
            if not hmac.compare_digest(root, stored_root):
                _fail(
                    f"tree size {size}: stored Merkle subtree hashes do not match the entries,"
                    " log not exported",
                    expected=stored_root,
                    calculated=root,
                )
            signature = signing_key.sign(checkpoint_message(origin, size, prev))
            note = sign_checkpoint(origin, size, root, signing_key, key_name)
            out.write(
                f'\n],"head":{{"size":{size},"chain_hash":"{prev.hex()}","root":"{root.hex()}"}},'
                f'"checkpoint":{_dump(note)},'
                f'"signature":"{_b64(signature)}","public_key":"{_b64(public_raw)}"}}\n'
            )
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _is_canonical_object(text: str, data: bytes) -> bool:
    # What is signed must verify: the verifier re-serializes each parsed entry.
    try:
        parsed = json.loads(text)
        return isinstance(parsed, dict) and canonical_json(parsed) == data
    except ValueError:
        return False


def _dump(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- verification ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """What a verified bundle commits to: its size, Merkle root and, for format v2, the signed
    checkpoint note (which an auditor keeps to check the next bundle against)."""

    size: int
    root: bytes
    checkpoint: str | None


def verify_bundle(
    path: Path,
    public_key: Ed25519PublicKey | bytes,
    *,
    previous_checkpoint: str | None = None,
    key_name: str | None = None,
) -> int:
    """Verify the bundle at ``path`` against ``public_key`` (a key object, 32 raw bytes, or
    PEM bytes) and return its size; raise :class:`AuditIntegrityError` saying what failed and
    at which entry. The ``public_key`` member of the bundle is never used.

    ``previous_checkpoint`` is a signed checkpoint note saved earlier (e.g. from an earlier
    bundle or ``GET /v1/audit/checkpoint``); the bundle must then extend that tree.
    ``key_name`` is the checkpoint signer's key name, by default the origin.
    """
    return verify_bundle_checkpoint(
        path, public_key, previous_checkpoint=previous_checkpoint, key_name=key_name
    ).size


def verify_bundle_checkpoint(
    path: Path,
    public_key: Ed25519PublicKey | bytes,
    *,
    previous_checkpoint: str | None = None,
    key_name: str | None = None,
) -> VerifiedBundle:
    """:func:`verify_bundle`, returning the verified size, root and checkpoint note."""
    key = _load_public_key(public_key)
    bundle = _load(Path(path))

    # 1. Shape, with got/want, before any hashing.
    if not isinstance(bundle.get("format"), str) or bundle["format"] not in _FORMATS:
        _fail(f"bundle: format {bundle.get('format')!r}, want one of {list(_FORMATS)!r}")
    v2 = bundle["format"] == BUNDLE_FORMAT
    _expect_keys(bundle, _TOP_KEYS if v2 else _TOP_KEYS_V1, "bundle")
    origin = bundle["origin"]
    if not isinstance(origin, str):
        _fail("bundle: origin is not a string")
    try:
        _check_origin(origin)
    except ValueError:
        _fail("bundle: origin must be a non-empty single line")
    entries = bundle["entries"]
    if not isinstance(entries, list):
        _fail("bundle: entries is not a list")
    head = bundle["head"]
    _expect_keys(head, _HEAD_KEYS if v2 else _HEAD_KEYS_V1, "head")
    size = head["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        _fail("head: size is not a non-negative integer")
    head_hash = _hex_hash(head["chain_hash"], "head: chain_hash")
    head_root = _hex_hash(head["root"], "head: root") if v2 else None
    note = bundle["checkpoint"] if v2 else None
    if v2 and not isinstance(note, str):
        _fail("bundle: checkpoint is not a string")
    signature = _b64_bytes(bundle["signature"], SIGNATURE_SIZE, "bundle: signature")
    _b64_bytes(bundle["public_key"], PUBLIC_KEY_SIZE, "bundle: public_key")
    stored: list[tuple[dict[str, Any], bytes, bytes]] = []
    for position, item in enumerate(entries):
        where = f"entries[{position}]"
        if isinstance(item, dict) and "personal" in item:
            _check_personal_part(item, where, position)
            item = {k: v for k, v in item.items() if k != "personal"}
        _expect_keys(item, _ENTRY_KEYS, where, index=position)
        index = item["index"]
        if not _is_int(index):
            _fail(f"{where}: index is not an integer", position)
        if index != position:
            _fail(
                f"{where}: index {index}, want {position} (entries removed or reordered)",
                position,
            )
        if not isinstance(item["entry"], dict):
            _fail(f"{where}: entry is not an object", position)
        stored.append(
            (
                item["entry"],
                _hex_hash(item["leaf_hash"], f"{where}: leaf_hash", position),
                _hex_hash(item["chain_hash"], f"{where}: chain_hash", position),
            )
        )
    if size != len(stored):
        _fail(
            f"head: size {size}, but the bundle has {len(stored)} entries"
            " (log truncated or extended)"
        )

    # 2. Every leaf, the chain and the Merkle tree, recomputed from the entries themselves.
    prev = GENESIS
    leaves: list[bytes] = []
    for index, (entry, stored_leaf, stored_chain) in enumerate(stored):
        try:
            data = canonical_json(entry)
        except ValueError:
            _fail(f"entry {index}: not canonical JSON", index)
        leaf = leaf_hash(data)
        if not hmac.compare_digest(leaf, stored_leaf):
            _fail(
                f"entry {index}: leaf hash mismatch (entry changed)",
                index,
                expected=stored_leaf,
                calculated=leaf,
            )
        prev = chain_hash(prev, leaf)
        if not hmac.compare_digest(prev, stored_chain):
            _fail(
                f"entry {index}: chain hash mismatch (entries removed, inserted or reordered)",
                index,
                expected=stored_chain,
                calculated=prev,
            )
        leaves.append(leaf)
    if not hmac.compare_digest(prev, head_hash):
        _fail(
            "head: chain_hash does not match the last entry",
            len(stored) - 1 if stored else None,
            expected=head_hash,
            calculated=prev,
        )
    tree = merkle.MemoryTree(leaves)
    root = merkle.root_from_source(size, tree)
    if head_root is not None and not hmac.compare_digest(root, head_root):
        _fail("head: root does not match the entries", expected=head_root, calculated=root)

    # 3. The signature over what was recomputed, with the caller's key only.
    try:
        key.verify(signature, checkpoint_message(origin, size, prev))
    except InvalidSignature:
        _fail("signature does not verify with the given public key")

    # 4. The checkpoint: signed by the caller's key, for this origin, size and recomputed root.
    if note is not None:
        checkpoint = parse_and_verify_checkpoint(note, key, key_name, origin)
        if checkpoint.size != size:
            _fail(f"checkpoint: tree size {checkpoint.size}, want {size} (the bundle's size)")
        if not hmac.compare_digest(checkpoint.root, root):
            _fail(
                "checkpoint: root does not match the entries (forked or rewritten log)",
                expected=checkpoint.root,
                calculated=root,
            )

    # 5. The tree extends the one the auditor saw before.
    if previous_checkpoint is not None:
        _check_previous(previous_checkpoint, key, key_name, origin, size, root, tree)
    return VerifiedBundle(size, root, note)


def _check_previous(
    text: str,
    key: Ed25519PublicKey,
    key_name: str | None,
    origin: str,
    size: int,
    root: bytes,
    tree: merkle.MemoryTree,
) -> None:
    try:
        previous: Checkpoint = parse_and_verify_checkpoint(text, key, key_name, origin)
    except AuditIntegrityError as exc:
        _fail(f"previous {exc.message}")
    if previous.size > size:
        _fail(
            f"previous checkpoint: tree size {previous.size}, but the bundle has {size} entries"
            " (log truncated)",
            size,
        )
    proof = merkle.consistency_proof(previous.size, size, tree)
    try:
        merkle.verify_consistency(previous.size, size, previous.root, root, proof)
    except AuditIntegrityError as exc:
        raise AuditIntegrityError(
            f"previous checkpoint: the bundle's first {previous.size} entries do not have its"
            " root (history rewritten since that checkpoint)",
            expected=exc.expected,
            calculated=exc.calculated,
        ) from exc


def _check_personal_part(item: dict[str, Any], where: str, position: int) -> None:
    """A personal part carried in a bundle must open its leaf's commitment."""
    part = item["personal"]
    _expect_keys(part, _PERSONAL_KEYS, f"{where}.personal", index=position)
    salt = _b64_bytes(part["salt"], SALT_SIZE, f"{where}.personal: salt")
    if not isinstance(part["data"], dict):
        _fail(f"{where}.personal: data is not an object", position)
    entry = item.get("entry")
    commitment = entry.get("personal") if isinstance(entry, dict) else None
    try:
        data = canonical_json(part["data"])
    except ValueError:
        _fail(f"{where}.personal: data is not canonical JSON", position)
    if not isinstance(commitment, str) or not check_personal(commitment, salt, data):
        _fail(f"entry {position}: personal part does not open the leaf's commitment", position)


def _load_public_key(public_key: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if isinstance(public_key, bytes) and public_key.lstrip().startswith(b"-----BEGIN"):
        try:
            loaded = serialization.load_pem_public_key(public_key)
        except ValueError as exc:
            raise BadRequest("public key: not a valid PEM public key") from exc
        if not isinstance(loaded, Ed25519PublicKey):
            raise BadRequest("public key: not an Ed25519 key")
        return loaded
    if isinstance(public_key, bytes) and len(public_key) == PUBLIC_KEY_SIZE:
        return Ed25519PublicKey.from_public_bytes(public_key)
    raise BadRequest(f"public key: want an Ed25519 key, {PUBLIC_KEY_SIZE} raw bytes or PEM bytes")


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        _fail(f"bundle: cannot read {path.name}: {exc.strerror}")
    except UnicodeDecodeError:
        _fail("bundle: not UTF-8")
    try:
        # Duplicate keys would let a reader and the verifier see different entries.
        loaded = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except ValueError as exc:
        _fail(f"bundle: not valid JSON: {exc}")
    if not isinstance(loaded, dict):
        _fail("bundle: top level is not an object")
    return loaded


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [k for k, _ in pairs]
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return result


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _expect_keys(obj: Any, keys: tuple[str, ...], where: str, index: int | None = None) -> None:
    if not isinstance(obj, dict):
        _fail(f"{where}: not an object", index)
    missing = [k for k in keys if k not in obj]
    extra = sorted(k for k in obj if k not in keys)
    if missing:
        _fail(f"{where}: missing member {missing[0]!r}", index)
    if extra:
        _fail(f"{where}: unexpected member {extra[0]!r}", index)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hex_hash(value: Any, where: str, index: int | None = None) -> bytes:
    if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
        _fail(f"{where}: want {HASH_SIZE * 2} lowercase hex digits", index)
    return bytes.fromhex(value)


def _b64_bytes(value: Any, want: int, where: str) -> bytes:
    try:
        if not isinstance(value, str):
            raise ValueError
        raw = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        _fail(f"{where}: not base64")
    if len(raw) != want:
        _fail(f"{where}: {len(raw)} bytes, want {want}")
    return raw


def _fail(
    message: str,
    index: int | None = None,
    *,
    expected: bytes = b"",
    calculated: bytes = b"",
) -> NoReturn:
    raise AuditIntegrityError(
        message, index=index, expected=expected.hex(), calculated=calculated.hex()
    )
