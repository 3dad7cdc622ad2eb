"""Settling the futures of coroutines from a writer thread (internal).

A writer thread (the audit sequencer) commits a batch, then hands each waiting coroutine its
outcome. One ``call_soon_threadsafe`` per event loop per batch: a wake-up
per future would cost a syscall each and swamp the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

__all__ = ["settle_futures"]

Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def settle_futures(outcomes: Iterable[Outcome]) -> None:
    """Give each ``(future, result, error)`` its result, or ``error`` when not None, on the
    future's own loop; a future already done (its waiter was cancelled) is skipped."""
    loops: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        loops.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, items in loops.items():
        # A loop that has closed has no one left waiting on it.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_on_loop, items)


def _settle_on_loop(items: list[Outcome]) -> None:
    for future, result, error in items:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
