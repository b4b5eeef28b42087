"""The perturbation experiment: damage top-K, and equally many control weights, and compare.

Conditions: the top-K selection and each control (``random_k``: drawn anew per seed, uniformly
from the same eligible weights and mode; ``bottom_k``: the K lowest |score| among the weights the
method changes in value, e.g. not the weights that are already 0 for ``zero`` or ``sign_flip``).
Every row records ``n_changed``: how many of its selected weights the condition actually changed
in value (measured under the condition); a row with ``n_changed`` 0 is ``vacuous``: it measures
nothing, however its perplexity reads. A condition whose selection and
perturbation are both deterministic (e.g. top-K with ``zero``) is evaluated once, with
``seed: null``; otherwise once per seed. The baseline is evaluated once.

Statistics per selection: mean ± sd of perplexity over seeds; ``effect_ratio`` = |top-K Δppl| /
mean over random-K draws of |Δppl| (absolute changes, so a control that happens to lower the
perplexity slightly cannot flip the sign); a z-score and an empirical p-value (share of random-K draws at least as
damaging as top-K, (1 + #{random ≥ top}) / (1 + n)); and per condition a paired bootstrap 95%
interval of Δppl over evaluation blocks (blocks resampled with replacement; ``BOOTSTRAP``).
The per-block NLL sums and token counts it resamples are kept (``block_frame``) so that the
intervals can be recomputed from the output folder.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import pandas as pd
import torch

from src.eval.perplexity import EvalResult
from src.sensitivity.perturb import (PerturbOptions, count_changed, fingerprint, held_part,
                                     perturbation_is_stochastic, perturbed, selected_bits_equal,
                                     snapshot_selected)
from src.sensitivity.rank import Selection, bottom_k, random_k, selection_size


CONTROL_ALIASES = {"random": "random_k", "random_k": "random_k", "bottom": "bottom_k",
                   "bottom_k": "bottom_k"}
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP = {"method": "paired percentile bootstrap over evaluation blocks: each resample draws "
                       "n_blocks blocks with replacement (the same draw for the baseline and the "
                       "condition); perplexity = exp(sum of the drawn blocks' NLL sums / sum of "
                       "their tokens); the interval is the 2.5th and 97.5th percentile of the "
                       "resampled differences (numpy default_rng, linear interpolation)",
             "resamples": BOOTSTRAP_SAMPLES, "seed": 0, "confidence": 0.95}
BLOCK_COLUMNS = ["condition", "selection", "seed", "block", "nll_sum", "n_tokens"]
# where each experiment's per-block NLL sums go, beside its JSON (``block_frame``)
BLOCK_FILES = {"perturbation": "perturbation_blocks.csv", "quantization": "quantization_blocks.csv"}


@dataclass
class BlockSums:
    """What the bootstrap resamples of one evaluation: per block, NLL sum (nats) and tokens."""
    block_nll_sum: torch.Tensor  # [n_blocks] float64, CPU
    block_tokens: torch.Tensor   # [n_blocks] int64, CPU


@dataclass
class Condition:
    selection_name: str   # top_k | random_k | bottom_k
    seed: int | None
    selection: Selection


def build_conditions(top_selection: Selection, scores, k: int, mode: str, controls: list[str],
                     seeds: list[int], method: str, options: PerturbOptions,
                     layout=None, eligible=None) -> list[Condition]:
    """``layout`` (sharding.Layout) when ``scores`` are this rank's shards; ``eligible`` (name
    -> bool mask of the weights the method changes): where the bottom-K control is drawn."""
    stochastic = perturbation_is_stochastic(method, options)
    fixed_seeds = seeds if stochastic else [None]
    conditions = [Condition("top_k", s, top_selection) for s in fixed_seeds]
    sizes = {n: layout.numel[n] if layout is not None else s.numel() for n, s in scores.items()}
    for control in controls:
        if control == "random_k":
            conditions += [Condition("random_k", s, random_k(sizes, k, mode, seed=s)) for s in seeds]
        elif control == "bottom_k":
            bottom = bottom_k(scores, k, mode, layout=layout, eligible=eligible)
            conditions += [Condition("bottom_k", s, bottom) for s in fixed_seeds]
    return conditions


def run_conditions(params, conditions: list[Condition], method: str, options: PerturbOptions,
                   evaluate: Callable[[], EvalResult], baseline: EvalResult,
                   on_condition: Callable | None = None, on_row: Callable | None = None,
                   rows: list[dict] | None = None,
                   apply: Callable[[Condition], ContextManager] | None = None,
                   layout=None, changed: Callable | None = None,
                   blocks: list | None = None) -> tuple[list[dict], bool]:
    """Evaluate every condition; returns (rows, restore_verified for all). ``apply(condition)``
    changes the weights for the duration (default: ``perturbed`` with ``method``; the
    compression experiment quantizes instead). ``on_condition`` runs further measurements under
    each condition; ``on_row(rows)`` sees the rows after each condition (to save finished work).
    ``rows`` collects them in a list the caller holds, so the conditions that finished are known
    also when the run is interrupted. ``layout`` (sharding.Layout): the weights are sharded;
    each rank checks the restore of its part and the condition is restored when all are.
    ``changed(condition, checked)``: how many of the (locally held) selected weights the
    condition changes, told from the unchanged weights (default: counted under ``apply``
    against the values before).
    ``blocks`` collects each condition's evaluation result (per-block NLL sums and tokens)."""
    reference = fingerprint(params)
    rows = [] if rows is None else rows
    all_restored = True
    apply = apply or (lambda c: perturbed(params, c.selection, method, options,
                                          seed=c.seed or 0, layout=layout))
    for condition in conditions:
        checked = condition.selection if layout is None else \
            held_part(params, condition.selection, layout)
        before = snapshot_selected(params, checked)
        start = time.perf_counter()
        n_changed = changed(condition, checked) if changed else None  # of the weights as they are
        with apply(condition):
            if n_changed is None:
                n_changed = count_changed(params, checked, before)
            result = evaluate()
            if on_condition:  # further measurements under the same perturbation
                on_condition(condition)
        restored = selected_bits_equal(params, checked, before) and \
            fingerprint(params) == reference
        if layout is not None:
            restored = layout.ranks.all_true(restored)
            n_changed = layout.ranks.reduced([n_changed]).squeeze(0)
        all_restored &= restored
        if blocks is not None:
            blocks.append(BlockSums(result.block_nll_sum, result.block_tokens))
        rows.append({**condition_row(condition, method, result, baseline, restored,
                                     int(n_changed)),
                     "seconds": round(time.perf_counter() - start, 3)})
        if on_row:
            on_row(rows)
    return rows, all_restored


def condition_row(condition: Condition, method, result: EvalResult, baseline: EvalResult,
                  restored: bool, n_changed: int) -> dict:
    low, high = bootstrap_delta_ppl(baseline, result)
    return {
        "selection": condition.selection_name, "seed": condition.seed, "method": method,
        "n_weights": selection_size(condition.selection), "n_changed": n_changed,
        "vacuous": n_changed == 0, **result.summary(),
        "delta_perplexity": result.perplexity - baseline.perplexity,
        "ppl_ratio": ppl_ratio(result.perplexity, baseline.perplexity),
        "delta_perplexity_ci95": [low, high], "restore_verified": restored,
    }


def block_frame(baseline: EvalResult, rows: list[dict], results: list[BlockSums]) -> pd.DataFrame:
    """One row per evaluation block of the baseline and of each condition (``condition``: the
    row's index in ``conditions``, -1 for the baseline): the NLL sum (nats) and token count the
    bootstrap resamples; the token-weighted mean of a condition's rows is its ``nll``."""
    labels = [(-1, "baseline", None)] + [(i, row["selection"], row["seed"])
                                          for i, row in enumerate(rows)]
    parts = [pd.DataFrame({"condition": index, "selection": selection, "seed": seed,
                           "block": range(result.block_tokens.numel()),
                           "nll_sum": result.block_nll_sum.numpy(),
                           "n_tokens": result.block_tokens.numpy()})
             for (index, selection, seed), result in zip(labels, [baseline, *results])]
    frame = pd.concat(parts, ignore_index=True)[BLOCK_COLUMNS]
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def blocks_from_frame(frame: pd.DataFrame, n_conditions: int) -> list[BlockSums]:
    """The first conditions' block sums back from a ``block_frame`` (``--resume``); fewer than
    ``n_conditions`` when the frame holds fewer."""
    blocks = []
    for index in range(n_conditions):
        part = frame[frame["condition"] == index].sort_values("block")
        if part.empty:
            break
        blocks.append(BlockSums(torch.tensor(part["nll_sum"].to_numpy("float64")),
                                torch.tensor(part["n_tokens"].to_numpy("int64"))))
    return blocks


def ppl_ratio(perplexity: float, baseline_perplexity: float) -> float:
    """perplexity / baseline perplexity: how many times worse; NaN when the baseline is not a
    positive finite number (a ratio to an overflowed baseline means nothing)."""
    if not (math.isfinite(baseline_perplexity) and baseline_perplexity > 0):
        return math.nan
    return perplexity / baseline_perplexity


def bootstrap_delta_ppl(baseline: EvalResult, result: EvalResult, n_samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = 0) -> tuple[float, float]:
    """Paired percentile bootstrap (95%) of perplexity change over evaluation blocks.

    Blocks whose loss overflowed make the resamples that draw them infinite: the interval is
    then [finite, inf] (or [inf, inf] when most resamples draw one); NaN only when the baseline
    itself is not finite."""
    n_blocks = baseline.block_tokens.numel()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_blocks, size=(n_samples, n_blocks))
    tokens = baseline.block_tokens.numpy()[picks].sum(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        base = np.exp(baseline.block_nll_sum.numpy()[picks].sum(axis=1) / tokens)
        cond = np.exp(result.block_nll_sum.numpy()[picks].sum(axis=1) / tokens)
        delta = cond - base
    if np.any(np.isnan(delta)):
        return math.nan, math.nan
    if not np.all(np.isfinite(delta)):
        return percentile_with_inf(delta, 2.5), percentile_with_inf(delta, 97.5)
    low, high = np.percentile(delta, [2.5, 97.5])
    return float(low), float(high)


def percentile_with_inf(values: np.ndarray, q: float) -> float:
    """numpy's linear-interpolation percentile, where a neighbour at +-inf gives +-inf (numpy
    interpolates inf - x into NaN)."""
    ordered = np.sort(values)
    position = q / 100 * (len(ordered) - 1)
    low, high = ordered[math.floor(position)], ordered[math.ceil(position)]
    fraction = position - math.floor(position)
    if fraction == 0 or low == high:
        return float(low)
    if not math.isfinite(low) or not math.isfinite(high):
        return float(high if math.isinf(high) else low)
    return float(low + (high - low) * fraction)


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample sd; a mean over any infinite value is inf (sd then NaN)."""
    arr = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(arr)):
        return (math.inf if np.any(np.isinf(arr)) else math.nan), math.nan
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else 0.0)


def summarize(rows: list[dict], baseline_ppl: float, resolution: float = 0.0) -> dict:
    """Per selection: mean ± sd of perplexity over seeds; top-K against the random-K draws
    (``resolution``: ``perplexity_resolution`` of the baseline, the z-score's floor)."""
    by_selection: dict[str, list[float]] = {}
    for row in rows:
        by_selection.setdefault(row["selection"], []).append(row["perplexity"])
    summary = {}
    for name, values in by_selection.items():
        mean, sd = mean_sd(values)
        summary[name] = {"n": len(values), "mean_perplexity": mean, "sd_perplexity": sd,
                         "mean_delta_perplexity": mean - baseline_ppl}
    if "top_k" in by_selection and "random_k" in by_selection:
        top_mean, _ = mean_sd(by_selection["top_k"])
        summary["top_vs_random"] = compare_to_random(top_mean, by_selection["random_k"],
                                                     baseline_ppl, resolution)
    return summary


# Perplexities are exp of a token-mean NLL summed from float32 token losses: two evaluations of
# models that differ below this relative spread are not told apart.
Z_SD_FLOOR_REL = 1e-6


def perplexity_resolution(baseline: EvalResult, n_samples: int = BOOTSTRAP_SAMPLES,
                          seed: int = 0) -> float:
    """What the evaluation text resolves: the standard error of the baseline perplexity over
    evaluation blocks (sd of the perplexities of the bootstrap's block resamples)."""
    n_blocks = baseline.block_tokens.numel()
    picks = np.random.default_rng(seed).integers(0, n_blocks, size=(n_samples, n_blocks))
    tokens = baseline.block_tokens.numpy()[picks].sum(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        resampled = np.exp(baseline.block_nll_sum.numpy()[picks].sum(axis=1) / tokens)
        return float(np.std(resampled, ddof=1)) if n_samples > 1 else math.nan


def compare_to_random(top_ppl: float, random_ppls: list[float], baseline_ppl: float,
                      resolution: float = 0.0) -> dict:
    """Top-K against the random-K draws: the effect as a ratio of perplexity changes and of
    perplexities (and its log), the empirical p-value with its floor 1/(n+1), and a z-score
    that is None when the draws spread (sd) no more than the evaluation resolves: the larger of
    ``resolution`` (``perplexity_resolution``: controls that move perplexity less than the
    evaluation text's own standard error are indistinguishable from the baseline, and a z over
    their spread is a nine-digit artefact) and float32 rounding (``Z_SD_FLOOR_REL``)."""
    random_arr = np.asarray(random_ppls, dtype=float)
    random_mean, random_sd = mean_sd(random_arr)
    random_delta = random_mean - baseline_ppl
    top_delta = top_ppl - baseline_ppl
    random_abs_delta, _ = mean_sd(np.abs(random_arr - baseline_ppl))
    effect_ratio = abs(top_delta) / random_abs_delta if random_abs_delta != 0 else math.inf
    sd_floor = max(Z_SD_FLOOR_REL * abs(baseline_ppl),
                   resolution if math.isfinite(resolution) else 0.0)
    z_defined = bool(random_sd > sd_floor) if math.isfinite(random_sd) else False
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(top_ppl) / np.float64(random_mean))
    p_value = (1 + int(np.sum(random_arr >= top_ppl))) / (1 + len(random_arr))
    return {"top_k_delta_perplexity": top_delta, "random_k_mean_delta_perplexity": random_delta,
            "random_k_mean_abs_delta_perplexity": random_abs_delta, "effect_ratio": effect_ratio,
            "ppl_ratio_to_random": ratio,
            "log_ppl_ratio_to_random": math.log(ratio) if ratio > 0 else math.nan,
            "random_k_sd_perplexity": random_sd, "z_sd_floor": sd_floor,
            "z_score": (top_ppl - random_mean) / random_sd if z_defined else None,
            "z_undefined_reason": None if z_defined else (
                f"the random-K perplexities spread (sd {random_sd:.3g}) no more than the "
                f"evaluation resolves (sd floor {sd_floor:.3g}: the baseline perplexity's "
                f"standard error over evaluation blocks, at least {Z_SD_FLOOR_REL:g} of it)"),
            "empirical_p_value": p_value, "empirical_p_floor": 1 / (1 + len(random_arr)),
            "n_random_draws": len(random_arr)}
