"""Honest controls: bottom-K drawn among the weights a method changes, n_changed measured per
condition, the z-score only where the controls spread beyond the evaluation's resolution, and
the per-block NLLs that every bootstrap interval can be recomputed from."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from src.eval.perplexity import EvalResult
from src.models.components import ParamMeta
from src.sensitivity import compression, experiment, quantize
from src.sensitivity.perturb import PERTURBATIONS, PerturbOptions, changed_by
from src.sensitivity.rank import bottom_k
from tests.conftest import run_cli


def test_each_perturbation_says_which_weights_it_changes():
    values = torch.tensor([0.0, -0.0, 1.5, -2.0])
    for method in ("zero", "sign_flip", "gauss_noise"):
        assert PERTURBATIONS[method].changes(values, PerturbOptions()).tolist() == \
            [False, False, True, True]
        changed = PERTURBATIONS[method].fn(values.clone(), torch.Generator(), PerturbOptions())
        assert (changed != values).tolist() == [False, False, True, True]  # what it says is so
    sign = PerturbOptions(bit_position="sign")
    assert PERTURBATIONS["bit_flip"].changes(values, sign).tolist() == [False, False, True, True]
    assert PERTURBATIONS["bit_flip"].changes(values, PerturbOptions()).all()


def test_bottom_k_is_drawn_among_the_weights_the_method_changes():
    weight = torch.nn.Parameter(torch.tensor([[0.0, 0.5, 0.0, -0.25], [0.0, 2.0, 3.0, 0.0]]))
    scores = {"w": weight.detach().abs() * 10}  # zeros score lowest, as with every metric
    assert sorted(bottom_k(scores, 3, "global")["w"].tolist()) == [0, 2, 4]  # the old, vacuous pick
    eligible = changed_by("zero", PerturbOptions(), {"w": weight})
    assert bottom_k(scores, 3, "global", eligible=eligible)["w"].tolist() == [3, 1, 5]
    assert bottom_k(scores, 2, "per_tensor", eligible=eligible)["w"].tolist() == [3, 1]
    # more than the eligible weights: the eligible ones come first, then the rest
    assert bottom_k(scores, 5, "global", eligible=eligible)["w"].tolist()[:4] == [3, 1, 5, 6]


def _fake_result(nll_sums, tokens) -> EvalResult:
    nll_sum, n = torch.tensor(nll_sums, dtype=torch.float64), torch.tensor(tokens)
    mean = float(nll_sum.sum()) / int(n.sum())
    return EvalResult(mean, math.exp(mean), 0.0, int(n.sum()), nll_sum, n)


def test_conditions_record_how_many_weights_changed_and_flag_none():
    weight = torch.nn.Parameter(torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0]))
    params = {"w": weight}
    conditions = [experiment.Condition("bottom_k", None, {"w": torch.tensor([0, 1])}),
                  experiment.Condition("top_k", None, {"w": torch.tensor([1, 3, 4])})]
    result = _fake_result([3.0, 4.0], [2, 2])
    blocks = []
    rows, restored = experiment.run_conditions(params, conditions, "zero", PerturbOptions(),
                                               lambda: result, result, blocks=blocks)
    assert restored and [r["n_changed"] for r in rows] == [0, 2]
    assert [r["vacuous"] for r in rows] == [True, False]
    assert len(blocks) == 2 and blocks[1].block_tokens.tolist() == [2, 2]


def test_quantization_counts_the_weights_rounding_changes():
    on_grid = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # 2-bit asymmetric: every value on the grid
    off_grid = torch.tensor([[0.0, 1.2, 2.0, 3.0]])
    params = {"a": torch.nn.Parameter(on_grid), "b": torch.nn.Parameter(off_grid)}
    metas = {n: ParamMeta(n, 0, "mlp_up", (1, 4), False) for n in params}
    changes = quantize.changed_by(params, metas, quantize.QuantSpec(2, None))
    assert changes("a").sum() == 0 and changes("b").tolist() == [[False, True, False, False]]
    rtn = experiment.Condition("none", None, {})
    kept = experiment.Condition("top_k", None, {"b": torch.tensor([0, 1])})
    assert int(compression.count_changed(changes, params, rtn, {})) == 1
    assert int(compression.count_changed(changes, params, kept, kept.selection)) == 1


def test_z_is_not_defined_when_the_controls_do_not_spread():
    tight = experiment.compare_to_random(20.0, [10.0, 10.0 + 1e-9, 10.0 - 1e-9], 10.0)
    assert tight["z_score"] is None and "resolves" in tight["z_undefined_reason"]
    assert tight["ppl_ratio_to_random"] == pytest.approx(2.0)
    assert tight["log_ppl_ratio_to_random"] == pytest.approx(math.log(2.0))
    assert tight["empirical_p_value"] == tight["empirical_p_floor"] == 0.25
    spread = experiment.compare_to_random(13.0, [10.0, 11.0, 12.0], 10.0)
    assert spread["z_score"] == pytest.approx((13.0 - 11.0) / 1.0)
    assert spread["z_undefined_reason"] is None
    json.dumps(tight, allow_nan=False)  # strict JSON: None, not a nine-digit number or NaN
    # draws that spread beyond float32 rounding but less than the evaluation text resolves
    noisy_text = experiment.compare_to_random(20.0, [10.001, 10.002, 10.003], 10.0,
                                              resolution=0.5)
    assert noisy_text["z_score"] is None and noisy_text["z_sd_floor"] == 0.5


def test_the_evaluation_resolution_is_the_baseline_perplexitys_standard_error():
    """Against the delta method: equal-token blocks, ppl = exp(mean block NLL), so its standard
    error is about ppl * sd(block NLL) / sqrt(n)."""
    rng = np.random.default_rng(1)
    block_nll = 3.0 + 0.2 * rng.standard_normal(400)  # token-mean NLL per block
    result = _fake_result((block_nll * 100).tolist(), [100] * 400)
    expected = math.exp(block_nll.mean()) * block_nll.std(ddof=1) / math.sqrt(400)
    assert experiment.perplexity_resolution(result) == pytest.approx(expected, rel=0.1)


@pytest.mark.slow
def test_intervals_can_be_recomputed_from_the_folder(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--model", "random:tiny-llama", "--device", "cpu", "--max-length", "32",
                   "--max-samples", "4", "--batch-size", "2", "--topk", "5", "--seeds", "0,1",
                   "--perturb", "sign_flip", "--quantize", "4", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "floor 0.333 with 2 random draws" in proc.stdout
    for experiment_file, blocks_file in (("perturbation_results.json", "perturbation_blocks.csv"),
                                         ("quantization_results.json", "quantization_blocks.csv")):
        results = json.loads((out / experiment_file).read_text())
        frame = pd.read_csv(out / blocks_file)
        assert results["bootstrap"]["resamples"] == 1000 and results["bootstrap"]["seed"] == 0
        assert results["bootstrap"]["blocks_file"] == blocks_file
        base = frame[frame["condition"] == -1]
        assert base["nll_sum"].sum() / base["n_tokens"].sum() == \
            pytest.approx(results["baseline"]["nll"], rel=1e-12)
        for index, row in enumerate(results["conditions"]):
            part = frame[frame["condition"] == index]
            assert part["nll_sum"].sum() / part["n_tokens"].sum() == \
                pytest.approx(row["nll"], rel=1e-12)
            assert _bootstrap(base, part) == pytest.approx(row["delta_perplexity_ci95"], rel=1e-9)
    listed = {f["path"] for f in json.loads((out / "experiment_manifest.json").read_text())
              ["output_files"]}
    assert {"perturbation_blocks.csv", "quantization_blocks.csv"} <= listed


def _bootstrap(base: pd.DataFrame, part: pd.DataFrame) -> list[float]:
    """The interval the JSON states, recomputed from the CSV by its stated method."""
    picks = np.random.default_rng(0).integers(0, len(base), size=(1000, len(base)))
    tokens = base["n_tokens"].to_numpy()[picks].sum(axis=1)
    delta = np.exp(part["nll_sum"].to_numpy()[picks].sum(axis=1) / tokens) - \
        np.exp(base["nll_sum"].to_numpy()[picks].sum(axis=1) / tokens)
    return list(np.percentile(delta, [2.5, 97.5]))


@pytest.mark.slow
def test_a_log_gets_a_line_per_scoring_pass_and_condition_unless_quiet(tmp_path):
    args = ["--model", "random:tiny-llama", "--device", "cpu", "--max-length", "32",
            "--max-samples", "4", "--batch-size", "2", "--topk", "3", "--seeds", "0,1",
            "--perturb", "zero"]
    logged = run_cli(*args, "--out-dir", tmp_path / "logged")  # stderr is a pipe: a log
    assert logged.returncode == 0, logged.stderr[-2000:]
    lines = logged.stderr.splitlines()
    assert any(re.fullmatch(r"\[cwa\] grad_x_weight: scoring pass over 2 batches of 2 blocks "
                            r"done in [\d.]+ s", line) for line in lines)
    finished = [line for line in lines if line.startswith("[cwa] condition ")]
    assert len(finished) == 4 and finished[1].startswith("[cwa] condition 2/4 random_k seed 0: "
                                                         "perplexity ")
    quiet = run_cli(*args, "--quiet", "--out-dir", tmp_path / "quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.replace("quiet", "logged") == logged.stdout  # the same results
    both = run_cli(*args, "--quiet", "--verbose", "--out-dir", tmp_path / "both")
    assert both.returncode == 2 and "either --quiet or --verbose" in both.stderr
