"""The compression experiment: quantize every scored weight except a kept set, against controls.

Conditions (each evaluated like a perturbation condition, exact restore verified):
``rtn`` (nothing kept), ``rtn_keep_top_k`` (the run's top-K kept at full precision),
``rtn_keep_random_k`` (K random weights of the same eligible set and mode, one draw per seed),
``rtn_keep_bottom_k`` (the K lowest |score| among the weights that quantization changes: keeping
a weight that is already on the grid keeps nothing). The row's ``kept`` is ``none``, ``top_k``,
``random_k`` or ``bottom_k``. ``n_changed``: for ``rtn`` the weights quantization changes; for a
kept set how many of its weights quantization would have changed (what keeping them can win).

Recovery of a kept set = (ppl_rtn - ppl_kept) / (ppl_rtn - ppl_baseline): the share of the
quantization loss that keeping those weights at full precision wins back (1 = all of it,
0 = none, negative = worse than quantizing them too). Top-K against random-K: the random-K
recoveries' mean and sd, the difference, a z-score and an empirical p-value
(1 + #{random recovery >= top recovery}) / (1 + n).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from src.sensitivity import experiment
from src.sensitivity.experiment import Condition, mean_sd
from src.sensitivity.perturb import PerturbOptions
from src.sensitivity.rank import Selection, selection_size


def build_conditions(top: Selection, scores, k: int, mode: str, controls, seeds,
                     changes, layout=None) -> list:
    """rtn, then the kept sets (top-K, random-K per seed, bottom-K); ``changes``
    (quantize.changed_by): where bottom-K is drawn; ``layout``: sharded."""
    kept = experiment.build_conditions(top, scores, k, mode, list(controls), list(seeds),
                                       "zero", PerturbOptions(),  # deterministic: top once
                                       layout=layout, eligible=changes)
    return [Condition("none", None, {}), *kept]


def count_changed(changes, names, condition: Condition, checked: Selection) -> torch.Tensor:
    """``n_changed`` of a condition (0-dim, CPU): the weights of ``names`` quantization changes
    (rtn), or how many of a kept set's (locally held) weights it would have changed."""
    if condition.selection_name == "none":
        counts = [changes(name).sum() for name in names]
    else:
        masks = {name: changes(name).reshape(-1) for name in checked}
        counts = [masks[name][idx.to(masks[name].device)].sum() for name, idx in checked.items()]
    return torch.stack([c.cpu() for c in counts]).sum() if counts else torch.zeros((), dtype=torch.long)


def condition_name(kept: str) -> str:
    return "rtn" if kept == "none" else f"rtn_keep_{kept}"


def recovery(ppl_kept: float, ppl_rtn: float, ppl_baseline: float) -> float:
    loss = ppl_rtn - ppl_baseline
    if not (math.isfinite(loss) and math.isfinite(ppl_kept)) or loss == 0:
        return math.nan
    return (ppl_rtn - ppl_kept) / loss


def with_recovery(rows: list[dict], baseline_ppl: float) -> list[dict]:
    """Rows named as conditions, each with its recovery (needs the rtn row, the first)."""
    rtn = rows[0]["perplexity"] if rows and rows[0]["selection"] == "none" else math.nan
    return [{"condition": condition_name(row["selection"]), "kept": row["selection"],
             **{k: v for k, v in row.items() if k != "selection"},
             "recovery": 0.0 if row["selection"] == "none" else
             recovery(row["perplexity"], rtn, baseline_ppl)} for row in rows]


def raw_rows(named_rows: list[dict]) -> list[dict]:
    """The experiment's own rows back from rows ``with_recovery`` made (to resume from them)."""
    return [{"selection": row["kept"], **{k: v for k, v in row.items()
                                           if k not in ("condition", "kept", "recovery")}}
            for row in named_rows]


def summarize(rows: list[dict]) -> dict:
    """Per kept set: mean ± sd of perplexity and recovery; top-K against random-K."""
    by_kept: dict[str, list[dict]] = {}
    for row in rows:
        by_kept.setdefault(row["kept"], []).append(row)
    summary = {}
    for kept, group in by_kept.items():
        ppl_mean, ppl_sd = mean_sd([r["perplexity"] for r in group])
        rec_mean, rec_sd = mean_sd([r["recovery"] for r in group])
        summary[kept] = {"n": len(group), "mean_perplexity": ppl_mean, "sd_perplexity": ppl_sd,
                         "mean_recovery": rec_mean, "sd_recovery": rec_sd}
    if "top_k" in by_kept and "random_k" in by_kept:
        summary["top_vs_random"] = compare_recovery(
            summary["top_k"]["mean_recovery"], [r["recovery"] for r in by_kept["random_k"]])
    return summary


def compare_recovery(top: float, randoms: list[float]) -> dict:
    values = np.asarray(randoms, dtype=float)
    mean, sd = mean_sd(values)
    z = (top - mean) / sd if sd and math.isfinite(sd) and sd > 0 else math.nan
    at_least = int(np.sum(values >= top)) if math.isfinite(top) else len(values)
    return {"top_k_recovery": top, "random_k_mean_recovery": mean, "random_k_sd_recovery": sd,
            "difference": top - mean, "z_score": z,
            "empirical_p_value": (1 + at_least) / (1 + len(values)), "n_random_draws": len(values)}


def share_kept(selection: Selection, n_eligible: int) -> float:
    return selection_size(selection) / n_eligible if n_eligible else math.nan
