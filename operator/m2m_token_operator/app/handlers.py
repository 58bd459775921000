"""Kopf wiring, and nothing else: startup, cleanup and the liveness probe.

Kopf runs the process (its CLI, signals, logging, the liveness endpoint and the
peering), but no TokenRequest handler: the operator's own watch
(kube/token_request_watch.py) hands each TokenRequest to the reconciler, without
Kopf's per-object machinery. So Kopf stores no state on TokenRequests and adds
no finalizer: a TokenRequest can always be deleted, even while the operator is
down. Failures are the reconciler's to report in status and to retry on the
token's own schedule.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

import kopf
import kubernetes

from m2m_token_operator.app import garbage_collection
from m2m_token_operator.app.runtime import Runtime
from m2m_token_operator.config.settings import Settings
from m2m_token_operator.kube import secret_watches, token_request_watch
from m2m_token_operator.kube.kube_api import KubeApi, KubeError, load_api_client
from m2m_token_operator.kube.namespaces import OperatorIdentityNamespaces
from m2m_token_operator.kube.peering import (
    LeaseConfig,
    LeaseGate,
    PeeringConfig,
    PeeringGate,
    ensure_cluster_peering,
    lease_name,
)
from m2m_token_operator.kube.reflector import LabelSelectedWatch
from m2m_token_operator.reconcile import metrics, seal
from m2m_token_operator.reconcile.reconciler import TokenRequestReconciler
from m2m_token_operator.tokens import redaction
from m2m_token_operator.tokens.cache import FetchWithheld, TokenCache
from m2m_token_operator.tokens.client import TokenClient
from m2m_token_operator.tokens.credentials import ClientCredentials
from m2m_token_operator.tokens.model import AccessToken, utc_now

logger = logging.getLogger(__name__)

Fetch = Callable[[ClientCredentials, str], Awaitable[AccessToken]]
ActivityGate = PeeringGate | LeaseGate
# The shard's name (the pod label m2m.dev/shard): its replicas share one Lease.
SHARD_SETTING = "M2M_SHARD"
_SHARD_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,38}[a-z0-9])?")

# Where Kopf would keep handling state on an object: under our domain, not Kopf's.
STATE_PREFIX = "operator.m2m.dev"
# The scheduler turns at least every 30 s; three missed turns mean it is stuck.
SCHEDULER_STALL = timedelta(seconds=90)
# Kopf itself needs a few seconds to join the peering; five minutes unread is a fault.
PEERING_UNREAD = timedelta(minutes=5)
# (connect, read) seconds for the peering read: well inside SCHEDULER_STALL.
PEERING_READ_TIMEOUT = (5.0, 10.0)


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
    namespace: str = "",
) -> ActivityGate | None:
    """The gate that pauses our scheduler whenever Kopf pauses, or None when Kopf never does.

    With M2M_SHARD (a shard's replicas, `--namespace` mode): the shard's own Lease in
    the operator's `namespace` decides instead; Kopf runs `--standalone` there.
    """
    shard = environ.get(SHARD_SETTING)
    if shard is not None:
        return _shard_gate(
            shard, kube=kube, reconciler=reconciler, environ=environ, namespace=namespace
        )
    if settings.peering.standalone:
        return None
    identity = environ.get("POD_ID")  # Kopf's own identity in the peering, when set
    if not settings.peering.clusterwide or not identity:
        logger.warning(
            "Refreshes do not follow Kopf's peering: it needs --all-namespaces and POD_ID"
            " (m2m-token-operator sets POD_ID itself); run one replica or --standalone, or"
            " several with --standalone and M2M_SHARD (a Lease elects the active one)"
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


def _shard_gate(
    shard: str,
    *,
    kube: KubeApi,
    reconciler: TokenRequestReconciler,
    environ: dict[str, str] | os._Environ[str],
    namespace: str,
) -> LeaseGate:
    if not _SHARD_NAME.fullmatch(shard):
        # Set but empty: the pod has no m2m.dev/shard label (the component reads it).
        raise kopf.PermanentError(
            f"{SHARD_SETTING}={shard!r} is not a shard name (lowercase letters, digits and"
            " '-', at most 40): set the pod label m2m.dev/shard (manifests/components/shard)"
        )
    return LeaseGate(
        config=LeaseConfig(
            namespace=namespace,
            name=lease_name(shard),
            identity=environ.get("POD_ID") or socket.gethostname(),
        ),
        kube=kube,
        clock=utc_now,
        on_resume=reconciler.resume_after_pause,
        on_pause=reconciler.paused,
    )


def _while_active(fetch: Fetch, memo: kopf.Memo) -> Fetch:
    """The token fetch, withheld once the peering gate has closed.

    Checked right before the request, once it has its slot: a fetch that waited for a
    slot since before the pause (its look since cancelled) must not go out after it.
    """

    async def fetch_while_active(credentials: ClientCredentials, scope: str) -> AccessToken:
        gate: ActivityGate | None = memo.get("peering_gate")
        if gate is not None and gate.active is not True:
            raise FetchWithheld
        return await fetch(credentials, scope)

    return fetch_while_active


def event_loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """The event loop the process runs on: uvloop (Kopf's CLI picks it when it is
    installed, and our package requires it) or the standard library's, by class."""
    kind = type(loop)
    return "uvloop" if kind.__module__.partition(".")[0] == "uvloop" else f"asyncio {kind.__name__}"


def _close(api: Any) -> None:
    api.close()


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
    await startup(settings, memo)


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    """Build the operator's objects into `memo`; safe to retry (Kopf retries on failure)."""
    previous: Runtime | None = memo.get("runtime")
    if previous is not None:
        await previous.close()  # a failed earlier attempt leaves nothing running
    runtime = memo["runtime"] = Runtime()
    try:
        await _start(settings, memo, runtime)
    except BaseException:
        await runtime.close()
        raise


async def _start(settings: kopf.OperatorSettings, memo: kopf.Memo, runtime: Runtime) -> None:
    redaction.install()
    config = Settings.from_env()
    # No resource handler is registered, so Kopf stores no state on any object; should
    # one ever be added, its state goes under our domain, not Kopf's.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STATE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=STATE_PREFIX, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # our events are posted by the reconciler, one per change
    settings.peering.priority = peering_priority(config)
    # The operator was measured on uvloop (less CPU and memory per TokenRequest): say so.
    logger.info("Event loop: %s", event_loop_name(asyncio.get_running_loop()))

    api_client = load_api_client()
    kube = runtime.closing(KubeApi(api_client), lambda: kube.aclose(), name="kube")
    await ensure_cluster_peering(settings.peering, kube)
    seal_key = await _seal_key(kube, config)
    token_client = runtime.closing(
        TokenClient(
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            deadline=config.request_deadline,
            # As many connections per endpoint as requests may be in flight (the cache's
            # bound), so a request never waits for a connection inside its deadline.
            pool_size=config.fetch_workers,
        ),
        lambda: token_client.aclose(),
        name="token client",
    )
    cache = runtime.closing(
        TokenCache(
            fetch=_while_active(metrics.instrument_fetch(token_client.fetch), memo),
            refresh_policy=config.refresh_policy(),
            retry_policy=config.retry_policy(),
            clock=utc_now,
            max_requests=config.fetch_workers,
        ),
        lambda: cache.close(),
        name="token cache",
    )
    identity_namespaces = OperatorIdentityNamespaces(config.operator_identity_namespace_selector)
    owned_secrets = secret_watches.OwnedSecrets()
    reconciler = TokenRequestReconciler(
        settings=config,
        kube=kube,
        cache=cache,
        clock=utc_now,
        seal_key=seal_key,
        identity_namespaces=identity_namespaces,
        owned_secrets=owned_secrets,
    )
    # No namespace may hold more than its share of the looks in flight (and the fetches).
    reconciler.scheduler.fair_by(_namespace_of, limit=config.namespace_concurrency)
    # Events are courtesies: while the looks wait for slots, they leave them the CPU.
    kube.hold_events_while(reconciler.scheduler.waiting_for_slots)
    memo["kube"] = kube
    memo["token_client"] = token_client
    memo["reconciler"] = reconciler
    if identity_namespaces.selector is not None:
        identity_namespaces.set_on_change(reconciler.namespace_allowed_changed)
        watch = LabelSelectedWatch(
            name="operator identity namespaces",
            lister=kubernetes.client.CoreV1Api(api_client).list_namespace,
            label_selector=identity_namespaces.selector,
            on_event=identity_namespaces.on_event,
            on_forbidden=functools.partial(_namespaces_forbidden, identity_namespaces, reconciler),
        )
        identity_namespaces.set_synced_check(watch.synced.is_set)
        memo["namespaces_task"] = runtime.start(
            _watch_namespaces(watch, reconciler), name="m2m-namespaces-watch"
        )
    else:
        logger.info(
            "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR is not set: no namespace may use the"
            " operator's own identity"
        )
    # The peering read has its own client and connection, with a short time-out: looks that
    # queue on a slow API server must not keep the gate (and the scheduler loop behind
    # it, which liveness watches) waiting.
    peering_kube = runtime.closing(
        KubeApi(load_api_client(), max_workers=1, request_timeout=PEERING_READ_TIMEOUT),
        lambda: peering_kube.aclose(),
        name="peering kube",
    )
    gate = peering_gate(
        settings,
        kube=peering_kube,
        reconciler=reconciler,
        environ=os.environ,
        namespace=config.seal_key_secret[0],  # the operator's namespace
    )
    if gate is not None:
        reconciler.scheduler.gate = gate
        memo["peering_gate"] = gate
        memo["peering_task"] = runtime.start(gate.run(), name="m2m-peering-gate")
    memo["scheduler_task"] = runtime.start(reconciler.scheduler.run(), name="m2m-scheduler")
    # Owned (and opted-in credentials) Secrets, selected by the API server; a client of
    # their own, so that watches never wait for the pool of reads and writes.
    watch_api = runtime.closing(load_api_client(), lambda: _close(watch_api), name="watch api")
    feed, secret_reflectors = secret_watches.build(
        watch_api,
        functools.partial(_secret_changed, reconciler),
        environ=os.environ,
        store=owned_secrets,
    )
    runtime.closing(feed, feed.close, name="secret feed")
    for watch in secret_reflectors:
        runtime.start(watch.run(), name=f"m2m-watch-{watch.name}")
    # The TokenRequests themselves: each event to the reconciler (kube/token_request_watch.py).
    _, token_request_watches = token_request_watch.build(watch_api, reconciler, environ=os.environ)
    for watch in token_request_watches:
        runtime.start(watch.run(), name=f"m2m-watch-{watch.name}")
    # Last, and it can fail (the port is taken): everything above is closed again then.
    server = metrics.serve(config.metrics_port)
    if server is not None:
        runtime.closing(server, lambda: metrics.stop_serving(server), name="metrics server")
    garbage_collection.freeze_started()


def _namespaces_forbidden(
    identity_namespaces: OperatorIdentityNamespaces,
    reconciler: TokenRequestReconciler,
    forbidden: bool,
) -> None:
    """403 on the Namespace watch: the TokenRequests it blocks say so now (and once it
    works again, its first list wakes them through `_watch_namespaces`)."""
    identity_namespaces.set_forbidden(forbidden)
    if forbidden:
        reconciler.namespace_allowed_changed(None)


async def _watch_namespaces(watch: LabelSelectedWatch, reconciler: TokenRequestReconciler) -> None:
    """Run the Namespace watch; once its first list is in, TokenRequests waiting for it go on."""

    async def wake_when_synced() -> None:
        await watch.synced.wait()
        reconciler.namespace_allowed_changed(None)

    waker = asyncio.create_task(wake_when_synced(), name="m2m-namespaces-synced")
    try:
        await watch.run()
    finally:
        waker.cancel()


async def _seal_key(kube: KubeApi, config: Settings) -> seal.SealKey:
    """The restart seal's key, read or created once; an API failure is retried by Kopf."""
    namespace, name = config.seal_key_secret
    try:
        return await seal.load_or_create(kube, namespace=namespace, name=name)
    except KubeError as error:
        hint = ""
        if error.status == 403:
            hint = (
                f"; grant get (resourceNames: [{name}]) and create on secrets in {namespace}"
                " (the Role m2m-token-operator-seal-key in manifests/rbac.yaml)"
            )
        raise kopf.TemporaryError(
            f"Cannot read or create the seal key Secret {namespace}/{name}: {error}{hint}",
            delay=10,
        ) from None
    except seal.SealKeyError as error:
        raise kopf.PermanentError(str(error)) from None


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    await shutdown(memo)


async def shutdown(memo: kopf.Memo) -> None:
    """Stop the tasks, then close the token cache's pool, the token client and the API pools."""
    runtime: Runtime | None = memo.get("runtime")
    if runtime is not None:
        await runtime.close()


# PERMANENT: a raising probe answers /healthz at once with the failure. Kopf's default
# (TEMPORARY) retries it every 60 s while the kubelet's request waits and times out.
@kopf.on.probe(id="scheduler", errors=kopf.ErrorsMode.PERMANENT)
def scheduler_alive(memo: kopf.Memo, **_: Any) -> str:
    """Liveness: fails when refreshes can no longer happen, not merely when the process lives."""
    task: asyncio.Task[None] | None = memo.get("scheduler_task")
    if task is None or task.done():
        raise RuntimeError("the refresh scheduler is not running")
    last = _reconciler(memo).scheduler.last_loop_at
    if last is None or utc_now() - last > SCHEDULER_STALL:
        raise RuntimeError("the refresh scheduler is stalled")
    gate: ActivityGate | None = memo.get("peering_gate")
    if gate is not None and gate.active is None and utc_now() - gate.started_at > PEERING_UNREAD:
        # Never read (e.g. RBAC without `get` on it): refreshes would wait for ever.
        raise RuntimeError("the peering object has never been readable; refreshes wait on it")
    return last.isoformat()
