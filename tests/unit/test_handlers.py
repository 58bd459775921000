"""The Kopf wiring's own rules: liveness and peering priority."""

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from m2m_token_operator import handlers


def test_peering_priority_is_configurable_else_derived_from_the_host() -> None:
    assert handlers.peering_priority({"M2M_PEERING_PRIORITY": "42"}) == 42
    derived = handlers.peering_priority({})
    assert 1 <= derived <= 1_000_000
    assert handlers.peering_priority({}) == derived  # stable for one pod


async def test_liveness_fails_when_the_scheduler_is_dead_or_stalled() -> None:
    scheduler = SimpleNamespace(last_loop_at=datetime.now(UTC))
    reconciler = SimpleNamespace(scheduler=scheduler)
    running = asyncio.create_task(asyncio.sleep(60))
    memo = {"reconciler": reconciler, "scheduler_task": running}
    assert handlers.scheduler_alive(memo=memo)  # type: ignore[arg-type]

    scheduler.last_loop_at = datetime.now(UTC) - timedelta(minutes=5)
    with pytest.raises(RuntimeError, match="stalled"):
        handlers.scheduler_alive(memo=memo)  # type: ignore[arg-type]

    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    with pytest.raises(RuntimeError, match="not running"):
        handlers.scheduler_alive(memo=memo)  # type: ignore[arg-type]
