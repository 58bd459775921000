"""Follow Kopf's peering decision, so that a paused replica also stops refreshing.

Kopf pauses only its own watch-streams (and its daemons and timers) when a peer
with a higher or the same priority is alive. The refresh scheduler is not one
of Kopf's tasks, and Kopf exposes no public "paused" flag, so without this gate
a replica that was active and then paused (a higher-priority pod joined) would
go on calling the token endpoint and writing Secrets beside the active one.

The gate reads the same peering object Kopf reads and applies Kopf's own rule:
paused while another live peer has a priority greater than or equal to ours. It
is read afresh (at most `freshness`, one second, old) right before scheduled work
runs, so the gate closes within about a second of Kopf's own pause, and is polled
between times so that a takeover is noticed within `poll_interval`.

A shard (`--namespace` mode, Kopf `--standalone`) has no single peering object
to follow: its replicas elect their active one through a Lease instead
(`LeaseGate`, below), with the same interface for the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from m2m_token_operator.api.constants import JsonObject
from m2m_token_operator.kube.kube_api import KubeError, NotFound

logger = logging.getLogger(__name__)

# Kopf assumes this lifetime for a peer that does not state its own.
DEFAULT_PEER_LIFETIME = timedelta(seconds=60)


@dataclass(frozen=True)
class PeeringConfig:
    """This replica as Kopf announces it in the ClusterKopfPeering `name`."""

    name: str
    identity: str
    priority: int
    # Kopf with --peering=NAME waits for that object: absent, it stays paused.
    mandatory: bool


def _peer_deadline(info: Mapping[str, Any], now: datetime) -> datetime:
    lastseen_text = info.get("lastseen")
    lastseen = datetime.fromisoformat(str(lastseen_text)) if lastseen_text else now
    if lastseen.tzinfo is None:
        lastseen = lastseen.replace(tzinfo=UTC)  # as Kopf's iso8601 parser reads it
    lifetime = info.get("lifetime")
    return lastseen + (timedelta(seconds=int(lifetime)) if lifetime else DEFAULT_PEER_LIFETIME)


def blocking_peers(
    peers: Mapping[str, Any], *, identity: str, priority: int, now: datetime
) -> list[str]:
    """The live peers, other than ourselves, whose priority is at least ours (Kopf's rule)."""
    blocking: list[str] = []
    for peer_id, info in peers.items():
        if peer_id == identity or not isinstance(info, Mapping):
            continue
        try:
            peer_priority = int(info.get("priority", 0))
            alive = _peer_deadline(info, now) > now
        except (TypeError, ValueError, OverflowError):
            continue  # a record Kopf itself could not read either
        if alive and peer_priority >= priority:
            blocking.append(peer_id)
    return sorted(blocking)


class _ActivitySwitch:
    """Whether this replica may work, and the pause and resume it tells the reconciler.

    None until first decided: Kopf also starts paused. Shared by the two ways a replica
    learns it is the active one (Kopf's peering, a shard's Lease).
    """

    def __init__(
        self,
        *,
        on_resume: Callable[[], None] | None,
        on_pause: Callable[[], None] | None,
    ) -> None:
        self._on_resume = on_resume
        self._on_pause = on_pause
        self._opened = asyncio.Event()
        self.active: bool | None = None

    async def wait_active(self) -> None:
        await self._opened.wait()

    def _decide(self, active: bool, why: str) -> None:
        previous = self.active
        if previous is active:
            return
        self.active = active
        if active:
            self._opened.set()
            logger.info("Refreshes active: %s", why)
            if previous is False and self._on_resume is not None:
                self._on_resume()
        else:
            self._opened.clear()
            logger.info("Refreshes paused: %s", why)
            if self._on_pause is not None:
                self._on_pause()


class PeeringGate(_ActivitySwitch):
    """Open while this replica is the one Kopf lets work; closed (and unknown) otherwise."""

    def __init__(
        self,
        *,
        config: PeeringConfig,
        read_peering: Callable[[str], Awaitable[JsonObject | None]],
        clock: Callable[[], datetime],
        on_resume: Callable[[], None] | None = None,
        on_pause: Callable[[], None] | None = None,
        freshness: timedelta = timedelta(seconds=1),
        poll_interval: float = 5.0,
    ) -> None:
        super().__init__(on_resume=on_resume, on_pause=on_pause)
        self._config = config
        self._read = read_peering
        self._clock = clock
        self._freshness = freshness
        self._poll_interval = poll_interval
        self._checked_at: datetime | None = None
        self._lock = asyncio.Lock()
        self.started_at = clock()

    async def confirm_active(self) -> bool:
        """Whether this replica may act now, from a reading at most `freshness` old."""
        async with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self._freshness:
                await self._evaluate(now)
        return self.active is True

    async def run(self) -> None:
        """Keep the reading current between scheduled work, so a takeover is noticed."""
        while True:
            await self.confirm_active()
            await asyncio.sleep(self._poll_interval)

    async def _evaluate(self, now: datetime) -> None:
        try:
            peering = await self._read(self._config.name)
        except Exception as error:  # whatever the failure, the gate must live on
            # Keep the last decision: an unreadable peering proves nothing about the peers.
            logger.warning(
                "Peering %s unreadable, decision kept: %s",
                self._config.name,
                error if isinstance(error, KubeError) else type(error).__name__,
            )
            return
        self._checked_at = now
        if peering is None:
            self._decide(not self._config.mandatory, "the peering object does not exist")
            return
        blockers = blocking_peers(
            peering.get("status") or {},
            identity=self._config.identity,
            priority=self._config.priority,
            now=now,
        )
        if blockers:
            self._decide(False, f"peers with the same or a higher priority: {blockers}")
        else:
            self._decide(True, "no live peer with the same or a higher priority")


class PeeringSettings(Protocol):
    """What `ensure_cluster_peering` reads of Kopf's `settings.peering`."""

    name: str
    mandatory: bool
    clusterwide: bool
    standalone: bool


class PeeringObjects(Protocol):
    async def read_cluster_peering(self, name: str) -> JsonObject | None: ...

    async def create_cluster_peering(self, name: str) -> bool: ...


async def ensure_cluster_peering(
    peering: PeeringSettings,
    kube: PeeringObjects,
    *,
    attempts: int = 30,
    retry_interval: float = 2.0,
) -> None:
    """Create the ClusterKopfPeering that `--peering=NAME` waits for, when it is missing.

    Kopf with a named peering stays paused until that object exists, and the
    object cannot be shipped beside its CRD: `kubectl apply -k` maps every
    object before the CRD it has just created is served, so a fresh cluster
    needed a second pass. Created here, at start (before Kopf's watches begin),
    one pass installs everything. Read first: where the object exists, `get`
    suffices, and `create` (which RBAC cannot limit to one name) is never used.
    The CRD may still be coming up when the first replica starts (same apply),
    so a 404 is retried for a while before the start fails (and Kopf retries it).
    """
    if peering.standalone or not peering.clusterwide or not peering.mandatory:
        return
    for attempt in range(1, attempts + 1):
        try:
            if await kube.read_cluster_peering(peering.name) is not None:
                return
            created = await kube.create_cluster_peering(peering.name)
        except NotFound:
            if attempt == attempts:
                raise
            logger.info(
                "ClusterKopfPeering is not served yet (CRD clusterkopfpeerings.kopf.dev);"
                " retrying in %gs",
                retry_interval,
            )
            await asyncio.sleep(retry_interval)
            continue
        if created:
            logger.info("Created the ClusterKopfPeering %s", peering.name)
        return


# A shard's replicas elect their active one through a Lease, as client-go's leader
# election does: held for LEASE_DURATION after the last renewal, renewed every
# LEASE_RENEW_EVERY, and given up by the holder itself when it could not renew for
# LEASE_RENEW_DEADLINE, well before another replica may take it over.
LEASE_DURATION = timedelta(seconds=15)
LEASE_RENEW_EVERY = 2.0
LEASE_RENEW_DEADLINE = timedelta(seconds=10)


def lease_name(shard: str) -> str:
    """The Lease of one shard, in the operator's namespace."""
    return f"m2m-token-operator-shard-{shard}"


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseConfig:
    """One shard's Lease and this replica's identity in it."""

    namespace: str
    name: str
    identity: str
    duration: timedelta = LEASE_DURATION
    renew_every: float = LEASE_RENEW_EVERY
    renew_deadline: timedelta = LEASE_RENEW_DEADLINE


class LeaseApi(Protocol):
    async def read_lease(self, namespace: str, name: str) -> JsonObject | None: ...

    async def create_lease(self, namespace: str, body: JsonObject) -> JsonObject: ...

    async def replace_lease(self, namespace: str, body: JsonObject) -> JsonObject: ...


class LeaseGate(_ActivitySwitch):
    """Open while this replica holds its shard's Lease and renewed it recently enough.

    Why a Lease and not Kopf's peering: in `--namespace` mode Kopf peers through a
    KopfPeering object in every served namespace (and pauses per namespace), so there
    is no single object saying which replica of a shard is active. A Lease in the
    operator's own namespace is one object per shard, needs rights in that namespace
    only, and is what Kubernetes' own controllers use. Kopf runs `--standalone`
    there: its handlers only learn objects and schedule them, and every look waits
    on this gate (see `scheduler.Scheduler`).

    The expiry of another holder's lease is measured on this replica's own clock,
    from when this replica last saw its record change (as client-go does), so a
    clock skew between nodes cannot shorten it.
    """

    def __init__(
        self,
        *,
        config: LeaseConfig,
        kube: LeaseApi,
        clock: Callable[[], datetime],
        on_resume: Callable[[], None] | None = None,
        on_pause: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(on_resume=on_resume, on_pause=on_pause)
        self._config = config
        self._kube = kube
        self._clock = clock
        self._lock = asyncio.Lock()
        self._renewed_at: datetime | None = None  # our last successful write of the Lease
        self._observed: tuple[Any, ...] | None = None  # another holder's record, as last seen
        self._observed_at: datetime | None = None
        self.started_at = clock()

    async def confirm_active(self) -> bool:
        """Whether this replica may act now: it holds the Lease, renewed in time."""
        renewed_at = self._renewed_at
        if self.active and (
            renewed_at is None or self._clock() - renewed_at >= self._config.renew_deadline
        ):
            self._renewed_at = None
            self._decide(False, "the Lease was not renewed in time")
        return self.active is True

    async def run(self) -> None:
        while True:
            await self.round()
            await asyncio.sleep(self._config.renew_every)

    async def round(self) -> bool:
        """One attempt to acquire or renew the Lease; whether this replica may act."""
        async with self._lock:
            await self._acquire_or_renew()
        return await self.confirm_active()

    def _body(self, lease: JsonObject | None, now: datetime, *, taking_over: bool) -> JsonObject:
        config = self._config
        metadata: JsonObject = {"name": config.name, "namespace": config.namespace}
        spec: JsonObject = {}
        if lease is not None:
            metadata["resourceVersion"] = (lease.get("metadata") or {}).get("resourceVersion")
            spec = dict(lease.get("spec") or {})
        spec["holderIdentity"] = config.identity
        spec["leaseDurationSeconds"] = int(config.duration.total_seconds())
        spec["renewTime"] = _micro_time(now)
        if taking_over or lease is None:
            spec["acquireTime"] = _micro_time(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                1 if lease is not None else 0
            )
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    async def _acquire_or_renew(self) -> None:
        config = self._config
        now = self._clock()
        try:
            lease = await self._kube.read_lease(config.namespace, config.name)
            if lease is None:
                await self._kube.create_lease(
                    config.namespace, self._body(None, now, taking_over=True)
                )
                self._held(now, f"created the Lease {config.name}")
                return
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            if holder == config.identity:
                await self._kube.replace_lease(
                    config.namespace, self._body(lease, now, taking_over=False)
                )
                self._held(now, f"holds the Lease {config.name}")
                return
            record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
            if record != self._observed or self._observed_at is None:
                self._observed, self._observed_at = record, now
            duration = timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))
            if holder and now - self._observed_at < max(duration, config.duration):
                self._renewed_at = None
                self._decide(False, f"the Lease {config.name} is held by {holder}")
                return
            await self._kube.replace_lease(
                config.namespace, self._body(lease, now, taking_over=True)
            )
            self._held(now, f"took the Lease {config.name} over from {holder or 'nobody'}")
        except KubeError as error:
            # Another replica got there first (409), or the API is unwell: the next round
            # reads again; meanwhile `confirm_active` closes the gate at the renew deadline.
            logger.warning("Lease %s not acquired or renewed: %s", config.name, error)
        except Exception as error:  # whatever the failure, the gate must live on
            logger.warning(
                "Lease %s not acquired or renewed: %s", config.name, type(error).__name__
            )

    def _held(self, now: datetime, why: str) -> None:
        self._renewed_at = now
        self._decide(True, why)
