"""Ranking against brute force, with ties and K larger than some tensors."""
from __future__ import annotations

import pytest
import torch

from src.errors import UserError
from src.models.components import ParamMeta, describe_parameters, from_out_in, to_out_in
from src.sensitivity.rank import bottom_k, random_k, selection_table, top_k


def score_dict(seed=0, ties=True):
    generator = torch.Generator().manual_seed(seed)
    scores = {"a": torch.rand(6, 5, generator=generator), "b": torch.rand(3, 2, generator=generator),
              "c": torch.rand(10, 4, generator=generator)}
    if ties:  # many exact ties, across and within tensors
        for name in scores:
            scores[name] = (scores[name] * 4).round() / 4
    scores["b"] = -scores["b"]  # signed scores rank by |score|
    return scores


def brute_force(scores, k, largest=True):
    """Sort every weight by (|score| desc or asc, tensor order, flat index): the documented rule."""
    entries = []
    for order, (name, s) in enumerate(scores.items()):
        for idx, value in enumerate(s.reshape(-1).abs().tolist()):
            entries.append(((-value if largest else value), order, idx, name))
    entries.sort()
    return [(name, idx) for _, _, idx, name in entries[:k]]


def as_pairs(selection, scores, largest=True):
    pairs = [(name, int(i)) for name, idx in selection.items() for i in idx]
    order = {n: i for i, n in enumerate(scores)}
    sign = -1 if largest else 1
    return sorted(pairs, key=lambda p: (sign * abs(float(scores[p[0]].reshape(-1)[p[1]])),
                                        order[p[0]], p[1]))


@pytest.mark.parametrize("k", [1, 5, 7, 13, 40, 76])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_top_k_equals_brute_force(k, seed):
    scores = score_dict(seed)
    assert as_pairs(top_k(scores, k, "global"), scores) == brute_force(scores, k)
    assert as_pairs(bottom_k(scores, k, "global"), scores, largest=False) == \
        brute_force(scores, k, largest=False)


def test_per_tensor_returns_k_per_tensor_in_rank_order():
    scores = score_dict(3)
    selection = top_k(scores, 4, "per_tensor")
    for name, idx in selection.items():
        assert idx.numel() == 4
        expected = brute_force({name: scores[name]}, 4)
        assert [(name, int(i)) for i in idx] == expected


def test_k_too_large_or_zero_is_a_user_error():
    scores = score_dict()
    with pytest.raises(UserError, match="larger than"):
        top_k(scores, 7, "per_tensor")  # tensor b has 6 weights
    with pytest.raises(UserError, match="larger than"):
        top_k(scores, 77, "global")
    with pytest.raises(UserError, match="at least 1"):
        top_k(scores, 0, "global")


def test_random_k_same_eligibility_reproducible_and_seed_dependent():
    sizes = {"a": 30, "b": 6, "c": 2_000_000}
    first = random_k(sizes, 50, "global", seed=1)
    again = random_k(sizes, 50, "global", seed=1)
    other = random_k(sizes, 50, "global", seed=2)
    assert sum(v.numel() for v in first.values()) == 50
    assert {n: v.tolist() for n, v in first.items()} == {n: v.tolist() for n, v in again.items()}
    assert {n: v.tolist() for n, v in first.items()} != {n: v.tolist() for n, v in other.items()}
    for name, idx in first.items():
        assert idx.unique().numel() == idx.numel()
        assert 0 <= int(idx.min()) and int(idx.max()) < sizes[name]
    per_tensor = random_k(sizes, 5, "per_tensor", seed=0)
    assert all(v.numel() == 5 for v in per_tensor.values()) and set(per_tensor) == set(sizes)


def test_random_k_global_is_proportional_to_tensor_size():
    sizes = {"small": 1000, "large": 9000}
    counts = {"small": 0, "large": 0}
    for seed in range(40):
        for name, idx in random_k(sizes, 100, "global", seed).items():
            counts[name] += idx.numel()
    assert 0.07 < counts["small"] / 4000 < 0.13


def test_conv1d_coordinates_are_reported_out_in():
    from tests.conftest import load
    tiny = load("random:tiny-gpt2")
    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D stored [in=64, out=256]
    meta = describe_parameters(tiny.model, [name])[name]
    assert meta.transposed and meta.shape_out_in == (256, 64)
    weight = dict(tiny.model.named_parameters())[name]
    flat = torch.tensor([0, 1, 256, 257 + 256 * 3])
    rows, cols = to_out_in(meta, flat)
    for f, r, c in zip(flat.tolist(), rows.tolist(), cols.tolist()):
        # stored [in, out] element (c, r) is the [out, in] element (r, c)
        assert weight.reshape(-1)[f] == weight[c, r]
        assert from_out_in(meta, r, c) == f
    linear = ParamMeta("x", 0, "attn_q", (4, 6), False)
    assert [t.tolist() for t in to_out_in(linear, torch.tensor([7]))] == [[1], [1]]


def test_selection_table_global_ranks_and_signed_scores():
    scores = score_dict(4, ties=False)
    params = {n: torch.nn.Parameter(torch.randn_like(s)) for n, s in scores.items()}
    metas = {n: ParamMeta(n, 0, "mlp_up", tuple(s.shape), False) for n, s in scores.items()}
    table = selection_table(top_k(scores, 10, "global"), scores, params, metas, "global")
    assert table["rank"].tolist() == list(range(1, 11))
    assert list(table["score"].abs()) == sorted(table["score"].abs(), reverse=True)
    for row in table.itertuples():
        assert row.score == pytest.approx(float(scores[row.parameter].reshape(-1)[row.flat_index]))
        assert row.value == pytest.approx(float(params[row.parameter].detach().reshape(-1)[row.flat_index]))
