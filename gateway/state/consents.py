"""Durable consent state: consent records, consumed single-use ``jti``, spent DPoP ``jti``, and
the consent key registry (public halves only).

The statements live once in :class:`ConsentStatements`, a base of
:class:`gateway.state.store.StateStore`; a backend supplies ``_tx`` (a cursor in one
transaction) and ``_bump`` (the change counter). Every statement is a literal with bound
parameters, and conflicts are detected by ``ON CONFLICT … DO NOTHING`` and the row count, not by
a driver's exception type, so the same statements run on SQLite and PostgreSQL.

Private consent keys never enter the database: a key row holds the public JWK and, at most, a
*reference* to where the private key lives (a file path or a KMS key name).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from gateway.consent.keys import KeyState, jwk_thumbprint
from gateway.consent.model import ConsentRecord, ConsentState
from gateway.errors import Conflict, NotFound, ValidationFailed

__all__ = [
    "CONSENT_SCHEMA",
    "REPLAY_REKEY_SCHEMA",
    "ConsentStatements",
    "ReplaySpend",
    "StoredConsent",
    "StoredConsentKey",
    "datetime_to_ns",
]

CONSENT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS consents (
        consent_id TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        insurer_org TEXT NOT NULL,
        purpose TEXT NOT NULL,
        record TEXT NOT NULL,
        state TEXT NOT NULL,
        valid_from_ns BIGINT NOT NULL,
        valid_until_ns BIGINT NOT NULL,
        revoked_at_ns BIGINT,
        revoked_by TEXT,
        created_at_ns BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS consents_subject ON consents (subject, created_at_ns)",
    "CREATE INDEX IF NOT EXISTS consents_insurer ON consents (insurer_org, created_at_ns)",
    """CREATE TABLE IF NOT EXISTS consumed_consent_jti (
        jti TEXT PRIMARY KEY,
        consent_id TEXT NOT NULL,
        expires_ns BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS consumed_consent_jti_expiry ON consumed_consent_jti (expires_ns)",
    """CREATE TABLE IF NOT EXISTS dpop_jti (
        client_id TEXT NOT NULL,
        jti TEXT NOT NULL,
        expires_ns BIGINT NOT NULL,
        PRIMARY KEY (client_id, jti))""",
    "CREATE INDEX IF NOT EXISTS dpop_jti_expiry ON dpop_jti (expires_ns)",
    """CREATE TABLE IF NOT EXISTS consent_keys (
        kid TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        public_jwk TEXT NOT NULL,
        private_key_ref TEXT,
        created_at_ns BIGINT NOT NULL,
        updated_at_ns BIGINT NOT NULL)""",
)

#: Migration 4: the replay tables keyed by expiry first. Keyed by ``jti`` alone, the ids that
#: expire together lay spread over a random-keyed index, so forgetting each one dirtied a page
#: of its own (750 a second per worker at full load: a ~10–20 ms delete on the event loop every
#: second, and 50–70 ms p99s once a run outlived the first ids' expiry). Keyed by
#: ``(expires_ns, …)`` they lie together, inserts land near one edge, and the purge is a range
#: delete. Sound only because every caller derives ``expires_ns`` from the signed token alone
#: (consent ``exp``, DPoP ``iat``, assertion ``exp``): a replay of the same token always maps to
#: the same key. Consent and assertion rows carry over (their expiry already came from the
#: token); DPoP rows were keyed by when they were spent, so they are not carried over and
#: ``replay_rekeyed`` keeps the last of their expiries, which bounds the proofs they covered.
REPLAY_REKEY_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS consumed_consent_jti_v4 (
        expires_ns BIGINT NOT NULL,
        jti TEXT NOT NULL,
        consent_id TEXT NOT NULL,
        PRIMARY KEY (expires_ns, jti))""",
    "INSERT INTO consumed_consent_jti_v4 (expires_ns, jti, consent_id) "
    "SELECT expires_ns, jti, consent_id FROM consumed_consent_jti",
    "DROP TABLE consumed_consent_jti",
    "ALTER TABLE consumed_consent_jti_v4 RENAME TO consumed_consent_jti",
    """CREATE TABLE IF NOT EXISTS replay_rekeyed (
        kind TEXT PRIMARY KEY,
        last_expires_ns BIGINT NOT NULL)""",
    "INSERT INTO replay_rekeyed (kind, last_expires_ns) "
    "SELECT 'dpop', last FROM (SELECT MAX(expires_ns) AS last FROM dpop_jti) AS old "
    "WHERE last IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS dpop_jti_v4 (
        expires_ns BIGINT NOT NULL,
        client_id TEXT NOT NULL,
        jti TEXT NOT NULL,
        PRIMARY KEY (expires_ns, client_id, jti))""",
    "DROP TABLE dpop_jti",
    "ALTER TABLE dpop_jti_v4 RENAME TO dpop_jti",
    """CREATE TABLE IF NOT EXISTS spent_jti_v4 (
        expires_ns BIGINT NOT NULL,
        jti TEXT NOT NULL,
        client_id TEXT NOT NULL,
        PRIMARY KEY (expires_ns, jti))""",
    "INSERT INTO spent_jti_v4 (expires_ns, jti, client_id) "
    "SELECT expires_ns, jti, client_id FROM spent_jti",
    "DROP TABLE spent_jti",
    "ALTER TABLE spent_jti_v4 RENAME TO spent_jti",
)

#: Before migration 4 a DPoP proof's id was remembered until 70 s after it was spent.
_OLD_DPOP_REMEMBER_NS = 70 * 1_000_000_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_KEY_STATES: tuple[str, ...] = get_args(KeyState)
# Forward only: pending → active → retired (and pending → retired); re-saving a state is a no-op.
_KEY_MOVES = {("pending", "active"), ("pending", "retired"), ("active", "retired")}
_JWK_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})
_MAX_KEY_REF = 512

# Every consent SELECT returns record, state, valid_from_ns, valid_until_ns, revoked_at_ns,
# revoked_by, in this order (read by _consent_row). The statements are whole literals, one per
# filter, so each can use its index.
_SELECT_ALL = (
    "SELECT record, state, valid_from_ns, valid_until_ns, revoked_at_ns, revoked_by "
    "FROM consents "
    "WHERE (? = 0 OR (state = 'active' AND valid_from_ns <= ? AND ? < valid_until_ns)) "
    "ORDER BY created_at_ns, consent_id"
)
_SELECT_BY_SUBJECT = (
    "SELECT record, state, valid_from_ns, valid_until_ns, revoked_at_ns, revoked_by "
    "FROM consents WHERE subject = ? "
    "AND (? = 0 OR (state = 'active' AND valid_from_ns <= ? AND ? < valid_until_ns)) "
    "ORDER BY created_at_ns, consent_id"
)
_SELECT_BY_INSURER = (
    "SELECT record, state, valid_from_ns, valid_until_ns, revoked_at_ns, revoked_by "
    "FROM consents WHERE insurer_org = ? "
    "AND (? = 0 OR (state = 'active' AND valid_from_ns <= ? AND ? < valid_until_ns)) "
    "ORDER BY created_at_ns, consent_id"
)
_SELECT_BY_BOTH = (
    "SELECT record, state, valid_from_ns, valid_until_ns, revoked_at_ns, revoked_by "
    "FROM consents WHERE subject = ? AND insurer_org = ? "
    "AND (? = 0 OR (state = 'active' AND valid_from_ns <= ? AND ? < valid_until_ns)) "
    "ORDER BY created_at_ns, consent_id"
)


def datetime_to_ns(value: datetime) -> int:
    """Exact nanoseconds since the Unix epoch of an aware datetime (no float rounding).

    >>> datetime_to_ns(datetime(2026, 1, 1, tzinfo=UTC))
    1767225600000000000
    """
    if value.tzinfo is None:
        raise ValidationFailed("timestamps must carry a time zone")
    return (value - _EPOCH) // timedelta(microseconds=1) * 1000


@dataclass(frozen=True)
class StoredConsent:
    """A consent as stored: the record (its ``state`` is the stored one, ``active`` or
    ``revoked``) and who revoked it when."""

    record: ConsentRecord
    valid_from_ns: int
    valid_until_ns: int
    revoked_at_ns: int | None
    revoked_by: str | None

    @property
    def consent_id(self) -> str:
        return self.record.consent_id

    def state_at(self, now_ns: int) -> ConsentState:
        """``revoked`` if revoked, ``expired`` once past its validity, else ``active`` (also
        before ``valid_from``: then it is active but not yet live)."""
        if self.record.state is ConsentState.REVOKED:
            return ConsentState.REVOKED
        if now_ns >= self.valid_until_ns:
            return ConsentState.EXPIRED
        return ConsentState.ACTIVE

    def live_at(self, now_ns: int) -> bool:
        """Usable now: not revoked and ``valid_from <= now < valid_until``."""
        return (self.record.state is ConsentState.ACTIVE
                and self.valid_from_ns <= now_ns < self.valid_until_ns)


@dataclass(frozen=True)
class ReplaySpend:
    """One request's single-use ids for :meth:`ConsentStatements.spend_replay_ids`."""

    client_id: str
    dpop_jti: str
    dpop_expires_ns: int
    consent_jti: str | None = None
    consent_id: str | None = None
    consent_expires_ns: int = 0


@dataclass(frozen=True)
class StoredConsentKey:
    """One consent signing key: its public JWK and where the private key lives (never the
    private key itself)."""

    kid: str
    state: KeyState
    public_jwk: dict[str, str]
    private_key_ref: str | None
    created_at_ns: int
    updated_at_ns: int


def _consent_row(row: Any) -> StoredConsent:
    record = ConsentRecord.model_validate_json(row[0])
    state = ConsentState(row[1])
    if record.state is not state:
        record = record.model_copy(update={"state": state})
    return StoredConsent(record, int(row[2]), int(row[3]),
                         None if row[4] is None else int(row[4]), row[5])


def _check_key(kid: str, state: str, public_jwk: dict[str, str],
               private_key_ref: str | None) -> None:
    if state not in _KEY_STATES:
        raise ValidationFailed(f"key state must be one of {list(_KEY_STATES)}")
    private = sorted(_JWK_PRIVATE_MEMBERS & set(public_jwk))
    if private:
        raise ValidationFailed(f"public_jwk carries private members {private}; "
                               "private keys never enter the state store")
    try:
        thumbprint = jwk_thumbprint(public_jwk)
    except ValueError as exc:
        raise ValidationFailed("public_jwk is not an OKP or EC public key") from exc
    if thumbprint != kid:
        raise ValidationFailed("kid is not the RFC 7638 thumbprint of public_jwk")
    if private_key_ref is not None and (
        not private_key_ref
        or len(private_key_ref) > _MAX_KEY_REF
        or not private_key_ref.isprintable()
        or "PRIVATE KEY" in private_key_ref
        or "-----" in private_key_ref
    ):
        raise ValidationFailed("private_key_ref must be a short reference (a path or a KMS "
                               "key name), never key material")


#: Most expired replay ids of each kind one purge forgets (a purge runs at most every 0.1 s
#: per process: gateway.service.consents.ReplayBatcher). A range delete of 512 ids takes
#: ~0.8 ms here, of 4,096 ~5 ms: small and often keeps the write turn short.
PURGE_LIMIT = 512


class ConsentStatements(ABC):
    """The consent statements over a backend's transactions."""

    @abstractmethod
    def _tx(self, *, write: bool = False, wait: bool = True) -> AbstractContextManager[Any]:
        """A cursor inside one transaction (see :class:`gateway.state.store.StateStore`)."""

    @staticmethod
    @abstractmethod
    def _bump(cur: Any, name: str) -> None:
        """Increment the change counter ``name`` inside the caller's transaction."""

    def _fetch_one(self, sql: str, params: tuple[Any, ...]) -> Any:
        """The first row of one read statement (a statement is its own snapshot); a backend
        may run it without an explicit transaction (the per-request reads are these)."""
        with self._tx() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def _remember_once(self, purge: str, insert: str, params: tuple[Any, ...],
                       now_ns: int) -> bool:
        """The one replay store: purge what has expired, then insert; True for exactly one
        caller across threads and processes (the insert is the arbiter, not a prior read)."""
        with self._tx(write=True) as cur:
            cur.execute(purge, (now_ns,))
            cur.execute(insert, params)
            return bool(cur.rowcount == 1)

    # -- consents ----------------------------------------------------------------------
    def add_consent(self, record: ConsentRecord) -> StoredConsent:
        """Store a new, active consent; Conflict if its id exists."""
        if record.state is not ConsentState.ACTIVE:
            raise ValidationFailed("a new consent is active; revoke it with revoke_consent")
        valid_from_ns = datetime_to_ns(record.valid_from)
        valid_until_ns = datetime_to_ns(record.valid_until)
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO consents (consent_id, subject, insurer_org, purpose, record, state, "
                "valid_from_ns, valid_until_ns, revoked_at_ns, revoked_by, created_at_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?) "
                "ON CONFLICT (consent_id) DO NOTHING",
                (record.consent_id, record.subject, record.insurer_org, record.purpose,
                 record.model_dump_json(), record.state.value, valid_from_ns, valid_until_ns,
                 datetime_to_ns(record.created_at)),
            )
            if cur.rowcount != 1:
                raise Conflict(f"consent {record.consent_id} already exists")
            self._bump(cur, "consents")
        return StoredConsent(record, valid_from_ns, valid_until_ns, None, None)

    def add_consents(self, records: Sequence[ConsentRecord]) -> int:
        """Store many new, active consents in one transaction (a bulk import); Conflict, and
        nothing stored, if any id exists. Returns how many were stored."""
        rows = []
        for record in records:
            if record.state is not ConsentState.ACTIVE:
                raise ValidationFailed("a new consent is active")
            rows.append((record.consent_id, record.subject, record.insurer_org, record.purpose,
                         record.model_dump_json(), record.state.value,
                         datetime_to_ns(record.valid_from), datetime_to_ns(record.valid_until),
                         datetime_to_ns(record.created_at)))
        with self._tx(write=True) as cur:
            for row in rows:
                cur.execute(
                    "INSERT INTO consents (consent_id, subject, insurer_org, purpose, record, "
                    "state, valid_from_ns, valid_until_ns, revoked_at_ns, revoked_by, "
                    "created_at_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?) "
                    "ON CONFLICT (consent_id) DO NOTHING",
                    row,
                )
                if cur.rowcount != 1:
                    raise Conflict(f"consent {row[0]} already exists")
            self._bump(cur, "consents")
        return len(rows)

    def get_consent(self, consent_id: str) -> StoredConsent | None:
        with self._tx() as cur:
            cur.execute(
                "SELECT record, state, valid_from_ns, valid_until_ns, revoked_at_ns, revoked_by "
                "FROM consents WHERE consent_id = ?",
                (consent_id,),
            )
            row = cur.fetchone()
        return None if row is None else _consent_row(row)

    def revoke_consent(self, consent_id: str, by: str, now_ns: int) -> StoredConsent:
        """Revoke at ``now_ns``; NotFound if absent, Conflict if already revoked. Bumps the
        ``consents`` counter in the same transaction."""
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE consents SET state = 'revoked', revoked_at_ns = ?, revoked_by = ? "
                "WHERE consent_id = ? AND state = 'active'",
                (now_ns, by, consent_id),
            )
            if cur.rowcount != 1:
                cur.execute("SELECT 1 FROM consents WHERE consent_id = ?", (consent_id,))
                if cur.fetchone() is None:
                    raise NotFound(f"consent {consent_id} does not exist")
                raise Conflict(f"consent {consent_id} is already revoked")
            self._bump(cur, "consents")
            cur.execute(
                "SELECT record, state, valid_from_ns, valid_until_ns, revoked_at_ns, revoked_by "
                "FROM consents WHERE consent_id = ?",
                (consent_id,),
            )
            row = cur.fetchone()
        return _consent_row(row)

    def list_consents(self, subject: str | None = None, insurer: str | None = None, *,
                      live_only: bool = False, now_ns: int | None = None) -> list[StoredConsent]:
        """Consents of ``subject`` and/or ``insurer`` (all when both are None), oldest first;
        with ``live_only`` only those live at ``now_ns`` (required then)."""
        if live_only and now_ns is None:
            raise ValidationFailed("live_only needs now_ns")
        live = (int(live_only), now_ns or 0, now_ns or 0)
        statement: str
        params: tuple[Any, ...]
        if subject is not None and insurer is not None:
            statement, params = _SELECT_BY_BOTH, (subject, insurer, *live)
        elif subject is not None:
            statement, params = _SELECT_BY_SUBJECT, (subject, *live)
        elif insurer is not None:
            statement, params = _SELECT_BY_INSURER, (insurer, *live)
        else:
            statement, params = _SELECT_ALL, live
        with self._tx() as cur:
            cur.execute(statement, params)
            rows = cur.fetchall()
        return [_consent_row(r) for r in rows]

    def consent_status_and_versions(
        self, consent_id: str, now_ns: int, first: str, second: str,
    ) -> tuple[int, int, tuple[str, str, bool] | None]:
        """Two change counters (as ``StateStore.version`` reads them) and the consent's ``(subject,
        insurer_org, live at now_ns)`` (None if unknown), from one read statement: the
        per-request state read of a consented call, in a snapshot of its own so a
        revocation committed by any process is seen by the next request; the stored record
        is not parsed."""
        row = self._fetch_one(
            "SELECT (SELECT version FROM state_versions WHERE name = ?), "
            "(SELECT version FROM state_versions WHERE name = ?), "
            "c.subject, c.insurer_org, c.state, c.valid_from_ns, c.valid_until_ns "
            "FROM (SELECT 1 AS one) AS one LEFT JOIN consents AS c ON c.consent_id = ?",
            (first, second, consent_id),
        )
        # The outer SELECT always gives one row; the consent's columns are NULL if unknown.
        status = None if row[2] is None else (
            str(row[2]), str(row[3]),
            row[4] == "active" and int(row[5]) <= now_ns < int(row[6]))
        return int(row[0] or 0), int(row[1] or 0), status

    def is_consent_live(self, consent_id: str, now_ns: int) -> bool:
        """One primary-key read: the consent exists, is not revoked and is valid at ``now_ns``.
        Read on every request, so a revocation holds from the next request in every process."""
        with self._tx() as cur:
            cur.execute(
                "SELECT 1 FROM consents WHERE consent_id = ? AND state = 'active' "
                "AND valid_from_ns <= ? AND ? < valid_until_ns",
                (consent_id, now_ns, now_ns),
            )
            return cur.fetchone() is not None

    # -- single-use consents and DPoP proofs, by jti -----------------------------------
    # An id is remembered under (its expiry, …): ``expires_ns`` must come from the token alone
    # (the same token always gives the same value), never from the clock of the spend.
    def consume_consent_jti(self, jti: str, consent_id: str, expires_ns: int,
                            now_ns: int) -> bool:
        """Consume a single-use consent token by its ``jti``: True for exactly one caller
        across threads and processes, False while it is remembered (through ``expires_ns``,
        ``VerifiedConsent.replay_window_ends``). Expired entries are purged first."""
        if not jti or not consent_id:
            raise ValidationFailed("jti and consent_id are required")
        return self._remember_once(
            "DELETE FROM consumed_consent_jti WHERE expires_ns < ?",
            "INSERT INTO consumed_consent_jti (expires_ns, jti, consent_id) VALUES (?, ?, ?) "
            "ON CONFLICT (expires_ns, jti) DO NOTHING",
            (expires_ns, jti, consent_id), now_ns)

    def spend_dpop_jti(self, client_id: str, jti: str, expires_ns: int, now_ns: int) -> bool:
        """Record a DPoP proof's ``jti`` for ``client_id``; False for a replay while it is
        remembered (through ``expires_ns``: ``DpopProof.replay_window_ends``)."""
        if not client_id or not jti:
            raise ValidationFailed("client_id and jti are required")
        return self._remember_once(
            "DELETE FROM dpop_jti WHERE expires_ns < ?",
            "INSERT INTO dpop_jti (expires_ns, client_id, jti) VALUES (?, ?, ?) "
            "ON CONFLICT (expires_ns, client_id, jti) DO NOTHING",
            (expires_ns, client_id, jti), now_ns)

    def spend_replay_ids(self, items: Sequence[ReplaySpend], now_ns: int, *,
                         purge: bool = True, wait: bool = True) -> list[tuple[bool, bool]]:
        """Many requests' single-use ids in one write transaction (group commit: one fsync
        for a batch of concurrent requests). Per item, in order: its DPoP ``jti`` (keyed with
        its client), then — only if that was new — its consent ``jti`` when it has one.
        Returns ``(dpop_new, consent_new)`` per item; ``consent_new`` is True for an item with
        no consent ``jti``, and False when its DPoP ``jti`` was a replay (nothing is spent for
        it then). Within a batch, a repeated id loses to its first occurrence, as across
        batches: the insert is the arbiter. ``purge`` first forgets the oldest ids past their
        expiry, at most :data:`PURGE_LIMIT` of each kind (only to bound the tables: an expired
        proof or token is refused before it gets here, so a caller may purge less often than
        it writes, which lets one purge write each page once for many ids; the bound keeps a
        backlog, after downtime, from becoming one long delete on the request path).
        ``wait=False``: see ``_tx`` (nothing is written when the turn is busy)."""
        out: list[tuple[bool, bool]] = []
        with self._tx(write=True, wait=wait) as cur:
            if purge:
                cur.execute(
                    "DELETE FROM dpop_jti WHERE (expires_ns, client_id, jti) IN (SELECT "
                    "expires_ns, client_id, jti FROM dpop_jti WHERE expires_ns < ? "
                    "ORDER BY expires_ns LIMIT ?)", (now_ns, PURGE_LIMIT))
                cur.execute(
                    "DELETE FROM consumed_consent_jti WHERE (expires_ns, jti) IN (SELECT "
                    "expires_ns, jti FROM consumed_consent_jti WHERE expires_ns < ? "
                    "ORDER BY expires_ns LIMIT ?)", (now_ns, PURGE_LIMIT))
            for item in items:
                if not item.client_id or not item.dpop_jti:
                    raise ValidationFailed("client_id and the DPoP jti are required")
                cur.execute(
                    "INSERT INTO dpop_jti (expires_ns, client_id, jti) VALUES (?, ?, ?) "
                    "ON CONFLICT (expires_ns, client_id, jti) DO NOTHING",
                    (item.dpop_expires_ns, item.client_id, item.dpop_jti))
                if cur.rowcount != 1:
                    out.append((False, False))
                    continue
                if item.consent_jti is None:
                    out.append((True, True))
                    continue
                cur.execute(
                    "INSERT INTO consumed_consent_jti (expires_ns, jti, consent_id) "
                    "VALUES (?, ?, ?) ON CONFLICT (expires_ns, jti) DO NOTHING",
                    (item.consent_expires_ns, item.consent_jti, item.consent_id))
                out.append((True, cur.rowcount == 1))
        return out

    def dpop_rekeyed_iat_bound(self) -> int | None:
        """The latest ``iat`` (s) a proof spent before migration 4 can carry, or None when
        there were none. Those ids were not carried over: a proof issued then is refused."""
        row = self._fetch_one(
            "SELECT last_expires_ns FROM replay_rekeyed WHERE kind = 'dpop'", ())
        if row is None:
            return None
        # A proof is spent no earlier than 5 s (the leeway for a client's clock ahead) before
        # its iat; it was remembered 70 s after the spend.
        return int((row[0] - _OLD_DPOP_REMEMBER_NS) // 1_000_000_000) + 5

    # -- consent keys (public halves and private-key references only) ------------------
    def save_consent_key(self, kid: str, state: KeyState, public_jwk: dict[str, str], *,
                         private_key_ref: str | None = None,
                         now_ns: int | None = None) -> KeyState | None:
        """Insert a key or move it forward (pending → active → retired); return its previous
        state (None when new) so the caller can audit the change. A backward move, a kid that
        is not the JWK's thumbprint, or a JWK with private members is refused. Bumps the
        ``consent_keys`` counter on every change."""
        _check_key(kid, state, public_jwk, private_key_ref)
        at = now_ns if now_ns is not None else time.time_ns()
        jwk_json = json.dumps(public_jwk, sort_keys=True, separators=(",", ":"))
        with self._tx(write=True) as cur:
            cur.execute(
                "SELECT state, public_jwk, private_key_ref FROM consent_keys WHERE kid = ?",
                (kid,),
            )
            row = cur.fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO consent_keys (kid, state, public_jwk, private_key_ref, "
                    "created_at_ns, updated_at_ns) VALUES (?, ?, ?, ?, ?, ?)",
                    (kid, state, jwk_json, private_key_ref, at, at),
                )
                self._bump(cur, "consent_keys")
                return None
            old: KeyState = row[0]
            if old != state and (old, state) not in _KEY_MOVES:
                raise Conflict(f"key {kid} is {old}, cannot become {state}")
            if old == state and private_key_ref in (None, row[2]):
                return old
            cur.execute(
                "UPDATE consent_keys SET state = ?, "
                "private_key_ref = COALESCE(?, private_key_ref), updated_at_ns = ? "
                "WHERE kid = ?",
                (state, private_key_ref, at, kid),
            )
            self._bump(cur, "consent_keys")
            return old

    def consent_keys(self) -> list[StoredConsentKey]:
        """Every key, retired ones included (they must stay known to be refused), oldest
        first."""
        with self._tx() as cur:
            cur.execute(
                "SELECT kid, state, public_jwk, private_key_ref, created_at_ns, updated_at_ns "
                "FROM consent_keys ORDER BY created_at_ns, kid"
            )
            rows = cur.fetchall()
        return [StoredConsentKey(r[0], r[1], json.loads(r[2]), r[3], int(r[4]), int(r[5]))
                for r in rows]
