"""--advanced-perturbations progressive,clustered,targeted: perturbation experiments beyond one K.

All three reuse the perturbation experiment (src/sensitivity/experiment.py): the same
conditions, exact restore, bootstrap intervals and top-K vs random-K statistics. The method is
--perturb (``zero`` when --perturb is not given), with its options and --seeds.

* ``progressive``: for each K in --progressive-k (capped at the largest K the run's mode allows),
  the top-K and, per seed, a random-K of the same size from the same eligible weights and mode.
  The result holds a K-vs-perplexity curve for both.
* ``clustered``: tensors are clustered by sensitivity profile (as in --weight-analysis); for one
  cluster at a time, the global top-K within that cluster's tensors against the --controls drawn
  from the same tensors (K capped at the cluster's size).
* ``targeted``: --target-components / --target-layers restrict the eligible weights of the whole
  run (scoring, ranking, controls); this experiment then perturbs the global top-K of the
  targeted set and of each targeted component on its own, each against its --controls, and
  records which components and layers each selection touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from src.analysis.clustering import ClusteringSettings, check_clusterable, profiles_and_clusters
from src.analysis.context import AnalysisContext, cap_ks
from src.analysis.registry import Analysis, register
from src.analysis.targeting import describe_targeting
from src.options import Settings, int_list, name_list, option
from src.sensitivity import experiment
from src.sensitivity.perturb import changed_by
from src.sensitivity.rank import Selection, selection_size, top_k
from src.utils.format import fixed, pct, times

KINDS = ("progressive", "clustered", "targeted")
GROUP = "advanced analysis"


@dataclass(frozen=True)
class AdvancedSettings(Settings):
    advanced_perturbations: tuple[str, ...] = option(
        (), "comma-separated: progressive (K-vs-perplexity curve, top-K vs random-K), clustered "
        "(top-K of one tensor cluster at a time), targeted (top-K of the --target-* set and of "
        "each targeted component); method: --perturb, else zero", group=GROUP,
        parse=name_list(lambda: KINDS))
    progressive_k: tuple[int, ...] = option(
        (1, 10, 100, 1000, 10000), "progressive: comma-separated K values, capped at the "
        "eligible weights", group=GROUP, parse=int_list(1),
        used_when=("--advanced-perturbations progressive",
                   lambda c: c.analysis_enabled("progressive_perturbation")))

    def problems(self, config):
        if "targeted" in self.advanced_perturbations and \
                not (config.target_components or config.target_layers):
            yield "--advanced-perturbations targeted needs --target-components and/or " \
                  "--target-layers"


# ----------------------------------------------------------------------------- shared

def experiment_on(ctx: AnalysisContext, scores, selection: Selection, k: int, mode: str,
                  controls) -> dict:
    """One top-K experiment against ``controls`` (random_k / bottom_k) over the run's seeds."""
    conditions = experiment.build_conditions(selection, scores, k, mode, list(controls),
                                             list(ctx.seeds), ctx.method, ctx.options,
                                             layout=ctx.layout,
                                             eligible=changed_by(ctx.method, ctx.options,
                                                                 ctx.params))
    rows, restored = experiment.run_conditions(ctx.params, conditions, ctx.method, ctx.options,
                                               ctx.evaluate, ctx.baseline, layout=ctx.layout)
    return {"k": k, "n_weights": selection_size(selection),
            "touched": touched(selection, ctx.metas),
            "summary": experiment.summarize(rows, ctx.baseline.perplexity,
                                            experiment.perplexity_resolution(ctx.baseline)),
            "conditions": rows, "restore_verified": restored}


def touched(selection: Selection, metas) -> dict:
    components: dict[str, int] = {}
    for name, idx in selection.items():
        component = metas[name].component
        components[component] = components.get(component, 0) + int(idx.numel())
    return {"components": components,
            "layers": sorted({metas[n].layer for n in selection if metas[n].layer is not None})}


def _header(ctx: AnalysisContext) -> dict:
    return {"method": ctx.method, "method_from": "--perturb" if ctx.settings.perturb else
            "default (no --perturb given)", "options": ctx.options.recorded(),
            "seeds": list(ctx.seeds), "baseline": ctx.baseline.summary()}


def _top_k_within(ctx: AnalysisContext, names) -> dict:
    """The global top-K (K capped at the group's size) of the tensors ``names`` against the
    run's controls drawn from the same tensors."""
    scores = {n: ctx.scores[n] for n in names}
    k = min(ctx.k, sum(ctx.sizes[n] for n in names))
    return experiment_on(ctx, scores, top_k(scores, k, "global", layout=ctx.layout), k, "global",
                         ctx.controls)


# ----------------------------------------------------------------------------- the three kinds

def progressive(ctx: AnalysisContext) -> dict:
    ks, capped = cap_ks(ctx.settings.progressive_k, ctx.sizes, ctx.mode)
    points = []
    for k in tqdm(ks, desc="progressive K", disable=not ctx.progress, leave=False):
        points.append(experiment_on(ctx, ctx.scores, top_k(ctx.scores, k, ctx.mode,
                                                           layout=ctx.layout), k,
                                    ctx.mode, ["random_k"]))
    summaries = [p["summary"] for p in points]
    curve = {"k": ks, "n_weights": [p["n_weights"] for p in points],
             "top_k_perplexity": [s["top_k"]["mean_perplexity"] for s in summaries],
             "random_k_mean_perplexity": [s["random_k"]["mean_perplexity"] for s in summaries],
             "random_k_sd_perplexity": [s["random_k"]["sd_perplexity"] for s in summaries]}
    return {**_header(ctx), "mode": ctx.mode, "k_requested": list(ctx.settings.progressive_k),
            "k_capped": capped, "curve": curve, "points": points,
            "restore_verified": all(p["restore_verified"] for p in points)}


def clustered(ctx: AnalysisContext) -> dict:
    _, clustering = profiles_and_clusters(ctx)
    results = {}
    for label, cluster in tqdm(clustering["clusters"].items(), desc="clusters",
                               disable=not ctx.progress, leave=False):
        results[label] = {"n_tensors": cluster["n_tensors"], "tensors": cluster["tensors"],
                          "components": cluster["components"],
                          **_top_k_within(ctx, cluster["tensors"])}
    return {**_header(ctx), "clustering_method": clustering["method"],
            "silhouette": clustering["silhouette"], "mode": "global within each cluster",
            "clusters": results,
            "restore_verified": all(r["restore_verified"] for r in results.values())}


def targeted(ctx: AnalysisContext) -> dict:
    groups = {"all_targeted": list(ctx.scores)}
    by_component: dict[str, list[str]] = {}
    for name in ctx.scores:
        by_component.setdefault(ctx.metas[name].component, []).append(name)
    if len(by_component) > 1:
        groups.update(by_component)
    results = {}
    for group, names in tqdm(groups.items(), desc="targets", disable=not ctx.progress,
                             leave=False):
        results[group] = {"n_tensors": len(names), **_top_k_within(ctx, names)}
    return {**_header(ctx), "targeting": describe_targeting(ctx.settings, ctx.metas),
            "mode": "global within each group", "groups": results,
            "restore_verified": all(r["restore_verified"] for r in results.values())}


# ----------------------------------------------------------------------------- console, report

def summary_lines(name: str, section: dict) -> list[str]:
    if name == "progressive":
        curve = section["curve"]
        lines = [f"progressive {section['method']} ({section['mode']}): K, top-K ppl, random-K "
                 f"ppl (baseline {fixed(section['baseline']['perplexity'])})"]
        for k, top, rnd in zip(curve["k"], curve["top_k_perplexity"],
                               curve["random_k_mean_perplexity"]):
            lines.append(f"  {k:>8}  {fixed(top):>12}  {fixed(rnd):>12}")
        return lines
    groups = section["clusters"] if name == "clustered" else section["groups"]
    lines = [f"{name} {section['method']}: group, K, top-K ppl, control ppl (mean over seeds)"]
    for label, g in groups.items():
        summary = g["summary"]
        controls = ", ".join(f"{sel} {fixed(summary[sel]['mean_perplexity'])}"
                             for sel in summary if sel not in ("top_k", "top_vs_random"))
        lines.append(f"  {label:<14} K={g['k']:<6} top-K "
                     f"{fixed(summary['top_k']['mean_perplexity'])}  {controls}")
    return lines


def progressive_findings(section: dict) -> list[str]:
    curve, base = section["curve"], section["baseline"]["perplexity"]
    top = [f"{times(p / base)} at K={k}" for k, p in zip(curve["k"], curve["top_k_perplexity"])]
    moves = [abs(p / base - 1) for p in curve["random_k_mean_perplexity"]]
    lines = [f"Progressive {section['method']} ({section['mode']}): top-K perplexity "
             f"{', '.join(top)}; random-K mean within {pct(max(moves))} of the baseline at "
             f"every K."]
    damage = np.asarray(curve["top_k_perplexity"], dtype=float)
    falls = [f"K={curve['k'][i]} → {curve['k'][i + 1]}" for i in range(len(damage) - 1)
             if damage[i + 1] < damage[i]]
    if falls:
        peak = int(np.argmax(damage))
        lines.append(f"Damage is not monotone in K: perturbing more top weights lowered the "
                     f"perplexity at {', '.join(falls)}; the peak is at K={curve['k'][peak]} "
                     f"({times(damage[peak] / base)}).")
    return lines


def group_findings(kind: str, groups: dict, base: float) -> list[str]:
    """One line ranking the groups (clusters or targets) by the damage of their top-K."""
    rows = []
    for label, group in groups.items():
        summary = group["summary"]
        random = summary.get("random_k", {}).get("mean_perplexity")
        rows.append((summary["top_k"]["mean_perplexity"] / base, label, group, random))
    if not rows:
        return []
    rows.sort(key=lambda r: -r[0])  # most damaging first (inf first)
    parts = []
    for ratio, label, group, random in rows:
        components = list(group.get("components", {}).items())
        what = ", ".join(f"{c} {n}" for c, n in components[:2]) + \
            ("…" if len(components) > 2 else "")
        name = f"{kind} {label} ({group['n_tensors']} tensors" + (f": {what})" if what else ")")
        control = f", random-K {times(random / base)}" if random is not None else ""
        parts.append(f"{name}: top-{group['k']} {times(ratio)}{control}")
    return [f"{kind.capitalize()} perturbation, damage per {kind} (perplexity / baseline): "
            + "; ".join(parts) + "."]


def plot_progressive(section: dict):
    from src.plots.style import SELECTION_COLOURS, plt

    curve, baseline = section["curve"], section["baseline"]["perplexity"]
    ks = np.asarray(curve["k"], dtype=float)
    top = np.asarray(curve["top_k_perplexity"], dtype=float)
    rnd = np.asarray(curve["random_k_mean_perplexity"], dtype=float)
    sd = np.nan_to_num(np.asarray(curve["random_k_sd_perplexity"], dtype=float))
    ceiling = np.nanmax(np.concatenate([top[np.isfinite(top)], rnd[np.isfinite(rnd)],
                                        [baseline]])) * 3
    figure, ax = plt.subplots(figsize=(7.5, 4.8))
    low, high = np.array([_top_interval(point, baseline) for point in section["points"]]).T
    finite = np.isfinite(top)
    colour = SELECTION_COLOURS["top_k"]
    ax.plot(ks[finite], top[finite], "-o", color=colour, label="top-K",
            markeredgecolor="black", markeredgewidth=0.4)
    if not finite.all():
        ax.scatter(ks[~finite], np.full((~finite).sum(), ceiling), marker="^", color=colour,
                   edgecolor="black", linewidth=0.4, label="top-K perplexity inf")
        for k in ks[~finite]:
            ax.annotate("inf", (k, ceiling), ha="center", va="bottom", fontsize=8)
    usable = np.isfinite(low) & np.isfinite(high) & finite
    ax.fill_between(ks[usable], low[usable], high[usable], color=colour, alpha=0.2,
                    label="top-K bootstrap 95% interval")
    ax.errorbar(ks, np.where(np.isfinite(rnd), rnd, ceiling), yerr=sd, fmt="--s",
                color=SELECTION_COLOURS["random_k"], capsize=3,
                label=f"random-K mean ± sd ({len(section.get('seeds', []))} seeds)")
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


def _register(kind: str, run, findings, **extra) -> None:
    settings = extra.pop("settings", ())
    register(Analysis(
        key=f"{kind}_perturbation", run=run, findings=findings,
        flag=f"--advanced-perturbations {kind}",
        summary=lambda section: summary_lines(kind, section),
        settings=(AdvancedSettings, *settings), reads=("perturb", *extra.pop("reads", ())),
        enabled=lambda s: kind in s.advanced_perturbations, **extra))


_register("progressive", progressive, progressive_findings,
          plots={"progressive_curve": plot_progressive})
_register("clustered", clustered,
          lambda s: group_findings("cluster", s["clusters"], s["baseline"]["perplexity"]),
          settings=(ClusteringSettings,), prepare=check_clusterable)
_register("targeted", targeted,
          lambda s: group_findings("target", s["groups"], s["baseline"]["perplexity"]),
          reads=("target_components", "target_layers", "layers"))
