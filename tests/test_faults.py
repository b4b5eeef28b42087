"""Hardware faults: replayed evaluation, progressive bit search against brute force, fault
injection statistics against independent formulas, and bit-exact restores."""
import hashlib
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src.analysis.faults import injection, search
from src.analysis.faults.flips import FlipStack, uniform_flips
from src.data.loading import TokenBlocks
from src.eval.perplexity import evaluate
from src.eval.replay import LayerReplay, decoder_blocks
from src.models.components import describe_parameters
from src.sensitivity.bit_targets import held_as
from src.sensitivity.quantize import QuantSpec
from tests.conftest import load
from tests.test_advanced_perturbations import make_context

FAULT_DEFAULTS = dict(bit_format="native", fault_injection=0, fault_eval_samples=2,
                      critical_ratio=2.0, fault_margin=0.01, bit_search=0, bit_search_target=100.0,
                      bit_search_eval_every=1, bit_search_candidates=8, quant_group=8,
                      quant_symmetric=False, bit_position=None)


def state_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def micro():
    """A one-block Llama small enough to try every flip of two of its weights."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    names = ["model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    params = {n: dict(model.named_parameters())[n] for n in names}
    return model, params, TokenBlocks(ids, torch.ones_like(ids))


def fault_context(model, params, blocks, **settings):
    return make_context(model, params, blocks, **{**FAULT_DEFAULTS, **settings})


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_replay_from_a_block_equals_full_evaluation(preset):
    torch.manual_seed(0)
    model = load(f"random:{preset}").model
    ids = torch.randint(5, 500, (3, 16), generator=torch.Generator().manual_seed(1))
    blocks = TokenBlocks(ids, torch.ones_like(ids))
    name = next(n for n, p in model.named_parameters() if ".1." in n and p.ndim == 2)
    replay = LayerReplay(model, blocks, 3, decoder_blocks(model, name, 1))
    weight = dict(model.named_parameters())[name]
    with torch.no_grad():
        original = weight[0, 0].clone()
        weight[0, 0] = 3.0
        full, replayed = evaluate(model, blocks, 3), replay.evaluate_from(1)
        weight[0, 0] = original
    assert replayed.nll == pytest.approx(full.nll, rel=1e-6)
    assert replayed.nll != pytest.approx(replay.baseline.nll, rel=1e-6)  # the change is seen
    assert len(decoder_blocks(model, name, 1)) == 2  # the blocks are back in place


def brute_force_best(model, params, blocks, spec):
    """The single code flip that raises the batch NLL most, trying every bit of every weight."""
    best = (-math.inf, None)
    with held_as(params, describe_parameters(model, params), "int4", spec) as targets:
        for name, target in targets.items():
            for index in range(target.flat.numel()):
                for bit in range(target.n_bits):
                    idx = torch.tensor([index])
                    with torch.no_grad():
                        saved = target.apply(idx, bit)
                        nll = evaluate(model, blocks, 4).nll
                        target.restore(idx, saved)
                    if nll > best[0]:
                        best = (nll, (name, index, bit))
    return best


def test_search_first_flip_is_the_brute_force_best(micro):
    model, params, blocks = micro
    before = state_hash(model)
    spec = QuantSpec(4, 8, "asymmetric")
    best_nll, best_flip = brute_force_best(model, params, blocks, spec)
    ctx = fault_context(model, params, blocks, bit_format="int4", bit_search=2,
                        bit_search_candidates=2)
    section = search.run(ctx)
    first = section["steps"][0]
    assert (first["parameter"], first["flat_index"], first["bit"]) == best_flip
    assert first["batch_nll"] == pytest.approx(best_nll, rel=1e-6)
    assert section["restore_verified"] and state_hash(model) == before
    assert [r["n_flips"] for r in section["random_flips"]][-1] == section["n_flips"]
    assert section["top_metric_msb"]["n_flips"] == section["n_flips"]


def test_search_stops_at_the_target_and_restores(micro):
    """The random micro model is nearly uniform (batch NLL ≈ ln 64): a target of +0.06% is
    what a few int4 flips reach."""
    model, params, blocks = micro
    before = state_hash(model)
    ctx = fault_context(model, params, blocks, bit_format="int4", bit_search=6,
                        bit_search_target=1.0006, bit_search_eval_every=2)
    section = search.run(ctx)
    ratios = [r["batch_ppl_ratio"] for r in section["steps"]]
    assert section["stopped"] == "target" and ratios[-1] >= 1.0006 > max(ratios[:-1])
    assert ratios == sorted(ratios) and len(ratios) < 6
    assert [r["eval_perplexity"] is not None for r in section["steps"]] == \
        [(r["step"] % 2 == 0) or r is section["steps"][-1] for r in section["steps"]]
    assert section["steps"][-1]["eval_perplexity"] is not None
    assert section["restore_verified"] and state_hash(model) == before


def test_wilson_interval_and_sample_size_by_hand():
    k, n, z = 7, 120, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = injection.wilson(k, n)
    assert (low, high) == pytest.approx((centre - half, centre + half), rel=1e-9)
    size = injection.sample_size(10 ** 9, 0.01, 3000, 0.02)
    assert size["needed_worst_case"] == 9604   # the textbook 1.96² · 0.25 / 0.01², N large
    assert size["needed_at_observed_rate"] == math.ceil(z * z * 0.02 * 0.98 / 1e-4 /
                                                        (1 + z * z * 0.02 * 0.98 / 1e-4 / 1e9))
    assert size["margin_of_this_run"] == pytest.approx(z * math.sqrt(0.25 / 3000), rel=1e-5)


@pytest.mark.parametrize("bit_format,position", [("native", None), ("int4", None)])
def test_fault_injection_rates_and_restore(micro, bit_format, position):
    check_injection(*micro, bit_format, position, 60)


def test_exponent_msb_upsets_of_the_builtin_model_are_mostly_critical(builtin, builtin_data):
    params = {n: p for n, p in builtin.model.named_parameters()
              if n.startswith("model.layers.3.mlp.")}
    check_injection(builtin.model, params, builtin_data.evaluation, "native", "exponent-msb", 12,
                    fault_eval_samples=1)


def check_injection(model, params, blocks, bit_format, position, n, **settings):
    before = state_hash(model)
    ctx = fault_context(model, params, blocks, bit_format=bit_format, fault_injection=n,
                        bit_position=position, **settings)
    section = injection.run(ctx)
    rows = section["injections"]
    assert len(rows) == n and section["restore_verified"] and state_hash(model) == before
    for r in rows:  # critical means what it says, against the rows' own perplexities
        ratio = r["perplexity"] / section["baseline"]["perplexity"]
        assert r["critical"] == (not math.isfinite(r["perplexity"]) or ratio > 2.0)
    assert section["overall"]["critical"] == sum(r["critical"] for r in rows)
    by_bit = {r["value"]: r for r in section["by"]["bit"]}
    assert sum(r["n"] for r in by_bit.values()) == n
    for bit, row in by_bit.items():
        assert row["critical"] == sum(r["critical"] for r in rows if r["bit"] == bit)
        assert row["ci_low"] <= row["rate"] <= row["ci_high"]
    if position == "exponent-msb":
        assert set(by_bit) == {30} and section["overall"]["rate"] > 0.5
    if bit_format == "int4":
        assert set(by_bit) <= {0, 1, 2, 3} and section["quantization"] == "rtn4-g8-asymmetric"


def test_replayed_injection_equals_full_evaluation(micro):
    """Each upset's perplexity, measured with the earlier blocks replayed, equals a full
    evaluation of the model with that bit flipped."""
    model, params, blocks = micro
    ctx = fault_context(model, params, blocks, fault_injection=12, fault_eval_samples=4)
    section = injection.run(ctx)
    with held_as(params, ctx.metas, "native", None) as targets:
        for flip, row in zip(uniform_flips(targets, 12, 0), section["injections"]):
            assert (flip.name, flip.index, flip.bit) == (row["parameter"], row["flat_index"],
                                                         row["bit"])
            with FlipStack(targets) as stack:
                stack.push(flip)
                full = evaluate(model, blocks, 4).perplexity
            assert row["perplexity"] == pytest.approx(full, rel=1e-6, nan_ok=True)


def test_injection_without_numbered_blocks_evaluates_in_full(micro):
    """Weights outside numbered decoder blocks (here the embeddings): nothing to replay."""
    model, _, blocks = micro
    params = {"model.embed_tokens.weight": model.model.embed_tokens.weight}
    ctx = fault_context(model, params, blocks, fault_injection=4, fault_eval_samples=4)
    section = injection.run(ctx)
    with held_as(params, ctx.metas, "native", None) as targets:
        for flip, row in zip(uniform_flips(targets, 4, 0), section["injections"]):
            with FlipStack(targets) as stack:
                stack.push(flip)
                full = evaluate(model, blocks, 4).perplexity
            assert row["perplexity"] == pytest.approx(full, rel=1e-6, nan_ok=True)
