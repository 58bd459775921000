"""Pinned etcd, kube-apiserver, kube-controller-manager, kubectl and helm, built once per machine.

No prebuilt binary can be downloaded where this project is built and tested;
only the Go module proxy is reachable. So the binaries are compiled from their
Go modules (`devenv/gobuild/*/go.mod` pins them, `go.sum` makes the build
reproducible) and cached under `<cache>/bin/<component>-<version>/`, outside
the repository. The first build takes minutes, hence the progress lines; every
later run finds the cache and returns at once.

`python -m devenv.binaries` fills the cache (CI runs it before the tests so the
build time shows as its own step) and also fetches the token server.
`M2M_BIN_DIR` points at a directory with all four binaries to skip building
(e.g. binaries from setup-envtest); `M2M_HELM` likewise names a helm binary,
`M2M_PROMQL_CHECK` a promql-check. Helm and promql-check (Prometheus's PromQL
parser, for the dashboard and alert tests) are components of their own, built
only by `ensure_helm` / `ensure_promql_check` (their tests and `python -m
devenv.binaries`), so the control-plane tests never wait for them.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from devenv.cache import cache_dir, fill_once

__all__ = [
    "COMPONENTS",
    "Binaries",
    "BuildError",
    "Component",
    "ensure_binaries",
    "ensure_helm",
    "ensure_promql_check",
    "main",
]

GOBUILD_DIR = Path(__file__).resolve().parent / "gobuild"
_BUILD_FLAGS = ("-trimpath", "-buildvcs=false")
_PROGRESS_INTERVAL = 20.0

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """The binaries could not be built; the message says what to do about it."""


@dataclass(frozen=True)
class Component:
    """One Go build module under `devenv/gobuild/<name>` and the binaries it yields."""

    name: str
    module: str  # the required module whose version names the cache directory
    binaries: Mapping[str, str]  # binary file name -> Go package to build
    # Values stamped with -X (importpath.name=value); {version}, {major} and {minor}
    # are the required module's.
    stamps: tuple[str, ...] = ()

    @property
    def build_dir(self) -> Path:
        return GOBUILD_DIR / self.name

    @property
    def version(self) -> str:
        go_mod = (self.build_dir / "go.mod").read_text()
        match = re.search(rf"^\s*(?:require\s+)?{re.escape(self.module)}\s+(v\S+)", go_mod, re.M)
        if match is None:
            raise BuildError(f"{self.build_dir / 'go.mod'} does not require {self.module}")
        return match.group(1)

    @property
    def ldflags(self) -> str:
        version = self.version
        major, minor = version.lstrip("v").split(".")[:2]
        fields = {"version": version, "major": major, "minor": minor}
        return " ".join(["-s", "-w", *(f"-X {stamp.format(**fields)}" for stamp in self.stamps)])

    @property
    def recipe_digest(self) -> str:
        # The version alone would not notice a changed replace, go.sum or flag,
        # and a stale binary is worse than a rebuild.
        digest = hashlib.sha256()
        for file_name in ("go.mod", "go.sum"):
            digest.update((self.build_dir / file_name).read_bytes())
        for source in sorted(self.build_dir.glob("*.go")):  # a module's own main package
            digest.update(source.read_bytes())
        digest.update(repr((self.binaries, self.ldflags, _BUILD_FLAGS)).encode())
        return digest.hexdigest()[:10]

    @property
    def cache_path(self) -> Path:
        return cache_dir() / "bin" / f"{self.name}-{self.version}-{self.recipe_digest}"


def _kubernetes_stamps() -> tuple[str, ...]:
    # What Kubernetes' own build (hack/lib/version.sh) stamps; without it every
    # binary reports v0.0.0-master and `kubectl version` fails to parse that.
    stamps = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        stamps += [
            f"{package}.gitVersion={{version}}",
            f"{package}.gitMajor={{major}}",
            f"{package}.gitMinor={{minor}}",
            f"{package}.gitTreeState=clean",
        ]
    return tuple(stamps)


KUBERNETES = Component(
    name="kubernetes",
    module="k8s.io/kubernetes",
    binaries={
        "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
        "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    },
    stamps=_kubernetes_stamps(),
)
ETCD = Component(
    name="etcd",
    module="go.etcd.io/etcd/server/v3",
    binaries={"etcd": "go.etcd.io/etcd/server/v3"},
)
COMPONENTS = (ETCD, KUBERNETES)
HELM = Component(
    name="helm",
    module="helm.sh/helm/v4",
    binaries={"helm": "helm.sh/helm/v4/cmd/helm"},
    # What Helm's Makefile stamps for a tagged release; unstamped, `helm version`
    # says v4.3 and charts' kubeVersion checks see no patch level.
    stamps=(
        "helm.sh/helm/v4/internal/version.version={version}",
        "helm.sh/helm/v4/internal/version.gitTreeState=clean",
    ),
)
# Prometheus's PromQL parser behind a line protocol (devenv/gobuild/promql/main.go):
# the dashboard's and the alerts' expressions are checked by the parser Prometheus uses.
PROMQL_CHECK = Component(
    name="promql",
    module="github.com/prometheus/prometheus",
    binaries={"promql-check": "m2m-token-operator/devenv/gobuild/promql"},
)


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the control-plane binaries."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path

    @classmethod
    def in_directories(cls, by_name: Mapping[str, Path]) -> Binaries:
        return cls(
            etcd=by_name["etcd"] / "etcd",
            kube_apiserver=by_name["kube-apiserver"] / "kube-apiserver",
            kube_controller_manager=by_name["kube-controller-manager"] / "kube-controller-manager",
            kubectl=by_name["kubectl"] / "kubectl",
        )


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _go_executable() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError(
            "Go is not installed (no `go` on PATH). The e2e harness compiles etcd and "
            "kube-apiserver from source because no prebuilt binary can be downloaded here; "
            "install Go 1.26 or newer, or set M2M_BIN_DIR to a directory that holds etcd, "
            "kube-apiserver, kube-controller-manager and kubectl."
        )
    return go


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # -mod=mod lets Go record nothing new yet still verify every module against go.sum.
    env["GOFLAGS"] = f"{env.get('GOFLAGS', '')} -mod=mod".strip()
    # Static binaries, and no C compiler needed: the same choice as the official builds.
    env["CGO_ENABLED"] = "0"
    return env


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _run_go_build(component: Component, out_dir: Path, log: Log) -> None:
    packages = list(component.binaries.values())
    # `-o dir/` names each binary after its package; a single package gets an exact name.
    if len(packages) == 1:
        output = str(out_dir / next(iter(component.binaries)))
    else:
        output = f"{out_dir}{os.sep}"
    command = [
        _go_executable(),
        "build",
        "-v",
        "-p",
        str(os.cpu_count() or 1),
        *_BUILD_FLAGS,
        f"-ldflags={component.ldflags}",
        "-o",
        output,
        *packages,
    ]
    process = subprocess.Popen(
        command,
        cwd=component.build_dir,
        env=_go_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=60)
    counts = {"compiled": 0, "downloaded": 0}

    def read_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith("go: downloading "):
                counts["downloaded"] += 1
            elif re.fullmatch(r"[\w.\-/~+]+", line):
                counts["compiled"] += 1

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    started = time.monotonic()
    while True:
        try:
            process.wait(timeout=_PROGRESS_INTERVAL)
            break
        except subprocess.TimeoutExpired:
            log(
                f"  ... {component.name} {component.version}: "
                f"{counts['downloaded']} modules downloaded, "
                f"{counts['compiled']} packages compiled, "
                f"{_format_duration(time.monotonic() - started)} elapsed"
            )
        except BaseException:
            process.kill()
            process.wait()
            raise
    reader.join()
    if process.returncode != 0:
        raise BuildError(
            f"`go build` of {component.name} {component.version} failed "
            f"(exit {process.returncode}) in {component.build_dir}; last output:\n"
            + "\n".join(tail)
        )


def _build(component: Component, log: Log) -> Path:
    def fill(staging: Path) -> None:
        _go_executable()  # fail before announcing a build that cannot happen
        names = ", ".join(component.binaries)
        log(
            f"building {names} ({component.module} {component.version}) into "
            f"{component.cache_path}; the first build takes several minutes"
        )
        started = time.monotonic()
        _run_go_build(component, staging, log)
        for name in component.binaries:
            if not (staging / name).is_file():
                raise BuildError(f"`go build` reported success but produced no {name}")
        log(f"built {names} in {_format_duration(time.monotonic() - started)}")

    return fill_once(component.cache_path, fill)


def _from_override(directory: str) -> Binaries:
    base = Path(directory).expanduser().resolve()
    names = [name for component in COMPONENTS for name in component.binaries]
    missing = [name for name in names if not os.access(base / name, os.X_OK)]
    if missing:
        raise BuildError(f"M2M_BIN_DIR={directory} lacks executable {', '.join(missing)}")
    return Binaries.in_directories(dict.fromkeys(names, base))


def ensure_binaries(*, log: Log = _print) -> Binaries:
    """Return the control-plane binaries, building whichever are not cached yet."""
    override = os.environ.get("M2M_BIN_DIR")
    if override:
        return _from_override(override)
    by_name: dict[str, Path] = {}
    for component in COMPONENTS:
        directory = _build(component, log)
        by_name.update(dict.fromkeys(component.binaries, directory))
    return Binaries.in_directories(by_name)


def _ensure_tool(component: Component, override_variable: str, log: Log) -> Path:
    [name] = component.binaries
    override = os.environ.get(override_variable)
    if override:
        tool = Path(override).expanduser().resolve()
        if not os.access(tool, os.X_OK):
            raise BuildError(f"{override_variable}={override} is not an executable file")
        return tool
    return _build(component, log) / name


def ensure_helm(*, log: Log = _print) -> Path:
    """Return the pinned helm binary (or $M2M_HELM), building it once if not cached yet."""
    return _ensure_tool(HELM, "M2M_HELM", log)


def ensure_promql_check(*, log: Log = _print) -> Path:
    """Return promql-check (or $M2M_PROMQL_CHECK), building it once if not cached yet."""
    return _ensure_tool(PROMQL_CHECK, "M2M_PROMQL_CHECK", log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devenv.binaries",
        description="Build (once) the control-plane binaries and helm, and fetch the token server.",
    )
    parser.add_argument(
        "--no-token-server",
        action="store_true",
        help="only build the Go binaries; skip fetching mock-oauth2-server with Maven",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        binaries = ensure_binaries()
        for path in (
            binaries.etcd,
            binaries.kube_apiserver,
            binaries.kube_controller_manager,
            binaries.kubectl,
        ):
            _print(f"ready: {path}")
        _print(f"ready: {ensure_helm()}")
        _print(f"ready: {ensure_promql_check()}")
        if not args.no_token_server:
            # Imported here so that building binaries never depends on Java tooling.
            from devenv.tokenserver import ensure_classpath

            jars = ensure_classpath()
            _print(f"ready: mock-oauth2-server ({len(jars)} jars in {jars[0].parent})")
    except (BuildError, RuntimeError) as error:
        _print(f"error: {error}")
        return 1
    _print(f"dev environment ready in {_format_duration(time.monotonic() - started)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
