"""The score plots of a run (``--save-plots``): score distribution, layer x component heatmap
and where the top-K sit (src/report/experiment_plots.py draws the experiments; each analysis
brings its own plots, src/analysis/registry.py).

Score distributions are exact octave histograms of |score| computed on the score tensors (on
their device), never from Python lists of weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.colors import LogNorm


from src.plots.style import (SkipPlot, colours, draw_heatmap, grid, metric_label,
                             ordered_components, plt)
from src.report.plotting import run_plot
from src.report.run_folder import InputAbsent, RunFolder
from src.utils.format import count

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


@dataclass
class ScoreSummary:
    """What the score plots need of the score tensors, per parameter: how many |score| fall in
    each fp32 exponent (octave), their L1 norm and the number of weights. All are sums over the
    tensor, so under --shard each rank sums its rows and the ranks' parts are added."""
    exponent_counts: dict[str, np.ndarray]  # name -> int64 [256]
    l1: dict[str, float]
    numel: dict[str, int]


def summarize(scores: dict, layout=None) -> ScoreSummary:
    """The summary of ``scores``; ``layout`` (sharding.Layout) when they are this rank's shards
    (a collective: every rank calls it)."""
    names = list(scores)
    counts = torch.stack([_exponent_counts(scores[n]) for n in names])
    l1 = torch.stack([torch.linalg.vector_norm(scores[n].detach().float(), ord=1).double().cpu()
                      for n in names])
    if layout is not None:  # float64 counts are exact below 2**53
        counts, l1 = layout.ranks.reduced(list(counts)).long(), layout.ranks.reduced(list(l1))
    numel = {n: layout.numel[n] if layout is not None else scores[n].numel() for n in names}
    return ScoreSummary(dict(zip(names, counts.numpy())), dict(zip(names, l1.tolist())), numel)


def _exponent_counts(score: torch.Tensor) -> torch.Tensor:
    """The octave of an fp32 value is its 8-bit exponent field: a ``torch.bincount`` of
    ``(bits >> 23) & 0xFF`` over the tensor's integer view, one pass on its device."""
    exponent = score.detach().float().contiguous().view(torch.int32) >> 23
    exponent.bitwise_and_(0xFF)  # drop the sign bit: octave of |score|
    return torch.bincount(exponent.reshape(-1), minlength=256).cpu()  # devices may differ


def log_histograms(summary: ScoreSummary, metas: dict) -> LogHistograms:
    """Exact log-scaled histograms of |score| per component, one octave per bin.

    Exponent 0 holds zeros (and subnormals, below 1.2e-38), exponent 255 infinities and NaN;
    both are reported separately.
    """
    per_component: dict[str, np.ndarray] = {}
    numel: dict[str, int] = {}
    for name, counts in summary.exponent_counts.items():
        component = metas[name].component
        per_component[component] = per_component.get(component, 0) + counts
        numel[component] = numel.get(component, 0) + summary.numel[name]
    components = list(per_component)
    table = np.stack([per_component[c] for c in components])  # [C, 256]
    used = np.nonzero(table[:, 1:255].sum(axis=0))[0] + 1
    if used.size == 0:
        raise SkipPlot("every score is zero or non-finite")
    first, last = int(used[0]), int(used[-1])
    log2_edges = np.arange(first, last + 2, dtype=float) - FP32_EXPONENT_BIAS
    return LogHistograms(
        log2_edges, {c: table[i, first:last + 1] for i, c in enumerate(components)},
        {c: int(table[i, 0]) for i, c in enumerate(components)},
        {c: int(table[i, 255]) for i, c in enumerate(components)}, numel)


def mean_abs_by_cell(summary: ScoreSummary, metas: dict) -> dict[tuple, tuple[float, int]]:
    """(layer, component) -> (mean |score| over the cell's weights, weights in the cell)."""
    cells: dict[tuple, list] = {}
    for name, total in summary.l1.items():
        cell = cells.setdefault((metas[name].layer, metas[name].component), [0.0, 0])
        cell[0] += total
        cell[1] += summary.numel[name]
    return {key: (total / count, count) for key, (total, count) in cells.items()}


# ----------------------------------------------------------------------------- core plots

def _need_scores(run: RunFolder) -> None:
    if run.score_summary is None or run.metas is None:
        raise SkipPlot("score tensors are only available while the run is in memory")


@run_plot("sensitivity_distribution")
def sensitivity_distribution(run: RunFolder) -> plt.Figure:
    _need_scores(run)
    hists = log_histograms(run.score_summary, run.metas)
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


@run_plot("layer_component_heatmap")
def layer_component_heatmap(run: RunFolder) -> plt.Figure:
    _need_scores(run)
    cells = mean_abs_by_cell(run.score_summary, run.metas)
    means, layers, components = grid({key: mean for key, (mean, _) in cells.items()})
    positive = means[np.isfinite(means) & (means > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size else None
    figure, ax = plt.subplots(figsize=(1.0 * len(components) + 3.5, 0.22 * len(layers) + 2.5))
    draw_heatmap(ax, np.where(means > 0, means, np.nan), layers, components,
                 f"mean {metric_label(run.get('metric'))}, log colour", norm=norm)
    ax.set_title(f"Mean sensitivity by layer and component ({run.get('metric')})")
    figure.tight_layout()
    return figure


@run_plot("topk_location")
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
