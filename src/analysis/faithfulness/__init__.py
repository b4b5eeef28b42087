"""--faithfulness m1,m2,...: which metric's top-K does the most damage, and does the Taylor
expansion behind the metrics predict the damage measured?

Every listed metric scores the same calibration blocks once (the run's own --metric is reused;
metrics derived from one base, e.g. hutchinson_diag and obd, share its pass). Then:

* **Damage curves.** For each metric and each K of ``--faithfulness-k`` (default: decades from 1
  up to 10% of the largest K the run's --mode allows, and that 10% itself) the metric's top-K is
  perturbed with the run's method (--perturb, else zero) and the evaluation blocks measured,
  exactly as a perturbation condition of a normal run (same code, restore verified). The random
  band: a random-K of every seed at every K (one band for all metrics). A stochastic method
  draws per seed for the top-K too.
* **Summary per metric.** ``auc``: area under Δnll = log(ppl / baseline) (nats) over log10 K
  (trapezoids over the grid; inf when a point overflowed); ``k_at_2x``: the smallest K of the
  grid at which perplexity at least doubles (Δnll ≥ ln 2), ``random_k_at_2x`` the same for the
  band's mean perplexity; ``ratio_to_random``: perplexity / the band's mean perplexity at each
  K. Metrics are ranked by auc; metrics closer than ``tie_tolerance`` (the sd over seeds of the
  random band's own auc: what chance alone spreads) share a rank.
* **Predicted against measured.** With ḡ (mean gradient of the calibration loss) and h (the
  Hutchinson diagonal of the same loss) computed once, every perturbed set (the curves' sets,
  the band's, and ``--faithfulness-sets`` random sets of log-uniform sizes 1 to
  ``--faithfulness-max-set`` for each of zero, sign_flip and gauss_noise) gets the first-order
  prediction ḡ·δ and the diagonal second-order prediction ḡ·δ + ½ Σ h_i δ_i² of the change in
  calibration NLL, δ the actual change of each weight (read under the perturbation), against the
  change measured on the calibration blocks. ``agreement``: Spearman and Pearson per predictor
  and method, median relative error per set-size bin (powers of two), and ``breaks_at_size``:
  the lower edge of the first bin whose median relative error exceeds 50%: where the metrics'
  own assumption stops holding. Changes below what the float32 evaluation resolves
  (``RESOLUTION_REL`` of the baseline NLL) are left out of the relative errors.

Everything also goes to ``faithfulness.json`` and a tidy ``faithfulness.csv`` (one row per
measured set). Memory: one metric's scores at a time (on their device), ḡ and h on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from src.analysis.context import AnalysisContext
from src.analysis.faithfulness import present
from src.analysis.faithfulness.measure import (Measurer, curves, random_band, random_sets,
                                               taylor_terms)
from src.analysis.faithfulness.statistics import RESOLUTION_REL, agreement, summarize
from src.analysis.registry import Analysis, register
from src.options import Settings, int_list, integer, name_list, option
from src.sensitivity.metrics import METRICS
from src.sensitivity.rank import max_k

GROUP = "advanced analysis"


@dataclass(frozen=True)
class FaithfulnessSettings(Settings):
    faithfulness: tuple[str, ...] = option(
        (), "comma-separated metrics whose top-K damage to compare, e.g. "
        "grad_x_weight,grad_squared,obd,random: damage curves over K against the random-K band, "
        "their areas, and Taylor predictions of damage against measurements "
        "(faithfulness.json)", group=GROUP, parse=name_list(lambda: METRICS))
    faithfulness_k: tuple[int, ...] = option(
        (), "--faithfulness: comma-separated K values of the damage curves (default: 1, 10, "
        "100, ... up to 10%% of the largest K of --mode, and that 10%%)", group=GROUP,
        parse=int_list(1), show_default=False,
        used_when=("--faithfulness", lambda c: bool(c.value("faithfulness"))))
    faithfulness_sets: int = option(
        200, "--faithfulness: random weight sets per method (zero, sign_flip, gauss_noise) "
        "whose damage the Taylor expansions predict", group=GROUP, parse=integer(0),
        used_when=("--faithfulness", lambda c: bool(c.value("faithfulness"))))
    faithfulness_max_set: int = option(
        1000, "--faithfulness: the random sets' sizes are log-uniform from 1 to this",
        group=GROUP, parse=integer(1),
        used_when=("--faithfulness", lambda c: bool(c.value("faithfulness"))))

    def problems(self, config):
        if self.faithfulness and config.shard:
            yield "--faithfulness does not run under --shard yet (it reads the gradient and " \
                  "Hessian diagonal at every perturbed weight); run it without --shard"


# ----------------------------------------------------------------------------- K grid

def k_grid(requested: tuple[int, ...], sizes: dict[str, int], mode: str) -> tuple[list[int],
                                                                                 list[int]]:
    """(the curves' K values, the requested ones above the mode's largest K). Default: decades
    below 10% of the largest K, then that 10%."""
    limit = max_k(sizes, mode)
    if requested:
        return sorted({min(k, limit) for k in requested}), sorted(k for k in requested if k > limit)
    top = max(1, limit // 10)
    decades = [10 ** e for e in range(int(math.log10(top)) + 1) if 10 ** e < top]
    return decades + [top], []


# ----------------------------------------------------------------------------- run

def run(ctx: AnalysisContext) -> dict:
    method = ctx.method
    ks, capped = k_grid(ctx.settings.faithfulness_k, ctx.sizes, ctx.mode)
    known = {ctx.metric: ctx.scored}
    taylor = taylor_terms(ctx, known)
    measurer = Measurer(ctx, taylor)
    points = curves(ctx, measurer, ks, method, known)
    band = random_band(ctx, measurer, ks, method)
    sets = random_sets(ctx, measurer)
    summary, band_summary = summarize(points, band, ks, ctx.settings.faithfulness, ctx.baseline)
    predictions = prediction_rows(points, band, sets)
    resolution = RESOLUTION_REL * abs(taylor.baseline.nll)
    return {"metrics": list(ctx.settings.faithfulness), "method": method,
            "options": ctx.options.recorded(), "mode": ctx.mode, "k": ks, "k_capped": capped,
            "seeds": list(ctx.seeds), "baseline": ctx.baseline.summary(),
            "calibration_baseline": taylor.baseline.summary(),
            "hessian_diagonal": taylor.hessian_facts,
            "curves": [curve_row(p) for p in points],
            "random_band": [{"k": r["k"], "seed": r["seed"], "perplexity": r["perplexity"],
                             "delta_nll": r["delta_nll"]} for r in band],
            "band": band_summary, "summary": summary,
            "predictions": predictions, "agreement": agreement(predictions, resolution),
            "resolution_delta_nll": resolution,
            "restore_verified": measurer.restored}


def curve_row(point: dict) -> dict:
    return {"metric": point["metric"], "k": point["k"], "seed": point["seed"],
            "n_weights": point["n_weights"], "n_changed": point["n_changed"],
            "perplexity": point["perplexity"], "delta_nll": point["delta_nll"]}


def prediction_rows(points: list[dict], band: list[dict], sets: list[dict]) -> list[dict]:
    named = [(f"top_k_{p['metric']}_k{p['k']}" + ("" if p["seed"] is None else f"_s{p['seed']}"), p)
             for p in points]
    named += [(f"random_k_k{r['k']}_s{r['seed']}", r) for r in band]
    named += [(r["set"], r) for r in sets]
    return [{"set": name, "size": row["size"], "delta_l2": row["delta_l2"],
             "method": row["method"],
             "measured_delta_nll": row["measured_delta_nll"],
             "first_order": row["first_order"], "second_order": row["second_order"]}
            for name, row in named]


register(Analysis(
    key="faithfulness", flag="--faithfulness",
    run=run, summary=present.summary_lines, findings=present.findings,
    settings=(FaithfulnessSettings,), enabled=lambda s: bool(s.faithfulness),
    plots={"faithfulness_curves": present.plot_curves,
           "faithfulness_predictions": present.plot_predictions},
    files=present.write_files,
    tables={"Faithfulness: metrics ranked by damage area": present.summary_table}))
