"""Key files: Ed25519 / P-256 private keys in PKCS#8 PEM, created with mode 0600."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.errors import ValidationFailed

__all__ = [
    "Alg",
    "PrivateKey",
    "PublicKey",
    "generate_private_key",
    "load_or_create_private_key",
    "load_private_key",
    "load_public_key_pem",
    "public_key_pem",
    "write_private_key",
]

Alg = Literal["EdDSA", "ES256"]
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def generate_private_key(alg: Alg = "EdDSA") -> PrivateKey:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def write_private_key(path: Path, key: PrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def load_private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ValidationFailed(f"cannot load private key {path.name}") from exc
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValidationFailed(f"{path.name}: only Ed25519 and P-256 keys are accepted")


def load_or_create_private_key(path: Path, alg: Alg = "EdDSA") -> PrivateKey:
    if path.exists():
        return load_private_key(path)
    key = generate_private_key(alg)
    write_private_key(path, key)
    return key


def public_key_pem(key: PrivateKey | PublicKey) -> str:
    public = key.public_key() if isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    ) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key_pem(pem: str) -> tuple[PublicKey, Alg]:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except ValueError as exc:
        raise ValidationFailed("invalid public key") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key, "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValidationFailed("only Ed25519 and P-256 public keys are accepted")
