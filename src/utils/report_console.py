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


def perturbation(results: dict) -> None:
    base = results["baseline"]["perplexity"]
    print(f"[cwa] perturbation {results['method']} of K={results['k']} ({results['mode']}); "
          f"baseline perplexity {fixed(base)}")
    table(results["conditions"], [
        ("selection", 10, lambda row: row["selection"]),
        ("seed", 5, lambda row: fixed(row["seed"])),
        ("n", 7, lambda row: row["n_weights"]),
        ("perplexity", 12, lambda row: fixed(row["perplexity"])),
        ("x baseline", 11, lambda row: fixed(row["ppl_ratio"])),
        ("Δppl 95% CI", 24, lambda row: "[{}, {}]".format(
            *(fixed(end, 2) for end in row["delta_perplexity_ci95"]))),
        ("restored", 9, lambda row: str(row["restore_verified"]))])
    versus = results["summary"].get("top_vs_random")
    if versus:
        print(f"[cwa] top-K vs random-K: effect ratio {fixed(versus['effect_ratio'])}, z "
              f"{fixed(versus['z_score'], 2)}, empirical p {fixed(versus['empirical_p_value'], 3)} "
              f"({versus['n_random_draws']} random draws)")
    print(f"[cwa] all weights restored bit-exactly: {results['restore_verified']}")


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
        ("perplexity", 12, lambda row: fixed(row["perplexity"])),
        ("x baseline", 11, lambda row: fixed(row["ppl_ratio"])),
        ("recovery", 9, lambda row: fixed(row["recovery"])),
        ("restored", 9, lambda row: str(row["restore_verified"]))])
    versus = results["summary"].get("top_vs_random")
    if versus:
        print(f"[cwa] top-K recovers {fixed(versus['top_k_recovery'])} of the quantization loss, "
              f"random-K {fixed(versus['random_k_mean_recovery'])} ± "
              f"{fixed(versus['random_k_sd_recovery'])}; empirical p "
              f"{fixed(versus['empirical_p_value'])} ({versus['n_random_draws']} random draws)")


def table(rows, columns) -> None:
    """An indented text table: ``columns`` are (header, width, cell of a row); the first column
    is left-aligned, the others right-aligned."""
    def line(cells):
        return "  " + " ".join(f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}"
                               for i, (cell, (_, width, _)) in enumerate(zip(cells, columns)))
    print(line([header for header, _, _ in columns]))
    for row in rows:
        print(line([str(cell(row)) for _, _, cell in columns]))
