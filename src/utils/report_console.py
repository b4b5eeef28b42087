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
    print(f"  {'selection':<10} {'seed':>5} {'n':>7} {'perplexity':>12} {'x baseline':>11} "
          f"{'Δppl 95% CI':>24} {'restored':>9}")
    for row in results["conditions"]:
        low, high = row["delta_perplexity_ci95"]
        interval = f"[{fixed(low, 2)}, {fixed(high, 2)}]"
        print(f"  {row['selection']:<10} {fixed(row['seed']):>5} {row['n_weights']:>7} "
              f"{fixed(row['perplexity']):>12} {fixed(row['ppl_ratio']):>11} "
              f"{interval:>24} {str(row['restore_verified']):>9}")
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
    print(f"  {'condition':<18} {'seed':>5} {'perplexity':>12} {'x baseline':>11} "
          f"{'recovery':>9} {'restored':>9}")
    for row in results["conditions"]:
        print(f"  {row['condition']:<18} {fixed(row['seed']):>5} {fixed(row['perplexity']):>12} "
              f"{fixed(row['ppl_ratio']):>11} {fixed(row['recovery']):>9} "
              f"{str(row['restore_verified']):>9}")
    versus = results["summary"].get("top_vs_random")
    if versus:
        print(f"[cwa] top-K recovers {fixed(versus['top_k_recovery'])} of the quantization loss, "
              f"random-K {fixed(versus['random_k_mean_recovery'])} ± "
              f"{fixed(versus['random_k_sd_recovery'])}; empirical p "
              f"{fixed(versus['empirical_p_value'])} ({versus['n_random_draws']} random draws)")
