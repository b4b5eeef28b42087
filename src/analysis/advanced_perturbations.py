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
  run (scoring, ranking, controls; see ``eligible_restriction``); this experiment then perturbs
  the global top-K of the targeted set and of each targeted component on its own, each against
  its --controls, and records which components and layers each selection touched.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from src.analysis.context import AnalysisContext, cap_ks
from src.errors import UserError
from src.models.components import COMPONENTS
from src.sensitivity import experiment
from src.sensitivity.metrics import parse_layers
from src.sensitivity.rank import Selection, selection_size, top_k

NEVER_SCORED = {"norm": "norm weights are 1-D and never scored", "other": "'other' is not a target"}
EMBEDDING_LIKE = ("embedding", "pos_embedding", "head")


# ----------------------------------------------------------------------------- targeting

def eligible_restriction(layers: str | None, target_layers: str | None,
                         target_components, include_embeddings: bool) -> tuple[set | None, set | None]:
    """(layers, components) for ``eligible_parameters``: --layers and --target-layers intersect."""
    chosen = parse_layers(layers)
    if target_layers:
        try:
            targeted = parse_layers(target_layers)
        except UserError:
            raise UserError(f"bad --target-layers '{target_layers}': use indices and ranges like "
                            f"0-3,10") from None
        chosen = targeted if chosen is None else chosen & targeted
    components = set(target_components) if target_components else None
    for name in components or ():
        if name not in COMPONENTS:
            raise UserError(f"unknown --target-components entry '{name}'; choose from "
                            f"{', '.join(c for c in COMPONENTS if c not in NEVER_SCORED)}")
        if name in NEVER_SCORED:
            raise UserError(f"--target-components {name}: {NEVER_SCORED[name]}")
        if name in EMBEDDING_LIKE and not include_embeddings:
            raise UserError(f"--target-components {name} needs --include-embeddings")
    return chosen, components


def describe_targeting(config, metas) -> dict:
    components: dict[str, int] = {}
    for meta in metas.values():
        components[meta.component] = components.get(meta.component, 0) + 1
    return {"target_components": list(config.target_components),
            "target_layers": config.target_layers, "layers": config.layers,
            "eligible_tensors": len(metas), "tensors_per_component": components,
            "eligible_layers": sorted({m.layer for m in metas.values() if m.layer is not None}),
            "note": "the whole run (scoring, ranking, controls, every analysis) used this set"}


# ----------------------------------------------------------------------------- shared

def experiment_on(ctx: AnalysisContext, scores, selection: Selection, k: int, mode: str,
                  controls: list[str]) -> dict:
    """One top-K experiment against ``controls`` (random_k / bottom_k) over the run's seeds."""
    c = ctx.config
    conditions = experiment.build_conditions(selection, scores, k, mode, controls, list(c.seeds),
                                             ctx.method, ctx.options)
    rows, restored = experiment.run_conditions(ctx.params, conditions, ctx.method, ctx.options,
                                               ctx.evaluate, ctx.baseline)
    return {"k": k, "n_weights": selection_size(selection),
            "touched": touched(selection, ctx.metas),
            "summary": experiment.summarize(rows, ctx.baseline.perplexity),
            "conditions": rows, "restore_verified": restored}


def touched(selection: Selection, metas) -> dict:
    components: dict[str, int] = {}
    for name, idx in selection.items():
        components[metas[name].component] = components.get(metas[name].component, 0) + int(idx.numel())
    return {"components": components,
            "layers": sorted({metas[n].layer for n in selection if metas[n].layer is not None})}


def _header(ctx: AnalysisContext) -> dict:
    return {"method": ctx.method, "method_from": "--perturb" if ctx.config.perturb else
            "default (no --perturb given)", "options": vars(ctx.options),
            "seeds": list(ctx.config.seeds), "baseline": ctx.baseline.summary()}


# ----------------------------------------------------------------------------- progressive

def progressive(ctx: AnalysisContext) -> dict:
    c = ctx.config
    ks, capped = cap_ks(c.progressive_k, ctx.sizes, c.mode)
    points = []
    for k in tqdm(ks, desc="progressive K", disable=not c.verbose, leave=False):
        points.append(experiment_on(ctx, ctx.scores, top_k(ctx.scores, k, c.mode), k, c.mode,
                                    ["random_k"]))
    curve = {"k": ks, "n_weights": [p["n_weights"] for p in points],
             "top_k_perplexity": [p["summary"]["top_k"]["mean_perplexity"] for p in points],
             "random_k_mean_perplexity": [p["summary"]["random_k"]["mean_perplexity"] for p in points],
             "random_k_sd_perplexity": [p["summary"]["random_k"]["sd_perplexity"] for p in points]}
    return {**_header(ctx), "mode": c.mode, "k_requested": list(c.progressive_k),
            "k_capped": capped, "curve": curve, "points": points,
            "restore_verified": all(p["restore_verified"] for p in points)}


# ----------------------------------------------------------------------------- clustered

def clustered(ctx: AnalysisContext) -> dict:
    from src.analysis.weight_analysis import profiles_and_clusters

    c = ctx.config
    _, clustering = profiles_and_clusters(ctx)
    results = {}
    items = clustering["clusters"].items()
    for label, cluster in tqdm(items, desc="clusters", disable=not c.verbose, leave=False):
        scores = {n: ctx.scores[n] for n in cluster["tensors"]}
        k = min(c.topk, cluster["n_weights"])
        result = experiment_on(ctx, scores, top_k(scores, k, "global"), k, "global",
                               list(c.controls))
        results[label] = {"n_tensors": cluster["n_tensors"], "tensors": cluster["tensors"],
                          "components": cluster["components"], **result}
    return {**_header(ctx), "clustering_method": clustering["method"],
            "silhouette": clustering["silhouette"], "mode": "global within each cluster",
            "clusters": results,
            "restore_verified": all(r["restore_verified"] for r in results.values())}


# ----------------------------------------------------------------------------- targeted

def targeted(ctx: AnalysisContext) -> dict:
    c = ctx.config
    groups = {"all_targeted": list(ctx.scores)}
    by_component: dict[str, list[str]] = {}
    for name in ctx.scores:
        by_component.setdefault(ctx.metas[name].component, []).append(name)
    if len(by_component) > 1:
        groups.update(by_component)
    results = {}
    for group, names in tqdm(groups.items(), desc="targets", disable=not c.verbose, leave=False):
        scores = {n: ctx.scores[n] for n in names}
        k = min(c.topk, sum(s.numel() for s in scores.values()))
        results[group] = {"n_tensors": len(names),
                          **experiment_on(ctx, scores, top_k(scores, k, "global"), k, "global",
                                          list(c.controls))}
    return {**_header(ctx), "targeting": describe_targeting(c, ctx.metas),
            "mode": "global within each group", "groups": results,
            "restore_verified": all(r["restore_verified"] for r in results.values())}


ADVANCED = {"progressive": progressive, "clustered": clustered, "targeted": targeted}


def run(ctx: AnalysisContext, name: str) -> dict:
    return ADVANCED[name](ctx)


# ----------------------------------------------------------------------------- console

def summary_lines(name: str, section: dict) -> list[str]:
    if name == "progressive":
        curve = section["curve"]
        lines = [f"progressive {section['method']} ({section['mode']}): K, top-K ppl, random-K ppl "
                 f"(baseline {section['baseline']['perplexity']:.3f})"]
        for k, top, rnd in zip(curve["k"], curve["top_k_perplexity"], curve["random_k_mean_perplexity"]):
            lines.append(f"  {k:>8}  {_g(top):>12}  {_g(rnd):>12}")
        return lines
    groups = section["clusters"] if name == "clustered" else section["groups"]
    lines = [f"{name} {section['method']}: group, K, top-K ppl, control ppl (mean over seeds)"]
    for label, g in groups.items():
        summary = g["summary"]
        controls = ", ".join(f"{sel} {_g(summary[sel]['mean_perplexity'])}"
                             for sel in summary if sel not in ("top_k", "top_vs_random"))
        lines.append(f"  {label:<14} K={g['k']:<6} top-K {_g(summary['top_k']['mean_perplexity'])}"
                     f"  {controls}")
    return lines


def _g(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) and abs(value) < 1e5 else f"{value:.3e}" \
        if isinstance(value, float) else str(value)
