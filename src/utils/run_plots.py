"""The core plots of a run (``--save-plots``): score distribution, layer x component heatmap,
where the top-K sit, perturbation effects, stability and downstream accuracy. Each analysis
brings its own plots (src/analysis/registry.py).

Score distributions are exact octave histograms of |score| computed on the score tensors (on
their device), never from Python lists of weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.colors import LogNorm

from src.report.run_folder import InputAbsent, RunFolder
from src.utils.format import count, is_finite_number, sig
from src.utils.visualize import (PALETTE, SELECTION_COLOURS, SELECTION_ORDER, SkipPlot, colours,
                                 draw_heatmap, grid, metric_label, ordered_components,
                                 pair_heatmap, plt)

CORE_PLOTS: dict = {}


def core_plot(name: str):
    def add(function):
        CORE_PLOTS[name] = function
        return function
    return add


# ----------------------------------------------------------------------------- score summaries

FP32_EXPONENT_BIAS = 127


@dataclass
class LogHistograms:
    """Octave histograms of |score|: bin i holds 2**log2_low[i] <= |score| < 2**(log2_low[i]+1)."""
    log2_edges: np.ndarray                 # [bins + 1] base-2 logarithms of the bin edges
    counts: dict[str, np.ndarray]          # component -> [bins] weights per bin
    zeros: dict[str, int]                  # component -> weights with |score| < 2**-126 (0 too)
    nonfinite: dict[str, int]              # component -> inf / NaN scores
    numel: dict[str, int]                  # component -> scored weights

    @property
    def edges(self) -> np.ndarray:
        return 2.0 ** self.log2_edges


def log_histograms(scores: dict, metas: dict) -> LogHistograms:
    """Exact log-scaled histograms of |score| per component, one octave per bin.

    The octave of an fp32 value is its 8-bit exponent field, so the histogram is a
    ``torch.bincount`` of ``(bits >> 23) & 0xFF`` over the score tensor's integer view: one pass,
    on the tensor's device, no data-dependent range. Exponent 0 holds zeros (and subnormals,
    below 1.2e-38), exponent 255 infinities and NaN; both are reported separately.
    """
    per_component: dict[str, torch.Tensor] = {}
    numel: dict[str, int] = {}
    for name, score in scores.items():
        component = metas[name].component
        exponent = score.detach().float().contiguous().view(torch.int32) >> 23
        exponent.bitwise_and_(0xFF)  # drop the sign bit: octave of |score|
        counts = torch.bincount(exponent.reshape(-1), minlength=256).cpu()  # devices may differ
        per_component[component] = per_component.get(component, 0) + counts
        numel[component] = numel.get(component, 0) + score.numel()
    components = list(per_component)
    table = torch.stack([per_component[c] for c in components]).numpy()  # [C, 256]
    used = np.nonzero(table[:, 1:255].sum(axis=0))[0] + 1
    if used.size == 0:
        raise SkipPlot("every score is zero or non-finite")
    first, last = int(used[0]), int(used[-1])
    log2_edges = np.arange(first, last + 2, dtype=float) - FP32_EXPONENT_BIAS
    return LogHistograms(
        log2_edges, {c: table[i, first:last + 1] for i, c in enumerate(components)},
        {c: int(table[i, 0]) for i, c in enumerate(components)},
        {c: int(table[i, 255]) for i, c in enumerate(components)}, numel)


def mean_abs_by_cell(scores: dict, metas: dict) -> dict[tuple, tuple[float, int]]:
    """(layer, component) -> (mean |score| over the cell's weights, weights in the cell)."""
    names = list(scores)
    sums = [torch.linalg.vector_norm(scores[n].detach().float(), ord=1).cpu() for n in names]
    sums = torch.stack(sums).tolist()
    cells: dict[tuple, list] = {}
    for name, total in zip(names, sums):
        cell = cells.setdefault((metas[name].layer, metas[name].component), [0.0, 0])
        cell[0] += total
        cell[1] += scores[name].numel()
    return {key: (total / count, count) for key, (total, count) in cells.items()}


# ----------------------------------------------------------------------------- core plots

def _need_scores(run: RunFolder) -> None:
    if run.scores is None or run.metas is None:
        raise SkipPlot("score tensors are only available while the run is in memory")


@core_plot("sensitivity_distribution")
def sensitivity_distribution(run: RunFolder) -> plt.Figure:
    _need_scores(run)
    hists = log_histograms(run.scores, run.metas)
    components = ordered_components(hists.counts)
    n_cols = min(3, len(components))
    n_rows = math.ceil(len(components) / n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.1 * n_rows + 0.8),
                                squeeze=False)
    threshold = _topk_threshold(run)
    for ax, component, colour in zip(axes.flat, components, colours(len(components))):
        counts = hists.counts[component].astype(float)
        ax.stairs(np.where(counts > 0, counts, np.nan), hists.edges, fill=True, color=colour,
                  alpha=0.85)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(hists.edges[0], hists.edges[-1])
        ax.set_title(f"{component}: {count(hists.numel[component])} weights"
                     + _excluded_note(hists, component), fontsize=9)
        ax.set_ylabel("weights per octave (log)", fontsize=8)
        ax.set_xlabel("|score|, log scale", fontsize=8)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                       label=f"top-{run.get('topk')} threshold")
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes.flat[len(components):]:
        ax.set_visible(False)
    metric = run.get("metric")
    figure.suptitle(f"Sensitivity distribution per component ({metric}): "
                    f"{metric_label(metric)}\nhistogram bins = one octave (factor 2) each")
    figure.tight_layout()
    return figure


def _excluded_note(hists: LogHistograms, component: str) -> str:
    notes = []
    if hists.zeros[component]:
        notes.append(f"{count(hists.zeros[component])} zero")
    if hists.nonfinite[component]:
        notes.append(f"{count(hists.nonfinite[component])} inf/NaN")
    return f" ({', '.join(notes)}, not drawn)" if notes else ""


def _topk_threshold(run: RunFolder) -> float | None:
    """Smallest |score| inside the global top-K (per-tensor thresholds differ: not drawn)."""
    if run.get('mode') != "global" or run.table is None or len(run.table) == 0:
        return None
    return float(run.table["score"].abs().min())


@core_plot("layer_component_heatmap")
def layer_component_heatmap(run: RunFolder) -> plt.Figure:
    _need_scores(run)
    cells = mean_abs_by_cell(run.scores, run.metas)
    means, layers, components = grid({key: mean for key, (mean, _) in cells.items()})
    positive = means[np.isfinite(means) & (means > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size else None
    figure, ax = plt.subplots(figsize=(1.0 * len(components) + 3.5, 0.22 * len(layers) + 2.5))
    draw_heatmap(ax, np.where(means > 0, means, np.nan), layers, components,
                 f"mean {metric_label(run.get('metric'))}, log colour", norm=norm)
    ax.set_title(f"Mean sensitivity by layer and component ({run.get('metric')})")
    figure.tight_layout()
    return figure


@core_plot("topk_location")
def topk_location(run: RunFolder) -> plt.Figure:
    table = _top_table(run)
    layers = table["layer"].map(lambda v: None if v != v else int(v))  # NaN -> outside blocks
    keys = list(zip(layers, table["component"]))
    magnitudes = table["score"].abs().to_numpy()
    counts = {cell: 0.0 for cell in _scored_cells(run)}
    score_sums: dict[tuple, float] = {}
    for key, magnitude in zip(keys, magnitudes):
        counts[key] = counts.get(key, 0.0) + 1
        score_sums[key] = score_sums.get(key, 0.0) + float(magnitude)
    count_grid, layer_list, components = grid(counts)
    figure, ax = plt.subplots(figsize=(1.0 * len(components) + 3.5,
                                       0.22 * len(layer_list) + 2.5))
    occupied = {key for key, n in counts.items() if n}
    if run.get('mode') == "per_tensor":
        mean_grid, _, _ = grid({key: score_sums[key] / counts[key] for key in occupied})
        positive = mean_grid[np.isfinite(mean_grid) & (mean_grid > 0)]
        norm = LogNorm(positive.min(), positive.max()) if positive.size else None
        draw_heatmap(ax, np.where(mean_grid > 0, mean_grid, np.nan), layer_list, components,
                     f"mean {metric_label(run.get('metric'))}\nof the selected weights",
                     norm=norm, annotate=count_grid)
        ax.set_title(f"Top-{run.get('topk')} per tensor (per_tensor mode): numbers = selected "
                     f"weights, colour = their mean score", fontsize=10)
    else:
        draw_heatmap(ax, np.where(count_grid > 0, count_grid, np.nan), layer_list, components,
                     "selected weights (count); grey = none", annotate=count_grid,
                     integer=True)
        ax.set_title(f"Where the global top-{len(table)} weights sit: "
                     f"{len({k[0] for k in occupied})} of {len(layer_list)} layers, "
                     f"{len({k[1] for k in occupied})} of {len(components)} components",
                     fontsize=10)
    figure.tight_layout()
    return figure


def _top_table(run: RunFolder):
    if run.table is None:
        raise InputAbsent("no top_weights.csv")
    return run.table


def _scored_cells(run: RunFolder) -> set[tuple]:
    """Every (layer, component) that was scored, so the grid shows the whole model."""
    if run.metas is not None:
        return {(m.layer, m.component) for m in run.metas.values()}
    stats = (run.sensitivity_stats or {}).get("parameters", {})
    return {(p["layer"], p["component"]) for p in stats.values()}


@core_plot("perturbation_effects")
def perturbation_effects(run: RunFolder) -> plt.Figure:
    results = run.need("perturbation", "needs --perturb")
    rows = results["conditions"]
    baseline = results["baseline"]["perplexity"]
    selections = [s for s in SELECTION_ORDER if any(r["selection"] == s for r in rows)]
    selections += sorted({r["selection"] for r in rows} - set(selections))
    wide = max(1.6, 0.09 * len(rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(7 + 3.2 * wide, 4.8),
                                         gridspec_kw={"width_ratios": [1, wide]})
    _perplexity_panel(left, rows, selections, baseline)
    _delta_panel(right, rows, selections)
    comparison = results.get("summary", {}).get("top_vs_random")
    subtitle = ""
    if comparison:
        subtitle = (f"\neffect ratio {sig(comparison['effect_ratio'])}, empirical p = "
                    f"{comparison['empirical_p_value']:.3g} over "
                    f"{comparison['n_random_draws']} random-K draws")
    figure.suptitle(f"Perturbation '{results['method']}' of K={results['k']} weights "
                    f"({results['mode']}, {results['metric']}); baseline perplexity "
                    f"{baseline:.3f}{subtitle}", fontsize=11)
    figure.tight_layout()
    return figure


def _perplexity_panel(ax, rows, selections, baseline):
    finite = [r["perplexity"] for r in rows if is_finite_number(r["perplexity"])] + [baseline]
    top = max(finite) * 3
    for x, name in enumerate(selections):
        values = np.array([r["perplexity"] for r in rows if r["selection"] == name], dtype=float)
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        shown = np.where(np.isfinite(values), values, top)
        ax.scatter(x + jitter, shown, color=SELECTION_COLOURS.get(name, PALETTE[7]), s=36,
                   zorder=3, edgecolor="black", linewidth=0.4,
                   label=f"{name} (n={len(values)})")
        for xi, value in zip(x + jitter, values):
            if not np.isfinite(value):
                ax.annotate("inf" if np.isinf(value) else "nan", (xi, top), ha="center",
                            va="bottom", fontsize=8)
        if len(values) > 1 and np.all(np.isfinite(values)):
            mean, sd = values.mean(), values.std(ddof=1)
            ax.errorbar(x + 0.25, mean, yerr=sd, fmt="_", color="black", capsize=4, zorder=4)
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="baseline")
    ax.set_yscale("log")
    ax.set_xticks(range(len(selections)), selections)
    ax.set_xlim(-0.6, len(selections) - 0.4)
    ax.set_ylabel("perplexity after perturbation (log scale)")
    ax.set_xlabel("selection (each dot = one seed; bar = mean ± sd)")
    ax.set_title("Perplexity per condition", fontsize=10)
    ax.legend(fontsize=7, loc="best")


def _delta_panel(ax, rows, selections):
    ordered = [r for name in selections for r in rows if r["selection"] == name]
    deltas = np.array([r["delta_perplexity"] for r in ordered], dtype=float)
    intervals = np.array([r.get("delta_perplexity_ci95") or [np.nan, np.nan] for r in ordered],
                         dtype=float)
    magnitudes = np.abs(np.concatenate([deltas, intervals.ravel()]))
    magnitudes = magnitudes[np.isfinite(magnitudes) & (magnitudes > 0)]
    linthresh = 10 ** math.floor(math.log10(magnitudes.min())) if magnitudes.size else 1.0
    top = magnitudes.max() * 3 if magnitudes.size else 1.0
    for x, (row, delta, (low, high)) in enumerate(zip(ordered, deltas, intervals)):
        colour = SELECTION_COLOURS.get(row["selection"], PALETTE[7])
        if np.isfinite(delta):
            bounded = np.isfinite(low) and np.isfinite(high)
            err = [[delta - low], [high - delta]] if bounded else None
            ax.errorbar(x, delta, yerr=err, fmt="o", color=colour, capsize=4,
                        markeredgecolor="black", markeredgewidth=0.4)
        else:
            ax.scatter(x, top, marker="^", color=colour)
            ax.annotate("inf", (x, top), ha="center", va="bottom", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=linthresh)
    reach = np.concatenate([deltas, intervals.ravel()])
    reach = reach[np.isfinite(reach)]
    if reach.size:
        ax.set_ylim(min(reach.min() * 3, -linthresh), max(reach.max() * 3, top, linthresh))
    crowded = len(ordered) > 8
    labels = [r["selection"] + ("" if r["seed"] is None else
                                (f" s{r['seed']}" if crowded else f"\nseed {r['seed']}"))
              for r in ordered]
    ax.set_xticks(range(len(ordered)), labels, fontsize=7, rotation=90 if crowded else 0)
    ax.set_ylabel(f"Δ perplexity vs baseline\n(symlog; linear below {linthresh:g})")
    ax.set_xlabel("condition")
    ax.set_title("Δ perplexity with paired bootstrap 95% interval over evaluation blocks",
                 fontsize=10)


@core_plot("stability")
def stability_plot(run: RunFolder) -> plt.Figure:
    results = run.need("stability", "needs --stability-check")
    families = [f for f in ("across_seeds", "across_batches") if f in results]
    figure, axes = plt.subplots(2, len(families), figsize=(5.2 * len(families), 8.2),
                                squeeze=False)
    for column, family in enumerate(families):
        block = results[family]
        for row, measure in enumerate(("jaccard", "spearman")):
            ax = axes[row, column]
            pair_heatmap(ax, block["labels"], block[measure]["pairs"], lambda p: p["value"],
                         _measure_label(measure), signed=measure == "spearman")
            mean = block[measure]["mean"]
            what = "seed" if family == "across_seeds" else "calibration part"
            ax.set_title(f"{_measure_label(measure)} {family.replace('_', ' ')}: mean "
                         f"{'n/a' if mean is None else f'{mean:.3f}'}", fontsize=10)
            ax.set_xlabel(what)
            ax.set_ylabel(what)
    figure.suptitle(f"Stability of the top-{results['k']} set ({results['metric']}, "
                    f"{results['mode']})")
    figure.tight_layout()
    return figure


def _measure_label(measure: str) -> str:
    return {"jaccard": "Jaccard |A∩B|/|A∪B|", "spearman": "Spearman ρ of |score|"}[measure]


ACCURACY_METRICS = ("acc", "acc_norm")


@core_plot("downstream_tasks")
def downstream_tasks(run: RunFolder) -> plt.Figure:
    results = run.need("downstream", "needs --downstream-tasks")
    panels = [(task, metric) for task, metrics in results["baseline"].items()
              for metric in ACCURACY_METRICS if metric in metrics]
    if not panels:
        raise SkipPlot("downstream_results.json has no accuracy metrics")
    conditions = results.get("conditions", [])
    names = ["baseline"] + [s for s in SELECTION_ORDER
                            if any(c["selection"] == s for c in conditions)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels) + 1, 4.4),
                                squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        base = results["baseline"][task]
        for x, name in enumerate(names):
            if name == "baseline":
                values = [base[metric]]
                err = base.get(f"{metric}_stderr")
            else:
                values = [c["tasks"][task][metric] for c in conditions if c["selection"] == name]
                err = float(np.std(values, ddof=1)) if len(values) > 1 else None
            colour = SELECTION_COLOURS.get(name, PALETTE[7])
            ax.bar(x, float(np.mean(values)), color=colour, edgecolor="black", linewidth=0.4,
                   yerr=err if err is not None and np.isfinite(err) else None, capsize=4)
            if len(values) > 1:
                ax.scatter(np.full(len(values), x), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{metric} (fraction correct)")
        ax.set_title(f"{task} {metric} (n={base.get('n')})", fontsize=10)
    figure.suptitle("Downstream accuracy: baseline (± standard error) and each perturbation "
                    "condition (dots = seeds, bar = mean ± sd)", fontsize=10)
    figure.tight_layout()
    return figure


