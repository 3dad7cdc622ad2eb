"""Switching a SQLite file to WAL, for every SQLite store of the gateway (state, audit)."""

from __future__ import annotations

import sqlite3
import time

__all__ = ["enable_wal"]


def enable_wal(conn: sqlite3.Connection, *, within_s: float = 5.0) -> None:
    """Put the connection's file in WAL mode. Workers opening a fresh file at the same moment
    can get "database is locked" here without SQLite's busy handler being called, so retry
    for up to ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
