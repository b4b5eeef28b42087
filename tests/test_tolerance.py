"""The comparisons of tests/tolerance.py accept what float32 rounding does to sums taken in
another order (the differences an Intel Xeon showed between one process and two) and refuse
what a real difference does."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from tests.tolerance import (assert_histograms_close, assert_same_selection, assert_scores_close,
                             assert_stats_close, summation_atol)

N_TERMS = 160  # calibration tokens of the sharded tests' runs


def test_scores_equal_up_to_rounding_but_not_beyond():
    torch.manual_seed(0)
    scores = {"w": torch.rand(64, 192) * 2.6e-4}
    rounded = {"w": scores["w"].clone()}
    rounded["w"].view(-1)[:56] += 4.9e-11  # as measured on the Xeon: 56 scores, 4.9e-11 apart
    assert_scores_close(rounded, scores, N_TERMS)
    wrong = {"w": scores["w"].clone()}
    wrong["w"].view(-1)[7] *= 1.001
    with pytest.raises(AssertionError):
        assert_scores_close(wrong, scores, N_TERMS)


def _stats(low: float, high: float) -> dict:
    return {"w": {"numel": 10, "mean": 1e-4, "std": 2e-4, "min": low, "max": high, "p50": 5e-5,
                  "p95": 4e-4, "p99": 8e-4}}


def test_statistics_compared_at_their_tensor_scale():
    # the Xeon's min: 1.3447e-9 vs 1.3431e-9 in a tensor whose scores reach 1e-3
    assert_stats_close(_stats(1.3431e-9, 1e-3), _stats(1.3447e-9, 1e-3), N_TERMS)
    with pytest.raises(AssertionError):
        assert_stats_close(_stats(2e-6, 1e-3), _stats(1.3447e-9, 1e-3), N_TERMS)


def _table(rows) -> pd.DataFrame:
    return pd.DataFrame([{"rank": rank, "parameter": "w", "layer": 0, "component": "mlp_up",
                          "row": index // 10, "col": index % 10, "flat_index": index,
                          "score": score, "value": 0.5} for rank, (index, score) in
                         enumerate(rows, start=1)])


def test_a_selection_may_differ_only_at_near_ties_of_the_boundary():
    expected = _table([(1, 9e-4), (2, 8e-4), (3, 5e-4)])
    near_tie = 5e-4 - summation_atol(9e-4, N_TERMS) / 2  # the K-th and (K+1)-th within rounding
    assert_same_selection(_table([(1, 9e-4), (2, 8e-4), (4, near_tie)]), expected, N_TERMS)
    swapped_ranks = _table([(2, 8e-4 + 1e-12), (1, 8e-4), (3, 5e-4)])
    assert_same_selection(swapped_ranks, _table([(1, 8e-4), (2, 8e-4 + 1e-12), (3, 5e-4)]),
                          N_TERMS)
    with pytest.raises(AssertionError):  # a clearly lower weight took a place
        assert_same_selection(_table([(1, 9e-4), (2, 8e-4), (4, 1e-4)]), expected, N_TERMS)
    with pytest.raises(AssertionError):  # clearly different scores swapped ranks
        assert_same_selection(_table([(2, 8e-4), (1, 9e-4), (3, 5e-4)]), expected, N_TERMS)


def test_histograms_may_move_only_scores_at_an_octave_edge():
    edge = torch.tensor(2.0 ** -12)
    at_edge = {"w": torch.stack([edge, torch.tensor(3e-4), torch.tensor(1e-3)])}
    below = torch.nextafter(edge, torch.tensor(0.0))  # one ulp: the octave below
    assert_histograms_close({"w": torch.stack([below, torch.tensor(3e-4), torch.tensor(1e-3)])},
                            at_edge, N_TERMS)
    scores = {"w": torch.tensor([3e-4, 5e-4, 1e-3])}
    with pytest.raises(AssertionError):  # 3e-4 -> 1.5e-4: an octave away from any rounding
        assert_histograms_close({"w": torch.tensor([1.5e-4, 5e-4, 1e-3])}, scores, N_TERMS)
