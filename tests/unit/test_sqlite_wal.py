"""enable_wal: a fresh file switched to WAL even while another connection holds it briefly;
WriteTurn: writers of several processes take turns (bounded wait), never meeting a locked
file."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.sqlite_wal import WriteTurn, WriteTurnBusy, WriteTurnTimeout, enable_wal


def test_wal_is_set_once_a_brief_exclusive_lock_is_released(tmp_path: Path) -> None:
    path = tmp_path / "fresh.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.2, holder.execute, args=("COMMIT",)).start()
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    enable_wal(conn)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_lock_held_past_the_deadline_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "held.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        enable_wal(conn, within_s=0.1)
    holder.execute("COMMIT")


# -- WriteTurn -------------------------------------------------------------------------------

def _hold_turn(db: str, held: Any, release: Any) -> None:
    turn = WriteTurn(db)
    with turn.held():
        held.set()
        release.wait(10)


def test_a_turn_held_by_another_process_bounds_the_wait_then_passes(tmp_path: Path) -> None:
    db = str(tmp_path / "x.sqlite")
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_turn, args=(db, held, release))
    holder.start()
    try:
        assert held.wait(30)
        turn = WriteTurn(db, timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(WriteTurnTimeout, match="locked"), turn.held():
            pass
        assert 0.2 <= time.monotonic() - started < 2
        release.set()
        holder.join(10)
        with turn.held():  # free again: taken at once
            pass
    finally:
        release.set()
        holder.join(10)


def _count(db: str, rounds: int) -> None:
    # SQLite's own busy timeout is 0 here: only the turn keeps writers from colliding.
    conn = sqlite3.connect(db, timeout=0, isolation_level=None)
    enable_wal(conn)
    turn = WriteTurn(db)
    for _ in range(rounds):
        with turn.held():
            conn.execute("BEGIN IMMEDIATE")
            (n,) = conn.execute("SELECT n FROM counter").fetchone()
            conn.execute("UPDATE counter SET n = ?", (n + 1,))
            conn.execute("COMMIT")
    conn.close()


def test_writers_in_four_processes_taking_turns_never_meet_a_locked_file(tmp_path: Path
                                                                         ) -> None:
    db = str(tmp_path / "counter.sqlite")
    conn = sqlite3.connect(db, isolation_level=None)
    enable_wal(conn)
    conn.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
    conn.execute("INSERT INTO counter VALUES (0)")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_count, args=(db, 150)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]  # "database is locked" would exit 1
    assert conn.execute("SELECT n FROM counter").fetchone() == (600,)


def test_a_writer_that_must_not_wait_is_told_the_turn_is_busy(tmp_path: Path) -> None:
    """``held(wait=False)`` (an event loop's writer): busy at once, whether the turn is held
    by another thread of this process or by another open file (another process)."""
    path = tmp_path / "x.sqlite"
    turn, other_process = WriteTurn(path), WriteTurn(path)
    with other_process.held():
        started = time.monotonic()
        with pytest.raises(WriteTurnBusy), turn.held(wait=False):
            pass
        assert time.monotonic() - started < 0.05
    taken = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with turn.held():
            taken.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait(5)
    with pytest.raises(WriteTurnBusy), turn.held(wait=False):
        pass
    release.set()
    holder.join()
    with turn.held(wait=False):  # free again: taken at once, and released
        pass
    with other_process.held(wait=False):
        pass
    turn.close()
    other_process.close()
