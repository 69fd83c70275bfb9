"""Rollout pure parts: the logprob mismatch, probe calibration, even splits and weight-sync buckets (their
transfer and manifest: test_weight_transfer.py; the engines themselves: tests/integration/test_rollout.py)."""

from __future__ import annotations

import pytest
import torch

from posttrain.rollout import WeightSyncError, logprob_mismatch
from posttrain.weights import iter_buckets
from posttrain.workers import split_evenly


def test_logprob_mismatch_hand_computed() -> None:
    engine = [[-1.0, -2.0], [-0.5]]
    learner = [[-1.1, -2.0], [-0.2]]
    m = logprob_mismatch(engine, learner)
    assert m["max_abs"] == pytest.approx(0.3)
    assert m["mean_abs"] == pytest.approx((0.1 + 0.0 + 0.3) / 3)
    assert m["tokens"] == 3
    masked = logprob_mismatch(engine, learner, mask=[[True, True], [False]])
    assert masked["max_abs"] == pytest.approx(0.1) and masked["mean_abs"] == pytest.approx(0.05)
    flat = logprob_mismatch(torch.tensor([0.0, -1.0]), [0.5, -1.0])
    assert flat == {"mean_abs": 0.25, "max_abs": 0.5, "tokens": 2.0}
    with pytest.raises(ValueError):
        logprob_mismatch([[0.0]], [[0.0, 1.0]])


class _Fixed:
    """Learners / engines answering the probe with fixed logprobs (per engine), for the pure parts."""

    def __init__(self, *results: list[list[float]]) -> None:
        self.results, self.name = list(results), "rollout"

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        return self.results[0][0]

    def prompt_logprobs_each(self, token_ids: list[list[int]]) -> list[list[list[float]]]:
        return self.results


def test_probe_calibrated_on_identical_weights() -> None:
    """bf16 kernels differ by more than any fixed float32 bound: the tolerance is the dtype's atol plus
    twice the difference measured on the starting weights; a baseline over 10 × atol is another model."""
    from posttrain.rollout.weight_sync import PROBE_ATOL, calibrate_probe

    learners = _Fixed([[-1.0, -2.0, -0.5]])
    engines = _Fixed([[-1.03, -2.0, -0.52]], [[-1.0, -2.01, -0.5]])  # two engines: the larger counts
    baseline, tolerance = calibrate_probe(learners, engines, [1, 2, 3, 4], PROBE_ATOL["bfloat16"])  # type: ignore[arg-type]
    assert baseline == pytest.approx(0.03) and tolerance == pytest.approx(0.05 + 2 * 0.03)
    assert calibrate_probe(learners, _Fixed([[-1.0, -2.0, -0.5]]), [1, 2, 3, 4], 1e-4) == (0.0, 1e-4)
    with pytest.raises(WeightSyncError, match="differ by 0.03 on the same weights"):
        calibrate_probe(learners, engines, [1, 2, 3, 4], PROBE_ATOL["float32"])


def test_split_evenly_and_buckets() -> None:
    assert split_evenly(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    assert split_evenly([1], 3) == [[1], [], []]
    assert split_evenly(list("abcd"), 2, weights=[3, 1, 1, 1]) == [["a"], ["b", "c", "d"]]
    assert split_evenly(list("abcd"), 2, weights=[1, 1, 1, 3]) == [["a", "b", "c"], ["d"]]
    assert split_evenly(list("abc"), 4, weights=[1, 2, 3]) == [["a", "b"], [], ["c"], []]
    tensors = [(f"t{i}", torch.ones(256)) for i in range(10)]  # 1 KiB each
    buckets = list(iter_buckets(tensors, bucket_mb=3 / 1024))
    assert [len(b) for b in buckets] == [3, 3, 3, 1]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    assert all(not t.is_shared() and t.is_contiguous() for b in buckets for _, t in b)
