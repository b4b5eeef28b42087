"""Sensitivity metrics: a registry of name -> scoring function, compute_scores() and
compute_many().

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
* ``obd``            ½·H_ii·w_i² (Optimal Brain Damage), H_ii hutchinson_diag's estimate (nats);
                     signed, with the standard error ½·w²·stderr(H_ii).
* ``fisher_w2``      ½·F_ii·w_i², F_ii grad_squared's empirical Fisher diagonal (nats²).

Derived metrics: a metric registered with ``base=`` transforms the output of another
(``fn(job, base_output) -> MetricOutput``, new tensors, the base's left as they are) and
inherits the base's registry flags (uses_data, options, shardable, settings, gradients) unless
it states its own. ``compute_many`` computes each base once for all the metrics asked that
derive from it: obd with hutchinson_diag costs one Hutchinson pass, fisher_w2 with grad_squared
one Fisher pass. Shared passes (``register_shared_pass``): one pass that scores several metrics
at once; grad_squared, grad_x_weight and act_mag scored together take one forward+backward per
batch (src/sensitivity/first_order.py).

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
from dataclasses import dataclass, replace
from typing import Callable

import torch

from src.errors import UserError
from src.sensitivity.scoring import (MetricOutput, Scores, ScoringJob, recomputed_blocks,
                                     settings_of)

# the modules that register metrics, in the order of --metric's choices (a derived metric's
# module after its base's)
MODULES = ("weight_metrics", "fisher", "activation", "hutchinson", "saliency", "first_order")


@dataclass(frozen=True)
class Metric:
    fn: Callable[..., MetricOutput]  # (job) -> output; with a base: (job, base_output) -> output
    uses_data: bool
    signed: bool
    description: str
    options: tuple[str, ...] = ()  # job or settings fields that change the scores
    shardable: bool = False  # runs on FSDP-sharded weights (torchrun --shard)
    unshardable_because: str = ""  # why not, when it is a limit of FSDP and not of this tool
    settings: type | None = None  # its flags: a src.options.Settings dataclass
    gradients: bool = False  # runs backward passes (--gradient-checkpointing applies)
    base: str | None = None  # the metric whose output this one transforms (None: scores itself)


METRICS: dict[str, Metric] = {}
_DECLARED: list[str] = []  # every registered name, in the order of the register() calls
_AWAITING_BASE: list[tuple[str, Callable, dict]] = []  # derived metrics whose base is not in yet


def register(name: str, *, signed: bool = False, description: str = "",
             base: str | None = None, **flags):
    """Register the decorated function as metric ``name``. ``flags``: the other ``Metric``
    fields (``uses_data`` required, ``options``, ``shardable``, ``unshardable_because``,
    ``settings``, ``gradients``). With ``base`` the function takes ``(job, base_output)`` and
    every flag not given is the base's; it enters ``METRICS`` once its base has (its module may
    be imported while its base's is still being imported: a cycle through this module)."""
    def wrap(fn):
        _DECLARED.append(name)
        _AWAITING_BASE.append((name, fn, dict(signed=signed, description=description,
                                              base=base, **flags)))
        _enter_ready_metrics()
        return fn
    return wrap


def _enter_ready_metrics() -> None:
    """Move every registered metric whose base is in ``METRICS`` (or that has none) there, then
    order ``METRICS`` by module (``MODULES``), in a module by declaration."""
    entered = True
    while entered:
        ready = [entry for entry in _AWAITING_BASE
                 if entry[2]["base"] is None or entry[2]["base"] in METRICS]
        for entry in ready:
            name, fn, declared = entry
            base = declared["base"]
            METRICS[name] = Metric(fn, **declared) if base is None else \
                replace(METRICS[base], fn=fn, **declared)
            _AWAITING_BASE.remove(entry)
        entered = bool(ready)
    ordered = sorted(METRICS.items(),
                     key=lambda item: (_module_rank(item[1]), _DECLARED.index(item[0])))
    METRICS.clear()
    METRICS.update(ordered)


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
    """``metric``'s output on ``job`` (a derived metric: its base's pass, then the derivation)."""
    return compute_many(job, [metric])[metric]


def compute_many(job: ScoringJob, names, known: dict[str, MetricOutput] | None = None
                 ) -> dict[str, MetricOutput]:
    """name -> output of every metric in ``names``, each scoring pass run once: a base shared
    by several derived metrics (or asked for itself) is computed once, and not at all when
    ``known`` (name -> output already computed on this job, e.g. the run's own scores) holds it.
    Every output asked for is alive at the end (derived ones beside their bases' while they are
    derived)."""
    for name in names:
        _check_runnable(job, name)
    outputs = dict(known or {})
    _run_shared_passes(job, names, outputs)
    for name in names:
        _compute_into(job, name, outputs)
    return {name: outputs[name] for name in names}


@dataclass(frozen=True)
class SharedPass:
    """One pass that computes several metrics that score themselves (``members``) at once:
    ``fn(job, wanted) -> {name: output}`` for the members ``wanted`` (at least two), or None
    when it cannot run on this job (the metrics then run one by one)."""
    members: tuple[str, ...]
    fn: Callable[[ScoringJob, tuple[str, ...]], dict[str, MetricOutput] | None]


SHARED_PASSES: list[SharedPass] = []


def register_shared_pass(members: tuple[str, ...]):
    def wrap(fn):
        SHARED_PASSES.append(SharedPass(members, fn))
        return fn
    return wrap


def _run_shared_passes(job: ScoringJob, names, outputs: dict[str, MetricOutput]) -> None:
    """Fill ``outputs`` from every shared pass of which at least two members are needed (as
    themselves or as bases) and not known yet."""
    needed = {root_metric(name) for name in names} - set(outputs)
    for shared in SHARED_PASSES:
        wanted = tuple(m for m in shared.members if m in needed)
        if len(wanted) < 2:
            continue
        produced = _in_scoring_mode(job, any_gradients(wanted), lambda: shared.fn(job, wanted))
        for name, output in (produced or {}).items():
            _check_finite(name, output)
            outputs[name] = output


def root_metric(name: str) -> str:
    """The metric whose scoring pass computes ``name``: itself, or its base's root."""
    base = METRICS[name].base
    return name if base is None else root_metric(base)


def _check_runnable(job: ScoringJob, metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)}")
    if job.ranks.sharded and not METRICS[metric].shardable:
        raise UserError(f"metric {metric} does not run on sharded weights (--shard); use one of "
                        f"{', '.join(shardable_metrics())}")


def _compute_into(job: ScoringJob, metric: str, outputs: dict[str, MetricOutput]
                  ) -> MetricOutput:
    """``outputs[metric]``, computed first (and its base before it) when missing."""
    if metric in outputs:
        return outputs[metric]
    base = METRICS[metric].base
    if base is None:
        output = _scoring_pass(job, metric)
    else:
        output = METRICS[metric].fn(job, _compute_into(job, base, outputs))
    _check_finite(metric, output)
    outputs[metric] = output
    return output


def _check_finite(metric: str, output: MetricOutput) -> None:
    for name in _non_finite(output.scores):
        raise UserError(f"metric {metric} produced non-finite scores for {name}; the model "
                        f"may be too unstable in this dtype (try float32)")


def _scoring_pass(job: ScoringJob, metric: str) -> MetricOutput:
    return _in_scoring_mode(job, METRICS[metric].gradients, lambda: METRICS[metric].fn(job))


def _in_scoring_mode(job: ScoringJob, gradients: bool, score: Callable):
    """``score()`` in eval mode (training mode restored afterwards), with gradient
    checkpointing when the job asks for it and the pass runs backward (``gradients``)."""
    was_training = job.model.training
    job.model.eval()
    recompute = job.gradient_checkpointing and gradients
    try:
        with recomputed_blocks(job.model) if recompute else nullcontext():
            return score()
    finally:
        job.model.train(was_training)


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
