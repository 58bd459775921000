"""Identities: the operator's own (env or rotated files), Secrets, and the endpoint allow-list."""

import base64
from collections.abc import Mapping
from pathlib import Path

import pytest

from m2m_token_operator.config.settings import Settings
from m2m_token_operator.tokens.credentials import (
    CLIENT_SECRET,
    ClientCredentials,
    CredentialsError,
    EndpointPolicy,
    credentials_from_secret,
    operator_identity,
    operator_token_endpoint,
    secret_credentials,
)

SECRET = "s3cr3t~value.with+chars"
ENDPOINT = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"
POLICY = EndpointPolicy(
    allowed_hosts=frozenset({"login.microsoftonline.com"}), allow_insecure_http=False
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_data(**overrides: str | None) -> dict[str, str]:
    data = {
        "AZURE_APP_CLIENT_ID": b64("client-1"),
        "AZURE_APP_CLIENT_SECRET": b64(SECRET + "\n"),
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": b64(ENDPOINT),
    }
    for key, value in overrides.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


# The allow-list


@pytest.mark.parametrize(
    "url",
    [
        ENDPOINT,
        "https://LOGIN.microsoftonline.com./t/oauth2/v2.0/token",
        "https://login.microsoftonline.com:443/t/oauth2/v2.0/token?p=policy",
    ],
)
def test_allowed_endpoints(url: str) -> None:
    POLICY.check(url)  # no exception


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://login.microsoftonline.com/t/token", "plain http"),
        ("https://evil.example/t/token", "'evil.example' is not in the operator's allowed"),
        ("https://login.microsoftonline.com.evil.example/token", "not in the operator's allowed"),
        ("https://user:pw@login.microsoftonline.com/t/token", "user name or password"),
        ("https://login.microsoftonline.com@evil.example/t", "user name or password"),
        ("ftp://login.microsoftonline.com/t", "https://"),
        ("https:///token", "no host"),
        ("https://login.microsoftonline.com/t /token", "spaces"),
        ("https://login.microsoftonline.com:99999/t", "port"),
        # Some URL parsers (urllib3 among them) read these hosts as evil.example.
        ("https://evil.example\\.login.microsoftonline.com/t", "may only contain"),
        ("https://evil.example%2F.login.microsoftonline.com/t", "may only contain"),
    ],
)
def test_rejected_endpoints(url: str, message: str) -> None:
    with pytest.raises(CredentialsError) as caught:
        POLICY.check(url)
    assert caught.value.reason == "EndpointNotAllowed"
    assert message in str(caught.value)


def test_http_only_when_allowed() -> None:
    policy = EndpointPolicy(allowed_hosts=frozenset({"127.0.0.1"}), allow_insecure_http=True)
    policy.check("http://127.0.0.1:8080/token")
    policy.check("https://127.0.0.1/token")


def test_port_and_wildcard_entries() -> None:
    policy = EndpointPolicy(
        allowed_hosts=frozenset({"127.0.0.1:8443", "*.ciam.test"}), allow_insecure_http=False
    )
    policy.check("https://127.0.0.1:8443/token")
    policy.check("https://tenant.ciam.test/token")
    for url in ("https://127.0.0.1:9443/token", "https://ciam.test/token", "https://xciam.test/t"):
        with pytest.raises(CredentialsError):
            policy.check(url)


# Credentials from a Secret


def test_credentials_from_secret() -> None:
    credentials = credentials_from_secret(
        secret_data(), namespace="shop", name="azure-shop", policy=POLICY
    )
    assert credentials == secret_credentials(
        token_endpoint=ENDPOINT,
        client_id="client-1",
        client_secret=SECRET,  # the trailing newline of a file-made Secret is gone
        source="Secret shop/azure-shop",
    )
    assert SECRET not in repr(credentials)
    assert SECRET not in str(credentials)
    assert len(credentials.fingerprint()) == 64
    assert SECRET not in credentials.fingerprint()


def test_fingerprint_tells_rotated_secrets_apart() -> None:
    first = credentials_from_secret(secret_data(), namespace="shop", name="a", policy=POLICY)
    same = credentials_from_secret(secret_data(), namespace="shop", name="a", policy=POLICY)
    rotated = credentials_from_secret(
        secret_data(AZURE_APP_CLIENT_SECRET=b64("new")), namespace="shop", name="a", policy=POLICY
    )
    assert first.fingerprint() == same.fingerprint() != rotated.fingerprint()


def test_missing_secret() -> None:
    with pytest.raises(CredentialsError) as caught:
        credentials_from_secret(None, namespace="shop", name="azure-shop", policy=POLICY)
    assert caught.value.reason == "CredentialsMissing"
    assert "Secret shop/azure-shop not found" in str(caught.value)
    assert "AZURE_APP_CLIENT_SECRET" in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"AZURE_APP_CLIENT_SECRET": None},
        {"AZURE_APP_CLIENT_SECRET": ""},
        {"AZURE_APP_CLIENT_SECRET": b64("  \n")},
    ],
)
def test_missing_or_empty_key(overrides: dict[str, str | None]) -> None:
    with pytest.raises(CredentialsError) as caught:
        credentials_from_secret(secret_data(**overrides), namespace="s", name="n", policy=POLICY)
    assert caught.value.reason == "CredentialsMissing"
    assert "lacks a value for AZURE_APP_JWK or AZURE_APP_CLIENT_SECRET" in str(caught.value)


def test_undecodable_value() -> None:
    with pytest.raises(CredentialsError) as caught:
        credentials_from_secret(
            secret_data(AZURE_APP_CLIENT_ID="not base64!"), namespace="s", name="n", policy=POLICY
        )
    assert caught.value.reason == "CredentialsInvalid"
    assert "AZURE_APP_CLIENT_ID is not valid base64" in str(caught.value)


def test_malformed_endpoint_is_invalid_and_foreign_one_not_allowed() -> None:
    with pytest.raises(CredentialsError) as caught:
        credentials_from_secret(
            secret_data(AZURE_OPENID_CONFIG_TOKEN_ENDPOINT=b64("login.microsoftonline.com/t")),
            namespace="s",
            name="n",
            policy=POLICY,
        )
    assert caught.value.reason == "CredentialsInvalid"
    with pytest.raises(CredentialsError) as caught:
        credentials_from_secret(
            secret_data(AZURE_OPENID_CONFIG_TOKEN_ENDPOINT=b64("https://attacker.example/t")),
            namespace="s",
            name="n",
            policy=POLICY,
        )
    assert caught.value.reason == "EndpointNotAllowed"
    assert "Credentials Secret s/n: token endpoint host" in str(caught.value)
    assert SECRET not in str(caught.value)


# The operator's own identity


def _operator_identity(settings: Settings, environ: Mapping[str, str]) -> ClientCredentials:
    """As the reconciler calls it: the two settings it reads, not Settings."""
    return operator_identity(
        settings.credentials_dir, environ, allow_insecure_http=settings.allow_insecure_http
    )


def test_operator_identity_from_environment() -> None:
    environ = {
        "AZURE_APP_CLIENT_ID": "operator-client",
        "AZURE_APP_CLIENT_SECRET": SECRET,
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": "https://idp.internal.example/token",
    }
    credentials = _operator_identity(Settings.from_env(environ), environ)
    # Not held to the allow-list: this secret only ever goes to its own endpoint.
    assert credentials.token_endpoint == "https://idp.internal.example/token"
    assert (credentials.client_id, credentials.client_secret) == ("operator-client", SECRET)
    assert (credentials.source, credentials.method) == ("operator identity", CLIENT_SECRET)


def test_operator_identity_is_reused_while_its_values_stay_the_same() -> None:
    """Read afresh at every look, but rebuilt (fingerprint, redactor) only when it changed."""
    environ = {
        "AZURE_APP_CLIENT_ID": "operator-client",
        "AZURE_APP_CLIENT_SECRET": SECRET,
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": "https://idp.internal.example/token",
    }
    first = operator_identity(None, environ, allow_insecure_http=False)
    assert operator_identity(None, environ, allow_insecure_http=False, reuse=first) is first
    for key, value in (
        ("AZURE_APP_CLIENT_SECRET", SECRET + "-rotated"),
        ("AZURE_APP_CLIENT_ID", "another-client"),
        ("AZURE_OPENID_CONFIG_TOKEN_ENDPOINT", "https://idp.internal.example/other"),
    ):
        now = {**environ, key: value}
        changed = operator_identity(None, now, allow_insecure_http=False, reuse=first)
        assert changed is not first
        assert (changed.token_endpoint, changed.client_id, changed.client_secret) == (
            now["AZURE_OPENID_CONFIG_TOKEN_ENDPOINT"],
            now["AZURE_APP_CLIENT_ID"],
            now["AZURE_APP_CLIENT_SECRET"],
        )


def test_operator_identity_missing_names_the_variables() -> None:
    with pytest.raises(CredentialsError) as caught:
        _operator_identity(Settings.from_env({}), {"AZURE_APP_CLIENT_ID": "x"})
    assert caught.value.reason == "CredentialsMissing"
    assert "AZURE_APP_CLIENT_SECRET, AZURE_OPENID_CONFIG_TOKEN_ENDPOINT" in str(caught.value)


def test_operator_identity_http_only_when_allowed() -> None:
    environ = {
        "AZURE_APP_CLIENT_ID": "c",
        "AZURE_APP_CLIENT_SECRET": SECRET,
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": "http://127.0.0.1:8080/token",
    }
    with pytest.raises(CredentialsError) as caught:
        _operator_identity(Settings.from_env(environ), environ)
    assert caught.value.reason == "CredentialsInvalid"
    assert "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS" in str(caught.value)
    allowing = Settings.from_env({**environ, "M2M_ALLOW_INSECURE_HTTP_ENDPOINTS": "true"})
    assert _operator_identity(allowing, environ).token_endpoint == "http://127.0.0.1:8080/token"


def test_operator_identity_files_are_read_afresh(tmp_path: Path) -> None:
    (tmp_path / "AZURE_APP_CLIENT_ID").write_text("operator-client\n")
    (tmp_path / "AZURE_APP_CLIENT_SECRET").write_text("first-secret\n")
    (tmp_path / "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT").write_text(ENDPOINT)
    environ = {"M2M_CREDENTIALS_DIR": str(tmp_path), "AZURE_APP_CLIENT_SECRET": "env-secret"}
    settings = Settings.from_env(environ)

    first = _operator_identity(settings, environ)
    assert first.client_secret == "first-secret"  # the file wins over the environment
    (tmp_path / "AZURE_APP_CLIENT_SECRET").write_text("rotated-secret\n")
    rotated = _operator_identity(settings, environ)
    assert rotated.client_secret == "rotated-secret"
    assert rotated.fingerprint() != first.fingerprint()


def test_operator_identity_file_falls_back_to_environment(tmp_path: Path) -> None:
    (tmp_path / "AZURE_APP_CLIENT_ID").write_text("operator-client")
    environ = {
        "M2M_CREDENTIALS_DIR": str(tmp_path),
        "AZURE_APP_CLIENT_SECRET": "env-secret",
        "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": ENDPOINT,
    }
    credentials = _operator_identity(Settings.from_env(environ), environ)
    assert (credentials.client_id, credentials.client_secret) == ("operator-client", "env-secret")


def test_operator_token_endpoint_alone(tmp_path: Path) -> None:
    environ = {"AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": " https://idp.example/token\n"}
    assert operator_token_endpoint(None, environ) == "https://idp.example/token"
    assert operator_token_endpoint(None, {}) is None
    (tmp_path / "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT").write_text(ENDPOINT)
    settings = Settings.from_env({"M2M_CREDENTIALS_DIR": str(tmp_path)})
    assert operator_token_endpoint(settings.credentials_dir, environ) == ENDPOINT
