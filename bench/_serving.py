"""What the benchmarks that start a real `gateway serve` share: a free loopback port and the
wait until the server answers ``/readyz`` with every worker listening."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port`` (with ``--workers N``, one per worker
    once it has started: gateway.cli.listeners)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as fh:
        return sum(1 for line in fh.readlines()[1:]
                   if (parts := line.split())[1] == local and parts[3] == "0A")


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120, *,
               workers: int = 1) -> None:
    """Until ``/readyz`` answers 200 and all ``workers`` listen (the first one up answers
    before the others have started)."""
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("gateway exited during start-up")
        try:
            if (httpx.get(base_url + "/readyz", timeout=2).status_code == 200
                    and (workers == 1 or listening(port) >= workers)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("gateway did not become ready")


@contextmanager
def running_demo(workdir: Path, persons: int, seed: int) -> Iterator[tuple[dict[str, Any], float]]:
    """A demo city under ``workdir`` (built once, then reused) served by a real
    ``gateway serve`` process: yields the credentials and the set-up seconds, stops it after."""
    from gateway.cli.demo import prepare_demo

    port = free_port()
    started = time.perf_counter()
    credentials = prepare_demo(persons=persons, seed=seed, port=port, workdir=workdir)
    setup_s = time.perf_counter() - started
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--workdir", str(workdir),
         "--port", str(port)], env={**os.environ, "GATEWAY_WORKDIR": str(workdir)})
    try:
        wait_ready(credentials["base_url"], proc)
        yield credentials, setup_s
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def plot_side_by_side(results: list[dict[str, Any]], path: Path, *, name_key: str,
                      duckdb_label: str, http_label: str, title: str,
                      log_scale: bool = False) -> None:
    """Bar chart of the medians, DuckDB direct beside the gateway, the ratio on each pair."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    names = ["\n".join(textwrap.wrap(r[name_key], 24)) for r in results]
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], [r["duckdb_ms"] for r in results], 0.4, label=duckdb_label)
    ax.bar([x + 0.2 for x in xs], [r["http_ms"] for r in results], 0.4, label=http_label)
    for x, r in zip(xs, results, strict=True):
        ax.annotate(f"{r['ratio']:.2f}x", (x + 0.2, r["http_ms"]), ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(list(xs), names, fontsize=6)
    ax.set_ylabel("median ms (log)" if log_scale else "median ms")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
