"""Child processes that die with the harness and leave nothing behind.

A test session that is killed (a CI time-out, a Ctrl-C twice) must not leave an
etcd or a JVM listening on 127.0.0.1 for the next run to trip over, so every
child asks the kernel to SIGKILL it when its parent dies. (SIGTERM is not
enough: a kube-apiserver whose etcd went first hangs in its graceful shutdown.) Their output
goes to an anonymous temporary file (unlinked at once, so nothing stays on disk
however the run ends) unless a log directory is asked for, and its tail is
quoted when a process fails to come up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Self

__all__ = ["ManagedProcess", "StartStop"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. Linux only; elsewhere the
    # children simply are not reaped when the parent is killed.
    # The signal fires when the *thread* that forked exits, so start children
    # from a thread that lives as long as they should (pytest's main thread does).
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class StartStop:
    """`with` support for a server of the harness: started on entry, stopped on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class ManagedProcess:
    """One child process with captured output and a polite-then-firm stop."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._log_dir = log_dir
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self._log = (self._log_dir / f"{self.name}.log").open("w+b")
        else:
            # Kept open for the life of the process; closed by stop().
            self._log = tempfile.TemporaryFile(prefix=f"m2m-{self.name}-")  # noqa: SIM115
        self._process = subprocess.Popen(
            self.command,
            env=self._env,
            cwd=self._cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            # Its own process group: a Ctrl-C at the terminal reaches only the
            # harness, which then stops its children in order (an apiserver that
            # went down with the operator still running would fill its log with errors).
            process_group=0,
        )

    def exit_code(self) -> int | None:
        """None while running (or never started), else the exit status."""
        if self._process is None:
            return None
        return self._process.poll()

    def output_tail(self, max_bytes: int = 6000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        size = os.fstat(self._log.fileno()).st_size
        data = os.pread(self._log.fileno(), max_bytes, max(0, size - max_bytes))
        return data.decode("utf-8", errors="replace")

    def terminate(self) -> None:
        """Send SIGTERM without waiting, so that several processes stop in parallel."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; safe to call more than once."""
        process = self._process
        if process is not None:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
