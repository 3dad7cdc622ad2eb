"""Tests of DPoP proof verification (RFC 9449 §4.3): each check refuses its own forged case."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.consent import access_token_hash, jwk_thumbprint, public_jwk, verify_dpop_proof
from gateway.consent.keys import b64url_encode
from gateway.errors import AuthenticationFailed

# RFC 8032 §7.1 TEST 3 and TEST 2 secret keys; a fixed P-256 scalar for ES256.
SEED_3 = bytes.fromhex("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7")
SEED_2 = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
P256_SCALAR = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721

ED = Ed25519PrivateKey.from_private_bytes(SEED_3)
OTHER = Ed25519PrivateKey.from_private_bytes(SEED_2)
P256 = ec.derive_private_key(P256_SCALAR, ec.SECP256R1())
JKT = jwk_thumbprint(public_jwk(ED.public_key()))
ACCESS = "eyJhbGciOiJFZERTQSJ9.eyJjb25zZW50IjoxfQ.c2lnbmF0dXJl"
HTU = "https://gateway.yibao.test/v1/persons/enrollment"
NOW = 1_790_000_000


def _b64(obj: dict[str, Any] | str) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return b64url_encode(text.encode())


def _sign(signer: Any, data: bytes) -> bytes:
    if isinstance(signer, Ed25519PrivateKey):
        return signer.sign(data)
    r, s = decode_dss_signature(signer.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def proof(*, signer: Any = ED, header: dict[str, Any] | None = None,
          claims: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
          raw_payload: str | None = None) -> str:
    jwk = public_jwk(signer.public_key())
    h: dict[str, Any] = {"typ": "dpop+jwt",
                         "alg": "EdDSA" if isinstance(signer, Ed25519PrivateKey) else "ES256",
                         "jwk": jwk}
    h.update(header or {})
    c: dict[str, Any] = {"jti": "proof-jti-000000001", "htm": "POST", "htu": HTU, "iat": NOW,
                         "ath": access_token_hash(ACCESS)}
    c.update(claims or {})
    h = {k: v for k, v in h.items() if k not in drop and v is not None}
    c = {k: v for k, v in c.items() if k not in drop}
    signing_input = f"{_b64(h)}.{_b64(raw_payload if raw_payload is not None else c)}"
    return f"{signing_input}.{b64url_encode(_sign(signer, signing_input.encode()))}"


def fresh() -> Callable[[str], bool]:
    seen: set[str] = set()

    def spend(jti: str) -> bool:
        if jti in seen:
            return False
        seen.add(jti)
        return True

    return spend


def check(token: object, *, jkt: str = JKT, htm: str = "POST", htu: str = HTU,
          now: float = NOW, seen: Callable[[str], bool] | None = None) -> Any:
    return verify_dpop_proof(token, htm=htm, htu=htu, access_token=ACCESS, expected_jkt=jkt,
                             now=now, seen_jti=seen or fresh())


def code(token: object, **kwargs: Any) -> str:
    with pytest.raises(AuthenticationFailed) as info:
        check(token, **kwargs)
    assert info.value.status == 401
    return info.value.code


def test_valid_eddsa_proof() -> None:
    result = check(proof())
    assert (result.jti, result.jkt, result.iat) == ("proof-jti-000000001", JKT, NOW)


def test_a_proof_is_remembered_until_it_would_be_stale() -> None:
    """``replay_window_ends`` comes from the proof (iat + max age + leeway), never from the
    moment it is checked: the same proof gives the same moment whenever it is replayed, and
    one second past it the proof is refused as stale anyway."""
    token = proof()
    ends = {check(token, now=NOW + dt).replay_window_ends for dt in (-5, 0, 30, 65)}
    assert ends == {NOW + 65}
    assert code(token, now=NOW + 66) == "dpop_stale"


def test_a_proof_not_issued_after_the_given_bound_is_stale() -> None:
    def bounded(token: object, bound: int) -> Any:
        return verify_dpop_proof(token, htm="POST", htu=HTU, access_token=ACCESS,
                                 expected_jkt=JKT, now=NOW, seen_jti=fresh(),
                                 issued_after=bound)

    with pytest.raises(AuthenticationFailed) as info:
        bounded(proof(), NOW)
    assert info.value.code == "dpop_stale"
    assert bounded(proof(), NOW - 1).iat == NOW


def test_valid_es256_proof() -> None:
    jkt = jwk_thumbprint(public_jwk(P256.public_key()))
    assert check(proof(signer=P256), jkt=jkt).jkt == jkt


def test_htu_query_and_fragment_of_the_request_are_ignored() -> None:
    check(proof(), htu=HTU + "?x=1#frag")
    assert code(proof(claims={"htu": HTU + "?x=1"})) == "dpop_wrong_htu"


@pytest.mark.parametrize(("name", "forged", "expected"), [
    ("missing", None, "dpop_missing"),
    ("empty", "", "dpop_missing"),
    ("two-segments", "a.b", "dpop_malformed"),
    ("oversized", "a" * 5000, "dpop_too_large"),
    ("duplicate-htm", proof(raw_payload='{"jti":"proof-jti-000000001","htm":"GET","htm":"POST",'
                                        f'"htu":"{HTU}","iat":{NOW},'
                                        f'"ath":"{access_token_hash(ACCESS)}"}}'),
     "dpop_duplicate_member"),
    ("typ-jwt", proof(header={"typ": "JWT"}), "dpop_wrong_typ"),
    ("consent-typ", proof(header={"typ": "consent+jwt"}), "dpop_wrong_typ"),
    ("alg-none", proof(header={"alg": "none"}), "dpop_bad_alg"),
    ("alg-hs256", proof(header={"alg": "HS256"}), "dpop_bad_alg"),
    ("kid-header", proof(header={"kid": "k1"}), "dpop_forbidden_header"),
    ("jku-header", proof(header={"jku": "https://attacker.test/jwks"}), "dpop_forbidden_header"),
    ("no-jwk", proof(drop=("jwk",)), "dpop_bad_jwk"),
    ("private-jwk", proof(header={"jwk": {**public_jwk(ED.public_key()),
                                          "d": b64url_encode(SEED_3)}}), "dpop_bad_jwk"),
    ("jwk-wrong-curve-for-alg", proof(header={"alg": "ES256"}), "dpop_bad_jwk"),
    ("jwk-symmetric", proof(header={"jwk": {"kty": "oct", "k": "c2VjcmV0"}}), "dpop_bad_jwk"),
    ("signed-by-other-key", proof(header={"jwk": public_jwk(OTHER.public_key())}),
     "dpop_bad_signature"),
    ("missing-ath", proof(drop=("ath",)), "dpop_missing_claim"),
    ("missing-jti", proof(drop=("jti",)), "dpop_missing_claim"),
    ("iat-string", proof(claims={"iat": str(NOW)}), "dpop_bad_claim"),
    ("short-jti", proof(claims={"jti": "1"}), "dpop_bad_claim"),
    ("wrong-htm", proof(claims={"htm": "GET"}), "dpop_wrong_htm"),
    ("lowercase-htm", proof(claims={"htm": "post"}), "dpop_wrong_htm"),
    ("wrong-htu", proof(claims={"htu": "https://gateway.yibao.test/v1/persons/settlements"}),
     "dpop_wrong_htu"),
    ("stale-iat", proof(claims={"iat": NOW - 66}), "dpop_stale"),
    ("future-iat", proof(claims={"iat": NOW + 6}), "dpop_future"),
    ("wrong-ath", proof(claims={"ath": access_token_hash(ACCESS + "x")}), "dpop_wrong_ath"),
    ("wrong-jkt", proof(signer=OTHER), "dpop_wrong_key"),
])
def test_refusals(name: str, forged: object, expected: str) -> None:
    assert code(forged) == expected, name


def test_iat_freshness_boundaries() -> None:
    check(proof(claims={"iat": NOW - 65}))  # max_age 60 + leeway 5
    check(proof(claims={"iat": NOW + 5}))
    assert code(proof(claims={"iat": NOW - 66})) == "dpop_stale"


def test_replayed_jti_is_refused_and_refusals_spend_nothing() -> None:
    seen = fresh()
    token = proof()
    assert code(token, htm="GET", seen=seen) == "dpop_wrong_htm"  # refused: jti not spent
    check(token, seen=seen)
    assert code(token, seen=seen) == "dpop_replay"


def test_ath_is_base64url_sha256_of_the_token() -> None:
    # RFC 9449 §7.1 example: the access token "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == (
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    )


# -- spending the single-use ids: one write for a batch of concurrent requests -------------------


def test_spend_replay_ids_in_one_transaction(tmp_path: Path) -> None:
    from gateway.state.consents import ReplaySpend
    from gateway.state.store import SqliteStateStore

    state = SqliteStateStore(tmp_path / "state.sqlite")
    far = 2**62
    items = [
        ReplaySpend("c-1", "p-1", far, "consent-jti-1", "cst-1", far),
        ReplaySpend("c-1", "p-1", far, "consent-jti-2", "cst-2", far),  # replayed proof
        ReplaySpend("c-2", "p-1", far, "consent-jti-1", "cst-1", far),  # consent used above
        ReplaySpend("c-2", "p-2", far),  # no single-use consent
    ]
    assert state.spend_replay_ids(items, now_ns=0) == [
        (True, True), (False, False), (True, False), (True, True)]
    # The replayed proof spent nothing: consent-jti-2 is still unused.
    assert state.spend_replay_ids(
        [ReplaySpend("c-1", "p-3", far, "consent-jti-2", "cst-2", far)], now_ns=0) == [
        (True, True)]
    # Expired ids are purged first and may recur.
    assert state.spend_replay_ids([ReplaySpend("c-1", "p-1", 5)], now_ns=far + 1) == [
        (True, True)]


def test_replay_batcher_lets_exactly_one_request_use_a_consent(tmp_path: Path) -> None:
    import threading

    from gateway.service.consents import ReplayBatcher
    from gateway.state.consents import ReplaySpend
    from gateway.state.store import SqliteStateStore

    batcher = ReplayBatcher(SqliteStateStore(tmp_path / "state.sqlite"))
    far = 2**62
    results: list[tuple[bool, bool]] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker(n: int) -> None:
        start.wait()
        for k in range(20):
            # Every thread tries the same 20 consents, each with its own proof.
            outcome = batcher.spend(ReplaySpend("c-1", f"proof-{n}-{k}", far, f"jti-{k}",
                                                f"cst-{k}", far), now_ns=0)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 * 20
    assert all(dpop for dpop, _ in results)
    assert sum(consent for _, consent in results) == 20


def test_replay_batcher_coroutines_and_threads_share_batches(tmp_path: Path) -> None:
    """Coroutines (the person endpoints, batched per loop turn) and threads (a transaction
    each) spend at once; a consent is still used exactly once, whoever asks."""
    import asyncio
    import threading

    from gateway.service.consents import ReplayBatcher
    from gateway.state.consents import ReplaySpend
    from gateway.state.store import SqliteStateStore

    batcher = ReplayBatcher(SqliteStateStore(tmp_path / "state.sqlite"))
    far = 2**62

    def item(who: str, k: int) -> ReplaySpend:
        return ReplaySpend("c-1", f"proof-{who}-{k}", far, f"jti-{k}", f"cst-{k}", far)

    thread_results: list[tuple[bool, bool]] = []

    def thread_worker() -> None:
        thread_results.extend(batcher.spend(item("t", k), now_ns=0) for k in range(30))

    async def coroutines() -> list[tuple[bool, bool]]:
        return list(await asyncio.gather(*(batcher.spend_async(item(f"a{n}", k), now_ns=0)
                                            for n in range(8) for k in range(30))))

    thread = threading.Thread(target=thread_worker)
    thread.start()
    async_results = asyncio.run(coroutines())
    thread.join()
    results = async_results + thread_results
    assert len(results) == 9 * 30
    assert all(dpop for dpop, _ in results)
    assert sum(consent for _, consent in results) == 30


def test_replay_batcher_fails_every_waiter_of_a_failed_write_then_recovers(tmp_path: Path
                                                                            ) -> None:
    """A write that fails (here a trigger refusing it in the real store) fails every caller
    of its batch, coroutine or thread, with the store's error: nobody is told "new"."""
    import asyncio
    import sqlite3

    from gateway.errors import GatewayError
    from gateway.service.consents import ReplayBatcher
    from gateway.state.consents import ReplaySpend
    from gateway.state.store import SqliteStateStore

    path = tmp_path / "state.sqlite"
    batcher = ReplayBatcher(SqliteStateStore(path))
    far = 2**62
    saboteur = sqlite3.connect(path, isolation_level=None)
    saboteur.execute("CREATE TRIGGER refuse BEFORE INSERT ON dpop_jti "
                     "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")

    async def spend_all(prefix: str) -> list[object]:
        return list(await asyncio.gather(
            *(batcher.spend_async(ReplaySpend("c-1", f"{prefix}-{n}-proof-id", far), 0)
              for n in range(12)), return_exceptions=True))

    failed = asyncio.run(spend_all("a"))
    assert all(isinstance(r, GatewayError) for r in failed)
    with pytest.raises(GatewayError):
        batcher.spend(ReplaySpend("c-1", "thread-proof-id", far), 0)
    saboteur.execute("DROP TRIGGER refuse")
    assert asyncio.run(spend_all("b")) == [(True, True)] * 12


def test_replay_batcher_waits_for_another_writers_turn_without_blocking_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process holds the state file's write turn (here a second ``WriteTurn`` on the
    same file: its flock is another open file, as in another worker). The batch waits on the
    loop, not in it: other coroutines keep running, the spend completes once the turn is
    released, and a turn held past the bound fails the batch closed."""
    import asyncio

    from gateway.errors import StoreUnavailable
    from gateway.service import consents as service_consents
    from gateway.service.consents import ReplayBatcher
    from gateway.sqlite_wal import WriteTurn
    from gateway.state.consents import ReplaySpend
    from gateway.state.store import SqliteStateStore

    path = tmp_path / "state.sqlite"
    batcher = ReplayBatcher(SqliteStateStore(path))
    other_worker = WriteTurn(path)
    far = 2**62

    async def spend_while_held() -> tuple[list[tuple[bool, bool]], int]:
        ticks = 0
        with other_worker.held():
            spends = asyncio.gather(*(batcher.spend_async(
                ReplaySpend("c-1", f"proof-{n}-xxxxxxxx", far, "jti-1", "cst-1", far), 0)
                for n in range(4)))
            for _ in range(20):  # the loop is free: this coroutine runs while they wait
                await asyncio.sleep(0.001)
                ticks += 1
            assert not spends.done()
        return list(await spends), ticks

    results, ticks = asyncio.run(spend_while_held())
    assert ticks == 20
    assert results == [(True, True), (True, False), (True, False), (True, False)]

    monkeypatch.setattr(service_consents, "_TURN_WAIT_BOUND_S", 0.05)

    async def spend_past_the_bound() -> object:
        with other_worker.held():
            return (await asyncio.gather(batcher.spend_async(
                ReplaySpend("c-1", "late-proof-xxxxxxxx", far), 0), return_exceptions=True))[0]

    assert isinstance(asyncio.run(spend_past_the_bound()), StoreUnavailable)
    # Nothing was written for it: the same proof is new once the turn is free.
    assert asyncio.run(batcher.spend_async(ReplaySpend("c-1", "late-proof-xxxxxxxx", far),
                                           0)) == (True, True)
    other_worker.close()
