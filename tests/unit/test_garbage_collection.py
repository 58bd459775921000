"""The cycle collector's settings: fewer passes, and the start's objects out of its walks."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from m2m_token_operator.app import garbage_collection


@pytest.fixture(autouse=True)
def _restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    garbage_collection._freezing = False


def test_tune_makes_the_young_generation_pass_rarer() -> None:
    gc.set_threshold(700, 10, 10)
    garbage_collection.tune()
    assert gc.get_threshold() == garbage_collection.THRESHOLDS
    assert garbage_collection.THRESHOLDS[0] > 700


class _Node:
    partner: object = None


def test_freezing_collects_what_is_garbage_first_and_freezes_what_lives() -> None:
    gc.unfreeze()
    cycle = _Node()
    cycle.partner = cycle
    gone = weakref.ref(cycle)
    del cycle  # unreachable, but only the collector frees a cycle
    assert gone() is not None
    garbage_collection.freeze_startup()
    assert gone() is None  # collected, not frozen for ever
    assert gc.get_freeze_count() > 0  # what lives now is out of the collector's walks


def test_the_operators_start_is_frozen_only_where_the_command_froze_the_process() -> None:
    gc.unfreeze()
    garbage_collection._freezing = False  # a test process that runs the operator
    garbage_collection.freeze_started()
    assert gc.get_freeze_count() == 0  # the tests' objects stay the collector's

    garbage_collection.freeze_startup()  # the command
    started = _Node()  # made by the operator's start
    assert gc.is_tracked(started)
    before = gc.get_freeze_count()
    garbage_collection.freeze_started()
    assert gc.get_freeze_count() > before
    assert not any(obj is started for obj in gc.get_objects())  # out of every walk
