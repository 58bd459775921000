"""What integration tests import: the cluster handle, the polling helper, the operator factory.

The fixtures in ``conftest.py`` build these; tests use them through the
fixtures and import only the names they need (``wait_for``, ``Reply``, ...).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import pathlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import kmock
import kopf
import kubernetes
import pytest
import yaml

from ._emulator import CRDS, EVENTS, NAMESPACES, SECRETS, EmulatorServer, KubeEmulator
from ._operator import DEFAULT_MODULE, TOKEN_REQUESTS, OperatorRun
from ._operator import SECRETS as SECRETS_WATCH
from ._token_endpoint import Reply, TokenCall, TokenEndpoint

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "CLUSTER_NAME",
    "GROUP",
    "PLURAL",
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
TOKEN_REQUEST = kmock.resource(GROUP, VERSION, PLURAL)
CLIENT_ID = "test-client-id-0000"
CLIENT_SECRET = "s3cr3t-client-value"
CLUSTER_NAME = "test-cluster"
TEST_USER_AGENT = "m2m-integration-tests"
ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"

# The contract's CRD, for when crds/ has none (names and the status subresource only).
_FALLBACK_CRD: JsonObject = {
    "metadata": {"name": "tokenrequests.m2m.dev"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "kind": "TokenRequest",
            "listKind": "TokenRequestList",
            "plural": PLURAL,
            "singular": "tokenrequest",
            "shortNames": ["tokreq"],
            "categories": ["m2m"],
        },
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def declare_cluster(emulator: KubeEmulator) -> None:
    """The resources Kopf and the operator need, the project's CRDs, and namespace ``default``."""
    emulator.add_resource(SECRETS, kind="Secret", namespaced=True)
    emulator.add_resource(EVENTS, kind="Event", namespaced=True, shortnames={"ev"})
    emulator.add_resource(
        CRDS, kind="CustomResourceDefinition", namespaced=False, subresources={"status"}
    )
    crds = [
        doc
        for path in sorted(CRD_DIR.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    crds = [
        doc
        for doc in crds
        if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"
    ]
    for crd in crds or [_FALLBACK_CRD]:
        emulator.add_crd(crd)
    emulator.create(NAMESPACES, None, {"metadata": {"name": "default"}})


def write_kubeconfig(path: pathlib.Path, server: str) -> pathlib.Path:
    """A kubeconfig for plain http on loopback (no TLS, a dummy bearer token)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "emulator-bearer-token"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
            }
        ],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def wait_for(
    predicate: Callable[[], _T | Awaitable[_T]],
    timeout: float = 5.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    *,
    interval: float = 0.02,
    message: str | None = None,
) -> _T:
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


class Kube:
    """The emulated cluster as a test sees it: the API clients, helpers, and the store itself."""

    def __init__(self, server: EmulatorServer, kubeconfig: pathlib.Path) -> None:
        self.server = server
        self.kubeconfig = kubeconfig
        # An explicit client, never the module-global default configuration (Kopf's login
        # and the operator call load_kube_config(), which replaces that default).
        self.api: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(
            config_file=str(kubeconfig)
        )
        self.api.user_agent = TEST_USER_AGENT  # tells the test's requests from the operator's
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def emulator(self) -> KubeEmulator:
        """The kmock emulator (for reactions such as ``kube.emulator['patch', ...] << 500``).

        It lives on another thread's loop: read its store through :meth:`call`.
        """
        assert self.server.emulator is not None
        return self.server.emulator

    def call(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run ``function(*args, **kwargs)`` on the emulator's loop (a consistent view)."""
        return self.server.call(function, *args, **kwargs)

    def close(self) -> None:
        self.api.close()

    # ---- namespaces and TokenRequests --------------------------------------------------------

    def ensure_namespace(self, name: str) -> None:
        try:
            self.core.create_namespace({"metadata": {"name": name}}, _preload_content=False)
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise

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
        self.ensure_namespace(namespace)
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
                GROUP, VERSION, namespace, PLURAL, name, dict(patch), _preload_content=False
            )
        )

    def delete_token_request(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
        )

    def read_token_request(self, namespace: str, name: str) -> JsonObject | None:
        try:
            return _json(
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
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
            return _json(self.core.read_namespaced_secret(name, namespace, _preload_content=False))
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
        self.ensure_namespace(namespace)
        metadata: JsonObject = {
            "name": name,
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
        }
        if owner is not None:
            metadata["ownerReferences"] = [owner_reference(owner)]
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": metadata,
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        return _json(self.core.create_namespaced_secret(namespace, body, _preload_content=False))

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
                namespace, field_selector=selector, _preload_content=False
            )
        )["items"]
        return sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))

    # ---- the store's history --------------------------------------------------------------

    def versions(
        self, resource: str | kmock.resource, namespace: str | None, name: str
    ) -> list[JsonObject | None]:
        """Every stored version of an object, oldest first; None marks a deletion.

        Each version is one write that changed the object (no-op writes store nothing).
        ``resource``: e.g. ``"v1/secrets"`` or ``"m2m.dev/v1alpha1/tokenrequests"``.
        """

        def collect() -> list[JsonObject | None]:
            key = (kmock.resource(resource), namespace, name)
            if key not in self.emulator.objects:
                return []
            return [
                None if v is None else json.loads(json.dumps(v.raw))
                for v in self.emulator.objects[key].history
            ]

        return self.call(collect)

    def requests(
        self, method: str | None = None, path_prefix: str = "", *, include_tests: bool = False
    ) -> list[kmock.Request]:
        """The API requests the emulator received, oldest first: the operator's (and Kopf's) only,
        unless ``include_tests``; optionally only one HTTP method and paths under a prefix."""

        def collect() -> list[kmock.Request]:
            return [
                r
                for r in self.emulator.request_log
                if (method is None or r.method.value == method.upper())
                and r.url.path.startswith(path_prefix)
                and (include_tests or r.headers.get("User-Agent") != TEST_USER_AGENT)
            ]

        return self.call(collect)


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
        module: str | None = DEFAULT_MODULE,
        path: str | pathlib.Path | None = None,
        env: Mapping[str, str | None] | None = None,
        ready_watches: Sequence[str] | None = None,
        purge_prefixes: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        settings: kopf.OperatorSettings | None = None,
        timeout: float = 15.0,
    ) -> OperatorRun:
        """Start the operator (``module``, or a handlers file at ``path``); wait until it watches.

        ``env`` overrides ``operator_env`` for this and later runs (None removes a variable).
        ``ready_watches``: the resources whose watch means "started"; by default the
        TokenRequests, plus the Secrets for the real operator.
        """
        if self.current is not None:
            raise RuntimeError("one operator at a time in this process: stop the running one first")
        for key, value in (env or {}).items():
            if value is None:
                self._monkeypatch.delenv(key, raising=False)
            else:
                self._monkeypatch.setenv(key, value)
        if path is not None:
            module = None
        if ready_watches is None:
            ready_watches = (
                (TOKEN_REQUESTS, SECRETS_WATCH) if module == DEFAULT_MODULE else (TOKEN_REQUESTS,)
            )
        if purge_prefixes is None:
            purge_prefixes = (
                ("m2m_token_operator",) if module is None else ("m2m_token_operator", module)
            )
        run = OperatorRun(
            server=self._kube.server,
            module=module,
            path=str(path) if path is not None else None,
            ready_watches=ready_watches,
            purge_prefixes=purge_prefixes,
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
