"""Comparisons across runs: findings and plots over runs that saw the same data."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.ticker import PercentFormatter

from src.analysis.faithfulness.statistics import ratio
from src.plots.style import PALETTE, SELECTION_COLOURS, plt, save_figure
from src.report import cross_faults
from src.report.findings import jaccard_of, ppl_ratios
from src.report.run_folder import RunFolder
from src.utils.format import sig, times

# Runs are compared only when they saw the same text in the same amounts.
DATA_KEYS = ("data_file", "dataset", "max_length", "max_samples")


def _groups(runs: list[RunFolder], fixed: tuple[str, ...],
            perturbed: bool = True) -> list[list[RunFolder]]:
    """Runs sharing the ``fixed`` settings and the same data (text, block length, blocks)."""
    groups: dict[tuple, list[RunFolder]] = {}
    for run in runs:
        if perturbed and not (run.perturbation and "top_k" in run.summary):
            continue
        groups.setdefault(tuple(str(run.get(k)) for k in fixed + DATA_KEYS), []).append(run)
    return list(groups.values())


def _data_text(run: RunFolder) -> str:
    source = run.get("data_file") or run.get("dataset") or "bundled corpus"
    return f"{source}, {run.get('max_samples')} x {run.get('max_length')}-token blocks"


def _top_ratio(run: RunFolder) -> float:
    return run.summary["top_k"]["mean_perplexity"] / run.perturbation["baseline"]["perplexity"]


def cross_run_findings(runs: list[RunFolder]) -> list[str]:
    findings = []
    for group in _groups(runs, ("model", "topk", "mode", "perturb")):
        by_metric = {}
        for run in group:
            by_metric.setdefault(run.get("metric"), []).append(_top_ratio(run))
        if len(by_metric) > 1:
            first = group[0]
            ranked = sorted(by_metric.items(), key=lambda kv: -np.mean(kv[1]))
            listing = ", then ".join(f"{m} ({times(float(np.mean(v)))})" for m, v in ranked)
            findings.append(f"{first.get('model')}, top-{first.get('topk')} "
                            f"{first.get('mode')}, {first.get('perturb')} ({_data_text(first)}): "
                            f"{listing} (top-K perplexity / baseline, mean over runs).")
    for group in _groups(runs, ("model", "metric", "mode", "perturb")):
        ks = sorted({run.get("topk") for run in group})
        if len(ks) > 1:
            first = group[0]
            points = [(k, float(np.mean([_top_ratio(r) for r in group if r.get("topk") == k])))
                      for k in ks]
            trend = ", ".join(f"{times(v)} at K={k}" for k, v in points)
            findings.append(f"{first.get('model')}, {first.get('metric')} {first.get('mode')}, "
                            f"{first.get('perturb')} ({_data_text(first)}): top-K damage by K: "
                            f"{trend}.")
    for group in _groups([r for r in runs if r.top is not None], ("model", "mode", "topk"),
                         perturbed=False):
        findings += _overlap_findings(group)
    findings += faithfulness_findings(runs)
    for run in runs:
        if run.get("metric") == "random" and run.perturbation and \
                (run.summary.get("top_vs_random") or {}).get("effect_ratio") is not None:
            ratio = run.summary["top_vs_random"]["effect_ratio"]
            verdict = ("behaves like the random-K control, as a null metric should" if ratio < 3
                       else "is far from the random-K control: check the experiment")
            findings.append(f"Null check ({run.label}): the random-score metric's top-K has "
                            f"effect ratio {sig(ratio, 3)} and {verdict}.")
    return findings


def _faithfulness(run: RunFolder) -> dict | None:
    section = (run.enhanced or {}).get("faithfulness")
    return section if isinstance(section, dict) and section.get("summary") else None


def faithfulness_table(runs: list[RunFolder]) -> list[dict]:
    """One row per run with --faithfulness: its method, the first-ranked metric(s), by how much
    over the runner-up and over random-K (areas under Δnll over log10 K)."""
    rows = []
    for run in runs:
        section = _faithfulness(run)
        if section is None:
            continue
        ranked = section["summary"]
        first = [r["metric"] for r in ranked if r["rank"] == 1]
        runner = next((r for r in ranked if r["rank"] > 1), None)
        best = ranked[0]["auc"]
        rows.append({"run": run.label, "model": run.get("model"), "method": section["method"],
                     "mode": section["mode"], "first": " = ".join(first),
                     "area": sig(best), "runner-up": runner["metric"] if runner else "-",
                     "x runner-up": times(ratio(best, runner["auc"])) if runner else "-",
                     "random-K area": sig(section["band"]["auc"])})
    return rows


def faithfulness_findings(runs: list[RunFolder]) -> list[str]:
    """Which metric ranks first by damage area in how many of the runs that compared it."""
    wins: dict[str, int] = {}
    compared: dict[str, int] = {}
    for run in runs:
        section = _faithfulness(run)
        if section is None:
            continue
        for row in section["summary"]:
            compared[row["metric"]] = compared.get(row["metric"], 0) + 1
            wins[row["metric"]] = wins.get(row["metric"], 0) + (row["rank"] == 1)
    if sum(1 for run in runs if _faithfulness(run)) < 2:
        return []
    ranked = sorted(compared, key=lambda m: (-wins[m] / compared[m], m))
    listing = ", ".join(f"{m} first in {wins[m]} of {compared[m]}" for m in ranked)
    return [f"Faithfulness across runs (rank 1 by damage area, ties counted for each): "
            f"{listing}."]


def _overlap_findings(group: list[RunFolder]) -> list[str]:
    """Jaccard of top-K sets between runs of different metrics (same model, K, mode)."""
    by_metric = {}
    for run in group:
        if run.top is not None and run.get("metric") not in by_metric:
            by_metric[run.get("metric")] = set(zip(run.top["parameter"], run.top["flat_index"]))
    names = sorted(by_metric)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = len(by_metric[a] & by_metric[b])
            union = len(by_metric[a] | by_metric[b])
            out.append(f"{a} and {b} agree on {shared} of {len(by_metric[a])} top-K weights "
                       f"(Jaccard {shared / union:.3f}) on {group[0].get('model')}.")
    return out


# ----------------------------------------------------------------------------- cross-run plots

def _ratio_points(runs: list[RunFolder]):
    for run in runs:
        if run.perturbation:
            yield run, ppl_ratios(run)


def _mean_or_inf(values) -> float:
    """Mean of a selection's ratios; inf when any condition overflowed."""
    values = np.asarray(values, dtype=float)
    return float(np.mean(values)) if np.all(np.isfinite(values)) else math.inf


def _inf_ceiling(values) -> float:
    """Where overflowed (inf) points are drawn on a log axis: above every finite value."""
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) * 3 if finite else 10.0


def _label_inf(ax, x, ceiling: float) -> None:
    ax.annotate("inf", (x, ceiling), textcoords="offset points", xytext=(0, 5), ha="center",
                fontsize=7)


METHOD_MARKERS = {"zero": "o", "sign_flip": "s", "gauss_noise": "D", "bit_flip": "X"}


def plot_by(runs: list[RunFolder], key: str, title: str):
    """Perplexity ratio per selection, grouped by ``key``; marker shape = perturbation method."""
    groups = sorted({str(run.get(key)) for run, _ in _ratio_points(runs)})
    if not groups:
        return None
    figure, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(groups) + 3.5), 4.6))
    offsets = {"top_k": -0.22, "random_k": 0.0, "bottom_k": 0.22}
    points = []
    members: dict[str, int] = {}
    for run, ratios in _ratio_points(runs):
        group = str(run.get(key))
        x = groups.index(group) + 0.04 * (members.get(group, 0) % 5 - 2)  # runs side by side
        members[group] = members.get(group, 0) + 1
        for selection, values in ratios.items():
            points.append((x + offsets.get(selection, 0.3), _mean_or_inf(values), selection,
                           run.get("perturb")))
    ceiling = _inf_ceiling([y for _, y, _, _ in points])
    for x, y, selection, method in points:
        ax.scatter(x, y if math.isfinite(y) else ceiling, color=SELECTION_COLOURS.get(selection),
                   marker=METHOD_MARKERS.get(method, "P"), edgecolor="black", linewidth=0.4,
                   s=42, zorder=3)
        if not math.isfinite(y):
            _label_inf(ax, x, ceiling)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xlabel(f"{key} (one marker per run and selection, mean over seeds)")
    ax.set_ylabel("perplexity / baseline perplexity (log scale)")
    ax.set_title(title, fontsize=11)
    _selection_method_legend(ax, {p[2] for p in points}, {p[3] for p in points})
    figure.tight_layout()
    return figure


def _selection_method_legend(ax, selections, methods) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker="o", color=SELECTION_COLOURS.get(s),
                      markeredgecolor="black", label=s)
               for s in ("top_k", "random_k", "bottom_k") if s in selections]
    handles += [Line2D([], [], linestyle="", marker=METHOD_MARKERS.get(m, "P"), color="grey",
                       markeredgecolor="black", label=f"method {m}")
                for m in sorted(methods, key=str)]
    handles.append(Line2D([], [], linestyle="--", color="black", label="baseline (ratio 1)"))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_by_k(runs: list[RunFolder]):
    """Perplexity ratio against K, one colour per (model, metric, mode, method) series; top-K
    solid circles, random-K dashed squares; overflow (inf) drawn at the top and labelled."""
    series: dict[tuple, list] = {}
    for run, ratios in _ratio_points(runs):
        name = (run.get("model"), run.get("metric"), run.get("mode"), run.get("perturb"))
        for selection in ("top_k", "random_k"):
            if selection in ratios:
                series.setdefault(name + (selection,), []).append(
                    (run.get("topk"), _mean_or_inf(ratios[selection])))
    if not series:
        return None
    has_stability = any(run.stability for run in runs)
    names = sorted({key[:4] for key in series}, key=str)
    figure, axes = plt.subplots(1, 2 if has_stability else 1,
                                figsize=(12 if has_stability else 7, 4.6 + 0.18 * len(names)),
                                squeeze=False)
    ax = axes[0, 0]
    ceiling = _inf_ceiling([y for points in series.values() for _, y in points])
    for colour_index, name in enumerate(names):
        colour = PALETTE[colour_index % len(PALETTE)]
        for selection, style in (("top_k", "-o"), ("random_k", "--s")):
            points = sorted(series.get(name + (selection,), []))
            if not points:
                continue
            ks = [k for k, _ in points]
            values = [y if math.isfinite(y) else ceiling for _, y in points]
            ax.plot(ks, values, style, color=colour, markeredgecolor="black", markeredgewidth=0.4,
                    label="/".join(map(str, name)) if selection == "top_k" else None)
            for k, (_, y) in zip(ks, points):
                if not math.isfinite(y):
                    _label_inf(ax, k, ceiling)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (weights perturbed, log scale)")
    ax.set_ylabel("perplexity / baseline (log scale)")
    ax.set_title("Damage by K: top-K solid circles, random-K dashed squares", fontsize=10)
    ax.legend(title="model/metric/mode/method", title_fontsize=7, fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=2 if len(names) > 3 else 1, frameon=False)
    if has_stability:
        _jaccard_by_k(axes[0, 1], runs)
    figure.tight_layout()
    return figure


def _jaccard_by_k(ax, runs: list[RunFolder]):
    for index, family in enumerate(("across_seeds", "across_batches")):
        points = sorted((run.get("topk"), jaccard_of(run, family)) for run in runs
                        if jaccard_of(run, family) is not None)
        if points:
            ks, values = zip(*points)
            ax.scatter(ks, values, color=PALETTE[index], label=family.replace("_", " "),
                       edgecolor="black", linewidth=0.4)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("K (log scale)")
    ax.set_ylabel("mean Jaccard of top-K sets")
    ax.set_title("Stability by K (one dot per run)", fontsize=10)
    ax.legend(fontsize=8)


def plot_recovery_by_k(runs: list[RunFolder]):
    """Recovery of the quantization loss against K: top-K solid, random-K mean dashed, one
    colour per (model, metric, quantization) series."""
    series: dict[tuple, list] = {}
    for run in runs:
        q = run.quantization
        if not q or "top_k" not in q["summary"]:
            continue
        key = (run.get("model"), q["metric"], q["quantization"]["label"])
        random = q["summary"].get("random_k", {}).get("mean_recovery", math.nan)
        series.setdefault(key, []).append((q["k"], q["summary"]["top_k"]["mean_recovery"],
                                           random))
    if not series:
        return None
    figure, ax = plt.subplots(figsize=(7.5, 4.6 + 0.18 * len(series)))
    for index, (key, points) in enumerate(sorted(series.items(), key=str)):
        ks, top, random = zip(*sorted(points))
        colour = PALETTE[index % len(PALETTE)]
        ax.plot(ks, top, "-o", color=colour, markeredgecolor="black", markeredgewidth=0.4,
                label="/".join(map(str, key)))
        ax.plot(ks, random, "--s", color=colour, markeredgecolor="black", markeredgewidth=0.4)
    ax.axhline(0, color="black", linestyle=":", linewidth=1)
    highest = max((value for points in series.values() for _, top, random in points
                   for value in (top, random) if math.isfinite(value)), default=0.0)
    if highest > 0.5:  # the full-recovery line only where the data come near it
        ax.axhline(1, color="black", linestyle="--", linewidth=1, label="full recovery")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xscale("log")
    ax.set_xlabel("K kept at full precision (log scale)")
    ax.set_ylabel("recovery of the quantization loss")
    ax.set_title("Recovery by K: top-K solid circles, random-K mean dashed squares", fontsize=10)
    ax.legend(title="model/metric/quantization", title_fontsize=7, fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    figure.tight_layout()
    return figure


# name -> (caption, function(runs) -> Figure or None when no run has the results it needs)
CROSS_RUN_PLOTS = {
    "by_model": ("Perturbation damage by model",
                 lambda runs: plot_by(runs, "model", "Perturbation damage by model")),
    "by_metric": ("Perturbation damage by metric",
                  lambda runs: plot_by(runs, "metric", "Perturbation damage by metric")),
    "by_k": ("Damage and stability by K", plot_by_k),
    "recovery_by_k": ("Compression: recovery of the quantization loss by K", plot_recovery_by_k),
    **cross_faults.PLOTS,
}


def draw_cross_run_plots(runs: list[RunFolder], folder: Path) -> dict[str, Path]:
    written = {}
    for name, (caption, draw) in CROSS_RUN_PLOTS.items():
        figure = draw(runs)
        if figure is None:
            print(f"[report] cross-run plot {name} skipped: no run has its results")
            continue
        written[name] = Path(save_figure(figure, folder / name, ("png",))[0])
    return written


