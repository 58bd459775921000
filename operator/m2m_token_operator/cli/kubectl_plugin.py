"""`kubectl m2m`: day-two commands for TokenRequests, in the spirit of cert-manager's cmctl.

    kubectl m2m status NAME [-n NS]     conditions, expiry, refresh point, claims, events
    kubectl m2m refresh NAME [-n NS]    ask for a new token now (sets m2m.dev/refresh)
    kubectl m2m refresh -l SELECTOR [-A]   the same for every match (after a credential rotation)
    kubectl m2m claims NAME [-o yaml|json]   what the token says (status.token), never the token
    kubectl m2m doctor [NAMESPACE]      pods that will never see a refreshed token, and the fix
    kubectl m2m version                 this plugin's version and the API version it speaks

It runs with the user's kubeconfig and RBAC (`--kubeconfig`, `--context`,
`-n`), never with the operator's: `doctor` lists pods only where the user may.
It never reads a Secret, so it cannot print a token. Exit codes: 0 done, 1 not
found or another failure, 2 not allowed (HTTP 401/403) or no usable kubeconfig.

The rendering and the diagnosis are plain functions of JSON objects, tested
without a cluster; `main` only fetches and prints.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import yaml

from m2m_token_operator.api.constants import (
    DEGRADED,
    GROUP,
    KIND,
    PLURAL,
    READY,
    VERSION,
    JsonObject,
)
from m2m_token_operator.api.refresh_annotation import REFRESH_ANNOTATION
from m2m_token_operator.api.timefmt import format_time, parse_time_or_none

EXIT_OK = 0
EXIT_FAILED = 1  # not found, or the API server failed
EXIT_FORBIDDEN = 2  # 401/403, or no usable kubeconfig
MAX_EVENTS = 8
_TEXT_LIMIT = 400  # per printed field: a hostile status must not flood the terminal


# --- pure helpers ------------------------------------------------------------------


def clean(value: object, *, limit: int = _TEXT_LIMIT) -> str:
    """A value as one printable line: control characters (terminal escapes) replaced."""
    text = "" if value is None else str(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def relative(moment: datetime, now: datetime) -> str:
    """ "in 47m" or "3m ago", as kubectl users read ages."""
    seconds = int((moment - now).total_seconds())
    span = abs(seconds)
    if span < 120:
        text = f"{span}s"
    elif span < 2 * 3600:
        text = f"{span // 60}m"
    elif span < 2 * 86400:
        text = f"{span // 3600}h{(span % 3600) // 60}m"
    else:
        text = f"{span // 86400}d"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _time_line(value: object, now: datetime) -> str:
    moment = parse_time_or_none(value)
    if moment is None:
        return "-" if value in (None, "") else clean(value)
    return f"{format_time(moment)} ({relative(moment, now)})"


def refresh_patch(now: datetime) -> JsonObject:
    """The merge patch `refresh` sends: m2m.dev/refresh = the current time, RFC 3339."""
    return {"metadata": {"annotations": {REFRESH_ANNOTATION: format_time(now)}}}


def claims_of(body: Mapping[str, Any]) -> JsonObject | None:
    """status.token as the operator wrote it (decoded claims), or None."""
    token = (body.get("status") or {}).get("token")
    return dict(token) if isinstance(token, Mapping) else None


def render_claims(body: Mapping[str, Any], output: str) -> str:
    claims = claims_of(body) or {}
    if output == "json":
        return json.dumps(claims, indent=2, sort_keys=True) + "\n"
    return yaml.safe_dump(claims, sort_keys=True, default_flow_style=False)


NO_ROLES_HINT = (
    "none: the target application has not granted this client an app role;"
    " calls will likely get 403"
)


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    for condition in status.get("conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return condition
    return {}


def _event_time(event: Mapping[str, Any]) -> str:
    for field in ("lastTimestamp", "eventTime", "firstTimestamp"):
        value = event.get(field)
        if value:
            return str(value)
    return str((event.get("metadata") or {}).get("creationTimestamp") or "")


def render_status(
    body: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]] | None,
    *,
    now: datetime,
    events_error: str | None = None,
) -> str:
    """One screen: conditions, expiry, refresh point, claims, recent events."""
    metadata = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    lines = [f"TokenRequest {clean(metadata.get('namespace'))}/{clean(metadata.get('name'))}"]

    def row(label: str, value: str) -> None:
        lines.append(f"  {label + ':':<22}{value}")

    row("Scope", clean(status.get("scope") or spec.get("scope") or "-"))
    row("Secret", clean(status.get("secretName") or spec.get("secretName") or "-"))
    for kind in (READY, DEGRADED):
        condition = _condition(status, kind)
        if condition:
            row(
                kind,
                f"{clean(condition.get('status'))} ({clean(condition.get('reason'))})"
                f" {clean(condition.get('message'))}",
            )
        else:
            row(kind, "- (the operator has not reported yet)")
    row("Expires", _time_line(status.get("expiresAt"), now))
    row("Refresh at", _time_line(status.get("refreshAt"), now))
    failures = status.get("failedAttempts") or 0
    if failures:
        row(
            "Failed attempts",
            f"{clean(failures)}, last {_time_line(status.get('lastFailureTime'), now)}",
        )
    observed = status.get("observedGeneration")
    generation = metadata.get("generation")
    if observed is not None and generation is not None and observed != generation:
        row(
            "Observed generation",
            f"{clean(observed)} (spec is at {clean(generation)}: not handled yet)",
        )
    requested = (metadata.get("annotations") or {}).get(REFRESH_ANNOTATION)
    if requested is not None or status.get("lastRefreshRequest"):
        row("Refresh requested", clean(requested) if requested is not None else "-")
        row("Last handled", clean(status.get("lastRefreshRequest") or "-"))

    claims = claims_of(body)
    lines.append("Token (decoded claims; never the token itself):")
    if claims is None:
        lines.append("  - (no token yet, or the token is not a JWT)")
    else:
        roles = claims.get("roles") or []
        row("Audience", clean(claims.get("audience") or "-"))
        row("Client ID", clean(claims.get("clientId") or "-"))
        row("Tenant ID", clean(claims.get("tenantId") or "-"))
        row("Roles", ", ".join(clean(r) for r in roles) if roles else NO_ROLES_HINT)
        row("Issued at", _time_line(claims.get("issuedAt"), now))
        row("Expires at", _time_line(claims.get("expiresAt"), now))

    lines.append("Events (most recent last):")
    if events_error is not None:
        lines.append(f"  - ({clean(events_error)})")
    elif not events:
        lines.append("  - (none)")
    else:
        recent = sorted(events, key=_event_time)[-MAX_EVENTS:]
        for event in recent:
            moment = parse_time_or_none(_event_time(event))
            when = relative(moment, now) if moment else "-"
            count = event.get("count") or 1
            times = f" (x{count})" if isinstance(count, int) and count > 1 else ""
            lines.append(
                f"  {when:>10}  {clean(event.get('type')):<8}{clean(event.get('reason'))}{times}:"
                f" {clean(event.get('message'))}"
            )
    return "\n".join(lines) + "\n"


# --- doctor ------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One way a pod consumes a TokenRequest's Secret that never sees a refreshed token."""

    pod: str
    container: str  # "init:<name>" for init containers
    token_request: str
    secret: str
    how: str  # what the pod does
    fix: str  # what to do instead


def token_request_secrets(token_requests: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Secret name -> TokenRequest name, for the TokenRequests of one namespace."""
    secrets: dict[str, str] = {}
    for body in token_requests:
        name = str((body.get("metadata") or {}).get("name") or "")
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        for secret in (status.get("secretName"), spec.get("secretName") or name):
            if isinstance(secret, str) and secret:
                secrets.setdefault(secret, name)
    return secrets


def _secret_volumes(pod_spec: Mapping[str, Any], secrets: Mapping[str, str]) -> dict[str, str]:
    """Volume name -> Secret name, for volumes (plain or projected) of the watched Secrets."""
    volumes: dict[str, str] = {}
    for volume in pod_spec.get("volumes") or []:
        name = str(volume.get("name"))
        secret = str((volume.get("secret") or {}).get("secretName"))
        if secret in secrets:
            volumes[name] = secret
            continue
        for source in (volume.get("projected") or {}).get("sources") or []:
            projected = str((source.get("secret") or {}).get("name"))
            if projected in secrets:
                volumes[name] = projected
                break
    return volumes


def diagnose_pod(pod: Mapping[str, Any], secrets: Mapping[str, str]) -> list[Finding]:
    """How this pod reads the watched Secrets in ways that never see an update."""
    pod_name = str((pod.get("metadata") or {}).get("name") or "")
    spec = pod.get("spec") or {}
    volumes = _secret_volumes(spec, secrets)
    findings: list[Finding] = []
    containers = [(f"init:{c.get('name')}", c) for c in spec.get("initContainers") or []] + [
        (str(c.get("name")), c) for c in spec.get("containers") or []
    ]
    for label, container in containers:

        def add(secret: str, how: str, fix: str, *, label: str = label) -> None:
            findings.append(
                Finding(
                    pod=pod_name,
                    container=label,
                    token_request=secrets[secret],
                    secret=secret,
                    how=how,
                    fix=fix,
                )
            )

        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") in secrets:
                add(
                    ref["name"],
                    f"env {env.get('name')} from key {ref.get('key')}",
                    "an environment variable is read once, at container start: mount the"
                    " Secret as a volume (no subPath) and read the file on every use",
                )
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef") or {}
            if ref.get("name") in secrets:
                add(
                    ref["name"],
                    "envFrom (all keys as environment variables)",
                    "environment variables are read once, at container start: mount the"
                    " Secret as a volume (no subPath) and read the file on every use",
                )
        for mount in container.get("volumeMounts") or []:
            secret = volumes.get(mount.get("name"))
            sub_path = mount.get("subPath") or mount.get("subPathExpr")
            if secret is not None and sub_path:
                directory = str(mount.get("mountPath") or "").rsplit("/", 1)[0] or "/"
                add(
                    secret,
                    f"volume {mount.get('name')} mounted with subPath {sub_path} at"
                    f" {mount.get('mountPath')}",
                    "the kubelet never updates a subPath mount: mount the whole volume at"
                    f" a directory (e.g. {directory}/m2m) and read the file token there",
                )
    return findings


def diagnose(
    pods: Iterable[Mapping[str, Any]], token_requests: Iterable[Mapping[str, Any]]
) -> list[Finding]:
    secrets = token_request_secrets(token_requests)
    return [finding for pod in pods for finding in diagnose_pod(pod, secrets)]


def render_doctor(namespace: str, findings: Sequence[Finding], *, token_requests: int) -> str:
    if token_requests == 0:
        return f"No TokenRequests in namespace {clean(namespace)}.\n"
    if not findings:
        return (
            f"No pod in namespace {clean(namespace)} reads a TokenRequest's Secret through env,"
            " envFrom or a subPath mount: every consumer sees refreshed tokens.\n"
        )
    lines = [
        f"{len(findings)} way(s) in namespace {clean(namespace)} that never see a refreshed token:"
    ]
    for finding in findings:
        lines.append(
            f"- pod {clean(finding.pod)}, container {clean(finding.container)}:"
            f" {clean(finding.how)} (Secret {clean(finding.secret)}, TokenRequest"
            f" {clean(finding.token_request)})"
        )
        lines.append(f"    fix: {clean(finding.fix)}")
    return "\n".join(lines) + "\n"


# --- the command line ----------------------------------------------------------------


class PluginError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def api_failure(error: Any, *, action: str, namespace: str, what: str = "") -> PluginError:
    """A clear message for an ApiException: 403 says who may not do what, exit 2."""
    status = getattr(error, "status", None)
    try:
        detail = json.loads(getattr(error, "body", None) or "{}").get("message") or ""
    except (ValueError, AttributeError):
        detail = ""
    detail = clean(detail or getattr(error, "reason", "") or "", limit=300)
    if status == 403:
        return PluginError(f"you may not {action} in namespace {namespace}: {detail}", 2)
    if status == 401:
        return PluginError(f"not authenticated to the cluster: {detail}", 2)
    if status == 404:
        return PluginError(f"{what or 'object'} not found in namespace {namespace}", 1)
    return PluginError(f"could not {action} in namespace {namespace}: HTTP {status} {detail}", 1)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", help="path to the kubeconfig file (default: $KUBECONFIG)")
    common.add_argument("--context", help="the kubeconfig context to use")
    common.add_argument("-n", "--namespace", help="the namespace (default: the context's)")
    parser = argparse.ArgumentParser(
        prog="kubectl m2m",
        description="Day-two commands for m2m.dev TokenRequests (with your own RBAC).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status", parents=[common], help="conditions, expiry, claims and events of a TokenRequest"
    )
    status.add_argument("name")
    refresh = commands.add_parser(
        "refresh", parents=[common], help="ask the operator for a new token now"
    )
    refresh.add_argument("name", nargs="?", help="one TokenRequest (or use -l / --all)")
    refresh.add_argument("-l", "--selector", help="every TokenRequest matching this label selector")
    refresh.add_argument(
        "--all", action="store_true", help="every TokenRequest (of the namespace, or with -A)"
    )
    refresh.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="with -l or --all: in every namespace you may list TokenRequests in",
    )
    claims = commands.add_parser(
        "claims", parents=[common], help="what the token says (status.token), never the token"
    )
    claims.add_argument("name")
    claims.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    doctor = commands.add_parser(
        "doctor",
        parents=[common],
        help="pods reading a TokenRequest's Secret in ways that never see a refreshed token",
    )
    doctor.add_argument("target_namespace", nargs="?", metavar="NAMESPACE")
    commands.add_parser("version", help="this plugin's version and the API version it speaks")
    return parser


def plugin_version() -> str:
    try:
        return importlib.metadata.version("m2m-token-operator")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def render_version() -> str:
    return f"kubectl-m2m {plugin_version()} (TokenRequest API {GROUP}/{VERSION})\n"


def refresh_targets_error(arguments: argparse.Namespace) -> str | None:
    """What is wrong with the choice of TokenRequests to refresh, or None."""
    bulk = arguments.selector is not None or arguments.all
    if arguments.name and bulk:
        return "give a NAME, or -l SELECTOR / --all, not both"
    if not arguments.name and not bulk:
        return "give a NAME, or -l SELECTOR / --all for many"
    if arguments.all_namespaces and not bulk:
        return "-A needs -l SELECTOR or --all"
    if arguments.selector is not None and arguments.all:
        return "give -l SELECTOR or --all, not both"
    return None


def _name_of(body: Mapping[str, Any]) -> tuple[str, str]:
    metadata = body.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


class Cluster:
    """The user's cluster, through the user's kubeconfig."""

    def __init__(self, *, kubeconfig: str | None, context: str | None) -> None:
        import kubernetes  # imported here: `--help` and the pure functions need no client

        self._k8s = kubernetes
        try:
            self.api = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context
            )
            contexts, active = kubernetes.config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=kubeconfig
            )
            if context:
                active = next((c for c in contexts if c.get("name") == context), active)
        except (kubernetes.config.ConfigException, OSError, TypeError) as error:
            raise PluginError(f"no usable kubeconfig: {clean(error)}", 2) from None
        self.default_namespace = str(
            (active or {}).get("context", {}).get("namespace") or "default"
        )
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def call(
        self, function: Callable[[], Any], *, action: str, namespace: str, what: str = ""
    ) -> Any:
        try:
            response = function()
        except self._k8s.client.ApiException as error:
            raise api_failure(error, action=action, namespace=namespace, what=what) from None
        except Exception as error:  # connection refused, TLS, timeouts
            if isinstance(error, PluginError):
                raise
            raise PluginError(
                f"could not {action}: {clean(type(error).__name__)} {clean(error)}", 1
            ) from None
        return json.loads(response.data)

    def token_request(self, namespace: str, name: str) -> JsonObject:
        result: JsonObject = self.call(
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
            ),
            action=f"get tokenrequests.{GROUP} {name}",
            namespace=namespace,
            what=f"TokenRequest {name}",
        )
        return result

    def events_for(self, namespace: str, body: Mapping[str, Any]) -> list[JsonObject]:
        metadata = body.get("metadata") or {}
        selector = f"involvedObject.kind={KIND},involvedObject.name={metadata.get('name')}"
        listed = self.call(
            lambda: self.core.list_namespaced_event(
                namespace, field_selector=selector, _preload_content=False
            ),
            action="list events",
            namespace=namespace,
        )
        uid = metadata.get("uid")
        items: list[JsonObject] = listed.get("items") or []
        return [e for e in items if (e.get("involvedObject") or {}).get("uid") in (None, uid)]

    def annotate_refresh(self, namespace: str, name: str, patch: JsonObject) -> None:
        self.call(
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, patch, _preload_content=False
            ),
            action=f"patch tokenrequests.{GROUP} {name}",
            namespace=namespace,
            what=f"TokenRequest {name}",
        )

    def token_requests(
        self, namespace: str | None, *, label_selector: str | None = None
    ) -> list[JsonObject]:
        """The TokenRequests of `namespace` (None: of every namespace) matching the selector."""
        selector = label_selector or ""  # empty: every TokenRequest
        if namespace is None:
            listed = self.call(
                lambda: self.custom.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, label_selector=selector, _preload_content=False
                ),
                action=f"list tokenrequests.{GROUP}",
                namespace="(all namespaces)",
            )
        else:
            listed = self.call(
                lambda: self.custom.list_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    label_selector=selector,
                    _preload_content=False,
                ),
                action=f"list tokenrequests.{GROUP}",
                namespace=namespace,
            )
        items: list[JsonObject] = listed.get("items") or []
        return items

    def pods(self, namespace: str) -> list[JsonObject]:
        listed = self.call(
            lambda: self.core.list_namespaced_pod(namespace, _preload_content=False),
            action="list pods",
            namespace=namespace,
        )
        items: list[JsonObject] = listed.get("items") or []
        return items


def run(arguments: argparse.Namespace, *, cluster: Cluster, now: datetime) -> tuple[int, str]:
    """Carry out one command; (exit code, text for stdout)."""
    namespace = arguments.namespace or cluster.default_namespace
    if arguments.command == "status":
        body = cluster.token_request(namespace, arguments.name)
        events_error = None
        events: list[JsonObject] | None = None
        try:
            events = cluster.events_for(namespace, body)
        except PluginError as error:  # the status is still worth showing
            events_error = str(error)
        return EXIT_OK, render_status(body, events, now=now, events_error=events_error)
    if arguments.command == "refresh":
        patch = refresh_patch(now)
        value = patch["metadata"]["annotations"][REFRESH_ANNOTATION]
        if arguments.name:
            cluster.annotate_refresh(namespace, arguments.name, patch)
            return EXIT_OK, (
                f"Refresh requested for TokenRequest {namespace}/{arguments.name}"
                f" ({REFRESH_ANNOTATION}={value}); see `kubectl m2m status {arguments.name}`.\n"
            )
        return refresh_many(arguments, cluster=cluster, namespace=namespace, patch=patch)
    if arguments.command == "claims":
        body = cluster.token_request(namespace, arguments.name)
        if claims_of(body) is None:
            raise PluginError(
                f"TokenRequest {namespace}/{arguments.name} has no status.token yet (no token,"
                " or the token is not a JWT)",
                1,
            )
        return EXIT_OK, render_claims(body, arguments.output)
    # doctor
    namespace = arguments.target_namespace or namespace
    token_requests = cluster.token_requests(namespace)
    pods = cluster.pods(namespace) if token_requests else []
    findings = diagnose(pods, token_requests)
    return EXIT_OK, render_doctor(namespace, findings, token_requests=len(token_requests))


def refresh_many(
    arguments: argparse.Namespace, *, cluster: Cluster, namespace: str, patch: JsonObject
) -> tuple[int, str]:
    """Refresh every match; one line each, and on: a failure does not stop the others."""
    where = None if arguments.all_namespaces else namespace
    matches = cluster.token_requests(where, label_selector=arguments.selector)
    scope = "all namespaces" if where is None else f"namespace {where}"
    if not matches:
        return EXIT_OK, f"No TokenRequests to refresh in {scope}.\n"
    lines: list[str] = []
    failed = 0
    for body in sorted(matches, key=_name_of):
        item_namespace, name = _name_of(body)
        try:
            cluster.annotate_refresh(item_namespace, name, patch)
        except PluginError as error:
            failed += 1
            lines.append(f"failed    {clean(item_namespace)}/{clean(name)}: {clean(error)}")
            continue
        lines.append(f"requested {clean(item_namespace)}/{clean(name)}")
    value = patch["metadata"]["annotations"][REFRESH_ANNOTATION]
    lines.append(
        f"Refresh requested for {len(matches) - failed} of {len(matches)} TokenRequests in"
        f" {scope} ({REFRESH_ANNOTATION}={value})."
    )
    return (EXIT_FAILED if failed else EXIT_OK), "\n".join(lines) + "\n"


def _fail(message: str, code: int) -> NoReturn:
    print(f"kubectl m2m: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "version":  # needs no cluster
        sys.stdout.write(render_version())
        raise SystemExit(EXIT_OK)
    if arguments.command == "refresh" and (problem := refresh_targets_error(arguments)):
        parser.error(f"refresh: {problem}")
    try:
        cluster = Cluster(kubeconfig=arguments.kubeconfig, context=arguments.context)
        code, text = run(arguments, cluster=cluster, now=datetime.now(UTC))
    except PluginError as error:
        _fail(str(error), error.code)
    sys.stdout.write(text)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
