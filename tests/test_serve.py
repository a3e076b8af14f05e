"""``creditgate.serve``: the process settings applied once serving has started."""

from __future__ import annotations

import gc

import pytest

from creditgate.serve import GC_GEN0_THRESHOLD, tune_gc_for_serving


@pytest.fixture
def restore_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_gc_freezes_the_start_up_heap_and_raises_only_generation_0(restore_gc):
    gc.unfreeze()
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    tune_gc_for_serving()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
    assert GC_GEN0_THRESHOLD > before[0]
