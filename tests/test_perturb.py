"""Perturbations: known bit patterns, bit-exact restore, controls, Jaccard."""
from __future__ import annotations

import pytest
import torch

from src.errors import UserError
from src.sensitivity.experiment import bootstrap_delta_ppl, build_conditions, compare_to_random
from src.sensitivity.perturb import (PERTURBATIONS, PerturbOptions, fingerprint, perturbed,
                                     resolve_bit)
from src.sensitivity.rank import top_k
from src.sensitivity.stability import jaccard

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def flip(value: float, dtype, bit) -> float:
    p = {"w": torch.nn.Parameter(torch.tensor([value, 5.0], dtype=dtype), requires_grad=False)}
    with perturbed(p, {"w": torch.tensor([0])}, "bit_flip", PerturbOptions(bit_position=bit)):
        result = float(p["w"][0])
    return result


@pytest.mark.parametrize("dtype", DTYPES)
def test_named_bits_flip_to_known_values(dtype):
    assert flip(1.5, dtype, "sign") == -1.5
    # 1.0 has exponent field 0111...1 (= bias): setting its MSB gives all ones -> inf
    assert flip(1.0, dtype, "exponent-msb") == float("inf")
    # 0.75 = 1.5 * 2^-1 (exponent bias-1 = 0111...10) -> 1.5 * 2^(2*bias - bias) = 1.5 * 2^bias
    bias = {torch.float32: 127, torch.bfloat16: 127, torch.float16: 15}[dtype]
    assert flip(0.75, dtype, "exponent-msb") == 1.5 * 2.0 ** bias
    # mantissa MSB is the 0.5 fraction bit: 1.0 -> 1.5, 1.5 -> 1.0
    assert flip(1.0, dtype, "mantissa-msb") == 1.5
    assert flip(1.5, dtype, "mantissa-msb") == 1.0
    # bit 0 is the least significant mantissa bit: one ulp above 1.0
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    assert flip(1.0, dtype, 0) == 1.0 + ulp
    # 2.0 has exponent field 1000...0: clearing the MSB leaves 0 -> +0.0; 3.0 (mantissa .1)
    # becomes the subnormal 0.5 * 2^(1-bias) = 2^-bias
    assert flip(2.0, dtype, "exponent-msb") == 0.0
    assert flip(3.0, dtype, "exponent-msb") == 2.0 ** -bias


def test_bit_numbers_validated():
    assert resolve_bit(31, torch.float32) == 31 and resolve_bit("7", torch.bfloat16) == 7
    with pytest.raises(UserError):
        resolve_bit(16, torch.float16)
    with pytest.raises(UserError):
        resolve_bit("exponent", torch.float32)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16)).clone()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(PERTURBATIONS))
def test_restore_is_bit_exact_also_on_error(method, dtype):
    torch.manual_seed(0)
    values = torch.randn(40, 30).to(dtype)
    values[0, 0] = float("nan")
    values[0, 1] = -0.0
    params = {"w": torch.nn.Parameter(values, requires_grad=False)}
    before = bits(params["w"].data)
    selection = {"w": torch.tensor([0, 1, 5, 77, 1199])}
    with perturbed(params, selection, method, PerturbOptions(perturb_scale=0.5), seed=3):
        changed = bits(params["w"].data)
    assert torch.equal(bits(params["w"].data), before)
    untouched = torch.ones(1200, dtype=torch.bool)
    untouched[selection["w"]] = False
    assert torch.equal(changed.reshape(-1)[untouched], before.reshape(-1)[untouched])
    if method in ("sign_flip", "bit_flip"):
        assert not torch.equal(changed.reshape(-1)[selection["w"]], before.reshape(-1)[selection["w"]])
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with perturbed(params, selection, method, PerturbOptions(), seed=1):
            raise RuntimeError("evaluation failed")
    assert torch.equal(bits(params["w"].data), before)


def test_bit_flip_probability_is_seeded():
    params = {"w": torch.nn.Parameter(torch.ones(1000), requires_grad=False)}
    selection = {"w": torch.arange(1000)}
    options = PerturbOptions(perturb_prob=0.3)
    flipped = []
    for seed in (1, 1, 2):
        with perturbed(params, selection, "bit_flip", options, seed=seed):
            flipped.append(params["w"].data != 1.0)
    assert torch.equal(flipped[0], flipped[1]) and not torch.equal(flipped[0], flipped[2])
    assert 0.25 < float(flipped[0].float().mean()) < 0.35


def test_gauss_noise_is_relative():
    params = {"w": torch.nn.Parameter(torch.full((20000,), 2.0), requires_grad=False)}
    with perturbed(params, {"w": torch.arange(20000)}, "gauss_noise",
                   PerturbOptions(perturb_scale=0.1)):
        noise = params["w"].data - 2.0
    assert abs(float(noise.std()) - 0.2) < 0.01 and abs(float(noise.mean())) < 0.01


def test_fingerprint_detects_a_single_changed_bit():
    params = {"w": torch.nn.Parameter(torch.randn(50), requires_grad=False)}
    before = fingerprint(params)
    params["w"].data.view(torch.int32)[3] ^= 1
    assert fingerprint(params) != before


def test_controls_have_k_eligible_weights_and_random_differs_per_seed():
    generator = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(20, 10, generator=generator), "b": torch.rand(5, 8, generator=generator)}
    top = top_k(scores, 6, "global")
    conditions = build_conditions(top, scores, 6, "global", ["random_k", "bottom_k"], [0, 1, 2],
                                  "zero", PerturbOptions())
    kinds = [(c.selection_name, c.seed) for c in conditions]
    assert kinds == [("top_k", None), ("random_k", 0), ("random_k", 1), ("random_k", 2),
                     ("bottom_k", None)]
    for c in conditions:
        assert sum(v.numel() for v in c.selection.values()) == 6
        for name, idx in c.selection.items():
            assert name in scores and int(idx.max()) < scores[name].numel()
    randoms = [c.selection for c in conditions if c.selection_name == "random_k"]
    assert jaccard(randoms[0], randoms[1]) < 1.0
    noisy = build_conditions(top, scores, 6, "global", ["random_k"], [0, 1], "gauss_noise",
                             PerturbOptions())
    assert [(c.selection_name, c.seed) for c in noisy] == [("top_k", 0), ("top_k", 1),
                                                           ("random_k", 0), ("random_k", 1)]


def test_jaccard_on_hand_made_sets():
    a = {"x": torch.tensor([1, 2, 3]), "y": torch.tensor([0])}
    b = {"x": torch.tensor([2, 3, 4]), "z": torch.tensor([0])}
    assert jaccard(a, b) == pytest.approx(2 / 6)
    assert jaccard(a, a) == 1.0
    assert jaccard(a, {"q": torch.tensor([9])}) == 0.0


def test_top_vs_random_statistics():
    stats = compare_to_random(150.0, [100.5, 99.0, 101.0, 100.0], baseline_ppl=100.0)
    assert stats["effect_ratio"] == pytest.approx(50.0 / ((0.5 + 1.0 + 1.0 + 0.0) / 4))
    assert stats["empirical_p_value"] == pytest.approx(1 / 5)
    assert stats["z_score"] > 10


def test_bootstrap_interval_brackets_the_paired_change():
    from src.eval.perplexity import EvalResult
    tokens = torch.full((20,), 10, dtype=torch.long)
    base_nll = torch.linspace(20, 40, 20, dtype=torch.float64)
    base = EvalResult(3.0, 20.0, 0.5, 200, base_nll, tokens)
    shifted = EvalResult(3.1, 22.0, 0.5, 200, base_nll + 1.0, tokens)  # +0.1 nats per token
    low, high = bootstrap_delta_ppl(base, shifted)
    import math
    point = math.exp(float(base_nll.sum() + 20) / 200) - math.exp(float(base_nll.sum()) / 200)
    assert low <= point <= high and high - low < point
