"""--architecture-analysis: where in the architecture does sensitivity concentrate?

Per component (attn_q/k/v/o, mlp_gate/up/down, and embedding/head with --include-embeddings) and
per block, over the scored weights only:

* ``n_weights`` and ``weight_share`` = n_weights / all scored weights;
* ``score_mass`` = sum of |score|, ``mass_share``, ``mean_score`` = score_mass / n_weights, and
  ``mass_enrichment`` = mass_share / weight_share (= mean_score / overall mean);
* ``topk_count`` in a global top-K, ``topk_share`` = count / K, ``expected_topk_count`` =
  K x weight_share (uniform selection), and ``enrichment`` = topk_share / weight_share.

The top-K is the run's selection in global mode; in per_tensor mode (every tensor gets K by
construction) it is the global top-K of the same size. Fused q/k/v weights (GPT-2 ``c_attn``,
GPT-NeoX ``query_key_value``) are split row-wise into q/k/v slices (components.py); a fused
weight of an unknown layout stays ``attn_qkv``. Norm weights and biases are 1-D and never scored;
embeddings and the head are only scored with --include-embeddings: ``not_scored`` lists them.

Depth: blocks cut into early/middle/late thirds, and Spearman correlation of block index with
the block's mean |score| and with its top-K count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr

from src.analysis.context import AnalysisContext, finite_or_none, global_selection, layer_key
from src.analysis.registry import Analysis, register
from src.models.components import ParamMeta, component_of, fused_qkv_row_parts, to_out_in
from src.models.properties import attention_heads
from src.options import Settings, option
from src.sensitivity.eligibility import unscored_reason
from src.sensitivity.rank import Selection, selection_size
from src.distributed.sharding import local_rows
from src.sensitivity.statistics import to_host
from src.utils.format import sig

QKV = ("attn_q", "attn_k", "attn_v")
ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o")
MLP = ("mlp_gate", "mlp_up", "mlp_down")


@dataclass(frozen=True)
class ArchitectureSettings(Settings):
    architecture_analysis: bool = option(
        False, "score mass, top-K counts and enrichment per component and per layer; depth "
        "trend; q/k/v/o and MLP comparison (fused q/k/v split)", group="advanced analysis")


@dataclass
class Slice:
    """A scored tensor or one q/k/v slice of a fused one."""
    parameter: str
    component: str
    layer: int | None
    n_weights: int
    mass: float | torch.Tensor  # sum of |score|; a device tensor until all_slices syncs once
    topk_count: int


def tensor_slices(name: str, score: torch.Tensor, meta: ParamMeta, selected: torch.Tensor | None,
                  row_parts: torch.Tensor | None, rows: range) -> list[Slice]:
    """One Slice per tensor, or three (q, k, v) when ``row_parts`` labels its output rows.
    ``score`` holds the stored rows ``rows`` (all of them unless --shard): the masses are then
    this rank's part, added up over the ranks by the caller."""
    a = score.detach().float().abs()
    picked = selected.cpu() if selected is not None else torch.empty(0, dtype=torch.long)
    if row_parts is None:
        return [Slice(name, meta.component, meta.layer, math.prod(meta.shape_out_in), a.sum(),
                      int(picked.numel()))]
    if meta.transposed:  # stored [in, out]: every output column, summed over the rows held
        row_mass, parts = a.sum(dim=0), row_parts.to(a.device)
    else:
        row_mass, parts = a.sum(dim=1), row_parts[rows.start:rows.stop].to(a.device)
    mass = torch.zeros(3, device=a.device).index_add_(0, parts, row_mass)
    n_in = meta.shape_out_in[1]
    rows_per_part = torch.bincount(row_parts, minlength=3)
    top_rows = to_out_in(meta, picked)[0]
    top_per_part = torch.bincount(row_parts[top_rows], minlength=3)
    return [Slice(name, QKV[i], meta.layer, int(rows_per_part[i]) * n_in, mass[i],
                  int(top_per_part[i])) for i in range(3)]


def all_slices(scores, metas, selection: Selection, model, layout=None) -> tuple[list[Slice], dict]:
    model_type = getattr(model.config, "model_type", "")
    n_heads, n_kv = attention_heads(model.config)
    params = dict(model.named_parameters())
    slices, fused = [], {}
    for name, score in scores.items():
        meta = metas[name]
        parts = None
        if meta.component == "attn_qkv":
            parts = fused_qkv_row_parts(meta, model_type, n_heads, n_kv)
            fused[name] = "split into q/k/v" if parts is not None else \
                f"layout of model type '{model_type}' unknown: kept as attn_qkv"
        slices += tensor_slices(name, score, meta, selection.get(name), parts,
                                local_rows(params[name]))
    masses = [s.mass for s in slices]  # each rank's part of every mass under --shard
    masses = to_host(masses) if layout is None else layout.ranks.reduced(masses).tolist()
    for s, mass in zip(slices, masses):
        s.mass = mass
    return slices, fused


def aggregate(slices: list[Slice], key) -> dict[str, dict]:
    """Group slices by ``key(slice)``; shares, means and enrichments as in the module doc."""
    n_all = sum(s.n_weights for s in slices)
    mass_all = sum(s.mass for s in slices)
    k_all = sum(s.topk_count for s in slices)
    groups: dict[str, dict] = {}
    for s in slices:
        g = groups.setdefault(key(s), {"tensors": set(), "n_weights": 0, "score_mass": 0.0,
                                       "topk_count": 0})
        g["tensors"].add(s.parameter)
        g["n_weights"] += s.n_weights
        g["score_mass"] += s.mass
        g["topk_count"] += s.topk_count
    for g in groups.values():
        g["n_tensors"] = len(g.pop("tensors"))
        g.update(enrichment_numbers(g["n_weights"], g["score_mass"], g["topk_count"],
                                    n_all, mass_all, k_all))
    return groups


def enrichment_numbers(n_weights: int, mass: float, topk: int, n_all: int, mass_all: float,
                       k_all: int) -> dict:
    weight_share = n_weights / n_all
    mass_share = mass / mass_all if mass_all else float("nan")
    topk_share = topk / k_all if k_all else float("nan")
    return {"weight_share": weight_share, "mean_score": mass / n_weights,
            "mass_share": mass_share, "mass_enrichment": mass_share / weight_share,
            "topk_share": topk_share, "expected_topk_count": k_all * weight_share,
            "enrichment": topk_share / weight_share}


def depth_trend(by_layer: dict[str, dict]) -> dict:
    keys = sorted((k for k in by_layer if k != "none"), key=int)
    if not keys:
        return {"n_layers": 0}
    layers = np.array([int(k) for k in keys])
    means = np.array([by_layer[k]["mean_score"] for k in keys])
    counts = np.array([by_layer[k]["topk_count"] for k in keys])
    thirds = {}
    for label, part in zip(("early", "middle", "late"), np.array_split(np.arange(len(keys)), 3)):
        if part.size == 0:
            continue
        n = sum(by_layer[keys[i]]["n_weights"] for i in part)
        mass = sum(by_layer[keys[i]]["score_mass"] for i in part)
        topk = sum(by_layer[keys[i]]["topk_count"] for i in part)
        thirds[label] = {"layers": [int(layers[part[0]]), int(layers[part[-1]])],
                         "n_weights": n, "score_mass": mass, "topk_count": topk,
                         "mean_score": mass / n,
                         "mass_share": mass / sum(g["score_mass"] for g in by_layer.values()),
                         "topk_share": topk / max(1, sum(g["topk_count"] for g in by_layer.values()))}
    return {"n_layers": len(keys), "thirds": thirds,
            "spearman_layer_vs_mean_score": _rho(layers, means),
            "spearman_layer_vs_topk_count": _rho(layers, counts),
            "peak_mean_score_layer": int(layers[int(np.argmax(means))]),
            "peak_topk_layer": int(layers[int(np.argmax(counts))])}


def _rho(x, y) -> dict | None:
    if len(x) < 3 or np.all(y == y[0]):
        return None
    result = spearmanr(x, y)
    return {"rho": finite_or_none(result.statistic), "p_value": finite_or_none(result.pvalue)}


def compare(by_component: dict[str, dict], names) -> dict:
    """The named components side by side, ordered by mean |score| (highest first)."""
    present = [c for c in names if c in by_component]
    keep = ("n_weights", "mean_score", "mass_share", "topk_count", "enrichment", "mass_enrichment")
    order = sorted(present, key=lambda c: -by_component[c]["mean_score"])
    return {"by_mean_score": order,
            "components": {c: {k: by_component[c][k] for k in keep} for c in present}}


def not_scored(model, scored: set[str]) -> dict[str, dict[str, int]]:
    """Components of parameters that were not scored, with the reason and a tensor count."""
    kept_by_id = {}
    out: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = kept_by_id.setdefault(id(p), name)
        if name in scored:
            continue
        reason = unscored_reason(name, p, first, scored)
        slot = out.setdefault(component_of(name), {})
        slot[reason] = slot.get(reason, 0) + 1
    return out


def architecture_analysis(scores, metas, selection: Selection, mode: str, model,
                          layout=None) -> dict:
    """``layout`` (sharding.Layout) under --shard: ``scores`` are this rank's rows."""
    glob = global_selection(scores, selection, mode, layout)
    slices, fused = all_slices(scores, metas, glob, model, layout)
    by_component = aggregate(slices, lambda s: s.component)
    by_layer = aggregate(slices, lambda s: layer_key(s.layer))
    layer_component = {}
    for s in slices:
        cell = layer_component.setdefault(layer_key(s.layer), {}).setdefault(
            s.component, {"n_weights": 0, "score_mass": 0.0, "topk_count": 0})
        cell["n_weights"] += s.n_weights
        cell["score_mass"] += s.mass
        cell["topk_count"] += s.topk_count
    for row in layer_component.values():
        for cell in row.values():
            cell["mean_score"] = cell["score_mass"] / cell["n_weights"]
    return {"topk_from": "run's global top-K" if mode == "global" else
                         "global top-K of the same size as the run's per_tensor selection",
            "k": selection_size(glob), "n_weights": sum(s.n_weights for s in slices),
            "scored_components": sorted(by_component, key=lambda c: -by_component[c]["n_weights"]),
            "not_scored": not_scored(model, set(scores)), "fused_qkv": fused,
            "by_component": by_component, "by_layer": by_layer,
            "layer_component": layer_component,
            "depth": depth_trend(by_layer),
            "attention": compare(by_component, ATTENTION), "mlp": compare(by_component, MLP)}


def run(ctx: AnalysisContext) -> dict:
    return {"metric": ctx.metric,
            **architecture_analysis(ctx.scores, ctx.metas, ctx.selection, ctx.mode, ctx.model,
                                    ctx.layout)}


def summary_lines(section: dict) -> list[str]:
    lines = [f"architecture ({section['metric']}, top-{section['k']} global): component, share of "
             f"weights, share of top-K, enrichment"]
    for name, g in sorted(section["by_component"].items(), key=lambda kv: -kv[1]["enrichment"]):
        lines.append(f"  {name:<10} {100 * g['weight_share']:6.2f}%  {100 * g['topk_share']:6.2f}%  "
                     f"{g['enrichment']:6.2f}x  (mean score {g['mean_score']:.3e})")
    depth = section["depth"]
    if depth.get("spearman_layer_vs_mean_score"):
        rho = depth["spearman_layer_vs_mean_score"]["rho"]
        lines.append(f"  depth: Spearman(layer, mean score) {rho:.3f}; peak mean score at layer "
                     f"{depth['peak_mean_score_layer']}, most top-K at layer {depth['peak_topk_layer']}")
    return lines


def findings(section: dict) -> list[str]:
    depth = section.get("depth", {})
    rho = depth.get("spearman_layer_vs_mean_score") or {}
    lines = []
    if rho.get("rho") is not None:
        direction = "falls" if rho["rho"] < 0 else "rises"
        p_value = rho.get("p_value")
        trend = (f"Mean {section.get('metric')} score {direction} with depth"
                 if p_value is not None and p_value <= 0.05 else
                 f"No significant depth trend in the mean {section.get('metric')} score")
        lines.append(f"{trend} (Spearman ρ = {rho['rho']:.2f}, p = {sig(p_value, 2)}); peak "
                     f"layer {depth.get('peak_mean_score_layer')}.")
    by_component = {k: v for k, v in section.get("by_component", {}).items()
                    if isinstance(v, dict) and v.get("enrichment") is not None}
    if by_component:
        best = max(by_component, key=lambda k: by_component[k]["enrichment"])
        lines.append(f"Top-{section.get('k')} weights are most over-represented in {best} "
                     f"({by_component[best]['enrichment']:.2f}x their share of weights; "
                     f"{by_component[best]['topk_count']} selected).")
    return lines


def plot_depth(section: dict):
    from src.plots.style import PALETTE, SkipPlot, plt

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
    upper.set_ylabel(f"mean {section.get('metric')} score\n(log scale)")
    rho = depth.get("spearman_layer_vs_mean_score") or {}
    upper.set_title(f"Sensitivity over depth ({section.get('metric')}): Spearman ρ(layer, mean "
                    f"score) = {sig(rho.get('rho'), 3)}, p = {sig(rho.get('p_value'), 3)}",
                    fontsize=10)
    lower.bar(layers, enrichment, color=PALETTE[1], edgecolor="black", linewidth=0.3)
    lower.axhline(1.0, color="black", linestyle="--", linewidth=1, label="uniform share (1)")
    lower.set_ylabel("top-K enrichment\n(count / count expected by size)")
    lower.set_xlabel("transformer block (layer index)")
    rho = depth.get("spearman_layer_vs_topk_count") or {}
    lower.set_title(f"Where the top-{section.get('k')} weights sit over depth: Spearman "
                    f"ρ(layer, top-K count) = {sig(rho.get('rho'), 3)}", fontsize=10)
    lower.legend(fontsize=8)
    figure.tight_layout()
    return figure


register(Analysis(
    key="architecture", flag="--architecture-analysis",
    run=run, summary=summary_lines, findings=findings,
    settings=(ArchitectureSettings,), enabled=lambda s: s.architecture_analysis,
    plots={"architecture_depth": plot_depth}))
