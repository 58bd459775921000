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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from m2m_token_operator.constants import JsonObject
from m2m_token_operator.kube import KubeError, NotFound

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


class PeeringGate:
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
        self._config = config
        self._read = read_peering
        self._clock = clock
        self._on_resume = on_resume
        self._on_pause = on_pause
        self._freshness = freshness
        self._poll_interval = poll_interval
        self._checked_at: datetime | None = None
        self._opened = asyncio.Event()
        self._lock = asyncio.Lock()
        # None until the peering has been read once: Kopf also starts paused.
        self.active: bool | None = None
        self.started_at = clock()

    async def confirm_active(self) -> bool:
        """Whether this replica may act now, from a reading at most `freshness` old."""
        async with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= self._freshness:
                await self._evaluate(now)
        return self.active is True

    async def wait_active(self) -> None:
        await self._opened.wait()

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
