"""Signed OPA policy bundles: read one, verify its signature, hand over its policies.

A bundle is what ``opa build --bundle --signing-key … --signing-alg ES256`` writes
(``tools/build-bundle.sh``): a gzipped tar of the ``*.rego`` files, a ``.manifest`` (revision
and roots), a ``data.json`` and ``.signatures.json``. The signature format is OPA's (docs:
openpolicyagent.org/docs/management-bundles/#signing; code: ``v1/bundle/verify.go`` and
``hash.go`` of OPA v1.22.2, read from the Go module this repository builds OPA from):

- ``.signatures.json`` is ``{"signatures": ["<compact JWS>"]}`` with exactly one token;
- the token's payload lists every other file of the bundle as ``{"name", "hash",
  "algorithm"}``; the hash of ``.manifest`` and ``data.json`` is taken over the parsed JSON
  written back with sorted keys and no whitespace (so it does not depend on formatting), the
  hash of any other file over its bytes;
- a file in the bundle but not in the payload, a file in the payload but not in the bundle, a
  digest that differs, a payload ``scope`` (none is configured) or a second token each make
  the bundle invalid.

The gateway verifies this itself, with the public key in ``settings.policy_bundle_key_path``,
before either engine sees a policy, and refuses an unsigned bundle outright: there is no
setting that loads a bundle without verifying it. Stricter than OPA in three ways that our
own bundles never hit: only SHA-256/384/512 digests, only ``.rego``, ``.manifest`` and
``data.json`` files, and ``data.json`` must be empty (grants and the catalog are data the
gateway pushes; a bundle carrying data would shadow them).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.errors import PolicyEngineError
from gateway.policy._sources import PolicySource, policy_version

__all__ = [
    "POLICY_ROOT",
    "PolicyBundle",
    "bundle_file_digest",
    "load_bundle",
    "write_signing_key",
]

#: The manifest roots must lie under this path: the gateway writes data.gateway.catalog,
#: .grants and .grant_index itself, and OPA refuses writes under a bundle's roots.
POLICY_ROOT: Final = "gateway/authz"

_SIGNATURES: Final = ".signatures.json"
_MANIFEST: Final = ".manifest"
_DATA: Final = "data.json"
_TEST_SUFFIX: Final = "_test.rego"
_MAX_FILE_BYTES: Final = 4 << 20
_MAX_TOTAL_BYTES: Final = 16 << 20
_HASHES: Final = {"SHA-256": hashlib.sha256, "SHA-384": hashlib.sha384, "SHA-512": hashlib.sha512}


@dataclass(frozen=True)
class PolicyBundle:
    """A verified bundle: where it came from, its manifest revision and roots, and its
    policies (``*_test.rego`` left out, as for a policy directory)."""

    path: Path
    revision: str
    roots: tuple[str, ...]
    sources: tuple[PolicySource, ...]

    @property
    def version(self) -> str:
        """Content hash of the policies, the same as for the directory they were built from."""
        return policy_version(self.sources)


def _refuse(path: Path, why: str) -> PolicyEngineError:
    return PolicyEngineError(f"policy bundle {path.name} refused: {why}")


# --- OPA's file digest ---------------------------------------------------------------------


class _Number(str):
    """A JSON number kept as written: OPA hashes the literal (Go's json.Number)."""


def _go_string(text: str) -> str:
    # Go's encoding/json with SetEscapeHTML(false): quotes, backslash, control characters
    # (\b \f \n \r \t short, the rest \u00xx) and U+2028/U+2029 escaped, the rest verbatim.
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif char in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[char])
        elif code < 0x20 or code in (0x2028, 0x2029):
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _walk(value: object, out: list[str]) -> None:
    # Mirrors walk() in OPA's v1/bundle/hash.go: keys sorted (code point order is UTF-8 byte
    # order), ",", ":" and no whitespace.
    if isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(_go_string(key))
            out.append(":")
            _walk(value[key], out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _walk(item, out)
        out.append("]")
    elif isinstance(value, _Number):
        out.append(str.__str__(value))
    elif isinstance(value, str):
        out.append(_go_string(value))
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    else:  # pragma: no cover - json.loads gives nothing else
        raise TypeError(type(value).__name__)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_json(data: bytes) -> object:
    return json.loads(
        data.decode("utf-8"),
        parse_int=_Number,
        parse_float=_Number,
        parse_constant=_no_constant,
    )


def _structured(name: str) -> bool:
    return posixpath.basename(name) in (_DATA, _MANIFEST)


def bundle_file_digest(name: str, data: bytes, algorithm: str = "SHA-256") -> str:
    """The hex digest OPA signs for bundle file ``name`` holding ``data``.

    >>> bundle_file_digest("data.json", b'{ "b": 1,\\n "a": [true] }') == (
    ...     hashlib.sha256(b'{"a":[true],"b":1}').hexdigest())
    True
    """
    digest = _HASHES[algorithm]()
    if _structured(name):
        out: list[str] = []
        _walk(_parse_json(data), out)
        digest.update("".join(out).encode("utf-8"))
    else:
        digest.update(data)
    return digest.hexdigest()


# --- reading and verifying -------------------------------------------------------------------


def _read_files(path: Path) -> dict[str, bytes]:
    """Every regular file of the tarball, by its path without the leading ``/``."""
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                if member.isdir():
                    continue
                name = member.name.lstrip("/")
                normal = posixpath.normpath(name)
                if not member.isfile() or normal != name or name.startswith("../") or not name:
                    raise _refuse(path, f"{member.name!r} is not a plain file inside the bundle")
                if name in files:
                    raise _refuse(path, f"{name} appears twice")
                if member.size > _MAX_FILE_BYTES or total + member.size > _MAX_TOTAL_BYTES:
                    raise _refuse(path, "it is too large")
                handle = archive.extractfile(member)
                if handle is None:  # pragma: no cover - isfile() members always extract
                    raise _refuse(path, f"{name} cannot be read")
                files[name] = handle.read()
                total += member.size
    except PolicyEngineError:
        raise
    except FileNotFoundError:
        raise PolicyEngineError(f"policy bundle {path} does not exist") from None
    except (OSError, tarfile.TarError, EOFError):
        raise _refuse(path, "it is not a gzipped tar archive") from None
    return files


def _public_key(key_path: Path) -> tuple[Any, str]:
    try:
        key = load_pem_public_key(key_path.read_bytes())
    except FileNotFoundError:
        raise PolicyEngineError(f"policy bundle key {key_path} does not exist") from None
    except (OSError, ValueError):
        raise PolicyEngineError(
            f"policy bundle key {key_path.name} is not a PEM public key"
        ) from None
    # The algorithm follows from the key, never from the token's header.
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key, "EdDSA"
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key, "RS256"
    raise PolicyEngineError(
        f"policy bundle key {key_path.name} is not a P-256, Ed25519 or RSA (>= 2048 bit) key"
    )


def _signed_files(path: Path, raw: bytes | None, key_path: Path) -> dict[str, tuple[str, str]]:
    """The ``{name: (algorithm, hex digest)}`` the signature vouches for."""
    if raw is None:
        raise _refuse(path, "it is not signed (no .signatures.json)")
    try:
        document = json.loads(raw)
    except ValueError:
        raise _refuse(path, ".signatures.json is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("signatures"), list):
        raise _refuse(path, ".signatures.json has no list of signatures")
    if document.get("plugin", "_default") != "_default":
        raise _refuse(path, "it names a signing plugin the gateway does not have")
    tokens = document["signatures"]
    if len(tokens) != 1 or not isinstance(tokens[0], str):
        raise _refuse(path, f"it must carry exactly one signature, not {len(tokens)}")
    key, algorithm = _public_key(key_path)
    try:
        payload = jwt.decode(
            tokens[0],
            key=key,
            algorithms=[algorithm],
            options={"verify_aud": False, "verify_iss": False, "require": []},
        )
    except jwt.InvalidSignatureError:
        raise _refuse(path, "the signature does not verify with the configured key") from None
    except jwt.InvalidTokenError:
        raise _refuse(
            path, f"the signature is not a valid {algorithm} JWS for the configured key"
        ) from None
    if payload.get("scope", "") != "":
        raise _refuse(path, "the signature has a scope and none is configured")
    listed = payload.get("files")
    if not isinstance(listed, list):
        raise _refuse(path, "the signature lists no files")
    signed: dict[str, tuple[str, str]] = {}
    for entry in listed:
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("name", "hash", "algorithm")
        ):
            raise _refuse(path, "the signature lists a malformed file entry")
        if entry["algorithm"] not in _HASHES:
            raise _refuse(path, f"{entry['name']}: digest algorithm {entry['algorithm']!r}")
        signed[entry["name"].lstrip("/")] = (entry["algorithm"], entry["hash"].lower())
    return signed


def _verify_files(path: Path, files: dict[str, bytes], signed: dict[str, tuple[str, str]]) -> None:
    for name in sorted(files):
        if name not in signed:
            raise _refuse(path, f"file {name} is not covered by the signature")
        algorithm, want = signed.pop(name)
        try:
            got = bundle_file_digest(name, files[name], algorithm)
        except (ValueError, UnicodeDecodeError):
            raise _refuse(path, f"{name} is not valid JSON") from None
        if not hmac.compare_digest(got, want):
            raise _refuse(path, f"{name} does not match its signed digest")
    if signed:
        raise _refuse(path, f"signed file(s) missing from the bundle: {', '.join(sorted(signed))}")


def _manifest(path: Path, raw: bytes | None) -> tuple[str, tuple[str, ...]]:
    if raw is None:
        raise _refuse(path, "it has no .manifest")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise _refuse(path, ".manifest is not JSON") from None
    revision = manifest.get("revision") if isinstance(manifest, dict) else None
    if not isinstance(revision, str) or not revision:
        raise _refuse(path, ".manifest has no revision (build it with --revision)")
    roots = manifest.get("roots")
    if not isinstance(roots, list) or not roots or not all(isinstance(r, str) for r in roots):
        raise _refuse(path, f".manifest must list its roots (e.g. [{POLICY_ROOT!r}])")
    for root in roots:
        if root.strip("/") != POLICY_ROOT and not root.strip("/").startswith(POLICY_ROOT + "/"):
            raise _refuse(path, f"root {root!r} is outside {POLICY_ROOT}, where the data lives")
    return revision, tuple(roots)


def load_bundle(path: str | Path, key_path: str | Path | None) -> PolicyBundle:
    """Read and verify the signed bundle at ``path`` with the PEM public key at
    ``key_path``; :class:`PolicyEngineError` with a clear reason if anything is off.

    ``key_path`` is required: an unsigned bundle, or one without a key to check it with, is
    never loaded.
    """
    path = Path(path)
    if key_path is None:
        raise PolicyEngineError(
            f"policy bundle {path.name} refused: no verification key is configured "
            "(settings.policy_bundle_key_path)"
        )
    files = _read_files(path)
    signed = _signed_files(path, files.pop(_SIGNATURES, None), Path(key_path))
    _verify_files(path, files, signed)
    revision, roots = _manifest(path, files.get(_MANIFEST))
    sources = []
    for name in sorted(files):
        if name in (_MANIFEST,):
            continue
        if name == _DATA:
            try:
                data = _parse_json(files[name])
            except (ValueError, UnicodeDecodeError):
                raise _refuse(path, "data.json is not JSON") from None
            if data != {}:
                raise _refuse(path, "data.json is not empty (the gateway pushes the data)")
            continue
        if not name.endswith(".rego"):
            raise _refuse(path, f"{name} is neither a policy, .manifest nor data.json")
        if name.endswith(_TEST_SUFFIX):
            continue
        try:
            text = files[name].decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse(path, f"{name} is not UTF-8") from None
        sources.append(PolicySource(name, text))
    if not sources:
        raise _refuse(path, "it holds no policy")
    return PolicyBundle(path=path, revision=revision, roots=roots, sources=tuple(sources))


def write_signing_key(private_path: str | Path, public_path: str | Path) -> None:
    """A new P-256 key pair for ``opa build --signing-alg ES256``: the private key as PKCS#8
    PEM (mode 0600, for the build only; never committed, ``*.pem`` is ignored by git) and the
    public key as SubjectPublicKeyInfo PEM (for ``opa run --verification-key`` and
    ``settings.policy_bundle_key_path``). Refuses to overwrite either file."""
    import os

    from cryptography.hazmat.primitives import serialization

    private_path, public_path = Path(private_path), Path(public_path)
    for target in (private_path, public_path):
        if target.exists():
            raise PolicyEngineError(f"{target} exists; not overwriting a key")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
