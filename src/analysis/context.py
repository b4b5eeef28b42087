"""What every analysis receives, and the small helpers several analyses share.

An analysis is ``run(ctx: AnalysisContext) -> dict``; the pipeline writes the dict to
``enhanced_analysis.json`` under the analysis' key. ``ctx.settings`` holds the analysis' own
flags (and the run settings it declared it reads), nothing else of the configuration. Scores
follow the project convention: one float32 tensor per scored parameter in its stored layout,
ranked by |score|.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from src.data.loading import DataSplit
from src.eval.perplexity import EvalResult, evaluate
from src.models.components import ParamMeta
from src.sensitivity.perturb import PerturbOptions
from src.sensitivity.rank import Selection, max_k, random_k, selection_size, top_k
from src.sensitivity.scoring import MetricOutput, Scores, ScoringJob

from src.sensitivity.statistics import per_tensor

SPEARMAN_SAMPLE = 100_000  # weights in the fixed random sample behind every Spearman correlation


@dataclass
class Preflight:
    """What an analysis' prepare() may inspect: the loaded model and data, before the run."""
    model: torch.nn.Module
    tokenizer: Any
    params: dict[str, torch.nn.Parameter]
    data: DataSplit


@dataclass
class AnalysisContext:
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    scored: MetricOutput             # the run's metric: scores, standard errors, facts
    selection: Selection             # the run's top-K (its K and mode)
    metas: dict[str, ParamMeta]
    job: ScoringJob                  # the run's scoring job (model, weights, calibration blocks)
    data: DataSplit
    baseline: EvalResult
    metric: str
    k: int
    mode: str
    seeds: tuple[int, ...]
    controls: tuple[str, ...]        # control selections of the perturbation experiments
    method: str                      # perturbation of the experiments (the run's, else zero)
    options: PerturbOptions
    batch_size: int = 4
    progress: bool = False
    tokenizer: Any = None
    settings: SimpleNamespace = field(default_factory=SimpleNamespace)
    prepared: Any = None             # what the analysis' prepare() returned before the run
    cache: dict = field(default_factory=dict)  # shared by the analyses of one run; ("section",
    # key): the section of an analysis that ran (or was kept by --resume) before this one
    layout: Any = None               # sharding.Layout under --shard: scores are this rank's rows

    def evaluate(self) -> EvalResult:
        return evaluate(self.model, self.data.evaluation, self.batch_size, ranks=self.job.ranks)

    @property
    def scores(self) -> Scores:
        return self.scored.scores

    @property
    def sizes(self) -> dict[str, int]:
        if self.layout is not None:
            return {name: self.layout.numel[name] for name in self.scores}
        return {name: s.numel() for name, s in self.scores.items()}


def global_selection(scores: Scores, selection: Selection, mode: str, layout=None) -> Selection:
    """The run's selection when it is global; otherwise the global top-K of the same size.

    In per_tensor mode every tensor holds exactly K by construction, so counts per tensor or
    component would only mirror tensor counts; comparisons across tensors use this instead.
    """
    if mode == "global":
        return selection
    return top_k(scores, selection_size(selection), "global", layout=layout)


def sample_positions(sizes: dict[str, int], seed: int, n: int = SPEARMAN_SAMPLE) -> Selection:
    """A fixed, seeded uniform sample of weight positions over all scored tensors."""
    return random_k(sizes, min(n, sum(sizes.values())), "global", seed=seed)


def cap_ks(ks, sizes: dict[str, int], mode: str) -> tuple[list[int], list[int]]:
    """(sorted distinct K values capped at the mode's largest K, the requested values capped)."""
    limit = max_k(sizes, mode)
    return sorted({min(int(k), limit) for k in ks}), sorted(int(k) for k in ks if k > limit)


def layer_key(layer: int | None) -> str:
    return "none" if layer is None else str(layer)


def mean_abs_by_layer(scores: Scores, metas: dict[str, ParamMeta],
                      layout=None) -> dict[str, float]:
    """Per block: mean |score| over all its scored weights (one host sync in all). ``layout``
    (sharding.Layout) when ``scores`` are this rank's rows: the sums are added over the ranks."""
    sums = abs_sums(scores, layout)
    mass: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, total in sums.items():
        key = layer_key(metas[name].layer)
        mass[key] = mass.get(key, 0.0) + total
        count[key] = count.get(key, 0) + (layout.numel[name] if layout else scores[name].numel())
    return {key: mass[key] / count[key] for key in sorted(mass, key=_layer_order)}


def abs_sums(scores: Scores, layout=None) -> dict[str, float]:
    """Sum of |score| per tensor; under --shard (``layout``) the whole tensor's, over the ranks."""
    if layout is None:
        return per_tensor(scores, lambda s: s.detach().float().abs().sum())
    sums = layout.ranks.reduced([s.detach().float().abs().sum() for s in scores.values()])
    return dict(zip(scores, sums.tolist()))


def _layer_order(key: str):
    return (1, 0) if key == "none" else (0, int(key))


def finite_or_none(value):
    value = float(value)
    return value if np.isfinite(value) else None
