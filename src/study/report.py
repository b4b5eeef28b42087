"""The study report (``<study>/report/study_report.md`` and ``.html``): the runs and their state,
every top-K vs random-K test of the study with its effect size and interval, its empirical p and
the Holm and Benjamini-Hochberg adjusted p over all of them, and one plot per varying setting.

Effect sizes: top-K Δppl (perplexity change of the top-K condition against the baseline) with
its paired-bootstrap 95% interval over evaluation blocks, the top-K / random-K perplexity ratio,
and for the compression experiment the recovery difference (top-K kept minus random-K kept).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.plots.style import SELECTION_COLOURS, plt, save_figure
from src.report.document import Doc, to_html, to_markdown
from src.utils.format import ppl, sig, times
from src.utils.io import write_text

ALPHA = 0.05


def tests_of(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run and experiment that compared top-K with random-K: the top-K row."""
    if table.empty or "p" not in table:
        return pd.DataFrame()
    tested = table.dropna(subset=["p"])
    return tested[tested["selection"] == "top_k"].drop_duplicates(["run_id", "experiment"])


def test_rows(tests: pd.DataFrame) -> list[dict]:
    rows = []
    for _, test in tests.iterrows():
        if test["experiment"] == "quantization":
            effect = f"recovery {sig(test.get('recovery'), 3)} vs random " \
                     f"(difference {sig(test.get('recovery_difference'), 3)})"
        else:
            effect = (f"Δppl {sig(test.get('delta_perplexity'), 4)} "
                      f"[{sig(test.get('delta_perplexity_ci95_low'), 3)}, "
                      f"{sig(test.get('delta_perplexity_ci95_high'), 3)}]; "
                      f"{times(float(np.exp(test.get('log_ppl_ratio_to_random', np.nan))))} "
                      f"random-K")
        rows.append({"run": test["label"], "id": test["run_id"],
                     "experiment": test["experiment"], "effect (95% CI)": effect,
                     "z": _z_text(test.get("z")), "p": sig(test["p"], 3),
                     "p Holm": sig(test["p_holm"], 3), "p BH": sig(test["p_bh"], 3),
                     f"BH < {ALPHA}": "yes" if test["p_bh"] < ALPHA else "no"})
    return rows


def _z_text(z) -> str:
    """A z that the run left undefined (random-K spread below what the evaluation resolves)."""
    return sig(z, 3) if z is not None and np.isfinite(z) else "undefined"


def axis_plot(table: pd.DataFrame, axis: str, out_stem: Path) -> list[str]:
    """Perplexity ratio to the baseline of every top-K and random-K condition against the
    values of one varying setting (one point per condition, log scale)."""
    shown = table[table["selection"].isin(["top_k", "random_k"]) & table["ppl_ratio"].notna()]
    if shown.empty or axis not in shown:
        return []
    values = list(dict.fromkeys(shown[axis].astype(str)))
    figure, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(values) + 2), 3.6))
    for offset, selection in ((-0.12, "top_k"), (0.12, "random_k")):
        part = shown[shown["selection"] == selection]
        x = [values.index(str(v)) + offset for v in part[axis]]
        ax.scatter(x, part["ppl_ratio"].clip(upper=1e6), s=18, alpha=0.8,
                   color=SELECTION_COLOURS[selection], label=selection.replace("_", "-"))
    ax.set_xticks(range(len(values)), values, rotation=30 if len(values) > 5 else 0)
    ax.set_yscale("log")
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel(axis)
    ax.set_ylabel("perplexity / baseline")
    ax.set_title(f"Damage by {axis}")
    ax.legend(frameon=False)
    return save_figure(figure, out_stem)


def write_report(root: Path, name: str, axes: list[str], states: dict[str, int],
                 table: pd.DataFrame) -> list[Path]:
    out = root / "report"
    doc = Doc()
    doc.heading(1, f"Study {name}")
    doc.paragraph(", ".join(f"{n} {state}" for state, n in states.items()) +
                  " runs; the table of every run x condition is study.csv / study.parquet.")
    tests = tests_of(table)
    if not tests.empty:
        significant = int((tests["p_bh"] < ALPHA).sum())
        doc.heading(2, "Top-K against random-K, corrected for multiple comparisons")
        doc.paragraph(f"{len(tests)} tests (one per run and experiment: the empirical p of "
                      f"top-K against its random-K draws); {significant} stay below {ALPHA} "
                      f"after Benjamini-Hochberg (false discovery rate), "
                      f"{int((tests['p_holm'] < ALPHA).sum())} after Holm (family-wise error). "
                      f"An empirical p cannot fall below 1/(draws + 1): with few random-K seeds "
                      f"no correction can reach significance.")
        doc.table(test_rows(tests))
    if not table.empty:
        baseline = table[table["experiment"] == "baseline"]
        if not baseline.empty:
            doc.paragraph(f"Baseline perplexity: {ppl(baseline['perplexity'].iloc[0])} "
                          f"(first run).")
        doc.heading(2, "Damage by setting")
        for axis in axes:
            for path in axis_plot(table, axis, out / f"axis_{axis}"):
                doc.image(Path(path), f"perplexity ratio by {axis}")
    paths = [write_text(out / "study_report.md", to_markdown(doc, out))]
    paths.append(write_text(out / "study_report.html", to_html(doc, out, f"Study {name}")))
    return paths
