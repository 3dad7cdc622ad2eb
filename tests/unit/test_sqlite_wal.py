"""enable_wal: a fresh file switched to WAL even while another connection holds it briefly."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.sqlite_wal import enable_wal


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
