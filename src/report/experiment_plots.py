"""The experiment plots of a run (``--save-plots``): perturbation effects, compression
recovery, stability and downstream accuracy."""
from __future__ import annotations

import math

import numpy as np

from src.eval.downstream_step import ACCURACY_METRICS
from src.plots.style import (PALETTE, SELECTION_COLOURS, SELECTION_ORDER, SkipPlot,
                             pair_heatmap, plt)
from src.report.plotting import run_plot
from src.report.run_folder import RunFolder
from src.utils.format import is_finite_number, sig


@run_plot("perturbation_effects")
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


@run_plot("stability")
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




@run_plot("downstream_tasks")
def downstream_tasks(run: RunFolder) -> plt.Figure:
    results = run.need("downstream", "needs --downstream-tasks")
    panels = [(task, metric) for task, metrics in results["baseline"].items()
              for metric in ACCURACY_METRICS if metric in metrics]
    if not panels:
        raise SkipPlot("downstream_results.json has no accuracy metrics")
    conditions = results.get("conditions", [])
    groups = _condition_groups(conditions)
    names = ["baseline", *groups]
    figure, axes = plt.subplots(1, len(panels),
                                figsize=(max(4.0, 0.9 * len(names)) * len(panels) + 1, 4.4),
                                squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        base = results["baseline"][task]
        for x, name in enumerate(names):
            if name == "baseline":
                values = [base[metric]]
                err = base.get(f"{metric}_stderr")
            else:
                values = [c["tasks"][task][metric] for c in groups[name]]
                err = float(np.std(values, ddof=1)) if len(values) > 1 else None
            colour = SELECTION_COLOURS.get(groups[name][0]["selection"] if name in groups else
                                           name, PALETTE[7])
            ax.bar(x, float(np.mean(values)), color=colour, edgecolor="black", linewidth=0.4,
                   yerr=err if err is not None and np.isfinite(err) else None, capsize=4)
            if len(values) > 1:
                ax.scatter(np.full(len(values), x), values, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0,
                      ha="right" if len(names) > 4 else "center", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{metric} (fraction correct)")
        ax.set_title(f"{task} {metric} (n={base.get('n')})", fontsize=10)
    figure.suptitle("Downstream accuracy: baseline (± standard error) and each condition "
                    "(dots = seeds, bar = mean ± sd)", fontsize=10)
    figure.tight_layout()
    return figure


def _condition_groups(conditions: list[dict]) -> dict[str, list[dict]]:
    """Conditions by (method, selection), named by the selection alone when one method ran
    (a run with --perturb and --quantize has both); selections in the usual order."""
    methods = {c["method"] for c in conditions}
    rank = {s: i for i, s in enumerate(("none", *SELECTION_ORDER))}
    groups: dict[str, list[dict]] = {}
    for c in sorted(conditions, key=lambda c: (c["method"], rank.get(c["selection"], 9))):
        name = c["selection"] if len(methods) == 1 else f"{c['method']}\n{c['selection']}"
        groups.setdefault(name, []).append(c)
    return groups




@run_plot("compression_recovery")
def compression_recovery(run: RunFolder) -> plt.Figure:
    results = run.need("quantization", "needs --quantize")
    rows = results["conditions"]
    spec = results["quantization"]
    baseline = results["baseline"]["perplexity"]
    kept_sets = [k for k in ("none", *SELECTION_ORDER) if any(r["kept"] == k for r in rows)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.6))
    rtn = next((r["perplexity"] for r in rows if r["kept"] == "none"), math.nan)
    for x, kept in enumerate(kept_sets):
        group = [r for r in rows if r["kept"] == kept]
        colour = SELECTION_COLOURS.get(kept, PALETTE[7])
        jitter = np.linspace(-0.12, 0.12, len(group)) if len(group) > 1 else np.zeros(1)
        left.scatter(x + jitter, [r["perplexity"] for r in group], color=colour, s=36,
                     edgecolor="black", linewidth=0.4, zorder=3)
        if kept != "none":
            recoveries = np.array([r["recovery"] for r in group], dtype=float)
            right.scatter(x + jitter, recoveries, color=colour, s=36, edgecolor="black",
                          linewidth=0.4, zorder=3, label=f"{kept} (n={len(group)})")
            if len(group) > 1 and np.all(np.isfinite(recoveries)):
                right.errorbar(x + 0.25, recoveries.mean(), yerr=recoveries.std(ddof=1), fmt="_",
                               color="black", capsize=4)
    left.axhline(baseline, color="black", linestyle="--", linewidth=1, label="full precision")
    if math.isfinite(rtn):
        left.axhline(rtn, color=PALETTE[7], linestyle=":", linewidth=1, label="nothing kept")
    left.set_yscale("log")
    left.set_xticks(range(len(kept_sets)), ["rtn" if k == "none" else f"keep {k}"
                                            for k in kept_sets])
    left.set_ylabel("perplexity (log scale)")
    left.set_title("Perplexity of the quantized model", fontsize=10)
    left.legend(fontsize=7)
    right.axhline(0, color=PALETTE[7], linestyle=":", linewidth=1)
    right.axhline(1, color="black", linestyle="--", linewidth=1)
    right.set_xticks(range(len(kept_sets)), ["" if k == "none" else f"keep {k}"
                                             for k in kept_sets])
    right.set_ylabel("recovery = (ppl_rtn − ppl_kept) / (ppl_rtn − ppl_baseline)")
    right.set_title("Share of the quantization loss won back (1 = all)", fontsize=10)
    right.legend(fontsize=7)
    versus = results["summary"].get("top_vs_random") or {}
    note = (f"; top-K vs random-K: empirical p = {sig(versus['empirical_p_value'], 3)} "
            f"({versus['n_random_draws']} draws)" if versus else "")
    figure.suptitle(f"{spec['bits']}-bit round-to-nearest ({spec['label']}), keeping K="
                    f"{results['k']} weights by {results['metric']} ({results['mode']}){note}",
                    fontsize=11)
    figure.tight_layout()
    return figure
