"""The causal check of super-weight candidates, through the perturbation experiment
(src/sensitivity/experiment.py: zeroed, evaluated, bit-exactly restored), and where each
candidate ranks under the run's metric (see the package docstring)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from src.analysis.super_weights.detection import candidate_selection
from src.eval.perplexity import EvalResult
from src.sensitivity import experiment
from src.sensitivity.experiment import Condition
from src.sensitivity.perturb import PerturbOptions
from src.sensitivity.rank import Selection, random_k, top_k
from src.utils.seeds import stable_seed
from src.distributed.sharding import local

CONFIRM_MARGIN = 0.10     # ratio_alone must exceed the worst control ratio by this much


def random_control(name: str, numel: int, n: int, exclude: torch.Tensor,
                   seed: int) -> torch.Tensor:
    """n distinct flat indices drawn uniformly from the tensor minus ``exclude`` (sorted), from
    the stream of (seed, tensor name).

    A uniform (n + |exclude|)-subset with the excluded entries removed, thinned to a uniform
    n-subset, is uniform over the n-subsets of the remaining weights.
    """
    stream = stable_seed(seed, name)
    drawn = random_k({name: numel}, n + exclude.numel(), "per_tensor", stream)[name]
    kept = drawn[~torch.isin(drawn, exclude.cpu())]
    generator = torch.Generator().manual_seed(stream)
    return kept[torch.randperm(kept.numel(), generator=generator)[:n]].sort().values


def magnitude_control(name: str, param: torch.Tensor, n: int, exclude: torch.Tensor,
                      layout=None) -> torch.Tensor:
    """Flat indices of the n largest-|w| weights of the tensor outside ``exclude`` (rank order,
    ties to the lower index as in ``rank.top_k``); ``layout`` when ``param`` is sharded."""
    ranked = top_k({name: local(param).detach()}, min(n + exclude.numel(), param.numel()),
                   "per_tensor", layout=layout)[name]
    return ranked[~torch.isin(ranked, exclude.to(ranked.device))][:n]


def clears(ratio: float, max_control_ratio: float, margin: float = CONFIRM_MARGIN) -> bool:
    """The confirmation rule: ratio > worst control ratio + margin (False on NaN)."""
    return bool(ratio > max_control_ratio + margin)


class Zeroing:
    """Zeroes selections of ``params`` one condition at a time through the experiment;
    ``layout`` (sharding.Layout) when they are sharded."""

    def __init__(self, params, evaluate, baseline: EvalResult, layout=None):
        self.params, self.evaluate, self.baseline = params, evaluate, baseline
        self.layout = layout
        self.restored = True

    def __call__(self, conditions: list[Condition]) -> list[dict]:
        rows, restored = experiment.run_conditions(self.params, conditions, "zero",
                                                   PerturbOptions(), self.evaluate, self.baseline,
                                                   layout=self.layout)
        self.restored &= restored
        return [{"perplexity": row["perplexity"], "ratio": row["ppl_ratio"]} for row in rows]


def treatment_and_controls(zeroing: Zeroing, treated: Selection, exclude: Selection,
                           seeds) -> tuple[dict, dict]:
    """(the treated weights zeroed, its controls): per tensor as many random weights (per seed)
    and as many largest-|w| weights, none of them in ``exclude`` (every candidate)."""
    params = zeroing.params
    randoms = [{name: random_control(name, params[name].numel(), int(idx.numel()),
                                     exclude[name], seed)
                for name, idx in treated.items()} for seed in seeds]
    largest = {name: magnitude_control(name, params[name], int(idx.numel()), exclude[name],
                                       zeroing.layout) for name, idx in treated.items()}
    conditions = [Condition("treated", None, treated),
                  *(Condition("random_k", seed, sel) for seed, sel in zip(seeds, randoms)),
                  Condition("largest_magnitude", None, largest)]
    treated_row, *random_rows, largest_row = zeroing(conditions)
    controls = {
        "random": [{"seed": seed, **row, "flat_index": _flat_lists(sel)}
                   for seed, row, sel in zip(seeds, random_rows, randoms)],
        "largest_magnitude": {**largest_row, "flat_index": _flat_lists(largest),
                              "value": _values(params, largest, zeroing.layout)},
        "max_control_ratio": max([r["ratio"] for r in random_rows] + [largest_row["ratio"]])}
    return treated_row, controls


def _values(params, selection: Selection, layout=None) -> dict[str, list[float]]:
    """The weights at the selected flat indices (read from the ranks holding them, --shard)."""
    if layout is not None:
        values = layout.values_at({n: (local(params[n]), idx) for n, idx in selection.items()})
        return {name: v.float().tolist() for name, v in values.items()}
    return {name: params[name].detach().reshape(-1)[idx.to(params[name].device)].float().cpu()
            .tolist() for name, idx in selection.items()}


def _flat_lists(selection: Selection) -> dict[str, list[int]]:
    return {name: idx.cpu().tolist() for name, idx in selection.items()}


def causal_check(zeroing: Zeroing, candidates: list[dict], seeds, progress: bool = False) -> dict:
    """Zero each candidate alone and the whole set, each against its controls; adds
    ``alone`` / ``controls`` / ``confirmed`` to every candidate and returns the set's record."""
    everything = candidate_selection(candidates)
    for c in tqdm(candidates, desc="super-weight causal check", disable=not progress,
                  leave=False):
        alone = {c["parameter"]: torch.tensor([c["flat_index"]])}
        c["alone"], c["controls"] = treatment_and_controls(zeroing, alone, everything, seeds)
        c["confirmed"] = clears(c["alone"]["ratio"], c["controls"]["max_control_ratio"])
    if not candidates:
        return {"n_weights": 0}
    if len(candidates) == 1:  # the set is the candidate: same conditions, same control draws
        only = candidates[0]
        return {"n_weights": 1, **only["alone"], "controls": only["controls"],
                "clears_controls": only["confirmed"]}
    whole, controls = treatment_and_controls(zeroing, everything, everything, seeds)
    return {"n_weights": len(candidates), **whole, "controls": controls,
            "clears_controls": clears(whole["ratio"], controls["max_control_ratio"])}


def metric_rank(scores: dict[str, torch.Tensor], name: str, flat_index: int,
                layout=None) -> dict | None:
    """Rank by |score| of one weight (1 = highest; ties share the best rank), within its tensor
    and over all scored tensors; None when the tensor was not scored. ``layout``
    (sharding.Layout) when ``scores`` are this rank's rows: counts added over the ranks."""
    if name not in scores:
        return None
    if layout is None:
        score = scores[name].reshape(-1)[flat_index]
    else:
        read = layout.values_at({name: (scores[name], torch.tensor([flat_index]))})[name][0]
        score = read.to(scores[name].dtype)
    key = score.abs()
    above = [(s.detach().abs() > key.to(s.device)).sum() for s in scores.values()]
    above = torch.stack([a.cpu() for a in above]) if layout is None else \
        layout.ranks.reduced(above).long()
    numel = {n: layout.numel[n] if layout else s.numel() for n, s in scores.items()}
    in_tensor = int(above[list(scores).index(name)])
    return {"score": float(score), "rank_in_tensor": in_tensor + 1,
            "n_in_tensor": numel[name], "rank_global": int(above.sum()) + 1,
            "n_global": sum(numel.values())}
