"""The operator's writes and point reads against the Kubernetes API.

The watches are elsewhere; this module writes. It wraps the blocking `kubernetes`
client so that every call runs in a worker thread (never on the event loop) and speaks
plain JSON dicts, exactly as the API server sends them: no client-side model
validation stands between the operator and what the server really holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes
import urllib3.exceptions

from m2m_token_operator.api.constants import GROUP, PLURAL, VERSION, JsonObject
from m2m_token_operator.kube.api_latency import observe_api_call
from m2m_token_operator.kube.call_priority import CALL_PRIORITY, PriorityGate, event_priority
from m2m_token_operator.kube.event_queue import EventQueue

logger = logging.getLogger(__name__)

# The field manager of the Secrets' writes: their managedFields then tell whether anyone
# else changed a Secret's data since (watches.OwnedSecrets, without reading the data).
SECRET_FIELD_MANAGER = "m2m-token-operator"
PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
CLUSTER_PEERING_PLURAL = "clusterkopfpeerings"

# (connect, read) seconds for every API call: a hung connection must not hold a
# TokenRequest's lock (and with it its Kopf handlers) for ever.
REQUEST_TIMEOUT = (10.0, 30.0)

# See load_api_client: never urllib3's default of 3 retries with backoff.
API_RETRIES = 1


class KubeError(Exception):
    """An API call failed for a reason other than the ones the caller handles (404, 409)."""

    def __init__(self, *, action: str, status: int | None, reason: str) -> None:
        super().__init__(f"{action} failed: HTTP {status} {reason}")
        self.action = action
        self.status = status


class NotFound(KubeError):
    """The object does not exist (HTTP 404)."""


class Conflict(KubeError):
    """The object exists already, or changed under a precondition (HTTP 409)."""


JSON_PATCH = "application/json-patch+json"


def _without_nulls(value: Any) -> Any:
    """A JSON value without its null members: what a merge patch of it would leave."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def load_api_client() -> kubernetes.client.ApiClient:
    """The current kubeconfig (KUBECONFIG or ~/.kube/config), else the in-cluster config."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    except (kubernetes.config.ConfigException, FileNotFoundError, TypeError):
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    # Explicit: the client's default (None) means urllib3's 3 retries with backoff, so one
    # call could take minutes on a slow API server while a look or the peering read waits.
    # One retry, without backoff, of a connection that failed before the request was sent
    # (urllib3 never retries a POST whose answer was lost); the reconciler retries the rest.
    configuration.retries = API_RETRIES
    return kubernetes.client.ApiClient(configuration)


class KubeCalls:
    """The plumbing every typed call goes through: one thread pool for all API calls.

    A call waits for a free thread in the order of its priority (`call_priority`),
    is timed, reads its answer to the end, and fails only as a `KubeError`. The
    typed calls live in the subclasses, one group of objects each.
    """

    # Bodies are typed Any on purpose: the client sends plain dicts as they are,
    # while its type hints only name its generated models.

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        max_workers: int = 4,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> None:
        self._api_client = api_client
        self._timeout = request_timeout
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._coordination = kubernetes.client.CoordinationV1Api(api_client)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kube-api")
        # One slot per thread: a call is handed to a thread only when one is free, so the
        # order of the waiting calls is ours (oldest look first), not the executor's FIFO.
        self._admission = PriorityGate(max_workers)
        self.writes = 0  # every mutating call sent; tests and metrics read it

    def close(self) -> None:
        """Stop the worker threads and the connection pool (at operator stop)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._api_client.close()  # type: ignore[no-untyped-call]

    async def _call(
        self, action: str, function: Callable[[], Any], *, priority: float | None = None
    ) -> bytes:
        loop = asyncio.get_running_loop()
        async with self._admission.slot(CALL_PRIORITY.get() if priority is None else priority):
            started = time.perf_counter()
            try:
                return await loop.run_in_executor(self._executor, self._blocking, action, function)
            finally:
                observe_api_call(action, time.perf_counter() - started)

    @staticmethod
    def _blocking(action: str, function: Callable[[], Any]) -> bytes:
        """Run one client call here and now: its whole body, or its failure as a `KubeError`.

        Every call is made with `_preload_content=False`, so the answer is read to its end
        here: urllib3 gives a connection back to its pool only then. An answer left unread
        (a status patch, an event) would cost a new TCP and TLS connection per call, which
        under a burst is most of the operator's CPU and much of the API server's.
        """
        try:
            response = function()
            try:
                body: bytes = response.data
            finally:
                response.release_conn()
            return body
        except kubernetes.client.ApiException as error:
            # The body of an API error can echo the object sent (a Secret's data):
            # only the status and the short reason phrase travel on.
            status = error.status
            reason = str(error.reason or "")
            if status == 404:
                raise NotFound(action=action, status=status, reason=reason) from None
            if status == 409:
                raise Conflict(action=action, status=status, reason=reason) from None
            raise KubeError(action=action, status=status, reason=reason) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            # Refused, reset or timed out before any answer: the same to the caller as a 5xx.
            raise KubeError(action=action, status=None, reason=type(error).__name__) from None

    async def _read_or_none(self, action: str, function: Callable[[], Any]) -> JsonObject | None:
        """A point read: the object as JSON, or None when it does not exist."""
        try:
            response = await self._call(action, function)
        except NotFound:
            return None
        return self._json(response)

    @staticmethod
    def _json(body: bytes) -> JsonObject:
        data: JsonObject = json.loads(body)
        return data


class CoordinationCalls(KubeCalls):
    """The calls that coordinate replicas: Kopf's ClusterKopfPeering and the shards' Leases."""

    # Kopf's peering (Kopf itself writes the keep-alives; we only read it, or create it once)

    async def read_cluster_peering(self, name: str) -> JsonObject | None:
        return await self._read_or_none(
            f"read ClusterKopfPeering {name}",
            lambda: self._custom.get_cluster_custom_object(
                PEERING_GROUP,
                PEERING_VERSION,
                CLUSTER_PEERING_PLURAL,
                name,
                _preload_content=False,
                _request_timeout=self._timeout,
            ),
        )

    async def create_cluster_peering(self, name: str) -> bool:
        """Create an empty ClusterKopfPeering; False when it exists already (HTTP 409)."""
        body = {
            "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": name},
        }
        self.writes += 1
        try:
            await self._call(
                f"create ClusterKopfPeering {name}",
                lambda: self._custom.create_cluster_custom_object(
                    PEERING_GROUP,
                    PEERING_VERSION,
                    CLUSTER_PEERING_PLURAL,
                    body,
                    _preload_content=False,
                    _request_timeout=self._timeout,
                ),
            )
        except Conflict:
            return False
        return True

    # A shard's Lease (coordination.k8s.io): which of its replicas is active

    async def read_lease(self, namespace: str, name: str) -> JsonObject | None:
        return await self._read_or_none(
            f"read Lease {namespace}/{name}",
            lambda: self._coordination.read_namespaced_lease(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            ),
        )

    async def create_lease(self, namespace: str, body: Any) -> JsonObject:
        self.writes += 1
        return self._json(
            await self._call(
                f"create Lease {namespace}/{body['metadata']['name']}",
                lambda: self._coordination.create_namespaced_lease(
                    namespace, body, _preload_content=False, _request_timeout=self._timeout
                ),
            )
        )

    async def replace_lease(self, namespace: str, body: Any) -> JsonObject:
        """Replace with the body's resourceVersion: a Conflict when another got there first."""
        name = body["metadata"]["name"]
        self.writes += 1
        return self._json(
            await self._call(
                f"replace Lease {namespace}/{name}",
                lambda: self._coordination.replace_namespaced_lease(
                    name, namespace, body, _preload_content=False, _request_timeout=self._timeout
                ),
            )
        )


class EventCalls(KubeCalls):
    """Kubernetes Events: posted in the background, in order, never failing their caller."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        max_workers: int = 4,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(api_client, max_workers=max_workers, request_timeout=request_timeout)
        # Events go out in the background, as threads come free (see event_queue.py).
        self._events = EventQueue(self.create_event, workers=max_workers)

    def close(self) -> None:
        """Drop the events not posted yet, then stop the threads and the connection pool."""
        self._events.close()  # courtesies not yet posted are dropped, as client-go drops them
        super().close()

    def post_events(self, namespace: str, bodies: Sequence[Any]) -> None:
        """Post one look's events in the background, in order: the look does not wait.

        They keep the priority of the look they came from (`admission.event_priority`),
        so under load they go out after the calls of the looks that follow it.
        """
        self._events.put(namespace, bodies, priority=event_priority())

    def drop_pending_events(self) -> None:
        """This replica paused: the events not posted yet are not its to post any more."""
        self._events.drop_pending()

    async def create_event(self, namespace: str, body: Any, priority: float | None = None) -> None:
        self.writes += 1
        try:
            await self._call(
                f"create Event in {namespace}",
                lambda: self._core.create_namespaced_event(
                    namespace, body, _preload_content=False, _request_timeout=self._timeout
                ),
                priority=event_priority() if priority is None else priority,
            )
        except KubeError as error:
            # An event is a courtesy: losing one must never stop a token from being delivered.
            logger.warning("Could not post an event in %s: %s", namespace, error)


class KubeApi(CoordinationCalls, EventCalls):
    """Async facade over the blocking client: Secrets, ServiceAccounts and TokenRequests.

    Inherits the coordination calls (Lease, ClusterKopfPeering) and the Event calls.
    """

    # Secrets

    async def read_secret(self, namespace: str, name: str) -> JsonObject | None:
        return await self._read_or_none(
            f"read Secret {namespace}/{name}",
            lambda: self._core.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            ),
        )

    async def list_secrets(self, namespace: str, *, label_selector: str) -> list[JsonObject]:
        response = await self._call(
            f"list Secrets in {namespace}",
            lambda: self._core.list_namespaced_secret(
                namespace,
                label_selector=label_selector,
                _preload_content=False,
                _request_timeout=self._timeout,
            ),
        )
        items: list[JsonObject] = self._json(response).get("items") or []
        return items

    async def create_secret(self, namespace: str, body: Any) -> JsonObject:
        self.writes += 1
        response = await self._call(
            f"create Secret {namespace}/{body['metadata']['name']}",
            lambda: self._core.create_namespaced_secret(
                namespace,
                body,
                field_manager=SECRET_FIELD_MANAGER,
                _preload_content=False,
                _request_timeout=self._timeout,
            ),
        )
        return self._json(response)

    async def replace_secret(self, namespace: str, body: Any) -> JsonObject:
        """A full replace guarded by resourceVersion: drift in any key is undone, races lose."""
        name = body["metadata"]["name"]
        self.writes += 1
        response = await self._call(
            f"replace Secret {namespace}/{name}",
            lambda: self._core.replace_namespaced_secret(
                name,
                namespace,
                body,
                field_manager=SECRET_FIELD_MANAGER,
                _preload_content=False,
                _request_timeout=self._timeout,
            ),
        )
        return self._json(response)

    async def delete_secret(self, namespace: str, name: str, *, uid: str) -> None:
        """Delete only the very object that was inspected (uid precondition)."""
        self.writes += 1
        body: Any = {"preconditions": {"uid": uid}}
        with contextlib.suppress(NotFound):
            await self._call(
                f"delete Secret {namespace}/{name}",
                lambda: self._core.delete_namespaced_secret(
                    name,
                    namespace,
                    body=body,
                    _preload_content=False,
                    _request_timeout=self._timeout,
                ),
            )

    # ServiceAccounts (workload identity federation)

    async def read_service_account(self, namespace: str, name: str) -> JsonObject | None:
        return await self._read_or_none(
            f"read ServiceAccount {namespace}/{name}",
            lambda: self._core.read_namespaced_service_account(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
        )

    def mint_service_account_token(
        self, namespace: str, name: str, *, audience: str, expiration_seconds: int
    ) -> tuple[str, str | None]:
        """A new token of the ServiceAccount (TokenRequest API): (token, expirationTimestamp).

        Blocking, on purpose: it is called on the token-fetch worker thread, right
        before the token request that presents it, so the token is never cached,
        stored or handed to the event loop. Not counted in `writes`: it changes no
        object. The API server may shorten the lifetime asked for; the caller reads
        the expiration it returns. Raises `KubeError` (403: the namespace has not
        granted the operator `create serviceaccounts/token`; `NotFound`: no such
        ServiceAccount).
        """
        body: Any = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": expiration_seconds},
        }
        response = self._blocking(
            f"create token for ServiceAccount {namespace}/{name}",
            lambda: self._core.create_namespaced_service_account_token(
                name, namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        status = self._json(response).get("status") or {}
        token = status.get("token")
        if not isinstance(token, str) or not token:
            raise KubeError(
                action=f"create token for ServiceAccount {namespace}/{name}",
                status=None,
                reason="the answer holds no token",
            )
        expires = status.get("expirationTimestamp")
        return token, expires if isinstance(expires, str) else None

    # TokenRequests

    async def read_token_request(self, namespace: str, name: str) -> JsonObject | None:
        return await self._read_or_none(
            f"read TokenRequest {namespace}/{name}",
            lambda: self._custom.get_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                _preload_content=False,
                _request_timeout=self._timeout,
            ),
        )

    async def patch_token_request_status(
        self, namespace: str, name: str, status: Mapping[str, Any], *, uid: str
    ) -> bool:
        """Write the status of the object with this uid; False when it is gone or replaced.

        A JSON Patch whose first operation tests `/metadata/uid`: the API server applies
        it to the object as stored, so a status meant for an object deleted and created
        again under the same name is refused instead of landing on the new one. (A merge
        patch carrying `metadata.uid` is accepted on `/status`: the status strategy
        copies the stored metadata over the patched object before validating.) `status`
        is the complete status (`status.build_status`): it replaces the stored one, its
        null members left out, as the merge patch it replaces removed them.

        A failed `test` is a 422 with a generic message, the code a status that the
        schema refuses also gets: only then is the object read, to tell the two apart.
        """
        self.writes += 1
        body: Any = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "add", "path": "/status", "value": _without_nulls(status)},
        ]
        try:
            await self._call(
                f"patch TokenRequest {namespace}/{name} status",
                lambda: self._custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    body,
                    _content_type=JSON_PATCH,
                    _preload_content=False,
                    _request_timeout=self._timeout,
                ),
            )
        except NotFound:
            logger.debug("TokenRequest %s/%s is gone; status not written", namespace, name)
            return False
        except KubeError as error:
            if error.status != 422:
                raise
            current = await self.read_token_request(namespace, name)
            if current is not None and (current.get("metadata") or {}).get("uid") == uid:
                raise  # the object is there: the status itself was refused
            logger.debug(
                "TokenRequest %s/%s uid %s is gone or replaced; status not written",
                namespace,
                name,
                uid,
            )
            return False
        return True
