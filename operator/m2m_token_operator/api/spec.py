"""What a TokenRequest asks for, checked and resolved before anything acts on it.

The CRD's schema catches most mistakes at `kubectl apply`, but the operator must
not trust it alone: schemas change between versions, and an object written
before a schema change is never re-validated. Everything the operator acts on
passes through `parse_spec`, whose errors are written to the TokenRequest's
status, so each one says which field is wrong and how to fix it.

No HTTP and no Kubernetes here: these are plain functions of plain data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from m2m_token_operator.api.constants import GROUP, MANAGED_BY_LABEL
from m2m_token_operator.api.kube_names import is_dns_label, is_dns_subdomain

SCOPE_PREFIX = "api://"
SCOPE_SUFFIX = "/.default"
MAX_SCOPE_LENGTH = 1024

# Go's time.ParseDuration units that make sense for a refresh: hours, minutes, seconds,
# in that order, each at most once. Sub-second precision would be noise next to the jitter.
_DURATION = re.compile(r"(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?")
# A refresh point further out than this is certainly a typo, and it keeps timedelta finite.
_MAX_DURATION = timedelta(days=366)


# spec.secretTemplate: bounded like the CRD says, so a map that slipped past the schema
# (an older CRD) cannot make the Secret unwritable or huge.
MAX_TEMPLATE_ENTRIES = 64
MAX_LABEL_VALUE_LENGTH = 63
MAX_ANNOTATION_VALUE_LENGTH = 2048  # 64 of them stay well inside the 256 KiB limit
# Keys the operator owns on the Secret: the managed-by label and all of m2m.dev/*.
RESERVED_KEYS = frozenset({MANAGED_BY_LABEL})
RESERVED_PREFIX = GROUP
# A Kubernetes qualified name: an optional DNS-subdomain prefix and "/", then a name of
# at most 63 characters (alphanumerics, '-', '_', '.'; alphanumeric at both ends).
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


class SpecError(ValueError):
    """A TokenRequest spec that cannot be acted on; the message goes to its status as is."""


@dataclass(frozen=True)
class SecretTemplate:
    """spec.secretTemplate: labels and annotations the user wants on the Secret as well."""

    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.labels or self.annotations)


@dataclass(frozen=True)
class TokenRequestSpec:
    """A TokenRequest's spec, resolved: what the operator actually does for it."""

    scope: str
    secret_name: str
    refresh_before: timedelta | None
    credentials_secret: str | None  # spec.credentials.secretRef.name
    # spec.credentials.serviceAccountRef.name (workload identity federation); when neither
    # this nor credentials_secret is set: the operator's own identity
    credentials_service_account: str | None = None
    secret_template: SecretTemplate = field(default_factory=SecretTemplate)


def parse_duration(text: str) -> timedelta:
    """A Go-style duration such as "90s", "10m", "1h30m" or "2h45m10s"; strictly positive."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise SpecError(
            f"{text!r} is not a duration: use whole hours, minutes and seconds in that order,"
            " such as 90s, 10m, 1h or 1h30m"
        )
    try:
        value = timedelta(
            hours=int(match["h"] or 0), minutes=int(match["m"] or 0), seconds=int(match["s"] or 0)
        )
    except (OverflowError, ValueError):  # absurdly many digits
        value = _MAX_DURATION * 2
    if value <= timedelta(0):
        raise SpecError(f"{text!r} is not a positive duration: use at least 1s")
    if value > _MAX_DURATION:
        raise SpecError(f"{text!r} is longer than {format_duration(_MAX_DURATION)}")
    return value


def format_duration(value: timedelta) -> str:
    """The inverse of `parse_duration`, as Go prints durations: "1h30m", "90s" → "1m30s"."""
    micros = value // timedelta(microseconds=1)
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    whole, fraction = divmod(micros, 1_000_000)
    hours, rest = divmod(whole, 3600)
    minutes, seconds = divmod(rest, 60)
    # Zero units are left out ("1h", not Go's "1h0m0s"); both forms parse back the same.
    parts = [f"{hours}h"] if hours else []
    if minutes:
        parts.append(f"{minutes}m")
    if fraction:
        parts.append(f"{seconds}.{fraction:06d}".rstrip("0") + "s")
    elif seconds or not parts:
        parts.append(f"{seconds}s")
    text = "".join(parts)
    return sign + text


def _check_dns_label(value: object, *, field: str, example: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{field} is required: a lowercase DNS label such as {example!r}")
    if not is_dns_label(value):
        raise SpecError(
            f"{field} {value!r} is not a valid DNS label: use at most 63 lowercase letters,"
            f" digits and '-', starting and ending with a letter or digit, such as {example!r}"
        )
    return value


def _check_dns_subdomain(value: object, *, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{field} must be a non-empty Kubernetes object name")
    if not is_dns_subdomain(value):
        raise SpecError(
            f"{field} {value!r} is not a valid Kubernetes object name: use at most 253"
            " lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        )
    return value


def resolve_scope(*, application: str, namespace: str, cluster: str) -> str:
    """The scope a `target` stands for: api://<cluster>.<namespace>.<application>/.default."""
    _check_dns_label(application, field="spec.target.application", example="orders-api")
    _check_dns_label(namespace, field="spec.target.namespace", example="orders")
    _check_dns_label(cluster, field="spec.target.cluster", example="prod-gcp")
    return f"{SCOPE_PREFIX}{cluster}.{namespace}.{application}{SCOPE_SUFFIX}"


def _check_scope(value: object) -> str:
    example = "api://prod-gcp.orders.orders-api/.default"
    if not isinstance(value, str) or not value:
        raise SpecError(f"spec.scope must be a non-empty string such as {example!r}")
    if len(value) > MAX_SCOPE_LENGTH:
        raise SpecError(f"spec.scope is longer than {MAX_SCOPE_LENGTH} characters")
    if any(character.isspace() or not character.isprintable() for character in value):
        raise SpecError("spec.scope must not contain spaces or control characters")
    if (
        not value.startswith(SCOPE_PREFIX)
        or not value.endswith(SCOPE_SUFFIX)
        or len(value) <= len(SCOPE_PREFIX) + len(SCOPE_SUFFIX)
    ):
        raise SpecError(
            f"spec.scope {value!r} must have the form api://<application id URI>/.default,"
            f" such as {example!r}; or use spec.target instead"
        )
    return value


def _mapping(value: object, *, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{field} must be an object")
    return value


def is_reserved_key(key: str) -> bool:
    """Whether a label or annotation key on the Secret is the operator's own."""
    return key in RESERVED_KEYS or ("/" in key and key.partition("/")[0] == RESERVED_PREFIX)


def _check_key(key: object, *, field: str) -> str:
    if not isinstance(key, str) or not key:
        raise SpecError(f"{field} has an empty or non-string key")
    prefix, slash, name = key.rpartition("/")
    valid = (
        len(name) <= 63
        and _QUALIFIED_NAME.fullmatch(name) is not None
        and (not slash or is_dns_subdomain(prefix))
    )
    if not valid:
        raise SpecError(
            f"{field} key {key[:80]!r} is not a valid key: use an optional DNS prefix and '/',"
            " then at most 63 letters, digits, '-', '_' or '.', such as 'example.com/team'"
        )
    if is_reserved_key(key):
        raise SpecError(
            f"{field} key {key!r} is reserved: the operator sets app.kubernetes.io/managed-by"
            " and every m2m.dev/ key on the Secret itself; remove it from the template"
        )
    return key


def _string_map(
    value: object, *, field: str, value_limit: int, label_values: bool
) -> dict[str, str]:
    if value is None:
        return {}
    entries = _mapping(value, field=field)
    if len(entries) > MAX_TEMPLATE_ENTRIES:
        raise SpecError(f"{field} has {len(entries)} entries: at most {MAX_TEMPLATE_ENTRIES}")
    result: dict[str, str] = {}
    for key, item in entries.items():
        _check_key(key, field=field)
        if not isinstance(item, str):
            raise SpecError(f"{field}[{key!r}] must be a string")
        if len(item) > value_limit:
            raise SpecError(f"{field}[{key!r}] is longer than {value_limit} characters")
        if label_values and not _LABEL_VALUE.fullmatch(item):
            raise SpecError(
                f"{field}[{key!r}] is not a valid label value: use letters, digits, '-', '_'"
                " and '.', starting and ending with a letter or digit (or leave it empty)"
            )
        result[key] = item
    return result


def parse_secret_template(value: object) -> SecretTemplate:
    """spec.secretTemplate, checked: `SpecError` says which key to fix."""
    if value is None:
        return SecretTemplate()
    template = _mapping(value, field="spec.secretTemplate")
    return SecretTemplate(
        labels=_string_map(
            template.get("labels"),
            field="spec.secretTemplate.labels",
            value_limit=MAX_LABEL_VALUE_LENGTH,
            label_values=True,
        ),
        annotations=_string_map(
            template.get("annotations"),
            field="spec.secretTemplate.annotations",
            value_limit=MAX_ANNOTATION_VALUE_LENGTH,
            label_values=False,
        ),
    )


def _same_namespace_ref(value: object, *, field: str) -> str:
    """The name of an object in the TokenRequest's own namespace; a `namespace` is refused."""
    ref = _mapping(value, field=field)
    if ref.get("namespace") is not None:
        raise SpecError(
            f"{field}.namespace is not supported: the object must be in the same namespace as"
            " the TokenRequest; remove the namespace field"
        )
    return _check_dns_subdomain(ref.get("name"), field=f"{field}.name")


def parse_spec(
    spec: Mapping[str, Any], *, name: str, namespace: str, default_cluster: str
) -> TokenRequestSpec:
    """Check a TokenRequest's spec and resolve it; `SpecError` says what to fix."""
    target = spec.get("target")
    scope = spec.get("scope")
    if target is not None and scope is not None:
        raise SpecError("spec.target and spec.scope are both set: set exactly one of them")
    if target is None and scope is None:
        raise SpecError(
            "spec.target or spec.scope is required: set target.application (and optionally"
            " target.namespace and target.cluster), or a full scope such as"
            " api://prod-gcp.orders.orders-api/.default"
        )
    if target is not None:
        target = _mapping(target, field="spec.target")
        cluster = target.get("cluster")
        if cluster is None:
            if not default_cluster:
                raise SpecError(
                    "spec.target.cluster is not set and the operator has no default cluster"
                    " (M2M_CLUSTER_NAME is empty): set spec.target.cluster"
                )
            cluster = default_cluster
        target_namespace = target.get("namespace")
        resolved = resolve_scope(
            application=target.get("application") or "",  # checked there, helpfully
            namespace=namespace if target_namespace is None else target_namespace,
            cluster=cluster,
        )
    else:
        resolved = _check_scope(scope)

    secret_name = spec.get("secretName")
    secret_name = _check_dns_subdomain(
        name if secret_name is None else secret_name, field="spec.secretName"
    )

    refresh_before: timedelta | None = None
    if spec.get("refreshBefore") is not None:
        text = spec["refreshBefore"]
        if not isinstance(text, str):
            raise SpecError(
                f"spec.refreshBefore must be a duration string such as 90s, 10m or 1h30m,"
                f" not {text!r}"
            )
        try:
            refresh_before = parse_duration(text)
        except SpecError as error:
            raise SpecError(f"spec.refreshBefore: {error}") from None

    credentials_secret: str | None = None
    credentials_service_account: str | None = None
    credentials = spec.get("credentials")
    if credentials is not None:
        credentials = _mapping(credentials, field="spec.credentials")
        secret_ref = credentials.get("secretRef")
        account_ref = credentials.get("serviceAccountRef")
        if (secret_ref is None) == (account_ref is None):
            raise SpecError(
                "spec.credentials must set exactly one of secretRef (a Secret in this namespace"
                " holding AZURE_APP_CLIENT_ID, AZURE_OPENID_CONFIG_TOKEN_ENDPOINT and"
                " AZURE_APP_JWK or AZURE_APP_CLIENT_SECRET) or serviceAccountRef (a"
                " ServiceAccount in this namespace, for workload identity federation)"
            )
        if secret_ref is not None:
            credentials_secret = _same_namespace_ref(secret_ref, field="spec.credentials.secretRef")
        else:
            credentials_service_account = _same_namespace_ref(
                account_ref, field="spec.credentials.serviceAccountRef"
            )

    return TokenRequestSpec(
        scope=resolved,
        secret_name=secret_name,
        refresh_before=refresh_before,
        credentials_secret=credentials_secret,
        secret_template=parse_secret_template(spec.get("secretTemplate")),
        credentials_service_account=credentials_service_account,
    )
