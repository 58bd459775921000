"""Every setting of the operator, read from the environment once and checked at start.

A bad value stops the operator at start with a message naming the variable,
the value and what would be accepted, rather than surfacing as odd behaviour
hours later. All problems are reported at once, so one restart fixes them all.
An empty variable counts as unset: manifests often template empty values.

The operator's own client id and secret are deliberately not held here: they
are read afresh on every use (see `credentials.operator_identity`), because a
mounted Secret is rotated in place while the operator keeps running.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from m2m_token_operator.api.constants import (
    DEFAULT_FEDERATION_AUDIENCE,
    DEFAULT_SEAL_NAMESPACE,
    DEFAULT_SEAL_SECRET_NAME,
    IN_CLUSTER_NAMESPACE_FILE,
)
from m2m_token_operator.api.kube_names import is_dns_label, is_dns_subdomain
from m2m_token_operator.api.spec import SpecError, resolve_scope
from m2m_token_operator.kube.namespaces import SELECTOR_SETTING, SelectorError, validate_selector
from m2m_token_operator.tokens.credentials import (
    TOKEN_ENDPOINT_KEY,
    EndpointPolicy,
    parse_host_entry,
)
from m2m_token_operator.tokens.timing import RefreshPolicy, RetryPolicy

MICROSOFT_LOGIN_HOST = "login.microsoftonline.com"
LOG_FORMATS = ("json", "text")
# Kopf takes any integer; bounded so that every peer can hold it in a 32-bit integer.
PEERING_PRIORITY_LIMIT = 2**31 - 1
# Audiences a Kubernetes API server accepts ServiceAccount tokens for, by default and as
# clusters commonly configure them. A token minted for one of these would work against the
# cluster's API as that ServiceAccount; sending it to a token endpoint hands that away.
KUBERNETES_API_AUDIENCES = frozenset(
    {
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "https://kubernetes",
        "https://kubernetes.default",
        "https://kubernetes.default.svc",
        "https://kubernetes.default.svc.cluster.local",
    }
)
# The operator's own ServiceAccount token in a pod: its `iss` and `aud` are what this
# cluster's API server issues and accepts (read without verification: nothing is trusted
# from it, it only names more audiences to refuse).
SERVICE_ACCOUNT_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class SettingsError(ValueError):
    """One or more settings are unusable; the message lists each, one per line."""


@dataclass(frozen=True)
class Settings:
    cluster_name: str
    credentials_dir: Path | None
    connect_timeout: float
    read_timeout: float
    allowed_endpoint_hosts: frozenset[str]
    allow_insecure_http: bool
    refresh_jitter: timedelta
    refresh_floor: timedelta
    min_refresh_interval: timedelta
    retry_initial: timedelta
    retry_max: timedelta
    retry_after_max: timedelta
    permanent_failure_hold: timedelta
    fetch_workers: int
    metrics_port: int
    log_format: str
    peering_priority: int | None = None  # None: derived from the host name (see handlers)
    # A total for one token request, headers and body (connect + read timeouts by default).
    request_deadline: float = 20.0
    # Looks in flight at once per namespace, so no namespace can take every worker.
    namespace_concurrency: int = 4
    # Token requests in flight at once per namespace: a look waiting for one gives back
    # its slot, so this, not the look budget, bounds what one tenant's endpoint can hold.
    namespace_fetch_concurrency: int = 4
    # The audience of the ServiceAccount tokens minted for workload identity federation.
    federation_audience: str = DEFAULT_FEDERATION_AUDIENCE
    # None: no namespace may use the operator's own identity (see namespaces.py).
    operator_identity_namespace_selector: str | None = None
    # (namespace, name) of the Secret holding the restart seal's HMAC key (see seal.py).
    seal_key_secret: tuple[str, str] = (DEFAULT_SEAL_NAMESPACE, DEFAULT_SEAL_SECRET_NAME)
    # The operator's own namespace (its identity, its seal key): never served.
    operator_namespace: str = DEFAULT_SEAL_NAMESPACE

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        service_account_token_file: Path = SERVICE_ACCOUNT_TOKEN_FILE,
    ) -> Settings:
        env: Mapping[str, str] = os.environ if environ is None else environ
        reader = _Reader(env)

        cluster_name = reader.text("M2M_CLUSTER_NAME")
        if cluster_name:
            try:
                resolve_scope(application="app", namespace="namespace", cluster=cluster_name)
            except SpecError:
                reader.problem(
                    "M2M_CLUSTER_NAME",
                    cluster_name,
                    "a DNS label: at most 63 lowercase letters, digits and '-', such as prod-gcp",
                )

        credentials_dir: Path | None = None
        directory = reader.text("M2M_CREDENTIALS_DIR")
        if directory:
            credentials_dir = Path(directory)
            if not credentials_dir.is_dir():
                reader.problem("M2M_CREDENTIALS_DIR", directory, "an existing directory")

        insecure = reader.boolean("M2M_ALLOW_INSECURE_HTTP_ENDPOINTS", default=False)

        allowed_text = reader.text("M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS")
        if allowed_text:
            hosts: set[str] = set()
            for entry in allowed_text.split(","):
                if not entry.strip():
                    continue
                try:
                    parse_host_entry(entry)
                except ValueError:
                    reader.problem(
                        "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS",
                        entry.strip(),
                        "comma-separated host names, optionally with :port or a leading '*.'",
                    )
                    continue
                hosts.add(entry.strip().lower().rstrip("."))
            allowed = frozenset(hosts)
            if not allowed:
                reader.problem("M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS", allowed_text, "a host name")
        else:
            allowed = frozenset({MICROSOFT_LOGIN_HOST}) | _default_identity_host(
                env, credentials_dir
            )

        selector = reader.text(SELECTOR_SETTING) or None
        if selector is not None:
            try:
                validate_selector(selector)
            except SelectorError as error:
                reader.problem(
                    SELECTOR_SETTING,
                    selector,
                    f"a label selector such as 'm2m.dev/operator-identity=allowed' ({error})",
                )
                selector = None

        settings = cls(
            cluster_name=cluster_name,
            credentials_dir=credentials_dir,
            connect_timeout=reader.seconds("M2M_CONNECT_TIMEOUT_SECONDS", default=5, minimum=0),
            read_timeout=reader.seconds("M2M_READ_TIMEOUT_SECONDS", default=15, minimum=0),
            allowed_endpoint_hosts=allowed,
            allow_insecure_http=insecure,
            refresh_jitter=reader.duration("M2M_REFRESH_JITTER_SECONDS", default=30),
            refresh_floor=reader.duration("M2M_REFRESH_MIN_REMAINING_SECONDS", default=60),
            min_refresh_interval=reader.duration("M2M_MIN_REFRESH_INTERVAL_SECONDS", default=60),
            retry_initial=reader.duration("M2M_RETRY_INITIAL_SECONDS", default=5, positive=True),
            retry_max=reader.duration("M2M_RETRY_MAX_SECONDS", default=300, positive=True),
            retry_after_max=reader.duration(
                "M2M_RETRY_AFTER_MAX_SECONDS", default=3600, positive=True
            ),
            permanent_failure_hold=reader.duration(
                "M2M_PERMANENT_FAILURE_HOLD_SECONDS", default=300, positive=True
            ),
            # 8 made the first looks of a burst over many scopes wait for a thread while
            # each fetch waited for the endpoint: p99 create -> Ready 1.3-1.9 s -> 1.1-1.3 s
            # in bench/scale_bench.py's 1,000 TokenRequests over 100 scopes.
            fetch_workers=reader.integer("M2M_FETCH_WORKERS", default=32, low=1, high=256),
            metrics_port=reader.integer("M2M_METRICS_PORT", default=8080, low=0, high=65535),
            log_format=reader.choice("M2M_LOG_FORMAT", default="json", choices=LOG_FORMATS),
            peering_priority=reader.optional_integer(
                "M2M_PEERING_PRIORITY",
                example=100,
                low=-PEERING_PRIORITY_LIMIT,
                high=PEERING_PRIORITY_LIMIT,
            ),
            federation_audience=_federation_audience(reader, service_account_token_file),
            operator_identity_namespace_selector=selector,
            seal_key_secret=_seal_key_secret(reader, env),
            operator_namespace=_operator_namespace(env),
        )
        settings = dataclasses.replace(
            settings,
            request_deadline=reader.seconds(
                "M2M_REQUEST_DEADLINE_SECONDS",
                default=settings.connect_timeout + settings.read_timeout,
                minimum=0,
            ),
            namespace_concurrency=reader.integer(
                "M2M_NAMESPACE_CONCURRENCY", default=4, low=1, high=256
            ),
            namespace_fetch_concurrency=reader.integer(
                "M2M_NAMESPACE_FETCH_CONCURRENCY", default=4, low=1, high=256
            ),
        )
        if settings.retry_max < settings.retry_initial:
            reader.problem(
                "M2M_RETRY_MAX_SECONDS",
                env.get("M2M_RETRY_MAX_SECONDS", ""),
                f"at least M2M_RETRY_INITIAL_SECONDS ({settings.retry_initial.total_seconds():g})",
            )
        reader.raise_problems()
        return settings

    def refresh_policy(self) -> RefreshPolicy:
        return RefreshPolicy(
            jitter=self.refresh_jitter,
            floor=self.refresh_floor,
            min_interval=self.min_refresh_interval,
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            initial=self.retry_initial,
            maximum=self.retry_max,
            retry_after_max=self.retry_after_max,
            permanent_hold=self.permanent_failure_hold,
        )

    def endpoint_policy(self) -> EndpointPolicy:
        return EndpointPolicy(
            allowed_hosts=self.allowed_endpoint_hosts,
            allow_insecure_http=self.allow_insecure_http,
        )


def _normal_audience(audience: str) -> str:
    return audience.strip().rstrip("/").lower()


def api_server_audiences(token_file: Path) -> frozenset[str]:
    """The issuer and audiences in the operator's own ServiceAccount token (none outside a pod)."""
    try:
        payload = token_file.read_text(encoding="ascii").strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (OSError, UnicodeDecodeError, IndexError, binascii.Error, ValueError):
        return frozenset()
    if not isinstance(claims, dict):
        return frozenset()
    audiences = claims.get("aud")
    found = [claims.get("iss"), *(audiences if isinstance(audiences, list) else [audiences])]
    return frozenset(_normal_audience(a) for a in found if isinstance(a, str) and a.strip())


def _federation_audience(reader: _Reader, token_file: Path) -> str:
    """M2M_FEDERATION_AUDIENCE: never one the cluster's own API server accepts."""
    audience = reader.text("M2M_FEDERATION_AUDIENCE") or DEFAULT_FEDERATION_AUDIENCE
    refused = {_normal_audience(a) for a in KUBERNETES_API_AUDIENCES}
    refused |= api_server_audiences(token_file)
    if _normal_audience(audience) in refused:
        reader.problem(
            "M2M_FEDERATION_AUDIENCE",
            audience,
            "the audience your token endpoint's federated credentials expect (Entra ID:"
            f" {DEFAULT_FEDERATION_AUDIENCE}), never the Kubernetes API server's own audience"
            " or issuer: a ServiceAccount token minted for it works against this cluster's"
            " API, and the operator would send it to a token endpoint",
        )
    return audience


def _operator_namespace(env: Mapping[str, str]) -> str:
    """POD_NAMESPACE (the Deployment sets it), else the in-cluster ServiceAccount
    namespace file, else `m2m-token-operator`."""
    namespace = env.get("POD_NAMESPACE", "").strip()
    if not namespace:
        try:
            namespace = Path(IN_CLUSTER_NAMESPACE_FILE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            namespace = ""
    return namespace or DEFAULT_SEAL_NAMESPACE


def _seal_key_secret(reader: _Reader, env: Mapping[str, str]) -> tuple[str, str]:
    """M2M_SEAL_KEY_SECRET (namespace/name), else the operator's own namespace."""
    raw = reader.text("M2M_SEAL_KEY_SECRET")
    if raw:
        namespace, _, name = raw.partition("/")
        if is_dns_label(namespace) and is_dns_subdomain(name):
            return namespace, name
        reader.problem(
            "M2M_SEAL_KEY_SECRET",
            raw,
            f"namespace/name, such as m2m-token-operator/{DEFAULT_SEAL_SECRET_NAME}",
        )
    return _operator_namespace(env), DEFAULT_SEAL_SECRET_NAME


def _default_identity_host(env: Mapping[str, str], directory: Path | None) -> frozenset[str]:
    """The host of the operator's own endpoint: its applications' Secrets use it too."""
    url = None
    if directory is not None:
        try:
            url = (directory / TOKEN_ENDPOINT_KEY).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            url = None
    if not url:
        url = env.get(TOKEN_ENDPOINT_KEY, "").strip()
    try:
        host = urlsplit(url).hostname if url else None
    except ValueError:
        host = None
    # A bad endpoint is reported when the identity is used; it is no reason not to start.
    return frozenset({host.rstrip(".")}) if host else frozenset()


class _Reader:
    """Reads variables, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self._problems: list[str] = []

    def problem(self, name: str, value: str, expected: str) -> None:
        self._problems.append(f"{name}={value!r} is not valid: expected {expected}")

    def raise_problems(self) -> None:
        if self._problems:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(self._problems))

    def text(self, name: str) -> str:
        return self._env.get(name, "").strip()

    def seconds(self, name: str, *, default: float, minimum: float) -> float:
        raw = self.text(name)
        if not raw:
            return float(default)
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= minimum or value > 86400:
            self.problem(name, raw, "a positive number of seconds, such as " + f"{default:g}")
            return float(default)
        return value

    def duration(self, name: str, *, default: float, positive: bool = False) -> timedelta:
        raw = self.text(name)
        if not raw:
            return timedelta(seconds=default)
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        too_small = value <= 0 if positive else value < 0
        if not math.isfinite(value) or too_small or value > 30 * 86400:
            kind = "a positive" if positive else "a non-negative"
            self.problem(
                name, raw, f"{kind} number of seconds (at most 30 days), such as {default}"
            )
            return timedelta(seconds=default)
        return timedelta(seconds=value)

    def integer(self, name: str, *, default: int, low: int, high: int) -> int:
        value = self.optional_integer(name, example=default, low=low, high=high)
        return default if value is None else value

    def optional_integer(self, name: str, *, example: int, low: int, high: int) -> int | None:
        raw = self.text(name)
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            self.problem(name, raw, f"a whole number from {low} to {high}, such as {example}")
            return None
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        raw = self.text(name).lower()
        if not raw:
            return default
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        self.problem(name, raw, "true or false")
        return default

    def choice(self, name: str, *, default: str, choices: tuple[str, ...]) -> str:
        raw = self.text(name).lower()
        if not raw:
            return default
        if raw not in choices:
            self.problem(name, raw, " or ".join(repr(choice) for choice in choices))
            return default
        return raw
