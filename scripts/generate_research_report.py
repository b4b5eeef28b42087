#!/usr/bin/env python3
"""Research report over many runs, from the output contract files only.

    python scripts/generate_research_report.py --input-dirs results/ more_results/ \\
        --output reports/summary --format md,html

Every folder below the inputs that holds ``config.json`` or ``experiment_manifest.json`` is a run.
For each run the report reads config.json, experiment_manifest.json, perturbation_results.json,
stability_results.json, top_weights.csv and, when present, downstream_results.json and
enhanced_analysis.json, and lists the plots in its plots/ folder. It writes:

* ``PREFIX.md`` (figures in ``PREFIX_figures/``, run plots linked relative to the report) and/or
  ``PREFIX.html`` (self-contained: every PNG embedded as base64);
* a table of runs, cross-run plots (by model, by metric, by K), findings computed from the
  numbers, and one section per run with its plots.

Runs are labelled by their path below the input folder; where two inputs hold runs of the same
name, the input's name (then its position) is prefixed, so no run or figure overwrites another.
A run folder with unreadable JSON is reported and skipped; the exit status is 0 when at least
one run was read, 2 otherwise.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src.errors import UserError  # noqa: E402
from src.sensitivity.experiment import summarize  # noqa: E402
from src.utils import visualize  # noqa: E402
from src.utils.visualize import PALETTE, SELECTION_COLOURS, plt, save_figure  # noqa: E402

RUN_MARKERS = ("config.json", "experiment_manifest.json")
JSON_FILES = {"config": "config.json", "manifest": "experiment_manifest.json",
              "perturbation": "perturbation_results.json",
              "stability": "stability_results.json", "downstream": "downstream_results.json",
              "enhanced": "enhanced_analysis.json"}
REPORT_FORMATS = ("md", "html")


# ----------------------------------------------------------------------------- reading runs

class RunError(Exception):
    """A run folder that cannot be read (the message names the file and the problem)."""


@dataclass
class Run:
    label: str
    path: Path
    config: dict
    manifest: dict | None = None
    perturbation: dict | None = None
    stability: dict | None = None
    downstream: dict | None = None
    enhanced: dict | None = None
    top: pd.DataFrame | None = None
    plots: list[Path] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        """Per-selection statistics (as the run wrote them, else recomputed the same way)."""
        p = self.perturbation
        return p.get("summary") or summarize(p["conditions"], p["baseline"]["perplexity"])

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_") or "run"

    def get(self, key, default=None):
        return self.config.get(key, default)


def find_run_folders(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(input folder, run folder) for every run below each input, in a stable order."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()  # overlapping inputs: each run once
    for root in inputs:
        if not root.is_dir():
            raise UserError(f"--input-dirs '{root}' is not a folder")
        folders = {p.parent for marker in RUN_MARKERS for p in root.rglob(marker)}
        for folder in sorted(folders):
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                found.append((root, folder))
    return found


def unique_labels(pairs: list[tuple[Path, Path]]) -> list[str]:
    """Path below the input; prefixed by the input's name, then its position, on collisions."""
    roots = list(dict.fromkeys(root for root, _ in pairs))
    labels = [_relative(root, folder) for root, folder in pairs]
    for widen in (lambda i: f"{pairs[i][0].resolve().name}/{labels[i]}",
                  lambda i: f"input{roots.index(pairs[i][0]) + 1}/{labels[i]}"):
        counts = pd.Series(labels).value_counts()
        labels = [widen(i) if counts[label] > 1 else label for i, label in enumerate(labels)]
    return labels


def _relative(root: Path, folder: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    return folder.resolve().name if rel == "." else rel


def read_json_file(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise RunError(f"{path.name} is not valid JSON (line {error.lineno}, column "
                       f"{error.colno}: {error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"{path.name} cannot be read ({error})") from None


def load_run(folder: Path, label: str) -> Run:
    data = {}
    for key, name in JSON_FILES.items():
        if (folder / name).is_file():
            data[key] = read_json_file(folder / name)
            if not isinstance(data[key], dict):
                raise RunError(f"{name} does not hold a JSON object")
    config = data.pop("config", None) or (data.get("manifest") or {}).get("config")
    if not isinstance(config, dict):
        raise RunError("neither config.json nor the manifest holds the run's configuration")
    run = Run(label, folder, config, **data)
    _check_perturbation(run)
    if (folder / "top_weights.csv").is_file():
        try:
            run.top = pd.read_csv(folder / "top_weights.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise RunError(f"top_weights.csv cannot be parsed ({error})") from None
    run.plots = sorted(p for p in (folder / "plots").glob("*") if p.is_file()) \
        if (folder / "plots").is_dir() else []
    return run


def _check_perturbation(run: Run) -> None:
    p = run.perturbation
    if p is None:
        return
    if not isinstance(p.get("baseline"), dict) or not isinstance(p.get("conditions"), list):
        raise RunError("perturbation_results.json lacks 'baseline' or 'conditions'")


def read_runs(inputs: list[Path]) -> tuple[list[Run], list[tuple[str, str]]]:
    """Readable, finished runs, and (label, reason) for every run left out."""
    pairs = find_run_folders(inputs)
    runs, skipped = [], []
    for (root, folder), label in zip(pairs, unique_labels(pairs)):
        try:
            run = load_run(folder, label)
        except RunError as error:
            skipped.append((label, f"skipped: {error}"))
            continue
        if run.manifest is None:
            skipped.append((label, "skipped: no experiment_manifest.json "
                                   "(still running or killed)"))
        elif not run.manifest.get("success", False):
            skipped.append((label, f"skipped: the run failed ({run.manifest.get('error')})"))
        else:
            runs.append(run)
    return runs, skipped


# ----------------------------------------------------------------------------- numbers

def ppl(value) -> str:
    """Perplexity with two decimals (scientific beyond 1e5)."""
    if isinstance(value, float) and math.isfinite(value) and abs(value) < 1e5:
        return f"{value:.2f}"
    return fmt(value)


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: float) -> str:
    """A relative change as a percentage with sensible precision."""
    if not math.isfinite(value):
        return "inf%"
    magnitude = abs(value) * 100
    if magnitude < 0.01:
        return "<0.01%"
    return f"{magnitude:.2f}%" if magnitude < 10 else f"{magnitude:.3g}%"


def times(value: float) -> str:
    """A ratio as "3.91x" (four decimals near 1, where three digits would read "1x")."""
    if not math.isfinite(value):
        return "inf (overflow)" if value > 0 else str(value)
    if abs(value - 1) < 0.01:
        return f"{value:.4f}x"
    return f"{value:.3g}x" if value < 1e4 else f"{value:.3e}x"


def mean_sd_text(stats: dict | None) -> str:
    if not stats:
        return "—"
    if stats["n"] > 1:
        return (f"{ppl(stats['mean_perplexity'])} ± {fmt(stats['sd_perplexity'], 2)} "
                f"(n={stats['n']})")
    return ppl(stats["mean_perplexity"])


def jaccard_of(run: Run, family: str):
    block = (run.stability or {}).get(family) or {}
    return (block.get("jaccard") or {}).get("mean")


def run_row(run: Run) -> dict:
    row = {"run": run.label, "model": run.get("model"), "metric": run.get("metric"),
           "mode": run.get("mode"), "K": run.get("topk"), "perturb": run.get("perturb") or "—",
           "baseline ppl": "—", "top-K ppl": "—", "random-K ppl (mean ± sd)": "—",
           "bottom-K ppl": "—", "effect ratio": "—", "p-value": "—",
           "Jaccard seeds": fmt(jaccard_of(run, "across_seeds"), 3),
           "Jaccard batches": fmt(jaccard_of(run, "across_batches"), 3)}
    if run.perturbation:
        summary = run.summary
        comparison = summary.get("top_vs_random") or {}
        row.update({"baseline ppl": ppl(run.perturbation["baseline"]["perplexity"]),
                    "top-K ppl": mean_sd_text(summary.get("top_k")),
                    "random-K ppl (mean ± sd)": mean_sd_text(summary.get("random_k")),
                    "bottom-K ppl": mean_sd_text(summary.get("bottom_k")),
                    "effect ratio": fmt(comparison.get("effect_ratio"), 3),
                    "p-value": fmt(comparison.get("empirical_p_value"), 3)})
    return row


def ppl_ratios(run: Run) -> dict[str, list[float]]:
    """Selection -> perplexity / baseline of each of its conditions."""
    base = run.perturbation["baseline"]["perplexity"]
    ratios: dict[str, list[float]] = {}
    for row in run.perturbation["conditions"]:
        ratios.setdefault(row["selection"], []).append(row["perplexity"] / base)
    return ratios


# ----------------------------------------------------------------------------- findings

METHOD_VERBS = {"zero": "zeroing", "sign_flip": "flipping the sign of",
                "gauss_noise": "adding Gaussian noise to", "bit_flip": "flipping one bit of"}


def _method_phrase(run: Run) -> str:
    method = run.perturbation.get("method") or run.get("perturb")
    options = run.perturbation.get("options") or {}
    if method == "gauss_noise":
        return f"adding Gaussian noise (sd {options.get('scale')} x |w|) to"
    if method == "bit_flip":
        prob = options.get("prob", 1.0)
        chance = "" if prob == 1.0 else f" with probability {prob}"
        return f"flipping bit '{options.get('bit')}'{chance} of"
    return METHOD_VERBS.get(method, f"perturbing ({method})")


def perturbation_findings(run: Run) -> list[str]:
    if not run.perturbation:
        return []
    p, summary = run.perturbation, run.summary
    if "top_k" not in summary:
        return []
    base = p["baseline"]["perplexity"]
    top = summary["top_k"]["mean_perplexity"]
    ratio = top / base
    change = ("raised perplexity " + times(ratio)) if math.isfinite(ratio) and ratio > 1 else \
        "made perplexity overflow to inf" if ratio > 1 else \
        (f"lowered perplexity by {pct(1 - ratio)}" if ratio < 1 else "left perplexity unchanged")
    top_row = next(r for r in p["conditions"] if r["selection"] == "top_k")
    low, high = top_row.get("delta_perplexity_ci95") or (math.nan, math.nan)
    text = (f"{_method_phrase(run).capitalize()} the top-{p['k']} {p['metric']} weights "
            f"({p['mode']}) of {run.get('model')} {change} ({ppl(base)} → {ppl(top)}; "
            f"Δppl 95% bootstrap interval [{fmt(low, 3)}, {fmt(high, 3)}])")
    ratios = ppl_ratios(run)
    parts = []
    if "random_k" in ratios:
        moves = np.abs(np.asarray(ratios["random_k"]) - 1)
        parts.append(f"{len(moves)} random-K draws moved it by {pct(float(moves.max()))} at most")
    if "bottom_k" in ratios:
        parts.append(f"bottom-K by {pct(abs(ratios['bottom_k'][0] - 1))}")
    findings = [text + (", while " + " and ".join(parts) if parts else "") + "."]
    findings += _significance(summary, top_row)
    findings += _destructive_control(ratios.get("random_k", []))
    if not p.get("restore_verified", True):
        findings.append("WARNING: the weights were not restored bit-exactly after every "
                        "condition; later conditions of this run may be contaminated.")
    return findings


DESTRUCTIVE_CONTROL_RATIO = 1.5  # random-K mean perplexity / baseline above which we warn


def _destructive_control(random_ratios: list[float]) -> list[str]:
    """A random-K control that itself wrecks the model means the method, not the selection,
    does the damage: the baseline is then the wrong yardstick for the top-K."""
    if not random_ratios:
        return []
    mean = float(np.mean(random_ratios))
    if mean <= DESTRUCTIVE_CONTROL_RATIO:
        return []
    return [f"The random-K control is itself destructive (perplexity {times(mean)} on average over "
            f"{len(random_ratios)} draws): this perturbation damages almost any weights it "
            f"touches, so the top-K should be judged against random-K, not against the "
            f"baseline."]


def _significance(summary: dict, top_row: dict) -> list[str]:
    out = []
    low, high = top_row.get("delta_perplexity_ci95") or (math.nan, math.nan)
    if math.isfinite(low) and math.isfinite(high):
        if low > 0 or high < 0:
            out.append("The top-K bootstrap interval excludes zero: the change is larger than "
                       "the block-to-block variation of the evaluation text.")
        else:
            out.append("The top-K bootstrap interval includes zero: on these evaluation blocks "
                       "the change is not distinguishable from no change.")
    comparison = summary.get("top_vs_random")
    if not comparison:
        return out
    n, p_value = comparison["n_random_draws"], comparison["empirical_p_value"]
    floor = 1 / (n + 1)
    beaten = round(p_value * (n + 1)) - 1  # random draws at least as damaging as top-K
    ratio = comparison["effect_ratio"]
    sentence = (f"Top-K was more damaging than {n - beaten} of {n} random-K draws (effect ratio "
                f"{fmt(ratio, 3)}, empirical p = {p_value:.3g})")
    if floor > 0.05:
        needed = math.ceil(1 / 0.05) - 1
        sentence += (f"; with {n} draws the smallest attainable p is 1/(n+1) = {floor:.3g}, so "
                     f"claiming p < 0.05 needs at least {needed} seeds")
    elif p_value <= 0.05:
        sentence += "; significant at the 5% level against this null"
    out.append(sentence + ".")
    if math.isfinite(ratio) and ratio < 2:
        out.append(f"An effect ratio of {fmt(ratio, 3)} means this metric's top-K is barely "
                   f"more harmful than random weights of the same count.")
    return out


def stability_findings(run: Run) -> list[str]:
    s = run.stability
    if not s:
        return []
    findings = []
    for family, what, size_key in (("across_seeds", "seeds", "blocks_per_seed"),
                                   ("across_batches", "disjoint calibration parts",
                                    "blocks_per_batch")):
        block = s.get(family)
        if not block or block["jaccard"]["mean"] is None:
            continue
        value = block["jaccard"]["mean"]
        verdict = ("stable" if value >= 0.8 else "moderately stable" if value >= 0.5
                   else "unstable")
        size = block.get(size_key)
        size_text = size
        if isinstance(size, list):
            size_text = f"{min(size)}" if min(size) == max(size) else f"{min(size)}–{max(size)}"
        rho = block.get("spearman", {}).get("mean")
        findings.append(
            f"Top-{s['k']} sets are {verdict} across {what}: mean Jaccard {value:.3f} over "
            f"{len(block['jaccard']['pairs'])} pair(s), {size_text} calibration blocks each"
            + (f"; Spearman ρ of |score| on the union {rho:.2f}" if rho is not None else "")
            + ".")
    values = [jaccard_of(run, f) for f in ("across_seeds", "across_batches")]
    values = [v for v in values if v is not None]
    if values and max(values) < 0.5:
        findings.append("The identities of individual top-K weights depend on the calibration "
                        "sample here; more calibration blocks (--max-samples) should raise the "
                        "Jaccard before individual weights are named in a write-up.")
    return findings


def location_findings(run: Run) -> list[str]:
    top = run.top
    if top is None or top.empty:
        return []
    k = len(top)
    findings = []
    if run.get("mode") == "global":  # per_layer takes K from every tensor: shares are by design
        components = top["component"].value_counts()
        layers = sorted({int(v) for v in top["layer"].dropna()})
        lead, lead_n = components.index[0], int(components.iloc[0])
        shown = ", ".join(map(str, layers[:8])) + ("…" if len(layers) > 8 else "")
        text = (f"All {k}" if lead_n == k else f"{lead_n} of {k}") + \
            f" selected weights are in {lead}, over {len(layers)} layer(s) ({shown})"
        if lead_n < k:
            rest = ", ".join(f"{c} {n}" for c, n in components.iloc[1:4].items())
            text += f"; the others: {rest}" + (", …" if len(components) > 4 else "")
        findings.append(text + ".")
    for axis, name in (("row", "output row"), ("col", "input column")):
        groups = top.groupby(["component", axis]).agg(n=("rank", "size"),
                                                      layers=("layer", lambda s: sorted(set(s))))
        groups = groups[groups["n"] > 1].sort_values("n", ascending=False)
        if len(groups):
            (component, index), best = groups.index[0], groups.iloc[0]
            layers = [str(int(v)) for v in best["layers"] if v == v]
            layer_list = ", ".join(layers[:8]) + (", …" if len(layers) > 8 else "")
            n = int(best["n"])
            if n / k >= 0.2:
                findings.append(f"{n} of {k} sit on {name} {index} of {component} (layer(s) "
                                f"{layer_list}): the selection concentrates on one "
                                f"{'output' if axis == 'row' else 'input'} channel.")
            else:
                findings.append(f"The most shared {name} is {index} of {component}: {n} of {k} "
                                f"selected weights (layer(s) {layer_list}).")
    return findings


def downstream_findings(run: Run) -> list[str]:
    """Per task and accuracy metric: baseline ± stderr against each condition's mean."""
    d = run.downstream
    if not d or not isinstance(d.get("baseline"), dict):
        return []
    out = []
    for task, base in d["baseline"].items():
        for metric in ("acc", "acc_norm"):
            if metric not in base:
                continue
            parts = []
            for selection in ("top_k", "random_k", "bottom_k"):
                values = [c["tasks"][task][metric] for c in d.get("conditions", [])
                          if c["selection"] == selection and task in c.get("tasks", {})]
                if values:
                    parts.append(f"{selection} {float(np.mean(values)):.3f}")
            stderr = base.get(f"{metric}_stderr")
            known = isinstance(stderr, float) and math.isfinite(stderr)
            error = f" ± {stderr:.3f}" if known else ""
            out.append(f"{task} {metric} (n={base.get('n')}): baseline {base[metric]:.3f}{error}"
                       + (f"; perturbed: {', '.join(parts)}" if parts else "") + ".")
    return out


def super_weight_findings(section: dict) -> list[str]:
    lines = [f"Super weights: {section['n_candidates']} candidate(s) from activation spikes "
             f"(threshold {section['method']['spike_threshold']:g}x the layer median), "
             f"{section['n_confirmed']} confirmed against same-tensor controls."]
    for c in section.get("candidates", []):
        lines.append(f"{c.get('parameter') or 'layer ' + str(c['layer'])} [{c['row']}, {c['col']}] "
                     f"(spike {fmt(c.get('output_ratio'), 3)}x): zeroing it alone gives "
                     f"perplexity {times(c['alone']['ratio'])} the baseline, the worst control "
                     f"{times(c['controls']['max_control_ratio'])}"
                     + (" (confirmed)" if c.get("confirmed") else " (not confirmed)")
                     + _metric_rank_text(c.get("metric_rank"), section["method"].get("metric"))
                     + ".")
    return lines


def _metric_rank_text(rank: dict | None, metric: str | None) -> str:
    if not rank:
        return ""
    return (f"; {metric} ranks it {rank['rank_global']:,} of {rank['n_global']:,} scored weights "
            f"({rank['rank_in_tensor']:,} in its tensor)")


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


def _group_perturbation_findings(kind: str, groups: dict, base: float) -> list[str]:
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
        what = ", ".join(f"{c} {n}" for c, n in components[:2]) + ("…" if len(components) > 2
                                                                    else "")
        name = f"{kind} {label} ({group['n_tensors']} tensors" + (f": {what})" if what else ")")
        control = f", random-K {times(random / base)}" if random is not None else ""
        parts.append(f"{name}: top-{group['k']} {times(ratio)}{control}")
    return [f"{kind.capitalize()} perturbation, damage per {kind} (perplexity / baseline): "
            + "; ".join(parts) + "."]


def clustered_findings(section: dict) -> list[str]:
    return _group_perturbation_findings("cluster", section["clusters"],
                                        section["baseline"]["perplexity"])


def targeted_findings(section: dict) -> list[str]:
    return _group_perturbation_findings("target", section["groups"],
                                        section["baseline"]["perplexity"])


def architecture_findings(section: dict) -> list[str]:
    depth = section.get("depth", {})
    rho = depth.get("spearman_layer_vs_mean_score") or {}
    lines = []
    if rho.get("rho") is not None:
        direction = "falls" if rho["rho"] < 0 else "rises"
        p_value = rho.get("p_value")
        trend = (f"Mean {section.get('metric')} score {direction} with depth"
                 if p_value is not None and p_value <= 0.05 else
                 f"No significant depth trend in the mean {section.get('metric')} score")
        lines.append(f"{trend} (Spearman ρ = {rho['rho']:.2f}, p = {fmt(p_value, 2)}); peak "
                     f"layer {depth.get('peak_mean_score_layer')}.")
    by_component = {k: v for k, v in section.get("by_component", {}).items()
                    if isinstance(v, dict) and v.get("enrichment") is not None}
    if by_component:
        best = max(by_component, key=lambda k: by_component[k]["enrichment"])
        lines.append(f"Top-{section.get('k')} weights are most over-represented in {best} "
                     f"({by_component[best]['enrichment']:.2f}x their share of weights; "
                     f"{by_component[best]['topk_count']} selected).")
    return lines


def correlation_findings(section: dict) -> list[str]:
    pairs = [p for p in section.get("pairs", []) if p.get("spearman") is not None]
    if not pairs:
        return []
    high = max(pairs, key=lambda p: p["spearman"])
    low = min(pairs, key=lambda p: p["spearman"])
    return [f"Metric agreement: {high['a']} and {high['b']} agree most (Spearman "
            f"{high['spearman']:.2f}, top-{section.get('k')} Jaccard {high['jaccard']:.3f}); "
            f"{low['a']} and {low['b']} least (Spearman {low['spearman']:.2f}, Jaccard "
            f"{low['jaccard']:.3f})."]


def temporal_findings(section: dict) -> list[str]:
    lines = []
    for name, family in section.get("drift", {}).items():
        if isinstance(family, dict) and family.get("steps"):
            lines.append(f"Top-K drift across {name.replace('_', ' ')}: mean "
                         f"{family['mean_drift']:.3f}, max {family['max_drift']:.3f}, "
                         f"{family['n_flagged']} step(s) above the {section.get('drift_threshold')}"
                         f" threshold.")
    return lines


def weight_analysis_findings(section: dict) -> list[str]:
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


ANALYSIS_FINDINGS = {
    "super_weights": super_weight_findings,
    "progressive_perturbation": progressive_findings,
    "clustered_perturbation": clustered_findings,
    "targeted_perturbation": targeted_findings,
    "architecture": architecture_findings,
    "metric_correlation": correlation_findings,
    "temporal_stability": temporal_findings,
    "weight_analysis": weight_analysis_findings,
}


def analysis_findings(run: Run) -> list[str]:
    """Findings from enhanced_analysis.json; a section whose layout is unexpected is named."""
    out = []
    for key, section in (run.enhanced or {}).items():
        if key not in ANALYSIS_FINDINGS or not isinstance(section, dict):
            continue
        try:
            out += ANALYSIS_FINDINGS[key](section)
        except (KeyError, TypeError, ValueError) as error:
            out.append(f"enhanced_analysis.json '{key}' has an unexpected layout "
                       f"({type(error).__name__}: {error}); not summarised.")
    return out


# Runs are compared only when they saw the same text in the same amounts.
DATA_KEYS = ("data_file", "dataset", "max_length", "max_samples")


def _groups(runs: list[Run], fixed: tuple[str, ...], perturbed: bool = True) -> list[list[Run]]:
    """Runs sharing the ``fixed`` settings and the same data (text, block length, blocks)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if perturbed and not (run.perturbation and "top_k" in run.summary):
            continue
        groups.setdefault(tuple(str(run.get(k)) for k in fixed + DATA_KEYS), []).append(run)
    return list(groups.values())


def _data_text(run: Run) -> str:
    source = run.get("data_file") or run.get("dataset") or "bundled corpus"
    return f"{source}, {run.get('max_samples')} x {run.get('max_length')}-token blocks"


def _top_ratio(run: Run) -> float:
    return run.summary["top_k"]["mean_perplexity"] / run.perturbation["baseline"]["perplexity"]


def cross_run_findings(runs: list[Run]) -> list[str]:
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
    for run in runs:
        if run.get("metric") == "random" and run.perturbation and \
                (run.summary.get("top_vs_random") or {}).get("effect_ratio") is not None:
            ratio = run.summary["top_vs_random"]["effect_ratio"]
            verdict = ("behaves like the random-K control, as a null metric should" if ratio < 3
                       else "is far from the random-K control: check the experiment")
            findings.append(f"Null check ({run.label}): the random-score metric's top-K has "
                            f"effect ratio {fmt(ratio, 3)} and {verdict}.")
    return findings


def _overlap_findings(group: list[Run]) -> list[str]:
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

def _ratio_points(runs: list[Run]):
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


def plot_by(runs: list[Run], key: str, title: str):
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


def plot_by_k(runs: list[Run]):
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


def _jaccard_by_k(ax, runs: list[Run]):
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


CROSS_RUN_PLOTS = {
    "by_model": lambda runs: plot_by(runs, "model", "Perturbation damage by model"),
    "by_metric": lambda runs: plot_by(runs, "metric", "Perturbation damage by metric"),
    "by_k": plot_by_k,
}


def draw_cross_run_plots(runs: list[Run], folder: Path) -> dict[str, Path]:
    written = {}
    for name, draw in CROSS_RUN_PLOTS.items():
        figure = draw(runs)
        if figure is None:
            print(f"[report] cross-run plot {name} skipped: no run has perturbation results")
            continue
        written[name] = Path(save_figure(figure, folder / name, ("png",))[0])
    return written


# ----------------------------------------------------------------------------- document

@dataclass
class Doc:
    """A small document model rendered to Markdown and to self-contained HTML."""
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, level: int, text: str):
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str):
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("bullets", items))

    def table(self, rows: list[dict]):
        if rows:
            self.blocks.append(("table", rows))

    def image(self, path: Path, caption: str):
        self.blocks.append(("image", path, caption))

    def link(self, path: Path, text: str):
        self.blocks.append(("link", path, text))


def to_markdown(doc: Doc, base: Path) -> str:
    out = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "paragraph":
            out.append(block[1])
        elif kind == "bullets":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            columns = list(block[1][0])
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |"
                      for row in block[1]]
            out.append("\n".join(lines))
        elif kind == "image":
            out.append(f"![{block[2]}]({_rel(block[1], base)})")
        elif kind == "link":
            out.append(f"- [{block[2]}]({_rel(block[1], base)})")
    return "\n\n".join(out) + "\n"


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;
line-height:1.45;color:#222}table{border-collapse:collapse;font-size:0.85em}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}
td:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
figcaption{font-size:0.85em;color:#555}"""


def to_html(doc: Doc, base: Path, title: str) -> str:
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{HTML_STYLE}</style></head><body>"]
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "paragraph":
            out.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "bullets":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            columns = list(block[1][0])
            head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in columns)
                           + "</tr>" for r in block[1])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "image":
            data = base64.b64encode(block[1].read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(block[2])}' "
                       f"src='data:image/png;base64,{data}'><figcaption>"
                       f"{html.escape(block[2])}</figcaption></figure>")
        elif kind == "link":
            out.append(f"<p><a href='{html.escape(_rel(block[1], base))}'>"
                       f"{html.escape(block[2])}</a> (file next to the run)</p>")
    out.append("</body></html>")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown `code` spans to <code>; everything else escaped."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


# ----------------------------------------------------------------------------- report

def build_report(runs: list[Run], skipped: list[tuple[str, str]], figures: dict[str, Path],
                 inputs: list[Path]) -> Doc:
    doc = Doc()
    doc.heading(1, "Critical Weight Analysis: research report")
    models = sorted({str(r.get("model")) for r in runs})
    metrics = sorted({str(r.get("metric")) for r in runs})
    doc.paragraph(f"{len(runs)} run(s) from {', '.join(f'`{p}`' for p in inputs)}: "
                  f"model(s) {', '.join(models)}; metric(s) {', '.join(metrics)}."
                  + (f" {len(skipped)} folder(s) left out (see the end)." if skipped else ""))
    doc.heading(2, "Runs")
    doc.table([run_row(run) for run in runs])
    doc.paragraph("Perplexities are token-mean over the evaluation blocks (disjoint from the "
                  "calibration text). Random-K: mean ± sample sd over seeds. Effect ratio: "
                  "|top-K Δppl| / mean |random-K Δppl|. p-value: empirical, (1 + #random draws "
                  "at least as damaging as top-K) / (1 + n). Jaccard: mean over pairs of top-K "
                  "sets (seeds: random calibration subsets; batches: disjoint calibration parts).")
    doc.heading(2, "Findings")
    across = cross_run_findings(runs)
    if across:
        doc.heading(3, "Across runs")
        doc.bullets(across)
    doc.heading(3, "Per run (headline; details in each run's section)")
    doc.bullets([f"`{run.label}`: {run_findings(run)[0]}" for run in runs if run_findings(run)]
                or ["No run has perturbation, stability or top-K results."])
    if figures:
        doc.heading(2, "Cross-run plots")
        for name, path in figures.items():
            doc.image(path, {"by_model": "Perturbation damage by model",
                             "by_metric": "Perturbation damage by metric",
                             "by_k": "Damage and stability by K"}[name])
    doc.heading(2, "Runs in detail")
    for run in runs:
        run_section(doc, run)
    if skipped:
        doc.heading(2, "Folders left out")
        doc.bullets([f"`{label}`: {reason}" for label, reason in skipped])
    return doc


def run_findings(run: Run) -> list[str]:
    return (perturbation_findings(run) + stability_findings(run) + location_findings(run)
            + downstream_findings(run) + analysis_findings(run))


def run_section(doc: Doc, run: Run) -> None:
    doc.heading(3, run.label)
    manifest = run.manifest or {}
    data = manifest.get("data") or {}
    evaluation = data.get("evaluation") or {}
    seconds = sum((manifest.get("timings_seconds") or {}).values())
    device = (manifest.get("model") or {}).get("device")
    doc.paragraph(f"Folder `{run.path}`; model {run.get('model')} on {device}, metric "
                  f"{run.get('metric')}, K={run.get('topk')} ({run.get('mode')}), perturbation "
                  f"{run.get('perturb') or 'none'}, seeds {run.get('seeds')}; data "
                  f"{data.get('source', '?')} with {evaluation.get('blocks', '?')} evaluation "
                  f"blocks of {run.get('max_length')} tokens; {seconds:.0f} s in all.")
    if run.enhanced:
        doc.paragraph("Optional analyses in enhanced_analysis.json: "
                      + ", ".join(f"`{key}`" for key in run.enhanced) + ".")
    doc.bullets(run_findings(run))
    pngs = [p for p in run.plots if p.suffix == ".png"]
    for path in pngs:
        doc.image(path, f"{run.label}: {path.stem.replace('_', ' ')}")
    for path in run.plots:
        if path.suffix != ".png":
            doc.link(path, f"{path.name}")
    if not run.plots:
        doc.paragraph("No plots in this run (it ran without --save-plots).")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Collect every run below the input folders into one research report "
                    "(Markdown and/or self-contained HTML) with a runs table, cross-run plots "
                    "and findings computed from the numbers.")
    parser.add_argument("--input-dirs", nargs="+", required=True, type=Path,
                        help="folders searched (recursively) for run folders")
    parser.add_argument("--output", required=True, type=Path,
                        help="report path prefix: writes PREFIX.md / PREFIX.html and "
                             "PREFIX_figures/")
    parser.add_argument("--format", default="md,html",
                        help="comma-separated: md, html")
    return parser.parse_args(argv)


def report_formats(text: str) -> list[str]:
    formats = list(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    if not formats or any(f not in REPORT_FORMATS for f in formats):
        raise UserError(f"bad --format '{text}': use md, html or md,html")
    return formats


def generate(args: argparse.Namespace) -> list[Path]:
    formats = report_formats(args.format)
    runs, skipped = read_runs(args.input_dirs)
    for label, reason in skipped:
        print(f"[report] {label}: {reason}", file=sys.stderr)
    if not runs:
        found = "no run folders (with config.json or experiment_manifest.json)" if not skipped \
            else f"no readable finished runs ({len(skipped)} folder(s) skipped)"
        raise UserError(f"{found} below {', '.join(map(str, args.input_dirs))}")
    prefix = args.output
    prefix.parent.mkdir(parents=True, exist_ok=True)
    figures = draw_cross_run_plots(runs, prefix.parent / f"{prefix.name}_figures")
    doc = build_report(runs, skipped, figures, args.input_dirs)
    written = []
    for fmt_name in formats:
        path = prefix.parent / f"{prefix.name}.{fmt_name}"
        text = to_markdown(doc, path.parent) if fmt_name == "md" else \
            to_html(doc, path.parent, "Critical Weight Analysis report")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    print(f"[report] {len(runs)} run(s), {len(skipped)} skipped -> "
          + ", ".join(str(p) for p in written))
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        generate(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
