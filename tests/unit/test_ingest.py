"""De-identifying ingest: no raw identifier reaches the store; bad loads are refused whole;
a killed or failed load leaves the previous version serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from gateway.errors import IngestRejected
from gateway.ingest.pipeline import ingest, remove_stale_builds
from gateway.ingest.pseudonym import pseudonym
from gateway.query.store import QueryStore, StoreLayout
from gateway.synth import CityFiles, generate_city
from tests.conftest import PSEUDONYM_KEY, LoadedStore

KEY = PSEUDONYM_KEY


def _store_file(store_dir: Path) -> Path:
    layout = StoreLayout(store_dir)
    version = layout.current_version()
    assert version is not None
    return layout.version_path(version)


def test_no_raw_identifier_anywhere_in_the_store(
    city: CityFiles, loaded_store: LoadedStore
) -> None:
    persons = pq.read_table(city.persons)
    identifiers = {
        name: [str(v) for v in persons.column(name).to_pylist()]
        for name in ("psn_no", "certno", "psn_name", "tel", "addr")
    }
    path = _store_file(loaded_store.store_dir)
    blob = path.read_bytes()
    for name in ("psn_no", "certno", "tel", "addr"):
        leaked = [v for v in identifiers[name] if v.encode("utf-8") in blob]
        assert not leaked, f"{len(leaked)} raw {name} values found in the store file"
    # Names are short: look for them as whole stored values (the file may compress strings).
    with duckdb.connect(str(path), read_only=True) as con:
        con.execute("CREATE TEMP TABLE raw_ids (v VARCHAR)")
        values = [v for vs in identifiers.values() for v in vs]
        con.executemany("INSERT INTO raw_ids VALUES (?)", [(v,) for v in values])
        text_columns = con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() "
            "WHERE data_type = 'VARCHAR' AND database_name NOT IN ('temp', 'system')"
        ).fetchall()
        assert text_columns
        for table, column in text_columns:
            # Distinct stored values first: the containment join is then small.
            hits = con.execute(
                f'WITH d AS (SELECT DISTINCT "{column}" AS s FROM "{table}") '  # noqa: S608
                "SELECT count(*) FROM d JOIN raw_ids r ON contains(d.s, r.v)").fetchall()
            assert hits == [(0,)], f"{table}.{column} holds raw identifiers"
        # The person key is the keyed pseudonym, not the raw number.
        stored = {r[0] for r in con.execute("SELECT psn_id FROM persons").fetchall()}
        raw_numbers = {int(v) for v in identifiers["psn_no"] if v.isdigit()}
        assert not stored & raw_numbers
        assert stored == {pseudonym(KEY, v) for v in identifiers["psn_no"]}


def test_generalized_quasi_identifiers(loaded_store: LoadedStore) -> None:
    with duckdb.connect(str(_store_file(loaded_store.store_dir)), read_only=True) as con:
        columns = {r[0] for r in con.execute("DESCRIBE persons").fetchall()}
        assert not {"brdy", "addr", "certno", "tel", "psn_name", "psn_no"} & columns
        assert {"birth_year", "addr_admdvs"} <= columns
        codes = con.execute("SELECT DISTINCT addr_admdvs FROM persons").fetchall()
        assert all(c[0] is None or (len(c[0]) == 6 and c[0].startswith("42")) for c in codes)
        bands = {r[0] for r in con.execute("SELECT DISTINCT age_band FROM settlements").fetchall()}
        assert bands <= {"0-17", "18-29", "30-39", "40-49", "50-59", "60-69", "70-79", "80+"}


def test_person_years_agree_with_settlements(loaded_store: LoadedStore) -> None:
    with duckdb.connect(str(_store_file(loaded_store.store_dir)), read_only=True) as con:
        (py_sum, py_cnt) = con.execute(
            "SELECT sum(medfee_sumamt), sum(setl_cnt) FROM person_years").fetchone() or (0, 0)
        (s_sum, s_cnt) = con.execute(
            "SELECT sum(medfee_sumamt), count(*) FROM settlements s WHERE EXISTS "
            "(SELECT 1 FROM person_years p WHERE p.psn_id = s.psn_id AND p.year = s.year)"
        ).fetchone() or (0, 0)
        assert (py_sum, py_cnt) == (s_sum, s_cnt)
        bad = con.execute(
            "SELECT count(*) FROM person_years WHERE exposure <= 0 OR exposure > 1").fetchone()
        assert bad == (0,)


def _write_variant(src: Path, dst: Path, table: pa.Table) -> Path:
    if dst.suffix == ".csv":
        pacsv.write_csv(table, dst)
    else:
        pq.write_table(table, dst)
    return dst


def test_undeclared_column_is_refused(city: CityFiles, tmp_path: Path) -> None:
    persons = pq.read_table(city.persons)
    extra = persons.append_column("religion", pa.array(["x"] * persons.num_rows))
    bad = _write_variant(city.persons, tmp_path / "persons.parquet", extra)
    with pytest.raises(IngestRejected) as info:
        ingest(bad, city.settlements, store_dir=tmp_path / "store", key=KEY)
    assert info.value.column == "religion"
    assert info.value.file == "persons.parquet"
    assert StoreLayout(tmp_path / "store").current_version() is None


def test_malformed_value_names_row_and_column(city: CityFiles, tmp_path: Path) -> None:
    settlements = pq.read_table(city.settlements)
    text_schema = pa.schema([pa.field(f.name, pa.string()) for f in settlements.schema])
    as_text = settlements.cast(text_schema)
    setl_time = as_text.column("setl_time").to_pylist()
    setl_time[41] = "2024-13-45 99:00:00"
    broken = as_text.set_column(as_text.schema.get_field_index("setl_time"), "setl_time",
                                pa.array(setl_time))
    bad = _write_variant(city.settlements, tmp_path / "settlements.csv", broken)
    with pytest.raises(IngestRejected) as info:
        ingest(city.persons, bad, store_dir=tmp_path / "store", key=KEY)
    assert (info.value.row, info.value.column) == (42, "setl_time")
    assert "2024-13-45" not in str(info.value)


def test_code_outside_its_list_is_refused(city: CityFiles, tmp_path: Path) -> None:
    persons = pq.read_table(city.persons)
    gend = persons.column("gend").to_pylist()
    gend[7] = "M"
    broken = persons.set_column(persons.schema.get_field_index("gend"), "gend", pa.array(gend))
    bad = _write_variant(city.persons, tmp_path / "persons.parquet", broken)
    with pytest.raises(IngestRejected) as info:
        ingest(bad, city.settlements, store_dir=tmp_path / "store", key=KEY)
    assert (info.value.row, info.value.column) == (8, "gend")


def test_identifier_hidden_in_a_text_column_is_refused(city: CityFiles, tmp_path: Path) -> None:
    settlements = pq.read_table(city.settlements)
    persons = pq.read_table(city.persons)
    certno = persons.column("certno")[0].as_py()
    names = settlements.column("dise_name").to_pylist()
    names[100] = f"高血压 患者身份证{certno}"
    broken = settlements.set_column(settlements.schema.get_field_index("dise_name"),
                                    "dise_name", pa.array(names))
    bad = _write_variant(city.settlements, tmp_path / "settlements.parquet", broken)
    with pytest.raises(IngestRejected) as info:
        ingest(city.persons, bad, store_dir=tmp_path / "store", key=KEY)
    assert (info.value.row, info.value.column) == (101, "dise_name")
    assert "CN_ID_CARD" in info.value.message
    assert certno not in info.value.message


def test_unknown_person_in_settlements_is_refused(city: CityFiles, tmp_path: Path) -> None:
    settlements = pq.read_table(city.settlements)
    psn = settlements.column("psn_no").to_pylist()
    psn[5] = "99999999999999"
    broken = settlements.set_column(settlements.schema.get_field_index("psn_no"), "psn_no",
                                    pa.array(psn))
    bad = _write_variant(city.settlements, tmp_path / "settlements.parquet", broken)
    with pytest.raises(IngestRejected) as info:
        ingest(city.persons, bad, store_dir=tmp_path / "store", key=KEY)
    assert (info.value.row, info.value.column) == (6, "psn_no")


def _answers(store_dir: Path) -> list[tuple[object, ...]]:
    store = QueryStore(StoreLayout(store_dir))
    _, rows, _ = store.fetch(
        "SELECT gend, count(*), sum(psn_part_amt) FROM settlements GROUP BY gend ORDER BY gend")
    return rows


def test_failed_load_leaves_previous_version(city: CityFiles, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    first = ingest(city.persons, city.settlements, store_dir=store_dir, key=KEY)
    before = _answers(store_dir)
    half = pq.read_table(city.settlements)
    half = half.filter(pc.equal(half.column("med_type"), "21"))
    smaller = _write_variant(city.settlements, tmp_path / "settlements.parquet", half)

    def crash() -> None:
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        ingest(city.persons, smaller, store_dir=store_dir, key=KEY, before_publish=crash)
    assert StoreLayout(store_dir).current_version() == first.data_version
    assert _answers(store_dir) == before
    # The next good load does switch.
    second = ingest(city.persons, smaller, store_dir=store_dir, key=KEY)
    assert StoreLayout(store_dir).current_version() == second.data_version
    assert _answers(store_dir) != before


_KILL_SCRIPT = """
import sys
from pathlib import Path
from gateway.ingest.pipeline import ingest
ingest(Path(sys.argv[1]), Path(sys.argv[2]), store_dir=Path(sys.argv[3]), key=bytes(range(32)))
"""


def test_load_killed_half_way_leaves_previous_version(
    city: CityFiles, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    store_dir = tmp_path / "store"
    first = ingest(city.persons, city.settlements, store_dir=store_dir, key=KEY)
    before = _answers(store_dir)
    bigger = generate_city(tmp_path_factory.mktemp("bigger"), persons=60_000, seed=5,
                           progress=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(bigger.persons), str(bigger.settlements),
         str(store_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_dir = StoreLayout(store_dir).tmp
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        building = [p for p in tmp_dir.iterdir() if p.suffix == ".duckdb"]
        if building and building[0].stat().st_size > 0:
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the load never started building")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert StoreLayout(store_dir).current_version() == first.data_version
    assert _answers(store_dir) == before
    assert remove_stale_builds(store_dir) >= 1
    assert _answers(store_dir) == before
