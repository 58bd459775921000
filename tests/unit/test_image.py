"""`make image` picks the first OCI builder that works, and says how when none does."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from devenv.image import choose_builder, main


def fake_builder(directory: Path, name: str, *, works: bool, record: Path) -> None:
    """An executable that records its arguments; its probe fails unless `works`."""
    script = directory / name
    script.write_text(
        "#!/bin/sh\n"
        f'echo "{name} $*" >> {record}\n'
        f'case "$1" in info|version) exit {0 if works else 1};; esac\n'
        "exit 0\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_a_docker_without_daemon_is_passed_over_for_podman(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "calls.log"
    fake_builder(tmp_path, "docker", works=False, record=record)
    fake_builder(tmp_path, "podman", works=True, record=record)

    def which(name: str) -> str | None:
        return shutil.which(name, path=str(tmp_path))

    chosen, passed_over = choose_builder(which)
    assert chosen is not None
    assert chosen[1].name == "podman"
    assert passed_over[0].startswith("docker: installed")

    assert main(["--image", "registry.example:5000/m2m:1.2.3"], which=which) == 0
    calls = record.read_text().splitlines()
    assert calls[-1] == "podman build -t registry.example:5000/m2m:1.2.3 -f Dockerfile ."
    err = capsys.readouterr().err
    assert "--set image.repository=registry.example:5000/m2m --set image.tag=1.2.3" in err
    assert "kustomize edit set image m2m-token-operator=registry.example:5000/m2m:1.2.3" in err


def test_without_any_builder_it_says_how_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--image", "m2m-token-operator:0.1.0"], which=lambda name: None) == 1
    err = capsys.readouterr().err
    for name in ("docker", "podman", "buildah", "nerdctl"):
        assert f"{name}: not installed" in err
    assert "docker build -t m2m-token-operator:0.1.0 ." in err
