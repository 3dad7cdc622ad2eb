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
import os
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.catalog import load_catalog
from gateway.errors import PolicyEngineError
from gateway.policy import (
    OpaServerEngine,
    PolicyEngine,
    RegorusEngine,
    build_engine,
    policies_dir,
)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "build-opa.sh"

SEED = 20260501
INPUTS_PER_DOCUMENT = (600, 400, 200)  # three data documents: 1,200 inputs
T0 = 1_763_800_000_000_000_000
DAY = 86_400 * 10**9


# --- the OPA server ---------------------------------------------------------------------------


def opa_binary() -> Path:
    """The cached OPA binary; fails under CI, skips locally, when it is not built."""
    override = os.environ.get("GATEWAY_OPA_BIN")
    if override:
        path = Path(override)
    else:
        answer = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--path"], capture_output=True, text=True, check=True
        )
        path = Path(answer.stdout.strip())
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"the OPA binary {path} is not built: run `make opa-check` (tools/build-opa.sh)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OpaServer:
    """``opa run --server`` on a free loopback port, stopped at the end."""

    def __init__(self, binary: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                str(binary),
                "run",
                "--server",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "error",
                "--disable-telemetry",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"opa exited with {self.process.returncode}: {err[:2000]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("opa did not become healthy within 20 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stderr:
            self.process.stderr.close()


@pytest.fixture(scope="module")
def opa_server() -> Iterator[OpaServer]:
    server = OpaServer(opa_binary())
    try:
        yield server
    finally:
        server.stop()


# --- the corpus ---------------------------------------------------------------------------------


def catalog_document() -> dict[str, Any]:
    catalog = load_catalog()
    return {
        "datasets": {
            name: {"dimensions": list(ds.dimensions), "measures": list(ds.measures)}
            for name, ds in catalog.datasets.items()
        },
        "purposes": {
            name: {"necessary_fields": list(p.necessary_fields)}
            for name, p in catalog.purposes.items()
        },
        "defaults": {
            "min_cell_size": catalog.defaults.min_cell_size,
            "min_cell_size_floor": catalog.defaults.min_cell_size_floor,
            "max_rows": catalog.defaults.max_rows,
        },
    }


CATALOG = catalog_document()
DATASETS = sorted(CATALOG["datasets"])
PURPOSES = sorted(CATALOG["purposes"])
INSURERS = ["ins-001", "ins-002", "ins-003"]
ACTIONS = [
    "query.aggregate", "catalog.read", "grants.manage", "audit.read", "consents.manage",
    "persons.enrollment",
]
ROLES = ["insurer", "admin", "auditor", "subject"]
PERMITTED = [
    ("insurer", "catalog.read"),
    ("insurer", "query.aggregate"),
    ("admin", "grants.manage"),
    ("admin", "consents.manage"),
    ("insurer", "persons.enrollment"),
    ("auditor", "audit.read"),
]
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
            body: dict[str, Any] = {
                "subject": {"client_id": "c-2", "role": role, "org": rng.choice(INSURERS)},
                "action": action,
                "purpose": rng.choice([None, *PURPOSES]),
                "resource": {},
                "time_ns": T0,
            }
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
    return result


# --- tests --------------------------------------------------------------------------------------


def test_the_corpus_covers_the_cases_and_both_regorus_modes_agree() -> None:
    allowed: set[str] = set()
    reasons: set[str] = set()
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
    ]:
        assert any(re.search(expected, reason) for reason in reasons), expected


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


def test_the_opa_engine_fails_closed_on_slow_or_malformed_answers() -> None:
    answers: list[httpx.Response] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            return httpx.Response(200 if "policies" in request.url.path else 204, json={})
        return answers.pop(0)

    deny = {"allow": False, "reasons": ["no"], "grant_id": None, "obligations": None}
    answers.append(httpx.Response(200, json={"result": deny}))
    engine = OpaServerEngine(policy_dir=policies_dir(), transport=httpx.MockTransport(handler))
    cases: list[tuple[httpx.Response | Exception, str]] = [
        (httpx.Response(500, json={"code": "internal_error"}), "HTTP 500"),
        (httpx.Response(200, json={}), "undefined"),
        (httpx.Response(200, content=b"not json"), "malformed JSON"),
        (httpx.Response(200, json=[1]), "malformed JSON"),
        (httpx.Response(200, json={"result": {"allow": "yes"}}), "malformed"),
        (httpx.Response(200, json={"result": {**deny, "reasons": []}}), "malformed"),
    ]
    for answer, message in cases:
        assert isinstance(answer, httpx.Response)
        answers.append(answer)
        with pytest.raises(PolicyEngineError, match=message):
            engine.decide({})
    answers.append(httpx.Response(200, json={"result": deny}))
    assert engine.decide({}).reasons == ("no",)

    def slow(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            return httpx.Response(200, json={})
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(PolicyEngineError, match="in time"):
        OpaServerEngine(transport=httpx.MockTransport(slow))


def test_the_opa_binary_is_the_pinned_build() -> None:
    binary = opa_binary()
    assert shutil.which(str(binary))
    out = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=True)
    pinned = subprocess.run(
        ["grep", "-m1", "^OPA_VERSION=", str(BUILD_SCRIPT)], capture_output=True, text=True
    ).stdout.strip()
    assert f"Version: {pinned.removeprefix('OPA_VERSION=v')}" in out.stdout
