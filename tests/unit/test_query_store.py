"""The query store's time limit (one watchdog thread for every statement) and its column
types, on a small published version."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import duckdb
import pytest

from gateway.errors import QueryTimeout
from gateway.query.store import QueryStore, StoreLayout


@pytest.fixture
def store(tmp_path: Path) -> QueryStore:
    built = tmp_path / "built.duckdb"
    con = duckdb.connect(str(built))
    con.execute("CREATE TABLE t AS SELECT range AS n, CAST(range AS DECIMAL(18,2)) AS amt, "
                "CAST(range AS DOUBLE) AS x FROM range(1000)")
    con.close()
    layout = StoreLayout(tmp_path / "store")
    layout.publish("v1", built)
    return QueryStore(layout, timeout_s=0.3)


_SLOW = "SELECT count(*) FROM range(100000000000) a WHERE a.range % 7 = 3"


def test_a_statement_past_its_time_limit_is_interrupted(store: QueryStore) -> None:
    started = time.monotonic()
    with pytest.raises(QueryTimeout):
        store.fetch(_SLOW)
    assert time.monotonic() - started < 10
    with pytest.raises(QueryTimeout):
        store.fetch_arrow(_SLOW)


def test_statements_within_their_limit_are_never_interrupted_later(store: QueryStore) -> None:
    # Many quick statements, some from other threads, then one that outlives them all: each
    # finished statement left the watchdog, and the watchdog still keeps time for new ones.
    def quick() -> None:
        for _ in range(50):
            assert store.fetch("SELECT sum(n) FROM t")[1] == [(499500,)]

    threads = [threading.Thread(target=quick) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.4)  # past every earlier deadline
    assert store.fetch("SELECT count(*) FROM t")[1] == [(1000,)]
    with pytest.raises(QueryTimeout):
        store.fetch(_SLOW)


def test_column_types_come_from_the_serving_version(store: QueryStore) -> None:
    types, version = store.column_types("t")
    assert version == "v1"
    assert types == {"n": "BIGINT", "amt": "DECIMAL(18,2)", "x": "DOUBLE"}
    assert store.column_types("missing") == ({}, "v1")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_keeps_its_own_time_limit(store: QueryStore) -> None:
    store.fetch("SELECT 1")  # the parent's watchdog thread is running
    pid = os.fork()
    if pid == 0:  # the child: a fresh watchdog, or the slow statement would never end
        try:
            store.fetch(_SLOW)
        except QueryTimeout:
            os._exit(0)
        except BaseException:
            os._exit(2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
