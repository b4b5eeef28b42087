"""--faithfulness: damage curves against the random band, and Taylor predictions of damage.

The prediction test builds a model whose calibration NLL is exactly a separable quadratic of one
weight matrix W: every position's logits over a two-token vocabulary are 0 for the next token
and log(expm1(q(W))) for the other, so each token's NLL is log(1 + expm1(q)) = q(W), with
q(W) = c + Σ a_ij (W_ij − m_ij)². Its gradient and Hessian diagonal are exact (the Hessian is
diagonal: one Rademacher probe gives it exactly), so ḡ·δ + ½ Σ h δ² is the measured change.
"""
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from src.analysis import faithfulness as faith
from src.analysis.faithfulness import measure, statistics
from src.data.loading import TokenBlocks
from src.eval.perplexity import evaluate
from src.sensitivity.hutchinson import HutchinsonSettings
from src.sensitivity.perturb import PerturbOptions
from src.sensitivity.rank import random_k
from src.sensitivity.scoring import ScoringJob


class QuadraticLM(torch.nn.Module):
    """Token NLL = q(W) = c + Σ a (W − m)² at every position (see the module docstring), in
    float64: the measured change is then exact to ~1e-15, and the test checks the predictions
    (ḡ and h are accumulated in float32: ~1e-7 relative)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(6, 5, generator=generator,
                                                     dtype=torch.float64))
        self.register_buffer("center", torch.randn(6, 5, generator=generator, dtype=torch.float64))
        self.register_buffer("curvature", 0.05 + torch.rand(6, 5, generator=generator,
                                                            dtype=torch.float64) * 0.1)
        self.constant = 0.5
        self.config = SimpleNamespace()

    def q(self) -> torch.Tensor:
        return self.constant + (self.curvature * (self.weight - self.center) ** 2).sum()

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        batch, length = input_ids.shape
        following = torch.roll(input_ids, -1, dims=1)
        other = torch.log(torch.expm1(self.q())).expand(batch, length)
        logits = torch.stack([torch.where(following == 0, 0.0, other),
                              torch.where(following == 1, 0.0, other)], dim=-1)
        return SimpleNamespace(logits=logits)


def quadratic_context():
    model = QuadraticLM()
    ids = torch.randint(0, 2, (4, 12), generator=torch.Generator().manual_seed(1))
    blocks = TokenBlocks(ids, torch.ones_like(ids))
    params = {"weight": model.weight}
    job = ScoringJob(model=model, params=params, blocks=blocks, batch_size=2, seed=0,
                     settings={HutchinsonSettings: HutchinsonSettings(hutchinson_samples=1)})
    return SimpleNamespace(model=model, params=params, job=job, batch_size=2, options=PerturbOptions(),
                           metric="magnitude", scored=None, settings=SimpleNamespace(faithfulness=()),
                           sizes={"weight": 30}, seeds=(0,),
                           baseline=evaluate(model, blocks, 2),
                           evaluate=lambda: evaluate(model, blocks, 2))


def test_second_order_prediction_is_exact_on_a_quadratic_loss():
    ctx = quadratic_context()
    taylor = measure.taylor_terms(ctx, known={})
    exact_gradient = 2 * ctx.model.curvature * (ctx.model.weight.detach() - ctx.model.center)
    assert torch.allclose(taylor.gradient["weight"].double(), exact_gradient, rtol=1e-6, atol=1e-9)
    assert torch.allclose(taylor.hessian_diagonal["weight"].double(), 2 * ctx.model.curvature,
                          rtol=1e-6)
    measurer = measure.Measurer(ctx, taylor)
    first_order_errors = []
    for method in ("zero", "sign_flip", "gauss_noise"):
        for size in (1, 5, 30):
            selection = random_k(ctx.sizes, size, "global", seed=size)
            row = measurer.condition("random_set", 3, selection, method, on_evaluation=False)
            measured = row["measured_delta_nll"]
            assert row["second_order"] == pytest.approx(measured, rel=1e-6, abs=1e-9), (method, size)
            first_order_errors.append(abs(row["first_order"] - measured) / abs(measured))
    assert max(first_order_errors) > 0.01  # the curvature term matters here: the test can fail
    assert measurer.restored


def test_k_grid_is_decades_up_to_a_tenth_of_the_largest_k():
    assert faith.k_grid((), {"a": 600, "b": 400}, "global") == ([1, 10, 100], [])
    assert faith.k_grid((), {"a": 6000, "b": 4000}, "global") == ([1, 10, 100, 1000], [])
    assert faith.k_grid((), {"a": 6000, "b": 400}, "per_tensor") == ([1, 10, 40], [])
    assert faith.k_grid((5, 50, 5000), {"a": 600}, "global") == ([5, 50, 600], [5000])


def test_area_and_k_at_2x():
    assert statistics.area([1, 10, 100], [0.0, 1.0, 1.0]) == pytest.approx(1.5)  # nats·decade
    assert statistics.area([1, 10], [0.0, math.inf]) == math.inf
    assert statistics.k_at_2x([1, 10, 100], [0.1, math.log(2), 3.0]) == 10
    assert statistics.k_at_2x([1, 10], [0.1, 0.2]) is None


def test_metrics_closer_than_the_band_spread_share_a_rank():
    rows = [{"metric": m, "auc": a} for m, a in (("a", 1.0), ("b", 3.0), ("c", 2.95),
                                                 ("d", math.inf), ("e", math.inf))]
    statistics.rank_with_ties(rows, tolerance=0.1)
    ranks = {r["metric"]: (r["rank"], r["tied"]) for r in rows}
    assert ranks == {"d": (1, True), "e": (1, True), "b": (3, True), "c": (3, True),
                     "a": (5, False)}


def test_relative_error_bins_leave_out_unresolved_changes():
    bins = statistics.relative_error_by_bin([1, 1, 2, 3, 5], [1e-12, 0.1, 0.2, 0.2, 1.0],
                                            [0.5, 0.1, 0.3, 0.2, 3.0], resolution=1e-9, base=2)
    assert [(b["from"], b["to"], b["n"], b["n_unresolved"]) for b in bins] == \
        [(1, 2, 2, 1), (2, 4, 2, 0), (4, 8, 1, 0)]
    assert [b["median_relative_error"] for b in bins] == pytest.approx([0.0, 0.25, 2.0])
    by_norm = statistics.relative_error_by_bin([0.0, 0.05, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0],
                                               [1.0, 1.2, 2.0, 1.0], resolution=1e-9, base=10)
    assert [(b["from"], b["n"]) for b in by_norm] == [(0.01, 1), (0.1, 2)]  # 0: nothing changed
    assert [b["median_relative_error"] for b in by_norm] == pytest.approx([0.2, 0.5])


@pytest.mark.slow
def test_faithfulness_run_matches_the_normal_experiment_and_the_random_band(tmp_path):
    """A curve point equals the run's own top-K condition (same code, same weights); the
    random metric's curve lies within its random band (mean ± 3 sd over five seeds); the
    files and report table are written."""
    from src.cli import main
    from src.report.build import main as report_main

    out = tmp_path / "run"
    assert main(["--model", "random:tiny-llama", "--max-length", "32", "--max-samples", "4",
                 "--metric", "grad_x_weight", "--topk", "10", "--perturb", "zero",
                 "--seeds", "0,1,2,3,4", "--faithfulness", "grad_x_weight,grad_squared,fisher_w2,magnitude,random",
                 "--faithfulness-k", "1,10,300", "--faithfulness-sets", "6",
                 "--faithfulness-max-set", "40", "--hutchinson-samples", "2", "--quiet", "--save-plots",
                 "--out-dir", str(out)]) == 0
    section = json.loads((out / "faithfulness.json").read_text())
    assert section == json.loads((out / "enhanced_analysis.json").read_text())["faithfulness"]
    run_top = json.loads((out / "perturbation_results.json").read_text())["conditions"][0]
    point = next(p for p in section["curves"] if p["metric"] == "grad_x_weight" and p["k"] == 10)
    assert run_top["selection"] == "top_k"
    assert point["perplexity"] == pytest.approx(run_top["perplexity"], rel=1e-6)
    band = {b["k"]: b for b in section["band"]["by_k"]}
    for p in (p for p in section["curves"] if p["metric"] == "random"):
        b = band[p["k"]]
        assert abs(p["perplexity"] - b["mean_perplexity"]) <= 3 * b["sd_perplexity"] + 1e-6 * \
            b["mean_perplexity"], (p, b)
    assert {r["metric"] for r in section["summary"]} == {"grad_x_weight", "grad_squared",
                                                         "fisher_w2", "magnitude", "random"}
    sets = [p for p in section["predictions"] if p["set"].startswith("random_set_")]
    assert len(sets) == 3 * 6 and {p["method"] for p in sets} == set(measure.PREDICTION_METHODS)
    assert len(section["predictions"]) == len(sets) + 5 * 3 + 3 * 5
    assert {(a["predictor"], a["method"]) for a in section["agreement"]} == \
        {(p, m) for p in statistics.PREDICTORS for m in measure.PREDICTION_METHODS}
    assert section["restore_verified"]
    assert (out / "faithfulness.csv").read_text().startswith("kind,set,metric,k,seed")
    assert (out / "plots" / "faithfulness_curves.png").is_file()
    assert (out / "plots" / "faithfulness_predictions.png").is_file()
    shutil.copytree(out, tmp_path / "again")  # a second run: the cross-run report compares them
    assert report_main(["--input-dirs", str(out), str(tmp_path / "again"), "--output",
                        str(tmp_path / "report"), "--format", "md"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Faithfulness: metrics ranked by damage area" in report and "nats·decade" in report
    assert "Which metric finds the weights that matter (--faithfulness)" in report
    assert "Faithfulness across runs (rank 1 by damage area" in report


@pytest.mark.parametrize("args,message", [
    (["--faithfulness-k", "5"], "--faithfulness-k has no effect without --faithfulness"),
    (["--faithfulness", "magnitude,nope"], "unknown --faithfulness entry 'nope'"),
    (["--faithfulness", "magnitude", "--faithfulness-sets", "-1"], "--faithfulness-sets"),
])
def test_bad_faithfulness_flags_exit_2_with_one_line(capsys, tmp_path, args, message):
    from src.cli import main

    assert main(["--model", "random:tiny-llama", "--out-dir", str(tmp_path / "x"), *args]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "x").exists()
