"""A grant's rate limit over HTTP: one allowance for the aggregate, SQL and pricing endpoints;
past it 429 ``rate_limited`` with ``Retry-After`` and exactly one audit entry; back after the
clock moves on; and 503, never a pass, when the store that keeps it fails.

The count itself (exact across threads and processes) is tested on both state backends in
``tests/unit/test_state.py``, and across four real workers in ``tests/multiworker/``."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PRICING_GRANT, Env, LoadedStore, make_env

PER_MINUTE = 3  # one request back every 20 s
AGGREGATE = {"purpose": "hmb_pricing", "dataset": "settlements", "dimensions": ["gend"],
             "measures": [{"fn": "count"}]}
SQL = {"purpose": "hmb_pricing",
       "sql": "SELECT gend, count_persons() FROM settlements GROUP BY gend"}
PRICING = {"products": [{"name": "基础版", "deductible": 15_000, "ratio_in_list": 0.8,
                         "ratio_out_of_list": 0.5, "cap": 3_000_000, "premium": 99}],
           "year": 2024}


@pytest.fixture
def limited(tmp_path: Path, loaded_store: LoadedStore, signing_key_file: Path) -> Iterator[Env]:
    env = make_env(tmp_path, loaded_store.store_dir, signing_key_file,
                   grant={**PRICING_GRANT, "rate_limit_per_minute": PER_MINUTE})
    with env.client:
        yield env
    env.gateway.audit.close()


def _ask(env: Env, headers: dict[str, str], path: str = "/v1/query/aggregate",
         body: object = AGGREGATE) -> httpx.Response:
    return env.client.post(path, json=body, headers=headers)


def _refusals(env: Env) -> list[int]:
    return [i for i, e in env.gateway.audit.search(actor="t-insurer", decision="deny")
            if e.error_code == "rate_limited"]


def test_past_the_limit_429_with_retry_after_and_one_audit_entry(limited: Env) -> None:
    headers = limited.headers("insurer")
    # The three endpoints draw on the grant's one allowance.
    for path, body in [("/v1/query/aggregate", AGGREGATE), ("/v1/query/sql", SQL),
                       ("/v1/pricing/simulate", PRICING)]:
        answer = _ask(limited, headers, path, body)
        assert answer.status_code == 200, answer.text
    refused = _ask(limited, headers)
    assert refused.status_code == 429
    assert refused.json() == {"error": {
        "code": "rate_limited", "message": "rate limit of 3 requests per minute exceeded",
        "audit_id": int(refused.headers["Audit-Index"])}}
    assert 15 <= int(refused.headers["Retry-After"]) <= 20
    assert _refusals(limited) == [int(refused.headers["Audit-Index"])]
    entry = limited.gateway.audit.get(_refusals(limited)[0])
    assert (entry.action, entry.status, entry.grant_id) == (
        "query.aggregate", 429, limited.grant_id)
    assert entry.reasons == ["rate limit of 3 requests per minute"]


def test_the_allowance_comes_back_as_the_clock_moves_on(limited: Env) -> None:
    headers = limited.headers("insurer")
    assert [_ask(limited, headers).status_code for _ in range(4)] == [200] * 3 + [429]
    limited.clock.offset += 20  # one interval: one request
    assert [_ask(limited, headers).status_code for _ in range(2)] == [200, 429]
    limited.clock.offset += 60  # a quiet minute: the whole allowance
    assert [_ask(limited, headers).status_code for _ in range(4)] == [200] * 3 + [429]
    assert len(_refusals(limited)) == 3


def test_a_failing_rate_limit_store_refuses_with_503(limited: Env) -> None:
    headers = limited.headers("insurer")
    with sqlite3.connect(limited.settings.state_path) as db:
        db.execute("DROP TABLE rate_limits")  # the store can no longer count
    refused = _ask(limited, headers)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "store_unavailable"
    ((_, entry),) = limited.gateway.audit.search(actor="t-insurer", action="query.aggregate")
    assert (entry.status, entry.decision, entry.error_code) == (503, "error", "store_unavailable")
    assert entry.data_version is None  # nothing was queried
