"""What every advanced analysis receives, and the small helpers they share.

An analysis is ``fn(ctx: AnalysisContext) -> dict``; the pipeline writes the dict to
``enhanced_analysis.json`` under the analysis' key. Scores follow the project convention: one
float32 tensor per scored parameter in its stored layout, ranked by |score|.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from src.errors import UserError
from src.eval.perplexity import EvalResult, evaluate
from src.models.components import ParamMeta
from src.sensitivity.metrics import Scores
from src.sensitivity.perturb import PerturbOptions
from src.sensitivity.rank import Selection, random_k, selection_size, top_k

SPEARMAN_SAMPLE = 100_000  # weights in the fixed random sample behind every Spearman correlation
DEFAULT_METHOD = "zero"    # perturbation of the advanced experiments when --perturb is not given


@dataclass
class AnalysisContext:
    config: Any                      # src.cli.RunConfig
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    scores: Scores                   # the run's --metric
    selection: Selection             # the run's top-K (its K and mode)
    metas: dict[str, ParamMeta]
    job: Any                         # src.sensitivity.metrics.ScoringJob of the run
    data: Any                        # src.data.loading.DataSplit
    baseline: EvalResult
    tokenizer: Any = None
    cache: dict = field(default_factory=dict)  # results shared between analyses of one run

    def evaluate(self) -> EvalResult:
        return evaluate(self.model, self.data.evaluation, self.config.batch_size)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: s.numel() for name, s in self.scores.items()}

    @property
    def method(self) -> str:
        return self.config.perturb or DEFAULT_METHOD

    @property
    def options(self) -> PerturbOptions:
        c = self.config
        return PerturbOptions(scale=c.perturb_scale, bit=c.bit_position, prob=c.perturb_prob)


def global_selection(scores: Scores, selection: Selection, mode: str) -> Selection:
    """The run's selection when it is global; otherwise the global top-K of the same size.

    In per_layer mode every tensor holds exactly K by construction, so counts per tensor or
    component would only mirror tensor counts; comparisons across tensors use this instead.
    """
    if mode == "global":
        return selection
    return top_k(scores, selection_size(selection), "global")


def sample_positions(sizes: dict[str, int], seed: int, n: int = SPEARMAN_SAMPLE) -> Selection:
    """A fixed, seeded uniform sample of weight positions over all scored tensors."""
    return random_k(sizes, min(n, sum(sizes.values())), "global", seed=seed)


def max_k(sizes: dict[str, int], mode: str) -> int:
    """Largest K that the mode allows: the smallest tensor (per_layer) or all weights (global)."""
    return min(sizes.values()) if mode == "per_layer" else sum(sizes.values())


def cap_ks(ks, sizes: dict[str, int], mode: str) -> tuple[list[int], list[int]]:
    """(sorted distinct K values capped at ``max_k``, the requested values that were capped)."""
    limit = max_k(sizes, mode)
    return sorted({min(int(k), limit) for k in ks}), sorted(int(k) for k in ks if k > limit)


def layer_key(layer: int | None) -> str:
    return "none" if layer is None else str(layer)


def mean_abs_by_layer(scores: Scores, metas: dict[str, ParamMeta]) -> dict[str, float]:
    """Per block: mean |score| over all its scored weights (one host sync in all)."""
    sums = per_tensor(scores, lambda s: s.detach().float().abs().sum())
    mass: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, total in sums.items():
        key = layer_key(metas[name].layer)
        mass[key] = mass.get(key, 0.0) + total
        count[key] = count.get(key, 0) + scores[name].numel()
    return {key: mass[key] / count[key] for key in sorted(mass, key=_layer_order)}


def per_tensor(tensors: dict[str, torch.Tensor], reduce) -> dict:
    """``reduce`` (tensor -> 0-d or 1-d tensor) of every tensor, computed on its own device."""
    names = list(tensors)
    return dict(zip(names, to_host([reduce(tensors[n]) for n in names])))


def to_host(values: list[torch.Tensor]) -> list:
    """Floats (0-d) or lists (1-d) of device tensors; one transfer per device, not per value."""
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        by_device.setdefault(value.device, []).append(i)
    out: list = [None] * len(values)
    for positions in by_device.values():
        numbers = torch.stack([values[i].float() for i in positions]).cpu().tolist()
        for i, number in zip(positions, numbers):
            out[i] = number
    return out


def _layer_order(key: str):
    return (1, 0) if key == "none" else (0, int(key))


def finite_or_none(value):
    value = float(value)
    return value if np.isfinite(value) else None


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
