"""The reconciler's classes each carry one job and stay small enough to read (issue 20)."""

from __future__ import annotations

import inspect

from m2m_token_operator.reconcile import reconciler


def test_gathering_does_not_write() -> None:
    # The Secret is written by the Writer only: the gatherer renders it and hands it over.
    gather = inspect.getsource(reconciler.Gatherer)
    assert "write_secret(" not in gather
    assert "patch_token_request_status" not in gather
    assert "reschedule(" not in gather
    assert "write_secret(" in inspect.getsource(reconciler.Writer)
