"""Generalization of quasi-identifiers: birth date → birth year → age band per year."""

from __future__ import annotations

__all__ = ["AGE_BANDS", "age_band"]

# (label, lowest age) in ascending order; the catalog lists the same labels.
AGE_BANDS: tuple[tuple[str, int], ...] = (
    ("0-17", 0),
    ("18-29", 18),
    ("30-39", 30),
    ("40-49", 40),
    ("50-59", 50),
    ("60-69", 60),
    ("70-79", 70),
    ("80+", 80),
)


def age_band(age: int) -> str:
    """Age band of an age in whole years.

    >>> age_band(0), age_band(17), age_band(18), age_band(79), age_band(104)
    ('0-17', '0-17', '18-29', '70-79', '80+')
    """
    if age < 0:
        raise ValueError("age must not be negative")
    label = AGE_BANDS[0][0]
    for name, low in AGE_BANDS:
        if age >= low:
            label = name
    return label
