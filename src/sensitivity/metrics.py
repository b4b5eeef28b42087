"""Sensitivity metrics: a registry of name -> scoring function, and compute_scores().

Every metric returns ``Scores``: parameter name -> float32 tensor of that parameter's shape, on
the parameter's device. The loss L is the mean next-token NLL (nats) over all valid calibration
tokens; scoring runs in eval mode (no dropout) with gradients only on the scored weights.

* ``grad_x_weight``  |ḡ ⊙ w|, ḡ = ∂L/∂w over all calibration tokens (first-order Taylor).
* ``grad_squared``   empirical Fisher diagonal: mean over sequences s of (∂L_s/∂w)², L_s the
                     token-mean NLL of sequence s.
* ``hutchinson_diag`` diag(∂²L/∂w²) ≈ mean over Rademacher probes z and batches of z ⊙ (H z).
                     Signed; ranking uses |score|. A standard error per weight comes with it.
* ``magnitude``      |w|.
* ``act_mag``        |W_ij| · ‖X_j‖₂ (Wanda): X_j = input channel j of the weight's layer over all
                     real calibration tokens. For an embedding, ‖X_j‖₂ = sqrt(count of index j).
* ``random``         seeded uniform [0, 1): a null metric.

Adding a metric is one module in ``MODULES`` that calls ``register`` at import (README: adding a
metric with an option). A metric's own flags: a ``Settings`` dataclass (src/options.py) named in
``register(..., settings=)``, read with ``settings_of(job, ItsSettings)``; ``options`` (job or
settings fields that change the scores) are recorded with stored scores. A metric iterates
``batches(job)`` and adds its local sums over the processes with ``job.ranks.sum_``
(src/distributed/ranks.py); it never needs to know how many there are.
"""
from __future__ import annotations

import importlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from src.errors import UserError
from src.sensitivity.scoring import (MetricOutput, Scores, ScoringJob, recomputed_blocks,
                                     settings_of)

# the modules that register metrics, in the order of --metric's choices
MODULES = ("weight_metrics", "fisher", "activation", "hutchinson")


@dataclass(frozen=True)
class Metric:
    fn: Callable[[ScoringJob], MetricOutput]
    uses_data: bool
    signed: bool
    description: str
    options: tuple[str, ...] = ()  # job or settings fields that change the scores
    shardable: bool = False  # runs on FSDP-sharded weights (torchrun --shard)
    unshardable_because: str = ""  # why not, when it is a limit of FSDP and not of this tool
    settings: type | None = None  # its flags: a src.options.Settings dataclass
    gradients: bool = False  # runs backward passes (--gradient-checkpointing applies)


METRICS: dict[str, Metric] = {}


def register(name: str, *, uses_data: bool, signed: bool = False, description: str = "",
             options: tuple[str, ...] = (), shardable: bool = False,
             unshardable_because: str = "", settings: type | None = None,
             gradients: bool = False):
    def wrap(fn):
        METRICS[name] = Metric(fn, uses_data, signed, description, options, shardable,
                               unshardable_because, settings, gradients)
        ordered = sorted(METRICS.items(), key=lambda item: _module_rank(item[1]))  # stable
        METRICS.clear()
        METRICS.update(ordered)
        return fn
    return wrap


def _module_rank(metric: Metric) -> int:
    """A metric's place: its module's in MODULES (whichever module was imported first)."""
    module = metric.fn.__module__.rsplit(".", 1)[-1]
    return MODULES.index(module) if module in MODULES else len(MODULES)


def option_value(metric: str, job: ScoringJob, key: str):
    """One of ``metric``'s options in ``job``: a field of the metric's settings, else the job's."""
    settings_class = METRICS[metric].settings
    if settings_class is not None and key in settings_class.__dataclass_fields__:
        return getattr(settings_of(job, settings_class), key)
    return getattr(job, key)


def compute_scores(job: ScoringJob, metric: str) -> MetricOutput:
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if job.ranks.sharded and not METRICS[metric].shardable:
        raise UserError(f"metric {metric} does not run on sharded weights (--shard); use one of "
                        f"{', '.join(shardable_metrics())}")
    was_training = job.model.training
    job.model.eval()
    recompute = job.gradient_checkpointing and METRICS[metric].gradients
    try:
        with recomputed_blocks(job.model) if recompute else nullcontext():
            output = METRICS[metric].fn(job)
    finally:
        job.model.train(was_training)
    for name in _non_finite(output.scores):
        raise UserError(f"metric {metric} produced non-finite scores for {name}; the model "
                        f"may be too unstable in this dtype (try float32)")
    return output


def any_gradients(names) -> bool:
    """Whether any of the metrics ``names`` runs backward passes (unknown names: no)."""
    return any(METRICS[name].gradients for name in names if name in METRICS)


def shardable_metrics() -> list[str]:
    return [name for name, metric in METRICS.items() if metric.shardable]


def _non_finite(scores: Scores) -> list[str]:
    """Names of score tensors holding inf or NaN. A NaN or inf entry makes the tensor's sum
    non-finite, so one summing pass per tensor (read on the host together) clears the normal
    case; only a non-finite sum (which a finite overflow can also give) gets the exact test."""
    totals = [score.sum(dtype=torch.float32) for score in scores.values()]
    for device in {total.device for total in totals if total.is_cuda}:
        torch.cuda.synchronize(device)
    totals = [total.cpu() for total in totals]
    return [name for (name, score), total in zip(scores.items(), totals)
            if not torch.isfinite(total) and not bool(torch.isfinite(score).all())]


for _module in MODULES:  # after register() exists: each module registers its metrics
    importlib.import_module(f"src.sensitivity.{_module}")
