"""The embedded regorus engine and the real OPA server decide alike.

A seeded corpus of policy inputs (allowed and refused, every action, expired, revoked, not yet
valid and malformed grants, unknown purposes and datasets, missing members, members of the
wrong type) goes through :class:`RegorusEngine` and through :class:`OpaServerEngine` against a
real ``opa run --server`` on loopback; every decision (allow, reasons, grant, obligations,
policy version) must be identical. Also: the OPA engine fails closed when the server is gone.

The OPA binary is the one ``tools/build-opa.sh`` builds (``make opa-check`` builds it). Without
it the tests fail when ``CI`` is set, and skip otherwise.
"""

from __future__ import annotations

import copy
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.catalog import load_catalog
from gateway.errors import PolicyEngineError
from gateway.policy import (
    OpaServerEngine,
    PolicyEngine,
    RegorusEngine,
    build_engine,
)
from gateway.service.grants import catalog_document as grants_catalog_document
from tests.opa import BUILD_SCRIPT, OpaServer, free_port, opa_binary

SEED = 20260501
INPUTS_PER_DOCUMENT = (700, 450, 250)  # three data documents: 1,400 inputs
T0 = 1_763_800_000_000_000_000
DAY = 86_400 * 10**9


# --- the OPA server (tests/opa.py) ---------------------------------------------------------


@pytest.fixture(scope="module")
def opa_server() -> Iterator[OpaServer]:
    server = OpaServer(opa_binary())
    try:
        yield server
    finally:
        server.stop()


# --- the corpus ---------------------------------------------------------------------------------


def catalog_document() -> dict[str, Any]:
    return grants_catalog_document(load_catalog())


CATALOG = catalog_document()
DATASETS = sorted(CATALOG["datasets"])
PURPOSES = sorted(CATALOG["purposes"])
INSURERS = ["ins-001", "ins-002", "ins-003"]
ACTIONS = [
    "query.aggregate", "catalog.read", "grants.manage", "audit.read", "consents.manage",
    "persons.enrollment", "persons.settlements", "consents.own", "subjects.access",
]
ROLES = ["insurer", "admin", "auditor", "subject"]
PERMITTED = [
    ("insurer", "catalog.read"),
    ("insurer", "query.aggregate"),
    ("admin", "grants.manage"),
    ("admin", "consents.manage"),
    ("insurer", "persons.enrollment"),
    ("insurer", "persons.settlements"),
    ("subject", "consents.own"),
    ("subject", "subjects.access"),
    ("auditor", "audit.read"),
]
# Person actions carry verified consent claims (docs/consent.md); the corpus varies them.
PERSON_REQUESTS = {
    "persons.enrollment": ("enrollment_check", ["enrollment.admdvs", "enrollment.insutype",
                                                "enrollment.status"]),
    "persons.settlements": ("claims_fast_track", ["settlements.amounts",
                                                  "settlements.diagnosis_category",
                                                  "settlements.summary"]),
}
SETTLEMENT_FIELDS = ["setl_date", "med_type", "hosp_lv", "fixmedins_code", "dise_codg",
                     "dise_category", "medfee_sumamt", "maf_pay", "acct_pay", "psn_part_amt"]


def _person_request(rng: random.Random, action: str, org: str) -> dict[str, Any]:
    purpose, datatypes = PERSON_REQUESTS[action]
    consented = datatypes if rng.random() < 0.7 else rng.sample(datatypes, 1)
    detail = {"type": "yibao_data_access", "actions": ["read"], "datatypes": consented,
              "purpose": rng.choice([purpose, purpose, "hmb_pricing"]),
              "period": {"start": "2025-01-01", "end": "2025-12-31"}}
    request: dict[str, Any] = {
        "purpose": purpose,
        "resource": {"dataset": "persons", "datatypes": rng.sample(datatypes, rng.randint(0, 3)),
                     "fields": SETTLEMENT_FIELDS if action == "persons.settlements" else []},
        "consent": {"consent_id": "cst-1", "sub": "s", "client_id": rng.choice([org, org,
                                                                                "ins-999"]),
                    "jti": "j", "exp": 1, "single_use": False,
                    "authorization_details": [detail]},
    }
    if rng.random() < 0.1:
        del request["consent"]
    return request
FUNCTIONS = ["count_persons", "count", "sum", "mean"]
REGIONS = ["420100", "420200", "420300", "430100"]
MISSING = object()  # a member left out


def _subset(rng: random.Random, items: list[Any], low: int = 0) -> list[Any]:
    if not items:
        return []
    return rng.sample(items, rng.randint(min(low, len(items)), len(items)))


LIVE: set[str] = set()  # ids of the grants made live, to draw covering queries from


def _grant(rng: random.Random, gid: str, insurer: str, purpose: str, lifetime: str) -> Any:
    dataset = rng.choice(DATASETS)
    ds = CATALOG["datasets"][dataset]
    necessary = CATALOG["purposes"].get(purpose, {}).get("necessary_fields", [])
    dims = sorted(set(_subset(rng, ds["dimensions"], 1)) | set(_subset(rng, necessary)[:2]))
    measures = sorted(_subset(rng, ds["measures"], 1))
    body: dict[str, Any] = {
        "grant_id": gid,
        "insurer": insurer,
        "purpose": purpose,
        "datasets": sorted({dataset, rng.choice(DATASETS)}),
        "dimensions": [d for d in dims if d in ds["dimensions"]] or ds["dimensions"][:1],
        "measures": measures,
        "valid_from_ns": T0 - rng.randint(1, 30) * DAY,
        "valid_until_ns": T0 + rng.randint(1, 30) * DAY,
        "revoked": False,
    }
    if rng.random() < 0.4 and "insu_admdvs" in ds["dimensions"]:
        body["filters"] = {"insu_admdvs": _subset(rng, REGIONS, 1)}
    if rng.random() < 0.7:
        body["min_cell_size"] = rng.choice([1, 3, 5, 10, 20, 50])
    if rng.random() < 0.7:
        body["max_rows"] = rng.choice([1, 100, 5_000, 10_000, 50_000])
    if lifetime == "live":
        if purpose in PURPOSES and insurer in INSURERS:
            LIVE.add(gid)
    elif lifetime == "expired":
        body["valid_until_ns"] = T0 - rng.choice([0, 1, DAY])
        body["valid_from_ns"] = body["valid_until_ns"] - 10 * DAY
    elif lifetime == "future":
        body["valid_from_ns"] = T0 + rng.choice([1, DAY])
    elif lifetime == "revoked":
        body["revoked"] = True
    elif lifetime == "malformed":
        key, value = rng.choice(
            [
                ("valid_until_ns", "2099-01-01"),
                ("valid_from_ns", None),
                ("revoked", "no"),
                ("revoked", MISSING),
                ("filters", ["insu_admdvs"]),
                ("min_cell_size", "ten"),
                ("max_rows", None),
                ("datasets", "settlements"),
            ]
        )
        if value is MISSING:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def data_documents(rng: random.Random) -> list[dict[str, Any]]:
    """Three data documents: many grants, few grants and odd catalog defaults, no defaults."""
    lifetimes = ["live"] * 6 + ["expired", "future", "revoked", "malformed"]
    grants: dict[str, Any] = {}
    for n in range(40):
        gid = f"g-{n:03d}"
        insurer = INSURERS[n % 2] if rng.random() < 0.9 else "ins-009"
        purpose = rng.choice([*PURPOSES, "marketing"]) if rng.random() < 0.95 else "marketing"
        grants[gid] = _grant(rng, gid, insurer, purpose, rng.choice(lifetimes))
    few = {gid: grants[gid] for gid in sorted(grants)[:6]}
    odd_catalog = copy.deepcopy(CATALOG)
    odd_catalog["defaults"] = {"min_cell_size": 3, "min_cell_size_floor": 7, "max_rows": 20}
    no_defaults = copy.deepcopy(CATALOG)
    del no_defaults["defaults"]
    return [
        {"gateway": {"catalog": CATALOG, "grants": grants}},
        {"gateway": {"catalog": odd_catalog, "grants": few}},
        {"gateway": {"catalog": no_defaults, "grants": grants}},
    ]


def _covering_query(rng: random.Random, grant: dict[str, Any]) -> dict[str, Any]:
    """A query the grant is meant to cover (the purpose may still refuse a field)."""
    datasets = grant.get("datasets")
    dataset = rng.choice(datasets) if isinstance(datasets, list) and datasets else "settlements"
    ds = CATALOG["datasets"].get(dataset, CATALOG["datasets"]["settlements"])
    # Mostly only what the purpose allows, so that many of these queries are allowed.
    necessary = CATALOG["purposes"].get(grant["purpose"], {}).get("necessary_fields")
    if necessary is None or rng.random() < 0.1:
        necessary = ds["dimensions"] + ds["measures"]
    dims = [d for d in grant["dimensions"] if d in ds["dimensions"] and d in necessary]
    fields = [f for f in grant["measures"] if f in ds["measures"] and f in necessary]
    measures: list[dict[str, Any]] = [{"fn": "count_persons"}]
    for field in _subset(rng, fields)[:2]:
        measures.append({"fn": rng.choice(["sum", "mean"]), "field": field})
    if rng.random() < 0.3:
        measures.append({"fn": "count", "field": None})
    filters: dict[str, Any] = {}
    grant_filters = grant.get("filters")
    if isinstance(grant_filters, dict):
        for key, values in grant_filters.items():
            if isinstance(values, list):
                filters[key] = _subset(rng, values, 1)
    if dims and rng.random() < 0.3:
        filters[rng.choice(dims)] = ["1"]
    group = _subset(rng, dims)[:3]
    touched = sorted(set(group) | {m["field"] for m in measures if m.get("field")} | set(filters))
    return {
        "subject": {"client_id": "c-1", "role": "insurer", "org": grant["insurer"]},
        "action": "query.aggregate",
        "purpose": grant["purpose"],
        "resource": {
            "dataset": dataset,
            "dimensions": group,
            "measures": measures,
            "filters": filters,
            "fields": touched,
        },
        "time_ns": T0,
    }


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set (or, with MISSING, remove) a member; creates objects on the way when needed."""
    target = doc
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            if value is MISSING:
                return
            child = {}
            target[key] = child
        target = child
    if value is MISSING:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value


# (path, candidate values) for one mutation each; values cover unknown names, missing members
# and members of the wrong type.
MUTATIONS: list[tuple[tuple[str, ...], list[Any]]] = [
    (("subject", "role"), [*ROLES, "root", MISSING, 5, None, ["insurer"]]),
    (("subject", "org"), [*INSURERS, "ins-009", MISSING, 7, None]),
    (("subject",), [MISSING, "insurer", []]),
    (("action",), [*ACTIONS, "data.export", MISSING, 3, None]),
    (("purpose",), [*PURPOSES, "marketing", MISSING, None, 1, ["hmb_pricing"]]),
    (
        ("time_ns",),
        # Floats only far from every grant boundary: regorus compares a float with a large
        # integer in f64 (1.7638e18 == T0 + 1 there), OPA exactly; the gateway sends integers.
        [T0 + DAY * 40, T0 - DAY * 40, T0 + 1, MISSING, "now", None, 1.5e18, 1.5, True, 0],
    ),
    (("resource",), [MISSING, {}, "settlements", []]),
    (("resource", "dataset"), [*DATASETS, "claims", MISSING, 5, None]),
    (
        ("resource", "dimensions"),
        [["psn_id"], ["gend", "hosp_lv"], ["year", "med_type"], "gend", [1], MISSING, [], None],
    ),
    (
        ("resource", "measures"),
        [
            [{"fn": "min", "field": "medfee_sumamt"}],
            [{"fn": "max", "field": "hifp_pay"}],
            [{"fn": "sum"}],
            [{"fn": "mean", "field": None}],
            [{"fn": "sum", "field": "gend"}],
            [{"fn": "sum", "field": "acct_pay"}],
            [{"fn": "sum", "field": "exposure"}],
            [{"field": "medfee_sumamt"}],
            [{"fn": 3}],
            ["count"],
            "count",
            MISSING,
            [],
        ],
    ),
    (
        ("resource", "filters"),
        [
            {},
            {"insu_admdvs": REGIONS[:1]},
            {"insu_admdvs": ["999999"]},
            {"insu_admdvs": []},
            {"hosp_lv": ["3"]},
            {"medfee_sumamt": ["0"]},
            {"insu_admdvs": "420100"},
            ["insu_admdvs"],
            MISSING,
        ],
    ),
    (
        ("resource", "fields"),
        [["psn_id"], ["acct_pay"], ["gend", "year"], "gend", [None], MISSING, []],
    ),
]


# Mutations of a person action's request: the verified consent claims (input.consent) and
# what the request names, missing or of the wrong type.
CONSENT_MUTATIONS: list[tuple[tuple[str, ...], list[Any]]] = [
    (("consent",), [MISSING, "cst-1", None, {}]),
    (("consent", "client_id"), [MISSING, 7, None, "ins-999"]),
    (
        ("consent", "authorization_details"),
        [
            MISSING, "read", [], [5],
            [{"purpose": "claims_fast_track"}],
            [{"purpose": "claims_fast_track", "datatypes": "settlements.summary"}],
            [{"purpose": "enrollment_check", "datatypes": ["enrollment.status"]}],
        ],
    ),
    (("resource", "datatypes"), [MISSING, "settlements.summary", [5], [],
                                 ["settlements.amounts", "settlements.amounts"]]),
    (("resource", "fields"), [MISSING, "setl_date", [], ["dise_codg"], [1]]),
    (("purpose",), [MISSING, None, 3, "claims_fast_track", "enrollment_check"]),
    (("subject", "org"), [MISSING, None, 5]),
]


def policy_inputs(rng: random.Random, doc: dict[str, Any], count: int) -> list[dict[str, Any]]:
    grants = list(doc["gateway"]["grants"].values())
    inputs: list[dict[str, Any]] = []
    for n in range(count):
        kind = n % 10
        if kind <= 1:  # every role with every action, and unknown ones; or a permitted pair
            role, action = rng.choice(PERMITTED)
            if kind == 0:
                role = rng.choice([*ROLES, "root"])
                action = rng.choice([*ACTIONS, "data.export"])
            elif rng.random() < 0.6:  # more person actions: their consent claims vary most
                role, action = "insurer", rng.choice(sorted(PERSON_REQUESTS))
            body: dict[str, Any] = {
                "subject": {"client_id": "c-2", "role": role, "org": rng.choice(INSURERS)},
                "action": action,
                "purpose": rng.choice([None, *PURPOSES]),
                "resource": {},
                "time_ns": T0,
            }
            if action in PERSON_REQUESTS:
                body.update(_person_request(rng, action, body["subject"]["org"]))
                # Half keep well-formed claims; half get claims missing or of the wrong type.
                for path, values in rng.sample(CONSENT_MUTATIONS, rng.choice([0, 0, 1, 2])):
                    value = rng.choice(values)
                    _set(body, path, value if value is MISSING else copy.deepcopy(value))
        else:
            live = [g for g in grants if g["grant_id"] in LIVE] or grants
            body = _covering_query(rng, rng.choice(live if rng.random() < 0.8 else grants))
            # Three in ten stay as built (mostly allowed); half get 1-3 mutations.
            mutations = 0 if kind <= 4 else rng.randint(1, 3)
            for path, values in rng.sample(MUTATIONS, mutations):
                value = rng.choice(values)
                _set(body, path, value if value is MISSING else copy.deepcopy(value))
        inputs.append(body)
    return inputs


def corpus() -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    rng = random.Random(SEED)
    documents = data_documents(rng)
    return [
        (doc, policy_inputs(rng, doc, count))
        for doc, count in zip(documents, INPUTS_PER_DOCUMENT, strict=True)
    ]


def _decision_or_error(engine: PolicyEngine, policy_input: dict[str, Any]) -> dict[str, Any]:
    try:
        result = engine.decide(policy_input).to_json()
    except PolicyEngineError as error:
        return {"error": str(error)}
    result.pop("engine")
    result.pop("decision_id")  # OPA's id of its decision; regorus has none
    return result


# --- tests --------------------------------------------------------------------------------------


def test_the_corpus_covers_the_cases_and_both_regorus_modes_agree() -> None:
    allowed: set[str] = set()
    reasons: set[str] = set()
    masked = 0
    embedded = RegorusEngine()
    interpreter = RegorusEngine(mode="interpreter")
    total = 0
    for doc, inputs in corpus():
        embedded.set_data(doc)
        interpreter.set_data(doc)
        for policy_input in inputs:
            decision = embedded.decide(policy_input)
            assert decision == interpreter.decide(policy_input), policy_input
            total += 1
            if decision.allow:
                allowed.add(str(policy_input.get("action")))
                masked += bool(decision.obligations and decision.obligations.mask_fields)
            reasons.update(decision.reasons)
    assert total >= 1_000
    assert allowed == set(ACTIONS), allowed
    for expected in [
        r"^grant g-\d+ has expired$",
        r"^grant g-\d+ was revoked$",
        r"^grant g-\d+ is not yet valid$",
        r"^grant g-\d+ is malformed$",
        r"^purpose marketing is not in the catalog$",
        r"^no grant for purpose ",
        r"^dataset claims is not in the catalog$",
        r"^request has no (time|subject org|subject role|action|purpose|resource)$",
        r"^resource has no dataset$",
        r"^resource\.(dimensions|measures|filters|fields) must be",
        r"^aggregate function (min|max) is not allowed$",
        r"^aggregate function (sum|mean) needs a measure field$",
        r"^action .* is not allowed for role ",
        r"^policy data has no valid catalog defaults$",
        r"^field .* is not necessary for purpose ",
        r"^(dimension|measure field|field) .* is not granted$",
        r"^filter on .* must stay within the granted values$",
        # person actions: the verified consent claims
        r"^request has no verified consent$",
        r"^consent was issued to another insurer$",
        r"^consent does not cover purpose ",
        r"^purpose .* does not serve persons\.(enrollment|settlements)$",
        r"^request names no datatype$",
        r"^datatype .* is not consented$",
    ]:
        assert any(re.search(expected, reason) for reason in reasons), expected
    assert masked > 0  # allowed person answers with fields withheld (mask_fields)


def test_regorus_and_the_opa_server_decide_alike(opa_server: OpaServer) -> None:
    embedded = RegorusEngine()
    remote = build_engine("opa", url=opa_server.url, timeout=5.0)
    assert isinstance(remote, OpaServerEngine)
    assert remote.version == embedded.version
    differences: list[str] = []
    total = allowed = 0
    for doc, inputs in corpus():
        embedded.set_data(doc)
        remote.set_data(doc)
        assert remote.ready()
        for policy_input in inputs:
            mine = _decision_or_error(embedded, policy_input)
            theirs = _decision_or_error(remote, policy_input)
            total += 1
            allowed += bool(mine.get("allow"))
            if mine != theirs and len(differences) < 10:
                differences.append(f"input {policy_input}\n regorus {mine}\n opa     {theirs}")
    remote.close()
    assert not differences, "\n".join(differences)
    assert total >= 1_000
    assert 0.15 * total < allowed < 0.85 * total, (allowed, total)


def test_the_opa_engine_fails_closed_when_the_server_dies() -> None:
    server = OpaServer(opa_binary())
    try:
        engine = OpaServerEngine(server.url, data={"gateway": {"catalog": CATALOG, "grants": {}}})
        assert engine.ready()
        read = {"subject": {"role": "insurer"}, "action": "catalog.read", "resource": {}}
        assert engine.decide(read).allow
    finally:
        server.stop()
    with pytest.raises(PolicyEngineError, match="cannot be reached"):
        engine.decide(read)
    with pytest.raises(PolicyEngineError):
        engine.set_data({"gateway": {"catalog": CATALOG, "grants": {}}})
    assert not engine.ready()
    with pytest.raises(PolicyEngineError, match="could not be loaded"):
        engine.decide(read)
    engine.close()


def test_the_opa_engine_refuses_a_server_that_is_not_there() -> None:
    with pytest.raises(PolicyEngineError, match="cannot be reached"):
        OpaServerEngine(f"http://127.0.0.1:{free_port()}", timeout=0.5)


def test_workers_sharing_one_server_never_put_older_grants_back(opa_server: OpaServer) -> None:
    # Two workers, one OPA: worker a pushes the revocation (grants version 2); worker b, which
    # read the grants just before it (version 1), pushes late. The revocation stays.
    grant = {"grant_id": "g-1", "insurer": "ins-001", "purpose": "hmb_pricing",
             "datasets": ["settlements"], "dimensions": ["gend"], "measures": [],
             "valid_from_ns": T0 - DAY, "valid_until_ns": T0 + DAY, "revoked": False}
    query = {"subject": {"client_id": "c-1", "role": "insurer", "org": "ins-001"},
             "action": "query.aggregate", "purpose": "hmb_pricing", "time_ns": T0,
             "resource": {"dataset": "settlements", "dimensions": ["gend"],
                          "measures": [{"fn": "count_persons"}], "filters": {},
                          "fields": ["gend"]}}

    def data(revoked: bool) -> dict[str, Any]:
        return {"gateway": {"catalog": CATALOG, "grants": {"g-1": {**grant, "revoked": revoked}}}}

    worker_a = OpaServerEngine(opa_server.url, data=data(False), timeout=5.0)
    worker_b = OpaServerEngine(opa_server.url, timeout=5.0)
    assert worker_a.decide(query).allow
    worker_a.set_data(data(True), version=2)
    worker_b.set_data(data(False), version=1)  # late, and older: left out
    assert worker_b.ready()
    for worker in (worker_a, worker_b):
        assert worker.decide(query).reasons == ("grant g-1 was revoked",)
    worker_b.set_data(data(False), version=3)  # a newer version (e.g. re-granted) does apply
    assert worker_a.decide(query).allow
    worker_a.close()
    worker_b.close()


def test_the_opa_binary_is_the_pinned_build() -> None:
    binary = opa_binary()
    assert shutil.which(str(binary))
    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=True)
    pinned = subprocess.run(
        ["grep", "-m1", "^OPA_VERSION=", str(BUILD_SCRIPT)], capture_output=True, text=True
    ).stdout.strip()
    assert f"Version: {pinned.removeprefix('OPA_VERSION=v')}" in out.stdout
