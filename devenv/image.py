"""`make image`: build the operator image from the Dockerfile with whichever OCI builder works.

No image is published, so every install starts by building one. The first of
docker, podman, buildah and nerdctl that is installed AND answers (a docker
client without a running daemon does not count) builds it; with none, this
says what it found, why each is unusable, and how to build elsewhere. After a
build it prints how to point the Helm chart and the kustomization at the image.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUILDERS", "Builder", "choose_builder", "default_image", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Builder:
    name: str
    build: tuple[str, ...]  # the build subcommand; `-t IMAGE -f Dockerfile CONTEXT` follow
    probe: tuple[str, ...]  # a command that fails when the builder cannot build now


BUILDERS = (
    Builder("docker", ("build",), ("info",)),
    Builder("podman", ("build",), ("info",)),
    Builder("buildah", ("build",), ("version",)),
    Builder("nerdctl", ("build",), ("info",)),
)

Which = Callable[[str], str | None]
Probe = Callable[[Sequence[str]], bool]


def _probe(command: Sequence[str]) -> bool:
    try:
        answer = subprocess.run(
            list(command), capture_output=True, timeout=20, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return answer.returncode == 0


def choose_builder(
    which: Which = shutil.which, probe: Probe = _probe
) -> tuple[tuple[str, Builder] | None, list[str]]:
    """The first usable builder (its path and kind), and why each earlier one was passed over."""
    passed_over: list[str] = []
    for builder in BUILDERS:
        path = which(builder.name)
        if path is None:
            passed_over.append(f"{builder.name}: not installed")
            continue
        if not probe([path, *builder.probe]):
            passed_over.append(
                f"{builder.name}: installed ({path}) but `{builder.name} {' '.join(builder.probe)}`"
                " fails (no daemon or no permission?)"
            )
            continue
        return (path, builder), passed_over
    return None, passed_over


def default_image() -> str:
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return f"m2m-token-operator:{match.group(1) if match else 'dev'}"


def _split_reference(image: str) -> tuple[str, str]:
    """repository and tag of `registry/name:tag` (a registry's :port is not a tag)."""
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return image, "latest"
    return repository, tag


def how_to_use(image: str) -> str:
    repository, tag = _split_reference(image)
    return (
        f"Push it where your nodes pull from (or `kind load docker-image {image}`), then:\n"
        f"  helm install m2m-token-operator charts/m2m-token-operator -n m2m-token-operator"
        f" --create-namespace --set image.repository={repository} --set image.tag={tag}\n"
        f"  or, with kustomize (in manifests/ or your overlay):\n"
        f"  kustomize edit set image m2m-token-operator={image}\n"
    )


def main(argv: Sequence[str] | None = None, *, which: Which = shutil.which) -> int:
    parser = argparse.ArgumentParser(prog="python -m devenv.image", description=__doc__)
    parser.add_argument("--image", default=default_image(), help="the reference to tag it with")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the build command, do not run it"
    )
    args = parser.parse_args(argv)
    chosen, passed_over = choose_builder(which)
    if chosen is None:
        print(
            "make image: no usable OCI image builder here:\n  "
            + "\n  ".join(passed_over)
            + "\nInstall one of docker (with a running daemon), podman, buildah or nerdctl,"
            " or build on a machine that has one, from the repository root:\n"
            f"  docker build -t {args.image} .\n\n" + how_to_use(args.image),
            file=sys.stderr,
        )
        return 1
    path, builder = chosen
    command = [path, *builder.build, "-t", args.image, "-f", "Dockerfile", "."]
    print(f"make image: {' '.join(command)}", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    built = subprocess.run(command, cwd=REPO_ROOT, check=False)
    if built.returncode != 0:
        print(f"make image: {builder.name} build failed (exit {built.returncode})", file=sys.stderr)
        return built.returncode
    print(f"\nBuilt {args.image}.\n" + how_to_use(args.image), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
