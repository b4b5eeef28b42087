"""Equal up to summation order: what two runs that add the same float32 terms in another order
(another process count, another CPU's kernels) can promise each other, and no more.

A float32 sum of n terms carries a rounding error of at most about n * eps times the size of its
terms (the classic bound for recursive summation), so a score computed from ``n_terms``
calibration tokens is compared with an absolute tolerance of ``n_terms * eps * scale``, where the
scale is the largest |score| of its tensor. Consequences a reader relies on:

* the same weights are selected, except that weights whose scores lie within that tolerance of
  the selection boundary (the K-th score) may trade places, and so may the ranks of near-equal
  scores;
* statistics of a score tensor (mean, std, min, quantiles) agree to the tolerance of that tensor;
* octave histograms of |score| agree in their counts, except for scores within the tolerance of a
  power of two;
* perplexities agree to ``PERPLEXITY_REL`` (a token-mean NLL accumulated in float64).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
PERPLEXITY_REL = 1e-6
KEY = ["parameter", "flat_index"]
COORDINATES = ["layer", "component", "row", "col", "value"]  # the weights themselves are equal


def summation_atol(scale: float, n_terms: int) -> float:
    """Bound on the rounding difference of two float32 sums of ``n_terms`` terms of size
    ``scale`` taken in different orders."""
    return n_terms * FLOAT32_EPS * abs(scale)


def assert_perplexity_close(got: float, expected: float, what: str = "perplexity") -> None:
    assert float(got) == pytest.approx(float(expected), rel=PERPLEXITY_REL, nan_ok=True), what


def assert_scores_close(got: dict, expected: dict, n_terms: int) -> None:
    """Score tensors equal to the tolerance of each tensor's largest |score|."""
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        atol = summation_atol(float(tensor.abs().max()), n_terms)
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=name)


def assert_stats_close(got: dict, expected: dict, n_terms: int) -> None:
    """``sensitivity_stats.json`` parameters: counts exact, every statistic to the tolerance of
    its tensor (scale: the larger of |min| and |max|)."""
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        assert got[name]["numel"] == values["numel"], name
        atol = summation_atol(max(abs(values["min"]), abs(values["max"])), n_terms)
        for key in ("mean", "std", "min", "max", "p50", "p95", "p99"):
            assert got[name][key] == pytest.approx(values[key], rel=0, abs=atol), (name, key)


def assert_same_selection(got: pd.DataFrame, expected: pd.DataFrame, n_terms: int,
                          per_tensor: bool = False) -> None:
    """Two ``top_weights.csv`` tables select the same weights with the same coordinates and
    values and scores equal to the tolerance; only weights within the tolerance of the selection
    boundary may differ, and only near-equal scores may swap ranks.

    A tensor with a weight in a top-K table has its largest |score| there too (in either mode),
    so each tensor's tolerance is read from the tables."""
    scale = pd.concat([expected, got]).assign(size=lambda t: t["score"].abs()) \
        .groupby("parameter")["size"].max()
    tolerance = lambda name: summation_atol(scale[name], n_terms)  # noqa: E731
    merged = expected.merge(got, on=KEY, how="outer", suffixes=("_expected", "_got"),
                            indicator=True)
    groups = ["parameter"] if per_tensor else []
    for _, group in (merged.groupby(groups) if groups else [(None, merged)]):
        _assert_group_selection(group, tolerance)


def _assert_group_selection(group: pd.DataFrame, tolerance) -> None:
    both = group[group["_merge"] == "both"]
    for column in COORDINATES:
        assert (both[f"{column}_expected"] == both[f"{column}_got"]).all(), column
    for _, row in both.iterrows():
        assert abs(row["score_got"] - row["score_expected"]) <= tolerance(row["parameter"]), \
            (row["parameter"], row["flat_index"])
    for side, other in (("expected", "got"), ("got", "expected")):
        alone = group[group["_merge"] == ("left_only" if side == "expected" else "right_only")]
        other_boundary = group[f"score_{other}"].abs().min()  # the other run's K-th score
        for _, row in alone.iterrows():  # only a near-tie of the boundary may be swapped
            assert abs(abs(row[f"score_{side}"]) - other_boundary) <= \
                2 * tolerance(row["parameter"]), \
                f"{row['parameter']}[{row['flat_index']}] selected by one run only"
    _assert_ranks_agree(both, tolerance)


def _assert_ranks_agree(both: pd.DataFrame, tolerance) -> None:
    """Ranks equal, except among scores within the tolerance of each other."""
    scores = both["score_expected"].abs().to_numpy()
    atol = np.array([tolerance(name) for name in both["parameter"]])
    for i, (rank_expected, rank_got) in enumerate(zip(both["rank_expected"], both["rank_got"])):
        if rank_expected == rank_got:
            continue
        near = np.abs(scores - scores[i]) <= 2 * np.maximum(atol, atol[i])
        near[i] = False
        assert near.any(), f"rank {rank_got} instead of {rank_expected} for a score that ties none"


def exponent_counts(scores: dict) -> dict[str, np.ndarray]:
    """Octave of each |score| (its fp32 exponent field) counted per tensor: what the score
    histograms draw."""
    return {name: np.bincount((t.float().contiguous().view(torch.int32) >> 23 & 0xFF).reshape(-1)
                              .numpy(), minlength=256) for name, t in scores.items()}


def assert_histograms_close(got: dict, expected: dict, n_terms: int) -> None:
    """Octave counts per tensor equal, except that a score within the tolerance of a power of
    two may fall on the other side of it."""
    counts_got, counts_expected = exponent_counts(got), exponent_counts(expected)
    for name, tensor in expected.items():
        atol = summation_atol(float(tensor.abs().max()), n_terms)
        magnitude = tensor.abs().double()
        nearest_edge = torch.exp2(torch.round(torch.log2(magnitude.clamp_min(1e-300))))
        movable = int(((magnitude - nearest_edge).abs() <= atol).sum())
        moved = int(np.abs(counts_got[name] - counts_expected[name]).sum())
        assert moved <= 2 * movable, f"{name}: {moved} octave counts differ"
