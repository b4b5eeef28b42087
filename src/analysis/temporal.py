"""--temporal-stability: how does the ranking move as the conditions of scoring change?

Snapshots (each a full rescoring with the run's metric), in three ordered sequences:

* ``calibration_prefixes``: the first 1/n, 2/n, ..., n/n of the calibration blocks
  (n = --stability-batches, at most one part per block): the ranking as data accumulates; the last
  prefix is the run's own scores (``calibration:all``);
* ``seeds``: per --seeds value, a seeded random subset (--stability-fraction) of the calibration
  blocks, drawn as --stability-check draws them: consecutive seeds give the drift expected from
  sampling alone (the noise floor);
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
from tqdm.auto import tqdm

from src.analysis.context import AnalysisContext, cap_ks, mean_abs_by_layer, sample_positions
from src.analysis.registry import Analysis, register
from src.data.loading import TokenBlocks, load_documents, pack_blocks
from src.errors import UserError
from src.options import Settings, int_list, number, option, text_file
from src.sensitivity.metrics import compute_scores
from src.sensitivity.rank import Selection, top_k
from src.sensitivity.stability import (disjoint_parts, gather, jaccard, seed_subset, spearman,
                                       union_positions)
from src.utils.format import sig

REFERENCE = "calibration:all"
GROUP = "advanced analysis"


def _temporal(config) -> bool:
    return config.analysis_enabled("temporal_stability")


@dataclass(frozen=True)
class TemporalSettings(Settings):
    temporal_stability: bool = option(
        False, "rescore under calibration prefixes, seed subsets and --conditions-data files; "
        "pairwise Jaccard/Spearman and drift", group=GROUP)
    conditions_data: tuple[str, ...] = option(
        (), "--temporal-stability: extra text files, one snapshot each", group=GROUP,
        parse=text_file, many=True, metavar="FILE",
        used_when=("--temporal-stability", _temporal))
    drift_threshold: float = option(
        0.5, "--temporal-stability: flag consecutive snapshots whose drift (1 - top-K Jaccard) "
        "exceeds this", group=GROUP, parse=number(0.0, 1.0),
        used_when=("--temporal-stability", _temporal))
    temporal_k: tuple[int, ...] = option(
        (), "--temporal-stability: comma-separated K values to compare at (default: --topk)",
        group=GROUP, parse=int_list(1), used_when=("--temporal-stability", _temporal))


@dataclass
class Snapshot:
    label: str
    source: str
    n_blocks: int
    selections: dict[int, Selection]   # K -> top-K, on the host
    values: np.ndarray                 # |score| at the fixed positions
    layer_means: dict[str, float]


def take_snapshot(label: str, source: str, n_blocks: int, scores, ks: list[int], mode: str,
                  positions: Selection, metas, layout=None) -> Snapshot:
    """``layout`` (sharding.Layout) when ``scores`` are this rank's rows."""
    selections = {k: {n: i.cpu() for n, i in top_k(scores, k, mode, layout=layout).items()}
                  for k in ks}
    return Snapshot(label, source, n_blocks, selections, gather(scores, positions, layout),
                    mean_abs_by_layer(scores, metas, layout))


def prefix_ends(n_blocks: int, n_parts: int) -> list[int]:
    """Cumulative block counts of n roughly equal parts (at most one part per block)."""
    return np.cumsum([len(p) for p in disjoint_parts(n_blocks, n_parts)]).tolist()


def condition_blocks(settings, preflight) -> dict[str, TokenBlocks]:
    """Before the run: every --conditions-data file packed into blocks (path -> blocks)."""
    blocks = {}
    for path in settings.conditions_data:
        documents, _ = load_documents(data_file=path)
        blocks[path] = pack_blocks(preflight.tokenizer, documents, settings.max_length,
                                   settings.max_samples)
        if len(blocks[path]) == 0:
            raise UserError(f"--conditions-data '{path}' has fewer tokens than one block of "
                            f"--max-length {settings.max_length}; give more text or a smaller "
                            f"--max-length")
    return blocks


def snapshot_plan(ctx: AnalysisContext) -> tuple[list[tuple], dict[str, list[str]]]:
    """[(label, source, blocks or None for the run's scores, seed)], and the sequences."""
    s = ctx.settings
    calibration = ctx.data.calibration
    n = len(calibration)
    plan, sequences = [], {"calibration_prefixes": [], "seeds": [], "conditions": [REFERENCE]}
    for end in prefix_ends(n, s.stability_batches):
        label = REFERENCE if end == n else f"calibration[:{end}]"
        plan.append((label, f"first {end} of {n} calibration blocks",
                     None if end == n else calibration.subset(range(end)), ctx.seeds[0]))
        sequences["calibration_prefixes"].append(label)
    for seed in ctx.seeds:
        index = seed_subset(n, s.stability_fraction, seed)
        plan.append((f"seed{seed}", f"{len(index)} random calibration blocks (seed {seed})",
                     calibration.subset(index), seed))
        sequences["seeds"].append(f"seed{seed}")
    for path, blocks in ctx.prepared.items():
        label = f"file:{Path(path).name}"
        plan.append((label, f"{len(blocks)} blocks of {path}", blocks, ctx.seeds[0]))
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
    s = ctx.settings
    ks, capped = cap_ks(s.temporal_k or (ctx.k,), ctx.sizes, ctx.mode)
    plan, sequences = snapshot_plan(ctx)
    reference_top = top_k(ctx.scores, ks[-1], ctx.mode, layout=ctx.layout)
    positions = union_positions([sample_positions(ctx.sizes, seed=ctx.seeds[0]), reference_top])
    snapshots: dict[str, Snapshot] = {}
    for label, source, blocks, seed in tqdm(plan, desc="temporal snapshots",
                                            disable=not ctx.progress, leave=False):
        if blocks is None:
            scores, n_blocks = ctx.scores, len(ctx.data.calibration)
        else:
            job = dataclasses.replace(ctx.job, blocks=blocks, seed=seed)
            scores, n_blocks = compute_scores(job, ctx.metric).scores, len(blocks)
        snapshots[label] = take_snapshot(label, source, n_blocks, scores, ks, ctx.mode,
                                         positions, ctx.metas, ctx.layout)
        del scores
    ordered = list(snapshots.values())
    return {"metric": ctx.metric, "mode": ctx.mode, "k_values": ks, "k_capped": capped,
            "drift_threshold": s.drift_threshold,
            "spearman_on": f"{len(ordered[0].values)} fixed positions: seeded uniform sample + "
                           f"the run's top-{ks[-1]}",
            "snapshots": [{"label": x.label, "source": x.source, "n_blocks": x.n_blocks,
                           "layer_mean_abs_score": x.layer_means} for x in ordered],
            **compare_snapshots(ordered, ks),
            "drift": drift(snapshots, sequences, ks, s.drift_threshold)}


def summary_lines(section: dict) -> list[str]:
    lines = [f"temporal stability ({len(section['snapshots'])} snapshots, K={section['k_values']}, "
             f"drift threshold {section['drift_threshold']}):"]
    for name, seq in section["drift"].items():
        if seq["mean_drift"] is None:
            continue
        lines.append(f"  {name}: mean drift {seq['mean_drift']:.3f}, max {seq['max_drift']:.3f}, "
                     f"{seq['n_flagged']} of {len(seq['steps'])} steps flagged")
    return lines


def findings(section: dict) -> list[str]:
    lines = []
    for name, family in section.get("drift", {}).items():
        if isinstance(family, dict) and family.get("steps"):
            lines.append(f"Top-K drift across {name.replace('_', ' ')}: mean "
                         f"{family['mean_drift']:.3f}, max {family['max_drift']:.3f}, "
                         f"{family['n_flagged']} step(s) above the "
                         f"{section.get('drift_threshold')} threshold.")
    return lines


def plot_drift(section: dict):
    from src.plots.style import SkipPlot, colours, plt

    families = {name: fam for name, fam in section["drift"].items()
                if isinstance(fam, dict) and fam.get("steps")}
    if not families:
        raise SkipPlot("the temporal-stability analysis has fewer than two snapshots per family")
    figure, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 4.4),
                                squeeze=False)
    threshold = section.get("drift_threshold")
    for ax, (name, family) in zip(axes[0], families.items()):
        steps = family["steps"]
        ks = sorted({step["k"] for step in steps})
        for k, colour in zip(ks, colours(len(ks))):
            chosen = [x for x in steps if x["k"] == k]
            ax.plot(range(len(chosen)), [x["drift"] for x in chosen], "-o", color=colour,
                    label=f"K={k}")
        labels = [f"{x['from']}\n→ {x['to']}" for x in steps if x["k"] == steps[0]["k"]]
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        if threshold is not None:
            ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
                       label=f"flag threshold {threshold:g}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("drift = 1 − Jaccard of top-K sets")
        ax.set_xlabel("consecutive snapshots")
        ax.set_title(f"{name.replace('_', ' ')}: mean drift {sig(family.get('mean_drift'), 3)}",
                     fontsize=10)
        ax.legend(fontsize=7)
    figure.suptitle(f"Top-K drift between calibration snapshots ({section.get('metric')})")
    figure.tight_layout()
    return figure


register(Analysis(
    key="temporal_stability", flag="--temporal-stability",
    run=run, summary=summary_lines, findings=findings,
    settings=(TemporalSettings,), prepare=condition_blocks,
    reads=("stability_fraction", "stability_batches", "max_length", "max_samples"),
    enabled=lambda s: s.temporal_stability, plots={"temporal_drift": plot_drift}))
