"""The de-identifying load: raw 参保人 and 结算 extracts → a new query-store version.

Order of work, each step refusing the whole load on the first problem:
1. stage both files as temporary views (Parquet, or CSV read as text) with row numbers;
2. columns against the catalog (undeclared or missing → refuse);
3. values against their declared types and code lists (malformed → refuse, naming row/column);
4. every text column that would enter the store scanned for identifiers (Presidio, each
   distinct value once, after a DuckDB prefilter);
5. build the tables of the new version in a temporary file: pseudonymized person keys
   (HMAC in DuckDB, key passed as parameters), generalized birth date and address, a person-year
   table for pricing; direct identifiers dropped;
6. publish atomically (``StoreLayout.publish``): until then the previous version serves.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
from sqlglot import exp

from gateway.catalog import Catalog, FieldType, Source, Transform, default_catalog
from gateway.consent.lookup import LOOKUP_DOMAIN
from gateway.errors import IngestRejected
from gateway.ingest.generalize import AGE_BANDS
from gateway.ingest.pseudonym import PSEUDONYM_HEX_DIGITS, hmac_pads
from gateway.ingest.validate import ROW_COLUMN, check_columns, check_values
from gateway.query.store import StoreLayout

__all__ = ["LoadReport", "ingest"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LoadReport:
    data_version: str
    persons: int
    settlements: int
    person_years: int
    unplaced_addresses: int
    seconds: float

    @property
    def settlement_rows_per_s(self) -> float:
        return self.settlements / self.seconds if self.seconds > 0 else 0.0


def _noop(_: str) -> None:
    return None


def _stage(con: duckdb.DuckDBPyConnection, view: str, path: Path) -> list[str]:
    """Create a temp view with a 1-based row number; returns the file's own columns."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        reader = exp.func(
            "read_parquet",
            exp.Literal.string(str(path)),
            exp.EQ(this=exp.column("file_row_number"), expression=exp.true()),
        )
        row: exp.Expression = exp.Add(
            this=exp.column("file_row_number"), expression=exp.Literal.number(1)
        )
        hidden = {"file_row_number"}
    elif suffix == ".csv":
        reader = exp.func(
            "read_csv",
            exp.Literal.string(str(path)),
            exp.EQ(this=exp.column("all_varchar"), expression=exp.true()),
            exp.EQ(this=exp.column("header"), expression=exp.true()),
        )
        row = exp.Window(this=exp.RowNumber())
        hidden = set()
    else:
        raise IngestRejected("unsupported file type (use .parquet or .csv)", file=path.name)
    source = exp.select("*").from_(exp.Table(this=reader))
    try:
        described = con.execute(f"DESCRIBE {source.sql(dialect='duckdb')}").fetchall()
    except duckdb.Error as exc:
        raise IngestRejected("file cannot be read", file=path.name) from exc
    columns = [str(r[0]) for r in described if r[0] not in hidden]
    if ROW_COLUMN in columns:
        raise IngestRejected("column is not declared in the catalog", file=path.name,
                             column=ROW_COLUMN)
    select = exp.select(row.as_(ROW_COLUMN), *[exp.column(c) for c in columns]).from_(
        exp.Table(this=reader)
    )
    con.execute(f"CREATE TEMP VIEW {view} AS {select.sql(dialect='duckdb')}")
    return columns


def _scan_text_columns(
    con: duckdb.DuckDBPyConnection, view: str, file: str, source: Source
) -> None:
    """Refuse the load if a stored text column carries an identifier."""
    from gateway.ingest.pii import scan_arrow_table  # heavy import, only when loading

    for name, field in source.fields.items():
        if field.type is not FieldType.STRING or field.transform not in (
            Transform.KEEP,
            Transform.SCAN,
        ):
            continue
        distinct = (
            exp.select(
                exp.column(name).as_("value"),
                exp.Min(this=exp.column(ROW_COLUMN)).as_("first_row"),
            )
            .from_(view)
            .where(exp.not_(exp.Is(this=exp.column(name), expression=exp.null())))
            .group_by(exp.column(name))
            .order_by("first_row")
        )
        values: pa.Table = con.sql(distinct.sql(dialect="duckdb")).to_arrow_table()
        findings = scan_arrow_table(values, ["value"])
        if findings:
            first = min(findings, key=lambda f: f.row)
            row = int(values.column("first_row")[first.row].as_py())
            raise IngestRejected(
                f"identifier found by the PII scan ({first.entity_type})",
                file=file,
                row=row,
                column=name,
            )


def _age_band_sql(age: str) -> str:
    whens = " ".join(
        f"WHEN {age} >= {low} THEN '{label}'" for label, low in reversed(AGE_BANDS)
    )
    return f"CASE {whens} END"


def _address_prefixes() -> list[tuple[str, str]]:
    from gateway.synth.regions import address_prefixes

    return address_prefixes()


_PSEUDONYM = (
    "('0x' || substr(sha256($opad::BLOB || unhex(sha256($ipad::BLOB || encode({col})))), 1, "
    + str(PSEUDONYM_HEX_DIGITS)
    + "))::BIGINT"
)

# The keyed certno lookup (gateway.consent.lookup): HMAC-SHA256 under the separate lookup
# key, full 64 hex digits, of the domain tag and the normalized certno. The raw certno never
# leaves this load's temporary views.
_LOOKUP = (
    "sha256($lopad::BLOB || unhex(sha256($lipad::BLOB || "
    "encode('" + LOOKUP_DOMAIN + "' || upper(trim({col}))))))"
)


def _build_lookup(con: duckdb.DuckDBPyConnection, lookup_key: bytes, persons_file: str,
                  progress: Progress) -> None:
    """``person_lookup (lookup, psn_id)``, sorted by ``lookup`` so one row is a point read:
    the serving side resolves a 身份证号 with the lookup key, never with the ingest key."""
    progress("writing the keyed certno lookup")
    ipad, opad = hmac_pads(lookup_key)
    # Module constants only; the key arrives as bound parameters.
    con.execute(
        "CREATE TABLE person_lookup AS SELECT "  # noqa: S608
        + _LOOKUP.format(col="r.certno")
        + " AS lookup, m.psn_id FROM raw_persons r JOIN psn_map m ON r._row = m._row "
        "WHERE r.certno IS NOT NULL ORDER BY lookup",
        {"lipad": ipad, "lopad": opad},
    )
    dup = con.execute(
        "SELECT min(m._row) FROM person_lookup l JOIN psn_map m ON l.psn_id = m.psn_id "
        "WHERE l.lookup IN (SELECT lookup FROM person_lookup GROUP BY lookup "
        "HAVING count(*) > 1)"
    ).fetchall()[0]
    if dup is not None and dup[0] is not None:
        # One 身份证号, two persons: a consent could name the wrong one.
        raise IngestRejected("duplicate resident id number", file=persons_file,
                             row=int(dup[0]), column="certno")
    # The consented person endpoint reads one person's settlements: a copy of the fields it
    # may answer, sorted by person, so DuckDB's zone maps skip every other row group (a point
    # read instead of a scan of all settlements).
    progress("sorting settlements by person for the consented reads")
    con.execute(
        "CREATE TABLE person_settlements AS SELECT psn_id, setl_time, med_type, hosp_lv, "
        "fixmedins_code, dise_codg, medfee_sumamt, inscp_scp_amt, fulamt_ownpay_amt, "
        "overlmt_selfpay, hifp_pay, hifmi_pay, maf_pay, acct_pay, psn_cash_pay, psn_part_amt "
        "FROM settlements ORDER BY psn_id, setl_time"
    )


def _amount_columns(catalog: Catalog) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The settlement source's decimal fields, and the person-year measures that are yearly
    sums of them: the catalog is the one list."""
    amounts = tuple(
        name
        for name, field in catalog.sources["settlements"].fields.items()
        if field.type is FieldType.DECIMAL
    )
    yearly = tuple(m for m in catalog.datasets["person_years"].measures if m in amounts)
    return amounts, yearly


def _build_tables(
    con: duckdb.DuckDBPyConnection,
    key: bytes,
    persons_file: str,
    catalog: Catalog,
    progress: Progress,
) -> int:
    amount_columns, yearly_columns = _amount_columns(catalog)
    ipad, opad = hmac_pads(key)
    params = {"ipad": ipad, "opad": opad}
    progress("pseudonymizing persons")
    con.execute("CREATE TEMP TABLE addr_prefix (prefix VARCHAR, plen INTEGER, code VARCHAR)")
    con.executemany(
        "INSERT INTO addr_prefix VALUES (?, ?, ?)",
        [(prefix, len(prefix), code) for prefix, code in _address_prefixes()],
    )
    # The raw psn_no → pseudonym map lives only in this temp table, never in the store file.
    # No address prefix starts another, so at most one matches; cutting each address to every
    # prefix length turns the match into a hash join.
    con.execute(
        "CREATE TEMP TABLE addr_placed AS "
        "WITH cand AS (SELECT r._row, left(r.addr, l.plen) AS pre FROM raw_persons r, "
        "(SELECT DISTINCT plen FROM addr_prefix) l) "
        "SELECT cand._row, a.code FROM cand JOIN addr_prefix a ON cand.pre = a.prefix"
    )
    con.execute(
        "CREATE TEMP TABLE psn_map AS SELECT r.psn_no, "
        + _PSEUDONYM.format(col="r.psn_no")
        + " AS psn_id, r._row, r.gend, year(r.brdy::DATE) AS birth_year, r.insutype, "
        "r.insu_admdvs, a.code AS addr_admdvs, r.psn_insu_date::DATE AS psn_insu_date, "
        "r.insu_end_date::DATE AS insu_end_date "
        "FROM raw_persons r LEFT JOIN addr_placed a ON r._row = a._row",
        params,
    )
    dup = con.execute(
        "SELECT min(_row) FROM (SELECT _row, count(*) OVER (PARTITION BY psn_no) AS n "
        "FROM psn_map) WHERE n > 1"
    ).fetchall()[0]
    if dup is not None and dup[0] is not None:
        raise IngestRejected("duplicate person or ambiguous address", file=persons_file,
                             row=int(dup[0]), column="psn_no")
    collisions = con.execute(
        "SELECT count(*) - count(DISTINCT psn_id) FROM psn_map"
    ).fetchall()[0]
    if collisions is not None and collisions[0]:
        # Astronomically unlikely with 60 bits; refuse rather than merge two people.
        raise IngestRejected("pseudonym collision; rotate the key and reload",
                             file=persons_file, column="psn_no")
    con.execute(
        "CREATE TABLE persons AS SELECT psn_id, gend, birth_year, insutype, insu_admdvs, "
        "addr_admdvs, psn_insu_date, insu_end_date FROM psn_map ORDER BY psn_id"
    )
    unplaced_row = con.execute(
        "SELECT count(*) FROM psn_map WHERE addr_admdvs IS NULL"
    ).fetchall()[0]
    unplaced = int(unplaced_row[0]) if unplaced_row else 0

    progress("joining settlements to persons")
    amounts = ", ".join(f"s.{a}::DECIMAL(18,2) AS {a}" for a in amount_columns)
    age = "(year(s.setl_time::TIMESTAMP) - p.birth_year)"
    con.execute(
        "CREATE TABLE settlements AS SELECT "
        "p.psn_id, s.med_type, s.fixmedins_code, s.hosp_lv, "
        "s.setl_time::TIMESTAMP AS setl_time, year(s.setl_time::TIMESTAMP) AS year, "
        "s.dise_codg, s.dise_name, "
        + amounts
        + ", p.gend, "
        + _age_band_sql(age)
        + " AS age_band, p.insutype, p.insu_admdvs "
        "FROM raw_settlements s JOIN psn_map p ON s.psn_no = p.psn_no"
    )

    progress("deriving person-years")
    sums = ", ".join(f"sum({a}) AS {a}" for a in yearly_columns)
    coalesced = ", ".join(f"coalesce(agg.{a}, 0)::DECIMAL(18,2) AS {a}" for a in yearly_columns)
    # Fragments below are module constants; no input reaches this text.
    con.execute(
        "CREATE TABLE person_years AS "  # noqa: S608
        "WITH bounds AS (SELECT min(year) AS lo, max(year) AS hi FROM settlements), "
        "years AS (SELECT unnest(range(lo, hi + 1)) AS year FROM bounds), "
        "py AS (SELECT p.psn_id, y.year, p.gend, p.birth_year, p.insutype, p.insu_admdvs, "
        "greatest(0, date_diff('day', greatest(p.psn_insu_date, make_date(y.year, 1, 1)), "
        "least(coalesce(p.insu_end_date, DATE '9999-12-31'), make_date(y.year + 1, 1, 1)))) "
        "/ date_diff('day', make_date(y.year, 1, 1), make_date(y.year + 1, 1, 1)) AS exposure "
        "FROM persons p CROSS JOIN years y), "
        "agg AS (SELECT psn_id, year, count(*) AS setl_cnt, "
        + sums
        + " FROM settlements GROUP BY psn_id, year) "
        "SELECT py.psn_id, py.year, py.gend, "
        + _age_band_sql("(py.year - py.birth_year)")
        + " AS age_band, py.insutype, py.insu_admdvs, py.exposure::DOUBLE AS exposure, "
        "coalesce(agg.setl_cnt, 0) AS setl_cnt, "
        + coalesced
        + " FROM py LEFT JOIN agg USING (psn_id, year) WHERE py.exposure > 0"
    )
    return unplaced


def _check_references(con: duckdb.DuckDBPyConnection, file: str) -> None:
    orphan = con.execute(
        "SELECT min(s._row) FROM raw_settlements s ANTI JOIN psn_map p ON s.psn_no = p.psn_no"
    ).fetchall()[0]
    if orphan is not None and orphan[0] is not None:
        raise IngestRejected("settlement refers to an unknown person", file=file,
                             row=int(orphan[0]), column="psn_no")


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    query = exp.select(exp.func("count", exp.Star())).from_(table)
    return int(con.execute(query.sql("duckdb")).fetchall()[0][0])


def new_version_name(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"v{stamp}-{secrets.token_hex(3)}"


def ingest(
    persons_file: Path,
    settlements_file: Path,
    *,
    store_dir: Path,
    key: bytes,
    catalog: Catalog | None = None,
    progress: Progress = _noop,
    threads: int | None = None,
    before_publish: Callable[[], None] | None = None,
    lookup_key: bytes | None = None,
) -> LoadReport:
    """Load, de-identify and publish a new version; the previous one serves until the swap.

    ``lookup_key`` (the consent service's, not the ingest key) adds the consent service's
    tables: the keyed 身份证号 lookup ``person_lookup`` (see :mod:`gateway.consent.lookup`)
    and ``person_settlements``, the person-level settlement fields sorted by person.

    ``before_publish`` is a test seam: it runs after the new file is complete and closed,
    just before the swap.
    """
    catalog = catalog or default_catalog()
    layout = StoreLayout(store_dir)
    layout.tmp.mkdir(parents=True, exist_ok=True)
    version = new_version_name()
    building = layout.tmp / f"{version}.duckdb"
    started = time.perf_counter()
    config: dict[str, str | bool | int | float | list[str]] = (
        {"threads": threads} if threads else {}
    )
    con = duckdb.connect(str(building), config=config)
    try:
        con.execute("SET enable_progress_bar = false")
        progress("checking schema")
        sources = (
            ("raw_persons", persons_file, catalog.sources["persons"]),
            ("raw_settlements", settlements_file, catalog.sources["settlements"]),
        )
        for view, path, source in sources:
            columns = _stage(con, view, path)
            check_columns(path.name, columns, source)
        allowed = {
            name: dim.values
            for ds in catalog.datasets.values()
            for name, dim in ds.dimensions.items()
            if dim.values is not None and name != "age_band"
        }
        for view, path, source in sources:
            progress(f"checking values of {path.name}")
            check_values(con, path.name, view, source, allowed)
        for view, path, source in sources:
            progress(f"scanning text columns of {path.name}")
            _scan_text_columns(con, view, path.name, source)
        unplaced = _build_tables(con, key, persons_file.name, catalog, progress)
        if lookup_key is not None:
            _build_lookup(con, lookup_key, persons_file.name, progress)
        _check_references(con, settlements_file.name)
        counts = {t: _count(con, t) for t in ("persons", "settlements", "person_years")}
        con.execute("CREATE TABLE _meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        meta = {
            "data_version": version,
            "loaded_at": datetime.now(UTC).isoformat(),
            "persons_file": persons_file.name,
            "settlements_file": settlements_file.name,
            **{f"rows_{t}": str(n) for t, n in counts.items()},
        }
        con.executemany("INSERT INTO _meta VALUES (?, ?)", list(meta.items()))
        con.execute("CHECKPOINT")
    except BaseException:
        con.close()
        with contextlib.suppress(FileNotFoundError):
            building.unlink()
        with contextlib.suppress(FileNotFoundError):
            Path(f"{building}.wal").unlink()
        raise
    con.close()
    if before_publish is not None:
        before_publish()
    progress("publishing")
    layout.publish(version, building)
    elapsed = time.perf_counter() - started
    return LoadReport(
        data_version=version,
        persons=counts["persons"],
        settlements=counts["settlements"],
        person_years=counts["person_years"],
        unplaced_addresses=unplaced,
        seconds=elapsed,
    )


def remove_stale_builds(store_dir: Path, keep: Sequence[str] = ()) -> int:
    """Delete leftovers of killed loads under tmp/ (never a published version)."""
    layout = StoreLayout(store_dir)
    removed = 0
    if layout.tmp.exists():
        for path in layout.tmp.iterdir():
            if path.name not in keep:
                path.unlink()
                removed += 1
    return removed
