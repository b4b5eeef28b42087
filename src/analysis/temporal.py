"""--temporal-stability: how does the ranking move as the conditions of scoring change?

Snapshots (each a full rescoring with the run's --metric), in three ordered sequences:

* ``calibration_prefixes``: the first 1/n, 2/n, ..., n/n of the calibration blocks
  (n = --stability-batches, at most one part per block): the ranking as data accumulates; the last
  prefix is the run's own scores (``calibration:all``);
* ``seeds``: per --seeds value, a seeded random subset (--stability-fraction) of the calibration
  blocks: consecutive seeds give the drift expected from sampling alone (the noise floor);
* ``conditions``: ``calibration:all`` then each --conditions-data file (its text packed into
  blocks like the calibration data).

Every pair of snapshots is compared by top-K Jaccard at each K in --temporal-k (default: the run's
--topk, in the run's mode) and by Spearman correlation of |score| over fixed positions: a seeded
uniform sample of weights plus the run's own top-K at the largest K (fixed in advance, so a
snapshot keeps only O(sample + K) numbers, never a full score set). Drift between consecutive
snapshots of a sequence = 1 - Jaccard; a step with drift > --drift-threshold is flagged.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from src.analysis.context import (AnalysisContext, cap_ks, mean_abs_by_layer, require,
                                  sample_positions)
from src.analysis.correlation import spearman
from src.data.loading import TokenBlocks, load_documents, pack_blocks
from src.sensitivity.metrics import compute_scores
from src.sensitivity.rank import Selection, top_k
from src.sensitivity.stability import gather, jaccard, union_positions

REFERENCE = "calibration:all"


@dataclass
class Snapshot:
    label: str
    source: str
    n_blocks: int
    selections: dict[int, Selection]   # K -> top-K, on the host
    values: np.ndarray                 # |score| at the fixed positions
    layer_means: dict[str, float]


def take_snapshot(label: str, source: str, n_blocks: int, scores, ks: list[int], mode: str,
                  positions: Selection, metas) -> Snapshot:
    selections = {k: {n: i.cpu() for n, i in top_k(scores, k, mode).items()} for k in ks}
    return Snapshot(label, source, n_blocks, selections, gather(scores, positions),
                    mean_abs_by_layer(scores, metas))


def prefix_ends(n_blocks: int, n_parts: int) -> list[int]:
    """Cumulative block counts of n roughly equal parts (at most one part per block)."""
    parts = np.array_split(np.arange(n_blocks), max(1, min(n_parts, n_blocks)))
    return np.cumsum([len(p) for p in parts]).tolist()


def seed_subset(n_blocks: int, fraction: float, seed: int) -> torch.Tensor:
    size = max(1, round(fraction * n_blocks))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_blocks, generator=generator)[:size].sort().values


def condition_blocks(tokenizer, path: str, max_length: int, max_samples: int | None) -> TokenBlocks:
    documents, _ = load_documents(data_file=path)
    blocks = pack_blocks(tokenizer, documents, max_length, max_samples)
    require(len(blocks) > 0, f"--conditions-data '{path}' has fewer tokens than one block of "
                             f"--max-length {max_length}; give more text or a smaller --max-length")
    return blocks


def snapshot_plan(ctx: AnalysisContext) -> tuple[list[tuple], dict[str, list[str]]]:
    """[(label, source, blocks or None for the run's scores, seed)], and the sequences."""
    c = ctx.config
    calibration = ctx.data.calibration
    n = len(calibration)
    plan, sequences = [], {"calibration_prefixes": [], "seeds": [], "conditions": [REFERENCE]}
    for end in prefix_ends(n, c.stability_batches):
        label = REFERENCE if end == n else f"calibration[:{end}]"
        plan.append((label, f"first {end} of {n} calibration blocks",
                     None if end == n else calibration.subset(range(end)), c.seeds[0]))
        sequences["calibration_prefixes"].append(label)
    for seed in c.seeds:
        index = seed_subset(n, c.stability_fraction, seed)
        plan.append((f"seed{seed}", f"{len(index)} random calibration blocks (seed {seed})",
                     calibration.subset(index), seed))
        sequences["seeds"].append(f"seed{seed}")
    for path in c.conditions_data:
        label = f"file:{Path(path).name}"
        blocks = condition_blocks(ctx.tokenizer, path, c.max_length, c.max_samples)
        plan.append((label, f"{len(blocks)} blocks of {path}", blocks, c.seeds[0]))
        sequences["conditions"].append(label)
    if len(sequences["conditions"]) == 1:
        del sequences["conditions"]
    return plan, sequences


def compare_snapshots(snapshots: list[Snapshot], ks: list[int]) -> dict:
    pairs = []
    for a, b in itertools.combinations(snapshots, 2):
        pairs.append({"a": a.label, "b": b.label,
                      "jaccard": {str(k): jaccard(a.selections[k], b.selections[k]) for k in ks},
                      "spearman": spearman(a.values, b.values)})
    return {"pairs": pairs}


def drift(snapshots: dict[str, Snapshot], sequences: dict[str, list[str]], ks: list[int],
          threshold: float) -> dict:
    out = {}
    for name, labels in sequences.items():
        steps = []
        for first, second in zip(labels, labels[1:]):
            a, b = snapshots[first], snapshots[second]
            for k in ks:
                jac = jaccard(a.selections[k], b.selections[k])
                steps.append({"from": first, "to": second, "k": k, "jaccard": jac,
                              "drift": 1.0 - jac, "spearman": spearman(a.values, b.values),
                              "flagged": (1.0 - jac) > threshold})
        drifts = [s["drift"] for s in steps]
        out[name] = {"snapshots": labels, "steps": steps,
                     "mean_drift": float(np.mean(drifts)) if drifts else None,
                     "max_drift": float(np.max(drifts)) if drifts else None,
                     "n_flagged": sum(s["flagged"] for s in steps)}
    return out


def run(ctx: AnalysisContext) -> dict:
    c = ctx.config
    ks, capped = cap_ks(c.temporal_k or (c.topk,), ctx.sizes, c.mode)
    plan, sequences = snapshot_plan(ctx)
    reference_top = top_k(ctx.scores, ks[-1], c.mode)
    positions = union_positions([sample_positions(ctx.sizes, seed=c.seeds[0]), reference_top])
    snapshots: dict[str, Snapshot] = {}
    for label, source, blocks, seed in tqdm(plan, desc="temporal snapshots", disable=not c.verbose,
                                            leave=False):
        if blocks is None:
            scores, n_blocks = ctx.scores, len(ctx.data.calibration)
        else:
            job = dataclasses.replace(ctx.job, blocks=blocks, seed=seed)
            scores, n_blocks = compute_scores(job, c.metric).scores, len(blocks)
        snapshots[label] = take_snapshot(label, source, n_blocks, scores, ks, c.mode, positions,
                                         ctx.metas)
        del scores
    ordered = list(snapshots.values())
    return {"metric": c.metric, "mode": c.mode, "k_values": ks, "k_capped": capped,
            "drift_threshold": c.drift_threshold,
            "spearman_on": f"{len(ordered[0].values)} fixed positions: seeded uniform sample + "
                           f"the run's top-{ks[-1]}",
            "snapshots": [{"label": s.label, "source": s.source, "n_blocks": s.n_blocks,
                           "layer_mean_abs_score": s.layer_means} for s in ordered],
            **compare_snapshots(ordered, ks),
            "drift": drift(snapshots, sequences, ks, c.drift_threshold)}


def summary_lines(section: dict) -> list[str]:
    lines = [f"temporal stability ({len(section['snapshots'])} snapshots, K={section['k_values']}, "
             f"drift threshold {section['drift_threshold']}):"]
    for name, seq in section["drift"].items():
        if seq["mean_drift"] is None:
            continue
        lines.append(f"  {name}: mean drift {seq['mean_drift']:.3f}, max {seq['max_drift']:.3f}, "
                     f"{seq['n_flagged']} of {len(seq['steps'])} steps flagged")
    return lines
