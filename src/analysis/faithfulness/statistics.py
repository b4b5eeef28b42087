"""The statistics of --faithfulness: areas under the damage curves, K at which perplexity
doubles, ranking with ties, and the agreement of the Taylor predictions with measurement."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr

from src.analysis.context import finite_or_none
from src.eval.perplexity import EvalResult
from src.sensitivity import experiment

PREDICTORS = ("first_order", "second_order")
BREAK_REL_ERROR = 0.5  # a prediction "breaks" where its median relative error exceeds this
RESOLUTION_REL = 1e-6  # measured NLL changes below this share of the baseline NLL: unresolved


def area(ks: list[int], delta_nll: list[float]) -> float:
    """Trapezoid area under Δnll over log10 K (a single K: its Δnll, the area of one decade)."""
    y = np.asarray(delta_nll, dtype=float)
    if len(ks) == 1:
        return float(y[0])
    if np.any(np.isnan(y)):
        return math.nan
    with np.errstate(invalid="ignore"):
        return float(np.trapezoid(y, np.log10(np.asarray(ks, dtype=float))))


def k_at_2x(ks: list[int], delta_nll: list[float]) -> int | None:
    return next((k for k, d in zip(ks, delta_nll) if d >= math.log(2)), None)


def band_by_k(band: list[dict], baseline: EvalResult) -> dict[int, dict]:
    """Per K: mean, sd, min and max perplexity over the seeds, and the mean's Δnll."""
    out = {}
    for k in sorted({row["k"] for row in band}):
        ppl = [row["perplexity"] for row in band if row["k"] == k]
        mean, sd = experiment.mean_sd(ppl)
        out[k] = {"k": k, "mean_perplexity": mean, "sd_perplexity": sd,
                  "min_perplexity": min(ppl), "max_perplexity": max(ppl),
                  "delta_nll": _delta_nll(mean, baseline)}
    return out


def _delta_nll(perplexity: float, baseline: EvalResult) -> float:
    """log(ppl / baseline) (nats): the perplexity's own Δnll, inf when it overflowed."""
    return math.log(perplexity) - baseline.nll if perplexity > 0 else -math.inf


def mean_curve(points: list[dict], metric: str, ks: list[int]) -> list[float]:
    """Per K, the mean perplexity of the metric's points (one point per seed when stochastic)."""
    return [experiment.mean_sd([p["perplexity"] for p in points
                                if p["metric"] == metric and p["k"] == k])[0] for k in ks]


def summarize(points: list[dict], band: list[dict], ks: list[int], metrics: tuple[str, ...],
              baseline: EvalResult) -> tuple[list[dict], dict]:
    """(summary rows ranked by auc with ties shared, the band's own figures)."""
    by_k = band_by_k(band, baseline)
    band_delta = [by_k[k]["delta_nll"] for k in ks]
    seed_areas = [area(ks, [_delta_nll(r["perplexity"], baseline) for r in band
                            if r["seed"] == seed and r["k"] in ks])
                  for seed in sorted({r["seed"] for r in band})]
    _, tolerance = experiment.mean_sd(seed_areas)
    tolerance = tolerance if math.isfinite(tolerance) else 0.0
    rows = []
    for metric in metrics:
        ppl = mean_curve(points, metric, ks)
        delta = [_delta_nll(p, baseline) for p in ppl]
        rows.append({"metric": metric, "auc": area(ks, delta), "k_at_2x": k_at_2x(ks, delta),
                     "random_k_at_2x": k_at_2x(ks, band_delta),
                     "ratio_to_random": [ratio(p, by_k[k]["mean_perplexity"])
                                         for p, k in zip(ppl, ks)]})
    rank_with_ties(rows, tolerance)
    return rows, {"auc": area(ks, band_delta), "auc_per_seed": seed_areas,
                  "tie_tolerance": tolerance, "by_k": [by_k[k] for k in ks]}


def ratio(value: float, reference: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(value) / np.float64(reference))


def rank_with_ties(rows: list[dict], tolerance: float) -> None:
    """Sort ``rows`` by auc, largest first (NaN last), and give each a ``rank``: a row within
    ``tolerance`` of the first row of its tie group shares that row's rank."""
    rows.sort(key=lambda r: (math.isnan(r["auc"]), -r["auc"] if not math.isnan(r["auc"]) else 0))
    leader = None
    for position, row in enumerate(rows, start=1):
        tied = leader is not None and (row["auc"] == leader["auc"] or
                                       abs(leader["auc"] - row["auc"]) <= tolerance)
        if not tied:
            leader = row
            leader["rank"] = position
        row["rank"] = leader["rank"]
        row["tied"] = False
    for row in rows:
        row["tied"] = sum(r["rank"] == row["rank"] for r in rows) > 1


def agreement(predictions: list[dict], resolution: float) -> list[dict]:
    """Per predictor and method: Spearman, Pearson, n, and the relative error by set size and
    by ‖δ‖₂ (the size of the change: where a Taylor expansion holds depends on it)."""
    frame = pd.DataFrame(predictions)
    out = []
    for method in sorted(frame["method"].unique()):
        part = frame[frame["method"] == method]
        for predictor in PREDICTORS:
            finite = part[np.isfinite(part[predictor]) & np.isfinite(part["measured_delta_nll"])]
            measured, predicted = finite["measured_delta_nll"], finite[predictor]
            by_size = relative_error_by_bin(finite["size"], measured, predicted, resolution, 2)
            by_delta = relative_error_by_bin(finite["delta_l2"], measured, predicted,
                                             resolution, 10)
            broken = _first_broken(by_size)
            out.append({"predictor": predictor, "method": method,
                        "spearman": _correlation(spearmanr, predicted, measured),
                        "pearson": _correlation(pearsonr, predicted, measured),
                        "n": int(len(finite)),
                        "n_unresolved": sum(b["n_unresolved"] for b in by_size),
                        "breaks_at_size": None if broken is None else int(broken),
                        "breaks_at_delta_l2": _first_broken(by_delta),
                        "by_size": by_size, "by_delta_l2": by_delta})
    return out


def _first_broken(bins: list[dict]) -> float | None:
    """The lower edge of the first bin whose median relative error exceeds 50%."""
    return next((b["from"] for b in bins if b["median_relative_error"] is not None
                 and b["median_relative_error"] > BREAK_REL_ERROR), None)


def _correlation(test, x, y) -> float | None:
    if len(x) < 3 or np.all(x == x.iloc[0]) or np.all(y == y.iloc[0]):
        return None
    return finite_or_none(test(x, y).statistic)


def relative_error_by_bin(values, measured, predicted, resolution: float,
                          base: int) -> list[dict]:
    """Median |predicted − measured| / |measured| per bin [base^j, base^(j+1)) of ``values``
    (set sizes: base 2; ‖δ‖₂: base 10), over the sets whose measured change exceeds
    ``resolution``; values ≤ 0 (nothing changed) are in no bin."""
    values, measured, predicted = (np.asarray(v, dtype=float)
                                   for v in (values, measured, predicted))
    positive = values > 0
    if not positive.any():
        return []
    exponent = np.full(values.shape, np.nan)
    exponent[positive] = np.floor(np.log(values[positive]) / np.log(base) + 1e-9)
    bins = []
    for j in range(int(np.nanmin(exponent)), int(np.nanmax(exponent)) + 1):
        inside = exponent == j
        resolved = inside & (np.abs(measured) > resolution)
        errors = np.abs(predicted[resolved] - measured[resolved]) / np.abs(measured[resolved])
        if inside.any():
            bins.append({"from": float(base) ** j, "to": float(base) ** (j + 1),
                         "n": int(inside.sum()), "n_unresolved": int((inside & ~resolved).sum()),
                         "median_relative_error": float(np.median(errors)) if errors.size
                         else None})
    return bins
