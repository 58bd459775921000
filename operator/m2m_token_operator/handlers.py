"""Kopf wiring, and nothing else: each handler hands the object to the reconciler.

No handler here raises for a business failure. Failures are the reconciler's to
report in status and to retry on the token's own schedule; a Kopf retry on top
would double the calls to the token endpoint. No timer, no daemon and no
mandatory deletion handler is registered, so Kopf adds no finalizer and a
TokenRequest can always be deleted, even while the operator is down.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import logging
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from m2m_token_operator import metrics, redaction, watches
from m2m_token_operator.cache import TokenCache
from m2m_token_operator.client import TokenClient
from m2m_token_operator.kube import GROUP, PLURAL, VERSION, KubeApi, load_api_client
from m2m_token_operator.peering import PeeringConfig, PeeringGate
from m2m_token_operator.reconciler import TokenRequestReconciler
from m2m_token_operator.settings import Settings

logger = logging.getLogger(__name__)

# Kopf keeps its own handling state on the TokenRequest; under our domain, not Kopf's.
STATE_PREFIX = "operator.m2m.dev"
# The scheduler turns at least every 30 s; three missed turns mean it is stuck.
SCHEDULER_STALL = timedelta(seconds=90)
# Kopf itself needs a few seconds to join the peering; five minutes unread is a fault.
PEERING_UNREAD = timedelta(minutes=5)


def utc_now() -> datetime:
    return datetime.now(UTC)


def peering_priority(config: Settings) -> int:
    """M2M_PEERING_PRIORITY when set, else distinct per replica: derived from the host name.

    The variable is validated by `Settings.from_env` before Kopf starts, so a bad value
    stops the process with the settings error rather than failing a startup handler.
    """
    if config.peering_priority is not None:
        return config.peering_priority
    digest = hashlib.sha256(socket.gethostname().encode()).digest()
    return 1 + int.from_bytes(digest[:4], "big") % 1_000_000


def peering_gate(
    settings: kopf.OperatorSettings,
    *,
    kube: KubeApi,
    reconciler: TokenRequestReconciler,
    environ: dict[str, str] | os._Environ[str],
) -> PeeringGate | None:
    """The gate that pauses our scheduler whenever Kopf pauses, or None when Kopf never does."""
    if settings.peering.standalone:
        return None
    identity = environ.get("POD_ID")  # Kopf's own identity in the peering, when set
    if not settings.peering.clusterwide or not identity:
        logger.warning(
            "Refreshes do not follow Kopf's peering: it needs --all-namespaces and POD_ID"
            " (m2m-token-operator sets POD_ID itself); run one replica or --standalone"
        )
        return None
    config = PeeringConfig(
        name=settings.peering.name,
        identity=identity,
        priority=settings.peering.priority,
        mandatory=settings.peering.mandatory,
    )
    return PeeringGate(
        config=config,
        read_peering=kube.read_cluster_peering,
        clock=utc_now,
        on_resume=reconciler.resume_after_pause,
        on_pause=reconciler.paused,
    )


def _namespace_of(ref: tuple[str, str]) -> str:
    return ref[0]


def _secret_changed(
    reconciler: TokenRequestReconciler, secret: Mapping[str, Any], deleted: bool
) -> None:
    reconciler.secret_changed(secret, deleted=deleted)


def _reconciler(memo: kopf.Memo) -> TokenRequestReconciler:
    reconciler: TokenRequestReconciler = memo["reconciler"]
    return reconciler


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    redaction.install()
    config = Settings.from_env()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STATE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=STATE_PREFIX, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # our events are posted by the reconciler, one per change
    settings.peering.priority = peering_priority(config)

    kube = KubeApi(load_api_client())
    token_client = TokenClient(
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        deadline=config.request_deadline,
    )
    cache = TokenCache(
        fetch=metrics.instrument_fetch(token_client.fetch),
        refresh_policy=config.refresh_policy(),
        retry_policy=config.retry_policy(),
        clock=utc_now,
        max_workers=config.fetch_workers,
    )
    reconciler = TokenRequestReconciler(settings=config, kube=kube, cache=cache, clock=utc_now)
    # No namespace may hold more than its share of the looks in flight (and the fetches).
    reconciler.scheduler.fair_by(_namespace_of, limit=config.namespace_concurrency)
    memo["kube"] = kube
    memo["reconciler"] = reconciler
    gate = peering_gate(settings, kube=kube, reconciler=reconciler, environ=os.environ)
    if gate is not None:
        reconciler.scheduler.gate = gate
        memo["peering_gate"] = gate
        memo["peering_task"] = asyncio.create_task(gate.run(), name="m2m-peering-gate")
    memo["scheduler_task"] = asyncio.create_task(reconciler.scheduler.run(), name="m2m-scheduler")
    # Owned (and opted-in credentials) Secrets, selected by the API server; a client of
    # their own, so that watches never wait for the pool of reads and writes.
    memo["secret_feed"], memo["watch_tasks"] = watches.start(
        load_api_client(), functools.partial(_secret_changed, reconciler), environ=os.environ
    )
    metrics.serve(config.metrics_port)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    tasks = [memo.get("scheduler_task"), memo.get("peering_task"), *memo.get("watch_tasks", [])]
    running: list[asyncio.Task[None]] = [task for task in tasks if task is not None]
    feed: watches.SecretFeed | None = memo.get("secret_feed")
    if feed is not None and feed.debouncer is not None:
        feed.debouncer.cancel()
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    kube: KubeApi | None = memo.get("kube")
    if kube is not None:
        kube.close()


@kopf.on.probe(id="scheduler")
def scheduler_alive(memo: kopf.Memo, **_: Any) -> str:
    """Liveness: fails when refreshes can no longer happen, not merely when the process lives."""
    task: asyncio.Task[None] | None = memo.get("scheduler_task")
    if task is None or task.done():
        raise RuntimeError("the refresh scheduler is not running")
    last = _reconciler(memo).scheduler.last_loop_at
    if last is None or utc_now() - last > SCHEDULER_STALL:
        raise RuntimeError("the refresh scheduler is stalled")
    gate: PeeringGate | None = memo.get("peering_gate")
    if gate is not None and gate.active is None and utc_now() - gate.started_at > PEERING_UNREAD:
        # Never read (e.g. RBAC without `get` on it): refreshes would wait for ever.
        raise RuntimeError("the peering object has never been readable; refreshes wait on it")
    return last.isoformat()


def _plain(body: kopf.Body) -> dict[str, Any]:
    """A detached copy: the reconciler keeps it across events, Kopf reuses its views."""
    return {
        "metadata": {
            "namespace": body.metadata.namespace,
            "name": body.metadata.name,
            "uid": body.metadata.uid,
            "generation": body.metadata.get("generation"),
        },
        "spec": copy.deepcopy(dict(body.spec)),
        "status": copy.deepcopy(dict(body.status)),
    }


@kopf.on.resume(GROUP, VERSION, PLURAL, id="resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="create")
@kopf.on.update(GROUP, VERSION, PLURAL, id="update", field="spec")
async def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _reconciler(memo).reconcile(_plain(body))


# The event handlers are coroutines on purpose: Kopf runs plain functions in a thread pool,
# and the reconciler and its scheduler are event-loop-only (from another thread, a wake-up
# of the scheduler can be lost, and their dicts and heap would be shared without a lock).
@kopf.on.event(GROUP, VERSION, PLURAL, id="deleted")
async def token_request_event(
    type: str | None,  # noqa: A002 (Kopf passes the event type by this name)
    body: kopf.Body,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    if type == "DELETED":
        metadata = body.metadata
        _reconciler(memo).forget(metadata.namespace or "", metadata.name or "", metadata.uid)
