"""A shard's replicas elect one active replica through a Lease (`peering.LeaseGate`)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

from m2m_token_operator.api.constants import JsonObject
from m2m_token_operator.kube.kube_api import Conflict
from m2m_token_operator.kube.peering import LeaseConfig, LeaseGate, lease_name

NOW = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)
NAMESPACE = "m2m-token-operator"


class FakeLeases:
    """Leases as the API server keeps them: a replace with a stale resourceVersion is a 409."""

    def __init__(self) -> None:
        self.leases: dict[str, JsonObject] = {}
        self.version = 0

    async def read_lease(self, namespace: str, name: str) -> JsonObject | None:
        lease = self.leases.get(name)
        return copy.deepcopy(lease) if lease is not None else None

    async def create_lease(self, namespace: str, body: JsonObject) -> JsonObject:
        name = body["metadata"]["name"]
        if name in self.leases:
            raise Conflict(action=f"create Lease {name}", status=409, reason="AlreadyExists")
        return self._store(name, body)

    async def replace_lease(self, namespace: str, body: JsonObject) -> JsonObject:
        name = body["metadata"]["name"]
        current = self.leases[name]
        if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise Conflict(action=f"replace Lease {name}", status=409, reason="Conflict")
        return self._store(name, body)

    def _store(self, name: str, body: JsonObject) -> JsonObject:
        self.version += 1
        stored = copy.deepcopy(body)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.leases[name] = stored
        return copy.deepcopy(stored)

    def holder(self, shard: str) -> str | None:
        lease = self.leases.get(lease_name(shard))
        return None if lease is None else lease["spec"].get("holderIdentity")


def gate(leases: FakeLeases, identity: str, clock: list[datetime], events: list[str]) -> LeaseGate:
    return LeaseGate(
        config=LeaseConfig(namespace=NAMESPACE, name=lease_name("a"), identity=identity),
        kube=leases,
        clock=lambda: clock[0],
        on_resume=lambda: events.append(f"{identity} resumed"),
        on_pause=lambda: events.append(f"{identity} paused"),
    )


async def test_one_replica_holds_the_lease_and_the_other_takes_over_when_it_stops_renewing() -> (
    None
):
    leases = FakeLeases()
    clock = [NOW]
    events: list[str] = []
    first, second = gate(leases, "pod-1", clock, events), gate(leases, "pod-2", clock, events)

    assert await first.round() is True
    assert await second.round() is False
    assert leases.holder("a") == "pod-1"
    assert events == ["pod-2 paused"]

    # pod-1 renews every couple of seconds: pod-2 never takes over.
    for _ in range(10):
        clock[0] += timedelta(seconds=2)
        assert await first.round() is True
        assert await second.round() is False
    assert leases.holder("a") == "pod-1"

    # pod-1 dies (no more renewals): after the lease duration, as pod-2 saw it, pod-2 takes it.
    clock[0] += timedelta(seconds=14)
    assert await second.round() is False  # 14 s < 15 s since its last renewal was seen
    clock[0] += timedelta(seconds=1)
    assert await second.round() is True
    assert leases.holder("a") == "pod-2"
    assert events == ["pod-2 paused", "pod-2 resumed"]
    assert leases.leases[lease_name("a")]["spec"]["leaseTransitions"] == 1


async def test_a_takeover_refused_with_409_leaves_the_gate_closed() -> None:
    leases = FakeLeases()
    clock = [NOW]
    events: list[str] = []
    first, second = gate(leases, "pod-1", clock, events), gate(leases, "pod-2", clock, events)
    assert await first.round() is True
    assert await second.round() is False
    clock[0] += timedelta(seconds=16)  # pod-1 stopped renewing
    stale = await leases.read_lease(NAMESPACE, lease_name("a"))
    # pod-1 renews just between pod-2's read and its replace: pod-2's replace gets a 409.
    original_read = leases.read_lease

    async def read_then_renew(namespace: str, name: str) -> JsonObject | None:
        leases.read_lease = original_read  # type: ignore[method-assign]
        await first.round()
        return stale

    leases.read_lease = read_then_renew  # type: ignore[method-assign]
    assert await second.round() is False
    assert leases.holder("a") == "pod-1"
    assert events == ["pod-2 paused"]


async def test_a_holder_that_cannot_renew_closes_its_gate_before_another_may_take_over() -> None:
    leases = FakeLeases()
    clock = [NOW]
    events: list[str] = []
    first = gate(leases, "pod-1", clock, events)
    assert await first.round() is True

    # The API server is unreachable for pod-1: it stops acting at the renew deadline (10 s),
    # before anyone may take the lease over (15 s).
    async def unreachable(namespace: str, name: str) -> JsonObject | None:
        raise OSError("connection refused")

    leases_read = leases.read_lease
    leases.read_lease = unreachable  # type: ignore[method-assign]
    clock[0] += timedelta(seconds=9)
    assert await first.round() is True
    clock[0] += timedelta(seconds=1)
    assert await first.round() is False
    assert events == ["pod-1 paused"]

    # Reachable again, and nobody took it meanwhile: it renews and resumes.
    leases.read_lease = leases_read  # type: ignore[method-assign]
    assert await first.round() is True
    assert events == ["pod-1 paused", "pod-1 resumed"]
