"""The figure style and drawing helpers of every plot (src/report/plotting.py draws a run's
plots; the core ones are in src/report/run_plots.py and experiment_plots.py, each analysis
brings its own through src/analysis/registry.py). A plot that cannot be drawn from a run raises
``SkipPlot``.

Conventions: the Agg backend (no display needed); the seaborn "colorblind" palette for
categories and viridis (perceptually uniform, colour-blind safe) for heatmaps; every figure has a
title and axis labels with units and is closed right after saving. Ranking is by |score|, so
signed metrics are drawn as |score|.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from src.models.components import COMPONENTS  # noqa: E402

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
    "obd": "|OBD saliency ½·H_ii·w²| (nats)",
    "fisher_w2": "½ x Fisher diagonal x w² (nats²)",
}


class SkipPlot(Exception):
    """The plot cannot be drawn from this run; the message says why."""


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


def colours(n: int) -> list:
    """n category colours, cycling through the palette."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


# ----------------------------------------------------------------------------- layer x component

def ordered_components(present) -> list[str]:
    present = set(present)
    return [c for c in COMPONENTS if c in present] + sorted(present - set(COMPONENTS))


def layer_rows(layers) -> list:
    """Block indices ascending, then None (weights outside the block stack)."""
    known = sorted({layer for layer in layers if layer is not None})
    return known + ([None] if any(layer is None for layer in layers) else [])


def layer_label(layer) -> str:
    return "outside blocks" if layer is None else str(layer)


def grid(cells: dict[tuple, float]) -> tuple[np.ndarray, list, list[str]]:
    """(layer, component) -> value as a [layers, components] array (NaN where absent)."""
    layers = layer_rows([key[0] for key in cells])
    components = ordered_components(key[1] for key in cells)
    values = np.full((len(layers), len(components)), np.nan)
    for (layer, component), value in cells.items():
        values[layers.index(layer), components.index(component)] = value
    return values, layers, components


def label_grid_axes(ax, layers, components) -> None:
    ax.set_xticks(range(len(components)), components, rotation=35, ha="right")
    step = max(1, len(layers) // 16)
    ticks = list(range(0, len(layers), step))
    ax.set_yticks(ticks, [layer_label(layers[i]) for i in ticks])
    ax.set_xlabel("component")
    ax.set_ylabel("transformer block (layer index)")


def draw_heatmap(ax, values, layers, components, colour_label, norm=None, annotate=None,
                 integer=False):
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=HEATMAP_CMAP, norm=norm,
                      interpolation="nearest")
    label_grid_axes(ax, layers, components)
    ax.set_facecolor("#f0f0f0")
    colourbar = ax.figure.colorbar(image, ax=ax)
    colourbar.set_label(colour_label)
    if integer:
        colourbar.locator = MaxNLocator(integer=True)
        colourbar.update_ticks()
    if annotate is not None and values.size <= 400:
        for (i, j), value in np.ndenumerate(annotate):
            if np.isfinite(value) and value > 0:
                light = np.isfinite(values[i, j]) and image.norm(values[i, j]) > 0.6
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                        color="black" if light or not np.isfinite(values[i, j]) else "white")
    return image


def pair_heatmap(ax, labels: list, pairs: list[dict], value, colour_label: str,
                 signed: bool) -> None:
    """A pairwise measure as a symmetric annotated heatmap (1 on the diagonal): ``value(pair)``
    reads it from each {"a", "b", ...} pair (None: blank); signed measures use the diverging
    colour map over [-1, 1], others viridis over [0, 1]."""
    index = {str(label): i for i, label in enumerate(labels)}
    matrix = np.eye(len(labels))
    for pair in pairs:
        i, j = index[str(pair["a"])], index[str(pair["b"])]
        number = value(pair)
        matrix[i, j] = matrix[j, i] = np.nan if number is None else number
    sns.heatmap(matrix, ax=ax, vmin=-1.0 if signed else 0.0, vmax=1.0,
                cmap=DIVERGING_CMAP if signed else HEATMAP_CMAP, annot=len(labels) <= 10,
                fmt=".2f", square=True, cbar_kws={"label": colour_label},
                xticklabels=labels, yticklabels=labels)
