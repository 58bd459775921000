"""The real operator, run by Kopf in this process, as a fresh start every time.

``kopf.testing.KopfRunner`` runs ``kopf run`` in a thread. Run twice in one
process, it would import the handlers module only once, so a "restart" would
keep every module-level object of the first run, and the second run would
find no handlers in a fresh registry. Each :class:`OperatorRun` therefore
starts from a clean slate and leaves the process as it found it:

* the operator's modules (``purge_prefixes``) are removed from ``sys.modules``
  before the run (re-imported, so every module-level object is new) and the
  previous module objects are put back afterwards (other tests keep theirs);
* Kopf's default registry is a new one during the run, the old one afterwards;
* collectors registered in prometheus_client's default registry during the
  run are unregistered afterwards (a re-import would otherwise fail with
  "Duplicated timeseries"), and the ones from before are registered again;
* the log record factory (the operator installs a scrubbing one), the root
  logger's handlers and level (Kopf's ``--verbose`` replaces them), the
  ``asyncio`` logger, and the ``kubernetes`` client's default configuration
  (Kopf's login sets it) are restored.

Everything logged while the operator runs is captured (:attr:`OperatorRun.logs`)
by a handler on the root logger, at DEBUG, after the operator's own record
factory has scrubbed it; Kopf's stdout/stderr (click's runner) is in
:attr:`OperatorRun.output` once the run has stopped.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import types
from collections.abc import Iterable, Sequence
from typing import Any

import kopf
import kubernetes
import prometheus_client
from kopf._core.intents.registries import SmartOperatorRegistry
from kopf.testing import KopfRunner

from devenv.faultproxy import FaultProxy

DEFAULT_MODULE = "m2m_token_operator.app.handlers"
DEFAULT_PURGE_PREFIXES = ("m2m_token_operator",)
# The cluster-wide watches of `--all-namespaces` (paths as the proxy sees them).
TOKEN_REQUESTS = r"^/apis/m2m\.dev/v1alpha1/tokenrequests$"
SECRETS = r"^/api/v1/secrets$"
# The operator's TokenRequest watch (kube/token_request_watch.py): once it watches, its
# first list is in and every TokenRequest then existing has been handed to the reconciler.
TOKEN_REQUEST_WATCH = (TOKEN_REQUESTS, r"")
# The owned-Secrets watch (path, query): once it watches, its first list is in, so the
# operator's looks read their Secrets from it (deterministically, for the tests that count).
OWNED_SECRETS = (SECRETS, r"managed-by")
LOG_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"


class _LogCapture(logging.Handler):
    """Every record from the operator's threads (not the test's, the proxy's or the recorders')."""

    ignored_threads = frozenset({"MainThread", "fault-proxy", "token-endpoint"})
    ignored_prefixes = ("history-",)

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self._lines: list[str] = []
        self._records: list[logging.LogRecord] = []
        self._lines_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        thread = record.threadName or ""
        if thread in self.ignored_threads or thread.startswith(self.ignored_prefixes):
            return
        try:
            line = self.format(record)
        except Exception:  # a broken record must not break the operator under test
            line = f"<unformattable record from {record.name}: {record.msg!r}>"
        with self._lines_lock:
            self._lines.append(line)
            self._records.append(record)

    @property
    def lines(self) -> list[str]:
        with self._lines_lock:
            return list(self._lines)

    @property
    def records(self) -> list[logging.LogRecord]:
        with self._lines_lock:
            return list(self._records)


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


class _ProcessState:
    """Snapshot and restore of the process-wide state that an operator run changes."""

    def __init__(self, purge_prefixes: Sequence[str]) -> None:
        self._prefixes = tuple(purge_prefixes)
        self._modules: dict[str, types.ModuleType] = {}
        self._registry: kopf.OperatorRegistry | None = None
        self._collectors: list[Any] = []
        self._record_factory = logging.getLogRecordFactory()
        self._root_handlers: list[logging.Handler] = []
        self._root_level = logging.WARNING
        self._asyncio_logger: tuple[bool, list[logging.Handler], int] = (True, [], 0)
        self._kube_default: Any = None

    def save_and_clean(self) -> None:
        self._modules = {n: m for n, m in sys.modules.items() if _matches(n, self._prefixes)}
        for name in self._modules:
            del sys.modules[name]
        self._registry = kopf.get_default_registry()
        # What Kopf creates by default: with the login fallbacks (kubeconfig via the client).
        kopf.set_default_registry(SmartOperatorRegistry())
        registry = prometheus_client.REGISTRY
        # No public listing of the registered collectors; the mapping is stable in 0.x.
        self._collectors = [c for c in registry._collector_to_names if c not in _baseline()]
        for collector in self._collectors:
            registry.unregister(collector)
        self._record_factory = logging.getLogRecordFactory()
        root = logging.getLogger()
        self._root_handlers, self._root_level = list(root.handlers), root.level
        aio = logging.getLogger("asyncio")
        self._asyncio_logger = (aio.propagate, list(aio.handlers), aio.level)
        self._kube_default = kubernetes.client.Configuration._default

    def restore(self) -> None:
        for name in [n for n in sys.modules if _matches(n, self._prefixes)]:
            del sys.modules[name]
        sys.modules.update(self._modules)
        if self._registry is not None:
            kopf.set_default_registry(self._registry)
        registry = prometheus_client.REGISTRY
        for collector in [c for c in registry._collector_to_names if c not in _baseline()]:
            registry.unregister(collector)
        for collector in self._collectors:
            registry.register(collector)
        logging.setLogRecordFactory(self._record_factory)
        root = logging.getLogger()
        root.handlers[:] = self._root_handlers
        root.setLevel(self._root_level)
        aio = logging.getLogger("asyncio")
        aio.propagate, aio.handlers[:], aio.level = (
            self._asyncio_logger[0],
            self._asyncio_logger[1],
            self._asyncio_logger[2],
        )
        kubernetes.client.Configuration._default = self._kube_default


def _baseline() -> set[Any]:
    return {
        prometheus_client.PROCESS_COLLECTOR,
        prometheus_client.PLATFORM_COLLECTOR,
        prometheus_client.GC_COLLECTOR,
    }


class OperatorRun:
    """One run of the operator: started, then stopped once (a restart is a new run)."""

    def __init__(
        self,
        *,
        proxy: FaultProxy,
        module: str | None = DEFAULT_MODULE,
        path: str | None = None,
        ready_watches: Sequence[str | tuple[str, str]] = (TOKEN_REQUEST_WATCH,),
        purge_prefixes: Sequence[str] = DEFAULT_PURGE_PREFIXES,
        extra_args: Sequence[str] = (),
        settings: kopf.OperatorSettings | None = None,
    ) -> None:
        target = ["-m", module] if module else []
        target += [path] if path else []
        self.args = ["run", "--standalone", "--all-namespaces", "--verbose", *extra_args, *target]
        self._proxy = proxy
        self._ready_watches = tuple(ready_watches)
        self._state = _ProcessState(purge_prefixes)
        self._capture = _LogCapture()
        self._runner = KopfRunner(self.args, reraise=False, timeout=30, settings=settings)
        self._running = False
        self._stopped = False
        self.startup_seconds: float | None = None
        self.stop_seconds: float | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> OperatorRun:
        """Start the operator and wait until it watches the ``ready_watches`` resources."""
        started = time.monotonic()
        self._state.save_and_clean()
        logging.getLogger().addHandler(self._capture)
        logging.getLogger().setLevel(logging.DEBUG)
        self._runner.__enter__()
        self._running = True
        try:
            self._wait_until_ready(since=started, deadline=started + timeout)
        except BaseException:
            self.stop(check=False)
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_until_ready(self, *, since: float, deadline: float) -> None:
        """Until the proxy holds an open watch, begun by this run, on each of ``ready_watches``."""

        def watching() -> dict[str, bool]:
            opened = self._proxy.requests("GET", watch=True, since=since)
            open_now = self._proxy.open_watches()
            ready: dict[str, bool] = {}
            for watch in self._ready_watches:
                path, query = (watch, "") if isinstance(watch, str) else watch
                ready[f"{path} {query}".strip()] = any(
                    re.search(path, e.path) and re.search(query, e.query) for e in opened
                ) and any(re.search(path, p) for p in open_now)
            return ready

        while True:
            watching_now = watching()
            if all(watching_now.values()):
                return
            if not self._runner._thread.is_alive():
                self.stop(check=False)
                raise RuntimeError(
                    f"the operator exited during startup (exit code {self.exit_code}):\n"
                    + self.all_text[-6000:]
                )
            if time.monotonic() > deadline:
                missing = [r for r, ok in watching_now.items() if not ok]
                raise TimeoutError(
                    f"the operator started no watch on {missing} in time; its logs:\n"
                    + "\n".join(self.logs[-60:])
                )
            time.sleep(0.02)

    def settle(self, quiet: float = 0.1, timeout: float = 3.0) -> None:
        """Wait until the operator has sent no API request for ``quiet`` seconds (or ``timeout``).

        Kopf stopped in the middle of its own bookkeeping patches waits
        ``settings.batching.exit_timeout`` (2 s) for it; settling first avoids that.
        """
        deadline = time.monotonic() + timeout
        seen, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = len(self._proxy.exchanges)
            if count != seen:
                seen, since = count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.01)

    def stop(self, *, check: bool = True, settle: float = 0.1) -> None:
        """Stop Kopf gracefully (as on SIGTERM), after ``settle`` seconds of API silence (0: now).

        With ``check``, fail if the operator did not exit cleanly.
        """
        if self._running and not self._stopped:
            if settle and self.running:
                self.settle(settle)
            self._stopped = True
            started = time.monotonic()
            try:
                self._runner.__exit__(None, None, None)
            finally:
                self.stop_seconds = time.monotonic() - started
                logging.getLogger().removeHandler(self._capture)
                self._state.restore()
        if check and (self.exception is not None or self.exit_code not in (0, None)):
            raise AssertionError(
                f"the operator did not exit cleanly (exit code {self.exit_code}, "
                f"exception {self.exception!r}):\n" + self.all_text[-6000:]
            ) from self.exception

    @property
    def running(self) -> bool:
        return self._running and not self._stopped and self._runner._thread.is_alive()

    # ---- what it said --------------------------------------------------------------------

    @property
    def logs(self) -> list[str]:
        """Every log line of the process while the run was live (formatted, with tracebacks)."""
        return self._capture.lines

    @property
    def records(self) -> list[logging.LogRecord]:
        return self._capture.records

    @property
    def output(self) -> str:
        """Kopf's captured stdout and stderr; empty until the run has stopped."""
        if not self._stopped or not self._runner.future.done():
            return ""
        return str(self._runner.future.result().output)  # stdout and stderr, interleaved

    @property
    def all_text(self) -> str:
        """The log lines and Kopf's output, for "never in the logs" assertions."""
        return "\n".join(self.logs) + "\n" + self.output

    @property
    def exit_code(self) -> int | None:
        if not self._runner.future.done() or self._runner.future.exception() is not None:
            return None
        return self._runner.future.result().exit_code

    @property
    def exception(self) -> BaseException | None:
        if not self._runner.future.done():
            return None
        error = self._runner.future.exception()
        if error is not None:
            return error
        result_error = self._runner.future.result().exception
        return (
            None if isinstance(result_error, SystemExit) and not result_error.code else result_error
        )

    def assert_never_logged(self, *needles: str) -> None:
        """Fail naming which of ``needles`` (secrets, tokens) appear in the logs or output."""
        text = self.all_text
        found = [needle for needle in needles if needle and needle in text]
        if found:
            lines = [line for line in text.splitlines() if any(n in line for n in found)]
            masked = [_mask(line, found) for line in lines[:10]]
            raise AssertionError(
                f"{len(found)} secret value(s) found in the operator's logs, masked:\n"
                + "\n".join(masked)
            )


def _mask(line: str, needles: Iterable[str]) -> str:
    for needle in needles:
        line = line.replace(needle, f"<LEAKED:{needle[:3]}…>")
    return line
