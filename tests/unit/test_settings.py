"""Settings: defaults, every variable, and errors that name the variable and the fix."""

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest

from m2m_token_operator.config.settings import Settings, SettingsError
from m2m_token_operator.tokens.credentials import EndpointPolicy
from m2m_token_operator.tokens.timing import RefreshPolicy, RetryPolicy


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.cluster_name == ""
    assert settings.credentials_dir is None
    assert settings.connect_timeout == 5
    assert settings.read_timeout == 15
    assert settings.allowed_endpoint_hosts == frozenset({"login.microsoftonline.com"})
    assert settings.allow_insecure_http is False
    assert settings.refresh_jitter == timedelta(seconds=30)
    assert settings.refresh_floor == timedelta(seconds=60)
    assert settings.min_refresh_interval == timedelta(seconds=60)
    assert settings.retry_initial == timedelta(seconds=5)
    assert settings.retry_max == timedelta(seconds=300)
    assert settings.retry_after_max == timedelta(seconds=3600)
    assert settings.permanent_failure_hold == timedelta(seconds=300)
    assert settings.fetch_workers == 32
    assert settings.namespace_fetch_concurrency == 4
    assert settings.metrics_port == 8080
    assert settings.log_format == "json"
    assert settings.peering_priority is None
    assert settings.federation_audience == "api://AzureADTokenExchange"
    assert settings.refresh_policy() == RefreshPolicy()
    assert settings.retry_policy() == RetryPolicy()


def test_federation_audience() -> None:
    settings = Settings.from_env({"M2M_FEDERATION_AUDIENCE": " api://custom-exchange "})
    assert settings.federation_audience == "api://custom-exchange"


@pytest.mark.parametrize(
    "audience",
    [
        "https://kubernetes.default.svc",
        "https://kubernetes.default.svc.cluster.local/",
        "kubernetes",
        "HTTPS://Kubernetes.Default.Svc",
    ],
)
def test_federation_audience_is_never_the_api_servers(audience: str, tmp_path: Path) -> None:
    # Issue 18: a ServiceAccount token for the API server's audience works against the
    # cluster; the operator must never mint one to send to a token endpoint.
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(
            {"M2M_FEDERATION_AUDIENCE": audience},
            service_account_token_file=tmp_path / "absent",
        )
    assert f"M2M_FEDERATION_AUDIENCE={audience!r} is not valid" in str(raised.value)
    assert "API server's own audience" in str(raised.value)


def _jwt(claims: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_federation_audience_is_not_the_issuer_or_audience_of_the_operators_own_token(
    tmp_path: Path,
) -> None:
    # The cluster's issuer and API audience, as the operator's own (mounted) token names them.
    token_file = tmp_path / "token"
    token_file.write_text(
        _jwt({"iss": "https://oidc.example/cluster-7", "aud": ["https://api.cluster-7.example"]})
    )
    for audience in ("https://oidc.example/cluster-7", "https://api.cluster-7.example/"):
        with pytest.raises(SettingsError, match="M2M_FEDERATION_AUDIENCE"):
            Settings.from_env(
                {"M2M_FEDERATION_AUDIENCE": audience}, service_account_token_file=token_file
            )
    # Anything else, and the default, is fine; so is an unreadable token file.
    allowed = Settings.from_env({}, service_account_token_file=token_file)
    assert allowed.federation_audience == "api://AzureADTokenExchange"
    token_file.write_text("not a token")
    unread = Settings.from_env(
        {"M2M_FEDERATION_AUDIENCE": "https://oidc.example/cluster-7"},
        service_account_token_file=token_file,
    )
    assert unread.federation_audience == "https://oidc.example/cluster-7"


def test_every_variable_is_read(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "M2M_CLUSTER_NAME": "prod-gcp",
            "M2M_CREDENTIALS_DIR": str(tmp_path),
            "M2M_CONNECT_TIMEOUT_SECONDS": "2.5",
            "M2M_READ_TIMEOUT_SECONDS": "7",
            "M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS": " Login.Example.com , 127.0.0.1:8443,,*.ciam.test ",
            "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "TRUE",
            "M2M_REFRESH_JITTER_SECONDS": "0",
            "M2M_REFRESH_MIN_REMAINING_SECONDS": "120",
            "M2M_MIN_REFRESH_INTERVAL_SECONDS": "30",
            "M2M_RETRY_INITIAL_SECONDS": "1",
            "M2M_RETRY_MAX_SECONDS": "60",
            "M2M_RETRY_AFTER_MAX_SECONDS": "600",
            "M2M_PERMANENT_FAILURE_HOLD_SECONDS": "900",
            "M2M_FETCH_WORKERS": "16",
            "M2M_METRICS_PORT": "0",
            "M2M_LOG_FORMAT": "Text",
            "M2M_PEERING_PRIORITY": " 200 ",
            "M2M_NAMESPACE_CONCURRENCY": "12",
            "M2M_NAMESPACE_FETCH_CONCURRENCY": "3",
        }
    )
    assert settings.cluster_name == "prod-gcp"
    assert settings.credentials_dir == tmp_path
    assert (settings.connect_timeout, settings.read_timeout) == (2.5, 7.0)
    assert settings.allowed_endpoint_hosts == frozenset(
        {"login.example.com", "127.0.0.1:8443", "*.ciam.test"}
    )
    assert settings.allow_insecure_http is True
    assert settings.refresh_policy() == RefreshPolicy(
        jitter=timedelta(0), floor=timedelta(seconds=120), min_interval=timedelta(seconds=30)
    )
    assert settings.retry_policy() == RetryPolicy(
        initial=timedelta(seconds=1),
        maximum=timedelta(seconds=60),
        retry_after_max=timedelta(seconds=600),
        permanent_hold=timedelta(seconds=900),
    )
    assert (settings.fetch_workers, settings.metrics_port, settings.log_format) == (16, 0, "text")
    assert settings.peering_priority == 200
    assert (settings.namespace_concurrency, settings.namespace_fetch_concurrency) == (12, 3)
    assert settings.endpoint_policy() == EndpointPolicy(
        allowed_hosts=settings.allowed_endpoint_hosts, allow_insecure_http=True
    )


def test_empty_values_mean_defaults() -> None:
    settings = Settings.from_env({"M2M_FETCH_WORKERS": "", "M2M_LOG_FORMAT": " "})
    assert (settings.fetch_workers, settings.log_format) == (32, "json")


def test_default_allow_list_has_the_operator_identity_host() -> None:
    settings = Settings.from_env(
        {"AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": "https://login.example.net/tenant/oauth2/v2.0/token"}
    )
    assert settings.allowed_endpoint_hosts == frozenset(
        {"login.microsoftonline.com", "login.example.net"}
    )


def test_default_allow_list_prefers_the_mounted_endpoint_file(tmp_path: Path) -> None:
    (tmp_path / "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT").write_text("http://127.0.0.1:9999/token\n")
    settings = Settings.from_env(
        {
            "M2M_CREDENTIALS_DIR": str(tmp_path),
            "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": "https://env.example/token",
        }
    )
    assert settings.allowed_endpoint_hosts == frozenset({"login.microsoftonline.com", "127.0.0.1"})


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("M2M_CLUSTER_NAME", "Prod_GCP", "DNS label"),
        ("M2M_CONNECT_TIMEOUT_SECONDS", "0", "positive number of seconds"),
        ("M2M_READ_TIMEOUT_SECONDS", "soon", "positive number of seconds"),
        ("M2M_READ_TIMEOUT_SECONDS", "nan", "positive number of seconds"),
        ("M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS", "https://login.example.com/x", "host names"),
        ("M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS", "host:notaport", "host names"),
        ("M2M_ALLOWED_TOKEN_ENDPOINT_HOSTS", " , ", "a host name"),
        ("M2M_ALLOW_INSECURE_HTTP_ENDPOINTS", "maybe", "true or false"),
        ("M2M_REFRESH_JITTER_SECONDS", "-1", "non-negative number of seconds"),
        ("M2M_RETRY_INITIAL_SECONDS", "0", "positive number of seconds"),
        ("M2M_RETRY_MAX_SECONDS", "2", "at least M2M_RETRY_INITIAL_SECONDS (5)"),
        ("M2M_RETRY_AFTER_MAX_SECONDS", "inf", "positive number of seconds"),
        ("M2M_PERMANENT_FAILURE_HOLD_SECONDS", "0", "positive number of seconds"),
        ("M2M_FETCH_WORKERS", "0", "whole number from 1 to 256"),
        ("M2M_FETCH_WORKERS", "2.5", "whole number from 1 to 256"),
        ("M2M_NAMESPACE_FETCH_CONCURRENCY", "0", "whole number from 1 to 256"),
        ("M2M_METRICS_PORT", "70000", "whole number from 0 to 65535"),
        ("M2M_LOG_FORMAT", "yaml", "'json' or 'text'"),
        ("M2M_PEERING_PRIORITY", "high", "whole number from -2147483647 to 2147483647"),
        ("M2M_PEERING_PRIORITY", "1.5", "whole number from -2147483647 to 2147483647"),
        ("M2M_PEERING_PRIORITY", "9999999999", "whole number from -2147483647 to 2147483647"),
        ("M2M_CREDENTIALS_DIR", "/nonexistent/m2m", "an existing directory"),
    ],
)
def test_bad_values_name_the_variable_and_the_fix(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert f"{name}=" in message
    assert expected in message


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"M2M_FETCH_WORKERS": "many", "M2M_LOG_FORMAT": "xml"})
    assert "M2M_FETCH_WORKERS='many'" in str(caught.value)
    assert "M2M_LOG_FORMAT='xml'" in str(caught.value)


def test_peering_priority_may_be_negative_and_empty_means_unset() -> None:
    assert Settings.from_env({"M2M_PEERING_PRIORITY": "-5"}).peering_priority == -5
    assert Settings.from_env({"M2M_PEERING_PRIORITY": " "}).peering_priority is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ops/seal-key", ("ops", "seal-key")),
        ("ops/seal.key-v2", ("ops", "seal.key-v2")),
    ],
)
def test_the_seal_key_secret_is_a_namespace_and_a_secret_name(
    raw: str, expected: tuple[str, str]
) -> None:
    assert Settings.from_env({"M2M_SEAL_KEY_SECRET": raw}).seal_key_secret == expected


@pytest.mark.parametrize(
    "raw", ["seal-key", "ops/", "/seal-key", "Ops/seal-key", "ops/seal..key", "ops/seal.-key"]
)
def test_a_seal_key_secret_that_is_not_a_kubernetes_name_stops_the_operator(raw: str) -> None:
    # The names the API server would refuse: DNS label / DNS subdomain (kube_names).
    with pytest.raises(SettingsError, match="M2M_SEAL_KEY_SECRET"):
        Settings.from_env({"M2M_SEAL_KEY_SECRET": raw})
