"""The Kopf wiring's own rules: liveness and peering priority."""

import asyncio
import json
import logging
import socket
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import kopf
import kubernetes
import pytest
from kopf._cogs.structs import ephemera
from kopf._core.engines import probing

from m2m_token_operator.app import handlers
from m2m_token_operator.app.main import main
from m2m_token_operator.app.runtime import Runtime
from m2m_token_operator.config.settings import Settings
from m2m_token_operator.kube import kube_api
from m2m_token_operator.kube.kube_api import KubeApi
from m2m_token_operator.kube.peering import PeeringGate
from m2m_token_operator.reconcile import metrics
from m2m_token_operator.reconcile.reconciler import TokenRequestReconciler
from m2m_token_operator.reconcile.seal import SealKey


def probe(memo: Mapping[str, Any]) -> object:
    """The liveness probe, called with every argument Kopf passes to it."""
    return handlers.scheduler_alive(
        settings=kopf.OperatorSettings(),
        retry=0,
        started=datetime.now(UTC),
        runtime=timedelta(0),
        logger=logging.getLogger("test"),
        memo=kopf.Memo(memo),
    )


def test_peering_priority_is_configurable_else_derived_from_the_host() -> None:
    assert handlers.peering_priority(Settings.from_env({"M2M_PEERING_PRIORITY": "42"})) == 42
    assert handlers.peering_priority(Settings.from_env({"M2M_PEERING_PRIORITY": "0"})) == 0
    derived = handlers.peering_priority(Settings.from_env({}))
    assert 1 <= derived <= 1_000_000
    assert handlers.peering_priority(Settings.from_env({})) == derived  # stable for one pod


def test_a_bad_peering_priority_stops_the_process_before_kopf_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Validated with the other settings: exit code 2 and one line, no crashing handler."""
    import kopf.cli

    def kopf_must_not_start(**_: object) -> None:
        raise AssertionError("Kopf was started with an invalid M2M_PEERING_PRIORITY")

    monkeypatch.setattr(kopf.cli, "main", kopf_must_not_start)
    monkeypatch.setenv("M2M_PEERING_PRIORITY", "high")
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2
    assert "M2M_PEERING_PRIORITY='high' is not valid" in capsys.readouterr().err


async def test_liveness_fails_when_the_scheduler_is_dead_or_stalled() -> None:
    scheduler = SimpleNamespace(last_loop_at=datetime.now(UTC))
    reconciler = SimpleNamespace(scheduler=scheduler)
    running = asyncio.create_task(asyncio.sleep(60))
    memo = {"reconciler": reconciler, "scheduler_task": running}
    assert probe(memo)

    scheduler.last_loop_at = datetime.now(UTC) - timedelta(minutes=5)
    with pytest.raises(RuntimeError, match="stalled"):
        probe(memo)

    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    with pytest.raises(RuntimeError, match="not running"):
        probe(memo)


def _peering_settings(*, standalone: bool, clusterwide: bool) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.peering.standalone = standalone
    settings.peering.clusterwide = clusterwide
    settings.peering.name = "m2m"
    settings.peering.priority = 7
    settings.peering.mandatory = True
    return settings


@pytest.mark.parametrize(
    ("standalone", "clusterwide", "environ", "gated"),
    [
        (True, True, {"POD_ID": "pod-0"}, False),  # Kopf never pauses: nothing to follow
        (False, True, {}, False),  # Kopf's identity unknown: peers cannot be told from us
        (False, False, {"POD_ID": "pod-0"}, False),  # namespaced peering is not followed
        (False, True, {"POD_ID": "pod-0"}, True),
    ],
)
def test_the_scheduler_follows_kopf_peering_only_when_it_can_tell_itself_apart(
    standalone: bool, clusterwide: bool, environ: dict[str, str], gated: bool
) -> None:
    # The gate takes two callbacks from the reconciler, nothing else: a stand-in will do.
    reconciler = cast(
        TokenRequestReconciler,
        SimpleNamespace(resume_after_pause=lambda: None, paused=lambda: None),
    )
    api = KubeApi(kubernetes.client.ApiClient())  # never called: the gate is not run
    try:
        gate = handlers.peering_gate(
            _peering_settings(standalone=standalone, clusterwide=clusterwide),
            kube=api,
            reconciler=reconciler,
            environ=environ,
        )
    finally:
        api.close()
    assert (gate is not None) == gated


async def test_liveness_fails_when_the_peering_was_never_readable() -> None:
    scheduler = SimpleNamespace(last_loop_at=datetime.now(UTC))
    running = asyncio.create_task(asyncio.sleep(60))
    gate = SimpleNamespace(active=None, started_at=datetime.now(UTC))
    memo = {
        "reconciler": SimpleNamespace(scheduler=scheduler),
        "scheduler_task": running,
        "peering_gate": gate,
    }
    assert probe(memo)  # still joining
    gate.started_at = datetime.now(UTC) - timedelta(minutes=6)
    with pytest.raises(RuntimeError, match="peering object has never been readable"):
        probe(memo)
    gate.active = False  # a standby that has read it: alive
    assert probe(memo)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


def test_the_liveness_probe_answers_at_once_when_it_fails() -> None:
    """Kopf's default (TEMPORARY) retries a raising probe while /healthz waits and times out."""
    probes = [
        handler
        for handler in kopf.get_default_registry()._activities.get_all_handlers()
        if handler.id == "scheduler"
    ]
    assert [probe.errors for probe in probes] == [kopf.ErrorsMode.PERMANENT]


def test_api_clients_never_use_urllib3s_default_retries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_kubeconfig(monkeypatch, tmp_path)
    api_client = kube_api.load_api_client()
    assert api_client.configuration.retries == kube_api.API_RETRIES == 1
    api_client.close()  # type: ignore[no-untyped-call]


def _use_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The client reads KUBECONFIG once, at import: its default location is what counts.
    monkeypatch.setattr(
        kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(_kubeconfig(tmp_path))
    )

    # Nobody listens there: the seal key (read or created through the API, see test_seal
    # and the e2e tests) is the one call startup makes.
    async def seal_key(kube: KubeApi, config: Settings) -> SealKey:
        return SealKey(b"k" * 32)

    monkeypatch.setattr(handlers, "_seal_key", seal_key)


def _kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig naming an API server nobody listens on: startup itself calls nobody."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


async def test_a_failed_startup_leaks_nothing_and_a_retry_starts_cleanly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_kubeconfig(monkeypatch, tmp_path)
    monkeypatch.setenv("M2M_METRICS_PORT", "0")

    def port_taken(port: int) -> None:
        raise OSError("Address already in use")

    monkeypatch.setattr(metrics, "serve", port_taken)
    memo = kopf.Memo()
    with pytest.raises(OSError, match="in use"):
        await handlers.startup(kopf.OperatorSettings(), memo)
    failed: Runtime = memo["runtime"]
    first_task: asyncio.Task[None] = memo["scheduler_task"]
    # The scheduler had started: it is stopped, and every pool is closed.
    assert failed.closed
    assert first_task.done()
    assert memo["token_client"].closed
    assert memo["kube"].closed

    monkeypatch.undo()
    _use_kubeconfig(monkeypatch, tmp_path)
    monkeypatch.setenv("M2M_METRICS_PORT", "0")
    await handlers.startup(kopf.OperatorSettings(), memo)
    retried: Runtime = memo["runtime"]
    assert retried is not failed
    assert not memo["scheduler_task"].done()
    assert not memo["kube"].closed

    await handlers.shutdown(memo)
    assert retried.closed
    assert memo["scheduler_task"].done()
    assert memo["token_client"].closed


async def test_kopf_posts_no_events_and_keeps_no_state_under_its_own_domain(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_kubeconfig(monkeypatch, tmp_path)
    monkeypatch.setenv("M2M_METRICS_PORT", "0")
    settings = kopf.OperatorSettings()
    memo = kopf.Memo()
    await handlers.startup(settings, memo)
    try:
        assert settings.posting.enabled is False
        progress = settings.persistence.progress_storage
        assert isinstance(progress, kopf.AnnotationsProgressStorage)
        assert progress.prefix == handlers.STATE_PREFIX
    finally:
        await handlers.shutdown(memo)


async def test_the_token_client_keeps_a_connection_per_request_in_flight(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_kubeconfig(monkeypatch, tmp_path)
    monkeypatch.setenv("M2M_METRICS_PORT", "0")
    monkeypatch.setenv("M2M_FETCH_WORKERS", "48")
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    memo = kopf.Memo()
    await handlers.startup(settings, memo)
    try:
        assert memo["token_client"].pool_size == 48
    finally:
        await handlers.shutdown(memo)


async def test_the_peering_read_has_its_own_client_and_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Looks queued on a slow API server must not hold up the gate, nor the scheduler
    loop behind it that liveness watches."""
    _use_kubeconfig(monkeypatch, tmp_path)
    monkeypatch.setenv("M2M_METRICS_PORT", "0")
    monkeypatch.setenv("POD_ID", "pod-0")
    settings = kopf.OperatorSettings()
    settings.peering.clusterwide = True
    settings.peering.standalone = False
    memo = kopf.Memo()
    await handlers.startup(settings, memo)
    try:
        gate: PeeringGate = memo["peering_gate"]
        peering_kube = gate._read.__self__  # type: ignore[attr-defined]
        assert isinstance(peering_kube, KubeApi)
        assert peering_kube is not memo["kube"]
        assert peering_kube.max_workers == 1
        assert peering_kube._timeout == handlers.PEERING_READ_TIMEOUT
    finally:
        await handlers.shutdown(memo)
    assert peering_kube.closed


async def test_a_failing_probe_answers_healthz_over_http_at_once() -> None:
    """Kopf's health endpoint with our probe registered: a stalled scheduler is a 500 at
    once, not a request that hangs while Kopf retries the probe (the kubelet's time-out)."""
    scheduler = SimpleNamespace(last_loop_at=datetime.now(UTC) - timedelta(minutes=5))
    running = asyncio.create_task(asyncio.sleep(60))
    memo = kopf.Memo()
    memo["reconciler"] = SimpleNamespace(scheduler=scheduler)
    memo["scheduler_task"] = running
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    url = f"http://127.0.0.1:{port}/healthz"
    listening = asyncio.Event()
    reporter = asyncio.create_task(
        probing.health_reporter(
            url,
            memo=cast(ephemera.AnyMemo, memo),
            indices=cast(ephemera.Indices, {}),
            registry=kopf.get_default_registry(),
            settings=kopf.OperatorSettings(),
            ready_flag=listening,
        )
    )
    try:
        await listening.wait()
        async with aiohttp.ClientSession() as session, asyncio.timeout(10):
            response = await session.get(url)
        assert response.status == 500
    finally:
        for task in (reporter, running):
            task.cancel()
        await asyncio.gather(reporter, running, return_exceptions=True)


def test_event_loop_name_tells_uvloop_from_the_standard_loop() -> None:
    import uvloop  # a dependency of the package: Kopf's CLI runs on it when installed

    fast = uvloop.new_event_loop()
    standard = asyncio.new_event_loop()
    try:
        assert handlers.event_loop_name(fast) == "uvloop"
        assert handlers.event_loop_name(standard) == "asyncio _UnixSelectorEventLoop"
    finally:
        fast.close()
        standard.close()
