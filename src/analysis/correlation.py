"""--compare-metrics m1,m2,...: do different sensitivity metrics agree on the same data?

Every metric scores the same calibration blocks (the run's --metric is reused, not rescored).
For every pair of metrics:

* ``spearman``: Spearman correlation of |score| over a fixed seeded uniform sample of weights
  (100k, or all weights when fewer) plus the union of every metric's top-K (the run's K and
  mode); ``spearman_sample_only`` over the sample alone (the unbiased "whole model" view);
* ``jaccard``: |A ∩ B| / |A ∪ B| of the two top-K sets;
* ``layer_spearman`` / ``layer_pearson``: correlation across blocks of the per-block mean |score|.

Scoring: ``compute_many`` one scoring pass at a time: the metrics that share a pass (a base and
the metrics derived from it, e.g. hutchinson_diag and obd) come from one pass, and the pass
that gave the run's own scores is not run again.

Memory: the other metrics' score tensors are kept (on the host) until the pairs are compared,
because a pair needs each metric's values at the other metric's top-K positions; on the device
are the outputs of one scoring pass at a time.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr
from tqdm.auto import tqdm

from src.analysis.context import (AnalysisContext, finite_or_none, mean_abs_by_layer,
                                  sample_positions)
from src.analysis.registry import Analysis, register
from src.options import Settings, name_list, option
from src.sensitivity.metrics import METRICS, compute_many, root_metric
from src.sensitivity.rank import Selection, top_k
from src.sensitivity.stability import gather, jaccard, spearman, union_positions
from src.utils.format import fixed


@dataclass(frozen=True)
class CorrelationSettings(Settings):
    compare_metrics: tuple[str, ...] = option(
        (), "comma-separated metrics to score the same calibration data with, e.g. "
        "grad_x_weight,magnitude,act_mag: Spearman, top-K Jaccard and per-layer correlation for "
        "every pair", group="advanced analysis", parse=name_list(lambda: METRICS))

    def problems(self, config):
        if len(self.compare_metrics) == 1:
            yield "--compare-metrics needs at least two different metrics, e.g. " \
                  "grad_x_weight,magnitude"
        if config.shard:
            for metric in self.compare_metrics:
                if not METRICS[metric].shardable:
                    yield f"--compare-metrics: {metric} does not run under --shard"


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return finite_or_none(pearsonr(x, y).statistic)


def compare_score_sets(score_sets: dict[str, dict], selections: dict[str, Selection],
                       sample: Selection, metas, layout=None) -> dict:
    """Pairwise agreement of named score sets (see module docstring); ``layout``
    (sharding.Layout) when the score sets are this rank's rows."""
    positions = union_positions([sample, *selections.values()])
    on_union = {m: gather(s, positions, layout) for m, s in score_sets.items()}
    on_sample = {m: gather(s, sample, layout) for m, s in score_sets.items()}
    layers = {m: mean_abs_by_layer(s, metas, layout) for m, s in score_sets.items()}
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
    metrics = ctx.settings.compare_metrics
    score_sets, selections = score_sets_of(ctx, metrics)
    sample = sample_positions(ctx.sizes, seed=ctx.seeds[0])
    result = compare_score_sets(score_sets, selections, sample, ctx.metas, ctx.layout)
    return {"metrics": list(metrics), "k": ctx.k, "mode": ctx.mode,
            "spearman_on": "seeded uniform sample of weights + union of every metric's top-K, "
                           "|score|", **result}


def score_sets_of(ctx: AnalysisContext, metrics) -> tuple[dict, dict]:
    """(metric -> scores, metric -> top-K selection) of ``metrics``, in their order: the run's
    own metric as the run scored it, the others on the host, one scoring pass at a time."""
    score_sets, selections = {}, {}
    for shared in tqdm(by_scoring_pass(metrics), desc="compare metrics",
                       disable=not ctx.progress, leave=False):
        new = [metric for metric in shared if metric != ctx.metric]
        if new:
            print(f"[cwa] compare-metrics: scoring with {', '.join(new)}")
        outputs = compute_many(ctx.job, new, known={ctx.metric: ctx.scored})
        for metric in new:
            score_sets[metric] = {name: s.cpu() for name, s in outputs[metric].scores.items()}
            selections[metric] = top_k(score_sets[metric], ctx.k, ctx.mode, layout=ctx.layout)
        del outputs
    if ctx.metric in metrics:
        score_sets[ctx.metric], selections[ctx.metric] = ctx.scores, ctx.selection
    return {m: score_sets[m] for m in metrics}, selections


def by_scoring_pass(metrics) -> list[list[str]]:
    """``metrics`` grouped by the scoring pass that computes them (``root_metric``), in order
    of first appearance."""
    groups: dict[str, list[str]] = {}
    for metric in metrics:
        groups.setdefault(root_metric(metric), []).append(metric)
    return list(groups.values())


def summary_lines(section: dict) -> list[str]:
    lines = [f"metric correlation (K={section['k']}, {section['mode']}; Spearman over "
             f"{section['n_positions']} weights):"]
    for p in section["pairs"]:
        lines.append(f"  {p['a']} vs {p['b']}: Spearman {fixed(p['spearman'])} (sample only "
                     f"{fixed(p['spearman_sample_only'])}), top-K Jaccard {fixed(p['jaccard'])}, "
                     f"per-layer Spearman {fixed(p['layer_spearman'])}")
    return lines


def findings(section: dict) -> list[str]:
    pairs = [p for p in section.get("pairs", []) if p.get("spearman") is not None]
    if not pairs:
        return []
    high = max(pairs, key=lambda p: p["spearman"])
    low = min(pairs, key=lambda p: p["spearman"])
    return [f"Metric agreement: {high['a']} and {high['b']} agree most (Spearman "
            f"{high['spearman']:.2f}, top-{section.get('k')} Jaccard {high['jaccard']:.3f}); "
            f"{low['a']} and {low['b']} least (Spearman {low['spearman']:.2f}, Jaccard "
            f"{low['jaccard']:.3f})."]


def plot_correlation(section: dict):
    from src.plots.style import pair_heatmap, plt

    metrics = list(section["metrics"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, (key, label) in zip(axes, (("spearman", "Spearman ρ of scores"),
                                       ("jaccard", f"Jaccard of top-{section.get('k')} sets"))):
        pair_heatmap(ax, metrics, section["pairs"], lambda p: p.get(key), label,
                     signed=key == "spearman")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("metric")
        ax.set_ylabel("metric")
    figure.suptitle(f"Agreement between metrics on the same calibration data "
                    f"({section.get('mode')} top-{section.get('k')})")
    figure.tight_layout()
    return figure


register(Analysis(
    key="metric_correlation", flag="--compare-metrics",
    run=run, summary=summary_lines, findings=findings,
    settings=(CorrelationSettings,), enabled=lambda s: bool(s.compare_metrics),
    plots={"metric_correlation": plot_correlation}))
