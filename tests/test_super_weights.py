"""Super-weight discovery: a planted super weight is found and confirmed; the built-in model's
super weight is found, confirmed and left untouched; the CLI writes the section."""
from __future__ import annotations

import json
import math

import pytest
import torch

from src.analysis import super_weights as sw
from src.analysis.super_weights import causal, detection
from src.data.loading import prepare_data
from src.eval.perplexity import evaluate
from src.models.components import describe_parameters
from src.sensitivity.perturb import fingerprint, perturbed
from tests.conftest import load

PLANT_LAYER, PLANT_ROW, PLANT_COL, CONST_CHANNEL = 0, 5, 17, 3


def plant_super_weight(model, token_ids: torch.Tensor) -> None:
    """Engineer a super weight into a random tiny Llama.

    Residual channel CONST_CHANNEL is constant in every token embedding, so after RMSNorm it
    dominates each token's MLP input; gate and up row PLANT_COL read only that channel, giving a
    large input activation x[PLANT_COL] at every token. The down projection carries it through a
    single weight to output channel PLANT_ROW (the rest of its column is zero), a massive
    residual activation. The output head reads the unigram log-frequencies of ``token_ids`` from
    channel PLANT_ROW, so the model's predictions depend on that one weight.
    """
    inner = model.model
    mlp = inner.layers[PLANT_LAYER].mlp
    with torch.no_grad():
        inner.embed_tokens.weight[:, CONST_CHANNEL] = 1.0
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[PLANT_COL] = 0.0
            proj.weight[PLANT_COL, CONST_CHANNEL] = 1.0
        mlp.down_proj.weight[:, PLANT_COL] = 0.0
        mlp.down_proj.weight[PLANT_ROW, PLANT_COL] = 10.0
        vocab = model.lm_head.weight.shape[0]
        counts = torch.bincount(token_ids.reshape(-1), minlength=vocab).float() + 0.1
        log_freq = counts.log() - counts.log().mean()
        model.lm_head.weight[:, PLANT_ROW] = log_freq / math.sqrt(inner.config.hidden_size)


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    tiny = load("random:tiny-llama")
    data = prepare_data(tiny.tokenizer, max_length=32, max_samples=4)
    plant_super_weight(tiny.model, torch.cat([data.calibration.input_ids, data.evaluation.input_ids]))
    return tiny.model, data


def test_planted_super_weight_is_found_exactly_and_confirmed(planted):
    model, data = planted
    section = sw.analyze(model, data.calibration, data.evaluation, batch_size=4, seeds=(0, 1, 2))
    (found,) = section["candidates"]  # exactly one: nothing else spikes once it is zeroed
    assert found["parameter"] == f"model.layers.{PLANT_LAYER}.mlp.down_proj.weight"
    assert (found["row"], found["col"]) == (PLANT_ROW, PLANT_COL)
    assert found["value"] == 10.0 and found["flat_index"] == PLANT_ROW * 128 + PLANT_COL
    assert found["output_ratio"] > 1000 and found["spike_share"] == pytest.approx(1.0, abs=1e-3)
    assert found["confirmed"] and section["n_confirmed"] == 1
    assert section["restore_verified"] and section["passes"][1][PLANT_LAYER]["spike"] is False

    # the recorded effects match an independent zeroing and evaluation
    baseline = evaluate(model, data.evaluation, 4).perplexity
    weight = model.model.layers[PLANT_LAYER].mlp.down_proj.weight
    with torch.no_grad():
        weight[PLANT_ROW, PLANT_COL] = 0.0
        zeroed = evaluate(model, data.evaluation, 4).perplexity
        weight[PLANT_ROW, PLANT_COL] = 10.0
    assert section["baseline_perplexity"] == pytest.approx(baseline, rel=1e-6)
    assert found["alone"]["perplexity"] == pytest.approx(zeroed, rel=1e-6)
    assert found["alone"]["ratio"] > 5
    controls = found["controls"]
    assert [r["seed"] for r in controls["random"]] == [0, 1, 2]
    assert controls["max_control_ratio"] == max([r["ratio"] for r in controls["random"]]
                                                + [controls["largest_magnitude"]["ratio"]])
    assert controls["max_control_ratio"] < 1.01
    # the largest-|w| control is the largest weight other than the candidate itself
    others = weight.detach().abs().reshape(-1).clone()
    others[found["flat_index"]] = -1
    assert controls["largest_magnitude"]["flat_index"][found["parameter"]] == [int(others.argmax())]


def test_whole_set_is_zeroed_together_against_per_tensor_controls(planted):
    model, data = planted
    targets = detection.mlp_down_targets(model)
    params = {t.param_name: t.param for t in targets}
    names = list(params)
    candidates = [{"parameter": names[0], "flat_index": PLANT_ROW * 128 + PLANT_COL},
                  {"parameter": names[1], "flat_index": 7},
                  {"parameter": names[1], "flat_index": 100}]

    def evaluate_model():
        return evaluate(model, data.evaluation, 4)

    baseline = evaluate_model()
    zeroing = causal.Zeroing(params, evaluate_model, baseline)
    whole = causal.causal_check(zeroing, candidates, seeds=(0, 1))
    assert whole["n_weights"] == 3 and zeroing.restored
    with perturbed(params, detection.candidate_selection(candidates), "zero"):
        assert whole["perplexity"] == pytest.approx(evaluate_model().perplexity, rel=1e-6)
    assert whole["ratio"] == pytest.approx(whole["perplexity"] / baseline.perplexity)
    for control in whole["controls"]["random"] + [whole["controls"]["largest_magnitude"]]:
        picked = control["flat_index"]
        assert [len(picked[n]) for n in names] == [1, 2]  # same count per tensor
        assert PLANT_ROW * 128 + PLANT_COL not in picked[names[0]]
        assert not {7, 100} & set(picked[names[1]])
    assert whole["clears_controls"] and candidates[0]["confirmed"]
    assert not candidates[1]["confirmed"] and not candidates[2]["confirmed"]


def test_detection_reports_layer_spikes_consistently(planted):
    model, data = planted
    targets = detection.mlp_down_targets(model)
    assert [t.param_name for t in targets] == [f"model.layers.{i}.mlp.down_proj.weight"
                                               for i in range(2)]
    layers = detection.detect(model, targets, data.calibration, batch_size=3)  # uneven batches
    # independent computation: peaks over all calibration tokens in one forward pass
    captured = {}
    hooks = [t.module.register_forward_hook(
        lambda m, i, o, n=t.param_name: captured.__setitem__(n, (i[0].detach(), o.detach())))
        for t in targets]
    with torch.no_grad():
        model(input_ids=data.calibration.input_ids, attention_mask=data.calibration.attention_mask)
    for h in hooks:
        h.remove()
    medians = []
    for layer in layers:
        x, y = captured[layer["parameter"]]
        x_peak = x.abs().reshape(-1, x.shape[-1]).amax(0)
        y_peak = y.abs().reshape(-1, y.shape[-1]).amax(0)
        assert layer["input_channel"] == int(x_peak.argmax())
        assert layer["output_channel"] == int(y_peak.argmax())
        assert layer["input_max"] == pytest.approx(float(x_peak.max()), rel=1e-5)
        assert layer["output_ratio"] == pytest.approx(float(y_peak.max() / y_peak.median()), rel=1e-5)
        medians.append(float(y_peak.max()))
    assert layers[0]["output_ratio_across_layers"] == pytest.approx(
        layers[0]["output_max"] / float(torch.tensor(medians).median()), rel=1e-5)
    assert [layer["spike"] for layer in layers] == [True, False]


def test_gpt2_conv1d_coordinates_and_flat_index():
    torch.manual_seed(0)
    tiny = load("random:tiny-gpt2")
    data = prepare_data(tiny.tokenizer, max_length=32, max_samples=2)
    targets = detection.mlp_down_targets(tiny.model)
    assert [t.param_name for t in targets] == ["transformer.h.0.mlp.c_proj.weight",
                                               "transformer.h.1.mlp.c_proj.weight"]
    assert all(t.meta.transposed for t in targets)
    layer = detection.detect(tiny.model, targets, data.calibration, batch_size=2)[0]
    stored = targets[0].param.detach()  # Conv1D: [in, out]
    assert layer["flat_index"] == layer["input_channel"] * stored.shape[1] + layer["output_channel"]
    assert layer["weight_value"] == float(stored[layer["input_channel"], layer["output_channel"]])


def test_controls_exclude_candidates_and_are_seeded():
    exclude = torch.arange(0, 90)
    picks = causal.random_control("w", 100, 10, exclude, seed=3)
    assert picks.tolist() == list(range(90, 100))
    a = causal.random_control("w", 10_000, 5, torch.tensor([1, 2]), seed=0)
    assert torch.equal(a, causal.random_control("w", 10_000, 5, torch.tensor([1, 2]), seed=0))
    assert not torch.equal(a, causal.random_control("w", 10_000, 5, torch.tensor([1, 2]), seed=1))
    weight = torch.tensor([[0.1, -5.0], [3.0, 0.2]])
    assert causal.magnitude_control("w", weight, 1, torch.tensor([1])).tolist() == [2]
    assert causal.clears(3.0, 1.0) and not causal.clears(1.05, 1.0) and not causal.clears(math.nan, 1.0)
    assert not causal.clears(math.inf, math.inf)


def test_metric_rank_counts_strictly_larger_scores():
    scores = {"a": torch.tensor([[0.5, -3.0], [1.0, 2.0]]), "b": torch.tensor([4.0, -2.0, 0.1])}
    rank = causal.metric_rank(scores, "a", 3)  # |2.0|: beaten by -3.0 in a; by 4.0 in b; ties -2.0
    assert (rank["rank_in_tensor"], rank["rank_global"]) == (2, 3)
    assert rank["n_global"] == 7 and rank["score"] == 2.0
    assert causal.metric_rank(scores, "c", 0) is None


@pytest.mark.slow
def test_builtin_super_weight_is_confirmed_and_weights_untouched(builtin, builtin_data):
    model, data = builtin.model, builtin_data
    params = dict(model.named_parameters())
    before = fingerprint(params)
    section = sw.analyze(model, data.calibration, data.evaluation, batch_size=4, max_weights=1,
                         seeds=(0, 1, 2))
    assert fingerprint(params) == before and section["restore_verified"]
    (top,) = section["candidates"]
    assert top["confirmed"]
    assert top["alone"]["ratio"] >= 3
    assert all(abs(r["ratio"] - 1) < 0.01 for r in top["controls"]["random"])
    # the layer that produces the massive activation of residual channel 507
    assert (top["parameter"], top["row"], top["col"]) == (
        "model.layers.11.mlp.down_proj.weight", 507, 1229)
    meta = describe_parameters(model, [top["parameter"]])[top["parameter"]]
    assert top["flat_index"] == 507 * meta.stored_shape[1] + 1229
    # independent check of the effect with the project's own perturbation
    selection = {top["parameter"]: torch.tensor([top["flat_index"]])}
    with perturbed(params, selection, "zero"):
        zeroed = evaluate(model, data.evaluation, 4).perplexity
    assert top["alone"]["perplexity"] == pytest.approx(zeroed, rel=1e-6)


@pytest.mark.slow
def test_cli_super_weights_end_to_end(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("--max-length", "64", "--max-samples", "4", "--topk", "5", "--mode", "global",
                 "--super-weights", "--super-weight-max", "1", "--seeds", "0",
                 "--out-dir", out)
    assert result.returncode == 0, result.stderr
    assert "super weights:" in result.stdout and "[507, 1229]" in result.stdout
    section = json.loads((out / "enhanced_analysis.json").read_text())["super_weights"]
    first = section["candidates"][0]
    assert first["confirmed"] and first["layer"] == 11
    assert first["metric_rank"]["rank_global"] == 1  # grad_x_weight ranks it first
    assert section["method"]["metric"] == "grad_x_weight" and section["method"]["seeds"] == [0]
    assert len(section["layers"]) == 30 and section["restore_verified"]
    config = json.loads((out / "config.json").read_text())
    assert config["super_weights"] and config["super_weight_max"] == 1


def test_cli_rejects_super_weight_flags_without_the_step(tmp_path, capsys):
    from src.cli import main

    assert main(["--spike-threshold", "20", "--out-dir", str(tmp_path / "x")]) == 2
    assert "no effect without --super-weights" in capsys.readouterr().err
    assert main(["--super-weights", "--spike-threshold", "0.5", "--out-dir",
                 str(tmp_path / "y")]) == 2
    assert "--spike-threshold must be > 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
