"""The Kopf wiring's own rules: liveness and peering priority."""

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import kopf
import kubernetes.client
import pytest

from m2m_token_operator import handlers
from m2m_token_operator.__main__ import main
from m2m_token_operator.kube import KubeApi
from m2m_token_operator.reconciler import TokenRequestReconciler
from m2m_token_operator.settings import Settings


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
    kube = KubeApi(kubernetes.client.ApiClient())  # never called: the gate is not run
    try:
        gate = handlers.peering_gate(
            _peering_settings(standalone=standalone, clusterwide=clusterwide),
            kube=kube,
            reconciler=reconciler,
            environ=environ,
        )
    finally:
        kube.close()
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
