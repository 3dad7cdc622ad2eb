"""The hand-off between appending callers and the one sequencer thread (internal).

A caller enqueues a :class:`Pending` and waits for it: a thread blocks on a held lock, a
coroutine awaits an :class:`asyncio.Future`. The sequencer takes the queue in batches, makes a
batch durable in one transaction and then settles every caller of that batch: thread callers by
releasing their lock, coroutine callers with **one** ``call_soon_threadsafe`` per event loop per
batch (a wake-up per entry would cost a syscall each and swamp the loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence

from gateway._futures import settle_futures

__all__ = ["BatchQueue", "Pending", "QueueClosedError", "QueueFullError", "settle"]


class QueueFullError(Exception):
    """The bounded queue is at capacity; the caller must not wait unboundedly."""


class QueueClosedError(Exception):
    """The log is closing or closed."""


class Pending:
    """One entry on its way to the store, and the caller's handle to wait for the outcome.

    ``text`` is the leaf's canonical JSON, ``leaf`` its RFC 6962 leaf hash; ``personal`` is the
    separately stored, erasable personal part (``(salt, json)``) or ``None``.
    """

    __slots__ = ("_done", "error", "future", "index", "leaf", "personal", "text")

    def __init__(
        self,
        text: str,
        leaf: bytes,
        personal: tuple[bytes, str] | None = None,
        future: asyncio.Future[int] | None = None,
    ) -> None:
        self.text = text
        self.leaf = leaf
        self.personal = personal
        self.index = -1
        self.error: BaseException | None = None
        self.future = future
        # A held lock is the cheapest one-shot signal; the sequencer releases it once.
        self._done = threading.Lock()
        if future is None:
            self._done.acquire()

    def wait(self) -> None:
        """Block until settled (thread callers; coroutine callers await ``future``)."""
        self._done.acquire()


def settle(batch: Sequence[Pending], first_index: int, error: BaseException | None) -> None:
    """Give every caller of ``batch`` its index (``first_index`` onwards) or ``error``."""
    awaited: list[tuple[asyncio.Future[int], int, BaseException | None]] = []
    for offset, pending in enumerate(batch):
        if error is None:
            pending.index = first_index + offset
        else:
            pending.error = error
        future = pending.future
        if future is None:
            pending._done.release()
        else:
            # The exception is built by the awaiting side (log.py).
            awaited.append((future, pending.index, pending.error))
    settle_futures(awaited)


class BatchQueue:
    """A bounded FIFO that hands out batches of up to ``max_batch`` items."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("queue capacity must be at least 1")
        self._capacity = capacity
        self._items: deque[Pending] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._taker_waiting = False
        self._wake_at = 1  # queue length at which a waiting taker must be woken

    def put(self, item: Pending) -> None:
        with self._cond:
            if self._closed:
                raise QueueClosedError
            if len(self._items) >= self._capacity:
                raise QueueFullError
            self._items.append(item)
            # Notify only when it changes the taker's mind: fewer wake-ups under load.
            if self._taker_waiting and len(self._items) >= self._wake_at:
                self._cond.notify()

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, max_batch: int, max_delay: float, expect: int = 1) -> list[Pending] | None:
        """The next batch, oldest first; ``None`` once closed and drained.

        Once one item is there, linger up to ``max_delay`` seconds while fewer than ``expect``
        items are queued. The caller passes the size of its previous batch: callers that were
        just woken are about to append again, and one fsync for all of them beats one each.
        At low load the previous batch was small, so nothing waits.
        """
        with self._cond:
            self._wake_at = 1
            while not self._items and not self._closed:
                self._wait(None)
            if not self._items:
                return None
            want = min(max_batch, expect)
            if max_delay > 0 and len(self._items) < want and not self._closed:
                deadline = time.monotonic() + max_delay
                self._wake_at = want
                while len(self._items) < want and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wait(remaining)
            items = self._items
            if len(items) <= max_batch:
                self._items = deque()
                return list(items)
            return [items.popleft() for _ in range(max_batch)]

    def drain(self) -> list[Pending]:
        """Everything still queued (used to fail the callers if the sequencer dies)."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def _wait(self, timeout: float | None) -> None:
        self._taker_waiting = True
        try:
            self._cond.wait(timeout)
        finally:
            self._taker_waiting = False
