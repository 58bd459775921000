"""What integration tests import: the cluster handle, the polling helper, the operator factory.

The cluster is the real one (``devenv.controlplane``), shared by the session;
the test's own requests go to it directly as admin, the operator's through
the fault proxy (``kube.proxy``) as its ServiceAccount.

The fixtures in ``conftest.py`` build these; tests use them through the
fixtures and import only the names they need (``wait_for``, ``Reply``, ...).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import pathlib
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, overload

import kopf
import kubernetes
import pytest
import yaml

from devenv.faultproxy import Exchange, FaultProxy

from ._operator import OWNED_SECRETS as WATCH_OWNED_SECRETS
from ._operator import TOKEN_REQUEST_WATCH as WATCH_TOKEN_REQUESTS
from ._operator import OperatorRun
from ._token_endpoint import Reply, TokenCall, TokenEndpoint

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "CLUSTER_NAME",
    "GROUP",
    "PLURAL",
    "SECRETS",
    "TOKEN_REQUESTS",
    "VERSION",
    "Kube",
    "OperatorFactory",
    "OperatorRun",
    "Reply",
    "TokenCall",
    "TokenEndpoint",
    "wait_for",
]

JsonObject = dict[str, Any]
_T = TypeVar("_T")

GROUP, VERSION, PLURAL = "m2m.dev", "v1alpha1", "tokenrequests"
TOKEN_REQUESTS = f"{GROUP}/{VERSION}/{PLURAL}"
SECRETS = "v1/secrets"
CLIENT_ID = "test-client-id-0000"
CLIENT_SECRET = "s3cr3t-client-value"
CLUSTER_NAME = "test-cluster"


def write_kubeconfig(path: pathlib.Path, server: str, token: str) -> pathlib.Path:
    """A kubeconfig for plain http on loopback (the proxy) with a bearer token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "proxy", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [
            {
                "name": "proxy",
                "context": {"cluster": "proxy", "user": "operator", "namespace": "default"},
            }
        ],
        "current-context": "proxy",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[_T | None]],
    timeout: float = 5.0,  # noqa: ASYNC109
    *,
    interval: float = 0.02,
    message: str | None = None,
) -> _T: ...


@overload
async def wait_for(
    predicate: Callable[[], _T | None],
    timeout: float = 5.0,  # noqa: ASYNC109
    *,
    interval: float = 0.02,
    message: str | None = None,
) -> _T: ...


async def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 5.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    *,
    interval: float = 0.02,
    message: str | None = None,
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that.

    Fails with the last value seen after ``timeout`` seconds of real time (the
    operator runs in real threads: these tests never use looptime).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last value: {result!r}"
            )
        await asyncio.sleep(interval)


def _json(response: Any) -> JsonObject:
    data: JsonObject = json.loads(response.data)
    return data


class History:
    """Every version of the objects of one resource in a test's namespaces, as the API server
    stored them: a watch (as admin, straight to the API server) from the test's start.

    The API server keeps no history an object's reader could ask for, but a watch
    from a resourceVersion replays every change since then, in order. The watch
    restarts every second from the last version seen, so :meth:`close` ends it soon.
    """

    def __init__(
        self, api: kubernetes.client.ApiClient, resource: str, namespaces: Callable[[str], bool]
    ) -> None:
        self._api = api
        self._resource = resource
        self._wanted = namespaces
        self._versions: dict[tuple[str, str], list[JsonObject | None]] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.resource_version = self._list_version()
        self._thread = threading.Thread(target=self._run, name=f"history-{resource}", daemon=True)
        self._thread.start()

    def _call(self, **kwargs: Any) -> Any:
        if self._resource == SECRETS:
            return kubernetes.client.CoreV1Api(self._api).list_secret_for_all_namespaces(
                _preload_content=False, **kwargs
            )
        return kubernetes.client.CustomObjectsApi(self._api).list_cluster_custom_object(
            GROUP, VERSION, PLURAL, _preload_content=False, **kwargs
        )

    def _list_version(self) -> str:
        listed = _json(self._call(limit=1))
        return str(listed["metadata"]["resourceVersion"])

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                response = self._call(
                    watch=True,
                    resource_version=self.resource_version,
                    timeout_seconds=1,
                    allow_watch_bookmarks=False,
                )
                buffer = b""
                try:
                    for chunk in response.stream(decode_content=True):
                        buffer += chunk
                        *lines, buffer = buffer.split(b"\n")  # one event per line
                        for line in lines:
                            if line.strip():
                                self._take(json.loads(line))
                finally:
                    response.release_conn()
            except Exception:  # the API server going away at the end of the session
                if self._closing.wait(0.2):
                    return

    def _take(self, event: JsonObject) -> None:
        obj = event["object"]
        if event["type"] == "ERROR":  # 410: too old, cannot happen within one test
            raise RuntimeError(f"the history watch of {self._resource} failed: {obj}")
        meta = obj["metadata"]
        self.resource_version = meta["resourceVersion"]
        if event["type"] == "BOOKMARK" or not self._wanted(meta.get("namespace", "")):
            return
        key = (meta["namespace"], meta["name"])
        with self._lock:
            versions = self._versions.setdefault(key, [])
            versions.append(obj)
            if event["type"] == "DELETED":
                versions.append(None)

    def versions(
        self, namespace: str, name: str, current: JsonObject | None
    ) -> list[JsonObject | None]:
        """Every version up to ``current`` (the object as read now; None: not there)."""
        deadline = time.monotonic() + 5
        while True:
            with self._lock:
                versions = list(self._versions.get((namespace, name), []))
            stored = [v for v in versions if v is not None]
            if current is None and (not versions or versions[-1] is None):
                return versions
            if current is not None and any(
                v["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"]
                for v in stored
            ):
                return versions
            if time.monotonic() > deadline:
                raise AssertionError(f"the history of {namespace}/{name} did not catch up in 5 s")
            time.sleep(0.01)

    def close(self) -> None:
        self._closing.set()


class Kube:
    """The cluster as a test sees it: the admin's API clients, helpers, the proxy's record.

    Namespaces: every ``namespace`` argument of these helpers is the test's own
    name for it (``"shop"``); the real namespace is unique to the test
    (``"shop-<id>"``, :meth:`ns`), so tests sharing one API server never see
    each other's objects. Use :meth:`ns` wherever the real name shows: log lines,
    direct ``kube.core`` calls. Namespaces are created on first use and deleted
    (without waiting) after the test.
    """

    def __init__(self, api: kubernetes.client.ApiClient, proxy: FaultProxy, suffix: str) -> None:
        self.api = api
        self.proxy = proxy
        self.suffix = suffix
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.created_namespaces: list[str] = []
        mine = f"-{suffix}"
        self._history = {
            resource: History(api, resource, lambda namespace: namespace.endswith(mine))
            for resource in (TOKEN_REQUESTS, SECRETS)
        }

    def ns(self, name: str) -> str:
        """The real namespace behind the test's name for it."""
        return name if name.endswith(f"-{self.suffix}") else f"{name}-{self.suffix}"

    def close(self) -> None:
        """Stop the recorders; delete the TokenRequests at once, then the namespaces.

        The TokenRequests first: the next test's operator (all namespaces) must not
        find any in a namespace that is still terminating.
        """
        for history in self._history.values():
            history.close()
        for namespace in self.created_namespaces:
            self.custom.delete_collection_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL
            )
            self.core.delete_namespace(namespace, _preload_content=False)

    # ---- namespaces and TokenRequests --------------------------------------------------------

    def ensure_namespace(self, name: str) -> str:
        namespace = self.ns(name)
        if namespace in self.created_namespaces:
            return namespace
        try:
            body: Any = {"metadata": {"name": namespace}}
            self.core.create_namespace(body, _preload_content=False)
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise
        self.created_namespaces.append(namespace)
        return namespace

    def create_token_request(
        self,
        namespace: str,
        name: str,
        spec: Mapping[str, Any],
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> JsonObject:
        """Create a TokenRequest (and its namespace if missing); return the stored object."""
        namespace = self.ensure_namespace(namespace)
        metadata: JsonObject = {"name": name, "namespace": namespace}
        if labels:
            metadata["labels"] = dict(labels)
        if annotations:
            metadata["annotations"] = dict(annotations)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TokenRequest",
            "metadata": metadata,
            "spec": dict(spec),
        }
        return _json(
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, _preload_content=False
            )
        )

    def patch_token_request(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> JsonObject:
        """A JSON merge patch of the main resource (``.status`` in it is ignored, as by the API)."""
        return _json(
            self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.ns(namespace),
                PLURAL,
                name,
                dict(patch),
                _preload_content=False,
                _content_type="application/merge-patch+json",
            )
        )

    def delete_token_request(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.ns(namespace), PLURAL, name, _preload_content=False
        )

    def read_token_request(self, namespace: str, name: str) -> JsonObject | None:
        try:
            return _json(
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.ns(namespace), PLURAL, name, _preload_content=False
                )
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def read_status(self, namespace: str, name: str) -> JsonObject | None:
        """The TokenRequest's ``.status`` (``{}`` if none yet), or None without a TokenRequest."""
        obj = self.read_token_request(namespace, name)
        return None if obj is None else dict(obj.get("status") or {})

    def condition(self, namespace: str, name: str, type_: str) -> JsonObject | None:
        """One condition (``Ready``, ``Degraded``) from the status, or None."""
        status = self.read_status(namespace, name) or {}
        conditions: list[JsonObject] = status.get("conditions") or []
        return next((c for c in conditions if c.get("type") == type_), None)

    # ---- Secrets --------------------------------------------------------------------------

    def read_secret_object(self, namespace: str, name: str) -> JsonObject | None:
        try:
            return _json(
                self.core.read_namespaced_secret(name, self.ns(namespace), _preload_content=False)
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's ``data``, base64-decoded to text, or None if there is no such Secret."""
        obj = self.read_secret_object(namespace, name)
        if obj is None:
            return None
        return {
            key: base64.b64decode(value).decode() for key, value in (obj.get("data") or {}).items()
        }

    def create_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        owner: Mapping[str, Any] | None = None,
    ) -> JsonObject:
        """Create a Secret from text values (``owner``: an object to reference as controller)."""
        namespace = self.ensure_namespace(namespace)
        metadata: JsonObject = {
            "name": name,
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
        }
        if owner is not None:
            metadata["ownerReferences"] = [owner_reference(owner)]
        body: Any = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": metadata,
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        return _json(self.core.create_namespaced_secret(namespace, body, _preload_content=False))

    def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """A strategic merge patch of a Secret, as ``kubectl patch`` does it."""
        self.core.patch_namespaced_secret(
            name, self.ns(namespace), dict(patch), _preload_content=False
        )

    def delete_secret(self, namespace: str, name: str) -> None:
        self.core.delete_namespaced_secret(name, self.ns(namespace), _preload_content=False)

    def create_credentials_secret(
        self,
        namespace: str,
        name: str,
        *,
        client_id: str,
        client_secret: str,
        token_endpoint: str,
    ) -> JsonObject:
        """A credentials Secret as ``spec.credentials.secretRef`` names it."""
        return self.create_secret(
            namespace,
            name,
            {
                "AZURE_APP_CLIENT_ID": client_id,
                "AZURE_APP_CLIENT_SECRET": client_secret,
                "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": token_endpoint,
            },
        )

    # ---- Events ---------------------------------------------------------------------------

    def events_for(
        self, namespace: str, name: str, *, kind: str | None = "TokenRequest"
    ) -> list[JsonObject]:
        """Core v1 Events about one object, oldest first."""
        selector = f"involvedObject.name={name}" + (f",involvedObject.kind={kind}" if kind else "")
        events = _json(
            self.core.list_namespaced_event(
                self.ns(namespace), field_selector=selector, _preload_content=False
            )
        )["items"]
        return sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def events_text(self, namespace: str) -> str:
        """Every Event of a namespace as the API server sends it (JSON text)."""
        response: Any = self.core.list_namespaced_event(self.ns(namespace), _preload_content=False)
        return str(response.data.decode())

    # ---- history and the operator's requests ------------------------------------------------

    def versions(self, resource: str, namespace: str, name: str) -> list[JsonObject | None]:
        """Every stored version of an object since the test began, oldest first; None marks a
        deletion. Each is one write that changed the object (no-op writes store nothing).

        ``resource``: ``SECRETS`` (``"v1/secrets"``) or ``TOKEN_REQUESTS``.
        """
        if resource == SECRETS:
            current = self.read_secret_object(namespace, name)
        else:
            current = self.read_token_request(namespace, name)
        return self._history[resource].versions(self.ns(namespace), name, current)

    def requests(self, method: str | None = None, path: str = "") -> list[Exchange]:
        """The operator's API requests (through the proxy), oldest first: ``path`` is a regex."""
        return self.proxy.requests(method, path)


def owner_reference(owner: Mapping[str, Any], *, controller: bool = True) -> JsonObject:
    """An owner reference to ``owner`` as the operator is meant to build it."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


class OperatorFactory:
    """Starts (and restarts) the operator; every run is stopped at the end of the test."""

    def __init__(self, kube: Kube, monkeypatch: pytest.MonkeyPatch) -> None:
        self._kube = kube
        self._monkeypatch = monkeypatch
        self.runs: list[OperatorRun] = []

    def start(
        self,
        *,
        env: Mapping[str, str | None] | None = None,
        extra_args: Sequence[str] = (),
        settings: kopf.OperatorSettings | None = None,
        timeout: float = 15.0,
    ) -> OperatorRun:
        """Start the operator; wait until it watches TokenRequests and Secrets (through the proxy).

        ``env`` overrides ``operator_env`` for this and later runs (None removes a variable).
        """
        if self.current is not None:
            raise RuntimeError("one operator at a time in this process: stop the running one first")
        for key, value in (env or {}).items():
            if value is None:
                self._monkeypatch.delenv(key, raising=False)
            else:
                self._monkeypatch.setenv(key, value)
        run = OperatorRun(
            proxy=self._kube.proxy,
            ready_watches=(WATCH_TOKEN_REQUESTS, WATCH_OWNED_SECRETS),
            extra_args=extra_args,
            settings=settings,
        )
        self.runs.append(run)
        return run.start(timeout=timeout)

    def restart(self, **kwargs: Any) -> OperatorRun:
        """Stop the running operator (gracefully) and start a fresh one with the same arguments."""
        if self.current is not None:
            self.current.stop()
        return self.start(**kwargs)

    @property
    def current(self) -> OperatorRun | None:
        return next((run for run in reversed(self.runs) if run.running), None)

    @property
    def all_text(self) -> str:
        """The logs and output of every run of this test, for "never logged" assertions."""
        return "\n".join(run.all_text for run in self.runs)

    def assert_never_logged(self, *needles: str) -> None:
        for run in self.runs:
            run.assert_never_logged(*needles)

    def stop_all(self) -> list[BaseException]:
        """Stop every run; return the failures (unclean exits) instead of raising the first."""
        failures: list[BaseException] = []
        for run in self.runs:
            try:
                run.stop()
            except Exception as error:  # all of them are reported by the fixture
                failures.append(error)
        return failures
