"""18-digit 居民身份证号码 (GB 11643-1999): check digit, validation and a vectorized builder."""

from __future__ import annotations

import datetime as dt

import numpy as np
import numpy.typing as npt

__all__ = ["certno_check_digit", "check_digits", "is_valid_certno"]

# W_i = 2^(17-i) mod 11 for positions 1..17 (ISO 7064 MOD 11-2).
_WEIGHTS = np.array([pow(2, 17 - i, 11) for i in range(17)], dtype=np.int64)
# Check character indexed by (sum of weighted digits) mod 11.
_CHECK = "10X98765432"


def certno_check_digit(first17: str) -> str:
    """Check character for the first 17 digits of a 身份证号.

    >>> certno_check_digit("11010519491231002")
    'X'
    >>> certno_check_digit("44052418800101001")
    '4'
    """
    if len(first17) != 17 or not first17.isdigit() or not first17.isascii():
        raise ValueError("expected exactly 17 ASCII digits")
    total = sum(int(d) * int(w) for d, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


def check_digits(first17: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Index into "0123456789X" of the check character for each 17-digit integer."""
    total = np.zeros(first17.shape, dtype=np.int64)
    rest = first17.copy()
    # Peel digits from the right: position 17 first.
    for pos in range(16, -1, -1):
        total += (rest % 10) * _WEIGHTS[pos]
        rest //= 10
    # _CHECK as digit indices, with 10 standing for 'X'.
    lookup = np.array([10 if c == "X" else int(c) for c in _CHECK], dtype=np.int64)
    return lookup[total % 11]


def is_valid_certno(certno: str) -> bool:
    """Format, birth date and check digit of an 18-character 身份证号."""
    if len(certno) != 18 or not certno[:17].isdigit() or not certno.isascii():
        return False
    try:
        dt.date(int(certno[6:10]), int(certno[10:12]), int(certno[12:14]))
    except ValueError:
        return False
    return certno_check_digit(certno[:17]) == certno[17]
