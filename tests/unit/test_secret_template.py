"""spec.secretTemplate: parsed and bounded, copied onto the Secret, kept there, and removed
from it again when the template drops a key, while other tools' keys stay."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from m2m_token_operator.api.constants import TEMPLATE_KEYS_ANNOTATION
from m2m_token_operator.api.spec import (
    MAX_TEMPLATE_ENTRIES,
    SecretTemplate,
    SpecError,
    is_reserved_key,
    parse_secret_template,
    parse_spec,
)
from m2m_token_operator.reconcile.secret_output import (
    Owner,
    _differs,
    merge_for_replace,
    render_secret,
    template_drifted,
    template_drifted_from,
    templated_keys,
)
from m2m_token_operator.tokens.model import AccessToken

NOW = datetime(2026, 11, 29, 9, 0, 0, tzinfo=UTC)
OWNER = Owner(namespace="shop", name="orders-api", uid="uid-1")
SCOPE = "api://prod.orders.orders-api/.default"
TOKEN = AccessToken(
    value="header.payload.signature",
    token_type="Bearer",
    issued_at=NOW,
    expires_at=NOW + timedelta(seconds=3599),
)
RELOADER = SecretTemplate(
    labels={"team": "shop", "example.com/tier": "backend"},
    annotations={"reloader.stakater.com/match": "true"},
)


def render(template: SecretTemplate | None = None) -> dict[str, Any]:
    return render_secret(
        owner=OWNER, secret_name="orders-api", scope=SCOPE, token=TOKEN, seal="s", template=template
    )


def live(secret: dict[str, Any], **extra_labels: str) -> dict[str, Any]:
    """The Secret as the API server returns it, with labels another tool added."""
    stored = copy.deepcopy(secret)
    stored["metadata"]["resourceVersion"] = "7"
    stored["metadata"]["labels"].update(extra_labels)
    return stored


# --- parsing -----------------------------------------------------------------------


def test_parse_template() -> None:
    spec = parse_spec(
        {"scope": SCOPE, "secretTemplate": {"labels": {"team": "shop"}, "annotations": {}}},
        name="orders-api",
        namespace="shop",
        default_cluster="prod",
    )
    assert spec.secret_template == SecretTemplate(labels={"team": "shop"}, annotations={})
    assert spec.secret_template
    no_template = parse_spec({"scope": SCOPE}, name="a", namespace="shop", default_cluster="")
    assert no_template.secret_template == SecretTemplate()
    assert not no_template.secret_template


@pytest.mark.parametrize(
    "key",
    [
        "app.kubernetes.io/managed-by",
        "m2m.dev/token-request",
        "m2m.dev/expires-at",
        "m2m.dev/anything",
        "m2m.dev/template-keys",
    ],
)
def test_reserved_keys_are_rejected_with_what_to_do(key: str) -> None:
    assert is_reserved_key(key)
    for kind in ("labels", "annotations"):
        with pytest.raises(SpecError, match="is reserved: the operator sets") as error:
            parse_secret_template({kind: {key: "x"}})
        assert f"spec.secretTemplate.{kind}" in str(error.value)


@pytest.mark.parametrize("key", ["m2m.dev", "example.com/m2m.dev", "sub.m2m.dev/x", "team"])
def test_similar_keys_are_not_reserved(key: str) -> None:
    assert not is_reserved_key(key)
    assert parse_secret_template({"annotations": {key: "v"}}).annotations == {key: "v"}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("labels", "spec.secretTemplate must be an object"),
        ({"labels": ["a"]}, "spec.secretTemplate.labels must be an object"),
        ({"labels": {"a": 1}}, "must be a string"),
        ({"labels": {"": "v"}}, "empty or non-string key"),
        ({"labels": {"bad key": "v"}}, "is not a valid key"),
        ({"labels": {"/name": "v"}}, "is not a valid key"),
        ({"labels": {"Bad_Prefix/name": "v"}}, "is not a valid key"),
        ({"labels": {"a" * 64: "v"}}, "is not a valid key"),
        ({"labels": {"a": "not a label value"}}, "is not a valid label value"),
        ({"labels": {"a": "x" * 64}}, "longer than 63"),
        ({"annotations": {"a": "x" * 2049}}, "longer than 2048"),
        (
            {"labels": {f"k{i}": "v" for i in range(MAX_TEMPLATE_ENTRIES + 1)}},
            "at most 64",
        ),
        ({"annotations": {f"k{i}": "v" for i in range(10_000)}}, "10000 entries"),
    ],
)
def test_bad_templates_say_what_to_fix(template: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_secret_template(template)


def test_empty_label_value_and_free_annotation_values_are_fine() -> None:
    template = parse_secret_template(
        {"labels": {"flag": ""}, "annotations": {"note": "any text: spaces, {json}, \u00e9"}}
    )
    assert template.labels == {"flag": ""}
    assert template.annotations["note"].startswith("any text")


# --- rendering ---------------------------------------------------------------------


def test_template_keys_are_copied_and_the_operators_own_win() -> None:
    secret = render(RELOADER)
    meta = secret["metadata"]
    assert meta["labels"] == {
        "team": "shop",
        "example.com/tier": "backend",
        "app.kubernetes.io/managed-by": "m2m-token-operator",
        "m2m.dev/token-request": "orders-api",
    }
    assert meta["annotations"]["reloader.stakater.com/match"] == "true"
    assert json.loads(meta["annotations"][TEMPLATE_KEYS_ANNOTATION]) == {
        "labels": ["example.com/tier", "team"],
        "annotations": ["reloader.stakater.com/match"],
    }
    # Even a template that slipped past the checks cannot take the operator's keys.
    sneaky = SecretTemplate(labels={"app.kubernetes.io/managed-by": "me"}, annotations={})
    assert render(sneaky)["metadata"]["labels"]["app.kubernetes.io/managed-by"] == (
        "m2m-token-operator"
    )


def test_no_template_renders_exactly_as_before() -> None:
    secret = render(None)
    assert TEMPLATE_KEYS_ANNOTATION not in secret["metadata"]["annotations"]
    assert secret == render(SecretTemplate())


# --- drift and removal -------------------------------------------------------------


def test_unchanged_secret_with_template_and_foreign_labels_is_not_rewritten() -> None:
    desired = render(RELOADER)
    assert not _differs(live(desired, **{"argocd.argoproj.io/instance": "shop"}), desired)


def test_an_edited_or_removed_template_label_is_drift() -> None:
    desired = render(RELOADER)
    edited = live(desired, team="other")
    assert template_drifted(edited, desired)
    removed = live(desired)
    del removed["metadata"]["labels"]["team"]
    assert _differs(removed, desired)
    repaired = merge_for_replace(removed, desired)
    assert repaired["metadata"]["labels"]["team"] == "shop"


def test_a_key_dropped_from_the_template_leaves_the_secret_but_foreign_keys_stay() -> None:
    before = live(render(RELOADER), **{"argocd.argoproj.io/instance": "shop"})
    before["metadata"]["annotations"]["other-tool/checksum"] = "abc"
    smaller = SecretTemplate(labels={"team": "shop"}, annotations={})
    desired = render(smaller)

    assert _differs(before, desired)
    replaced = merge_for_replace(before, desired)
    labels = replaced["metadata"]["labels"]
    annotations = replaced["metadata"]["annotations"]
    assert "example.com/tier" not in labels
    assert "reloader.stakater.com/match" not in annotations
    assert labels["team"] == "shop"
    assert labels["argocd.argoproj.io/instance"] == "shop"  # never in the template: stays
    assert annotations["other-tool/checksum"] == "abc"
    assert templated_keys(replaced) == ({"team"}, set())
    assert replaced["metadata"]["resourceVersion"] == "7"
    assert not _differs(replaced, desired)


def test_removing_the_whole_template_removes_its_keys_and_its_record() -> None:
    before = live(render(RELOADER), keep="me")
    desired = render(None)
    assert _differs(before, desired)
    replaced = merge_for_replace(before, desired)
    assert replaced["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "m2m-token-operator",
        "m2m.dev/token-request": "orders-api",
        "keep": "me",
    }
    assert TEMPLATE_KEYS_ANNOTATION not in replaced["metadata"]["annotations"]
    assert "reloader.stakater.com/match" not in replaced["metadata"]["annotations"]
    assert not _differs(replaced, desired)


@pytest.mark.parametrize("record", ["not json", "[1, 2]", '{"labels": "team"}', '{"labels": [1]}'])
def test_an_unreadable_record_removes_nothing(record: str) -> None:
    before = live(render(RELOADER))
    before["metadata"]["annotations"][TEMPLATE_KEYS_ANNOTATION] = record
    assert templated_keys(before) == (set(), set())
    replaced = merge_for_replace(before, render(None))
    assert replaced["metadata"]["labels"]["team"] == "shop"  # kept: not known to be ours
    assert TEMPLATE_KEYS_ANNOTATION not in replaced["metadata"]["annotations"]


def test_template_drift_seen_from_a_watch_event() -> None:
    secret = live(render(RELOADER), **{"other/label": "x"})
    assert not template_drifted_from(secret, RELOADER)
    edited = copy.deepcopy(secret)
    edited["metadata"]["annotations"]["reloader.stakater.com/match"] = "false"
    assert template_drifted_from(edited, RELOADER)
    # The template now drops a key that the Secret still has: drift until it is removed.
    assert template_drifted_from(secret, SecretTemplate(labels={"team": "shop"}))
    assert template_drifted_from(secret, SecretTemplate())
    # A Secret never templated and an empty template: nothing to do.
    assert not template_drifted_from(live(render(None)), SecretTemplate())
