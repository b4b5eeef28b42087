"""Short printed summaries of a run (the files in --out-dir hold the full numbers)."""
from __future__ import annotations

import numpy as np

from src.utils.format import fixed, sig


def baseline(model_info: dict, data, result) -> None:
    print(f"[cwa] model {model_info['spec']} ({model_info['architecture']}, "
          f"{model_info['n_parameters'] / 1e6:.1f}M parameters, {model_info['dtype']} on "
          f"{model_info['device']})")
    print(f"[cwa] data {data.source}: {len(data.calibration)} calibration / "
          f"{len(data.evaluation)} evaluation blocks of {data.evaluation.input_ids.shape[1]} "
          f"tokens")
    print(f"[cwa] baseline perplexity {fixed(result.perplexity)}  nll {fixed(result.nll, 4)}  "
          f"token accuracy {fixed(result.token_accuracy, 4)}  ({result.n_tokens} tokens)")


def top_weights(table, metric: str, extra: dict, n: int = 10) -> None:
    print(f"[cwa] top {min(n, len(table))} weights by {metric} (row/col in [out, in]):")
    head = table.sort_values("rank", kind="mergesort").head(n)
    for row in head.itertuples():
        print(f"  #{row.rank:<4} {row.parameter:<45} [{row.row}, {row.col}]  "
              f"score {row.score: .4e}  value {row.value: .4f}")
    if "stderr" in extra and "score_stderr" in table:
        relative = (table["score_stderr"].abs() / table["score"].abs()).replace(np.inf, np.nan)
        print(f"[cwa] median relative standard error of the top-K scores: "
              f"{fixed(float(np.nanmedian(relative)))}")


def score_facts_text(metric: str, facts: dict) -> str:
    """One sentence of how the scores were computed (Hutchinson: probes and precision)."""
    if "probes_per_batch" not in facts:
        return f"{metric}: " + ", ".join(f"{k} {v}" for k, v in facts.items())
    error = facts.get("top_k_median_relative_stderr")
    text = (f"{metric}: {facts['probes_per_batch']} probes per calibration batch; median "
            f"relative standard error of the top-K estimates "
            + (fixed(error) if error is not None else "not defined (one sample: no variance)"))
    if facts.get("samples") == "auto":
        ranked_by = facts.get("stopping_rule_top_k")  # a derived metric: its base's top-K
        text += (" (--hutchinson-samples auto" + (f" on {ranked_by}'s top-K" if ranked_by else "")
                 + f", target {fixed(facts['target'])}, cap "
                 f"{facts['cap']}: " + ("reached)" if facts["reached"] else
                                        "NOT reached: the cap stopped it)"))
    return text


def score_facts(metric: str, facts: dict) -> None:
    if facts:
        print(f"[cwa] {score_facts_text(metric, facts)}")


def perturbation(results: dict) -> None:
    base = results["baseline"]["perplexity"]
    print(f"[cwa] perturbation {results['method']} of K={results['k']} ({results['mode']}); "
          f"baseline perplexity {fixed(base)}")
    table(results["conditions"], [
        ("selection", 10, lambda row: row["selection"]),
        ("seed", 5, lambda row: fixed(row["seed"])),
        ("n", 7, lambda row: row["n_weights"]),
        ("changed", 8, lambda row: row.get("n_changed", "—")),
        ("perplexity", 12, lambda row: fixed(row["perplexity"])),
        ("x baseline", 11, lambda row: fixed(row["ppl_ratio"])),
        ("Δppl 95% CI", 24, _interval_or_vacuous),
        ("restored", 9, lambda row: str(row["restore_verified"]))])
    _vacuous_note(results["conditions"], "selection")
    versus = results["summary"].get("top_vs_random")
    if versus:
        z = fixed(versus["z_score"], 2) if versus.get("z_score") is not None else \
            "not defined (random-K spread below the evaluation's resolution)"
        print(f"[cwa] top-K vs random-K: effect ratio {fixed(versus['effect_ratio'])} (of "
              f"|Δppl|), perplexity ratio {fixed(versus.get('ppl_ratio_to_random'))} (log "
              f"{sig(versus.get('log_ppl_ratio_to_random'), 3)}), z {z}, "
              f"{_empirical_p(versus)}")
    print(f"[cwa] all weights restored bit-exactly: {results['restore_verified']}")


def _interval_or_vacuous(row: dict) -> str:
    if row.get("vacuous"):
        return "no weight changed"
    return "[{}, {}]".format(*(fixed(end, 2) for end in row["delta_perplexity_ci95"]))


def _vacuous_note(rows: list[dict], name_key: str) -> None:
    vacuous = sorted({row[name_key] for row in rows if row.get("vacuous")})
    if vacuous:
        print(f"[cwa] warning: {', '.join(vacuous)} changed no weight's value (n_changed 0): "
              f"its perplexity is the baseline's, not a measured effect")


def _empirical_p(versus: dict) -> str:
    """The empirical p with the smallest value n random draws allow, 1/(n+1)."""
    n = versus["n_random_draws"]
    return (f"empirical p {fixed(versus['empirical_p_value'], 3)} (floor "
            f"{fixed(1 / (n + 1), 3)} with {n} random draws)")


def stability(results: dict) -> None:
    for family in ("across_seeds", "across_batches"):
        part = results[family]
        print(f"[cwa] stability {family.replace('_', ' ')}: Jaccard mean "
              f"{fixed(part['jaccard']['mean'])} ± {fixed(part['jaccard']['std'])}, Spearman mean "
              f"{fixed(part['spearman']['mean'])}")


def quantization(results: dict) -> None:
    spec = results["quantization"]
    base = results["baseline"]["perplexity"]
    print(f"[cwa] compression {spec['label']}: K={results['k']} ({results['mode']}, "
          f"{results['metric']}) kept at full precision, {sig(100 * results['share_kept'], 2)}% "
          f"of the scored weights; baseline perplexity {fixed(base)}")
    table(results["conditions"], [
        ("condition", 18, lambda row: row["condition"]),
        ("seed", 5, lambda row: fixed(row["seed"])),
        ("changed", 8, lambda row: row.get("n_changed", "—")),
        ("perplexity", 12, lambda row: fixed(row["perplexity"])),
        ("x baseline", 11, lambda row: fixed(row["ppl_ratio"])),
        ("recovery", 9, lambda row: "no change" if row.get("vacuous") else fixed(row["recovery"])),
        ("restored", 9, lambda row: str(row["restore_verified"]))])
    _vacuous_note(results["conditions"], "condition")
    versus = results["summary"].get("top_vs_random")
    if versus:
        print(f"[cwa] top-K recovers {fixed(versus['top_k_recovery'])} of the quantization loss, "
              f"random-K {fixed(versus['random_k_mean_recovery'])} ± "
              f"{fixed(versus['random_k_sd_recovery'])}; {_empirical_p(versus)}")


def quantization_groups(groups: list[dict], group_size: int | None) -> None:
    """How a row's last quantization group is formed where the group size does not divide it
    (``groups``: quantize.row_groups)."""
    parts = [f"rows of {g['row_length']} inputs: " + (
        f"{g['full_groups']} group{'s' if g['full_groups'] > 1 else ''} of {group_size} and a "
        f"last group of {g['last_group']}" if g["full_groups"] else
        f"one group of {g['last_group']}, shorter than {group_size}")
        for g in groups if g["last_group"]]
    if parts:
        print(f"[cwa] quantization groups of {group_size} consecutive inputs, each with its own "
              f"range: {'; '.join(parts)}")


def table(rows, columns) -> None:
    """An indented text table: ``columns`` are (header, width, cell of a row); the first column
    is left-aligned, the others right-aligned."""
    def line(cells):
        return "  " + " ".join(f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
                               for i, (cell, (_, width, _)) in enumerate(zip(cells, columns)))
    print(line([header for header, _, _ in columns]))
    for row in rows:
        print(line([str(cell(row)) for _, _, cell in columns]))
