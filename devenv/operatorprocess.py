"""The operator as a real process, with the ServiceAccount identity it has in a cluster.

Running `python -m m2m_token_operator` as a child process (not Kopf in the test's
own process) is the only way to see what a Deployment would see: its console
script and settings, its own event loop and signal handling, its log output as
written, and an API identity limited to the shipped RBAC, so that a missing
permission shows up as a failure. The output of every start of one
`OperatorProcess` goes to one log file (with a marker line per start), which
the tests read.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import requests

from devenv.process import StartStop, _die_with_parent

__all__ = ["Identity", "OperatorError", "OperatorProcess", "free_port"]

_KEEP_ENV = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME")
START_MARKER = "=== devenv: operator"


class OperatorError(RuntimeError):
    """The operator did not start or stop as expected; the message quotes its log."""


@dataclass(frozen=True)
class Identity:
    """An OAuth 2.0 client: the operator's own one, or a credentials Secret's."""

    client_id: str
    client_secret: str = field(repr=False)
    token_endpoint: str

    def as_env(self) -> dict[str, str]:
        return {
            "AZURE_APP_CLIENT_ID": self.client_id,
            "AZURE_APP_CLIENT_SECRET": self.client_secret,
            "AZURE_OPENID_CONFIG_TOKEN_ENDPOINT": self.token_endpoint,
        }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OperatorProcess(StartStop):
    """`python -m m2m_token_operator ARGS` with a kubeconfig, an identity and settings.

    `start()` returns once Kopf's liveness endpoint answers (startup handlers
    done), `stop()` sends SIGTERM and then SIGKILL, `kill()` sends SIGKILL at
    once; it can be started again after either.
    """

    def __init__(
        self,
        *,
        kubeconfig: Path,
        log_file: Path,
        identity: Identity | None,
        cluster_name: str,
        args: Sequence[str] = ("--standalone",),
        settings: Mapping[str, str] | None = None,
        name: str = "operator",
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_file = log_file
        self.identity = identity
        self.cluster_name = cluster_name
        self.args = list(args)
        self.settings = dict(settings or {})
        self.name = name
        self.starts = 0
        self.liveness_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- state --

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def environment(self) -> dict[str, str]:
        env = {key: os.environ[key] for key in _KEEP_ENV if key in os.environ}
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            M2M_CLUSTER_NAME=self.cluster_name,
            M2M_LOG_FORMAT="text",
            M2M_METRICS_PORT="0",
            PYTHONUNBUFFERED="1",
        )
        if self.identity is not None:
            env.update(self.identity.as_env())
        env.update(self.settings)
        return env

    # -- lifecycle --

    def start(self, *, timeout: float = 60.0) -> None:
        if self.running:
            raise OperatorError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        self.liveness_port = free_port()
        command = [
            sys.executable,
            "-m",
            "m2m_token_operator",
            *self.args,
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # A new file for the first start (a log directory may be reused), appended after.
        self._log = self.log_file.open("wb" if self.starts == 1 else "ab")
        self._log.write(f"{START_MARKER} {self.name} start #{self.starts}\n".encode())
        self._log.flush()
        self._process = subprocess.Popen(
            command,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Dies with the harness, like the control plane, and is stopped by it,
            # not by a Ctrl-C at the terminal (see devenv.process).
            preexec_fn=_die_with_parent,
            process_group=0,
        )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            code = self._process.poll()
            if code is not None:
                self._close_log()
                raise OperatorError(
                    f"{self.name} exited with {code} while starting:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise OperatorError(f"{self.name} not live within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.liveness_port}/healthz"
            return requests.get(url, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; the exit status (None if never run)."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_log()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, with no goodbye to the peering or anyone else."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- the log --

    def log_text(self) -> str:
        if not self.log_file.exists():
            return ""
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, max_chars: int = 8000) -> str:
        return self.log_text()[-max_chars:]

    def log_size(self) -> int:
        return len(self.log_text())

    def wait_for_log(self, pattern: str, *, timeout: float, since: int = 0) -> re.Match[str]:
        """Wait until the log (from character `since` on) matches the regex `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text(), since)
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise OperatorError(
                    f"{self.name}: no log line matching {pattern!r} within {timeout}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.2)
