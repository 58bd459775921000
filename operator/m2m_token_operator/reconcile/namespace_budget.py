"""At most N of something in flight per namespace: each namespace's share of token requests.

A look gives back its slot while it waits for a token request (see
`Scheduler.slot_lent`), so the look budget no longer bounds a namespace's token
requests; this does. An endpoint that hangs for one tenant then holds that
tenant's share of the token request slots, and none of the looks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass
class _Share:
    semaphore: asyncio.Semaphore
    holders: int = 0  # holding or waiting: the share is dropped when none is left


class NamespaceBudget:
    """A semaphore per namespace, kept only while someone holds or waits for it."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a namespace budget of {limit} would stop every namespace")
        self.limit = limit
        self._shares: dict[str, _Share] = {}

    @contextlib.asynccontextmanager
    async def held(self, namespace: str) -> AsyncIterator[None]:
        share = self._shares.get(namespace)
        if share is None:
            share = self._shares[namespace] = _Share(asyncio.Semaphore(self.limit))
        share.holders += 1
        try:
            async with share.semaphore:
                yield
        finally:
            share.holders -= 1
            if share.holders == 0 and self._shares.get(namespace) is share:
                del self._shares[namespace]

    def in_use(self, namespace: str) -> int:
        """Holding or waiting (for tests and metrics)."""
        share = self._shares.get(namespace)
        return 0 if share is None else share.holders

    def __len__(self) -> int:
        return len(self._shares)
