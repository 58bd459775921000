"""The refresh scheduler pauses exactly when Kopf's peering would pause this replica."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from m2m_token_operator.api.constants import JsonObject
from m2m_token_operator.kube.kube_api import KubeError
from m2m_token_operator.kube.peering import PeeringConfig, PeeringGate, blocking_peers
from m2m_token_operator.reconcile.scheduler import Scheduler

NOW = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)
ME = "operator-0"


def peer(priority: int, *, seen_ago: float = 1.0, lifetime: int = 60) -> dict[str, Any]:
    return {
        "priority": priority,
        "lifetime": lifetime,
        "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat(),
    }


def test_only_live_peers_with_the_same_or_a_higher_priority_block() -> None:
    peers = {
        ME: peer(100),
        "higher": peer(200),
        "same": peer(100),
        "lower": peer(50),
        "dead-higher": peer(300, seen_ago=61),
        "short-lived-higher": peer(300, seen_ago=11, lifetime=10),
    }
    assert blocking_peers(peers, identity=ME, priority=100, now=NOW) == ["higher", "same"]


def test_ourselves_alone_or_unreadable_records_do_not_block() -> None:
    peers: dict[str, Any] = {
        ME: peer(100),
        "garbled": {"priority": "high", "lastseen": "yesterday"},
        "not-a-record": "x",
    }
    assert blocking_peers(peers, identity=ME, priority=100, now=NOW) == []


def test_a_peer_without_lastseen_or_lifetime_counts_as_just_seen_for_60_s() -> None:
    assert blocking_peers({"other": {"priority": 7}}, identity=ME, priority=7, now=NOW) == ["other"]


class FakePeering:
    """The ClusterKopfPeering as the API server would return it; counts the reads."""

    def __init__(self) -> None:
        self.body: JsonObject | None = {"status": {ME: peer(100)}}
        self.reads = 0
        self.error: KubeError | None = None

    async def read(self, name: str) -> JsonObject | None:
        assert name == "m2m-token-operator"
        self.reads += 1
        if self.error is not None:
            raise self.error
        return self.body


def make_gate(
    peering: FakePeering,
    clock: list[datetime],
    *,
    mandatory: bool = True,
    resumed: list[int] | None = None,
    paused: asyncio.Event | None = None,
) -> PeeringGate:
    calls = resumed if resumed is not None else []
    return PeeringGate(
        config=PeeringConfig(
            name="m2m-token-operator", identity=ME, priority=100, mandatory=mandatory
        ),
        read_peering=peering.read,
        clock=lambda: clock[0],
        on_resume=lambda: calls.append(1),
        on_pause=paused.set if paused is not None else None,
    )


async def test_the_gate_closes_when_a_higher_peer_joins_and_reopens_when_it_expires(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = [NOW]
    peering = FakePeering()
    resumed: list[int] = []
    gate = make_gate(peering, clock, resumed=resumed)
    assert gate.active is None  # unknown until read, as Kopf starts paused
    assert await gate.confirm_active() is True
    assert resumed == []  # the first decision is not a resumption

    assert peering.body is not None
    peering.body["status"]["higher"] = peer(200)
    assert await gate.confirm_active() is True  # the reading is less than a second old
    assert peering.reads == 1
    clock[0] = NOW + timedelta(seconds=1)
    assert await gate.confirm_active() is False
    assert peering.reads == 2
    assert "Refreshes paused" in caplog.text
    assert "higher" in caplog.text

    clock[0] = NOW + timedelta(seconds=60)  # the higher peer's keep-alive has expired
    assert await gate.confirm_active() is True
    assert resumed == [1]


async def test_an_unreadable_peering_keeps_the_last_decision() -> None:
    clock = [NOW]
    peering = FakePeering()
    gate = make_gate(peering, clock)
    assert await gate.confirm_active() is True
    peering.error = KubeError(action="read ClusterKopfPeering", status=503, reason="Unavailable")
    clock[0] = NOW + timedelta(seconds=5)
    assert await gate.confirm_active() is True
    fresh = make_gate(peering, clock)
    assert await fresh.confirm_active() is False  # never read: stays paused, as Kopf does


@pytest.mark.parametrize(("mandatory", "active"), [(True, False), (False, True)])
async def test_a_missing_peering_object_pauses_only_a_mandatory_peering(
    mandatory: bool, active: bool
) -> None:
    peering = FakePeering()
    peering.body = None
    gate = make_gate(peering, [NOW], mandatory=mandatory)
    assert await gate.confirm_active() is active


async def test_due_work_waits_while_paused_and_runs_once_resumed() -> None:
    clock = [NOW]
    peering = FakePeering()
    assert peering.body is not None
    peering.body["status"]["higher"] = peer(200)
    paused = asyncio.Event()
    gate = make_gate(peering, clock, paused=paused)
    handled: list[str] = []
    done = asyncio.Event()

    async def handle(target: str) -> None:
        handled.append(target)
        done.set()

    scheduler: Scheduler[str] = Scheduler(clock=lambda: clock[0], handle=handle, gate=gate)
    scheduler.schedule("orders", NOW)
    task = asyncio.create_task(scheduler.run())
    # The positive signal: the scheduler asked the gate about its due work and was told
    # to wait. Only then does "nothing handled" mean something.
    await asyncio.wait_for(paused.wait(), timeout=5)
    assert gate.active is False
    assert peering.reads == 1
    assert handled == []
    assert scheduler.due_at("orders") == NOW  # kept, not dropped
    assert scheduler.last_loop_at is not None

    peering.body["status"].pop("higher")
    clock[0] = NOW + timedelta(seconds=2)
    assert await gate.confirm_active() is True  # what the gate's own poll would find
    await asyncio.wait_for(done.wait(), timeout=5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert handled == ["orders"]


async def test_any_failure_to_read_the_peering_keeps_the_decision() -> None:
    """A transport error (not an API answer) must not kill the scheduler that asked."""
    clock = [NOW]
    peering = FakePeering()
    paused: list[int] = []
    gate = PeeringGate(
        config=PeeringConfig(name="m2m-token-operator", identity=ME, priority=100, mandatory=True),
        read_peering=peering.read,
        clock=lambda: clock[0],
        on_pause=lambda: paused.append(1),
    )
    assert await gate.confirm_active() is True

    async def broken(name: str) -> JsonObject | None:
        raise ConnectionResetError("reset by peer")

    gate._read = broken
    clock[0] = NOW + timedelta(seconds=5)
    assert await gate.confirm_active() is True
    assert paused == []

    gate._read = peering.read
    assert peering.body is not None
    peering.body["status"]["higher"] = peer(200)
    clock[0] = NOW + timedelta(seconds=10)
    assert await gate.confirm_active() is False
    assert paused == [1]  # the reconciler drops its per-TokenRequest metrics here


def test_odd_peer_records_are_read_as_kopf_reads_them_and_never_raise() -> None:
    naive_recent = (NOW - timedelta(seconds=1)).replace(tzinfo=None).isoformat()
    peers = {
        "naive-but-alive": {"priority": 200, "lifetime": 60, "lastseen": naive_recent},
        "huge-lifetime": {"priority": 200, "lifetime": 10**30, "lastseen": NOW.isoformat()},
        "year-9999": {"priority": 200, "lifetime": 60, "lastseen": "9999-12-31T23:59:59+00:00"},
    }
    assert blocking_peers(peers, identity=ME, priority=100, now=NOW) == ["naive-but-alive"]
