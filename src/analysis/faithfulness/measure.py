"""Measuring a perturbed set for --faithfulness: the condition through the perturbation
experiment's own code (restore verified), the calibration NLL under it, the change δ of every
selected weight, and the Taylor predictions ḡ·δ and ḡ·δ + ½ Σ h δ²; the curves, the random band
and the random prediction sets built from it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from src.analysis.context import AnalysisContext
from src.eval.perplexity import EvalResult, evaluate
from src.sensitivity import experiment, first_order
from src.sensitivity.metrics import compute_many, root_metric
from src.sensitivity.perturb import perturbation_is_stochastic, snapshot_selected
from src.sensitivity.rank import Selection, random_k, selection_size, top_k
from src.sensitivity.scoring import MetricOutput
from src.sensitivity.weight_metrics import mean_gradient
from src.utils import progress
from src.utils.format import sig

PREDICTION_METHODS = ("zero", "sign_flip", "gauss_noise")
HUTCHINSON = "hutchinson_diag"


@dataclass
class Taylor:
    """ḡ and h of the calibration loss (float32, host), and the calibration baseline."""
    gradient: dict[str, torch.Tensor]
    hessian_diagonal: dict[str, torch.Tensor]
    baseline: EvalResult
    hessian_facts: dict  # probes and precision of h (a noisy h blurs the second-order term)

    def predict(self, selection: Selection, delta: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(ḡ·δ, ḡ·δ + ½ Σ h δ²) in float64 over the selected weights."""
        first, curvature = 0.0, 0.0
        for name, idx in selection.items():
            change = delta[name]
            first += float((self.gradient[name].view(-1)[idx].double() * change).sum())
            curvature += float((self.hessian_diagonal[name].view(-1)[idx].double()
                                * change * change).sum())
        return first, first + 0.5 * curvature


def calibration_result(ctx: AnalysisContext) -> EvalResult:
    """The model as it is now, evaluated on the calibration blocks (the scored loss)."""
    return evaluate(ctx.model, ctx.job.blocks, ctx.batch_size, ranks=ctx.job.ranks)


class Measurer:
    """Runs one condition at a time through the perturbation experiment's own code (restore
    verified) and, under the same perturbation, measures the calibration NLL and the change δ
    of every selected weight."""

    def __init__(self, ctx: AnalysisContext, taylor: Taylor):
        self.ctx, self.taylor = ctx, taylor
        self.restored = True

    def calibration(self) -> EvalResult:
        return calibration_result(self.ctx)

    def condition(self, name: str, seed: int | None, selection: Selection, method: str, *,
                  on_evaluation: bool) -> dict:
        """The experiment row (perplexity on the evaluation blocks when ``on_evaluation``, else
        on the calibration blocks) with the measured and predicted calibration Δnll."""
        ctx, taylor = self.ctx, self.taylor
        before = snapshot_selected(ctx.params, selection)
        seen = {}

        def under_perturbation(condition):
            after = snapshot_selected(ctx.params, selection)
            seen["delta"] = {n: (after[n].double() - before[n].double()).cpu() for n in selection}
            seen["calibration"] = self.calibration() if on_evaluation else None

        evaluate_side = ctx.evaluate if on_evaluation else self.calibration
        baseline = ctx.baseline if on_evaluation else taylor.baseline
        rows, restored = experiment.run_conditions(
            ctx.params, [experiment.Condition(name, seed, selection)], method, ctx.options,
            evaluate_side, baseline, on_condition=under_perturbation)
        self.restored &= restored
        row = rows[0]
        calibration_nll = seen["calibration"].nll if on_evaluation else row["nll"]
        first, second = taylor.predict({n: i.cpu() for n, i in selection.items()}, seen["delta"])
        delta_l2 = math.sqrt(sum(float(d.square().sum()) for d in seen["delta"].values()))
        return {**row, "size": selection_size(selection), "delta_l2": delta_l2,
                "delta_nll": row["nll"] - baseline.nll,
                "measured_delta_nll": calibration_nll - taylor.baseline.nll,
                "first_order": first, "second_order": second}


# ----------------------------------------------------------------------------- the three parts

def metric_groups(metrics: tuple[str, ...]) -> list[list[str]]:
    """The metrics grouped by the base pass they share (Hutchinson's group first: its diagonal
    is the second-order predictions' h), each group in the order given."""
    groups: dict[str, list[str]] = {}
    for metric in metrics:
        groups.setdefault(root_metric(metric), []).append(metric)
    return sorted(groups.values(), key=lambda g: root_metric(g[0]) != HUTCHINSON)


def taylor_terms(ctx: AnalysisContext, known: dict[str, MetricOutput]) -> Taylor:
    """ḡ (``mean_gradient_of``) and h (the Hutchinson diagonal: the run's or a listed metric's
    when one of them computes it, else one Hutchinson pass with the run's settings), on the
    host."""
    gradient = {n: g.cpu() for n, g in mean_gradient_of(ctx, known).items()}
    hutchinson = known.get(HUTCHINSON) or compute_many(ctx.job, [HUTCHINSON], known)[HUTCHINSON]
    if any(root_metric(m) == HUTCHINSON for m in ctx.settings.faithfulness):
        known[HUTCHINSON] = hutchinson  # a listed metric scores with it: no second pass
    diagonal = {n: h.detach().float().cpu() for n, h in hutchinson.scores.items()}
    return Taylor(gradient, diagonal, calibration_result(ctx), dict(hutchinson.facts))


def mean_gradient_of(ctx: AnalysisContext, known: dict[str, MetricOutput]) -> dict:
    """ḡ from the shared first-order pass when grad_squared is listed (the listed first-order
    metrics' outputs it computes on the way go to ``known``), else from one gradient pass."""
    listed = {root_metric(m) for m in ctx.settings.faithfulness} - set(known)
    wanted = tuple(m for m in first_order.MEMBERS if m in listed)
    joint = first_order.first_order_pass(ctx.job, wanted, keep_mean_gradient=True) \
        if "grad_squared" in wanted else None
    if joint is None:
        return mean_gradient(ctx.job)
    outputs, gradient = joint
    known.update(outputs)
    return gradient


def curves(ctx: AnalysisContext, measurer: Measurer, ks: list[int], method: str,
           known: dict[str, MetricOutput]) -> list[dict]:
    seeds = list(ctx.seeds) if perturbation_is_stochastic(method, ctx.options) else [None]
    points = []
    for group in metric_groups(ctx.settings.faithfulness):
        outputs = compute_many(ctx.job, group, known)
        for metric in group:
            scores = outputs[metric].scores
            bar = tqdm(ks, desc=f"faithfulness {metric}", disable=not ctx.progress, leave=False)
            for k in bar:
                bar.set_postfix_str(f"K={k}")
                selection = top_k(scores, k, ctx.mode)
                for seed in seeds:
                    row = measurer.condition("top_k", seed, selection, method, on_evaluation=True)
                    points.append({"metric": metric, "k": k, **row})
                _say(ctx, f"faithfulness: {metric} top-{k} {method}: perplexity "
                          f"{sig(points[-1]['perplexity'])}")
        del outputs
        shared = root_metric(group[0])
        if shared != ctx.metric:
            known.pop(shared, None)  # its metrics are done: free its scores
    return points


def random_band(ctx: AnalysisContext, measurer: Measurer, ks: list[int], method: str) -> list[dict]:
    band = []
    bar = tqdm(ks, desc="faithfulness random-K band", disable=not ctx.progress, leave=False)
    for k in bar:
        bar.set_postfix_str(f"K={k}")
        for seed in ctx.seeds:
            selection = random_k(ctx.sizes, k, ctx.mode, seed=seed)
            row = measurer.condition("random_k", seed, selection, method, on_evaluation=True)
            band.append({"k": k, **row})
        _say(ctx, f"faithfulness: random-{k} {method} over {len(ctx.seeds)} seeds")
    return band


def random_sets(ctx: AnalysisContext, measurer: Measurer) -> list[dict]:
    """``faithfulness_sets`` sets per prediction method: sizes log-uniform in [1, max_set],
    positions uniform over the eligible weights, each set its own seed."""
    n_sets, largest = ctx.settings.faithfulness_sets, ctx.settings.faithfulness_max_set
    largest = min(largest, sum(ctx.sizes.values()))
    rng = np.random.default_rng(ctx.seeds[0])
    rows = []
    for method in PREDICTION_METHODS:
        sizes = np.unique(np.rint(np.exp(rng.uniform(0, math.log(largest), n_sets))).astype(int),
                          return_counts=True)
        seeds = rng.integers(0, 2 ** 31, n_sets)
        flat_sizes = np.repeat(*sizes)
        bar = tqdm(range(n_sets), desc=f"faithfulness predictions {method}",
                   disable=not ctx.progress, leave=False)
        for index in bar:
            size, seed = int(flat_sizes[index]), int(seeds[index])
            selection = random_k(ctx.sizes, size, "global", seed=seed)
            row = measurer.condition("random_set", seed, selection, method, on_evaluation=False)
            rows.append({"set": f"random_set_{method}_{index}", **row})
        _say(ctx, f"faithfulness: {n_sets} random sets {method} measured on the calibration blocks")
    return rows


def _say(ctx: AnalysisContext, text: str) -> None:
    if ctx.job.progress == "lines":
        progress.line(text)
