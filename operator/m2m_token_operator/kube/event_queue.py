"""Events wait in one queue, in the order of their looks, and go out in the background.

A look does not wait for its events (the status is what the TokenRequest's
owners wait for). Each look's events are one entry, posted one after the other;
entries are taken lowest priority first (see `admission.event_priority`: the
look's start plus a deferral), by a few workers that exist only while events
are pending. A waiting event costs one small tuple, not a task: a burst of
10,000 TokenRequests leaves 10,000 of them queued for a while.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# post(namespace, body, priority): one event; failures are the poster's to log.
Post = Callable[[str, Any, float], Awaitable[None]]


class EventQueue:
    def __init__(self, post: Post, *, workers: int) -> None:
        if workers < 1:
            raise ValueError("an event queue needs at least one worker")
        self._post = post
        self._most_workers = workers
        self._pending: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._arrival = itertools.count()
        self._workers: set[asyncio.Task[None]] = set()
        self._closed = False

    def put(self, namespace: str, bodies: Sequence[Any], *, priority: float) -> None:
        """Queue one look's events (posted in this order); returns at once."""
        if not bodies or self._closed:
            return
        heapq.heappush(self._pending, (priority, next(self._arrival), namespace, tuple(bodies)))
        if len(self._workers) < self._most_workers:
            worker = asyncio.get_running_loop().create_task(self._work(), name="m2m-events")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    def __len__(self) -> int:
        """Looks whose events are queued, not yet taken by a worker."""
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """Whether any event is still queued or being posted."""
        return bool(self._pending or self._workers)

    async def join(self) -> None:
        """Until every queued event has been posted, or failed, or was dropped."""
        while self._workers:
            await asyncio.wait(set(self._workers))

    def drop_pending(self) -> None:
        """Drop what is not posted yet and stop the posting; new events queue as before."""
        self._pending.clear()
        for worker in self._workers:
            worker.cancel()

    def close(self) -> None:
        """Drop what is not posted yet (the operator stops), as client-go drops them."""
        self._closed = True
        self._pending.clear()
        for worker in self._workers:
            worker.cancel()

    async def _work(self) -> None:
        while self._pending:
            priority, _, namespace, bodies = heapq.heappop(self._pending)
            for body in bodies:
                try:
                    await self._post(namespace, body, priority)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A courtesy: one that fails must not stop the others.
                    logger.exception("Posting an event in %s failed", namespace)
