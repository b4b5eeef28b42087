"""Round-to-nearest quantization against hand computations, kept weights, exact restore, and
the compression experiment on real models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from src.cli import main
from src.models.components import ParamMeta
from src.sensitivity import compression
from src.sensitivity.perturb import fingerprint
from src.sensitivity.quantize import QuantSpec, backup, quantize_out_in, quantize_stored, quantized


def q(rows, bits, group, scheme="asymmetric", keep=None):
    w = torch.tensor(rows, dtype=torch.float32)
    mask = None if keep is None else torch.tensor(keep, dtype=torch.bool)
    return quantize_out_in(w, QuantSpec(bits, group, scheme), mask).tolist()


def test_asymmetric_groups_by_hand():
    # 2 bits: 4 levels. Group 1 = [0, .1, .25, .9]: scale .3, zero 0 -> q 0, 0, 1, 3.
    # Group 2 (the shorter tail of a 6-wide row) = [2, 5]: scale 1, zero -2 -> exact.
    out, = q([[0.0, 0.1, 0.25, 0.9, 2.0, 5.0]], bits=2, group=4)
    assert out == pytest.approx([0.0, 0.0, 0.3, 0.9, 2.0, 5.0], abs=1e-6)
    # one group per row: range [0, 5], scale 5/3 -> q 0, 0, 0, 1, 1, 3
    out, = q([[0.0, 0.1, 0.25, 0.9, 2.0, 5.0]], bits=2, group=None)
    assert out == pytest.approx([0, 0, 0, 5 / 3, 5 / 3, 5.0], abs=1e-6)


def test_symmetric_by_hand():
    # 3 bits: levels -3..3, scale = max|w| / 3 = 1/3
    out, = q([[-1.0, 0.4, 0.2, 0.7]], bits=3, group=4, scheme="symmetric")
    assert out == pytest.approx([-1.0, 1 / 3, 1 / 3, 2 / 3], abs=1e-6)


def test_a_kept_weight_is_left_out_of_its_group_range():
    row = [[0.0, 0.25, 0.6, 100.0]]
    kept, = q(row, bits=2, group=4, keep=[[False, False, False, True]])
    assert kept == pytest.approx([0.0, 0.2, 0.6, 100.0], abs=1e-6)  # range [0, .6], scale .2
    plain, = q(row, bits=2, group=4)
    assert plain == pytest.approx([0.0, 0.0, 0.0, 100.0], abs=1e-5)  # 100 sets the range


def test_constant_groups_keep_their_value():
    out, = q([[0.7, 0.7, 0.7, 0.7]], bits=2, group=4)
    assert out == pytest.approx([0.7] * 4)
    out, = q([[0.0, 0.0, 0.0, 0.0]], bits=2, group=4, scheme="symmetric")
    assert out == [0.0] * 4


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
def test_kept_weights_untouched_and_the_rest_on_the_grid(scheme):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(8, 20, generator=generator)
    keep = torch.rand(8, 20, generator=generator) < 0.1
    bits, group = 3, 6
    out = quantize_out_in(w, QuantSpec(bits, group, scheme), keep)
    assert torch.equal(out[keep], w[keep])
    for row in range(8):
        for start in range(0, 20, group):
            cols = slice(start, min(start + group, 20))
            values, mask = w[row, cols].numpy(), ~keep[row, cols].numpy()
            if not mask.any():
                continue
            got = out[row, cols].numpy()[mask]
            if scheme == "asymmetric":
                low, high = values[mask].min(), values[mask].max()
                if high == low:  # one weight left in the group: kept exactly
                    assert np.allclose(got, low)
                    continue
                scale = (high - low) / (2 ** bits - 1)
                levels = (got - low) / scale  # on the grid: integers from a shifted zero point
                levels = levels - np.round(levels)
                assert np.allclose(levels, levels[0], atol=1e-4)
            else:
                scale = np.abs(values[mask]).max() / (2 ** (bits - 1) - 1)
                assert np.allclose(got / scale, np.round(got / scale), atol=1e-4)
                assert np.abs(np.round(got / scale)).max() <= 2 ** (bits - 1) - 1



def reference_rtn(w: np.ndarray, keep: np.ndarray, bits: int, group: int | None,
                  scheme: str) -> np.ndarray:
    """Round-to-nearest written out weight by weight in float64, from the formulas in the
    quantize module's docstring: each row cut into groups of ``group`` inputs from its start,
    whatever is left over forming a shorter last group."""
    out = w.astype(np.float64).copy()
    n_out, n_in = w.shape
    size = group or n_in
    for r in range(n_out):
        for start in range(0, n_in, size):
            cols = [c for c in range(start, min(start + size, n_in)) if not keep[r, c]]
            if not cols:
                continue
            values = [float(w[r, c]) for c in cols]
            if scheme == "asymmetric":
                low, high = min(values), max(values)
                scale = (high - low) / (2 ** bits - 1)
                for c, v in zip(cols, values):
                    zero = round(-low / scale) if scale else 0
                    out[r, c] = (min(max(round(v / scale) + zero, 0), 2 ** bits - 1) - zero) \
                        * scale if scale else low
            else:
                qmax = 2 ** (bits - 1) - 1
                scale = max(abs(v) for v in values) / qmax
                for c, v in zip(cols, values):
                    out[r, c] = min(max(round(v / scale), -qmax), qmax) * scale if scale else 0.0
    return out


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("group", [6, 7, 32, None])  # 20 = 3 x 6 + 2 = 2 x 7 + 6 < 32
def test_short_last_groups_against_a_computation_by_hand(scheme, group):
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(8, 20, generator=generator)
    keep = torch.rand(8, 20, generator=generator) < 0.1
    out = quantize_out_in(w, QuantSpec(3, group, scheme), keep)
    expected = reference_rtn(w.numpy(), keep.numpy(), 3, group, scheme)
    assert np.allclose(out.numpy(), expected, atol=1e-5)


def test_row_groups_says_how_rows_divide():
    from src.sensitivity.quantize import row_groups

    metas = {"a": ParamMeta("a", 0, "attn_q", (64, 64), False),
             "b": ParamMeta("b", 0, "mlp_down", (64, 128), False),
             "c": ParamMeta("c", 0, "mlp_up", (20, 64), True)}  # Conv1D [in=20, out=64]
    assert row_groups(metas, QuantSpec(4, 48)) == [
        {"row_length": 20, "full_groups": 0, "last_group": 20},
        {"row_length": 64, "full_groups": 1, "last_group": 16},
        {"row_length": 128, "full_groups": 2, "last_group": 32}]
    assert row_groups(metas, QuantSpec(4, None)) == [
        {"row_length": n, "full_groups": 1, "last_group": 0} for n in (20, 64, 128)]

def test_conv1d_is_grouped_along_output_rows():
    stored = torch.randn(12, 5)  # GPT-2 Conv1D: [in=12, out=5]
    meta = ParamMeta("x.mlp.c_fc.weight", 0, "mlp_up", (12, 5), True)
    spec = QuantSpec(3, 4)
    assert torch.equal(quantize_stored(stored, meta, spec, None),
                       quantize_out_in(stored.T, spec).T)
    keep = torch.tensor([0, 17])  # flat indices into the stored tensor
    result = quantize_stored(stored, meta, spec, keep)
    assert torch.equal(result.reshape(-1)[keep], stored.reshape(-1)[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_restores_exact_bits(tiny_llama, dtype):
    model = tiny_llama.model
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2 and "layers" in n}
    with torch.no_grad():
        for p in params.values():
            p.data = p.data.to(dtype)
    try:
        metas = {n: ParamMeta(n, 0, "mlp_up", tuple(p.shape), False) for n, p in params.items()}
        before = fingerprint(params)
        keep = {next(iter(params)): torch.tensor([0, 5, 9])}
        kept_values = next(iter(params.values())).detach().reshape(-1)[keep[next(iter(params))]]
        with quantized(params, metas, QuantSpec(2, 16), keep, backup(params)):
            assert fingerprint(params) != before
            first = next(iter(params.values())).detach().reshape(-1)
            assert torch.equal(first[keep[next(iter(params))]], kept_values)
            assert all(p.dtype == dtype for p in params.values())
        assert fingerprint(params) == before
    finally:
        with torch.no_grad():
            for p in params.values():
                p.data = p.data.float()


def test_recovery_and_its_comparison():
    assert compression.recovery(40.0, 50.0, 30.0) == 0.5
    assert compression.recovery(30.0, 50.0, 30.0) == 1.0
    rows = [{"selection": "none", "perplexity": 50.0}, {"selection": "top_k", "perplexity": 35.0},
            {"selection": "random_k", "perplexity": 49.0},
            {"selection": "random_k", "perplexity": 51.0}]
    named = compression.with_recovery(rows, 30.0)
    assert [r["condition"] for r in named] == ["rtn", "rtn_keep_top_k", "rtn_keep_random_k",
                                               "rtn_keep_random_k"]
    assert [r["recovery"] for r in named] == pytest.approx([0.0, 0.75, 0.05, -0.05])
    versus = compression.summarize(named)["top_vs_random"]
    assert versus["random_k_mean_recovery"] == pytest.approx(0.0, abs=1e-12)
    assert versus["empirical_p_value"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_rtn_of_the_builtin_model(builtin, builtin_data):
    """8 bits barely move perplexity; 2 bits wreck it."""
    from src.eval.perplexity import evaluate
    from src.models.components import describe_parameters
    from src.sensitivity.eligibility import eligible_parameters

    params = eligible_parameters(builtin.model)
    metas = describe_parameters(builtin.model, params)
    originals = backup(params)
    base = evaluate(builtin.model, builtin_data.evaluation, 4).perplexity
    ratios = {}
    for bits in (8, 2):
        with quantized(params, metas, QuantSpec(bits, 128), {}, originals):
            ratios[bits] = evaluate(builtin.model, builtin_data.evaluation, 4).perplexity / base
    assert abs(ratios[8] - 1) < 0.01 and ratios[2] > 2
    assert all(torch.equal(p, originals[n]) for n, p in params.items())


def test_cli_compression_experiment(tmp_path):
    out = tmp_path / "run"
    assert main(["--model", "random:tiny-llama", "--device", "cpu", "--max-length", "32",
                 "--max-samples", "4", "--topk", "40", "--mode", "global", "--quantize", "3",
                 "--quant-group", "row", "--quant-symmetric", "--seeds", "0,1",
                 "--out-dir", str(out)]) == 0
    results = json.loads((out / "quantization_results.json").read_text())
    assert results["complete"] and results["restore_verified"]
    assert results["quantization"] == {"bits": 3, "group": None, "scheme": "symmetric",
                                       "label": "rtn3-row-symmetric"}
    assert [r["condition"] for r in results["conditions"]] == [
        "rtn", "rtn_keep_top_k", "rtn_keep_random_k", "rtn_keep_random_k", "rtn_keep_bottom_k"]
    assert results["conditions"][0]["recovery"] == 0.0
    assert results["summary"]["top_vs_random"]["n_random_draws"] == 2
    assert 0 < results["share_kept"] < 0.01
