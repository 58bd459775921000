"""Where the harness keeps what it builds or fetches, and how it fills that safely.

Building the control plane takes minutes and fetching the token server takes
seconds, so both are done once per machine and kept outside the repository
(a fresh clone must not carry them, and `git clean` must not lose them). Two
processes may try to fill the cache at once (a `make e2e` next to an IDE's
test run), and a build may be interrupted, so an entry is built in a temporary
directory beside its final place under a lock and renamed into place whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["cache_dir", "fill_once"]


def cache_dir() -> Path:
    """The harness's cache root: `$M2M_CACHE_DIR`, else `~/.cache/m2m-token-operator`."""
    configured = os.environ.get("M2M_CACHE_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "m2m-token-operator"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def fill_once(final: Path, fill: Callable[[Path], None]) -> Path:
    """Return `final`, first creating it with `fill(tmpdir)` unless it exists.

    `fill` writes everything into the empty directory it is given; only when it
    returns is that directory renamed to `final`, so `final` is either complete
    or absent, whatever happens to the process.
    """
    if final.is_dir():
        return final
    with _locked(final.parent / f".{final.name}.lock"):
        # Another process may have filled it while this one waited for the lock.
        if final.is_dir():
            return final
        # Whatever an interrupted fill left behind is garbage now that we hold the lock.
        for leftover in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            fill(staging)
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final
