"""The study's results as one tidy table, and the multiple-comparison corrections over it.

``study.csv`` / ``study.parquet``: one row per finished run x condition (the baseline, every
perturbation condition, every quantization condition), with the run's id, label and value of
every varying setting, the condition's own numbers (perplexity, NLL, token accuracy, Δppl with
its paired-bootstrap 95% interval, ppl ratio, recovery, ...) and the run's top-K vs random-K test
of that experiment (z, empirical p, effect ratio) with its Holm and Benjamini-Hochberg adjusted
p-values over every such test of the study. Only runs whose manifest says ``succeeded`` count;
no timing enters the table, so a resumed study's table equals an uninterrupted one's.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from src.report.run_folder import RunFolder
from src.study.state import StudyFolder
from src.utils.io import write_text

EXPERIMENTS = ("perturbation", "quantization")  # RunFolder attributes, named as in the table
TEST_FIELDS = {"z_score": "z", "empirical_p_value": "p", "effect_ratio": "effect_ratio",
               "log_ppl_ratio_to_random": "log_ppl_ratio_to_random",
               "difference": "recovery_difference"}
LEADING = ["run_id", "label", "experiment", "condition", "selection", "seed", "method"]


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order:
    sorted ascending, p_(i) x (m - i + 1) made monotone by a running maximum, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = p.size
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), through scipy."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=float)
    return false_discovery_control(p, method="bh") if p.size else p


def run_rows(run: RunFolder, run_id: str, label: str, varying: dict) -> list[dict]:
    head = {"run_id": run_id, "label": label, **{k: _cell(v) for k, v in varying.items()}}
    rows = []
    evaluated = run.perturbation or run.quantization
    if evaluated:
        rows.append({**head, "experiment": "baseline", "condition": "baseline",
                     "selection": "baseline", **_scalars(evaluated["baseline"])})
    for experiment in EXPERIMENTS:
        results = getattr(run, experiment)
        if not results:
            continue
        test = (results.get("summary") or {}).get("top_vs_random") or {}
        tested = {column: test.get(field) for field, column in TEST_FIELDS.items()
                  if field in test}
        for row in results["conditions"]:
            # a compression condition's selection is the set it keeps (none, top_k, random_k)
            selection = row.get("selection", row.get("kept"))
            rows.append({**head, **_scalars(row), "experiment": experiment,
                         "condition": _condition(row), "selection": selection, **tested})
    return rows


def _condition(row: dict) -> str:
    name = row.get("condition") or row.get("selection")
    return name if row.get("seed") is None else f"{name}/seed{row['seed']}"


def _scalars(row: dict) -> dict:
    """The row's numbers and names; a [low, high] pair as two columns."""
    out = {}
    for key, value in row.items():
        if key == "seconds" or key.endswith("_seconds"):  # timings differ between two studies
            continue
        if isinstance(value, (list, tuple)) and len(value) == 2:
            out[f"{key}_low"], out[f"{key}_high"] = value
        elif not isinstance(value, (dict, list, tuple)):
            out[key] = value
    return out


def _cell(value):
    return ",".join(map(str, value)) if isinstance(value, list) else value


def study_table(folder: StudyFolder, runs) -> pd.DataFrame:
    """Every done run's rows, in plan order, with the corrected p-values."""
    rows = []
    for planned in runs:
        if folder.state(planned.id) != "done":
            continue
        run = RunFolder.read(folder.run_dir(planned.id), planned.label)
        rows += run_rows(run, planned.id, planned.label, planned.varying)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = with_corrections(table)
    if "seed" in table:  # integers with gaps (the deterministic conditions have none)
        table["seed"] = table["seed"].astype("Int64")
    ordered = [c for c in LEADING if c in table] + [c for c in table if c not in LEADING]
    return table[ordered]


def with_corrections(table: pd.DataFrame) -> pd.DataFrame:
    """p_holm and p_bh: one test per run and experiment (its top-K vs random-K p), corrected
    over all of them, copied onto that experiment's rows."""
    if "p" not in table:
        return table
    tests = table.dropna(subset=["p"]).drop_duplicates(["run_id", "experiment"])
    tests = tests[["run_id", "experiment", "p"]].assign(
        p_holm=holm(tests["p"]), p_bh=benjamini_hochberg(tests["p"]))
    return table.merge(tests.drop(columns="p"), on=["run_id", "experiment"], how="left")


def write_table(folder: StudyFolder, table: pd.DataFrame) -> list:
    """study.csv and study.parquet, each written atomically."""
    csv_path = folder.root / "study.csv"
    write_text(csv_path, table.to_csv(index=False))
    parquet_path = folder.root / "study.parquet"
    temporary = parquet_path.with_name(".study.parquet.tmp")
    table.to_parquet(temporary, index=False)
    temporary.replace(parquet_path)
    return [csv_path, parquet_path]
