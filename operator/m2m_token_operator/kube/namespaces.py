"""Which namespaces may use the operator's own identity.

A TokenRequest without `spec.credentials` gets a token as the operator's own
app registration, which every target API that trusts the operator accepts. So
that identity is an administrator's grant, per namespace: only namespaces that
match `M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR` may use it; unset, none may.

The selector is evaluated by the API server (a watch on Namespaces with that
label selector), never here: its semantics are the server's own, and this
process holds only the names of the namespaces that match. What this module
adds is the bookkeeping, and the answer "not known yet" until the first
complete list has arrived, so that a starting operator never reports
"not allowed" for a namespace it simply has not heard about.

Only the syntax of the selector is checked here, at start, so that a typo stops
the operator with a clear message instead of a watch failing for ever.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from m2m_token_operator.api.kube_names import DNS_SUBDOMAIN

logger = logging.getLogger(__name__)

SELECTOR_SETTING = "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR"
# The label every namespace carries (Kubernetes 1.21+): a selector on it alone matches all.
ALL_NAMESPACES_SELECTOR = "kubernetes.io/metadata.name"

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"(?:(?P<prefix>{DNS_SUBDOMAIN})/)?{_NAME}")
_VALUE = re.compile(rf"(?:{_NAME})?")
_INTEGER = re.compile(r"-?[0-9]+")
# Tokens of the selector language: operators, parentheses, commas, and words.
_TOKEN = re.compile(r"\s*(==|!=|=|!|\(|\)|,|>|<|[^\s=!(),<>]+)")


class SelectorError(ValueError):
    """A label selector that the API server would refuse; the message says where."""


def _check_key(key: str) -> None:
    match = _KEY.fullmatch(key)
    if match is None or len(key) - len(match.group("prefix") or "") > 64:
        raise SelectorError(f"{key!r} is not a label key (name or prefix/name)")
    prefix = match.group("prefix")
    if prefix is not None and len(prefix) > 253:
        raise SelectorError(f"the prefix of {key!r} is longer than 253 characters")


def _check_value(value: str) -> None:
    if not _VALUE.fullmatch(value):
        raise SelectorError(
            f"{value!r} is not a label value (at most 63 letters, digits, '-', '_', '.')"
        )


def _tokens(selector: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    while position < len(selector):
        if selector[position:].strip() == "":
            break
        match = _TOKEN.match(selector, position)
        if match is None:  # pragma: no cover - the pattern matches any non-space character
            raise SelectorError(f"cannot read the selector at {selector[position:]!r}")
        tokens.append(match.group(1))
        position = match.end()
    return tokens


def validate_selector(selector: str) -> None:
    """Raise SelectorError unless `selector` is a label selector in the API server's syntax.

    The syntax of `kubectl get -l`: requirements separated by commas, each one of
    `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (v1,v2)`,
    `key notin (v1,v2)`, `key>1`, `key<1`.
    """
    tokens = _tokens(selector)
    if not tokens:
        raise SelectorError("the selector is empty")
    index = 0

    def take() -> str | None:
        nonlocal index
        if index >= len(tokens):
            return None
        index += 1
        return tokens[index - 1]

    def peek() -> str | None:
        return tokens[index] if index < len(tokens) else None

    while True:
        token = take()
        if token == "!":
            key = take()
            if key is None:
                raise SelectorError("'!' must be followed by a label key")
            _check_key(key)
        elif token is None or token in ("=", "==", "!=", "(", ")", ",", ">", "<"):
            raise SelectorError(f"expected a label key, found {token or 'the end'!r}")
        else:
            _check_key(token)
            operator = peek()
            if operator in ("=", "==", "!="):
                take()
                value = peek()
                if value is None or value in (",",):
                    value = ""  # `key=` selects the empty value, as the server allows
                else:
                    take()
                _check_value(value)
            elif operator in (">", "<"):
                take()
                value = take()
                if value is None or not _INTEGER.fullmatch(value):
                    raise SelectorError(f"{token}{operator} must be followed by an integer")
            elif operator in ("in", "notin"):
                take()
                if take() != "(":
                    raise SelectorError(f"'{token} {operator}' must be followed by '(values)'")
                while True:
                    value = take()
                    if value is None:
                        raise SelectorError("a value list is not closed with ')'")
                    if value == ")":
                        break
                    if value == ",":
                        continue
                    _check_value(value)
        separator = take()
        if separator is None:
            return
        if separator != ",":
            raise SelectorError(f"expected ',' between requirements, found {separator!r}")


class OperatorIdentityNamespaces:
    """The names of the namespaces that may use the operator's own identity.

    Fed by a server-side filtered watch of Namespaces (`on_event`): a namespace
    that comes to match arrives as ADDED or MODIFIED, one that stops matching (or
    is deleted) as DELETED. `on_change(namespace)` is called for each namespace
    that gains or loses the grant, so that its TokenRequests are looked at at once.
    """

    def __init__(
        self,
        selector: str | None,
        *,
        on_change: Callable[[str], None] | None = None,
        is_synced: Callable[[], bool] | None = None,
    ) -> None:
        self.selector = selector or None
        self._on_change = on_change
        self._is_synced = is_synced
        self._allowed: set[str] = set()
        # Why the namespaces cannot be known (the watch got HTTP 403), or None.
        self.permission_denied: str | None = None

    @property
    def enabled(self) -> bool:
        """False when no selector is set: no namespace may use the operator's identity."""
        return self.selector is not None

    def set_on_change(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change

    def set_synced_check(self, is_synced: Callable[[], bool]) -> None:
        self._is_synced = is_synced

    def allowed(self, namespace: str) -> bool | None:
        """True or False, or None while the first list of namespaces has not arrived."""
        if self.selector is None:
            return False
        if namespace in self._allowed:
            return True  # a positive answer needs no complete list
        if self._is_synced is None or not self._is_synced():
            return None
        return False

    def on_event(self, event_type: str, namespace: dict[str, Any]) -> None:
        """One watch event of the selector's Namespaces (called on the event loop)."""
        name = str((namespace.get("metadata") or {}).get("name") or "")
        if not name:
            return
        if event_type == "DELETED":
            if name not in self._allowed:
                return
            self._allowed.discard(name)
            logger.info("Namespace %s may no longer use the operator's own identity", name)
        elif event_type in ("ADDED", "MODIFIED"):
            if name in self._allowed:
                return
            self._allowed.add(name)
            logger.info("Namespace %s may use the operator's own identity", name)
        else:
            return
        if self._on_change is not None:
            self._on_change(name)

    def __len__(self) -> int:
        return len(self._allowed)

    def set_forbidden(self, forbidden: bool) -> None:
        """The Namespace watch was refused (HTTP 403), or works again."""
        if forbidden:
            self.permission_denied = (
                "The operator may not list and watch namespaces (HTTP 403), which it needs"
                f" to know whether this namespace may use its own identity ({SELECTOR_SETTING})."
                " Grant its ServiceAccount the verbs list and watch on the resource namespaces"
                " (the ClusterRole m2m-token-operator in manifests/rbac.yaml); served again"
                " within 30 s of that"
            )
            logger.warning(
                "Cannot list/watch namespaces (HTTP 403): TokenRequests using the operator's"
                " own identity wait, with reason PermissionDenied"
            )
        else:
            if self.permission_denied is not None:
                logger.info("Namespaces can be listed and watched again")
            self.permission_denied = None

    def denial_message(self, namespace: str) -> str:
        """What a TokenRequest's status says when the grant is missing: why, and what to do."""
        if self.selector is None:
            granted = f"no namespace is granted it ({SELECTOR_SETTING} is not set)"
        else:
            granted = (
                f"it is granted only to namespaces matching the label selector"
                f" {self.selector!r} ({SELECTOR_SETTING})"
            )
        return (
            f"Namespace {namespace} may not use the operator's own identity: {granted}."
            " Name the application's own identity in spec.credentials (secretRef), or ask the"
            " operator's administrator to grant this namespace the operator's identity"
        )
