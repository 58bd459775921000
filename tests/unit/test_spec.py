"""Spec parsing: durations, scope resolution, and errors a user can act on."""

from datetime import timedelta

import pytest

from m2m_token_operator.api.spec import (
    SpecError,
    TokenRequestSpec,
    format_duration,
    parse_duration,
    parse_spec,
    resolve_scope,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("10m", timedelta(minutes=10)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2h45m10s", timedelta(hours=2, minutes=45, seconds=10)),
        ("1h0m0s", timedelta(hours=1)),
        (" 5m ", timedelta(minutes=5)),
    ],
)
def test_parse_duration_accepts_go_style(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "0s", "0h0m", "10", "10x", "1.5h", "-5m", "30m1h", "1h 30m", "10M", "1d"]
)
def test_parse_duration_rejects_with_example(text: str) -> None:
    with pytest.raises(SpecError, match=r"90s|1s"):
        parse_duration(text)


def test_parse_duration_rejects_absurd_lengths() -> None:
    with pytest.raises(SpecError, match="longer than"):
        parse_duration("9000h")
    with pytest.raises(SpecError, match="longer than"):
        parse_duration("9" * 5000 + "h")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(seconds=90), "1m30s"),
        (timedelta(minutes=10), "10m"),
        (timedelta(hours=1), "1h"),
        (timedelta(hours=2, minutes=45, seconds=10), "2h45m10s"),
        (timedelta(hours=1, seconds=5), "1h5s"),
        (timedelta(0), "0s"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(seconds=-90), "-1m30s"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@pytest.mark.parametrize("text", ["90s", "10m", "1h", "1h30m", "2h45m10s", "28h"])
def test_format_duration_round_trips(text: str) -> None:
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


def test_resolve_scope() -> None:
    scope = resolve_scope(application="orders-api", namespace="orders", cluster="prod-gcp")
    assert scope == "api://prod-gcp.orders.orders-api/.default"


def test_resolve_scope_rejects_non_dns_labels() -> None:
    with pytest.raises(SpecError, match=r"spec.target.application 'Orders_API'.*DNS label"):
        resolve_scope(application="Orders_API", namespace="orders", cluster="prod")
    with pytest.raises(SpecError, match=r"spec\.target\.cluster"):
        resolve_scope(application="a", namespace="orders", cluster="x" * 64)


NAME, NAMESPACE = "orders-api", "shop"


def parse(spec: dict[str, object], *, default_cluster: str = "prod-gcp") -> TokenRequestSpec:
    return parse_spec(spec, name=NAME, namespace=NAMESPACE, default_cluster=default_cluster)


def test_target_defaults_to_own_namespace_and_operator_cluster() -> None:
    spec = parse({"target": {"application": "orders-api"}})
    assert spec == TokenRequestSpec(
        scope="api://prod-gcp.shop.orders-api/.default",
        secret_name=NAME,
        refresh_before=None,
        credentials_secret=None,
    )


def test_full_spec() -> None:
    spec = parse(
        {
            "target": {"application": "orders-api", "namespace": "orders", "cluster": "dev-gcp"},
            "secretName": "orders-api-token",
            "refreshBefore": "10m",
            "credentials": {"secretRef": {"name": "azure-shop-frontend"}},
        },
        default_cluster="",
    )
    assert spec.scope == "api://dev-gcp.orders.orders-api/.default"
    assert spec.secret_name == "orders-api-token"
    assert spec.refresh_before == timedelta(minutes=10)
    assert spec.credentials_secret == "azure-shop-frontend"


def test_service_account_ref() -> None:
    spec = parse(
        {"scope": "api://x/.default", "credentials": {"serviceAccountRef": {"name": "shop-fe"}}}
    )
    assert spec.credentials_service_account == "shop-fe"
    assert spec.credentials_secret is None


def test_no_credentials_means_the_operators_own_identity() -> None:
    spec = parse({"scope": "api://x/.default"})
    assert spec.credentials_secret is None
    assert spec.credentials_service_account is None


def test_explicit_scope() -> None:
    spec = parse({"scope": "api://11111111-2222-3333-4444-555555555555/.default"})
    assert spec.scope == "api://11111111-2222-3333-4444-555555555555/.default"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "spec.target or spec.scope is required"),
        (
            {"target": {"application": "a"}, "scope": "api://x/.default"},
            "both set: set exactly one",
        ),
        ({"target": {}}, "spec.target.application is required"),
        ({"target": "orders-api"}, "spec.target must be an object"),
        ({"target": {"application": "a", "namespace": "Bad_NS"}}, "spec.target.namespace"),
        ({"scope": "https://graph.microsoft.com/.default"}, "api://<application id URI>"),
        ({"scope": "api:///.default"}, "api://<application id URI>"),
        ({"scope": "api://x/.default "}, "spaces"),
        ({"scope": "api://x/user.read"}, "must have the form"),
        ({"scope": 42}, "non-empty string"),
        ({"scope": "api://x/.default", "secretName": "Bad_Name"}, "spec.secretName 'Bad_Name'"),
        ({"scope": "api://x/.default", "refreshBefore": "10"}, "spec.refreshBefore: '10'"),
        ({"scope": "api://x/.default", "refreshBefore": 600}, "spec.refreshBefore must be"),
        ({"scope": "api://x/.default", "credentials": {}}, "exactly one of secretRef"),
        (
            {
                "scope": "api://x/.default",
                "credentials": {"secretRef": {"name": "a"}, "serviceAccountRef": {"name": "b"}},
            },
            "exactly one of secretRef",
        ),
        (
            {"scope": "api://x/.default", "credentials": {"serviceAccountRef": {"name": "B_"}}},
            "spec.credentials.serviceAccountRef.name 'B_'",
        ),
        (
            {
                "scope": "api://x/.default",
                "credentials": {"serviceAccountRef": {"name": "b", "namespace": "other"}},
            },
            "serviceAccountRef.namespace is not supported",
        ),
        (
            {
                "scope": "api://x/.default",
                "credentials": {"secretRef": {"name": "b", "namespace": "other"}},
            },
            "secretRef.namespace is not supported",
        ),
        (
            {"scope": "api://x/.default", "credentials": {"secretRef": {}}},
            "spec.credentials.secretRef.name must be",
        ),
    ],
)
def test_spec_errors_say_what_to_fix(spec: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(spec)
    assert message in str(caught.value)


def test_target_without_any_cluster_is_an_error() -> None:
    with pytest.raises(SpecError, match=r"M2M_CLUSTER_NAME is empty.*set spec\.target\.cluster"):
        parse({"target": {"application": "orders-api"}}, default_cluster="")
