"""Individual consent, wired: the consent key ring and the serving-side keys, request bodies,
the 身份证号 lookup, and the answers of the person endpoints.

The use cases themselves (issue, revoke, enrollment check, settlements, the subject's access
list, key changes) are methods of :class:`gateway.service.gateway.Gateway`, so they share its
policy, state and audit. See ``docs/consent.md`` ("Endpoints as built").
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from gateway.auth.keys import load_private_key, write_private_key
from gateway.auth.subjects import SubjectTokenVerifier
from gateway.auth.tokens import Principal
from gateway.consent.keys import ConsentKeySet, KeyEvent, b64url_decode, public_jwk
from gateway.consent.model import PURPOSES, DataPeriod
from gateway.errors import PolicyDenied, StoreUnavailable, ValidationFailed
from gateway.ingest.pseudonym import KEY_BYTES, load_or_create_key
from gateway.query.store import QueryStore
from gateway.sqlite_wal import WriteTurnBusy
from gateway.state.consents import ReplaySpend, StoredConsentKey
from gateway.state.store import StateStore

__all__ = [
    "CHINA_TZ",
    "ENROLLMENT_ACTION",
    "ENROLLMENT_DATATYPES",
    "ENROLLMENT_PURPOSE",
    "IDENTITY_PUBLIC_KEY_FILE",
    "LOOKUP_KEY_FILE",
    "SETTLEMENTS_ACTION",
    "SETTLEMENTS_PURPOSE",
    "SETTLEMENTS_SCAN_SQL",
    "SETTLEMENTS_SQL",
    "SETTLEMENT_FIELDS",
    "ConsentConfig",
    "ConsentKeyRing",
    "ConsentRequest",
    "PersonIndex",
    "ReplayBatcher",
    "SettlementsRequest",
    "SubjectCaller",
    "consent_refused",
    "enrollment_answer",
    "icd10_category",
    "load_consent_config",
    "new_consent_key",
    "new_person_pseudonym",
    "period_bounds",
    "person_from_subject",
    "settlement_rows",
    "subject_from_psn_id",
]

ENROLLMENT_ACTION = "persons.enrollment"
ENROLLMENT_PURPOSE = "enrollment_check"
ENROLLMENT_DATATYPES = tuple(sorted(PURPOSES[ENROLLMENT_PURPOSE].datatypes))
SETTLEMENTS_ACTION = "persons.settlements"
SETTLEMENTS_PURPOSE = "claims_fast_track"
# The ingest pseudonym is a positive 60-bit integer (gateway.ingest.pseudonym).
_MAX_PSN_ID = 2**60
_SUBJECT_PREFIX = "psn:"
# 参保 dates are local dates of the agency: China Standard Time, no daylight saving.
CHINA_TZ = timezone(timedelta(hours=8), "CST")
# A claims consent token lives at most as long as its consent, and never above a year.
MAX_TOKEN_LIFETIME = timedelta(days=366)
# Serving-side key files beside the consent signing key (never the ingest pseudonym key).
LOOKUP_KEY_FILE = "certno-lookup.key"
IDENTITY_PUBLIC_KEY_FILE = "identity-service.pub.pem"
BOOTSTRAP_KEY_REF = "file:consent-signing.pem"
ROTATED_KEYS_DIR = "consent-keys"


class ConsentKeyRing:
    """The consent key set of this process, following the state store's key registry.

    Every consent call asks :meth:`current`: one read of the ``consent_keys`` change counter,
    and a reload only when another process (``gateway consent keys …``) changed a key. So a
    key added elsewhere is published here before its first use, and a retired one stops
    verifying on the very next request in every worker."""

    def __init__(self, state: StateStore, keys_dir: Path) -> None:
        self._state = state
        self._keys_dir = keys_dir
        self._lock = threading.Lock()
        self._version = -1
        self._set = ConsentKeySet()

    def current(self, version: int | None = None) -> ConsentKeySet:
        """The key set as of ``version`` of the ``consent_keys`` counter (read now when the
        caller has not read it already)."""
        if version is None:
            version = self._state.version("consent_keys")
        if version != self._version:
            with self._lock:
                if version != self._version:
                    self._set = self._load()
                    self._version = version
        return self._set

    def private_key(self, ref: str | None) -> Ed25519PrivateKey | None:
        """The private key a ``file:`` reference names under the keys directory; None for
        another kind of reference or a missing file (the key then verifies but never signs)."""
        if ref is None or not ref.startswith("file:"):
            return None
        relative = PurePosixPath(ref.removeprefix("file:"))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            return None
        path = self._keys_dir.joinpath(*relative.parts)
        if not path.is_file():
            return None
        key = load_private_key(path)
        return key if isinstance(key, Ed25519PrivateKey) else None

    def _load(self) -> ConsentKeySet:
        rows = self._state.consent_keys()
        key_set = ConsentKeySet()
        for row in rows:
            public = _public_key(row)
            private = self.private_key(row.private_key_ref) if row.state != "retired" else None
            if private is not None and public_jwk(private.public_key()) != public_jwk(public):
                private = None  # a file that is not this key's: fail closed, verify only
            key_set.add(private or public, now=0)
        for row in rows:
            if row.state == "retired":
                key_set.retire(row.kid, now=0)
        # The signing key is the most recently activated one, in every worker alike.
        for row in sorted((r for r in rows if r.state == "active"),
                          key=lambda r: (r.updated_at_ns, r.kid)):
            key_set.activate(row.kid, now=0)
        return key_set


def _public_key(row: StoredConsentKey) -> Ed25519PublicKey:
    if row.public_jwk.get("kty") != "OKP" or row.public_jwk.get("crv") != "Ed25519":
        raise ValidationFailed("consent keys are Ed25519")
    return Ed25519PublicKey.from_public_bytes(b64url_decode(row.public_jwk["x"]))


def new_consent_key(keys_dir: Path) -> tuple[str, dict[str, str], str]:
    """Generate a consent key, write its private half under ``keys/consent-keys/`` (0600);
    returns (kid, public JWK, private_key_ref) for the registry."""
    from gateway.consent.keys import jwk_thumbprint

    key = Ed25519PrivateKey.generate()
    jwk = public_jwk(key.public_key())
    kid = jwk_thumbprint(jwk)
    write_private_key(keys_dir / ROTATED_KEYS_DIR / f"{kid}.pem", key)
    return kid, jwk, f"file:{ROTATED_KEYS_DIR}/{kid}.pem"


# Expired replay ids are forgotten at most this often per process (not in every batch), a
# few hundred at a time: with PURGE_LIMIT, up to 5,120 of each kind a second per process,
# each purge ~1 ms inside a write that every worker's spends wait for.
_PURGE_EVERY_S = 0.1
# How long a batch waits on the loop for the write turn before it fails closed (the bound of
# gateway.sqlite_wal.WriteTurn for a waiting thread).
_TURN_WAIT_BOUND_S = 5.0


class ReplayBatcher:
    """Group commit of the single-use ids (DPoP ``jti``, single-use consent ``jti``) of the
    requests of one event loop: the requests that reach their spend in the same turn of the
    loop share one write transaction (one fsync on SQLite), which the loop runs itself at the
    end of that turn. Each request still gets its own answer, decided by its own insert
    (``spend_replay_ids``); a failed write fails every request of its batch (fail closed).

    The write blocks the loop for one short transaction per batch rather than going through a
    writer thread: measured in-process at 16 concurrent checks, the thread's wake-ups and GIL
    hand-offs cost more CPU than the write (1.02 → 0.66 ms per check, all threads). The loop
    never sleeps for another worker's write turn, though: a batch that finds it taken waits on
    the loop (tried again next turn, then each millisecond), growing meanwhile. Thread
    callers (:meth:`spend`) write their own transaction; across threads and processes the
    database arbitrates, as it does across batches."""

    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._pending: dict[asyncio.AbstractEventLoop,
                            list[tuple[ReplaySpend, int, asyncio.Future[tuple[bool, bool]]]]] = {}
        self._purged_at = -_PURGE_EVERY_S
        self._purge_lock = threading.Lock()
        self._busy_since: dict[asyncio.AbstractEventLoop, float] = {}
        # A local file (SQLite) is written by the loop itself; a database server is a network
        # round trip per statement, so its batches go to one writer thread instead.
        self._writer = None if state.dialect == "sqlite" else ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="replay-writer")

    def spend(self, item: ReplaySpend, now_ns: int) -> tuple[bool, bool]:
        """``(dpop_new, consent_new)`` of ``item``, committed (blocks the calling thread)."""
        return self._write([item], now_ns)[0]

    async def spend_async(self, item: ReplaySpend, now_ns: int) -> tuple[bool, bool]:
        """:meth:`spend` for a coroutine, committed with the others of this loop turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, bool]] = loop.create_future()
        queued = self._pending.get(loop)
        if queued is None:
            queued = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        queued.append((item, now_ns, future))
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending.pop(loop, [])
        if not batch:
            return
        items, now_ns = [item for item, _, _ in batch], min(now for _, now, _ in batch)
        if self._writer is None:
            try:
                # Never sleep on the loop for another worker's turn: come back instead.
                results = self._write(items, now_ns, wait=False)
            except WriteTurnBusy:
                self._flush_later(loop, batch)
                return
            except Exception as exc:
                self._busy_since.pop(loop, None)
                _settle(batch, None, exc)
                return
            self._busy_since.pop(loop, None)
            _settle(batch, results, None)
            return
        written = loop.run_in_executor(self._writer, self._write, items, now_ns)

        def settle(done: asyncio.Future[list[tuple[bool, bool]]]) -> None:
            error = done.exception()
            _settle(batch, None if error else done.result(), error)

        written.add_done_callback(settle)

    def _flush_later(self, loop: asyncio.AbstractEventLoop,
                     batch: list[tuple[ReplaySpend, int, asyncio.Future[tuple[bool, bool]]]]
                     ) -> None:
        """Another thread or process holds the file's write turn (its commit takes a fraction
        of a millisecond): the batch waits on the loop, growing with the requests that arrive
        meanwhile, and fails closed after the write turn's bound."""
        now = time.monotonic()
        since = self._busy_since.setdefault(loop, now)
        if now - since > _TURN_WAIT_BOUND_S:
            self._busy_since.pop(loop, None)
            _settle(batch, None, StoreUnavailable("replay store busy"))
            return
        queued = self._pending.setdefault(loop, [])
        queued[:0] = batch  # first come, first inserted: a repeated id loses to its first use
        # Once at the next turn of the loop, then each millisecond (the loop's timer step).
        loop.call_later(0 if since == now else 0.001, self._flush, loop)

    def _write(self, items: list[ReplaySpend], now_ns: int, *,
               wait: bool = True) -> list[tuple[bool, bool]]:
        now = time.monotonic()
        with self._purge_lock:
            purge = now - self._purged_at >= _PURGE_EVERY_S
        results = self._state.spend_replay_ids(items, now_ns, purge=purge, wait=wait)
        if purge:  # only once it is done: a write that found the turn busy purged nothing
            with self._purge_lock:
                self._purged_at = max(self._purged_at, now)
        return results


def _settle(batch: list[tuple[ReplaySpend, int, asyncio.Future[tuple[bool, bool]]]],
            results: list[tuple[bool, bool]] | None, error: BaseException | None) -> None:
    for index, (_, _, future) in enumerate(batch):
        if future.done():  # a cancelled waiter: its ids are spent all the same
            continue
        if results is None:
            future.set_exception(error or StoreUnavailable("replay store write failed"))
        else:
            future.set_result(results[index])


class PersonIndex:
    """投保身份校验's keyed store: ``psn_id`` → (insutype, insu_admdvs, psn_insu_date,
    insu_end_date) of the serving data version, held in memory as sorted arrays and found by
    binary search (microseconds, where a DuckDB statement per request costs about half a
    millisecond of engine overhead). Rebuilt, from one read of ``persons``, when the serving
    version changes."""

    def __init__(self, store: QueryStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        # (version, sorted psn_id array, Arrow columns), replaced whole: readers never see
        # the ids of one version with the columns of another.
        self._held: tuple[str, Any, tuple[Any, ...]] | None = None

    def stale(self) -> bool:
        """True when the serving data version is not the one held: call :meth:`refresh`
        (off the event loop: it reads the whole table) before :meth:`get`."""
        held = self._held
        return held is None or self._store.version != held[0]

    def get(self, psn_id: int) -> tuple[tuple[Any, ...] | None, str]:
        """The person's row and the data version it was read from (the held one: a version
        published since is picked up by the next :meth:`stale` / :meth:`refresh`)."""
        import numpy as np

        held = self._held
        if held is None:
            self.refresh()
            held = self._held
            assert held is not None  # noqa: S101 - set by refresh or it raised
        version, ids, columns = held
        i = int(np.searchsorted(ids, psn_id))
        if i >= len(ids) or int(ids[i]) != psn_id:
            return None, version
        return tuple(column[i].as_py() for column in columns), version

    def refresh(self) -> None:
        """Hold the serving version's persons (one read of the ``persons`` table)."""
        import duckdb

        with self._lock:
            try:
                with self._store.cursor() as (cur, version):
                    if self._held is not None and version == self._held[0]:
                        return
                    table = cur.sql("SELECT psn_id, insutype, insu_admdvs, psn_insu_date, "
                                    "insu_end_date FROM persons ORDER BY psn_id"
                                    ).to_arrow_table()
            except duckdb.Error as exc:
                raise StoreUnavailable("query store error") from exc
            # Arrow arrays, read one value at a time: no per-person Python objects.
            columns = tuple(table.column(name).combine_chunks() for name in (
                "insutype", "insu_admdvs", "psn_insu_date", "insu_end_date"))
            self._held = (version, table.column("psn_id").to_numpy(), columns)


@dataclass
class ConsentConfig:
    """What the serving process needs to issue and verify consent tokens, resolve a 身份证号
    and sign in persons."""

    keys: ConsentKeyRing
    pairwise_key: bytes
    issuer: str  # also the audience: the agency issues, the gateway is the audience
    keys_dir: Path
    lookup_key: bytes | None = None
    subjects: SubjectTokenVerifier | None = None
    # Key changes made while starting (before the audit log is wired): audited once, later.
    unaudited: list[KeyEvent] = field(default_factory=list)
    replay: ReplayBatcher | None = None
    persons: PersonIndex | None = None
    # Proofs issued at or before this iat (s) are refused: see StateStore.dpop_rekeyed_iat_bound.
    dpop_iat_bound: int | None = None

    @property
    def key_set(self) -> ConsentKeySet:
        return self.keys.current()


def _read_key(path: Path) -> bytes | None:
    if not path.exists():
        return None
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValidationFailed(f"{path.name} must be {KEY_BYTES} bytes")
    return key


def _identity_verifier(path: Path, audience: str) -> SubjectTokenVerifier | None:
    if not path.exists():
        return None
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ValidationFailed(f"{path.name} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValidationFailed(f"{path.name} must be an Ed25519 public key")
    return SubjectTokenVerifier(key, audience=audience)


def load_consent_config(key_path: Path, pairwise_path: Path, *, issuer: str,
                        state: StateStore) -> ConsentConfig | None:
    """Register the consent signing key file's public JWK (pending, then active) unless the
    registry already knows it, and follow the registry from then on. None when the deployment
    has no consent key file: the consent endpoints then answer 503.

    Also loads, when present beside it, the certno lookup key and the identity service's
    public key (subject sign-in); without them those paths answer 503."""
    if not key_path.exists():
        return None
    key = load_private_key(key_path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValidationFailed("the consent signing key must be Ed25519")
    keys_dir = key_path.parent
    pairwise_key = load_or_create_key(pairwise_path)
    jwk = public_jwk(key.public_key())
    from gateway.consent.keys import jwk_thumbprint

    kid = jwk_thumbprint(jwk)
    now = time.time()
    events: list[KeyEvent] = []
    # Idempotent across restarts and worker processes: published (pending) before it is made
    # active. A key file the registry retired stays retired; the registry's keys serve.
    current = {k.kid: k.state for k in state.consent_keys()}.get(kid)
    if current is None:
        if state.save_consent_key(kid, "pending", jwk, private_key_ref=BOOTSTRAP_KEY_REF) is None:
            events.append(KeyEvent(kid, None, "pending", now))
        current = "pending"
    if current == "pending":
        old = state.save_consent_key(kid, "active", jwk, private_key_ref=BOOTSTRAP_KEY_REF)
        if old == "pending":
            events.append(KeyEvent(kid, "pending", "active", now))
    ring = ConsentKeyRing(state, keys_dir)
    ring.current()
    return ConsentConfig(
        keys=ring, pairwise_key=pairwise_key, issuer=issuer, keys_dir=keys_dir,
        lookup_key=_read_key(keys_dir / LOOKUP_KEY_FILE),
        subjects=_identity_verifier(keys_dir / IDENTITY_PUBLIC_KEY_FILE, issuer),
        unaudited=events, replay=ReplayBatcher(state),
        dpop_iat_bound=state.dpop_rekeyed_iat_bound(),
    )


def subject_from_psn_id(psn_id: int) -> str:
    """The consent record's ``subject`` for the store pseudonym ``psn_id``: written in hex
    with a prefix, since a 19-digit decimal is shaped like a 身份证号 and is refused."""
    if isinstance(psn_id, bool) or not 0 < psn_id < _MAX_PSN_ID:
        raise ValidationFailed("subject is not a store pseudonym (psn_id)")
    return f"{_SUBJECT_PREFIX}{psn_id:x}"


def person_from_subject(subject: str) -> int:
    """The store ``psn_id`` of a consent record's ``subject``."""
    if not subject.startswith(_SUBJECT_PREFIX):
        raise ValidationFailed("consent subject is not a store pseudonym")
    return int(subject.removeprefix(_SUBJECT_PREFIX), 16)


def consent_refused(message: str, code: str) -> PolicyDenied:
    """A 403 with its own error code (revoked, already used, not this insurer's consent)."""
    err = PolicyDenied([message])
    err.code = code  # type: ignore[misc]
    return err


class ConsentRequest(BaseModel):
    """``POST /v1/consents``: by an admin on a person's behalf (the person named by
    ``certno``), or by the person (subject role, no ``certno``: the signed-in person)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # repr=False: never in a log line or a traceback; the route and the audit never echo it.
    certno: str | None = Field(default=None, min_length=18, max_length=20, repr=False,
                               description="身份证号 of the person (admin only); hashed with "
                                           "the lookup key, never stored")
    insurer: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                         description="the insurer's org")
    purpose: str = Field(min_length=1, max_length=64)
    datatypes: tuple[str, ...] = Field(min_length=1, max_length=32)
    period: DataPeriod
    valid_until: AwareDatetime
    dpop_jkt: str = Field(pattern=r"^[A-Za-z0-9_-]{43}$",
                          description="RFC 7638 thumbprint of the insurer's DPoP key")
    claim_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
                                 description="a claims consent may name one claim")

    def audit_request(self) -> dict[str, Any]:
        """The request as audited: everything but the person."""
        request: dict[str, Any] = {
            "insurer": self.insurer,
            "purpose": self.purpose,
            "datatypes": list(self.datatypes),
            "period": {"start": self.period.start.isoformat(),
                       "end": self.period.end.isoformat()},
            "valid_until": self.valid_until.astimezone(UTC).isoformat(),
            "dpop_jkt": self.dpop_jkt,
        }
        if self.claim_id is not None:
            request["claim_id"] = self.claim_id
        return request


class SettlementsRequest(BaseModel):
    """``POST /v1/persons/settlements``: which datatypes over which data period (inside the
    consent's), and the claim when the consent names one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datatypes: tuple[str, ...] = Field(min_length=1, max_length=8)
    period: DataPeriod
    claim_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

    def audit_request(self) -> dict[str, Any]:
        request: dict[str, Any] = {
            "datatypes": sorted(self.datatypes),
            "period": {"start": self.period.start.isoformat(),
                       "end": self.period.end.isoformat()},
        }
        if self.claim_id is not None:
            request["claim_id"] = self.claim_id
        return request


@dataclass(frozen=True)
class SubjectCaller:
    """A signed-in person: the principal the policy and the audit see (its ``client_id`` is a
    gateway-internal pseudonym, never a 身份证号) and the consent record ``subject``."""

    principal: Principal
    person: str = field(repr=False)


def enrollment_answer(row: tuple[Any, ...] | None, today: date) -> dict[str, Any]:
    """``{enrolled, insutype, insu_admdvs}`` from ``(insutype, insu_admdvs, psn_insu_date,
    insu_end_date)``; 险种 and 参保地 only while enrolled, nothing else ever."""
    if row is None:
        return {"enrolled": False, "insutype": None, "insu_admdvs": None}
    insutype, admdvs, start, end = row
    enrolled = start is not None and start <= today and (end is None or today < end)
    if not enrolled:
        return {"enrolled": False, "insutype": None, "insu_admdvs": None}
    return {"enrolled": True, "insutype": insutype, "insu_admdvs": admdvs}


# The person-level settlement view: every field a consent could ever release, in answer order.
# psn_id, psn_no, certno, names, phone, address and free text (dise_name) are not in it at all;
# the policy's obligations withhold whatever the purpose and the consented datatypes do not
# need (mask_fields), e.g. the full diagnosis code where its ICD-10 category suffices.
SETTLEMENT_FIELDS: tuple[str, ...] = (
    "setl_date", "med_type", "hosp_lv", "fixmedins_code", "dise_codg", "dise_category",
    "medfee_sumamt", "inscp_scp_amt", "fulamt_ownpay_amt", "overlmt_selfpay", "hifp_pay",
    "hifmi_pay", "maf_pay", "acct_pay", "psn_cash_pay", "psn_part_amt",
)
# One bound parameter per value; the person first, so the store reads one person's rows.
# Reads person_settlements (sorted by psn_id at load: a point read); SETTLEMENTS_SCAN_SQL is
# the same over the whole settlements table, for a version loaded without the consent tables.
SETTLEMENTS_SQL = (
    "SELECT setl_time, med_type, hosp_lv, fixmedins_code, dise_codg, medfee_sumamt, "
    "inscp_scp_amt, fulamt_ownpay_amt, overlmt_selfpay, hifp_pay, hifmi_pay, maf_pay, "
    "acct_pay, psn_cash_pay, psn_part_amt FROM person_settlements "
    "WHERE psn_id = ? AND setl_time >= ? AND setl_time < ? ORDER BY setl_time"
)
SETTLEMENTS_SCAN_SQL = SETTLEMENTS_SQL.replace("FROM person_settlements", "FROM settlements")
_MAX_SETTLEMENT_ROWS = 1000


def icd10_category(code: str | None) -> str | None:
    """The ICD-10 category (three characters, e.g. ``J18``) of a diagnosis code.

    >>> icd10_category("J18.900"), icd10_category("E11"), icd10_category(None)
    ('J18', 'E11', None)
    """
    if code is None:
        return None
    head = code.strip().upper()[:3]
    return head if len(head) == 3 and head[0].isalpha() and head[1:].isdigit() else None


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)  # DECIMAL(18,2): two decimals survive a double
    return value


def settlement_rows(rows: list[tuple[Any, ...]], released: frozenset[str]
                    ) -> tuple[list[dict[str, Any]], bool]:
    """Rows of ``SETTLEMENTS_SQL`` as answer records holding only ``released`` fields; and
    whether the answer was cut at the row cap."""
    out = []
    for row in rows[:_MAX_SETTLEMENT_ROWS]:
        setl_time = row[0]
        full: dict[str, Any] = {
            "setl_date": setl_time.date().isoformat() if setl_time is not None else None,
            "med_type": row[1],
            "hosp_lv": row[2],
            "fixmedins_code": row[3],
            "dise_codg": row[4],
            "dise_category": icd10_category(row[4]),
            **{name: _json_value(v) for name, v in zip(SETTLEMENT_FIELDS[6:], row[5:],
                                                         strict=True)},
        }
        out.append({name: full[name] for name in SETTLEMENT_FIELDS if name in released})
    return out, len(rows) > _MAX_SETTLEMENT_ROWS


def period_bounds(period: DataPeriod) -> tuple[datetime, datetime]:
    """``[start 00:00, end + 1 day 00:00)`` as naive local timestamps (the store's
    ``setl_time`` is the agency's local time)."""
    start = datetime(period.start.year, period.start.month, period.start.day)
    end = datetime(period.end.year, period.end.month, period.end.day) + timedelta(days=1)
    return start, end


def new_person_pseudonym(pairwise_key: bytes, person: str) -> str:
    """The signed-in person's ``client_id`` in audit entries: pairwise to the gateway itself,
    so it links a person's own calls without naming them."""
    from gateway.consent.pseudonym import pairwise_sub

    return "subject:" + pairwise_sub(pairwise_key, person, "yibao-gateway-subject")

