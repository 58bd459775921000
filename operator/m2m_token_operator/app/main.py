"""The `m2m-token-operator` command: `kopf run` of our handlers, with our defaults.

Every Kopf run option passes through (`--namespace`, `--standalone`,
`--liveness`, `--verbose`, `--peering`, ...). Defaults that differ from bare
Kopf: all namespaces when no namespace is named, and the log format from
M2M_LOG_FORMAT (JSON unless told otherwise). Settings are validated before
Kopf starts, so a bad value stops the process with one clear line.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Sequence

from m2m_token_operator.app import garbage_collection
from m2m_token_operator.config.settings import Settings, SettingsError
from m2m_token_operator.kube.secret_watches import SERVED_NAMESPACES_ENV

HANDLERS_MODULE = "m2m_token_operator.app.handlers"
_NAMESPACE_FLAGS = ("-n", "--namespace", "-A", "--all-namespaces")


def kopf_arguments(args: Sequence[str], *, log_format: str) -> list[str]:
    arguments = ["run", "-m", HANDLERS_MODULE]
    if not any(arg.split("=", 1)[0] in _NAMESPACE_FLAGS for arg in args):
        arguments.append("--all-namespaces")
    if not any(arg.split("=", 1)[0] == "--log-format" for arg in args):
        # "text" is Kopf's "full" format: with time, logger and level. Kopf's "plain" is
        # the bare message, and a log that cannot tell an error from a debug line is no use.
        arguments.append(f"--log-format={'json' if log_format == 'json' else 'full'}")
    return [*arguments, *args]


def namespace_patterns(args: Sequence[str]) -> list[str]:
    """The --namespace/-n values among Kopf's arguments (none: all namespaces)."""
    patterns: list[str] = []
    taking = False
    for arg in args:
        if taking:
            patterns.append(arg)
            taking = False
        elif arg in ("-n", "--namespace"):
            taking = True
        elif arg.startswith("--namespace="):
            patterns.append(arg.split("=", 1)[1])
    return patterns


def ensure_peering_identity(environ: dict[str, str] | os._Environ[str]) -> str:
    """The identity Kopf announces in the peering, known to us too (POD_ID, as Kopf reads it).

    Without POD_ID Kopf invents a random identity that the refresh scheduler could not
    tell apart from another replica's. The Deployment sets POD_ID to the pod's name.
    """
    if not environ.get("POD_ID"):
        environ["POD_ID"] = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
    return environ["POD_ID"]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(
            "usage: m2m-token-operator [KOPF RUN OPTIONS]\n\n"
            "Runs the TokenRequest operator (kopf run -m m2m_token_operator.app.handlers).\n"
            "Defaults: --all-namespaces, --log-format from M2M_LOG_FORMAT (json).\n"
            "Settings come from AZURE_* and M2M_* environment variables; see docs/operations.md.\n"
            "Kopf's own options: m2m-token-operator --kopf-help"
        )
        return
    import kopf.cli  # imported late: --help must not need a working Kopf environment

    if args and args[0] == "--kopf-help":
        kopf.cli.main(args=["run", "--help"], prog_name="m2m-token-operator")
        return
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as error:
        print(f"m2m-token-operator: invalid settings: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    ensure_peering_identity(os.environ)
    garbage_collection.tune()
    garbage_collection.freeze_startup()  # the imported modules: Kopf, kubernetes, aiohttp
    # The Secret watches (kube/secret_watches.py) serve the namespaces Kopf serves.
    os.environ[SERVED_NAMESPACES_ENV] = "\n".join(namespace_patterns(args))
    kopf.cli.main(
        args=kopf_arguments(args, log_format=settings.log_format),
        prog_name="m2m-token-operator",
    )


if __name__ == "__main__":
    main()
