"""Hardware faults across runs: one table row per run with --fault-injection or --bit-search,
the critical rate per bit position of every injection run (Wilson 95% intervals), and every
search's perplexity curve against its random flips."""
from __future__ import annotations

import math

import numpy as np

from src.analysis.faults.present import format_label, rate_text
from src.plots.style import PALETTE, plt
from src.report.run_folder import RunFolder
from src.utils.format import times


def _section(run: RunFolder, key: str) -> dict | None:
    section = (run.enhanced or {}).get(key)
    return section if isinstance(section, dict) else None


def faults_table(runs: list[RunFolder]) -> list[dict]:
    """Per run: the upsets' critical rate with its interval, the flips the search needed for
    10x and 100x perplexity, and random flips of the search's final count."""
    rows = []
    for run in runs:
        injected, searched = _section(run, "fault_injection"), _section(run, "bit_search")
        if injected is None and searched is None:
            continue
        row = {"run": run.label, "model": run.get("model"),
               "bits": format_label(injected or searched)}
        if injected:
            overall = injected["overall"]
            row["critical upsets"] = f"{rate_text(overall)} of {overall['n']}"
        if searched:
            row["flips to 10x"] = searched["flips_to"].get("10x") or "-"
            row["flips to 100x"] = searched["flips_to"].get("100x") or "-"
            last = searched["steps"][-1]["eval_ppl_ratio"] if searched["steps"] else None
            row["search ppl"] = times(last) if last is not None else "-"
            random = searched["random_flips"][-1] if searched["random_flips"] else None
            row["random flips ppl"] = "-" if random is None else times(
                random["mean_perplexity"] / searched["baseline"]["perplexity"])
        rows.append(row)
    return rows


def plot_fault_rates(runs: list[RunFolder]):
    sections = [(run, s) for run in runs if (s := _section(run, "fault_injection"))]
    if not sections:
        return None
    width = 0.8 / len(sections)
    bits = sorted({r["value"] for _, s in sections for r in s["by"]["bit"]})
    figure, ax = plt.subplots(figsize=(min(12, max(7, 0.3 * len(bits) + 3)), 4.6))
    for i, (run, section) in enumerate(sections):
        rows = {r["value"]: r for r in section["by"]["bit"]}
        x = np.array([bits.index(b) for b in rows]) + (i - (len(sections) - 1) / 2) * width
        rate = np.array([r["rate"] for r in rows.values()]) * 100
        error = [rate - np.array([r["ci_low"] for r in rows.values()]) * 100,
                 np.array([r["ci_high"] for r in rows.values()]) * 100 - rate]
        ax.bar(x, rate, width, yerr=error, capsize=1.5, color=PALETTE[i % len(PALETTE)],
               ecolor="0.3", label=f"{run.label} ({format_label(section)})")
    ax.set_xticks(range(len(bits)), [str(b) for b in bits])
    ax.set_xlabel("bit position (0 = least significant)")
    ax.set_ylabel("critical upsets (%), Wilson 95% interval")
    ax.set_title("Single-bit upsets by bit position")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_search_curves(runs: list[RunFolder]):
    sections = [(run, s) for run in runs if (s := _section(run, "bit_search")) and s["steps"]]
    if not sections:
        return None
    figure, ax = plt.subplots(figsize=(7.5, 4.6))
    for i, (run, section) in enumerate(sections):
        colour = PALETTE[i % len(PALETTE)]
        measured = [r for r in section["steps"] if r["eval_ppl_ratio"] is not None]
        ax.plot([0] + [r["step"] for r in measured],
                [1.0] + [_plottable(r["eval_ppl_ratio"]) for r in measured], marker="o",
                color=colour, label=f"{run.label} ({format_label(section)})")
        for row in section["random_flips"]:
            ax.scatter([row["n_flips"]] * len(row["ppl_ratio"]),
                       [_plottable(v) for v in row["ppl_ratio"]], color=colour, marker="x")
    ax.set_yscale("log")
    ax.set_xlabel("bit flips (x: random flips of the same count, per seed)")
    ax.set_ylabel("evaluation perplexity / baseline")
    ax.set_title("Progressive bit search")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _plottable(value) -> float:
    return value if value is not None and math.isfinite(value) else np.nan


PLOTS = {"fault_rates": ("Hardware faults: critical single-bit upsets by bit position",
                         plot_fault_rates),
         "bit_search": ("Hardware faults: progressive bit search against random flips",
                        plot_search_curves)}
