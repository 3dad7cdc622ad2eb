"""Column scanner for the ingest hot path, and free-text scrubbing.

Per column, DuckDB does the bulk work in one vectorized query: keep only values that
could hold an identifier (a digit run shaped like an ID, mobile or card number, or a
surname followed by a plausible given-name character), collapse them to distinct values
and note each one's first row. Only those few distinct values reach Presidio.
Findings carry column, row, entity type and score, never the matched text.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from presidio_analyzer import AnalyzerEngine, RecognizerResult

from gateway.ingest.pii import lexicon
from gateway.ingest.pii.engine import LANGUAGE, default_analyzer

__all__ = [
    "DEFAULT_THRESHOLD",
    "PiiFinding",
    "digit_prefilter_regex",
    "name_prefilter_regex",
    "scan_arrow_table",
    "scrub_text",
]

DEFAULT_THRESHOLD: Final = 0.6

# How many leading rows are sampled to guess a column's cardinality, and the
# distinct/rows ratio above which filtering rows beats collapsing to distinct first.
_SAMPLE_ROWS: Final = 20_000
_HIGH_CARDINALITY: Final = 0.5

# The SQL is fixed text; the regexes travel as parameters and the column arrives as a
# registered Arrow view with fixed column names, so nothing from the data or the
# caller's column names is ever pasted into SQL.
_VIEW: Final = "pii_scan_input"
_SQL_FILTER_ROWS: Final = (
    "SELECT v, min(r) AS first_row FROM pii_scan_input"
    " WHERE regexp_matches(v, $digits) OR regexp_matches(v, $names)"
    " GROUP BY v"
)
# MATERIALIZED stops the optimizer from pushing the regex filter below the GROUP BY,
# which would run it on every row instead of every distinct value.
_SQL_DISTINCT_FIRST: Final = (
    "WITH d AS MATERIALIZED ("
    " SELECT v, min(r) AS first_row FROM pii_scan_input WHERE v IS NOT NULL GROUP BY v)"
    " SELECT v, first_row FROM d"
    " WHERE regexp_matches(v, $digits) OR regexp_matches(v, $names)"
)
_SQL_ALL_DISTINCT: Final = (
    "SELECT v, min(r) AS first_row FROM pii_scan_input WHERE v IS NOT NULL AND v <> '' GROUP BY v"
)


@dataclass(frozen=True, slots=True)
class PiiFinding:
    """An identifier found in a column: where first, what kind, how sure. Never the value."""

    column: str
    row: int
    entity_type: str
    score: float


@cache
def digit_prefilter_regex() -> str:
    """RE2 regex for values in which a number recognizer can match.

    The recognizers' shapes with their run boundaries, loosened where RE2 lacks
    lookarounds and backreferences, so it stays a superset: long codes that cannot be a
    身份证号, mobile or card (H13010200001, S20230000000) never leave DuckDB.
    """
    id_card = r"(?:^|[^0-9])[1-8][0-9]{16}[0-9Xx](?:[^0-9Xx]|$)"
    mobile = (
        r"(?:^|[^0-9A-Za-z+])(?:(?:\+|00)?86[ -]?)?1[3-9][0-9]"
        r"(?:[0-9]{8}|[ -][0-9]{4}[ -][0-9]{4})(?:[^0-9A-Za-z]|$)"
    )
    card = (
        r"(?:^|[^0-9A-Za-z])"
        r"(?:[0-9]{16,19}|[0-9]{4}(?:[ -][0-9]{4}){3}(?:[ -]?[0-9]{1,3})?)"
        r"(?:[^0-9A-Za-z]|$)"
    )
    return f"{id_card}|{mobile}|{card}"


@cache
def name_prefilter_regex() -> str:
    """RE2 regex for values in which ``ChineseNameRecognizer`` can find a candidate.

    A surname followed by a Han character that may start a given name. The class of
    allowed characters is Han minus ``NOT_NAME_GIVEN_CHARS``, so 高血压 (血) or 冠状动脉
    (状) are dropped in DuckDB; it must stay a superset of what the recognizer accepts.
    """
    allowed = _han_ranges_without(lexicon.NOT_NAME_GIVEN_CHARS)
    compounds = "|".join(sorted(lexicon.COMPOUND_SURNAMES))
    singles = "".join(sorted(lexicon.SINGLE_SURNAMES))
    return f"(?:{compounds}|[{singles}]){allowed}"


def _han_ranges_without(excluded: frozenset[str]) -> str:
    blocks = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF))  # same blocks as lexicon.is_han
    parts: list[str] = []
    for lo, hi in blocks:
        start: int | None = None
        for code in range(lo, hi + 2):
            keep = code <= hi and chr(code) not in excluded
            if keep and start is None:
                start = code
            elif not keep and start is not None:
                end = code - 1
                parts.append(
                    f"\\x{{{start:x}}}" if start == end else f"\\x{{{start:x}}}-\\x{{{end:x}}}"
                )
                start = None
    return "[" + "".join(parts) + "]"


_db_lock = threading.Lock()
_db: duckdb.DuckDBPyConnection | None = None


def _cursor() -> duckdb.DuckDBPyConnection:
    # Opening an in-memory database costs ~20 ms; a cursor on a shared one ~µs.
    global _db
    with _db_lock:
        if _db is None:
            _db = duckdb.connect()
        return _db.cursor()


def _as_text(table: pa.Table, name: str) -> Any:
    column = table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    # Numbers and dates can hold identifiers too (a tel column read as int64).
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TypeError(f"column {name!r} of type {column.type} cannot be scanned") from exc


def _candidates(
    cursor: duckdb.DuckDBPyConnection, values: Any, *, prefilter: bool
) -> list[tuple[str, int]]:
    """Distinct values worth analyzing, each with its first (0-based) row."""
    n = len(values)
    view = pa.table({"v": values, "r": pa.array(np.arange(n, dtype=np.int64))})
    if not prefilter:
        sql = _SQL_ALL_DISTINCT
        params: dict[str, str] = {}
    else:
        sample = values.slice(0, _SAMPLE_ROWS)
        distinct = pc.count_distinct(sample).as_py()
        high = len(sample) > 0 and distinct / len(sample) > _HIGH_CARDINALITY
        sql = _SQL_FILTER_ROWS if high else _SQL_DISTINCT_FIRST
        params = {"digits": digit_prefilter_regex(), "names": name_prefilter_regex()}
    cursor.register(_VIEW, view)
    try:
        rows: list[tuple[str, int]] = cursor.execute(sql, params).fetchall()
    finally:
        cursor.unregister(_VIEW)
    return rows


def _best_per_entity(results: Sequence[RecognizerResult]) -> dict[str, float]:
    best: dict[str, float] = {}
    for res in results:
        entity = str(res.entity_type)
        score = float(res.score)
        if score > best.get(entity, -1.0):
            best[entity] = score
    return best


def scan_arrow_table(
    table: pa.Table,
    columns: Sequence[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    analyzer: AnalyzerEngine | None = None,
    prefilter: bool = True,
) -> list[PiiFinding]:
    """Scan text columns for identifiers; one finding per (column, value, entity type).

    Each distinct value is analyzed once; a finding's ``row`` is the first row holding
    that value. ``prefilter`` (DuckDB regexes) is sound for the built-in recognizers;
    pass ``prefilter=False`` when the analyzer carries recognizers of other shapes.
    Returns findings sorted by (column, row, entity_type).
    """
    engine = analyzer if analyzer is not None else default_analyzer()
    findings: list[PiiFinding] = []
    cursor = _cursor()
    try:
        for name in columns:
            values = _as_text(table, name)
            for value, first_row in _candidates(cursor, values, prefilter=prefilter):
                results = engine.analyze(text=value, language=LANGUAGE, score_threshold=threshold)
                for entity, score in _best_per_entity(results).items():
                    findings.append(PiiFinding(name, int(first_row), entity, score))
    finally:
        cursor.close()
    findings.sort(key=lambda f: (f.column, f.row, f.entity_type))
    return findings


def scrub_text(
    text: str,
    analyzer: AnalyzerEngine | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> str:
    """Replace every identifier found in ``text`` with ``<ENTITY_TYPE>``."""
    engine = analyzer if analyzer is not None else default_analyzer()
    results = engine.analyze(text=text, language=LANGUAGE, score_threshold=threshold)
    # Keep the strongest of overlapping spans, then splice right to left so earlier
    # offsets stay valid.
    ordered = sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start))
    kept: list[RecognizerResult] = []
    for res in ordered:
        if all(res.end <= k.start or res.start >= k.end for k in kept):
            kept.append(res)
    out = text
    for res in sorted(kept, key=lambda r: r.start, reverse=True):
        out = f"{out[: res.start]}<{res.entity_type}>{out[res.end :]}"
    return out
