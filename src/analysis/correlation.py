"""--compare-metrics m1,m2,...: do different sensitivity metrics agree on the same data?

Every metric scores the same calibration blocks (the run's --metric is reused, not rescored).
For every pair of metrics:

* ``spearman``: Spearman correlation of |score| over a fixed seeded uniform sample of weights
  (100k, or all weights when fewer) plus the union of every metric's top-K (the run's K and
  mode); ``spearman_sample_only`` over the sample alone (the unbiased "whole model" view);
* ``jaccard``: |A ∩ B| / |A ∪ B| of the two top-K sets;
* ``layer_spearman`` / ``layer_pearson``: correlation across blocks of the per-block mean |score|.

Memory: the other metrics' score tensors are kept (on the host) until the pairs are compared,
because a pair needs each metric's values at the other metric's top-K positions.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from tqdm.auto import tqdm

from src.analysis.context import (AnalysisContext, finite_or_none, mean_abs_by_layer,
                                  sample_positions)
from src.sensitivity.metrics import compute_scores
from src.sensitivity.rank import Selection, top_k
from src.sensitivity.stability import gather, jaccard, union_positions


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rho (average ranks for ties); None when undefined (constant input, n < 2)."""
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return finite_or_none(spearmanr(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return finite_or_none(pearsonr(x, y).statistic)


def compare_score_sets(score_sets: dict[str, dict], selections: dict[str, Selection],
                       sample: Selection, metas) -> dict:
    """Pairwise agreement of named score sets (see module docstring)."""
    positions = union_positions([sample, *selections.values()])
    on_union = {m: gather(s, positions) for m, s in score_sets.items()}
    on_sample = {m: gather(s, sample) for m, s in score_sets.items()}
    layers = {m: mean_abs_by_layer(s, metas) for m, s in score_sets.items()}
    pairs = []
    for a, b in itertools.combinations(score_sets, 2):
        keys = [k for k in layers[a] if k != "none"]
        la = np.array([layers[a][k] for k in keys])
        lb = np.array([layers[b][k] for k in keys])
        pairs.append({"a": a, "b": b,
                      "spearman": spearman(on_union[a], on_union[b]),
                      "spearman_sample_only": spearman(on_sample[a], on_sample[b]),
                      "jaccard": jaccard(selections[a], selections[b]),
                      "layer_spearman": spearman(la, lb) if len(keys) >= 3 else None,
                      "layer_pearson": pearson(la, lb) if len(keys) >= 3 else None})
    return {"n_positions": int(len(next(iter(on_union.values())))),
            "n_sample": int(len(next(iter(on_sample.values())))),
            "pairs": pairs, "layer_mean_abs_score": layers}


def run(ctx: AnalysisContext) -> dict:
    c = ctx.config
    score_sets, selections = {}, {}
    for metric in tqdm(c.compare_metrics, desc="compare metrics", disable=not c.verbose, leave=False):
        if metric == c.metric:
            score_sets[metric], selections[metric] = ctx.scores, ctx.selection
            continue
        print(f"[cwa] compare-metrics: scoring with {metric}")
        scores = compute_scores(ctx.job, metric).scores
        score_sets[metric] = {name: s.cpu() for name, s in scores.items()}
        selections[metric] = top_k(score_sets[metric], c.topk, c.mode)
        del scores
    sample = sample_positions(ctx.sizes, seed=c.seeds[0])
    result = compare_score_sets(score_sets, selections, sample, ctx.metas)
    return {"metrics": list(c.compare_metrics), "k": c.topk, "mode": c.mode,
            "spearman_on": "seeded uniform sample of weights + union of every metric's top-K, "
                           "|score|", **result}


def summary_lines(section: dict) -> list[str]:
    lines = [f"metric correlation (K={section['k']}, {section['mode']}; Spearman over "
             f"{section['n_positions']} weights):"]
    for p in section["pairs"]:
        lines.append(f"  {p['a']} vs {p['b']}: Spearman {_f(p['spearman'])} (sample only "
                     f"{_f(p['spearman_sample_only'])}), top-K Jaccard {_f(p['jaccard'])}, "
                     f"per-layer Spearman {_f(p['layer_spearman'])}")
    return lines


def _f(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
