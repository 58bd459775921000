"""Two replicas, one active: the shipped Kopf peering, and a standby that takes over.

Both operators run as the shipped Deployment runs them, with `--peering` and
without `--standalone`, each with its own priority. The higher one works, the
other pauses; when the active one is killed (SIGKILL: no goodbye to the
peering), the standby resumes once the dead one's keep-alive expires (Kopf's
peering lifetime, 60 s) and keeps the token fresh. Their logs show that no
TokenRequest was ever handled by both at the same time.
"""

from __future__ import annotations

import re
from datetime import datetime

from devenv.install import PEERING_NAME
from devenv.operatorprocess import OperatorProcess
from devenv.tokenserver import SHORT_ISSUER

from ._support import Kube, OperatorFactory, log_problems, token_request

# Kopf's peering lifetime is 60 s; the dead peer's last keep-alive may be fresh.
TAKEOVER_TIMEOUT = 90.0
RESUMED = "Resuming operations after the pause"
_TIMESTAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


# A paused replica still sees the owned Secrets and the TokenRequests through its own
# watches (a pause holds the looks, not the watches) and logs each Secret event at debug
# level: seeing is not serving.
_SEEING = "Owned Secret "


def _times_mentioning(operator: OperatorProcess, needle: str) -> list[datetime]:
    """When the operator did anything about `needle` (e.g. one TokenRequest)."""
    times = []
    for line in operator.log_text().splitlines():
        match = _TIMESTAMP.match(line)
        if match and needle in line and _SEEING not in line:
            times.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"))
    return times


def _log_time(operator: OperatorProcess, pattern: str) -> datetime:
    match = operator.wait_for_log(rf"\[([^\]]+)\][^\n]*{pattern}", timeout=1)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")


def test_standby_takes_over_when_the_active_replica_dies(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    peered = ("--peering=" + PEERING_NAME,)
    active = start_operator(
        issuer=SHORT_ISSUER, args=peered, settings={"M2M_PEERING_PRIORITY": "200"}, name="active"
    )
    standby = start_operator(
        issuer=SHORT_ISSUER, args=peered, settings={"M2M_PEERING_PRIORITY": "100"}, name="standby"
    )
    # Kopf starts every replica paused until it has seen the peering: the active
    # one then resumes, the standby stays paused (Kopf says nothing: it logs only
    # changes), and the standby's refresh gate, reading the same peering, says so.
    active.wait_for_log(RESUMED, timeout=30)
    standby.wait_for_log(r"Keep-alive in '[^']+' cluster-wide: ok", timeout=30)
    standby.wait_for_log(r"Refreshes paused: peers with the same or a higher priority", timeout=30)
    assert RESUMED not in standby.log_text()

    # The active replica serves a TokenRequest with 20 s tokens and refreshes it.
    kube.create_token_request(
        namespace, token_request("orders-api", scope="api://e2e.x.y/.default")
    )
    kube.wait_ready(namespace, "orders-api", operator=active)
    first = kube.wait_secret(namespace, "orders-api", operator=active)
    refreshed = kube.wait_secret(namespace, "orders-api", unlike=first.token, operator=active)
    this_one = f"{namespace}/orders-api"
    assert _times_mentioning(active, this_one)
    assert _times_mentioning(standby, this_one) == []
    assert RESUMED not in standby.log_text()

    # It dies. The standby resumes after the peering lifetime and takes over.
    active.kill()
    killed_at = datetime.now()
    standby.wait_for_log(RESUMED, timeout=TAKEOVER_TIMEOUT)
    resumed_at = _log_time(standby, RESUMED)
    assert resumed_at >= killed_at
    taken_over = kube.wait_secret(
        namespace, "orders-api", unlike=refreshed.token, timeout=30, operator=standby
    )
    kube.wait_ready(namespace, "orders-api", operator=standby)
    # ... and keeps refreshing.
    kube.wait_secret(namespace, "orders-api", unlike=taken_over.token, timeout=30, operator=standby)

    # Never both: the standby's first word about the TokenRequest comes after the
    # active one's last, and after it resumed.
    active_times = _times_mentioning(active, this_one)
    standby_times = _times_mentioning(standby, this_one)
    assert standby_times
    assert max(active_times) < min(standby_times)
    assert resumed_at <= min(standby_times)
    assert log_problems(standby.log_text()) == []
    assert log_problems(active.log_text()) == []


def test_replica_paused_by_a_higher_priority_one_stops_refreshing_and_catches_up_on_resume(
    kube: Kube, namespace: str, start_operator: OperatorFactory
) -> None:
    """A replica with a higher priority joins (a new pod after a failover, a rollout):
    the one that was active pauses and must leave the TokenRequests to it. When the
    other leaves again, it resumes from what the other wrote, not from its own memory."""
    peered = ("--peering=" + PEERING_NAME,)
    low = start_operator(
        issuer=SHORT_ISSUER, args=peered, settings={"M2M_PEERING_PRIORITY": "100"}, name="low"
    )
    low.wait_for_log(RESUMED, timeout=30)
    for name in ("orders-api", "gone-while-paused"):
        kube.create_token_request(
            namespace, token_request(name, scope=f"api://e2e.x.{name}/.default")
        )
        kube.wait_ready(namespace, name, operator=low)
    first = kube.wait_secret(namespace, "orders-api", operator=low)

    before_high = low.log_size()  # taken before the action whose lines we wait for
    high = start_operator(
        issuer=SHORT_ISSUER, args=peered, settings={"M2M_PEERING_PRIORITY": "200"}, name="high"
    )
    low.wait_for_log(r"Pausing operations in favour of", timeout=30, since=before_high)
    paused_at = _log_time(low, "Pausing operations in favour of")
    low.wait_for_log(
        r"Refreshes paused: peers with the same or a higher priority",
        timeout=30,  # the gate reads the peering every 5 s, Kopf watches it
        since=before_high,
    )
    high.wait_for_log(RESUMED, timeout=30)
    second = kube.wait_secret(namespace, "orders-api", unlike=first.token, operator=high)
    third = kube.wait_secret(namespace, "orders-api", unlike=second.token, operator=high)
    before_delete = low.log_size()
    kube.delete_token_request(namespace, "gone-while-paused")
    # Kopf pauses, the operator's TokenRequest watch (kube/token_request_watch.py) does
    # not: the paused replica forgets the deleted TokenRequest at once.
    low.wait_for_log(
        rf"tokenrequest={namespace}/gone-while-paused \S+ forgotten",
        timeout=30,
        since=before_delete,
    )

    low_after_pause = [t for t in _times_mentioning(low, "token obtained") if t > paused_at]
    assert low_after_pause == []

    # The higher one leaves cleanly (a rollout): the lower one resumes at once and serves
    # the token the other one left in the Secret before it refreshes it itself.
    # Measured before the stop: the lower one may resume while the higher one's process
    # is still exiting (its peering entry goes first), and that line must not be missed.
    low_log_size = low.log_size()
    assert high.stop() == 0
    low.wait_for_log(r"Refreshes active", timeout=30, since=low_log_size)
    low.wait_for_log(
        rf"tokenrequest={namespace}/orders-api \S+ reusing the unexpired token",
        timeout=30,
        since=low_log_size,
    )
    kube.wait_secret(namespace, "orders-api", unlike=third.token, timeout=30, operator=low)
    kube.wait_ready(namespace, "orders-api", operator=low)
    gone = kube.get_token_request(namespace, "gone-while-paused")
    assert gone is None
    assert log_problems(low.log_text()) == []
    assert log_problems(high.log_text()) == []
