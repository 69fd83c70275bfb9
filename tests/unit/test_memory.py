"""The peak-memory reader behind `memory/learner_peak_gib` (posttrain/memory.py) on the CPU, through the
kernel's resettable high-water mark and through the RSS sampler it falls back to, and its reduction over
ranks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from posttrain import memory
from posttrain.memory import PeakMemory
from posttrain.objectives import StepStats, reduce_ranks

BUFFER = 256 * 2**20
HOLD_S = 0.05  # many sampler intervals: the fallback sees the buffer


def allocate_and_free(nbytes: int) -> None:
    """Touches `nbytes` (torch.ones writes every page), holds them a moment, frees them."""
    buffer = torch.ones(nbytes // 4)
    time.sleep(HOLD_S)
    del buffer


def rise(nbytes: int) -> float:
    """How far the reading rises over its start while `nbytes` come and go, as a fraction of `nbytes`."""
    with PeakMemory("cpu") as m:
        allocate_and_free(nbytes)
    return (m.peak_bytes - m.start_bytes) / nbytes


def test_cpu_peak_rises_by_a_buffer_freed_inside_the_region() -> None:
    assert memory.reset_high_water_mark(), "this Linux lets a process reset its own VmHWM"
    assert 0.95 < rise(BUFFER) < 1.1


def test_an_earlier_larger_peak_does_not_count() -> None:
    """The high-water mark is reset on entry: a spike before the region is not the region's peak."""
    allocate_and_free(2 * BUFFER)
    assert 0.95 < rise(BUFFER // 4) < 1.2


def test_without_clear_refs_the_sampled_rss_gives_the_peak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "CLEAR_REFS", tmp_path / "absent" / "clear_refs")
    assert not memory.reset_high_water_mark()
    allocate_and_free(2 * BUFFER)  # the kernel's mark, never reset, would report this one
    assert 0.95 < rise(BUFFER) < 1.1


def test_the_step_peak_over_ranks_is_the_largest() -> None:
    ranks = [StepStats({"loss": 1.0}, 1.0, 0.1, peak) for peak in (2.5, 4.0, 3.0)]
    assert reduce_ranks(ranks).peak_gib == 4.0
