"""Disclosure control of one aggregate answer, across requests: what the gateway does between
the policy's allow and the response (docs/disclosure.md).

1. run the compiled query (or, when the grant asks for noise, its bounded form);
2. difference check against every cell released before on this data version (any insurer);
3. primary, dominance / p %, difference and complementary suppression (:func:`.disclose`);
4. noise: stored answers where the cell was answered before (free), fresh noise otherwise,
   paid from the grant's and the data version's budgets in one transaction (429 if short);
5. rounding of counts, then HAVING / ORDER BY / LIMIT on what is released;
6. remember what each released cell covered.

Every threshold comes from the policy's obligations (``Obligations.disclosure``, ``noise``).
Pricing, which computes its figures itself, takes steps 2 and 6 (:meth:`cell_release`) and
step 4 (:meth:`noisy_answers`) from here too.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar, cast

from sqlglot import exp

from gateway.catalog import Catalog
from gateway.disclosure.complementary import MAX_EXACT_CELLS
from gateway.disclosure.differencing import (
    MAX_PAIRS_PER_STATEMENT,
    NULL_VALUE,
    Box,
    BoxIndex,
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
    persons_sql,
    small_differences,
)
from gateway.disclosure.noise import (
    NoiseSpec,
    NoisyPlan,
    Sampler,
    Series,
    noisy_plan,
    round_count,
    to_units,
)
from gateway.disclosure.suppression import DisclosedResult, disclose
from gateway.errors import PolicyEngineError, QueryRejected, StoreUnavailable
from gateway.policy import Obligations
from gateway.query.compiler import CompiledQuery
from gateway.query.shaping import shape
from gateway.query.spec import AggregateQuery
from gateway.query.store import QueryStore
from gateway.state.budgets import MICRO, BudgetCharge, ReleasedRow
from gateway.state.store import StateStore

__all__ = [
    "DisclosureControl",
    "DisclosureOptions",
    "NoisyAnswers",
    "NoisyCells",
    "Released",
    "budget_period",
    "published_disclosure",
]

_T = TypeVar("_T")
_CHINA = timezone(timedelta(hours=8))
# Derived boxes one request may count and check (two statements per level, two levels).
MAX_DERIVED_PER_REQUEST = 256
# How far behind its commit another process's record time may be (incremental re-reads).
_LAG_NS = 60 * 1_000_000_000
# One-dimension differences remembered per data version and dataset (then forgotten at once).
_MAX_DIFFERENCES = 200_000


@dataclass(frozen=True)
class DisclosureOptions:
    """The disclosure obligations of one decision, read strictly."""

    difference_k: int
    rounding: int
    noise: NoiseSpec | None
    budget_epsilon: float | None
    budget_period: str | None
    dataset_epsilon_cap: float | None

    @classmethod
    def from_obligations(cls, obligations: Obligations) -> DisclosureOptions:
        d = obligations.disclosure or {}
        # Without the member (older policies) the brief's default holds: k = min cell size.
        k = d.get("difference_k", obligations.min_cell_size)
        rounding = d.get("rounding", 1)
        if not _is_int(k) or not _is_int(rounding) or k < 1 or rounding < 1:
            raise PolicyEngineError("the policy decision is malformed: obligations.disclosure")
        noise = None
        if obligations.noise is not None:
            try:
                noise = NoiseSpec.from_obligation(obligations.noise)
            except Exception as exc:  # any odd obligation: fail closed
                raise PolicyEngineError(
                    "the policy decision is malformed: obligations.noise") from exc
        budget = d.get("budget")
        epsilon = period = None
        if budget is not None:
            epsilon, period = budget.get("epsilon"), budget.get("period", "month")
            if not isinstance(epsilon, int | float) or isinstance(epsilon, bool) or epsilon <= 0 \
                    or period not in ("day", "month", "year", "grant"):
                raise PolicyEngineError("the policy decision is malformed: disclosure.budget")
        cap = d.get("dataset_epsilon_cap")
        if noise is not None and (epsilon is None or not isinstance(cap, int | float)):
            # Noise without a budget would let averaging over rephrasings run forever.
            raise PolicyEngineError("the grant asks for noise but the policy sets no budget")
        return cls(int(k), int(rounding), noise, None if epsilon is None else float(epsilon),
                   period, None if cap is None else float(cap))


def published_disclosure(grant_body: Mapping[str, Any]) -> dict[str, Any]:
    """What the catalog shows of a grant's disclosure options: the noise mechanism, ε and
    the per person-year bounds are public, so analysts can judge the answers they get.

    >>> published_disclosure({"min_cell_size": 10})
    {'difference_k': 10, 'rounding': 1, 'noise': None, 'budget': None}
    """
    noise = grant_body.get("noise")
    return {
        "difference_k": max(int(grant_body.get("difference_k", 0)),
                            int(grant_body.get("min_cell_size", 0))),
        "rounding": int(grant_body.get("rounding", 1)),
        "noise": None if noise is None else NoiseSpec.from_obligation(noise).published(),
        "budget": grant_body.get("budget"),
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def budget_period(period: str, now: float, grant_id: str) -> str:
    """The ledger period a moment falls in (China Standard Time).

    >>> budget_period("month", 1795000000.0, "g-1"), budget_period("grant", 0.0, "g-1")
    ('2026-11', 'grant:g-1')
    """
    moment = datetime.fromtimestamp(now, tz=_CHINA)
    if period == "day":
        return moment.strftime("%Y-%m-%d")
    if period == "month":
        return moment.strftime("%Y-%m")
    if period == "year":
        return moment.strftime("%Y")
    return f"grant:{grant_id}"


@dataclass(frozen=True)
class Released:
    result: DisclosedResult
    data_version: str
    report: dict[str, Any]  # the response's "disclosure" member
    budget_spent: float | None  # ε charged (None: no noise)


class DisclosureControl:
    """Steps 1–6 above over the query store and the state store."""

    def __init__(self, *, catalog: Catalog, state: StateStore, store: QueryStore,
                 clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.state = state
        self.store = store
        self.clock = clock
        self.sampler = Sampler()
        self._plans: dict[str, Any] = {}
        self._lock = threading.Lock()
        # Check and remember under one lock in this process (see docs: across processes the
        # later of two concurrent near-identical releases is not guaranteed to see the first).
        self._check_lock = threading.Lock()
        self._domain_cache: dict[tuple[str, str], Domains] = {}
        self._known_cache: dict[tuple[str, str], _Known] = {}

    # -- noise templates ----------------------------------------------------------------
    def template(self, key: Any, build: Callable[[], _T]) -> _T:
        """A noise template (bounded statement and calibrated scales), built once per query
        shape and noise obligation (``key``, JSON-able) and cached; a query then only samples."""
        text = json.dumps(key, sort_keys=True, default=str)
        found = self._plans.get(text)
        if found is None:
            found = build()
            if len(self._plans) >= 1024:
                self._plans.clear()
            self._plans[text] = found
        return cast("_T", found)

    def _plan(self, query: AggregateQuery, spec: NoiseSpec) -> NoisyPlan:
        """Calibrated once per template (query shape and noise obligation)."""
        return self.template(
            [query.model_dump(mode="json", include={"dataset", "dimensions", "measures",
                                                    "filters"}), spec.published()],
            lambda: noisy_plan(query, self.catalog, spec))

    # -- the whole path ----------------------------------------------------------------
    def release(
        self, query: AggregateQuery, compiled: CompiledQuery, obligations: Obligations, *,
        org: str | None, grant_id: str | None, dominance_k: Any, p_percent: Any,
    ) -> Released:
        options = DisclosureOptions.from_obligations(obligations)
        dataset = self.catalog.dataset(query.dataset)
        if dataset is None:
            raise QueryRejected(f"unknown dataset {query.dataset}")
        n_dims = len(compiled.dimensions)
        plan: NoisyPlan | None = None
        if options.noise is not None:
            if compiled.hidden:
                raise QueryRejected("with noise, HAVING and ORDER BY may only name "
                                    "selected measures")
            plan = self._plan(query, options.noise)
            _, noisy_rows, data_version = self.store.fetch(plan.sql)
            raw_rows = [self._exact_row(plan, r, n_dims) for r in noisy_rows]
            contribution_fields: Sequence[str] = ()
        else:
            _, fetched, data_version = self.store.fetch(compiled.sql)
            raw_rows = [tuple(r) for r in fetched]
            noisy_rows = []
            contribution_fields = compiled.contribution_fields

        keys = [tuple(r[:n_dims]) for r in raw_rows]
        persons = [int(r[n_dims] or 0) for r in raw_rows]
        domains = self._domains(data_version, query.dataset, dataset)
        boxes = boxes_of_cells(query.filters, compiled.dimensions, keys, domains)
        # Check, decide and remember under one lock, in this process and across every worker
        # sharing the state store: a concurrent request must see these cells before it runs
        # its own check.
        with self._check_lock, self.state.exclusive("disclosure-releases"):
            # Read once in the section: nothing else records releases until it ends.
            known = self._known_for(data_version, query.dataset, options.difference_k)
            withheld, derived = self._difference_check(
                query.dataset, dataset, boxes, persons, data_version, known,
                k=options.difference_k, min_cell_size=obligations.min_cell_size, org=org)

            result = disclose(
                compiled.dimensions, compiled.measures, raw_rows,
                min_cell_size=obligations.min_cell_size, max_rows=obligations.max_rows,
                contribution_fields=contribution_fields, measure_fields=compiled.measure_fields,
                dominance_k=dominance_k, p_percent=p_percent,
                secondary=True, max_exact_cells=MAX_EXACT_CELLS, withheld=withheld,
            )
            report: dict[str, Any] = {"difference_k": options.difference_k,
                                      "rounding": options.rounding, "noise": None, "budget": None}
            spent: float | None = None
            if plan is not None:
                result, report["budget"], spent = self._add_noise(
                    plan, result, noisy_rows, n_dims, data_version, query, options, grant_id)
                report["noise"] = plan.published()
            result = self._round(result, compiled, n_dims, options.rounding)
            gone = _withheld_rows(result, len(compiled.measures))
            released_rows = [r for r in range(len(result.rows)) if r not in gone]
            release_id = self._remember(query.dataset, data_version, boxes, persons,
                                        released_rows, derived, known, org=org)
        report["release_id"] = release_id
        result = shape(result, having=query.having, order_by=query.order_by,
                       limit=query.limit, column_of=compiled.column_of, hidden=compiled.hidden)
        return Released(result, data_version, report, spent)

    def _remember(self, dataset_name: str, data_version: str, boxes: Sequence[Box],
                  persons: Sequence[int], released_rows: Sequence[int],
                  derived: Mapping[int, list[tuple[Box, int]]], known: _Known | None, *,
                  org: str | None) -> str:
        """Record what the released rows covered (and the boxes they let one derive); the
        caller holds the release section, in which it read ``known``. Returns the release
        id."""
        release_id = "rel-" + secrets.token_hex(8)
        now_ns = int(self.clock() * 1e9)
        # Boxes already remembered (a repeated question) cost no write.
        remembered = [(boxes[r], persons[r]) for r in released_rows
                      if known is None or boxes[r] not in known.index]
        if remembered:
            self.state.record_released(
                data_version, dataset_name,
                [(box_key(dataset_name, b), [[d, list(vs)] for d, vs in b], n)
                 for b, n in remembered],
                org=org, release_id=release_id, now_ns=now_ns)
        implied = [x for r in released_rows for x in derived.get(r, [])]
        if implied:
            self.state.record_released(
                data_version, dataset_name,
                [(box_key(dataset_name, b), [[d, list(vs)] for d, vs in b], n)
                 for b, n in implied],
                org=org, release_id=release_id + "~derived", now_ns=now_ns)
        return release_id

    @contextmanager
    def cell_release(
        self, dataset_name: str, filters: Mapping[str, Sequence[Any]],
        cells: Sequence[tuple[Sequence[str], tuple[Any, ...]]], persons: Sequence[int],
        data_version: str, obligations: Obligations, *, org: str | None,
    ) -> Iterator[CellRelease]:
        """The difference check for results computed outside :meth:`release` (pricing), one
        row per ``(dimensions, key)`` (a margin has fewer dimensions): the rows to withhold,
        then ``remember(released_rows)``, all inside the release section."""
        options = DisclosureOptions.from_obligations(obligations)
        dataset = self.catalog.dataset(dataset_name)
        if dataset is None:
            raise QueryRejected(f"unknown dataset {dataset_name}")
        domains = self._domains(data_version, dataset_name, dataset)
        boxes = [normalize(box_of_cell(filters, dims, key), domains) for dims, key in cells]
        with self._check_lock, self.state.exclusive("disclosure-releases"):
            known = self._known_for(data_version, dataset_name, options.difference_k)
            withheld, derived = self._difference_check(
                dataset_name, dataset, boxes, persons, data_version, known,
                k=options.difference_k, min_cell_size=obligations.min_cell_size, org=org)

            def remember(released_rows: Sequence[int]) -> str:
                return self._remember(dataset_name, data_version, boxes, persons,
                                      released_rows, derived, known, org=org)

            yield CellRelease(withheld=withheld, remember=remember)

    # -- step 2 ---------------------------------------------------------------------------
    def _domains(self, data_version: str, dataset_name: str, dataset: Any) -> Domains:
        """Every value each dimension holds in this (immutable) version: one scan, cached."""
        key = (data_version, dataset_name)
        found = self._domain_cache.get(key)
        if found is None:
            names = sorted(dataset.dimensions)
            sql = exp.select(*[
                exp.func("LIST", exp.Distinct(expressions=[exp.column(d)])).as_(f"v{i}")
                for i, d in enumerate(names)
            ], *[
                exp.func("BOOL_OR", exp.Is(this=exp.column(d), expression=exp.Null()))
                .as_(f"n{i}") for i, d in enumerate(names)
            ]).from_(exp.to_table(dataset.table))
            _, rows, _ = self.store.fetch(sql.sql(dialect="duckdb"))
            row = rows[0]
            found = {
                d: frozenset([*(str(v) for v in (row[i] or []) if v is not None),
                              *([NULL_VALUE] if row[len(names) + i] else [])])
                for i, d in enumerate(names)
            }
            self._domain_cache[key] = found
        return found

    def _known_for(self, data_version: str, dataset_name: str, k: int) -> _Known | None:
        """:meth:`_known` where the difference check runs (k ≥ 2), else None."""
        return self._known(data_version, dataset_name) if k >= 2 else None

    def _known(self, data_version: str, dataset_name: str) -> _Known:
        """Boxes released (or derived from releases) on this version: cached in this
        process, re-read when the stored number changes (rows are only ever added)."""
        key = (data_version, dataset_name)
        count = self.state.released_count(data_version, dataset_name)
        known = self._known_cache.get(key)
        if known is not None and known.count == count:
            return known
        if known is not None:
            # Read what was added lately (record times of other processes may lag a little
            # behind their commit); the count tells whether that caught everything.
            known.merge(self.state.released_since(data_version, dataset_name,
                                                  known.newest_ns - _LAG_NS))
            if len(known.cells) == count:
                known.count = count
                return known
        known = _Known(count=0)
        known.merge(self.state.released_since(data_version, dataset_name, 0))
        known.count = len(known.cells)
        if len(self._known_cache) >= 64:
            self._known_cache.clear()
        self._known_cache[key] = known
        return known

    def _count_persons(self, boxes: Sequence[Box], dataset: Any) -> list[int]:
        counts: list[int] = []
        for i in range(0, len(boxes), MAX_PAIRS_PER_STATEMENT):
            sql = persons_sql(boxes[i : i + MAX_PAIRS_PER_STATEMENT], dataset)
            _, found, _ = self.store.fetch(sql.sql(dialect="duckdb"))
            counts += [int(v or 0) for v in found[0]]
        return counts

    def _small_pairs(self, new: Sequence[tuple[int, Box, int]], known: _Known, dataset: Any,
                     k: int) -> dict[int, Pair]:
        """Small differences of ``(id, box, persons)`` with known cells, by id."""
        box_of = {i: box for i, box, _ in new}
        pairs = candidate_pairs(new, known.cells, k=k)
        counts: list[int] = []
        for i in range(0, len(pairs), MAX_PAIRS_PER_STATEMENT):
            part = pairs[i : i + MAX_PAIRS_PER_STATEMENT]
            sql = difference_sql([(p.earlier.box, box_of[p.row]) for p in part], dataset)
            _, found, _ = self.store.fetch(sql.sql(dialect="duckdb"))
            counts += [int(v or 0) for v in found[0]]
        return small_differences(pairs, counts, k=k)

    def _difference_check(
        self, dataset_name: str, dataset: Any, boxes: Sequence[Box], persons: Sequence[int],
        data_version: str, known: _Known | None, *, k: int, min_cell_size: int,
        org: str | None,
    ) -> tuple[dict[int, tuple[str, str | None]], dict[int, list[tuple[Box, int]]]]:
        """Rows to withhold (reason, detail), and per kept row the boxes its release would let
        an attacker derive (remembered with it). ``known``: :meth:`_known_for` of this
        version, dataset and k, read in the same release section."""
        if k < 2:
            return {}, {}
        if known is None:
            raise ValueError("the difference check needs the known releases")
        domains = self._domains(data_version, dataset_name, dataset)

        def explain(earlier: ReleasedCell, derived: bool) -> str:
            whose = (f"release {earlier.release_id.split('~')[0]}"
                     if earlier.org == org and org is not None else "a release to another party")
            how = "together with other releases, " if derived else ""
            return f"{how}differs from {whose} by fewer than {k} persons"

        withheld: dict[int, tuple[str, str | None]] = {}
        # A cell identical to an earlier release reveals nothing new: its differences with
        # every other release were checked when the later of the two was released.
        new = [(r, boxes[r], persons[r]) for r in range(len(boxes))
               if persons[r] >= min_cell_size and known.by_box(boxes[r]) is None]
        for row, pair in self._small_pairs(new, known, dataset, k).items():
            withheld[row] = ("difference", explain(pair.earlier, False))

        # Boxes the new cells derive with known ones (one dimension apart), two levels deep.
        mine = {b for _, b, _ in new}
        derived: dict[int, list[tuple[Box, int]]] = {}
        frontier = [(r, b) for r, b, _ in new if r not in withheld]
        budget = MAX_DERIVED_PER_REQUEST
        for _level in range(2):
            found: list[tuple[int, Box, ReleasedCell | None]] = []
            seen: set[Box] = set()
            for row, box in frontier:
                for other in sorted(known.index.neighbours(box)):
                    x = known.one_dimension_difference(box, other, domains)
                    if x is None or x in known.index or x in mine or x in seen:
                        continue
                    seen.add(x)
                    found.append((row, x, known.by_box(other)))
            if not found:
                break
            if len(found) > budget:
                # Fail closed: more derivations than one request may check.
                for row in {row for row, _, _ in found[budget:]}:
                    withheld.setdefault(row, ("difference", "too many overlapping earlier "
                                              "releases to check; ask a coarser question"))
                found = found[:budget]
            budget -= len(found)
            counts = self._count_persons([x for _, x, _ in found], dataset)
            candidates: list[tuple[int, Box, int]] = []
            for (row, x, source), n in zip(found, counts, strict=True):
                if row in withheld:
                    continue
                if 1 <= n <= k - 1 and source is not None:
                    withheld[row] = ("difference", explain(source, True))
                    continue
                candidates.append((row, x, n))
            numbered = [(i, x, n) for i, (_, x, n) in enumerate(candidates)]
            for i, pair in self._small_pairs(numbered, known, dataset, k).items():
                withheld.setdefault(candidates[i][0], ("difference", explain(pair.earlier, True)))
            frontier = []
            for row, x, n in candidates:
                if row not in withheld:
                    derived.setdefault(row, []).append((x, n))
                    frontier.append((row, x))
        return withheld, {r: xs for r, xs in derived.items() if r not in withheld}

    # -- step 4 ---------------------------------------------------------------------------
    @staticmethod
    def _exact_row(plan: NoisyPlan, row: Sequence[Any], n_dims: int) -> tuple[Any, ...]:
        """The bounded row as disclose() reads it: dims, persons, then one value per measure
        (a mean from its bounded sum and count)."""
        if not plan.lower_bounds_hold(row):
            # Negative amounts would break the published sensitivity: refuse, never guess.
            raise StoreUnavailable("a bounded value lies below its published lower bound")
        values = dict(zip([s.name for s in plan.series],
                          row[n_dims + 3 : n_dims + 3 + len(plan.series)], strict=True))
        out: list[Any] = [*row[:n_dims], row[n_dims]]
        for m in plan.measures:
            if m.fn in ("count_persons", "count"):
                out.append(values[m.alias])
            else:
                total = values[f"_nsum_{m.field}"]
                if m.fn == "sum":
                    out.append(total)
                else:
                    count = values[f"_ncnt_{m.field}"]
                    out.append(None if not count else Decimal(str(total)) / Decimal(count))
        return tuple(out)

    def _subtotals(
        self, table_key: str, dimensions: Sequence[str], groups: Sequence[Sequence[Any]],
        missing: Sequence[tuple[int, str]], key_of: Mapping[tuple[int, str], str],
    ) -> dict[str, int]:
        """Answers of cells that a stored finer table (same filters and series, more
        dimensions) adds up to: the sum of its stored noisy cells, free and consistent."""
        if not missing:
            return {}
        mine = list(dimensions)
        for dims, cells in self.state.stored_tables(table_key):
            if not set(mine) < set(dims):
                continue
            at = [dims.index(d) for d in mine]
            keys = sorted({k for _, by_series in cells for k in by_series.values()})
            values = self.state.stored_answers(keys)
            if len(values) != len(keys):
                continue
            sums: dict[tuple[str, str], int] = {}
            for group, by_series in cells:
                projected = json.dumps([group[i] for i in at], default=str)
                for name, key in by_series.items():
                    sums[(projected, name)] = sums.get((projected, name), 0) + values[key]
            free: dict[str, int] = {}
            for r, name in missing:
                projected = json.dumps(list(groups[r]), default=str)
                free[key_of[(r, name)]] = sums.get((projected, name), 0)
            return free
        return {}

    def noisy_answers(
        self, cells: NoisyCells, *, data_version: str, dataset: str,
        options: DisclosureOptions, grant_id: str | None,
    ) -> NoisyAnswers:
        """The noisy answer of every series of every cell (and of ``cells.totals``): stored
        ones as stored, sums of a stored finer table free, fresh samples otherwise, paid from
        the grant's and the data version's budgets in one transaction before anything is
        released (:class:`~gateway.errors.BudgetExhausted` → 429, nothing written). The
        one noise-and-ledger path of every noisy endpoint (aggregates, pricing)."""
        assert options.budget_epsilon is not None  # noqa: S101 - checked with the options
        n_cells = len(cells.groups)
        covers = [*cells.covers, *cells.totals]
        found = self.catalog.dataset(dataset)
        if found is None:
            raise QueryRejected(f"unknown dataset {dataset}")
        # The table these cells make up: its filters (normalized) and series, whatever the
        # dimensions (a coarser table with the same key can be summed from it).
        table_key = _answer_key(
            data_version, dataset, "table",
            [[s.name, s.bounds or cells.spec.max_records] for s in cells.series],
            normalize(box_of_cell(cells.filters, [], []),
                      self._domains(data_version, dataset, found)), "")
        # Every cell gets its answer, withheld ones too (paid by the same ε: the cells are
        # disjoint), so that sub-totals can later be summed from this table.
        key_of: dict[tuple[int, str], str] = {
            (r, s.name): _answer_key(data_version, dataset, s.name,
                                     s.bounds or cells.spec.max_records, fingerprint, records)
            for s in cells.series for r, (fingerprint, records) in enumerate(covers)
        }
        stored = self.state.stored_answers(sorted(set(key_of.values())))
        missing = [rk for rk, key in key_of.items() if key not in stored and rk[0] < n_cells]
        free = self._subtotals(table_key, cells.dimensions, cells.groups, missing, key_of)
        from_finer = len(free)
        todo = {rk for rk in missing if key_of[rk] not in free}
        fresh: dict[str, int] = {}
        for j, series in enumerate(cells.series):
            rows_needed = [r for r in range(n_cells) if (r, series.name) in todo]
            sampled = self.sampler.add(cells.spec.mechanism, cells.scales[j],
                                       [cells.exact[r][j] for r in rows_needed])
            for r, value in zip(rows_needed, sampled, strict=True):
                fresh[key_of[(r, series.name)]] = value
        # A total over the cells not answered before is the sum of their answers: free.
        known = {**stored, **free, **fresh}
        for t in range(n_cells, len(covers)):
            for series in cells.series:
                key = key_of[(t, series.name)]
                if key not in known:
                    free[key] = known[key] = sum(known[key_of[(r, series.name)]]
                                                 for r in range(n_cells))
        now = self.clock()
        gid = grant_id or "none"
        period = budget_period(options.budget_period or "month", now, gid)
        charges = [
            BudgetCharge(f"grant:{gid}", period, round(cells.epsilon * MICRO),
                         round(options.budget_epsilon * MICRO)),
            BudgetCharge(f"dataset:{data_version}:{dataset}", "all",
                         round(cells.epsilon * MICRO),
                         round((options.dataset_epsilon_cap or 0) * MICRO)),
        ]
        spent = (self.state.spend_and_store(fresh, charges, now_ns=int(now * 1e9), free=free)
                 if fresh or free else None)
        answers = {**stored, **(spent.answers if spent else {})}
        self.state.store_table(
            table_key, cells.dimensions,
            [[list(cells.groups[r]), {s.name: key_of[(r, s.name)] for s in cells.series}]
             for r in range(n_cells)], now_ns=int(now * 1e9))
        charged = (spent.charged_micro / MICRO) if spent else 0.0
        remaining = spent.remaining_micro if spent else {}
        grant_left = remaining.get(f"grant:{gid}")
        if grant_left is None:
            grant_left = round(options.budget_epsilon * MICRO) - self.state.budget_spent(
                f"grant:{gid}", period)
        budget = {
            "epsilon_charged": charged,
            "period": period,
            "grant_epsilon": options.budget_epsilon,
            "grant_remaining": grant_left / MICRO,
            "answers_reused": charged == 0,
            "from_finer_table": from_finer,
        }
        values = [[answers[key_of[(r, s.name)]] for s in cells.series]
                  for r in range(len(covers))]
        return NoisyAnswers(values, budget, charged)

    def _add_noise(
        self, plan: NoisyPlan, result: DisclosedResult, noisy_rows: Sequence[Sequence[Any]],
        n_dims: int, data_version: str, query: AggregateQuery, options: DisclosureOptions,
        grant_id: str | None,
    ) -> tuple[DisclosedResult, dict[str, Any], float]:
        n_rows = len(result.rows)
        gone = _withheld_rows(result, len(plan.measures))
        got = self.noisy_answers(
            NoisyCells(
                series=plan.series, scales=plan.scales, spec=plan.spec, epsilon=plan.epsilon,
                dimensions=plan.dimensions, filters=query.filters,
                groups=[noisy_rows[r][:n_dims] for r in range(n_rows)],
                covers=[(noisy_rows[r][n_dims + 2], noisy_rows[r][n_dims + 1])
                        for r in range(n_rows)],
                exact=[[to_units(noisy_rows[r][n_dims + 3 + j], s.kind)
                        for j, s in enumerate(plan.series)] for r in range(n_rows)]),
            data_version=data_version, dataset=query.dataset, options=options,
            grant_id=grant_id)
        rows = [list(r) for r in result.rows]
        for r in range(n_rows):
            if r in gone:
                continue
            answer = dict(zip([s.name for s in plan.series], got.values[r], strict=True))
            for i, m in enumerate(plan.measures):
                if rows[r][n_dims + i] is None:
                    continue  # withheld (dominance): stays withheld
                if m.fn in ("count_persons", "count"):
                    rows[r][n_dims + i] = max(answer[m.alias], 0)
                    continue
                total = answer[f"_nsum_{m.field}"] / 100
                if m.fn == "sum":
                    rows[r][n_dims + i] = round(total, 2)
                else:
                    count = max(answer[f"_ncnt_{m.field}"], 1)
                    rows[r][n_dims + i] = round(total / count, 2)
        notes = [*result.notes,
                 f"noise: {plan.spec.mechanism}, ε = {plan.epsilon} per query over person-years "
                 "(bounds in disclosure.noise); an answer asked again is the stored one, free"]
        return replace(result, rows=rows, notes=notes), got.budget, got.charged

    # -- step 5 ---------------------------------------------------------------------------
    @staticmethod
    def _round(result: DisclosedResult, compiled: CompiledQuery, n_dims: int,
               step: int) -> DisclosedResult:
        if step <= 1:
            return result
        counts = [n_dims + i for i, name in enumerate(compiled.measures)
                  if name not in compiled.measure_fields
                  and not name.startswith(("sum_", "mean_"))]
        rows = [list(r) for r in result.rows]
        for row in rows:
            for c in counts:
                if row[c] is not None:
                    row[c] = round_count(int(row[c]), step)
        return replace(result, rows=rows,
                       notes=[*result.notes, f"counts rounded to multiples of {step}"])


@dataclass(frozen=True)
class NoisyCells:
    """One noisy release, as the ledger sees it: per cell its group values, what it covers
    (record fingerprint, record count) and the exact bounded value of each series in integer
    units (cents for amounts); ``totals`` cover margins over all the cells (an ``overall``
    row), answered as the sum of the cells' answers unless answered before."""

    series: tuple[Series, ...]
    scales: tuple[float, ...]
    spec: NoiseSpec
    epsilon: float  # charged when any answer is new
    dimensions: tuple[str, ...]
    filters: Mapping[str, Sequence[Any]]  # the query's, over every cell
    groups: Sequence[Sequence[Any]]
    covers: Sequence[tuple[Any, Any]]
    exact: Sequence[Sequence[int]]
    totals: Sequence[tuple[Any, Any]] = ()


@dataclass(frozen=True)
class NoisyAnswers:
    values: list[list[int]]  # per cell, then per total: one answer per series
    budget: dict[str, Any]  # the response's ``disclosure.budget``
    charged: float  # ε charged by this release (0: every answer was stored)


@dataclass(frozen=True)
class CellRelease:
    """Rows to withhold (row → reason, explanation) and how to record what was released."""

    withheld: dict[int, tuple[str, str | None]]
    remember: Callable[[Sequence[int]], str]


@dataclass
class _Known:
    count: int
    cells: list[ReleasedCell] = field(default_factory=list)  # sorted by person count
    index: BoxIndex = field(default_factory=BoxIndex)
    newest_ns: int = 0
    released: dict[Box, ReleasedCell] = field(default_factory=dict)
    # (box, known box) -> their one-dimension difference: a pure function of the two boxes
    # and this version's domains, asked again by every repeat of a question.
    differences: dict[tuple[Box, Box], Box | None] = field(default_factory=dict)

    def merge(self, rows: Sequence[tuple[ReleasedRow, int]]) -> None:
        added = False
        for row, at in rows:
            box = tuple((d, tuple(vs)) for d, vs in row.box)
            self.newest_ns = max(self.newest_ns, at)
            if box in self.index:
                continue
            cell = ReleasedCell(box, row.n_persons, row.release_id, row.org)
            self.cells.append(cell)
            self.released.setdefault(box, cell)
            self.index.add(box)
            added = True
        if added:
            self.cells.sort(key=lambda c: c.n_persons)

    def by_box(self, box: Box) -> ReleasedCell | None:
        return self.released.get(box)

    def one_dimension_difference(self, a: Box, b: Box, domains: Domains) -> Box | None:
        """:func:`.differencing.one_dimension_difference`, remembered (``domains`` are always
        those of this object's data version and dataset)."""
        key = (a, b)
        if key in self.differences:
            return self.differences[key]
        if len(self.differences) >= _MAX_DIFFERENCES:
            self.differences.clear()
        found = self.differences[key] = one_dimension_difference(a, b, domains)
        return found


def _withheld_rows(result: DisclosedResult, n_measures: int) -> set[int]:
    """Rows whose every measure is suppressed."""
    return {cell.row for cell in result.suppressed if len(cell.measures) >= n_measures}


def _answer_key(data_version: str, dataset: str, series: str, bound: Any, fingerprint: Any,
                records: Any) -> str:
    """What a stored answer is keyed by: the records the cell covers (their fingerprint and
    number), the series and its published bound, the data version."""
    text = json.dumps([data_version, dataset, series, bound, str(fingerprint), str(records)],
                      separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
