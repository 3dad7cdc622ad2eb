"""身份证号 → person pseudonym, without the ingest key: the keyed lookup table.

The store's person pseudonym ``psn_id`` is an HMAC of ``psn_no`` under the ingest key, which
the serving process never holds. To let the serving side name a person by 身份证号 (``certno``)
anyway, the ingest also writes a table ``person_lookup (lookup, psn_id)`` in the same data
version, where ``lookup`` is

    hex(HMAC-SHA256(lookup_key, "yibao-certno-lookup:" ‖ normalize(certno)))

under a **separate** lookup key (``keys/certno-lookup.key``) that the consent service holds.
The serving side hashes the certno it is given and reads one row by ``lookup``: it never stores,
logs or returns the certno, and it never learns the ingest key. The identity service names a
signed-in person by the same ``lookup`` value, so its tokens carry no raw identifier either.

Whoever holds the lookup key *and* the store can test guesses of a certno (the space of valid
身份证号 is small enough to enumerate): the key is a serving-side secret like the pairwise key,
kept out of the query store and away from insurers.

>>> normalize_certno(" 11010519491231002x ")
'11010519491231002X'
>>> certno_lookup(bytes(range(32)), "11010519491231002X") == certno_lookup(
...     bytes(range(32)), "11010519491231002x")
True
>>> len(certno_lookup(bytes(range(32)), "11010519491231002X"))
64
"""

from __future__ import annotations

import hashlib
import hmac
import re

from gateway.errors import ValidationFailed

__all__ = ["LOOKUP_DOMAIN", "LOOKUP_HEX", "certno_lookup", "is_lookup", "normalize_certno"]

LOOKUP_DOMAIN = "yibao-certno-lookup:"
LOOKUP_HEX = re.compile(r"[0-9a-f]{64}")
_CERTNO = re.compile(r"[0-9]{17}[0-9X]")
# ISO 7064 MOD 11-2 weights of GB 11643 positions 1..17, and the check characters.
_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
_CHECK = "10X98765432"
_MIN_KEY_BYTES = 32


def normalize_certno(value: str) -> str:
    """The canonical form hashed by both sides: surrounding spaces removed, ``x`` → ``X``;
    18 characters with a valid check character, else refused (the message never echoes it)."""
    if not isinstance(value, str):
        raise ValidationFailed("certno must be a string")
    certno = value.strip(" ").upper()
    if not _CERTNO.fullmatch(certno):
        raise ValidationFailed("certno is not an 18-character resident id number")
    total = sum(int(d) * w for d, w in zip(certno[:17], _WEIGHTS, strict=True))
    if _CHECK[total % 11] != certno[17]:
        raise ValidationFailed("certno has a wrong check character")
    return certno


def certno_lookup(key: bytes, certno: str) -> str:
    """The ``person_lookup.lookup`` value of ``certno`` (64 lowercase hex digits)."""
    if len(key) < _MIN_KEY_BYTES:
        raise ValidationFailed(f"lookup key has {len(key)} bytes, want at least {_MIN_KEY_BYTES}")
    message = (LOOKUP_DOMAIN + normalize_certno(certno)).encode("ascii")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def is_lookup(value: object) -> bool:
    """True for a well-formed lookup value (what a subject token's ``sub`` must be)."""
    return isinstance(value, str) and LOOKUP_HEX.fullmatch(value) is not None
