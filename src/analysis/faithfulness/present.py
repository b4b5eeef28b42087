"""What --faithfulness shows: its files, console lines, report sentences, table and plots."""
from __future__ import annotations

import numpy as np
import pandas as pd

from src.analysis.faithfulness.measure import HUTCHINSON
from src.analysis.faithfulness.statistics import PREDICTORS, ratio
from src.sensitivity import experiment
from src.utils.format import fixed, sig, times
from src.utils.io import write_json
from src.utils.report_console import score_facts_text

FILES = ("faithfulness.json", "faithfulness.csv")


def write_files(section: dict, out_dir) -> list[str]:
    write_json(out_dir / "faithfulness.json", section)
    tidy_frame(section).to_csv(out_dir / "faithfulness.csv", index=False)
    return list(FILES)


def tidy_frame(section: dict) -> pd.DataFrame:
    """One row per measured set: curve points, band draws, random prediction sets."""
    predicted = {row["set"]: row for row in section["predictions"]}
    rows = []
    for kind, source, name_of in (
            ("curve", section["curves"], lambda r: f"top_k_{r['metric']}_k{r['k']}" + (
                "" if r["seed"] is None else f"_s{r['seed']}")),
            ("random_band", section["random_band"], lambda r: f"random_k_k{r['k']}_s{r['seed']}")):
        for r in source:
            rows.append({"kind": kind, "set": name_of(r), "metric": r.get("metric", "random_k"),
                         "k": r["k"], "seed": r["seed"], "perplexity": r["perplexity"],
                         "delta_nll": r["delta_nll"], **_predicted(predicted[name_of(r)])})
    for name, p in predicted.items():
        if name.startswith("random_set_"):
            rows.append({"kind": "random_set", "set": name, "metric": None, "k": p["size"],
                         "seed": None, "perplexity": None, "delta_nll": None, **_predicted(p)})
    return pd.DataFrame(rows)


def _predicted(p: dict) -> dict:
    return {"method": p["method"], "delta_l2": p["delta_l2"],
            "measured_delta_nll": p["measured_delta_nll"],
            "first_order": p["first_order"], "second_order": p["second_order"]}


def winner_text(section: dict) -> str:
    rows = section["summary"]
    first = [r for r in rows if r["rank"] == 1]
    band_auc = section["band"]["auc"]
    if len(first) > 1:
        names = " and ".join(r["metric"] for r in first)
        return f"{names} tie for the most damage (area {sig(first[0]['auc'])} nats·decade, " \
               f"within the random band's own spread {sig(section['band']['tie_tolerance'])})"
    best = first[0]
    runner = next((r for r in rows if r["rank"] > 1), None)
    text = f"{best['metric']} finds the most damaging weights: area {sig(best['auc'])} " \
           f"nats·decade"
    if runner is not None:
        text += f" against {sig(runner['auc'])} for {runner['metric']} " \
                f"({times(ratio(best['auc'], runner['auc']))})"
    return text + f" and {sig(band_auc)} for random-K"


def summary_lines(section: dict) -> list[str]:
    lines = [f"faithfulness ({section['method']}, {section['mode']}, K {section['k'][0]}.."
             f"{section['k'][-1]}): {winner_text(section)}",
             "  rank  metric            auc    K at 2x ppl  (random-K)"]
    for r in section["summary"]:
        lines.append(f"  {r['rank']:>4}  {r['metric']:<16} {fixed(r['auc'], 3):>6}  "
                     f"{str(r['k_at_2x']):>11}  ({r['random_k_at_2x']})")
    for a in section["agreement"]:
        lines.append(f"  {a['predictor']} {a['method']}: Spearman {fixed(a['spearman'])}, "
                     f"Pearson {fixed(a['pearson'])} (n={a['n']}), " + (
                         f"median relative error > 50% from sets of {a['breaks_at_size']}"
                         if a["breaks_at_size"] else "median relative error <= 50% throughout"))
    return lines


def findings(section: dict) -> list[str]:
    out = [f"Faithfulness ({section['method']}, {section['mode']}): {winner_text(section)}."]
    second = [a for a in section["agreement"] if a["predictor"] == "second_order"]
    for a in second:
        first = next(b for b in section["agreement"] if b["predictor"] == "first_order"
                     and b["method"] == a["method"])
        resolved = a["n"] - a["n_unresolved"]
        if not resolved:
            breaks = "no set changed the calibration NLL by more than the evaluation resolves"
        elif a["breaks_at_size"]:
            breaks = f"its median relative error passes 50% from sets of " \
                     f"{a['breaks_at_size']} weights" + (
                         f" and from changes of ‖δ‖₂ ≥ {sig(a['breaks_at_delta_l2'], 2)}"
                         if a.get("breaks_at_delta_l2") else "")
        else:
            breaks = f"its median relative error stays under 50% for every set size tried " \
                     f"({resolved} sets resolved)"
        out.append(f"Taylor predictions of calibration damage ({a['method']}, {a['n']} sets): "
                   f"second order Spearman {fixed(a['spearman'])} (first order "
                   f"{fixed(first['spearman'])}); {breaks}.")
    if second and section.get("hessian_diagonal"):
        out.append("The second-order term's h: " + score_facts_text(
            HUTCHINSON, section["hessian_diagonal"]) + " (a noisy h blurs the second order).")
    return out


def summary_table(section: dict) -> list[dict]:
    return [{"rank": r["rank"], "metric": r["metric"], "auc (nats·decade)": sig(r["auc"]),
             "K at 2x ppl": r["k_at_2x"], "random-K at 2x": r["random_k_at_2x"],
             "ppl / random at largest K": times(r["ratio_to_random"][-1])}
            for r in section["summary"]]


# ----------------------------------------------------------------------------- plots

def plot_curves(section: dict):
    from src.plots.style import PALETTE, plt

    ks = section["k"]
    band = section["band"]["by_k"]
    baseline = section["baseline"]["perplexity"]
    figure, ax = plt.subplots(figsize=(8, 5))
    low = [b["min_perplexity"] / baseline for b in band]
    high = [b["max_perplexity"] / baseline for b in band]
    ax.fill_between(ks, _plottable(low), _plottable(high), color="0.8",
                    label=f"random-K band ({len(section['seeds'])} seeds, min-max)")
    ax.plot(ks, _plottable([b["mean_perplexity"] / baseline for b in band]), color="0.4",
            linestyle="--", label="random-K mean")
    for i, row in enumerate(section["summary"]):
        points = [p for p in section["curves"] if p["metric"] == row["metric"]]
        ratio = [experiment.mean_sd([p["perplexity"] for p in points if p["k"] == k])[0]
                 / baseline for k in ks]
        ax.plot(ks, _plottable(ratio), marker="o", color=PALETTE[i % len(PALETTE)],
                label=f"{row['metric']} (rank {row['rank']}, area {sig(row['auc'])})")
    if np.nanmax(_plottable(high) + [1.0]) >= 1.5:  # the doubling line, when the data reach it
        ax.axhline(2.0, color="0.6", linewidth=0.8, linestyle=":", label="perplexity x2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"K (top-K weights, {section['mode']})")
    ax.set_ylabel("perplexity / baseline")
    ax.set_title(f"Damage by metric: {section['method']} of each metric's top-K")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _plottable(values) -> list[float]:
    """Overflowed (inf) points are left out of a log-scale line rather than drawn at 0."""
    return [v if np.isfinite(v) and v > 0 else np.nan for v in values]


def plot_predictions(section: dict):
    from src.plots.style import PALETTE, plt

    frame = pd.DataFrame(section["predictions"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    for ax, predictor in zip(axes, PREDICTORS):
        finite = frame[np.isfinite(frame[predictor]) & np.isfinite(frame["measured_delta_nll"])]
        for i, method in enumerate(sorted(finite["method"].unique())):
            part = finite[finite["method"] == method]
            ax.scatter(part[predictor], part["measured_delta_nll"], s=10, alpha=0.6,
                       color=PALETTE[i % len(PALETTE)], label=method)
        if len(finite):
            span = float(np.nanmax(np.abs(finite[[predictor, "measured_delta_nll"]].to_numpy())))
            ax.plot([-span, span], [-span, span], color="0.3", linewidth=0.8, label="y = x")
        ax.set_xscale("symlog", linthresh=section["resolution_delta_nll"] * 10 or 1e-6)
        ax.set_yscale("symlog", linthresh=section["resolution_delta_nll"] * 10 or 1e-6)
        ax.set_xlabel(f"predicted Δ NLL, {predictor.replace('_', ' ')} (nats)")
        ax.set_title(predictor.replace("_", " "))
    axes[0].set_ylabel("measured Δ NLL on the calibration blocks (nats)")
    axes[0].legend(fontsize=8)
    figure.suptitle("Taylor predictions of damage against measurement")
    figure.tight_layout()
    return figure
