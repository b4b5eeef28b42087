"""Every plot of a run (``--save-plots``) and the shared figure style of the report script.

Each plot is one entry of ``RUN_PLOTS`` (name -> function(RunArtifacts) -> Figure). A plot whose
input is absent (no ``--perturb``, no ``--stability-check``, an optional analysis that did not
run) raises ``SkipPlot`` with the reason; ``save_run_plots`` prints it and moves on.

Conventions: the Agg backend (no display needed); the seaborn "colorblind" palette for
categories and viridis (perceptually uniform, colour-blind safe) for heatmaps; every figure has a
title and axis labels with units and is closed right after saving. Score distributions are
histograms of log10 |score| computed with ``torch.histc`` on the score tensors (on their device),
never from Python lists of weights; ranking is by |score|, so signed metrics are drawn as |score|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from src.errors import UserError  # noqa: E402
from src.models.components import COMPONENTS  # noqa: E402
from src.utils.io import read_json  # noqa: E402

PLOT_FORMATS = ("png", "pdf", "svg")
PALETTE = sns.color_palette("colorblind")
HEATMAP_CMAP = "viridis"
DIVERGING_CMAP = "vlag"
SELECTION_ORDER = ("top_k", "random_k", "bottom_k")
SELECTION_COLOURS = {"top_k": PALETTE[3], "random_k": PALETTE[0], "bottom_k": PALETTE[2]}
DPI = 130

# What one score means, for axis labels. Loss = token-mean NLL in nats.
METRIC_UNITS = {
    "grad_x_weight": "|mean grad x weight| (nats, first-order loss change)",
    "grad_squared": "empirical Fisher diagonal (nats² per weight unit²)",
    "hutchinson_diag": "|Hessian diagonal estimate| (nats per weight unit²)",
    "magnitude": "|w| (weight units)",
    "act_mag": "|W| x input-channel L2 norm (activation units)",
    "random": "uniform random score (unitless)",
}


class SkipPlot(Exception):
    """The plot cannot be drawn from this run; the message says why."""


class InputAbsent(SkipPlot):
    """The step that makes the plot's input did not run; the message says which flag runs it."""


@dataclass
class RunArtifacts:
    """Everything a run's plots may draw on: in-memory tensors (only during the run) + files."""
    out_dir: Path
    metric: str | None = None
    mode: str | None = None
    k: int | None = None
    scores: dict | None = None          # name -> fp32 score tensor (stored layout)
    metas: dict | None = None           # name -> ParamMeta
    table: object | None = None         # top_weights DataFrame
    files: dict = field(default_factory=dict)  # contract file name -> parsed JSON

    def need(self, file_name: str, how: str) -> dict:
        if file_name not in self.files:
            raise InputAbsent(f"no {file_name}; {how}")
        return self.files[file_name]

    def analysis(self, key: str, how: str) -> dict:
        enhanced = self.need("enhanced_analysis.json", how)
        if not isinstance(enhanced.get(key), dict):
            raise InputAbsent(f"no '{key}' analysis; {how}")
        return enhanced[key]


RUN_PLOTS: dict[str, Callable[[RunArtifacts], plt.Figure]] = {}


def plot(name: str):
    def add(function):
        RUN_PLOTS[name] = function
        return function
    return add


# ----------------------------------------------------------------------------- entry points

def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    bad = [f for f in formats if f not in PLOT_FORMATS]
    if not formats or bad:
        raise UserError(f"bad --plot-format '{text}': use a comma-separated list of "
                        f"{', '.join(PLOT_FORMATS)}")
    return formats


CONTRACT_JSON = ("perturbation_results.json", "stability_results.json", "enhanced_analysis.json",
                 "downstream_results.json", "sensitivity_stats.json")


def read_run_files(out_dir: Path) -> dict:
    return {name: read_json(Path(out_dir) / name) for name in CONTRACT_JSON
            if (Path(out_dir) / name).is_file()}


def save_run_plots(out_dir, formats=("png",), *, metric=None, mode=None, k=None, scores=None,
                   metas=None, table=None) -> list[str]:
    """Draw every plot whose input exists into out_dir/plots/; returns the written paths."""
    out_dir = Path(out_dir)
    artifacts = RunArtifacts(out_dir, metric, mode, k, scores, metas, table,
                             read_run_files(out_dir))
    written, absent = [], []
    for name, draw in RUN_PLOTS.items():
        open_before = set(plt.get_fignums())
        try:
            figure = draw(artifacts)
        except InputAbsent as reason:
            absent.append(f"{name} ({reason})")
            continue
        except SkipPlot as reason:
            print(f"[cwa] plot {name} skipped: {reason}")
            continue
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            # a layout this plot does not know (e.g. a newer analysis): the run's results stand
            print(f"[cwa] plot {name} FAILED, results unaffected: {type(error).__name__}: "
                  f"{error}")
            for number in set(plt.get_fignums()) - open_before:
                plt.close(number)
            continue
        written += save_figure(figure, out_dir / "plots" / name, formats)
    if absent:
        print(f"[cwa] plots skipped, their input is absent: {'; '.join(absent)}")
    print(f"[cwa] {len(written)} plot files in {out_dir / 'plots'}")
    return written


def save_figure(figure: plt.Figure, stem: Path, formats=("png",)) -> list[str]:
    """Save one figure in each format (stem + .fmt) and close it."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            figure.savefig(path, dpi=DPI, bbox_inches="tight")
            paths.append(str(path))
    finally:
        plt.close(figure)
    return paths


def metric_label(metric: str | None) -> str:
    return METRIC_UNITS.get(metric or "", f"|{metric or 'score'}|")


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


def ordered_components(present) -> list[str]:
    present = set(present)
    return [c for c in COMPONENTS if c in present] + sorted(present - set(COMPONENTS))


def layer_rows(layers) -> list:
    """Block indices ascending, then None (weights outside the block stack)."""
    known = sorted({layer for layer in layers if layer is not None})
    return known + ([None] if any(layer is None for layer in layers) else [])


def _layer_label(layer) -> str:
    return "outside blocks" if layer is None else str(layer)


def _grid(cells: dict[tuple, float]) -> tuple[np.ndarray, list, list[str]]:
    layers = layer_rows([key[0] for key in cells])
    components = ordered_components(key[1] for key in cells)
    grid = np.full((len(layers), len(components)), np.nan)
    for (layer, component), value in cells.items():
        grid[layers.index(layer), components.index(component)] = value
    return grid, layers, components


def _draw_heatmap(ax, grid, layers, components, colour_label, norm=None, annotate=None,
                  integer=False):
    masked = np.ma.masked_invalid(grid)
    image = ax.imshow(masked, aspect="auto", cmap=HEATMAP_CMAP, norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(components)), components, rotation=35, ha="right")
    step = max(1, len(layers) // 16)
    ticks = list(range(0, len(layers), step))
    ax.set_yticks(ticks, [_layer_label(layers[i]) for i in ticks])
    ax.set_xlabel("component")
    ax.set_ylabel("transformer block (layer index)")
    ax.set_facecolor("#f0f0f0")
    colourbar = ax.figure.colorbar(image, ax=ax)
    colourbar.set_label(colour_label)
    if integer:
        colourbar.locator = MaxNLocator(integer=True)
        colourbar.update_ticks()
    if annotate is not None and grid.size <= 400:
        for (i, j), value in np.ndenumerate(annotate):
            if np.isfinite(value) and value > 0:
                light = np.isfinite(grid[i, j]) and image.norm(grid[i, j]) > 0.6
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                        color="black" if light or not np.isfinite(grid[i, j]) else "white")
    return image


def _need_scores(art: RunArtifacts) -> None:
    if art.scores is None or art.metas is None:
        raise SkipPlot("score tensors are only available while the run is in memory")


# ----------------------------------------------------------------------------- core plots

@plot("sensitivity_distribution")
def sensitivity_distribution(art: RunArtifacts) -> plt.Figure:
    _need_scores(art)
    hists = log_histograms(art.scores, art.metas)
    components = ordered_components(hists.counts)
    n_cols = min(3, len(components))
    n_rows = math.ceil(len(components) / n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.1 * n_rows + 0.8),
                                squeeze=False)
    threshold = _topk_threshold(art)
    for ax, component, colour in zip(axes.flat, components, _cycle(len(components))):
        counts = hists.counts[component].astype(float)
        ax.stairs(np.where(counts > 0, counts, np.nan), hists.edges, fill=True, color=colour,
                  alpha=0.85)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(hists.edges[0], hists.edges[-1])
        ax.set_title(f"{component}: {_count(hists.numel[component])} weights"
                     + _excluded_note(hists, component), fontsize=9)
        ax.set_ylabel("weights per octave (log)", fontsize=8)
        ax.set_xlabel("|score|, log scale", fontsize=8)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                       label=f"top-{art.k} threshold")
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes.flat[len(components):]:
        ax.set_visible(False)
    figure.suptitle(f"Sensitivity distribution per component ({art.metric}): "
                    f"{metric_label(art.metric)}\nhistogram bins = one octave (factor 2) each")
    figure.tight_layout()
    return figure


def _excluded_note(hists: LogHistograms, component: str) -> str:
    notes = []
    if hists.zeros[component]:
        notes.append(f"{_count(hists.zeros[component])} zero")
    if hists.nonfinite[component]:
        notes.append(f"{_count(hists.nonfinite[component])} inf/NaN")
    return f" ({', '.join(notes)}, not drawn)" if notes else ""


def _topk_threshold(art: RunArtifacts) -> float | None:
    """Smallest |score| inside the global top-K (per-tensor thresholds differ: not drawn)."""
    if art.mode != "global" or art.table is None or len(art.table) == 0:
        return None
    return float(art.table["score"].abs().min())


@plot("layer_component_heatmap")
def layer_component_heatmap(art: RunArtifacts) -> plt.Figure:
    _need_scores(art)
    cells = mean_abs_by_cell(art.scores, art.metas)
    grid, layers, components = _grid({key: mean for key, (mean, _) in cells.items()})
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size else None
    figure, ax = plt.subplots(figsize=(1.0 * len(components) + 3.5, 0.22 * len(layers) + 2.5))
    _draw_heatmap(ax, np.where(grid > 0, grid, np.nan), layers, components,
                  f"mean {metric_label(art.metric)}, log colour", norm=norm)
    ax.set_title(f"Mean sensitivity by layer and component ({art.metric})")
    figure.tight_layout()
    return figure


@plot("topk_location")
def topk_location(art: RunArtifacts) -> plt.Figure:
    table = _top_table(art)
    layers = table["layer"].map(lambda v: None if v != v else int(v))  # NaN -> outside blocks
    keys = list(zip(layers, table["component"]))
    magnitudes = table["score"].abs().to_numpy()
    counts = {cell: 0.0 for cell in _scored_cells(art)}
    score_sums: dict[tuple, float] = {}
    for key, magnitude in zip(keys, magnitudes):
        counts[key] = counts.get(key, 0.0) + 1
        score_sums[key] = score_sums.get(key, 0.0) + float(magnitude)
    count_grid, layer_list, components = _grid(counts)
    figure, ax = plt.subplots(figsize=(1.0 * len(components) + 3.5,
                                       0.22 * len(layer_list) + 2.5))
    occupied = {key for key, n in counts.items() if n}
    if art.mode == "per_layer":
        mean_grid, _, _ = _grid({key: score_sums[key] / counts[key] for key in occupied})
        positive = mean_grid[np.isfinite(mean_grid) & (mean_grid > 0)]
        norm = LogNorm(positive.min(), positive.max()) if positive.size else None
        _draw_heatmap(ax, np.where(mean_grid > 0, mean_grid, np.nan), layer_list, components,
                      f"mean {metric_label(art.metric)}\nof the selected weights", norm=norm,
                      annotate=count_grid)
        ax.set_title(f"Top-{art.k} per tensor (per_layer mode): numbers = selected weights, "
                     f"colour = their mean score", fontsize=10)
    else:
        _draw_heatmap(ax, np.where(count_grid > 0, count_grid, np.nan), layer_list, components,
                      "selected weights (count); grey = none", annotate=count_grid,
                      integer=True)
        ax.set_title(f"Where the global top-{len(table)} weights sit: "
                     f"{len({k[0] for k in occupied})} of {len(layer_list)} layers, "
                     f"{len({k[1] for k in occupied})} of {len(components)} components",
                     fontsize=10)
    figure.tight_layout()
    return figure


def _top_table(art: RunArtifacts):
    if art.table is not None:
        return art.table
    path = art.out_dir / "top_weights.csv"
    if not path.is_file():
        raise InputAbsent("no top_weights.csv")
    import pandas as pd
    return pd.read_csv(path)


def _scored_cells(art: RunArtifacts) -> set[tuple]:
    """Every (layer, component) that was scored, so the grid shows the whole model."""
    if art.metas is not None:
        return {(m.layer, m.component) for m in art.metas.values()}
    stats = art.files.get("sensitivity_stats.json", {}).get("parameters", {})
    return {(p["layer"], p["component"]) for p in stats.values()}


@plot("perturbation_effects")
def perturbation_effects(art: RunArtifacts) -> plt.Figure:
    results = art.need("perturbation_results.json", "needs --perturb")
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
        subtitle = (f"\neffect ratio {_num(comparison['effect_ratio'])}, empirical p = "
                    f"{comparison['empirical_p_value']:.3g} over "
                    f"{comparison['n_random_draws']} random-K draws")
    figure.suptitle(f"Perturbation '{results['method']}' of K={results['k']} weights "
                    f"({results['mode']}, {results['metric']}); baseline perplexity "
                    f"{baseline:.3f}{subtitle}", fontsize=11)
    figure.tight_layout()
    return figure


def _perplexity_panel(ax, rows, selections, baseline):
    finite = [r["perplexity"] for r in rows if _finite(r["perplexity"])] + [baseline]
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


@plot("stability")
def stability_plot(art: RunArtifacts) -> plt.Figure:
    results = art.need("stability_results.json", "needs --stability-check")
    families = [f for f in ("across_seeds", "across_batches") if f in results]
    figure, axes = plt.subplots(2, len(families), figsize=(5.2 * len(families), 8.2),
                                squeeze=False)
    for column, family in enumerate(families):
        block = results[family]
        for row, (measure, cmap, low) in enumerate((("jaccard", HEATMAP_CMAP, 0.0),
                                                    ("spearman", DIVERGING_CMAP, -1.0))):
            ax = axes[row, column]
            matrix = _pair_matrix(block["labels"], block[measure]["pairs"])
            sns.heatmap(matrix, ax=ax, vmin=low, vmax=1.0, cmap=cmap, annot=len(matrix) <= 10,
                        fmt=".2f", square=True, cbar_kws={"label": _measure_label(measure)},
                        xticklabels=block["labels"], yticklabels=block["labels"])
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


def _pair_matrix(labels: list, pairs: list[dict]) -> np.ndarray:
    index = {str(label): i for i, label in enumerate(labels)}
    matrix = np.eye(len(labels))
    for pair in pairs:
        i, j = index[str(pair["a"])], index[str(pair["b"])]
        matrix[i, j] = matrix[j, i] = pair["value"] if pair["value"] is not None else np.nan
    return matrix


# ----------------------------------------------------------------------------- optional analyses

@plot("progressive_curve")
def progressive_curve(art: RunArtifacts) -> plt.Figure:
    section = art.analysis("progressive_perturbation", "needs --advanced-perturbations "
                                                       "progressive")
    curve, baseline = section["curve"], section["baseline"]["perplexity"]
    ks = np.asarray(curve["k"], dtype=float)
    top = np.asarray(curve["top_k_perplexity"], dtype=float)
    rnd = np.asarray(curve["random_k_mean_perplexity"], dtype=float)
    sd = np.nan_to_num(np.asarray(curve["random_k_sd_perplexity"], dtype=float))
    ceiling = np.nanmax(np.concatenate([top[np.isfinite(top)], rnd[np.isfinite(rnd)],
                                        [baseline]])) * 3
    figure, ax = plt.subplots(figsize=(7.5, 4.8))
    intervals = [_top_interval(point, baseline) for point in section["points"]]
    low = np.array([i[0] for i in intervals])
    high = np.array([i[1] for i in intervals])
    finite = np.isfinite(top)
    ax.plot(ks[finite], top[finite], "-o", color=SELECTION_COLOURS["top_k"], label="top-K",
            markeredgecolor="black", markeredgewidth=0.4)
    if not finite.all():
        ax.scatter(ks[~finite], np.full((~finite).sum(), ceiling), marker="^",
                   color=SELECTION_COLOURS["top_k"], edgecolor="black", linewidth=0.4,
                   label="top-K perplexity inf")
    usable = np.isfinite(low) & np.isfinite(high) & np.isfinite(top)
    ax.fill_between(ks[usable], low[usable], high[usable], color=SELECTION_COLOURS["top_k"],
                    alpha=0.2, label="top-K bootstrap 95% interval")
    ax.errorbar(ks, np.where(np.isfinite(rnd), rnd, ceiling), yerr=sd, fmt="--s",
                color=SELECTION_COLOURS["random_k"], capsize=3,
                label=f"random-K mean ± sd ({len(section.get('seeds', []))} seeds)")
    for k, value in zip(ks, top):
        if not np.isfinite(value):
            ax.annotate("inf", (k, ceiling), ha="center", va="bottom", fontsize=8)
    ax.axhline(baseline, color="black", linestyle=":", label="baseline")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (weights perturbed, log scale)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"Progressive '{section['method']}' ({section['mode']}): damage against K")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _top_interval(point: dict, baseline: float) -> tuple[float, float]:
    """Perplexity interval of the top-K condition: baseline + its Δppl bootstrap interval."""
    row = next((r for r in point.get("conditions", []) if r["selection"] == "top_k"), None)
    if row is None or not row.get("delta_perplexity_ci95"):
        return math.nan, math.nan
    low, high = row["delta_perplexity_ci95"]
    return baseline + low, baseline + high


@plot("architecture_depth")
def architecture_depth(art: RunArtifacts) -> plt.Figure:
    section = art.analysis("architecture", "needs --architecture-analysis")
    by_layer = {int(k): v for k, v in section["by_layer"].items() if str(k).lstrip("-").isdigit()}
    layers = sorted(by_layer)
    if not layers:
        raise SkipPlot("the architecture analysis has no per-layer numbers")
    mean = [by_layer[i]["mean_score"] for i in layers]
    enrichment = [by_layer[i].get("enrichment", math.nan) for i in layers]
    depth = section.get("depth", {})
    figure, (upper, lower) = plt.subplots(2, 1, figsize=(9, 6.4), sharex=True)
    upper.plot(layers, mean, "-o", color=PALETTE[0], markersize=4)
    upper.set_yscale("log")
    upper.set_ylabel(f"mean {art.metric or section.get('metric')} score\n(log scale)")
    rho = depth.get("spearman_layer_vs_mean_score", {})
    upper.set_title(f"Sensitivity over depth ({section.get('metric')}): Spearman ρ(layer, mean "
                    f"score) = {_num(rho.get('rho'))}, p = {_num(rho.get('p_value'))}",
                    fontsize=10)
    lower.bar(layers, enrichment, color=PALETTE[1], edgecolor="black", linewidth=0.3)
    lower.axhline(1.0, color="black", linestyle="--", linewidth=1, label="uniform share (1)")
    lower.set_ylabel("top-K enrichment\n(count / count expected by size)")
    lower.set_xlabel("transformer block (layer index)")
    rho = depth.get("spearman_layer_vs_topk_count", {})
    lower.set_title(f"Where the top-{section.get('k')} weights sit over depth: Spearman "
                    f"ρ(layer, top-K count) = {_num(rho.get('rho'))}", fontsize=10)
    lower.legend(fontsize=8)
    figure.tight_layout()
    return figure


@plot("super_weight_spikes")
def super_weight_spikes(art: RunArtifacts) -> plt.Figure:
    section = art.analysis("super_weights", "needs --super-weights")
    threshold = section["method"]["spike_threshold"]
    candidates = section.get("candidates", [])
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                         gridspec_kw={"width_ratios": [1.6, 1]})
    passes = section.get("passes") or [section["layers"]]
    for index, layers in enumerate(passes):
        label = "intact model" if index == 0 else f"after zeroing {index} candidate(s)"
        style = "-o" if index == 0 else ":"
        left.plot([l["layer"] for l in layers], [l["output_ratio"] for l in layers], style,
                  color=PALETTE[index % len(PALETTE)], markersize=4, label=label)
    left.axhline(threshold, color="black", linestyle="--", linewidth=1,
                 label=f"spike threshold {threshold:g}x")
    for c in candidates:
        left.annotate(f"[{c['row']}, {c['col']}]", (c["layer"], c["output_ratio"]),
                      textcoords="offset points", xytext=(4, 6), fontsize=7)
    left.set_yscale("log")
    left.set_xlabel("transformer block (layer index)")
    left.set_ylabel("max |MLP output| / median channel peak\n(log scale)")
    left.set_title("Activation spikes at the MLP output projection", fontsize=10)
    left.legend(fontsize=7)
    _super_weight_effects(right, candidates, section)
    figure.suptitle(f"Super weights: {section['n_candidates']} candidate(s), "
                    f"{section['n_confirmed']} confirmed against same-tensor controls "
                    f"(baseline perplexity {section['baseline_perplexity']:.3f})", fontsize=11)
    figure.tight_layout()
    return figure


def _super_weight_effects(ax, candidates: list[dict], section: dict) -> None:
    if not candidates:
        ax.text(0.5, 0.5, "no layer crossed the spike threshold", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    labels = [f"L{c['layer']} [{c['row']},{c['col']}]" + ("\nconfirmed" if c.get("confirmed")
                                                           else "") for c in candidates]
    alone = np.array([c["alone"]["ratio"] for c in candidates], dtype=float)
    control = np.array([c["controls"]["max_control_ratio"] for c in candidates], dtype=float)
    x = np.arange(len(candidates))
    top = np.nanmax(np.concatenate([alone[np.isfinite(alone)], control[np.isfinite(control)],
                                    [1.0]])) * 3
    ax.bar(x - 0.2, np.where(np.isfinite(alone), alone, top), 0.4, label="candidate zeroed",
           color=SELECTION_COLOURS["top_k"], edgecolor="black", linewidth=0.3)
    ax.bar(x + 0.2, np.where(np.isfinite(control), control, top), 0.4,
           label="worst control zeroed", color=SELECTION_COLOURS["random_k"], edgecolor="black",
           linewidth=0.3)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("perplexity / baseline (log scale)")
    ax.set_xlabel("candidate: layer [row, col] in [out, in]")
    ax.set_title("Causal check on the evaluation blocks", fontsize=10)
    ax.legend(fontsize=7)


@plot("metric_correlation")
def metric_correlation(art: RunArtifacts) -> plt.Figure:
    section = art.analysis("metric_correlation", "needs --compare-metrics")
    metrics = list(section["metrics"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, (key, label, cmap, low) in zip(axes, (
            ("spearman", "Spearman ρ of scores", DIVERGING_CMAP, -1.0),
            ("jaccard", f"Jaccard of top-{section.get('k')} sets", HEATMAP_CMAP, 0.0))):
        matrix = np.eye(len(metrics))
        for pair in section["pairs"]:
            i, j = metrics.index(pair["a"]), metrics.index(pair["b"])
            value = pair.get(key)
            matrix[i, j] = matrix[j, i] = np.nan if value is None else value
        sns.heatmap(matrix, ax=ax, vmin=low, vmax=1.0, cmap=cmap, annot=True, fmt=".2f",
                    square=True, xticklabels=metrics, yticklabels=metrics,
                    cbar_kws={"label": label})
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("metric")
        ax.set_ylabel("metric")
    figure.suptitle(f"Agreement between metrics on the same calibration data "
                    f"({section.get('mode')} top-{section.get('k')})")
    figure.tight_layout()
    return figure


@plot("temporal_drift")
def temporal_drift(art: RunArtifacts) -> plt.Figure:
    section = art.analysis("temporal_stability", "needs --temporal-stability")
    families = {name: fam for name, fam in section["drift"].items()
                if isinstance(fam, dict) and fam.get("steps")}
    if not families:
        raise SkipPlot("the temporal-stability analysis has fewer than two snapshots per family")
    figure, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 4.4),
                                squeeze=False)
    threshold = section.get("drift_threshold")
    for ax, (name, family) in zip(axes[0], families.items()):
        steps = family["steps"]
        for index, k in enumerate(sorted({step["k"] for step in steps})):
            chosen = [s for s in steps if s["k"] == k]
            ax.plot(range(len(chosen)), [s["drift"] for s in chosen], "-o",
                    color=PALETTE[index % len(PALETTE)], label=f"K={k}")
        labels = [f"{s['from']}\n→ {s['to']}" for s in steps if s["k"] == steps[0]["k"]]
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        if threshold is not None:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
                       label=f"flag threshold {threshold:g}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("drift = 1 − Jaccard of top-K sets")
        ax.set_xlabel("consecutive snapshots")
        ax.set_title(f"{name.replace('_', ' ')}: mean drift {_num(family.get('mean_drift'))}",
                     fontsize=10)
        ax.legend(fontsize=7)
    figure.suptitle(f"Top-K drift between calibration snapshots ({section.get('metric')})")
    figure.tight_layout()
    return figure


@plot("weight_clusters")
def weight_clusters(art: RunArtifacts) -> plt.Figure:
    section = art.analysis("weight_analysis", "needs --weight-analysis")
    profiles, clustering = section["profiles"], section.get("clustering") or {}
    labels = clustering.get("labels") or {}
    tail_key = "top_share_1pct"
    tail = {(p["layer"], p["component"]): p.get(tail_key) for p in profiles.values()}
    clusters = {(profiles[n]["layer"], profiles[n]["component"]): lab for n, lab in labels.items()
                if n in profiles}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.2 * len({k[0] for k in tail}) + 3))
    tail_grid, layers, components = _grid({k: v for k, v in tail.items() if v is not None})
    _draw_heatmap(right, tail_grid, layers, components,
                  "share of the tensor's score held by its top 1% of weights")
    right.set_title("Heavy tails: score share of the top 1% of weights (0.01 = none)",
                    fontsize=10)
    if clusters:
        names = sorted(set(clusters.values()), key=str)
        grid, layers_c, components_c = _grid({k: float(names.index(v))
                                              for k, v in clusters.items()})
        cmap = matplotlib.colors.ListedColormap(_cycle(len(names)))
        image = left.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap,
                            vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
        left.set_xticks(range(len(components_c)), components_c, rotation=35, ha="right")
        step = max(1, len(layers_c) // 16)
        left.set_yticks(range(0, len(layers_c), step),
                        [_layer_label(layers_c[i]) for i in range(0, len(layers_c), step)])
        left.set_xlabel("component")
        left.set_ylabel("transformer block (layer index)")
        bar = figure.colorbar(image, ax=left, ticks=range(len(names)))
        bar.ax.set_yticklabels(["noise" if n == -1 else str(n) for n in names])
        bar.set_label("cluster")
        quality = (f"silhouette {_num(clustering['silhouette'])}"
                   if _finite(clustering.get("silhouette")) else "silhouette undefined")
        left.set_title(f"Tensors clustered by sensitivity profile ({clustering.get('method')}, "
                       f"{quality})", fontsize=10)
    else:
        left.set_axis_off()
    figure.tight_layout()
    return figure


ACCURACY_METRICS = ("acc", "acc_norm")


@plot("downstream_tasks")
def downstream_tasks(art: RunArtifacts) -> plt.Figure:
    results = art.need("downstream_results.json", "needs --downstream-tasks")
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


# ----------------------------------------------------------------------------- helpers

def _cycle(n: int) -> list:
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _num(value) -> str:
    if not _finite(value):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
