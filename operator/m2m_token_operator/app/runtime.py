"""What the operator's startup creates, held in one object so that it all gets closed.

Kopf retries a startup handler that raises, with the same `memo`. Without a
record of what the failed attempt had created, each retry leaked a scheduler
task, a peering poller and thread pools. `Runtime` registers each resource
as it is created; `close` ends the tasks first (they use the pools), then
closes the resources in reverse order. The startup handler closes the
previous attempt's runtime before it builds a new one, and closes a
half-built one when it fails; the cleanup handler closes the last one.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Closes a resource: at once, or by returning what to await (a client on the event loop).
Closer = Callable[[], Awaitable[None] | None]


class Runtime:
    """The tasks and closable resources of one operator start, closed exactly once."""

    def __init__(self) -> None:
        self._closers: list[tuple[str, Closer]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def closing(self, resource: _T, close: Closer, *, name: str) -> _T:
        """Remember how to close `resource`; returns it."""
        self._closers.append((name, close))
        return resource

    def start(self, coroutine: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=name)
        self.tasks.append(task)
        return task

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for name, close in reversed(self._closers):
            try:
                closed = close()
                if inspect.isawaitable(closed):
                    await closed
            except Exception as error:  # closing the rest matters more than this one
                logger.warning("Closing %s failed: %s", name, type(error).__name__)
