"""The gateway's use cases, free of HTTP: every request is decided, executed, disclosed and
audited here. Routes only translate HTTP to these calls and back.

Audit first-class: each use case writes exactly one audit entry, allowed or denied, before it
returns; if the entry cannot be made durable the call fails (AuditUnavailable → 503) and no
result leaves.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError as PydanticValidationError

from gateway.audit import AuditEntry, AuditLog, utc_timestamp
from gateway.auth.tokens import AccessTokenIssuer, Principal
from gateway.catalog import Catalog
from gateway.consent import (
    PURPOSES,
    ConsentRecord,
    issue_consent_token,
    pairwise_sub,
    verify_consent_token,
    verify_dpop_proof,
)
from gateway.disclosure.complementary import MAX_EXACT_CELLS
from gateway.disclosure.suppression import disclose
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    NotFound,
    PolicyDenied,
    PolicyEngineError,
    QueryRejected,
    RateLimited,
    StoreUnavailable,
    ValidationFailed,
)
from gateway.policy import Decision, Obligations, PolicyEngine
from gateway.query.compiler import CompiledQuery, compile_aggregate
from gateway.query.shaping import shape
from gateway.query.spec import AggregateQuery
from gateway.query.sql import parse_sql
from gateway.query.store import QueryStore
from gateway.service.consents import (
    CHINA_TZ,
    ENROLLMENT_ACTION,
    ENROLLMENT_DATATYPES,
    ENROLLMENT_PURPOSE,
    MAX_TOKEN_LIFETIME,
    ConsentConfig,
    ConsentRequest,
    consent_refused,
    enrollment_answer,
    person_from_subject,
    subject_from_person,
)
from gateway.service.grants import GrantRequest, grant_to_json, new_grant_record, policy_data
from gateway.state.store import StateStore

__all__ = ["Audited", "Gateway"]


@dataclass(frozen=True)
class Audited:
    """A use case's answer and the index of the audit entry that records it."""

    body: Any
    audit_id: int


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class _RateLimiter:
    """Per-grant token bucket (in-process; shared limits arrive with the PostgreSQL state)."""

    buckets: dict[str, _Bucket] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: str, per_minute: int, now: float) -> bool:
        with self.lock:
            bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = _Bucket(tokens=float(per_minute), updated=now)
            bucket.tokens = min(
                float(per_minute), bucket.tokens + (now - bucket.updated) * per_minute / 60.0
            )
            bucket.updated = now
            if bucket.tokens < 1.0:
                return False
            bucket.tokens -= 1.0
            return True


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
        self._limiter = _RateLimiter()
        self._policy_data_version = -1
        self._policy_lock = threading.Lock()
        self._grant_limits: dict[str, int] = {}
        self._compiled: dict[str, CompiledQuery] = {}

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
    def _sync_policy_data(self) -> None:
        version = self.state.version("grants")
        if version == self._policy_data_version:
            return
        with self._policy_lock:
            if version == self._policy_data_version:
                return
            grants = self.state.list_grants()
            self.policy.set_data(policy_data(self.catalog, grants))
            self._grant_limits = {
                g.grant_id: int(g.body.get("rate_limit_per_minute", 600)) for g in grants
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
        entry = AuditEntry(
            ts=utc_timestamp(datetime.fromtimestamp(self.clock(), tz=UTC)),
            actor=principal.client_id if principal else "anonymous",
            role=principal.role if principal else "anonymous",
            org=principal.org if principal else None,
            action=action,
            decision=decision,
            status=status,
            **members,
        )
        return self.audit.append(entry)

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
        if not self._limiter.take(decision.grant_id or principal.client_id, limit, self.clock()):
            self.record(principal, action, status=429, decision="deny",
                        error_code=RateLimited.code,
                        reasons=[f"rate limit of {limit} requests per minute"], **common)
            raise RateLimited(f"rate limit of {limit} requests per minute exceeded")
        return decision.obligations

    def _compile(self, query: AggregateQuery) -> CompiledQuery:
        """Compilation is pure, so repeated questions reuse their SQL (bounded cache)."""
        key = query.model_dump_json()
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = compile_aggregate(query, self.catalog)
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
            _, raw_rows, data_version = self.store.fetch(compiled.sql)
            result = disclose(
                compiled.dimensions, compiled.measures, raw_rows,
                min_cell_size=obligations.min_cell_size,
                max_rows=obligations.max_rows,
                secondary=True, max_exact_cells=MAX_EXACT_CELLS,
            )
            result = shape(result, having=query.having, order_by=query.order_by,
                           limit=query.limit, column_of=compiled.column_of,
                           hidden=compiled.hidden)
        except GatewayError as exc:
            self.record(principal, action, status=exc.status, decision="error",
                        error_code=exc.code, reasons=[exc.message], **common)
            raise
        body: dict[str, Any] = {
            "columns": result.columns,
            "rows": result.rows,
            "suppressed": [c.to_json() for c in result.suppressed],
            "suppressed_count": len(result.suppressed),
            "min_cell_size": obligations.min_cell_size,
            "data_version": data_version,
            "notes": result.notes,
        }
        audit_id = self.record(
            principal, action, status=200, decision="allow",
            cells_released=result.cells_released, cells_suppressed=len(result.suppressed),
            data_version=data_version, response_hash=_digest(orjson.dumps(body)), **common,
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
            proof = self.audit.inclusion_proof(index, tree_size)  # checks the bounds first
            return {
                "index": index,
                "tree_size": tree_size,
                "leaf_hash": _b64(self.audit.leaf_hash(index)),
                "root": _b64(self.audit.root(tree_size)),
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
    def _consent_config(self) -> ConsentConfig:
        if self.consent is None:
            raise StoreUnavailable("consent keys are not configured (run `gateway init`)")
        return self.consent

    def jwks(self) -> dict[str, Any]:
        """The public consent keys, pending and active (``/.well-known/jwks.json``)."""
        if self.consent is None:
            return {"keys": []}
        return self.consent.key_set.publish_jwks()

    def create_consent(self, principal: Principal, request: ConsentRequest) -> Audited:
        """Record a person's consent (an admin on the person's behalf) and issue its token,
        bound to the insurer's DPoP key; ``client_id`` of the token is the insurer's org."""
        decision = self.authorize(principal, "consents.manage")
        members: dict[str, Any] = {"purpose": request.purpose,
                                   "request": request.audit_request(),
                                   "policy_version": decision.policy_version}
        try:
            config = self._consent_config()
            subject = subject_from_person(request.subject)
            members["subject_pseudonym"] = pairwise_sub(config.pairwise_key, subject,
                                                        request.insurer)
            psn_id = person_from_subject(subject)
            _, rows, _ = self.store.fetch(_PERSON_EXISTS_SQL, [psn_id])
            if not rows:
                raise NotFound("no person with this psn_id")
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

    def revoke_consent(self, principal: Principal, consent_id: str) -> Audited:
        """Revoke a consent; it holds from the next request in every worker process."""
        decision = self.authorize(principal, "consents.manage")
        members: dict[str, Any] = {"consent_id": consent_id,
                                   "policy_version": decision.policy_version}
        try:
            config = self._consent_config()
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

    def enrollment_check(self, principal: Principal, *, access_token: str,
                         consent_token: str | None, dpop_proof: str | None,
                         htu: str) -> Audited:
        """投保身份校验: enrolled or not, 险种 and 参保地, under a single-use consent token
        presented with a DPoP proof. Exactly one audit entry, allowed or refused."""
        members: dict[str, Any] = {"purpose": ENROLLMENT_PURPOSE,
                                   "fields": list(ENROLLMENT_DATATYPES)}
        try:
            config = self._consent_config()
            now = self.clock()
            now_ns = int(now * 1e9)
            if not consent_token:
                raise AuthenticationFailed("Consent header missing", code="consent_missing")
            verified = verify_consent_token(
                consent_token, key_set=config.key_set, issuer=config.issuer,
                audience=config.issuer, client_id=principal.org or "", now=now,
                required_datatypes=ENROLLMENT_DATATYPES, purpose=ENROLLMENT_PURPOSE,
            )
            members["consent_id"] = verified.consent_id
            members["subject_pseudonym"] = verified.sub
            remember_ns = now_ns + _DPOP_REMEMBER_S * 1_000_000_000
            verify_dpop_proof(
                dpop_proof, htm="POST", htu=htu, access_token=access_token,
                expected_jkt=verified.cnf_jkt, now=now,
                seen_jti=lambda jti: self.state.spend_dpop_jti(
                    principal.client_id, jti, remember_ns, now_ns),
            )
            if not self.state.is_consent_live(verified.consent_id, now_ns):
                raise consent_refused("consent revoked or no longer valid", "consent_revoked")
            stored = self.state.get_consent(verified.consent_id)
            if stored is None or stored.record.insurer_org != principal.org or pairwise_sub(
                config.pairwise_key, stored.record.subject, stored.record.insurer_org
            ) != verified.sub:
                raise consent_refused("token does not match its consent record",
                                      "consent_mismatch")
            decision = self._decide(principal, ENROLLMENT_ACTION, None, {})
            members["policy_version"] = decision.policy_version
            if not decision.allow:
                raise PolicyDenied(decision.reasons)
            if verified.single_use and not self.state.consume_consent_jti(
                verified.jti, verified.consent_id, int(verified.replay_window_ends * 1e9),
                now_ns,
            ):
                raise consent_refused("single-use consent already used", "consent_used")
            _, rows, data_version = self.store.fetch(
                _ENROLLMENT_SQL, [person_from_subject(stored.record.subject)])
            today = datetime.fromtimestamp(now, tz=CHINA_TZ).date()
            body = enrollment_answer(rows[0] if rows else None, today)
        except GatewayError as exc:
            reasons = exc.reasons if isinstance(exc, PolicyDenied) else [exc.message]
            audit_id = self.record(principal, ENROLLMENT_ACTION, status=exc.status,
                                   decision="error" if exc.status >= 500 else "deny",
                                   error_code=exc.code, reasons=list(reasons), **members)
            exc.details["audit_id"] = audit_id
            raise
        audit_id = self.record(principal, ENROLLMENT_ACTION, status=200, decision="allow",
                               data_version=data_version,
                               response_hash=_digest(orjson.dumps(body)), **members)
        return Audited(body, audit_id)


# Read-only lookups of one person by the store pseudonym, as bound parameters.
_PERSON_EXISTS_SQL = "SELECT 1 FROM persons WHERE psn_id = ?"
_ENROLLMENT_SQL = (
    "SELECT insutype, insu_admdvs, psn_insu_date, insu_end_date FROM persons WHERE psn_id = ?"
)
# A DPoP jti is remembered for the accepted proof age (60 s) plus twice the skew (5 s).
_DPOP_REMEMBER_S = 70
