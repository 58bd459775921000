"""The console script passes Kopf's options through, with our defaults."""

import subprocess
import sys

from m2m_token_operator.app.main import ensure_peering_identity, kopf_arguments


def test_defaults_all_namespaces_and_json_logs() -> None:
    assert kopf_arguments([], log_format="json") == [
        "run", "-m", "m2m_token_operator.app.handlers", "--all-namespaces", "--log-format=json",
    ]  # fmt: skip


def test_user_options_win() -> None:
    args = kopf_arguments(["--namespace=shop", "--log-format=full", "--standalone"],
                          log_format="json")  # fmt: skip
    assert "--all-namespaces" not in args
    assert args[-3:] == ["--namespace=shop", "--log-format=full", "--standalone"]
    assert "--log-format=json" not in args


def test_invalid_settings_stop_with_a_clear_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "m2m_token_operator", "--standalone"],
        env={"M2M_CONNECT_TIMEOUT_SECONDS": "soon", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "M2M_CONNECT_TIMEOUT_SECONDS" in result.stderr


def test_the_api_servers_audience_as_federation_audience_stops_the_operator() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "m2m_token_operator", "--standalone"],
        env={"M2M_FEDERATION_AUDIENCE": "https://kubernetes.default.svc", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "M2M_FEDERATION_AUDIENCE='https://kubernetes.default.svc' is not valid" in (
        result.stderr
    )


def test_the_peering_identity_is_set_once_and_kept() -> None:
    environ: dict[str, str] = {}
    identity = ensure_peering_identity(environ)
    assert environ["POD_ID"] == identity
    assert ensure_peering_identity(environ) == identity
    assert ensure_peering_identity({"POD_ID": "m2m-token-operator-5d9c7-x2x4q"}) == (
        "m2m-token-operator-5d9c7-x2x4q"
    )
    assert ensure_peering_identity({}) != identity  # distinct per process
