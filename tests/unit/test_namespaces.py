"""Who may use the operator's own identity: selector syntax and the allowed set."""

from __future__ import annotations

import pytest

from m2m_token_operator.config.settings import Settings, SettingsError
from m2m_token_operator.kube.namespaces import (
    OperatorIdentityNamespaces,
    SelectorError,
    validate_selector,
)


@pytest.mark.parametrize(
    "selector",
    [
        "kubernetes.io/metadata.name",
        "m2m.dev/operator-identity=allowed",
        "team==payments",
        "env!=prod",
        "!m2m.dev/no-operator-identity",
        "tier in (gold, silver),env notin (prod)",
        "kubernetes.io/metadata.name in (shop,orders)",
        "priority>5",
        "priority<10",
        "a=b, c",
        "empty=",
    ],
)
def test_selectors_the_api_server_accepts(selector: str) -> None:
    validate_selector(selector)


@pytest.mark.parametrize(
    ("selector", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("=value", "expected a label key"),
        ("a=b,", "expected a label key"),
        ("a=b c=d", "expected ','"),
        ("key=two words", "expected ','"),
        ("tier in gold", r"must be followed by '\(values\)'"),
        ("tier in (gold", "not closed"),
        ("Bad_Prefix.example/name=x", "not a label key"),
        ("-leading=x", "not a label key"),
        ("a=" + "v" * 64, "not a label value"),
        ("priority>high", "integer"),
        ("!", "must be followed by a label key"),
    ],
)
def test_selectors_the_api_server_refuses(selector: str, problem: str) -> None:
    with pytest.raises(SelectorError, match=problem):
        validate_selector(selector)


def test_the_setting_is_validated_at_start() -> None:
    selector = "m2m.dev/operator-identity=allowed"
    settings = Settings.from_env({"M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": f" {selector} "})
    assert settings.operator_identity_namespace_selector == selector
    assert Settings.from_env({}).operator_identity_namespace_selector is None
    assert (
        Settings.from_env({"M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": ""})
    ).operator_identity_namespace_selector is None
    with pytest.raises(SettingsError, match="M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR"):
        Settings.from_env({"M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR": "team in payments"})


def _namespace(name: str) -> dict[str, object]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}}


class Synced:
    def __init__(self) -> None:
        self.done = False

    def __call__(self) -> bool:
        return self.done


def test_unset_selector_allows_no_namespace() -> None:
    namespaces = OperatorIdentityNamespaces(None)
    assert not namespaces.enabled
    assert namespaces.allowed("shop") is False
    assert "is not set" in namespaces.denial_message("shop")


def test_nothing_is_denied_before_the_first_list_arrived() -> None:
    synced = Synced()
    namespaces = OperatorIdentityNamespaces("team=shop", is_synced=synced)
    assert namespaces.allowed("shop") is None
    namespaces.on_event("ADDED", _namespace("shop"))
    assert namespaces.allowed("shop") is True  # a positive answer needs no complete list
    assert namespaces.allowed("orders") is None
    synced.done = True
    assert namespaces.allowed("orders") is False


def test_namespaces_gaining_and_losing_the_grant_are_reported_once_each() -> None:
    changed: list[str] = []
    namespaces = OperatorIdentityNamespaces(
        "team=shop", on_change=changed.append, is_synced=lambda: True
    )
    namespaces.on_event("ADDED", _namespace("shop"))
    namespaces.on_event("MODIFIED", _namespace("shop"))  # another label changed: no news
    namespaces.on_event("ADDED", _namespace("orders"))
    assert changed == ["shop", "orders"]
    assert len(namespaces) == 2
    # Stops matching (the watch reports it DELETED), or is deleted.
    namespaces.on_event("DELETED", _namespace("shop"))
    namespaces.on_event("DELETED", _namespace("shop"))
    namespaces.on_event("DELETED", _namespace("never-allowed"))
    assert changed == ["shop", "orders", "shop"]
    assert namespaces.allowed("shop") is False
    assert namespaces.allowed("orders") is True
    namespaces.on_event("BOOKMARK", {"metadata": {}})
    assert len(namespaces) == 1


def test_the_denial_says_why_and_what_to_do() -> None:
    namespaces = OperatorIdentityNamespaces("m2m.dev/operator-identity=allowed")
    message = namespaces.denial_message("shop")
    assert "Namespace shop" in message
    assert "'m2m.dev/operator-identity=allowed'" in message
    assert "M2M_OPERATOR_IDENTITY_NAMESPACE_SELECTOR" in message
    assert "spec.credentials" in message
