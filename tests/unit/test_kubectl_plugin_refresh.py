"""`kubectl m2m refresh` for one, by selector, or everywhere; and `kubectl m2m version`."""

from __future__ import annotations

import pytest

from m2m_token_operator.cli.kubectl_plugin import build_parser, main, refresh_targets_error


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["refresh", "orders-api"], None),
        (["refresh", "-l", "team=shop"], None),
        (["refresh", "-l", "team=shop", "-A"], None),
        (["refresh", "--all", "-n", "shop"], None),
        (["refresh", "--all", "-A"], None),
        (["refresh"], "give a NAME, or -l SELECTOR / --all for many"),
        (
            ["refresh", "orders-api", "-l", "team=shop"],
            "give a NAME, or -l SELECTOR / --all, not both",
        ),
        (["refresh", "orders-api", "-A"], "-A needs -l SELECTOR or --all"),
        (["refresh", "-l", "a=b", "--all"], "give -l SELECTOR or --all, not both"),
    ],
)
def test_refresh_takes_one_name_or_a_selection(argv: list[str], problem: str | None) -> None:
    assert refresh_targets_error(build_parser().parse_args(argv)) == problem


def test_a_bad_refresh_selection_is_a_usage_error_before_any_cluster_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["refresh", "orders-api", "-A", "--kubeconfig", "/nonexistent"])
    assert exited.value.code == 2
    assert "refresh: -A needs -l SELECTOR or --all" in capsys.readouterr().err


def test_version_needs_no_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("kubectl-m2m 0.1.0 ")
    assert "m2m.dev/v1alpha1" in out
