"""--mediation: patching is exact (all restores clean, none restores nothing), a planted super
weight is found and explained, attribution patching equals the first-order term computed by
finite differences, pair intervals match an independent bootstrap, and the model is left as it
was."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from src.analysis import mediation
from src.analysis import super_weights as sw
from src.analysis.mediation import atp
from src.analysis.mediation.experiments import bootstrap_deltas
from src.analysis.mediation.lab import Lab
from src.data.loading import TokenBlocks, prepare_data
from src.distributed.ranks import current
from src.eval.patching import Patch, hook_count, output_tensor
from src.eval.perplexity import EvalResult, evaluate
from src.eval.replay import decoder_blocks
from tests.conftest import load
from tests.test_advanced_perturbations import make_context
from tests.test_faults import state_hash
from tests.test_super_weights import PLANT_COL, PLANT_LAYER, PLANT_ROW, plant_super_weight

SOURCE = "model.layers.0.mlp.down_proj"


def make_lab(preset: str, source: str) -> tuple:
    """A float64 tiny model and a Lab over 3 blocks (one padded), recording ``source``."""
    torch.manual_seed(0)
    model = load(f"random:{preset}").model.double()
    ids = torch.randint(5, 500, (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    layers = decoder_blocks(model, source + ".weight", 0)
    return model, Lab(model, TokenBlocks(ids, mask), 2, current(), layers, [source])


@pytest.fixture(scope="module")
def float64_lab():
    return make_lab("tiny-llama", SOURCE)


def test_patching_every_output_restores_clean_and_patching_nothing_restores_nothing(float64_lab):
    model, lab = float64_lab
    weights = {SOURCE + ".weight": torch.arange(0, 8192, 3)}
    with lab.zeroed(weights):
        damaged = lab.evaluate(0)
        everything = lab.evaluate(0, [lab.restore(SOURCE, None)])
        nothing = lab.evaluate(0, [lab.restore(SOURCE, None, positions=lambda call:
                                               torch.zeros_like(lab.masks[call]))])
        full_damaged = evaluate(model, lab.blocks, 2)
    assert abs(damaged.nll - lab.clean.nll) > 1e-4           # the zeroing does damage
    assert damaged.nll == pytest.approx(full_damaged.nll, abs=1e-12)  # replay is exact
    assert abs(everything.nll - lab.clean.nll) < 1e-6
    assert abs(nothing.nll - damaged.nll) < 1e-12


def test_attribution_patching_is_the_first_order_term():
    """AtP per site equals the derivative of the summed NLL along the patch direction, here by
    a five-point finite difference on a float64 GPT-2 (an independent computation; GPT-2 keeps
    float64 throughout, Llama's RMSNorm would compute in float32)."""
    source = "transformer.h.0.mlp.c_proj"
    model, lab = make_lab("tiny-gpt2", source)
    weights = {source + ".weight": torch.arange(0, 8192, 3)}
    with lab.zeroed(weights):
        replay = lab.damaged_replay()
        summed = atp.first_order(lab, replay, 0)
        for layer, channel in ((0, 7), (1, 7), (1, 30), (0, 63)):
            assert summed[layer, channel] == pytest.approx(
                directional_derivative(lab, replay, layer, channel), rel=1e-6, abs=1e-10)


def directional_derivative(lab: Lab, replay, layer: int, channel: int, step: float = 1e-2):
    """d/dα of the summed NLL with block ``layer``'s channel moved α of the way to clean."""
    def summed_nll(alpha: float) -> float:
        def value(call, output):
            damaged = output[..., [channel]]
            clean = output_tensor(lab.replay.outputs[layer][call])[..., [channel]]
            return damaged + alpha * (clean - damaged)
        patch = Patch(lab.layer_list[layer], torch.tensor([channel]), value)
        result = lab.evaluate(layer, [patch], replay)
        return result.nll * result.n_tokens
    return (8 * (summed_nll(step) - summed_nll(-step))
            - (summed_nll(2 * step) - summed_nll(-2 * step))) / (12 * step)


@pytest.fixture(scope="module")
def planted_run():
    torch.manual_seed(0)
    tiny = load("random:tiny-llama")
    data = prepare_data(tiny.tokenizer, max_length=32, max_samples=4)
    model = tiny.model
    plant_super_weight(model, torch.cat([data.calibration.input_ids,
                                         data.evaluation.input_ids]))
    before, hooks = state_hash(model), hook_count(model)
    found = sw.analyze(model, data.calibration, data.evaluation, batch_size=4, seeds=(0, 1))
    ctx = make_context(model, dict(model.named_parameters()), data.evaluation, mediation=True,
                       mediation_eval_samples=4, mediation_weights=3, atp_exact=4,
                       spike_threshold=100.0, super_weights=True)
    ctx.cache[("section", "super_weights")] = found
    section = mediation.run(ctx)
    return section, state_hash(model) == before and hook_count(model) == hooks


def test_planted_super_weight_is_explained_by_its_activation(planted_run):
    section, untouched = planted_run
    assert untouched and section["restore_verified"] and section["hooks_removed"]
    (source,) = section["sources"]
    assert source["weights"][0]["parameter"] == f"model.layers.{PLANT_LAYER}.mlp.down_proj.weight"
    assert (source["weights"][0]["row"], source["weights"][0]["col"]) == (PLANT_ROW, PLANT_COL)
    restored = {r["positions"]: r for r in section["restore"]}
    assert restored["all"]["recovered_share"] == pytest.approx(1.0, abs=1e-4)
    assert restored["spike"]["recovered_share"] > 0.9
    assert section["damaged"][source["label"]]["nll"] > section["clean"]["nll"] + 1.0
    zero, mean = section["remove"]
    assert zero["operation"] == "zero" and zero["delta_nll"] > 1.0
    assert zero["delta_nll"] > 100 * abs(zero["max_control_delta_nll"])
    assert mean["operation"] == "mean" and abs(mean["delta_nll"]) < 0.01  # constant channel
    top = section["atp"]["top_site"]
    assert top["channel"] == PLANT_ROW
    residual = [r for r in section["flow"] if r["site"] == "residual"]
    assert residual[0]["layer"] == PLANT_LAYER
    assert residual[0]["recovered_share"] == pytest.approx(1.0, abs=1e-4)
    assert section["pairs"] == []  # one source: no pair
    lines = mediation.present.findings(section)
    assert "recovers 100.0%" in lines[0] and len(mediation.present.restore_table(section)) == 3


def test_pair_intervals_match_an_independent_bootstrap():
    tokens = torch.tensor([10, 12, 9, 11], dtype=torch.int64)
    clean = torch.tensor([20.0, 25.0, 17.0, 23.0], dtype=torch.float64)

    def result(sums):
        sums = torch.tensor(sums, dtype=torch.float64)
        nll = float(sums.sum() / tokens.sum())
        return EvalResult(nll, float(np.exp(nll)), 0.0, int(tokens.sum()), sums, tokens)

    a, b, joint = result([21, 27, 18, 24]), result([20.5, 25, 17.5, 23]), \
        result([24, 29, 19, 26])
    out = bootstrap_deltas(result(clean.tolist()), {"a": a, "b": b, "joint": joint}, seed=0)
    assert out["delta_nll_a"] == pytest.approx(5 / 42)
    assert out["interaction"] == pytest.approx((13 - 5 - 1) / 42)
    # independent: every one of the 4^4 resamples enumerated, weighted equally
    per_block = np.array([4, 4, 2, 3]) - np.array([1, 2, 1, 1]) - np.array([0.5, 0, 0.5, 0])
    grid = np.array(np.meshgrid(*[range(4)] * 4)).reshape(4, -1).T
    ratios = per_block[grid].sum(1) / tokens.numpy()[grid].sum(1)
    low, high = out["interaction_interval"]
    assert np.quantile(ratios, 0.005) <= low <= np.quantile(ratios, 0.06)
    assert np.quantile(ratios, 0.94) <= high <= np.quantile(ratios, 0.995)


@pytest.mark.slow
def test_cli_writes_mediation_json_and_leaves_the_model_untouched(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("--model", "random:tiny-llama", "--max-length", "32", "--max-samples", "4",
                 "--topk", "6", "--mediation", "--mediation-weights", "2", "--atp-exact", "3", "--save-plots",
                 "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    section = json.loads((out / "mediation.json").read_text())
    assert section["method"]["sources_from"] == "top_k"
    assert [s["label"] for s in section["sources"]][-1] == "all 6 weights"
    assert {r["positions"] for r in section["restore"]} == {"all", "spike", "first"}
    for row in section["restore"]:
        if row["positions"] == "all" and row["recovered_share"] is not None:
            assert row["recovered_share"] == pytest.approx(1.0, abs=1e-3)
    assert len(section["pairs"]) == 1 and section["atp"]["n_compared"] >= 3
    assert section["restore_verified"] and section["hooks_removed"]
    assert (out / "plots" / "mediation.png").exists()
    enhanced = json.loads((out / "enhanced_analysis.json").read_text())
    assert enhanced["mediation"]["restore"] == section["restore"]
