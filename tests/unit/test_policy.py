"""Policy decisions through the real regorus engine, in both of its modes: every deny reason
next to the allow it guards, the obligations, fail-closed loading and evaluation, data
replacement across threads, and the policy version."""

from __future__ import annotations

import copy
import gc
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog import load_catalog
from gateway.errors import PolicyEngineError
from gateway.policy import (
    Decision,
    Obligations,
    PolicyEngine,
    RegorusEngine,
    build_engine,
    policies_dir,
    register_engine,
    with_grant_index,
)
from gateway.service.grants import catalog_document as grants_catalog_document

MODES = ("compiled", "interpreter")
T0 = 1_763_800_000_000_000_000
DAY = 86_400 * 10**9

# A valid deny, for test policies that must evaluate an empty request.
DENY = '{"allow": false, "reasons": ["no"], "grant_id": null, "obligations": null}'


def catalog_document() -> dict[str, Any]:
    return grants_catalog_document(load_catalog())


def grant(grant_id: str = "g-1", **changes: Any) -> dict[str, Any]:
    # acct_pay is granted but not necessary for hmb_pricing: the purpose must still refuse it.
    body: dict[str, Any] = {
        "grant_id": grant_id,
        "insurer": "ins-001",
        "purpose": "hmb_pricing",
        "datasets": ["settlements"],
        "dimensions": ["age_band", "gend", "insu_admdvs", "year"],
        "measures": ["medfee_sumamt", "hifp_pay", "acct_pay"],
        "filters": {"insu_admdvs": ["420100"]},
        "min_cell_size": 3,
        "max_rows": 50_000,
        "valid_from_ns": T0 - DAY,
        "valid_until_ns": T0 + DAY,
        "revoked": False,
    }
    body.update(changes)
    return body


def data(*grants: dict[str, Any]) -> dict[str, Any]:
    if not grants:
        grants = (grant(), grant("g-9", insurer="ins-002", dimensions=["hosp_lv", "gend"]))
    by_id = {g["grant_id"]: g for g in grants}
    return {"gateway": {"catalog": catalog_document(), "grants": by_id}}


def query(**changes: Any) -> dict[str, Any]:
    resource = changes.pop("resource", {})
    body: dict[str, Any] = {
        "subject": {"client_id": "c-1", "role": "insurer", "org": "ins-001"},
        "action": "query.aggregate",
        "purpose": "hmb_pricing",
        "resource": {
            "dataset": "settlements",
            "dimensions": ["gend", "age_band"],
            "measures": [{"fn": "count_persons"}, {"fn": "sum", "field": "medfee_sumamt"}],
            "filters": {"insu_admdvs": ["420100"]},
            "fields": ["gend", "age_band", "medfee_sumamt", "insu_admdvs"],
        },
        "time_ns": T0,
    }
    body["resource"].update(resource)
    body.update(changes)
    return body


def actor(role: str, action: str) -> dict[str, Any]:
    return {"subject": {"client_id": "c-1", "role": role, "org": "org-1"}, "action": action,
            "purpose": None, "resource": {}, "time_ns": T0}


@pytest.fixture(scope="module", params=MODES)
def engine(request: pytest.FixtureRequest) -> RegorusEngine:
    return RegorusEngine(mode=request.param, data=data())


@pytest.fixture(scope="module")
def engines() -> dict[str, RegorusEngine]:
    return {mode: RegorusEngine(mode=mode, data=data()) for mode in MODES}


def write_policy(directory: Path, text: str, name: str = "gateway/authz/authz.rego") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return directory


def echo_policy(directory: Path) -> Path:
    """A policy whose decision is whatever the input's `doc` says (a valid deny without)."""
    return write_policy(
        directory,
        f"package gateway.authz\n\ndecision := input.doc if input.doc\n\n"
        f"decision := {DENY} if not input.doc\n",
    )


# --- allow, with obligations ----------------------------------------------------------------


def disclosure_obligation(k: int) -> dict[str, Any]:
    """Cross-request disclosure obligations of a grant that sets none (difference k = its
    minimum cell size; no rounding, budget or noise)."""
    return {"difference_k": k, "rounding": 1, "budget": None, "dataset_epsilon_cap": 20}


def test_allows_a_covered_query_with_the_grants_obligations(engine: RegorusEngine) -> None:
    decision = engine.decide(query())
    assert decision == Decision(
        allow=True,
        reasons=(),
        grant_id="g-1",
        # min_cell_size never below the floor (grant 3, floor 5); max_rows never above the cap.
        obligations=Obligations(min_cell_size=5, max_rows=10_000, mask_fields=(), noise=None,
                                disclosure=disclosure_obligation(5)),
        policy_version=engine.version,
        engine="regorus",
    )


@pytest.mark.parametrize("mode", MODES)
def test_obligations_take_the_stricter_grant(mode: str) -> None:
    strict = RegorusEngine(mode=mode, data=data(grant(min_cell_size=20, max_rows=500)))
    assert strict.decide(query()).obligations == Obligations(
        min_cell_size=20, max_rows=500, disclosure=disclosure_obligation(20))


@pytest.mark.parametrize(
    ("role", "action"),
    [("insurer", "catalog.read"), ("admin", "grants.manage"), ("auditor", "audit.read")],
)
def test_each_role_has_its_actions(engine: RegorusEngine, role: str, action: str) -> None:
    decision = engine.decide(actor(role, action))
    assert decision.allow
    assert decision.grant_id is None
    assert decision.obligations == Obligations(min_cell_size=10, max_rows=10_000)


# --- every deny reason ----------------------------------------------------------------------

DENIALS: list[tuple[str, dict[str, Any], str]] = [
    ("ungranted dimension", query(resource={"dimensions": ["hosp_lv"]}),
     "dimension hosp_lv is not granted"),
    ("ungranted measure field",
     query(resource={"measures": [{"fn": "sum", "field": "psn_part_amt"}]}),
     "measure field psn_part_amt is not granted"),
    ("granted but not necessary",
     query(resource={"measures": [{"fn": "sum", "field": "acct_pay"}]}),
     "field acct_pay is not necessary for purpose hmb_pricing"),
    ("filter on ungranted dimension",
     query(resource={"filters": {"insu_admdvs": ["420100"], "hosp_lv": ["3"]}}),
     "filter on hosp_lv is not granted"),
    ("filter outside the grant's values", query(resource={"filters": {"insu_admdvs": ["430100"]}}),
     "filter on insu_admdvs must stay within the granted values"),
    ("grant filter missing", query(resource={"filters": {}}),
     "filter on insu_admdvs must stay within the granted values"),
    ("ungranted dataset", query(resource={"dataset": "person_years"}),
     "dataset person_years is not granted"),
    ("purpose without grant", query(purpose="enrollment_check", resource={
        "dimensions": ["insutype"], "measures": [{"fn": "count_persons"}],
        "fields": ["insutype", "insu_admdvs"]}),
     "no grant for purpose enrollment_check"),
    ("expired", query(time_ns=T0 + DAY), "grant g-1 has expired"),
    ("not yet valid", query(time_ns=T0 - 2 * DAY), "grant g-1 is not yet valid"),
    ("another insurer's grant is no grant",
     query(subject={"client_id": "c-3", "role": "insurer", "org": "ins-003"}),
     "no grant for purpose hmb_pricing"),
    ("min", query(resource={"measures": [{"fn": "min", "field": "medfee_sumamt"}]}),
     "aggregate function min is not allowed"),
    ("sum without field", query(resource={"measures": [{"fn": "sum"}]}),
     "aggregate function sum needs a measure field"),
    ("field not a measure", query(resource={"measures": [{"fn": "mean", "field": "gend"}]}),
     "field gend is not a measure of dataset settlements"),
    ("role not insurer", query(subject={"client_id": "c-1", "role": "admin", "org": "ins-001"}),
     "action query.aggregate is not allowed for role admin"),
    ("insurer managing grants", actor("insurer", "grants.manage"),
     "action grants.manage is not allowed for role insurer"),
    ("admin reading the audit log", actor("admin", "audit.read"),
     "action audit.read is not allowed for role admin"),
    ("auditor reading the catalog", actor("auditor", "catalog.read"),
     "action catalog.read is not allowed for role auditor"),
    ("unknown action", actor("insurer", "data.export"),
     "action data.export is not allowed for role insurer"),
    ("empty request", {}, "request has no action"),
    ("malformed dimensions", query(resource={"dimensions": "gend"}),
     "resource.dimensions must be a list of strings"),
    ("no time", query(time_ns=None), "request has no time"),
]


@pytest.mark.parametrize(("policy_input", "reason"),
                         [pytest.param(i, r, id=name) for name, i, r in DENIALS])
def test_denies_with_the_reason(engine: RegorusEngine, policy_input: dict[str, Any],
                                reason: str) -> None:
    decision = engine.decide(policy_input)
    assert not decision.allow
    assert reason in decision.reasons
    assert decision.reasons == tuple(sorted(set(decision.reasons)))
    assert decision.grant_id is None
    assert decision.obligations is None
    assert decision.policy_version == engine.version


@pytest.mark.parametrize("mode", MODES)
def test_denies_a_revoked_grant(mode: str) -> None:
    revoked = RegorusEngine(mode=mode, data=data(grant(revoked=True)))
    assert revoked.decide(query()).reasons == ("grant g-1 was revoked",)


def test_the_modes_decide_alike(engines: dict[str, RegorusEngine]) -> None:
    cases = [query(), actor("insurer", "catalog.read"), *(i for _, i, _ in DENIALS)]
    for policy_input in cases:
        compiled, interpreted = (engines[m].decide(policy_input) for m in MODES)
        assert compiled == interpreted, policy_input


def test_decision_to_json(engine: RegorusEngine) -> None:
    document = engine.decide(query()).to_json()
    assert json.loads(json.dumps(document)) == {
        "allow": True, "reasons": [], "grant_id": "g-1",
        "obligations": {"min_cell_size": 5, "max_rows": 10_000, "mask_fields": [], "noise": None,
                        "disclosure": disclosure_obligation(5)},
        "policy_version": engine.version, "engine": "regorus",
        # Without a bundle the revision is the policy digest; regorus has no decision id.
        "bundle_revision": engine.version, "decision_id": None,
    }


# --- data: replacement, the grant index, bad documents ------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_new_data_holds_from_the_next_decision_on_every_thread(mode: str) -> None:
    engine = RegorusEngine(mode=mode, data=data())
    workers = 4
    barrier = threading.Barrier(workers)

    def on_every_thread(fn: Callable[[], Decision]) -> list[Decision]:
        def task(_: int) -> Decision:
            barrier.wait(timeout=10)  # one task per thread: each worker decides once
            return fn()

        return list(pool.map(task, range(workers)))

    with ThreadPoolExecutor(workers) as pool:
        assert all(d.allow for d in on_every_thread(lambda: engine.decide(query())))
        engine.set_data(data(grant(revoked=True)))
        after = on_every_thread(lambda: engine.decide(query()))
        assert [d.reasons for d in after] == [("grant g-1 was revoked",)] * workers
        engine.set_data(data())
        assert all(d.allow for d in on_every_thread(lambda: engine.decide(query())))


def test_the_engine_adds_the_grant_index() -> None:
    document = with_grant_index(data())
    assert document["gateway"]["grant_index"] == {
        "ins-001": {"hmb_pricing": ["g-1"]}, "ins-002": {"hmb_pricing": ["g-9"]}}
    # A stale index passed in is replaced, never trusted.
    stale = copy.deepcopy(data())
    stale["gateway"]["grant_index"] = {"ins-001": {"hmb_pricing": ["g-9"]}}
    assert with_grant_index(stale)["gateway"]["grant_index"]["ins-001"] == {"hmb_pricing": ["g-1"]}


@pytest.mark.parametrize("mode", MODES)
def test_many_grants_many_insurers(mode: str) -> None:
    grants = [grant(f"g-{i:03d}", insurer=f"ins-{i % 50:03d}") for i in range(100)]
    engine = RegorusEngine(mode=mode, data=data(*grants))
    decision = engine.decide(query())
    assert (decision.allow, decision.grant_id) == (True, "g-001")


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"gateway": {"grants": {"g-1": object()}}}, id="not JSON"),
        pytest.param({"gateway": {"authz": {}}}, id="collides with the policies"),
        pytest.param({"gateway": {"grants": ["g-1"]}}, id="grants not an object"),
        pytest.param(["gateway"], id="not an object"),
    ],
)
def test_bad_data_fails_closed_until_good_data_arrives(bad: Any) -> None:
    engine = RegorusEngine(data=data())
    assert engine.ready()
    with pytest.raises(PolicyEngineError):
        engine.set_data(bad)
    assert not engine.ready()
    with pytest.raises(PolicyEngineError, match="policy data could not be loaded"):
        engine.decide(query())
    engine.set_data(data())
    assert engine.ready()
    assert engine.decide(query()).allow


def test_ready_only_once_data_is_loaded() -> None:
    engine = RegorusEngine()
    assert not engine.ready()
    # Without data every request is denied, never an error.
    assert "policy data has no valid catalog defaults" in engine.decide(query()).reasons
    engine.set_data(data())
    assert engine.ready()


def test_input_that_is_not_json_fails_closed(engine: RegorusEngine) -> None:
    with pytest.raises(PolicyEngineError):
        engine.decide(query(time_ns=float("nan")))
    with pytest.raises(PolicyEngineError):
        engine.decide(["not", "an", "object"])  # type: ignore[arg-type]
    assert engine.decide(query()).allow  # the thread's evaluator recovers


# --- fail closed: loading ------------------------------------------------------------------------


def test_a_missing_policy_directory_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(PolicyEngineError, match="does not exist"):
        RegorusEngine(tmp_path / "nowhere")


def test_an_empty_policy_set_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(PolicyEngineError, match="holds no policy"):
        RegorusEngine(tmp_path)
    # Test files alone are no policy.
    write_policy(tmp_path, "package gateway.authz_test\n\ntest_x if true\n",
                 name="gateway/authz/authz_test.rego")
    with pytest.raises(PolicyEngineError, match="holds no policy"):
        RegorusEngine(tmp_path)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "text",
    [
        pytest.param("package gateway.authz\n\ndecision := {\n", id="parse error"),
        # A local shadowing a rule: regorus rejects it only when it first evaluates.
        pytest.param(
            f"package gateway.authz\n\nx := 1\n\ndecision := {DENY} if {{ some x in [1] }}\n",
            id="compile error"),
    ],
)
def test_a_broken_policy_fails_at_load(tmp_path: Path, mode: str, text: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    write_policy(tmp_path, text)
    with caplog.at_level(logging.ERROR), pytest.raises(PolicyEngineError) as raised:
        RegorusEngine(tmp_path, mode=mode)
    assert "authz.rego" in raised.value.message
    for text_out in (raised.value.message, caplog.text):
        assert "backtrace" not in text_out.lower()
        assert "<unknown>" not in text_out


@pytest.mark.parametrize("mode", MODES)
def test_an_undefined_decision_fails_closed(tmp_path: Path, mode: str) -> None:
    write_policy(tmp_path, f"package gateway.authz\n\ndecision := {DENY} if not input.x\n")
    engine = RegorusEngine(tmp_path, mode=mode)
    assert not engine.decide({}).allow
    with pytest.raises(PolicyEngineError, match="undefined"):
        engine.decide({"x": 1})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "document",
    [
        pytest.param({"allow": True}, id="members missing"),
        pytest.param({"allow": "yes", "reasons": [], "grant_id": None,
                      "obligations": {"min_cell_size": 5, "max_rows": 10, "mask_fields": [],
                                      "noise": None}}, id="allow not a boolean"),
        pytest.param({"allow": True, "reasons": ["but"], "grant_id": None,
                      "obligations": {"min_cell_size": 5, "max_rows": 10, "mask_fields": [],
                                      "noise": None}}, id="allow with reasons"),
        pytest.param({"allow": True, "reasons": [], "grant_id": None, "obligations": None},
                     id="allow without obligations"),
        pytest.param({"allow": True, "reasons": [], "grant_id": None,
                      "obligations": {"min_cell_size": 0, "max_rows": 10, "mask_fields": [],
                                      "noise": None}}, id="min cell size zero"),
        pytest.param({"allow": True, "reasons": [], "grant_id": None,
                      "obligations": {"min_cell_size": True, "max_rows": 10, "mask_fields": [],
                                      "noise": None}}, id="min cell size a boolean"),
        pytest.param({"allow": False, "reasons": [], "grant_id": None, "obligations": None},
                     id="deny without reasons"),
        pytest.param({"allow": False, "reasons": "no", "grant_id": None, "obligations": None},
                     id="reasons not a list"),
        pytest.param({"allow": False, "reasons": ["no"], "grant_id": "g-1", "obligations": None},
                     id="deny naming a grant"),
        pytest.param({"allow": False, "reasons": ["no"], "grant_id": None, "obligations": None,
                      "extra": 1}, id="unknown member"),
    ],
)
def test_a_malformed_decision_fails_closed(tmp_path: Path, mode: str,
                                           document: dict[str, Any]) -> None:
    engine = RegorusEngine(echo_policy(tmp_path), mode=mode)
    with pytest.raises(PolicyEngineError, match="malformed"):
        engine.decide({"doc": document})


@pytest.mark.parametrize("mode", MODES)
def test_an_evaluation_error_fails_closed_without_engine_text(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Division by zero raises in the interpreter and is undefined in the VM: both deny.
    write_policy(
        tmp_path,
        f"package gateway.authz\n\ndecision := d if {{\n\tinput.n / input.zero > 0\n"
        f"\td := {DENY}\n}}\n\ndecision := {DENY} if not input.n\n",
    )
    engine = RegorusEngine(tmp_path, mode=mode)
    secret = "ZZ-SECRET-411"
    with caplog.at_level(logging.DEBUG), pytest.raises(PolicyEngineError) as raised:
        engine.decide({"n": 1, "zero": 0, "certno": secret})
    for text_out in (raised.value.message, caplog.text):
        assert secret not in text_out
        assert "backtrace" not in text_out.lower()
    # The engine's own exception (Rust backtrace and all) is not chained on.
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__


# --- threads, version, registry ------------------------------------------------------------------


def test_an_engine_dropped_while_threads_hold_evaluators_is_safe() -> None:
    unraisable: list[Any] = []
    previous = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        engine: RegorusEngine | None = RegorusEngine(data=data())
        worker = ThreadPoolExecutor(1)
        assert worker.submit(lambda: engine.decide(query()).allow).result()  # type: ignore[union-attr]
        engine = None
        gc.collect()
        # The worker's stale evaluator is dropped by the worker itself, on its next decision.
        other = RegorusEngine(data=data())
        assert worker.submit(lambda: other.decide(query()).allow).result()
        worker.shutdown()
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert unraisable == []


def test_the_version_follows_the_policy_files(tmp_path: Path) -> None:
    directory = write_policy(tmp_path, f"package gateway.authz\n\ndecision := {DENY}\n")
    first = RegorusEngine(directory).version
    assert first.startswith("sha256:")
    assert len(first) == len("sha256:") + 16
    assert RegorusEngine(directory).version == first
    # Tests are not policy.
    write_policy(directory, "package gateway.authz_test\n\ntest_x if true\n",
                 name="gateway/authz/authz_test.rego")
    assert RegorusEngine(directory).version == first
    write_policy(directory, f"package gateway.authz\n\n# changed\ndecision := {DENY}\n")
    assert RegorusEngine(directory).version != first


def test_the_default_policies_are_the_repositorys() -> None:
    assert (policies_dir() / "gateway" / "authz" / "authz.rego").is_file()


def test_build_engine_from_the_registry() -> None:
    engine = build_engine("regorus", mode="interpreter")
    assert isinstance(engine, PolicyEngine)
    assert engine.name == "regorus"
    with pytest.raises(PolicyEngineError, match="unknown policy engine"):
        build_engine("opa-nowhere")
    with pytest.raises(PolicyEngineError, match="invalid options"):
        build_engine("regorus", colour="blue")
    with pytest.raises(PolicyEngineError, match="unknown regorus mode"):
        build_engine("regorus", mode="jit")
    with pytest.raises(PolicyEngineError, match="already registered"):
        register_engine("regorus", RegorusEngine)


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    from gateway.policy import engine as engine_module

    saved = dict(engine_module._FACTORIES)
    yield
    engine_module._FACTORIES.clear()
    engine_module._FACTORIES.update(saved)


def test_register_another_engine(fresh_registry: None) -> None:
    register_engine("fixed", lambda **_: RegorusEngine(data=data()))
    assert build_engine("fixed").decide(query()).allow
