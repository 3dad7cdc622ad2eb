"""The gateway's use cases, free of HTTP: every request is decided, executed, disclosed and
audited here. Routes only translate HTTP to these calls and back.

Audit first-class: each use case writes exactly one audit entry, allowed or denied, before it
returns; if the entry cannot be made durable the call fails (AuditUnavailable → 503) and no
result leaves.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import duckdb
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError as PydanticValidationError

from gateway.audit import AuditEntry, AuditLog, utc_timestamp
from gateway.audit.log import MAX_SEARCH_LIMIT
from gateway.auth.tokens import AccessTokenIssuer, Principal
from gateway.catalog import Catalog
from gateway.consent import (
    PURPOSES,
    ConsentRecord,
    DataPeriod,
    DpopProof,
    VerifiedConsent,
    issue_consent_token,
    pairwise_sub,
    parse_compact,
    verify_consent_token,
    verify_dpop_proof,
)
from gateway.consent.keys import KeyState
from gateway.consent.lookup import certno_lookup
from gateway.disclosure.control import DisclosureControl, published_disclosure
from gateway.disclosure.rules import DEFAULT_DOMINANCE_K, DEFAULT_P_PERCENT
from gateway.errors import (
    AuthenticationFailed,
    BudgetExhausted,
    Conflict,
    GatewayError,
    NotFound,
    PolicyDenied,
    PolicyEngineError,
    QueryRejected,
    RateLimited,
    StoreUnavailable,
    ValidationFailed,
)
from gateway.policy import (
    Decision,
    Obligations,
    PolicyEngine,
    PolicyTrace,
    note_policy_trace,
    take_policy_trace,
)
from gateway.query.compiler import CompiledQuery, compile_aggregate
from gateway.query.spec import AggregateQuery
from gateway.query.sql import parse_sql
from gateway.query.store import QueryStore
from gateway.service.consents import (
    CHINA_TZ,
    ENROLLMENT_ACTION,
    ENROLLMENT_DATATYPES,
    ENROLLMENT_PURPOSE,
    MAX_TOKEN_LIFETIME,
    SETTLEMENT_FIELDS,
    SETTLEMENTS_ACTION,
    SETTLEMENTS_PURPOSE,
    SETTLEMENTS_SCAN_SQL,
    SETTLEMENTS_SQL,
    ConsentConfig,
    ConsentRequest,
    PersonIndex,
    SettlementsRequest,
    SubjectCaller,
    consent_refused,
    enrollment_answer,
    new_consent_key,
    new_person_pseudonym,
    period_bounds,
    person_from_subject,
    settlement_rows,
    subject_from_psn_id,
)
from gateway.service.grants import GrantRequest, grant_to_json, new_grant_record, policy_data
from gateway.state.consents import ReplaySpend, StoredConsent
from gateway.state.store import StateStore

__all__ = ["Audited", "Gateway"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Audited:
    """A use case's answer and the index of the audit entry that records it."""

    body: Any
    audit_id: int


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Gateway:
    def __init__(
        self,
        *,
        catalog: Catalog,
        state: StateStore,
        policy: PolicyEngine,
        store: QueryStore,
        audit: AuditLog,
        tokens: AccessTokenIssuer,
        checkpoint_key: Ed25519PrivateKey,
        audit_origin: str,
        consent: ConsentConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.state = state
        self.policy = policy
        self.store = store
        self.audit = audit
        self.tokens = tokens
        self.checkpoint_key = checkpoint_key
        self.audit_origin = audit_origin
        self.consent = consent
        self.clock = clock
        self._policy_data_version = -1
        self._policy_lock = threading.Lock()
        self._grant_limits: dict[str, int] = {}
        self._grant_magnitude: dict[str, tuple[Decimal, Decimal]] = {}
        self._compiled: dict[str, CompiledQuery] = {}
        self.disclosure = DisclosureControl(catalog=catalog, state=state, store=store,
                                            clock=lambda: self.clock())

    # -- readiness -----------------------------------------------------------------------
    def readiness(self) -> dict[str, bool]:
        checks = {"policy": False, "query_store": False, "state": False}
        try:
            self._sync_policy_data()
            checks["policy"] = self.policy.ready()
        except GatewayError:
            checks["policy"] = False
        checks["query_store"] = self.store.ready()
        try:
            self.state.version("grants")
            checks["state"] = True
        except StoreUnavailable:
            checks["state"] = False
        return checks

    # -- policy data follows the grants table, in every worker ---------------------------
    def _sync_policy_data(self, version: int | None = None) -> None:
        """Give the policy engine the grants as of ``version`` of the ``grants`` counter (read
        now when the caller has not read it already)."""
        if version is None:
            version = self.state.version("grants")
        if version == self._policy_data_version:
            return
        with self._policy_lock:
            if version == self._policy_data_version:
                return
            grants = self.state.list_grants()
            try:
                self.policy.set_data(policy_data(self.catalog, grants), version=version)
            except PolicyEngineError:
                # The decision that needed this data fails; its audit entry still names the
                # policies that were to decide.
                note_policy_trace(self.policy.revision)
                raise
            self._grant_limits = {
                g.grant_id: int(g.body.get("rate_limit_per_minute", 600)) for g in grants
            }
            self._grant_magnitude = {
                g.grant_id: (Decimal(str(g.body.get("dominance_k", DEFAULT_DOMINANCE_K))),
                             Decimal(str(g.body.get("p_percent", DEFAULT_P_PERCENT))))
                for g in grants
            }
            self._policy_data_version = version

    def _decide(self, principal: Principal, action: str, purpose: str | None,
                resource: dict[str, Any]) -> Decision:
        self._sync_policy_data()
        return self.policy.decide(
            {
                "subject": principal.policy_subject(),
                "action": action,
                "purpose": purpose,
                "resource": resource,
                "time_ns": int(self.clock() * 1_000_000_000),
            }
        )

    # -- audit ---------------------------------------------------------------------------
    def record(self, principal: Principal | None, action: str, *, status: int,
               decision: str, **members: Any) -> int:
        """Append the audit entry of this request; its index once durable (blocks)."""
        return self.audit.append(self._audit_entry(principal, action, status=status,
                                                   decision=decision, **members))

    async def record_async(self, principal: Principal | None, action: str, *, status: int,
                           decision: str, **members: Any) -> int:
        """:meth:`record` for the event loop: waits for durability without holding a
        thread (``AuditLog.append_async``)."""
        return await self.audit.append_async(self._audit_entry(
            principal, action, status=status, decision=decision, **members))

    def _audit_entry(self, principal: Principal | None, action: str, *, status: int,
                     decision: str, **members: Any) -> AuditEntry:
        # The policies behind the decision this entry records (made in this request, by
        # whichever engine): bundle revision, and OPA's decision id when OPA decided.
        trace = take_policy_trace()
        if trace is not None:
            members.setdefault("bundle_revision", trace.bundle_revision)
            members.setdefault("decision_id", trace.decision_id)
        return AuditEntry(
            ts=utc_timestamp(datetime.fromtimestamp(self.clock(), tz=UTC)),
            actor=principal.client_id if principal else "anonymous",
            role=principal.role if principal else "anonymous",
            org=principal.org if principal else None,
            action=action,
            decision=decision,
            status=status,
            **members,
        )

    def authorize(self, principal: Principal, action: str) -> Decision:
        """Role-level decision for management and audit calls; denies are audited here."""
        try:
            decision = self._decide(principal, action, None, {})
        except PolicyEngineError as exc:
            self.record(principal, action, status=exc.status, decision="error",
                        error_code=exc.code, reasons=["policy engine unavailable"])
            raise
        if not decision.allow:
            audit_id = self.record(principal, action, status=403, decision="deny",
                                   reasons=list(decision.reasons),
                                   policy_version=decision.policy_version)
            raise PolicyDenied(decision.reasons, audit_id=audit_id)
        return decision

    # -- catalog -------------------------------------------------------------------------
    def catalog_for(self, principal: Principal) -> Audited:
        decision = self.authorize(principal, "catalog.read")
        now_ns = int(self.clock() * 1_000_000_000)
        grants = [
            g for g in self.state.list_grants(principal.org or "")
            if g.revoked_at_ns is None and g.valid_from_ns <= now_ns < g.valid_until_ns
        ]
        datasets: dict[str, Any] = {}
        for g in grants:
            purpose = self.catalog.purposes[g.purpose]
            for ds_name in g.body["datasets"]:
                ds = self.catalog.datasets[ds_name]
                dims = [d for d in g.body["dimensions"] if d in ds.dimensions]
                measures = [m for m in g.body["measures"] if m in ds.measures]
                entry = datasets.setdefault(ds_name, {"title": ds.title, "grants": []})
                entry["grants"].append({
                    "grant_id": g.grant_id,
                    "purpose": g.purpose,
                    "purpose_title": purpose.title,
                    "dimensions": [
                        {"name": d, "title": ds.dimensions[d].title,
                         "values": g.body["filters"].get(d, ds.dimensions[d].values),
                         "justification": purpose.necessary_fields.get(d)}
                        for d in dims
                    ],
                    "measures": [
                        {"name": m, "title": ds.measures[m].title,
                         "functions": ["sum", "mean"],
                         "justification": purpose.necessary_fields.get(m)}
                        for m in measures
                    ],
                    "filters_required": g.body["filters"],
                    "min_cell_size": g.body["min_cell_size"],
                    "disclosure": published_disclosure(g.body),
                    "valid_until": grant_to_json(g, now_ns)["valid_until"],
                })
        body = {"datasets": datasets, "count_functions": ["count_persons", "count"]}
        audit_id = self.record(principal, "catalog.read", status=200, decision="allow",
                               policy_version=decision.policy_version,
                               response_hash=_digest(orjson.dumps(body)))
        return Audited(body, audit_id)

    # -- grants --------------------------------------------------------------------------
    def create_grant(self, principal: Principal, request: GrantRequest) -> Audited:
        decision = self.authorize(principal, "grants.manage")
        now = datetime.fromtimestamp(self.clock(), tz=UTC)
        request_json = request.model_dump(mode="json")
        try:
            record = new_grant_record(request, self.catalog, created_by=principal.client_id,
                                      now=now)
            self.state.add_grant(record)
        except GatewayError as exc:
            self.record(principal, "grants.create", status=exc.status, decision="deny",
                        error_code=exc.code, purpose=request.purpose, request=request_json,
                        reasons=list(exc.details.get("problems", [exc.message])),
                        policy_version=decision.policy_version)
            raise
        body = grant_to_json(record, int(self.clock() * 1e9))
        audit_id = self.record(
            principal, "grants.create", status=201, decision="allow", purpose=request.purpose,
            grant_id=record.grant_id, request=request_json,
            policy_version=decision.policy_version, response_hash=_digest(orjson.dumps(body)))
        return Audited(body, audit_id)

    def list_grants(self, principal: Principal, insurer: str | None) -> Audited:
        decision = self.authorize(principal, "grants.manage")
        now_ns = int(self.clock() * 1e9)
        body = [grant_to_json(g, now_ns) for g in self.state.list_grants(insurer)]
        audit_id = self.record(principal, "grants.list", status=200, decision="allow",
                               policy_version=decision.policy_version,
                               response_hash=_digest(orjson.dumps(body)))
        return Audited(body, audit_id)

    def revoke_grant(self, principal: Principal, grant_id: str) -> Audited:
        decision = self.authorize(principal, "grants.manage")
        try:
            record = self.state.revoke_grant(grant_id, int(self.clock() * 1e9))
        except GatewayError as exc:
            self.record(principal, "grants.revoke", status=exc.status, decision="deny",
                        error_code=exc.code, grant_id=grant_id, reasons=[exc.message],
                        policy_version=decision.policy_version)
            raise
        body = grant_to_json(record, int(self.clock() * 1e9))
        audit_id = self.record(
            principal, "grants.revoke", status=200, decision="allow", grant_id=grant_id,
            purpose=record.purpose, policy_version=decision.policy_version,
            response_hash=_digest(orjson.dumps(body)))
        return Audited(body, audit_id)

    # -- queries -------------------------------------------------------------------------
    def authorize_query(
        self, principal: Principal, action: str, purpose: str, resource: dict[str, Any],
        common: dict[str, Any],
    ) -> Obligations:
        """One policy decision for a data query, then the grant's rate limit. Every refusal
        (engine down, deny, rate) is audited under ``action`` with ``common`` members; on
        success ``common`` gains the policy version and grant id for the final entry."""
        try:
            decision = self._decide(principal, "query.aggregate", purpose, resource)
        except PolicyEngineError as exc:
            self.record(principal, action, status=exc.status, decision="error",
                        error_code=exc.code, reasons=["policy engine unavailable"], **common)
            raise
        common["policy_version"] = decision.policy_version
        if not decision.allow or decision.obligations is None:
            audit_id = self.record(principal, action, status=403, decision="deny",
                                   error_code=PolicyDenied.code,
                                   reasons=list(decision.reasons), **common)
            raise PolicyDenied(decision.reasons, audit_id=audit_id)
        common["grant_id"] = decision.grant_id
        limit = self._grant_limits.get(decision.grant_id or "", 600)
        key = f"grant:{decision.grant_id}" if decision.grant_id else f"client:{principal.client_id}"
        try:
            # Shared by every worker and replica (gateway.state.ratelimits: GCRA).
            taken = self.state.take_rate(key, limit, int(self.clock() * 1_000_000_000))
        except StoreUnavailable as exc:
            self.record(principal, action, status=exc.status, decision="error",
                        error_code=exc.code, reasons=["rate limit unavailable"], **common)
            raise
        if not taken.allowed:
            audit_id = self.record(principal, action, status=429, decision="deny",
                                   error_code=RateLimited.code,
                                   reasons=[f"rate limit of {limit} requests per minute"],
                                   **common)
            raise RateLimited(f"rate limit of {limit} requests per minute exceeded",
                              retry_after_s=taken.retry_after_s,
                              details={"audit_id": audit_id})
        return decision.obligations

    def record_failure(self, principal: Principal, action: str, exc: GatewayError,
                       common: dict[str, Any]) -> int:
        """Audit a query that failed after its policy decision: an exhausted budget is a
        refusal (429, its audit index in the error), anything else an error."""
        audit_id = self.record(principal, action, status=exc.status,
                               decision="deny" if exc.status == 429 else "error",
                               error_code=exc.code, reasons=[exc.message], **common)
        if isinstance(exc, BudgetExhausted):
            exc.details["audit_id"] = audit_id  # the Audit-Index of the refusal
        return audit_id

    def magnitude_rules(self, grant_id: str | None) -> tuple[Decimal, Decimal]:
        """The grant's dominance k and p% p for sums and means (the defaults when unset)."""
        return self._grant_magnitude.get(
            grant_id or "", (Decimal(DEFAULT_DOMINANCE_K), Decimal(DEFAULT_P_PERCENT)))

    def _compile(self, query: AggregateQuery) -> CompiledQuery:
        """Compilation is pure, so repeated questions reuse their SQL (bounded cache); the
        stored column types (per data version) let per-person sums stay 64-bit decimals."""
        dataset = self.catalog.dataset(query.dataset)
        types, version = ({}, "") if dataset is None else self.store.column_types(dataset.table)
        key = version + query.model_dump_json()
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = compile_aggregate(query, self.catalog, column_types=types)
            if len(self._compiled) >= 1024:
                self._compiled.clear()
            self._compiled[key] = compiled
        return compiled

    def sql_query(self, principal: Principal, purpose: str, sql: str) -> Audited:
        """An analyst's SQL, read into the same plan as the JSON spec (one policy, one
        disclosure path); a refused statement is audited by its hash, never its text."""
        try:
            query = parse_sql(sql, purpose=purpose, catalog=self.catalog)
        except QueryRejected as exc:
            self.record(principal, "query.sql", status=exc.status, decision="deny",
                        purpose=purpose, error_code=exc.code, reasons=[exc.message],
                        request={"sql_sha256": hashlib.sha256(sql.encode()).hexdigest(),
                                 "sql_chars": len(sql)})
            raise
        return self.aggregate(principal, query, action="query.sql",
                              extra_request={"sql_sha256": hashlib.sha256(sql.encode())
                                             .hexdigest()})

    def aggregate(self, principal: Principal, query: AggregateQuery, *,
                  action: str = "query.aggregate",
                  extra_request: dict[str, Any] | None = None) -> Audited:
        request_json = {**query.model_dump(mode="json", exclude_none=True),
                        **(extra_request or {})}
        fields = query.fields()
        purpose = self.catalog.purposes.get(query.purpose)
        justifications = {
            f: purpose.necessary_fields[f]
            for f in fields
            if purpose is not None and f in purpose.necessary_fields
        }
        common: dict[str, Any] = {
            "purpose": query.purpose, "request": request_json, "fields": fields,
            "field_justifications": justifications,
        }
        obligations = self.authorize_query(
            principal, action, query.purpose, query.policy_resource(), common)
        try:
            compiled = self._compile(query)
            dominance_k, p_percent = self.magnitude_rules(common.get("grant_id"))
            # Query, difference check, suppression, noise and budget, rounding, shaping
            # (gateway.disclosure.control).
            released = self.disclosure.release(
                query, compiled, obligations, org=principal.org,
                grant_id=common.get("grant_id"), dominance_k=dominance_k, p_percent=p_percent)
            result, data_version = released.result, released.data_version
        except GatewayError as exc:
            self.record_failure(principal, action, exc, common)
            raise
        body: dict[str, Any] = {
            "columns": result.columns,
            "rows": result.rows,
            "suppressed": [c.to_json() for c in result.suppressed],
            "suppressed_count": len(result.suppressed),
            "min_cell_size": obligations.min_cell_size,
            "data_version": data_version,
            "disclosure": released.report,
            "notes": result.notes,
        }
        audit_id = self.record(
            principal, action, status=200, decision="allow",
            cells_released=result.cells_released, cells_suppressed=len(result.suppressed),
            data_version=data_version, response_hash=_digest(orjson.dumps(body)),
            budget_spent=released.budget_spent, **common,
        )
        body["audit_id"] = audit_id
        return Audited(body=body, audit_id=audit_id)

    # -- audit log for auditors --------------------------------------------------------
    def audit_entries(self, principal: Principal, filters: dict[str, Any], *, limit: int,
                      offset: int) -> Audited:
        given = {k: v for k, v in filters.items() if v is not None}

        def build() -> dict[str, Any]:
            found = self.audit.search(**given, limit=limit, offset=offset)
            return {
                "entries": [{"index": i, **e.model_dump(mode="json")} for i, e in found],
                "size": self.audit.size(),
                "limit": limit,
                "offset": offset,
            }

        return self._audit_read(principal, "audit.read",
                                {**given, "limit": limit, "offset": offset}, build)

    def audit_checkpoint(self, principal: Principal) -> Audited:
        """The signed C2SP checkpoint of the log as it stands (at most one new one a second)."""
        decision = self.authorize(principal, "audit.read")
        note = self.audit.checkpoint(self.checkpoint_key, origin=self.audit_origin, max_age=1.0)
        audit_id = self.record(principal, "audit.checkpoint", status=200, decision="allow",
                               policy_version=decision.policy_version,
                               response_hash=_digest(note.encode("utf-8")))
        return Audited(note, audit_id)

    def _audit_read(self, principal: Principal, action: str, request: dict[str, Any],
                    build: Callable[[], dict[str, Any]]) -> Audited:
        decision = self.authorize(principal, "audit.read")
        try:
            body = build()
        except GatewayError as exc:
            self.record(principal, action, status=exc.status, decision="error",
                        error_code=exc.code, reasons=[exc.message], request=request,
                        policy_version=decision.policy_version)
            raise
        audit_id = self.record(principal, action, status=200, decision="allow",
                               request=request, policy_version=decision.policy_version,
                               response_hash=_digest(orjson.dumps(body)))
        return Audited(body, audit_id)

    def audit_inclusion(self, principal: Principal, index: int, tree_size: int
                        ) -> Audited:
        def build() -> dict[str, Any]:
            # One read for leaf, root and proof (checks the bounds first).
            leaf, root, proof = self.audit.inclusion(index, tree_size)
            return {
                "index": index,
                "tree_size": tree_size,
                "leaf_hash": _b64(leaf),
                "root": _b64(root),
                "proof": [_b64(h) for h in proof],
            }

        return self._audit_read(principal, "audit.proof.inclusion",
                                {"index": index, "tree_size": tree_size}, build)

    def audit_consistency(self, principal: Principal, first: int, second: int
                          ) -> Audited:
        def build() -> dict[str, Any]:
            proof = self.audit.consistency_proof(first, second)
            return {
                "first": first,
                "second": second,
                "first_root": _b64(self.audit.root(first)),
                "second_root": _b64(self.audit.root(second)),
                "proof": [_b64(h) for h in proof],
            }

        return self._audit_read(principal, "audit.proof.consistency",
                                {"first": first, "second": second}, build)

    # -- individual consent (docs/consent.md) ------------------------------------------
    def _person_index(self, config: ConsentConfig) -> PersonIndex:
        if config.persons is None:
            config.persons = PersonIndex(self.store)
        return config.persons

    def warm_up(self) -> None:
        """Before a serving process takes requests: the policy's data and the person index of
        the serving data version, which the first 投保身份校验 would otherwise wait for (a
        read of the whole ``persons`` table). What fails here is left to the requests and
        ``/readyz`` to report."""
        try:
            self._sync_policy_data()
            if self.consent is not None and self.store.ready():
                self._person_index(self.consent).refresh()
        except GatewayError as exc:
            _log.warning("warm-up incomplete: %s", exc.code)

    def _consent_config(self) -> ConsentConfig:
        if self.consent is None:
            raise StoreUnavailable("consent keys are not configured (run `gateway init`)")
        config = self.consent
        if config.unaudited:
            # Key registrations made while starting, before the audit log was wired.
            events, config.unaudited = config.unaudited, []
            starter = Principal(client_id="gateway:startup", role="admin", org=None,
                                token_id="startup")  # noqa: S106 - an id, not a secret
            for event in events:
                self.record(starter, "consents.keys", status=200, decision="allow",
                            request={"op": "register", "kid": event.kid,
                                     "from": event.old_state, "to": event.new_state})
        return config

    def jwks(self) -> dict[str, Any]:
        """The public consent keys, pending and active (``/.well-known/jwks.json``)."""
        if self.consent is None:
            return {"keys": []}
        return self._consent_config().key_set.publish_jwks()

    def _person_by_lookup(self, lookup: str) -> str | None:
        """The consent record ``subject`` of the person whose keyed certno lookup value is
        ``lookup``: one point read of the sorted ``person_lookup`` table; None if unknown."""
        try:
            with self.store.cursor() as (cur, _):
                cur.execute(_PERSON_LOOKUP_SQL, [lookup])
                row = cur.fetchone()
        except duckdb.CatalogException as exc:
            raise StoreUnavailable("this data version has no certno lookup table "
                                   "(reload with the lookup key)") from exc
        except duckdb.Error as exc:
            raise StoreUnavailable("query store error") from exc
        return None if row is None else subject_from_psn_id(int(row[0]))

    def _person_by_certno(self, config: ConsentConfig, certno: str) -> str:
        if config.lookup_key is None:
            raise StoreUnavailable("the certno lookup key is not configured")
        person = self._person_by_lookup(certno_lookup(config.lookup_key, certno))
        if person is None:
            raise NotFound("no person with this certno")
        return person

    def subject_sign_in(self, token: str) -> SubjectCaller:
        """A person's identity-service token → the signed-in person (subject role)."""
        config = self._consent_config()
        if config.subjects is None:
            raise StoreUnavailable("subject sign-in is not configured (no identity service "
                                   "public key)")
        identity = config.subjects.verify(token, now=self.clock())
        person = self._person_by_lookup(identity.lookup)
        if person is None:
            raise AuthenticationFailed("no person for this identity", code="subject_unknown")
        principal = Principal(client_id=new_person_pseudonym(config.pairwise_key, person),
                              role="subject", org=None, token_id=identity.jti)
        return SubjectCaller(principal=principal, person=person)

    def create_consent(self, caller: Principal | SubjectCaller,
                       request: ConsentRequest) -> Audited:
        """Record a person's consent and issue its token, bound to the insurer's DPoP key;
        ``client_id`` of the token is the insurer's org. An admin names the person by
        身份证号 (resolved through the keyed lookup, never kept); a person consents for
        themselves."""
        is_person = isinstance(caller, SubjectCaller)
        principal = caller.principal if isinstance(caller, SubjectCaller) else caller
        decision = self.authorize(principal, "consents.own" if is_person else "consents.manage")
        members: dict[str, Any] = {"purpose": request.purpose,
                                   "request": request.audit_request(),
                                   "policy_version": decision.policy_version}
        try:
            config = self._consent_config()
            if isinstance(caller, SubjectCaller):
                if request.certno is not None:
                    raise ValidationFailed("a person consents for themselves: omit certno")
                subject = caller.person
            else:
                if request.certno is None:
                    raise ValidationFailed("certno is required: the person the consent is for")
                subject = self._person_by_certno(config, request.certno)
            members["subject_pseudonym"] = pairwise_sub(config.pairwise_key, subject,
                                                        request.insurer)
            now = self.clock()
            # Whole seconds: a microsecond rounded up would start the consent after `now`.
            now_dt = datetime.fromtimestamp(int(now), tz=UTC)
            rule = PURPOSES.get(request.purpose)
            try:
                record = ConsentRecord(
                    consent_id="cst-" + secrets.token_hex(12),
                    subject=subject,
                    insurer_org=request.insurer,
                    purpose=request.purpose,
                    datatypes=request.datatypes,
                    period_start=request.period.start,
                    period_end=request.period.end,
                    valid_from=now_dt,
                    valid_until=request.valid_until,
                    created_by=principal.client_id,
                    created_at=now_dt,
                    single_use=rule.single_use if rule is not None else False,
                    claim_id=request.claim_id,
                )
            except PydanticValidationError as exc:
                raise ValidationFailed(
                    "invalid consent: " + "; ".join(str(e["msg"]) for e in exc.errors()[:5])
                ) from exc
            members["consent_id"] = record.consent_id
            token = issue_consent_token(
                record, key_set=config.key_set, issuer=config.issuer, audience=config.issuer,
                client_id=record.insurer_org, cnf_jkt=request.dpop_jkt, now=now,
                max_lifetime=MAX_TOKEN_LIFETIME, pairwise_key=config.pairwise_key,
            )
            exp = int(jwt.decode(token, options={"verify_signature": False})["exp"])
            self.state.add_consent(record)
        except GatewayError as exc:
            self.record(principal, "consents.create", status=exc.status,
                        decision="error" if exc.status >= 500 else "deny",
                        error_code=exc.code, reasons=[exc.message], **members)
            raise
        body = {
            "consent_id": record.consent_id,
            "token": token,
            "token_type": "consent+jwt",
            "expires_at": utc_timestamp(datetime.fromtimestamp(exp, tz=UTC)),
            "valid_until": utc_timestamp(record.valid_until.astimezone(UTC)),
        }
        audit_id = self.record(principal, "consents.create", status=201, decision="allow",
                               response_hash=_digest(orjson.dumps(body)), **members)
        return Audited(body, audit_id)

    def revoke_consent(self, caller: Principal | SubjectCaller, consent_id: str) -> Audited:
        """Revoke a consent (an admin any, a person only their own); it holds from the next
        request in every worker process."""
        is_person = isinstance(caller, SubjectCaller)
        principal = caller.principal if isinstance(caller, SubjectCaller) else caller
        decision = self.authorize(principal, "consents.own" if is_person else "consents.manage")
        members: dict[str, Any] = {"consent_id": consent_id,
                                   "policy_version": decision.policy_version}
        try:
            config = self._consent_config()
            if isinstance(caller, SubjectCaller):
                own = self.state.get_consent(consent_id)
                # Another person's consent is "not found": its existence is not theirs to learn.
                if own is None or own.record.subject != caller.person:
                    raise NotFound(f"consent {consent_id} does not exist")
            stored = self.state.revoke_consent(consent_id, principal.client_id,
                                               int(self.clock() * 1e9))
            members["purpose"] = stored.record.purpose
            members["subject_pseudonym"] = pairwise_sub(
                config.pairwise_key, stored.record.subject, stored.record.insurer_org)
        except GatewayError as exc:
            self.record(principal, "consents.revoke", status=exc.status,
                        decision="error" if exc.status >= 500 else "deny",
                        error_code=exc.code, reasons=[exc.message], **members)
            raise
        revoked_at = stored.revoked_at_ns or 0
        body = {"consent_id": consent_id, "state": "revoked",
                "revoked_at": utc_timestamp(datetime.fromtimestamp(revoked_at / 1e9, tz=UTC))}
        audit_id = self.record(principal, "consents.revoke", status=200, decision="allow",
                               response_hash=_digest(orjson.dumps(body)), **members)
        return Audited(body, audit_id)

    async def _decide_consented(self, principal: Principal, action: str, purpose: str,
                                resource: dict[str, Any], verified: VerifiedConsent,
                                grants_version: int) -> Decision:
        """The policy decision of a person-level call, with the verified consent claims. An
        in-process engine decides on the event loop (about 0.1 ms of CPU); one behind a
        network round trip decides off it."""
        self._sync_policy_data(grants_version)
        policy_input = {
            "subject": principal.policy_subject(),
            "action": action,
            "purpose": purpose,
            "resource": resource,
            "consent": verified.policy_input(),
            "time_ns": int(self.clock() * 1_000_000_000),
        }
        if self.policy.in_process:
            return self.policy.decide(policy_input)
        # The thread gets a copy of this context: its policy trace is carried back.
        decision, trace = await asyncio.to_thread(_decide_with_trace, self.policy,
                                                  policy_input)
        if trace is not None:
            note_policy_trace(trace.bundle_revision, trace.decision_id)
        return decision

    def _consented(self, principal: Principal, members: dict[str, Any], *,
                   config: ConsentConfig, now: float, access_token: str,
                   consent_token: str | None, dpop_proof: str | None, htu: str,
                   purpose: str, datatypes: tuple[str, ...], period: DataPeriod | None = None,
                   claim_id: str | None = None
                   ) -> tuple[VerifiedConsent, str, DpopProof, int]:
        """The consent token, the DPoP proof and the live consent record, in this order;
        each refusal raises with its own code (the caller audits it). Returns the proof too:
        its ``jti`` is spent by :meth:`_spend`, once the request is otherwise allowed.
        Returns (verified claims, the consent record's subject, the proof, the version of the
        grants counter read with the key set's, for the decision)."""
        now_ns = int(now * 1e9)
        if not consent_token:
            raise AuthenticationFailed("Consent header missing", code="consent_missing")
        jws = parse_compact(consent_token, prefix="consent")
        named = jws.payload.get("consent_id")
        # One read, in its own snapshot, for what this request relies on: the change counters
        # of the caches (a key or grant change made by any process holds here on the very
        # next request) and the consent record (so does a revocation). The consent is the one
        # the token names; it is used only once the token has verified.
        keys_version, grants_version, status = self.state.consent_status_and_versions(
            named if isinstance(named, str) else "", now_ns, "consent_keys", "grants")
        verified = verify_consent_token(
            jws, key_set=config.keys.current(keys_version), issuer=config.issuer,
            audience=config.issuer, client_id=principal.org or "", now=now,
            required_datatypes=datatypes, purpose=purpose, period=period, claim_id=claim_id,
        )
        members["consent_id"] = verified.consent_id
        members["subject_pseudonym"] = verified.sub
        # The proof's jti is spent last, with the consent's (one group-committed write):
        # here it is only read.
        proof = verify_dpop_proof(
            dpop_proof, htm="POST", htu=htu, access_token=access_token,
            expected_jkt=verified.cnf_jkt, now=now, seen_jti=lambda jti: True,
            issued_after=config.dpop_iat_bound,
        )
        if status is None or not status[2]:
            raise consent_refused("consent revoked or no longer valid", "consent_revoked")
        subject, insurer_org, _ = status
        if insurer_org != principal.org or pairwise_sub(
            config.pairwise_key, subject, insurer_org
        ) != verified.sub:
            raise consent_refused("token does not match its consent record",
                                  "consent_mismatch")
        return verified, subject, proof, grants_version

    async def _spend(self, principal: Principal, proof: DpopProof, verified: VerifiedConsent,
                     now: float) -> None:
        """Spend the DPoP proof's ``jti`` and, for a single-use consent, the consent's — last,
        so a refused request never burns a consent — in one write shared with the concurrent
        requests of this process (group commit). A replayed proof spends nothing."""
        now_ns = int(now * 1e9)
        config = self._consent_config()
        assert config.replay is not None  # noqa: S101 - set by load_consent_config
        item = ReplaySpend(
            client_id=principal.client_id, dpop_jti=proof.jti,
            dpop_expires_ns=proof.replay_window_ends * 1_000_000_000,
            consent_jti=verified.jti if verified.single_use else None,
            consent_id=verified.consent_id,
            consent_expires_ns=int(verified.replay_window_ends * 1e9))
        dpop_new, consent_new = await config.replay.spend_async(item, now_ns)
        if not dpop_new:
            raise AuthenticationFailed("DPoP proof jti was already used", code="dpop_replay")
        if not consent_new:
            raise consent_refused("single-use consent already used", "consent_used")

    def _refusal(self, principal: Principal, action: str, exc: GatewayError,
                 members: dict[str, Any]) -> AuditEntry:
        reasons = exc.reasons if isinstance(exc, PolicyDenied) else [exc.message]
        return self._audit_entry(principal, action, status=exc.status,
                                 decision="error" if exc.status >= 500 else "deny",
                                 error_code=exc.code, reasons=list(reasons), **members)

    def _refused(self, principal: Principal, action: str, exc: GatewayError,
                 members: dict[str, Any]) -> None:
        exc.details["audit_id"] = self.audit.append(self._refusal(principal, action, exc,
                                                                  members))

    async def _refused_async(self, principal: Principal, action: str, exc: GatewayError,
                             members: dict[str, Any]) -> None:
        exc.details["audit_id"] = await self.audit.append_async(
            self._refusal(principal, action, exc, members))

    async def enrollment_check(self, principal: Principal, *, access_token: str,
                               consent_token: str | None, dpop_proof: str | None,
                               htu: str) -> Audited:
        """投保身份校验: enrolled or not, 险种 and 参保地, under a single-use consent token
        presented with a DPoP proof. Exactly one audit entry, allowed or refused.

        A coroutine: the checks are CPU only (signatures, one state read, the policy, an
        in-memory person index) and run on the event loop; the two durable writes (spending
        the single-use ids, the audit entry) are awaited group commits, so thousands of
        checks can wait for durability without a thread each."""
        members: dict[str, Any] = {"purpose": ENROLLMENT_PURPOSE,
                                   "fields": list(ENROLLMENT_DATATYPES)}
        try:
            config = self._consent_config()
            now = self.clock()
            verified, subject, proof, grants_version = self._consented(
                principal, members, config=config, now=now, access_token=access_token,
                consent_token=consent_token, dpop_proof=dpop_proof, htu=htu,
                purpose=ENROLLMENT_PURPOSE, datatypes=ENROLLMENT_DATATYPES)
            decision = await self._decide_consented(
                principal, ENROLLMENT_ACTION, ENROLLMENT_PURPOSE,
                {"dataset": "persons", "datatypes": list(ENROLLMENT_DATATYPES)}, verified,
                grants_version)
            members["policy_version"] = decision.policy_version
            if not decision.allow:
                raise PolicyDenied(decision.reasons)
            await self._spend(principal, proof, verified, now)
            persons = self._person_index(config)
            if persons.stale():  # a new data version: read it off the event loop
                await asyncio.to_thread(persons.refresh)
            row, data_version = persons.get(person_from_subject(subject))
            today = datetime.fromtimestamp(now, tz=CHINA_TZ).date()
            body = enrollment_answer(row, today)
        except GatewayError as exc:
            await self._refused_async(principal, ENROLLMENT_ACTION, exc, members)
            raise
        audit_id = await self.record_async(
            principal, ENROLLMENT_ACTION, status=200, decision="allow",
            data_version=data_version, response_hash=_digest(orjson.dumps(body)), **members)
        return Audited(body, audit_id)

    async def persons_settlements(self, principal: Principal, request: SettlementsRequest,
                                  *, access_token: str, consent_token: str | None,
                                  dpop_proof: str | None, htu: str) -> Audited:
        """线上快速理赔: the person's settlements in the requested period (inside the
        consented one), with only the fields the policy releases for the purpose and the
        consented datatypes. Exactly one audit entry, allowed or refused."""
        members: dict[str, Any] = {"purpose": SETTLEMENTS_PURPOSE,
                                   "request": request.audit_request()}
        try:
            config = self._consent_config()
            now = self.clock()
            verified, subject, proof, grants_version = self._consented(
                principal, members, config=config, now=now, access_token=access_token,
                consent_token=consent_token, dpop_proof=dpop_proof, htu=htu,
                purpose=SETTLEMENTS_PURPOSE, datatypes=tuple(sorted(set(request.datatypes))),
                period=request.period, claim_id=request.claim_id)
            decision = await self._decide_consented(
                principal, SETTLEMENTS_ACTION, SETTLEMENTS_PURPOSE,
                {"dataset": "person_settlements", "fields": list(SETTLEMENT_FIELDS),
                 "datatypes": sorted(set(request.datatypes))}, verified, grants_version)
            members["policy_version"] = decision.policy_version
            if not decision.allow or decision.obligations is None:
                raise PolicyDenied(decision.reasons or ("denied by default",))
            await self._spend(principal, proof, verified, now)
            released = frozenset(SETTLEMENT_FIELDS) - set(decision.obligations.mask_fields)
            members["fields"] = [f for f in SETTLEMENT_FIELDS if f in released]
            start, end = period_bounds(request.period)
            # The DuckDB statement runs off the event loop.
            rows, data_version = await asyncio.to_thread(
                self._person_settlements, person_from_subject(subject), start, end)
            records, truncated = settlement_rows(rows, released)
            body = {
                "period": {"start": request.period.start.isoformat(),
                           "end": request.period.end.isoformat()},
                "fields": members["fields"],
                "settlements": records,
                "truncated": truncated,
            }
        except GatewayError as exc:
            await self._refused_async(principal, SETTLEMENTS_ACTION, exc, members)
            raise
        audit_id = await self.record_async(
            principal, SETTLEMENTS_ACTION, status=200, decision="allow",
            data_version=data_version, response_hash=_digest(orjson.dumps(body)), **members)
        return Audited(body, audit_id)

    def _person_settlements(self, psn_id: int, start: datetime, end: datetime
                            ) -> tuple[list[Any], str]:
        params = [psn_id, start, end]
        try:
            with self.store.cursor() as (cur, data_version):
                try:
                    cur.execute(SETTLEMENTS_SQL, params)
                except duckdb.CatalogException:
                    cur.execute(SETTLEMENTS_SCAN_SQL, params)  # loaded without it
                return cur.fetchmany(_SETTLEMENT_FETCH), data_version
        except duckdb.Error as exc:
            raise StoreUnavailable("query store error") from exc

    def subject_access(self, caller: SubjectCaller) -> Audited:
        """For the signed-in person: every audited call about their data (who, when, what
        for, which fields, allowed or refused) and their live consents."""
        principal = caller.principal
        decision = self.authorize(principal, "subjects.access")
        members: dict[str, Any] = {"policy_version": decision.policy_version}
        try:
            config = self._consent_config()
            now_ns = int(self.clock() * 1e9)
            consents = self.state.list_consents(subject=caller.person)
            # Audit entries name the person by the pairwise sub of each insurer: the person's
            # consents say which insurers to look for.
            found: list[tuple[int, AuditEntry]] = []
            for org in sorted({c.record.insurer_org for c in consents}):
                sub = pairwise_sub(config.pairwise_key, caller.person, org)
                found += self.audit.search(subject_pseudonym=sub, limit=MAX_SEARCH_LIMIT)
            found.sort(key=lambda item: item[0])
            body = {
                "access": [access_item(index, entry) for index, entry in found],
                "consents": [consent_item(c, now_ns) for c in consents if c.live_at(now_ns)],
            }
        except GatewayError as exc:
            self._refused(principal, "subjects.access", exc, members)
            raise
        audit_id = self.record(principal, "subjects.access", status=200, decision="allow",
                               response_hash=_digest(orjson.dumps(body)), **members)
        return Audited(body, audit_id)

    # -- consent key rotation (gateway consent keys …) -----------------------------------
    def consent_keys(self, principal: Principal) -> Audited:
        """The key registry: every key with its state (retired ones too)."""
        decision = self.authorize(principal, "consents.manage")
        self._consent_config()
        body = [{"kid": k.kid, "state": k.state,
                 "private_key": "file" if (k.private_key_ref or "").startswith("file:")
                 else ("none" if k.private_key_ref is None else "external"),
                 "created_at": utc_timestamp(datetime.fromtimestamp(k.created_at_ns / 1e9,
                                                                     tz=UTC)),
                 "updated_at": utc_timestamp(datetime.fromtimestamp(k.updated_at_ns / 1e9,
                                                                     tz=UTC))}
                for k in self.state.consent_keys()]
        audit_id = self.record(principal, "consents.keys", status=200, decision="allow",
                               request={"op": "list"}, policy_version=decision.policy_version,
                               response_hash=_digest(orjson.dumps(body)))
        return Audited(body, audit_id)

    def change_consent_key(self, principal: Principal, op: str, kid: str | None = None, *,
                           min_pending_s: float = 0.0) -> Audited:
        """``add`` a new key (pending: published, signs nothing), ``activate`` a pending one
        (it signs from now on; only after ``min_pending_s`` published, so verifiers caching
        the JWKS know it first), or ``retire`` one (verifies nothing, ever). One audit entry
        per change, allowed or refused."""
        decision = self.authorize(principal, "consents.manage")
        request: dict[str, Any] = {"op": op, "kid": kid}
        members: dict[str, Any] = {"policy_version": decision.policy_version}
        try:
            config = self._consent_config()
            now_ns = int(self.clock() * 1e9)
            if op == "add":
                kid, jwk, ref = new_consent_key(config.keys_dir)
                request["kid"] = kid
                old = self.state.save_consent_key(kid, "pending", jwk, private_key_ref=ref,
                                                  now_ns=now_ns)
                new: KeyState = "pending"
            elif op in ("activate", "retire"):
                rows = {k.kid: k for k in self.state.consent_keys()}
                row = rows.get(kid or "")
                if row is None:
                    raise NotFound("no consent key with this kid")
                new = "active" if op == "activate" else "retired"
                if row.state == new:
                    raise Conflict(f"key {row.kid} is already {new}")
                if op == "activate":
                    if config.keys.private_key(row.private_key_ref) is None:
                        raise ValidationFailed("this key has no private key file here: it can "
                                               "verify but never sign")
                    if now_ns - row.updated_at_ns < min_pending_s * 1e9:
                        raise Conflict(f"key {row.kid} has been published for less than "
                                       f"{min_pending_s:.0f} s; activate it later")
                elif row.state == "active" and not any(
                    k.state == "active" and k.kid != row.kid for k in rows.values()
                ):
                    raise Conflict("this is the only active key: add and activate another "
                                   "one first")
                old = self.state.save_consent_key(row.kid, new, row.public_jwk,
                                                  now_ns=now_ns)
            else:
                raise ValidationFailed("op must be add, activate or retire")
            request.update({"from": old, "to": new})
        except GatewayError as exc:
            self.record(principal, "consents.keys", status=exc.status,
                        decision="error" if exc.status >= 500 else "deny",
                        error_code=exc.code, reasons=[exc.message], request=request,
                        **members)
            raise
        body = {"kid": request["kid"], "from": old, "to": new}
        audit_id = self.record(principal, "consents.keys", status=200, decision="allow",
                               request=request, response_hash=_digest(orjson.dumps(body)),
                               **members)
        return Audited(body, audit_id)


def _decide_with_trace(policy: PolicyEngine, policy_input: dict[str, Any]
                       ) -> tuple[Decision, PolicyTrace | None]:
    decision = policy.decide(policy_input)
    return decision, take_policy_trace()


def access_item(index: int, entry: AuditEntry) -> dict[str, Any]:
    """One line of a person's access list: who, when, what for, which fields, the outcome."""
    return {
        "audit_id": index,
        "ts": entry.ts,
        "who": {"org": entry.org, "client_id": entry.actor, "role": entry.role},
        "action": entry.action,
        "purpose": entry.purpose,
        "fields": list(entry.fields),
        "decision": entry.decision,
        "status": entry.status,
        "error_code": entry.error_code,
        "consent_id": entry.consent_id,
    }


def consent_item(stored: StoredConsent, now_ns: int) -> dict[str, Any]:
    record = stored.record
    return {
        "consent_id": record.consent_id,
        "insurer": record.insurer_org,
        "purpose": record.purpose,
        "datatypes": list(record.datatypes),
        "period": {"start": record.period_start.isoformat(),
                   "end": record.period_end.isoformat()},
        "claim_id": record.claim_id,
        "single_use": record.single_use,
        "state": stored.state_at(now_ns).value,
        "valid_from": utc_timestamp(record.valid_from.astimezone(UTC)),
        "valid_until": utc_timestamp(record.valid_until.astimezone(UTC)),
    }


# Read-only lookups of one person, as bound parameters.
_PERSON_LOOKUP_SQL = "SELECT psn_id FROM person_lookup WHERE lookup = ?"
# One more than the answer's row cap, to tell the caller the answer was cut.
_SETTLEMENT_FETCH = 1001
