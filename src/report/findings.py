"""Findings of one run, computed from its output files: what a reader of the report should
take away from the perturbation, stability, location, downstream and analysis results.
Each analysis states its own findings (src/analysis/registry.py)."""
from __future__ import annotations

import math

import numpy as np

from src.analysis import registry
from src.eval.downstream_step import ACCURACY_METRICS
from src.report.run_folder import RunFolder
from src.utils.format import pct, ppl, sig, times


def mean_sd_text(stats: dict | None) -> str:
    if not stats:
        return "—"
    if stats["n"] > 1:
        return (f"{ppl(stats['mean_perplexity'])} ± {sig(stats['sd_perplexity'], 2)} "
                f"(n={stats['n']})")
    return ppl(stats["mean_perplexity"])


def jaccard_of(run: RunFolder, family: str):
    block = (run.stability or {}).get(family) or {}
    return (block.get("jaccard") or {}).get("mean")


def ppl_ratios(run: RunFolder) -> dict[str, list[float]]:
    """Selection -> perplexity / baseline of each of its conditions."""
    base = run.perturbation["baseline"]["perplexity"]
    ratios: dict[str, list[float]] = {}
    for row in run.perturbation["conditions"]:
        ratios.setdefault(row["selection"], []).append(row["perplexity"] / base)
    return ratios


# ----------------------------------------------------------------------------- findings

METHOD_VERBS = {"zero": "zeroing", "sign_flip": "flipping the sign of",
                "gauss_noise": "adding Gaussian noise to", "bit_flip": "flipping one bit of"}


def _method_phrase(run: RunFolder) -> str:
    method = run.perturbation.get("method") or run.get("perturb")
    options = run.perturbation.get("options") or {}
    if method == "gauss_noise":
        return f"adding Gaussian noise (sd {options.get('scale')} x |w|) to"
    if method == "bit_flip":
        prob = options.get("prob", 1.0)
        chance = "" if prob == 1.0 else f" with probability {prob}"
        return f"flipping bit '{options.get('bit')}'{chance} of"
    return METHOD_VERBS.get(method, f"perturbing ({method})")


def perturbation_findings(run: RunFolder) -> list[str]:
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
            f"Δppl 95% bootstrap interval [{sig(low, 3)}, {sig(high, 3)}])")
    ratios = ppl_ratios(run)
    parts = []
    if "random_k" in ratios:
        moves = np.abs(np.asarray(ratios["random_k"]) - 1)
        parts.append(f"{len(moves)} random-K draws moved it by {pct(float(moves.max()))} at most")
    if "bottom_k" in ratios:
        parts.append(f"bottom-K by {pct(abs(ratios['bottom_k'][0] - 1))}")
    findings = [text + (", while " + " and ".join(parts) if parts else "") + "."]
    findings += significance(summary, top_row)
    findings += vacuous_conditions(p["conditions"])
    findings += destructive_control(ratios.get("random_k", []))
    if not p.get("restore_verified", True):
        findings.append("WARNING: the weights were not restored bit-exactly after every "
                        "condition; later conditions of this run may be contaminated.")
    return findings


def vacuous_conditions(conditions: list[dict]) -> list[str]:
    """Conditions that changed no weight's value measure nothing, however their numbers read."""
    names = sorted({f"{c['selection']}" + ("" if c.get("seed") is None else f" (seed {c['seed']})")
                    for c in conditions if c.get("vacuous")})
    if not names:
        return []
    return [f"WARNING: {', '.join(names)} changed no weight's value (n_changed 0): its "
            f"perplexity is the baseline's and is not a measured effect."]


DESTRUCTIVE_CONTROL_RATIO = 1.5  # random-K mean perplexity / baseline above which we warn


def destructive_control(random_ratios: list[float]) -> list[str]:
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


def significance(summary: dict, top_row: dict) -> list[str]:
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
                f"{sig(ratio, 3)}, empirical p = {p_value:.3g})")
    if floor > 0.05:
        needed = math.ceil(1 / 0.05) - 1
        sentence += (f"; with {n} draws the smallest attainable p is 1/(n+1) = {floor:.3g}, so "
                     f"claiming p < 0.05 needs at least {needed} seeds")
    elif p_value <= 0.05:
        sentence += "; significant at the 5% level against this null"
    out.append(sentence + ".")
    if math.isfinite(ratio) and ratio < 2:
        out.append(f"An effect ratio of {sig(ratio, 3)} means this metric's top-K is barely "
                   f"more harmful than random weights of the same count.")
    return out


def stability_findings(run: RunFolder) -> list[str]:
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


def location_findings(run: RunFolder) -> list[str]:
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


def downstream_findings(run: RunFolder) -> list[str]:
    """Per task and accuracy metric: baseline ± stderr against each condition's mean."""
    d = run.downstream
    if not d or not isinstance(d.get("baseline"), dict):
        return []
    out = []
    for task, base in d["baseline"].items():
        for metric in ACCURACY_METRICS:
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



def analysis_findings(run: RunFolder) -> list[str]:
    """Findings from enhanced_analysis.json; a section whose layout is unexpected is named."""
    out = []
    analyses = registry.load()
    for key, section in (run.enhanced or {}).items():
        if key not in analyses or analyses[key].findings is None or not isinstance(section, dict):
            continue
        try:
            out += analyses[key].findings(section)
        except (KeyError, TypeError, ValueError) as error:
            out.append(f"enhanced_analysis.json '{key}' has an unexpected layout "
                       f"({type(error).__name__}: {error}); not summarised.")
    return out


def analysis_tables(run: RunFolder) -> list[tuple[str, list[dict]]]:
    """(caption, rows) of every table the run's analyses show in the report."""
    out = []
    analyses = registry.load()
    for key, section in (run.enhanced or {}).items():
        if key not in analyses or not isinstance(section, dict):
            continue
        for caption, rows_of in analyses[key].tables.items():
            try:
                out.append((caption, rows_of(section)))
            except (KeyError, TypeError, ValueError, IndexError):
                continue  # its findings already name the unexpected layout
    return out


def compression_findings(run: RunFolder) -> list[str]:
    """What keeping the top-K at full precision buys against quantizing everything."""
    q = run.quantization
    if not q or "top_k" not in q["summary"]:
        return []
    spec, summary = q["quantization"], q["summary"]
    rtn = summary.get("none", {}).get("mean_perplexity")
    text = (f"Keeping the top {q['k']} {q['metric']} weights ({sig(100 * q['share_kept'], 2)}% "
            f"of the scored weights) at full precision recovers "
            f"{pct(summary['top_k']['mean_recovery'], signed=True)}"
            f" of the {spec['bits']}-bit loss ({spec['label']}: perplexity "
            f"{ppl(q['baseline']['perplexity'])} at full precision, {ppl(rtn)} quantized, "
            f"{ppl(summary['top_k']['mean_perplexity'])} with the top-K kept)")
    versus = summary.get("top_vs_random")
    if versus:
        text += (f"; random {q['k']} recover "
                 f"{pct(versus['random_k_mean_recovery'], signed=True)} ± "
                 f"{pct(versus['random_k_sd_recovery'])} (p = "
                 f"{versus['empirical_p_value']:.3g} over {versus['n_random_draws']} draws)")
    if "bottom_k" in summary:
        text += f", bottom {q['k']} {pct(summary['bottom_k']['mean_recovery'], signed=True)}"
    return [text + "."]


def run_findings(run: RunFolder) -> list[str]:
    return (perturbation_findings(run) + compression_findings(run) + stability_findings(run)
            + location_findings(run) + downstream_findings(run) + analysis_findings(run))
