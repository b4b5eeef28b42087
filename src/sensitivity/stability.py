"""How stable is a top-K set? Jaccard and rank agreement across seeds and calibration batches.

(a) across seeds: seed s draws its own random subset (``fraction`` of the calibration blocks),
    rescores and re-ranks; (b) across batches: the calibration blocks are cut into ``n_batches``
    disjoint contiguous parts, each scored on its own. Every pair of top-K sets is compared by
    Jaccard |A∩B| / |A∪B|, and every pair of score vectors by Spearman correlation over the
    union of all the top-K sets of that family (ranked by |score|).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from contextlib import contextmanager

import numpy as np
import torch
from scipy.stats import spearmanr

from src.sensitivity.metrics import METRICS, compute_scores
from src.sensitivity.rank import Selection, top_k
from src.sensitivity.scoring import ScoringJob
from src.distributed.sharding import local


def seed_subset(n_blocks: int, fraction: float, seed: int) -> torch.Tensor:
    """A seeded random subset of round(fraction * n_blocks) block indices (at least one), sorted:
    how stability and temporal analysis draw calibration samples."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_blocks, generator=generator)[:subset_size(n_blocks, fraction)]
    return chosen.sort().values


def subset_size(n_blocks: int, fraction: float) -> int:
    return max(1, round(fraction * n_blocks))


def disjoint_parts(n_blocks: int, n_parts: int) -> list[list[int]]:
    """Block indices cut into ``n_parts`` contiguous parts of near-equal size (at most one part
    per block)."""
    return [part.tolist() for part in np.array_split(np.arange(n_blocks),
                                                     max(1, min(n_parts, n_blocks)))]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rho (average ranks for ties); None when undefined (constant input, n < 2)."""
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None


def jaccard(a: Selection, b: Selection) -> float:
    intersection = 0
    for name in set(a) & set(b):
        intersection += int(torch.isin(a[name], b[name].to(a[name].device)).sum())
    size_a = sum(int(v.numel()) for v in a.values())
    size_b = sum(int(v.numel()) for v in b.values())
    union = size_a + size_b - intersection
    return intersection / union if union else 1.0


def union_positions(selections: list[Selection]) -> dict[str, torch.Tensor]:
    names = dict.fromkeys(name for s in selections for name in s)
    return {name: torch.unique(torch.cat([s[name].cpu() for s in selections if name in s]))
            for name in names}


def gather(scores: dict[str, torch.Tensor], positions: dict[str, torch.Tensor],
           layout=None) -> np.ndarray:
    """|score| at each position (full-tensor flat indices); ``layout`` (sharding.Layout) when
    ``scores`` are this rank's shards: the values come from the ranks that hold them."""
    if layout is not None:
        values = layout.values_at({name: (scores[name], idx) for name, idx in positions.items()})
        return torch.cat([values[name].abs().float() for name in positions]).numpy()
    parts = [scores[name].reshape(-1)[idx.to(scores[name].device)].abs().float().cpu()
             for name, idx in positions.items()]
    return torch.cat(parts).numpy()


def pairwise(values: list, measure) -> dict:
    """``measure`` of every pair; mean and std over the pairs where it is defined."""
    pairs = [{"a": i, "b": j, "value": measure(values[i], values[j])}
             for i, j in itertools.combinations(range(len(values)), 2)]
    numbers = [p["value"] for p in pairs if p["value"] is not None]
    return {"mean": float(np.mean(numbers)) if numbers else None,
            "std": float(np.std(numbers)) if numbers else None, "pairs": pairs}


def compare_rankings(score_sets: list, selections: list[Selection], labels: list,
                     layout=None) -> dict:
    """``score_sets``: Scores, or callables that recompute them (sets too large to keep)."""
    union = union_positions(selections)
    vectors = [gather(scores() if callable(scores) else scores, union, layout)
               for scores in score_sets]
    jac = pairwise(selections, jaccard)
    spear = pairwise(vectors, spearman)
    for pair_list in (jac["pairs"], spear["pairs"]):
        for pair in pair_list:
            pair["a"], pair["b"] = labels[pair["a"]], labels[pair["b"]]
    return {"labels": labels, "jaccard": jac, "spearman": spear,
            "union_size": int(sum(v.numel() for v in union.values()))}


def same_as_main(job: ScoringJob, metric: str, index, seed: int) -> bool:
    """Whether scoring this subset and seed repeats the run's own scoring exactly (all blocks or
    a data-free metric, and the run's seed or a metric the seed does not change)."""
    spec = METRICS[metric]
    return (len(index) == len(job.blocks) or not spec.uses_data) and \
        (seed == job.seed or "seed" not in spec.options)


def _score_subset(job: ScoringJob, metric: str, index, seed: int, k: int, mode: str,
                  keep: bool = True, main_scores: dict | None = None, layout=None):
    """(scores offloaded to the CPU, or a callable that rescores when they are too large to keep
    beside the other sets; top-K selection ranked where the scores were computed). The run's
    ``main_scores`` stand in when they are what this scoring would compute."""
    sub_job = dataclasses.replace(job, blocks=job.blocks.subset(index), seed=seed)
    if main_scores is not None and same_as_main(job, metric, index, seed):
        rescore = lambda: main_scores  # noqa: E731
    else:
        rescore = lambda: compute_scores(sub_job, metric).scores  # noqa: E731
    scores = rescore()
    selection = top_k(scores, k, mode, layout=layout)
    if not keep:
        return rescore, selection
    return {name: s.cpu() for name, s in scores.items()}, selection


KEEP_FRACTION = 0.25  # share of the available RAM that kept score sets may use


def _sets_fit_in_memory(params: dict, n_sets: int) -> bool:
    """Whether ``n_sets`` float32 copies of every score (this process's shards under --shard)
    fit in a quarter of the available RAM (at 8B weights each set is 32 GB: those are rescored
    for the comparison instead)."""
    needed = 4 * n_sets * sum(local(p).numel() for p in params.values())
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf: keep up to 2 GiB
        return needed <= 2 ** 31
    return needed <= available * KEEP_FRACTION


@contextmanager
def room_for_rescoring(scores: dict):
    """Park the run's score tensors on the CPU while stability rescores, on each GPU that lacks
    room for a second full set (float32 accumulators) plus working memory; moved back after.
    At 8B weights a set is 32 GB: this is what lets stability run on an 80 GB GPU."""
    parked = {}
    for device in {s.device for s in scores.values() if s.is_cuda}:
        on_device = [n for n, s in scores.items() if s.device == device]
        set_bytes = sum(scores[n].numel() * scores[n].element_size() for n in on_device)
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if free < 2 * set_bytes:
            parked.update({n: device for n in on_device})
    for name in parked:
        scores[name] = scores[name].cpu()
    try:
        yield
    finally:
        for name, device in parked.items():
            scores[name] = scores[name].to(device)


def stability_check(job: ScoringJob, metric: str, k: int, mode: str, seeds: list[int],
                    fraction: float, n_batches: int, main_scores: dict | None = None,
                    layout=None) -> dict:
    """Jaccard and Spearman across seed subsets and across disjoint calibration parts;
    ``n_batches`` must be between 2 and the number of calibration blocks. ``main_scores``: the
    run's scores (computed or loaded), reused where a subset would repeat them. ``layout``
    (sharding.Layout) under --shard: every set is scored, ranked and compared across ranks."""
    n_blocks = len(job.blocks)
    keep = _sets_fit_in_memory(job.params, len(seeds) + n_batches)
    if layout is not None:  # rescoring later is a collective: every rank must choose alike
        keep = layout.ranks.all_true(keep)
    seed_scores, seed_selections = [], []
    for seed in seeds:
        index = seed_subset(n_blocks, fraction, seed)
        scores, selection = _score_subset(job, metric, index, seed, k, mode, keep, main_scores,
                                          layout)
        seed_scores.append(scores)
        seed_selections.append(selection)
    parts = disjoint_parts(n_blocks, n_batches)
    batch_scores, batch_selections = [], []
    for part in parts:
        scores, selection = _score_subset(job, metric, part, job.seed, k, mode, keep,
                                          main_scores, layout)
        batch_scores.append(scores)
        batch_selections.append(selection)
    return {
        "metric": metric, "k": k, "mode": mode,
        "across_seeds": {"fraction": fraction, "blocks_per_seed": subset_size(n_blocks, fraction),
                         **compare_rankings(seed_scores, seed_selections, list(seeds), layout)},
        "across_batches": {"n_batches": n_batches, "blocks_per_batch": [len(p) for p in parts],
                           **compare_rankings(batch_scores, batch_selections,
                                              [f"batch{i}" for i in range(n_batches)], layout)},
    }
