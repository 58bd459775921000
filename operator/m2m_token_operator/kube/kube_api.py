"""The operator's writes and point reads against the Kubernetes API.

The watches are elsewhere; this module writes. Every call is one HTTP request on the
event loop (`http_transport`: aiohttp, keep-alive connections, built from the kubernetes
client's configuration), a few at a time in the order of `call_priority`, and
speaks plain JSON dicts, exactly as the API server sends them: no client-side
model validation stands between the operator and what the server really holds.
The one exception is `mint_service_account_token`, blocking on purpose: it runs
on the token client's assertion thread through the synchronous `kubernetes` client.
"""

from __future__ import annotations

import contextlib
import logging
import string
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import kubernetes
import urllib3.exceptions

from m2m_token_operator.api.constants import GROUP, PLURAL, VERSION, JsonObject
from m2m_token_operator.kube import wire_json
from m2m_token_operator.kube.api_latency import observe_api_call
from m2m_token_operator.kube.call_priority import CALL_PRIORITY, PriorityGate, event_priority
from m2m_token_operator.kube.event_queue import EventQueue
from m2m_token_operator.kube.http_transport import JSON, TRANSPORT_ERRORS, HttpTransport

logger = logging.getLogger(__name__)

# The field manager of the Secrets' writes: their managedFields then tell whether anyone
# else changed a Secret's data since (watches.OwnedSecrets, without reading the data).
SECRET_FIELD_MANAGER = "m2m-token-operator"
PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"
CLUSTER_PEERING_PLURAL = "clusterkopfpeerings"

# (connect, read) seconds for every API call: a hung connection must not hold a
# TokenRequest's lock (and with it its looks) for ever.
REQUEST_TIMEOUT = (10.0, 30.0)

# API requests in flight at once (also the keep-alive connections). A burst needs three
# calls per TokenRequest (Secret, status, event) at the rate TokenRequests are created:
# with 16, at 10,000 created at once (about 215 a second, bench/scale_bench.py) the
# looks fell behind the creates and create -> Ready grew to p50 6.4 s, p99 8.8 s; with
# 64 they keep up (p50 0.15-0.2 s). The API server's own limits are far above this
# (400 requests, 200 mutating, shared out by API Priority and Fairness).
API_CONCURRENCY = 64

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


def _failure(action: str, status: int, reason: str) -> KubeError:
    """The error of an answer that is not a success: only its status and reason phrase.

    The body of an API error can echo the object sent (a Secret's data): it never
    travels on.
    """
    if status == 404:
        return NotFound(action=action, status=status, reason=reason)
    if status == 409:
        return Conflict(action=action, status=status, reason=reason)
    return KubeError(action=action, status=status, reason=reason)


# What a path segment may hold unquoted (RFC 3986 unreserved): every valid Kubernetes
# name does, so the quoting itself is only for what is not one.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _path(*segments: str) -> str:
    """An API path from its segments (names quoted: they come from objects and specs)."""
    return "/" + "/".join(
        segment if _UNRESERVED.issuperset(segment) else quote(segment, safe="")
        for segment in segments
    )


def _core(namespace: str, plural: str, name: str | None = None) -> str:
    return _path("api", "v1", "namespaces", namespace, plural, *([name] if name else []))


def _named(group: str, version: str, namespace: str, plural: str, name: str | None = None) -> str:
    tail = [name] if name else []
    return _path("apis", group, version, "namespaces", namespace, plural, *tail)


_SECRET_WRITE = {"fieldManager": SECRET_FIELD_MANAGER}


def _without_nulls(value: Any) -> Any:
    """A JSON value without its null members: what a merge patch of it would leave."""
    if isinstance(value, str | int | float):
        return value  # before the Mapping check: an ABC's isinstance is the slow one
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
    # The blocking client serves only `mint_service_account_token` (and the watches); the
    # other calls go over `http_transport`, which keeps the same retry policy.
    # Explicit: the client's default (None) means urllib3's 3 retries with backoff, so one
    # call could take minutes on a slow API server while a look or the peering read waits.
    # One retry, without backoff, of a connection that failed before the request was sent
    # (urllib3 never retries a POST whose answer was lost); the reconciler retries the rest.
    configuration.retries = API_RETRIES
    return kubernetes.client.ApiClient(configuration)


class KubeCalls:
    """The plumbing every typed call goes through: one HTTP client on the event loop.

    A call waits for a free slot (at most `max_workers` requests at once) in the
    order of its priority (`call_priority`), is timed, reads its answer to the end,
    and fails only as a `KubeError`. The typed calls live in the subclasses, one
    group of objects each.
    """

    # Bodies are typed Any on purpose: they are plain JSON values, sent as they are.

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        max_workers: int = API_CONCURRENCY,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> None:
        # The blocking client serves only `mint_service_account_token`, on the assertion thread.
        self._api_client = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._timeout = request_timeout
        self._http = HttpTransport(
            api_client.configuration, connections=max_workers, timeout=request_timeout
        )
        # A request is sent only when a slot is free, so the order of the waiting calls
        # is ours (oldest look first), not the order in which they were made.
        self._admission = PriorityGate(max_workers)
        self.max_workers = max_workers
        self.writes = 0  # every mutating call sent; tests and metrics read it

    @property
    def closed(self) -> bool:
        return self._http.closed

    def close(self) -> None:
        """Stop the calls and close the connections (at operator stop), from sync code."""
        self._http.close()
        self._api_client.close()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        """`close`, waiting until the connections are closed."""
        await self._http.aclose()
        self._api_client.close()  # type: ignore[no-untyped-call]

    async def _call(
        self,
        action: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = JSON,
        priority: float | None = None,
    ) -> bytes:
        """One request: the answer's whole body, or its failure as a `KubeError`."""
        data = None if body is None else wire_json.dumps(body)
        async with self._admission.slot(CALL_PRIORITY.get() if priority is None else priority):
            started = time.perf_counter()
            try:
                answer = await self._http.request(
                    method, path, query=query, body=data, content_type=content_type
                )
            except TRANSPORT_ERRORS as error:
                # Refused, reset or timed out before any answer: to the caller, like a 5xx.
                raise KubeError(action=action, status=None, reason=type(error).__name__) from None
            finally:
                observe_api_call(action, time.perf_counter() - started)
        if 200 <= answer.status < 300:
            return answer.body
        raise _failure(action, answer.status, answer.reason)

    @staticmethod
    def _blocking(action: str, function: Callable[[], Any]) -> bytes:
        """Run one blocking client call here and now: its body, or its failure as a `KubeError`.

        Made with `_preload_content=False`: the answer is read to its end here, so that
        urllib3 gives the connection back to its pool.
        """
        try:
            response = function()
            try:
                body: bytes = response.data
            finally:
                response.release_conn()
            return body
        except kubernetes.client.ApiException as error:
            raise _failure(action, error.status, str(error.reason or "")) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeError(action=action, status=None, reason=type(error).__name__) from None

    async def _read_or_none(self, action: str, path: str) -> JsonObject | None:
        """A point read: the object as JSON, or None when it does not exist."""
        try:
            response = await self._call(action, "GET", path)
        except NotFound:
            return None
        return self._json(response)

    @staticmethod
    def _json(body: bytes) -> JsonObject:
        data: JsonObject = wire_json.loads(body)
        return data


def _peering_path(name: str | None = None) -> str:
    tail = [name] if name else []
    return _path("apis", PEERING_GROUP, PEERING_VERSION, CLUSTER_PEERING_PLURAL, *tail)


def _lease_path(namespace: str, name: str | None = None) -> str:
    return _named("coordination.k8s.io", "v1", namespace, "leases", name)


class CoordinationCalls(KubeCalls):
    """The calls that coordinate replicas: Kopf's ClusterKopfPeering and the shards' Leases."""

    # Kopf's peering (Kopf itself writes the keep-alives; we only read it, or create it once)

    async def read_cluster_peering(self, name: str) -> JsonObject | None:
        return await self._read_or_none(f"read ClusterKopfPeering {name}", _peering_path(name))

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
                f"create ClusterKopfPeering {name}", "POST", _peering_path(), body=body
            )
        except Conflict:
            return False
        return True

    # A shard's Lease (coordination.k8s.io): which of its replicas is active

    async def read_lease(self, namespace: str, name: str) -> JsonObject | None:
        return await self._read_or_none(
            f"read Lease {namespace}/{name}", _lease_path(namespace, name)
        )

    async def create_lease(self, namespace: str, body: Any) -> JsonObject:
        self.writes += 1
        return self._json(
            await self._call(
                f"create Lease {namespace}/{body['metadata']['name']}",
                "POST",
                _lease_path(namespace),
                body=body,
            )
        )

    async def replace_lease(self, namespace: str, body: Any) -> JsonObject:
        """Replace with the body's resourceVersion: a Conflict when another got there first."""
        name = body["metadata"]["name"]
        self.writes += 1
        return self._json(
            await self._call(
                f"replace Lease {namespace}/{name}",
                "PUT",
                _lease_path(namespace, name),
                body=body,
            )
        )


class EventCalls(KubeCalls):
    """Kubernetes Events: posted in the background, in order, never failing their caller."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        max_workers: int = API_CONCURRENCY,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(api_client, max_workers=max_workers, request_timeout=request_timeout)
        # Events go out in the background, as slots come free (see event_queue.py).
        self._events = EventQueue(self.create_event, workers=max_workers)

    def close(self) -> None:
        """Drop the events not posted yet, then stop the calls and close the connections."""
        self._events.close()  # courtesies not yet posted are dropped, as client-go drops them
        super().close()

    async def aclose(self) -> None:
        self._events.close()
        await super().aclose()

    def post_events(self, namespace: str, bodies: Sequence[Any]) -> None:
        """Post one look's events in the background, in order: the look does not wait.

        They keep the priority of the look they came from (`call_priority.event_priority`),
        so under load they go out after the calls of the looks that follow it.
        """
        self._events.put(namespace, bodies, priority=event_priority())

    def hold_events_while(self, busy: Callable[[], bool]) -> None:
        """Post no event while `busy()` (the looks wait for slots), for a while at most."""
        self._events.hold = busy

    def drop_pending_events(self) -> None:
        """This replica paused: the events not posted yet are not its to post any more."""
        self._events.drop_pending()

    async def create_event(self, namespace: str, body: Any, priority: float | None = None) -> None:
        self.writes += 1
        try:
            await self._call(
                f"create Event in {namespace}",
                "POST",
                _core(namespace, "events"),
                body=body,
                priority=event_priority() if priority is None else priority,
            )
        except KubeError as error:
            # An event is a courtesy: losing one must never stop a token from being delivered.
            logger.warning("Could not post an event in %s: %s", namespace, error)


class KubeApi(CoordinationCalls, EventCalls):
    """The operator's calls: Secrets, ServiceAccounts and TokenRequests.

    Inherits the coordination calls (Lease, ClusterKopfPeering) and the Event calls.
    """

    # Secrets

    async def read_secret(self, namespace: str, name: str) -> JsonObject | None:
        return await self._read_or_none(
            f"read Secret {namespace}/{name}", _core(namespace, "secrets", name)
        )

    async def list_secrets(self, namespace: str, *, label_selector: str) -> list[JsonObject]:
        response = await self._call(
            f"list Secrets in {namespace}",
            "GET",
            _core(namespace, "secrets"),
            query={"labelSelector": label_selector},
        )
        items: list[JsonObject] = self._json(response).get("items") or []
        return items

    async def create_secret(self, namespace: str, body: Any) -> JsonObject:
        self.writes += 1
        response = await self._call(
            f"create Secret {namespace}/{body['metadata']['name']}",
            "POST",
            _core(namespace, "secrets"),
            query=_SECRET_WRITE,
            body=body,
        )
        return self._json(response)

    async def replace_secret(self, namespace: str, body: Any) -> JsonObject:
        """A full replace guarded by resourceVersion: drift in any key is undone, races lose."""
        name = body["metadata"]["name"]
        self.writes += 1
        response = await self._call(
            f"replace Secret {namespace}/{name}",
            "PUT",
            _core(namespace, "secrets", name),
            query=_SECRET_WRITE,
            body=body,
        )
        return self._json(response)

    async def delete_secret(self, namespace: str, name: str, *, uid: str) -> None:
        """Delete only the very object that was inspected (uid precondition)."""
        self.writes += 1
        body: Any = {"preconditions": {"uid": uid}}
        with contextlib.suppress(NotFound):
            await self._call(
                f"delete Secret {namespace}/{name}",
                "DELETE",
                _core(namespace, "secrets", name),
                body=body,
            )

    # ServiceAccounts (workload identity federation)

    async def read_service_account(self, namespace: str, name: str) -> JsonObject | None:
        return await self._read_or_none(
            f"read ServiceAccount {namespace}/{name}", _core(namespace, "serviceaccounts", name)
        )

    def mint_service_account_token(
        self, namespace: str, name: str, *, audience: str, expiration_seconds: int
    ) -> tuple[str, str | None]:
        """A new token of the ServiceAccount (TokenRequest API): (token, expirationTimestamp).

        Blocking, on purpose: it is called on the token client's assertion thread,
        right before the token request that presents it, so the token is never
        cached or stored. Not counted in `writes`: it changes no
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
            f"read TokenRequest {namespace}/{name}", _named(GROUP, VERSION, namespace, PLURAL, name)
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
                "PATCH",
                _named(GROUP, VERSION, namespace, PLURAL, name) + "/status",
                body=body,
                content_type=JSON_PATCH,
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
