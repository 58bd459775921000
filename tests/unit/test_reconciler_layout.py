"""The reconciler's classes each carry one job and stay small enough to read (issue 20)."""

from __future__ import annotations

import inspect

from m2m_token_operator.reconcile import reconciler

MAX_CLASS_LINES = 300


def test_no_class_of_the_reconciler_is_over_300_lines() -> None:
    sizes = {
        name: len(inspect.getsourcelines(value)[0])
        for name, value in vars(reconciler).items()
        if inspect.isclass(value) and value.__module__ == reconciler.__name__
    }
    assert {"TokenRequestReconciler", "Gatherer", "Writer", "Seeder"} <= set(sizes)
    assert {name: size for name, size in sizes.items() if size > MAX_CLASS_LINES} == {}


def test_gathering_does_not_write() -> None:
    # The Secret is written by the Writer only: the gatherer renders it and hands it over.
    gather = inspect.getsource(reconciler.Gatherer)
    assert "write_secret(" not in gather
    assert "patch_token_request_status" not in gather
    assert "reschedule(" not in gather
    assert "write_secret(" in inspect.getsource(reconciler.Writer)
