"""The image's install steps, reproduced in a fresh venv: the locks are complete and installable.

The Dockerfile installs hash-pinned wheels only (`requirements.lock`), builds our
wheel with the hash-pinned setuptools (`requirements-build.lock`) without build
isolation, and installs it without dependencies. If a dependency is added to
pyproject.toml but not to the lock, or the lock stops matching PyPI, the image
build breaks; this test breaks first, without Docker. It needs PyPI (or a
mirror configured for pip) and takes about a minute on a cold pip cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The exact commands of the Dockerfile's builder stage; the test runs the same.
BUILD_TOOLS = "install --require-hashes --no-deps --only-binary=:all: -r requirements-build.lock"
RUNTIME_DEPS = "install --require-hashes --no-deps --only-binary=:all: -r requirements.lock"
WHEEL = "wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist ."
INSTALL = "install --no-deps /tmp/dist/*.whl"
INTO_RUNTIME = "/opt/build/bin/pip --python /opt/venv/bin/python"


def run(*args: str | Path, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result.stdout


def test_dockerfile_runs_the_steps_this_test_reproduces() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    for step in (
        f"/opt/build/bin/pip {BUILD_TOOLS}",
        "python -m venv --without-pip /opt/venv",
        f"{INTO_RUNTIME} {RUNTIME_DEPS}",
        f"/opt/build/bin/pip {WHEEL}",
        f"{INTO_RUNTIME} {INSTALL}",
    ):
        assert step in dockerfile, f"the Dockerfile no longer runs `{step}`: update this test"
    assert 'ENTRYPOINT ["m2m-token-operator"]' in dockerfile
    assert "USER 10001:10001" in dockerfile


def test_locks_are_hash_pinned() -> None:
    for name in ("requirements.lock", "requirements-build.lock"):
        text = (ROOT / name).read_text(encoding="utf-8")
        pins = [line for line in text.splitlines() if line and line[0].isalnum()]
        assert pins, f"{name} pins nothing"
        for pin in pins:
            assert "==" in pin, f"{name}: `{pin}` is not an exact pin"
        assert "--hash=sha256:" in text


@pytest.mark.timeout(900)
def test_image_install_steps_in_a_fresh_venv(tmp_path: Path) -> None:
    # The build context as .dockerignore leaves it: only these files.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.lock", "requirements-build.lock"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "operator", src / "operator", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    dist = tmp_path / "dist"
    build, runtime = tmp_path / "build", tmp_path / "venv"
    venv.create(build, with_pip=True, clear=True)
    venv.create(runtime, with_pip=False, clear=True)
    build_pip = build / "bin" / "pip"
    pip = (build_pip, "--python", runtime / "bin" / "python")

    run(build_pip, *BUILD_TOOLS.split(), cwd=src)
    run(*pip, *RUNTIME_DEPS.split(), cwd=src)
    run(build_pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", dist, ".", cwd=src)
    wheels = sorted(dist.glob("m2m_token_operator-*.whl"))
    assert len(wheels) == 1, wheels
    run(*pip, "install", "--no-deps", wheels[0])

    # Every requirement of every installed distribution is met by the lock.
    run(*pip, "check")
    # Neither pip nor a build tool is in the runtime venv.
    installed = run(*pip, "list", "--format=freeze").lower()
    names = {line.split("==")[0] for line in installed.splitlines()}
    assert not names & {"pip", "setuptools", "wheel"}, names
    assert "m2m-token-operator==" in installed
    # The console script works, and every module imports with the locked set alone.
    usage = run(runtime / "bin" / "m2m-token-operator", "--help")
    assert "m2m-token-operator" in usage
    run(
        runtime / "bin" / "python",
        "-c",
        "import importlib, pkgutil, m2m_token_operator as p\n"
        "for m in pkgutil.walk_packages(p.__path__, 'm2m_token_operator.'):\n"
        "    importlib.import_module(m.name)",
    )


def test_interpreter_matches_the_image() -> None:
    # The locks are resolved for CPython 3.11 (the image's base); a different
    # interpreter here would test a different resolution.
    assert sys.version_info[:2] == (3, 11)
