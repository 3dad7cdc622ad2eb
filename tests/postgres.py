"""A real PostgreSQL server for the state and audit suites (``tools/postgres.sh``).

One server per test session on a free loopback port, or the one ``GATEWAY_TEST_POSTGRES_URL``
names; each test gets a fresh database of its own. No skip: without PostgreSQL these fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "postgres.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of the server's maintenance database ``gateway``."""
    given = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    # Not under pytest's tmp dirs: those are 0700 root, and the server runs as `postgres`.
    data = tempfile.mkdtemp(prefix="gateway-pg-")
    url = subprocess.run(
        ["bash", str(_SCRIPT), "start", data, str(_free_port())],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    try:
        yield url
    finally:
        subprocess.run(["bash", str(_SCRIPT), "stop", data], check=False, capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = postgres_server.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
