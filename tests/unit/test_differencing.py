"""The difference check's pieces: boxes, the candidate filter and the one-scan SQL, checked
against a literal reference (Python sets over a small random table run on DuckDB)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import duckdb
import pytest

from gateway.catalog import default_catalog
from gateway.disclosure.differencing import (
    NULL_VALUE,
    Box,
    Domains,
    Pair,
    ReleasedCell,
    box_key,
    box_of_cell,
    boxes_of_cells,
    candidate_pairs,
    difference_sql,
    normalize,
    one_dimension_difference,
    small_differences,
)

DATASET = default_catalog().datasets["settlements"]
DOMAINS: dict[str, list[Any]] = {"gend": ["1", "2"], "hosp_lv": ["1", "2", "3", "9"],
                                 "year": [2023, 2024], "insu_admdvs": ["A", "B", "C", None]}


@pytest.fixture(scope="module")
def table() -> Iterator[tuple[duckdb.DuckDBPyConnection, list[tuple[Any, ...]]]]:
    rng = random.Random(3)
    rows = [(rng.randrange(60), rng.choice(DOMAINS["gend"]), rng.choice(DOMAINS["hosp_lv"]),
             rng.choice(DOMAINS["year"]), rng.choice(DOMAINS["insu_admdvs"]))
            for _ in range(400)]
    con = duckdb.connect()
    con.execute("CREATE TABLE settlements (psn_id BIGINT, gend VARCHAR, hosp_lv VARCHAR, "
                "year BIGINT, insu_admdvs VARCHAR)")
    con.executemany("INSERT INTO settlements VALUES (?, ?, ?, ?, ?)", rows)
    yield con, rows
    con.close()


def _inside(row: tuple[Any, ...], box: Box) -> bool:
    values = dict(zip(["psn_id", "gend", "hosp_lv", "year", "insu_admdvs"], row, strict=True))
    return all((NULL_VALUE if values[d] is None else str(values[d])) in vs for d, vs in box)


def _reference(rows: list[tuple[Any, ...]], a: Box, b: Box) -> int:
    """Persons with a record in exactly one of the two boxes, by brute force."""
    return len({r[0] for r in rows if _inside(r, a) != _inside(r, b)})


def _random_box(rng: random.Random) -> Box:
    filters = {d: rng.sample(vs, rng.randint(1, len(vs)))
               for d, vs in DOMAINS.items() if rng.random() < 0.5}
    return box_of_cell(filters, [], [])


def test_box_of_cell_narrows_the_filters_by_the_group_values() -> None:
    box = box_of_cell({"year": [2024], "gend": ["1", "2"]}, ["gend", "hosp_lv"], ["2", None])
    assert box == (("gend", ("2",)), ("hosp_lv", (NULL_VALUE,)), ("year", ("2024",)))
    assert box_key("settlements", box) == box_key("settlements", box)
    assert box_key("settlements", box) != box_key("person_years", box)


def test_difference_sql_counts_what_the_reference_counts(
    table: tuple[duckdb.DuckDBPyConnection, list[tuple[Any, ...]]]
) -> None:
    con, rows = table
    rng = random.Random(8)
    pairs = [(_random_box(rng), _random_box(rng)) for _ in range(60)]
    pairs += [(((("gend", ("1",)),)), (("gend", ("1",)), ("year", ("2024",))))]
    sql = difference_sql(pairs, DATASET).sql("duckdb")
    got = con.execute(sql).fetchall()[0]
    assert list(got) == [_reference(rows, a, b) for a, b in pairs]


def test_null_group_values_are_inside_their_box(
    table: tuple[duckdb.DuckDBPyConnection, list[tuple[Any, ...]]]
) -> None:
    con, rows = table
    nulls = box_of_cell({}, ["insu_admdvs"], [None])
    everyone: Box = ()
    sql = difference_sql([(nulls, everyone)], DATASET).sql("duckdb")
    assert con.execute(sql).fetchall()[0][0] == _reference(rows, nulls, everyone)


def test_the_candidate_filter_never_drops_a_small_difference(
    table: tuple[duckdb.DuckDBPyConnection, list[tuple[Any, ...]]]
) -> None:
    _, rows = table
    rng = random.Random(21)
    boxes = [_random_box(rng) for _ in range(150)]
    inside = [frozenset(i for i, r in enumerate(rows) if _inside(r, b)) for b in boxes]
    persons = [len({rows[i][0] for i in s}) for s in inside]
    diff = {(a, b): len({rows[i][0] for i in inside[a] ^ inside[b]})
            for a in range(75) for b in range(75, 150)}
    for k in (2, 5, 10):
        released = sorted((ReleasedCell(b, n, f"rel-{i}") for i, (b, n)
                           in enumerate(zip(boxes[:75], persons[:75], strict=True))),
                          key=lambda c: c.n_persons)
        new = [(i, boxes[i], persons[i]) for i in range(75, 150)]
        found = {(p.row, p.earlier.release_id) for p in candidate_pairs(new, released, k=k)}
        for row, box, _ in new:
            for cell in released:
                d = diff[(int(cell.release_id[4:]), row)]
                if 1 <= d <= k - 1:
                    assert (row, cell.release_id) in found, (box, cell.box, d)


def test_small_differences_keep_the_first_close_release_per_row() -> None:
    a, b = ReleasedCell((), 40, "rel-a"), ReleasedCell((), 41, "rel-b")
    hits = small_differences([Pair(0, a), Pair(0, b), Pair(1, a), Pair(2, a)], [3, 1, 10, 0],
                             k=10)
    assert {r: p.earlier.release_id for r, p in hits.items()} == {0: "rel-a"}


def test_identical_and_disjoint_boxes_are_not_candidates() -> None:
    box = (("gend", ("1",)),)
    released = [ReleasedCell(box, 50, "rel-1"), ReleasedCell((("gend", ("2",)),), 52, "rel-2")]
    assert candidate_pairs([(0, box, 50)], released, k=10) == []
    # Disjoint but both tiny: everyone differs, yet that is fewer than k persons.
    tiny = [ReleasedCell((("gend", ("2",)),), 3, "rel-3")]
    assert len(candidate_pairs([(0, box, 4)], tiny, k=10)) == 1


# -- the fast paths against literal references ------------------------------------------------

def _reference_candidates(new: list[tuple[int, Box, int]], released: list[ReleasedCell],
                          k: int) -> list[Pair]:
    """Every pair, filtered by the three rules as written in candidate_pairs' docstring."""
    def disjoint(a: Box, b: Box) -> bool:
        other = dict(b)
        return any(d in other and not set(vs) & set(other[d]) for d, vs in a)

    return [Pair(row, cell) for row, box, n in new for cell in released
            if abs(cell.n_persons - n) <= k - 1 and cell.box != box
            and not (disjoint(cell.box, box) and max(cell.n_persons, n) >= k)]


def _reference_one_dimension_difference(a: Box, b: Box, domains: Domains) -> Box | None:
    def values(box: Box, d: str) -> frozenset[str] | None:
        for name, vs in box:
            if name == d:
                return frozenset(vs)
        return domains.get(d)

    differing = [d for d in {d for d, _ in a} | {d for d, _ in b}
                 if values(a, d) != values(b, d)]
    if len(differing) != 1:
        return None
    d = differing[0]
    va, vb = values(a, d), values(b, d)
    if va is None or vb is None:
        return None
    larger, smaller, box = (va, vb, a) if vb < va else (vb, va, b)
    if not smaller < larger:
        return None
    rest = tuple(item for item in box if item[0] != d)
    return normalize(tuple(sorted([*rest, (d, tuple(sorted(larger - smaller)))])), domains)


_TEXT_DOMAINS: Domains = {d: frozenset(NULL_VALUE if v is None else str(v) for v in vs)
                          for d, vs in DOMAINS.items()}


def test_candidate_pairs_match_the_literal_rules() -> None:
    rng = random.Random(5)
    boxes = [normalize(_random_box(rng), _TEXT_DOMAINS) for _ in range(120)]
    for k in (2, 5, 10):
        released = sorted((ReleasedCell(b, rng.randint(1, 30), f"rel-{i}")
                           for i, b in enumerate(boxes[:60])), key=lambda c: c.n_persons)
        new = [(i, boxes[i], rng.randint(1, 30)) for i in range(60, 120)]
        assert candidate_pairs(new, released, k=k) == _reference_candidates(new, released, k)


def test_one_dimension_difference_matches_the_literal_definition() -> None:
    rng = random.Random(8)
    boxes = [normalize(_random_box(rng), _TEXT_DOMAINS) for _ in range(150)]
    open_domain = {d: v for d, v in _TEXT_DOMAINS.items() if d != "insu_admdvs"}
    found = 0
    for a in boxes:
        for b in boxes:
            for domains in (_TEXT_DOMAINS, open_domain):
                got = one_dimension_difference(a, b, domains)
                assert got == _reference_one_dimension_difference(a, b, domains), (a, b)
                found += got is not None
    assert found > 100  # the comparison met the interesting case often


def test_boxes_of_cells_equal_normalized_boxes_of_each_cell() -> None:
    rng = random.Random(13)
    names = list(DOMAINS)
    for _ in range(200):
        dims = rng.sample(names, rng.randint(0, 3))
        filters = {d: rng.sample(vs, rng.randint(1, len(vs)))
                   for d, vs in DOMAINS.items() if rng.random() < 0.5}
        filters |= {d: ["Z"] for d in names if d not in filters and rng.random() < 0.1}
        keys = [[rng.choice(DOMAINS[d] + ["Z"]) for d in dims] for _ in range(20)]
        want = [normalize(box_of_cell(filters, dims, key), _TEXT_DOMAINS) for key in keys]
        assert boxes_of_cells(filters, dims, keys, _TEXT_DOMAINS) == want
