"""--weight-analysis: a sensitivity profile per weight tensor, clustering of tensors by profile
(src/analysis/clustering.py), and hotspots: tensors, rows and input channels where the top-K
weights bunch up.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from src.analysis.clustering import ClusteringSettings, check_clusterable, profiles_and_clusters
from src.analysis.context import AnalysisContext, global_selection
from src.analysis.registry import Analysis, register
from src.models.components import ParamMeta, to_out_in
from src.models.properties import hidden_size
from src.options import Settings, option
from src.sensitivity.rank import Selection, selection_size
from src.utils.format import sig

N_HOTSPOTS = 10


@dataclass(frozen=True)
class WeightAnalysisSettings(Settings):
    weight_analysis: bool = option(
        False, "per-tensor sensitivity profiles (quantiles, share of score held by the top "
        "0.01%%/1%%), clustering of tensors by profile, and hotspots (rows / input channels "
        "where top-K weights bunch up)", group="advanced analysis")


# ----------------------------------------------------------------------------- hotspots

def line_hotspots(selection: Selection, metas: dict[str, ParamMeta], top: int = N_HOTSPOTS) -> list[dict]:
    """Rows (output units) and columns (input channels) of one tensor holding several top-K
    weights. ``fold`` = count / (n selected in the tensor / lines on that axis), the multiple of
    what uniform placement would put there."""
    found = []
    for name, idx in selection.items():
        n = idx.numel()
        if n < 2:
            continue
        meta = metas[name]
        rows, cols = to_out_in(meta, idx.cpu())
        n_out, n_in = meta.shape_out_in[0], meta.shape_out_in[1]
        for axis, coords, n_lines in (("row", rows, n_out), ("col", cols, n_in)):
            counts = torch.bincount(coords, minlength=n_lines)
            count, where = counts.max(dim=0)
            if int(count) >= 2:
                found.append({"parameter": name, "layer": meta.layer, "component": meta.component,
                              "axis": axis, "index": int(where), "count": int(count),
                              "n_selected_in_tensor": n, "share": int(count) / n,
                              "fold_over_uniform": int(count) / (n / n_lines)})
    return sorted(found, key=lambda h: (-h["fold_over_uniform"], -h["count"]))[:top]


# Components whose input is the (normalised) residual stream, and those whose output is added to
# it. Norms scale each channel, so channel j means the same hidden unit on both sides. A shape
# test would not do: o_proj's input (the heads' output) can have the hidden size too.
READS_RESIDUAL = ("attn_q", "attn_k", "attn_v", "attn_qkv", "mlp_gate", "mlp_up", "head")
WRITES_RESIDUAL = ("attn_o", "mlp_down")


def channel_hotspots(selection: Selection, metas: dict[str, ParamMeta], hidden: int,
                     top: int = N_HOTSPOTS) -> dict:
    """Residual-stream channels shared by top-K weights across tensors: ``reads`` counts the
    input channel (column) of weights that read the residual stream, ``writes`` the output
    channel (row) of weights that write it; ``fold_over_uniform`` = count / (n / hidden)."""
    result = {}
    for role, axis, components in (("reads", 1, READS_RESIDUAL), ("writes", 0, WRITES_RESIDUAL)):
        counts = torch.zeros(hidden, dtype=torch.long)
        tensors = torch.zeros(hidden, dtype=torch.long)
        n_total = 0
        for name, idx in selection.items():
            meta = metas[name]
            if meta.component not in components or meta.shape_out_in[axis] != hidden:
                continue
            coords = to_out_in(meta, idx.cpu())[axis]
            per_channel = torch.bincount(coords, minlength=hidden)
            counts += per_channel
            tensors += (per_channel > 0).long()
            n_total += idx.numel()
        order = torch.argsort(counts, descending=True, stable=True)[:top]
        expected = n_total / hidden
        result[role] = {"components": list(components), "n_weights": n_total,
                        "expected_per_channel": expected,
                        "top_channels": [{"channel": int(ch), "count": int(counts[ch]),
                                          "n_tensors": int(tensors[ch]),
                                          "fold_over_uniform": int(counts[ch]) / expected}
                                         for ch in order.tolist() if int(counts[ch]) > 0]}
    return result


def tensor_hotspots(selection: Selection, sizes: dict[str, int], metas,
                    top: int = N_HOTSPOTS) -> list[dict]:
    """Tensors holding the most of a global top-K, with enrichment over their share of weights."""
    k_total = selection_size(selection)
    n_total = sum(sizes.values())
    rows = []
    for name, idx in selection.items():
        share = idx.numel() / k_total
        expected = sizes[name] / n_total
        rows.append({"parameter": name, "layer": metas[name].layer,
                     "component": metas[name].component, "count": int(idx.numel()),
                     "share_of_topk": share, "share_of_weights": expected,
                     "enrichment": share / expected})
    return sorted(rows, key=lambda r: -r["count"])[:top]


def hotspots(ctx: AnalysisContext) -> dict:
    mode = ctx.mode
    glob = global_selection(ctx.scores, ctx.selection, mode, ctx.layout)
    return {
        "k": ctx.k, "mode": mode,
        "lines_from": f"the run's top-K ({mode})",
        "lines": line_hotspots(ctx.selection, ctx.metas),
        "channels": channel_hotspots(ctx.selection, ctx.metas, hidden_size(ctx.model)),
        "tensors_from": f"global top-{selection_size(glob)}",
        "tensors": tensor_hotspots(glob, ctx.sizes, ctx.metas),
    }


# ----------------------------------------------------------------------------- step

def run(ctx: AnalysisContext) -> dict:
    profiles, clustering = profiles_and_clusters(ctx)
    shares = np.array([p["top_share_1pct"] for p in profiles.values()])
    names = list(profiles)
    return {"metric": ctx.metric, "n_tensors": len(profiles),
            "profiles": profiles,
            "heaviest_tail": names[int(np.nanargmax(shares))] if len(shares) else None,
            "clustering": clustering, "hotspots": hotspots(ctx)}


def summary_lines(section: dict) -> list[str]:
    c = section["clustering"]
    noise = f" + {c['n_noise']} noise tensors" if c.get("n_noise") else ""
    quality = f"silhouette {c['silhouette']:.3f}" if c["silhouette"] is not None else \
        f"silhouette {c['silhouette_note']}"
    lines = [f"weight analysis: {section['n_tensors']} tensors, {c['method']} -> "
             f"{c['n_clusters_found']} clusters{noise}, {quality}"]
    heavy = section["heaviest_tail"]
    if heavy:
        p = section["profiles"][heavy]
        lines.append(f"  heaviest tail: {heavy}: top 1% of weights hold "
                     f"{100 * p['top_share_1pct']:.1f}% of its score")
    for role, part in section["hotspots"]["channels"].items():
        if part["top_channels"]:
            t = part["top_channels"][0]
            lines.append(f"  hidden channel {t['channel']} {role}: {t['count']} top-K weights in "
                         f"{t['n_tensors']} tensors ({t['fold_over_uniform']:.1f}x uniform)")
    return lines


def findings(section: dict) -> list[str]:
    hotspots = section.get("hotspots") or {}
    out = []
    lines = hotspots.get("lines") or []
    if lines:
        h = lines[0]
        axis = "input column" if h["axis"] == "col" else "output row"
        out.append(f"Strongest line hotspot: {h['count']} of the {h['n_selected_in_tensor']} "
                   f"selected weights of {h['parameter']} sit on {axis} {h['index']} "
                   f"({h['fold_over_uniform']:.0f}x what a uniform spread would give).")
    for role, part in (hotspots.get("channels") or {}).items():
        if part.get("top_channels"):
            t = part["top_channels"][0]
            verb = "read from" if role == "reads" else "write to"
            out.append(f"Residual channel {t['channel']}: {t['count']} selected weights in "
                       f"{t['n_tensors']} tensor(s) {verb} it ({t['fold_over_uniform']:.1f}x "
                       f"uniform).")
    return out


def plot_clusters(section: dict):
    from matplotlib.colors import ListedColormap

    from src.plots.style import colours, draw_heatmap, grid, label_grid_axes, plt

    profiles, clustering = section["profiles"], section.get("clustering") or {}
    labels = clustering.get("labels") or {}
    tail = {(p["layer"], p["component"]): p.get("top_share_1pct") for p in profiles.values()}
    clusters = {(profiles[n]["layer"], profiles[n]["component"]): lab for n, lab in labels.items()
                if n in profiles}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 0.2 * len({k[0] for k in tail}) + 3))
    tail_grid, layers, components = grid({k: v for k, v in tail.items() if v is not None})
    draw_heatmap(right, tail_grid, layers, components,
                 "share of the tensor's score held by its top 1% of weights")
    right.set_title("Heavy tails: score share of the top 1% of weights (0.01 = none)",
                    fontsize=10)
    if not clusters:
        left.set_axis_off()
        figure.tight_layout()
        return figure
    names = sorted(set(clusters.values()), key=str)
    label_grid, layers_c, components_c = grid({k: float(names.index(v))
                                               for k, v in clusters.items()})
    image = left.imshow(np.ma.masked_invalid(label_grid), aspect="auto",
                        cmap=ListedColormap(colours(len(names))), vmin=-0.5,
                        vmax=len(names) - 0.5, interpolation="nearest")
    label_grid_axes(left, layers_c, components_c)
    bar = figure.colorbar(image, ax=left, ticks=range(len(names)))
    bar.ax.set_yticklabels(["noise" if n == -1 else str(n) for n in names])
    bar.set_label("cluster")
    silhouette = clustering.get("silhouette")
    quality = "silhouette undefined" if silhouette is None else f"silhouette {sig(silhouette, 3)}"
    left.set_title(f"Tensors clustered by sensitivity profile ({clustering.get('method')}, "
                   f"{quality})", fontsize=10)
    figure.tight_layout()
    return figure


register(Analysis(
    key="weight_analysis", flag="--weight-analysis",
    run=run, summary=summary_lines, findings=findings,
    settings=(WeightAnalysisSettings, ClusteringSettings), prepare=check_clusterable,
    enabled=lambda s: s.weight_analysis, plots={"weight_clusters": plot_clusters}))
