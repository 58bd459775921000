"""What the operator e2e tests share: names, polling, reading TokenRequests and Secrets.

Everything here is blocking and polls with a deadline: the tests wait for the
real operator, apiserver and garbage collector, never for a fixed sleep.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from devenv.binaries import ensure_binaries
from devenv.controlplane import Cluster
from devenv.operatorprocess import OperatorProcess
from devenv.tokenserver import DEFAULT_ISSUER

# The operator's own identity in every e2e test; the secret is distinctive so
# that a leak anywhere (log, status, events) can be searched for.
OPERATOR_CLIENT_ID = "e2e-operator"
OPERATOR_CLIENT_SECRET = "e2e-client-secret-xyz"
CLUSTER_NAME = "e2e"
# M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR matching every namespace.
ALL_NAMESPACES = "kubernetes.io/metadata.name"
GROUP, VERSION, PLURAL = "m2m.dev", "v1alpha1", "tokenrequests"
API_VERSION = f"{GROUP}/{VERSION}"
MANAGED_BY = ("app.kubernetes.io/managed-by", "m2m-token-operator")

JsonObject = dict[str, Any]
_T = TypeVar("_T")


class NamespaceFactory(Protocol):
    def __call__(self) -> str: ...


class OperatorFactory(Protocol):
    def __call__(
        self,
        *,
        issuer: str = DEFAULT_ISSUER,
        args: Sequence[str] = ("--standalone",),
        settings: Mapping[str, str] | None = None,
        name: str = "operator",
        start: bool = True,
    ) -> OperatorProcess: ...


class WaitTimeout(AssertionError):
    pass


def wait_for(
    check: Callable[[], _T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.25,
    operator: OperatorProcess | None = None,
) -> _T:
    """Poll `check` until it returns something other than None/False; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if operator is not None and operator.pid is not None and not operator.running:
            raise WaitTimeout(
                f"the operator exited while waiting for {what}:\n{operator.log_tail()}"
            )
        if time.monotonic() > deadline:
            tail = f"\noperator log:\n{operator.log_tail()}" if operator else ""
            raise WaitTimeout(f"no {what} within {timeout}s{tail}")
        time.sleep(interval)


def token_request(
    name: str,
    *,
    target: Mapping[str, str] | None = None,
    scope: str | None = None,
    secret_name: str | None = None,
    refresh_before: str | None = None,
    credentials_secret: str | None = None,
) -> JsonObject:
    spec: JsonObject = {}
    if target is not None:
        spec["target"] = dict(target)
    if scope is not None:
        spec["scope"] = scope
    if secret_name is not None:
        spec["secretName"] = secret_name
    if refresh_before is not None:
        spec["refreshBefore"] = refresh_before
    if credentials_secret is not None:
        spec["credentials"] = {"secretRef": {"name": credentials_secret}}
    return {
        "apiVersion": API_VERSION,
        "kind": "TokenRequest",
        "metadata": {"name": name},
        "spec": spec,
    }


@dataclass(frozen=True)
class SecretView:
    """A Secret as the tests look at it: decoded data, metadata, resourceVersion."""

    raw: k8s.V1Secret

    @property
    def data(self) -> dict[str, str]:
        return {k: base64.b64decode(v).decode() for k, v in (self.raw.data or {}).items()}

    @property
    def token(self) -> str:
        return self.data["token"]

    @property
    def metadata(self) -> k8s.V1ObjectMeta:
        assert self.raw.metadata is not None
        return self.raw.metadata

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.metadata.labels or {})

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.metadata.annotations or {})

    @property
    def resource_version(self) -> str:
        return str(self.metadata.resource_version)


class Kube:
    """The admin's view of one test's cluster: TokenRequests, Secrets, Events."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)

    # TokenRequests

    def create_token_request(self, namespace: str, body: JsonObject) -> JsonObject:
        created = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
        )
        return cast(JsonObject, created)

    def get_token_request(self, namespace: str, name: str) -> JsonObject | None:
        try:
            found = cast(
                JsonObject,
                self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def delete_token_request(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def list_token_requests(self, namespace: str) -> list[JsonObject]:
        listed = cast(
            JsonObject, self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        )
        items: list[JsonObject] = listed["items"]
        return items

    def wait_ready(
        self,
        namespace: str,
        name: str,
        *,
        timeout: float = 30.0,
        operator: OperatorProcess | None = None,
    ) -> JsonObject:
        """Wait for Ready=True at the TokenRequest's current generation; the object."""

        def ready() -> JsonObject | None:
            body = self.get_token_request(namespace, name)
            if body is None:
                return None
            status = body.get("status") or {}
            condition = condition_of(status, "Ready")
            generation = body["metadata"].get("generation")
            if condition.get("status") == "True" and status.get("observedGeneration") == generation:
                return body
            return None

        return wait_for(
            ready, timeout=timeout, what=f"Ready TokenRequest {namespace}/{name}", operator=operator
        )

    # Secrets

    def get_secret(self, namespace: str, name: str) -> SecretView | None:
        try:
            return SecretView(self.core.read_namespaced_secret(name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def wait_secret(
        self,
        namespace: str,
        name: str,
        *,
        timeout: float = 30.0,
        operator: OperatorProcess | None = None,
        unlike: str | None = None,
    ) -> SecretView:
        """Wait for the Secret to exist (and, with `unlike`, to hold another token)."""

        def found() -> SecretView | None:
            secret = self.get_secret(namespace, name)
            if secret is None or "token" not in secret.data:
                return None
            if unlike is not None and secret.token == unlike:
                return None
            return secret

        what = f"Secret {namespace}/{name}" + (" with a new token" if unlike else "")
        return wait_for(found, timeout=timeout, what=what, operator=operator)

    # Events

    def create_secret(
        self, namespace: str, name: str, string_data: Mapping[str, str]
    ) -> SecretView:
        return SecretView(
            self.core.create_namespaced_secret(
                namespace,
                k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data=dict(string_data)),
            )
        )

    def events(self, namespaces: Iterable[str]) -> list[k8s.CoreV1Event]:
        return [
            event
            for namespace in namespaces
            for event in self.core.list_namespaced_event(namespace).items
        ]

    def wait_events(
        self,
        namespaces: Iterable[str],
        at_least: Mapping[str, int],
        *,
        timeout: float = 30.0,
        operator: OperatorProcess | None = None,
    ) -> list[k8s.CoreV1Event]:
        """Wait until the Events include `at_least[reason]` of each reason; all of them.

        The operator posts an event after it has written the status (the event is a
        courtesy and comes last), so a test that has seen the status it waited for
        must still wait for the event: reading the events at once races the operator.
        """
        where = list(namespaces)

        def enough() -> list[k8s.CoreV1Event] | None:
            events = self.events(where)
            reasons = Counter(event.reason for event in events)
            if all(reasons[reason] >= count for reason, count in at_least.items()):
                return events
            return None

        wanted = ", ".join(f"{count} {reason}" for reason, count in at_least.items())
        return wait_for(enough, timeout=timeout, what=f"events ({wanted})", operator=operator)


def credentials(client_id: str, client_secret: str, token_endpoint: str) -> dict[str, str]:
    """The keys of a credentials Secret (spec.credentials.secretRef)."""
    return {
        "AZURE_APP_CLIENT_ID": client_id,
        "AZURE_APP_CLIENT_SECRET": client_secret,
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": token_endpoint,
    }


def condition_of(status: Mapping[str, Any], kind: str) -> JsonObject:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return {}


# Lines in the operator's log that mean something went wrong. With
# M2M_LOG_FORMAT=text the format is Kopf's "full": `[time] logger [LEVEL] message`.
_PROBLEM = re.compile(r"\[(ERROR|CRITICAL)\s*\]|Traceback \(most recent call last\)")
# Warnings from the operator's own code (a failed token request, unusable credentials).
_OWN_WARNING = re.compile(r"^\[[^\]]*\] m2m_token_operator\S* *\[WARNING *\]", re.M)


def log_problems(text: str) -> list[str]:
    """Error lines, tracebacks and the operator's own warnings in a log."""
    return [
        line for line in text.splitlines() if _PROBLEM.search(line) or _OWN_WARNING.search(line)
    ]


def find_leaks(haystacks: Mapping[str, str], needles: Iterable[str]) -> list[str]:
    """Which secret values (needles) appear in which texts; each finding names both."""
    found = []
    for needle in needles:
        for where, text in haystacks.items():
            if needle and needle in text:
                found.append(f"{needle[:12]}... appears in {where}")
    return found


def kubectl(
    cluster: Cluster, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The pinned kubectl as the admin of `cluster` (local or existing)."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR") if key in os.environ}
    return subprocess.run(
        [str(ensure_binaries().kubectl), f"--kubeconfig={cluster.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )


def parse_table(text: str) -> list[dict[str, str]]:
    """kubectl's table output as rows keyed by column header (columns: 2+ spaces apart)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=True)) for line in lines[1:]]
