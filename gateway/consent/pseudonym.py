"""Pairwise subject pseudonyms: one person, a different ``sub`` for every insurer.

``pairwise_sub(key, person, org)`` is the first 32 characters of
base64url(HMAC-SHA256(key, "yibao-consent-sub" ‖ 0x00 ‖ person ‖ 0x00 ‖ org)) — 192 bits. The
person is the gateway's internal pseudonym (never a 身份证号 or a name: a value shaped like a
resident id number is refused); without the key, two insurers cannot tell whether their
subjects are the same person, and the gateway maps a ``sub`` back only through the consent it
issued.

>>> key = bytes(range(32))
>>> a = pairwise_sub(key, 123456789, "insurer-a")
>>> b = pairwise_sub(key, 123456789, "insurer-b")
>>> len(a), a == b, a == pairwise_sub(key, "123456789", "insurer-a")
(32, False, True)
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from gateway.consent.model import looks_like_resident_id
from gateway.errors import ValidationFailed

__all__ = ["PAIRWISE_DOMAIN", "PAIRWISE_SUB_LENGTH", "pairwise_sub"]

PAIRWISE_DOMAIN = b"yibao-consent-sub\0"
PAIRWISE_SUB_LENGTH = 32
_MIN_KEY_BYTES = 32


def pairwise_sub(key: bytes, person_pseudonym: int | str, insurer_org: str) -> str:
    """The ``sub`` of ``person_pseudonym`` as seen by ``insurer_org``."""
    if len(key) < _MIN_KEY_BYTES:
        raise ValidationFailed(f"pairwise key has {len(key)} bytes, want at least {_MIN_KEY_BYTES}")
    if isinstance(person_pseudonym, bool) or not isinstance(person_pseudonym, int | str):
        raise ValidationFailed("person pseudonym must be an integer or a string")
    person = str(person_pseudonym)
    if not person or not insurer_org:
        raise ValidationFailed("person pseudonym and insurer org must not be empty")
    if "\0" in person or "\0" in insurer_org:
        raise ValidationFailed("person pseudonym and insurer org must not contain NUL")
    if looks_like_resident_id(person):
        raise ValidationFailed("a pairwise subject is derived from a pseudonym, never an id number")
    message = PAIRWISE_DOMAIN + person.encode("utf-8") + b"\0" + insurer_org.encode("utf-8")
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")[:PAIRWISE_SUB_LENGTH]
